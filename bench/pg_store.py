#!/usr/bin/env python3
"""The coordinator's store: LMDB against PostgreSQL, in the same run (issue 18, first slice).

One coordinator process at a time, each with the same null-backend miner in this process (as
bench/dispatch.py): first on LMDB (the default), then on a PostgreSQL server this script starts
(aitbc.pgserver, loopback, durable defaults: fsync and synchronous_commit on), then on the same
server with synchronous_commit = off (the trade the LMDB store makes: a killed process loses
nothing, an OS crash may lose the last moments). Printed: jobs/s held by the miner with
`--concurrency` submits in flight, submit -> the miner holds the job (one at a time, and in
flight), CPU per job of the coordinator and of the PostgreSQL server, and the ratios to LMDB.

    python bench/pg_store.py [--jobs 1000] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

import psutil  # noqa: E402
from _common import API_KEY, machine, pct, start_coordinator, summary  # noqa: E402
from dispatch import TimedMiner, cpu_seconds  # noqa: E402

from aitbc import crypto  # noqa: E402
from aitbc.config import MinerConfig  # noqa: E402
from aitbc.miner.backend import load_image_backend  # noqa: E402
from aitbc.pgserver import LocalPostgres  # noqa: E402
from aitbc.rpc import channel  # noqa: E402
from aitbc.v1 import coordinator_pb2, coordinator_pb2_grpc, job_pb2  # noqa: E402

MD = (("x-api-key", API_KEY),)
PARAMS = job_pb2.JobParams(image=job_pb2.ImageParams(prompt="bench", steps=1, width=64, height=64, seed=1))


class Result(NamedTuple):
    name: str
    rate: float  # jobs/s held by the miner, concurrency in flight
    completed_rate: float  # jobs/s completed with an attested receipt
    seq: list[float]  # submit -> held, one at a time (ms)
    lat: list[float]  # submit -> held, concurrency in flight (ms)
    coord_cpu_ms: float  # per job, all the coordinator's threads
    db_cpu_ms: float  # per job, every PostgreSQL process (0 on LMDB)


def server_cpu(pg: LocalPostgres | None) -> float:
    if pg is None:
        return 0.0
    pid = int((pg.data / "postmaster.pid").read_text().split()[0])
    total = 0.0
    for p in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            continue
    return total


async def measure(name: str, tmp: Path, n: int, concurrency: int, pg: LocalPostgres | None = None,
                  url: str = "") -> Result:
    proc, addr = start_coordinator(tmp, **({"database_url": url} if url else {}))
    try:
        miner = TimedMiner(MinerConfig(coordinator=addr, models=["null"], max_concurrency=64),
                           crypto.PrivateKey.generate(), {"null": load_image_backend("null")})
        miner.held = {}  # this miner's own (the class keeps one for bench/dispatch.py)
        task = asyncio.create_task(miner.run())
        await asyncio.wait_for(miner.registered.wait(), 30)
        await asyncio.sleep(0.3)
        async with channel(addr) as ch:
            stub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
            submitted: dict[str, float] = {}
            sem = asyncio.Semaphore(concurrency)

            async def one() -> None:
                async with sem:
                    t = time.perf_counter()
                    job = (await stub.SubmitJob(coordinator_pb2.SubmitJobRequest(model="null", params=PARAMS),
                                                metadata=MD)).job
                    submitted[job.job_id] = t

            await asyncio.gather(*(one() for _ in range(100)))  # warm-up
            warm = set(submitted)
            deadline = time.monotonic() + 120
            while miner.attested < 100 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            cpu0, db0 = cpu_seconds(proc.pid), server_cpu(pg)
            t0 = time.perf_counter()
            await asyncio.gather(*(one() for _ in range(n)))
            ids = [j for j in submitted if j not in warm]
            while not all(j in miner.held for j in ids) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            held_span = max(miner.held[j] for j in ids) - t0
            while miner.attested < n + 100 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            done_span = time.perf_counter() - t0
            coord_cpu = (cpu_seconds(proc.pid) - cpu0) * 1000 / n
            db_cpu = (server_cpu(pg) - db0) * 1000 / n
            seq: list[float] = []
            for _ in range(200):  # unloaded: one job at a time, what a single client sees
                t = time.perf_counter()
                job = (await stub.SubmitJob(coordinator_pb2.SubmitJobRequest(model="null", params=PARAMS),
                                            metadata=MD)).job
                while job.job_id not in miner.held:
                    await asyncio.sleep(0)
                seq.append((miner.held[job.job_id] - t) * 1000)
        lat = [(miner.held[j] - submitted[j]) * 1000 for j in ids]
        completed = min(miner.attested - 100, n)
        miner.stop()
        await asyncio.wait_for(task, 10)
    finally:
        proc.terminate()
        proc.wait()
    return Result(name, n / held_span, completed / done_span, seq, lat, coord_cpu, db_cpu)


async def run(n: int, concurrency: int) -> None:
    with tempfile.TemporaryDirectory() as tmp, LocalPostgres(durable=True) as pg:
        root = Path(tmp)
        for d in ("lmdb", "pg", "pg-async-commit"):
            (root / d).mkdir()
        durable = pg.create_database("bench_durable")
        relaxed = pg.create_database("bench_relaxed") + "?options=-c%20synchronous_commit%3Doff"
        results = [
            await measure("LMDB (default)", root / "lmdb", n, concurrency),
            await measure("PostgreSQL, durable defaults", root / "pg", n, concurrency, pg, durable),
            await measure("PostgreSQL, synchronous_commit=off", root / "pg-async-commit", n, concurrency, pg, relaxed),
        ]
    print(f"coordinator store benchmark ({machine()}), {n} jobs, {concurrency} submits in flight, null backend, "
          "one coordinator at a time, PostgreSQL 15 on loopback")
    base = results[0]
    for r in results:
        print(f"  {r.name}:")
        print(f"    submit -> miner holds job, one at a time: {summary(r.seq)}")
        print(f"    submit -> miner holds job, {concurrency} in flight: {summary(r.lat)}")
        print(f"    {r.rate:.0f} jobs/s held; {r.completed_rate:.0f} jobs/s completed with attested receipts")
        print(f"    CPU per job: coordinator {r.coord_cpu_ms:.2f} ms" +
              (f", PostgreSQL server {r.db_cpu_ms:.2f} ms" if r.db_cpu_ms else ""))
        if r is not base:
            print(f"    ratio to LMDB: jobs/s {r.rate / base.rate:.2f}x; one-at-a-time p50 "
                  f"{pct(r.seq, 50) / pct(base.seq, 50):.2f}x; in-flight p50 {pct(r.lat, 50) / pct(base.lat, 50):.2f}x; "
                  f"coordinator CPU {r.coord_cpu_ms / base.coord_cpu_ms:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=32)
    args = ap.parse_args()
    asyncio.run(run(args.jobs, args.concurrency))


if __name__ == "__main__":
    main()
