"""Each signature is checked once per node (aitbc.ledger.verifier.VerifiedTxs), and only once it
passed: a block carrying a tx this node never checked is still fully verified, whoever sends it,
however often."""

from __future__ import annotations

import pytest

from aitbc import crypto
from aitbc.errors import CryptoError, InvalidArgument
from aitbc.ledger import state
from aitbc.ledger.chain import Chain
from aitbc.ledger.node import Node
from aitbc.ledger.store import MemoryStore
from aitbc.ledger.tx import decode_tx, make_mint, make_transfer
from aitbc.ledger.verifier import VerifiedTxs

from .helpers import ALICE, AUTH, BOB, PROVIDER, genesis, receipt

pytestmark = pytest.mark.timeout(60)


def _now(g, slot: int) -> int:
    return slot * g.block_time_ms + 10


def _scratch(g):
    """A chain the authority builds on (block 1 funds PROVIDER with a MINT)."""
    scratch = Chain(MemoryStore(), g)
    slot = g.genesis_time_ms // g.block_time_ms + 1
    scratch.build_block(AUTH[0], slot, _now(g, slot), [decode_tx(make_mint(ALICE, g.ref, 0, receipt(1)))])
    return scratch, slot


def _tampered(raw: bytes) -> bytes:
    return raw[:-1] + bytes([raw[-1] ^ 1])  # the last signature byte flipped: a bad signature


async def test_a_block_with_a_bad_signature_the_node_never_saw_is_refused_however_often_it_comes():
    g = genesis(1)
    scratch, slot = _scratch(g)
    node = Node(Chain(MemoryStore(), g), verify_workers=0)
    assert await node.receive_blocks([scratch.block_raw_at(1)]) == ["extended"]
    good = make_transfer(PROVIDER, g.ref, 0, BOB.address, 5)
    [(good_hash, err)] = await node.submit([good], relay=False)  # checked here: remembered
    assert err is None and good_hash in node.verified_txs
    bad = decode_tx(_tampered(make_transfer(PROVIDER, g.ref, 1, BOB.address, 7)))
    with pytest.raises(CryptoError, match="^bad signature"):
        state.check_stateless(bad, g)
    # a byzantine authority signs a block with the good tx and the bad one (its own chain skips the check)
    block, dropped = scratch.build_block(AUTH[0], slot + 1, _now(g, slot + 1), [decode_tx(good), bad],
                                         verified={good_hash, bad.hash})
    assert dropped == [] and block.header.tx_count == 2
    for _attempt in range(2):  # refused, and not remembered as checked or known: refused again
        with pytest.raises(InvalidArgument, match=rf"^invalid block 2: tx 1 \({bad.hash.hex()}\): bad signature: does "
                                                  "not verify"):
            await node.receive_blocks([block.raw])
        assert node.chain.head.height == 1 and bad.hash not in node.verified_txs
    assert node.chain.account(crypto.validate_address(PROVIDER.address))[1] == 0  # neither tx applied


async def test_a_signature_is_checked_once_per_node(monkeypatch):
    """Admission, then the block that includes the tx, then the same block from a second peer,
    then the tx relayed late: one check of each signature."""
    g = genesis(1)
    scratch, slot = _scratch(g)
    node = Node(Chain(MemoryStore(), g), verify_workers=0)
    checked: list[bytes] = []
    real = state.check_stateless

    def counting(tx, genesis):  # the real check, counted
        checked.append(tx.hash)
        return real(tx, genesis)

    monkeypatch.setattr(state, "check_stateless", counting)
    assert await node.receive_blocks([scratch.block_raw_at(1)]) == ["extended"]
    raws = [make_transfer(PROVIDER, g.ref, n, BOB.address, 1) for n in range(40)]
    assert all(err is None for _, err in await node.submit(raws[:20], relay=False))
    txs = [decode_tx(r) for r in raws]
    block, _ = scratch.build_block(AUTH[0], slot + 1, _now(g, slot + 1), txs, verified={t.hash for t in txs})
    checked.clear()
    assert await node.receive_blocks([block.raw]) == ["extended"]
    assert sorted(checked) == sorted(t.hash for t in txs[20:])  # only the 20 it had not admitted
    checked.clear()
    assert await node.receive_blocks([block.raw]) == ["known"]  # another peer streams it too
    late = await node.submit(raws[20:], relay=False)  # and the relay brings its txs after it
    assert checked == [] and all(err is not None and "is in block 2" in err.message for _, err in late)


def test_verified_txs_forgets_the_oldest_beyond_its_capacity():
    v = VerifiedTxs(capacity=100)
    v.add(bytes([i]) * 32 for i in range(100))
    assert len(v) == 100 and bytes([0]) * 32 in v
    v.add([b"\xff" * 32])
    assert len(v) == 90 and bytes([0]) * 32 not in v and bytes([11]) * 32 in v and b"\xff" * 32 in v
