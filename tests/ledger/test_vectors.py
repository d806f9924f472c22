"""Ledger test vectors (tests/vectors/ledger_vectors.json): the implementation reproduces them
byte for byte, and an independent reader written from docs/ledger.md alone (hashlib, struct,
coincurve) re-verifies the vector chain. Regenerate (only on a deliberate format change) with
`.venv/bin/python -m tests.ledger.test_vectors`."""

from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path

import coincurve
import pytest

from aitbc import bech32, crypto
from aitbc.errors import AitbcError
from aitbc.ledger import finality as fin
from aitbc.ledger import state
from aitbc.ledger.block import decode_block
from aitbc.ledger.chain import Chain
from aitbc.ledger.genesis import Genesis, make_genesis
from aitbc.ledger.store import MemoryStore
from aitbc.ledger.tx import decode_tx, make_evidence, make_mint, make_transfer, signing_digest

from .helpers import ALICE, ATTESTER, AUTH, BOB, PROVIDER, receipt

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "ledger_vectors.json"
CHAIN = "aitbc-test"  # the vectors' chain id (fixed: vectors are byte-exact)


def build() -> dict:
    g = make_genesis(CHAIN, [AUTH[0].address], [ATTESTER.address], block_time_ms=1000, max_price_per_unit=1000,
                     max_mint_per_receipt=10**12, genesis_time_ms=1_795_000_000_000, version=2)
    chain = Chain(MemoryStore(), g)  # a version 2 genesis: its bytes and hash are what they were
    r = receipt(1, units=100, price=10)
    tx_specs = [
        ("mint", make_mint(ALICE, g.ref, 0, r)),
        ("transfer-1", make_transfer(PROVIDER, g.ref, 0, BOB.address, 250)),
        ("transfer-2", make_transfer(PROVIDER, g.ref, 1, BOB.address, 1)),
    ]
    txs = {name: decode_tx(raw) for name, raw in tx_specs}
    out: dict = {
        "keys": {"authority": AUTH[0].secret.hex(), "attester": ATTESTER.secret.hex(),
                 "provider": PROVIDER.secret.hex(), "alice": ALICE.secret.hex(), "bob": BOB.secret.hex()},
        "genesis": g.to_dict(),
        "genesis_canonical_json": g.canonical_bytes().decode(),
        "genesis_hash": g.hash().hex(),
        "genesis_state_root": state.genesis_state_root(g.hash()).hex(),
        "transactions": [],
        "blocks": [],
    }
    for name, tx in txs.items():
        out["transactions"].append({
            "name": name, "kind": tx.kind_name, "sender": tx.sender, "nonce": tx.nonce,
            "chain_id": tx.chain_id, "genesis_hash": tx.genesis_hash.hex(),
            "to": tx.to_address, "amount": tx.amount,
            "receipt_hash": tx.receipt.receipt_hash.hex() if tx.receipt else "",
            "body": tx.body.hex(), "signing_digest": signing_digest(tx.body).hex(),
            "signature": tx.signature.hex(), "raw": tx.raw.hex(), "hash": tx.hash.hex(),
        })
    t1 = txs["transfer-1"]
    twin = make_genesis(CHAIN, [AUTH[0].address], [ATTESTER.address], block_time_ms=1000, max_price_per_unit=1000,
                        max_mint_per_receipt=10**12, genesis_time_ms=1_795_000_000_001, version=2)
    out["refused_transactions"] = [  # each must be refused with the message's prefix
        {"name": "transfer-1 with its 65-byte recoverable signature (a second encoding)",
         "raw": (t1.body + PROVIDER.sign(signing_digest(t1.body))).hex(),
         "error": "malformed transaction: signature must be exactly 64 bytes"},
        {"name": "transfer-1 signed for another genesis with the same chain id",
         "raw": make_transfer(PROVIDER, twin.ref, 0, BOB.address, 250).hex(), "error": "wrong genesis"},
    ]
    slot0 = g.genesis_time_ms // 1000
    for slot, names in ((slot0 + 1, ["mint"]), (slot0 + 3, ["transfer-1", "transfer-2"])):
        before = chain.head
        writes = state.apply_txs(chain.store.get, [txs[n] for n in names], g, before.height + 1)
        block, dropped = chain.build_block(AUTH[0], slot, slot * 1000 + 250, [txs[n] for n in names])
        assert not dropped
        h = block.header
        out["blocks"].append({
            "height": h.height, "slot": h.slot, "timestamp_ms": h.timestamp_ms, "parent_hash": h.parent_hash.hex(),
            "proposer": h.proposer_address, "tx_root": h.tx_root.hex(), "state_root": h.state_root.hex(),
            "tx_count": h.tx_count, "genesis_hash": h.genesis_hash.hex(), "header": h.encode().hex(), "hash": block.hash.hex(),
            "signature": block.signature.hex(), "raw": block.raw.hex(),
            "state_writes": [[k.hex(), v.hex()] for k, v in sorted(writes.items())],
            "state_diff": state.encode_state_diff(writes).hex(),
        })
    out["final_balances"] = {who.address: chain.account(hashlib.sha256(who.pubkey).digest()[:20])[0]
                             for who in (PROVIDER, BOB, ALICE)}
    out["finality"] = finality_vectors()
    out["economy"] = economy_vectors()
    out["authority_sets"] = authority_set_vectors()
    return out


