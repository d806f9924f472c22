"""State transitions as pure functions: (read-only state, tx) -> the writes it makes, or an error.

State is a key-value map (docs/ledger.md, "State"):
    b"v1:acct:" + 20-byte account id  -> u64 balance | u64 nonce          (absent = 0, 0)
    b"v1:rcpt:" + 32-byte receipt hash -> u64 height | 32 tx hash | u64 amount   (minted once, ever)
    b"v1:evid:" + 20-byte authority id -> u64 height | 32 tx hash   (evidence against it, recorded once)
  genesis version 3 (the economy, docs/economy.md):
    b"v1:stak:" + account id            -> u64 staked | u64 unbonding | u64 unlock_height
    b"v1:escr:" + client id + attester id -> u64 available | u64 unlocking | u64 unlock_height
    b"v1:quot:" + quote hash            -> u64 height | 32 tx hash          (a quote settles once, ever)
    b"v1:slsh:" + cheater receipt hash  -> u64 height | 32 tx hash | u64 cut (a verdict once, ever)
    b"v1:supply"                        -> u64 minted | burned | staked | unbonding | escrowed
    b"v1:aset:", b"v1:avot:", b"v1:aprp:", b"v1:avtr:", b"v1:aque": the authority set per epoch and
                                          its votes (aitbc.ledger.authorities; the votes of an epoch
                                          are deleted by its last block)
A block's writes map a key to its value after the block, or to None: the block deleted it (the
state diff writes such a key with an empty value; no state value is empty).
Invariant (version 3), at every height: sum of balances + staked + unbonding + escrowed == minted - burned.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Container, Iterable, Mapping
from typing import NamedTuple

from aitbc import bech32, crypto
from aitbc.errors import AlreadyExists, FailedPrecondition, InvalidArgument, PermissionDenied, ReceiptError
from aitbc.ledger import authorities, finality
from aitbc.ledger.genesis import PPM, Genesis
from aitbc.ledger.tx import (
    ECONOMY_KINDS,
    KIND_AUTHORITY_VOTE,
    KIND_ESCROW_DEPOSIT,
    KIND_ESCROW_RECLAIM,
    KIND_ESCROW_WITHDRAW,
    KIND_EVIDENCE,
    KIND_MINT,
    KIND_SETTLE,
    KIND_SLASH,
    KIND_STAKE,
    KIND_TRANSFER,
    KIND_UNSTAKE,
    KIND_WITHDRAW,
    MAX_U64,
    Tx,
    verify_tx_signature,
)
from aitbc.receipts import SignedReceipt, verify_receipt

ACCT = b"v1:acct:"
RCPT = b"v1:rcpt:"
EVID = b"v1:evid:"
STAK = b"v1:stak:"
ESCR = b"v1:escr:"
QUOT = b"v1:quot:"
SLSH = b"v1:slsh:"
SUPPLY = b"v1:supply"
MAX_ESCROWS_LISTED = 64  # GetAccount lists at most this many escrows of one client
STATE_DOMAIN = b"AITBC/state/v1"

Reader = Callable[[bytes], "bytes | None"]
_ACCT = struct.Struct(">QQ")
_RCPT = struct.Struct(">Q32sQ")
_U16 = struct.Struct(">H")
_TRIPLE = struct.Struct(">QQQ")
_ONCE = struct.Struct(">Q32s")
_SLSH = struct.Struct(">Q32sQ")
_SUPPLY = struct.Struct(">QQQQQ")


def acct_key(account_id: bytes) -> bytes:
    return ACCT + account_id


def rcpt_key(receipt_hash: bytes) -> bytes:
    return RCPT + receipt_hash


def evid_key(account_id: bytes) -> bytes:
    return EVID + account_id


def stake_key(account_id: bytes) -> bytes:
    return STAK + account_id


def escrow_key(client_id: bytes, attester_id: bytes) -> bytes:
    return ESCR + client_id + attester_id


def quote_key(quote_hash: bytes) -> bytes:
    return QUOT + quote_hash


def slash_key(receipt_hash: bytes) -> bytes:
    return SLSH + receipt_hash


class Stake(NamedTuple):
    staked: int = 0
    unbonding: int = 0
    unlock_height: int = 0  # the height from which `unbonding` can be withdrawn (0: nothing unbonding)


class Escrow(NamedTuple):
    available: int = 0
    unlocking: int = 0
    unlock_height: int = 0  # the height from which `unlocking` can be reclaimed (0: nothing unlocking)


class Supply(NamedTuple):
    minted: int = 0
    burned: int = 0
    staked: int = 0
    unbonding: int = 0
    escrowed: int = 0

    @property
    def supply(self) -> int:
        return self.minted - self.burned


def read_stake(read: Reader, account_id: bytes) -> Stake:
    v = read(stake_key(account_id))
    return Stake() if v is None else Stake(*_TRIPLE.unpack(v))


def read_escrow(read: Reader, client_id: bytes, attester_id: bytes) -> Escrow:
    v = read(escrow_key(client_id, attester_id))
    return Escrow() if v is None else Escrow(*_TRIPLE.unpack(v))


def read_supply(read: Reader) -> Supply:
    v = read(SUPPLY)
    return Supply() if v is None else Supply(*_SUPPLY.unpack(v))


def decode_once(value: bytes) -> tuple[int, bytes]:
    """(height, tx hash) of a v1:quot: or v1:slsh: record."""
    return _ONCE.unpack_from(value)


def decode_slashed(value: bytes) -> tuple[int, bytes, int]:
    return _SLSH.unpack(value)


def list_escrows(scan: Callable[[bytes], Iterable[tuple[bytes, bytes]]], client_id: bytes,
                 limit: int = MAX_ESCROWS_LISTED) -> list[tuple[bytes, Escrow]]:
    """(attester id, escrow) of one client, by a prefix scan of v1:escr: + client id, at most `limit`."""
    out = []
    prefix = ESCR + client_id
    for k, v in scan(prefix):
        if len(out) >= limit:
            break
        out.append((k[len(prefix):], Escrow(*_TRIPLE.unpack(v))))
    return out


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
    if tx.kind in ECONOMY_KINDS and not genesis.has_economy:
        raise FailedPrecondition(
            "economy disabled: this chain's genesis is version 2, which has no stake, escrow or fee parameters; "
            "start a chain from a version 3 genesis (aitbc chain init)")
    if tx.kind == KIND_AUTHORITY_VOTE and not genesis.has_authority_votes:
        raise FailedPrecondition(
            "authority votes disabled: this chain's genesis is version 2, whose authority list is fixed; start a "
            "chain from a version 3 genesis (aitbc chain init) to change authorities by their votes")
    if tx.kind == KIND_EVIDENCE:
        finality.check_evidence(tx.evidence, genesis, gh)
    if tx.kind in (KIND_MINT, KIND_SETTLE):
        r = tx.receipt
        assert r is not None
        _check_receipt(r, genesis)
        if tx.kind == KIND_MINT and mint_amount(r.body.units, r.body.price_per_unit, genesis) == 0:
            raise InvalidArgument("bad receipt: it mints nothing (units or price is 0)")  # a SETTLE pays its fee
    if tx.kind == KIND_SETTLE:
        _check_settle(tx, genesis)
    if tx.kind == KIND_ESCROW_DEPOSIT:
        attester = tx.attester_address
        if attester not in genesis.attesters:
            raise PermissionDenied(f"attester not authorized: {attester} is not in the genesis attester set")
    if tx.kind == KIND_SLASH:
        _check_verdict(tx, genesis)


def _check_receipt(r: SignedReceipt, genesis: Genesis) -> None:
    """An attested receipt of this chain, by a genesis attester, whose signatures verify."""
    if r.body.chain_id != genesis.chain_id:
        raise InvalidArgument(
            f"wrong chain id: receipt is for {r.body.chain_id!r}, this chain is {genesis.chain_id!r}")
    if r.attester not in genesis.attesters:
        raise PermissionDenied(f"attester not authorized: {r.attester} is not in the genesis attester set")
    try:
        verify_receipt(r, require_attestation=True, attesters=frozenset(genesis.attesters))
    except ReceiptError as exc:
        raise InvalidArgument(f"bad receipt: {exc.message}") from None


def _check_settle(tx: Tx, genesis: Genesis) -> None:
    """The quote is this chain's, by the receipt's attester (who sends the SETTLE), for this job."""
    r, q = tx.receipt, tx.quote
    assert r is not None and q is not None
    if tx.sender != r.attester:
        raise PermissionDenied(f"settle not by the attester: sender {tx.sender} is not the receipt's attester "
                               f"{r.attester} (only it may move client escrow)")
    if q.chain_id != genesis.chain_id:
        raise InvalidArgument(f"wrong chain id: quote is for {q.chain_id!r}, this chain is {genesis.chain_id!r}")
    if q.genesis_hash != genesis.hash().hex():
        raise InvalidArgument(f"wrong genesis: quote is for genesis {q.genesis_hash}, this chain has genesis "
                              f"{genesis.hash().hex()}")
    b = r.body
    for name, in_quote, in_receipt in (("attester", q.attester, r.attester), ("client", q.client, b.client),
                                       ("model", q.model, b.model), ("prompt_hash", q.prompt_hash, b.prompt_hash),
                                       ("unit_type", q.unit_type, b.unit_type)):
        if in_quote != in_receipt:
            raise InvalidArgument(f"quote mismatch: {name} is {in_quote!r} in the quote, {in_receipt!r} in the "
                                  "receipt")
    if b.units > q.units:
        raise InvalidArgument(f"quote mismatch: the receipt has {b.units} units, the quote covers {q.units}")


def _check_verdict(tx: Tx, genesis: Genesis) -> None:
    """A SLASH: sent by a genesis attester; every receipt verifies; the honest runs did the same job
    (model, prompt, unit type) on other providers and produced another artifact than the cheater's."""
    if tx.sender not in genesis.attesters:
        raise PermissionDenied(f"slash not by an attester: {tx.sender} is not in the genesis attester set")
    cheater, *honest = tx.verdict
    for r in tx.verdict:
        _check_receipt(r, genesis)
    c = cheater.body
    providers = {c.provider}
    for i, r in enumerate(honest, 1):
        b = r.body
        for name in ("model", "prompt_hash", "unit_type"):
            if getattr(b, name) != getattr(c, name):
                raise InvalidArgument(f"bad verdict: receipt {i} has another {name} than the cheater's receipt")
        if b.provider in providers:
            raise InvalidArgument(f"bad verdict: receipt {i} is by {b.provider}, already in the verdict (the honest "
                                  "providers are distinct and are not the cheater)")
        providers.add(b.provider)
        if b.artifact_sha256 == c.artifact_sha256 and b.units == c.units:  # other units: it counted more than it ran
            raise InvalidArgument(f"bad verdict: receipt {i} has the cheater's artifact_sha256 and units (it agrees with "
                                  "it)")


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
    if tx.kind == KIND_MINT:
        return _apply_mint(read, tx, genesis, height, balance, nonce)
    if tx.kind == KIND_AUTHORITY_VOTE:
        writes = authorities.apply_vote(read, tx, genesis, height, evidence_height(read, tx.sender_id))
        writes[acct_key(tx.sender_id)] = encode_account(balance, nonce + 1)
        return writes
    return _apply_economy(read, tx, genesis, height, balance, nonce)


