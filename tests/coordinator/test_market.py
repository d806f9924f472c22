"""MarketService: the public, read-only market (no API key), bounded per calling host, naming no
client, prompt or job."""

from __future__ import annotations

from typing import Any

import grpc

from aitbc.v1 import coordinator_pb2, coordinator_pb2_grpc
from tests.coordinator.test_jobs_api import MD, image_job, stub, wait_done


def market(net: Any) -> coordinator_pb2_grpc.MarketServiceStub:
    return coordinator_pb2_grpc.MarketServiceStub(net.channel())


async def test_the_market_shows_offers_demand_and_fills_without_an_api_key(network_factory: Any,
                                                                           null_backend: Any) -> None:
    net = await network_factory()
    cheap = await net.add_miner({"null": null_backend}, price=3, concurrency=2)
    await net.add_miner({"null": null_backend}, price=7)
    s = stub(net)
    done = await wait_done(s, (await s.SubmitJob(image_job("a secret prompt", model="null", steps=5, seed=1),
                                                 metadata=MD)).job.job_id)
    m = await market(net).GetMarket(coordinator_pb2.GetMarketRequest())  # no x-api-key
    [model] = m.models
    assert (model.name, model.miners, model.slots, model.min_price_per_unit, model.max_price_per_unit) == ("null", 2, 3, 3, 7)
    assert [o.price_per_unit for o in m.offers] == [3, 7] and m.offers[0].miner_id == cheap.key.address
    assert m.offers[0].max_concurrency == 2 and m.offers[0].free_slots == 2
    [fill] = m.recent_fills
    assert (fill.model, fill.units, fill.unit_type, fill.miner_id) == ("null", done.units, "tile_steps", done.miner_id)
    assert fill.price_per_unit == done.price_per_unit and fill.duration_ms >= 0 and m.queued == 0
    wire = m.SerializeToString()
    for secret in (b"alice", b"a secret prompt", done.job_id.encode(), done.prompt_hash.encode()):
        assert secret not in wire  # nothing names a client, a prompt or a job


async def test_queued_paid_demand_is_counted(network_factory: Any, null_backend: Any) -> None:
    net = await network_factory()
    miner = await net.add_miner({"null": null_backend}, price=3)
    miner.stop()
    await net.until(lambda: not net.core.registry.miners)
    s = stub(net)
    for seed in (1, 2):
        await s.SubmitJob(image_job(model="null", steps=5, seed=seed), metadata=MD)
    m = await market(net).GetMarket(coordinator_pb2.GetMarketRequest())
    [model] = m.models
    assert (m.queued, model.queued, model.queued_paid, model.miners) == (2, 2, 0, 0)


async def test_each_host_gets_a_budget(network_factory: Any) -> None:
    net = await network_factory()
    stubm = market(net)
    codes = []
    for _ in range(40):
        try:
            await stubm.GetMarket(coordinator_pb2.GetMarketRequest())
            codes.append("ok")
        except grpc.aio.AioRpcError as exc:
            codes.append(exc.code().name)
            details = exc.details()
            trailing = dict(exc.trailing_metadata() or ())
    assert codes[:20] == ["ok"] * 20 and "RESOURCE_EXHAUSTED" in codes
    assert "limited to 5 calls/s per host" in details and "grpc-status-details-bin" in trailing  # RetryInfo


async def test_reflection_lists_the_market_service(network_factory: Any) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    net = await network_factory()
    ref = reflection_pb2_grpc.ServerReflectionStub(net.channel())

    async def one():
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    async for resp in ref.ServerReflectionInfo(one()):
        names = {s.name for s in resp.list_services_response.service}
        assert "aitbc.v1.MarketService" in names
        break


async def test_a_miners_record_is_public_connected_or_not(network_factory: Any, null_backend: Any) -> None:
    """GetMarket(miner_id=...) carries the reputation book's counters for that miner (the explorer's
    miner page), also once it left; it names no client, prompt or job; a non-address is refused."""
    from aitbc import crypto

    net = await network_factory()
    miner = await net.add_miner({"null": null_backend}, price=3)
    s = stub(net)
    done = await wait_done(s, (await s.SubmitJob(image_job("a secret prompt", model="null", steps=5, seed=1),
                                                 metadata=MD)).job.job_id)
    m = await market(net).GetMarket(coordinator_pb2.GetMarketRequest(miner_id=miner.key.address))
    assert (m.miner.miner_id, m.miner.jobs_served, m.miner.connected, m.miner.quarantined) == (
        miner.key.address, 1, True, False)
    assert m.miner.reputation > 0.5 and m.offers[0].jobs_served == m.miner.jobs_served
    for secret in (b"alice", b"a secret prompt", done.job_id.encode(), done.prompt_hash.encode()):
        assert secret not in m.SerializeToString()  # nothing names a client, a prompt or a job
    miner.stop()
    await net.until(lambda: not net.core.registry.miners)
    gone = await market(net).GetMarket(coordinator_pb2.GetMarketRequest(miner_id=miner.key.address))
    assert not gone.offers and (gone.miner.jobs_served, gone.miner.connected) == (1, False)
    stranger = crypto.PrivateKey.generate().address
    assert not (await market(net).GetMarket(coordinator_pb2.GetMarketRequest(miner_id=stranger))).HasField("miner")
    assert not (await market(net).GetMarket(coordinator_pb2.GetMarketRequest())).HasField("miner")
    try:
        await market(net).GetMarket(coordinator_pb2.GetMarketRequest(miner_id="not-an-address"))
        raise AssertionError("accepted")
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT and "address" in (exc.details() or ""), exc.details()
