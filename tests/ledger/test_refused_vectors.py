"""tests/vectors/ledger_refused.json (scripts/make_ledger_refused_vectors.py): transaction encodings a node
must refuse, checked against the state machine (decode, stateless checks, transition on the state the
`accepted` block leaves) and against a real node over gRPC (BroadcastTransaction: message and status)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aitbc import crypto
from aitbc.errors import AitbcError
from aitbc.ledger import state
from aitbc.ledger.chain import Chain
from aitbc.ledger.client import LedgerClient
from aitbc.ledger.genesis import Genesis
from aitbc.ledger.store import MemoryStore
from aitbc.ledger.tx import decode_tx
from aitbc.server.ledger import start_node

VECTORS = json.loads((Path(__file__).resolve().parents[1] / "vectors" / "ledger_refused.json").read_text())
GENESIS = Genesis.from_dict(VECTORS["genesis"])
AUTHORITY = crypto.PrivateKey.from_hex(VECTORS["keys"]["authority"])
REFUSED = VECTORS["refused"]


def test_the_vector_genesis_is_the_stated_one() -> None:
    assert GENESIS.hash().hex() == VECTORS["genesis_hash"]


def _chain_after_accepted() -> Chain:
    chain = Chain(MemoryStore(), GENESIS)
    slot = GENESIS.genesis_time_ms // GENESIS.block_time_ms + 1
    txs = [decode_tx(bytes.fromhex(t["raw"])) for t in VECTORS["accepted"]]
    _, dropped = chain.build_block(AUTHORITY, slot, slot * GENESIS.block_time_ms, txs)
    assert not dropped and chain.head.height == 1
    return chain


def test_every_refused_vector_is_a_distinct_encoding() -> None:
    raws = [c["raw"] for c in REFUSED]
    assert len(raws) == len(set(raws)) and len(raws) >= 30


@pytest.mark.parametrize("case", REFUSED, ids=lambda c: c["name"])
def test_the_state_machine_refuses_each_vector(case: dict) -> None:
    chain = _chain_after_accepted()
    with pytest.raises(AitbcError) as ei:
        tx = decode_tx(bytes.fromhex(case["raw"]))
        state.check_stateless(tx, GENESIS)
        state.apply_tx(chain.store.get, tx, GENESIS, 2)
    assert ei.value.message.startswith(case["error"]), (ei.value.message, case["error"])
    assert ei.value.code == case["status"]


async def test_a_node_refuses_each_vector_with_its_message_and_status() -> None:
    node, server = await start_node(MemoryStore(), GENESIS, AUTHORITY, "127.0.0.1:0")
    try:
        async with LedgerClient(f"127.0.0.1:{server.port}") as c:
            for t in VECTORS["accepted"]:  # in order: each spends what the one before it made
                await c.wait_for_tx(await c.broadcast(bytes.fromhex(t["raw"])), timeout=20)
            outcomes = await c.broadcast_many([bytes.fromhex(case["raw"]) for case in REFUSED])
            for case, out in zip(REFUSED, outcomes, strict=True):
                assert not out.accepted and out.error is not None, case["name"]
                assert out.error.message.startswith(case["error"]) and out.error.code == case["status"], case["name"]
            for case in REFUSED:  # one by one (BroadcastTransaction: the gRPC status itself)
                with pytest.raises(AitbcError) as ei:
                    await c.broadcast(bytes.fromhex(case["raw"]))
                assert ei.value.message.startswith(case["error"]) and ei.value.code == case["status"], case["name"]
            assert not node.mempool.by_hash  # nothing refused was kept
    finally:
        await node.stop()
        await server.stop(0)