def economy_vectors() -> dict:
    """Genesis version 3 and one transaction of each economy kind (4-11) in three blocks: encodings,
    digests, hashes, each block's state writes (docs/ledger.md "Transition", steps 8-15) and supply."""
    from aitbc.ledger import tx as txmod

    from .economy_helpers import CLIENT, HONEST, quote_for, text_receipt

    g = make_genesis(CHAIN, [AUTH[0].address], [ATTESTER.address], block_time_ms=1000, max_price_per_unit=1000,
                     max_mint_per_receipt=10**12, genesis_time_ms=1_795_000_000_000, unbonding_blocks=1,
                     escrow_timeout_blocks=1, slash_ppm=250_000, slash_reward_ppm=600_000, epoch_blocks=100)
    chain = Chain(MemoryStore(), g)
    ref = g.ref
    settled = text_receipt(2, price=10)
    quote = quote_for(g, settled, price=3, fee=7)  # 50 x 3 + 7
    cheater = text_receipt(3)
    honest = [text_receipt(4, provider=HONEST[0], artifact="ee" * 32),
              text_receipt(5, provider=HONEST[1], artifact="ee" * 32)]
    blocks = [
        [("mint", make_mint(ALICE, ref, 0, text_receipt(1, price=100))),  # 5000 to the provider
         ("mint-client", make_mint(ALICE, ref, 1, text_receipt(6, provider=CLIENT, price=20))),  # 1000
         ("stake", txmod.make_stake(PROVIDER, ref, 0, 4000)),
         ("escrow-deposit", txmod.make_escrow_deposit(CLIENT, ref, 0, ATTESTER.address, 600))],
        [("unstake", txmod.make_unstake(PROVIDER, ref, 1, 1000)),
         ("escrow-withdraw", txmod.make_escrow_withdraw(CLIENT, ref, 1, ATTESTER.address, 100)),
         ("settle", txmod.make_settle(ATTESTER, ref, 0, settled, quote)),
         ("slash", txmod.make_slash(ATTESTER, ref, 1, cheater, honest))],
        [("withdraw", txmod.make_withdraw(PROVIDER, ref, 2)),
         ("escrow-reclaim", txmod.make_escrow_reclaim(CLIENT, ref, 2, ATTESTER.address))],
    ]
    out: dict = {"genesis": g.to_dict(), "genesis_canonical_json": g.canonical_bytes().decode(),
                 "genesis_hash": g.hash().hex(), "keys": {"client": CLIENT.secret.hex()},
                 "quote": {"canonical_json": quote.canonical_bytes().decode(), "hash": quote.hash().hex()},
                 "transactions": [], "blocks": []}
    slot = g.genesis_time_ms // 1000
    for specs in blocks:
        txs = [decode_tx(raw) for _, raw in specs]
        for (name, _), tx in zip(specs, txs, strict=True):
            out["transactions"].append({
                "name": name, "kind": tx.kind, "kind_name": tx.kind_name, "sender": tx.sender, "nonce": tx.nonce,
                "amount": tx.amount, "attester": tx.attester_address, "body": tx.body.hex(),
                "signing_digest": signing_digest(tx.body).hex(), "raw": tx.raw.hex(), "hash": tx.hash.hex()})
        slot += 1
        writes = state.apply_txs(chain.store.get, txs, g, chain.head.height + 1)
        block, dropped = chain.build_block(AUTH[0], slot, slot * 1000 + 250, txs)
        assert not dropped
        out["blocks"].append({"height": block.height, "hash": block.hash.hex(), "raw": block.raw.hex(),
                              "state_root": block.header.state_root.hex(),
                              "state_writes": [[k.hex(), v.hex()] for k, v in sorted(writes.items())],
                              "supply": state.read_supply(chain.store.get)._asdict()})
    return out


