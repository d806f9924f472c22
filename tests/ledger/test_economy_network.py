"""The economy through a real node over gRPC (LedgerService and LedgerClient): stake -> unstake ->
withdraw after unbonding, escrow deposit -> SETTLE -> withdraw -> reclaim, a SLASH, and GetSupply
equal to what GetAccount shows for every account."""

from __future__ import annotations

import asyncio

import pytest

from aitbc.errors import AlreadyExists, FailedPrecondition, PermissionDenied
from aitbc.ledger.client import LedgerClient
from aitbc.ledger.store import MemoryStore
from aitbc.ledger.tx import make_settle
from aitbc.server.ledger import start_node

from .economy_helpers import CHEATER, CLIENT, HONEST, quote_for, text_receipt
from .helpers import ALICE, ATTESTER, AUTH, PROVIDER, addr, genesis

pytestmark = pytest.mark.timeout(120)


async def _reach(c: LedgerClient, height: int) -> None:
    while (await c.get_head()).height < height:
        await asyncio.sleep(0.05)


async def test_stake_escrow_settle_slash_and_supply_over_grpc() -> None:
    g = genesis(block_time_ms=100, unbonding_blocks=3, escrow_timeout_blocks=3)
    node, server = await start_node(MemoryStore(), g, AUTH[0], "127.0.0.1:0")
    try:
        async with LedgerClient(addr(server)) as c:
            async def done(h: str) -> None:
                await c.wait_for_tx(h, timeout=20)

            for i, who in enumerate((PROVIDER, CLIENT, CHEATER)):  # 5000 each
                await done(await c.mint(ALICE, text_receipt(800 + i, provider=who, price=100), nonce=i))
            # stake -> unstake -> withdraw after unbonding
            await done(await c.stake(PROVIDER, 3000))
            await done(await c.unstake(PROVIDER, 1000))
            acct = await c.get_account(PROVIDER.address)
            assert (acct.balance, acct.staked, acct.unbonding) == (2000, 2000, 1000) and acct.unlock_height > 0
            if (await c.get_head()).height + 1 < acct.unlock_height:
                with pytest.raises(FailedPrecondition, match="^still unbonding: 1000 unlock at height"):
                    await c.withdraw(PROVIDER)
            await _reach(c, acct.unlock_height - 1)
            await done(await c.withdraw(PROVIDER))
            acct = await c.get_account(PROVIDER.address)
            assert (acct.balance, acct.staked, acct.unbonding, acct.unlock_height) == (3000, 2000, 0, 0)
            # escrow deposit -> SETTLE (mint + fee, once) -> withdraw -> reclaim
            await done(await c.escrow_deposit(CLIENT, ATTESTER.address, 800))
            r = text_receipt(1, price=10)
            q = quote_for(g, r, price=4, fee=50)  # 250
            st = await c.settle_receipt(ATTESTER, r, quote=q)
            assert st.status in ("included", "final") and st.amount == 500
            again = await c.settle_receipt(ATTESTER, r, quote=q)  # idempotent: no second SETTLE
            assert again.tx_hash == st.tx_hash
            assert (await c.get_account(PROVIDER.address)).balance == 3000 + 500 + 250
            esc = await c.get_escrow(CLIENT.address, ATTESTER.address)
            assert (esc.available, esc.unlocking) == (550, 0)
            with pytest.raises(AlreadyExists, match="^quote already settled"):
                await c.broadcast(make_settle(ATTESTER, g.ref, (await c.get_account(ATTESTER.address)).pending_nonce,
                                              text_receipt(2), q))
            with pytest.raises(PermissionDenied, match="^settle not by the attester"):
                await c.settle_receipt(ALICE, text_receipt(3), quote=quote_for(g, text_receipt(3), qid=3))
            await done(await c.escrow_withdraw(CLIENT, ATTESTER.address, 500))
            esc = await c.get_escrow(CLIENT.address, ATTESTER.address)
            assert (esc.available, esc.unlocking) == (50, 500)
            await _reach(c, esc.unlock_height - 1)
            await done(await c.escrow_reclaim(CLIENT, ATTESTER.address))
            acct = await c.get_account(CLIENT.address)
            assert acct.balance == 5000 - 800 + 500 and [(e.attester, e.available, e.unlocking) for e in acct.escrows] \
                == [(ATTESTER.address, 50, 0)]
            # a staked cheater is slashed: half its stake cut, half of that to the two honest providers
            await done(await c.stake(CHEATER, 4000))
            cheat = text_receipt(900, provider=CHEATER)
            honest = [text_receipt(901 + i, provider=HONEST[i], artifact="ee" * 32) for i in range(2)]
            await done(await c.slash(ATTESTER, cheat, honest))
            assert (await c.get_account(CHEATER.address)).staked == 2000
            assert [(await c.get_account(h.address)).balance for h in HONEST[:2]] == [500, 500]
            with pytest.raises(AlreadyExists, match="^verdict already recorded"):
                await c.slash(ATTESTER, cheat, honest[:1])
            # the supply: minted - burned equals what every account holds, stakes and escrows
            sup = await c.get_supply()
            accounts = [await c.get_account(k.address) for k in
                        (PROVIDER, CLIENT, CHEATER, ALICE, ATTESTER, *HONEST[:2])]
            held = sum(a.balance + a.staked + a.unbonding + sum(e.available + e.unlocking for e in a.escrows)
                       for a in accounts)
            assert (sup.minted, sup.burned) == (15000 + 500, 1000) and sup.supply == held == 14500
            assert (sup.staked, sup.unbonding, sup.escrowed) == (4000, 0, 50)
    finally:
        await node.stop()
        await server.stop(0)


async def test_get_supply_on_a_version_2_genesis_is_failed_precondition() -> None:
    g = genesis(block_time_ms=100, version=2)
    node, server = await start_node(MemoryStore(), g, AUTH[0], "127.0.0.1:0")
    try:
        async with LedgerClient(addr(server)) as c:
            with pytest.raises(FailedPrecondition, match="^no supply record: this chain's genesis is version 2"):
                await c.get_supply()
            with pytest.raises(FailedPrecondition, match="^economy disabled"):
                await c.stake(PROVIDER, 1)
    finally:
        await node.stop()
        await server.stop(0)
