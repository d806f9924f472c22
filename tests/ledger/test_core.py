"""Pure tx / block / state-transition tests over the in-memory store."""

from __future__ import annotations

import dataclasses

import pytest

from aitbc import crypto
from aitbc.errors import AlreadyExists, CryptoError, FailedPrecondition, InvalidArgument, PermissionDenied
from aitbc.ledger import state
from aitbc.ledger.block import Header, decode_block, make_block, tx_root
from aitbc.ledger.chain import Chain
from aitbc.ledger.genesis import Genesis
from aitbc.ledger.store import MemoryStore
from aitbc.ledger.tx import (
    MAX_TX_BYTES,
    decode_tx,
    make_mint,
    make_transfer,
    signing_digest,
    verify_tx_signature,
)

from .helpers import ALICE, AUTH, BOB, CHAIN, OTHER_REF, PROVIDER, REF, certify, genesis, key, receipt


def _now(g: Genesis, slot: int) -> int:
    return slot * g.block_time_ms + 1


def test_transfer_roundtrip_and_the_one_signature_form():
    raw = make_transfer(ALICE, REF, 7, BOB.address, 12345)
    tx = decode_tx(raw)
    assert (tx.nonce, tx.amount, tx.to_address, tx.sender) == (7, 12345, BOB.address, ALICE.address)
    assert (tx.chain_id, tx.genesis_hash) == REF
    assert len(tx.signature) == 64
    verify_tx_signature(tx)
    assert tx.hash == crypto.sha256(raw)
    # the 65-byte recoverable form of the same signature is another encoding: refused, not a twin
    full = ALICE.sign(signing_digest(tx.body))
    assert full[:64] == tx.signature
    with pytest.raises(InvalidArgument, match="^malformed transaction: signature must be exactly 64 bytes"):
        decode_tx(tx.body + full)
    with pytest.raises(InvalidArgument, match="^malformed transaction: signature must be exactly 64 bytes"):
        decode_tx(raw + b"\x00")


def test_tampered_or_high_s_signature_is_bad_signature():
    raw = make_transfer(ALICE, REF, 0, BOB.address, 5)
    tx = decode_tx(raw)
    forged = decode_tx(tx.body[:-1] + b"\x06" + tx.signature)  # amount 5 -> 6
    with pytest.raises(CryptoError, match="^bad signature"):
        verify_tx_signature(forged)
    s = int.from_bytes(tx.signature[32:64], "big")
    high = tx.signature[:32] + (crypto.SECP256K1_N - s).to_bytes(32, "big")
    with pytest.raises(CryptoError, match="high-S"):
        verify_tx_signature(decode_tx(tx.body + high))
    other = decode_tx(tx.body + BOB.sign(crypto.sha256(b"x"))[:64])
    with pytest.raises(CryptoError, match="^bad signature"):
        verify_tx_signature(other)


@pytest.mark.parametrize("raw,msg", [
    (b"", "malformed"), (b"\x02\x01", "malformed"), (b"\x01\x09\x00", "malformed"),
    (b"\x00" * (MAX_TX_BYTES + 1), "tx too large"),
])
def test_malformed_txs(raw, msg):
    with pytest.raises(InvalidArgument, match=msg):
        decode_tx(raw)


def test_truncations_never_crash():
    raw = make_mint(ALICE, REF, 0, receipt())
    for cut in range(len(raw)):
        with pytest.raises(InvalidArgument):
            decode_tx(raw[:cut])


def _chain(n_auth: int = 1) -> tuple[Chain, Genesis]:
    g = genesis(n_auth)
    return Chain(MemoryStore(), g), g