def _apply_mint(read: Reader, tx: Tx, genesis: Genesis, height: int, balance: int, nonce: int) -> dict[bytes, bytes]:
    assert tx.receipt is not None
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
    if genesis.has_economy:  # version 2 chains keep their MINT writes exactly
        sup = read_supply(read)
        if sup.minted + amount > MAX_U64:
            raise FailedPrecondition(f"supply overflow: {sup.minted} minted cannot grow by {amount} (2^64-1 at most)")
        writes[SUPPLY] = encode_supply(sup._replace(minted=sup.minted + amount))
    return writes


def encode_supply(s: Supply) -> bytes:
    return _SUPPLY.pack(*s)


def check_once(read: Reader, tx: Tx) -> None:
    """A SETTLE's quote and a SLASH's verdict are used once, ever (also checked at admission)."""
    if tx.kind == KIND_SETTLE and tx.quote is not None:
        qh = tx.quote.hash()
        if (seen := read(quote_key(qh))) is not None:
            raise AlreadyExists(f"quote already settled: {qh.hex()} in block {decode_once(seen)[0]}")
    if tx.kind == KIND_SLASH:
        rh = tx.verdict[0].receipt_hash
        if (seen := read(slash_key(rh))) is not None:
            raise AlreadyExists(f"verdict already recorded: the receipt {rh.hex()} was slashed in block "
                                f"{decode_once(seen)[0]}")


