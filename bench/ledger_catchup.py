#!/usr/bin/env python3
"""Follower catch-up: a follower process syncs N blocks over StreamBlocks from another node,
re-verifying every proposer signature, link, tx signature and state root; prints blocks/s.

    .venv/bin/python bench/ledger_catchup.py [--blocks 10000] [--txs-per-block 0]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from ledger_common import ATTESTER, NodeProc, funding_receipt, key, machine  # noqa: E402

from aitbc.ledger.chain import Chain  # noqa: E402
from aitbc.ledger.client import LedgerClient  # noqa: E402
from aitbc.ledger.genesis import make_genesis  # noqa: E402
from aitbc.ledger.store import LmdbStore  # noqa: E402
from aitbc.ledger.tx import decode_tx, make_mint, make_transfer  # noqa: E402

CHAIN = "aitbc-catchup"


def build_chain(data: Path, g, auth, blocks: int, txs_per_block: int) -> float:
    store = LmdbStore(data / "ledger", sync=False)
    chain = Chain(store, g)
    sender = key(b"catchup-sender")
    sink = key(b"catchup-sink").address
    t0 = time.perf_counter()
    nonce = 0
    for slot in range(1, blocks + 1):
        txs = []
        if slot == 1:
            txs = [decode_tx(make_mint(sender, g.ref, 0, funding_receipt(sender, CHAIN, 0)))]
            nonce = 1
        else:
            for _ in range(txs_per_block):
                txs.append(decode_tx(make_transfer(sender, g.ref, nonce, sink, 1)))
                nonce += 1
        chain.build_block(auth, slot, slot * g.block_time_ms, txs)
    store.close()
    return time.perf_counter() - t0


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=10_000)
    ap.add_argument("--txs-per-block", type=int, default=0)
    args = ap.parse_args()
    print(f"machine: {machine()}")
    auth = key(b"catchup-authority")
    g = make_genesis(CHAIN, [auth.address], [ATTESTER.address], block_time_ms=1000,
                     max_price_per_unit=10**6, max_mint_per_receipt=10**15)
    with tempfile.TemporaryDirectory(prefix="aitbc-catchup-") as tmp:
        root = Path(tmp)
        built = build_chain(root / "source" / "data", g, auth, args.blocks, args.txs_per_block)
        print(f"built {args.blocks:,} blocks ({args.txs_per_block} transfers each) in {built:.1f}s")
        source = NodeProc(root, "source", g, None).start()  # serves the chain; no key: produces nothing
        follower = NodeProc(root, "follower", g, None, peers=[source.target])
        try:
            t0 = time.perf_counter()
            follower.start()
            t_ready = time.perf_counter()
            async with LedgerClient(follower.target) as c:
                while True:
                    head = await c.get_head()
                    if head.height >= args.blocks:
                        break
                    if time.perf_counter() - t0 > 300:
                        raise SystemExit(f"follower stuck at {head.height}")
                    await asyncio.sleep(0.02)
            t_end = time.perf_counter()
            async with LedgerClient(source.target) as s:
                assert (await s.get_head()).hash == head.hash
            print(f"follower caught up {args.blocks:,} blocks in {t_end - t_ready:.2f}s after its server was up "
                  f"({t_ready - t0:.2f}s process start): {args.blocks / (t_end - t_ready):,.0f} blocks/s, "
                  f"{args.blocks * args.txs_per_block / (t_end - t_ready):,.0f} tx/s re-verified")
        finally:
            follower.stop()
            source.stop()


if __name__ == "__main__":
    asyncio.run(main())
