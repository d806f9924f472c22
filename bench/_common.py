"""Helpers shared by the benchmarks: percentiles, subprocess coordinator and miner, one job submitted
and watched to its end, raw aio echo baseline."""

from __future__ import annotations

import asyncio
import hashlib
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

from aitbc.v1 import coordinator_pb2, coordinator_pb2_grpc, job_pb2

API_KEY = "bench-api-key"
MD = (("x-api-key", API_KEY),)


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def summary(values_ms: list[float]) -> str:
    return (f"p50 {pct(values_ms, 50):.2f} ms  p99 {pct(values_ms, 99):.2f} ms  "
            f"mean {statistics.fmean(values_ms):.2f} ms  n={len(values_ms)}")


def start_coordinator(tmp: Path, client: dict[str, str] | None = None, key_file: Path | None = None,
                      **extra: object) -> tuple[subprocess.Popen[bytes], str]:
    """A real coordinator process on a free port; returns (process, address). `client`: more keys
    of the bench client's [[clients]] entry (e.g. webhook_url); `key_file`: its attester key (several
    coordinators of one pool share one), else a new one in `tmp`."""
    conf = tmp / "coordinator.toml"
    lines = [
        'listen = "127.0.0.1:0"', f'data_dir = "{tmp / "coord"}"', f'key_file = "{key_file or tmp / "coord.key"}"',
        f'port_file = "{tmp / "coord.port"}"',
        *([] if "verify_rate" in extra else ["verify_rate = 0.0"]),  # one miner: nobody to re-execute on
        # every bench miner is the operator's own (established) unless the bench measures the bootstrap
        *([] if "trust_checks" in extra else ["trust_checks = 0"]),
        *(f"{k} = {v!r}".replace("'", '"') for k, v in extra.items()),
        "", "[[clients]]", 'id = "bench"', f'api_key_sha256 = "{hashlib.sha256(API_KEY.encode()).hexdigest()}"',
        "rate_per_s = 1000000.0", "burst = 1000000", "max_active_jobs = 1000000", "max_streams = 1000000",
        *(f'{k} = "{v}"' for k, v in (client or {}).items()),
    ]
    conf.write_text("\n".join(lines) + "\n")
    log = open(tmp / "coordinator.log", "wb")
    profile = os.environ.get("AITBC_BENCH_PROFILE")  # a path: cProfile the coordinator into it
    prefix = ["-m", "cProfile", "-o", profile] if profile else []
    proc = subprocess.Popen([sys.executable, *prefix, "-m", "aitbc.clients.cli", "coordinator", "--config", str(conf)],
                            stdout=log, stderr=subprocess.STDOUT)
    port_file = tmp / "coord.port"
    deadline = time.monotonic() + 60
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError((tmp / "coordinator.log").read_text())
        time.sleep(0.05)
    return proc, f"127.0.0.1:{port_file.read_text().strip()}"


ECHO_SERVER = r"""
import asyncio, sys, grpc
async def main():
    server = grpc.aio.server()
    async def echo(req, ctx):
        return req
    handler = grpc.method_handlers_generic_handler("bench.Echo", {
        "Echo": grpc.unary_unary_rpc_method_handler(echo, request_deserializer=None, response_serializer=None)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()
asyncio.run(main())
"""


async def echo_baseline(n: int, concurrency: int, payload: bytes = b"x" * 200) -> tuple[list[float], float]:
    """Raw grpc.aio unary echo in another process: latencies (ms) and calls/s at this concurrency."""
    import grpc

    proc = subprocess.Popen([sys.executable, "-c", ECHO_SERVER], stdout=subprocess.PIPE)
    try:
        port = int(proc.stdout.readline())  # type: ignore[union-attr]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = ch.unary_unary("/bench.Echo/Echo")
            lat: list[float] = []
            sem = asyncio.Semaphore(concurrency)

            async def one() -> None:
                async with sem:
                    t = time.perf_counter()
                    await call(payload)
                    lat.append((time.perf_counter() - t) * 1000)

            await asyncio.gather(*(one() for _ in range(min(200, n))))  # warm up
            lat.clear()
            t0 = time.perf_counter()
            await asyncio.gather(*(one() for _ in range(n)))
            return lat, n / (time.perf_counter() - t0)
    finally:
        proc.kill()
        proc.wait()


def start_miner(tmp: Path, coordinator: str, models: list[str], **extra: object) -> subprocess.Popen[bytes]:
    """A real miner daemon process; returns once its ops port answers (models loaded, registered soon)."""
    conf = tmp / "miner.toml"
    lines = [f'coordinator = "{coordinator}"', f'key_file = "{tmp / "miner.key"}"',
             "models = [" + ", ".join(f'"{m}"' for m in models) + "]", 'ops_listen = "127.0.0.1:0"',
             f'port_file = "{tmp / "miner.port"}"', *(f"{k} = {v!r}".replace("'", '"') for k, v in extra.items())]
    conf.write_text("\n".join(lines) + "\n")
    log = open(tmp / "miner.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "aitbc.clients.cli", "miner", "--config", str(conf)],
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not (tmp / "miner.port").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError((tmp / "miner.log").read_text())
        time.sleep(0.05)
    return proc


class Watched(NamedTuple):
    """One job watched to its end; times are time.perf_counter() stamps."""

    job: job_pb2.Job  # as the last Job event on WatchJob left it
    submitted: float  # just before SubmitJob
    first_text: float | None  # the first TextChunk reached this client (text jobs)
    finished: float  # WatchJob ended (and the result was fetched, with fetch_result)
    last_text: float | None = None  # the last TextChunk reached this client (text jobs)

    @property
    def seconds(self) -> float:
        return self.finished - self.submitted


async def submit_and_watch(stub: coordinator_pb2_grpc.CoordinatorServiceStub, model: str, params: job_pb2.JobParams,
                           *, fetch_result: bool = False, check: bool = True) -> Watched:
    """SubmitJob, then WatchJob until the stream ends; with fetch_result also download the output,
    so the time covers what a client waits for. check: fail unless the job COMPLETED."""
    submitted = time.perf_counter()
    job = (await stub.SubmitJob(coordinator_pb2.SubmitJobRequest(model=model, params=params), metadata=MD)).job
    first_text = last_text = None
    async for ev in stub.WatchJob(coordinator_pb2.WatchJobRequest(job_id=job.job_id), metadata=MD):
        kind = ev.WhichOneof("event")
        if kind == "text":
            last_text = time.perf_counter()
            if first_text is None:
                first_text = last_text
        elif kind == "job":
            job = ev.job
    finished = time.perf_counter()
    if check:
        assert job.state == job_pb2.JOB_STATE_COMPLETED, job.error
    if fetch_result:
        async for _ in stub.GetJobResult(coordinator_pb2.GetJobResultRequest(job_id=job.job_id), metadata=MD):
            pass
        finished = time.perf_counter()
    return Watched(job, submitted, first_text, finished, last_text)
