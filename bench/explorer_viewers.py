#!/usr/bin/env python3
"""Live viewers one explorer process holds (issue 17): N pages on /events, each told of every new
block; how far behind the chain they hear of it (receive time - the block's timestamp), p50/p99,
for growing N, beside the block time.

A real ledger node (one authority, --block-ms blocks) and the explorer run in this process; the
viewers are aiohttp clients in a second process (so their own CPU is not the explorer's).

    python bench/explorer_viewers.py [--viewers 100,500,1000] [--blocks 10] [--block-ms 500]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from _common import pct  # noqa: E402
from aiohttp import web  # noqa: E402
from ledger_common import machine  # noqa: E402

from aitbc import crypto  # noqa: E402
from aitbc.explorer.app import Explorer  # noqa: E402
from aitbc.ledger.genesis import make_genesis  # noqa: E402
from aitbc.ledger.store import MemoryStore  # noqa: E402
from aitbc.server.ledger import start_node  # noqa: E402

VIEWERS = r'''
import asyncio, json, sys, time
import aiohttp

async def viewer(session, url, blocks, lags):
    got = 0
    async with session.get(url + "/events") as r:
        async for line in r.content:
            if line.startswith(b"data: ") and b'"height"' in line:
                b = json.loads(line[6:])
                lags.append(time.time() * 1000 - b["time_ms"])
                got += 1
                if got == blocks:
                    return

async def main(url, n, blocks):
    lags = []
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=None)) as s:
        await asyncio.wait_for(asyncio.gather(*(viewer(s, url, blocks, lags) for _ in range(n))), 120)
    print(json.dumps(lags))

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
'''


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--viewers", default="100,500,1000")
    ap.add_argument("--blocks", type=int, default=10, help="blocks each viewer waits for")
    ap.add_argument("--block-ms", type=int, default=500)
    args = ap.parse_args()
    auth = crypto.PrivateKey.generate()
    g = make_genesis("aitbc-viewers", [auth.address], [auth.address], block_time_ms=args.block_ms,
                     genesis_time_ms=int(time.time() * 1000))
    node, server = await start_node(MemoryStore(), g, auth, "127.0.0.1:0")
    with tempfile.TemporaryDirectory(prefix="aitbc-viewers-") as tmp:
        ex = Explorer(f"127.0.0.1:{server.port}", Path(tmp) / "index")
        runner = web.AppRunner(ex.app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        print(f"explorer live viewers ({machine()}): one explorer process, {args.block_ms} ms blocks, each viewer "
              f"waits for {args.blocks} blocks; lag = when a viewer hears of a block - the block's timestamp")
        try:
            for n in (int(x) for x in args.viewers.split(",")):
                proc = await asyncio.create_subprocess_exec(sys.executable, "-c", VIEWERS, url, str(n),
                                                            str(args.blocks), stdout=subprocess.PIPE)
                out, _ = await proc.communicate()
                lags = json.loads(out) if out.strip() else []
                held = len(lags) / args.blocks
                print(f"  {n:5d} viewers: {held:6.0f} held to the end; lag p50 {pct(lags, 50):7.1f} ms, p99 "
                      f"{pct(lags, 99):7.1f} ms, max {max(lags, default=float('nan')):7.1f} ms (goal: under 1,000 ms)")
        finally:
            await runner.cleanup()
            await node.stop()
            await server.stop(0)


if __name__ == "__main__":
    asyncio.run(main())
