#!/usr/bin/env python3
"""Queue wait of paid jobs vs free jobs under overload (issue 15, docs/economy.md "Paid jobs").

Processes: a single-authority ledger node with the economy, a coordinator settling to it, and in
this process two miners whose backend is the null one plus a fixed service time per job (so the
queue builds up at a known rate: the figure measured is the coordinator's ordering, not inference).
The client's chain key is funded by MINTs of receipts its own key served (tokens only come from
served compute) and deposits escrow for the coordinator. Then jobs arrive faster than the miners
serve them, every other one paid (a priority fee), and each job's queue wait (QUEUED -> ASSIGNED,
from its story) is reported for both kinds.

    python bench/fee_queue.py [--jobs 120] [--service-ms 40] [--miners 2] [--overload 2.0]
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import MD, machine, pct, start_coordinator  # noqa: E402
from settlement import start_node  # noqa: E402

from aitbc import crypto, jobs, receipts  # noqa: E402
from aitbc.config import MinerConfig  # noqa: E402
from aitbc.ledger.client import LedgerClient  # noqa: E402
from aitbc.miner.backend import ImageOutput, ImageRequest, NullImageBackend  # noqa: E402
from aitbc.miner.daemon import MinerDaemon  # noqa: E402
from aitbc.rpc import channel  # noqa: E402
from aitbc.v1 import coordinator_pb2, coordinator_pb2_grpc, job_pb2  # noqa: E402

S = job_pb2.JobState


class TimedNull(NullImageBackend):
    """The null backend, taking `service_s` per job (a stand-in for a GPU's time)."""

    def __init__(self, service_s: float) -> None:
        self.service_s = service_s

    def generate(self, req: ImageRequest, on_step: Any, cancel: threading.Event) -> ImageOutput:
        time.sleep(self.service_s)
        return super().generate(req, on_step, cancel)


async def fund(ledger: str, coord_key: crypto.PrivateKey, client: crypto.PrivateKey, amount: int) -> None:
    """Mint `amount` to `client` for receipts its key signed as a provider (attested by the
    coordinator's key, as the coordinator would), then deposit it all as escrow."""
    async with LedgerClient(ledger) as lc:
        now = jobs.now_ms()
        body = receipts.ReceiptBody(
            job_id=jobs.new_job_id(), provider=client.address, client="bench", units=amount, unit_type="tile_steps",
            price_per_unit=1, model="null", prompt_hash=secrets.token_hex(32), started_at=now, finished_at=now,
            artifact_sha256=secrets.token_hex(32), nonce=secrets.token_hex(16), hub_id="bench", chain_id="aitbc-devnet",
            gpu_ms=1, width=64, height=64, steps=amount, images=1)
        signed = receipts.sign_receipt(body, client).attest(coord_key)
        await lc.wait_for_tx(await lc.mint(client, signed), final=True, timeout=60)
        await lc.wait_for_tx(await lc.escrow_deposit(client, coord_key.address, amount), final=True, timeout=60)


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        node, ledger = start_node(tmp, 200)
        client = crypto.PrivateKey.generate()
        coord, address = start_coordinator(tmp, client={"address": client.address}, ledger=ledger)
        tasks = []
        try:
            coord_key = crypto.load_or_create_key(tmp / "coord.key")
            await fund(ledger, coord_key, client, 10**9)
            backend = TimedNull(args.service_ms / 1000)
            miners = [MinerDaemon(MinerConfig(coordinator=address, models=["null"], price_per_unit=1),
                                  crypto.PrivateKey.generate(), {"null": backend}) for _ in range(args.miners)]
            tasks = [asyncio.create_task(mnr.run()) for mnr in miners]
            for mnr in miners:
                await asyncio.wait_for(mnr.registered.wait(), 30)
            async with channel(address) as ch:
                stub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
                capacity = args.miners / (args.service_ms / 1000)  # jobs per second the miners serve
                gap = 1 / (capacity * args.overload)
                submitted: list[tuple[str, bool]] = []
                t0 = time.perf_counter()
                for i in range(args.jobs):
                    req = coordinator_pb2.SubmitJobRequest(model="null", params=job_pb2.JobParams(
                        image=job_pb2.ImageParams(prompt=f"job {i}", steps=4, seed=i)))
                    paid = i % 2 == 1
                    if paid:
                        req.priority_fee = 10
                    job = (await stub.SubmitJob(req, metadata=MD)).job
                    submitted.append((job.job_id, paid))
                    await asyncio.sleep(max(0.0, t0 + (i + 1) * gap - time.perf_counter()))
                waits: dict[bool, list[float]] = {True: [], False: []}
                for job_id, paid in submitted:
                    while True:
                        job = (await stub.GetJob(coordinator_pb2.GetJobRequest(job_id=job_id), metadata=MD)).job
                        if job.state in jobs.TERMINAL:
                            break
                        await asyncio.sleep(0.05)
                    queued = next(t.at_unix_ms for t in job.story if t.to_state == S.JOB_STATE_QUEUED)
                    assigned = next(t.at_unix_ms for t in job.story if t.to_state == S.JOB_STATE_ASSIGNED)
                    waits[paid].append(float(assigned - queued))
        finally:
            for mnr_task in tasks:
                mnr_task.cancel()
            coord.terminate()
            node.terminate()
            coord.wait(10)
            node.wait(10)
    paid_w, free_w = waits[True], waits[False]
    print(f"fee queue benchmark ({machine()}), {args.jobs} jobs arriving at {args.overload:g}x what {args.miners} "
          f"miners serve ({args.service_ms} ms per job), every other job paid (priority fee 10)")
    for name, w in (("paid", paid_w), ("free", free_w)):
        print(f"  {name} jobs: queue wait p50 {pct(w, 50):8.1f} ms  p99 {pct(w, 99):8.1f} ms  n={len(w)}")
    ratio = pct(paid_w, 50) / pct(free_w, 50) if pct(free_w, 50) else 0.0
    print(f"  ratio: paid p50 / free p50 = {ratio:.3f} (paid jobs run first; the free tier gets what is left)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=120)
    p.add_argument("--service-ms", type=int, default=40)
    p.add_argument("--miners", type=int, default=2)
    p.add_argument("--overload", type=float, default=2.0, help="arrival rate / service rate")
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
