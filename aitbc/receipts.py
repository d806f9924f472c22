"""Receipts: canonical JSON, hash, provider signature, attestation and offline verification.

The byte-exact definition is docs/receipts.md; tests/vectors/receipts.json holds its vectors.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from dataclasses import dataclass
from typing import Any

from aitbc import crypto, strict_json
from aitbc.errors import CryptoError, ReceiptError
from aitbc.ledger.genesis import CHAIN_ID_RE

RECEIPT_VERSION = 2  # what this code writes; version 1 receipts still verify (docs/receipts.md)
VERSIONS = (1, 2)
UNIT_TYPES = {1: ("gpu_ms", "images", "tokens"), 2: ("tile_steps", "tokens")}
TILE_PIXELS = 64 * 64  # an image unit is one 64x64-pixel tile denoised one step
PROVIDER_DOMAIN = b"AITBC/receipt/provider/v1"
ATTEST_DOMAIN = b"AITBC/receipt/attest/v1"
MAX_UINT = 2**53 - 1  # every integer fits an IEEE double exactly, so any JSON parser reads it back
_HEX64 = re.compile(r"^[0-9a-f]{64}\Z")
_HEX32 = re.compile(r"^[0-9a-f]{32}\Z")
_HEX130 = re.compile(r"^[0-9a-f]{130}\Z")  # a 65-byte signature r || s || v
FILE_FIELDS = frozenset({"receipt", "receipt_hash", "provider_signature", "attestation", "settlement"})
_PRINTABLE = re.compile(r"^[\x20-\x7e]*\Z")


@dataclass(frozen=True)
class ReceiptBody:
    job_id: str
    provider: str
    client: str
    units: int
    unit_type: str
    price_per_unit: int
    model: str
    prompt_hash: str
    started_at: int
    finished_at: int
    artifact_sha256: str
    nonce: str
    hub_id: str
    chain_id: str
    version: int = RECEIPT_VERSION
    # version 2: what the units are computed from, and the measured time (information, not paid)
    gpu_ms: int = 0
    width: int = 0
    height: int = 0
    steps: int = 0
    images: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0

    def validate(self) -> None:
        """Raise ReceiptError naming the first field that breaks docs/receipts.md. The body is
        immutable, so a body that passed once is not checked again."""
        self._valid  # noqa: B018 - the cached check (raises, and caches nothing, when invalid)

    @functools.cached_property
    def _valid(self) -> bool:
        if type(self.version) is not int or self.version not in VERSIONS:
            raise ReceiptError(f"receipt version {self.version!r} is not supported (expected one of "
                               f"{', '.join(map(str, VERSIONS))})")
        if self.version == 1 and any(getattr(self, name) for name in _V2_ONLY):
            raise ReceiptError(f"a version 1 receipt has no fields {', '.join(_V2_ONLY)}")
        for name, is_int in _FIELD_KINDS:
            value = getattr(self, name)
            if is_int:
                if type(value) is not int or not 0 <= value <= MAX_UINT:
                    raise ReceiptError(f"receipt field {name} must be an integer in [0, 2^53-1]")
            elif not isinstance(value, str) or not _PRINTABLE.match(value) or len(value) > 256:
                raise ReceiptError(f"receipt field {name} must be printable ASCII, at most 256 characters")
        if self.unit_type not in UNIT_TYPES[self.version]:
            raise ReceiptError(f"receipt unit_type must be one of {', '.join(UNIT_TYPES[self.version])} "
                               f"in version {self.version}")
        if self.version >= 2:
            self._check_units()
        for name in ("prompt_hash", "artifact_sha256"):
            if not _HEX64.match(getattr(self, name)):
                raise ReceiptError(f"receipt field {name} must be 64 lower-case hex characters")
        if not _HEX32.match(self.nonce):
            raise ReceiptError("receipt field nonce must be 32 lower-case hex characters")
        if not self.job_id or not self.chain_id or not self.model:
            raise ReceiptError("receipt fields job_id, model and chain_id must not be empty")
        if not CHAIN_ID_RE.match(self.chain_id):
            raise ReceiptError(f"receipt chain_id {self.chain_id!r} is not a chain id: 1-64 characters of a-z 0-9 . _ -, "
                               "starting with a letter or digit")
        if self.finished_at < self.started_at:
            raise ReceiptError("receipt finished_at is before started_at")
        try:
            crypto.validate_address(self.provider)
        except CryptoError as exc:
            raise ReceiptError(f"receipt provider: {exc.message}") from None
        return True

    def _check_units(self) -> None:
        """Version 2: units are a function of the fields beside them (docs/receipts.md, "Units")."""
        image = (self.width, self.height, self.steps, self.images)
        text = (self.prompt_tokens, self.generated_tokens)
        if self.unit_type == "tile_steps":
            if not all(image) or any(text):
                raise ReceiptError("a tile_steps receipt has width, height, steps and images >= 1 and no token counts")
            want = tile_steps(self.width, self.height, self.steps, self.images)
            if self.units != want:
                raise ReceiptError(f"receipt units {self.units} must be ceil(width x height / {TILE_PIXELS}) x steps x "
                                   f"images = {want}")
        else:
            if any(image) or self.prompt_tokens < 1:
                raise ReceiptError("a tokens receipt has prompt_tokens >= 1 and no width, height, steps or images")
            if self.units != self.prompt_tokens + self.generated_tokens:
                raise ReceiptError(f"receipt units {self.units} must be prompt_tokens + generated_tokens "
                                   f"({self.prompt_tokens} + {self.generated_tokens})")

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in field_names(self.version)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReceiptBody:
        if not isinstance(data, dict):
            raise ReceiptError("receipt must be a JSON object")
        names = _V1_SET if data.get("version") == 1 else _FIELD_SET
        missing = names - data.keys()
        extra = data.keys() - names
        if missing:
            raise ReceiptError(f"receipt is missing fields: {', '.join(sorted(missing))}")
        if extra:
            raise ReceiptError(f"receipt has unknown fields: {', '.join(sorted(extra))}")
        body = cls(**data)
        body.validate()
        return body

    @functools.cached_property
    def _canonical(self) -> bytes:  # the body is immutable: validate and encode once
        self.validate()
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()

    def canonical_bytes(self) -> bytes:
        """Minified JSON, keys sorted, ASCII only (docs/receipts.md)."""
        return self._canonical

    @functools.cached_property
    def _hash(self) -> bytes:
        return crypto.sha256(self._canonical)

    def hash(self) -> bytes:
        return self._hash


_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(ReceiptBody))
_FIELD_SET = frozenset(_FIELD_NAMES)
_V2_ONLY = ("gpu_ms", "width", "height", "steps", "images", "prompt_tokens", "generated_tokens")
_V1_FIELDS = tuple(n for n in _FIELD_NAMES if n not in _V2_ONLY)
_V1_SET = frozenset(_V1_FIELDS)


def field_names(version: int) -> tuple[str, ...]:
    """The body fields of a receipt version (version 1 lacks the metering fields)."""
    return _V1_FIELDS if version == 1 else _FIELD_NAMES


def tile_steps(width: int, height: int, steps: int, images: int) -> int:
    """Image units (docs/receipts.md): 64x64-pixel tiles (rounded up) x denoising steps x images."""
    return -(-width * height // TILE_PIXELS) * steps * images
_FIELD_KINDS = tuple((f.name, f.type == "int") for f in dataclasses.fields(ReceiptBody))


def manifest_sha256(artifact_digests: list[bytes]) -> str:
    """Receipt `artifact_sha256`: sha256 over the outputs' raw sha256 digests, in order."""
    if not artifact_digests:
        raise ReceiptError("a receipt needs at least one artifact")
    return crypto.sha256(b"".join(artifact_digests)).hex()


