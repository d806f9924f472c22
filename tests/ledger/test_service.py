"""LedgerService on real grpc.aio servers (127.0.0.1 port 0), nodes in this process."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from aitbc import errors
from aitbc.ledger.client import LedgerClient
from aitbc.ledger.mempool import Mempool
from aitbc.ledger.store import MemoryStore
from aitbc.ledger.tx import MAX_TX_BYTES, make_mint, make_transfer
from aitbc.server.ledger import start_node
from aitbc.v1 import ledger_pb2, ledger_pb2_grpc

from .helpers import ALICE, AUTH, BOB, CHAIN, OTHER_REF, PROVIDER, genesis, key, receipt

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def node():
    g = genesis(1, block_time_ms=100)
    n, server = await start_node(MemoryStore(), g, AUTH[0], "127.0.0.1:0")
    client = LedgerClient(f"127.0.0.1:{server.port}")
    yield n, server, client
    await client.close()
    await n.stop()
    await server.stop(0)


async def _wait(pred, timeout=15.0):
    for _ in range(int(timeout / 0.05)):
        if await pred():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


async def test_mint_transfer_and_queries(node):
    n, server, c = node
    r = receipt(1, units=100, price=10)
    tx_hash = await c.mint(ALICE, r)
    st = await c.wait_for_receipt(r.receipt_hash, final=True)
    assert (st.status, st.tx_hash, st.amount) == ("final", tx_hash, 1000)
    assert (await c.wait_for_tx(tx_hash)).status == "final"
    assert (await c.get_account(PROVIDER.address)).balance == 1000
    t = await c.transfer(PROVIDER, BOB.address, 250)
    await c.wait_for_tx(t, final=True)
    assert (await c.get_account(BOB.address)).balance == 250
    acct = await c.get_account(PROVIDER.address)
    assert (acct.balance, acct.nonce, acct.pending_nonce) == (750, 1, 1)
    stub = ledger_pb2_grpc.LedgerServiceStub(c.channel)
    tx = await stub.GetTransaction(ledger_pb2.GetTransactionRequest(hash=t))
    blk = await stub.GetBlock(ledger_pb2.GetBlockRequest(height=tx.block_height, include_transactions=True))
    assert blk.block.header.hash == tx.block_hash and blk.block.final and blk.block.canonical
    assert [x.hash for x in blk.transactions] == [t]
    by_hash = await stub.GetBlock(ledger_pb2.GetBlockRequest(hash=tx.block_hash))
    assert by_hash.block.raw == blk.block.raw
    head = await c.get_head()
    assert head.chain_id == CHAIN and head.height >= tx.block_height


async def test_rejections_have_stable_messages(node):
    n, server, c = node
    g = n.genesis
    r = receipt(2)
    cases = [
        (make_transfer(ALICE, OTHER_REF, 0, BOB.address, 1), errors.InvalidArgument, "wrong chain id"),
        (make_transfer(ALICE, g.ref, 0, BOB.address, 1)[:-1] + b"\x07", errors.InvalidArgument, "bad signature"),
        (make_transfer(ALICE, g.ref, 0, BOB.address, 1), errors.FailedPrecondition, "insufficient balance"),
        (make_mint(ALICE, g.ref, 0, receipt(3, attester=key(77))), errors.PermissionDenied,
         "attester not authorized"),
        (b"\x01" * (MAX_TX_BYTES + 1), errors.InvalidArgument, "tx too large"),
        (b"\x01\x02", errors.InvalidArgument, "malformed"),
    ]
    for raw, cls, msg in cases:
        with pytest.raises(cls, match=f"^{msg}"):
            await c.broadcast(raw)
    mint = make_mint(ALICE, g.ref, 0, r)
    await c.broadcast(mint)
    with pytest.raises(errors.AlreadyExists, match="^already known"):
        await c.broadcast(mint)
    st = await c.wait_for_receipt(r.receipt_hash)
    with pytest.raises(errors.AlreadyExists, match="^already known"):
        await c.broadcast(mint)  # now in a block
    with pytest.raises(errors.AlreadyExists, match="^receipt already minted"):
        await c.broadcast(make_mint(BOB, g.ref, 0, r))
    with pytest.raises(errors.FailedPrecondition, match="^nonce too low"):
        await c.broadcast(make_mint(ALICE, g.ref, 0, receipt(4)))
    assert st.status in ("included", "final")
    # a batch answers per transaction
    out = await c.broadcast_many([make_mint(ALICE, g.ref, 1, receipt(5)), b"junk"])
    assert out[0].accepted and not out[1].accepted and isinstance(out[1].error, errors.InvalidArgument)


async def test_mempool_full_is_resource_exhausted():
    g = genesis(1, block_time_ms=60_000)  # no block during the test
    n, server = await start_node(MemoryStore(), g, None, "127.0.0.1:0")
    n.mempool = Mempool(max_total=2, mint_reserve=0)
    try:
        async with LedgerClient(f"127.0.0.1:{server.port}") as c:
            for i in range(2):
                await c.broadcast(make_mint(ALICE, g.ref, i, receipt(10 + i)))
            with pytest.raises(errors.ResourceExhausted, match="^mempool full"):
                await c.broadcast(make_mint(ALICE, g.ref, 2, receipt(12)))
            # a sender with fewer pending txs gets in: the fullest sender's last tx yields
            await c.broadcast(make_mint(BOB, g.ref, 0, receipt(13)))
            assert (await c.get_account(ALICE.address)).pending_nonce == 1
            with pytest.raises(errors.ResourceExhausted, match="^mempool full"):
                await c.broadcast(make_mint(BOB, g.ref, 1, receipt(14)))
    finally:
        await n.stop()
        await server.stop(0)


async def test_bad_requests_and_not_found(node):
    n, server, c = node
    stub = ledger_pb2_grpc.LedgerServiceStub(c.channel)
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await stub.GetBlock(ledger_pb2.GetBlockRequest(hash="ab" * 32))
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await stub.GetBlock(ledger_pb2.GetBlockRequest(hash="zz"))
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await stub.GetTransaction(ledger_pb2.GetTransactionRequest(hash="cd" * 32))
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await stub.GetAccount(ledger_pb2.GetAccountRequest(address="ait1nope"))
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        async for _ in stub.StreamBlocks(ledger_pb2.StreamBlocksRequest(from_height=-1)):
            pass
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # malformed protobuf is INVALID_ARGUMENT (unary and streaming); the node keeps serving
    for method in ("GetBlock", "BroadcastTransaction"):
        call = c.channel.unary_unary(f"/aitbc.v1.LedgerService/{method}")
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await call(b"\xff\xff\xff")
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a valid" in ei.value.details()
    stream = c.channel.unary_stream("/aitbc.v1.LedgerService/StreamBlocks")
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        async for _ in stream(b"\x08"):
            pass
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (await c.get_receipt_status("ef" * 32)).status == "unknown"


async def test_stream_from_height_0_or_1_starts_at_block_1_and_minus_1_is_refused(node):
    """docs/ledger.md "Sync" and the proto: from_height >= 0, where 0 (the genesis, also the unset
    field) and 1 both mean block 1; a negative height is INVALID_ARGUMENT with the stated message."""
    n, server, c = node
    stub = ledger_pb2_grpc.LedgerServiceStub(c.channel)
    for start in (0, 1):
        async for resp in stub.StreamBlocks(ledger_pb2.StreamBlocksRequest(from_height=start)):
            assert resp.blocks[0].header.height == 1
            break
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        async for _ in stub.StreamBlocks(ledger_pb2.StreamBlocksRequest(from_height=-1)):
            pass
    assert (ei.value.code(), ei.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "from_height must be >= 0")


async def test_stream_from_beyond_head_waits_then_delivers(node):
    n, server, c = node
    stub = ledger_pb2_grpc.LedgerServiceStub(c.channel)
    target = n.chain.head.height + 3
    seen = []
    async for resp in stub.StreamBlocks(ledger_pb2.StreamBlocksRequest(from_height=target)):
        seen.extend(b.header.height for b in resp.blocks)
        if len(seen) >= 3:
            break
    assert seen[:3] == [target, target + 1, target + 2]


async def test_follower_syncs_and_reverifies():
    g = genesis(1, block_time_ms=100)
    a, sa = await start_node(MemoryStore(), g, AUTH[0], "127.0.0.1:0")
    f, sf = await start_node(MemoryStore(), g, None, "127.0.0.1:0", peers=[f"127.0.0.1:{sa.port}"])
    try:
        async with LedgerClient(f"127.0.0.1:{sf.port}") as c:
            # a MINT sent to the follower is relayed to the authority
            r = receipt(30)
            await c.mint(ALICE, r)
            st = await c.wait_for_receipt(r.receipt_hash, final=True, timeout=20)
            assert st.amount == 1000

        async def same():
            return f.chain.head.height >= 3 and f.chain.hash_at(3) == a.chain.hash_at(3)
        await _wait(same)
        h = min(a.chain.head.height, f.chain.head.height)
        assert f.chain.hash_at(h) == a.chain.hash_at(h)
    finally:
        for n, s in ((f, sf), (a, sa)):
            await n.stop()
            await s.stop(0)


async def test_settle_receipt_is_idempotent_under_concurrency(node):
    n, server, c = node
    g = n.genesis
    rs = [receipt(200 + i, units=10, price=1) for i in range(25)]
    # another writer uses the same key meanwhile, so the local nonce counter must re-sync
    await c.broadcast(make_mint(ALICE, g.ref, 0, receipt(199)))
    sts = await asyncio.gather(*(c.settle_receipt(ALICE, r, wait="final") for r in rs))
    assert all(s.status == "final" and s.amount == 10 for s in sts)
    again = await asyncio.gather(*(c.settle_receipt(BOB, r, wait=None) for r in rs[:5]))
    assert [a.tx_hash for a in again] == [s.tx_hash for s in sts[:5]]
    assert (await c.get_account(BOB.address)).nonce == 0  # no second MINT was sent
    assert (await c.get_account(PROVIDER.address)).balance == 250 + 1000
    with pytest.raises(errors.PermissionDenied):
        await c.settle_receipt(ALICE, receipt(300, attester=key(5)))


async def test_concurrent_transfers_with_one_key(node):
    n, server, c = node
    await c.settle_receipt(ALICE, receipt(400, units=100, price=10), wait="included")
    hashes = await asyncio.gather(*(c.transfer(PROVIDER, BOB.address, 1 + i) for i in range(20)))
    await c.wait_for_tx(hashes[-1])
    for h in hashes:
        await c.wait_for_tx(h)
    assert (await c.get_account(BOB.address)).balance == sum(1 + i for i in range(20))
    with pytest.raises(errors.FailedPrecondition, match="^insufficient balance"):
        await c.transfer(PROVIDER, BOB.address, 10**6)
    await c.wait_for_tx(await c.transfer(PROVIDER, BOB.address, 1))  # the counter re-synced
