#!/usr/bin/env python3
"""Dispatch benchmark: submit -> the miner holds the job, with the null backend (no inference).

Everything else is real: a coordinator process (LMDB, auth, validation, dispatch, result and
receipt checks, attestation), a MinerDaemon in this process (registration, Work stream, signed
receipts), clients over gRPC. Beside it, a raw grpc.aio unary echo measured in the same run.

    python bench/dispatch.py [--jobs 2000] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import API_KEY, echo_baseline, machine, start_coordinator, summary  # noqa: E402

from aitbc import crypto, telemetry  # noqa: E402
from aitbc.config import MinerConfig  # noqa: E402
from aitbc.miner.backend import load_image_backend  # noqa: E402
from aitbc.miner.daemon import MinerDaemon  # noqa: E402
from aitbc.rpc import channel  # noqa: E402
from aitbc.v1 import coordinator_pb2, coordinator_pb2_grpc, job_pb2  # noqa: E402


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class TimedMiner(MinerDaemon):
    held: dict[str, float] = {}

    def _start_job(self, assignment):  # type: ignore[no-untyped-def]
        self.held[assignment.task.job_id] = time.perf_counter()
        super()._start_job(assignment)


async def run(n: int, concurrency: int) -> None:
    telemetry.configure("bench")  # AITBC_TRACING (inherited by the coordinator) traces the miner here too
    with tempfile.TemporaryDirectory() as tmp:
        proc, addr = start_coordinator(Path(tmp))
        try:
            conf = MinerConfig(coordinator=addr, models=["null"], max_concurrency=64)
            miner = TimedMiner(conf, crypto.PrivateKey.generate(), {"null": load_image_backend("null")})
            task = asyncio.create_task(miner.run())
            await asyncio.wait_for(miner.registered.wait(), 30)
            await asyncio.sleep(0.3)
            md = (("x-api-key", API_KEY),)
            async with channel(addr) as ch:
                stub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
                params = job_pb2.JobParams(image=job_pb2.ImageParams(prompt="bench", steps=1, width=64, height=64, seed=1))
                submitted: dict[str, float] = {}
                sem = asyncio.Semaphore(concurrency)

                async def one() -> None:
                    async with sem:
                        t = time.perf_counter()
                        job = (await stub.SubmitJob(coordinator_pb2.SubmitJobRequest(model="null", params=params), metadata=md)).job
                        submitted[job.job_id] = t

                await asyncio.gather(*(one() for _ in range(100)))  # warm-up
                warm = set(submitted)
                cpu0, own0 = cpu_seconds(proc.pid), cpu_seconds(os.getpid())
                t0 = time.perf_counter()
                await asyncio.gather(*(one() for _ in range(n)))
                while not all(j in miner.held for j in submitted) and time.perf_counter() - t0 < 120:
                    await asyncio.sleep(0.01)
                coord_cpu_ms = (cpu_seconds(proc.pid) - cpu0) * 1000 / n
                own_cpu_ms = (cpu_seconds(os.getpid()) - own0) * 1000 / n  # the clients and the miner
                ids = [j for j in submitted if j not in warm]
                # unloaded latency: one job at a time, what a single client sees
                seq: list[float] = []
                for _ in range(200):
                    t = time.perf_counter()
                    job = (await stub.SubmitJob(coordinator_pb2.SubmitJobRequest(model="null", params=params), metadata=md)).job
                    while job.job_id not in miner.held:
                        await asyncio.sleep(0)
                    seq.append((miner.held[job.job_id] - t) * 1000)
                deadline = time.monotonic() + 120
                while not all(j in miner.held for j in ids) and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                held_span = max(miner.held[j] for j in ids) - t0
                while miner.attested < n + 300 and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                done_span = time.perf_counter() - t0
            lat = [(miner.held[j] - submitted[j]) * 1000 for j in ids]
            miner.stop()
            await asyncio.wait_for(task, 10)
        finally:
            proc.terminate()
            proc.wait()
    echo_lat, echo_rate = await echo_baseline(n, concurrency)
    print(f"dispatch benchmark ({machine()}), {n} jobs, {concurrency} submits in flight, null backend")
    print(f"  submit -> miner holds job, one at a time: {summary(seq)}")
    print(f"  submit -> miner holds job, {concurrency} in flight: {summary(lat)}")
    print(f"  dispatch rate: {n / held_span:.0f} jobs/s held; {miner.attested - 300} completed with receipts the "
          f"coordinator attested (ResultAccepted) at {(miner.attested - 300) / done_span:.0f} jobs/s")
    print(f"  CPU per job ({concurrency} in flight): coordinator {coord_cpu_ms:.2f} ms (all its threads), "
          f"clients + miner {own_cpu_ms:.2f} ms; {os.cpu_count()} cores")
    print(f"  raw grpc.aio unary echo, same concurrency: {summary(echo_lat)}; {echo_rate:.0f} calls/s")
    print(f"  ratio: dispatch p50 / echo p50 = {sorted(lat)[len(lat) // 2] / sorted(echo_lat)[len(echo_lat) // 2]:.1f}x; "
          f"jobs/s / echo calls/s = {n / held_span / echo_rate:.2f}")
    print("  (goal: p50 <= 3 ms, >= 1,500 jobs/s on 2 cores)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=32)
    args = ap.parse_args()
    asyncio.run(run(args.jobs, args.concurrency))


if __name__ == "__main__":
    main()
