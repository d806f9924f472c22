#!/usr/bin/env python3
"""Register under a flood (s9): registrations per second of fresh keys while 10,000 challenges are
used and not yet expired (and as many sessions are pending), the state a minute-long flood of
fresh-key registrations leaves. In process, on the registry alone: keys, challenges and signatures
are made before the clock starts, so what is timed is Register's own work (the MAC check, the
used-challenge set, the signature recovery, the session table).

    python bench/registrations.py [--outstanding 10000] [--n 2000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from _common import machine  # noqa: E402

from aitbc import crypto  # noqa: E402
from aitbc.coordinator.registry import MinerRegistry, register_digest  # noqa: E402
from aitbc.v1 import miner_pb2  # noqa: E402

INFO = miner_pb2.MinerInfo(models=["null"])


def signed(registry: MinerRegistry, n: int) -> list[tuple[bytes, bytes, bytes]]:
    out = []
    for _ in range(n):
        key = crypto.PrivateKey.generate()
        ch = registry.challenge()[0]
        out.append((key.pubkey, ch, key.sign(register_digest(ch, key.pubkey))))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--outstanding", type=int, default=10_000)
    ap.add_argument("--n", type=int, default=2000)
    args = ap.parse_args()
    registry = MinerRegistry(time.monotonic, model_grace_s=60)
    for pubkey, ch, sig in signed(registry, args.outstanding):
        registry.register(pubkey, ch, sig, INFO)
    todo = signed(registry, args.n)
    t0 = time.perf_counter()
    for pubkey, ch, sig in todo:
        registry.register(pubkey, ch, sig, INFO)
    dt = time.perf_counter() - t0
    print(f"{machine()}")
    print(f"{args.n} registrations with {args.outstanding:,} used challenges outstanding: "
          f"{args.n / dt:,.0f} registrations/s ({dt / args.n * 1e6:.0f} us each)")


if __name__ == "__main__":
    main()
