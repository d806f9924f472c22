#!/usr/bin/env python3
"""Follower catch-up: a follower process syncs N blocks over StreamBlocks from another node,
re-verifying every proposer signature, link, tx signature and state root, and every block's
finality certificate (votes of more than 2/3 of --authorities, each signature checked); prints
blocks/s until the follower's head and its final (certified) height reach the source's.

    .venv/bin/python bench/ledger_catchup.py [--blocks 10000] [--txs-per-block 0] [--authorities 4]
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

from aitbc.ledger import finality  # noqa: E402
from aitbc.ledger.chain import Chain  # noqa: E402
from aitbc.ledger.client import LedgerClient  # noqa: E402
from aitbc.ledger.genesis import make_genesis  # noqa: E402
from aitbc.ledger.store import LmdbStore  # noqa: E402
from aitbc.ledger.tx import decode_tx, make_mint, make_transfer  # noqa: E402

CHAIN = "aitbc-catchup"


def build_chain(data: Path, g, auths, blocks: int, txs_per_block: int) -> float:
    """Blocks in consecutive slots (proposers in turn), each certified by a quorum's commit votes
    (prepare -> commit of the block itself, ledger format 4), as live authorities would."""
    store = LmdbStore(data / "ledger", sync=False)
    chain = Chain(store, g)
    signers = auths[:finality.quorum(len(auths))]
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
        chain.build_block(auths[slot % len(auths)], slot, slot * g.block_time_ms, txs)
        src = finality.Checkpoint(slot, chain.hash_at(slot), finality.PREPARE)  # type: ignore[arg-type]
        cert = finality.make_certificate(finality.make_vote(k, g, src, src.at(finality.COMMIT)) for k in signers)
        chain.store_certificate(src.height, src.hash, cert.encode())
    store.close()
    return time.perf_counter() - t0


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=10_000)
    ap.add_argument("--txs-per-block", type=int, default=0)
    ap.add_argument("--authorities", type=int, default=4, help="certificates carry votes of more than 2/3 of them")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    auths = [key(b"catchup-authority-%d" % i) for i in range(args.authorities)]
    g = make_genesis(CHAIN, [a.address for a in auths], [ATTESTER.address], block_time_ms=1000,
                     max_price_per_unit=10**6, max_mint_per_receipt=10**15)
    with tempfile.TemporaryDirectory(prefix="aitbc-catchup-") as tmp:
        root = Path(tmp)
        built = build_chain(root / "source" / "data", g, auths, args.blocks, args.txs_per_block)
        q = finality.quorum(args.authorities)
        print(f"built {args.blocks:,} blocks ({args.txs_per_block} transfers each, {args.blocks:,} certificates "
              f"of {q} of {args.authorities} authorities' votes) in {built:.1f}s")
        source = NodeProc(root, "source", g, None).start()  # serves the chain; no key: produces nothing
        follower = NodeProc(root, "follower", g, None, peers=[source.target])
        try:
            t0 = time.perf_counter()
            follower.start()
            t_ready = time.perf_counter()
            async with LedgerClient(follower.target) as c:
                while True:
                    head = await c.get_head()
                    if head.height >= args.blocks and head.finalized_height >= args.blocks:
                        break
                    if time.perf_counter() - t0 > 300:
                        raise SystemExit(f"follower stuck at {head.height}")
                    await asyncio.sleep(0.02)
            t_end = time.perf_counter()
            async with LedgerClient(source.target) as s:
                assert (await s.get_head()).hash == head.hash
            print(f"follower caught up {args.blocks:,} blocks and their certificates in {t_end - t_ready:.2f}s after "
                  f"its server was up ({t_ready - t0:.2f}s process start): {args.blocks / (t_end - t_ready):,.0f} "
                  f"blocks/s, {args.blocks * args.txs_per_block / (t_end - t_ready):,.0f} tx/s and "
                  f"{args.blocks * q / (t_end - t_ready):,.0f} vote signatures/s re-verified "
                  f"(final height {head.finalized_height:,}; goal >= 3,000 blocks/s)")
        finally:
            follower.stop()
            source.stop()


if __name__ == "__main__":
    asyncio.run(main())
