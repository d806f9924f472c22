#!/usr/bin/env python3
"""Several coordinators on one PostgreSQL database (issue 18), against one on LMDB, in one run.

For k = 1, 2, 3 coordinator processes on one database (aitbc.pgserver, loopback, durable
defaults), each with one null-backend miner in this process that lists every coordinator (miner
i starts on coordinator i), and clients that submit round-robin to the k coordinators: jobs/s
held by the miners with `--concurrency` submits in flight, and submit -> a miner holds the job
(one at a time, and in flight). Beside them the same with one coordinator on LMDB (the default).
Then failover: `kill -9` of one of the coordinators, and the time until its miner is registered
with another (goal: within 2 heartbeat intervals) and until a job submitted to a survivor is held.

    python bench/coordinators.py [--jobs 1000] [--concurrency 32] [--max 3]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import API_KEY, machine, pct, start_coordinator, summary  # noqa: E402
from dispatch import TimedMiner  # noqa: E402

from aitbc import crypto  # noqa: E402
from aitbc.config import MinerConfig  # noqa: E402
from aitbc.miner.backend import load_image_backend  # noqa: E402
from aitbc.pgserver import LocalPostgres  # noqa: E402
from aitbc.rpc import channel  # noqa: E402
from aitbc.v1 import coordinator_pb2, coordinator_pb2_grpc, job_pb2  # noqa: E402

MD = (("x-api-key", API_KEY),)
PARAMS = job_pb2.JobParams(image=job_pb2.ImageParams(prompt="bench", steps=1, width=64, height=64, seed=1))
HEARTBEAT_S = 2.0  # the coordinator's default heartbeat interval (docs/coordinator.md)


class Result(NamedTuple):
    name: str
    rate: float  # jobs/s held by the miners, concurrency in flight
    seq: list[float]  # submit -> held, one at a time (ms)
    lat: list[float]  # submit -> held, concurrency in flight (ms)
    failover: tuple[float, float] | None  # kill -9 -> its miner registered elsewhere, -> a new job held (s)


async def measure(name: str, root: Path, k: int, n: int, concurrency: int, url: str = "",
                  failover: bool = False) -> Result:
    key = root / "pool.key"  # one attester key for the pool (docs/scaling.md)
    crypto.load_or_create_key(key)
    procs, addrs = [], []
    for i in range(k):
        (root / f"c{i}").mkdir()
        proc, addr = start_coordinator(root / f"c{i}", key_file=key, **({"database_url": url} if url else {}))
        procs.append(proc)
        addrs.append(addr)
    miners, tasks = [], []
    try:
        TimedMiner.held = {}
        for i in range(k):
            ring = addrs[i:] + addrs[:i]
            m = TimedMiner(MinerConfig(coordinator=ring, models=["null"], max_concurrency=64),
                           crypto.PrivateKey.generate(), {"null": load_image_backend("null")})
            miners.append(m)
            tasks.append(asyncio.create_task(m.run()))
        for m in miners:
            await asyncio.wait_for(m.registered.wait(), 30)
        await asyncio.sleep(0.3)
        chans = [channel(a) for a in addrs]
        stubs = [coordinator_pb2_grpc.CoordinatorServiceStub(await c.__aenter__()) for c in chans]
        try:
            rr = itertools.cycle(range(k))
            submitted: dict[str, float] = {}
            sem = asyncio.Semaphore(concurrency)

            async def one(stub: coordinator_pb2_grpc.CoordinatorServiceStub) -> str:
                async with sem:
                    t = time.perf_counter()
                    job = (await stub.SubmitJob(coordinator_pb2.SubmitJobRequest(model="null", params=PARAMS),
                                                metadata=MD, timeout=30)).job
                    submitted[job.job_id] = t
                    return job.job_id

            async def held(ids: list[str], deadline: float) -> None:
                while not all(j in TimedMiner.held for j in ids) and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)

            await asyncio.gather(*(one(stubs[next(rr)]) for _ in range(100)))  # warm-up
            await held(list(submitted), time.monotonic() + 60)
            warm = set(submitted)
            t0 = time.perf_counter()
            await asyncio.gather(*(one(stubs[next(rr)]) for _ in range(n)))
            ids = [j for j in submitted if j not in warm]
            await held(ids, time.monotonic() + 120)
            missing = [j for j in ids if j not in TimedMiner.held]
            if missing:
                raise RuntimeError(f"{name}: {len(missing)} of {n} jobs never reached a miner")
            span = max(TimedMiner.held[j] for j in ids) - t0
            seq: list[float] = []
            for i in range(200):  # unloaded: one job at a time, what a single client sees
                t = time.perf_counter()
                job_id = await one(stubs[i % k])
                while job_id not in TimedMiner.held:
                    await asyncio.sleep(0)
                seq.append((TimedMiner.held[job_id] - t) * 1000)
            lat = [(TimedMiner.held[j] - submitted[j]) * 1000 for j in ids]
            fo = None
            if failover and k > 1:
                victim = miners[0]
                t_kill = time.perf_counter()
                procs[0].kill()  # kill -9: no goodbye to its miner
                while not (victim.connected and victim.coordinator != addrs[0]):
                    if time.perf_counter() - t_kill > 30:
                        raise RuntimeError("the miner of the killed coordinator did not move within 30 s")
                    await asyncio.sleep(0.005)
                t_moved = time.perf_counter() - t_kill
                job_id = await one(stubs[1])
                while job_id not in TimedMiner.held:
                    await asyncio.sleep(0.005)
                fo = (t_moved, time.perf_counter() - t_kill)
        finally:
            for c in chans:
                await c.__aexit__(None, None, None)
    finally:
        for m in miners:
            m.stop()
        for t in tasks:
            await asyncio.wait_for(t, 10)
        for p in procs:
            p.kill()
            p.wait()
    return Result(name, n / span, seq, lat, fo)


async def run(n: int, concurrency: int, most: int) -> None:
    results = []
    with tempfile.TemporaryDirectory() as tmp, LocalPostgres(durable=True) as pg:
        root = Path(tmp)
        (root / "lmdb").mkdir()
        results.append(await measure("1 coordinator, LMDB (default)", root / "lmdb", 1, n, concurrency))
        for k in range(1, most + 1):
            (root / f"pg{k}").mkdir()
            url = pg.create_database(f"bench_{k}")
            results.append(await measure(f"{k} coordinator(s), one PostgreSQL database", root / f"pg{k}", k, n,
                                         concurrency, url, failover=k == most))
    print(f"coordinators benchmark ({machine()}), {n} jobs, {concurrency} submits in flight round-robin, "
          "one null-backend miner per coordinator (all in this process), PostgreSQL 15 on loopback")
    base = results[0]
    for r in results:
        print(f"  {r.name}:")
        print(f"    submit -> a miner holds the job, one at a time: {summary(r.seq)}")
        print(f"    submit -> a miner holds the job, {concurrency} in flight: {summary(r.lat)}")
        print(f"    {r.rate:.0f} jobs/s held" + ("" if r is base else f" ({r.rate / base.rate:.2f}x LMDB; "
              f"one-at-a-time p50 {pct(r.seq, 50) / pct(base.seq, 50):.2f}x)"))
        if r.failover:
            moved, served = r.failover
            print(f"    kill -9 of a coordinator: its miner registered with another after {moved:.2f} s "
                  f"({moved / HEARTBEAT_S:.2f} heartbeat intervals; goal <= 2), a new job held after {served:.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max", type=int, default=3, help="coordinators in the largest pool")
    args = ap.parse_args()
    asyncio.run(run(args.jobs, args.concurrency, args.max))


if __name__ == "__main__":
    main()
