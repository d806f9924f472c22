"""The coordinator on PostgreSQL (`database_url`): a real server, a real coordinator, real miners."""

from __future__ import annotations

import hashlib

import pytest

from aitbc import jobs
from aitbc.config import CoordinatorConfig
from aitbc.coordinator.pgstore import PostgresJobStore
from aitbc.errors import FailedPrecondition
from aitbc.pgserver import free_port
from aitbc.server.coordinator import start_coordinator
from aitbc.v1 import coordinator_pb2, coordinator_pb2_grpc, job_pb2
from tests.conftest import API_KEY

MD = (("x-api-key", API_KEY),)
S = job_pb2.JobState


def null_job(seed: int) -> coordinator_pb2.SubmitJobRequest:
    return coordinator_pb2.SubmitJobRequest(model="null", params=job_pb2.JobParams(
        image=job_pb2.ImageParams(prompt="on postgres", steps=1, width=64, height=64, seed=seed)))


async def wait_done(s: coordinator_pb2_grpc.CoordinatorServiceStub, job_id: str) -> job_pb2.Job:
    job = None
    async for ev in s.WatchJob(coordinator_pb2.WatchJobRequest(job_id=job_id), metadata=MD, timeout=60):
        if ev.WhichOneof("event") == "job":
            job = ev.job
    assert job is not None and job.state in jobs.TERMINAL
    return job


async def fetch(s: coordinator_pb2_grpc.CoordinatorServiceStub, job_id: str) -> tuple[job_pb2.Artifact, bytes]:
    art, parts = None, []
    async for chunk in s.GetJobResult(coordinator_pb2.GetJobResultRequest(job_id=job_id), metadata=MD):
        if chunk.HasField("artifact"):
            art = chunk.artifact
        parts.append(chunk.data)
    assert art is not None
    return art, b"".join(parts)


async def test_jobs_receipts_and_results_survive_a_restart_on_postgres(network_factory, pg_url, null_backend) -> None:
    net = await network_factory(database_url=pg_url)
    assert isinstance(net.core.store, PostgresJobStore)
    miner = await net.add_miner({"null": null_backend})
    s = coordinator_pb2_grpc.CoordinatorServiceStub(net.channel())
    done = [await wait_done(s, (await s.SubmitJob(null_job(n), metadata=MD)).job.job_id) for n in range(3)]
    assert all(j.state == S.JOB_STATE_COMPLETED for j in done), [j.error for j in done]
    # the miner goes away; a job submitted now waits in the queue, in the database
    miner.stop()
    await net.until(lambda: not net.core.miners)
    waiting = (await s.SubmitJob(null_job(99), metadata=MD)).job
    assert waiting.state == S.JOB_STATE_QUEUED

    await net.restart_coordinator()  # the same database_url: a new process state, the same rows
    assert not (net.tmp / "coordinator" / "jobs").exists()  # nothing went to LMDB
    s = coordinator_pb2_grpc.CoordinatorServiceStub(net.channel())
    got = (await s.GetJob(coordinator_pb2.GetJobRequest(job_id=waiting.job_id), metadata=MD)).job
    assert got.state == S.JOB_STATE_QUEUED
    await net.add_miner({"null": null_backend})
    finished = await wait_done(s, waiting.job_id)
    assert finished.state == S.JOB_STATE_COMPLETED, finished.error

    await net.restart_coordinator()
    s = coordinator_pb2_grpc.CoordinatorServiceStub(net.channel())
    for job in [*done, finished]:
        again = (await s.GetJob(coordinator_pb2.GetJobRequest(job_id=job.job_id), metadata=MD)).job
        assert again.state == S.JOB_STATE_COMPLETED and again.receipt_hash == job.receipt_hash
        rec = (await s.GetReceipt(coordinator_pb2.GetReceiptRequest(job_id=job.job_id), metadata=MD)).receipt
        assert rec.receipt_hash == job.receipt_hash and rec.body.job_id == job.job_id
        art, data = await fetch(s, job.job_id)
        assert hashlib.sha256(data).hexdigest() == art.sha256 == job.artifacts[0].sha256
    listed = (await s.ListReceipts(coordinator_pb2.ListReceiptsRequest(page_size=10), metadata=MD)).receipts
    assert sorted(r.receipt_hash for r in listed) == sorted(j.receipt_hash for j in [*done, finished])


def config(tmp_path, url: str) -> CoordinatorConfig:
    return CoordinatorConfig(listen="127.0.0.1:0", data_dir=str(tmp_path / "c"), key_file=str(tmp_path / "c.key"),
                             database_url=url)


async def test_an_unreachable_database_refuses_the_start_naming_the_setting(tmp_path) -> None:
    url = f"postgresql://aitbc:s3cret-pw@127.0.0.1:{free_port()}/aitbc"  # nothing listens there
    with pytest.raises(FailedPrecondition) as err:
        await start_coordinator(config(tmp_path, url))
    msg = err.value.message
    assert "'database_url'" in msg and "cannot reach the database" in msg and "s3cret-pw" not in msg
    assert f"postgresql://aitbc@127.0.0.1:{url.rsplit(':', 1)[1].split('/')[0]}/aitbc" in msg


async def test_a_missing_database_refuses_the_start_naming_the_setting(tmp_path, postgres) -> None:
    with pytest.raises(FailedPrecondition) as err:
        await start_coordinator(config(tmp_path, postgres.url("no_such_db")))
    assert "'database_url'" in err.value.message and "no_such_db" in err.value.message
