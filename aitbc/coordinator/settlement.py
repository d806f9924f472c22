"""Settlement: every attested receipt becomes one MINT on the ledger, tracked to finality.

Idempotent by receipt hash: before minting, the ledger is asked whether the receipt is already
minted or pending, and the ledger itself refuses a receipt twice. Receipts waiting for settlement
are indexed in the coordinator's LMDB, so a coordinator restart resumes where it stopped; a ledger
that is down is retried with exponential backoff and full jitter (ceilings 0.5 s doubling to 30 s,
aitbc.limits.Backoff) and nothing is lost.

Several coordinators on one database settle through one of them (docs/scaling.md): `elect` is the
store's settler lock (PostgresJobStore.settler), tried every SETTLER_RETRY_S by each coordinator;
the holder settles every coordinator's receipts, the others only watch the ledger (readiness).
When the holder dies, its connection and lock go, and the next try elsewhere takes over.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from aitbc import aio, crypto, errors, telemetry
from aitbc.coordinator.receipt_book import ReceiptBook
from aitbc.coordinator.verification import VERDICT_META
from aitbc.limits import Backoff, jittered_wait
from aitbc.quotes import QuoteBody
from aitbc.v1 import receipt_pb2
from aitbc.wire import receipt_from_proto

log = logging.getLogger("aitbc.settlement")
St = receipt_pb2.SettlementState

# Node refusals that retrying cannot fix (bad receipt, wrong chain, attester not authorized):
# the receipt is marked REJECTED with the reason.
PERMANENT = (errors.InvalidArgument, errors.PermissionDenied)
SETTLER_RETRY_S = 2.0  # a coordinator that is not the settler tries for the lock this often
# SETTLE refusals after which the receipt is minted without its fee (docs/ledger.md, "Rejections")
FEE_REFUSALS = ("escrow too low", "quote already settled", "economy disabled")


class ChainMismatch(errors.FailedPrecondition):
    """The ledger serves another chain than the receipts': an operator's typo, never a receipt's fault."""


def chain_mismatch(ledger: str, theirs: str, ours: str) -> str:
    return (f"ledger {ledger} serves chain '{theirs}' but this coordinator's chain_id is '{ours}': its receipts "
            "would all be refused; fix `chain_id` or `ledger` in coordinator.toml")


def _fee_refusal(message: str) -> bool:
    return any(message.startswith(r) or f": {r}" in message for r in FEE_REFUSALS)


