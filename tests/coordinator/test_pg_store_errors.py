"""A coordinator on PostgreSQL whose database connection is cut under an RPC: the call is UNAVAILABLE
(never UNKNOWN), naming the database without its password; nothing is half written, and a retry
with the same request id gives one job."""

from __future__ import annotations

from typing import Any

import grpc
import psycopg
import pytest

from aitbc.coordinator import pgstore
from aitbc.v1 import coordinator_pb2, coordinator_pb2_grpc, job_pb2
from tests.conftest import API_KEY

MD = (("x-api-key", API_KEY),)
S = job_pb2.JobState


def null_job(request_id: str = "") -> coordinator_pb2.SubmitJobRequest:
    return coordinator_pb2.SubmitJobRequest(model="null", request_id=request_id, params=job_pb2.JobParams(
        image=job_pb2.ImageParams(prompt="cut", steps=1, width=64, height=64, seed=1)))


def cut_the_next_job_write(pg_url: str) -> None:
    """The next INSERT or UPDATE of a job row ends its own connection, half way through the store's
    write (the sequence is not transactional: it fires once)."""
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute("CREATE SEQUENCE IF NOT EXISTS cuts")
        admin.execute("CREATE OR REPLACE FUNCTION cut() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                      "IF nextval('cuts') = 1 THEN PERFORM pg_terminate_backend(pg_backend_pid()); END IF; "
                      "RETURN NEW; END $$")
        admin.execute("CREATE TRIGGER cut BEFORE INSERT OR UPDATE ON jobs FOR EACH ROW EXECUTE FUNCTION cut()")


def cut_the_coordinators_connection(pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = "
                      "'aitbc-coordinator' AND datname = current_database()")


async def unavailable(call: Any, pg_url: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    password = psycopg.conninfo.conninfo_to_dict(pg_url)["password"]
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
    details = err.value.details() or ""
    assert details.startswith(f"the coordinator's database at {pgstore.display_url(pg_url)} ") and "retry" in details
    assert password not in details
    return details


async def test_a_submit_whose_write_loses_the_database_is_unavailable_and_its_retry_gives_one_job(
        network_factory: Any, pg_url: str, null_backend: Any) -> None:
    net = await network_factory(database_url=pg_url)
    await net.add_miner({"null": null_backend})
    await net.until(lambda: net.core.miners)
    async with grpc.aio.insecure_channel(net.address, options=[("grpc.enable_retries", 0)]) as ch:  # as sent
        s = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
        cut_the_next_job_write(pg_url)
        await unavailable(s.SubmitJob(null_job("once"), metadata=MD), pg_url)
        assert not net.core.machine.records  # nothing kept that the database does not have
        job = (await s.SubmitJob(null_job("once"), metadata=MD)).job  # the client's retry reconnects
        again = (await s.SubmitJob(null_job("once"), metadata=MD)).job
        assert again.job_id == job.job_id
        with psycopg.connect(pg_url, autocommit=True) as admin:
            assert admin.execute("SELECT job_id FROM jobs").fetchall() == [(job.job_id,)]
            assert admin.execute("SELECT job_id FROM requests").fetchall() == [(job.job_id,)]


async def test_a_cancel_that_loses_the_database_is_unavailable_and_its_retry_cancels(
        network_factory: Any, pg_url: str) -> None:
    net = await network_factory(database_url=pg_url, model_grace_s=600)
    net.core.registry._model_seen["null"] = (net.core.clock(), 1, 0)  # served a moment ago: no miner needed
    async with grpc.aio.insecure_channel(net.address, options=[("grpc.enable_retries", 0)]) as ch:
        s = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
        job = (await s.SubmitJob(null_job(), metadata=MD)).job
        cut_the_coordinators_connection(pg_url)
        details = await unavailable(s.CancelJob(coordinator_pb2.CancelJobRequest(job_id=job.job_id), metadata=MD),
                                    pg_url)
        assert "did not answer" in details
        held = net.core.machine.job(job.job_id)
        assert held is None or held.state == S.JOB_STATE_QUEUED, held  # never cancelled in memory only
        assert net.core.store.get_job(job.job_id).state == S.JOB_STATE_QUEUED
        done = (await s.CancelJob(coordinator_pb2.CancelJobRequest(job_id=job.job_id), metadata=MD)).job
        assert done.state == S.JOB_STATE_CANCELLED
        assert net.core.store.get_job(job.job_id).state == S.JOB_STATE_CANCELLED