def test_mint_then_transfer_state_and_vectors_of_errors():
    chain, g = _chain()
    r = receipt(1, units=100, price=10)
    mint = decode_tx(make_mint(ALICE, g.ref, 0, r))
    block, dropped = chain.build_block(AUTH[0], 1, _now(g, 1), [mint])
    assert dropped == [] and block.header.tx_count == 1
    assert chain.account(crypto.validate_address(PROVIDER.address)) == (1000, 0)
    assert chain.account(crypto.validate_address(ALICE.address)) == (0, 1)
    assert chain.receipt_minted(r.receipt_hash) == (1, mint.hash, 1000)
    assert chain.final_height == 0  # final only once finality votes certify it (test_finality_comes_...)
    # a second MINT of the same receipt fails in state
    again = decode_tx(make_mint(BOB, g.ref, 0, r))
    with pytest.raises(AlreadyExists, match="^receipt already minted"):
        state.apply_tx(chain.store.get, again, g, 2)
    pay = decode_tx(make_transfer(PROVIDER, g.ref, 0, BOB.address, 400))
    with pytest.raises(FailedPrecondition, match="^insufficient balance"):
        state.apply_tx(chain.store.get, decode_tx(make_transfer(PROVIDER, g.ref, 0, BOB.address, 1001)), g, 2)
    with pytest.raises(FailedPrecondition, match="^nonce too low"):
        state.apply_tx(chain.store.get, decode_tx(make_transfer(ALICE, g.ref, 0, BOB.address, 1)), g, 2)
    chain.build_block(AUTH[0], 2, _now(g, 2), [pay])
    assert chain.account(crypto.validate_address(BOB.address)) == (400, 0)
    assert chain.account(crypto.validate_address(PROVIDER.address)) == (600, 1)
    assert chain.tx_location(pay.hash) == (2, 0)


def test_mint_amount_is_capped():
    g = genesis(max_price_per_unit=5, max_mint_per_receipt=300)
    assert state.mint_amount(100, 10, g) == 300
    assert state.mint_amount(10, 10, g) == 50
    assert state.mint_amount(10, 3, g) == 30


def test_a_block_mints_no_more_than_the_genesis_caps():
    """The caps hold where money is made: an attested receipt over either cap credits the capped amount."""
    g = genesis(max_price_per_unit=5, max_mint_per_receipt=300)
    chain = Chain(MemoryStore(), g)
    over_price, over_total = receipt(31, units=10, price=1000), receipt(32, units=1000, price=5)
    block, dropped = chain.build_block(AUTH[0], 1, _now(g, 1), [decode_tx(make_mint(ALICE, g.ref, 0, over_price)),
                                                                decode_tx(make_mint(ALICE, g.ref, 1, over_total))])
    assert dropped == [] and block.header.tx_count == 2
    assert chain.receipt_minted(over_price.receipt_hash)[2] == 50  # 10 units x 5, not x 1000
    assert chain.receipt_minted(over_total.receipt_hash)[2] == 300  # not 5000
    assert chain.account(crypto.validate_address(PROVIDER.address)) == (350, 0)


def test_a_tx_from_another_genesis_with_the_same_chain_id_is_refused():
    g, twin = genesis(1), genesis(1, genesis_time_ms=1)  # same chain id, same keys: another network
    assert g.chain_id == twin.chain_id and g.hash() != twin.hash()
    tx = decode_tx(make_transfer(ALICE, twin.ref, 0, BOB.address, 1))
    with pytest.raises(InvalidArgument, match=f"^wrong genesis: tx is signed for genesis {twin.hash().hex()}, this "
                                              f"chain 'aitbc-test' has genesis {g.hash().hex()}"):
        state.check_stateless(tx, g)
    state.check_stateless(tx, twin)
    # the genesis hash is signed: pasting this chain's hash into the other network's tx breaks it
    pasted = decode_tx(tx.raw.replace(twin.hash(), g.hash()))
    with pytest.raises(CryptoError, match="^bad signature"):
        state.check_stateless(pasted, g)


def test_a_block_from_another_genesis_with_the_same_chain_id_is_refused():
    g, twin = genesis(1), genesis(1, genesis_time_ms=1)
    theirs = Chain(MemoryStore(), twin)
    theirs.build_block(AUTH[0], 1, _now(twin, 1), [])
    block = decode_block(theirs.block_raw_at(1))
    ours = Chain(MemoryStore(), g)
    forged = dataclasses.replace(block.header, parent_hash=ours.genesis_hash)  # even linked to our genesis
    with pytest.raises(InvalidArgument, match="^wrong genesis: block 1 is for genesis"):
        ours.add_block(make_block(forged, AUTH[0], []), _now(g, 1))
    assert ours.head.height == 0


