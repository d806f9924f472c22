#!/usr/bin/env python3
"""Explorer page times on a long chain (issue 17): time to first byte and to the last byte of the
block list, a block in the middle, an account with a transaction in every block (its first history
page), a receipt, that account's miner page (its earnings and their 30-day chart) and the block
list with its 30-day charts (120 bars over the index's hourly series), on loopback; plus how fast
the explorer's index follows the chain.

A chain of --blocks blocks (one authority, a transfer in each after a MINT in the first) is built
with the ledger's own code, then served by a real node process without a key (it produces nothing
more); the explorer runs in this process and indexes it through StreamBlocks first.

    python bench/explorer.py [--blocks 100000] [--requests 50] [--block-ms 30000]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import aiohttp  # noqa: E402
from _common import pct  # noqa: E402
from aiohttp import web  # noqa: E402
from ledger_catchup import build_chain  # noqa: E402
from ledger_common import ATTESTER, NodeProc, funding_receipt, key, machine  # noqa: E402

from aitbc.explorer.app import Explorer  # noqa: E402
from aitbc.ledger.genesis import make_genesis  # noqa: E402

CHAIN = "aitbc-catchup"  # build_chain's


async def timed(session: aiohttp.ClientSession, url: str) -> tuple[float, float]:
    t0 = time.perf_counter()
    async with session.get(url) as r:
        first = time.perf_counter()
        await r.read()
        assert r.status == 200, (url, r.status)
    return (first - t0) * 1000, (time.perf_counter() - t0) * 1000


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=100_000)
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--block-ms", type=int, default=30_000,
                    help="the blocks' spacing in chain time (30 s: 100,000 blocks span 35 days, so the 30-day "
                         "charts are full: 720 hourly buckets, the 24-hour ones 1,440 minutes)")
    args = ap.parse_args()
    auth = [key(b"catchup-authority-0")]
    g = make_genesis(CHAIN, [a.address for a in auth], [ATTESTER.address], block_time_ms=args.block_ms,
                     max_price_per_unit=10**6, max_mint_per_receipt=10**15)
    with tempfile.TemporaryDirectory(prefix="aitbc-explorer-bench-") as tmp:
        root = Path(tmp)
        built = build_chain(root / "node" / "data", g, auth, args.blocks, 1)
        node = NodeProc(root, "node", g, None).start()
        try:
            ex = Explorer(f"127.0.0.1:{node.port}", root / "index")
            runner = web.AppRunner(ex.app(), access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            t0 = time.perf_counter()
            await site.start()
            url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
            while ex.index.tip < args.blocks:
                await asyncio.sleep(0.2)
            indexed = time.perf_counter() - t0
            sender = key(b"catchup-sender").address
            receipt = funding_receipt(key(b"catchup-sender"), CHAIN, 0).receipt_hash.hex()
            pages = {"block list /": "/", f"block {args.blocks // 2}": f"/block/{args.blocks // 2}",
                     f"account ({args.blocks - 1:,} txs)": f"/account/{sender}", "receipt": f"/receipt/{receipt}",
                     "miner page (30 d chart)": f"/miner/{sender}", "block list, 30 d charts": "/?window=30d",
                     "market, 30 d charts": "/market?window=30d"}
            print(f"explorer benchmark ({machine()}): {args.blocks:,} blocks built in {built:.1f} s, indexed by the "
                  f"explorer in {indexed:.1f} s ({args.blocks / indexed:,.0f} blocks/s)")
            async with aiohttp.ClientSession() as s:
                for name, path in pages.items():
                    await timed(s, url + path)  # warm
                    got = [await timed(s, url + path) for _ in range(args.requests)]
                    ttfb, full = [a for a, _ in got], [b for _, b in got]
                    print(f"  {name:28s} first byte p50 {pct(ttfb, 50):6.1f} ms p99 {pct(ttfb, 99):6.1f} ms;"
                          f" whole page p50 {pct(full, 50):6.1f} ms p99 {pct(full, 99):6.1f} ms  (goal < 300 ms)")
            await runner.cleanup()
        finally:
            node.stop()


if __name__ == "__main__":
    asyncio.run(main())
