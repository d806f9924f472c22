"""Authority set changes by the authorities' own votes (docs/ledger.md "Authority set changes"): the
AUTHORITY_VOTE transition and every refusal, the set derivation (a change voted in epoch e applies
exactly at epoch e + 2, one per epoch, FIFO), and the proposer, vote and certificate rules that use
the set of the block's epoch."""

from __future__ import annotations

import dataclasses

import pytest

from aitbc.errors import AlreadyExists, FailedPrecondition, InvalidArgument, PermissionDenied
from aitbc.ledger import authorities, finality, state
from aitbc.ledger.block import decode_header
from aitbc.ledger.chain import Chain
from aitbc.ledger.genesis import Genesis, make_genesis
from aitbc.ledger.store import MemoryStore
from aitbc.ledger.tx import (
    ACTION_ADD,
    ACTION_REMOVE,
    KIND_AUTHORITY_VOTE,
    decode_tx,
    encode_authority_vote_body,
    make_authority_vote,
    make_evidence,
    sign_body,
)

from .auth_helpers import NEW, OTHER, SetRunner, aid
from .helpers import ALICE, ATTESTER, AUTH, genesis

E = 4  # blocks per epoch in these tests: epoch 0 = heights 1-4, epoch 1 = 5-8, epoch 2 = 9-12, ...
G4 = genesis(4, epoch_blocks=E)
GENESIS_IDS = tuple(aid(k) for k in AUTH)


def ids(*keys) -> tuple[bytes, ...]:
    return tuple(aid(k) for k in keys)


# ---- genesis ---------------------------------------------------------------------------------------

def test_genesis_v3_has_epoch_blocks_default_256_and_its_bounds():
    g = make_genesis("sets", [AUTH[0].address], [ATTESTER.address])
    assert g.to_dict()["epoch_blocks"] == 256 and g.has_authority_votes  # a vote link's span: the argument is exact
    assert Genesis.from_dict(g.to_dict()) == g
    assert [g.epoch(h) for h in (1, 256, 257, 512, 513)] == [0, 0, 1, 1, 2]
    for bad in (0, 2**32, True, "4"):
        with pytest.raises(InvalidArgument, match=r"^genesis epoch_blocks must be an integer in \[1, 2\^32-1\]"):
            make_genesis("sets", [AUTH[0].address], [ATTESTER.address], epoch_blocks=bad)
    assert make_genesis("sets", [AUTH[0].address], [], epoch_blocks=2**32 - 1).epoch_blocks == 2**32 - 1


