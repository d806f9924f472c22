"""The receipt book: the one writer of a receipt's settlement state.

A job keeps only its receipt hash; the receipt (and how far its MINT got) lives in the store's
receipt table and changes only here: attested (HELD while a verification decides, else PENDING,
NOT_REQUIRED or DISABLED), released or rejected by verification, and moved along by settlement
(SUBMITTED, INCLUDED, FINAL, REJECTED). Every change is written through and told to the listeners
(settlement wakes up on a new PENDING receipt).
"""

from __future__ import annotations

from collections.abc import Callable

from aitbc.coordinator.store import JobStore
from aitbc.v1 import receipt_pb2

St = receipt_pb2.SettlementState
CLOSED = frozenset({St.SETTLEMENT_STATE_FINAL, St.SETTLEMENT_STATE_REJECTED, St.SETTLEMENT_STATE_NOT_REQUIRED,
                    St.SETTLEMENT_STATE_DISABLED})


class ReceiptBook:
    def __init__(self, store: JobStore, *, settles: bool) -> None:
        self.store = store
        self.settles = settles  # a ledger is configured
        self.listeners: list[Callable[[receipt_pb2.Receipt], None]] = []
        # told when a receipt's settlement is over for good (FINAL, REJECTED, NOT_REQUIRED, DISABLED):
        # a paid job's escrow reservation ends then (aitbc.coordinator.fees)
        self.closed_listeners: list[Callable[[receipt_pb2.Receipt], None]] = []

    def get(self, receipt_hash: str) -> receipt_pb2.Receipt | None:
        return self.store.get_receipt(receipt_hash)

    async def aget(self, receipt_hash: str) -> receipt_pb2.Receipt | None:
        """`get` for the client-facing reads: awaited (a shared store's database may be slow)."""
        return await self.store.aget_receipt(receipt_hash)

    def unheld_state(self, rec: receipt_pb2.Receipt) -> int:
        if not self.settles:
            return St.SETTLEMENT_STATE_DISABLED
        if rec.body.units * rec.body.price_per_unit == 0 and not rec.settlement.fee:
            return St.SETTLEMENT_STATE_NOT_REQUIRED
        return St.SETTLEMENT_STATE_PENDING

    def attested(self, rec: receipt_pb2.Receipt, *, held: bool) -> receipt_pb2.Receipt:
        """A receipt just attested: its first settlement state. The caller stores it with its job
        (one transaction) and then calls `announce`."""
        rec.settlement.state = St.SETTLEMENT_STATE_HELD if held else self.unheld_state(rec)  # type: ignore[assignment]
        return rec

    def announce(self, rec: receipt_pb2.Receipt) -> None:
        for listener in self.listeners:
            listener(rec)

    def release(self, rec: receipt_pb2.Receipt) -> None:
        """Verification decided for it: mint as if it had never been held."""
        self._set(rec, self.unheld_state(rec), "")

    def reject(self, rec: receipt_pb2.Receipt, error: str) -> None:
        self._set(rec, St.SETTLEMENT_STATE_REJECTED, error)

    def settled(self, rec: receipt_pb2.Receipt, state: int, *, error: str | None = None, tx_hash: str | None = None,
                block_height: int | None = None, block_hash: str | None = None, amount: int | None = None,
                attempts: int | None = None) -> None:
        """Settlement moved the MINT along (only the fields given change)."""
        s = rec.settlement
        for name, value in (("tx_hash", tx_hash), ("block_height", block_height), ("block_hash", block_hash),
                            ("amount", amount), ("attempts", attempts)):
            if value is not None:
                setattr(s, name, value)
        self._set(rec, state, s.error if error is None else error, announce=False)

    def _set(self, rec: receipt_pb2.Receipt, state: int, error: str, *, announce: bool = True) -> None:
        rec.settlement.state = state  # type: ignore[assignment]
        rec.settlement.error = error
        self.store.update_receipt(rec)
        if state in CLOSED:
            for listener in self.closed_listeners:
                listener(rec)
        if announce:
            self.announce(rec)