def authority_set_vectors() -> dict:
    """AUTHORITY_VOTE (kind 12) and the set per epoch (docs/ledger.md "Authority set changes"): 4
    authorities, epoch_blocks 2; three vote a 5th in during epoch 0 (block 1), the fourth in block 2;
    block 2, the last of epoch 0, writes set(2) with it appended and deletes every vote record of
    epoch 0 (the fourth vote's too: written and deleted in one block); blocks 5 and 6 (epoch 2)
    follow the 5-set's schedule. A deleted key's value is "" in `state_writes` (empty in the diff)."""
    from aitbc.ledger.tx import ACTION_ADD, make_authority_vote

    from .auth_helpers import NEW, SetRunner

    g = make_genesis(CHAIN, [k.address for k in AUTH], [ATTESTER.address], block_time_ms=1000,
                     max_price_per_unit=1000, max_mint_per_receipt=10**12, genesis_time_ms=1_795_000_000_000,
                     epoch_blocks=2)
    run = SetRunner(g, [*AUTH, NEW])
    votes = [make_authority_vote(k, g.ref, 0, ACTION_ADD, NEW.address) for k in AUTH]
    out: dict = {"genesis": g.to_dict(), "genesis_hash": g.hash().hex(), "new_authority": NEW.address,
                 "transactions": [], "blocks": []}
    for raw in votes:
        tx = decode_tx(raw)
        out["transactions"].append({"kind": tx.kind, "sender": tx.sender, "nonce": tx.nonce, "action": tx.action,
                                    "subject": tx.subject_address, "body": tx.body.hex(),
                                    "signing_digest": signing_digest(tx.body).hex(), "raw": raw.hex(),
                                    "hash": tx.hash.hex()})
    for n in range(6):
        raws = votes[:3] if n == 0 else votes[3:] if n == 1 else []
        writes = state.apply_txs(run.chain.store.get, [decode_tx(r) for r in raws], g, run.height + 1)
        block = run.block(*raws)
        ids = run.chain.authorities_at(block.height)
        out["blocks"].append({"height": block.height, "epoch": g.epoch(block.height), "slot": block.header.slot,
                              "proposer": block.header.proposer_address, "hash": block.hash.hex(),
                              "raw": block.raw.hex(), "state_root": block.header.state_root.hex(),
                              "authorities": [bech32.encode(crypto.ADDRESS_HRP, a) for a in ids],
                              "state_writes": [[k.hex(), "" if v is None else v.hex()]
                                               for k, v in sorted(writes.items())],
                              "state_diff": state.encode_state_diff(writes).hex()})
    return out


