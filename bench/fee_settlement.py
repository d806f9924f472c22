#!/usr/bin/env python3
"""Receipts settled per second on one authority: SETTLE (MINT + fee from escrow) vs MINT vs plain
TRANSFER, through the node's admission (decode + stateless checks + mempool) and block building
(transition + LMDB commit), as `aitbc node` runs them. Prints figures and ratios.

    python bench/fee_settlement.py [--n 2000] [--block 500]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aitbc import crypto  # noqa: E402
from aitbc.ledger import tx as txmod  # noqa: E402
from aitbc.ledger.chain import Chain  # noqa: E402
from aitbc.ledger.genesis import make_genesis  # noqa: E402
from aitbc.ledger.node import Node  # noqa: E402
from aitbc.ledger.store import LmdbStore  # noqa: E402
from aitbc.quotes import QuoteBody  # noqa: E402
from aitbc.receipts import ReceiptBody, sign_receipt  # noqa: E402


def key(n: int) -> crypto.PrivateKey:
    return crypto.PrivateKey(crypto.sha256(b"bench-fee-%d" % n))


AUTH, ATTESTER, CLIENT, MINER = key(1), key(2), key(3), key(4)


def receipt(i: int, price: int = 10):  # type: ignore[no-untyped-def]
    body = ReceiptBody(job_id=f"job-{i}", provider=MINER.address, client="bench-client", units=50, unit_type="tokens",
                       price_per_unit=price, model="tiny-gpt", prompt_hash="ab" * 32, started_at=1, finished_at=2,
                       artifact_sha256="cd" * 32, nonce=f"{i:032x}", hub_id="", chain_id="bench-fee",
                       prompt_tokens=10, generated_tokens=40)
    return sign_receipt(body, MINER).attest(ATTESTER)


async def run(kind: str, n: int, block: int) -> float:
    g = make_genesis("bench-fee", [AUTH.address], [ATTESTER.address], block_time_ms=1000, max_block_txs=block)
    with tempfile.TemporaryDirectory() as tmp:
        store = LmdbStore(tmp, map_size=1 << 30)
        node = Node(Chain(store, g), AUTH)
        slot = [0]

        async def produce() -> None:
            while node.mempool.by_hash:
                slot[0] += 1
                await node.produce(slot[0])

        # setup (not timed): the client's escrow, funded by one MINT
        fund = [txmod.make_mint(ATTESTER, g.ref, 0, receipt(10**6, price=10**6)),
                txmod.make_transfer(MINER, g.ref, 0, CLIENT.address, n)]
        for raw in fund:
            assert (await node.submit([raw]))[0][1] is None
            await produce()
        assert (await node.submit([txmod.make_escrow_deposit(CLIENT, g.ref, 0, ATTESTER.address, n)]))[0][1] is None
        await produce()
        rs = [receipt(i) for i in range(n)]
        if kind == "TRANSFER":
            raws = [txmod.make_transfer(MINER, g.ref, 1 + i, CLIENT.address, 1) for i in range(n)]
        elif kind == "MINT":
            raws = [txmod.make_mint(ATTESTER, g.ref, 1 + i, r) for i, r in enumerate(rs)]
        else:  # SETTLE: the same mint plus a fee of 1 from the client's escrow
            raws = [txmod.make_settle(ATTESTER, g.ref, 1 + i, r, QuoteBody(
                quote_id=f"{i:032x}", chain_id=g.chain_id, genesis_hash=g.hash().hex(), attester=ATTESTER.address,
                client="bench-client", client_address=CLIENT.address, model="tiny-gpt", prompt_hash="ab" * 32,
                unit_type="tokens", units=50, price_per_unit=0, priority_fee=1, total=1, expires_at=10**13))
                for i, r in enumerate(rs)]
        started = time.perf_counter()
        for i in range(0, n, block):
            res = await node.submit(raws[i:i + block], relay=False)
            assert all(err is None for _, err in res), [err for _, err in res if err][:1]
            await produce()
        took = time.perf_counter() - started
        await node.stop()
        store.close()
        return n / took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="transactions per kind")
    ap.add_argument("--block", type=int, default=500, help="transactions per block (and per broadcast batch)")
    args = ap.parse_args()
    rates = {kind: asyncio.run(run(kind, args.n, args.block)) for kind in ("TRANSFER", "MINT", "SETTLE")}
    print(f"one authority, LMDB, {args.n} txs per kind in blocks of {args.block} (admission + block building):")
    for kind, rate in rates.items():
        print(f"  {kind:<9} {rate:8.0f} tx/s   x{rate / rates['TRANSFER']:.2f} of TRANSFER")
    print(f"  receipts settled per second: SETTLE (MINT + fee) {rates['SETTLE']:.0f}, MINT alone {rates['MINT']:.0f} "
          f"(SETTLE/MINT = {rates['SETTLE'] / rates['MINT']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