def test_format_1_encodings_and_data_folders_are_refused(tmp_path):
    from aitbc.ledger.chain import HEAD, META_CHAIN, META_FORMAT, META_GENESIS
    from aitbc.ledger.genesis import Genesis
    from aitbc.ledger.store import LmdbStore

    tx = decode_tx(make_transfer(ALICE, REF, 0, BOB.address, 1))
    with pytest.raises(InvalidArgument, match="^malformed transaction: version 1 is not supported: ledger format 2"):
        decode_tx(b"\x01" + tx.raw[1:])
    chain, g = _chain()
    chain.build_block(AUTH[0], 1, _now(g, 1), [])
    raw = chain.block_raw_at(1)
    with pytest.raises(InvalidArgument, match="^malformed block: header version 1 is not supported"):
        decode_block(raw[:4] + b"\x01" + raw[5:])
    with pytest.raises(InvalidArgument, match="^genesis version 1 is not supported: ledger format 1"):
        Genesis.from_dict({**g.to_dict(), "version": 1})
    store = LmdbStore(tmp_path / "db")  # what a format-1 node left: genesis and chain records, no format
    store.commit({META_GENESIS: g.hash(), META_CHAIN: b"aitbc-test", HEAD: b"\x00" * 32})
    with pytest.raises(FailedPrecondition, match="^data folder holds a ledger format 1 chain; this node runs format 5:"
                                                 " ledger format 1 .* cannot be migrated"):
        Chain(store, g)
    assert store.get(META_FORMAT) is None  # refused without writing anything
    store.close()


def test_stateless_rejections():
    g = genesis()
    with pytest.raises(InvalidArgument, match="^wrong chain id"):
        state.check_stateless(decode_tx(make_transfer(ALICE, OTHER_REF, 0, BOB.address, 1)), g)
    with pytest.raises(InvalidArgument, match="^wrong chain id"):
        state.check_stateless(decode_tx(make_mint(ALICE, g.ref, 0, receipt(chain_id="other-chain"))), g)
    with pytest.raises(PermissionDenied, match="^attester not authorized"):
        state.check_stateless(decode_tx(make_mint(ALICE, g.ref, 0, receipt(attester=key(99)))), g)
    r = receipt(3)
    bad = dataclasses.replace(r, attester_signature=r.provider_signature)
    with pytest.raises(InvalidArgument, match="^bad receipt"):
        state.check_stateless(decode_tx(make_mint(ALICE, g.ref, 0, bad)), g)
    state.check_stateless(decode_tx(make_mint(ALICE, g.ref, 0, r)), g)


def _follower_of(chain: Chain, g: Genesis) -> Chain:
    f = Chain(MemoryStore(), g)
    blocks = [decode_block(chain.block_raw_at(h)) for h in range(1, chain.head.height + 1)]
    f.add_blocks(blocks, now_ms=10**15)
    return f


def test_follower_reverifies_and_agrees():
    chain, g = _chain()
    chain.build_block(AUTH[0], 1, _now(g, 1), [decode_tx(make_mint(ALICE, g.ref, 0, receipt(1)))])
    chain.build_block(AUTH[0], 3, _now(g, 3), [decode_tx(make_transfer(PROVIDER, g.ref, 0, BOB.address, 9))])
    cert = certify(chain, g, 1)
    f = _follower_of(chain, g)
    assert f.head == chain.head and chain.final_height == 1 and f.final_height == 0
    f.store_certificate(1, chain.hash_at(1), cert)  # what the node does once the tally verified it
    assert f.final_height == 1
    assert dict(f.store.scan(b"v1:")) == dict(chain.store.scan(b"v1:"))


def _forge(chain: Chain, g: Genesis, signer, **changes):
    """A copy of the next block changed in one way, re-signed by `signer`."""
    parent = chain.head
    slot = changes.pop("slot", parent.slot + 1 if parent.slot >= 0 else 1)
    writes: dict = {}
    header = Header(CHAIN, chain.genesis_hash, parent.height + 1, parent.hash, slot, slot * g.block_time_ms, crypto.sha256(
        signer.pubkey)[:20], tx_root([]), state.state_root(parent.state_root, parent.height + 1, writes), parent.set_chain, 0)
    header = dataclasses.replace(header, **changes)
    return make_block(header, signer, [])


@pytest.mark.parametrize("signer_i,changes,msg", [
    (0, {"state_root": b"\x00" * 32}, "state root"),
    (0, {"tx_root": b"\x00" * 32}, "tx root"),
    (1, {}, "out of turn"),  # AUTH[1] proposing in AUTH[0]... slot
    (0, {"parent_hash": b"\x11" * 32}, None),  # orphan: parent unknown
    (0, {"timestamp_ms": 5}, "outside slot"),
    (0, {"slot": 10**9}, "future"),
    (0, {"height": 5}, "does not link"),  # names the head as parent but skips heights
])
def test_bad_blocks_are_rejected(signer_i, changes, msg):
    chain, g = _chain(3)
    slot = 3  # AUTH[0]'s slot with 3 authorities
    changes = dict(changes)  # the parameter itself stays as it is for the next run in this process
    block = _forge(chain, g, AUTH[signer_i], slot=changes.pop("slot", slot), **changes)
    if msg is None:
        assert chain.add_block(block, now_ms=_now(g, slot)) == "orphan"
        return
    with pytest.raises(InvalidArgument, match=msg):
        chain.add_block(block, now_ms=_now(g, slot))
    assert chain.head.height == 0