def finality_vectors() -> dict:
    """Votes, certificates, evidence (docs/ledger.md "Finality votes", ledger format 4: checkpoint
    votes, version 2) on a 4-authority genesis: the commit round of block 1 (its prepare quorum
    justified it), the (1, commit) -> (2, prepare) form, and a double vote at one checkpoint height."""
    g = make_genesis(CHAIN, [k.address for k in AUTH], [ATTESTER.address], block_time_ms=1000,
                     max_price_per_unit=1000, max_mint_per_receipt=10**12, genesis_time_ms=1_795_000_000_000,
                     version=2)
    gen = fin.Checkpoint(0, g.hash(), fin.COMMIT)
    b1 = fin.Checkpoint(1, hashlib.sha256(b"vector block 1").digest(), fin.PREPARE)
    b2 = fin.Checkpoint(2, hashlib.sha256(b"vector block 2").digest(), fin.PREPARE)
    b1x = fin.Checkpoint(1, hashlib.sha256(b"vector block 1, the other branch").digest(), fin.PREPARE)
    b1c = b1.at(fin.COMMIT)
    prepares = [fin.make_vote(k, g, gen, b1) for k in AUTH[:3]]
    votes = [fin.make_vote(k, g, b1, b1c) for k in AUTH[:3]]
    cert = fin.make_certificate(votes)
    from_commit = fin.make_certificate(fin.make_vote(k, g, b1c, b2) for k in AUTH[1:])
    double = (fin.make_vote(AUTH[3], g, gen, b1), fin.make_vote(AUTH[3], g, gen, b1x))
    too_few = fin.make_certificate(votes[:2])
    dup = fin.Certificate(b1, b1c, cert.signatures[:2] + cert.signatures[1:2])
    outsider = fin.make_certificate(votes[:2] + [fin.make_vote(BOB, g, b1, b1c)])
    skip = fin.make_certificate(fin.make_vote(k, g, b1, b2) for k in AUTH[:3])
    return {
        "genesis": g.to_dict(), "genesis_hash": g.hash().hex(), "quorum": fin.quorum(len(AUTH)),
        "votes": [{"voter": v.voter_address,
                   "source_height": v.source.height, "source_hash": v.source.hash.hex(), "source_phase": v.source.phase,
                   "target_height": v.target.height, "target_hash": v.target.hash.hex(), "target_phase": v.target.phase,
                   "body": v.body().hex(), "digest": v.digest().hex(), "raw": v.encode().hex()}
                  for v in prepares + votes],
        "certificate": {"block_height": b1.height, "block_hash": b1.hash.hex(), "raw": cert.encode().hex()},
        "certificate_from_commit": {"block_height": b1.height, "block_hash": b1.hash.hex(),
                                    "raw": from_commit.encode().hex()},
        "evidence": {"voter": double[0].voter_address, "kind": "double vote",
                     "raw": fin.encode_evidence(*double).hex(),
                     "transaction": make_evidence(BOB, g.ref, 0, fin.encode_evidence(*double)).hex()},
        "refused_certificates": [
            {"name": "two signers of four", "raw": too_few.encode().hex(),
             "error": "certificate has too few signers: 2, needs more than 2/3 of 4 authorities (3)"},
            {"name": "one signer twice", "raw": dup.encode().hex(), "error": "certificate has duplicate signers"},
            {"name": "a non-authority signer", "raw": outsider.encode().hex(),
             "error": "certificate refused: vote from"},
            {"name": "a link that skips the block's commit checkpoint", "raw": skip.encode().hex(),
             "error": "certificate link 1/prepare"},
            {"name": "version 1 (ledger format 3)", "raw": ("01" + cert.encode().hex()[2:]),
             "error": "malformed certificate: version 1 is not supported: ledger format 4"},
        ],
    }


def test_implementation_reproduces_vectors():
    v = json.loads(VECTORS.read_text())
    assert build() == v
    g = Genesis.from_dict(v["genesis"])
    for bad in v["refused_transactions"]:
        with pytest.raises(AitbcError, match="^" + bad["error"]):
            state.check_stateless(decode_tx(bytes.fromhex(bad["raw"])), g)
    f = v["finality"]
    g4 = Genesis.from_dict(f["genesis"])
    block = fin.Checkpoint(f["certificate"]["block_height"], bytes.fromhex(f["certificate"]["block_hash"]), fin.PREPARE)
    fin.verify_certificate(fin.decode_certificate(bytes.fromhex(f["certificate"]["raw"])), g4, block=block)
    fin.verify_certificate(fin.decode_certificate(bytes.fromhex(f["certificate_from_commit"]["raw"])), g4, block=block)
    assert fin.check_evidence(bytes.fromhex(f["evidence"]["raw"]), g4) == crypto.sha256(AUTH[3].pubkey)[:20]
    etx = decode_tx(bytes.fromhex(f["evidence"]["transaction"]))
    state.check_stateless(etx, g4)
    assert etx.evidence.hex() == f["evidence"]["raw"]
    for bad in f["refused_certificates"]:
        with pytest.raises(AitbcError, match="^" + re.escape(bad["error"])):
            fin.verify_certificate(fin.decode_certificate(bytes.fromhex(bad["raw"])), g4, block=block)
    e = v["economy"]
    g3 = Genesis.from_dict(e["genesis"])
    assert g3.version == 3 and g3.canonical_bytes().decode() == e["genesis_canonical_json"]
    chain = Chain(MemoryStore(), g3)
    for b in e["blocks"]:
        assert chain.add_block(decode_block(bytes.fromhex(b["raw"])), now_ms=10**15) == "extended"
    sup = e["blocks"][-1]["supply"]
    assert sup == state.read_supply(chain.store.get)._asdict()
    assert sup == {"minted": 6500, "burned": 400, "staked": 2000, "unbonding": 0, "escrowed": 343}


