"""State transitions as pure functions: (read-only state, tx) -> the writes it makes, or an error.

State is a key-value map (docs/ledger.md, "State"):
    b"v1:acct:" + 20-byte account id  -> u64 balance | u64 nonce          (absent = 0, 0)
    b"v1:rcpt:" + 32-byte receipt hash -> u64 height | 32 tx hash | u64 amount   (minted once, ever)
    b"v1:evid:" + 20-byte authority id -> u64 height | 32 tx hash   (evidence against it, recorded once)
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Container, Iterable, Mapping

from aitbc import bech32, crypto
from aitbc.errors import AlreadyExists, FailedPrecondition, InvalidArgument, PermissionDenied, ReceiptError
from aitbc.ledger import finality
from aitbc.ledger.genesis import Genesis
from aitbc.ledger.tx import KIND_EVIDENCE, KIND_MINT, KIND_TRANSFER, MAX_U64, Tx, verify_tx_signature
from aitbc.receipts import verify_receipt

ACCT = b"v1:acct:"
RCPT = b"v1:rcpt:"
EVID = b"v1:evid:"
STATE_DOMAIN = b"AITBC/state/v1"

Reader = Callable[[bytes], "bytes | None"]
_ACCT = struct.Struct(">QQ")
_RCPT = struct.Struct(">Q32sQ")
_U16 = struct.Struct(">H")


def acct_key(account_id: bytes) -> bytes:
    return ACCT + account_id


def rcpt_key(receipt_hash: bytes) -> bytes:
    return RCPT + receipt_hash


def evid_key(account_id: bytes) -> bytes:
    return EVID + account_id


def evidence_height(read: Reader, account_id: bytes) -> int | None:
    """The height of the block that recorded evidence against this authority, or None."""
    seen = read(evid_key(account_id))
    return None if seen is None else struct.unpack_from(">Q", seen)[0]


def encode_account(balance: int, nonce: int) -> bytes:
    return _ACCT.pack(balance, nonce)


def decode_account(value: bytes | None) -> tuple[int, int]:
    return (0, 0) if value is None else _ACCT.unpack(value)


def read_account(read: Reader, account_id: bytes) -> tuple[int, int]:
    """(balance, nonce) of an account; an unknown account has both at 0."""
    return decode_account(read(acct_key(account_id)))


def encode_minted(height: int, tx_hash: bytes, amount: int) -> bytes:
    return _RCPT.pack(height, tx_hash, amount)


def decode_minted(value: bytes) -> tuple[int, bytes, int]:
    return _RCPT.unpack(value)


def mint_amount(units: int, price_per_unit: int, genesis: Genesis) -> int:
    """units x min(price, max_price_per_unit), then capped at max_mint_per_receipt and at 2^64-1."""
    return min(units * min(price_per_unit, genesis.max_price_per_unit), genesis.max_mint_per_receipt, MAX_U64)


def check_stateless(tx: Tx, genesis: Genesis) -> None:
    """Checks that depend only on the tx and genesis (cacheable): chain id, signature, receipt proof."""
    if tx.chain_id != genesis.chain_id:
        raise InvalidArgument(f"wrong chain id: tx is for {tx.chain_id!r}, this chain is {genesis.chain_id!r}")
    if tx.genesis_hash != (gh := genesis.hash()):
        raise InvalidArgument(
            f"wrong genesis: tx is signed for genesis {tx.genesis_hash.hex()}, this chain {genesis.chain_id!r} has "
            f"genesis {gh.hex()} (another network with the same chain id)")
    verify_tx_signature(tx)
    if tx.kind == KIND_EVIDENCE:
        finality.check_evidence(tx.evidence, genesis, gh)
    if tx.kind == KIND_MINT:
        r = tx.receipt
        assert r is not None
        if r.body.chain_id != genesis.chain_id:
            raise InvalidArgument(
                f"wrong chain id: receipt is for {r.body.chain_id!r}, this chain is {genesis.chain_id!r}")
        if r.attester not in genesis.attesters:
            raise PermissionDenied(f"attester not authorized: {r.attester} is not in the genesis attester set")
        try:
            verify_receipt(r, require_attestation=True, attesters=frozenset(genesis.attesters))
        except ReceiptError as exc:
            raise InvalidArgument(f"bad receipt: {exc.message}") from None
        if mint_amount(r.body.units, r.body.price_per_unit, genesis) == 0:
            raise InvalidArgument("bad receipt: it mints nothing (units or price is 0)")


def apply_tx(read: Reader, tx: Tx, genesis: Genesis, height: int) -> dict[bytes, bytes]:
    """The state writes of one tx on top of `read` (stateless checks are the caller's, done before)."""
    balance, nonce = read_account(read, tx.sender_id)
    if tx.nonce < nonce:
        raise FailedPrecondition(f"nonce too low: account nonce is {nonce}, tx nonce {tx.nonce}")
    if tx.nonce > nonce:
        raise FailedPrecondition(f"nonce gap: account nonce is {nonce}, tx nonce {tx.nonce}")
    if tx.kind == KIND_TRANSFER:
        if tx.amount > balance:
            raise FailedPrecondition(f"insufficient balance: have {balance}, need {tx.amount}")
        writes = {acct_key(tx.sender_id): encode_account(balance - tx.amount, nonce + 1)}
        to_bal, to_nonce = read_account(lambda k: writes.get(k) or read(k), tx.to)
        if to_bal + tx.amount > MAX_U64:
            raise FailedPrecondition(f"balance overflow: recipient holds {to_bal} and cannot receive {tx.amount} "
                                     "more (2^64-1 at most)")
        writes[acct_key(tx.to)] = encode_account(to_bal + tx.amount, to_nonce)
        return writes
    if tx.kind == KIND_EVIDENCE:
        voter = finality.evidence_voter(tx.evidence)
        if (seen := evidence_height(read, voter)) is not None:
            raise AlreadyExists(f"evidence already recorded: against {bech32.encode(crypto.ADDRESS_HRP, voter)} in block "
                                f"{seen}")
        return {acct_key(tx.sender_id): encode_account(balance, nonce + 1),
                evid_key(voter): struct.pack(">Q32s", height, tx.hash)}
    assert tx.kind == KIND_MINT and tx.receipt is not None
    rhash = tx.receipt.receipt_hash
    if read(rcpt_key(rhash)) is not None:
        raise AlreadyExists(f"receipt already minted: {rhash.hex()}")
    amount = mint_amount(tx.receipt.body.units, tx.receipt.body.price_per_unit, genesis)
    writes = {acct_key(tx.sender_id): encode_account(balance, nonce + 1), rcpt_key(rhash): encode_minted(
        height, tx.hash, amount)}
    provider = crypto.validate_address(tx.receipt.body.provider)
    p_bal, p_nonce = read_account(lambda k: writes.get(k) or read(k), provider)
    if p_bal + amount > MAX_U64:
        raise FailedPrecondition(f"balance overflow: provider holds {p_bal} and cannot receive {amount} more "
                                 "(2^64-1 at most)")
    writes[acct_key(provider)] = encode_account(p_bal + amount, p_nonce)
    return writes


class Overlay:
    """Pending writes over a read-only base; None marks a deletion."""

    __slots__ = ("base", "writes")

    def __init__(self, base: Reader, writes: dict[bytes, bytes | None] | None = None) -> None:
        self.base = base
        self.writes: dict[bytes, bytes | None] = {} if writes is None else writes

    def get(self, key: bytes) -> bytes | None:
        if key in self.writes:
            return self.writes[key]
        return self.base(key)


def apply_txs(read: Reader, txs: Iterable[Tx], genesis: Genesis, height: int, *,
              verified: Container[bytes] = frozenset()) -> dict[bytes, bytes]:
    """All-or-nothing state writes of a block's txs; raises InvalidArgument naming the failing tx."""
    ov = Overlay(read)
    for i, tx in enumerate(txs):
        try:
            if tx.hash not in verified:
                check_stateless(tx, genesis)
            ov.writes.update(apply_tx(ov.get, tx, genesis, height))
        except (InvalidArgument, FailedPrecondition, AlreadyExists, PermissionDenied) as exc:
            raise InvalidArgument(f"invalid block {height}: tx {i} ({tx.hash.hex()}): {exc.message}") from None
    return ov.writes  # type: ignore[return-value]


def encode_state_diff(writes: Mapping[bytes, bytes]) -> bytes:
    out = []
    for key in sorted(writes):
        value = writes[key]
        out.append(_U16.pack(len(key)) + key + _U16.pack(len(value)) + value)
    return b"".join(out)


def state_root(parent_root: bytes, height: int, writes: Mapping[bytes, bytes]) -> bytes:
    """Commitment to the whole state: a hash chain over each block's sorted state writes."""
    return crypto.domain_digest(STATE_DOMAIN, parent_root + struct.pack(">Q", height) + encode_state_diff(writes))


def genesis_state_root(genesis_hash: bytes) -> bytes:
    return crypto.domain_digest(STATE_DOMAIN, genesis_hash)
