"""gRPC plumbing shared by every server: error mapping at one boundary, server factory with
health and reflection, channel options."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from aitbc import telemetry
from aitbc.errors import AitbcError, ResourceExhausted

log = logging.getLogger("aitbc.rpc")

MAX_MESSAGE_BYTES = 8 * 1024 * 1024
CHUNK_BYTES = 1024 * 1024  # artifacts travel in chunks well under the 4 MiB default limit

SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.so_reuseport", 0),
]

CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


def status_code(exc: AitbcError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, exc.code, grpc.StatusCode.INTERNAL)


async def abort(context: grpc.aio.ServicerContext, exc: AitbcError) -> None:
    if isinstance(exc, ResourceExhausted) and exc.retry_after_s is not None:
        context.set_trailing_metadata((("retry-after-ms", str(int(exc.retry_after_s * 1000))),))
    await context.abort(status_code(exc), exc.message)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn AitbcError raised by a servicer method (unary or streaming) into its gRPC status."""
    if inspect.isasyncgenfunction(fn):

        @functools.wraps(fn)
        async def stream_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                async for item in fn(self, request, context):
                    yield item
            except AitbcError as exc:
                await abort(context, exc)

        return stream_wrapper

    @functools.wraps(fn)
    async def unary_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await fn(self, request, context)
        except AitbcError as exc:
            await abort(context, exc)

    return unary_wrapper


@dataclass
class Service:
    """One servicer to mount: the generated add_*_to_server function and the full service name."""

    add: Callable[[Any, grpc.aio.Server], None]
    servicer: Any
    name: str


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    names: list[str] = field(default_factory=list)

    async def set_serving(self, name: str, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self.health.set(name, status)

    async def stop(self, grace: float | None = 2.0) -> None:
        for name in ["", *self.names]:
            await self.set_serving(name, False)
        await self.server.stop(grace)


async def start_server(
    listen: str, services: Sequence[Service], *, interceptors: Sequence[Any] = ()
) -> RunningServer:
    """Bind a grpc.aio server with health (per service) and reflection; `listen` may use port 0.
    The telemetry interceptor (trace propagation, aitbc_rpc_* metrics) comes first when tracing or
    metrics were configured before this call; with both off the server has no interceptor at all."""
    chain = [*telemetry.server_interceptors(), *interceptors]
    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=chain or None)
    for svc in services:
        svc.add(svc.servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [svc.name for svc in services]
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )
    port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen on {listen}: address in use or invalid")
    await server.start()
    running = RunningServer(server, port, health_servicer, names)
    for name in ["", *names]:
        await running.set_serving(name, True)
    return running


def host_of(listen: str) -> str:
    host = listen.rsplit(":", 1)[0]
    return "127.0.0.1" if host in ("", "0.0.0.0", "[::]") else host


def channel(target: str, *, interceptors: Sequence[Any] = ()) -> grpc.aio.Channel:
    """An aio channel with our options; it sends the trace context when tracing is on."""
    chain = [*telemetry.client_interceptors(), *interceptors]
    return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS, interceptors=chain or None)
