"""Miner-session ownership and the pool-wide max_active_jobs on coordinators sharing one PostgreSQL
database (docs/scaling.md, "Miner-session ownership"): a real server, real coordinators, miners
driven by hand over real gRPC (RawMiner) and real miner daemons."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest

from aitbc import crypto
from aitbc.config import ClientKey, MinerConfig
from aitbc.coordinator.pgstore import PostgresJobStore
from aitbc.miner.backend import null_png
from aitbc.miner.daemon import MinerDaemon
from aitbc.v1 import coordinator_pb2, job_pb2, miner_pb2
from tests.conftest import API_KEY, OPERATOR_KEY, OTHER_KEY
from tests.coordinator.test_jobs_api import MD, image_job, stub, wait_done
from tests.coordinator.test_market import market
from tests.coordinator.test_miner_gateway import RawMiner
from tests.coordinator.test_pg_shared import pair

S = job_pb2.JobState
SLOW_BEAT = dict(heartbeat_interval_s=30.0, heartbeat_timeout_s=60.0)  # no renewal during the test: the doorbell acts


def table(pg_url: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(pg_url) as conn:
        return conn.execute(sql).fetchall()


async def assignment(miner: RawMiner) -> miner_pb2.Task:
    while True:
        msg = await miner.read()
        if msg.WhichOneof("msg") == "assignment":
            miner.send(accepted=miner_pb2.JobAccepted(job_id=msg.assignment.task.job_id))
            return msg.assignment.task


async def ended_with(miner: RawMiner) -> grpc.aio.AioRpcError:
    """Read the miner's stream until the coordinator ends it; the status it ended with."""
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        while True:
            await miner.read()
    return exc.value


def finish(miner: RawMiner, task: miner_pb2.Task) -> None:
    png = null_png("a red bicycle", 1, 64, 64)
    miner.send(chunk=miner_pb2.ArtifactChunk(job_id=task.job_id, index=0, data=png))
    miner.send(result=miner.result_for(task, png))


async def listed(net: Any) -> list[coordinator_pb2.MinerStatus]:
    got = await stub(net).ListMiners(coordinator_pb2.ListMinersRequest(), metadata=MD)
    return [m for m in got.miners if m.connected]


async def takeover(a: Any, b: Any) -> None:
    """One miner key on A with a job, then on B: A ends its first stream (ABORTED), its job is
    requeued and completes once on B, and ListMiners on both shows the miner once, on B."""
    key = crypto.PrivateKey.generate()
    first = RawMiner(a, key)
    await first.connect()
    await a.until(lambda: key.address in a.core.miners)
    job = (await stub(a).SubmitJob(image_job(model="null", seed=1, width=64, height=64), metadata=MD)).job
    task = await assignment(first)
    assert task.job_id == job.job_id and task.attempt == 1
    assert [(m.miner_id, m.coordinator) for m in await listed(b)] == [(key.address, a.core.store.coordinator_id)]

    second = RawMiner(b, key)
    await second.connect()
    err = await ended_with(first)
    assert err.code() == grpc.StatusCode.ABORTED, err
    assert f"miner {key.address} opened a newer Work stream on another coordinator" in err.details()
    assert key.address not in a.core.miners

    again = await assignment(second)  # requeued by A, given back to the shared queue, claimed by B
    assert again.job_id == job.job_id and again.attempt == 2
    finish(second, again)
    done = await wait_done(stub(a), job.job_id)
    assert done.state == S.JOB_STATE_COMPLETED and done.miner_id == key.address, done.error
    assert [t.cause for t in done.story if t.to_state == S.JOB_STATE_QUEUED][-1] == (
        f"miner {key.address} lost: connected to another coordinator")
    assert [r.body.job_id for r in b.core.store.iter_receipts()] == [job.job_id]  # completed once
    for net in (a, b):
        shown = await listed(net)
        assert [(m.miner_id, m.coordinator, list(m.models)) for m in shown] == [
            (key.address, b.core.store.coordinator_id, ["null"])]
    assert table(a.core.store.url, "SELECT coordinator, epoch FROM miner_sessions") == [(b.core.store.coordinator_id, 2)]
    offers = (await market(a).GetMarket(coordinator_pb2.GetMarketRequest())).offers  # A's market: B's miner
    assert [(o.miner_id, list(o.models), o.max_concurrency) for o in offers] == [(key.address, ["null"], 1)]
    mine = await market(a).GetMarket(coordinator_pb2.GetMarketRequest(miner_id=key.address))
    assert mine.miner.connected  # (its reputation figures are A's: shared with the reputation rows, schema 0004)
    second.outbox.put_nowait(None)  # the miner closes its stream on B: its row goes
    await b.until(lambda: key.address not in b.core.miners)
    assert table(a.core.store.url, "SELECT count(*) FROM miner_sessions") == [(0,)]


