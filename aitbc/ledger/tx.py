"""Transactions: fixed-layout binary encoding, domain-separated signing, structural decoding.

Byte layout (docs/ledger.md version 2, "Transactions"); all integers big-endian, no floats anywhere:

    body = u8 version(=2) | u8 kind | u8 len(chain_id) | chain_id | 32 genesis hash | 33 sender pubkey
           | u64 nonce | payload
      TRANSFER (kind 1): 20 recipient account id | u64 amount
      MINT     (kind 2): u32 len(receipt) | receipt canonical JSON | 65 provider signature
                         | u8 len(attester) | attester address | 65 attester signature
      EVIDENCE (kind 3): u16 len(evidence) | evidence (aitbc.ledger.finality.encode_evidence)
      the economy (genesis version 3, docs/economy.md):
      STAKE 4 / UNSTAKE 5: u64 amount          WITHDRAW 6: (empty)
      ESCROW_DEPOSIT 7 / ESCROW_WITHDRAW 8: 20 attester id | u64 amount     ESCROW_RECLAIM 9: 20 attester id
      SETTLE (kind 10): a MINT payload | u32 len(quote) | quote canonical JSON (aitbc.quotes)
      SLASH  (kind 11): u8 n (2..16) | n x (a MINT payload's receipt part): the cheater's receipt, then
                        the honest receipts that outvoted it
      AUTHORITY_VOTE (kind 12, genesis version 3): u8 action (1 add, 2 remove) | 20 subject account id
    signed tx = body | signature (exactly 64 bytes r||s, low-S: the one canonical form)
    signing digest = sha256("AITBC/tx/v2" || 0x00 || body)
    tx hash = sha256(signed tx)

The genesis hash in the body binds the tx to one chain (two networks with the same chain id have
different genesis hashes); the single signature form makes the hash unique: there is no
re-encoding of a signed tx that a node accepts (docs/ledger.md, "One encoding, one hash").
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from aitbc import crypto, strict_json
from aitbc.errors import CryptoError, InvalidArgument
from aitbc.ledger.genesis import ChainRef, check_chain_id
from aitbc.quotes import QuoteBody, QuoteError
from aitbc.receipts import ReceiptBody, SignedReceipt

TX_VERSION = 2
TX_DOMAIN = b"AITBC/tx/v2"
KIND_TRANSFER = 1
KIND_MINT = 2
KIND_EVIDENCE = 3
KIND_STAKE = 4
KIND_UNSTAKE = 5
KIND_WITHDRAW = 6
KIND_ESCROW_DEPOSIT = 7
KIND_ESCROW_WITHDRAW = 8
KIND_ESCROW_RECLAIM = 9
KIND_SETTLE = 10
KIND_SLASH = 11
KIND_AUTHORITY_VOTE = 12
ACTION_ADD = 1
ACTION_REMOVE = 2
ACTION_NAMES = {ACTION_ADD: "add", ACTION_REMOVE: "remove"}
KIND_NAMES = {KIND_TRANSFER: "TRANSFER", KIND_MINT: "MINT", KIND_EVIDENCE: "EVIDENCE", KIND_STAKE: "STAKE",
              KIND_UNSTAKE: "UNSTAKE", KIND_WITHDRAW: "WITHDRAW", KIND_ESCROW_DEPOSIT: "ESCROW_DEPOSIT",
              KIND_ESCROW_WITHDRAW: "ESCROW_WITHDRAW", KIND_ESCROW_RECLAIM: "ESCROW_RECLAIM",
              KIND_SETTLE: "SETTLE", KIND_SLASH: "SLASH", KIND_AUTHORITY_VOTE: "AUTHORITY_VOTE"}
ECONOMY_KINDS = frozenset(range(KIND_STAKE, KIND_SLASH + 1))  # refused on a version 2 genesis
AMOUNT_KINDS = frozenset({KIND_STAKE, KIND_UNSTAKE, KIND_ESCROW_DEPOSIT, KIND_ESCROW_WITHDRAW})
ESCROW_KINDS = frozenset({KIND_ESCROW_DEPOSIT, KIND_ESCROW_WITHDRAW, KIND_ESCROW_RECLAIM})
SETTLEMENT_KINDS = frozenset({KIND_MINT, KIND_SETTLE})  # carry a receipt that mints (the mempool's reserve)
SPEND_KINDS = frozenset({KIND_TRANSFER, KIND_STAKE, KIND_ESCROW_DEPOSIT})  # take `amount` from the balance
MIN_VERDICT, MAX_VERDICT = 2, 16  # receipts in a SLASH: the cheater's and 1-15 honest ones
MAX_TX_BYTES = 16 * 1024
MAX_U64 = 2**64 - 1
SIGNATURE_BYTES = 64

_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")


def _header(kind: int, chain: ChainRef, sender_pubkey: bytes, nonce: int) -> bytes:
    check_chain_id(chain.chain_id)
    if len(chain.genesis_hash) != 32:
        raise InvalidArgument("genesis hash must be 32 bytes")
    if len(sender_pubkey) != 33:
        raise InvalidArgument("sender public key must be 33 bytes (compressed)")
    if type(nonce) is not int or not 0 <= nonce <= MAX_U64:
        raise InvalidArgument("nonce must be an integer in [0, 2^64-1]")
    cid = chain.chain_id.encode()
    return bytes((TX_VERSION, kind, len(cid))) + cid + chain.genesis_hash + sender_pubkey + _U64.pack(nonce)


def encode_transfer_body(chain: ChainRef, sender_pubkey: bytes, nonce: int, to: str, amount: int) -> bytes:
    to_id = crypto.validate_address(to)
    if type(amount) is not int or not 0 < amount <= MAX_U64:
        raise InvalidArgument("amount must be an integer in [1, 2^64-1]")
    return _header(KIND_TRANSFER, chain, sender_pubkey, nonce) + to_id + _U64.pack(amount)


def encode_mint_body(chain: ChainRef, sender_pubkey: bytes, nonce: int, receipt: SignedReceipt) -> bytes:
    return _header(KIND_MINT, chain, sender_pubkey, nonce) + _receipt_part(receipt)


def _receipt_part(receipt: SignedReceipt) -> bytes:
    """u32 len(R) | R | provider signature (65) | u8 len(A) | A | attester signature (65)."""
    body = receipt.body.canonical_bytes()
    att = receipt.attester.encode()
    if len(receipt.provider_signature) != 65 or len(receipt.attester_signature) != 65 or not att:
        raise InvalidArgument("a MINT needs an attested receipt with 65-byte provider and attester signatures")
    return _U32.pack(len(body)) + body + receipt.provider_signature + bytes((len(att),)) + att + receipt.attester_signature


def _amount(amount: int) -> bytes:
    if type(amount) is not int or not 0 < amount <= MAX_U64:
        raise InvalidArgument("amount must be an integer in [1, 2^64-1]")
    return _U64.pack(amount)


def encode_economy_body(kind: int, chain: ChainRef, sender_pubkey: bytes, nonce: int, *, amount: int = 0,
                        attester: str = "") -> bytes:
    """STAKE, UNSTAKE, WITHDRAW and the three escrow kinds (their payloads are fixed-width)."""
    payload = b""
    if kind in ESCROW_KINDS:
        payload += crypto.validate_address(attester)
    if kind in AMOUNT_KINDS:
        payload += _amount(amount)
    if kind not in AMOUNT_KINDS | ESCROW_KINDS | {KIND_WITHDRAW}:
        raise InvalidArgument(f"kind {kind} has no fixed-width payload")
    return _header(kind, chain, sender_pubkey, nonce) + payload


def encode_settle_body(chain: ChainRef, sender_pubkey: bytes, nonce: int, receipt: SignedReceipt,
                       quote: QuoteBody) -> bytes:
    q = quote.canonical_bytes()
    return _header(KIND_SETTLE, chain, sender_pubkey, nonce) + _receipt_part(receipt) + _U32.pack(len(q)) + q


def encode_slash_body(chain: ChainRef, sender_pubkey: bytes, nonce: int, cheater: SignedReceipt,
                      honest: list[SignedReceipt] | tuple[SignedReceipt, ...]) -> bytes:
    verdict = [cheater, *honest]
    if not MIN_VERDICT <= len(verdict) <= MAX_VERDICT:
        raise InvalidArgument(f"a SLASH carries the cheater's receipt and 1-{MAX_VERDICT - 1} honest ones")
    return (_header(KIND_SLASH, chain, sender_pubkey, nonce) + bytes((len(verdict),))
            + b"".join(_receipt_part(r) for r in verdict))


def encode_evidence_body(chain: ChainRef, sender_pubkey: bytes, nonce: int, evidence: bytes) -> bytes:
    if not 0 < len(evidence) <= 0xFFFF:
        raise InvalidArgument("evidence must be 1-65535 bytes")
    return _header(KIND_EVIDENCE, chain, sender_pubkey, nonce) + struct.pack(">H", len(evidence)) + evidence


def encode_authority_vote_body(chain: ChainRef, sender_pubkey: bytes, nonce: int, action: int, subject: str) -> bytes:
    if action not in ACTION_NAMES:
        raise InvalidArgument(f"authority vote action must be {ACTION_ADD} (add) or {ACTION_REMOVE} (remove)")
    return (_header(KIND_AUTHORITY_VOTE, chain, sender_pubkey, nonce) + bytes((action,))
            + crypto.validate_address(subject))


def signing_digest(body: bytes) -> bytes:
    return crypto.domain_digest(TX_DOMAIN, body)


def attach_signature(body: bytes, signature: bytes) -> bytes:
    """The signed tx: body || r || s. A 65-byte recoverable signature loses its recovery byte (the
    sender's key is in the body), so every signer produces the one canonical form."""
    if len(signature) not in (64, 65):
        raise InvalidArgument(f"signature must be 64 or 65 bytes, got {len(signature)}")
    return body + signature[:SIGNATURE_BYTES]


def sign_body(body: bytes, key: crypto.PrivateKey) -> bytes:
    return attach_signature(body, key.sign(signing_digest(body)))


def make_transfer(key: crypto.PrivateKey, chain: ChainRef, nonce: int, to: str, amount: int) -> bytes:
    """A signed TRANSFER, ready to broadcast (`chain`: `Genesis.ref`, or `LedgerClient.chain_ref()`)."""
    return sign_body(encode_transfer_body(chain, key.pubkey, nonce, to, amount), key)


def make_mint(key: crypto.PrivateKey, chain: ChainRef, nonce: int, receipt: SignedReceipt) -> bytes:
    """A signed MINT carrying an attested receipt; any account may send it (the receipt is the proof)."""
    return sign_body(encode_mint_body(chain, key.pubkey, nonce, receipt), key)


def make_evidence(key: crypto.PrivateKey, chain: ChainRef, nonce: int, evidence: bytes) -> bytes:
    """A signed EVIDENCE tx: two conflicting votes of one authority; any account may send it."""
    return sign_body(encode_evidence_body(chain, key.pubkey, nonce, evidence), key)


def make_stake(key: crypto.PrivateKey, chain: ChainRef, nonce: int, amount: int) -> bytes:
    """balance -> staked (docs/economy.md)."""
    return sign_body(encode_economy_body(KIND_STAKE, chain, key.pubkey, nonce, amount=amount), key)


def make_unstake(key: crypto.PrivateKey, chain: ChainRef, nonce: int, amount: int) -> bytes:
    """staked -> unbonding, withdrawable `unbonding_blocks` later."""
    return sign_body(encode_economy_body(KIND_UNSTAKE, chain, key.pubkey, nonce, amount=amount), key)


def make_withdraw(key: crypto.PrivateKey, chain: ChainRef, nonce: int) -> bytes:
    """unbonding -> balance, once the unlock height is reached."""
    return sign_body(encode_economy_body(KIND_WITHDRAW, chain, key.pubkey, nonce), key)


def make_escrow_deposit(key: crypto.PrivateKey, chain: ChainRef, nonce: int, attester: str, amount: int) -> bytes:
    """balance -> escrow (sender, attester).available: what that coordinator may settle fees from."""
    return sign_body(encode_economy_body(KIND_ESCROW_DEPOSIT, chain, key.pubkey, nonce, amount=amount,
                                         attester=attester), key)


def make_escrow_withdraw(key: crypto.PrivateKey, chain: ChainRef, nonce: int, attester: str, amount: int) -> bytes:
    """available -> unlocking (reclaimable `escrow_timeout_blocks` later; still settleable until then)."""
    return sign_body(encode_economy_body(KIND_ESCROW_WITHDRAW, chain, key.pubkey, nonce, amount=amount,
                                         attester=attester), key)


def make_escrow_reclaim(key: crypto.PrivateKey, chain: ChainRef, nonce: int, attester: str) -> bytes:
    """unlocking -> balance, once its unlock height is reached."""
    return sign_body(encode_economy_body(KIND_ESCROW_RECLAIM, chain, key.pubkey, nonce, attester=attester), key)


def make_settle(key: crypto.PrivateKey, chain: ChainRef, nonce: int, receipt: SignedReceipt,
                quote_body: QuoteBody) -> bytes:
    """A MINT of the receipt plus the quote's total from the client's escrow to the provider; the
    sender must be the receipt's (and the quote's) attester."""
    return sign_body(encode_settle_body(chain, key.pubkey, nonce, receipt, quote_body), key)


def make_slash(key: crypto.PrivateKey, chain: ChainRef, nonce: int, cheater: SignedReceipt,
               honest: list[SignedReceipt] | tuple[SignedReceipt, ...]) -> bytes:
    """A verdict: the cheater's receipt and the honest receipts that outvoted it (sent by a genesis attester)."""
    return sign_body(encode_slash_body(chain, key.pubkey, nonce, cheater, honest), key)


def make_authority_vote(key: crypto.PrivateKey, chain: ChainRef, nonce: int, action: int, subject: str) -> bytes:
    """An authority's vote to add (ACTION_ADD) or remove (ACTION_REMOVE) `subject` from the set
    (docs/ledger.md "Authority set changes"); the sender must be an authority of the block's epoch."""
    return sign_body(encode_authority_vote_body(chain, key.pubkey, nonce, action, subject), key)


@dataclass(frozen=True, slots=True, eq=False)
class Tx:
    kind: int
    chain_id: str
    genesis_hash: bytes
    sender_pubkey: bytes
    nonce: int
    to: bytes  # TRANSFER recipient account id, b"" for MINT
    amount: int  # TRANSFER amount, 0 for MINT (the minted amount comes from the receipt)
    receipt: SignedReceipt | None
    body: bytes
    signature: bytes
    raw: bytes
    hash: bytes
    sender_id: bytes
    evidence: bytes = b""  # EVIDENCE: the encoded evidence (docs/ledger.md "Finality votes")
    attester_id: bytes = b""  # ESCROW_*: the escrow's attester account id
    quote: QuoteBody | None = None  # SETTLE: the quote it settles
    verdict: tuple[SignedReceipt, ...] = ()  # SLASH: the cheater's receipt, then the honest ones
    action: int = 0  # AUTHORITY_VOTE: ACTION_ADD or ACTION_REMOVE
    subject: bytes = b""  # AUTHORITY_VOTE: the account id to add or remove

    @property
    def subject_address(self) -> str:
        from aitbc import bech32

        return bech32.encode(crypto.ADDRESS_HRP, self.subject) if self.subject else ""

    @property
    def attester_address(self) -> str:
        from aitbc import bech32

        return bech32.encode(crypto.ADDRESS_HRP, self.attester_id) if self.attester_id else ""

    @property
    def sender(self) -> str:
        return crypto.address_from_pubkey(self.sender_pubkey)

    @property
    def to_address(self) -> str:
        from aitbc import bech32

        return bech32.encode(crypto.ADDRESS_HRP, self.to) if self.to else ""

    @property
    def kind_name(self) -> str:
        return KIND_NAMES[self.kind]


def _malformed(why: str) -> InvalidArgument:
    return InvalidArgument(f"malformed transaction: {why}")


def decode_tx(raw: bytes) -> Tx:
    """Parse a signed tx (structure only: signatures and state are checked elsewhere)."""
    if len(raw) > MAX_TX_BYTES:
        raise InvalidArgument(f"tx too large: {len(raw)} bytes, at most {MAX_TX_BYTES}")
    try:
        return _decode(bytes(raw))
    except (IndexError, struct.error):
        raise _malformed("truncated") from None


def _decode(raw: bytes) -> Tx:
    if len(raw) < 3:
        raise _malformed("truncated")
    evidence = b""
    version, kind, clen = raw[0], raw[1], raw[2]
    if version != TX_VERSION:
        if version == 1:
            raise _malformed("version 1 is not supported: ledger format 2 binds every transaction to the genesis "
                             "hash; sign it again for this chain")
        raise _malformed(f"version {version} is not supported")
    pos = 3
    cid_bytes = raw[pos:pos + clen]
    pos += clen
    try:
        chain_id = cid_bytes.decode("ascii")
        check_chain_id(chain_id)
    except (UnicodeDecodeError, InvalidArgument):
        raise _malformed("bad chain id") from None
    genesis_hash = raw[pos:pos + 32]
    pos += 32
    if len(genesis_hash) != 32:
        raise _malformed("truncated")
    pubkey = raw[pos:pos + 33]
    pos += 33
    if len(pubkey) != 33 or pubkey[0] not in (2, 3):
        raise _malformed("sender public key must be 33 bytes (compressed)")
    (nonce,) = _U64.unpack_from(raw, pos)
    pos += 8
    to, amount, receipt, attester_id, quote, verdict = b"", 0, None, b"", None, ()
    action, subject = 0, b""
    if kind == KIND_TRANSFER:
        to = raw[pos:pos + 20]
        pos += 20
        (amount,) = _U64.unpack_from(raw, pos)
        pos += 8
        if len(to) != 20:
            raise _malformed("truncated")
        if amount == 0:
            raise _malformed("amount must be positive")
    elif kind in (KIND_MINT, KIND_SETTLE):
        receipt, pos = _read_receipt(raw, pos)
        if kind == KIND_SETTLE:
            (qlen,) = _U32.unpack_from(raw, pos)
            qjson = raw[pos + 4:pos + 4 + qlen]
            pos += 4 + qlen
            if len(qjson) != qlen:
                raise _malformed("truncated")
            try:
                quote = QuoteBody.from_canonical(qjson)
            except QuoteError as exc:
                raise InvalidArgument(f"bad quote: {exc.message}") from None
    elif kind in AMOUNT_KINDS | ESCROW_KINDS | {KIND_WITHDRAW}:
        if kind in ESCROW_KINDS:
            attester_id = raw[pos:pos + 20]
            pos += 20
            if len(attester_id) != 20:
                raise _malformed("truncated")
        if kind in AMOUNT_KINDS:
            (amount,) = _U64.unpack_from(raw, pos)
            pos += 8
            if amount == 0:
                raise _malformed("amount must be positive")
    elif kind == KIND_SLASH:
        n = raw[pos]
        pos += 1
        if not MIN_VERDICT <= n <= MAX_VERDICT:
            raise _malformed(f"a SLASH carries {MIN_VERDICT}-{MAX_VERDICT} receipts (the cheater's, then the "
                             f"honest ones), got {n}")
        got = []
        for _ in range(n):
            r, pos = _read_receipt(raw, pos)
            got.append(r)
        verdict = tuple(got)
    elif kind == KIND_AUTHORITY_VOTE:
        action, subject = raw[pos], raw[pos + 1:pos + 21]
        pos += 21
        if len(subject) != 20:
            raise _malformed("truncated")
        if action not in ACTION_NAMES:
            raise _malformed(f"authority vote action must be {ACTION_ADD} (add) or {ACTION_REMOVE} (remove), "
                             f"got {action}")
    elif kind == KIND_EVIDENCE:
        (elen,) = struct.unpack_from(">H", raw, pos)
        evidence = raw[pos + 2:pos + 2 + elen]
        pos += 2 + elen
        if len(evidence) != elen or elen == 0:
            raise _malformed("truncated evidence")
    else:
        raise _malformed(f"unknown kind {kind}")
    body_bytes, sig = raw[:pos], raw[pos:]
    if len(sig) != SIGNATURE_BYTES:
        raise _malformed(f"signature must be exactly {SIGNATURE_BYTES} bytes r || s (the one canonical form; "
                         f"drop a recovery byte), got {len(sig)}")
    return Tx(kind, chain_id, genesis_hash, pubkey, nonce, to, amount, receipt, body_bytes, sig, raw,
              crypto.sha256(raw), crypto.sha256(pubkey)[:20], evidence if kind == KIND_EVIDENCE else b"",
              attester_id, quote, verdict, action, subject)


def _read_receipt(raw: bytes, pos: int) -> tuple[SignedReceipt, int]:
    """The receipt part of a MINT payload at `pos`: (the receipt, the position after it)."""
    (rlen,) = _U32.unpack_from(raw, pos)
    pos += 4
    rjson = raw[pos:pos + rlen]
    pos += rlen
    psig = raw[pos:pos + 65]
    pos += 65
    alen = raw[pos]
    pos += 1
    att = raw[pos:pos + alen]
    pos += alen
    asig = raw[pos:pos + 65]
    pos += 65
    if len(rjson) != rlen or len(psig) != 65 or len(att) != alen or len(asig) != 65:
        raise _malformed("truncated")
    try:  # the receipt file's parser rules (docs/receipts.md), then byte-for-byte canonical
        doc = strict_json.loads(rjson)
    except strict_json.StrictJSONError as exc:
        raise _malformed(f"receipt {exc}") from None
    try:
        body = ReceiptBody.from_dict(doc)
        if body.canonical_bytes() != rjson:
            raise _malformed("receipt JSON is not canonical")
        receipt = SignedReceipt(body, psig, att.decode("ascii"), asig)
    except InvalidArgument as exc:
        if exc.message.startswith("malformed"):
            raise
        raise InvalidArgument(f"bad receipt: {exc.message}") from None
    except (ValueError, TypeError):  # an attester address that is not ASCII
        raise _malformed("attester address is not ASCII") from None
    return receipt, pos


try:  # direct libsecp256k1 calls: no DER round trip, parsed sender keys cached (~1.6x faster)
    from coincurve import PublicKey as _PublicKey
    from coincurve._libsecp256k1 import ffi as _ffi
    from coincurve._libsecp256k1 import lib as _lib
    from coincurve.context import GLOBAL_CONTEXT as _CTX

    _PUBKEYS: dict[bytes, object] = {}

    def _verify_compact(digest: bytes, sig: bytes, pubkey: bytes) -> bool:
        # the explicit range/low-S check mirrors aitbc.crypto (libsecp256k1's verify also refuses
        # high-S and parse_compact refuses r, s >= n; r = 0 or s = 0 never verify)
        s_val = int.from_bytes(sig[32:64], "big")
        if not 0 < s_val <= crypto.HALF_N or not 0 < int.from_bytes(sig[:32], "big") < crypto.SECP256K1_N:
            return False
        pk = _PUBKEYS.get(pubkey)
        if pk is None:
            try:
                pk = _PublicKey(pubkey).public_key
            except ValueError:
                return False
            if len(_PUBKEYS) >= 100_000:
                _PUBKEYS.clear()
            _PUBKEYS[pubkey] = pk
        parsed = _ffi.new("secp256k1_ecdsa_signature *")
        if not _lib.secp256k1_ecdsa_signature_parse_compact(_CTX.ctx, parsed, sig):
            return False
        return bool(_lib.secp256k1_ecdsa_verify(_CTX.ctx, parsed, digest, pk))
except ImportError:  # pragma: no cover - other coincurve layouts
    def _verify_compact(digest: bytes, sig: bytes, pubkey: bytes) -> bool:
        return crypto.verify(digest, sig, pubkey)


def verify_tx_signature(tx: Tx) -> None:
    """Raise CryptoError('bad signature: ...') unless the 64-byte low-S signature is by the sender's key."""
    if len(tx.signature) != SIGNATURE_BYTES:
        raise CryptoError(f"bad signature: must be {SIGNATURE_BYTES} bytes")
    if not _verify_compact(signing_digest(tx.body), tx.signature, tx.sender_pubkey):
        raise CryptoError("bad signature: does not verify against the sender's key (or is high-S)")
