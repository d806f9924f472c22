#!/usr/bin/env python3
"""Receipt verification rate (provider + attester signatures, canonical hash) beside the raw
coincurve verify rate measured in the same run. Goal: >= 15,000 receipts/s.

    python bench/receipts.py [--n 20000] [--workers 0]   # workers: processes (0 = one per core)
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import coincurve  # noqa: E402
from _common import machine  # noqa: E402

from aitbc import crypto, receipts  # noqa: E402


def make(n: int) -> list[dict]:
    provider, attester = crypto.PrivateKey.generate(), crypto.PrivateKey.generate()
    out = []
    for i in range(n):
        body = receipts.ReceiptBody(job_id=f"{i:028x}", provider=provider.address, client="bench", units=1000 + i,
                                    unit_type="gpu_ms", price_per_unit=3, model="tiny-sd", prompt_hash="ab" * 32,
                                    started_at=1, finished_at=2, artifact_sha256="cd" * 32, nonce=f"{i:032x}",
                                    hub_id="", chain_id="aitbc-devnet")
        out.append(receipts.sign_receipt(body, provider).attest(attester).to_json_dict())
    return out


def verify_all(docs: list[dict]) -> int:
    """What a verifier does with a receipt file: parse, canonicalise, hash, check both signatures."""
    for doc in docs:
        receipts.verify_receipt(receipts.SignedReceipt.from_json_dict(doc))
    return len(docs)


def _worker(docs: list[dict], go: Any, done: Any) -> None:
    go.wait()
    done.put(verify_all(docs))


def parallel_rate(docs: list[dict], workers: int) -> float:
    """Receipts/s on `workers` processes. Each process holds its share before the clock starts (a
    verifier reads its receipts from its own files or stream), so no pickling is timed."""
    ctx = mp.get_context("fork")
    go, done = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(docs[i::workers], go, done)) for i in range(workers)]
    for p in procs:
        p.start()
    time.sleep(0.5)  # every worker is up and waiting
    t = time.perf_counter()
    go.set()
    total = sum(done.get() for _ in procs)
    rate = total / (time.perf_counter() - t)
    for p in procs:
        p.join()
    return rate


def raw_verify_rate(n: int) -> float:
    key = coincurve.PrivateKey()
    msg = b"x" * 32
    sig = key.sign(msg, hasher=None)
    pub = key.public_key
    t = time.perf_counter()
    for _ in range(n):
        pub.verify(sig, msg, hasher=None)
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--workers", type=int, default=0)
    args = ap.parse_args()
    docs = make(args.n)
    raw = raw_verify_rate(args.n)
    t = time.perf_counter()
    verify_all(docs)
    one = args.n / (time.perf_counter() - t)
    workers = args.workers or os.cpu_count() or 1
    many = parallel_rate(docs, workers)
    print(f"receipt verification ({machine()}), {args.n} receipts")
    print(f"  raw coincurve ECDSA verify, one core:             {raw:8.0f} /s")
    print(f"  receipts (parse + hash + 2 signatures), one core: {one:8.0f} /s  ({one / raw:.2f} of raw verify; "
          f"two signature recoveries each)")
    print(f"  receipts on {workers} processes:                      {many:8.0f} /s  (goal >= 15,000/s)")


if __name__ == "__main__":
    main()
