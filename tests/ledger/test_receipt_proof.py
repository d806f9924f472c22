"""Merkle tx roots and receipt proofs (docs/ledger.md, "Tx root" and "Receipt proofs"), pure: the
vectors in tests/vectors/receipt_proofs.json are what scripts/make_proof_vectors.py writes, an
independent reader reproduces the roots and paths, the proof verifies from the genesis alone and
each tampered variant is refused with its reason; a node's chain builds proofs, refuses receipts
never minted or not final yet, and bounds the header chain; format 2 blocks and folders are refused."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import struct
from pathlib import Path

import pytest

from aitbc import bech32, crypto
from aitbc.errors import FailedPrecondition, InvalidArgument, NotFound
from aitbc.ledger import authorities, merkle
from aitbc.ledger import finality as fin
from aitbc.ledger.block import Header, decode_block
from aitbc.ledger.chain import HEAD, META_CHAIN, META_FORMAT, META_GENESIS, Chain
from aitbc.ledger.genesis import Genesis
from aitbc.ledger.proof import ReceiptProof, SetChange, build_proof, decode_proof, verify_proof
from aitbc.ledger.store import MemoryStore
from aitbc.ledger.tx import decode_tx, make_mint, make_transfer

from .helpers import ALICE, AUTH, BOB, genesis, receipt
from .test_vectors import independent_merkle_root

ROOT = Path(__file__).resolve().parents[2]
VECTORS = ROOT / "tests" / "vectors" / "receipt_proofs.json"


def _vectors() -> dict:
    return json.loads(VECTORS.read_text())


def _script():
    spec = importlib.util.spec_from_file_location("make_proof_vectors", ROOT / "scripts" / "make_proof_vectors.py")
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def test_script_reproduces_the_vectors():
    assert _script().build() == _vectors()


def test_merkle_vectors_match_an_independent_reader():
    m = _vectors()["merkle"]

    def dd(domain: bytes, payload: bytes) -> bytes:
        return hashlib.sha256(domain + b"\x00" + payload).digest()

    assert m["empty_root"] == dd(b"AITBC/txroot/v3", b"").hex()
    for t in m["trees"]:
        hs = [bytes.fromhex(h) for h in t["tx_hashes"]]
        assert independent_merkle_root(hs).hex() == t["root"] == merkle.merkle_root(hs).hex()
        for i, path in enumerate(t["paths"]):
            sibs = [bytes.fromhex(s) for s in path]
            merkle.verify_path(hs[i], i, len(hs), sibs, bytes.fromhex(t["root"]))
            # the same path read as the path of any other position fails
            for j in range(len(hs)):
                if j != i and len(path) == len(merkle.merkle_path(hs, j)):
                    with pytest.raises(InvalidArgument):
                        merkle.verify_path(hs[i], j, len(hs), sibs, bytes.fromhex(t["root"]))
    three = m["trees"][3]
    assert m["duplicate_last_leaf"]["root"] != three["root"]  # not Bitcoin's CVE-2012-2459 rule
    assert len({t["root"] for t in m["trees"]}) == len(m["trees"])
    for r in m["refused_paths"]:
        with pytest.raises(InvalidArgument, match="^" + r["error"]):
            merkle.verify_path(bytes.fromhex(r["tx_hash"]), r["index"], r["count"],
                               [bytes.fromhex(s) for s in r["path"]], bytes.fromhex(r["root"]))


def test_every_path_of_trees_up_to_40_txs_verifies_and_no_other_does():
    hashes = [crypto.sha256(b"t%d" % i) for i in range(40)]
    for n in range(1, 41):
        hs = hashes[:n]
        root = merkle.merkle_root(hs)
        assert root == independent_merkle_root(hs)
        for i in range(n):
            path = merkle.merkle_path(hs, i)
            assert len(path) <= (n - 1).bit_length()
            merkle.verify_path(hs[i], i, n, path, root)
            with pytest.raises(InvalidArgument):  # another tx at that position
                merkle.verify_path(hashes[(i + 1) % 40] if n < 40 else crypto.sha256(b"x"), i, n, path, root)


def test_leaf_and_inner_node_domains_differ():
    a, b = crypto.sha256(b"a"), crypto.sha256(b"b")
    inner = merkle.node_hash(merkle.leaf_hash(a), merkle.leaf_hash(b))
    # a 2-leaf tree's root read as a 1-leaf tree whose tx hash is that inner node: refused
    with pytest.raises(InvalidArgument, match="does not lead"):
        merkle.verify_path(inner, 0, 1, [], merkle.merkle_root([a, b]))
    assert merkle.leaf_hash(a) != a and merkle.merkle_root([a]) == merkle.leaf_hash(a)


def test_vector_proof_verifies_from_the_genesis_alone():
    v = _vectors()
    g = Genesis.from_dict(v["genesis"])
    raw = bytes.fromhex(v["proof"]["raw"])
    res = verify_proof(raw, g, bytes.fromhex(v["receipt_hash"]))
    assert (res.block_height, res.block_hash.hex()) == (1, v["proof"]["block_hash"])
    assert (res.certified_height, res.certified_hash.hex()) == (3, v["proof"]["certified_hash"])
    assert res.tx_hash.hex() == v["proof"]["tx_hash"] and res.amount == 102 * 10
    p = decode_proof(raw)
    assert p.encode() == raw and [h.hex() for h in p.headers] == v["proof"]["headers"]
    tx_hashes = [bytes.fromhex(h) for h in v["proof"]["block_tx_hashes"]]
    assert independent_merkle_root(tx_hashes).hex() == v["proof"]["tx_root"]
    # ledger format 4: the MINT's own block certified by its commit round, one header in all
    own = v["proof_own_block"]
    res = verify_proof(bytes.fromhex(own["raw"]), g, bytes.fromhex(v["receipt_hash"]))
    assert (res.block_height, res.certified_height) == (1, 1) and len(own["headers"]) == 1
    assert len(bytes.fromhex(own["raw"])) < len(raw)


def test_vector_proof_across_two_set_changes_verifies_from_the_genesis_alone():
    """The set changes twice (NEW in, A3 out); the proof of a MINT after both carries each change's
    block, certified by the set before it, and checks out against the genesis list alone."""
    v = _vectors()["across_set_changes"]
    g = Genesis.from_dict(v["genesis"])
    raw = bytes.fromhex(v["proof"]["raw"])
    res = verify_proof(raw, g, bytes.fromhex(v["receipt_hash"]))
    assert (res.block_height, res.certified_height, res.set_changes) == (9, 9, 2)
    assert [authorities.address(a) for a in res.authorities] == v["set_chains"][8]["authorities"]
    assert decode_proof(raw).encode() == raw
    # the vector chain replays on a fresh node (every header's set chain checked against its state)
    chain = Chain(MemoryStore(), g)
    for b in _script().across_set_changes_blocks():
        assert chain.add_block(b, now_ms=10**15) == "extended"
    assert [decode_header_hex(chain.header_at(s["height"])) for s in v["set_chains"]] == \
        [s["set_chain"] for s in v["set_chains"]]


def test_set_chain_vectors_match_an_independent_reader():
    """docs/ledger.md "Set chain" from scratch: link(prev, epoch, set) = sha256("AITBC/aset/v1" 0x00
    prev u64 epoch u16 n ids), the genesis link from the genesis hash at epoch 1, a new link at each
    epoch whose set differs from the one before."""
    v = _vectors()["across_set_changes"]
    gh = hashlib.sha256(json.dumps(v["genesis"], sort_keys=True, separators=(",", ":")).encode()).digest()

    def link(prev: bytes, epoch: int, members: list[str]) -> bytes:
        ids = b"".join(bech32.decode(a)[1] for a in members)
        return hashlib.sha256(b"AITBC/aset/v1\x00" + prev + struct.pack(">QH", epoch, len(members)) + ids).digest()

    cur = link(gh, 1, v["genesis"]["authorities"])
    eb = v["genesis"]["epoch_blocks"]
    sets = {1: v["genesis"]["authorities"]}
    for c in v["proof"]["changes"]:
        sets[c["epoch"]] = c["members"]
    for s in v["set_chains"]:
        fixed = s["height"] // eb + 1
        if s["height"] % eb == 0 and fixed in sets:
            cur = link(cur, fixed, sets[fixed])
        assert s["set_chain"] == cur.hex(), s["height"]
    # every header of a change's block carries its chain at offset len - 36 (just before tx_count)
    for c in v["proof"]["changes"]:
        h = bytes.fromhex(c["header"])
        assert h[0] == 4 and h[-36:-4].hex() == v["set_chains"][c["block_height"] - 1]["set_chain"]


@pytest.mark.parametrize("case", _vectors()["across_set_changes"]["refused_proofs"], ids=lambda c: c["name"])
def test_vector_refused_proofs_across_set_changes(case):
    v = _vectors()["across_set_changes"]
    g = Genesis.from_dict(v["genesis"])
    with pytest.raises(InvalidArgument, match="^" + re.escape(case["error"])):
        verify_proof(bytes.fromhex(case["raw"]), g, bytes.fromhex(v["receipt_hash"]))


def test_a_set_change_naming_a_member_twice_or_none_is_refused():
    v = _vectors()["across_set_changes"]
    g = Genesis.from_dict(v["genesis"])
    p = decode_proof(bytes.fromhex(v["proof"]["raw"]))
    c1, c2 = p.changes
    for members in ((*c2.members, c2.members[0]), ()):
        bad = ReceiptProof(p.tx, p.tx_index, p.path, p.headers, p.certificate,
                           (c1, SetChange(c2.epoch, members, c2.header, c2.certificate)))
        with pytest.raises(InvalidArgument, match=r"^set change 2 \(epoch 4\): the member list must name at least "
                                                  "one authority, each once"):
            verify_proof(bad.encode(), g, bytes.fromhex(v["receipt_hash"]))
    v2 = Genesis.from_dict(_vectors()["genesis"])  # a version 2 genesis: no change can be listed
    old = decode_proof(bytes.fromhex(_vectors()["proof"]["raw"]))
    with pytest.raises(InvalidArgument, match=r"^set change 1 \(epoch 2\): this chain's genesis is version 2"):
        verify_proof(ReceiptProof(old.tx, old.tx_index, old.path, old.headers, old.certificate, (c1,)).encode(), v2,
                     bytes.fromhex(_vectors()["receipt_hash"]))


def decode_header_hex(raw: bytes | None) -> str:
    from aitbc.ledger.block import decode_header

    assert raw is not None
    return decode_header(raw).set_chain.hex()


@pytest.mark.parametrize("case", _vectors()["refused_proofs"], ids=lambda c: c["name"])
def test_vector_refused_proofs(case):
    v = _vectors()
    g = Genesis.from_dict(v["genesis"])
    with pytest.raises(InvalidArgument, match="^" + case["error"].replace("(", r"\(").replace(")", r"\)")):
        verify_proof(bytes.fromhex(case["raw"]), g, bytes.fromhex(v["receipt_hash"]))


def test_proof_for_another_receipt_or_genesis_is_refused():
    v = _vectors()
    g = Genesis.from_dict(v["genesis"])
    raw = bytes.fromhex(v["proof"]["raw"])
    with pytest.raises(InvalidArgument, match="^proof is for receipt .*, not for receipt " + v["other_receipt_hash"]):
        verify_proof(raw, g, bytes.fromhex(v["other_receipt_hash"]))
    twin = Genesis.from_dict({**v["genesis"], "genesis_time_ms": v["genesis"]["genesis_time_ms"] + 1})
    with pytest.raises(InvalidArgument, match="^proof transaction: wrong genesis"):
        verify_proof(raw, twin, bytes.fromhex(v["receipt_hash"]))
    for bad, why in ((b"junk", "not a receipt proof"), (raw[:-1], "truncated"), (raw + b"\x00", "truncated or trailing"),
                     (raw[:8] + b"\x03" + raw[9:], "version 3 is not supported"),
                     (raw[:8] + b"\x01" + raw[9:], r"version 1 is not supported \(a ledger format 4 proof")):
        with pytest.raises(InvalidArgument, match="^malformed proof: " + why):
            verify_proof(bad, g, bytes.fromhex(v["receipt_hash"]))


def test_a_transfer_or_a_header_of_another_chain_is_refused_even_when_certified():
    """Links a byzantine quorum could sign: the checks hold by themselves, not only through the
    certificate."""
    g = genesis(4)
    r = receipt(9)
    gh = g.hash()

    def proof_for(tx_raw: bytes, header_genesis: Genesis) -> bytes:
        tx = decode_tx(tx_raw)
        hgh = header_genesis.hash()
        h = Header(header_genesis.chain_id, hgh, 1, hgh, 5, 5000, crypto.sha256(AUTH[1].pubkey)[:20],
                   merkle.merkle_root([tx.hash]), b"\x00" * 32, authorities.genesis_set_chain(header_genesis, hgh), 1)
        s = fin.Checkpoint(1, h.hash, fin.PREPARE)
        t = s.at(fin.COMMIT)
        cert = fin.make_certificate([fin.make_vote(k, g, s, t) for k in AUTH[:3]])
        return ReceiptProof(tx_raw, 0, (), (h.encode(),), cert.encode()).encode()

    assert verify_proof(proof_for(make_mint(ALICE, g.ref, 0, r), g), g, r.receipt_hash).block_height == 1
    with pytest.raises(InvalidArgument, match="^proof transaction is a TRANSFER, not a MINT or SETTLE"):
        verify_proof(proof_for(make_transfer(ALICE, g.ref, 0, BOB.address, 5), g), g, r.receipt_hash)
    twin = genesis(4, genesis_time_ms=7)
    with pytest.raises(InvalidArgument, match=r"^proof header 1 \(block 1\) is for another chain"):
        verify_proof(proof_for(make_mint(ALICE, g.ref, 0, r), twin), g, r.receipt_hash, gh)


def _chain_with_mint(n_auth: int = 4, empty_after: int = 3):
    g = genesis(n_auth)
    chain = Chain(MemoryStore(), g)
    r = receipt(7)
    slot = g.genesis_time_ms // g.block_time_ms
    for h in range(1 + empty_after):
        slot += 1
        txs = [decode_tx(make_mint(ALICE, g.ref, 0, r))] if h == 0 else []
        chain.build_block(AUTH[slot % n_auth], slot, slot * g.block_time_ms + 10, txs)
    return chain, g, r


def _certify(chain: Chain, g: Genesis, height: int) -> None:
    s = fin.Checkpoint(height, chain.hash_at(height), fin.PREPARE)  # type: ignore[arg-type]
    t = s.at(fin.COMMIT)  # the block's own commit round (ledger format 4)
    cert = fin.make_certificate([fin.make_vote(k, g, s, t) for k in AUTH[:3]])
    chain.store_certificate(height, s.hash, cert.encode())


def test_build_proof_from_a_chain():
    chain, g, r = _chain_with_mint()
    with pytest.raises(NotFound, match="^receipt .* was never minted on this chain"):
        build_proof(chain, receipt(8).receipt_hash)
    with pytest.raises(FailedPrecondition, match="^not final yet: receipt .* is in block 1, above the certified "
                                                 "height 0; retry after height 1 is certified"):
        build_proof(chain, r.receipt_hash)
    _certify(chain, g, 3)
    with pytest.raises(FailedPrecondition, match="^no certificate within 2 headers of block 1"):
        build_proof(chain, r.receipt_hash, max_headers=2)
    p = build_proof(chain, r.receipt_hash)
    assert len(p.headers) == 3 and p.tx_index == 0 and p.path == ()
    res = verify_proof(p.encode(), g, r.receipt_hash)
    assert (res.block_height, res.certified_height) == (1, 3)
    _certify(chain, g, 1)  # the nearest certified block at or above the MINT's is taken
    assert len(build_proof(chain, r.receipt_hash).headers) == 1
    # a proof with too many headers is refused before anything is checked
    long = ReceiptProof(p.tx, 0, (), p.headers * 86, p.certificate).encode()
    with pytest.raises(InvalidArgument, match="^malformed proof: 258 headers, needs 1 to 256"):
        decode_proof(long)


def test_format_2_blocks_and_data_folders_are_refused():
    chain, g, _ = _chain_with_mint(1, 0)
    raw = chain.block_raw_at(1)
    assert raw is not None and raw[4] == 4
    with pytest.raises(InvalidArgument, match=r"^malformed block: header version 2 is not supported \(a ledger "
                                              "format 2 block, whose tx root is a flat hash"):
        decode_block(raw[:4] + b"\x02" + raw[5:])
    with pytest.raises(InvalidArgument, match=r"^malformed block: header version 3 is not supported \(a ledger "
                                              "format 3 or 4 block, whose header does not commit to the authority "
                                              r"sets; this node runs format 5\)"):
        decode_block(raw[:4] + b"\x03" + raw[5:])
    store = MemoryStore()  # what a format-2 node left behind
    store.commit({META_GENESIS: g.hash(), META_CHAIN: g.chain_id.encode(), META_FORMAT: struct.pack(">I", 2),
                  HEAD: b"\x00" * 32})
    with pytest.raises(FailedPrecondition, match="^data folder holds a ledger format 2 chain; this node runs format 5: "
                                                 "ledger format 3 made the block's tx root a Merkle tree"):
        Chain(store, g)
    store = MemoryStore()  # what a format-4 node left behind (headers without the set chain)
    store.commit({META_GENESIS: g.hash(), META_CHAIN: g.chain_id.encode(), META_FORMAT: struct.pack(">I", 4),
                  HEAD: b"\x00" * 32})
    with pytest.raises(FailedPrecondition, match="^data folder holds a ledger format 4 chain; this node runs format 5: "
                                                 "ledger format 5 headers commit to the authority sets .* start them on "
                                                 "new data folders"):
        Chain(store, g)


def test_a_receipt_settled_by_a_settle_proves_like_a_mint():
    """A SETTLE mints its receipt as a MINT does (and pays its quote's fee from escrow): its proof
    verifies from the genesis alone and names what it minted (until format 5 its verifier refused it
    as "not a MINT")."""
    from aitbc.ledger.tx import make_escrow_deposit, make_settle

    from .economy_helpers import CLIENT, Runner, quote_for, text_receipt
    from .helpers import ATTESTER

    g = genesis(1)
    run = Runner(g, AUTH[0])
    run.block(make_mint(ALICE, g.ref, 0, text_receipt(901, provider=CLIENT, price=100)))
    run.block(make_escrow_deposit(CLIENT, g.ref, 0, ATTESTER.address, 1000))
    r = text_receipt(1, price=10)
    run.block(make_settle(ATTESTER, g.ref, 0, r, quote_for(g, r, price=6, fee=20)))
    _certify_by(run.chain, g, run.height, AUTH[:1])
    res = verify_proof(build_proof(run.chain, r.receipt_hash).encode(), g, r.receipt_hash)
    assert (res.block_height, res.amount) == (run.height, 50 * 10)  # the mint; the fee is not minted


def _certify_by(chain: Chain, g: Genesis, height: int, signers) -> None:
    s = fin.Checkpoint(height, chain.hash_at(height), fin.PREPARE)  # type: ignore[arg-type]
    chain.store_certificate(height, s.hash, fin.make_certificate(
        [fin.make_vote(k, g, s, s.at(fin.COMMIT)) for k in signers]).encode())


def test_the_proof_across_set_changes_verifies_with_an_independent_reader():
    """docs/ledger.md "Receipt proofs" (version 2) and "Set chain" implemented from scratch with
    hashlib, struct and coincurve: the proof of the vectors parses, every set change links the set
    chain and is certified by more than 2/3 of the set before it, the certified block's set chain is
    the last link and its certificate is by its epoch's set; leaving out a change breaks it."""
    import coincurve

    v = _vectors()["across_set_changes"]
    gen = v["genesis"]
    gh = hashlib.sha256(json.dumps(gen, sort_keys=True, separators=(",", ":")).encode()).digest()
    cid, eb = gen["chain_id"].encode(), gen["epoch_blocks"]

    def dd(domain: bytes, payload: bytes) -> bytes:
        return hashlib.sha256(domain + b"\x00" + payload).digest()

    def ids_of(addrs: list[str]) -> tuple[bytes, ...]:
        return tuple(bytes(bech32.decode(a)[1]) for a in addrs)

    def link(prev: bytes, epoch: int, ids: tuple[bytes, ...]) -> bytes:
        return dd(b"AITBC/aset/v1", prev + struct.pack(">QH", epoch, len(ids)) + b"".join(ids))

    def header(raw: bytes) -> dict:
        assert raw[0] == 4 and raw[2:2 + raw[1]] == cid and raw[2 + raw[1]:34 + raw[1]] == gh
        height, parent, _slot, _ts, _prop, tx_root, _sr, set_chain, n = struct.unpack(
            ">Q32sQQ20s32s32s32sI", raw[34 + raw[1]:])
        return {"height": height, "hash": dd(b"AITBC/block/v2", raw), "parent": parent, "set_chain": set_chain,
                "tx_root": tx_root, "tx_count": n}

    def certified_by(raw: bytes, h: dict, sets: list) -> bool:
        sh, shash, sp, th, thash, tp, count = struct.unpack_from(">Q32sBQ32sBH", raw, 1)
        assert raw[0] == 2 and (sh, shash) == (h["height"], h["hash"]) and 2 * th + tp == 2 * sh + sp + 1
        members = next(m for start, m in reversed(sets) if start <= (th - 1) // eb)
        signers = set()
        for i in range(count):
            voter = raw[85 + 85 * i:105 + 85 * i]
            sig = raw[105 + 85 * i:170 + 85 * i]
            body = bytes((2, len(cid))) + cid + gh + struct.pack(">Q32sBQ32sB", sh, shash, sp, th, thash, tp) + voter
            pub = coincurve.PublicKey.from_signature_and_message(sig, dd(b"AITBC/vote/v2", body), hasher=None)
            if hashlib.sha256(pub.format()).digest()[:20] != voter or voter not in members:
                return False
            signers.add(voter)
        return len(signers) >= 2 * len(members) // 3 + 1

    def check(raw: bytes) -> bool:
        assert raw[:9] == b"AITBC-RP\x02"
        (tlen,) = struct.unpack_from(">I", raw, 9)
        pos = 13 + tlen + 4
        pos += 1 + 32 * raw[pos]
        (count,) = struct.unpack_from(">H", raw, pos)
        pos += 2
        headers = []
        for _ in range(count):
            (hlen,) = struct.unpack_from(">H", raw, pos)
            headers.append(header(raw[pos + 2:pos + 2 + hlen]))
            pos += 2 + hlen
        (clen,) = struct.unpack_from(">I", raw, pos)
        top_cert = raw[pos + 4:pos + 4 + clen]
        pos += 4 + clen
        (nchanges,) = struct.unpack_from(">H", raw, pos)
        pos += 2
        sets = [(0, ids_of(gen["authorities"]))]
        chain = link(gh, 1, sets[0][1])
        for _ in range(nchanges):
            epoch, n = struct.unpack_from(">QH", raw, pos)
            members = tuple(raw[pos + 10 + 20 * i:pos + 30 + 20 * i] for i in range(n))
            pos += 10 + 20 * n
            (hlen,) = struct.unpack_from(">H", raw, pos)
            h = header(raw[pos + 2:pos + 2 + hlen])
            pos += 2 + hlen
            (clen,) = struct.unpack_from(">I", raw, pos)
            cert = raw[pos + 4:pos + 4 + clen]
            pos += 4 + clen
            chain = link(chain, epoch, members)
            if epoch <= max(1, sets[-1][0]) or h["height"] // eb + 1 != epoch or h["set_chain"] != chain \
                    or not certified_by(cert, h, sets):
                return False
            sets.append((epoch, members))
        assert pos == len(raw)
        return headers[-1]["set_chain"] == chain and certified_by(top_cert, headers[-1], sets)

    assert check(bytes.fromhex(v["proof"]["raw"]))
    refused = {c["name"]: bytes.fromhex(c["raw"]) for c in v["refused_proofs"]}
    for name in ("the second set change left out", "the first set change left out",
                 "a wrong member list (the second change's first two members swapped)",
                 "a forged boundary (block 6 re-made to hand over to the attacker's keys, certified by them)",
                 "a boundary certified by the wrong set (block 2 by the set it hands over to)",
                 "the receipt's block certified by the old set (A3, voted out, among the signers)"):
        assert not check(refused[name]), name
