"""Shared fixtures: a real coordinator on 127.0.0.1:0, real miner daemons, aio client stubs."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from aitbc import crypto
from aitbc.config import ClientKey, CoordinatorConfig, MinerConfig
from aitbc.rpc import channel

API_KEY = "test-api-key-alice"
OTHER_KEY = "test-api-key-bob"
OPERATOR_KEY = "test-api-key-carol-operator"


@pytest.fixture(scope="session")
def postgres() -> Iterator[Any]:
    """A real PostgreSQL server for the whole run (aitbc.pgserver: initdb + pg_ctl in a temporary
    folder, 127.0.0.1 on a free port). Missing binaries fail the tests: CI must run them."""
    from aitbc.pgserver import MISSING, LocalPostgres, find_bin_dir

    if find_bin_dir() is None:
        pytest.fail(MISSING, pytrace=False)
    server = LocalPostgres().start()
    yield server
    server.stop()


_databases = itertools.count()


@pytest.fixture
def pg_url(postgres: Any) -> str:
    """The URL of a new, empty database on the session's server (one per test)."""
    return postgres.create_database(f"test_{next(_databases)}")


@pytest.fixture(scope="session")
def tiny_backend() -> Any:
    from aitbc.miner.backend import load_image_backend

    return load_image_backend("tiny-sd", "cpu")


@pytest.fixture(scope="session")
def null_text() -> Any:
    from aitbc.miner.text import load_text_backend

    return load_text_backend("null-text", "cpu")


@pytest.fixture(scope="session")
def null_backend() -> Any:
    from aitbc.miner.backend import load_image_backend

    return load_image_backend("null", "cpu")


@dataclass
class Network:
    """A coordinator plus miners in this event loop; `restart_coordinator` keeps the port and data."""

    tmp: Path
    overrides: dict[str, Any]
    address: str = ""
    proc: Any = None
    miners: list[Any] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    channels: list[grpc.aio.Channel] = field(default_factory=list)
    clock: Any = None  # the coordinator's clock (a FakeClock); None: the system clock

    def config(self, listen: str) -> CoordinatorConfig:
        values = dict(
            listen=listen, data_dir=str(self.tmp / "coordinator"), key_file=str(self.tmp / "coordinator.key"),
            clients=[ClientKey("alice", hashlib.sha256(API_KEY.encode()).hexdigest()),
                     ClientKey("bob", hashlib.sha256(OTHER_KEY.encode()).hexdigest()),
                     ClientKey("carol", hashlib.sha256(OPERATOR_KEY.encode()).hexdigest(), operator=True)],
            heartbeat_interval_s=0.5, heartbeat_timeout_s=3.0,
            verify_rate=0.0,  # tests of verification turn it on
            # every miner established from the start: the trust bootstrap's own tests set trust_checks
            # (tests/security/test_trust_bootstrap.py); the product's default is 5
            trust_checks=0,
        )
        values.update(self.overrides)
        return CoordinatorConfig(**values)

    async def start_coordinator(self) -> None:
        from aitbc.server.coordinator import start_coordinator

        listen = self.address or "127.0.0.1:0"
        self.proc = await start_coordinator(self.config(listen), clock=self.clock)
        self.address = f"127.0.0.1:{self.proc.port}"

    @property
    def core(self) -> Any:
        return self.proc.core

    async def stop_coordinator(self) -> None:
        if self.proc is not None:
            await self.proc.stop()
            self.proc = None

    async def restart_coordinator(self) -> None:
        await self.stop_coordinator()
        await self.start_coordinator()

    async def add_miner(self, backends: dict[str, Any], *, price: int = 0, concurrency: int = 1,
                        key: crypto.PrivateKey | None = None, wait: bool = True) -> Any:
        from aitbc.miner.daemon import MinerDaemon

        conf = MinerConfig(coordinator=self.address, models=list(backends), price_per_unit=price,
                           max_concurrency=concurrency, reconnect_max_s=0.5)
        daemon = MinerDaemon(conf, key or crypto.PrivateKey.generate(), backends)
        self.miners.append(daemon)
        self.tasks.append(asyncio.create_task(daemon.run()))
        if wait:
            await asyncio.wait_for(daemon.registered.wait(), 20)
            await self.until(lambda: daemon.key.address in self.core.miners)
        return daemon

    async def until(self, predicate: Any, timeout: float = 30.0, interval: float = 0.02) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate():
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError("condition not reached in time")
            await asyncio.sleep(interval)

    def channel(self) -> grpc.aio.Channel:
        ch = channel(self.address)
        self.channels.append(ch)
        return ch

    async def close(self) -> None:
        for d in self.miners:
            d.stop()
        for t in self.tasks:
            try:
                await asyncio.wait_for(t, 10)
            except (TimeoutError, asyncio.CancelledError):
                t.cancel()
        for ch in self.channels:
            await ch.close()
        await self.stop_coordinator()


@pytest.fixture
async def network_factory(tmp_path: Path) -> AsyncIterator[Any]:
    nets: list[Network] = []

    async def make(clock: Any = None, **overrides: Any) -> Network:
        net = Network(tmp_path / f"net{len(nets)}", overrides, clock=clock)
        nets.append(net)
        await net.start_coordinator()
        return net

    yield make
    for net in nets:
        await net.close()


@pytest.fixture
async def net(network_factory: Any) -> Network:
    return await network_factory()
