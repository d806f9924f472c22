"""The client-facing reads of a shared PostgreSQL store are awaited (aitbc/coordinator/pgreads.py):
a database that is slow to answer one of them does not stall the coordinator's other calls. Real
coordinators on one real database, a real miner; the database is stalled for reads by a lock that
a second session holds and the read waits for in the server."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import psycopg

from aitbc.v1 import coordinator_pb2, coordinator_pb2_grpc, job_pb2
from tests.coordinator.test_jobs_api import MD, image_job, stub
from tests.coordinator.test_pg_shared import Gated, pair, until_state

S = job_pb2.JobState
STALL_LOCK = 0x61697462_7374  # an advisory lock of the test's own


async def running_elsewhere(network_factory: Any, pg_url: str, tmp_path: Path) -> tuple[Any, Any, Gated, str]:
    """Coordinators A (no miner) and B (a miner in the middle of the job): a job A reads from the database."""
    a, b = await pair(network_factory, pg_url, tmp_path)
    gated = Gated()
    await b.add_miner({"null": gated})
    await a.until(lambda: "null" in a.core.served_models())
    job_id = (await stub(a).SubmitJob(image_job(model="null", seed=1, steps=2), metadata=MD)).job.job_id
    await until_state(stub(a), job_id, S.JOB_STATE_RUNNING)
    assert a.core.machine.job(job_id) is None  # B runs it: A answers from the database
    return a, b, gated, job_id


async def test_a_getjob_waiting_for_the_database_does_not_hold_up_submitjob_or_other_calls(
        network_factory: Any, pg_url: str, tmp_path: Path) -> None:
    a, _, gated, job_id = await running_elsewhere(network_factory, pg_url, tmp_path)
    entered = asyncio.Event()

    async def stall(conn: psycopg.AsyncConnection[Any]) -> None:  # the read waits in the server for the lock
        entered.set()
        await conn.execute("SELECT pg_advisory_lock_shared(%s)", (STALL_LOCK,))
        await conn.execute("SELECT pg_advisory_unlock_shared(%s)", (STALL_LOCK,))

    done: list[str] = []

    async def get_job() -> job_pb2.Job:
        got = (await stub(a).GetJob(coordinator_pb2.GetJobRequest(job_id=job_id), metadata=MD)).job
        done.append("GetJob")
        return got

    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute("SELECT pg_advisory_lock(%s)", (STALL_LOCK,))
        a.core.store._reads.before_read = stall
        reading = asyncio.create_task(get_job())
        await asyncio.wait_for(entered.wait(), 30)  # GetJob is waiting for the database now
        sub = (await stub(a).SubmitJob(image_job(model="null", seed=2, steps=2), metadata=MD)).job
        done.append("SubmitJob")
        models = (await stub(a).ListModels(coordinator_pb2.ListModelsRequest(), metadata=MD)).models
        done.append("ListModels")
        assert sub.state == S.JOB_STATE_QUEUED and [m.name for m in models] == []  # (A has no miner of its own)
        assert not reading.done()
        admin.execute("SELECT pg_advisory_unlock(%s)", (STALL_LOCK,))
        got = await asyncio.wait_for(reading, 30)
    a.core.store._reads.before_read = None
    assert done == ["SubmitJob", "ListModels", "GetJob"]
    assert got.job_id == job_id and got.state == S.JOB_STATE_RUNNING
    gated.release.set()


async def test_a_read_whose_database_connection_dropped_is_unavailable_and_the_next_one_answers(
        network_factory: Any, pg_url: str, tmp_path: Path) -> None:
    a, _, gated, job_id = await running_elsewhere(network_factory, pg_url, tmp_path)
    with psycopg.connect(pg_url, autocommit=True) as admin:  # every connection of the reads' pool ends
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = "
                      "'aitbc-coordinator-reads' AND datname = current_database()")
    async with grpc.aio.insecure_channel(a.address, options=[("grpc.enable_retries", 0)]) as ch:  # the answer as sent
        try:
            await coordinator_pb2_grpc.CoordinatorServiceStub(ch).GetJob(
                coordinator_pb2.GetJobRequest(job_id=job_id), metadata=MD)
            raise AssertionError("GetJob answered on a dropped connection")
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err
            assert "the coordinator's database at postgresql://" in (err.details() or "") and \
                "retry" in (err.details() or "")
    got = (await stub(a).GetJob(coordinator_pb2.GetJobRequest(job_id=job_id), metadata=MD)).job
    assert got.state == S.JOB_STATE_RUNNING
    gated.release.set()