@dataclass(frozen=True, slots=True)
class SignedReceipt:
    body: ReceiptBody
    provider_signature: bytes
    attester: str = ""
    attester_signature: bytes = b""

    @property
    def receipt_hash(self) -> bytes:
        return self.body.hash()

    def attest(self, key: crypto.PrivateKey) -> SignedReceipt:
        """Check the provider signature, then add this key's attestation."""
        verify_receipt(self, require_attestation=False)
        sig = key.sign(crypto.domain_digest(ATTEST_DOMAIN, self.receipt_hash))
        return dataclasses.replace(self, attester=key.address, attester_signature=sig)

    def to_json_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "receipt": self.body.to_dict(),
            "receipt_hash": self.receipt_hash.hex(),
            "provider_signature": self.provider_signature.hex(),
        }
        if self.attester:
            out["attestation"] = {"attester": self.attester, "signature": self.attester_signature.hex()}
        return out

    @classmethod
    def from_json_dict(cls, data: Any) -> SignedReceipt:
        """A receipt file's object (docs/receipts.md, "Receipt file"): exactly its fields, the body
        valid, `receipt_hash` present and equal to the body's hash, signatures as 130 lower-case hex.
        Signatures are checked by verify_receipt."""
        if not isinstance(data, dict) or "receipt" not in data:
            raise ReceiptError("not a receipt file: expected an object with a 'receipt' field")
        if extra := data.keys() - FILE_FIELDS:
            raise ReceiptError(f"receipt file has unknown fields: {', '.join(sorted(extra))}")
        body = ReceiptBody.from_dict(data["receipt"])
        claimed = data.get("receipt_hash")
        if claimed is None:
            raise ReceiptError("receipt file has no receipt_hash (it is required: it names the receipt that was "
                               "signed)")
        if not isinstance(claimed, str) or not _HEX64.match(claimed):
            raise ReceiptError("receipt_hash must be 64 lower-case hex characters")
        provider_sig = _signature_hex(data.get("provider_signature"), "provider_signature")
        attester, attester_sig = "", b""
        if "attestation" in data:
            att = data["attestation"]
            if not isinstance(att, dict) or att.keys() != {"attester", "signature"}:
                raise ReceiptError("attestation must be an object with exactly the fields attester and signature")
            try:
                crypto.validate_address(att["attester"])
            except CryptoError as exc:
                raise ReceiptError(f"attestation attester: {exc.message}") from None
            attester, attester_sig = att["attester"], _signature_hex(att["signature"], "attestation signature")
        if "settlement" in data and not isinstance(data["settlement"], dict):
            raise ReceiptError("settlement must be an object (it is informational and not signed)")
        receipt = cls(body, provider_sig, attester, attester_sig)
        if claimed != receipt.receipt_hash.hex():
            raise ReceiptError(
                f"receipt_hash {claimed} does not match the canonical hash {receipt.receipt_hash.hex()}: "
                "a field was altered"
            )
        return receipt


