"""A mempool that cannot be jammed, over real gRPC (issue 14): a nonce-gap flood and a flood of
ready transfers from many funded keys leave room for a normal transfer and for settlement's MINTs,
which get in and execute; a re-encoded transaction and an overflowing MINT are refused at the door."""

from __future__ import annotations

import pytest

from aitbc import errors
from aitbc.ledger.client import LedgerClient
from aitbc.ledger.mempool import Mempool
from aitbc.ledger.store import MemoryStore
from aitbc.ledger.tx import decode_tx, make_mint, make_transfer, signing_digest
from aitbc.server.ledger import start_node

from .helpers import ALICE, AUTH, BOB, PROVIDER, genesis, key, receipt

pytestmark = pytest.mark.timeout(90)
FLOODERS = [key(600 + i) for i in range(30)]
WINDOW = 16


@pytest.fixture
async def small_node():
    # ten txs a block, five blocks a second: a flood outruns the blocks for a while
    g = genesis(1, block_time_ms=200, max_block_txs=10)
    n, server = await start_node(MemoryStore(), g, AUTH[0], "127.0.0.1:0")
    n.mempool = Mempool(max_total=200, nonce_window=WINDOW, mint_reserve=20, max_parked=60)
    client = LedgerClient(f"127.0.0.1:{server.port}")
    yield n, client
    await client.close()
    await n.stop()
    await server.stop(0)


async def test_a_flood_from_funded_keys_leaves_room_for_transfers_and_settlement(small_node):
    n, c = small_node
    ref = await c.chain_ref()
    funding = [make_mint(key(700 + i), ref, 0, receipt(700 + i, provider=k)) for i, k in enumerate(FLOODERS)]
    funding.append(make_mint(key(699), ref, 0, receipt(699, provider=PROVIDER)))
    assert all(o.accepted for o in await c.broadcast_many(funding))
    for raw in funding:
        await c.wait_for_tx(decode_tx(raw).hash.hex(), timeout=30)
    # the flood: every key sends nonces 1..WINDOW (nonce 0 never comes: none of these can execute)...
    gaps = [make_transfer(k, ref, nonce, BOB.address, 1) for nonce in range(1, WINDOW + 1) for k in FLOODERS]
    out = await c.broadcast_many(gaps)
    errors_seen = {type(o.error).__name__ + ": " + o.error.message.split(":")[0] for o in out if not o.accepted}
    assert sum(o.accepted for o in out) == 60  # the parked cap
    assert errors_seen == {"ResourceExhausted: mempool full", "FailedPrecondition: nonce too far ahead"}
    # ...then as many ready transfers as it may (nonce 0 of each, and with it all the parked ones behind)
    ready = [make_transfer(k, ref, 0, BOB.address, 1) for k in FLOODERS]
    await c.broadcast_many(ready)
    again = await c.broadcast_many(gaps)  # once the gaps close, every slot the flood can take, it takes
    assert not all(o.accepted for o in again)
    assert len(n.mempool) >= 150
    # an ordinary sender still gets a transfer in, and it executes
    pay = await c.transfer(PROVIDER, ALICE.address, 7)
    assert (await c.wait_for_tx(pay, timeout=30)).included
    # settlement's MINT gets in through the room kept for MINTs, and executes
    r = receipt(800, provider=PROVIDER)
    st = await c.settle_receipt(key(801), r, wait="included", timeout=30)
    assert st.status in ("included", "final") and st.amount == 1000
    assert (await c.get_account(ALICE.address)).balance == 7


async def test_a_re_encoded_transaction_is_refused_and_the_original_executes(small_node):
    n, c = small_node
    ref = await c.chain_ref()
    await c.settle_receipt(key(900), receipt(900, provider=PROVIDER), wait="included")
    raw = make_transfer(PROVIDER, ref, 0, BOB.address, 5)
    tx = decode_tx(raw)
    # the attack: the sender's tx with its signature's recovery byte put back (the v1 twin) races it
    twin = tx.body + PROVIDER.sign(signing_digest(tx.body))
    with pytest.raises(errors.InvalidArgument, match="^malformed transaction: signature must be exactly 64 bytes"):
        await c.broadcast(twin)
    with pytest.raises(errors.InvalidArgument, match="^malformed transaction: signature must be exactly 64 bytes"):
        await c.broadcast(raw + b"\x00")
    sent = await c.broadcast(raw)
    assert sent == tx.hash.hex()
    st = await c.wait_for_tx(sent, timeout=30)  # the sender's own hash is the one in the block
    assert st.included and (await c.get_account(BOB.address)).balance == 5


async def test_an_overflowing_mint_or_transfer_is_refused_at_admission():
    top = 2**64 - 1
    # no caps in the way; version 2: on version 3 the supply (minted) stops at 2^64-1 before any balance
    g = genesis(1, block_time_ms=200, max_price_per_unit=2**53 - 1, max_mint_per_receipt=top, version=2)
    n, server = await start_node(MemoryStore(), g, AUTH[0], "127.0.0.1:0")
    whale = key(950)
    try:
        async with LedgerClient(f"127.0.0.1:{server.port}") as c:
            st = await c.settle_receipt(key(951), receipt(951, units=2**53 - 1, price=2048, provider=whale),
                                        wait="included")
            have = top - 2047  # room for 2047 more
            assert st.amount == have and (await c.get_account(whale.address)).balance == have
            over = receipt(952, units=2048, price=1, provider=whale)
            with pytest.raises(errors.FailedPrecondition, match=rf"^balance overflow: {whale.address} holds "
                                                                rf"{have} \(\+0 pending\) and cannot receive 2048 more"):
                await c.settle_receipt(key(953), over, wait=None)
            assert (await c.get_receipt_status(over.receipt_hash)).status == "unknown"  # not silently parked
            await c.settle_receipt(key(954), receipt(954, units=10_000, price=1, provider=BOB), wait="included")
            await c.transfer(BOB, whale.address, 1000)  # pending: counts toward the whale's balance
            with pytest.raises(errors.FailedPrecondition, match=rf"^balance overflow: {whale.address} holds "
                                                                rf"{have} \(\+1000 pending\) and cannot receive 1048"):
                await c.transfer(BOB, whale.address, 1048)
            fits = await c.transfer(BOB, whale.address, 1047)
            await c.wait_for_tx(fits, timeout=30)
            assert (await c.get_account(whale.address)).balance == top
    finally:
        await n.stop()
        await server.stop(0)


async def test_a_tx_that_cannot_execute_expires_after_some_blocks(small_node):
    n, c = small_node
    n.mempool.expiry_blocks = 3
    ref = await c.chain_ref()
    await c.settle_receipt(key(980), receipt(980, provider=PROVIDER), wait="included")
    stuck = await c.broadcast(make_transfer(PROVIDER, ref, 1, BOB.address, 1))  # nonce 0 never comes
    admitted = n.chain.head.height
    assert (await c.get_transaction(stuck)).status == "pending"
    while n.chain.head.height < admitted + 4:  # one block past the expiry height: it has surely run
        await n.wait_changed(1.0)
    assert (await c.get_transaction(stuck)).status == "unknown" and n.mempool.expired == 1
    assert len(n.mempool) == 0 and n.mempool.parked_total == 0
