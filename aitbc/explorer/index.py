"""The explorer's own index (LMDB), built from StreamBlocks and kept across restarts.

What a page needs that the node cannot answer without a scan: an address's transactions (newest
first, paged), the transaction that minted a receipt, the receipt of a job id, what each provider
earned (and lost to slashing), and bounded time series for the charts. Keys (`v1:`, layout 2):

    v1:layout                                  -> u32 2 (an index of another layout is rebuilt from block 1)
    v1:tip                                     -> u64 height indexed so far
    v1:blk: + u64 height                       -> u64 block timestamp_ms || the undo of the block: every key it
                                                  wrote and what that key held before (the ledger's undo encoding,
                                                  aitbc.ledger.chain.encode_undo); a reorg puts those values back.
                                                  Once the block is final the undo is dropped (no reorg reaches it)
    v1:final                                   -> u64 height up to which undo records were dropped
    v1:addr: + 20-byte account + u64 height + u16 index -> 32-byte tx hash
    v1:rcpt: + 32-byte receipt hash            -> 32-byte tx hash (its MINT or SETTLE)
    v1:job: + job id (ASCII)                   -> 32-byte receipt hash
    v1:earn: + 20-byte account                 -> 10 x u64 (Earnings: receipts, units, minted, fees, slash rewards,
                                                  slashed, staked, unbonding, first and last height paid)
    v1:rank: + u64 (2^64-1 - earned) + 20-byte account -> b"" (providers by earned = minted + fees + slash rewards)
    v1:pser: + 20-byte account + u64 hour (unix s) -> 4 x u64 (receipts, units, minted, fees): the last 30 days
    v1:ser:m + u64 minute (unix s)             -> 9 x u64 (Bucket): the last 24 hours
    v1:ser:h + u64 hour (unix s)               -> 9 x u64 (Bucket): the last 30 days

Amounts follow the ledger's own rules (aitbc.ledger.state: mint_amount, the SETTLE fee = the
quote's total, slash_split on the stake the index follows from STAKE / UNSTAKE / WITHDRAW / SLASH),
so they equal what the chain paid. Series are bucketed by the block's timestamp and pruned against
the newest block's (the chain's clock): a bucket older than its window is deleted by the block that
passes it, and that deletion is in the block's undo like every other write.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import lmdb

from aitbc import crypto
from aitbc.config import private_dir
from aitbc.ledger.block import decode_block
from aitbc.ledger.chain import decode_undo, encode_undo
from aitbc.ledger.genesis import Genesis
from aitbc.ledger.state import MAX_U64, Stake, mint_amount, slash_split
from aitbc.ledger.tx import KIND_MINT, KIND_SETTLE, KIND_SLASH, KIND_STAKE, KIND_UNSTAKE, KIND_WITHDRAW

LAYOUT = b"v1:layout"
LAYOUT_VERSION = 2
TIP = b"v1:tip"
BLK = b"v1:blk:"
FINAL = b"v1:final"
ADDR = b"v1:addr:"
RCPT = b"v1:rcpt:"
JOB = b"v1:job:"
EARN = b"v1:earn:"
RANK = b"v1:rank:"
PSER = b"v1:pser:"
SER = b"v1:ser:"
MINUTE, HOUR = b"m", b"h"
KEEP_S = {MINUTE: 24 * 3600, HOUR: 30 * 24 * 3600}  # how far back each series reaches (bounded size)
WIDTH_S = {MINUTE: 60, HOUR: 3600}
PROVIDER_KEEP_S = 30 * 24 * 3600  # a provider's hourly series: 720 buckets at most
_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")


class Earnings(NamedTuple):
    """What the chain paid one account as a provider, and its stake as the index follows it."""

    receipts: int = 0  # MINT and SETTLE transactions that paid it
    units: int = 0
    minted: int = 0  # new tokens for its receipts (mint_amount)
    fees: int = 0  # client fees its SETTLEs moved to it (the quotes' totals)
    slash_rewards: int = 0  # its share of cuts as an honest provider in SLASH verdicts
    slashed: int = 0  # stake cut from it by SLASH verdicts
    staked: int = 0
    unbonding: int = 0
    first_height: int = 0  # first and last block that paid it (0: none)
    last_height: int = 0

    @property
    def earned(self) -> int:
        return self.minted + self.fees + self.slash_rewards


class Bucket(NamedTuple):
    """One bucket of the chain's time series."""

    blocks: int = 0
    txs: int = 0
    gaps: int = 0  # blocks whose parent is known (the first block has none)
    gap_ms: int = 0  # sum of (timestamp - parent timestamp) over those blocks
    receipts: int = 0
    units: int = 0
    minted: int = 0
    fees: int = 0
    price_sum: int = 0  # sum of the paid price per unit, min(price, max_price_per_unit), of its receipts


