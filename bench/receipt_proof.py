#!/usr/bin/env python3
"""Receipt proofs (docs/ledger.md, "Receipt proofs"): proof size and offline verification time from
the genesis alone. Goal: verification < 10 ms.

A 4-authority chain in memory: blocks of --block-txs MINTs, a certificate (3 of 4 commit votes,
prepare -> commit of the block itself: ledger format 4) on every --cert-every-th block (default 1:
every block is final by its own commit round), so proofs carry 1 to --cert-every headers and
Merkle paths of log2(--block-txs) siblings. Each of --n receipts gets its proof (aitbc.ledger.proof.build_proof)
and is verified with aitbc.ledger.proof.verify_proof: the MINT's sender and receipt signatures,
the attester, the Merkle path, the header links and the certificate's signatures.

Then across authority set changes (ledger format 5): a version 3 chain of 4 authorities with
--epoch-blocks blocks per epoch whose set changes by AUTHORITY_VOTEs once every two epochs (a 5th
authority voted in, then out again, and so on), every block certified by its own commit round;
the receipts of a block minted after 1, 3 and 10 changes (--changes) get proofs that carry each
change (a certified block that fixed it, by the set before it) and are verified from the genesis.

    python bench/receipt_proof.py [--n 300] [--block-txs 64] [--cert-every 1] [--changes 1,3,10]
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
from aitbc.ledger.tx import ACTION_ADD, ACTION_REMOVE, decode_tx, make_authority_vote, make_mint  # noqa: E402
from aitbc.receipts import ReceiptBody, sign_receipt  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300, help="receipts to prove and verify")
    ap.add_argument("--block-txs", type=int, default=64, help="MINTs per block")
    ap.add_argument("--cert-every", type=int, default=1, help="a certificate on every N-th block (4: missed commit "
                    "rounds, each block certified through a later one)")
    ap.add_argument("--changes", default="1,3,10", help="prove receipts minted after these many set changes")
    ap.add_argument("--epoch-blocks", type=int, default=4, help="blocks per epoch of the set-change chain")
    ap.add_argument("--per-point", type=int, default=50, help="receipts minted after each --changes point")
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
    across_changes(sorted({int(x) for x in args.changes.split(",") if x}), args.epoch_blocks, args.per_point)
    return 0


def across_changes(points: list[int], epoch_blocks: int, per_point: int) -> None:
    auth = [crypto.PrivateKey.generate() for _ in range(4)]
    attester, provider, sender = (crypto.PrivateKey.generate() for _ in range(3))
    g = make_genesis("aitbc-bench-sets", [k.address for k in auth], [attester.address], block_time_ms=1000,
                     max_price_per_unit=1000, max_mint_per_receipt=10**12, genesis_time_ms=1_795_000_000_000,
                     epoch_blocks=epoch_blocks)
    keys = {crypto.sha256(k.pubkey)[:20]: k for k in auth}
    nonces: dict[bytes, int] = {}
    chain = Chain(MemoryStore(), g)
    slot = g.genesis_time_ms // 1000
    minted: dict[int, list] = {}
    mint_nonce = 0

    def block(txs: list) -> None:
        nonlocal slot
        h = chain.head.height + 1
        ids = chain.authorities_at(h)
        assert ids is not None
        slot += 1
        chain.build_block(keys[ids[slot % len(ids)]], slot, slot * 1000 + 1, [decode_tx(t) for t in txs])
        s = fin.Checkpoint(h, chain.hash_at(h), fin.PREPARE)  # type: ignore[arg-type]
        signers = sorted(ids)[:fin.quorum(len(ids))]
        chain.store_certificate(h, s.hash, fin.make_certificate(
            [fin.make_vote(keys[a], g, s, s.at(fin.COMMIT)) for a in signers]).encode())

    def vote(voter: bytes, action: int, subject: crypto.PrivateKey) -> bytes:
        n = nonces.get(voter, 0)
        nonces[voter] = n + 1
        return make_authority_vote(keys[voter], g.ref, n, action, subject.address)

    done, extra = 0, None
    for target in [0, *points]:
        while done < target:  # one change per two epochs: vote at an epoch's first block, wait for it
            ids = chain.authorities_at(chain.head.height + 1)
            assert ids is not None
            if extra is None:
                extra = crypto.PrivateKey.generate()
                keys[crypto.sha256(extra.pubkey)[:20]] = extra
                txs = [vote(a, ACTION_ADD, extra) for a in ids[:fin.quorum(len(ids))]]
            else:
                txs = [vote(a, ACTION_REMOVE, extra) for a in ids[:fin.quorum(len(ids))]]
                extra = None
            block(txs)
            while len(chain.set_changes(g.epoch(chain.head.height + 1))) <= done:
                block([])
            done += 1
        if target:
            receipts = []
            for i in range(per_point):
                body = ReceiptBody(job_id=f"{target:04x}{i:024x}", provider=provider.address, client="bench",
                                   units=1000 + i, unit_type="gpu_ms", version=1, price_per_unit=3, model="tiny-sd",
                                   prompt_hash="ab" * 32, started_at=1, finished_at=2, artifact_sha256="cd" * 32,
                                   nonce=f"{target:08x}{i:024x}", hub_id="", chain_id=g.chain_id)
                receipts.append(sign_receipt(body, provider).attest(attester))
            block([make_mint(sender, g.ref, mint_nonce + i, r) for i, r in enumerate(receipts)])
            mint_nonce += per_point
            minted[target] = receipts
    gh = g.hash()
    print(f"across set changes: 4 authorities (a 5th voted in and out in turn), epochs of {epoch_blocks} blocks, "
          f"{chain.head.height} blocks, every block certified by its own commit round")
    for target, receipts in minted.items():
        proofs = [build_proof(chain, r.receipt_hash).encode() for r in receipts]
        times = []
        for r, raw in zip(receipts, proofs, strict=True):
            t0 = time.perf_counter()
            res = verify_proof(raw, g, r.receipt_hash, gh)
            times.append((time.perf_counter() - t0) * 1000)
            assert res.set_changes == target
        sizes = [len(p) for p in proofs]
        p50, p99 = pct(times, 50), pct(times, 99)
        print(f"  after {target:>2} change(s): proof p50 {pct(sizes, 50):.0f} B (max {max(sizes)} B); offline "
              f"verification p50 {p50:.2f} ms  p99 {p99:.2f} ms  (goal < 10 ms: {'met' if p99 < 10 else 'NOT met'})")


if __name__ == "__main__":
    sys.exit(main())
