"""The one reverse error map: aitbc.rpc.error_from_rpc is the inverse of rpc.status_code / rpc.abort,
checked over a real grpc.aio server on 127.0.0.1:0 for every AitbcError class, from an aio channel
(what LedgerClient and the CLIs use) and a blocking one (what the SDK uses)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from aitbc import errors, rpc
from aitbc.clients.sdk import ClientError, client_error

SERVICE = "aitbc.test.ErrorsService"
RAISE = f"/{SERVICE}/Raise"  # request: a class name from aitbc.errors; answer: that error, via rpc.abort
SLOW = f"/{SERVICE}/Slow"  # sleeps past any test deadline
RETRY_AFTER_S = 1.5


def all_error_classes() -> list[type[errors.AitbcError]]:
    out, todo = [], [errors.AitbcError]
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo += cls.__subclasses__()
    return sorted({c for c in out if c.__module__ == errors.__name__}, key=lambda c: c.__name__)


CLASSES = all_error_classes()


def make(cls: type[errors.AitbcError]) -> errors.AitbcError:
    message = f"{cls.__name__} said so: naïve ünïcode kept"
    if issubclass(cls, errors.ResourceExhausted):
        return cls(message, retry_after_s=RETRY_AFTER_S)
    return cls(message)


class Servicer:
    @rpc.handle_errors
    async def raise_named(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise make(getattr(errors, request.decode()))

    async def slow(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await asyncio.sleep(30)
        return b""


def _add(servicer: Servicer, server: grpc.aio.Server) -> None:
    handlers = {"Raise": grpc.unary_unary_rpc_method_handler(servicer.raise_named),
                "Slow": grpc.unary_unary_rpc_method_handler(servicer.slow)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


@pytest.fixture
async def target() -> AsyncIterator[str]:
    running = await rpc.start_server("127.0.0.1:0", [rpc.Service(_add, Servicer(), SERVICE)])
    try:
        yield f"127.0.0.1:{running.port}"
    finally:
        await running.stop(0)


async def aio_error(target: str, method: str, request: bytes, timeout: float = 10.0) -> grpc.aio.AioRpcError:
    async with grpc.aio.insecure_channel(target) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await ch.unary_unary(method)(request, timeout=timeout)
    return info.value


def sync_error(target: str, method: str, request: bytes) -> grpc.RpcError:
    with grpc.insecure_channel(target) as ch:
        with pytest.raises(grpc.RpcError) as info:
            ch.unary_unary(method)(request, timeout=10)
    return info.value


def test_the_map_covers_every_status_and_every_class() -> None:
    # a typo in a class's code would silently travel as INTERNAL
    names = {c.name for c in grpc.StatusCode}
    assert all(cls.code in names for cls in CLASSES), [(c, c.code) for c in CLASSES if c.code not in names]
    assert set(rpc.STATUS_ERRORS) == names - {"OK"}
    for code, cls in rpc.STATUS_ERRORS.items():
        assert cls.code == code and cls is not errors.AitbcError
    # every class is reachable: it comes back as itself or as the status class it specialises
    for cls in CLASSES:
        assert issubclass(cls, rpc.STATUS_ERRORS[cls.code]) or cls is errors.AitbcError, cls


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
async def test_round_trip_over_a_real_server(target: str, cls: type[errors.AitbcError]) -> None:
    sent = make(cls)
    exc = await aio_error(target, RAISE, cls.__name__.encode())
    assert exc.code() == rpc.status_code(sent)
    back = rpc.error_from_rpc(exc)
    assert type(back) is rpc.STATUS_ERRORS[sent.code] and back.code == sent.code
    if cls in rpc.STATUS_ERRORS.values():
        assert type(back) is cls
    elif cls is not errors.AitbcError:  # CryptoError, ReceiptError: the wire knows only their status
        assert isinstance(sent, type(back))
    assert back.message == sent.message
    assert getattr(back, "retry_after_s", None) == getattr(sent, "retry_after_s", None)


@pytest.mark.parametrize("cls", list(rpc.STATUS_ERRORS.values()), ids=lambda c: c.__name__)
async def test_the_sdk_raises_the_status_class_as_a_client_error(target: str, cls: type[errors.AitbcError]) -> None:
    sent = make(cls)
    exc = await asyncio.to_thread(sync_error, target, RAISE, cls.__name__.encode())
    err = client_error(rpc.error_from_rpc(exc))  # what every failed SDK call raises
    assert isinstance(err, ClientError) and isinstance(err, cls) and isinstance(err, errors.AitbcError)
    assert err.code == sent.code and err.message == sent.message
    assert str(err) == f"{sent.code}: {sent.message}"  # what `aitbc` prints, as before
    assert getattr(err, "retry_after_s", None) == getattr(sent, "retry_after_s", None)


async def test_statuses_grpc_makes_itself(target: str) -> None:
    deadline = rpc.error_from_rpc(await aio_error(target, SLOW, b"", timeout=0.2))
    # DeadlineExceeded is an Unavailable: settlement and the wallet retry it as before
    assert type(deadline) is errors.DeadlineExceeded and isinstance(deadline, errors.Unavailable)
    missing = rpc.error_from_rpc(await aio_error(target, f"/{SERVICE}/NoSuchMethod", b""))
    assert type(missing) is errors.Unimplemented



async def test_a_server_that_is_gone_is_unavailable() -> None:
    running = await rpc.start_server("127.0.0.1:0", [rpc.Service(_add, Servicer(), SERVICE)])
    await running.stop(0)
    down = rpc.error_from_rpc(await aio_error(f"127.0.0.1:{running.port}", RAISE, b"NotFound", timeout=5))
    assert isinstance(down, errors.Unavailable)  # UNAVAILABLE, or DEADLINE_EXCEEDED while connecting


class FakeError(grpc.RpcError):
    def __init__(self, code: Any, details: str | None, trailers: Any = ()) -> None:
        self._code, self._details, self._trailers = code, details, trailers

    def code(self) -> Any:
        return self._code

    def details(self) -> str | None:
        return self._details

    def trailing_metadata(self) -> Any:
        return self._trailers


def test_odd_answers() -> None:
    assert rpc.error_from_rpc(FakeError(grpc.StatusCode.NOT_FOUND, "")).message == "NOT_FOUND"
    assert type(rpc.error_from_rpc(FakeError(None, None))) is errors.Unknown
    assert type(rpc.error_from_rpc(grpc.RpcError())) is errors.Unknown  # no code() at all
    for trailers in ((), (("retry-after-ms", "soon"),), (("retry-after-ms", "-5"),), None):
        err = rpc.error_from_rpc(FakeError(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down", trailers))
        assert isinstance(err, errors.ResourceExhausted) and err.retry_after_s is None
    assert type(rpc.error_from_code("NOT_A_STATUS", "x")) is errors.Unknown


def test_the_sdk_client_raises_both() -> None:
    import socket

    from aitbc.clients.retry import NO_RETRY
    from aitbc.clients.sdk import CoordinatorClient

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with CoordinatorClient(f"127.0.0.1:{port}", "key", timeout=5, retry=NO_RETRY) as client:
        with pytest.raises(ClientError) as info:
            client.get_job("0" * 28)
    assert isinstance(info.value, errors.Unavailable)  # UNAVAILABLE, or DEADLINE_EXCEEDED while connecting
    assert str(info.value).startswith(f"{info.value.code}: ")
