#!/usr/bin/env python3
"""Settlement lag: job COMPLETED -> its MINT final on the ledger, p50/p99, with 1 s blocks.

Processes: a single-authority ledger node, a coordinator settling to it, a null miner (so the
lag measured is the settlement path, not inference). Jobs are submitted at a steady rate.

    python bench/settlement.py [--jobs 60] [--rate 5] [--block-time 1.0]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import MD, machine, pct, start_coordinator, start_miner, submit_and_watch  # noqa: E402

from aitbc import crypto  # noqa: E402
from aitbc.ledger.genesis import make_genesis  # noqa: E402
from aitbc.rpc import channel  # noqa: E402
from aitbc.v1 import coordinator_pb2, coordinator_pb2_grpc, job_pb2, receipt_pb2  # noqa: E402


def start_node(tmp: Path, block_time_ms: int) -> tuple[subprocess.Popen[bytes], str]:
    node_key = crypto.PrivateKey.generate()
    (tmp / "node.key").write_text(node_key.secret.hex())
    coord_key = crypto.load_or_create_key(tmp / "coord.key")  # the coordinator's attester key
    make_genesis("aitbc-devnet", [node_key.address], [coord_key.address], block_time_ms=block_time_ms,
                 genesis_time_ms=int(time.time() * 1000)).save(tmp / "genesis.json")
    proc = subprocess.Popen([sys.executable, "-m", "aitbc.clients.cli", "node", "--data-dir", str(tmp / "ledger"),
                             "--genesis", str(tmp / "genesis.json"), "--key", str(tmp / "node.key"),
                             "--listen", "127.0.0.1:0", "--port-file", str(tmp / "node.port")],
                            stdout=open(tmp / "node.log", "wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not (tmp / "node.port").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError((tmp / "node.log").read_text())
        time.sleep(0.05)
    return proc, f"127.0.0.1:{(tmp / 'node.port').read_text().strip()}"


async def run(n: int, rate: float, block_time: float) -> None:
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        node, ledger = start_node(tmp, int(block_time * 1000))
        coord, addr = start_coordinator(tmp, ledger=ledger)
        miner = start_miner(tmp, addr, ["null"], price_per_unit=1, max_concurrency=8)
        lags: list[float] = []
        try:
            async with channel(addr) as ch:
                stub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
                while not (await stub.ListModels(coordinator_pb2.ListModelsRequest(), metadata=MD)).models:
                    await asyncio.sleep(0.1)

                async def one(i: int) -> None:
                    params = job_pb2.JobParams(image=job_pb2.ImageParams(prompt=f"s{i}", steps=2, width=64, height=64, seed=i))
                    w = await submit_and_watch(stub, "null", params, check=False)
                    while True:
                        rec = (await stub.GetReceipt(coordinator_pb2.GetReceiptRequest(job_id=w.job.job_id), metadata=MD)).receipt
                        if rec.settlement.state == receipt_pb2.SETTLEMENT_STATE_FINAL:
                            lags.append(time.perf_counter() - w.finished)
                            return
                        await asyncio.sleep(0.02)

                tasks = []
                for i in range(n):
                    tasks.append(asyncio.create_task(one(i)))
                    await asyncio.sleep(1 / rate)
                await asyncio.wait_for(asyncio.gather(*tasks), 300)
        finally:
            for p in (miner, coord, node):
                p.terminate()
                p.wait(10)
    print(f"settlement lag ({machine()}), {n} jobs at {rate}/s, {block_time:g} s blocks, one authority")
    print(f"  COMPLETED -> MINT final: p50 {pct(lags, 50):.2f} s, p99 {pct(lags, 99):.2f} s, max {max(lags):.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=60)
    ap.add_argument("--rate", type=float, default=5.0)
    ap.add_argument("--block-time", type=float, default=1.0)
    args = ap.parse_args()
    asyncio.run(run(args.jobs, args.rate, args.block_time))


if __name__ == "__main__":
    main()