class ProviderBucket(NamedTuple):
    receipts: int = 0
    units: int = 0
    minted: int = 0
    fees: int = 0


_EARN = struct.Struct(">" + "Q" * len(Earnings._fields))
_BUCKET = struct.Struct(">" + "Q" * len(Bucket._fields))
_PBUCKET = struct.Struct(">" + "Q" * len(ProviderBucket._fields))


def _plus(a: int, b: int) -> int:
    return min(MAX_U64, a + b)  # sums of u64 amounts stay u64 (a bucket can never exceed the supply anyway)


class _BlockWrites:
    """The writes of one block inside the index's LMDB transaction, remembering what each key held
    before the block: the undo a reorg applies."""

    def __init__(self, txn: lmdb.Transaction) -> None:
        self.txn = txn
        self.undo: dict[bytes, bytes | None] = {}

    def get(self, key: bytes) -> bytes | None:
        return self.txn.get(key)

    def put(self, key: bytes, value: bytes) -> None:
        if key not in self.undo:
            self.undo[key] = self.txn.get(key)
        self.txn.put(key, value)

    def delete(self, key: bytes) -> None:
        if key not in self.undo:
            self.undo[key] = self.txn.get(key)
        self.txn.delete(key)

    def keys_from(self, prefix: bytes, below: bytes) -> list[bytes]:
        """Keys under `prefix` sorting before `below` (oldest buckets first)."""
        out = []
        cur = self.txn.cursor()
        if cur.set_range(prefix):
            for key in cur.iternext(values=False):
                if not key.startswith(prefix) or key >= below:
                    break
                out.append(bytes(key))
        return out


class IndexReset(Exception):
    """The index was emptied (a reorg below the height it had dropped undo records for): follow the
    chain again from block 1."""


