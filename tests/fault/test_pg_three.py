"""Three coordinator processes on one PostgreSQL database with one attester key, two miner
processes listing all three, and a ledger node (issue 18's end-to-end test): jobs submitted
round-robin, each watched on another coordinator than the one it was submitted to; one
coordinator killed with kill -9 mid-load and another restarted. Afterwards every job is COMPLETED
exactly once, every receipt is minted exactly once, and no watcher missed the terminal state.
Real processes (`aitbc node`, `aitbc coordinator`, `aitbc miner`), a real server (tests/conftest.py
`postgres`), loopback only."""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from aitbc import crypto
from aitbc.ledger.genesis import make_genesis
from aitbc.v1 import job_pb2, ledger_pb2, receipt_pb2
from tests.fault.cluster import API_KEY, Proc, free_port
from tests.fault.test_chaos import chain_view, head
from tests.fault.test_failover_kill import coordinator, miner
from tests.fault.test_pg_kill import count, on_database, warm_up

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "aitbc.clients.cli"]
JOBS = 60
CHAIN = "aitbc-pg-three"


def test_three_coordinators_kill_one_restart_another_every_job_once_every_receipt_minted_once(
        tmp_path: Path, pg_url: str) -> None:
    from aitbc.clients.sdk import CoordinatorClient

    key = tmp_path / "attester.key"
    attester = crypto.load_or_create_key(key)
    node_key = crypto.PrivateKey.generate()
    make_genesis(CHAIN, [node_key.address], [attester.address], block_time_ms=500,
                 genesis_time_ms=int(time.time() * 1000)).save(tmp_path / "genesis.json")
    (tmp_path / "node.key").write_text(node_key.secret.hex())
    ledger = Proc("ledger", "authority", [*CLI, "node", "--data-dir", str(tmp_path / "ledger"), "--genesis",
                                          str(tmp_path / "genesis.json"), "--listen", f"127.0.0.1:{free_port()}",
                                          "--key", str(tmp_path / "node.key")],
                  "", tmp_path / "ledger.log")
    ledger.target = ledger.argv[ledger.argv.index("--listen") + 1]
    coords = [on_database(coordinator(tmp_path, name), pg_url, key) for name in ("a", "b", "c")]
    for c in coords:  # settle on the ledger: one of the three is the settler at any time
        toml = c.log.parent / "coordinator.toml"
        toml.write_text(toml.read_text().replace("verify_rate = 0.0", f'verify_rate = 0.0\nchain_id = "{CHAIN}"\n'
                                                 f'ledger = "{ledger.target}"'))
    targets = [c.target for c in coords]
    # miner 0 starts on a, miner 1 on b; paid (price 1): each receipt is a MINT
    miners = [miner(tmp_path, f"miner{i}", targets[i:] + targets[:i], "max_concurrency = 2", "price_per_unit = 1")
              for i in range(2)]
    procs = [ledger, *coords, *miners]
    submitted: dict[int, str] = {}
    errors: list[BaseException] = []
    watchers: dict[str, Future[list[int]]] = {}
    pool = ThreadPoolExecutor(max_workers=16)

    def watch(job_id: str, on: int) -> list[int]:
        """The states one watcher on coordinator `on` (failing over to the others) saw, in order."""
        ring = targets[on:] + targets[:on]
        with CoordinatorClient(ring, API_KEY, timeout=10) as client:
            return [ev.state for ev in client.watch(job_id, timeout=120) if isinstance(ev, job_pb2.Job)]

    def submit_all() -> None:
        try:  # round-robin over the three, each with the others to fail over to; request ids: never twice
            clients = [CoordinatorClient(targets[i:] + targets[:i], API_KEY, timeout=10) for i in range(3)]
            try:
                for n in range(JOBS):
                    job = clients[n % 3].submit_image(f"three {n}", model="null", request_id=f"three-{n}", steps=1)
                    submitted[n] = job.job_id
                    watchers[job.job_id] = pool.submit(watch, job.job_id, (n + 1) % 3)  # watched elsewhere
                    time.sleep(0.02)
            finally:
                for c in clients:
                    c.close()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    try:
        ledger.start()
        ledger.wait_healthy(60)
        for p in [*coords, *miners]:
            p.start()
        for p in [*coords, *miners]:
            p.wait_healthy(60)
        warm_up(targets, coords[0])
        sender = threading.Thread(target=submit_all)
        sender.start()
        deadline = time.monotonic() + 60
        while len(submitted) < JOBS // 3:
            assert time.monotonic() < deadline and sender.is_alive(), errors or miners[0].tail()
            time.sleep(0.01)
        coords[1].kill9()  # b dies mid-load, with its claims and its miner
        while len(submitted) < 2 * JOBS // 3:
            assert time.monotonic() < deadline and sender.is_alive(), errors
            time.sleep(0.01)
        coords[2].stop()  # c restarted (a clean stop, then a start on the same database)
        coords[2].start()
        coords[2].wait_healthy(60)
        sender.join(120)
        assert not errors, errors
        assert len(submitted) == JOBS and len(set(submitted.values())) == JOBS

        seen = {job_id: f.result(timeout=180) for job_id, f in watchers.items()}
        missed = {j: s for j, s in seen.items() if not s or s[-1] != job_pb2.JOB_STATE_COMPLETED}
        assert not missed, f"{len(missed)} watchers did not see COMPLETED last, e.g. {list(missed.items())[:3]}"

        alive = [coords[0].target, coords[2].target]
        with CoordinatorClient(alive, API_KEY, timeout=10) as client:
            receipts: dict[str, receipt_pb2.Receipt] = {}
            deadline = time.monotonic() + 120
            for job_id in submitted.values():
                assert client.get_job(job_id).state == job_pb2.JOB_STATE_COMPLETED
                while True:
                    recs, _ = client.receipts(job_id=job_id)
                    if recs and all(r.settlement.state == receipt_pb2.SETTLEMENT_STATE_FINAL for r in recs):
                        receipts.update({r.receipt_hash: r for r in recs})
                        break
                    assert time.monotonic() < deadline, (job_id, [(r.settlement.state, r.settlement.error) for r in recs])
                    time.sleep(0.2)
        assert count(pg_url, "SELECT count(*) FROM jobs") == JOBS + 3  # one job per request id (and the warm-ups)
        assert count(pg_url, "SELECT count(*) FROM receipts") == JOBS + 3  # one receipt per job: none ran twice
        _, txs = chain_view(ledger.target, head(ledger.target).head.height)
        mints = Counter(t.receipt_hash for t in txs if t.kind in (ledger_pb2.TRANSACTION_KIND_MINT,
                                                                 ledger_pb2.TRANSACTION_KIND_SETTLE))
        assert all(mints[h] == 1 for h in receipts), [h for h in receipts if mints[h] != 1][:3]
        assert set(mints.values()) == {1}  # nothing minted twice, warm-ups included
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        for p in reversed(procs):
            p.stop()
