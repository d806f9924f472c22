"""Mempool: bounds, nonce order, de-duplication, recheck after blocks."""

from __future__ import annotations

import pytest

from aitbc import crypto
from aitbc.errors import AlreadyExists, FailedPrecondition, ResourceExhausted
from aitbc.ledger.mempool import Mempool
from aitbc.ledger.tx import decode_tx, make_mint, make_transfer

from .helpers import ALICE, BOB, REF, key, receipt

A = crypto.sha256(ALICE.pubkey)[:20]


def _accounts(table):
    return lambda acct_id: table.get(acct_id, (0, 0))


def test_nonce_order_gaps_and_readiness():
    mp = Mempool()
    acc = _accounts({A: (100, 5)})
    for n in (7, 5, 6, 9):
        mp.add(decode_tx(make_transfer(ALICE, REF, n, BOB.address, 1)), acc, lambda _: False)
    assert [t.nonce for t in mp.ready(acc, 100)] == [5, 6, 7]  # 9 waits for 8
    assert mp.pending_nonce(A, 5) == 8
    with pytest.raises(FailedPrecondition, match="^nonce too low"):
        mp.add(decode_tx(make_transfer(ALICE, REF, 4, BOB.address, 1)), acc, lambda _: False)
    with pytest.raises(AlreadyExists, match="^already known"):
        mp.add(decode_tx(make_transfer(ALICE, REF, 5, BOB.address, 1)), acc, lambda _: False)
    with pytest.raises(AlreadyExists, match="^already known"):
        mp.add(decode_tx(make_transfer(ALICE, REF, 5, BOB.address, 2)), acc, lambda _: False)


def test_balance_counts_pending_spend():
    mp = Mempool()
    acc = _accounts({A: (10, 0)})
    mp.add(decode_tx(make_transfer(ALICE, REF, 0, BOB.address, 6)), acc, lambda _: False)
    with pytest.raises(FailedPrecondition, match="^insufficient balance"):
        mp.add(decode_tx(make_transfer(ALICE, REF, 1, BOB.address, 5)), acc, lambda _: False)


def test_bounds_and_duplicate_receipts():
    mp = Mempool(max_total=3, nonce_window=2, mint_reserve=0)
    acc = _accounts({})
    r = receipt(1)
    mp.add(decode_tx(make_mint(ALICE, REF, 0, r)), acc, lambda _: False)
    with pytest.raises(AlreadyExists, match="^already known"):
        mp.add(decode_tx(make_mint(BOB, REF, 0, r)), acc, lambda _: False)
    with pytest.raises(AlreadyExists, match="^receipt already minted"):
        mp.add(decode_tx(make_mint(BOB, REF, 0, receipt(2))), acc, lambda _: True)
    mp.add(decode_tx(make_mint(ALICE, REF, 1, receipt(3))), acc, lambda _: False)
    with pytest.raises(FailedPrecondition, match="^nonce too far ahead: account nonce is 0, tx nonce 2; at most 1"):
        mp.add(decode_tx(make_mint(ALICE, REF, 2, receipt(4))), acc, lambda _: False)
    mp.add(decode_tx(make_mint(BOB, REF, 0, receipt(5))), acc, lambda _: False)
    with pytest.raises(ResourceExhausted, match="^mempool full"):  # BOB has fewer than ALICE + 1: nobody yields
        mp.add(decode_tx(make_mint(BOB, REF, 1, receipt(6))), acc, lambda _: False)


def test_recheck_drops_stale_and_minted():
    mp = Mempool()
    r = receipt(9)
    table = {A: (100, 0)}
    acc = _accounts(table)
    t0 = decode_tx(make_transfer(ALICE, REF, 0, BOB.address, 60))
    t1 = decode_tx(make_transfer(ALICE, REF, 1, BOB.address, 30))
    m = decode_tx(make_mint(BOB, REF, 0, r))
    for t in (t0, t1, m):
        mp.add(t, acc, lambda _: False)
    table[A] = (20, 1)  # t0 applied elsewhere; now only 20 left: t1 overdraws
    assert mp.recheck(acc, lambda rh: rh == r.receipt_hash) == 3
    assert len(mp) == 0 and not mp.receipts and not mp.by_sender


def test_ready_round_robins_senders():
    mp = Mempool()
    acc = _accounts({})
    for i in range(3):
        mp.add(decode_tx(make_mint(ALICE, REF, i, receipt(20 + i))), acc, lambda _: False)
        mp.add(decode_tx(make_mint(BOB, REF, i, receipt(30 + i))), acc, lambda _: False)
    order = [t.sender for t in mp.ready(acc, 4)]
    assert sorted(order) == sorted([ALICE.address, BOB.address] * 2)