def _apply_economy(read: Reader, tx: Tx, genesis: Genesis, height: int, balance: int,
                   nonce: int) -> dict[bytes, bytes]:
    """STAKE .. SLASH (docs/ledger.md "Transition of one transaction", steps 8-15)."""
    me = tx.sender_id
    if tx.kind == KIND_SETTLE:
        check_once(read, tx)
        writes = _apply_mint(read, tx, genesis, height, balance, nonce)
        ov = Overlay(read, dict(writes))  # type: ignore[arg-type]
        return _apply_fee(ov, tx, genesis, height)
    if tx.kind == KIND_SLASH:
        check_once(read, tx)
        ov = Overlay(read, {acct_key(me): encode_account(balance, nonce + 1)})
        return _apply_slash(ov, tx, genesis, height)
    sup = read_supply(read)
    ov = Overlay(read)
    if tx.kind in (KIND_STAKE, KIND_ESCROW_DEPOSIT):
        if tx.amount > balance:
            raise FailedPrecondition(f"insufficient balance: have {balance}, need {tx.amount}")
        balance -= tx.amount
    if tx.kind == KIND_STAKE:
        st = read_stake(read, me)
        ov.writes[stake_key(me)] = _TRIPLE.pack(st.staked + tx.amount, st.unbonding, st.unlock_height)
        sup = sup._replace(staked=sup.staked + tx.amount)
    elif tx.kind == KIND_UNSTAKE:
        st = read_stake(read, me)
        if tx.amount > st.staked:
            raise FailedPrecondition(f"unstake too large: staked {st.staked}, asked {tx.amount}")
        unlock = height + genesis.unbonding_blocks  # one pool: a later UNSTAKE moves the unlock height
        ov.writes[stake_key(me)] = _TRIPLE.pack(st.staked - tx.amount, st.unbonding + tx.amount, unlock)
        sup = sup._replace(staked=sup.staked - tx.amount, unbonding=sup.unbonding + tx.amount)
    elif tx.kind == KIND_WITHDRAW:
        st = read_stake(read, me)
        if st.unbonding == 0:
            raise FailedPrecondition("nothing to withdraw: no tokens are unbonding (aitbc unstake first)")
        if height < st.unlock_height:
            raise FailedPrecondition(f"still unbonding: {st.unbonding} unlock at height {st.unlock_height} "
                                     f"(this block is {height})")
        balance = _credited(balance, st.unbonding, "sender")
        ov.writes[stake_key(me)] = _TRIPLE.pack(st.staked, 0, 0)
        sup = sup._replace(unbonding=sup.unbonding - st.unbonding)
    else:
        esc = read_escrow(read, me, tx.attester_id)
        if tx.kind == KIND_ESCROW_DEPOSIT:
            esc = esc._replace(available=esc.available + tx.amount)
            sup = sup._replace(escrowed=sup.escrowed + tx.amount)
        elif tx.kind == KIND_ESCROW_WITHDRAW:
            if tx.amount > esc.available:
                raise FailedPrecondition(f"escrow withdraw too large: available {esc.available}, asked {tx.amount}")
            esc = Escrow(esc.available - tx.amount, esc.unlocking + tx.amount,
                         height + genesis.escrow_timeout_blocks)  # one pool, as UNSTAKE
        else:
            assert tx.kind == KIND_ESCROW_RECLAIM
            if esc.unlocking == 0:
                raise FailedPrecondition(f"nothing to reclaim: no escrow for {tx.attester_address} is unlocking "
                                         "(aitbc escrow withdraw first)")
            if height < esc.unlock_height:
                raise FailedPrecondition(f"escrow still locked: {esc.unlocking} unlock at height {esc.unlock_height} "
                                         f"(this block is {height})")
            balance = _credited(balance, esc.unlocking, "sender")
            sup = sup._replace(escrowed=sup.escrowed - esc.unlocking)
            esc = Escrow(esc.available, 0, 0)
        ov.writes[escrow_key(me, tx.attester_id)] = _TRIPLE.pack(*esc)
    ov.writes[acct_key(me)] = encode_account(balance, nonce + 1)
    ov.writes[SUPPLY] = encode_supply(sup)
    return ov.writes  # type: ignore[return-value]


