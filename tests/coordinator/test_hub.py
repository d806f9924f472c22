"""The pool hub inside the coordinator: matching with reasons, reputation, verification by
re-execution (a cheating miner is caught, earns nothing, and is quarantined)."""

from __future__ import annotations

import asyncio
import io
import json

import grpc
import numpy as np
import pytest
from PIL import Image

from aitbc import jobs, metrics
from aitbc.hub.verification import pixel_distance
from aitbc.miner.backend import null_png
from aitbc.v1 import coordinator_pb2, job_pb2, miner_pb2, receipt_pb2
from tests.conftest import OPERATOR_KEY
from tests.coordinator.test_jobs_api import MD, fetch, image_job, stub, wait_done
from tests.coordinator.test_miner_gateway import RawMiner

S = job_pb2.JobState
OP = (("x-api-key", OPERATOR_KEY),)
V = job_pb2.VerificationState
St = receipt_pb2.SettlementState


class CheatingMiner(RawMiner):
    """Registers like anyone, then answers every assignment with a well-formed, well-signed result
    whose image is not what the job asked for (cheaper than running the model)."""

    def image(self, job: job_pb2.Job) -> bytes:
        return null_png("whatever is cheapest", 0, 64, 64)

    async def serve(self) -> None:
        while True:
            msg = await self.call.read()
            if msg is grpc.aio.EOF:
                return
            if msg.WhichOneof("msg") != "assignment":
                continue
            job = msg.assignment.task
            self.send(accepted=miner_pb2.JobAccepted(job_id=job.job_id))
            png = self.image(job)
            self.send(chunk=miner_pb2.ArtifactChunk(job_id=job.job_id, index=0, data=png))
            self.send(result=self.result_for(job, png))


def scene(seed: int) -> np.ndarray:
    """The image a job with this seed "should" produce on a GPU miner (a smooth random picture)."""
    rng = np.random.default_rng(seed)
    return np.kron(rng.integers(0, 256, size=(8, 8, 3)), np.ones((8, 8, 1))).astype(np.int16)


def png_of(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


class GpuMiner(CheatingMiner):
    """A CUDA miner as verification sees one: honest ones return the job's scene plus their own
    kernel noise (a few levels per pixel: never byte-identical across GPUs, well within the
    tolerance); a cheating one returns another seed's scene."""

    def __init__(self, net, *, noise_seed: int, cheat: bool = False) -> None:
        super().__init__(net)
        self.noise = np.random.default_rng(noise_seed)
        self.cheat = cheat
        self.task: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, net, *, noise_seed: int, cheat: bool = False) -> GpuMiner:
        """Registered as a CUDA miner of model "null", serving, listed by the coordinator."""
        m = cls(net, noise_seed=noise_seed, cheat=cheat)
        await m.connect(models=("null",), device="cuda:0", gpu_name="Test GPU", vram_mb=24000)
        m.task = asyncio.create_task(m.serve())
        await net.until(lambda: m.key.address in net.core.miners)
        return m

    def stop(self) -> None:
        self.outbox.put_nowait(None)  # ends the Work stream
        if self.task is not None:
            self.task.cancel()

    def image(self, job: job_pb2.Job) -> bytes:
        seed = job.params.image.seed + (999 if self.cheat else 0)
        return png_of(scene(seed) + self.noise.integers(-3, 4, size=(64, 64, 3)))


async def test_max_price_and_vram_are_refused_with_the_reason(net) -> None:
    m = RawMiner(net)
    await m.connect(models=("null",), price_per_unit=2, vram_mb=6000, device="cuda:0")
    await net.until(lambda: net.core.miners)
    s = stub(net)
    req = image_job(model="null")
    req.max_price_per_unit = 0
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.SubmitJob(req, metadata=MD)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "above your max price 0 (cheapest: 2)" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.SubmitJob(image_job(model="null", width=1024, height=1024, images=2), metadata=MD)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "VRAM" in err.value.details()
    assert not net.core.machine.records