class ExplorerIndex:
    def __init__(self, path: str | Path, *, map_size: int = 1 << 32) -> None:
        private_dir(Path(path))
        self.env = lmdb.open(str(path), map_size=map_size, subdir=True, sync=False)
        with self.env.begin(write=True) as txn:
            raw = txn.get(LAYOUT)
            if raw is None or _U32.unpack(raw)[0] != LAYOUT_VERSION:  # older layout: rebuilt from block 1
                txn.drop(self.env.open_db(txn=txn), delete=False)
                txn.put(LAYOUT, _U32.pack(LAYOUT_VERSION))

    @property
    def tip(self) -> int:
        with self.env.begin() as txn:
            raw = txn.get(TIP)
        return _U64.unpack(raw)[0] if raw else 0

    @property
    def tip_time_ms(self) -> int:
        """The newest indexed block's timestamp (0 before the first block): the charts' "now"."""
        with self.env.begin() as txn:
            raw = txn.get(TIP)
            blk = txn.get(BLK + raw) if raw else None
        return _U64.unpack(blk[:8])[0] if blk else 0

    def add_blocks(self, raws: list[bytes], genesis: Genesis, *, final: int = 0) -> int:
        """Index canonical blocks in order (one LMDB commit); returns the new tip. `final`: the node's
        finalized height: the undo records of blocks at or below it are dropped (a final block is never
        reverted), so the index does not keep an undo per block for ever. A reorg below that height
        (a node that reverted a final block) empties the index: IndexReset, and it is built again from
        block 1."""
        with self.env.begin(write=True) as txn:
            tip = _U64.unpack(txn.get(TIP) or _U64.pack(0))[0]
            pruned = _U64.unpack(txn.get(FINAL) or _U64.pack(0))[0]
            reset = ""
            for raw in raws:
                block = decode_block(raw)
                h = block.header.height
                if h <= pruned:  # emptied in this commit, then IndexReset (raising in it would roll back)
                    txn.drop(self.env.open_db(txn=txn), delete=False)
                    txn.put(LAYOUT, _U32.pack(LAYOUT_VERSION))
                    reset = (f"block {h} replaces a block at or below the final height {pruned}: the node "
                             "reverted a final block; the index is built again from block 1")
                    break
                if h <= tip:  # a reorg: put back what the replaced blocks from here changed, newest first
                    for old in range(tip, h - 1, -1):
                        rec = txn.get(BLK + _U64.pack(old))
                        for key, value in (decode_undo(rec[8:]) if rec else {}).items():
                            if value is None:
                                txn.delete(key)
                            else:
                                txn.put(key, value)
                        txn.delete(BLK + _U64.pack(old))
                w = _BlockWrites(txn)
                _index_block(w, block, genesis)
                txn.put(BLK + _U64.pack(h), _U64.pack(block.header.timestamp_ms) + encode_undo(w.undo))
                tip = h
            if not reset:
                txn.put(TIP, _U64.pack(tip))
                for h in range(pruned + 1, min(final, tip) + 1):  # final now: its undo is never needed
                    rec = txn.get(BLK + _U64.pack(h))
                    if rec is not None and len(rec) > 8:
                        txn.put(BLK + _U64.pack(h), rec[:8])
                if min(final, tip) > pruned:
                    txn.put(FINAL, _U64.pack(min(final, tip)))
        if reset:  # raised once the emptied index is committed
            raise IndexReset(reset)
        return tip

    def history(self, account_id: bytes, *, before: tuple[int, int] | None = None,
                limit: int = 25) -> tuple[list[tuple[int, str]], tuple[int, int] | None]:
        """(height, tx hash hex) newest first, at most `limit`; and where the next page starts."""
        prefix = ADDR + account_id
        out: list[tuple[int, str]] = []
        with self.env.begin() as txn:
            cur = txn.cursor()
            start = prefix + (_U64.pack(before[0]) + struct.pack(">H", before[1]) if before else b"\xff" * 10)
            if not cur.set_range(start):
                if not cur.last():
                    return [], None
            elif bytes(cur.key()) >= start:
                if not cur.prev():
                    return [], None
            while bytes(cur.key()).startswith(prefix):
                key = bytes(cur.key())
                height, idx = _U64.unpack(key[len(prefix):len(prefix) + 8])[0], struct.unpack(">H", key[-2:])[0]
                if len(out) == limit:
                    return out, (height, idx + 1)
                out.append((height, bytes(cur.value()).hex()))
                if not cur.prev():
                    break
        return out, None

    def receipt_tx(self, receipt_hash: bytes) -> str | None:
        with self.env.begin() as txn:
            raw = txn.get(RCPT + receipt_hash)
        return bytes(raw).hex() if raw else None

    def job_receipt(self, job_id: str) -> str | None:
        with self.env.begin() as txn:
            raw = txn.get(JOB + job_id.encode())
        return bytes(raw).hex() if raw else None

    def earnings(self, account_id: bytes) -> Earnings | None:
        """What the chain paid this account as a provider (None: never paid, never staked)."""
        with self.env.begin() as txn:
            raw = txn.get(EARN + account_id)
        return Earnings(*_EARN.unpack(raw)) if raw else None

    def top_earners(self, limit: int = 25) -> list[tuple[bytes, Earnings]]:
        """The providers that earned most (minted + fees + slash rewards), most first."""
        out = []
        with self.env.begin() as txn:
            cur = txn.cursor()
            if cur.set_range(RANK):
                for key in cur.iternext(values=False):
                    if not key.startswith(RANK) or len(out) == limit:
                        break
                    account = bytes(key[len(RANK) + 8:])
                    out.append((account, Earnings(*_EARN.unpack(txn.get(EARN + account)))))
        return out

    def series(self, resolution: bytes, since_s: int, until_s: int) -> Iterator[tuple[int, Bucket]]:
        """(bucket start in unix s, Bucket) for buckets in [since_s, until_s), oldest first."""
        yield from ((t, Bucket(*_BUCKET.unpack(v))) for t, v in self._range(SER + resolution, since_s, until_s))

    def provider_series(self, account_id: bytes, since_s: int, until_s: int) -> Iterator[tuple[int, ProviderBucket]]:
        """(hour start in unix s, ProviderBucket) of one provider in [since_s, until_s), oldest first."""
        yield from ((t, ProviderBucket(*_PBUCKET.unpack(v))) for t, v in self._range(PSER + account_id, since_s, until_s))

    def _range(self, prefix: bytes, since_s: int, until_s: int) -> list[tuple[int, bytes]]:
        out = []
        end = prefix + _U64.pack(max(0, until_s))
        with self.env.begin() as txn:
            cur = txn.cursor()
            if cur.set_range(prefix + _U64.pack(max(0, since_s))):
                for key, value in cur:
                    if not key.startswith(prefix) or key >= end:
                        break
                    out.append((_U64.unpack(key[len(prefix):])[0], bytes(value)))
        return out

    def close(self) -> None:
        self.env.close()


