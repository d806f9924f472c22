#!/usr/bin/env python3
"""Load soak: a real coordinator and miner (null backends: everything real but the models) at 70%
of the saturation measured in the same run, for --duration seconds (default 600; CI runs a short
soak through tests/fault/test_soak.py). Prints throughput, p50/p99 latencies, the processes'
memory over time, and the work lost (goal: none, and flat memory).

    python bench/load.py [--duration 600] [--fraction 0.7] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import grpc
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import API_KEY, machine, pct, start_coordinator, start_miner  # noqa: E402

from aitbc import jobs  # noqa: E402
from aitbc.rpc import channel  # noqa: E402
from aitbc.v1 import coordinator_pb2, coordinator_pb2_grpc, job_pb2  # noqa: E402

MD = (("x-api-key", API_KEY),)


def anon_mib(proc: psutil.Process) -> float:
    """Private (anonymous) memory: what a leak grows. RSS also counts the LMDB file pages a
    process has touched, which grow with the data stored and are the kernel's to reclaim."""
    try:
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return proc.memory_info().rss / 2**20


def request(i: int) -> coordinator_pb2.SubmitJobRequest:
    if i % 2:
        params = job_pb2.JobParams(image=job_pb2.ImageParams(prompt=f"load {i}", steps=2, width=64, height=64, seed=i))
        return coordinator_pb2.SubmitJobRequest(model="null", params=params, request_id=f"load-{i}")
    params = job_pb2.JobParams(text=job_pb2.TextParams(prompt=f"load {i}", max_new_tokens=16, seed=i))
    return coordinator_pb2.SubmitJobRequest(model="null-text", params=params, request_id=f"load-{i}")


class Driver:
    def __init__(self, stub: coordinator_pb2_grpc.CoordinatorServiceStub) -> None:
        self.stub = stub
        self.accepted: dict[str, float] = {}
        self.done: dict[str, int] = {}
        self.latency_ms: list[float] = []
        self.refused = 0
        self.refusals: dict[str, int] = {}  # why, for the report
        self.n = 0

    async def one(self) -> None:
        self.n += 1
        t = time.perf_counter()
        try:
            job = (await self.stub.SubmitJob(request(self.n), metadata=MD, timeout=10)).job
        except grpc.aio.AioRpcError as exc:
            self.refused += 1
            key = f"{exc.code().name}: {(exc.details() or '')[:80]}"
            self.refusals[key] = self.refusals.get(key, 0) + 1
            return
        self.accepted[job.job_id] = t
        async for ev in self.stub.WatchJob(coordinator_pb2.WatchJobRequest(job_id=job.job_id), metadata=MD, timeout=120):
            if ev.WhichOneof("event") == "job" and ev.job.state in jobs.TERMINAL:
                self.done[job.job_id] = ev.job.state
                self.latency_ms.append((time.perf_counter() - t) * 1000)


def sample(procs: dict[str, psutil.Process], t: float) -> dict[str, float]:
    out = {"t": round(t, 1)}
    for k, p in procs.items():
        out[k] = anon_mib(p)
        out[k + "_rss"] = p.memory_info().rss / 2**20
    return out


async def saturation(stub: coordinator_pb2_grpc.CoordinatorServiceStub, seconds: float = 5.0) -> float:
    d = Driver(stub)
    sem = asyncio.Semaphore(48)
    stop = time.monotonic() + seconds
    tasks = []

    async def bounded() -> None:
        async with sem:
            await d.one()

    while time.monotonic() < stop:
        await sem.acquire()
        sem.release()
        tasks.append(asyncio.create_task(bounded()))
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    return len(d.done) / seconds


async def soak(duration: float, fraction: float) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        coord, addr = start_coordinator(Path(tmp))  # verify_rate 0: one miner
        miner = start_miner(Path(tmp), addr, ["null", "null-text"], max_concurrency=16)
        procs = {"coordinator": psutil.Process(coord.pid), "miner": psutil.Process(miner.pid)}
        try:
            async with channel(addr) as ch:
                stub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
                while len((await stub.ListModels(coordinator_pb2.ListModelsRequest(), metadata=MD)).models) < 2:
                    await asyncio.sleep(0.1)
                sat = await saturation(stub)
                rate = max(1.0, sat * fraction)
                d = Driver(stub)
                memory: list[dict[str, float]] = []
                t0 = time.monotonic()
                tasks: list[asyncio.Task[None]] = []
                next_sample = t0
                while (now := time.monotonic()) - t0 < duration:
                    if now >= next_sample:
                        memory.append(sample(procs, now - t0))
                        next_sample += max(1.0, duration / 20)
                    tasks.append(asyncio.create_task(d.one()))
                    await asyncio.sleep(max(0.0, t0 + len(tasks) / rate - time.monotonic()))
                await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 180)
                elapsed = time.monotonic() - t0
                memory.append(sample(procs, elapsed))
                states = {}
                for job_id in d.accepted:
                    if job_id not in d.done:  # ask: never lose track of a job the network accepted
                        job = (await stub.GetJob(coordinator_pb2.GetJobRequest(job_id=job_id), metadata=MD)).job
                        if job.state in jobs.TERMINAL:
                            d.done[job_id] = job.state
                for st in d.done.values():
                    states[jobs.state_name(st)] = states.get(jobs.state_name(st), 0) + 1
        finally:
            miner.terminate()
            coord.terminate()
            miner.wait(10)
            coord.wait(10)
    return {
        "machine": machine(), "duration_s": round(elapsed, 1), "saturation_jobs_per_s": round(sat, 1),
        "offered_jobs_per_s": round(rate, 1), "accepted": len(d.accepted), "refused": d.refused, "refusals": d.refusals,
        "finished": len(d.done), "lost": len(d.accepted) - len(d.done), "states": states,
        "throughput_jobs_per_s": round(len(d.done) / elapsed, 1),
        "latency_ms": {"p50": round(pct(d.latency_ms, 50), 1), "p99": round(pct(d.latency_ms, 99), 1)},
        "memory_mb": memory,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=600.0)
    ap.add_argument("--fraction", type=float, default=0.7)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    r = asyncio.run(soak(args.duration, args.fraction))
    mem = r["memory_mb"]
    print(f"load soak ({r['machine']}): {r['duration_s']} s at {args.fraction:.0%} of saturation "
          f"({r['saturation_jobs_per_s']} jobs/s measured; offered {r['offered_jobs_per_s']} jobs/s)")
    print(f"  accepted {r['accepted']}, finished {r['finished']} {r['states']}, lost {r['lost']}, refused {r['refused']}"
          + (f" ({r['refusals']})" if r["refusals"] else ""))
    print(f"  throughput {r['throughput_jobs_per_s']} jobs/s; submit -> finished p50 {r['latency_ms']['p50']} ms, "
          f"p99 {r['latency_ms']['p99']} ms")
    for k in ("coordinator", "miner"):
        print(f"  {k} private memory: {mem[0][k]:.0f} MiB -> {mem[-1][k]:.0f} MiB (max {max(m[k] for m in mem):.0f}); "
              f"RSS incl. LMDB file pages {mem[0][k + '_rss']:.0f} -> {mem[-1][k + '_rss']:.0f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
