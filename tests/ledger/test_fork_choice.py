"""Fork choice is deterministic: any delivery order of the same block tree ends on the same head
(the highest block, ties to the lower hash) with the same state. Two authorities of four build
all branches, so no branch can become final (q = 3) and only fork choice decides."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aitbc.ledger.block import Block, decode_block
from aitbc.ledger.chain import Chain
from aitbc.ledger.store import MemoryStore
from aitbc.ledger.tx import decode_tx, make_mint

from .helpers import ALICE, AUTH, genesis, receipt

G = genesis(4, block_time_ms=1000)


def _grow(parent_path: list[Block], slot: int, mint: int | None) -> Block:
    c = Chain(MemoryStore(), G)
    c.add_blocks(parent_path, now_ms=10**15)
    txs = []
    if mint is not None:  # the same receipt may be minted on several branches: once per branch
        nonce = c.account(decode_tx(make_mint(ALICE, G.ref, 0, receipt(mint))).sender_id)[1]
        txs = [decode_tx(make_mint(ALICE, G.ref, nonce, receipt(mint)))]
    block, _ = c.build_block(AUTH[slot % 4], slot, slot * 1000, txs)
    return block


@st.composite
def trees(draw):
    paths: list[list[Block]] = [[]]  # paths[i] = blocks from genesis to node i
    slots = [-1]
    for _ in range(draw(st.integers(2, 9))):
        parent = draw(st.integers(0, len(paths) - 1))
        step = draw(st.integers(1, 6))
        slot = slots[parent] + step
        while slot % 4 not in (0, 1):  # only AUTH[0] and AUTH[1] ever build
            slot += 1
        mint = draw(st.one_of(st.none(), st.integers(1, 3)))
        block = _grow(paths[parent], slot, mint)
        paths.append(paths[parent] + [block])
        slots.append(slot)
    return [p[-1] for p in paths[1:]], paths


def _topological(order_keys: list[int], paths) -> list[Block]:
    """Blocks sorted by the drawn keys, but each after its parent."""
    blocks = list({p[-1].hash: p[-1] for p in paths[1:]}.values())  # equal draws give equal blocks
    idx = sorted(range(len(blocks)), key=lambda i: order_keys[i % len(order_keys)])
    out: list[Block] = []
    seen: set[bytes] = set()
    for _ in range(len(blocks)):
        for i in idx:
            b = blocks[i]
            if b.hash not in seen and (b.height == 1 or b.parent_hash in seen):
                out.append(b)
                seen.add(b.hash)
                break
    assert len(out) == len(blocks)
    return out


@given(trees(), st.data())
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
def test_any_delivery_order_reaches_the_same_head(tree, data):
    blocks, paths = tree
    expected = max(blocks, key=lambda b: (b.height, [-x for x in b.hash]))
    results = []
    for _ in range(2):
        keys = data.draw(st.lists(st.integers(0, 1000), min_size=len(blocks), max_size=len(blocks)))
        c = Chain(MemoryStore(), G)
        for b in _topological(keys, paths):
            c.add_block(decode_block(b.raw), now_ms=10**15)
        assert c.final_height == 0
        assert c.head.hash == expected.hash
        results.append(dict(c.store.scan(b"v1:acct:")) | dict(c.store.scan(b"v1:rcpt:")))
    assert results[0] == results[1]


def test_the_justified_block_holds_the_chain_and_a_higher_one_moves_it():
    """Finality votes' fork choice: a longer branch that forks below the highest justified block
    is not taken; a pending block justified higher than the lock is adopted even if its branch is
    shorter (never below the final block)."""
    a1 = _grow([], 0, None)
    a2 = _grow([a1], 1, None)
    b2 = _grow([a1], 4, None)  # fork at height 1
    b3 = _grow([a1, b2], 5, None)
    b4 = _grow([a1, b2, b3], 8, None)
    c = Chain(MemoryStore(), G)
    c.add_blocks([a1, a2], now_ms=10**15)
    c.locked_height = 2  # a2 justified
    for b in (b2, b3):
        assert c.add_block(decode_block(b.raw), now_ms=10**15) == "side"
    assert c.head.hash == a2.hash
    assert c.adopt_justified(b3.hash)  # b3 justified at height 3 > 2
    assert c.head.hash == b3.hash
    c.locked_height = 3
    assert c.add_block(decode_block(b4.raw), now_ms=10**15) == "extended"
    assert not c.adopt_justified(a2.hash)  # pending again, but not above the lock: refused
    assert c.head.hash == b4.hash
