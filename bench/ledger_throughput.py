#!/usr/bin/env python3
"""Ledger throughput and latency on one machine.

1. raw coincurve verify rate (compact 64-byte signatures), measured in this run;
2. signed TRANSFERs committed per second on one authority node (a separate process), sent over
   gRPC in BroadcastTransactions batches; counted from StreamBlocks;
3. submit -> committed and submit -> final latency (1 s blocks) at about half the measured
   saturation rate (or --latency-rate), both from the same run: a tx waits for the next slot
   (about half a block time on average: the floor of submit -> committed), then for the block's
   votes (ledger format 4: its prepare and commit rounds, within its own slot).

    .venv/bin/python bench/ledger_throughput.py [--txs 40000] [--senders 200] [--authorities 1]

Figures (issue 14 pass, main and that branch interleaved on the 2-core box while other work loaded
it 6-13; README.md has the row): 4 authorities 432-2,311 tx/s before, 2,217-5,812 after (0.07-0.31x
the same run's raw rate); CPU of the 4 nodes and workers for 40,000 txs 42.4-47.0 s -> 16.3-19.3 s. Where a
node's CPU goes: `bench/sampler.py` (AITBC_SAMPLE=... with bench/sample_hook on PYTHONPATH).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import coincurve  # noqa: E402
from ledger_common import ATTESTER, NodeProc, funding_receipt, key, machine, percentile  # noqa: E402

from aitbc import crypto  # noqa: E402
from aitbc.ledger.client import LedgerClient  # noqa: E402
from aitbc.ledger.finality import quorum  # noqa: E402
from aitbc.ledger.genesis import ChainRef, make_genesis  # noqa: E402
from aitbc.ledger.tx import decode_tx, make_mint, make_transfer  # noqa: E402
from aitbc.v1 import ledger_pb2  # noqa: E402

CHAIN = "aitbc-bench"


def raw_verify_rate(seconds: float = 1.0) -> tuple[float, float]:
    k = coincurve.PrivateKey()
    pub = k.public_key
    msg = crypto.sha256(b"bench")
    der = k.sign(msg, hasher=None)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(200):
            pub.verify(der, msg, hasher=None)
        n += 200
    raw = n / (time.perf_counter() - t0)
    tx = decode_tx(make_transfer(key(b"x"), make_genesis(CHAIN, [key(b"x").address], []).ref, 0,
                                 key(b"y").address, 1))
    from aitbc.ledger.tx import verify_tx_signature

    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(200):
            verify_tx_signature(tx)
        n += 200
    return raw, n / (time.perf_counter() - t0)


def tx_hashes(raw: bytes) -> list[str]:
    """Hashes of a block's txs, read from its bytes (docs/ledger.md block layout) without decoding."""
    hlen = int.from_bytes(raw[:4], "big")
    pos = 4 + hlen + 65
    out = []
    while pos < len(raw):
        tlen = int.from_bytes(raw[pos:pos + 4], "big")
        out.append(crypto.sha256(raw[pos + 4:pos + 4 + tlen]).hex())
        pos += 4 + tlen
    return out


class Committed:
    """Follows StreamBlocks and records when each tx hash was committed and when it became final."""

    def __init__(self) -> None:
        self.at: dict[str, float] = {}
        self.final_at: dict[str, float] = {}
        self.by_height: dict[int, list[str]] = {}
        self.final_height = 0
        self.blocks = 0
        self.certified_at: dict[str, float] = {}  # finality votes: in a block with a certificate
        self.certified_height = 0

    async def run_certified(self, target: str) -> None:
        """Polls GetHead's certified_height (certificates form after the block was streamed)."""
        async with LedgerClient(target) as c:
            while True:
                head = await c.stub.GetHead(ledger_pb2.GetHeadRequest())
                now = time.perf_counter()
                for height in range(self.certified_height + 1, head.certified_height + 1):
                    for h in self.by_height.get(height, ()):
                        self.certified_at.setdefault(h, now)
                self.certified_height = max(self.certified_height, head.certified_height)
                await asyncio.sleep(0.01)

    async def run(self, target: str) -> None:
        async with LedgerClient(target) as c:
            req = ledger_pb2.StreamBlocksRequest(from_height=1, raw_only=True)
            async for resp in c.stub.StreamBlocks(req):
                now = time.perf_counter()
                for b in resp.blocks:
                    self.blocks += 1
                    at = 4 + 2 + len(CHAIN) + 32  # u32 header length, version, chain id, genesis hash
                    height = int.from_bytes(b.raw[at:at + 8], "big")
                    hashes = tx_hashes(b.raw)
                    self.by_height[height] = hashes
                    for h in hashes:
                        self.at[h] = now
                for height in range(self.final_height + 1, resp.finalized_height + 1):
                    for h in self.by_height.get(height, ()):
                        self.final_at[h] = now
                self.final_height = max(self.final_height, resp.finalized_height)


