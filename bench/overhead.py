#!/usr/bin/env python3
"""Overhead benchmark: one image job through the network vs the same pipeline called directly.

Network path: SubmitJob -> coordinator process -> Work stream -> MinerDaemon (tiny pipeline) ->
chunks + signed receipt -> verification + attestation -> WatchJob -> GetJobResult. Direct path:
the same backend's generate() in this process. Same prompt, steps, size and seed.

    python bench/overhead.py [--runs 5] [--steps 20]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, start_coordinator, submit_and_watch  # noqa: E402

from aitbc import crypto  # noqa: E402
from aitbc.config import MinerConfig  # noqa: E402
from aitbc.miner.backend import ImageRequest, load_image_backend  # noqa: E402
from aitbc.miner.daemon import MinerDaemon, configure_cpu_threads  # noqa: E402
from aitbc.rpc import channel  # noqa: E402
from aitbc.v1 import coordinator_pb2_grpc, job_pb2  # noqa: E402


async def run(runs: int, steps: int) -> None:
    import torch

    backend = load_image_backend("tiny-sd", "cpu")
    req = ImageRequest("a futuristic city skyline at night", "", steps, 7.5, 0, 0, 1, 7)

    def direct_runs() -> list[float]:
        backend.generate(req, lambda *_: None, threading.Event())  # warm-up
        out = []
        for _ in range(runs):
            t = time.perf_counter()
            backend.generate(req, lambda *_: None, threading.Event())
            out.append(time.perf_counter() - t)
        return out

    all_threads = torch.get_num_threads()
    direct_all = direct_runs()
    threads = configure_cpu_threads("cpu", 0)  # what the miner daemon does on CPU
    direct = direct_runs()
    network = []
    in_miner = []
    with tempfile.TemporaryDirectory() as tmp:
        proc, addr = start_coordinator(Path(tmp))
        try:
            miner = MinerDaemon(MinerConfig(coordinator=addr, models=["tiny-sd"]), crypto.PrivateKey.generate(),
                                {"tiny-sd": backend})
            task = asyncio.create_task(miner.run())
            await asyncio.wait_for(miner.registered.wait(), 30)
            await asyncio.sleep(0.3)
            params = job_pb2.JobParams(image=job_pb2.ImageParams(prompt=req.prompt, steps=steps, seed=7))
            async with channel(addr) as ch:
                stub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
                for i in range(runs + 1):
                    w = await submit_and_watch(stub, "tiny-sd", params, fetch_result=True)
                    if i:  # the first run is a warm-up
                        network.append(w.seconds)
                        in_miner.append(w.job.units / 1000)
            miner.stop()
            await asyncio.wait_for(task, 10)
        finally:
            proc.terminate()
            proc.wait()
    d, n = statistics.median(direct), statistics.median(network)
    print(f"overhead benchmark ({machine()}), tiny-sd 64x64, {steps} steps, median of {runs}")
    print(f"  direct pipeline call, torch on all {all_threads} threads: {statistics.median(direct_all) * 1000:.0f} ms")
    print(f"  direct pipeline call, {threads} thread(s) as the miner runs it: {d * 1000:.0f} ms")
    print(f"  through the network:       {n * 1000:.0f} ms (submit, dispatch, progress, upload, receipt, attest, fetch)")
    print(f"  of which the pipeline call inside the miner: {statistics.median(in_miner) * 1000:.0f} ms (gpu_ms)")
    print(f"  ratio network / direct (same threads): {n / d:.3f}x  (+{(n - d) * 1000:.0f} ms; goal <= 1.05x)")
    print(f"  ratio network / fastest direct:        {n / min(d, statistics.median(direct_all)):.3f}x")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    asyncio.run(run(args.runs, args.steps))


if __name__ == "__main__":
    main()
