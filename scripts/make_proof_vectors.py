#!/usr/bin/env python3
"""Write tests/vectors/receipt_proofs.json: Merkle tx roots and paths, and a receipt proof over a
4-authority chain with refused variants (docs/ledger.md, "Tx root" and "Receipt proofs").

Keys are fixed and RFC 6979 signatures deterministic, so the output is byte-exact; run once when
the format changes (`PYTHONPATH=. .venv/bin/python scripts/make_proof_vectors.py`).
tests/ledger/test_receipt_proof.py checks that this script still reproduces the file and that each
proof is accepted or refused with its message.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from aitbc import crypto
from aitbc.ledger import authorities, merkle
from aitbc.ledger import finality as fin
from aitbc.ledger.block import decode_header
from aitbc.ledger.chain import Chain
from aitbc.ledger.genesis import make_genesis
from aitbc.ledger.proof import ReceiptProof, SetChange, build_proof
from aitbc.ledger.store import MemoryStore
from aitbc.ledger.tx import ACTION_ADD, ACTION_REMOVE, decode_tx, make_authority_vote, make_mint
from aitbc.receipts import ReceiptBody, sign_receipt

OUT = Path(__file__).resolve().parent.parent / "tests" / "vectors" / "receipt_proofs.json"
CHAIN = "aitbc-proof-vectors"
SETS_CHAIN = "aitbc-proof-vectors-sets"


def _key(name: str) -> crypto.PrivateKey:
    return crypto.PrivateKey(crypto.sha256(b"aitbc proof vector key " + name.encode()))


AUTH = [_key(f"authority {i}") for i in range(4)]
ATTESTER, PROVIDER, SENDER = _key("attester"), _key("provider"), _key("sender")
NEW, EVIL = _key("authority new"), [_key(f"not an authority {i}") for i in range(4)]


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
        "across_set_changes": across_set_changes(),
    }


def across_set_changes_blocks() -> list:
    """The blocks of the across_set_changes chain (for a replay on a fresh node)."""
    chain = _sets_chain()[1]
    return [chain.block_at(h) for h in range(1, 11)]


def across_set_changes() -> dict:
    """A version 3 chain (epoch_blocks 2, 4 authorities A0-A3) whose set changes twice by votes:
    three vote NEW in (block 1, epoch 0; set(2) = A0-A3 + NEW, written by block 2), four of those
    five vote A3 out (block 5, epoch 2; set(4) = A0 A1 A2 NEW, written by block 6); block 9
    (epoch 4) holds a MINT. Every block is final by its own commit round, certified by the first q
    of its epoch's set. The proof carries both changes: block 2 (certified by the genesis set) and
    block 6 (by the 5-set)."""
    g, chain, r = _sets_chain()
    p = build_proof(chain, r.receipt_hash)
    assert [c.epoch for c in p.changes] == [2, 4] and len(p.headers) == 1
    c1, c2 = p.changes
    assert decode_header(c1.header).height == 2 and decode_header(c2.header).height == 6
    return _across(g, chain, r, p)


def _sets_chain():  # type: ignore[no-untyped-def]
    g = make_genesis(SETS_CHAIN, [k.address for k in AUTH], [ATTESTER.address], block_time_ms=1000,
                     max_price_per_unit=1000, max_mint_per_receipt=10**12, genesis_time_ms=1_795_000_000_000,
                     epoch_blocks=2)
    keys = {crypto.sha256(k.pubkey)[:20]: k for k in [*AUTH, NEW]}
    body = ReceiptBody(job_id="proof-job-sets", provider=PROVIDER.address, client="client-1", units=7,
                       unit_type="gpu_ms", version=1, price_per_unit=10, model="tiny-sd", prompt_hash="ab" * 32,
                       started_at=1000, finished_at=2000, artifact_sha256="cd" * 32, nonce="ef" * 16, hub_id="",
                       chain_id=SETS_CHAIN)
    r = sign_receipt(body, PROVIDER).attest(ATTESTER)
    txs = {1: [make_authority_vote(k, g.ref, 0, ACTION_ADD, NEW.address) for k in AUTH[:3]],
           5: [make_authority_vote(k, g.ref, 1, ACTION_REMOVE, AUTH[3].address) for k in AUTH[:3]]
           + [make_authority_vote(NEW, g.ref, 0, ACTION_REMOVE, AUTH[3].address)],
           9: [make_mint(SENDER, g.ref, 0, r)]}
    chain = Chain(MemoryStore(), g)
    slot = g.genesis_time_ms // 1000
    for height in range(1, 11):
        ids = chain.authorities_at(height)
        assert ids is not None
        slot += 1
        chain.build_block(keys[ids[slot % len(ids)]], slot, slot * 1000 + 100,
                          [decode_tx(t) for t in txs.get(height, [])])
        cp = fin.Checkpoint(height, chain.hash_at(height), fin.PREPARE)  # type: ignore[arg-type]
        signers = sorted(ids)[:fin.quorum(len(ids))]
        chain.store_certificate(height, cp.hash, fin.make_certificate(
            [fin.make_vote(keys[a], g, cp, cp.at(fin.COMMIT)) for a in signers]).encode())
    return g, chain, r


def _across(g, chain, r, p) -> dict:  # type: ignore[no-untyped-def]
    c1, c2 = p.changes

    def variant(**kw: object) -> str:
        return dataclasses.replace(p, **kw).encode().hex()  # type: ignore[arg-type]

    def cert_of(header: bytes, signers: list[crypto.PrivateKey]) -> bytes:
        h = decode_header(header)
        cp = fin.Checkpoint(h.height, h.hash, fin.PREPARE)
        return fin.make_certificate([fin.make_vote(k, g, cp, cp.at(fin.COMMIT)) for k in signers]).encode()

    # a forged second boundary: block 6 re-made to hand the set over to four keys the attacker
    # holds (its set chain rebuilt for them), certified by those keys
    h6 = decode_header(c2.header)
    evil_ids = tuple(crypto.sha256(k.pubkey)[:20] for k in EVIL)
    forged6 = dataclasses.replace(h6, set_chain=authorities.set_link(decode_header(c1.header).set_chain, 4,
                                                                     evil_ids)).encode()
    forged = SetChange(4, evil_ids, forged6, cert_of(forged6, EVIL))
    reordered = SetChange(4, (c2.members[1], c2.members[0], *c2.members[2:]), c2.header, c2.certificate)
    by_new_set = SetChange(2, c1.members, c1.header, cert_of(c1.header, [AUTH[0], AUTH[1], NEW]))
    old_set_top = cert_of(p.headers[0], [AUTH[0], AUTH[1], AUTH[3]])
    new_addr, a3 = NEW.address, AUTH[3].address
    evil_first = min(EVIL, key=lambda k: crypto.sha256(k.pubkey)[:20]).address  # signers are checked in id order
    refused = [
        ("the second set change left out", variant(changes=(c1,)),
         "block 9's set chain does not match the proof's 1 set change(s): a set change is missing from the proof"),
        ("the first set change left out", variant(changes=(c2,)),
         "set change 1 (epoch 4): block 6's set chain does not match the listed sets (a set change before it is "
         "missing from the proof, or a member list is wrong)"),
        ("no set change at all (a proof as if the genesis set still signed)", variant(changes=()),
         "block 9's set chain does not match the proof's 0 set change(s)"),
        ("a forged boundary (block 6 re-made to hand over to the attacker's keys, certified by them)",
         variant(changes=(c1, forged)),
         f"set change 2 (epoch 4) certificate: certificate refused: vote from {evil_first}, which is not an "
         "authority"),
        ("a boundary certified by the wrong set (block 2 by the set it hands over to)", variant(changes=(by_new_set, c2)),
         f"set change 1 (epoch 2) certificate: certificate refused: vote from {new_addr}, which is not an authority"),
        ("a wrong member list (the second change's first two members swapped)", variant(changes=(c1, reordered)),
         "set change 2 (epoch 4): block 6's set chain does not match the listed sets"),
        ("a change listed twice (the first again, after the second)", variant(changes=(c1, c2, c1)),
         "set change 3 (epoch 2) is not after the change before it (epoch 4)"),
        ("a change that changes nothing (the genesis set again)",
         variant(changes=(SetChange(2, g.authority_ids, c1.header, c1.certificate), c2)),
         "set change 1 (epoch 2) does not change the set"),
        ("a boundary block outside its window (block 6's header for the change of epoch 2)",
         variant(changes=(SetChange(2, c1.members, c2.header, c2.certificate), c2)),
         "set change 1 (epoch 2): block 6 is not one that fixed the set of epoch 2 (blocks 2 to 3)"),
        ("the receipt's block certified by the old set (A3, voted out, among the signers)",
         variant(certificate=old_set_top),
         f"proof certificate: certificate refused: vote from {a3}, which is not an authority"),
    ]
    return {
        "genesis": g.to_dict(), "genesis_hash": g.hash().hex(), "receipt": r.to_json_dict(),
        "receipt_hash": r.receipt_hash.hex(),
        "set_chains": [{"height": h, "set_chain": decode_header(chain.header_at(h)).set_chain.hex(),  # type: ignore[arg-type]
                        "authorities": [authorities.address(a) for a in chain.authorities_at(h)]}  # type: ignore[union-attr]
                       for h in range(1, 11)],
        "proof": {"raw": p.encode().hex(), "block_height": 9, "certified_height": 9,
                  "changes": [{"epoch": c.epoch, "members": [authorities.address(m) for m in c.members],
                               "header": c.header.hex(), "certificate": c.certificate.hex(),
                               "block_height": decode_header(c.header).height} for c in p.changes]},
        "refused_proofs": [{"name": n, "raw": raw, "error": e} for n, raw, e in refused],
    }


def main() -> None:
    OUT.write_text(json.dumps(build(), indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
