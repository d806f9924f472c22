"""Mempool: bounded, nonce-ordered per sender, de-duplicated, and built so a flood cannot jam it.

Admission checks the tx against the head state (nonce, balance counting the sender's pending
transfers, receipt not minted nor pending, the recipient's balance staying <= 2^64-1 counting what
is pending to it); after each block, `recheck` drops what no longer applies and `expire` what waited
too long. Rejections carry the stable messages listed in docs/ledger.md ("Mempool").

What keeps it from being jammed (docs/ledger.md, "Mempool"):
- a nonce window: a tx more than `nonce_window - 1` nonces ahead of its sender's account nonce is
  refused, so one sender holds at most `nonce_window` txs;
- parked txs (behind a nonce gap: they cannot execute) are capped at `max_parked` in total, and are
  the first evicted when the pool is full;
- when full, a tx that can execute displaces the last tx of the sender holding the most (a sender
  with fewer pending txs always gets in: no flood from funded keys shuts others out);
- `mint_reserve` slots only MINTs may use, and a MINT displaces a TRANSFER when full, so settlement
  gets in whatever transfers do;
- a tx not included within `expiry_blocks` blocks of its admission is dropped;
- an authority holds at most MAX_PROPOSALS_PER_VOTER pending AUTHORITY_VOTEs (what it may vote for
  in one epoch; the chain refuses more), so a byzantine authority cannot park a vote flood here.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Iterable

from aitbc import bech32, crypto
from aitbc.errors import AlreadyExists, FailedPrecondition, ResourceExhausted
from aitbc.ledger import state
from aitbc.ledger.authorities import MAX_PROPOSALS_PER_VOTER
from aitbc.ledger.tx import (
    KIND_AUTHORITY_VOTE,
    KIND_SETTLE,
    KIND_SLASH,
    KIND_TRANSFER,
    MAX_U64,
    SETTLEMENT_KINDS,
    SPEND_KINDS,
    Tx,
)

AccountReader = Callable[[bytes], tuple[int, int]]  # account id -> (balance, nonce)
MintedReader = Callable[[bytes], bool]  # receipt hash -> minted already?

NONCE_WINDOW = 1024
EXPIRY_BLOCKS = 600


def _address(account_id: bytes) -> str:
    return bech32.encode(crypto.ADDRESS_HRP, account_id)


class _Tally:
    """A count per sender, with the largest found in O(log n) (a heap with lazy deletion), so that
    eviction in a full pool costs the same whether 10 or 100,000 senders fill it."""

    def __init__(self) -> None:
        self.count: dict[bytes, int] = {}
        self._heap: list[tuple[int, bytes]] = []

    def get(self, key: bytes) -> int:
        return self.count.get(key, 0)

    def set(self, key: bytes, n: int) -> None:
        if n == self.count.get(key, 0):
            return
        if n:
            self.count[key] = n
            heapq.heappush(self._heap, (-n, key))
        else:
            self.count.pop(key, None)
        if len(self._heap) > 4 * len(self.count) + 1024:
            self._heap = [(-v, k) for k, v in self.count.items()]
            heapq.heapify(self._heap)

    def largest(self, skip: Callable[[bytes], bool] = lambda _: False) -> bytes | None:
        """The key with the largest count that `skip` does not refuse (None when there is none)."""
        held, found = [], None
        while self._heap:
            n, key = self._heap[0]
            if self.count.get(key) != -n:
                heapq.heappop(self._heap)  # stale
            elif skip(key):
                held.append(heapq.heappop(self._heap))
            else:
                found = key
                break
        for entry in held:
            heapq.heappush(self._heap, entry)
        return found


class Mempool:
    def __init__(self, max_total: int = 200_000, *, nonce_window: int = NONCE_WINDOW,
                 mint_reserve: int | None = None, max_parked: int | None = None,
                 expiry_blocks: int = EXPIRY_BLOCKS) -> None:
        self.max_total = max_total
        self.nonce_window = nonce_window
        self.mint_reserve = max_total // 10 if mint_reserve is None else mint_reserve
        self.max_parked = max(1, max_total // 4) if max_parked is None else max_parked
        self.expiry_blocks = expiry_blocks
        self.by_hash: dict[bytes, Tx] = {}
        self.by_sender: dict[bytes, dict[int, Tx]] = {}
        self.receipts: dict[bytes, bytes] = {}  # receipt hash -> pending MINT (or SETTLE) tx hash
        self.claims: dict[bytes, bytes] = {}  # v1:quot:/v1:slsh: key a pending SETTLE/SLASH uses once -> tx hash
        self.spend: dict[bytes, int] = {}  # sender -> sum of its pending TRANSFER amounts
        self.votes: dict[bytes, int] = {}  # sender -> its pending AUTHORITY_VOTEs
        self.credit: dict[bytes, int] = {}  # account -> sum of what pending txs add to its balance
        self._credit_of: dict[bytes, tuple[bytes, int]] = {}  # tx hash -> (account credited, amount)
        self._run_end: dict[bytes, int] = {}  # sender -> first nonce missing from its run
        self._parked = _Tally()  # sender -> its txs behind a nonce gap
        self._sizes = _Tally()  # sender -> its pending txs
        self.parked_total = 0
        self.mints = 0
        self._admitted: deque[tuple[int, bytes]] = deque()  # (head height at admission, tx hash)
        self._admitted_at: dict[bytes, int] = {}
        self.expired = 0
        self.evicted = 0
        self._trimming = False

    def __len__(self) -> int:
        return len(self.by_hash)

    def __contains__(self, tx_hash: bytes) -> bool:
        return tx_hash in self.by_hash

    # ---- admission -----------------------------------------------------------------------------

    def add(self, tx: Tx, account: AccountReader, minted: MintedReader, *, credit: int | None = None,
            height: int = 0) -> None:
        """Admit a tx whose stateless checks (chain id, genesis, signature, receipt) already passed.
        `credit`: what the tx adds to its recipient's (or provider's) balance (a TRANSFER's amount
        by default; the node passes a MINT's minted amount); `height`: the head height now."""
        if tx.hash in self.by_hash:
            raise AlreadyExists(f"already known: tx {tx.hash.hex()} is pending")
        balance, nonce = account(tx.sender_id)
        if tx.nonce < nonce:
            raise FailedPrecondition(f"nonce too low: account nonce is {nonce}, tx nonce {tx.nonce}")
        queue = self.by_sender.get(tx.sender_id, {})
        if tx.nonce in queue:
            raise AlreadyExists(f"already known: a tx with nonce {tx.nonce} from this sender is pending")
        if tx.nonce >= nonce + self.nonce_window:
            raise FailedPrecondition(
                f"nonce too far ahead: account nonce is {nonce}, tx nonce {tx.nonce}; at most "
                f"{self.nonce_window - 1} ahead (send the missing nonces first)")
        if tx.kind in SPEND_KINDS:  # TRANSFER, STAKE, ESCROW_DEPOSIT take `amount` from the balance
            pending = self.spend.get(tx.sender_id, 0)
            if pending + tx.amount > balance:
                raise FailedPrecondition(
                    f"insufficient balance: have {balance}, pending {pending}, need {tx.amount} more")
        if tx.kind == KIND_AUTHORITY_VOTE and (held := self.votes.get(tx.sender_id, 0)) >= MAX_PROPOSALS_PER_VOTER:
            raise FailedPrecondition(
                f"too many proposals: {_address(tx.sender_id)} has {held} authority votes pending (at most "
                f"{MAX_PROPOSALS_PER_VOTER} per authority per epoch); send more once they are in a block")
        if (claim := _claim(tx)) is not None and claim in self.claims:
            raise AlreadyExists(f"already known: a {tx.kind_name} of {claim[len(state.QUOT):].hex()} is pending")
        if tx.receipt is not None:  # MINT, SETTLE (an EVIDENCE tx moves no balance and mints nothing)
            rh = tx.receipt.receipt_hash
            if minted(rh):
                raise AlreadyExists(f"receipt already minted: {rh.hex()}")
            if rh in self.receipts:
                raise AlreadyExists(f"already known: a MINT of receipt {rh.hex()} is pending")
        gets = self._credited(tx, credit)
        if gets is not None:
            to, amount = gets
            have, coming = account(to)[0], self.credit.get(to, 0)
            if have + coming + amount > MAX_U64:
                raise FailedPrecondition(
                    f"balance overflow: {_address(to)} holds {have} (+{coming} pending) and cannot receive "
                    f"{amount} more (2^64-1 at most)")
        if queue and self._run_end.get(tx.sender_id, nonce) < nonce:
            self._recount(tx.sender_id, nonce)  # the account moved on since this sender was counted
        run_end = self._run_end.get(tx.sender_id, nonce) if queue else nonce
        parks = tx.nonce > run_end
        if parks and self.parked_total >= self.max_parked:
            raise ResourceExhausted(f"mempool full: {self.parked_total} txs wait for missing nonces; send nonce "
                                    f"{run_end} first", retry_after_s=1.0)
        limit = self.max_total if tx.kind in SETTLEMENT_KINDS else self.max_total - self.mint_reserve
        while self._occupied(tx) >= limit:
            if parks or not self._evict_for(tx, account):
                room = "" if tx.kind in SETTLEMENT_KINDS else f" ({self.mint_reserve} more kept for MINTs)"
                raise ResourceExhausted(f"mempool full: {len(self.by_hash)} pending txs{room}", retry_after_s=1.0)
        self._insert(tx, gets, height, nonce)

    def _credited(self, tx: Tx, credit: int | None) -> tuple[bytes, int] | None:
        if tx.kind == KIND_TRANSFER:
            return None if tx.to == tx.sender_id else (tx.to, tx.amount)  # a self-transfer adds nothing
        if tx.receipt is None:
            return None
        return crypto.validate_address(tx.receipt.body.provider), credit or 0

    def _occupied(self, tx: Tx) -> int:
        # MINTs may use every slot; other txs only those outside the MINT reserve
        return len(self.by_hash) if tx.kind in SETTLEMENT_KINDS else len(self.by_hash) - min(self.mints, self.mint_reserve)

    def _insert(self, tx: Tx, gets: tuple[bytes, int] | None, height: int, account_nonce: int) -> None:
        sender = tx.sender_id
        queue = self.by_sender.setdefault(sender, {})
        if not queue:
            self._run_end[sender] = account_nonce
            self._parked.set(sender, 0)
        queue[tx.nonce] = tx
        self._sizes.set(sender, len(queue))
        self.by_hash[tx.hash] = tx
        if tx.nonce == self._run_end[sender]:
            end = tx.nonce + 1
            while end in queue:  # the gap it filled: parked txs behind it can execute now
                end += 1
                self._parked.set(sender, self._parked.get(sender) - 1)
                self.parked_total -= 1
            self._run_end[sender] = end
        else:
            self._parked.set(sender, self._parked.get(sender) + 1)
            self.parked_total += 1
        if tx.kind in SPEND_KINDS:
            self.spend[sender] = self.spend.get(sender, 0) + tx.amount
        if tx.kind == KIND_AUTHORITY_VOTE:
            self.votes[sender] = self.votes.get(sender, 0) + 1
        if tx.receipt is not None:
            self.receipts[tx.receipt.receipt_hash] = tx.hash
            self.mints += 1
        if (claim := _claim(tx)) is not None:
            self.claims[claim] = tx.hash
        if gets is not None:
            self._credit_of[tx.hash] = gets
            self.credit[gets[0]] = self.credit.get(gets[0], 0) + gets[1]
        self._admitted.append((height, tx.hash))
        self._admitted_at[tx.hash] = height
        if len(self._admitted) > 2 * len(self._admitted_at) + 4096:  # entries of txs long gone
            self._admitted = deque(sorted((at, h) for h, at in self._admitted_at.items()))

    def _evict_for(self, tx: Tx, account: AccountReader) -> bool:
        """Make room for `tx` (which can execute): drop a parked tx, else the last tx of the sender
        holding the most (for a MINT: the last TRANSFER of such a sender). False: nothing may go."""
        if self.parked_total:
            sender = self._parked.largest()
            assert sender is not None
            queue = self.by_sender[sender]
            victim = queue[max(queue)]
        else:
            mine = len(self.by_sender.get(tx.sender_id, ()))

            def skip(sender: bytes) -> bool:
                queue = self.by_sender[sender]
                last = queue[max(queue)]
                if sender == tx.sender_id:
                    return True
                if tx.kind not in SETTLEMENT_KINDS:
                    return last.kind in SETTLEMENT_KINDS  # a transfer never displaces settlement
                return last.kind in SETTLEMENT_KINDS and len(queue) <= mine + 1

            sender = self._sizes.largest(skip)
            if sender is None:
                return False
            queue = self.by_sender[sender]
            victim = queue[max(queue)]
            if not (tx.kind in SETTLEMENT_KINDS and victim.kind not in SETTLEMENT_KINDS or len(queue) > mine + 1):
                return False  # fair share: nobody holds more than the newcomer would
        self.remove([victim], account)
        self.evicted += 1
        return True

    # ---- reading -------------------------------------------------------------------------------

    def pending_nonce(self, sender_id: bytes, account_nonce: int) -> int:
        """The next nonce the sender should use: past every consecutive pending nonce."""
        queue = self.by_sender.get(sender_id, {})
        n = account_nonce
        while n in queue:
            n += 1
        return n

    def ready(self, account: AccountReader, limit: int) -> list[Tx]:
        """Up to `limit` txs that can apply in order: each sender's consecutive nonces from its
        account nonce, senders taken round-robin so no one sender fills a block; MINTs at the
        head of a sender's run come first (settlement is never starved by transfers)."""
        mints: list[list[Tx]] = []
        rest: list[list[Tx]] = []
        for sender, queue in self.by_sender.items():
            n = account(sender)[1]
            run = []
            while n in queue:
                run.append(queue[n])
                n += 1
            k = 0
            while k < len(run) and run[k].kind in SETTLEMENT_KINDS:
                k += 1
            if k:
                mints.append(run[:k])
            if k < len(run):
                rest.append(run[k:])
        out = _round_robin(mints, limit)
        if len(out) < limit:
            out += _round_robin(rest, limit - len(out))
        return out

    # ---- leaving -------------------------------------------------------------------------------

    def remove(self, txs: Iterable[Tx], account: AccountReader | None = None) -> None:
        """Drop txs (included, evicted, expired or no longer valid). `account` (the head state)
        lets the sender's run be recomputed at once; without it, from the run it had."""
        touched: set[bytes] = set()
        for tx in txs:
            if self.by_hash.pop(tx.hash, None) is None:
                continue
            self._admitted_at.pop(tx.hash, None)
            queue = self.by_sender.get(tx.sender_id)
            if queue is not None and queue.get(tx.nonce) is tx:
                del queue[tx.nonce]
                self._sizes.set(tx.sender_id, len(queue))
                touched.add(tx.sender_id)
            if (claim := _claim(tx)) is not None and self.claims.get(claim) == tx.hash:
                del self.claims[claim]
            if tx.kind in SPEND_KINDS:
                left = self.spend.get(tx.sender_id, 0) - tx.amount
                if left > 0:
                    self.spend[tx.sender_id] = left
                else:
                    self.spend.pop(tx.sender_id, None)
            if tx.kind == KIND_AUTHORITY_VOTE:
                if (left := self.votes[tx.sender_id] - 1) > 0:
                    self.votes[tx.sender_id] = left
                else:
                    del self.votes[tx.sender_id]
            if tx.receipt is not None:
                self.mints -= 1
                rh = tx.receipt.receipt_hash
                if self.receipts.get(rh) == tx.hash:
                    del self.receipts[rh]
            gets = self._credit_of.pop(tx.hash, None)
            if gets is not None:
                left = self.credit.get(gets[0], 0) - gets[1]
                if left > 0:
                    self.credit[gets[0]] = left
                else:
                    self.credit.pop(gets[0], None)
        for sender in touched:
            self._recount(sender, None if account is None else account(sender)[1])
        if self.parked_total > self.max_parked and not self._trimming:
            # a tx leaving the middle of a run parks those behind it: keep the cap all the same
            self._trimming = True
            try:
                while self.parked_total > self.max_parked:
                    sender = self._parked.largest()
                    assert sender is not None
                    queue = self.by_sender[sender]
                    self.remove([queue[max(queue)]], account)
                    self.evicted += 1
            finally:
                self._trimming = False

    def _recount(self, sender: bytes, account_nonce: int | None) -> None:
        """Recompute a sender's run end and parked count from its queue."""
        self.parked_total -= self._parked.get(sender)
        self._parked.set(sender, 0)
        queue = self.by_sender.get(sender)
        if not queue:
            self.by_sender.pop(sender, None)
            self._run_end.pop(sender, None)
            return
        start = min(queue) if account_nonce is None else account_nonce
        if account_nonce is None and (old := self._run_end.get(sender)) is not None:
            start = min(start, old)
        end = start
        while end in queue:
            end += 1
        parked = sum(1 for n in queue if n > end)
        self._run_end[sender] = end
        self._parked.set(sender, parked)
        self.parked_total += parked

    def recheck(self, account: AccountReader, minted: MintedReader, senders: Iterable[bytes] | None = None) -> int:
        """Drop pending txs that can no longer apply (stale nonce, receipt minted, overdraft);
        `senders` limits the check to accounts a block touched. Returns how many were dropped."""
        doomed: list[Tx] = []
        checked = list(self.by_sender) if senders is None else list(senders)
        for sender in checked:
            queue = self.by_sender.get(sender)
            if not queue:
                continue
            balance, nonce = account(sender)
            spend = 0
            for n in sorted(queue):
                tx = queue[n]
                if n < nonce:
                    doomed.append(tx)
                elif tx.kind in SPEND_KINDS:
                    spend += tx.amount
                    if spend > balance:
                        doomed.append(tx)
                elif tx.receipt is not None and minted(tx.receipt.receipt_hash):
                    doomed.append(tx)
        for rh, th in list(self.receipts.items()):
            if minted(rh) and th in self.by_hash:
                doomed.append(self.by_hash[th])
        unique = {tx.hash: tx for tx in doomed}
        self.remove(unique.values(), account)
        for sender in checked:  # the account nonce moved: runs start elsewhere now
            if sender in self.by_sender:
                self._recount(sender, account(sender)[1])
        return len(unique)

    def expire(self, height: int, account: AccountReader) -> int:
        """Drop txs admitted `expiry_blocks` or more blocks before `height` and still pending."""
        doomed = []
        while self._admitted and self._admitted[0][0] + self.expiry_blocks <= height:
            at, h = self._admitted.popleft()
            tx = self.by_hash.get(h)
            if tx is not None and self._admitted_at.get(h) == at:
                doomed.append(tx)
        if doomed:
            self.remove(doomed, account)
            self.expired += len(doomed)
        return len(doomed)


def _claim(tx: Tx) -> bytes | None:
    """The once-ever state key a SETTLE (its quote) or a SLASH (its verdict) takes, or None."""
    if tx.kind == KIND_SETTLE and tx.quote is not None:
        return state.quote_key(tx.quote.hash())
    if tx.kind == KIND_SLASH:
        return state.slash_key(tx.verdict[0].receipt_hash)
    return None


def _round_robin(runs: list[list[Tx]], limit: int) -> list[Tx]:
    out: list[Tx] = []
    i = 0
    while len(out) < limit and runs:
        alive = []
        for run in runs:
            if i < len(run):
                out.append(run[i])
                if len(out) >= limit:
                    break
                alive.append(run)
        runs = alive
        i += 1
    return out
