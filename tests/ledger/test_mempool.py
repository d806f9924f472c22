"""Mempool: bounds, nonce order, de-duplication, recheck after blocks."""

from __future__ import annotations

import pytest

from aitbc import crypto
from aitbc.errors import AlreadyExists, FailedPrecondition, ResourceExhausted
from aitbc.ledger.mempool import Mempool
from aitbc.ledger.tx import decode_tx, make_mint, make_transfer

from .helpers import ALICE, BOB, REF, receipt

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
    mp = Mempool(max_total=3, max_per_sender=2)
    acc = _accounts({})
    r = receipt(1)
    mp.add(decode_tx(make_mint(ALICE, REF, 0, r)), acc, lambda _: False)
    with pytest.raises(AlreadyExists, match="^already known"):
        mp.add(decode_tx(make_mint(BOB, REF, 0, r)), acc, lambda _: False)
    with pytest.raises(AlreadyExists, match="^receipt already minted"):
        mp.add(decode_tx(make_mint(BOB, REF, 0, receipt(2))), acc, lambda _: True)
    mp.add(decode_tx(make_mint(ALICE, REF, 1, receipt(3))), acc, lambda _: False)
    with pytest.raises(ResourceExhausted, match="^mempool full"):
        mp.add(decode_tx(make_mint(ALICE, REF, 2, receipt(4))), acc, lambda _: False)
    mp.add(decode_tx(make_mint(BOB, REF, 0, receipt(5))), acc, lambda _: False)
    with pytest.raises(ResourceExhausted, match="^mempool full"):
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