def test_a_block_must_be_in_a_later_slot_than_its_parent():
    chain, g = _chain(1)
    chain.build_block(AUTH[0], 4, _now(g, 4), [])
    with pytest.raises(InvalidArgument, match="slot 4 is not after its parent's slot 4"):
        chain.add_block(_forge(chain, g, AUTH[0], slot=4, timestamp_ms=_now(g, 4) + 5), now_ms=_now(g, 4))
    assert chain.head.height == 1


def test_non_authority_block_is_rejected():
    chain, g = _chain(1)
    with pytest.raises(InvalidArgument, match="not an authority"):
        chain.add_block(_forge(chain, g, ALICE, slot=1), now_ms=_now(g, 1))
    forged = _forge(chain, g, AUTH[0], slot=1)
    wrong_sig = make_block(forged.header, ALICE, [])
    wrong_sig = dataclasses.replace(wrong_sig, header=forged.header)
    with pytest.raises(InvalidArgument, match="not signed by its proposer"):
        chain.add_block(wrong_sig, now_ms=_now(g, 1))


def test_reorg_longer_branch_wins_and_state_reverts():
    g = genesis(3)
    a, b = Chain(MemoryStore(), g), Chain(MemoryStore(), g)
    r = receipt(5)
    # a: AUTH[0] at slot 3 mints; b: AUTH[1] at slot 4 and AUTH[2] at slot 5 (longer)
    a.build_block(AUTH[0], 3, _now(g, 3), [decode_tx(make_mint(ALICE, g.ref, 0, r))])
    b.build_block(AUTH[1], 4, _now(g, 4), [])
    b.build_block(AUTH[2], 5, _now(g, 5), [decode_tx(make_mint(BOB, g.ref, 0, r))])
    # equal heights: the lower block hash wins, deterministically
    expected = "reorg" if b.hash_at(1) < a.hash_at(1) else "side"
    first = a.add_block(decode_block(b.block_raw_at(1)), _now(g, 5))
    assert first == expected
    second = a.add_block(decode_block(b.block_raw_at(2)), _now(g, 5))
    assert second == ("extended" if first == "reorg" else "reorg")
    assert a.head == b.head
    assert dict(a.store.scan(b"v1:")) == dict(b.store.scan(b"v1:"))
    assert a.account(crypto.validate_address(ALICE.address)) == (0, 0)
    # the reverted block was kept aside, and is dropped once its height is final
    assert a.final_height == 0 and len(a.side) == 1
    certify(a, g, 1)
    assert a.final_height == 1 and len(a.side) == 0


def test_finality_comes_only_from_a_certificate():
    """Building on a block finalizes nothing, however many distinct proposers do it (the old
    proposer-majority rule trusted every authority); a certificate of votes does, for the block and
    its ancestors, stored in the same commit and kept across a restart. A certificate for a block
    the chain is not on yet (a pending branch) finalizes it once the chain switches to that branch."""
    from aitbc.ledger.chain import FINAL

    g = genesis(3)
    c = Chain(MemoryStore(), g)
    for slot, k in ((3, 0), (4, 1), (5, 2), (6, 0), (7, 1)):
        c.build_block(AUTH[k], slot, _now(g, slot), [])
    assert c.head.height == 5 and c.final_height == 0
    certify(c, g, 3)
    assert c.final_height == 3 and c.store.get(FINAL) == (3).to_bytes(8, "big")
    assert Chain(c.store, g).final_height == 3  # a restart reads it back
    with pytest.raises(FailedPrecondition, match="conflicts with the final chain"):
        twin = Chain(MemoryStore(), g)
        twin.build_block(AUTH[1], 4, _now(g, 4), [])
        c.add_block(decode_block(twin.block_raw_at(1)), _now(g, 7))
    # a certificate for a pending block: final only once the chain is on its branch
    a, b = Chain(MemoryStore(), g), Chain(MemoryStore(), g)
    a.build_block(AUTH[0], 3, _now(g, 3), [])
    for slot in (4, 5, 6):
        b.build_block(AUTH[slot % 3], slot, _now(g, slot), [])
    cert = certify(b, g, 1)
    a.store_certificate(1, b.hash_at(1), cert)
    assert a.final_height == 0 and a.certified() == (1, b.hash_at(1))
    a.build_block(AUTH[1], 4, _now(g, 4), [])  # a goes on on its own branch: still not final
    assert a.final_height == 0
    for h in (1, 2, 3):
        a.add_block(decode_block(b.block_raw_at(h)), _now(g, 6))
    assert a.head == b.head and a.final_height == 1