def _signature_hex(value: Any, name: str) -> bytes:
    if value is None:
        raise ReceiptError(f"receipt file has no {name}")
    if not isinstance(value, str) or not _HEX130.match(value):
        raise ReceiptError(f"{name} must be 130 lower-case hex characters (65 bytes r || s || v)")
    return bytes.fromhex(value)


def load_receipt_file(data: bytes | str) -> SignedReceipt:
    """Parse a receipt file's bytes strictly (UTF-8 without BOM, no duplicate keys, integers only:
    aitbc.strict_json) into a SignedReceipt; verify_receipt then checks its signatures."""
    try:
        doc = strict_json.loads(data)
    except strict_json.StrictJSONError as exc:
        raise ReceiptError(f"receipt file {exc}") from None
    return SignedReceipt.from_json_dict(doc)


def sign_receipt(body: ReceiptBody, key: crypto.PrivateKey) -> SignedReceipt:
    if body.provider != key.address:
        raise ReceiptError(f"receipt provider {body.provider} is not the signing key's address {key.address}")
    sig = key.sign(crypto.domain_digest(PROVIDER_DOMAIN, body.hash()))
    return SignedReceipt(body, sig)


def verify_receipt(
    receipt: SignedReceipt,
    *,
    require_attestation: bool = True,
    attesters: frozenset[str] | None = None,
) -> None:
    """Raise ReceiptError unless the body is well formed and every signature verifies."""
    h = receipt.receipt_hash  # validates the body
    try:
        signer = crypto.recover_address(crypto.domain_digest(PROVIDER_DOMAIN, h), receipt.provider_signature)
    except CryptoError as exc:
        raise ReceiptError(f"provider signature: {exc.message}") from None
    if signer != receipt.body.provider:
        raise ReceiptError(f"provider signature is by {signer}, not the receipt's provider {receipt.body.provider}")
    if not receipt.attester:
        if require_attestation:
            raise ReceiptError("receipt is not attested")
        return
    try:
        att_signer = crypto.recover_address(crypto.domain_digest(ATTEST_DOMAIN, h), receipt.attester_signature)
    except CryptoError as exc:
        raise ReceiptError(f"attester signature: {exc.message}") from None
    if att_signer != receipt.attester:
        raise ReceiptError(f"attester signature is by {att_signer}, not the named attester {receipt.attester}")
    if attesters is not None and receipt.attester not in attesters:
        raise ReceiptError(f"attester {receipt.attester} is not authorized")