def test_genesis_v2_keeps_a_fixed_set_and_has_no_epoch_blocks():
    v2 = genesis(4, version=2)
    assert "epoch_blocks" not in v2.to_dict() and not v2.has_authority_votes
    with pytest.raises(InvalidArgument, match=r"^genesis version 2 has no epoch_blocks \(authority votes need"):
        genesis(4, version=2, epoch_blocks=5)
    d = v2.to_dict() | {"epoch_blocks": 100}
    with pytest.raises(InvalidArgument, match=r"^genesis fields: missing \[\], unknown \['epoch_blocks'\]"):
        Genesis.from_dict(d)
    run = SetRunner(v2)
    err = run.refused(make_authority_vote(AUTH[0], v2.ref, 0, ACTION_ADD, NEW.address))
    assert isinstance(err, FailedPrecondition) and err.message.startswith("authority votes disabled: ")
    run.until_height(1000 // 100 + 3)
    assert run.set_at(run.height + 1) == GENESIS_IDS  # and no v1:aset: record is ever written
    assert not list(run.chain.store.scan(authorities.ASET))


# ---- encoding --------------------------------------------------------------------------------------

def test_authority_vote_encoding():
    raw = make_authority_vote(AUTH[1], G4.ref, 7, ACTION_REMOVE, AUTH[3].address)
    tx = decode_tx(raw)
    assert (tx.kind, tx.nonce, tx.action, tx.subject, tx.kind_name) == (KIND_AUTHORITY_VOTE, 7, 2, aid(AUTH[3]),
                                                                        "AUTHORITY_VOTE")
    assert tx.body.endswith(bytes((2,)) + aid(AUTH[3])) and len(tx.signature) == 64
    assert tx.subject_address == AUTH[3].address


@pytest.mark.parametrize("action", [0, 3, 255])
def test_an_unknown_action_is_malformed(action):
    body = encode_authority_vote_body(G4.ref, AUTH[0].pubkey, 0, ACTION_ADD, NEW.address)
    body = body[:-21] + bytes((action,)) + body[-20:]
    with pytest.raises(InvalidArgument, match=rf"^malformed transaction: authority vote action must be 1 \(add\) "
                                              rf"or 2 \(remove\), got {action}"):
        decode_tx(sign_body(body, AUTH[0]))


def test_a_truncated_subject_is_malformed():
    body = encode_authority_vote_body(G4.ref, AUTH[0].pubkey, 0, ACTION_ADD, NEW.address)[:-1]
    with pytest.raises(InvalidArgument, match="^malformed transaction: "):
        decode_tx(sign_body(body, AUTH[0]))


# ---- the transition and its refusals ---------------------------------------------------------------

def test_a_vote_writes_its_vote_and_tally_and_the_sender_nonce():
    run = SetRunner(G4)
    run.block(run.add(AUTH[0], NEW))
    read = run.chain.store.get
    assert read(authorities.avot_key(0, ACTION_ADD, aid(NEW), aid(AUTH[0]))) == (1).to_bytes(8, "big")
    assert read(authorities.aprp_key(0, ACTION_ADD, aid(NEW))) == (1).to_bytes(4, "big")
    assert read(authorities.AQUE) is None  # 1 of 4: no quorum yet
    assert run.nonce(AUTH[0]) == 1


def test_refusals():
    run = SetRunner(G4)
    err = run.refused(run.add(NEW, OTHER))
    assert isinstance(err, PermissionDenied) and err.message == (
        f"not an authority: {NEW.address} is not in the authority set of epoch 0 (block 1)")
    err = run.refused(run.add(AUTH[0], AUTH[1]))
    assert isinstance(err, FailedPrecondition) and err.message == (
        f"authority vote refused: {AUTH[1].address} is already an authority of epoch 0")
    err = run.refused(run.remove(AUTH[0], NEW))
    assert isinstance(err, FailedPrecondition) and err.message == (
        f"authority vote refused: {NEW.address} is not an authority of epoch 0")
    run.block(run.add(AUTH[0], NEW))
    err = run.refused(run.add(AUTH[0], NEW))
    assert isinstance(err, AlreadyExists) and err.message == (
        f"already voted: {AUTH[0].address} voted to add {NEW.address} in epoch 0 (block 1)")
    # a vote that would empty the set
    solo = genesis(1, epoch_blocks=E)
    one = SetRunner(solo)
    err = one.refused(make_authority_vote(AUTH[0], solo.ref, 0, ACTION_REMOVE, AUTH[0].address))
    assert isinstance(err, FailedPrecondition) and err.message.startswith(
        f"authority vote refused: removing {AUTH[0].address} would leave no authority")


def test_a_second_vote_in_a_later_epoch_counts_again():
    run = SetRunner(G4)
    run.block(run.add(AUTH[0], NEW))
    run.until_height(E)
    run.block(run.add(AUTH[0], NEW))  # epoch 1: votes do not carry over, a new vote is a new vote
    assert run.chain.store.get(authorities.aprp_key(1, ACTION_ADD, aid(NEW))) == (1).to_bytes(4, "big")


def test_votes_of_a_convicted_authority_are_refused():
    run = SetRunner(G4)
    a, b = (finality.make_vote(AUTH[2], G4, finality.Checkpoint(0, G4.hash(), 1), finality.Checkpoint(1, bytes([x]) * 32, 0))
            for x in (1, 2))
    run.block(make_evidence(ALICE, G4.ref, 0, finality.encode_evidence(a, b)))
    err = run.refused(run.add(AUTH[2], NEW))
    assert isinstance(err, PermissionDenied) and err.message.startswith(
        f"votes ignored: {AUTH[2].address} has evidence on chain (block 1)")


# ---- bounds: a byzantine authority cannot grow the state -----------------------------------------

K = authorities.MAX_PROPOSALS_PER_VOTER
VOTE_KEYS = (authorities.AVOT, authorities.APRP, authorities.AVTR)


def _subjects(n: int, first: int = 300):
    from .helpers import key

    return [key(first + i) for i in range(n)]


def _vote_records(chain: Chain) -> list[bytes]:
    return [k for prefix in VOTE_KEYS for k, _ in chain.store.scan(prefix)]


def test_a_voter_may_vote_for_at_most_k_proposals_per_epoch():
    assert K == 4
    run = SetRunner(G4)
    subjects = _subjects(K + 1)
    first = [make_authority_vote(AUTH[0], G4.ref, i, ACTION_ADD, s.address) for i, s in enumerate(subjects[:K])]
    run.block(*first)
    assert authorities.decode_voted(run.chain.store.get(authorities.avtr_key(0, aid(AUTH[0])))) == [
        (ACTION_ADD, aid(s)) for s in subjects[:K]]
    fifth = run.add(AUTH[0], subjects[K])
    err = run.refused(fifth)
    assert isinstance(err, FailedPrecondition) and err.message == (
        f"too many proposals: {AUTH[0].address} already voted for 4 proposals in epoch 0 (at most 4 per authority "
        f"per epoch); vote again from epoch 1 (block {E + 1})")
    # a removal counts as a proposal too, and a block carrying the 5th vote (a byzantine proposer's)
    # is invalid as a whole: a node refuses it before its state root
    assert run.refused(run.remove(AUTH[0], AUTH[3])).message.startswith("too many proposals: ")
    from aitbc.ledger.block import Header, make_block, tx_root

    parent, txs = run.chain.head, [decode_tx(run.add(AUTH[1], NEW)), decode_tx(fifth)]
    slot = parent.slot + 1
    proposer = AUTH[slot % 4]
    forged = make_block(Header(G4.chain_id, G4.hash(), 2, parent.hash, slot, slot * G4.block_time_ms, aid(proposer),
                               tx_root([t.hash for t in txs]), bytes(32), parent.set_chain, len(txs)), proposer, txs)
    with pytest.raises(InvalidArgument, match=rf"^invalid block 2: tx 1 \(.*\): too many proposals: {AUTH[0].address} "
                                              "already voted for 4 proposals in epoch 0"):
        _import_all(G4, run.blocks).add_block(forged, slot * G4.block_time_ms)
    # the cap is per voter: the others still vote; a vote again for one of the four is "already voted"
    run.block(run.add(AUTH[1], subjects[K]))
    assert isinstance(run.refused(run.add(AUTH[0], subjects[0])), AlreadyExists)
    # and per epoch: from the next epoch on the voter votes again (votes do not carry over)
    run.until_height(E)
    run.block(*(make_authority_vote(AUTH[0], G4.ref, run.nonce(AUTH[0]) + i, ACTION_ADD, s.address)
                for i, s in enumerate(subjects[1:])))
    assert run.refused(run.add(AUTH[0], subjects[0])).message.startswith(
        f"too many proposals: {AUTH[0].address} already voted for 4 proposals in epoch 1")


def test_vote_records_of_an_epoch_are_deleted_at_its_boundary():
    run = SetRunner(G4)
    run.block(*(run.add(k, NEW) for k in AUTH[:3]))  # quorum: queued
    run.block(run.add(AUTH[3], OTHER))
    run.until_height(E - 1)
    run.block(run.add(AUTH[0], OTHER))  # in the epoch's last block: written and deleted by it
    assert run.height == E
    assert _vote_records(run.chain) == []  # nothing of epoch 0 is left: votes never carry over
    last = run.blocks[-1]
    # the deletions are in the boundary block's state root: a follower recomputes the same roots
    writes = state.apply_txs(_import_all(G4, run.blocks[:-1]).store.get, last.txs, G4, E)
    gone = sorted(k for k, v in writes.items() if v is None)
    assert len(gone) == 5 + 2 + 4 and all(k[:8] in VOTE_KEYS for k in gone)  # 5 votes, 2 tallies, 4 voters
    assert authorities.avot_key(0, ACTION_ADD, aid(OTHER), aid(AUTH[0])) in gone
    assert state.encode_state_diff({b"k": None}) == b"\x00\x01k\x00\x00"  # a deletion: an empty value
    assert _import_all(G4, run.blocks).head.state_root == last.header.state_root
    # the queue stays, and the change voted in epoch 0 applies at epoch 2 as before
    assert authorities.decode_queue(run.chain.store.get(authorities.AQUE)) == []
    assert run.set_at(2 * E + 1) == (*GENESIS_IDS, aid(NEW))


def test_a_vote_flood_keeps_the_state_to_n_times_k_votes():
    """Every authority votes for K new subjects (and tries one more) in every epoch for 6 epochs:
    the state never holds more than n x K votes, all of the head's child's epoch."""
    run = SetRunner(G4)
    subjects = iter(_subjects(4 * (K + 1) * 6, 400))
    for _ in range(6):
        run.block(*(make_authority_vote(k, G4.ref, run.nonce(k) + i, ACTION_ADD, next(subjects).address)
                    for k in AUTH for i in range(K)))
        for k in AUTH:
            assert run.refused(run.add(k, next(subjects))).message.startswith("too many proposals: ")
        while True:
            e = G4.epoch(run.height + 1)
            records = _vote_records(run.chain)
            assert all(key[8:16] == e.to_bytes(8, "big") for key in records)
            assert len(list(run.chain.store.scan(authorities.AVOT))) == (4 * K if records else 0)
            if run.height % E == 0:
                break
            run.block()
        assert records == []  # the last block of the epoch deleted them


def test_a_full_queue_refuses_the_vote_that_would_reach_quorum():
    assert authorities.MAX_QUEUE == 16
    full = [(ACTION_ADD, aid(s)) for s in _subjects(16, 500)]
    base = {authorities.AQUE: authorities.encode_queue(full)}

    def vote(k, subject, read):
        return authorities.apply_vote(read, decode_tx(make_authority_vote(k, G4.ref, 0, ACTION_ADD, subject.address)),
                                      G4, 1, None)

    ov = state.Overlay(base.get)
    for k in AUTH[:2]:  # 2 of 4: short of the quorum (3), nothing is queued: accepted
        ov.writes.update(vote(k, NEW, ov.get))
    with pytest.raises(FailedPrecondition) as ei:
        vote(AUTH[2], NEW, ov.get)
    assert ei.value.message == (
        f"authority queue full: 16 changes wait for epoch boundaries (one applies per epoch, at most 16 wait); this "
        f"vote would bring 'add {NEW.address}' to its quorum: vote again in a later epoch, once the queue has room")
    # a proposal already queued that reaches its quorum again adds nothing: accepted
    ov2 = state.Overlay(base.get)
    for k in AUTH[:3]:
        ov2.writes.update(vote(k, _subjects(1, 500)[0], ov2.get))
    assert authorities.AQUE not in ov2.writes
    # one free place: the 16th entry is taken
    ov3 = state.Overlay({authorities.AQUE: authorities.encode_queue(full[:15])}.get)
    for k in AUTH[:3]:
        ov3.writes.update(vote(k, NEW, ov3.get))
    assert authorities.decode_queue(ov3.writes[authorities.AQUE]) == [*full[:15], (ACTION_ADD, aid(NEW))]


def test_the_mempool_holds_at_most_k_pending_votes_per_authority():
    from aitbc.ledger.mempool import Mempool

    pool = Mempool()
    txs = [decode_tx(make_authority_vote(AUTH[0], G4.ref, i, ACTION_ADD, s.address))
           for i, s in enumerate(_subjects(K + 1))]
    for tx in txs[:K]:
        pool.add(tx, lambda _a: (0, 0), lambda _r: False)
    with pytest.raises(FailedPrecondition) as ei:
        pool.add(txs[K], lambda _a: (0, 0), lambda _r: False)
    assert ei.value.message == (f"too many proposals: {AUTH[0].address} has 4 authority votes pending (at most 4 per "
                                "authority per epoch); send more once they are in a block")
    other = decode_tx(make_authority_vote(AUTH[1], G4.ref, 0, ACTION_ADD, NEW.address))
    pool.add(other, lambda _a: (0, 0), lambda _r: False)  # per sender
    pool.remove([txs[0]], lambda _a: (0, 1))  # included: room for one more
    pool.add(txs[K], lambda _a: (0, 1), lambda _r: False)
    assert pool.votes == {aid(AUTH[0]): K, aid(AUTH[1]): 1}


def test_get_authorities_lists_the_proposals_of_the_epoch_until_its_boundary():
    run = SetRunner(G4)
    run.block(run.add(AUTH[0], NEW), run.add(AUTH[1], NEW))
    now = authorities.describe(run.chain.store.get, run.chain.store.scan, G4, 1)
    assert [(p.action, p.subject, p.votes, p.quorum, set(p.voters)) for p in now.proposals] == [
        ("add", NEW.address, 2, 3, {AUTH[0].address, AUTH[1].address})]
    run.until_height(E)
    assert authorities.describe(run.chain.store.get, run.chain.store.scan, G4, 1).proposals == ()


# ---- the set derivation ------------------------------------------------------------------------------

def test_quorum_is_more_than_two_thirds():
    run = SetRunner(G4)
    run.block(run.add(AUTH[0], NEW), run.add(AUTH[1], NEW))  # 2 of 4: not more than 2/3
    run.until_height(3 * E)
    assert run.set_at(2 * E + 1) == GENESIS_IDS and run.set_at(3 * E + 1) == GENESIS_IDS
    run2 = SetRunner(G4)
    run2.block(run2.add(AUTH[0], NEW), run2.add(AUTH[1], NEW), run2.add(AUTH[2], NEW))  # 3 of 4
    assert run2.chain.store.get(authorities.AQUE) == authorities.encode_queue([(ACTION_ADD, aid(NEW))])


def test_a_change_voted_in_epoch_e_applies_exactly_at_epoch_e_plus_2():
    run = SetRunner(G4)
    run.until_height(E + 1)  # epoch 1
    run.block(*(run.add(k, NEW) for k in AUTH[:3]))
    run.until_height(4 * E)
    for h in range(1, 3 * E + 1):  # epochs 0, 1, 2: the genesis list
        assert run.set_at(h) == GENESIS_IDS, h
    for h in range(3 * E + 1, 4 * E + 1):  # epoch 3 = 1 + 2: with NEW appended
        assert run.set_at(h) == (*GENESIS_IDS, aid(NEW)), h
    # written by the last block of epoch 1, in its state writes (so in its state root)
    assert run.chain.store.get(authorities.aset_key(3)) == authorities.encode_set((*GENESIS_IDS, aid(NEW)))
    # every block of epoch 3 was proposed by the 5-set's schedule
    for b in run.blocks[3 * E:4 * E]:
        s = run.set_at(b.height)
        assert b.header.proposer == s[b.header.slot % len(s)]


def test_one_change_per_epoch_in_quorum_order():
    run = SetRunner(G4)
    # epoch 0: remove AUTH[3] reaches quorum first, then add NEW, then add OTHER
    run.block(*(run.remove(k, AUTH[3]) for k in AUTH[:3]))
    run.block(*(run.add(k, NEW) for k in AUTH[:3]))
    run.block(*(run.add(k, OTHER) for k in AUTH[:3]))
    run.until_height(5 * E)
    a0, a1, a2, _ = GENESIS_IDS
    assert run.set_at(E + 1) == GENESIS_IDS
    assert run.set_at(2 * E + 1) == (a0, a1, a2)  # epoch 2: the first to reach quorum
    assert run.set_at(3 * E + 1) == (a0, a1, a2, aid(NEW))  # epoch 3: the next, FIFO
    assert run.set_at(4 * E + 1) == (a0, a1, a2, aid(NEW), aid(OTHER))
    assert run.set_at(5 * E + 1) == (a0, a1, a2, aid(NEW), aid(OTHER))
    assert run.chain.store.get(authorities.AQUE) == authorities.encode_queue([])


def test_a_queued_change_that_no_longer_applies_is_skipped():
    run = SetRunner(G4)
    run.block(*(run.add(k, NEW) for k in AUTH[:3]))
    run.until_height(E)
    run.block(*(run.add(k, NEW) for k in AUTH[:3]))  # epoch 1: again (still not in set(1))
    run.until_height(4 * E)
    assert run.set_at(2 * E + 1) == (*GENESIS_IDS, aid(NEW))
    assert run.set_at(3 * E + 1) == (*GENESIS_IDS, aid(NEW))  # the duplicate changed nothing


def test_removed_authority_stops_proposing_and_added_one_starts():
    run = SetRunner(G4)
    run.block(*(run.remove(k, AUTH[3]) for k in AUTH[:3]))
    run.until_height(2 * E)
    run.block(*(run.add(k, NEW) for k in AUTH[:3]))  # epoch 2: NEW joins at epoch 4
    run.until_height(5 * E)
    proposers = {e: {b.header.proposer for b in run.blocks[e * E:(e + 1) * E]} for e in range(5)}
    assert aid(AUTH[3]) not in proposers[2] | proposers[3] | proposers[4]
    assert aid(NEW) not in proposers[0] | proposers[1] | proposers[2] | proposers[3]
    assert run.set_at(4 * E + 1) == (*GENESIS_IDS[:3], aid(NEW))


def _import_all(g: Genesis, blocks) -> Chain:
    other = Chain(MemoryStore(), g)
    for b in blocks:
        assert other.add_block(b, b.header.timestamp_ms) == "extended"
    return other


def test_a_follower_derives_the_same_set_at_every_height_and_refuses_out_of_set_proposers():
    run = SetRunner(G4)
    run.block(*(run.remove(k, AUTH[3]) for k in AUTH[:3]))
    run.block(*(run.add(k, NEW) for k in AUTH[:3]))
    run.until_height(4 * E)
    other = _import_all(G4, run.blocks)
    for h in range(1, 4 * E + 2):
        assert other.authorities_at(h) == run.set_at(h)
    assert other.head.state_root == run.chain.head.state_root
    # in epoch 4 (set: a0 a1 a2 NEW), AUTH[3] is no authority any more; NEW is, in its own slots only
    from aitbc.ledger.block import Header, make_block, tx_root
    from aitbc.ledger.state import state_root
    parent = run.chain.head
    s = run.set_at(parent.height + 1)
    assert s == (*GENESIS_IDS[:3], aid(NEW))

    def forged(k, slot):
        writes = state.end_block(run.chain.store.get, G4, parent.height + 1)
        h = Header(G4.chain_id, G4.hash(), parent.height + 1, parent.hash, slot, slot * G4.block_time_ms, aid(k),
                   tx_root([]), state_root(parent.state_root, parent.height + 1, writes),
                   authorities.next_set_chain(parent.set_chain, G4, parent.height + 1,
                                              state.Overlay(run.chain.store.get, writes).get), 0)
        return make_block(h, k, [])

    slot = parent.slot + 1
    while s[slot % 4] != aid(NEW):
        slot += 1
    with pytest.raises(InvalidArgument, match=rf"proposer {AUTH[3].address} is not an authority"):
        other.add_block(forged(AUTH[3], slot), slot * G4.block_time_ms)
    with pytest.raises(InvalidArgument, match=rf"proposer {AUTH[0].address} is out of turn in slot {slot}"):
        other.add_block(forged(AUTH[0], slot), slot * G4.block_time_ms)
    assert other.add_block(forged(NEW, slot), slot * G4.block_time_ms) == "extended"


def test_a_block_whose_set_chain_disagrees_with_its_state_is_refused():
    """Ledger format 5, validity rule 7: the set chain moves by one link exactly at the block that
    writes a changed set; a proposer that leaves the link out (or makes one up) has its block refused,
    so a light client never gets a certified header naming sets the chain did not vote."""
    from aitbc.ledger.block import Header, make_block, tx_root
    from aitbc.ledger.state import state_root

    run = SetRunner(G4)
    run.block(*(run.add(k, NEW) for k in AUTH[:3]))
    run.until_height(E - 1)
    base = authorities.genesis_set_chain(G4, G4.hash())
    assert all(b.header.set_chain == base for b in run.blocks)  # no change fixed yet
    parent = run.chain.head

    def forged(set_chain: bytes):
        writes = state.end_block(run.chain.store.get, G4, E)  # block E writes set(2) = the four and NEW
        ids = run.set_at(E)
        slot = parent.slot + 1
        k = next(x for x in [*AUTH, NEW] if aid(x) == ids[slot % len(ids)])
        h = Header(G4.chain_id, G4.hash(), E, parent.hash, slot, slot * G4.block_time_ms, aid(k), tx_root([]),
                   state_root(parent.state_root, E, writes), set_chain, 0)
        return make_block(h, k, [])

    other = _import_all(G4, run.blocks)
    for bad in (parent.set_chain, authorities.set_link(base, 2, GENESIS_IDS), bytes(32)):
        with pytest.raises(InvalidArgument, match=rf"^invalid block {E}: set chain {bad.hex()[:16]} does not match the "
                                                  rf"authority sets of its state \(.*: the sets up to epoch 2\)"):
            other.add_block(forged(bad), 10**15)
    block = run.block()  # the honest one links the change of epoch 2
    assert block.header.set_chain == authorities.set_link(base, 2, (*GENESIS_IDS, aid(NEW)))
    assert other.add_block(block, 10**15) == "extended"
    run.until_height(3 * E)  # boundaries without a change keep the chain as it is
    assert {b.header.set_chain for b in run.blocks[E:]} == {block.header.set_chain}


# ---- votes and certificates per epoch --------------------------------------------------------------

def _cert(chain: Chain, g: Genesis, height: int, signers) -> finality.Certificate:
    # (height, commit) -> (height + 1, prepare): the form whose votes are the next block's epoch's
    src = finality.Checkpoint(height, chain.hash_at(height), finality.COMMIT)
    tgt = finality.Checkpoint(height + 1, chain.hash_at(height + 1), finality.PREPARE)
    return finality.make_certificate(finality.make_vote(k, g, src, tgt) for k in signers)


def test_certificates_are_verified_against_the_set_of_the_epoch():
    run = SetRunner(G4)
    run.block(*(run.remove(k, AUTH[3]) for k in AUTH[:3]))
    run.block(*(run.add(k, NEW) for k in AUTH[:3]))
    run.until_height(4 * E + 2)
    h = 4 * E + 1  # epoch 4: a0 a1 a2 NEW (q = 3)
    s4 = run.set_at(h + 1)
    assert s4 == (*GENESIS_IDS[:3], aid(NEW))
    good = _cert(run.chain, G4, h, [AUTH[0], AUTH[1], NEW])
    finality.verify_certificate(good, G4, authorities=s4)
    removed = _cert(run.chain, G4, h, [AUTH[0], AUTH[1], AUTH[3]])
    with pytest.raises(InvalidArgument, match=rf"^certificate refused: vote from {AUTH[3].address}, which is not an "
                                              "authority"):
        finality.verify_certificate(removed, G4, authorities=s4)
    # the same removed signer still counted for a block of epoch 0 (its set then)
    finality.verify_certificate(_cert(run.chain, G4, 1, [AUTH[0], AUTH[1], AUTH[3]]), G4,
                                authorities=run.set_at(2))


def test_the_tally_counts_votes_against_the_set_of_the_targets_epoch():
    run = SetRunner(G4)
    run.block(*(run.add(k, NEW) for k in AUTH[:3]))  # epoch 2: 5 authorities, q = 4
    run.until_height(2 * E + 3)
    chain = run.chain
    tally = finality.Tally(G4, chain.parent_link, chain.genesis_hash,
                           authorities=lambda cp: chain.authorities_at(cp.height))
    h = 2 * E + 1
    src = finality.Checkpoint(0, chain.genesis_hash, finality.COMMIT)
    tgt = finality.Checkpoint(h, chain.hash_at(h), finality.PREPARE)
    for k in AUTH[:3]:
        tally.add(finality.make_vote(k, G4, src, tgt))
    assert tgt not in tally.justified  # 3 of 5 is not more than 2/3
    tally.add(finality.make_vote(NEW, G4, src, tgt))
    assert tgt in tally.justified
    # NEW's vote for a block of epoch 1 (its set: the genesis list) is refused
    old = finality.Checkpoint(E + 1, chain.hash_at(E + 1), finality.PREPARE)
    with pytest.raises(PermissionDenied, match=rf"vote from {NEW.address}, which is not an authority"):
        tally.add(finality.make_vote(NEW, G4, src, old))
    # a block whose set is not fixed yet here: refused, not kept
    far = finality.Checkpoint(10 * E, b"\x07" * 32, finality.PREPARE)
    with pytest.raises(FailedPrecondition, match="whose authority set this node does not know yet"):
        tally.add(finality.make_vote(AUTH[0], G4, src, far))


def test_quorum_intersection_for_one_change():
    """Two quorums of sets that differ by one member share more than the smaller set's f members
    (docs/ledger.md: checked for 4 -> 5, 4 -> 3, 5 -> 4 and every n < 50)."""
    for n in range(1, 50):
        for m in (n - 1, n + 1):
            if m < 1:
                continue
            common = min(n, m)  # one member added or removed: all the smaller set is common
            qa, qb = finality.quorum(n), finality.quorum(m)
            # quorums inside the union: each leaves out at most (size - q) of the common members
            overlap = (qa - (n - common)) + (qb - (m - common)) - common
            assert overlap >= finality.tolerated(min(n, m)) + 1, (n, m, overlap)
    assert [finality.quorum(n) for n in (3, 4, 5)] == [3, 3, 4]


def test_genesis_epoch_record_is_the_genesis_for_epochs_0_and_1():
    g = dataclasses.replace(G4)
    run = SetRunner(g)
    assert run.set_at(1) == run.set_at(E + 1) == GENESIS_IDS
    assert run.set_at(2 * E + 1) is None  # not fixed before block 4 (the last of epoch 0)
    run.until_height(E)
    assert run.set_at(2 * E + 1) == GENESIS_IDS and run.set_at(3 * E + 1) is None


# ---- receipt proofs --------------------------------------------------------------------------------

def test_a_receipt_proof_across_a_set_change_carries_the_change():
    """Ledger format 5: a proof for a MINT after a set change carries the block that fixed the new
    set, certified by the set before it; a node that holds no certificate for those blocks says so,
    and a proof without the change is refused by the set chain of the MINT's own block."""
    from aitbc import crypto
    from aitbc.ledger import merkle, proof
    from aitbc.ledger.block import split_txs
    from aitbc.ledger.tx import make_mint

    from .helpers import receipt

    run = SetRunner(G4)
    early = receipt(1)
    run.block(make_mint(ALICE, G4.ref, 0, early), *(run.add(k, NEW) for k in AUTH[:3]))
    run.block()
    run.until_height(2 * E)
    late = receipt(2)
    run.block(make_mint(ALICE, G4.ref, 1, late))  # block 9, epoch 2: set a0..a3 NEW
    run.block()
    chain = run.chain
    # a block of epoch 0, certified by the genesis list: no change before it, none in the proof
    c1 = _cert(chain, G4, 1, AUTH[:3])
    chain.store_certificate(1, chain.hash_at(1), c1.encode())
    p = proof.build_proof(chain, early.receipt_hash)
    assert p.changes == () and proof.verify_proof(p.encode(), G4, early.receipt_hash).block_height == 1
    # a block of epoch 2, certified by its own set (with NEW): the proof needs the change of epoch 2,
    # fixed by blocks 4-7, and this node certified none of them
    h = 2 * E + 1
    c9 = _cert(chain, G4, h, [AUTH[0], AUTH[1], AUTH[2], NEW])
    chain.store_certificate(h, chain.hash_at(h), c9.encode())
    with pytest.raises(FailedPrecondition, match=f"^receipt {late.receipt_hash.hex()} is in block {h}: this node "
                                                 "holds no certificate for blocks 4 to 7, which fixed the authority "
                                                 "set of epoch 2"):
        proof.build_proof(chain, late.receipt_hash)
    c5 = _cert(chain, G4, E + 1, AUTH[1:])  # block 5 (epoch 1), certified by the genesis set
    chain.store_certificates([(E + 1, chain.hash_at(E + 1), c5.encode()), (h, chain.hash_at(h), c9.encode())])
    p = proof.build_proof(chain, late.receipt_hash)
    assert [(c.epoch, c.members) for c in p.changes] == [(2, (*GENESIS_IDS, aid(NEW)))]
    res = proof.verify_proof(p.encode(), G4, late.receipt_hash)
    assert (res.block_height, res.set_changes, res.authorities) == (h, 1, (*GENESIS_IDS, aid(NEW)))
    # the same proof without the change: the genesis set cannot have signed it, and the MINT's block
    # commits to the change anyway
    txs = split_txs(chain.block_raw_at(h))
    made = proof.ReceiptProof(txs[0], 0, tuple(merkle.merkle_path([crypto.sha256(t) for t in txs], 0)),
                              (chain.header_at(h),), c9.encode())
    with pytest.raises(InvalidArgument, match=f"^block {h}'s set chain does not match the proof's 0 set change"):
        proof.verify_proof(made.encode(), G4, late.receipt_hash)


def test_votes_for_a_fork_deeper_than_the_block_that_fixed_its_set_count_when_its_set_chain_is_canonical():
    """A vote for a pending block whose branch forks below the block that fixed its epoch's set used
    to be refused until the node switched branch (its set was unknown). Ledger format 5: the block's
    set chain names its branch's sets, so when it equals the canonical one the vote counts with the
    canonical set; a branch whose sets differ is still refused."""
    from aitbc.ledger.node import Node

    main = SetRunner(G4)
    main.block(*(main.add(k, NEW) for k in AUTH[:3]))  # block 1: NEW voted in (set(2), fixed by block E)
    main.until_height(2 * E + 3)
    node = Node(Chain(MemoryStore(), G4), None)
    for b in main.blocks:
        assert node.chain.add_block(b, 10**15) == "extended"

    def rival(with_votes: bool) -> list:
        """A branch from block 1 (with the same votes or without), shorter than the canonical one."""
        r = SetRunner(G4)
        if with_votes:
            assert r.chain.add_block(main.blocks[0], 10**15) == "extended"
            r.slot = main.blocks[0].header.slot + 1  # other slots than main's: other blocks
        else:
            r.block()
        r.until_height(2 * E + 1)
        return r.blocks  # (block 1 of the first is main's: added, not built)

    same, other = rival(True), rival(False)
    for b in same + other:
        assert node.chain.add_block(b, 10**15) == "side"
    assert node.chain.branch_reader(same[-1]) is None  # forks at block 1, below block E
    target = same[-1]
    assert target.header.set_chain == decode_header(node.chain.header_at(target.height)).set_chain
    src = finality.Checkpoint(0, G4.hash(), finality.COMMIT)
    tgt = finality.Checkpoint(target.height, target.hash, finality.PREPARE)
    assert node.submit_votes([finality.make_vote(NEW, G4, src, tgt).encode()]) == [None]  # NEW: in set(2)
    assert any(NEW_ID in votes for votes in node.tally.links.values())
    far = other[-1]
    assert far.header.set_chain != target.header.set_chain
    (err,) = node.submit_votes([finality.make_vote(AUTH[0], G4, src, finality.Checkpoint(
        far.height, far.hash, finality.PREPARE)).encode()])
    assert isinstance(err, FailedPrecondition) and "whose authority set this node does not know yet" in err.message


NEW_ID = aid(NEW)


def test_after_a_reorg_votes_count_against_the_set_of_the_new_branch():
    """The set of an epoch is remembered only once a final block fixed it: before, a reorg may
    bring a branch whose state holds another set for that epoch, and votes for its blocks count
    against that one (here NEW was voted in on the first branch only)."""
    from aitbc.errors import PermissionDenied
    from aitbc.ledger.node import Node

    main = SetRunner(G4)
    main.block(*(main.add(k, NEW) for k in AUTH[:3]))  # block 1: NEW voted in (set(2), fixed by block E)
    main.until_height(2 * E + 3)
    node = Node(Chain(MemoryStore(), G4), None)
    for b in main.blocks:
        assert node.chain.add_block(b, 10**15) == "extended"
    src = finality.Checkpoint(0, G4.hash(), finality.COMMIT)
    on_main = main.blocks[2 * E + 1]  # height 2E + 2: epoch 2, whose set has NEW on this branch
    assert G4.epoch(on_main.height) == 2 and node.chain.final_height == 0
    assert node.submit_votes([finality.make_vote(NEW, G4, src, finality.Checkpoint(
        on_main.height, on_main.hash, finality.PREPARE)).encode()]) == [None]
    rival = SetRunner(G4)
    rival.block()  # no votes: its set(2) is the genesis set
    rival.until_height(2 * E + 6)
    outcomes = [node.chain.add_block(b, 10**15) for b in rival.blocks]
    assert "reorg" in outcomes and node.chain.head.hash == rival.blocks[-1].hash
    on_rival = rival.blocks[2 * E + 1]
    (err,) = node.submit_votes([finality.make_vote(NEW, G4, src, finality.Checkpoint(
        on_rival.height, on_rival.hash, finality.PREPARE)).encode()])
    assert isinstance(err, PermissionDenied) and "not an authority" in err.message
