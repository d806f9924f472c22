"""Peers (issue 14), with in-process nodes on real loopback servers: an announced address becomes a
peer only after it proves (GetGenesis) to serve our genesis; junk and other networks never take a
slot; dead announced peers are dropped, configured ones kept; peer exchange turns one --peers entry
per node into a full mesh that outlives the first node."""

from __future__ import annotations

import asyncio
import functools
import json
import logging

import pytest

from aitbc import crypto, rpc
from aitbc.ledger.genesis import Genesis
from aitbc.ledger.store import MemoryStore
from aitbc.server.ledger import start_node
from aitbc.v1 import ledger_pb2, ledger_pb2_grpc

from .helpers import AUTH, addr, genesis, until

pytestmark = pytest.mark.timeout(90)


_until = functools.partial(until, timeout=30.0)  # this file's default wait


async def _announce(target: str, address: str) -> None:
    """What any caller of StreamBlocks can do: name an address as its own."""
    async with rpc.channel(target) as ch:
        call = ledger_pb2_grpc.LedgerServiceStub(ch).StreamBlocks(
            ledger_pb2.StreamBlocksRequest(from_height=10**6, peer_address=address))
        await asyncio.sleep(0.05)
        call.cancel()


async def test_four_nodes_with_one_peer_each_form_a_mesh_that_outlives_the_first():
    """Each node is told only about the first; peer exchange makes a full mesh, so stopping the
    first leaves three of four authorities connected: still more than 2/3, finality goes on."""
    g = genesis(4, block_time_ms=300)
    a, sa = await start_node(MemoryStore(), g, AUTH[0], "127.0.0.1:0")
    rest = [await start_node(MemoryStore(), g, k, "127.0.0.1:0", peers=[addr(sa)]) for k in AUTH[1:]]
    nodes = {addr(sa): a, **{addr(s): n for n, s in rest}}
    b, sb = rest[0]
    c, sc = rest[1]
    others3 = [n for n, _ in rest]
    try:
        for me, n in nodes.items():
            others = set(nodes) - {me}
            await _until(lambda n=n, others=others: others <= set(n.verified_peers()), what=f"{me} to know all")
        stub = ledger_pb2_grpc.LedgerServiceStub(b._channel(addr(sc)))
        listed = (await stub.ListPeers(ledger_pb2.ListPeersRequest())).peers
        assert listed[0] == addr(sa) and set(listed) == set(nodes) - {addr(sc)}  # configured first
        await _until(lambda: min(n.chain.final_height for n in nodes.values()) >= 2, what="finality with four")
        await a.stop()  # the only node anyone was told about
        await sa.stop(0)
        f0 = max(n.chain.final_height for n in others3)
        await _until(lambda: min(n.chain.final_height for n in others3) >= f0 + 3, what="finality without a")
        h = min(n.chain.final_height for n in others3)
        assert len({n.chain.hash_at(h) for n in others3}) == 1
        assert all(addr(sa) in n.peers for n in others3)  # a configured peer is never dropped
    finally:
        for n, s in reversed([(a, sa), *rest]):
            await n.stop()
            await s.stop(0)


async def test_junk_and_other_networks_never_become_peers(caplog):
    caplog.set_level(logging.INFO, logger="aitbc.ledger.node")
    g = genesis(1, block_time_ms=100)
    twin = genesis(1, block_time_ms=100, genesis_time_ms=1)  # same chain id and keys, another network
    assert twin.chain_id == g.chain_id and twin.hash() != g.hash()
    n, sn = await start_node(MemoryStore(), g, None, "127.0.0.1:0")
    other, so = await start_node(MemoryStore(), twin, AUTH[0], "127.0.0.1:0")
    real, sr = await start_node(MemoryStore(), g, AUTH[0], "127.0.0.1:0")
    confused = None
    try:
        # anyone can read the genesis, and check it against its hash
        resp = await ledger_pb2_grpc.LedgerServiceStub(n._channel(addr(sr))).GetGenesis(
            ledger_pb2.GetGenesisRequest())
        assert crypto.sha256(resp.genesis_json.encode()).hex() == resp.genesis_hash == g.hash().hex()
        assert Genesis.from_dict(json.loads(resp.genesis_json)) == g
        await _announce(addr(sn), addr(so))
        await _until(lambda: addr(so) in n._failed, what="the other network's check")
        for port in range(1, 41):  # closed ports: nothing answers
            await _announce(addr(sn), f"127.0.0.1:{port}")
        junk = {f"127.0.0.1:{port}" for port in range(1, 41)}
        await _until(lambda: not n._candidates and junk & set(n._failed), what="the junk checks")
        assert n.peers == {} and n.verified_peers() == []
        assert f"not adding announced peer {addr(so)}: genesis" in caplog.text
        # the slots are all still free: a node of this chain that announces itself is taken
        await _announce(addr(sn), addr(sr))
        await _until(lambda: n.verified_peers() == [addr(sr)], what="the real peer")
        await _until(lambda: n.chain.head.height >= 2, what="sync from the real peer")
        # an operator who configures a peer of another network gets a warning and no blocks from it
        confused, sc = await start_node(MemoryStore(), g, None, "127.0.0.1:0", peers=[addr(so)])
        await _until(lambda: f"configured peer {addr(so)} serves genesis" in caplog.text, what="the warning")
        assert other.chain.head.height >= 1 and confused.chain.head.height == 0
        assert confused.verified_peers() == []
        await confused.stop()
        await sc.stop(0)
    finally:
        for x, s in ((n, sn), (other, so), (real, sr)):
            await x.stop()
            await s.stop(0)


async def test_a_dead_announced_peer_is_dropped():
    g = genesis(1, block_time_ms=100)
    n, sn = await start_node(MemoryStore(), g, None, "127.0.0.1:0")
    p, sp = await start_node(MemoryStore(), g, AUTH[0], "127.0.0.1:0")
    n.peer_dead_after_s = 0.5
    try:
        await _announce(addr(sn), addr(sp))
        await _until(lambda: addr(sp) in n.verified_peers(), what="the peer")
        await p.stop()
        await sp.stop(0)
        await _until(lambda: addr(sp) not in n.peers, what="the dead peer to be dropped")
        assert n.verified_peers() == [] and addr(sp) not in n._failed  # it may come back and announce again
    finally:
        await n.stop()
        await sn.stop(0)


async def test_aitbc_chain_genesis_prints_the_nodes_genesis(tmp_path):
    import sys
    from pathlib import Path

    g = genesis(1, block_time_ms=100)
    n, sn = await start_node(MemoryStore(), g, None, "127.0.0.1:0")
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "aitbc.clients.chain_cli", "chain", "genesis", "--node", addr(sn),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=Path(__file__).resolve().parents[2])
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err
        shown = json.loads(out)
        assert shown["genesis_hash"] == g.hash().hex() and Genesis.from_dict(shown["genesis"]) == g
    finally:
        await n.stop()
        await sn.stop(0)
