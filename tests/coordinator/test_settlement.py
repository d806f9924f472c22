"""Settlement: a completed job's receipt is minted once on a real ledger node, across outages."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aitbc import crypto
from aitbc.ledger.client import LedgerClient
from aitbc.ledger.genesis import make_genesis
from aitbc.ledger.store import LmdbStore
from aitbc.server.ledger import start_node
from aitbc.v1 import coordinator_pb2, job_pb2, receipt_pb2
from tests.coordinator.test_jobs_api import MD, image_job, stub, wait_done

St = receipt_pb2.SettlementState


class LedgerNode:
    """One ledger authority on 127.0.0.1 with an LMDB store under `tmp`; `async with` starts it and
    stops it (if it is still running); `restart` keeps its port and chain."""

    def __init__(self, tmp: Path, attester: str) -> None:
        self.tmp = tmp
        self.key = crypto.PrivateKey.generate()
        self.genesis = make_genesis("aitbc-devnet", [self.key.address], [attester], block_time_ms=200)
        self.address = ""
        self.running = False

    @classmethod
    def for_network(cls, tmp: Path) -> LedgerNode:
        """A node whose genesis authorizes the coordinator of the first test network
        (network_factory's `net0`) as the receipt attester."""
        return cls(tmp, crypto.load_or_create_key(tmp / "net0" / "coordinator.key").address)

    async def start(self) -> None:
        self.store = LmdbStore(self.tmp / "ledger")
        self.node, self.server = await start_node(self.store, self.genesis, self.key, self.address or "127.0.0.1:0")
        self.address = f"127.0.0.1:{self.server.port}"
        self.running = True

    async def stop(self) -> None:
        self.running = False
        await self.node.stop()
        await self.server.stop(0.5)
        self.store.close()

    async def __aenter__(self) -> LedgerNode:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.running:
            await self.stop()


async def _settled(net, job_id: str, want: int = St.SETTLEMENT_STATE_FINAL, timeout: float = 30.0) -> receipt_pb2.Receipt:
    s = stub(net)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        rec = (await s.GetReceipt(coordinator_pb2.GetReceiptRequest(job_id=job_id), metadata=MD)).receipt
        if rec.settlement.state == want:
            return rec
        assert loop.time() < deadline, f"settlement stuck at {St.Name(rec.settlement.state)}: {rec.settlement.error}"
        await asyncio.sleep(0.1)


async def test_completed_job_mints_units_times_price_to_the_miner_once(network_factory, null_backend, tmp_path) -> None:
    async with LedgerNode.for_network(tmp_path) as ledger:
        net = await network_factory(ledger=ledger.address)
        miner = await net.add_miner({"null": null_backend}, price=7)
        s = stub(net)
        job = await wait_done(s, (await s.SubmitJob(image_job(model="null", seed=1), metadata=MD)).job.job_id)
        rec = await _settled(net, job.job_id)
        assert rec.settlement.amount == rec.body.units * 7 and rec.settlement.tx_hash and rec.settlement.block_height >= 1
        # GetJob carries the same, fresh settlement
        got = (await s.GetJob(coordinator_pb2.GetJobRequest(job_id=job.job_id), metadata=MD)).job
        assert got.receipt.settlement.state == St.SETTLEMENT_STATE_FINAL
        async with LedgerClient(ledger.address) as lc:
            assert (await lc.get_account(miner.key.address)).balance == rec.settlement.amount
            status = await lc.get_receipt_status(rec.receipt_hash)
            assert status.status == "final" and status.tx_hash == rec.settlement.tx_hash


async def test_free_job_mints_nothing(network_factory, null_backend, tmp_path) -> None:
    async with LedgerNode.for_network(tmp_path) as ledger:
        net = await network_factory(ledger=ledger.address)
        await net.add_miner({"null": null_backend}, price=0)
        s = stub(net)
        job = await wait_done(s, (await s.SubmitJob(image_job(model="null"), metadata=MD)).job.job_id)
        rec = (await s.GetReceipt(coordinator_pb2.GetReceiptRequest(job_id=job.job_id), metadata=MD)).receipt
        assert rec.settlement.state == St.SETTLEMENT_STATE_NOT_REQUIRED
        assert not net.core.store.unsettled_receipts()


async def test_ledger_down_then_coordinator_restart_then_ledger_back_mints_exactly_once(
        network_factory, null_backend, tmp_path) -> None:
    ledger = LedgerNode.for_network(tmp_path)
    await ledger.start()
    await ledger.stop()  # the ledger is down (its address is kept for the restart)
    net = await network_factory(ledger=ledger.address)
    miner = await net.add_miner({"null": null_backend}, price=2)
    s = stub(net)
    ids = []
    for i in range(3):
        ids.append((await wait_done(s, (await s.SubmitJob(image_job(model="null", seed=i), metadata=MD)).job.job_id)).job_id)
    await asyncio.sleep(1.0)  # settlement tries and backs off
    for job_id in ids:
        rec = (await s.GetReceipt(coordinator_pb2.GetReceiptRequest(job_id=job_id), metadata=MD)).receipt
        assert rec.settlement.state == St.SETTLEMENT_STATE_PENDING
    await net.restart_coordinator()  # the unsettled receipts are on disk
    await ledger.start()
    try:
        recs = [await _settled(net, job_id, timeout=60) for job_id in ids]
        total = sum(r.settlement.amount for r in recs)
        assert total == sum(r.body.units * 2 for r in recs)
        async with LedgerClient(ledger.address) as lc:
            assert (await lc.get_account(miner.key.address)).balance == total  # nothing minted twice
        # a second pass changes nothing
        assert await net.proc.settlement.settle_pending() == 0
    finally:
        await ledger.stop()


async def test_a_ledger_that_does_not_know_the_attester_rejects_with_the_reason(network_factory, null_backend,
                                                                               tmp_path) -> None:
    # another attester in the genesis
    async with LedgerNode(tmp_path, crypto.PrivateKey.generate().address) as ledger:
        net = await network_factory(ledger=ledger.address)
        miner = await net.add_miner({"null": null_backend}, price=1)
        s = stub(net)
        job = await wait_done(s, (await s.SubmitJob(image_job(model="null"), metadata=MD)).job.job_id)
        rec = await _settled(net, job.job_id, want=St.SETTLEMENT_STATE_REJECTED)
        assert "attester not authorized" in rec.settlement.error
        assert not net.core.store.unsettled_receipts()  # not retried forever
        async with LedgerClient(ledger.address) as lc:
            assert (await lc.get_account(miner.key.address)).balance == 0


async def _final_receipts(net, job_id: str, timeout: float = 30.0) -> list[receipt_pb2.Receipt]:
    """The job's receipts (one per shard) once none is waiting any more (FINAL or REJECTED)."""
    s = stub(net)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        recs = list((await s.ListReceipts(coordinator_pb2.ListReceiptsRequest(job_id=job_id), metadata=MD)).receipts)
        if all(r.settlement.state in (St.SETTLEMENT_STATE_FINAL, St.SETTLEMENT_STATE_REJECTED) for r in recs):
            return recs
        assert loop.time() < deadline, [St.Name(r.settlement.state) for r in recs]
        await asyncio.sleep(0.1)


async def test_a_split_job_pays_each_miner_its_own_share_on_chain(network_factory, null_backend, tmp_path) -> None:
    from aitbc.hub.payout import shares

    async with LedgerNode.for_network(tmp_path) as ledger:
        net = await network_factory(ledger=ledger.address)
        miners = [await net.add_miner({"null": null_backend}, price=p) for p in (2, 3, 5)]
        s = stub(net)
        job = (await s.SubmitJob(image_job(model="null", images=8, seed=3, width=64, height=64), metadata=MD)).job
        assert len(job.shard_job_ids) == 3
        await wait_done(s, job.job_id)
        recs = await _final_receipts(net, job.job_id)
        owed = shares((r.body.provider, r.body.units, r.body.price_per_unit) for r in recs)
        assert set(owed) == {m.key.address for m in miners} and all(owed.values())
        async with LedgerClient(ledger.address) as lc:
            for m in miners:  # each contributor holds exactly its own units x its own price
                assert (await lc.get_account(m.key.address)).balance == owed[m.key.address]


async def test_a_caught_cheater_earns_nothing_on_chain_and_the_honest_runs_are_paid(
        network_factory, null_backend, tmp_path) -> None:
    from tests.coordinator.test_hub import CheatingMiner

    async with LedgerNode.for_network(tmp_path) as ledger:
        net = await network_factory(ledger=ledger.address, verify_rate=1.0, verify_timeout_s=30)
        cheat = CheatingMiner(net)
        await cheat.connect(models=("null",), price_per_unit=4, device="cpu")
        serving = asyncio.create_task(cheat.serve())
        s = stub(net)
        job = (await s.SubmitJob(image_job(model="null", seed=9, width=64, height=64), metadata=MD)).job
        await net.until(lambda: net.core.store.get_job(job.job_id).state == job_pb2.JobState.JOB_STATE_COMPLETED)
        honest = [await net.add_miner({"null": null_backend}, price=4) for _ in range(2)]  # re-run + referee
        [rec] = await _final_receipts(net, job.job_id)
        assert rec.settlement.state == St.SETTLEMENT_STATE_REJECTED and "failed verification" in rec.settlement.error
        reruns = [net.core.store.get_job(v) for v in net.core.store.get_job(job.job_id).verification_job_ids]
        await net.until(lambda: all(net.core.store.get_receipt(r.receipt_hash).settlement.state
                                    == St.SETTLEMENT_STATE_FINAL for r in reruns))
        async with LedgerClient(ledger.address) as lc:
            assert (await lc.get_account(cheat.key.address)).balance == 0
            assert (await lc.get_receipt_status(rec.receipt_hash)).status == "unknown"
            for r in reruns:  # the honest executions are compute served: minted to their miners
                assert r.miner_id in {h.key.address for h in honest}
                assert (await lc.get_account(r.miner_id)).balance == r.units * 4
        serving.cancel()