async def test_cheaper_miner_wins_and_equals_share_round_robin(net, null_backend) -> None:
    cheap = await net.add_miner({"null": null_backend}, price=1)
    dear = await net.add_miner({"null": null_backend}, price=50)
    s = stub(net)
    for i in range(4):
        done = await wait_done(s, (await s.SubmitJob(image_job(model="null", seed=i), metadata=MD)).job.job_id)
        assert done.miner_id == cheap.key.address
    twin = await net.add_miner({"null": null_backend}, price=1)
    # submitted together with a max price of 1: the busy cheap miner's load sends work to its twin,
    # never to the dear one (without the limit a free dear miner would rather serve than let jobs wait);
    # all 6 in flight at once, so the cheap miner (one slot) holds one while the next ones are placed,
    # however quickly it finishes a job (one at a time, each could end before the next arrived)
    async def submit(i: int) -> str:
        req = image_job(model="null", seed=10 + i)
        req.max_price_per_unit = 1
        return (await s.SubmitJob(req, metadata=MD)).job.job_id

    submitted = await asyncio.gather(*(submit(i) for i in range(6)))
    served = {(await wait_done(s, job_id)).miner_id for job_id in submitted}
    assert served == {cheap.key.address, twin.key.address}
    assert dear.completed == 0


async def test_verification_passes_between_honest_miners(network_factory, null_backend) -> None:
    net = await network_factory(verify_rate=1.0)
    a = await net.add_miner({"null": null_backend})
    b = await net.add_miner({"null": null_backend})
    s = stub(net)
    passed = metrics.value("aitbc_hub_verifications_total", outcome="passed")
    served = metrics.value("aitbc_gpu_seconds_total", model="null")
    spent = metrics.value("aitbc_hub_verification_gpu_seconds_total", model="null")
    job = await wait_done(s, (await s.SubmitJob(image_job(model="null", seed=3), metadata=MD)).job.job_id)
    await net.until(lambda: net.core.store.get_job(job.job_id).verification == V.VERIFICATION_STATE_PASSED)
    # the live counters: one verification passed; the re-run's GPU time is counted apart from the client's
    assert metrics.value("aitbc_hub_verifications_total", outcome="passed") == passed + 1
    rerun = net.core.store.get_job(net.core.store.get_job(job.job_id).verification_job_ids[0])
    assert rerun.gpu_ms >= 1 and job.gpu_ms >= 1  # measured, and shown, but not what is paid
    assert rerun.units == job.units  # the same job costs the same whoever runs it (units from its parameters)
    assert metrics.value("aitbc_hub_verification_gpu_seconds_total", model="null") == pytest.approx(spent + rerun.gpu_ms / 1000)
    assert metrics.value("aitbc_gpu_seconds_total", model="null") == pytest.approx(served + job.gpu_ms / 1000)
    got = (await s.GetJob(coordinator_pb2.GetJobRequest(job_id=job.job_id), metadata=MD)).job
    assert got.receipt.settlement.state == St.SETTLEMENT_STATE_DISABLED  # released (no ledger configured here)
    [vid] = got.verification_job_ids
    rerun = net.core.store.get_job(vid)
    assert rerun.miner_id != got.miner_id and {rerun.miner_id, got.miner_id} == {a.key.address, b.key.address}
    miners = {m.miner_id: m for m in (await s.ListMiners(coordinator_pb2.ListMinersRequest(), metadata=MD)).miners}
    assert miners[got.miner_id].verifications_passed == 1 and miners[rerun.miner_id].verifications_passed == 1
    # the re-execution is the hub's, not the client's
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.GetJob(coordinator_pb2.GetJobRequest(job_id=vid), metadata=MD)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_a_cheater_is_caught_earns_nothing_and_is_quarantined(network_factory, null_backend, capsys) -> None:
    net = await network_factory(verify_rate=1.0, verify_timeout_s=30)
    cheat = CheatingMiner(net)
    await cheat.connect(models=("null",), price_per_unit=1, device="cpu")
    serving = asyncio.create_task(cheat.serve())
    s = stub(net)
    honest: list = []
    for round_ in range(2):
        for h in honest:  # its reputation fell: the cheater gets work only when it is alone
            h.stop()
        await net.until(lambda: set(net.core.miners) == {cheat.key.address})
        job = (await s.SubmitJob(image_job(model="null", seed=20 + round_, width=64, height=64), metadata=MD)).job
        await net.until(lambda j=job: net.core.store.get_job(j.job_id).state == S.JOB_STATE_COMPLETED)
        assert net.core.store.get_job(job.job_id).miner_id == cheat.key.address
        # honest miners join: one re-executes the job, the other referees the disagreement
        honest = [await net.add_miner({"null": null_backend}, price=1) for _ in range(2)]
        await net.until(lambda j=job: net.core.store.get_job(j.job_id).verification == V.VERIFICATION_STATE_REPLACED,
                        timeout=60)
        got = (await s.GetJob(coordinator_pb2.GetJobRequest(job_id=job.job_id), metadata=MD)).job
        # the client receives the verified result, not the cheat
        _, data = await fetch(s, job.job_id)
        assert data == null_png("a red bicycle", 20 + round_, 64, 64) and data != null_png("whatever is cheapest", 0, 64, 64)
        # the cheater's receipt is never minted
        assert got.receipt.settlement.state == St.SETTLEMENT_STATE_REJECTED
        assert "failed verification" in got.receipt.settlement.error
    status = {m.miner_id: m for m in (await s.ListMiners(coordinator_pb2.ListMinersRequest(), metadata=MD)).miners}
    bad = status[cheat.key.address]
    assert bad.quarantined and bad.verifications_failed == 2 and bad.reputation < 0.2
    assert all(status[h.key.address].verifications_passed == 1 for h in honest)
    # quarantined: new work goes to the honest miners only
    for i in range(3):
        done = await wait_done(s, (await s.SubmitJob(image_job(model="null", seed=40 + i), metadata=MD)).job.job_id)
        assert done.miner_id != cheat.key.address
    # reputation persists across a coordinator restart
    serving.cancel()
    await net.restart_coordinator()
    s = stub(net)
    status = {m.miner_id: m for m in (await s.ListMiners(coordinator_pb2.ListMinersRequest(), metadata=MD)).miners}
    assert status[cheat.key.address].quarantined and status[cheat.key.address].verifications_failed == 2

    # only an operator lifts a quarantine, and the miner comes back on probation
    release = coordinator_pb2.ReleaseMinerRequest(miner_id=cheat.key.address)
    for req, md, code in ((release, MD, grpc.StatusCode.PERMISSION_DENIED),
                          (coordinator_pb2.ReleaseMinerRequest(), OP, grpc.StatusCode.INVALID_ARGUMENT),
                          (coordinator_pb2.ReleaseMinerRequest(miner_id="ait1nobody"), OP, grpc.StatusCode.NOT_FOUND),
                          (coordinator_pb2.ReleaseMinerRequest(miner_id=honest[0].key.address), OP,
                           grpc.StatusCode.FAILED_PRECONDITION)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.ReleaseMiner(req, metadata=md)
        assert err.value.code() == code, err.value.details()
    from aitbc.clients.cli import main  # what the operator types: aitbc hub release MINER

    argv = ["hub", "release", cheat.key.address, "--coordinator", net.address, "--api-key", OPERATOR_KEY]
    assert await asyncio.get_running_loop().run_in_executor(None, main, argv) == 0
    assert "on probation" in capsys.readouterr().out
    released = next(m for m in (await s.ListMiners(coordinator_pb2.ListMinersRequest(), metadata=MD)).miners
                    if m.miner_id == cheat.key.address)
    assert not released.quarantined and released.probation_left == 10 and released.verifications_failed == 2
    with pytest.raises(grpc.aio.AioRpcError) as err:  # released already: nothing to lift
        await s.ReleaseMiner(release, metadata=OP)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "not quarantined" in err.value.details()
    # eligible again; on probation every result it returns is checked (held until then)
    for h in honest:
        h.stop()
    back = CheatingMiner(net, key=cheat.key)
    await back.connect(models=("null",), price_per_unit=1, device="cpu")
    serving = asyncio.create_task(back.serve())
    await net.until(lambda: set(net.core.miners) == {cheat.key.address})
    job = (await s.SubmitJob(image_job(model="null", seed=77, width=64, height=64), metadata=MD)).job
    await net.until(lambda: net.core.store.get_job(job.job_id).state == S.JOB_STATE_COMPLETED)
    got = (await s.GetJob(coordinator_pb2.GetJobRequest(job_id=job.job_id), metadata=MD)).job
    assert got.miner_id == cheat.key.address and got.verification == V.VERIFICATION_STATE_PENDING
    assert got.receipt.settlement.state == St.SETTLEMENT_STATE_HELD
    serving.cancel()


async def test_releasing_a_connected_miner_that_never_served_says_it_is_not_quarantined(net) -> None:
    fresh = RawMiner(net)
    await fresh.connect()
    await net.until(lambda: fresh.key.address in net.core.miners)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub(net).ReleaseMiner(coordinator_pb2.ReleaseMinerRequest(miner_id=fresh.key.address), metadata=OP)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "not quarantined" in err.value.details()


async def test_gpu_runs_are_compared_within_the_tolerance_on_gpus_only(network_factory, null_backend) -> None:
    """CUDA miners: results that differ by kernel noise pass (not byte-identical), a wrong image is
    caught by the referee; a CPU miner connected all along never re-runs a CUDA miner's job."""
    net = await network_factory(verify_rate=1.0, verify_timeout_s=30)
    s = stub(net)
    gpus = []

    async def gpu(noise_seed: int, cheat: bool = False) -> GpuMiner:
        gpus.append(await GpuMiner.start(net, noise_seed=noise_seed, cheat=cheat))
        return gpus[-1]

    a = await gpu(1)
    job = (await s.SubmitJob(image_job(model="null", seed=5, width=64, height=64), metadata=MD)).job
    await net.until(lambda: net.core.store.get_job(job.job_id).state == S.JOB_STATE_COMPLETED)
    # only a CPU miner is there to re-run it: the re-run waits for a CUDA miner
    cpu = await net.add_miner({"null": null_backend})
    await asyncio.sleep(0.5)
    assert net.core.store.get_job(job.job_id).verification == V.VERIFICATION_STATE_PENDING
    assert cpu.completed == 0
    b = await gpu(2)
    await net.until(lambda: net.core.store.get_job(job.job_id).verification == V.VERIFICATION_STATE_PASSED)
    got = (await s.GetJob(coordinator_pb2.GetJobRequest(job_id=job.job_id), metadata=MD)).job
    rerun = net.core.store.get_job(got.verification_job_ids[0])
    assert rerun.miner_id == b.key.address and rerun.artifacts[0].sha256 != got.artifacts[0].sha256
    assert got.receipt.settlement.state == St.SETTLEMENT_STATE_DISABLED  # released

    # a cheating CUDA miner alone takes a job; the honest ones disagree with it and it is outvoted
    for m in (a, b):
        m.stop()
    cpu.stop()
    await net.until(lambda: not net.core.miners)
    c = await gpu(3, cheat=True)
    job = (await s.SubmitJob(image_job(model="null", seed=6, width=64, height=64), metadata=MD)).job
    await net.until(lambda: net.core.store.get_job(job.job_id).state == S.JOB_STATE_COMPLETED)
    a, b = await gpu(4), await gpu(5)
    await net.until(lambda: net.core.store.get_job(job.job_id).verification == V.VERIFICATION_STATE_REPLACED,
                    timeout=30)
    got = (await s.GetJob(coordinator_pb2.GetJobRequest(job_id=job.job_id), metadata=MD)).job
    assert got.miner_id == c.key.address
    assert got.receipt.settlement.state == St.SETTLEMENT_STATE_REJECTED
    _, data = await fetch(s, job.job_id)
    assert pixel_distance(data, png_of(scene(6))) < 0.03 < pixel_distance(data, png_of(scene(6 + 999)))
    status = {m.miner_id: m for m in (await s.ListMiners(coordinator_pb2.ListMinersRequest(), metadata=MD)).miners}
    assert status[c.key.address].verifications_failed == 1 and status[c.key.address].probation_left == 10
    assert status[a.key.address].verifications_failed == status[b.key.address].verifications_failed == 0
    for m in gpus:
        m.stop()


class LyingMiner(RawMiner):
    """Declares a model and 80 GB of VRAM; every job then fails on it the way an OOM would."""

    async def serve(self) -> None:
        while True:
            msg = await self.call.read()
            if msg is grpc.aio.EOF:
                return
            if msg.WhichOneof("msg") == "assignment":
                job_id = msg.assignment.task.job_id
                self.send(accepted=miner_pb2.JobAccepted(job_id=job_id))
                self.send(failed=miner_pb2.JobFailed(job_id=job_id, reason="CUDA out of memory. Tried to allocate 9 GiB"))


async def test_a_miner_lying_about_vram_costs_it_reputation_not_the_client_its_job(net, null_backend) -> None:
    liar = LyingMiner(net)
    await liar.connect(models=("null",), price_per_unit=0, device="cuda:0", vram_mb=80_000)  # free: it wins on price
    serving = asyncio.create_task(liar.serve())
    honest = await net.add_miner({"null": null_backend}, price=5)
    s = stub(net)
    done = []
    for seed in range(5):
        done.append(await wait_done(s, (await s.SubmitJob(image_job(model="null", seed=seed), metadata=MD)).job.job_id))
    # every job completes, on the honest miner; the first ones were tried on the liar first, then
    # (3 failures in a row) it gets work only when no steady miner is free
    assert all(j.state == S.JOB_STATE_COMPLETED and j.miner_id == honest.key.address for j in done)
    assert [j.attempts for j in done] == [2, 2, 2, 1, 1]
    status = {m.miner_id: m for m in (await s.ListMiners(coordinator_pb2.ListMinersRequest(), metadata=MD)).miners}
    assert status[liar.key.address].failures == 3 and status[liar.key.address].reputation < 0.5 * 0.9**2
    serving.cancel()


class StallingMiner(RawMiner):
    """Accepts its job, keeps its stream alive with heartbeats, and never makes progress."""

    def __init__(self, net) -> None:
        super().__init__(net)
        self.received: list[miner_pb2.WorkResponse] = []

    async def serve(self) -> None:
        async def beat() -> None:
            while True:
                self.send(heartbeat=miner_pb2.Heartbeat())
                await asyncio.sleep(0.2)

        beating = asyncio.create_task(beat())
        try:
            while True:
                msg = await self.call.read()
                if msg is grpc.aio.EOF:
                    return
                self.received.append(msg)
                if msg.WhichOneof("msg") == "assignment":
                    self.send(accepted=miner_pb2.JobAccepted(job_id=msg.assignment.task.job_id))
        finally:
            beating.cancel()


async def test_a_miner_that_accepts_and_stalls_loses_the_job_to_another(network_factory, null_backend) -> None:
    net = await network_factory(stall_timeout_s=1.0)
    staller = StallingMiner(net)
    await staller.connect(models=("null",), price_per_unit=0)
    serving = asyncio.create_task(staller.serve())
    s = stub(net)
    job = (await s.SubmitJob(image_job(model="null", seed=8), metadata=MD)).job
    await net.until(lambda: net.core.machine.job(job.job_id).state == S.JOB_STATE_RUNNING)
    honest = await net.add_miner({"null": null_backend}, price=5)
    done = await wait_done(s, job.job_id)
    assert done.state == S.JOB_STATE_COMPLETED and done.miner_id == honest.key.address and done.attempts == 2
    # the staller was told to drop it, and it counts against it (its heartbeats kept it connected)
    cancels = [m.cancel for m in staller.received if m.WhichOneof("msg") == "cancel"]
    assert [c.job_id for c in cancels] == [job.job_id] and "made no progress" in cancels[0].reason
    status = {m.miner_id: m for m in (await s.ListMiners(coordinator_pb2.ListMinersRequest(), metadata=MD)).miners}
    assert status[staller.key.address].stalls == 1 and status[staller.key.address].connected
    serving.cancel()


async def test_a_job_queued_inside_a_busy_miner_is_not_a_stall(network_factory) -> None:
    """A miner runs one job and holds a second one in its own queue (as text jobs wait for each
    other): while it streams progress on the first, the second is not taken away."""
    net = await network_factory(stall_timeout_s=2.5)  # generous: a loaded CI box must not fake a stall
    m = RawMiner(net)
    await m.connect(max_concurrency=2)
    s = stub(net)
    first = (await s.SubmitJob(image_job(model="null", seed=1, steps=50), metadata=MD)).job
    second = (await s.SubmitJob(image_job(model="null", seed=2, steps=50), metadata=MD)).job
    held = {(await m.read()).assignment.task.job_id for _ in range(2)}
    assert held == {first.job_id, second.job_id}
    for job_id in held:
        m.send(accepted=miner_pb2.JobAccepted(job_id=job_id))
    for step in range(1, 26):  # 7.5 s of progress on the first job only: 3x the stall timeout
        m.send(heartbeat=miner_pb2.Heartbeat())
        m.send(progress=job_pb2.JobProgress(job_id=first.job_id, step=step, total_steps=50))
        await asyncio.sleep(0.3)
    assert net.core.machine.job(second.job_id).state == S.JOB_STATE_RUNNING
    assert net.core.machine.job(second.job_id).miner_id == m.key.address
    # then silence on both (heartbeats only): both are taken back as stalls (and, with no other
    # miner there, offered to it again)
    for _ in range(100):
        if net.core.book.snapshot(m.key.address).stalls >= 2:
            break
        m.send(heartbeat=miner_pb2.Heartbeat())
        await asyncio.sleep(0.1)
    assert net.core.book.snapshot(m.key.address).stalls == 2
    msgs = [await m.read() for _ in range(4)]
    assert sorted(x.cancel.job_id for x in msgs if x.WhichOneof("msg") == "cancel") == sorted(held)
    assert sorted(x.assignment.task.job_id for x in msgs if x.WhichOneof("msg") == "assignment") == sorted(held)


async def test_a_shard_result_sent_twice_counts_once(net, null_backend) -> None:
    twice = RawMiner(net)
    await twice.connect(models=("null",), price_per_unit=0)
    other = await net.add_miner({"null": null_backend}, price=0)
    s = stub(net)
    job = (await s.SubmitJob(image_job("four boats", model="null", images=4, seed=30, width=64, height=64),
                             metadata=MD)).job
    assert len(job.shard_job_ids) == 2
    msg = await twice.read()
    shard = msg.assignment.task
    twice.send(accepted=miner_pb2.JobAccepted(job_id=shard.job_id))
    pngs = [null_png("four boats", shard.params.image.seed + k, 64, 64) for k in range(shard.params.image.images)]
    for k, png in enumerate(pngs):
        twice.send(chunk=miner_pb2.ArtifactChunk(job_id=shard.job_id, index=k, data=png))
    result = twice.result_for(shard, pngs)
    twice.send(result=result)
    twice.send(result=result)  # the same shard's result again
    first, second = await twice.read(), await twice.read()
    assert first.WhichOneof("msg") == "accepted"
    assert second.WhichOneof("msg") == "rejected" and "not assigned" in second.rejected.reason
    done = await wait_done(s, job.job_id)
    assert done.state == S.JOB_STATE_COMPLETED and len(done.artifacts) == 4
    recs = (await s.ListReceipts(coordinator_pb2.ListReceiptsRequest(job_id=job.job_id), metadata=MD)).receipts
    assert len(recs) == 2 and len({r.receipt_hash for r in recs}) == 2
    assert other.completed == 1


async def test_a_gpu_jobs_verification_keeps_its_device_class_across_a_coordinator_restart(
        network_factory, null_backend) -> None:
    net = await network_factory(verify_rate=1.0, verify_timeout_s=30)
    s = stub(net)

    a = await GpuMiner.start(net, noise_seed=1)
    job = (await s.SubmitJob(image_job(model="null", seed=7, width=64, height=64), metadata=MD)).job
    await net.until(lambda: net.core.store.get_job(job.job_id).state == S.JOB_STATE_COMPLETED)
    assert net.core.store.get_job(job.job_id).device_class == "cuda"
    a.stop()
    await net.restart_coordinator()  # the pending re-run is restored from LMDB
    s = stub(net)
    cpu = await net.add_miner({"null": null_backend})
    await asyncio.sleep(0.5)
    assert cpu.completed == 0  # still only for a CUDA miner
    b = await GpuMiner.start(net, noise_seed=2)
    # and compared within the tolerance, not byte for byte: kernel noise passes
    await net.until(lambda: net.core.store.get_job(job.job_id).verification == V.VERIFICATION_STATE_PASSED)
    b.stop()


async def test_without_a_second_miner_the_result_stands_unverified(network_factory, null_backend) -> None:
    net = await network_factory(verify_rate=1.0, verify_timeout_s=1.0)
    await net.add_miner({"null": null_backend})
    s = stub(net)
    job = await wait_done(s, (await s.SubmitJob(image_job(model="null"), metadata=MD)).job.job_id)
    await net.until(lambda: net.core.store.get_job(job.job_id).verification == V.VERIFICATION_STATE_UNVERIFIED, timeout=10)
    got = (await s.GetJob(coordinator_pb2.GetJobRequest(job_id=job.job_id), metadata=MD)).job
    assert got.receipt.settlement.state == St.SETTLEMENT_STATE_DISABLED  # released, not held forever
    assert jobs.state_name(got.state) == "COMPLETED"


async def test_eight_images_split_across_three_miners_merge_in_order(net, null_backend, capsys) -> None:
    miners = [await net.add_miner({"null": null_backend}, price=1 + i) for i in range(3)]
    s = stub(net)
    job = (await s.SubmitJob(image_job("eight lighthouses", model="null", images=8, seed=100, width=64, height=64),
                             metadata=MD)).job
    assert len(job.shard_job_ids) == 3
    done = await wait_done(s, job.job_id)
    assert done.state == S.JOB_STATE_COMPLETED and len(done.artifacts) == 8
    # image i is the one the whole job would have made: seed + i, in order
    for i in range(8):
        _, data = await fetch(s, job.job_id, i)
        assert data == null_png("eight lighthouses", 100 + i, 64, 64)
    recs = (await s.ListReceipts(coordinator_pb2.ListReceiptsRequest(job_id=job.job_id), metadata=MD)).receipts
    assert len(recs) == 3  # one receipt per shard, each minted to its own miner
    assert {r.body.provider for r in recs} == {m.key.address for m in miners}
    assert sum(r.body.units for r in recs) == done.units
    shards = [net.core.store.get_job(j) for j in done.shard_job_ids]
    assert [sh.params.image.images for sh in shards] == [3, 3, 2] and [sh.first_image for sh in shards] == [0, 3, 6]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.GetReceipt(coordinator_pb2.GetReceiptRequest(job_id=job.job_id), metadata=MD)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "ListReceipts" in err.value.details()
    # `aitbc receipts --job-id` lists the shards' receipts and each contributor's share
    from aitbc.clients.cli import main

    argv = ["receipts", "--job-id", job.job_id, "--json", "--coordinator", net.address, "--api-key", MD[0][1]]
    assert await asyncio.get_running_loop().run_in_executor(None, main, argv) == 0
    out, err_text = capsys.readouterr()
    assert [r["receipt"]["job_id"] for r in json.loads(out)] == list(done.shard_job_ids)
    for r in recs:
        assert f"share of {r.body.provider}: {r.body.units * r.body.price_per_unit}" in err_text


async def test_a_split_jobs_progress_counts_steps_over_all_shards(net) -> None:
    a, b = RawMiner(net), RawMiner(net)
    await a.connect()
    await b.connect()
    s = stub(net)
    job = (await s.SubmitJob(image_job("two pairs", model="null", images=4, steps=4, seed=50, width=64, height=64),
                             metadata=MD)).job
    shard_a, shard_b = (await a.read()).assignment.task, (await b.read()).assignment.task
    watch = s.WatchJob(coordinator_pb2.WatchJobRequest(job_id=job.job_id), metadata=MD)
    assert (await watch.read()).WhichOneof("event") == "job"  # the current state first

    async def next_progress() -> tuple[int, int]:
        while True:
            ev = await asyncio.wait_for(watch.read(), 10)
            if ev.WhichOneof("event") == "progress":
                return ev.progress.step, ev.progress.total_steps

    for m, shard in ((a, shard_a), (b, shard_b)):
        m.send(accepted=miner_pb2.JobAccepted(job_id=shard.job_id))
    a.send(progress=job_pb2.JobProgress(job_id=shard_a.job_id, step=1, total_steps=4))
    assert await next_progress() == (1, 8)
    b.send(progress=job_pb2.JobProgress(job_id=shard_b.job_id, step=2, total_steps=4))
    assert await next_progress() == (3, 8)
    pngs = [null_png("two pairs", shard_a.params.image.seed + k, 64, 64) for k in range(2)]
    for k, png in enumerate(pngs):
        a.send(chunk=miner_pb2.ArtifactChunk(job_id=shard_a.job_id, index=k, data=png))
    a.send(result=a.result_for(shard_a, pngs))
    assert (await a.read()).WhichOneof("msg") == "accepted"
    b.send(progress=job_pb2.JobProgress(job_id=shard_b.job_id, step=3, total_steps=4))
    assert await next_progress() == (4 + 3, 8)  # the finished shard counts all its steps
    watch.cancel()


async def test_a_failed_shard_is_requeued_alone(net, null_backend) -> None:
    flaky = RawMiner(net)
    await flaky.connect(models=("null",), price_per_unit=0)
    honest = await net.add_miner({"null": null_backend}, price=0)
    s = stub(net)
    job = (await s.SubmitJob(image_job("two boats", model="null", images=2, seed=7, width=64, height=64), metadata=MD)).job
    assert len(job.shard_job_ids) == 2
    msg = await flaky.read()  # the flaky miner holds one shard and fails it
    shard_id = msg.assignment.task.job_id
    flaky.send(failed=miner_pb2.JobFailed(job_id=shard_id, reason="CUDA error: an illegal memory access"))
    flaky.outbox.put_nowait(None)  # and leaves
    done = await wait_done(s, job.job_id)
    assert done.state == S.JOB_STATE_COMPLETED
    shards = {j: net.core.store.get_job(j) for j in done.shard_job_ids}
    assert shards[shard_id].attempts >= 2 and shards[shard_id].miner_id == honest.key.address
    other = next(sh for j, sh in shards.items() if j != shard_id)
    assert other.attempts == 1  # the healthy shard ran once
    for i in range(2):
        _, data = await fetch(s, job.job_id, i)
        assert data == null_png("two boats", 7 + i, 64, 64)


async def test_cancelling_a_split_job_cancels_its_shards(net, tiny_backend) -> None:
    await net.add_miner({"tiny-sd": tiny_backend})
    await net.add_miner({"tiny-sd": tiny_backend})
    s = stub(net)
    job = (await s.SubmitJob(image_job("slow", images=2, steps=150, seed=1), metadata=MD)).job
    assert len(job.shard_job_ids) == 2
    await net.until(lambda: all(net.core.store.get_job(j).state == S.JOB_STATE_RUNNING for j in job.shard_job_ids))
    done = (await s.CancelJob(coordinator_pb2.CancelJobRequest(job_id=job.job_id), metadata=MD)).job
    assert done.state == S.JOB_STATE_CANCELLED
    assert all(net.core.store.get_job(j).state == S.JOB_STATE_CANCELLED for j in job.shard_job_ids)
    await net.until(lambda: all(not m.running for m in net.miners), timeout=20)


async def test_eight_images_on_three_tiny_miners_one_killed_midway_completes(net, tiny_backend) -> None:
    from aitbc.miner.backend import ImageRequest

    miners = [await net.add_miner({"tiny-sd": tiny_backend}) for _ in range(3)]
    s = stub(net)
    job = (await s.SubmitJob(image_job("a harbour at dawn", images=8, steps=3, seed=9), metadata=MD)).job
    assert len(job.shard_job_ids) == 3
    await net.until(lambda: all(m.running for m in miners), timeout=30)
    victim = miners[0]
    victim.stop()  # its stream ends mid-shard: only that shard goes back to the queue
    done = await wait_done(s, job.job_id)
    assert done.state == S.JOB_STATE_COMPLETED and len(done.artifacts) == 8
    shards = [net.core.store.get_job(j) for j in done.shard_job_ids]
    assert sorted(sh.attempts for sh in shards) == [1, 1, 2]
    assert victim.key.address not in {sh.miner_id for sh in shards}
    # each shard's images are exactly what that shard makes on its own (image i uses seed + i), in order;
    # against one batch of 8 they differ only by float rounding (batch size changes CPU kernels)
    from aitbc.hub.verification import pixel_distance

    whole = tiny_backend.generate(ImageRequest("a harbour at dawn", "", 3, 7.5, 0, 0, 8, 9), lambda *_: None,
                                  __import__("threading").Event())
    for sh in shards:
        alone = tiny_backend.generate(ImageRequest("a harbour at dawn", "", 3, 7.5, 0, 0, sh.params.image.images,
                                                   9 + sh.first_image), lambda *_: None, __import__("threading").Event())
        for k, png in enumerate(alone.pngs):
            _, data = await fetch(s, job.job_id, sh.first_image + k)
            assert data == png
            assert pixel_distance(data, whole.pngs[sh.first_image + k]) < 0.01


async def test_a_verification_interrupted_by_a_crash_is_decided_after_restart(network_factory, null_backend) -> None:
    net = await network_factory(verify_rate=1.0)
    await net.add_miner({"null": null_backend})
    await net.add_miner({"null": null_backend})
    net.core.verifier.run_ended = lambda v: None  # the process "dies" right after storing the re-execution
    s = stub(net)
    job = await wait_done(s, (await s.SubmitJob(image_job(model="null", seed=4), metadata=MD)).job.job_id)
    await net.until(lambda: all(net.core.store.get_job(v).state == S.JOB_STATE_COMPLETED
                                for v in net.core.store.get_job(job.job_id).verification_job_ids or ["-"])
                    if net.core.store.get_job(job.job_id).verification_job_ids else False)
    assert net.core.store.get_job(job.job_id).verification == V.VERIFICATION_STATE_PENDING
    assert len(net.core.store.held_receipts()) == 2  # both MINTs wait
    await net.restart_coordinator()  # reconciliation at start-up decides
    assert net.core.store.get_job(job.job_id).verification == V.VERIFICATION_STATE_PASSED
    assert not net.core.store.held_receipts()


async def test_a_split_job_whose_last_shard_ended_in_a_crash_completes_after_restart(net, null_backend) -> None:
    for _ in range(2):
        await net.add_miner({"null": null_backend})
    s = stub(net)
    job = (await s.SubmitJob(image_job("two", model="null", images=2, seed=3, width=64, height=64), metadata=MD)).job
    await net.until(lambda: net.core.store.get_job(job.job_id).state == S.JOB_STATE_COMPLETED)
    # the last shard and the split job are written in one transaction now; a store written by a
    # coordinator killed between the two (older versions wrote them apart) must still finish
    await net.stop_coordinator()
    from aitbc.coordinator.store import LmdbJobStore

    store = LmdbJobStore(net.tmp / "coordinator" / "jobs")
    parent = store.get_job(job.job_id)
    parent.state, parent.miner_id, parent.finished_at_unix_ms = S.JOB_STATE_RUNNING, "", 0
    del parent.artifacts[:]
    store.write([parent])
    store.close()
    await net.start_coordinator()
    done = net.core.store.get_job(job.job_id)
    assert done.state == S.JOB_STATE_COMPLETED and len(done.artifacts) == 2
