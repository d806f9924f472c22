"""A coordinator process killed (-9) and started again on its data folder, as an operator's crash
looks to a client: a job submitted before any miner is back is QUEUED (the models served lately are
in its LMDB), and a client that submits all along through the SDK sees no error at all."""

from __future__ import annotations

import hashlib
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from aitbc import crypto, receipts
from aitbc.v1 import job_pb2
from aitbc.wire import receipt_from_proto
from tests.fault.cluster import API_KEY, Proc, free_port

pytestmark = pytest.mark.slow


def _processes(root: Path) -> tuple[Proc, Proc, str]:
    cli = [sys.executable, "-m", "aitbc.clients.cli"]
    target = f"127.0.0.1:{free_port()}"
    crypto.load_or_create_key(root / "coordinator.key")
    (root / "coordinator.toml").write_text("\n".join([
        f'listen = "{target}"', f'data_dir = "{root / "coordinator"}"', f'key_file = "{root / "coordinator.key"}"',
        "heartbeat_interval_s = 1.0", "heartbeat_timeout_s = 4.0", "verify_rate = 0.0", "trust_checks = 0",
        "", "[[clients]]", 'id = "restart"', f'api_key_sha256 = "{hashlib.sha256(API_KEY.encode()).hexdigest()}"',
        "rate_per_s = 10000.0", "burst = 10000", "",
    ]))
    coordinator = Proc("coordinator", "coordinator", [*cli, "coordinator", "--config", str(root / "coordinator.toml")],
                       target, root / "coordinator.log")
    (root / "miner").mkdir()
    ops = f"127.0.0.1:{free_port()}"
    (root / "miner" / "miner.toml").write_text("\n".join([
        f'coordinator = "{target}"', f'key_file = "{root / "miner" / "miner.key"}"', 'models = ["null"]',
        f'ops_listen = "{ops}"', "max_concurrency = 2", "reconnect_max_s = 1.0", "",
    ]))
    miner = Proc("miner", "miner", [*cli, "miner", "--config", str(root / "miner" / "miner.toml")], ops,
                 root / "miner" / "miner.log")
    return coordinator, miner, target



def test_a_killed_coordinator_accepts_jobs_before_its_miners_are_back_and_clients_see_no_error(tmp_path: Path) -> None:
    from aitbc.clients.sdk import CoordinatorClient

    coordinator, miner, target = _processes(tmp_path)
    coordinator.start()
    coordinator.wait_healthy(60)
    miner.start()
    miner.wait_healthy(60)
    client = CoordinatorClient(target, API_KEY, timeout=10)
    try:
        # the miner's ops port answers before it has registered (on a loaded box a while before):
        # wait, bounded, for the coordinator to list its model
        deadline = time.monotonic() + 30
        while not client.list_models() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [m.name for m in client.list_models()] == ["null"]
        # kill -9 while the miner is connected (no orderly shutdown saves anything), and keep the
        # miner away: the coordinator comes back with no miner at all
        miner.kill9()
        coordinator.restart(60)
        job = client.submit_image("after the crash", model="null", steps=1, width=64, height=64, seed=1)
        assert job.state == job_pb2.JOB_STATE_QUEUED
        assert not client.list_models()  # nobody serves it this instant: it was accepted from memory

        miner.start()
        # a client that submits all along while the coordinator is killed and restarted again
        count, out = 16, {}
        half, down = threading.Event(), threading.Event()

        def submit_all() -> None:
            try:
                with CoordinatorClient(target, API_KEY, timeout=10) as c:
                    ids = []
                    for i in range(count):
                        if i == count // 2:
                            half.set()
                            down.wait(60)  # the next submission meets a dead coordinator
                        ids.append(c.submit_image(f"load {i}", model="null", steps=1, width=64, height=64,
                                                  seed=100 + i).job_id)
                    out["ids"] = ids
                    out["final"] = [_final(c, j) for j in [job.job_id, *ids]]
                    out["receipts"] = [c.receipt(job_id=j) for j in [job.job_id, *ids]]
                    out["retries"] = c.retries
            except BaseException as exc:
                out["error"] = exc

        t = threading.Thread(target=submit_all)
        t.start()
        half.wait(60)
        coordinator.kill9()
        down.set()
        coordinator.start()
        coordinator.wait_healthy(60)
        t.join(240)
        assert not t.is_alive()
        assert "error" not in out, f"{out.get('error')!r}\n{coordinator.tail()}"
        assert out["retries"] > 0  # the crash was met, and retried through
        assert len(set(out["ids"])) == count
        assert all(j.state == job_pb2.JOB_STATE_COMPLETED for j in out["final"]), [j.error for j in out["final"]]
        key = crypto.load_or_create_key(tmp_path / "coordinator.key")
        for rec in out["receipts"]:
            receipts.verify_receipt(receipt_from_proto(rec), attesters=frozenset({key.address}))
        listed, _ = client.receipts(page_size=100)
        assert len(listed) == count + 1  # one receipt per submission: no retry queued a second job
    finally:
        client.close()
        miner.stop()
        coordinator.stop()


def _final(client: Any, job_id: str) -> job_pb2.Job:
    job = client.get_job(job_id)
    for ev in client.watch(job_id, timeout=120):
        if isinstance(ev, job_pb2.Job):
            job = ev
    return job