async def test_a_miner_key_connecting_to_b_leaves_a_and_its_job_completes_once_on_b(
        network_factory: Any, pg_url: str, tmp_path: Path) -> None:
    a, b = await pair(network_factory, pg_url, tmp_path, **SLOW_BEAT)  # the notification ends A's stream:
    await a.until(lambda: a.core._renewed_at > 0)  # A renewed at its first tick, its next renewal is 30 s away
    await takeover(a, b)


async def test_without_the_doorbell_the_owners_next_lease_renewal_ends_the_old_stream(
        network_factory: Any, pg_url: str, tmp_path: Path) -> None:
    a, b = await pair(network_factory, pg_url, tmp_path)
    a.core.store.stop_listening()  # a notification lost: the renewal (every heartbeat interval) finds it
    await takeover(a, b)


async def test_a_miner_daemon_replaced_by_another_process_with_its_key_stops_serving_and_does_not_take_it_back(
        network_factory: Any, pg_url: str, tmp_path: Path, null_backend: Any) -> None:
    a, b = await pair(network_factory, pg_url, tmp_path)
    key = crypto.PrivateKey.generate()
    old = MinerDaemon(MinerConfig(coordinator=[a.address, b.address], models=["null"], reconnect_max_s=0.5), key,
                      {"null": null_backend})  # it could fail over to B, and take the key back there
    a.miners.append(old)
    a.tasks.append(asyncio.create_task(old.run()))
    await a.until(lambda: key.address in a.core.miners)
    new = await b.add_miner({"null": null_backend}, key=key)
    await a.until(lambda: bool(old.replaced))
    assert "opened a newer Work stream on another coordinator" in old.replaced
    for _ in range(6):  # three heartbeat intervals: the old one stays out, the new one stays connected
        await asyncio.sleep(0.25)
        assert table(pg_url, "SELECT coordinator, epoch FROM miner_sessions") == [(b.core.store.coordinator_id, 2)]
        assert new.connected and not old.connected and key.address in b.core.miners
    job = (await stub(a).SubmitJob(image_job(model="null", seed=2, steps=2), metadata=MD)).job
    assert (await wait_done(stub(a), job.job_id)).miner_id == key.address


def capped(limit: int) -> list[ClientKey]:
    return [ClientKey("alice", hashlib.sha256(API_KEY.encode()).hexdigest(), max_active_jobs=limit),
            ClientKey("bob", hashlib.sha256(OTHER_KEY.encode()).hexdigest()),
            ClientKey("carol", hashlib.sha256(OPERATOR_KEY.encode()).hexdigest(), operator=True)]


async def test_max_active_jobs_counts_a_clients_jobs_on_every_coordinator(
        network_factory: Any, pg_url: str, tmp_path: Path) -> None:
    a, b = await pair(network_factory, pg_url, tmp_path, clients=capped(2))
    miner = RawMiner(a)
    await miner.connect()
    await b.until(lambda: "null" in b.core.served_models())
    sa, sb = stub(a), stub(b)
    req = image_job(model="null", seed=1, width=64, height=64)
    first = (await sa.SubmitJob(req, metadata=MD)).job
    await sa.SubmitJob(req, metadata=MD)  # queued: the miner runs one at a time
    task = await assignment(miner)
    assert task.job_id == first.job_id
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await sb.SubmitJob(req, metadata=MD)
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert exc.value.details() == ("client 'alice' already has 2 unfinished jobs (max_active_jobs 2): "
                                   "wait for some to end, or cancel some, before submitting more")
    assert table(pg_url, "SELECT count(*) FROM jobs") == [(2,)]  # nothing of the refused one was kept
    await sb.SubmitJob(req, metadata=(("x-api-key", OTHER_KEY),))  # another client is not held back
    finish(miner, task)
    assert (await wait_done(sa, first.job_id)).state == S.JOB_STATE_COMPLETED
    third = (await sb.SubmitJob(req, metadata=MD)).job  # one finished: B accepts
    assert third.state == S.JOB_STATE_QUEUED


def test_the_count_of_a_clients_jobs_waits_for_another_coordinators_count_and_queue(pg_url: str) -> None:
    one, two = PostgresJobStore(pg_url), PostgresJobStore(pg_url)
    try:
        counted: list[int] = []

        def count_on_two() -> None:
            with two.client_jobs("alice") as n:
                counted.append(n)

        with one.client_jobs("alice") as n:
            assert n == 0
            waiter = threading.Thread(target=count_on_two)
            waiter.start()
            waiter.join(0.5)
            assert waiter.is_alive() and not counted  # held until the first one's job is written
            one.write([job_pb2.Job(job_id="j1", model="null", client_id="alice", state=S.JOB_STATE_QUEUED)])
        waiter.join(10)
        assert counted == [1]  # it saw the job the first one queued under the lock
        with one.client_jobs("bob") as n:  # other clients are not held up
            assert n == 0
    finally:
        one.close()
        two.close()
