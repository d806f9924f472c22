#!/usr/bin/env python3
"""Write tests/vectors/receipt_proofs.json: Merkle tx roots and paths, and a receipt proof over a
4-authority chain with refused variants (docs/ledger.md, "Tx root" and "Receipt proofs").

Keys are fixed and RFC 6979 signatures deterministic, so the output is byte-exact; run once when
the format changes (`PYTHONPATH=. .venv/bin/python scripts/make_proof_vectors.py`).
tests/ledger/test_receipt_proof.py checks that this script still reproduces the file and that each
proof is accepted or refused with its message.
"""

from __future__ import annotations

import json
from pathlib import Path

from aitbc import crypto
from aitbc.ledger import finality as fin
from aitbc.ledger import merkle
from aitbc.ledger.chain import Chain
from aitbc.ledger.genesis import make_genesis
from aitbc.ledger.proof import ReceiptProof, build_proof
from aitbc.ledger.store import MemoryStore
from aitbc.ledger.tx import decode_tx, make_mint
from aitbc.receipts import ReceiptBody, sign_receipt

OUT = Path(__file__).resolve().parent.parent / "tests" / "vectors" / "receipt_proofs.json"
CHAIN = "aitbc-proof-vectors"


def _key(name: str) -> crypto.PrivateKey:
    return crypto.PrivateKey(crypto.sha256(b"aitbc proof vector key " + name.encode()))


AUTH = [_key(f"authority {i}") for i in range(4)]
ATTESTER, PROVIDER, SENDER = _key("attester"), _key("provider"), _key("sender")


def merkle_vectors() -> dict:
    hashes = [crypto.sha256(b"vector tx %d" % i) for i in range(5)]
    trees = []
    for n in range(6):
        hs = hashes[:n]
        trees.append({"tx_hashes": [h.hex() for h in hs], "root": merkle.merkle_root(hs).hex(),
                      "paths": [[s.hex() for s in merkle.merkle_path(hs, i)] for i in range(n)]})
    leaves = [merkle.leaf_hash(h) for h in hashes[:4]]
    n01, n23 = merkle.node_hash(leaves[0], leaves[1]), merkle.node_hash(leaves[2], leaves[3])
    dup = hashes[:3] + hashes[2:3]
    return {
        "leaf_domain": merkle.LEAF_DOMAIN.decode(), "node_domain": merkle.NODE_DOMAIN.decode(),
        "empty_root": merkle.EMPTY_ROOT.hex(), "trees": trees,
        # Bitcoin's rule would give [a, b, c] and [a, b, c, c] one root (CVE-2012-2459); here they differ
        "duplicate_last_leaf": {"tx_hashes": [h.hex() for h in dup], "root": merkle.merkle_root(dup).hex()},
        "refused_paths": [
            {"name": "an inner node passed as a leaf (the 4-tx tree read as a 2-tx tree)",
             "tx_hash": n01.hex(), "index": 0, "count": 2, "path": [n23.hex()],
             "root": merkle.merkle_root(hashes[:4]).hex(), "error": "merkle path does not lead to the tx root"},
            {"name": "a path one sibling short", "tx_hash": hashes[2].hex(), "index": 2, "count": 5,
             "path": [s.hex() for s in merkle.merkle_path(hashes, 2)[1:]], "root": merkle.merkle_root(hashes).hex(),
             "error": "merkle path has 2 siblings; tx 2 of 5 needs 3"},
        ],
    }


