"""Uploads and artifacts on disk, over real gRPC with hand-written miners (issue 13, attack 6):

- an upload streams to a 0600 file in a 0700 folder under the data dir; one that never finishes
  is deleted when its job leaves the miner (the miner leaves, the job is taken back after a stall,
  the client cancels) and partial files left by a crash are deleted at start-up;
- a miner over its own bytes-in-flight limit is refused with a reason naming the setting, and the
  job completes on an honest miner;
- artifact bytes are garbage-collected after artifact_retention_s (the coordinator's injected
  clock, no sleeps): the job keeps its hashes and receipt, the download says it expired; bytes a
  held receipt's verification still needs are kept until it decides.
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import grpc
import pytest

from aitbc import jobs
from aitbc.coordinator.clock import FakeClock
from aitbc.miner.backend import null_png
from aitbc.v1 import coordinator_pb2, job_pb2, miner_pb2, receipt_pb2
from tests.coordinator.test_jobs_api import MD, stub, wait_done
from tests.coordinator.test_miner_gateway import RawMiner
from tests.security.test_economics import image_req

pytestmark = pytest.mark.timeout(90)
S = job_pb2.JobState
V = job_pb2.VerificationState


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def uploads_dir(net: Any) -> Path:
    return net.tmp / "coordinator" / "uploads"


async def holding(net: Any, m: RawMiner, **req: Any) -> miner_pb2.Task:
    """Submit a job, let `m` take it and upload the first 4 KiB of an image for it."""
    await stub(net).SubmitJob(image_req(**req), metadata=MD)
    task = (await m.read()).assignment.task
    m.send(accepted=miner_pb2.JobAccepted(job_id=task.job_id))
    m.send(chunk=miner_pb2.ArtifactChunk(job_id=task.job_id, index=0, data=b"\x89" * 4096))
    await net.until(lambda: net.core.uploads.total == 4096)
    return task


@pytest.mark.parametrize("how", ["miner leaves", "stalled", "cancelled"])
async def test_an_upload_that_never_finishes_leaves_no_file_once_the_job_left_the_miner(
        network_factory: Any, how: str) -> None:
    clock = FakeClock()
    net = await network_factory(upload_spool_bytes=0, clock=clock, heartbeat_timeout_s=10_000, stall_timeout_s=30)
    m = RawMiner(net)
    await m.connect()
    task = await holding(net, m, seed=1)
    [part] = net.core.uploads.files(task.job_id)
    assert part.parent == uploads_dir(net) and part.stat().st_size == 4096
    assert mode(part) == 0o600 and mode(uploads_dir(net)) == 0o700 and mode(net.tmp / "coordinator") == 0o700
    if how == "miner leaves":
        m.outbox.put_nowait(None)
    elif how == "stalled":
        clock.advance(31)  # no word on the job for longer than stall_timeout_s: housekeeping takes it back
    else:
        await stub(net).CancelJob(coordinator_pb2.CancelJobRequest(job_id=task.job_id), metadata=MD)
    await net.until(lambda: not part.exists())
    job = net.core.store.get_job(task.job_id)
    if how == "cancelled":
        assert job.state == S.JOB_STATE_CANCELLED
    else:  # requeued (and, stalled, possibly sent again to the only miner there is: a new attempt)
        assert job.state in jobs.ACTIVE and any(t.to_state == S.JOB_STATE_QUEUED and t.from_state in (
            S.JOB_STATE_ASSIGNED, S.JOB_STATE_RUNNING) for t in job.story)
    assert net.core.uploads.total == 0 and not list(uploads_dir(net).iterdir())


async def test_partial_uploads_left_by_a_crash_are_deleted_at_start_up(network_factory: Any) -> None:
    net = await network_factory(upload_spool_bytes=0)
    m = RawMiner(net)
    await m.connect()
    task = await holding(net, m, seed=2)
    [part] = net.core.uploads.files(task.job_id)
    saved = part.read_bytes()
    await net.stop_coordinator()  # a clean stop deletes it; kill -9 would leave it behind:
    part.write_bytes(saved)
    assert part.exists()
    await net.start_coordinator()
    assert not part.exists() and not list(uploads_dir(net).iterdir())
    assert net.core.store.get_job(task.job_id).state == S.JOB_STATE_QUEUED  # the job itself is not lost


async def test_a_miner_over_its_bytes_in_flight_is_refused_and_the_job_completes_on_an_honest_miner(
        network_factory: Any, null_backend: Any) -> None:
    net = await network_factory(upload_spool_bytes=0, max_artifact_bytes=1_000_000, max_upload_bytes_per_miner=1_000_000)
    hoarder = RawMiner(net)
    await hoarder.connect(max_concurrency=2)
    s = stub(net)
    ids = [(await s.SubmitJob(image_req(seed=10 + i), metadata=MD)).job.job_id for i in range(2)]
    tasks = [(await hoarder.read()).assignment.task for _ in range(2)]
    hoarder.send(chunk=miner_pb2.ArtifactChunk(job_id=tasks[0].job_id, index=0, data=b"\0" * 600_000))
    hoarder.send(chunk=miner_pb2.ArtifactChunk(job_id=tasks[1].job_id, index=0, data=b"\0" * 600_000))
    reply = await hoarder.read()  # each job is within max_artifact_bytes; the two together are not
    assert reply.WhichOneof("msg") == "rejected" and reply.rejected.job_id == tasks[1].job_id
    assert "this miner's uploads in flight exceed 1000000 bytes (max_upload_bytes_per_miner)" in reply.rejected.reason
    refused = net.core.machine.job(tasks[1].job_id)
    assert refused.state == S.JOB_STATE_QUEUED and "max_upload_bytes_per_miner" in refused.wait_reason
    assert net.core.uploads.miner_bytes(hoarder.key.address) == 600_000  # the refused chunk was not kept
    honest = await net.add_miner({"null": null_backend})
    done = await wait_done(s, tasks[1].job_id)
    assert done.state == S.JOB_STATE_COMPLETED and done.miner_id == honest.key.address
    hoarder.outbox.put_nowait(None)  # the hoarder leaves: its other job is not lost either
    assert [(await wait_done(s, j)).state for j in ids] == [S.JOB_STATE_COMPLETED] * 2
    assert net.core.uploads.total == 0 and not list(uploads_dir(net).iterdir())


async def download_status(net: Any, job_id: str) -> tuple[grpc.StatusCode, str, bytes]:
    data = b""
    try:
        async for part in stub(net).GetJobResult(coordinator_pb2.GetJobResultRequest(job_id=job_id), metadata=MD):
            data += part.data
    except grpc.aio.AioRpcError as err:
        return err.code(), err.details() or "", data
    return grpc.StatusCode.OK, "", data


async def test_expired_artifacts_are_collected_and_the_job_keeps_its_hashes_and_receipt(network_factory: Any) -> None:
    clock = FakeClock()
    net = await network_factory(upload_spool_bytes=0, clock=clock, artifact_retention_s=600, verify_rate=1.0, verify_timeout_s=100_000,
                                heartbeat_timeout_s=100_000, stall_timeout_s=100_000)
    first, second = RawMiner(net), RawMiner(net)
    await first.connect()
    s = stub(net)
    job = (await s.SubmitJob(image_req(seed=3), metadata=MD)).job
    task = (await first.read()).assignment.task
    png = null_png("a red bicycle", 3, 64, 64)
    first.send(chunk=miner_pb2.ArtifactChunk(job_id=task.job_id, index=0, data=png))
    first.send(result=first.result_for(task, png))
    assert (await first.read()).WhichOneof("msg") == "accepted"
    done = net.core.store.get_job(job.job_id)
    art = done.artifacts[0]
    assert art.expires_at_unix_ms == clock.now_ms() + 600_000
    stored = net.tmp / "coordinator" / "artifacts" / art.sha256[:2] / art.sha256
    assert stored.read_bytes() == png and mode(stored) == 0o600
    assert mode(stored.parent) == 0o700 and mode(stored.parent.parent) == 0o700
    assert not list(uploads_dir(net).iterdir())  # the upload file was moved in, not copied

    # past the retention, while the receipt waits for its verification: the bytes it compares stay
    clock.advance(601)
    net.core.collect_artifacts()
    assert net.core.receipts.get(done.receipt_hash).settlement.state == receipt_pb2.SETTLEMENT_STATE_HELD
    assert stored.exists() and (await download_status(net, job.job_id))[2] == png

    await second.connect()  # the re-execution: the same bytes, so verification passes
    rerun = (await second.read()).assignment.task
    assert rerun.job_id == done.verification_job_ids[0]
    second.send(chunk=miner_pb2.ArtifactChunk(job_id=rerun.job_id, index=0, data=png))
    second.send(result=second.result_for(rerun, png))
    assert (await second.read()).WhichOneof("msg") == "accepted"
    verified = net.core.store.get_job(job.job_id)
    assert verified.verification == V.VERIFICATION_STATE_PASSED
    assert net.core.receipts.get(done.receipt_hash).settlement.state != receipt_pb2.SETTLEMENT_STATE_HELD
    # the same bytes, completed again now: kept until the later expiry, not the first job's
    clock.advance(300)
    net.core.collect_artifacts()
    assert stored.exists()

    clock.advance(301)  # past the re-execution's retention too: the periodic pass deletes the bytes
    await net.until(lambda: not stored.exists())
    got = (await s.GetJob(coordinator_pb2.GetJobRequest(job_id=job.job_id), metadata=MD)).job
    assert got.state == S.JOB_STATE_COMPLETED and got.artifacts[0].sha256 == art.sha256
    assert got.artifacts[0].size == len(png) and got.artifacts[0].expires_at_unix_ms == art.expires_at_unix_ms
    assert got.receipt_hash == done.receipt_hash and got.receipt.receipt_hash == done.receipt_hash
    assert got.receipt.body.artifact_sha256  # the receipt still names what was served
    rec = await s.GetReceipt(coordinator_pb2.GetReceiptRequest(job_id=job.job_id), metadata=MD)
    assert rec.receipt.receipt_hash == done.receipt_hash
    code, details, _ = await download_status(net, job.job_id)
    assert code == grpc.StatusCode.NOT_FOUND
    assert "expired at" in details and "artifact_retention_s = 600" in details and art.sha256 in details
    assert net.core.store.expired_artifacts(clock.now_ms() + 10**9, 10) == []


def test_small_outputs_stay_in_memory_within_the_spool_budget_and_big_ones_go_to_files(tmp_path: Any) -> None:
    """An output up to upload_spool_bytes needs no upload file (the common small PNG or text), as
    long as all such outputs together stay within the spool budget; past either, bytes go to the
    file, the ones held so far first, so nothing is lost and memory stays bounded."""
    from aitbc.coordinator.uploads import Uploads

    ups = Uploads(tmp_path / "up", max_job_bytes=10_000, max_miner_bytes=100_000, max_total_bytes=100_000,
                  spool_bytes=1_000, spool_total=1_500)
    ups.append("m1", "j1", 0, b"a" * 600)
    ups.append("m1", "j1", 0, b"b" * 300)  # 900 bytes: in memory, no file
    assert ups.files("j1") == [] and ups.spooled == 900
    ups.append("m1", "j2", 0, b"c" * 700)  # would pass the 1,500-byte budget: a file from the start
    assert len(ups.files("j2")) == 1 and ups.spooled == 900
    ups.append("m1", "j1", 0, b"d" * 200)  # passes 1,000 for this output: what it held goes to its file
    [f] = ups.files("j1")
    assert f.read_bytes() == b"a" * 600 + b"b" * 300 + b"d" * 200 and ups.spooled == 0
    ups.append("m1", "j3", 0, b"e" * 10)
    [small] = ups.take("j3").values()
    assert small.content() == b"e" * 10 and ups.spooled == 0  # handed over as bytes
    [big] = ups.take("j1").values()
    assert big.content() == f and big.read() == f.read_bytes()