def _index_block(w: _BlockWrites, block, genesis: Genesis) -> None:  # type: ignore[no-untyped-def]
    h, t_ms = block.header.height, block.header.timestamp_ms
    parent = w.get(BLK + _U64.pack(h - 1)) if h > 1 else None
    total = Bucket(blocks=1, txs=len(block.txs), gaps=1 if parent else 0,
                   gap_ms=max(0, t_ms - _U64.unpack(parent[:8])[0]) if parent else 0)
    paid: dict[bytes, list[int]] = {}  # provider -> [receipts, units, minted, fees] in this block (its hour)
    for i, tx in enumerate(block.txs):
        parties = {tx.sender_id}
        if tx.to:
            parties.add(tx.to)
        if tx.attester_id:  # an escrow's coordinator sees it on its page too
            parties.add(tx.attester_id)
        if tx.receipt is not None:
            parties.add(crypto.validate_address(tx.receipt.body.provider))
        if tx.kind == KIND_SETTLE and tx.quote is not None:
            parties.add(crypto.validate_address(tx.quote.client_address))
        if tx.kind == KIND_SLASH:
            parties.update(crypto.validate_address(r.body.provider) for r in tx.verdict)
        for party in sorted(parties):
            w.put(ADDR + party + _U64.pack(h) + struct.pack(">H", i), tx.hash)
        if tx.kind in (KIND_MINT, KIND_SETTLE) and tx.receipt is not None:
            body = tx.receipt.body
            rh = tx.receipt.receipt_hash
            w.put(RCPT + rh, tx.hash)
            w.put(JOB + body.job_id.encode(), rh)
            minted = mint_amount(body.units, body.price_per_unit, genesis)
            fee = tx.quote.total if tx.kind == KIND_SETTLE and tx.quote is not None else 0
            provider = crypto.validate_address(body.provider)
            e = _earnings(w, provider)
            _put_earnings(w, provider, e, e._replace(
                receipts=e.receipts + 1, units=_plus(e.units, body.units), minted=_plus(e.minted, minted),
                fees=_plus(e.fees, fee), first_height=e.first_height or h, last_height=h))
            p = paid.setdefault(provider, [0, 0, 0, 0])
            p[0], p[1], p[2], p[3] = p[0] + 1, _plus(p[1], body.units), _plus(p[2], minted), _plus(p[3], fee)
            total = total._replace(receipts=total.receipts + 1, units=_plus(total.units, body.units),
                                   minted=_plus(total.minted, minted), fees=_plus(total.fees, fee),
                                   price_sum=_plus(total.price_sum, min(body.price_per_unit, genesis.max_price_per_unit)))
        elif tx.kind in (KIND_STAKE, KIND_UNSTAKE, KIND_WITHDRAW):  # the stake a later SLASH cuts from
            e = _earnings(w, tx.sender_id)
            if tx.kind == KIND_STAKE:
                after = e._replace(staked=e.staked + tx.amount)
            elif tx.kind == KIND_UNSTAKE:
                after = e._replace(staked=e.staked - tx.amount, unbonding=e.unbonding + tx.amount)
            else:
                after = e._replace(unbonding=0)
            _put_earnings(w, tx.sender_id, e, after)
        elif tx.kind == KIND_SLASH:
            cheater, *honest = tx.verdict
            cheater_id = crypto.validate_address(cheater.body.provider)
            e = _earnings(w, cheater_id)
            cut, each, _burned = slash_split(Stake(e.staked, e.unbonding, 0), genesis, len(honest))
            from_staked = min(cut, e.staked)
            _put_earnings(w, cheater_id, e, e._replace(slashed=_plus(e.slashed, cut), staked=e.staked - from_staked,
                                                       unbonding=e.unbonding - (cut - from_staked)))
            if each:
                for r in honest:
                    hid = crypto.validate_address(r.body.provider)
                    he = _earnings(w, hid)
                    _put_earnings(w, hid, he, he._replace(slash_rewards=_plus(he.slash_rewards, each)))
    t_s = t_ms // 1000
    for res in (MINUTE, HOUR):
        _add_bucket(w, SER + res, t_s, WIDTH_S[res], KEEP_S[res], total, Bucket, _BUCKET)
    for provider, p in paid.items():
        _add_bucket(w, PSER + provider, t_s, 3600, PROVIDER_KEEP_S, ProviderBucket(*p), ProviderBucket, _PBUCKET)


def _earnings(w: _BlockWrites, account: bytes) -> Earnings:
    raw = w.get(EARN + account)
    return Earnings(*_EARN.unpack(raw)) if raw else Earnings()


def _put_earnings(w: _BlockWrites, account: bytes, before: Earnings, after: Earnings) -> None:
    w.put(EARN + account, _EARN.pack(*after))
    if before.earned != after.earned:
        if before.earned:
            w.delete(RANK + _U64.pack(MAX_U64 - before.earned) + account)
        w.put(RANK + _U64.pack(MAX_U64 - after.earned) + account, b"")


def _add_bucket(w: _BlockWrites, prefix: bytes, t_s: int, width: int, keep_s: int, add: tuple,  # type: ignore[type-arg]
                kind: type, codec: struct.Struct) -> None:
    key = prefix + _U64.pack(t_s - t_s % width)
    raw = w.get(key)
    if raw is None:  # a new bucket: the ones that fell out of the window go (a few at a time)
        for old in w.keys_from(prefix, prefix + _U64.pack(max(0, t_s - keep_s))):
            w.delete(old)
        w.put(key, codec.pack(*add))
        return
    cur = kind(*codec.unpack(raw))
    w.put(key, codec.pack(*(_plus(a, b) for a, b in zip(cur, add, strict=True))))