def build() -> dict:
    g = make_genesis(CHAIN, [k.address for k in AUTH], [ATTESTER.address], block_time_ms=1000,
                     max_price_per_unit=1000, max_mint_per_receipt=10**12, genesis_time_ms=1_795_000_000_000,
                     version=2)  # the vectors' chain predates the economy (a version 3 MINT also writes v1:supply)
    chain = Chain(MemoryStore(), g)
    receipts = []
    for i in range(5):
        body = ReceiptBody(job_id=f"proof-job-{i}", provider=PROVIDER.address, client="client-1", units=100 + i,
                           unit_type="gpu_ms", version=1, price_per_unit=10, model="tiny-sd", prompt_hash="ab" * 32,
                           started_at=1000, finished_at=2000, artifact_sha256="cd" * 32, nonce=f"{i:032x}",
                           hub_id="", chain_id=CHAIN)
        receipts.append(sign_receipt(body, PROVIDER).attest(ATTESTER))
    txs = [decode_tx(make_mint(SENDER, g.ref, i, r)) for i, r in enumerate(receipts)]
    slot = g.genesis_time_ms // 1000
    for height in range(1, 5):  # block 1 holds the five MINTs; blocks 2-4 are empty
        slot += 1
        chain.build_block(AUTH[slot % 4], slot, slot * 1000 + 100, txs if height == 1 else [])
    cp = [fin.Checkpoint(h, chain.hash_at(h), fin.PREPARE) for h in range(5)]  # type: ignore[arg-type]
    # block 3's commit round missed, recovered by (3, commit) -> (4, prepare): a proof of 3 headers
    cert3 = fin.make_certificate([fin.make_vote(k, g, cp[3].at(fin.COMMIT), cp[4]) for k in AUTH[:3]])
    chain.store_certificate(3, cp[3].hash, cert3.encode())
    proven = receipts[2]
    p = build_proof(chain, proven.receipt_hash)
    assert len(p.headers) == 3 and p.tx_index == 2 and len(p.path) == 3
    # the usual case in ledger format 4: the MINT's own block is final by its commit round, so the
    # proof is one header and that block's certificate (prepare -> commit)
    own = Chain(MemoryStore(), g)
    for h in range(1, 5):
        own.add_block(chain.block_at(h), now_ms=10**15)  # type: ignore[arg-type]
    cert1 = fin.make_certificate([fin.make_vote(k, g, cp[1], cp[1].at(fin.COMMIT)) for k in AUTH[1:]])
    own.store_certificate(1, cp[1].hash, cert1.encode())
    p1 = build_proof(own, proven.receipt_hash)
    assert len(p1.headers) == 1 and p1.certificate == cert1.encode()

    def variant(**kw: object) -> str:
        fields = {"tx": p.tx, "tx_index": p.tx_index, "path": p.path, "headers": p.headers,
                  "certificate": p.certificate, **kw}
        return ReceiptProof(**fields).encode().hex()  # type: ignore[arg-type]

    flipped = bytes([p.path[0][0] ^ 1]) + p.path[0][1:]
    cert2 = fin.make_certificate([fin.make_vote(k, g, cp[2], cp[2].at(fin.COMMIT)) for k in AUTH[:3]])
    too_few = fin.make_certificate([fin.make_vote(k, g, cp[3].at(fin.COMMIT), cp[4]) for k in AUTH[:2]])
    bad_sig_tx = p.tx[:-1] + bytes([p.tx[-1] ^ 1])
    refused = [
        ("wrong path (a sibling with one bit flipped)", variant(path=(flipped,) + p.path[1:]),
         "merkle path does not lead to block 1's tx root (tx 2 of 5)"),
        ("swapped sibling order (the siblings top first)", variant(path=p.path[::-1]),
         "merkle path does not lead to block 1's tx root"),
        ("swapped left and right (the index of its sibling)", variant(tx_index=3),
         "merkle path does not lead to block 1's tx root"),
        ("leaf passed as inner node (the path of its parent: one sibling short, index halved)",
         variant(tx_index=1, path=p.path[1:]), "merkle path has 2 siblings; tx 1 of 5 needs 3"),
        ("header chain gap (block 2 left out)", variant(headers=(p.headers[0], p.headers[2])),
         "header chain is broken above block 1: the next header (block 3) is not its child"),
        ("certificate for another block (block 2's, with headers up to block 3)",
         variant(certificate=cert2.encode()), "proof certificate: certificate is for block 2"),
        ("too few signers (2 of 4)", variant(certificate=too_few.encode()),
         "proof certificate: certificate has too few signers: 2, needs more than 2/3 of 4 authorities (3)"),
        ("a tampered MINT (its signature's last byte)", variant(tx=bad_sig_tx), "proof transaction: bad signature"),
    ]
    return {
        "merkle": merkle_vectors(),
        "genesis": g.to_dict(), "genesis_hash": g.hash().hex(),
        "receipt": proven.to_json_dict(), "receipt_hash": proven.receipt_hash.hex(),
        "proof": {"raw": p.encode().hex(), "tx_hash": crypto.sha256(p.tx).hex(), "tx_index": p.tx_index,
                  "path": [s.hex() for s in p.path], "headers": [h.hex() for h in p.headers],
                  "certificate": p.certificate.hex(), "block_height": 1, "block_hash": cp[1].hash.hex(),
                  "certified_height": 3, "certified_hash": cp[3].hash.hex(),
                  "tx_root": merkle.merkle_root([t.hash for t in txs]).hex(),
                  "block_tx_hashes": [t.hash.hex() for t in txs]},
        "proof_own_block": {"raw": p1.encode().hex(), "headers": [h.hex() for h in p1.headers],
                            "certificate": p1.certificate.hex(), "block_height": 1, "block_hash": cp[1].hash.hex(),
                            "certified_height": 1, "certified_hash": cp[1].hash.hex()},
        "other_receipt_hash": receipts[0].receipt_hash.hex(),
        "refused_proofs": [{"name": n, "raw": raw, "error": e} for n, raw, e in refused],
    }


def main() -> None:
    OUT.write_text(json.dumps(build(), indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