def test_a_batch_of_certificates_is_stored_in_one_commit():
    """A follower catching up gets a certificate with every block: they are stored together (one
    commit per batch, not per block: the commits were most of the catch-up time), every one kept
    for serving, the highest canonical one final."""
    g = genesis(3)
    c = Chain(MemoryStore(), g)
    for slot in range(3, 9):
        c.build_block(AUTH[slot % 3], slot, _now(g, slot), [])
    certs = []
    for h in (1, 2, 3, 4):
        cert = certify(Chain(c.store, g), g, h)  # a real certificate for each (stored on a scratch view)
        certs.append((h, c.hash_at(h), cert))
    fresh = MemoryStore()
    fresh.commit(dict(kv for kv in c.store.scan(b"") if not kv[0].startswith((b"v1:cert", b"v1:final"))))
    f = Chain(fresh, g)
    assert f.final_height == 0
    commits = []
    real = fresh.commit
    fresh.commit = lambda writes: (commits.append(len(writes)), real(writes))[1]  # type: ignore[method-assign]
    f.store_certificates(certs)
    assert len(commits) == 1 and f.final_height == 4 and f.certified() == (4, c.hash_at(4))
    assert all(f.certificate(c.hash_at(h)) == cert for h, _, cert in certs)


def test_data_folder_from_another_genesis_is_refused(tmp_path):
    from aitbc.ledger.store import LmdbStore

    store = LmdbStore(tmp_path / "db")
    Chain(store, genesis(1))
    with pytest.raises(FailedPrecondition, match="belongs to chain 'aitbc-test'"):
        Chain(store, genesis(1, chain_id="other-chain"))
    with pytest.raises(FailedPrecondition, match="belongs to chain"):
        Chain(store, genesis(2))
    store.close()


def test_equivocation_is_noticed_and_resolved_by_hash():
    g = genesis(1)
    a, b = Chain(MemoryStore(), g), Chain(MemoryStore(), g)
    a.build_block(AUTH[0], 5, _now(g, 5), [])
    b.build_block(AUTH[0], 5, _now(g, 5) + 7, [])  # same slot, other timestamp: another block
    assert a.hash_at(1) != b.hash_at(1)
    # once votes certify block 1 (with the child it needs), the twin is refused...
    a.build_block(AUTH[0], 6, _now(g, 6), [])
    certify(a, g, 1)
    with pytest.raises(FailedPrecondition, match="conflicts with the final chain"):
        a.add_block(decode_block(b.block_raw_at(1)), _now(g, 5))
    g3 = genesis(3)
    c, d = Chain(MemoryStore(), g3), Chain(MemoryStore(), g3)
    c.build_block(AUTH[0], 3, _now(g3, 3), [])
    d.build_block(AUTH[0], 3, _now(g3, 3) + 7, [])
    mine, twin = c.hash_at(1), d.hash_at(1)
    outcome = c.add_block(decode_block(d.block_raw_at(1)), _now(g3, 3))
    assert c.equivocations == 1
    assert c.head.hash == min(mine, twin) and outcome == ("reorg" if twin < mine else "side")


def test_fast_compact_verify_matches_crypto_verify():
    from aitbc.ledger.tx import _verify_compact

    for i in range(600):
        k = key(1000 + i % 20)
        d = crypto.sha256(b"m%d" % i)
        sig, pub = k.sign(d)[:64], k.pubkey
        kind = i % 6
        if kind == 1:
            d = crypto.sha256(b"other")
        elif kind == 2:  # high-S twin of a valid signature
            sig = sig[:32] + (crypto.SECP256K1_N - int.from_bytes(sig[32:], "big")).to_bytes(32, "big")
        elif kind == 3:
            sig = bytes(32) + sig[32:]
        elif kind == 4:
            sig = sig[:32] + crypto.SECP256K1_N.to_bytes(32, "big")
        elif kind == 5:
            pub = key(5000 + i).pubkey
        assert _verify_compact(d, sig, pub) == crypto.verify(d, sig, pub) == (kind == 0)