def _credited(balance: int, amount: int, who: str) -> int:
    if balance + amount > MAX_U64:
        raise FailedPrecondition(f"balance overflow: {who} holds {balance} and cannot receive {amount} more "
                                 "(2^64-1 at most)")
    return balance + amount


def _credit(ov: Overlay, account_id: bytes, amount: int, who: str) -> None:
    bal, n = read_account(ov.get, account_id)
    ov.writes[acct_key(account_id)] = encode_account(_credited(bal, amount, who), n)


def _apply_fee(ov: Overlay, tx: Tx, genesis: Genesis, height: int) -> dict[bytes, bytes]:
    """SETTLE after its MINT: quote.total from escrow(client, attester) to the provider, taken from
    `available` first, then from `unlocking` while it is still locked (h < unlock height)."""
    q, r = tx.quote, tx.receipt
    assert q is not None and r is not None
    client = crypto.validate_address(q.client_address)
    attester = crypto.validate_address(r.attester)
    esc = read_escrow(ov.get, client, attester)
    usable = esc.unlocking if height < esc.unlock_height else 0
    if q.total > esc.available + usable:
        raise FailedPrecondition(
            f"escrow too low: {q.client_address} has {esc.available} available and {usable} still locked for "
            f"{r.attester}, the quote needs {q.total} (aitbc escrow deposit {q.total - esc.available - usable})")
    from_available = min(q.total, esc.available)
    left = esc.unlocking - (q.total - from_available)
    esc = Escrow(esc.available - from_available, left, esc.unlock_height if left else 0)
    ov.writes[escrow_key(client, attester)] = _TRIPLE.pack(*esc)
    _credit(ov, crypto.validate_address(r.body.provider), q.total, "provider")
    sup = read_supply(ov.get)
    ov.writes[SUPPLY] = encode_supply(sup._replace(escrowed=sup.escrowed - q.total))
    ov.writes[quote_key(q.hash())] = _ONCE.pack(height, tx.hash)
    return ov.writes  # type: ignore[return-value]