def test_pending_spend_is_tracked_through_add_and_remove():
    mp = Mempool()
    acc = _accounts({A: (100, 0)})
    txs = [decode_tx(make_transfer(ALICE, REF, n, BOB.address, 10 + n)) for n in range(4)]
    for t in txs:
        mp.add(t, acc, lambda _: False)
    assert mp.spend[A] == 10 + 11 + 12 + 13
    mp.remove(txs[:2])
    assert mp.spend[A] == 25
    mp.remove(txs[2:])
    assert A not in mp.spend


KEYS = [key(300 + i) for i in range(6)]


def _funded(*keys, balance=10**6):
    return {crypto.sha256(k.pubkey)[:20]: (balance, 0) for k in keys}


def _pay(k, n, amount=1):
    return decode_tx(make_transfer(k, REF, n, BOB.address, amount))


def test_parked_txs_are_capped_and_the_first_to_go_when_full():
    mp = Mempool(max_total=10, nonce_window=8, mint_reserve=2, max_parked=4)
    acc = _accounts(_funded(*KEYS))
    k1, k2, k3 = KEYS[:3]
    for n in range(1, 5):  # nonce 0 never comes: these can never execute
        mp.add(_pay(k1, n), acc, lambda _: False)
    assert mp.parked_total == 4
    with pytest.raises(ResourceExhausted, match="^mempool full: 4 txs wait for missing nonces; send nonce 0 first"):
        mp.add(_pay(k1, 5), acc, lambda _: False)
    for n in range(4):
        mp.add(_pay(k2, n), acc, lambda _: False)
    assert len(mp) == 8  # every slot outside the MINT reserve
    mp.add(_pay(k3, 0), acc, lambda _: False)  # can execute: a parked tx makes room
    assert len(mp) == 8 and mp.parked_total == 3 and 4 not in mp.by_sender[crypto.sha256(k1.pubkey)[:20]]
    mp.add(_pay(k1, 0), acc, lambda _: False)  # fills the gap (its own last parked tx made the room)
    assert mp.parked_total == 0 and [t.nonce for t in mp.ready(acc, 100) if t.sender == k1.address] == [0, 1, 2]


def test_a_full_pool_makes_room_for_a_sender_with_fewer_txs():
    mp = Mempool(max_total=6, nonce_window=8, mint_reserve=0)
    acc = _accounts(_funded(*KEYS))
    big, small, other = KEYS[:3]
    for n in range(5):
        mp.add(_pay(big, n), acc, lambda _: False)
    mp.add(_pay(small, 0), acc, lambda _: False)
    mp.add(_pay(other, 0), acc, lambda _: False)  # full: the biggest sender's last tx yields
    assert sorted(mp.by_sender[crypto.sha256(big.pubkey)[:20]]) == [0, 1, 2, 3] and mp.evicted == 1
    mp.add(_pay(small, 1), acc, lambda _: False)
    assert len(mp.by_sender[crypto.sha256(big.pubkey)[:20]]) == 3
    with pytest.raises(ResourceExhausted, match="^mempool full"):  # small would hold as many as big: no swap
        mp.add(_pay(small, 2), acc, lambda _: False)


def test_mints_have_reserved_room_and_displace_transfers():
    mp = Mempool(max_total=4, nonce_window=8, mint_reserve=1)
    acc = _accounts(_funded(*KEYS))
    for i in range(3):
        mp.add(_pay(KEYS[i], 0), acc, lambda _: False)
    with pytest.raises(ResourceExhausted, match=r"^mempool full: 3 pending txs \(1 more kept for MINTs\)"):
        mp.add(_pay(KEYS[3], 0), acc, lambda _: False)
    mp.add(decode_tx(make_mint(ALICE, REF, 0, receipt(40))), acc, lambda _: False, credit=1000)
    assert len(mp) == 4
    mp.add(decode_tx(make_mint(ALICE, REF, 1, receipt(41))), acc, lambda _: False, credit=1000)
    assert len(mp) == 4 and mp.mints == 2  # a transfer made room for settlement
    assert [t.kind_name for t in mp.ready(acc, 2)] == ["MINT", "MINT"]  # and MINTs go into blocks first


def test_txs_expire_after_a_number_of_blocks():
    mp = Mempool(expiry_blocks=5)
    acc = _accounts(_funded(*KEYS))
    old = _pay(KEYS[0], 0)
    mp.add(old, acc, lambda _: False, height=10)
    mp.add(_pay(KEYS[0], 1), acc, lambda _: False, height=12)
    assert mp.expire(14, acc) == 0
    assert mp.expire(15, acc) == 1 and old.hash not in mp and mp.expired == 1
    assert mp.parked_total == 1  # nonce 1 waits for a nonce 0 again
    assert mp.expire(17, acc) == 1 and len(mp) == 0 and mp.parked_total == 0


