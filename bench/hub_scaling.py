#!/usr/bin/env python3
"""Hub benchmarks through real processes: an 8-image job split across 1, 2 and 4 tiny-sd miners
(wall time, speed-up, scaling efficiency), and the measured verification cost per sampling rate
(re-executions as a share of all executions, null backend, 3 miners).

    python bench/hub_scaling.py [--miners 1,2,4] [--steps 10] [--jobs 100]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import MD, machine, start_coordinator, start_miner, submit_and_watch  # noqa: E402

from aitbc.hub.payout import expected_verification_cost_pct, verification_cost_pct  # noqa: E402
from aitbc.rpc import channel  # noqa: E402
from aitbc.v1 import coordinator_pb2, coordinator_pb2_grpc, job_pb2  # noqa: E402


async def wait_miners(stub: coordinator_pb2_grpc.CoordinatorServiceStub, n: int) -> None:
    while sum(m.connected for m in (await stub.ListMiners(coordinator_pb2.ListMinersRequest(), metadata=MD)).miners) < n:
        await asyncio.sleep(0.2)


async def scaling(counts: list[int], steps: int) -> None:
    times = {}
    for n in counts:
        with tempfile.TemporaryDirectory() as tmp_s:
            tmp = Path(tmp_s)
            coord, addr = start_coordinator(tmp)
            miners = []
            for i in range(n):
                (tmp / f"m{i}").mkdir()
                miners.append(start_miner(tmp / f"m{i}", addr, ["tiny-sd"], cpu_threads=1))
            try:
                async with channel(addr) as ch:
                    stub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
                    await wait_miners(stub, n)
                    params = job_pb2.JobParams(image=job_pb2.ImageParams(prompt="eight lighthouses", steps=steps,
                                                                         images=8, seed=1))
                    await submit_and_watch(stub, "tiny-sd", params)  # warm-up
                    w = await submit_and_watch(stub, "tiny-sd", params)
                    times[n] = w.seconds
                    shards = len(w.job.shard_job_ids) or 1
            finally:
                for p in [*miners, coord]:
                    p.terminate()
                    p.wait(10)
        print(f"  {n} miner(s): {times[n]:.2f} s for 8 images ({shards} shard(s)); speed-up "
              f"{times[counts[0]] / times[n]:.2f}x, efficiency {times[counts[0]] / (n * times[n]):.0%}", flush=True)


async def verification_cost(jobs: int, rates: list[float]) -> None:
    for rate in rates:
        with tempfile.TemporaryDirectory() as tmp_s:
            tmp = Path(tmp_s)
            conf_extra = {"verify_rate": rate, "verify_timeout_s": 30.0}
            coord, addr = start_coordinator(tmp, **conf_extra)
            miners = []
            for i in range(3):
                (tmp / f"m{i}").mkdir()
                miners.append(start_miner(tmp / f"m{i}", addr, ["null"]))
            try:
                async with channel(addr) as ch:
                    stub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
                    await wait_miners(stub, 3)
                    for i in range(jobs):
                        params = job_pb2.JobParams(image=job_pb2.ImageParams(prompt=f"v{i}", steps=2, width=64, height=64,
                                                                             seed=i))
                        await submit_and_watch(stub, "null", params)
                    await asyncio.sleep(2)
                    served = sum(m.jobs_served for m in (await stub.ListMiners(coordinator_pb2.ListMinersRequest(),
                                                                                 metadata=MD)).miners)
            finally:
                for p in [*miners, coord]:
                    p.terminate()
                    p.wait(10)
        extra = served - jobs
        print(f"  rate {rate:.2f}: {extra} re-executions for {jobs} jobs = {verification_cost_pct(extra, jobs):.1f}% "
              f"extra compute ({100 * extra / served:.1f}% of all executions; expected "
              f"{expected_verification_cost_pct(rate):.0f}%)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--miners", default="1,2,4")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--jobs", type=int, default=100)
    ap.add_argument("--rates", default="0.1,0.25")
    args = ap.parse_args()
    print(f"hub benchmarks ({machine()})")
    print(f"8-image job (tiny-sd 64x64, {args.steps} steps) split across miner processes (torch 1 thread each):")
    asyncio.run(scaling([int(x) for x in args.miners.split(",")], args.steps))
    print(f"verification cost, {args.jobs} single-image jobs, 3 miners (null backend):")
    asyncio.run(verification_cost(args.jobs, [float(x) for x in args.rates.split(",")]))


if __name__ == "__main__":
    main()
