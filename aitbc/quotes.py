"""Quotes: what a job will be charged, signed by the coordinator that will settle it.

The byte-exact definition is docs/economy.md ("Quotes"); tests/vectors/quotes.json holds its
vectors. A quote is canonical JSON like a receipt body (minified, keys sorted, ASCII, integers in
[0, 2^53-1], no floats); the coordinator signs sha256("AITBC/quote/v1" || 0x00 || canonical
bytes) with its attester key (65 bytes r || s || v, low-S). The ledger's SETTLE transaction carries
the quote beside the job's receipt and moves exactly `total` from the client's escrow to the
provider, once per quote and once per receipt.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from dataclasses import dataclass
from typing import Any

from aitbc import crypto, strict_json
from aitbc.errors import CryptoError, FailedPrecondition, InvalidArgument

QUOTE_VERSION = 1
QUOTE_DOMAIN = b"AITBC/quote/v1"
MAX_UINT = 2**53 - 1
UNIT_TYPES = ("tile_steps", "tokens")
_HEX64 = re.compile(r"\A[0-9a-f]{64}\Z")
_HEX32 = re.compile(r"\A[0-9a-f]{32}\Z")
_HEX130 = re.compile(r"\A[0-9a-f]{130}\Z")
_PRINTABLE = re.compile(r"\A[\x20-\x7e]{1,256}\Z")
FILE_FIELDS = frozenset({"quote", "quote_hash", "signature"})


class QuoteError(InvalidArgument):
    """A quote that breaks docs/economy.md; the message names the rule."""


@dataclass(frozen=True)
class QuoteBody:
    quote_id: str  # 32 lower-case hex (16 random bytes): two quotes never share a hash
    chain_id: str
    genesis_hash: str  # 64 lower-case hex: the chain whose escrow pays
    attester: str  # the coordinator's attester address: it signs the quote and the SETTLE
    client: str  # the client id the job's receipt carries in `client`
    client_address: str  # whose escrow (for `attester`) pays
    model: str
    prompt_hash: str  # 64 lower-case hex, as the receipt's prompt_hash
    unit_type: str  # "tile_steps" | "tokens", as the receipt's
    units: int  # image jobs: the receipt's units; text jobs: the most it can carry
    price_per_unit: int  # the miner's price the client pays per unit
    priority_fee: int  # paid on top, for a place ahead of cheaper jobs
    total: int  # units x price_per_unit + priority_fee: exactly what a successful job is charged
    expires_at: int  # Unix ms: the coordinator accepts the quote for a job until then
    version: int = QUOTE_VERSION

    def validate(self) -> None:
        self._valid  # noqa: B018 - cached: the body is immutable

    @functools.cached_property
    def _valid(self) -> bool:
        if type(self.version) is not int or self.version != QUOTE_VERSION:
            raise QuoteError(f"quote version {self.version!r} is not supported (expected {QUOTE_VERSION})")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "int":
                if type(value) is not int or not 0 <= value <= MAX_UINT:
                    raise QuoteError(f"quote field {f.name} must be an integer in [0, 2^53-1]")
            elif not isinstance(value, str) or not _PRINTABLE.match(value):
                raise QuoteError(f"quote field {f.name} must be printable ASCII, 1-256 characters")
        if not _HEX32.match(self.quote_id):
            raise QuoteError("quote field quote_id must be 32 lower-case hex characters")
        for name in ("genesis_hash", "prompt_hash"):
            if not _HEX64.match(getattr(self, name)):
                raise QuoteError(f"quote field {name} must be 64 lower-case hex characters")
        if self.unit_type not in UNIT_TYPES:
            raise QuoteError(f"quote unit_type must be one of {', '.join(UNIT_TYPES)}")
        if self.units < 1:
            raise QuoteError("quote units must be at least 1")
        if self.total != self.units * self.price_per_unit + self.priority_fee:
            raise QuoteError(f"quote total {self.total} must be units x price_per_unit + priority_fee = "
                             f"{self.units * self.price_per_unit + self.priority_fee}")
        if self.total < 1:
            raise QuoteError("quote total must be at least 1 (a free job needs no quote)")
        for name in ("attester", "client_address"):
            try:
                crypto.validate_address(getattr(self, name))
            except CryptoError as exc:
                raise QuoteError(f"quote {name}: {exc.message}") from None
        from aitbc.ledger.genesis import CHAIN_ID_RE

        if not CHAIN_ID_RE.match(self.chain_id):
            raise QuoteError(f"quote chain_id {self.chain_id!r} is not a chain id")
        return True

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Any) -> QuoteBody:
        if not isinstance(data, dict):
            raise QuoteError("quote must be a JSON object")
        missing, extra = _NAMES - data.keys(), data.keys() - _NAMES
        if missing:
            raise QuoteError(f"quote is missing fields: {', '.join(sorted(missing))}")
        if extra:
            raise QuoteError(f"quote has unknown fields: {', '.join(sorted(extra))}")
        body = cls(**data)
        body.validate()
        return body

    @classmethod
    def from_canonical(cls, raw: bytes) -> QuoteBody:
        """Parse the bytes a SETTLE carries: strict JSON, then byte-for-byte canonical."""
        try:
            doc = strict_json.loads(raw)
        except strict_json.StrictJSONError as exc:
            raise QuoteError(f"quote {exc}") from None
        body = cls.from_dict(doc)
        if body.canonical_bytes() != bytes(raw):
            raise QuoteError("quote JSON is not canonical")
        return body

    @functools.cached_property
    def _canonical(self) -> bytes:
        self.validate()
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()

    def canonical_bytes(self) -> bytes:
        return self._canonical

    def hash(self) -> bytes:
        return crypto.sha256(self._canonical)

    def digest(self) -> bytes:
        """What the attester signs."""
        return crypto.domain_digest(QUOTE_DOMAIN, self._canonical)


_NAMES = frozenset(f.name for f in dataclasses.fields(QuoteBody))


@dataclass(frozen=True, slots=True)
class SignedQuote:
    body: QuoteBody
    signature: bytes  # 65 bytes r || s || v by body.attester

    @property
    def quote_hash(self) -> bytes:
        return self.body.hash()

    def to_json_dict(self) -> dict[str, Any]:
        return {"quote": self.body.to_dict(), "quote_hash": self.quote_hash.hex(), "signature": self.signature.hex()}

    @classmethod
    def from_json_dict(cls, doc: Any) -> SignedQuote:
        if not isinstance(doc, dict):
            raise QuoteError("a quote file must be a JSON object")
        missing, extra = FILE_FIELDS - doc.keys(), doc.keys() - FILE_FIELDS
        if missing or extra:
            raise QuoteError(f"quote file fields: missing {sorted(missing)}, unknown {sorted(extra)}")
        body = QuoteBody.from_dict(doc["quote"])
        if not isinstance(doc["quote_hash"], str) or doc["quote_hash"] != body.hash().hex():
            raise QuoteError(f"quote_hash does not match the quote (expected {body.hash().hex()})")
        if not isinstance(doc["signature"], str) or not _HEX130.match(doc["signature"]):
            raise QuoteError("quote signature must be 130 lower-case hex characters (65 bytes r || s || v)")
        return cls(body, bytes.fromhex(doc["signature"]))

    @classmethod
    def loads(cls, raw: bytes | str) -> SignedQuote:
        try:
            doc = strict_json.loads(raw.encode() if isinstance(raw, str) else raw)
        except strict_json.StrictJSONError as exc:
            raise QuoteError(f"quote file {exc}") from None
        return cls.from_json_dict(doc)

    def dumps(self) -> str:
        return json.dumps(self.to_json_dict(), indent=2, sort_keys=True) + "\n"


def sign_quote(body: QuoteBody, key: crypto.PrivateKey) -> SignedQuote:
    if body.attester != key.address:
        raise QuoteError(f"quote attester {body.attester} is not this key ({key.address})")
    return SignedQuote(body, key.sign(body.digest()))


def verify_quote(quote: SignedQuote, *, attester: str | None = None, now_ms: int | None = None) -> None:
    """Raise QuoteError unless the signature is the attester's (and `attester`, when given, is it),
    and FailedPrecondition when it expired before `now_ms` (when given)."""
    quote.body.validate()
    try:
        signer = crypto.recover_address(quote.body.digest(), quote.signature)
    except CryptoError as exc:
        raise QuoteError(f"quote signature: {exc.message}") from None
    if signer != quote.body.attester:
        raise QuoteError(f"quote signature is not by its attester {quote.body.attester} (it is by {signer}): "
                         "the quote was altered or forged")
    if attester is not None and quote.body.attester != attester:
        raise QuoteError(f"quote is signed by {quote.body.attester}, not by this coordinator ({attester})")
    if now_ms is not None and now_ms > quote.body.expires_at:
        raise FailedPrecondition(f"quote {quote.body.quote_id} expired at {quote.body.expires_at} (now {now_ms}): ask for "
                         "a new one (aitbc quote ...)")
