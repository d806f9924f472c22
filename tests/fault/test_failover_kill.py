"""kill -9 of the coordinator a miner process serves, with a second coordinator in its list: the
miner registers with the second and a job submitted there completes; the first started again and
the second killed, it returns to the first. Real processes (`aitbc coordinator`, `aitbc miner`),
each coordinator on its own LMDB folder, loopback only."""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

import grpc
import pytest

from aitbc import crypto
from aitbc.v1 import job_pb2, miner_pb2, miner_pb2_grpc
from tests.fault.cluster import API_KEY, Proc, free_port

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "aitbc.clients.cli"]


def coordinator(root: Path, name: str) -> Proc:
    d = root / name
    d.mkdir()
    target = f"127.0.0.1:{free_port()}"
    crypto.load_or_create_key(d / "coordinator.key")
    (d / "coordinator.toml").write_text("\n".join([
        f'listen = "{target}"', f'data_dir = "{d / "data"}"', f'key_file = "{d / "coordinator.key"}"',
        "heartbeat_interval_s = 1.0", "heartbeat_timeout_s = 4.0", "verify_rate = 0.0", "trust_checks = 0",
        "", "[[clients]]", 'id = "failover"', f'api_key_sha256 = "{hashlib.sha256(API_KEY.encode()).hexdigest()}"',
        "rate_per_s = 10000.0", "burst = 10000", "",
    ]))
    return Proc(name, "coordinator", [*CLI, "coordinator", "--config", str(d / "coordinator.toml")], target,
                d / "coordinator.log")


def miner(root: Path, name: str, coordinators: list[str], *settings: str) -> Proc:
    """An `aitbc miner` process of the null model listing `coordinators` (in that order), its
    config, key and log in `root` named after it; `settings`: more miner.toml lines."""
    ops = f"127.0.0.1:{free_port()}"
    (root / f"{name}.toml").write_text("\n".join([
        "coordinator = [" + ", ".join(f'"{t}"' for t in coordinators) + "]", f'key_file = "{root / f"{name}.key"}"',
        'models = ["null"]', f'ops_listen = "{ops}"', "reconnect_max_s = 1.0", *settings, "",
    ]))
    return Proc(name, "miner", [*CLI, "miner", "--config", str(root / f"{name}.toml")], ops, root / f"{name}.log")


def serving(ops: str, coordinator: str, timeout: float = 60.0) -> None:
    """Until the miner's GetInfo says it is connected to `coordinator` (bounded wait)."""
    deadline = time.monotonic() + timeout
    last = None
    with grpc.insecure_channel(ops) as ch:
        stub = miner_pb2_grpc.MinerOpsServiceStub(ch)
        while time.monotonic() < deadline:
            try:
                last = stub.GetInfo(miner_pb2.GetInfoRequest(), timeout=2)
                if last.connected and last.coordinator == coordinator:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.05)
    raise AssertionError(f"miner not serving {coordinator} within {timeout:.0f} s (last: {last})")


def run_one_job(target: str) -> None:
    from aitbc.clients.sdk import CoordinatorClient

    with CoordinatorClient(target, API_KEY, timeout=10) as client:
        job = client.submit_image("a lighthouse", model="null", request_id=f"kill-{free_port()}")
        states = [ev.state for ev in client.watch(job.job_id, timeout=60) if isinstance(ev, job_pb2.Job)]
        assert states[-1] == job_pb2.JOB_STATE_COMPLETED


def test_a_miner_serves_the_next_coordinator_after_kill_9_and_comes_back(tmp_path: Path) -> None:
    a, b = coordinator(tmp_path, "a"), coordinator(tmp_path, "b")
    m = miner(tmp_path, "miner", [a.target, b.target])
    ops = m.target
    procs = [a, b, m]
    try:
        for p in (a, b):
            p.start()
        for p in (a, b):  # both up before the miner starts: it takes the first of its list that answers
            p.wait_healthy(60)
        m.start()
        m.wait_healthy(60)
        serving(ops, a.target)
        run_one_job(a.target)

        a.kill9()
        serving(ops, b.target)
        run_one_job(b.target)

        a.start()
        a.wait_healthy(60)
        b.kill9()
        serving(ops, a.target)
        run_one_job(a.target)
        log = m.log.read_text()
        assert f"with {b.target}" in log and f"no session with coordinator {a.target}; trying {b.target} next" in log
    finally:
        for p in procs:
            p.stop()
