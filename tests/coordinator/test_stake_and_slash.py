"""Stake gates eligibility and a proven cheater loses it (issue 15), on a real ledger node: a miner
below the genesis min_stake is refused with what to do, a staked cheater outvoted by established
miners is slashed on chain (part burned, part to the miners that exposed it) and dropped once its
stake is below the minimum, while the honest miners are paid; the supply invariant holds."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from aitbc import crypto
from aitbc.ledger.client import LedgerClient
from aitbc.ledger.genesis import make_genesis
from aitbc.v1 import coordinator_pb2, job_pb2, receipt_pb2
from tests.coordinator.test_jobs_api import MD, image_job, stub, wait_done
from tests.coordinator.test_paid_jobs import supply_holds
from tests.coordinator.test_settlement import LedgerNode, _settled

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
St = receipt_pb2.SettlementState
V = job_pb2.VerificationState
MIN_STAKE = 600


def staked_ledger(tmp_path: Any) -> LedgerNode:
    ledger = LedgerNode.for_network(tmp_path)
    ledger.genesis = make_genesis("aitbc-devnet", [ledger.key.address], list(ledger.genesis.attesters),
                                  block_time_ms=200, min_stake=MIN_STAKE, slash_ppm=500_000, slash_reward_ppm=500_000)
    return ledger


async def test_a_staked_cheater_is_slashed_and_dropped_while_honest_miners_are_paid(
        network_factory: Any, null_backend: Any, tmp_path: Any) -> None:
    from tests.coordinator.test_hub import CheatingMiner

    honest_keys = [crypto.PrivateKey.generate() for _ in range(2)]
    async with staked_ledger(tmp_path) as ledger, LedgerClient(ledger.address) as lc:
        # the first miners are the operator's (trusted_miners): on a new network nobody holds tokens to stake
        net = await network_factory(ledger=ledger.address, verify_rate=1.0, verify_timeout_s=30, stake_check_s=0.2,
                                    trusted_miners=[k.address for k in honest_keys])
        cheat = CheatingMiner(net)
        with pytest.raises(grpc.aio.AioRpcError) as err:  # no stake: refused, with what to do
            await cheat.register(models=("null",), price_per_unit=1, device="cpu")
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"has staked 0, the network's minimum stake is {MIN_STAKE}: stake {MIN_STAKE} more" in err.value.details()

        honest = [await net.add_miner({"null": null_backend}, price=4, key=k) for k in honest_keys]
        s = stub(net)
        seed = 0
        while sum([(await lc.get_account(k.address)).balance for k in honest_keys]) < 800:
            seed += 1  # each job and its re-execution: 1 tile x 40 steps x 4 minted to each of the two
            job = await wait_done(s, (await s.SubmitJob(image_job(model="null", steps=40, seed=seed), metadata=MD)).job.job_id)
            await _settled(net, job.job_id)
        for k in honest_keys:  # the cheater buys its way in with tokens honest work earned
            bal = (await lc.get_account(k.address)).balance
            if bal:
                await lc.wait_for_tx(await lc.transfer(k, cheat.key.address, bal), final=True)
        cash = (await lc.get_account(cheat.key.address)).balance
        await lc.wait_for_tx(await lc.stake(cheat.key, 100), final=True)
        with pytest.raises(grpc.aio.AioRpcError) as err:  # still short: it is told how much
            await cheat.register(models=("null",), price_per_unit=1, device="cpu")
        assert f"has staked 100, the network's minimum stake is {MIN_STAKE}: stake {MIN_STAKE - 100} more" in \
            err.value.details()
        await lc.wait_for_tx(await lc.stake(cheat.key, cash - 100), final=True)
        staked = cash
        assert MIN_STAKE <= staked < 2 * MIN_STAKE  # enough to register; half of it is not

        # the cheater takes the next job alone (the honest miners step out), then they come back to re-run it
        for h in honest:
            h.stop()
        await net.until(lambda: not net.core.registry.miners)
        await cheat.connect(models=("null",), price_per_unit=1, device="cpu")
        serving = asyncio.create_task(cheat.serve())
        job = (await s.SubmitJob(image_job(model="null", seed=9, steps=4), metadata=MD)).job
        await net.until(lambda: net.core.store.get_job(job.job_id).miner_id == cheat.key.address)
        back = [await net.add_miner({"null": null_backend}, price=4, key=k) for k in honest_keys]
        await wait_done(s, job.job_id)
        await net.until(lambda: net.core.store.get_job(job.job_id).verification == V.VERIFICATION_STATE_REPLACED)
        rec = (await s.GetReceipt(coordinator_pb2.GetReceiptRequest(job_id=job.job_id), metadata=MD)).receipt
        await net.until(lambda: net.core.store.get_receipt(rec.receipt_hash).settlement.state == St.SETTLEMENT_STATE_REJECTED)

        async def slashed() -> bool:
            return (await lc.get_account(cheat.key.address)).staked < staked

        deadline = asyncio.get_running_loop().time() + 60
        while not await slashed():
            assert asyncio.get_running_loop().time() < deadline, "no SLASH landed"
            await asyncio.sleep(0.2)
        acct = await lc.get_account(cheat.key.address)
        cut = staked * 500_000 // 1_000_000
        assert acct.staked + acct.unbonding == staked - cut
        sup = await lc.get_supply()
        assert sup.burned >= cut - cut * 500_000 // 1_000_000  # the rest went to the miners that exposed it
        if acct.staked < MIN_STAKE:  # below the minimum now: dropped, and refused on reconnecting
            await net.until(lambda: cheat.key.address not in net.core.registry.miners, timeout=10)
        await supply_holds(lc, {cheat.key.address, *(k.address for k in honest_keys)})
        serving.cancel()
        for b in back:
            b.stop()