def test_authority_set_vectors_replay_and_read_independently():
    """A chain of the vectors replays on a fresh node; the kind 12 payload and the v1:aset: record
    read from scratch give the set, and each block's proposer is set[slot % len(set)]."""
    a = json.loads(VECTORS.read_text())["authority_sets"]
    g = Genesis.from_dict(a["genesis"])
    chain = Chain(MemoryStore(), g)
    for b in a["blocks"]:
        assert chain.add_block(decode_block(bytes.fromhex(b["raw"])), now_ms=10**15) == "extended"
        assert [bech32.encode(crypto.ADDRESS_HRP, x) for x in chain.authorities_at(b["height"])] == b["authorities"]
    gh = hashlib.sha256(json.dumps(a["genesis"], sort_keys=True, separators=(",", ":")).encode()).digest()
    for t in a["transactions"]:
        raw = bytes.fromhex(t["raw"])
        p = 3 + raw[2] + 32 + 33 + 8
        assert raw[1] == 12 and raw[3 + raw[2]:35 + raw[2]] == gh and len(raw) == p + 21 + 64
        assert raw[p] == t["action"] == 1
        assert bech32.encode(crypto.ADDRESS_HRP, raw[p + 1:p + 21]) == t["subject"] == a["new_authority"]
    sets = {0: a["genesis"]["authorities"], 1: a["genesis"]["authorities"]}
    st: dict[bytes, bytes] = {}
    root = hashlib.sha256(b"AITBC/state/v1\x00" + gh).digest()
    for b in a["blocks"]:
        diff = b""
        for k, v in b["state_writes"]:  # in key order; a deleted key has an empty value
            key, val = bytes.fromhex(k), bytes.fromhex(v)
            diff += struct.pack(">H", len(key)) + key + struct.pack(">H", len(val)) + val
            if not val:
                st.pop(key, None)
                continue
            st[key] = val
            if key.startswith(b"v1:aset:"):
                (n,) = struct.unpack_from(">H", val)
                sets[struct.unpack(">Q", key[8:])[0]] = [bech32.encode(crypto.ADDRESS_HRP, val[2 + 20 * i:22 + 20 * i])
                                                         for i in range(n)]
        assert diff.hex() == b["state_diff"]
        root = hashlib.sha256(b"AITBC/state/v1\x00" + root + struct.pack(">Q", b["height"]) + diff).digest()
        assert root.hex() == b["state_root"], b["height"]
        votes_left = [k for k in st if k[:8] in (b"v1:avot:", b"v1:aprp:", b"v1:avtr:")]
        if b["height"] % a["genesis"]["epoch_blocks"] == 0:  # the last block of its epoch: no votes stay
            assert not votes_left, b["height"]
    first, boundary = a["blocks"][0]["state_writes"], a["blocks"][1]["state_writes"]
    # block 1 writes 3 votes (v1:avot:), one tally (v1:aprp:), 3 voter records (v1:avtr:), the queue
    assert sorted(bytes.fromhex(k)[:8] for k, _ in first).count(b"v1:avtr:") == 3
    deleted = {bytes.fromhex(k) for k, v in boundary if v == ""}
    assert {k[:8] for k in deleted} == {b"v1:avot:", b"v1:aprp:", b"v1:avtr:"} and len(deleted) == 4 + 1 + 4
    e_blocks = a["genesis"]["epoch_blocks"]

    def link(prev: bytes, epoch: int, members: list[str]) -> bytes:  # the set chain (ledger format 5)
        ids = b"".join(bech32.decode(x)[1] for x in members)
        return hashlib.sha256(b"AITBC/aset/v1\x00" + prev + struct.pack(">QH", epoch, len(members)) + ids).digest()

    chain_hash = link(gh, 1, sets[1])
    for b in a["blocks"]:
        s = sets[(b["height"] - 1) // e_blocks]
        assert s == b["authorities"] and b["proposer"] == s[b["slot"] % len(s)]
        fixed = b["height"] // e_blocks + 1  # the newest epoch whose set the block's state holds
        if b["height"] % e_blocks == 0 and sets[fixed] != sets[fixed - 1]:
            chain_hash = link(chain_hash, fixed, sets[fixed])
        raw = bytes.fromhex(b["raw"])
        (hlen,) = struct.unpack_from(">I", raw)
        assert raw[4 + hlen - 36:4 + hlen - 4] == chain_hash, b["height"]  # set chain, just before tx_count
    assert sets[2] == [*a["genesis"]["authorities"], a["new_authority"]]


def test_independent_economy_reader():
    """Kinds 4-9 of docs/ledger.md read from scratch (the fixed-width payloads) and the supply record."""
    e = json.loads(VECTORS.read_text())["economy"]
    gh = hashlib.sha256(json.dumps(e["genesis"], sort_keys=True, separators=(",", ":")).encode()).digest()
    assert gh.hex() == e["genesis_hash"]
    widths = {4: 8, 5: 8, 6: 0, 7: 28, 8: 28, 9: 20}
    for t in e["transactions"]:
        raw = bytes.fromhex(t["raw"])
        assert raw[0] == 2 and raw[1] == t["kind"] and hashlib.sha256(raw).hexdigest() == t["hash"]
        p = 3 + raw[2] + 32 + 33 + 8
        assert raw[3 + raw[2]:35 + raw[2]] == gh
        if t["kind"] in widths:
            assert len(raw) == p + widths[t["kind"]] + 64
            if t["kind"] in (4, 5):
                assert struct.unpack_from(">Q", raw, p)[0] == t["amount"] > 0
            if t["kind"] in (7, 8):
                assert struct.unpack_from(">Q", raw, p + 20)[0] == t["amount"] > 0
        elif t["kind"] == 10:  # a MINT payload, then u32 len(Q) || Q
            (rl,) = struct.unpack_from(">I", raw, p)
            p += 4 + rl + 65
            p += 1 + raw[p] + 65
            (ql,) = struct.unpack_from(">I", raw, p)
            q = raw[p + 4:p + 4 + ql]
            assert q.decode() == e["quote"]["canonical_json"] and hashlib.sha256(q).hexdigest() == e["quote"]["hash"]
            assert len(raw) == p + 4 + ql + 64
        elif t["kind"] == 11:
            n = raw[p]
            p += 1
            for _ in range(n):
                (rl,) = struct.unpack_from(">I", raw, p)
                p += 4 + rl + 65
                p += 1 + raw[p] + 65
            assert n == 3 and len(raw) == p + 64
    last = dict(e["blocks"][-1]["state_writes"])
    minted, burned, staked, unbonding, escrowed = struct.unpack(">QQQQQ", bytes.fromhex(last[b"v1:supply".hex()]))
    assert minted - burned == 6100 and (staked, unbonding, escrowed) == (2000, 0, 343)


def test_independent_finality_reader():
    """The vote, certificate and evidence layouts of docs/ledger.md read from scratch."""
    from aitbc import bech32

    f = json.loads(VECTORS.read_text())["finality"]

    def dd(domain: bytes, payload: bytes) -> bytes:
        return hashlib.sha256(domain + b"\x00" + payload).digest()

    g = f["genesis"]
    gh = hashlib.sha256(json.dumps(g, sort_keys=True, separators=(",", ":")).encode()).digest()
    assert gh.hex() == f["genesis_hash"]
    auths = [bytes(bech32.decode(a)[1]) for a in g["authorities"]]
    n = len(auths)
    q = 2 * n // 3 + 1
    assert q == f["quorum"] == 3
    cid = g["chain_id"].encode()

    link = ">Q32sBQ32sB"  # source height, hash, phase; target height, hash, phase (82 bytes)

    def ck(height: int, phase: int) -> int:
        assert phase in (0, 1)
        return 2 * height + phase

    def body(sh: int, shash: bytes, sp: int, th: int, thash: bytes, tp: int, voter: bytes) -> bytes:
        return bytes((2, len(cid))) + cid + gh + struct.pack(link, sh, shash, sp, th, thash, tp) + voter

    def signer(b: bytes, sig: bytes) -> bytes:
        assert len(sig) == 65 and int.from_bytes(sig[32:64], "big") <= 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141 // 2
        pub = coincurve.PublicKey.from_signature_and_message(sig, dd(b"AITBC/vote/v2", b), hasher=None).format()
        return hashlib.sha256(pub).digest()[:20]

    def read_vote(raw: bytes) -> tuple[int, bytes, int, int, bytes, int, bytes]:
        assert raw[0] == 2 and raw[2:2 + raw[1]] == cid and raw[2 + raw[1]:34 + raw[1]] == gh
        p = 34 + raw[1]
        sh, shash, sp, th, thash, tp = struct.unpack_from(link, raw, p)
        voter = raw[p + 82:p + 102]
        assert len(raw) == p + 167 and ck(th, tp) > ck(sh, sp) and signer(raw[:p + 102], raw[p + 102:]) == voter
        return sh, shash, sp, th, thash, tp, voter

    for vv in f["votes"]:
        raw = bytes.fromhex(vv["raw"])
        assert read_vote(raw)[6] == bytes(bech32.decode(vv["voter"])[1])
        assert dd(b"AITBC/vote/v2", raw[:-65]).hex() == vv["digest"]

    def cert_ok(raw: bytes, height: int, block_hash: bytes) -> bool:
        if raw[0] != 2:
            return False
        sh, shash, sp, th, thash, tp = struct.unpack_from(link, raw, 1)
        (count,) = struct.unpack_from(">H", raw, 83)
        assert len(raw) == 85 + 85 * count
        voters = [raw[85 + 85 * i:105 + 85 * i] for i in range(count)]
        sigs = [raw[105 + 85 * i:170 + 85 * i] for i in range(count)]
        child = ck(th, tp) == ck(sh, sp) + 1 and (sp == 1 or thash == shash)  # the checkpoint child
        if (sh, shash) != (height, block_hash) or not child or voters != sorted(set(voters)) or count < q:
            return False
        return all(v in auths and signer(body(sh, shash, sp, th, thash, tp, v), s) == v
                   for v, s in zip(voters, sigs, strict=True))

    for c in (f["certificate"], f["certificate_from_commit"]):
        assert cert_ok(bytes.fromhex(c["raw"]), c["block_height"], bytes.fromhex(c["block_hash"]))
    c = f["certificate"]
    for bad in f["refused_certificates"]:
        assert not cert_ok(bytes.fromhex(bad["raw"]), c["block_height"], bytes.fromhex(c["block_hash"]))

    ev = bytes.fromhex(f["evidence"]["raw"])
    assert ev[0] == 2
    (la,) = struct.unpack_from(">H", ev, 1)
    a = ev[3:3 + la]
    (lb,) = struct.unpack_from(">H", ev, 3 + la)
    b = ev[5 + la:5 + la + lb]
    assert len(ev) == 5 + la + lb and a < b
    va, vb = read_vote(a), read_vote(b)
    assert va[6] == vb[6] == bytes(bech32.decode(f["evidence"]["voter"])[1]) and va[6] in auths
    assert ck(va[3], va[5]) == ck(vb[3], vb[5]) and va[:6] != vb[:6]  # a double vote: one target ck, two links
    tx = bytes.fromhex(f["evidence"]["transaction"])  # kind 3: u16 len(E) || E, then the 64-byte signature
    assert tx[0] == 2 and tx[1] == 3 and tx[3:3 + tx[2]] == cid and tx[3 + tx[2]:35 + tx[2]] == gh
    p = 35 + tx[2]
    spub = tx[p:p + 33]
    (elen,) = struct.unpack_from(">H", tx, p + 41)
    assert tx[p + 43:p + 43 + elen] == ev and len(tx) == p + 43 + elen + 64
    der = coincurve.ecdsa.cdata_to_der(coincurve.ecdsa.deserialize_compact(tx[-64:]))
    assert coincurve.PublicKey(spub).verify(der, dd(b"AITBC/tx/v2", tx[:-64]), hasher=None)


def independent_merkle_root(tx_hashes: list[bytes]) -> bytes:
    """docs/ledger.md "Tx root" from scratch: domain-separated leaves and nodes, pairs from the left,
    an odd last node carried up unchanged."""
    def dd(domain: bytes, payload: bytes) -> bytes:
        return hashlib.sha256(domain + b"\x00" + payload).digest()

    if not tx_hashes:
        return dd(b"AITBC/txroot/v3", b"")
    level = [dd(b"AITBC/merkle/leaf/v1", h) for h in tx_hashes]
    while len(level) > 1:
        level = [dd(b"AITBC/merkle/node/v1", level[i] + level[i + 1]) if i + 1 < len(level) else level[i]
                 for i in range(0, len(level), 2)]
    return level[0]


def test_independent_reader():
    """docs/ledger.md implemented from scratch for TRANSFER/MINT, checked against the vectors."""
    v = json.loads(VECTORS.read_text())

    def dd(domain: bytes, payload: bytes) -> bytes:
        return hashlib.sha256(domain + b"\x00" + payload).digest()

    n_half = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141 // 2
    gh = hashlib.sha256(json.dumps(v["genesis"], sort_keys=True, separators=(",", ":")).encode()).digest()
    assert gh.hex() == v["genesis_hash"]
    g = v["genesis"]
    root = dd(b"AITBC/state/v1", gh)
    parent, parent_slot = gh, -1
    st: dict[bytes, bytes] = {}
    for bv in v["blocks"]:
        raw = bytes.fromhex(bv["raw"])
        (hlen,) = struct.unpack_from(">I", raw, 0)
        header = raw[4:4 + hlen]
        sig = raw[4 + hlen:4 + hlen + 65]
        version, clen = header[0], header[1]
        chain_id = header[2:2 + clen].decode()
        assert len(header) == 2 + clen + 32 + 176
        block_genesis = header[2 + clen:2 + clen + 32]
        height, parent_hash, slot, ts, proposer, tx_root, state_root, set_chain, tx_count = struct.unpack_from(
            ">Q32sQQ20s32s32s32sI", header, 2 + clen + 32)
        bhash = dd(b"AITBC/block/v2", header)
        assert bhash.hex() == bv["hash"] and parent_hash == parent and slot > parent_slot
        assert version == 4 and block_genesis == gh
        # the set never changes on this chain: every header carries the genesis link of the set chain
        ids = b"".join(bech32.decode(a)[1] for a in g["authorities"])
        assert set_chain == dd(b"AITBC/aset/v1", gh + struct.pack(">QH", 1, len(g["authorities"])) + ids)
        assert chain_id == g["chain_id"] and ts // g["block_time_ms"] == slot
        assert int.from_bytes(sig[32:64], "big") <= n_half
        pub = coincurve.PublicKey.from_signature_and_message(sig, bhash, hasher=None).format()
        assert hashlib.sha256(pub).digest()[:20] == proposer
        pos = 4 + hlen + 65
        tx_hashes, writes = [], {}

        def get(k: bytes) -> bytes | None:
            return writes.get(k, st.get(k))  # noqa: B023 (used within this iteration only)

        def acct(aid: bytes) -> tuple[int, int]:
            val = get(b"v1:acct:" + aid)
            return struct.unpack(">QQ", val) if val else (0, 0)

        for _ in range(tx_count):
            (tlen,) = struct.unpack_from(">I", raw, pos)
            tx = raw[pos + 4:pos + 4 + tlen]
            pos += 4 + tlen
            tx_hash = hashlib.sha256(tx).digest()
            tx_hashes.append(tx_hash)
            tx_version, kind, cl = tx[0], tx[1], tx[2]
            assert tx_version == 2 and tx[3:3 + cl].decode() == g["chain_id"]
            assert tx[3 + cl:3 + cl + 32] == gh
            p = 3 + cl + 32
            spub = tx[p:p + 33]
            (nonce,) = struct.unpack_from(">Q", tx, p + 33)
            p += 41
            if kind == 1:
                to, amount = tx[p:p + 20], struct.unpack_from(">Q", tx, p + 20)[0]
                p += 28
            else:
                (rl,) = struct.unpack_from(">I", tx, p)
                rjson = tx[p + 4:p + 4 + rl]
                p += 4 + rl + 65
                al = tx[p]
                p += 1 + al + 65
            body, tsig = tx[:p], tx[p:]
            digest = dd(b"AITBC/tx/v2", body)
            assert len(tsig) == 64 and 0 < int.from_bytes(tsig[32:64], "big") <= n_half
            der = coincurve.ecdsa.cdata_to_der(coincurve.ecdsa.deserialize_compact(tsig))
            assert coincurve.PublicKey(spub).verify(der, digest, hasher=None)
            sender = hashlib.sha256(spub).digest()[:20]
            bal, n = acct(sender)
            assert nonce == n
            if kind == 1:
                assert amount <= bal
                writes[b"v1:acct:" + sender] = struct.pack(">QQ", bal - amount, n + 1)
                tb, tn = acct(to)
                writes[b"v1:acct:" + to] = struct.pack(">QQ", tb + amount, tn)
            else:
                rb = json.loads(rjson)  # receipt signatures: see tests/test_receipts.py vectors
                rh = hashlib.sha256(rjson).digest()
                assert get(b"v1:rcpt:" + rh) is None
                amt = min(rb["units"] * min(rb["price_per_unit"], g["max_price_per_unit"]),
                          g["max_mint_per_receipt"])
                writes[b"v1:acct:" + sender] = struct.pack(">QQ", bal, n + 1)
                writes[b"v1:rcpt:" + rh] = struct.pack(">Q32sQ", height, tx_hash, amt)

                prov = bytes(bech32.decode(rb["provider"])[1])
                pb, pn = acct(prov)
                writes[b"v1:acct:" + prov] = struct.pack(">QQ", pb + amt, pn)
        assert pos == len(raw)
        assert independent_merkle_root(tx_hashes) == tx_root
        diff = b"".join(struct.pack(">H", len(k)) + k + struct.pack(">H", len(val)) + val
                        for k, val in sorted(writes.items()))
        root = dd(b"AITBC/state/v1", root + struct.pack(">Q", height) + diff)
        assert root == state_root
        st.update(writes)
        parent, parent_slot = bhash, slot
    assert decode_block(bytes.fromhex(v["blocks"][-1]["raw"])).hash == parent


if __name__ == "__main__":
    VECTORS.write_text(json.dumps(build(), indent=1) + "\n")
    print(f"wrote {VECTORS}")
