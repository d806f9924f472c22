"""Paid jobs: signed quotes and escrow reservations (docs/economy.md, "Quotes" and "Escrow").

A client whose API key names a chain address (`address` in its `[[clients]]` entry) can pay for a
job from its escrow for this coordinator (the ledger's ESCROW_DEPOSIT, for this coordinator's
attester address). The coordinator quotes the job (units x the miner's price + a priority fee,
signed, with an expiry), reserves the quote's total when it accepts the job, and settles it with
the job's receipt in one SETTLE transaction; a job that does not complete is not charged and its
reservation is released.

`Reservations` is the one owner of what is reserved. It is rebuilt from the store at start (jobs
with a fee that are active, or whose receipt's settlement is not final), so a restart neither
forgets a reservation nor keeps a settled one. Check and reserve happen in one synchronous step on
the event loop: two concurrent jobs that together exceed a client's escrow cannot both pass.
Coordinators sharing a database use `pgstore.PostgresReservations` instead (the same methods, the
rows in SQL, check and insert in one transaction under a lock per client address).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from aitbc import crypto, jobs, quotes
from aitbc.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from aitbc.v1 import job_pb2

if TYPE_CHECKING:
    from aitbc.ledger.genesis import ChainRef


@dataclass(frozen=True, slots=True)
class Charge:
    """What a paid job owes: from whose escrow, how much, and the quote it came from."""

    job_id: str
    client_address: str
    total: int
    quote_hash: str
    units: int = 1

    @property
    def rate(self) -> int:
        """Its place in the queue: the fee per unit, in millionths."""
        return self.total * 1_000_000 // max(1, self.units)


def check_escrow(charge: Charge, escrow_available: int, reserved: int) -> None:
    """Raise FailedPrecondition, naming what to deposit, when the escrow's free part is below the charge."""
    free = escrow_available - reserved
    if free < charge.total:
        raise FailedPrecondition(
            f"escrow too low: {max(0, free)} of the escrow of {charge.client_address} is free "
            f"({escrow_available} available, {reserved} reserved by accepted jobs), "
            f"less than the quote {charge.total}: aitbc escrow deposit {charge.total - max(0, free)}")


class Reservations:
    def __init__(self) -> None:
        self._by_job: dict[str, Charge] = {}
        self._by_client: dict[str, int] = {}

    def restore(self, charges: Iterable[Charge]) -> None:
        for c in charges:
            self._add(c)

    def reserved(self, client_address: str) -> int:
        return self._by_client.get(client_address, 0)

    def holds(self, job_id: str) -> bool:
        return job_id in self._by_job

    def reserve(self, charge: Charge, escrow_available: int) -> None:
        """Reserve `charge.total` of the client's escrow, or raise FailedPrecondition naming what to
        deposit. `escrow_available`: the escrow's available amount on the ledger."""
        if charge.job_id in self._by_job:
            return
        check_escrow(charge, escrow_available, self.reserved(charge.client_address))
        self._add(charge)

    def release(self, job_id: str) -> Charge | None:
        c = self._by_job.pop(job_id, None)
        if c is not None:
            left = self._by_client[c.client_address] - c.total
            if left:
                self._by_client[c.client_address] = left
            else:
                del self._by_client[c.client_address]
        return c

    def _add(self, c: Charge) -> None:
        if c.job_id in self._by_job:
            return
        self._by_job[c.job_id] = c
        self._by_client[c.client_address] = self._by_client.get(c.client_address, 0) + c.total

    def __len__(self) -> int:
        return len(self._by_job)


def charge_of(job: job_pb2.Job) -> Charge | None:
    """The charge a stored job carries (None for a free job)."""
    if not job.quote:
        return None
    body = quotes.QuoteBody.from_canonical(job.quote)
    return Charge(job.job_id, body.client_address, body.total, body.hash().hex(), body.units)


def quote_units(params: job_pb2.JobParams, prompt_most: int) -> tuple[int, str]:
    """(units, unit_type) a quote states: an image job's exact units, a text job's most."""
    from aitbc import receipts

    if jobs.job_kind(params) == jobs.TEXT:
        return prompt_most + params.text.max_new_tokens, "tokens"
    p = params.image
    return receipts.tile_steps(p.width, p.height, p.steps, p.images), "tile_steps"


def new_quote(key: crypto.PrivateKey, *, chain_id: str, genesis_hash: bytes, client_id: str, client_address: str,
              model: str, prompt_hash: str, unit_type: str, units: int, price_per_unit: int, priority_fee: int,
              expires_at: int) -> quotes.SignedQuote:
    body = quotes.QuoteBody(
        quote_id=secrets.token_hex(16), chain_id=chain_id, genesis_hash=genesis_hash.hex(), attester=key.address,
        client=client_id, client_address=client_address, model=model, prompt_hash=prompt_hash, unit_type=unit_type,
        units=units, price_per_unit=price_per_unit, priority_fee=priority_fee,
        total=units * price_per_unit + priority_fee, expires_at=expires_at)
    return quotes.sign_quote(body, key)


def check_quote(quote: quotes.SignedQuote, *, attester: str, chain_id: str, genesis_hash: bytes, client_id: str,
                client_address: str, model: str, prompt_hash: str, unit_type: str, units: int, now_ms: int) -> None:
    """A quote a client hands back with SubmitJob: this coordinator's, unexpired, for this client and
    exactly this job (model, prompt, units). Raises with the first mismatch named."""
    quotes.verify_quote(quote, attester=attester, now_ms=now_ms)
    b = quote.body
    if b.chain_id != chain_id or b.genesis_hash != genesis_hash.hex():
        raise InvalidArgument(f"quote is for chain {b.chain_id} (genesis {b.genesis_hash[:16]}...), this coordinator "
                              f"settles on {chain_id} (genesis {genesis_hash.hex()[:16]}...)")
    if b.client != client_id or b.client_address != client_address:
        raise PermissionDenied(f"quote {b.quote_id} was made for client {b.client} ({b.client_address}), not for this "
                               "API key")
    for name, want in (("model", model), ("prompt_hash", prompt_hash), ("unit_type", unit_type), ("units", units)):
        if getattr(b, name) != want:
            raise InvalidArgument(f"quote {b.quote_id} is for another job: its {name} is {getattr(b, name)!r}, this "
                                  f"job's is {want!r} (quote the job as it is submitted: same model and parameters)")


class LedgerView(Protocol):
    """What paid jobs and stake checks need from the ledger (aitbc.ledger.client.LedgerClient is one)."""

    async def chain_ref(self) -> ChainRef: ...

    async def escrow_available(self, client_address: str, attester: str) -> int: ...

    async def min_stake(self) -> int: ...

    async def stake_of(self, address: str) -> int: ...


class ChainLedger:
    """LedgerView over a LedgerClient: the escrow, the minimum stake (genesis, read once) and a
    miner's stake, through the node's public RPCs."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self._min_stake: int | None = None

    async def chain_ref(self) -> ChainRef:
        return await self.client.chain_ref()

    async def escrow_available(self, client_address: str, attester: str) -> int:
        return (await self.client.get_escrow(client_address, attester)).available

    async def min_stake(self) -> int:
        if self._min_stake is None:  # the genesis never changes: read once (version 2: no economy, 0)
            self._min_stake = (await self.client.get_genesis()).min_stake
        return self._min_stake

    async def stake_of(self, address: str) -> int:
        return (await self.client.get_account(address)).staked