def test_a_balance_overflow_is_refused_at_admission():
    mp = Mempool()
    rich = crypto.sha256(BOB.pubkey)[:20]
    table = {**_funded(*KEYS), rich: (2**64 - 1 - 10, 0)}
    acc = _accounts(table)
    mp.add(_pay(KEYS[0], 0, amount=6), acc, lambda _: False)
    with pytest.raises(FailedPrecondition, match=rf"^balance overflow: {BOB.address} holds {2**64 - 11} \(\+6 "
                                                 r"pending\) and cannot receive 5 more \(2\^64-1 at most\)"):
        mp.add(_pay(KEYS[1], 0, amount=5), acc, lambda _: False)
    mp.add(_pay(KEYS[1], 0, amount=4), acc, lambda _: False)
    r = receipt(50, provider=BOB)
    with pytest.raises(FailedPrecondition, match="^balance overflow"):
        mp.add(decode_tx(make_mint(ALICE, REF, 0, r)), acc, lambda _: False, credit=1)
    mp.remove([mp.by_sender[crypto.sha256(KEYS[0].pubkey)[:20]][0]])  # 6 less pending to BOB
    mp.add(decode_tx(make_mint(ALICE, REF, 0, r)), acc, lambda _: False, credit=1)


def test_bookkeeping_stays_exact_under_random_floods():
    """Random admissions (gapped, ready, MINTs), blocks, expiry and evictions on a tiny pool: the
    counts eviction relies on (parked, per-sender sizes, pending credit and spend) stay exact."""
    import random

    from aitbc.errors import AitbcError

    rng = random.Random(14)
    keys = [key(400 + i) for i in range(12)]
    ids = [crypto.sha256(k.pubkey)[:20] for k in keys]
    table = {i: (10**6, 0) for i in ids}
    acc = _accounts(table)
    mp = Mempool(max_total=24, nonce_window=6, mint_reserve=4, max_parked=6, expiry_blocks=7)
    height, minted, receipt_no = 0, set(), 1000
    for step in range(1500):
        op = rng.random()
        if op < 0.85:
            k = rng.randrange(len(keys))
            nonce = table[ids[k]][1] + rng.randrange(6)
            if rng.random() < 0.7:  # mostly the next nonce: ready txs fill the pool
                nonce = mp.pending_nonce(ids[k], table[ids[k]][1])
            if rng.random() < 0.2:
                receipt_no += 1
                raw = make_mint(keys[k], REF, nonce, receipt(receipt_no, provider=keys[(k + 1) % len(keys)]))
                tx = decode_tx(raw)
            else:
                tx = _pay(keys[k], nonce, amount=rng.randrange(1, 50))
            try:
                mp.add(tx, acc, lambda rh: rh in minted, credit=5, height=height)
            except AitbcError:
                pass
        elif op < 0.96:  # a block: what is ready executes (balances aside), the rest is rechecked
            height += 1
            for tx in mp.ready(acc, rng.randrange(1, 6)):
                bal, n = table[tx.sender_id]
                table[tx.sender_id] = (bal, n + 1)
                if tx.receipt is not None:
                    minted.add(tx.receipt.receipt_hash)
                mp.remove([tx])
            mp.recheck(acc, lambda rh: rh in minted)
            mp.expire(height, acc)
        else:
            victims = rng.sample(list(mp.by_hash.values()), min(len(mp), 2))
            mp.remove(victims, acc)
        # the invariants
        assert len(mp) <= mp.max_total and mp.parked_total <= mp.max_parked
        parked = 0
        for sender, queue in mp.by_sender.items():
            assert queue and mp._sizes.get(sender) == len(queue)
            end = table[sender][1]
            while end in queue:
                end += 1
            parked += sum(1 for n in queue if n > end)
        assert mp.parked_total == parked == sum(mp._parked.count.values()), step
        assert sum(mp._sizes.count.values()) == len(mp.by_hash)
        spend: dict = {}
        for tx in mp.by_hash.values():
            if tx.receipt is None:
                spend[tx.sender_id] = spend.get(tx.sender_id, 0) + tx.amount
        assert spend == mp.spend
        assert sum(mp.credit.values()) == sum(a for _, a in mp._credit_of.values())
        assert mp.mints == sum(1 for tx in mp.by_hash.values() if tx.receipt is not None)
    assert mp.evicted and mp.expired  # the run went through both
