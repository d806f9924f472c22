"""Mempool: bounded (in total and per sender), nonce-ordered per sender, de-duplicated.

Admission checks the tx against the head state (nonce, balance counting the sender's pending
transfers, receipt not minted nor pending); after each block, `recheck` drops what no longer
applies. Rejections carry the stable messages listed in docs/ledger.md."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from aitbc.errors import AlreadyExists, FailedPrecondition, ResourceExhausted
from aitbc.ledger.tx import KIND_TRANSFER, Tx

AccountReader = Callable[[bytes], tuple[int, int]]  # account id -> (balance, nonce)
MintedReader = Callable[[bytes], bool]  # receipt hash -> minted already?


class Mempool:
    def __init__(self, max_total: int = 200_000, max_per_sender: int = 4096) -> None:
        self.max_total = max_total
        self.max_per_sender = max_per_sender
        self.by_hash: dict[bytes, Tx] = {}
        self.by_sender: dict[bytes, dict[int, Tx]] = {}
        self.receipts: dict[bytes, bytes] = {}  # receipt hash -> pending MINT tx hash
        self.spend: dict[bytes, int] = {}  # sender -> sum of its pending TRANSFER amounts

    def __len__(self) -> int:
        return len(self.by_hash)

    def __contains__(self, tx_hash: bytes) -> bool:
        return tx_hash in self.by_hash

    def add(self, tx: Tx, account: AccountReader, minted: MintedReader) -> None:
        """Admit a tx whose stateless checks (chain id, signature, receipt) already passed."""
        if tx.hash in self.by_hash:
            raise AlreadyExists(f"already known: tx {tx.hash.hex()} is pending")
        balance, nonce = account(tx.sender_id)
        if tx.nonce < nonce:
            raise FailedPrecondition(f"nonce too low: account nonce is {nonce}, tx nonce {tx.nonce}")
        queue = self.by_sender.get(tx.sender_id, {})
        if tx.nonce in queue:
            raise AlreadyExists(f"already known: a tx with nonce {tx.nonce} from this sender is pending")
        if tx.nonce >= nonce + self.max_per_sender or len(queue) >= self.max_per_sender:
            raise ResourceExhausted(f"mempool full: at most {self.max_per_sender} pending txs per sender",
                                    retry_after_s=1.0)
        if len(self.by_hash) >= self.max_total:
            raise ResourceExhausted(f"mempool full: {self.max_total} pending txs", retry_after_s=1.0)
        if tx.kind == KIND_TRANSFER:
            pending = self.spend.get(tx.sender_id, 0)
            if pending + tx.amount > balance:
                raise FailedPrecondition(
                    f"insufficient balance: have {balance}, pending {pending}, need {tx.amount} more")
        else:
            assert tx.receipt is not None
            rh = tx.receipt.receipt_hash
            if minted(rh):
                raise AlreadyExists(f"receipt already minted: {rh.hex()}")
            if rh in self.receipts:
                raise AlreadyExists(f"already known: a MINT of receipt {rh.hex()} is pending")
            self.receipts[rh] = tx.hash
        self.by_sender.setdefault(tx.sender_id, {})[tx.nonce] = tx
        self.by_hash[tx.hash] = tx
        if tx.kind == KIND_TRANSFER:
            self.spend[tx.sender_id] = self.spend.get(tx.sender_id, 0) + tx.amount

    def pending_nonce(self, sender_id: bytes, account_nonce: int) -> int:
        """The next nonce the sender should use: past every consecutive pending nonce."""
        queue = self.by_sender.get(sender_id, {})
        n = account_nonce
        while n in queue:
            n += 1
        return n

    def ready(self, account: AccountReader, limit: int) -> list[Tx]:
        """Up to `limit` txs that can apply in order: each sender's consecutive nonces from its
        account nonce, senders taken round-robin so no one sender fills a block."""
        runs: list[list[Tx]] = []
        for sender, queue in self.by_sender.items():
            n = account(sender)[1]
            run = []
            while n in queue:
                run.append(queue[n])
                n += 1
            if run:
                runs.append(run)
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

    def remove(self, txs: Iterable[Tx]) -> None:
        for tx in txs:
            if self.by_hash.pop(tx.hash, None) is None:
                continue
            queue = self.by_sender.get(tx.sender_id)
            if queue is not None and queue.get(tx.nonce) is tx:
                del queue[tx.nonce]
                if not queue:
                    del self.by_sender[tx.sender_id]
            if tx.kind == KIND_TRANSFER:
                left = self.spend.get(tx.sender_id, 0) - tx.amount
                if left > 0:
                    self.spend[tx.sender_id] = left
                else:
                    self.spend.pop(tx.sender_id, None)
            if tx.receipt is not None:
                rh = tx.receipt.receipt_hash
                if self.receipts.get(rh) == tx.hash:
                    del self.receipts[rh]

    def recheck(self, account: AccountReader, minted: MintedReader, senders: Iterable[bytes] | None = None) -> int:
        """Drop pending txs that can no longer apply (stale nonce, receipt minted, overdraft);
        `senders` limits the check to accounts a block touched. Returns how many were dropped."""
        doomed: list[Tx] = []
        for sender in list(self.by_sender) if senders is None else senders:
            queue = self.by_sender.get(sender)
            if not queue:
                continue
            balance, nonce = account(sender)
            spend = 0
            for n in sorted(queue):
                tx = queue[n]
                if n < nonce:
                    doomed.append(tx)
                elif tx.kind == KIND_TRANSFER:
                    spend += tx.amount
                    if spend > balance:
                        doomed.append(tx)
                elif tx.receipt is not None and minted(tx.receipt.receipt_hash):
                    doomed.append(tx)
        for rh, th in list(self.receipts.items()):
            if minted(rh) and th in self.by_hash:
                doomed.append(self.by_hash[th])
        unique = {tx.hash: tx for tx in doomed}
        self.remove(unique.values())
        return len(unique)