def test_a_self_transfer_moves_nothing_and_a_whole_balance_can_be_sent():
    """The sender's and recipient's writes are one account when they are the same: a transfer to
    oneself neither creates tokens nor leaves the nonce unused (which would let it be replayed)."""
    chain, g = _chain()
    chain.build_block(AUTH[0], 1, _now(g, 1), [decode_tx(make_mint(ALICE, g.ref, 0, receipt(41, units=100, price=10)))])
    provider = crypto.validate_address(PROVIDER.address)
    block, dropped = chain.build_block(AUTH[0], 2, _now(g, 2),
                                       [decode_tx(make_transfer(PROVIDER, g.ref, 0, PROVIDER.address, 400))])
    assert dropped == [] and block.header.tx_count == 1
    assert chain.account(provider) == (1000, 1)
    everything = decode_tx(make_transfer(PROVIDER, g.ref, 1, BOB.address, 1000))  # all of it, not all but one
    assert chain.build_block(AUTH[0], 3, _now(g, 3), [everything])[1] == []
    assert chain.account(provider) == (0, 2) and chain.account(crypto.validate_address(BOB.address)) == (1000, 0)


def test_a_mint_sent_by_its_own_provider_credits_it_and_uses_its_nonce():
    chain, g = _chain()
    chain.build_block(AUTH[0], 1, _now(g, 1), [decode_tx(make_mint(PROVIDER, g.ref, 0, receipt(42, units=100,
                                                                                                 price=10)))])
    assert chain.account(crypto.validate_address(PROVIDER.address)) == (1000, 1)
    with pytest.raises(FailedPrecondition, match="^nonce too low"):  # the nonce the MINT used is spent
        state.apply_tx(chain.store.get, decode_tx(make_transfer(PROVIDER, g.ref, 0, BOB.address, 1)), g, 2)


def test_balances_reach_2_64_minus_1_and_no_further():
    """A transfer or a MINT that would take a balance past 2^64-1 is refused by name (the account
    encoding holds a u64); one that lands exactly on it executes. (A version 2 genesis: on version 3
    the supply itself stops at 2^64-1 first, tests/ledger/test_economy.py.)"""
    top = state.MAX_U64
    g = genesis(max_price_per_unit=2**53 - 1, max_mint_per_receipt=top, version=2)  # a price is at most 2^53-1
    chain = Chain(MemoryStore(), g)
    provider, bob = crypto.validate_address(PROVIDER.address), crypto.validate_address(BOB.address)
    huge = receipt(43, units=2**32, price=2**32)  # 2^64: the amount is capped at 2^64-1
    chain.build_block(AUTH[0], 1, _now(g, 1), [decode_tx(make_mint(ALICE, g.ref, 0, huge))])
    assert chain.account(provider) == (top, 0)
    chain.build_block(AUTH[0], 2, _now(g, 2), [decode_tx(make_transfer(PROVIDER, g.ref, 0, BOB.address, 1)),
                                               decode_tx(make_transfer(BOB, g.ref, 0, PROVIDER.address, 1))])
    assert chain.account(provider) == (top, 1) and chain.account(bob) == (0, 1)  # back on 2^64-1 exactly
    one = receipt(44, units=1, price=1, provider=BOB)
    chain.build_block(AUTH[0], 3, _now(g, 3), [decode_tx(make_mint(ALICE, g.ref, 1, one))])
    assert chain.account(bob) == (1, 1)
    with pytest.raises(FailedPrecondition, match=f"^balance overflow: recipient holds {top} and cannot receive 1 "
                                                 r"more \(2\^64-1 at most\)$"):
        state.apply_tx(chain.store.get, decode_tx(make_transfer(BOB, g.ref, 1, PROVIDER.address, 1)), g, 4)
    with pytest.raises(FailedPrecondition, match=f"^balance overflow: provider holds {top} and cannot receive 1 "
                                                 r"more \(2\^64-1 at most\)$"):
        state.apply_tx(chain.store.get, decode_tx(make_mint(ALICE, g.ref, 2, receipt(45, units=1, price=1))), g, 4)
