#!/usr/bin/env python3
"""Receipt proofs (docs/ledger.md, "Receipt proofs"): proof size and offline verification time from
the genesis alone. Goal: verification < 10 ms.

A 4-authority chain in memory: blocks of --block-txs MINTs, a certificate (3 of 4 commit votes,
prepare -> commit of the block itself: ledger format 4) on every --cert-every-th block (default 1:
every block is final by its own commit round), so proofs carry 1 to --cert-every headers and
Merkle paths of log2(--block-txs) siblings. Each of --n receipts gets its proof (aitbc.ledger.proof.build_proof)
and is verified with aitbc.ledger.proof.verify_proof: the MINT's sender and receipt signatures,
the attester, the Merkle path, the header links and the certificate's signatures.

    python bench/receipt_proof.py [--n 300] [--block-txs 64] [--cert-every 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, pct  # noqa: E402

from aitbc import crypto  # noqa: E402
from aitbc.ledger import finality as fin  # noqa: E402
from aitbc.ledger.chain import Chain  # noqa: E402
from aitbc.ledger.genesis import make_genesis  # noqa: E402
from aitbc.ledger.proof import build_proof, verify_proof  # noqa: E402
from aitbc.ledger.store import MemoryStore  # noqa: E402
from aitbc.ledger.tx import decode_tx, make_mint  # noqa: E402
from aitbc.receipts import ReceiptBody, sign_receipt  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300, help="receipts to prove and verify")
    ap.add_argument("--block-txs", type=int, default=64, help="MINTs per block")
    ap.add_argument("--cert-every", type=int, default=1, help="a certificate on every N-th block (4: missed commit "
                    "rounds, each block certified through a later one)")
    args = ap.parse_args()
    auth = [crypto.PrivateKey.generate() for _ in range(4)]
    attester, provider, sender = (crypto.PrivateKey.generate() for _ in range(3))
    g = make_genesis("aitbc-bench", [k.address for k in auth], [attester.address], block_time_ms=1000,
                     max_price_per_unit=1000, max_mint_per_receipt=10**12, genesis_time_ms=1_795_000_000_000)
    chain = Chain(MemoryStore(), g)
    receipts = []
    for i in range(args.n):
        body = ReceiptBody(job_id=f"{i:028x}", provider=provider.address, client="bench", units=1000 + i,
                           unit_type="gpu_ms", version=1, price_per_unit=3, model="tiny-sd", prompt_hash="ab" * 32,
                           started_at=1, finished_at=2, artifact_sha256="cd" * 32, nonce=f"{i:032x}", hub_id="",
                           chain_id=g.chain_id)
        receipts.append(sign_receipt(body, provider).attest(attester))
    txs = [decode_tx(make_mint(sender, g.ref, i, r)) for i, r in enumerate(receipts)]
    slot = g.genesis_time_ms // 1000
    blocks = -(-args.n // args.block_txs)
    total = blocks + (-blocks) % args.cert_every  # the last MINT's block is at or below a certified one
    for h in range(1, total + 1):
        slot += 1
        chain.build_block(auth[slot % 4], slot, slot * 1000 + 1,
                          txs[(h - 1) * args.block_txs:h * args.block_txs] if h <= blocks else [])
        if h % args.cert_every == 0:
            s = fin.Checkpoint(h, chain.hash_at(h), fin.PREPARE)  # type: ignore[arg-type]
            chain.store_certificate(h, s.hash, fin.make_certificate([fin.make_vote(k, g, s, s.at(fin.COMMIT))
                                                                     for k in auth[:3]]).encode())
    proofs = [build_proof(chain, r.receipt_hash).encode() for r in receipts]
    gh = g.hash()
    times = []
    for r, raw in zip(receipts, proofs, strict=True):
        t0 = time.perf_counter()
        verify_proof(raw, g, r.receipt_hash, gh)
        times.append((time.perf_counter() - t0) * 1000)
    sizes = [len(p) for p in proofs]
    print(f"machine: {machine()}")
    print(f"chain: 4 authorities, {blocks} blocks of up to {args.block_txs} MINTs, a certificate (3 signers) "
          f"every {args.cert_every} blocks")
    print(f"proof size: min {min(sizes)} B  p50 {pct(sizes, 50):.0f} B  max {max(sizes)} B  (n={len(sizes)})")
    p50, p99 = pct(times, 50), pct(times, 99)
    print(f"offline verification: p50 {p50:.2f} ms  p99 {p99:.2f} ms  (goal < 10 ms: "
          f"{'met' if p99 < 10 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
