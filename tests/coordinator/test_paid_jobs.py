"""Paid jobs end to end (issue 15): a real ledger node with the economy, a real coordinator and real
miners. A client funds its escrow, gets a signed quote, and is charged exactly the quote; two jobs
over the escrow cannot both be accepted; a cancelled job costs nothing; a paid job jumps a queue of
free jobs; a coordinator killed between SETTLE and finality settles once; a staked cheater is
slashed. Every run checks the supply invariant."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import grpc
import pytest

from aitbc import crypto, quotes
from aitbc.config import ClientKey
from aitbc.ledger.client import LedgerClient
from aitbc.v1 import coordinator_pb2, job_pb2, receipt_pb2
from tests.conftest import API_KEY, OPERATOR_KEY, OTHER_KEY
from tests.coordinator.test_jobs_api import MD, image_job, stub, wait_done
from tests.coordinator.test_settlement import LedgerNode, _settled

St = receipt_pb2.SettlementState
S = job_pb2.JobState
pytestmark = pytest.mark.timeout(300)


def clients(address: str) -> list[ClientKey]:
    sha = lambda k: hashlib.sha256(k.encode()).hexdigest()  # noqa: E731
    return [ClientKey("alice", sha(API_KEY), address=address), ClientKey("bob", sha(OTHER_KEY)),
            ClientKey("carol", sha(OPERATOR_KEY), operator=True)]


async def supply_holds(lc: LedgerClient, addresses: set[str]) -> None:
    """minted - burned == balances + staked + unbonding + escrowed, over every account that holds
    anything (the test knows them all: nothing is pre-minted)."""
    sup = await lc.get_supply()
    held = 0
    for a in addresses:
        acct = await lc.get_account(a)
        held += acct.balance + acct.staked + acct.unbonding + sum(e.available + e.unlocking for e in acct.escrows)
    assert sup.supply == sup.minted - sup.burned == held, (sup, held)


class Economy:
    """A ledger with the economy, a coordinator that settles on it, and the client alice whose
    chain key is `client`: funded by serving free jobs as a miner first (tokens only come from
    served compute), then depositing `escrow` into its escrow for the coordinator."""

    def __init__(self, net: Any, ledger: LedgerNode, client: crypto.PrivateKey, lc: LedgerClient) -> None:
        self.net, self.ledger, self.client, self.lc = net, ledger, client, lc

    @property
    def attester(self) -> str:
        return self.net.core.key.address

    async def wait_tx(self, tx_hash: str) -> None:
        await self.lc.wait_for_tx(tx_hash, final=True, timeout=30)

    async def escrow(self) -> int:
        return (await self.lc.get_escrow(self.client.address, self.attester)).available


async def economy(network_factory: Any, null_backend: Any, tmp_path: Any, *, escrow: int, price: int = 3,
                  **overrides: Any) -> Economy:
    client = crypto.PrivateKey.generate()
    ledger = LedgerNode.for_network(tmp_path)
    await ledger.start()
    net = await network_factory(ledger=ledger.address, clients=clients(client.address), **overrides)
    lc = LedgerClient(ledger.address)
    eco = Economy(net, ledger, client, lc)
    # alice earns by serving free jobs (price 50 per unit) with its own key, then stops mining
    earner = await net.add_miner({"null": null_backend}, price=50, key=client)
    s = stub(net)
    while (await lc.get_account(client.address)).balance < escrow:
        job = await wait_done(s, (await s.SubmitJob(image_job(model="null", steps=20), metadata=MD)).job.job_id)
        await _settled(net, job.job_id)
    earner.stop()
    await net.until(lambda: client.address not in net.core.registry.miners)
    await eco.wait_tx(await lc.escrow_deposit(client, eco.attester, escrow))
    assert await eco.escrow() == escrow
    return eco


@pytest.fixture
async def eco(network_factory: Any, null_backend: Any, tmp_path: Any) -> Any:
    e = await economy(network_factory, null_backend, tmp_path, escrow=2_000)
    yield e
    await e.lc.close()
    await e.ledger.stop()


def quote_req(steps: int = 10, fee: int | None = None, seed: int = 1) -> coordinator_pb2.QuoteJobRequest:
    req = coordinator_pb2.QuoteJobRequest(model="null", params=job_pb2.JobParams(
        image=job_pb2.ImageParams(prompt="a red bicycle", steps=steps, seed=seed)))
    if fee is not None:
        req.priority_fee = fee
    return req


def paid_submit(q: coordinator_pb2.QuoteJobResponse, steps: int = 10, seed: int = 1) -> coordinator_pb2.SubmitJobRequest:
    req = image_job(model="null", steps=steps, seed=seed)
    req.quote, req.quote_signature = q.quote, q.quote_signature
    return req


async def test_a_paid_job_is_charged_exactly_its_quote(eco: Economy, null_backend: Any) -> None:
    provider = await eco.net.add_miner({"null": null_backend}, price=3)
    s = stub(eco.net)
    q = await s.QuoteJob(quote_req(fee=25), metadata=MD)
    body = quotes.QuoteBody.from_canonical(q.quote)
    quotes.verify_quote(quotes.SignedQuote(body, q.quote_signature), attester=eco.attester)
    assert (body.units, body.price_per_unit, body.priority_fee, body.total) == (10, 3, 25, 55)
    assert q.escrow_available == 2_000 and body.client_address == eco.client.address
    job = (await s.SubmitJob(paid_submit(q), metadata=MD)).job
    assert job.fee == 55 and job.quote == q.quote and not job.shard_job_ids
    done = await wait_done(s, job.job_id)
    assert done.state == S.JOB_STATE_COMPLETED
    rec = await _settled(eco.net, job.job_id)
    assert rec.settlement.fee == 55 and rec.settlement.quote_hash == body.hash().hex()
    mint = rec.body.units * 3
    assert (await eco.lc.get_account(provider.key.address)).balance == mint + 55  # protocol mint + client fee
    assert await eco.escrow() == 2_000 - 55  # charged exactly the quote
    tx = await eco.lc.get_transaction(rec.settlement.tx_hash)
    assert tx.status == "final"
    # the reservation ended with the final SETTLE: the whole escrow is free again
    assert (await s.QuoteJob(quote_req(), metadata=MD)).escrow_available == 2_000 - 55
    # a quote pays for one job only
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.SubmitJob(paid_submit(q), metadata=MD)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS and "each quote pays for one job" in err.value.details()
    await supply_holds(eco.lc, {eco.client.address, provider.key.address})


async def test_an_altered_or_foreign_quote_is_refused(eco: Economy, null_backend: Any) -> None:
    await eco.net.add_miner({"null": null_backend}, price=3)
    s = stub(eco.net)
    q = await s.QuoteJob(quote_req(fee=25), metadata=MD)
    doc = quotes.QuoteBody.from_canonical(q.quote).to_dict()
    doc["priority_fee"], doc["total"] = 0, 30  # self-consistent, but not what was signed
    forged = paid_submit(q)
    forged.quote = quotes.QuoteBody.from_dict(doc).canonical_bytes()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.SubmitJob(forged, metadata=MD)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not by its attester" in err.value.details()
    other = paid_submit(q, steps=20)  # another job than the one quoted
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.SubmitJob(other, metadata=MD)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "another job: its units is 10" in err.value.details()
    bob = (("x-api-key", OTHER_KEY),)  # no chain address: free jobs only, with the reason
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.SubmitJob(paid_submit(q), metadata=bob)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "has no chain address" in err.value.details()
    assert (await s.QuoteJob(quote_req(), metadata=bob)).no_quote_reason.startswith("client bob has no chain address")
    assert await eco.escrow() == 2_000


async def test_two_jobs_over_the_escrow_exactly_one_is_accepted(eco: Economy, null_backend: Any) -> None:
    await eco.net.add_miner({"null": null_backend}, price=3)
    s = stub(eco.net)
    reqs = []
    for seed in (1, 2):
        req = image_job(model="null", steps=10, seed=seed)
        req.priority_fee = 1_200  # 30 + 1,200 each: one fits in 2,000, two do not
        reqs.append(req)
    got = await asyncio.gather(*(s.SubmitJob(r, metadata=MD) for r in reqs), return_exceptions=True)
    ok = [g for g in got if not isinstance(g, Exception)]
    refused = [g for g in got if isinstance(g, grpc.aio.AioRpcError)]
    assert len(ok) == 1 and len(refused) == 1, got
    assert refused[0].code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "escrow too low" in refused[0].details() and "aitbc escrow deposit 460" in refused[0].details()
    await wait_done(s, ok[0].job.job_id)
    await _settled(eco.net, ok[0].job.job_id)
    assert await eco.escrow() == 2_000 - 1_230


async def test_a_cancelled_paid_job_is_not_charged(eco: Economy, null_backend: Any) -> None:
    s = stub(eco.net)
    await eco.net.add_miner({"null": null_backend}, price=3)
    busy = await wait_done(s, (await s.SubmitJob(image_job(model="null", steps=5), metadata=MD)).job.job_id)
    assert busy.state == S.JOB_STATE_COMPLETED
    eco.net.miners[-1].stop()  # no miner: the paid job waits in the queue
    await eco.net.until(lambda: not eco.net.core.registry.miners)
    req = image_job(model="null", steps=10, seed=3)
    req.priority_fee = 100
    with pytest.raises(grpc.aio.AioRpcError) as err:  # nobody to price it now: said, not guessed
        await s.SubmitJob(req, metadata=MD)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "cannot quote a paid job now" in err.value.details()
    slow = await eco.net.add_miner({"null": null_backend}, price=3)
    q = await s.QuoteJob(quote_req(steps=10, fee=100, seed=3), metadata=MD)
    slow.stop()
    await eco.net.until(lambda: not eco.net.core.registry.miners)
    job = (await s.SubmitJob(paid_submit(q, seed=3), metadata=MD)).job
    assert (await s.QuoteJob(quote_req(), metadata=MD)).escrow_available == 2_000 - 130  # reserved
    await s.CancelJob(coordinator_pb2.CancelJobRequest(job_id=job.job_id), metadata=MD)
    assert (await s.QuoteJob(quote_req(), metadata=MD)).escrow_available == 2_000  # released, nothing moved
    assert await eco.escrow() == 2_000


async def test_a_paid_job_jumps_a_queue_of_free_jobs(eco: Economy, null_backend: Any) -> None:
    s = stub(eco.net)
    await eco.net.add_miner({"null": null_backend}, price=3)
    q = await s.QuoteJob(quote_req(steps=10, fee=10, seed=4), metadata=MD)
    eco.net.miners[-1].stop()
    await eco.net.until(lambda: not eco.net.core.registry.miners)
    free = [(await s.SubmitJob(image_job(model="null", steps=10, seed=10 + i), metadata=MD)).job for i in range(4)]
    paid = (await s.SubmitJob(paid_submit(q, seed=4), metadata=MD)).job
    got = (await s.GetJob(coordinator_pb2.GetJobRequest(job_id=paid.job_id), metadata=MD)).job
    assert got.queue.position == 1  # ahead of the four free jobs submitted before it
    await eco.net.add_miner({"null": null_backend}, price=3)
    done = {j.job_id: await wait_done(s, j.job_id) for j in [paid, *free]}
    started = {j: d.started_at_unix_ms or d.story[-1].at_unix_ms for j, d in done.items()}
    assert started[paid.job_id] <= min(started[f.job_id] for f in free)
    rec = await _settled(eco.net, paid.job_id)
    assert rec.settlement.fee == 40


@pytest.mark.slow
async def test_coordinator_killed_between_settle_and_finality_settles_once(
        network_factory: Any, null_backend: Any, tmp_path: Any) -> None:
    eco = await economy(network_factory, null_backend, tmp_path, escrow=1_000)
    try:
        provider = await eco.net.add_miner({"null": null_backend}, price=3)
        s = stub(eco.net)
        req = image_job(model="null", steps=10, seed=5)
        req.priority_fee = 70
        job = (await s.SubmitJob(req, metadata=MD)).job
        await wait_done(s, job.job_id)
        await eco.net.until(lambda: eco.net.core.store.get_receipt(eco.net.core.store.get_job(job.job_id).receipt_hash)
                            .settlement.state != St.SETTLEMENT_STATE_PENDING, interval=0.005)  # the SETTLE is sent
        await eco.net.restart_coordinator()  # killed before it is final (the next start finds it on the ledger)
        rec = await _settled(eco.net, job.job_id)
        assert rec.settlement.fee == 100
        assert await eco.escrow() == 900  # charged once
        assert (await eco.lc.get_account(provider.key.address)).balance == rec.body.units * 3 + 100
        assert await eco.net.proc.settlement.settle_pending() == 0
        await supply_holds(eco.lc, {eco.client.address, provider.key.address})
    finally:
        await eco.lc.close()
        await eco.ledger.stop()
