"""A tiny echo service (raw bytes, no proto) mounted through aitbc.rpc.start_server on 127.0.0.1:0."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

import grpc

from aitbc import rpc, telemetry
from aitbc.errors import ResourceExhausted

SERVICE = "aitbc.test.EchoService"


class Echo:
    """Raw-bytes handlers: Say (unary), Fail (aborts NOT_FOUND), Rich (rpc.abort with google.rpc details), Count (server stream), Work (a
    nested span and a span in a worker thread)."""

    def __init__(self) -> None:
        self.thread_names: list[str] = []

    async def say(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    async def fail(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(grpc.StatusCode.NOT_FOUND, "job x not found")
        return b""

    async def rich(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await rpc.abort(context, ResourceExhausted("slow down", 0.25))  # RetryInfo in the details
        return b""

    async def count(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        for i in range(int(request or b"3")):
            yield str(i).encode()

    async def work(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        with telemetry.span("handler.work", job_id=request.decode(), model="tiny-sd"):
            def in_thread() -> bytes:
                self.thread_names.append(threading.current_thread().name)
                with telemetry.span("thread.infer", step=1):
                    return b"done:" + request

            return await telemetry.run_in_thread(in_thread)

    def add(self, servicer: Any, server: grpc.aio.Server) -> None:
        handlers = {
            "Say": grpc.unary_unary_rpc_method_handler(self.say),
            "Fail": grpc.unary_unary_rpc_method_handler(self.fail),
            "Rich": grpc.unary_unary_rpc_method_handler(self.rich),
            "Count": grpc.unary_stream_rpc_method_handler(self.count),
            "Work": grpc.unary_unary_rpc_method_handler(self.work),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


async def start_echo() -> tuple[rpc.RunningServer, Echo]:
    echo = Echo()
    running = await rpc.start_server("127.0.0.1:0", [rpc.Service(echo.add, echo, SERVICE)])
    return running, echo


async def settle() -> None:
    """Let the client interceptor's done-callbacks end their spans."""
    for _ in range(5):
        await asyncio.sleep(0.01)