class Settlement:
    def __init__(
        self,
        book: ReceiptBook,
        key: crypto.PrivateKey,
        ledger_target: str,
        *,
        poll_s: float = 0.25,
        max_backoff_s: float = 30.0,
        probe_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        elect: Callable[[], bool] | None = None,
        chain_id: str = "",
    ) -> None:
        from aitbc.ledger.client import LedgerClient

        self.book = book
        self.store = book.store
        self.key = key
        self.ledger = LedgerClient(ledger_target, timeout=5.0)
        self.poll_s = poll_s
        self.max_backoff_s = max_backoff_s
        self.probe_s = probe_s
        self._last_contact = float("-inf")  # clock() of the last ledger call that got an answer
        self.clock = clock
        self.elect = elect  # None: this coordinator is the only one (it always settles)
        self.settling = elect is None
        self._wake = asyncio.Event()
        self._retry_at: dict[str, float] = {}
        self._reachable = False
        self.chain_id, self.target = chain_id, ledger_target  # receipts wait (never REJECTED) on another chain
        self._chain_checked = not chain_id  # "": nothing to check
        # called with the new value whenever ledger_reachable flips (the server's health status)
        self.readiness_listeners: list[Callable[[bool], None]] = []

    @property
    def ledger_reachable(self) -> bool:
        return self._reachable

    @ledger_reachable.setter
    def ledger_reachable(self, value: bool) -> None:
        if value != self._reachable:
            self._reachable = value
            for listener in self.readiness_listeners:
                listener(value)

    def notify(self, receipt: receipt_pb2.Receipt) -> None:
        """A new attested receipt was stored (the store indexed it as unsettled)."""
        self._wake.set()

    async def run(self) -> None:
        backoff = Backoff(0.5, self.max_backoff_s)
        while True:
            try:
                if not self._chain_checked:  # once: the node's chain does not change under a running coordinator
                    if (theirs := (await self._call(self.ledger.get_head())).chain_id) != self.chain_id:
                        raise ChainMismatch(chain_mismatch(self.target, theirs, self.chain_id))
                    self._chain_checked = True
                if self.elect is not None and self.settling != self.elect():
                    self.settling = not self.settling
                    log.warning("this coordinator %s the settler", "is now" if self.settling else "is no longer")
                if not self.settling:  # another coordinator settles: only say whether the ledger answers
                    await self._call(self.ledger.get_head())
                    self.ledger_reachable = True
                    backoff.reset()
                    self._wake.clear()
                    await aio.wait_event(self._wake, SETTLER_RETRY_S)
                    continue
                if await self.settle_pending() == 0 and self.clock() - self._last_contact >= self.probe_s:
                    # nothing to settle: ask the node for its head now and then, so readiness
                    # (health `.../settlement`) notices a ledger that went away while idle
                    await self._call(self.ledger.get_head())
                self.ledger_reachable = True
                backoff.reset()
                delay = self.poll_s
            except (errors.Unavailable, ChainMismatch) as exc:
                if self.ledger_reachable or isinstance(exc, ChainMismatch):
                    log.warning("%s, retrying with backoff: %s", "receipts wait" if isinstance(exc, ChainMismatch)
                                else "ledger unreachable", exc.message)
                self.ledger_reachable = False
                delay = backoff.next()
            except Exception:
                log.exception("settlement pass failed")
                delay = backoff.next()
            self._wake.clear()
            await aio.wait_event(self._wake, delay)

    async def settle_pending(self) -> int:
        """One pass over unsettled receipts and recorded verdicts; returns how many are still open."""
        pending = self.store.unsettled_receipts()
        for rec in pending:
            if telemetry.enabled():
                await self._settle_traced(rec)
            else:
                await self._settle(rec)
        return len(self.store.unsettled_receipts()) + await self.slash_pending()

    async def slash_pending(self) -> int:
        """Send each verdict the verifier recorded (aitbc.coordinator.verification.VERDICT_META) as one
        SLASH and follow it to finality: sent once, sent again only when the ledger lost it, dropped
        when the ledger already holds the verdict or refuses it for good. Returns how many are open."""
        open_ = 0
        for key, value in self.store.meta_items(VERDICT_META):
            cheater_hash = key.removeprefix(VERDICT_META)
            fields = value.decode().split()
            honest, sent = [h for h in fields if not h.startswith("tx=")], [h[3:] for h in fields if h.startswith("tx=")]
            if sent:
                st = await self._call(self.ledger.get_transaction(sent[0]))
                if st.status == "final":
                    log.warning("SLASH of the provider of receipt %s is final (tx %s)", cheater_hash, sent[0])
                    self.store.delete_meta(key)
                    continue
                if st.status != "unknown":
                    open_ += 1
                    continue
            cheater = self.store.get_receipt(cheater_hash)
            runs = [self.store.get_receipt(h) for h in honest]
            if cheater is None or not runs or any(r is None for r in runs):
                log.error("dropped the verdict on receipt %s: a receipt it needs is gone", cheater_hash)
                self.store.delete_meta(key)
                continue
            try:
                tx_hash = await self._call(self.ledger.slash(
                    self.key, receipt_from_proto(cheater), [receipt_from_proto(r) for r in runs if r is not None]))
            except errors.Unavailable:
                raise
            except errors.AlreadyExists:
                self.store.delete_meta(key)  # the ledger holds this verdict already
                continue
            except errors.AitbcError as exc:
                if isinstance(exc, PERMANENT) or exc.message.startswith("economy disabled"):
                    log.error("ledger refused the SLASH for receipt %s: %s", cheater_hash, exc.message)
                    self.store.delete_meta(key)
                    continue
                open_ += 1  # mempool full, nonce contention: the next pass tries again
                continue
            self.store.put_meta(key, " ".join([*honest, f"tx={tx_hash}"]).encode())
            open_ += 1
        return open_

    async def _settle_traced(self, rec: receipt_pb2.Receipt) -> None:
        """_settle, traced in the job's trace (Job.traceparent, set at SubmitJob): a "coordinator.settle"
        span around each MINT submission (its ledger calls are children, and the ledger's block links
        back to them) and a "coordinator.settled" span when the MINT is final or refused. Status
        polls in between are not traced: a trace should not grow by four spans a second."""
        before = rec.settlement.state
        job = self.store.get_job(rec.body.job_id)
        parent = job.traceparent if job is not None else None
        if before != St.SETTLEMENT_STATE_PENDING:
            await self._settle(rec)
            after = rec.settlement.state
            if after != before and after in (St.SETTLEMENT_STATE_FINAL, St.SETTLEMENT_STATE_REJECTED):
                with telemetry.span("coordinator.settled", parent=parent, job_id=rec.body.job_id,
                                    receipt_hash=rec.receipt_hash, state=St.Name(after),
                                    tx_hash=rec.settlement.tx_hash, block_height=rec.settlement.block_height):
                    pass
            return
        with telemetry.span("coordinator.settle", parent=parent, job_id=rec.body.job_id,
                            receipt_hash=rec.receipt_hash, attempt=rec.settlement.attempts + 1) as sp:
            await self._settle(rec)
            sp.set_attributes({"state": St.Name(rec.settlement.state), "tx_hash": rec.settlement.tx_hash,
                               "error": rec.settlement.error})

    async def _settle(self, rec: receipt_pb2.Receipt) -> None:
        s = rec.settlement
        status = await self._call(self.ledger.get_receipt_status(rec.receipt_hash))
        if status.status in ("included", "final"):
            new_state = St.SETTLEMENT_STATE_FINAL if status.status == "final" else St.SETTLEMENT_STATE_INCLUDED
            if (s.state, s.block_hash) != (new_state, status.block_hash):
                self.book.settled(rec, new_state, error="", tx_hash=status.tx_hash, block_height=status.block_height,
                                  block_hash=status.block_hash, amount=status.amount)
                if new_state == St.SETTLEMENT_STATE_FINAL:
                    log.info("receipt %s minted %d to %s in block %d (final)", rec.receipt_hash, status.amount,
                             rec.body.provider, status.block_height)
            return
        if status.status == "pending":
            if s.state != St.SETTLEMENT_STATE_SUBMITTED or s.tx_hash != status.tx_hash:
                self.book.settled(rec, St.SETTLEMENT_STATE_SUBMITTED, tx_hash=status.tx_hash)
            return
        # unknown to the ledger: (re)submit, unless a recent attempt is still backing off
        if self.clock() < self._retry_at.get(rec.receipt_hash, 0.0):
            return
        attempts = s.attempts + 1
        # one MINT at a time, so take the nonce from the node each time: if MINTs were lost with a
        # killed node, a local counter would run past them and every later MINT would wait forever
        self.ledger.resync_nonce(self.key.address)
        quote = self._quote(rec)
        kind = "SETTLE" if quote is not None else "MINT"
        try:  # the ledger client's idempotent MINT / SETTLE (status check, nonce allocation, re-sync)
            paid = {"quote": quote} if quote is not None else {}
            st = await self._call(self.ledger.settle_receipt(self.key, receipt_from_proto(rec), wait=None, **paid))
        except errors.Unavailable:
            s.attempts = attempts  # counted in memory; written with the next change
            raise
        except errors.AitbcError as exc:
            if quote is not None and _fee_refusal(exc.message):
                # the escrow cannot pay (the client reclaimed it) or the quote was settled already:
                # the provider still gets its mint, without the fee (docs/economy.md, "When a fee fails")
                log.error("ledger refused SETTLE of receipt %s (%s): minting it without the fee of %d",
                          rec.receipt_hash, exc.message, s.fee)
                s.fee, s.quote_hash = 0, ""
                self.book.settled(rec, St.SETTLEMENT_STATE_PENDING, error=f"fee not charged: {exc.message}",
                                  attempts=attempts)
                self._wake.set()
                return
            if isinstance(exc, PERMANENT):
                self.book.settled(rec, St.SETTLEMENT_STATE_REJECTED, error=exc.message, attempts=attempts)
                log.error("ledger refused %s of receipt %s: %s", kind, rec.receipt_hash, exc.message)
                return
            # mempool full, nonce contention: retry with backoff
            self._retry_at[rec.receipt_hash] = self.clock() + jittered_wait(attempts, 1.0, self.max_backoff_s)
            self.book.settled(rec, s.state, error=exc.message, attempts=attempts)
        else:
            self.book.settled(rec, St.SETTLEMENT_STATE_SUBMITTED, error="", tx_hash=st.tx_hash, attempts=attempts)

    def _quote(self, rec: receipt_pb2.Receipt) -> QuoteBody | None:
        """The quote a paid job's receipt settles (None: a MINT)."""
        if not rec.settlement.fee:
            return None
        job = self.store.get_job(rec.body.job_id)
        if job is None or not job.quote:
            return None
        return QuoteBody.from_canonical(job.quote)

    async def _call(self, coro):  # type: ignore[no-untyped-def]
        """Ledger calls: connection failures become Unavailable (retried with backoff by run)."""
        import grpc

        try:
            result = await coro
        except grpc.aio.AioRpcError as exc:
            raise errors.Unavailable(f"ledger {exc.code().name}: {exc.details()}") from None
        self._last_contact = self.clock()
        return result

    async def close(self) -> None:
        await self.ledger.close()
