#!/usr/bin/env python3
"""Webhook delivery: a real coordinator process POSTs each job's end to a real HTTP receiver here;
prints the delay from the job's end (its finished_at) to the POST's arrival, and the same with a
receiver that fails a share of first attempts (a retry after a jittered wait).

    python bench/webhooks.py [--jobs 200] [--fail-share 0.2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import API_KEY, machine, start_coordinator, summary  # noqa: E402

from aitbc import crypto  # noqa: E402
from aitbc.config import MinerConfig  # noqa: E402
from aitbc.miner.backend import load_image_backend  # noqa: E402
from aitbc.miner.daemon import MinerDaemon  # noqa: E402
from aitbc.rpc import channel  # noqa: E402
from aitbc.v1 import coordinator_pb2, coordinator_pb2_grpc, job_pb2  # noqa: E402

SECRET = "bench-webhook-secret-0123"


def receiver(fail_share: float, rng: random.Random) -> tuple[ThreadingHTTPServer, dict[str, float], list[int]]:
    arrived: dict[str, float] = {}  # job id -> wall-clock ms of the first 2xx-answered POST
    failed: list[int] = [0]

    class H(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
            if body["job_id"] not in arrived and rng.random() < fail_share:
                failed[0] += 1
                self.send_response(503)
            else:
                arrived.setdefault(body["job_id"], time.time() * 1000)
                self.send_response(204)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, arrived, failed


async def run_once(n: int, fail_share: float) -> tuple[list[float], int]:
    srv, arrived, failed = receiver(fail_share, random.Random(7))
    with tempfile.TemporaryDirectory() as tmp:
        proc, addr = start_coordinator(Path(tmp), client={
            "webhook_url": f"http://127.0.0.1:{srv.server_address[1]}/hook", "webhook_secret": SECRET})
        try:
            conf = MinerConfig(coordinator=addr, models=["null"], max_concurrency=8)
            miner = MinerDaemon(conf, crypto.PrivateKey.generate(), {"null": load_image_backend("null")})
            task = asyncio.create_task(miner.run())
            await asyncio.wait_for(miner.registered.wait(), 30)
            md = (("x-api-key", API_KEY),)
            params = job_pb2.JobParams(image=job_pb2.ImageParams(prompt="bench", steps=1, width=64, height=64, seed=1))
            async with channel(addr) as ch:
                stub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
                ids = [(await stub.SubmitJob(coordinator_pb2.SubmitJobRequest(model="null", params=params),
                                             metadata=md)).job.job_id for _ in range(n)]
                deadline = time.monotonic() + 120
                while len(arrived) < n and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                finished = {}
                for j in ids:
                    job = (await stub.GetJob(coordinator_pb2.GetJobRequest(job_id=j), metadata=md)).job
                    finished[j] = job.finished_at_unix_ms
            miner.stop()
            await asyncio.wait_for(task, 10)
        finally:
            proc.terminate()
            proc.wait()
            srv.shutdown()
    delays = [arrived[j] - finished[j] for j in ids if j in arrived and finished[j]]
    return delays, failed[0]


async def main_async(n: int, fail_share: float) -> None:
    print(f"webhook delivery ({machine()}), {n} jobs, null backend, coordinator and receiver on loopback")
    ok, _ = await run_once(n, 0.0)
    print(f"  job end -> POST arrived, receiver always 2xx: {summary(ok)} ({len(ok)}/{n} delivered)")
    flaky, failed = await run_once(n, fail_share)
    print(f"  receiver fails {fail_share:.0%} of first attempts ({failed} 503s): {summary(flaky)} "
          f"({len(flaky)}/{n} delivered; a retry waits up to 1 s, then 2 s ...)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--fail-share", type=float, default=0.2)
    args = ap.parse_args()
    asyncio.run(main_async(args.jobs, args.fail_share))


if __name__ == "__main__":
    main()
