#!/usr/bin/env python3
"""Hub benchmarks through real processes: an 8-image job split across 1, 2 and 4 tiny-sd miners
(wall time, speed-up, scaling efficiency), and the measured verification cost per sampling rate
(re-executions as a share of all executions, null backend, 3 miners), at steady state (every
miner established) and with the trust bootstrap (one trusted miner, two new ones that are
re-executed until they pass --trust-checks verifications; docs/hub.md, "Trust bootstrap").

    python bench/hub_scaling.py [--miners 1,2,4] [--steps 10] [--jobs 100] [--trust-checks 5]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import MD, machine, start_coordinator, start_miner, submit_and_watch  # noqa: E402

from aitbc import crypto  # noqa: E402
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


async def run_jobs(jobs: int, rate: float, trust_checks: int) -> tuple[int, int]:
    """(re-executions, of which while a miner was new) for `jobs` single-image jobs on 3 miners."""
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        for i in range(3):
            (tmp / f"m{i}").mkdir()
        keys = [crypto.load_or_create_key(tmp / f"m{i}" / "miner.key") for i in range(3)]
        conf_extra: dict[str, object] = {"verify_rate": rate, "verify_timeout_s": 30.0, "trust_checks": trust_checks}
        if trust_checks:
            conf_extra["trusted_miners"] = [keys[0].address]  # the operator's own miner
        coord, addr = start_coordinator(tmp, **conf_extra)
        # with the bootstrap on, the trusted miner is dearer, so the newcomers get the client jobs (the
        # case that costs: every one of their results is re-run on the trusted miner until they pass)
        miners = [start_miner(tmp / f"m{i}", addr, ["null"], **({"price_per_unit": 5} if trust_checks and i == 0 else {}))
                  for i in range(3)]
        try:
            async with channel(addr) as ch:
                stub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
                await wait_miners(stub, 3)
                for i in range(jobs):
                    params = job_pb2.JobParams(image=job_pb2.ImageParams(prompt=f"v{i}", steps=2, width=64, height=64,
                                                                         seed=i))
                    await submit_and_watch(stub, "null", params)
                await asyncio.sleep(2)
                status = (await stub.ListMiners(coordinator_pb2.ListMinersRequest(), metadata=MD)).miners
        finally:
            for p in [*miners, coord]:
                p.terminate()
                p.wait(10)
    served = sum(m.jobs_served for m in status)
    checks_of_new = sum(min(trust_checks, m.verifications_passed) for m in status if m.miner_id != keys[0].address) \
        if trust_checks else 0
    return served - jobs, checks_of_new


async def verification_cost(jobs: int, rates: list[float], trust_checks: int) -> None:
    for rate in rates:
        extra, _ = await run_jobs(jobs, rate, 0)
        print(f"  rate {rate:.2f}, every miner established: {extra} re-executions for {jobs} jobs = "
              f"{verification_cost_pct(extra, jobs):.1f}% extra compute ({100 * extra / (jobs + extra):.1f}% of all "
              f"executions; expected {expected_verification_cost_pct(rate):.0f}%)", flush=True)
    if trust_checks:
        rate = rates[0]
        extra, bootstrap = await run_jobs(jobs, rate, trust_checks)
        print(f"  rate {rate:.2f}, trust bootstrap (1 trusted + 2 new miners, trust_checks {trust_checks}): {extra} "
              f"re-executions for {jobs} jobs = {verification_cost_pct(extra, jobs):.1f}% extra compute; the new "
              f"miners' checks until established: {bootstrap} (at most {2 * trust_checks}), the rest at the rate",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--miners", default="1,2,4")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--jobs", type=int, default=100)
    ap.add_argument("--rates", default="0.1,0.25")
    ap.add_argument("--trust-checks", type=int, default=5, help="0 skips the bootstrap measurement")
    ap.add_argument("--skip-scaling", action="store_true", help="only the verification cost")
    args = ap.parse_args()
    print(f"hub benchmarks ({machine()})")
    if not args.skip_scaling:
        print(f"8-image job (tiny-sd 64x64, {args.steps} steps) split across miner processes (torch 1 thread each):")
        asyncio.run(scaling([int(x) for x in args.miners.split(",")], args.steps))
    print(f"verification cost, {args.jobs} single-image jobs, 3 miners (null backend):")
    asyncio.run(verification_cost(args.jobs, [float(x) for x in args.rates.split(",")], args.trust_checks))


if __name__ == "__main__":
    main()
