"""`aitbc devnet --postgres`: the coordinators' store in a PostgreSQL server the devnet runs in its
folder (a real server from the system's package), kept across restarts, stopped with the devnet;
`--coordinators 2`: two coordinators on that one database, jobs sent to the one without the miner."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

import grpc
import psycopg
import pytest

from aitbc.clients.sdk import CoordinatorClient
from aitbc.v1 import job_pb2, ledger_pb2, miner_pb2, miner_pb2_grpc, receipt_pb2
from tests.e2e.test_devnet_cli import _services_of, aitbc, start_devnet, stop_devnet
from tests.fault.test_chaos import chain_view, head


def _postgres_pids(cluster: Path) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        try:
            cmd = (p / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"/postgres") and str(cluster).encode() in b" ".join(cmd):
            out.append(int(p.name))
    return out


def test_more_than_one_coordinator_needs_postgres(tmp_path: Path) -> None:
    env = dict(os.environ, AITBC_HOME=str(tmp_path / "home"))
    r = aitbc(env, "devnet", "--coordinators", "2", "--coordinator-listen", "127.0.0.1:0", cwd=tmp_path, timeout=60)
    assert r.returncode != 0 and "--coordinators 2 needs --postgres" in r.stdout + r.stderr, r.stdout + r.stderr
    assert not (tmp_path / "home" / "devnet" / "coordinator.toml").exists()  # refused before anything was written


@pytest.mark.slow
def test_devnet_on_postgres_runs_a_job_and_keeps_it_across_a_restart(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = dict(os.environ, AITBC_HOME=str(home))
    extra = ("--postgres", "--ledger-listen", "127.0.0.1:0")
    proc, lines = start_devnet(env, tmp_path, extra)
    try:
        endpoints = json.loads((home / "devnet" / "endpoints.json").read_text())
        url, first = endpoints["database_url"], endpoints["coordinator"]
        assert url.startswith("postgresql://aitbc:") and url in "".join(lines)
        port = url.rpartition(":")[2].split("/")[0]
        with pytest.raises(psycopg.OperationalError, match="password"):  # another local user has no password
            psycopg.connect(f"postgresql://aitbc@127.0.0.1:{port}/aitbc", connect_timeout=10).close()
        r = aitbc(dict(env, AITBC_COORDINATOR=first), "submit", "a kite over the sea", "--steps", "4", "--seed",
                  "5", "-o", "kite.png", cwd=tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
        job_id = [ln.split(":", 1)[1].strip() for ln in r.stdout.splitlines() if ln.startswith("job id:")][0]
        with psycopg.connect(url) as conn:  # the job is a row of the devnet's database, not an LMDB record
            assert conn.execute("SELECT count(*) FROM jobs WHERE job_id = %s", (job_id,)).fetchone() == (1,)
        r = aitbc(dict(env, AITBC_COORDINATOR=first), "status", job_id, cwd=tmp_path)
        assert r.returncode == 0 and "COMPLETED" in r.stdout, r.stdout + r.stderr
        deadline = time.monotonic() + 60
        while "settlement FINAL" not in (r := aitbc(env, "receipts", "--job-id", job_id, cwd=tmp_path)).stderr:
            assert time.monotonic() < deadline, r.stderr
            time.sleep(0.5)
        assert "minted" in r.stderr, r.stderr
    finally:
        stop_devnet(proc)
    cluster = (home / "devnet" / "postgres").resolve()
    assert (cluster / "data" / "PG_VERSION").exists()
    assert _postgres_pids(cluster) == [] and _services_of(home / "devnet", but=os.getpid()) == []  # all stopped

    proc, _ = start_devnet(env, tmp_path, extra)  # the same folder: the same cluster, the job still there
    try:
        r = aitbc(env, "status", job_id, cwd=tmp_path)
        assert r.returncode == 0 and "COMPLETED" in r.stdout, r.stdout + r.stderr
        assert _postgres_pids(cluster)  # the devnet runs it
    finally:
        stop_devnet(proc)
    assert _postgres_pids(cluster) == []


@pytest.mark.slow
def test_two_coordinators_jobs_sent_to_the_one_without_the_miner_complete_at_native_size_minted_once(
        tmp_path: Path) -> None:
    """Submitted as soon as the devnet says it is ready (no retry): the coordinator without the
    miner accepts the models and sizes them as the miner's does (a tiny-sd job sized 512 x 512
    there ran for minutes under load: docs/scaling.md, third slice)."""
    home = tmp_path / "home"
    env = dict(os.environ, AITBC_HOME=str(home))
    proc, lines = start_devnet(env, tmp_path, ("--postgres", "--coordinators", "2", "--ledger-listen", "127.0.0.1:0"))
    try:
        ep = json.loads((home / "devnet" / "endpoints.json").read_text())
        coordinators, url = ep["coordinators"], ep["database_url"]
        assert len(coordinators) == 2 and coordinators[0] == ep["coordinator"] and coordinators[1] in "".join(lines)
        with grpc.insecure_channel(ep["miner_ops"]) as ch:
            serving = miner_pb2_grpc.MinerOpsServiceStub(ch).GetInfo(miner_pb2.GetInfoRequest(), timeout=10).coordinator
        other = next(c for c in coordinators if c != serving)
        with CoordinatorClient([other], ep["api_key"], timeout=30) as client:
            jobs = [client.submit_image(f"a kite {n}", steps=2, seed=n) for n in range(4)]
            assert all((j.params.image.width, j.params.image.height) == (64, 64) for j in jobs), jobs[0].params
            done = [[ev for ev in client.watch(j.job_id, timeout=170) if isinstance(ev, job_pb2.Job)][-1] for j in jobs]
            assert [d.state for d in done] == [job_pb2.JOB_STATE_COMPLETED] * 4, [(d.state, d.error) for d in done]
            assert {d.miner_id for d in done} == {ep["miner_address"]}
            receipts: dict[str, receipt_pb2.Receipt] = {}
            deadline = time.monotonic() + 60
            for j in jobs:
                while (r := client.receipt(job_id=j.job_id)).settlement.state != receipt_pb2.SETTLEMENT_STATE_FINAL:
                    assert time.monotonic() < deadline, (r.settlement.state, r.settlement.error)
                    time.sleep(0.5)
                receipts[r.receipt_hash] = r
        with psycopg.connect(url) as conn:  # one job row and one receipt per submission: nothing ran twice
            assert conn.execute("SELECT count(*) FROM jobs").fetchone() == (4,)
            assert conn.execute("SELECT count(*) FROM receipts").fetchone() == (4,)
        _, txs = chain_view(ep["ledger"], head(ep["ledger"]).head.height)
        mints = Counter(t.receipt_hash for t in txs if t.kind == ledger_pb2.TRANSACTION_KIND_MINT)
        assert len(receipts) == 4 and all(mints[h] == 1 for h in receipts) and set(mints.values()) == {1}, mints
    finally:
        stop_devnet(proc)
    assert _services_of(home / "devnet", but=os.getpid()) == []
