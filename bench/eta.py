#!/usr/bin/env python3
"""ETA accuracy: how often the queue estimate a client sees at submission matches when its job
really started (docs/coordinator.md, "Queue position and ETA").

A real coordinator process; two miner daemons in this process whose jobs take 100 ms per step
(steps drawn 1-8 per job from a fixed seed, so service times vary 8x); bursts of jobs submitted
at once. For each job with an estimate: the p50 and p90 it was given right after SubmitJob, and
the real wait (submission to ASSIGNED, from the job's story). Printed: the share of p50 estimates
within max(5 s, 50%) of the real wait (the issue's criterion), within max(0.5 s, 50%) (stricter,
since these waits are seconds), and the share of real waits at or below p90.

    python bench/eta.py [--bursts 4] [--jobs-per-burst 12] [--miners 2]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import API_KEY, machine, start_coordinator  # noqa: E402

from aitbc import crypto  # noqa: E402
from aitbc.config import MinerConfig  # noqa: E402
from aitbc.miner.backend import ImageOutput, ImageRequest, NullImageBackend  # noqa: E402
from aitbc.miner.daemon import MinerDaemon  # noqa: E402
from aitbc.rpc import channel  # noqa: E402
from aitbc.v1 import coordinator_pb2, coordinator_pb2_grpc, job_pb2  # noqa: E402

STEP_S = 0.1


class PacedBackend(NullImageBackend):
    """The null backend, STEP_S per step: a stand-in for a GPU whose jobs take longer with more steps."""

    def generate(self, req: ImageRequest, on_step: Callable[[int, int], None], cancel: threading.Event) -> ImageOutput:
        time.sleep(req.steps * STEP_S)
        return super().generate(req, on_step, cancel)


async def run(bursts: int, per_burst: int, n_miners: int) -> None:
    rng = random.Random(7)
    md = (("x-api-key", API_KEY),)
    with tempfile.TemporaryDirectory() as tmp:
        proc, addr = start_coordinator(Path(tmp))
        miners = [MinerDaemon(MinerConfig(coordinator=addr, models=["null"], max_concurrency=1),
                              crypto.PrivateKey.generate(), {"null": PacedBackend()}) for _ in range(n_miners)]
        tasks = [asyncio.create_task(m.run()) for m in miners]
        try:
            for m in miners:
                await asyncio.wait_for(m.registered.wait(), 30)
            async with channel(addr) as ch:
                stub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
                seen: list[tuple[str, float, job_pb2.QueueInfo]] = []
                for _ in range(bursts):
                    ids = []
                    for _ in range(per_burst):
                        params = job_pb2.JobParams(image=job_pb2.ImageParams(
                            prompt="eta", steps=rng.randint(1, 8), width=64, height=64, seed=rng.randrange(1 << 30)))
                        job = (await stub.SubmitJob(coordinator_pb2.SubmitJobRequest(model="null", params=params),
                                                    metadata=md)).job
                        got = (await stub.GetJob(coordinator_pb2.GetJobRequest(job_id=job.job_id), metadata=md)).job
                        ids.append(job.job_id)
                        if got.state == job_pb2.JOB_STATE_QUEUED and got.queue.eta_known:
                            seen.append((job.job_id, got.created_at_unix_ms / 1000, got.queue))
                    for job_id in ids:  # the burst drains before the next one
                        while True:
                            j = (await stub.GetJob(coordinator_pb2.GetJobRequest(job_id=job_id), metadata=md)).job
                            if j.state == job_pb2.JOB_STATE_COMPLETED:
                                break
                            await asyncio.sleep(0.05)
                rows = []
                for job_id, submitted, q in seen:
                    j = (await stub.GetJob(coordinator_pb2.GetJobRequest(job_id=job_id), metadata=md)).job
                    assigned = next(t.at_unix_ms for t in j.story if t.to_state == job_pb2.JOB_STATE_ASSIGNED) / 1000
                    rows.append((assigned - submitted, q.eta_p50_ms / 1000, q.eta_p90_ms / 1000))
        finally:
            for m in miners:
                m.stop()
            await asyncio.gather(*tasks, return_exceptions=True)
            proc.terminate()
            proc.wait(10)
    n = len(rows)
    if not n:
        print("no queued job had an estimate: nothing to measure")
        return
    loose = sum(abs(real - p50) <= max(5.0, 0.5 * real) for real, p50, _ in rows)
    strict = sum(abs(real - p50) <= max(0.5, 0.5 * real) for real, p50, _ in rows)
    covered = sum(real <= p90 for real, _, p90 in rows)
    waits = sorted(r for r, _, _ in rows)
    errs = sorted(abs(r - p) for r, p, _ in rows)
    print(f"{n} queued jobs with an estimate ({bursts} bursts of {per_burst}, {n_miners} miners, "
          f"{STEP_S * 1000:.0f} ms/step, 1-8 steps); real waits median {waits[n // 2]:.2f} s, max {waits[-1]:.2f} s")
    print(f"  p50 within max(5 s, 50%) of the real wait: {loose}/{n} = {loose / n:.0%}")
    print(f"  p50 within max(0.5 s, 50%):                {strict}/{n} = {strict / n:.0%}"
          f" (median error {errs[n // 2]:.2f} s)")
    print(f"  real wait <= p90:                          {covered}/{n} = {covered / n:.0%} (goal ~90%)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bursts", type=int, default=4)
    ap.add_argument("--jobs-per-burst", type=int, default=12)
    ap.add_argument("--miners", type=int, default=2)
    args = ap.parse_args()
    print(f"ETA accuracy ({machine()})")
    asyncio.run(run(args.bursts, args.jobs_per_burst, args.miners))


if __name__ == "__main__":
    main()
