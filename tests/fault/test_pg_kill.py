"""kill -9 of one of two coordinator processes sharing one PostgreSQL database, under a burst of
submissions (docs/scaling.md): the miner process fails over to the other, which takes over the
jobs the dead one had claimed, and every job submitted completes exactly once with one receipt.
Real processes (`aitbc coordinator`, `aitbc miner`), a real server (tests/conftest.py `postgres`),
loopback only."""

from __future__ import annotations

import shutil
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest

from aitbc import crypto
from aitbc.v1 import job_pb2
from tests.fault.cluster import API_KEY, Proc
from tests.fault.test_failover_kill import coordinator, miner, serving

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "aitbc.clients.cli"]
JOBS = 120


def on_database(c: Proc, url: str, key: Path) -> Proc:
    """The coordinator `coordinator()` set up, on the shared database with the shared attester key."""
    d = c.log.parent
    shutil.copy(key, d / "coordinator.key")
    toml = d / "coordinator.toml"
    toml.write_text(toml.read_text().replace('verify_rate = 0.0', f'verify_rate = 0.0\ndatabase_url = "{url}"'))
    return c


def serving_one(ops: str, timeout: float = 60.0) -> str:
    """The coordinator the miner serves, once it serves one (bounded wait)."""
    import grpc

    from aitbc.v1 import miner_pb2, miner_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(ops) as ch:
        while time.monotonic() < deadline:
            try:
                info = miner_pb2_grpc.MinerOpsServiceStub(ch).GetInfo(miner_pb2.GetInfoRequest(), timeout=2)
                if info.connected:
                    return info.coordinator
            except grpc.RpcError:
                pass
            time.sleep(0.05)
    raise AssertionError(f"the miner serves no coordinator within {timeout:.0f} s")


def warm_up(targets: list[str], log_of: Proc, timeout: float = 30.0) -> None:
    """One job submitted to each coordinator, retried until it is accepted: a coordinator accepts
    the model once it has read the others' served record (every second). Bounded by `timeout`."""
    from aitbc.clients.sdk import CoordinatorClient

    until = time.monotonic() + timeout
    for target in targets:
        with CoordinatorClient(target, API_KEY, timeout=10) as client:
            while True:
                try:
                    client.submit_image("warm", model="null", request_id=f"warm-{target}", steps=1)
                    break
                except Exception:
                    assert time.monotonic() < until, log_of.tail()
                    time.sleep(0.1)


def count(url: str, sql: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(sql).fetchone()
    return int(row[0]) if row else 0


def test_kill_9_of_a_coordinator_under_load_loses_no_job_and_runs_none_twice(tmp_path: Path, pg_url: str) -> None:
    from aitbc.clients.sdk import CoordinatorClient

    key = tmp_path / "attester.key"
    crypto.load_or_create_key(key)
    a = on_database(coordinator(tmp_path, "a"), pg_url, key)
    b = on_database(coordinator(tmp_path, "b"), pg_url, key)
    m = miner(tmp_path, "miner", [a.target, b.target])
    ops = m.target
    procs = [a, b, m]
    submitted: list[str] = []
    errors: list[BaseException] = []

    def submit_all() -> None:
        try:  # request ids: a submission cut by the kill fails over to b without queueing twice
            with CoordinatorClient([a.target, b.target], API_KEY, timeout=10) as client:
                for n in range(JOBS):
                    submitted.append(client.submit_image(f"burst {n}", model="null", request_id=f"burst-{n}",
                                                         steps=1).job_id)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    try:
        for p in procs:
            p.start()
        for p in procs:
            p.wait_healthy(60)
        first = serving_one(ops)
        owner, other = (a, b) if first == a.target else (b, a)  # the one whose miner runs the burst dies
        warm_up([a.target, b.target], other)
        sender = threading.Thread(target=submit_all)
        sender.start()
        deadline = time.monotonic() + 60
        while count(pg_url, "SELECT count(*) FROM jobs WHERE state = 4") < 10:  # the miner is serving the burst
            assert time.monotonic() < deadline, m.tail()
            time.sleep(0.01)
        owner.kill9()
        serving(ops, other.target)
        sender.join(120)
        assert not errors, errors
        assert len(submitted) == len(set(submitted)) == JOBS
        deadline = time.monotonic() + 120
        with CoordinatorClient(other.target, API_KEY, timeout=10) as client:
            for job_id in submitted:
                while (job := client.get_job(job_id)).state != job_pb2.JOB_STATE_COMPLETED:
                    assert job.state in (job_pb2.JOB_STATE_QUEUED, job_pb2.JOB_STATE_ASSIGNED,
                                         job_pb2.JOB_STATE_RUNNING), (job_id, job.state, job.error)
                    assert time.monotonic() < deadline, (job_id, job.state, other.tail())
                    time.sleep(0.05)
        assert count(pg_url, "SELECT count(*) FROM jobs") == JOBS + 2  # one job per request id (and the warm-ups)
        assert count(pg_url, "SELECT count(*) FROM jobs WHERE state = 4") == JOBS + 2
        assert count(pg_url, "SELECT count(*) FROM receipts") == JOBS + 2  # one receipt per job
    finally:
        for p in procs:
            p.stop()