async def fund(c: LedgerClient, senders: list[crypto.PrivateKey]) -> None:
    funder = key(b"bench-funder")
    chain = await c.chain_ref()
    raws = [make_mint(funder, chain, i, funding_receipt(s, CHAIN, i)) for i, s in enumerate(senders)]
    out = await c.broadcast_many(raws)
    bad = [o.error for o in out if not o.accepted]
    if bad:
        raise SystemExit(f"funding failed: {bad[:3]}")
    await c.wait_for_tx(out[-1].hash, final=True, timeout=60)


def sign_transfers(chain: ChainRef, senders: list[crypto.PrivateKey], per_sender: int,
                   start_nonce: int) -> list[bytes]:
    to = key(b"bench-sink").address
    return [make_transfer(s, chain, start_nonce + n, to, 1)
            for n in range(per_sender) for s in senders]


async def saturate(targets: list[str], raws: list[bytes], batch: int, inflight: int) -> tuple[float, float, int]:
    tracker = Committed()
    task = asyncio.create_task(tracker.run(targets[0]))
    await asyncio.sleep(0.3)
    hashes = [crypto.sha256(r).hex() for r in raws]
    clients = [LedgerClient(t) for t in targets]
    try:
        t0 = time.perf_counter()
        sem = asyncio.Semaphore(inflight)
        rejected = 0

        async def send(chunk: list[bytes], c: LedgerClient) -> None:
            nonlocal rejected
            async with sem:
                for _attempt in range(100):
                    out = await c.broadcast_many(chunk)
                    full = [chunk[i] for i, o in enumerate(out) if not o.accepted and "mempool full" in str(o.error)]
                    rejected += sum(1 for o in out if not o.accepted and "mempool full" not in str(o.error))
                    if not full:
                        return
                    chunk = full
                    await asyncio.sleep(0.2)

        await asyncio.gather(*(send(raws[i:i + batch], clients[(i // batch) % len(clients)])
                               for i in range(0, len(raws), batch)))
        t_sent = time.perf_counter()
        deadline = time.monotonic() + 120
        while sum(1 for h in hashes if h in tracker.at) < len(hashes) - rejected and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        for c in clients:
            await c.close()
    task.cancel()
    done = [tracker.at[h] for h in hashes if h in tracker.at]
    t_end = max(done) if done else time.perf_counter()
    return len(done) / (t_end - t0), t_sent - t0, len(done)


async def latency(targets: list[str], raws: list[bytes],
                  rate: float) -> tuple[list[float], list[float], list[float], int]:
    tracker = Committed()
    task = asyncio.create_task(tracker.run(targets[0]))
    cert_task = asyncio.create_task(tracker.run_certified(targets[0]))
    await asyncio.sleep(0.3)
    sent_at: dict[str, float] = {}
    tick = 0.02
    per_tick = max(1, int(rate * tick))
    clients = [LedgerClient(t) for t in targets]
    try:
        t0 = time.perf_counter()
        for k, i in enumerate(range(0, len(raws), per_tick)):
            chunk = raws[i:i + per_tick]
            now = time.perf_counter()
            out = await clients[k % len(clients)].broadcast_many(chunk)
            for o in out:
                if o.accepted:
                    sent_at[o.hash] = now
            nxt = t0 + (i // per_tick + 1) * tick
            await asyncio.sleep(max(0.0, nxt - time.perf_counter()))
        deadline = time.monotonic() + 30
        while any(h not in tracker.final_at or h not in tracker.certified_at for h in sent_at) \
                and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        for c in clients:
            await c.close()
    task.cancel()
    cert_task.cancel()
    lat = [tracker.at[h] - t for h, t in sent_at.items() if h in tracker.at]
    fin = [tracker.final_at[h] - t for h, t in sent_at.items() if h in tracker.final_at]
    cert = [tracker.certified_at[h] - t for h, t in sent_at.items() if h in tracker.certified_at]
    return lat, fin, cert, len(sent_at)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--txs", type=int, default=40_000)
    ap.add_argument("--senders", type=int, default=200)
    ap.add_argument("--batch", type=int, default=2000)
    ap.add_argument("--inflight", type=int, default=4)
    ap.add_argument("--latency-seconds", type=float, default=8.0)
    ap.add_argument("--latency-rate", type=float, default=0.0,
                    help="tx/s of the latency phase (default: half the measured saturation rate)")
    ap.add_argument("--block-time", type=float, default=1.0)
    ap.add_argument("--authorities", type=int, default=1, help="authority node processes (all verify everything)")
    ap.add_argument("--keep", help="keep node folders and logs here")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    raw, tx_verify = raw_verify_rate()
    print(f"raw coincurve verify: {raw:,.0f}/s on one core; tx signature check (decode excluded): "
          f"{tx_verify:,.0f}/s")
    senders = [key(b"bench-sender-%d" % i) for i in range(args.senders)]
    auths = [key(b"bench-authority-%d" % i) for i in range(args.authorities)]
    g = make_genesis(CHAIN, [a.address for a in auths], [ATTESTER.address],
                     block_time_ms=int(args.block_time * 1000), max_price_per_unit=10**6,
                     max_mint_per_receipt=10**15, max_block_txs=20_000)
    nodes: list[NodeProc] = []
    with tempfile.TemporaryDirectory(prefix="aitbc-bench-") as tmp_dir:
        tmp = args.keep or tmp_dir
        try:
            for i, a in enumerate(auths):
                nodes.append(NodeProc(Path(tmp), f"auth{i}", g, a, peers=[n.target for n in nodes]).start())
            targets = [n.target for n in nodes]
            print(f"{len(nodes)} authority node(s), {args.block_time:g}s blocks, finality quorum {quorum(len(g.authorities))} votes")
            async with LedgerClient(targets[0]) as c:
                await fund(c, senders)
            per = args.txs // args.senders
            t0 = time.perf_counter()
            raws = sign_transfers(g.ref, senders, per, 0)
            print(f"signed {len(raws):,} transfers in {time.perf_counter() - t0:.1f}s (client side)")
            rate, send_s, n = await saturate(targets, raws, args.batch, args.inflight)
            print(f"committed {n:,} transfers over gRPC: {rate:,.0f} tx/s (submission took {send_s:.1f}s; "
                  f"{rate / raw:.2f} x the raw single-core verify rate)")
            half = args.latency_rate or rate / 2
            lat_raws = sign_transfers(g.ref, senders, max(1, int(half * args.latency_seconds) // args.senders + 1), per)
            lat, fin, cert, sent = await latency(targets, lat_raws, half)
            print(f"at {half:,.0f} tx/s ({len(lat)}/{sent} committed, {len(fin)} final): submit->committed "
                  f"p50 {percentile(lat, 50):.3f}s p99 {percentile(lat, 99):.3f}s; submit->final (in a block with a "
                  f"certificate of votes, GetHead polled) p50 {percentile(cert, 50):.3f}s p99 {percentile(cert, 99):.3f}s "
                  f"({len(cert)} txs; as StreamBlocks reports finalized_height, with the next block: p50 "
                  f"{percentile(fin, 50):.3f}s p99 {percentile(fin, 99):.3f}s)")
        finally:
            for n in nodes:
                n.stop()
            logs = "".join((n.dir / "node.log").read_text(errors="replace") for n in nodes)
            print(f"node logs: {logs.count('reorg:')} reorg(s), {logs.count('rejected a block')} rejected block(s), "
                  f"{logs.count('equivocation')} equivocation(s)")


if __name__ == "__main__":
    asyncio.run(main())
