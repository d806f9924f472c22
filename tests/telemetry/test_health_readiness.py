"""grpc.health.v1 reflects readiness: a follower is NOT_SERVING until it has caught up with its peer,
and a coordinator's settlement path is NOT_SERVING while its ledger node is unreachable."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aitbc import crypto
from aitbc.clients.devnet import free_port
from aitbc.ledger.store import LmdbStore
from aitbc.server.coordinator import SETTLEMENT_HEALTH
from aitbc.server.ledger import SERVICE_NAME as LEDGER_SERVICE
from aitbc.server.ledger import start_node
from tests.coordinator.test_settlement import LedgerNode

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def health(address: str, service: str) -> int:
    async with grpc.aio.insecure_channel(address) as ch:
        resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return int(resp.status)


async def until(check: Callable[[], Any], timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.1)


async def test_follower_is_not_serving_until_caught_up_with_its_peer(tmp_path) -> None:  # type: ignore[no-untyped-def]
    authority = LedgerNode(tmp_path / "a", crypto.PrivateKey.generate().address)
    (tmp_path / "a").mkdir()
    await authority.start()
    await until(lambda: asyncio.sleep(0, authority.node.chain.head.height >= 5))
    await authority.stop()  # the peer is away while the follower starts: it cannot catch up yet
    height = authority.node.chain.head.height

    store = LmdbStore(tmp_path / "b" / "ledger")
    node, server = await start_node(store, authority.genesis, None, "127.0.0.1:0", peers=[authority.address])
    follower = f"127.0.0.1:{server.port}"
    try:
        assert await health(follower, LEDGER_SERVICE) == NOT_SERVING
        assert await health(follower, "") == SERVING  # the process is up; the chain is not current
        await asyncio.sleep(1.0)
        assert await health(follower, LEDGER_SERVICE) == NOT_SERVING and node.chain.head.height == 0

        await authority.start()  # same port: the follower's sync loop reaches it and catches up
        await until(lambda: _is(follower, SERVING))
        assert node.chain.head.height >= height
        assert node.caught_up and node.sync_lag() <= 2
    finally:
        await node.stop()
        await server.stop(0.5)
        store.close()
        await authority.stop()


async def _is(address: str, status: int, service: str = LEDGER_SERVICE) -> bool:
    return await health(address, service) == status


async def test_settlement_health_follows_the_ledger(network_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    coord_key = crypto.load_or_create_key(tmp_path / "net0" / "coordinator.key")
    ledger = LedgerNode(tmp_path, coord_key.address)
    ledger.address = f"127.0.0.1:{free_port()}"  # nothing listens there yet
    net = await network_factory(ledger=ledger.address)
    try:
        await asyncio.sleep(0.3)
        assert await health(net.address, SETTLEMENT_HEALTH) == NOT_SERVING
        assert await health(net.address, "") == SERVING  # jobs still run; receipts wait for the ledger
        assert await health(net.address, "aitbc.v1.CoordinatorService") == SERVING

        await ledger.start()
        await until(lambda: _is(net.address, SERVING, SETTLEMENT_HEALTH))
        assert net.proc.settlement.ledger_reachable

        await ledger.stop()  # idle: no receipt to settle, the periodic probe notices
        await until(lambda: _is(net.address, NOT_SERVING, SETTLEMENT_HEALTH))

        await ledger.start()
        await until(lambda: _is(net.address, SERVING, SETTLEMENT_HEALTH), timeout=40)
    finally:
        await ledger.stop()


async def test_settlement_health_is_not_registered_without_a_ledger(net) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await health(net.address, SETTLEMENT_HEALTH)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