def slash_split(stake: Stake, genesis: Genesis, honest: int) -> tuple[int, int, int]:
    """(cut, paid to each honest provider, burned): integers only, remainders burned."""
    cut = (stake.staked + stake.unbonding) * genesis.slash_ppm // PPM
    each = cut * genesis.slash_reward_ppm // PPM // honest
    return cut, each, cut - each * honest


def _apply_slash(ov: Overlay, tx: Tx, genesis: Genesis, height: int) -> dict[bytes, bytes]:
    cheater, *honest = tx.verdict
    cheater_id = crypto.validate_address(cheater.body.provider)
    st = read_stake(ov.get, cheater_id)
    cut, each, burned = slash_split(st, genesis, len(honest))
    from_staked = min(cut, st.staked)
    unbonding = st.unbonding - (cut - from_staked)
    ov.writes[stake_key(cheater_id)] = _TRIPLE.pack(st.staked - from_staked, unbonding,
                                                    st.unlock_height if unbonding else 0)
    if each:
        for r in honest:
            _credit(ov, crypto.validate_address(r.body.provider), each, "provider")
    sup = read_supply(ov.get)
    ov.writes[SUPPLY] = encode_supply(sup._replace(burned=sup.burned + burned, staked=sup.staked - from_staked,
                                                   unbonding=sup.unbonding - (cut - from_staked)))
    ov.writes[slash_key(cheater.receipt_hash)] = _SLSH.pack(height, tx.hash, cut)
    return ov.writes  # type: ignore[return-value]


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
              verified: Container[bytes] = frozenset()) -> dict[bytes, bytes | None]:
    """All-or-nothing state writes of a block's txs; raises InvalidArgument naming the failing tx."""
    ov = Overlay(read)
    for i, tx in enumerate(txs):
        try:
            if tx.hash not in verified:
                check_stateless(tx, genesis)
            ov.writes.update(apply_tx(ov.get, tx, genesis, height))
        except (InvalidArgument, FailedPrecondition, AlreadyExists, PermissionDenied) as exc:
            raise InvalidArgument(f"invalid block {height}: tx {i} ({tx.hash.hex()}): {exc.message}") from None
    ov.writes.update(end_block(ov.get, genesis, height))
    return ov.writes


def end_block(read: Reader, genesis: Genesis, height: int) -> dict[bytes, bytes | None]:
    """The writes a block makes after its transactions: at an epoch's last block, the authority set
    of the epoch after next and the deletion of that epoch's votes (aitbc.ledger.authorities.end_block)."""
    return authorities.end_block(read, genesis, height)


def encode_state_diff(writes: Mapping[bytes, bytes | None]) -> bytes:
    """u16 len(key) || key || u16 len(value) || value per key, in key order; a deleted key (None)
    has an empty value (u16 0): no state value is empty, so a block that deletes nothing keeps the
    diff it always had."""
    out = []
    for key in sorted(writes):
        value = writes[key] or b""
        out.append(_U16.pack(len(key)) + key + _U16.pack(len(value)) + value)
    return b"".join(out)


def state_root(parent_root: bytes, height: int, writes: Mapping[bytes, bytes | None]) -> bytes:
    """Commitment to the whole state: a hash chain over each block's sorted state writes."""
    return crypto.domain_digest(STATE_DOMAIN, parent_root + struct.pack(">Q", height) + encode_state_diff(writes))


def genesis_state_root(genesis_hash: bytes) -> bytes:
    return crypto.domain_digest(STATE_DOMAIN, genesis_hash)
