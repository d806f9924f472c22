"""Traces across a real grpc.aio server and client (aitbc.rpc), into worker threads, and across a
stream message by traceparent; tracing off adds nothing."""

from __future__ import annotations

import asyncio
import contextvars
import re
import threading

import grpc
import pytest
from opentelemetry.trace import SpanKind, StatusCode

from aitbc import rpc, telemetry
from tests.telemetry.echo import SERVICE, settle, start_echo

TRACEPARENT_RE = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


async def test_server_span_is_child_of_client_span_via_metadata() -> None:
    telemetry.configure("test-node", exporter="memory")
    exporter = telemetry.memory_exporter()
    running, echo = await start_echo()
    try:
        async with rpc.channel(f"127.0.0.1:{running.port}") as ch:
            with telemetry.span("client.submit", job_id="j-1"):
                reply = await ch.unary_unary(f"/{SERVICE}/Work")(b"j-1")
            assert reply == b"done:j-1"
        await settle()
    finally:
        await running.stop(None)

    spans = exporter.get_finished_spans()
    root = next(s for s in spans if s.name == "client.submit")
    client = next(s for s in spans if s.name == f"/{SERVICE}/Work" and s.kind == SpanKind.CLIENT)
    server = next(s for s in spans if s.name == f"/{SERVICE}/Work" and s.kind == SpanKind.SERVER)
    work = next(s for s in spans if s.name == "handler.work")
    infer = next(s for s in spans if s.name == "thread.infer")

    trace_id = root.context.trace_id
    assert {s.context.trace_id for s in (root, client, server, work, infer)} == {trace_id}
    assert client.parent.span_id == root.context.span_id
    assert server.parent.span_id == client.context.span_id
    assert server.parent.is_remote  # it came through metadata, not a shared contextvar
    assert work.parent.span_id == server.context.span_id
    assert infer.parent.span_id == work.context.span_id
    assert echo.thread_names and echo.thread_names[0] != threading.current_thread().name

    assert server.attributes["rpc.system"] == "grpc"
    assert server.attributes["rpc.service"] == SERVICE
    assert server.attributes["rpc.method"] == "Work"
    assert server.attributes["rpc.grpc.status_code"] == 0
    assert client.attributes["rpc.grpc.status_code"] == 0
    assert work.attributes["job_id"] == "j-1" and work.attributes["model"] == "tiny-sd"
    assert infer.attributes["step"] == 1


async def test_error_and_stream_spans() -> None:
    telemetry.configure("test-node", exporter="memory")
    exporter = telemetry.memory_exporter()
    running, _ = await start_echo()
    try:
        async with rpc.channel(f"127.0.0.1:{running.port}") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await ch.unary_unary(f"/{SERVICE}/Fail")(b"")
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await ch.unary_unary(f"/{SERVICE}/Rich")(b"")
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            items = [x async for x in ch.unary_stream(f"/{SERVICE}/Count")(b"4")]
            assert items == [b"0", b"1", b"2", b"3"]
        await settle()
    finally:
        await running.stop(None)

    spans = exporter.get_finished_spans()
    fail_srv = next(s for s in spans if s.name == f"/{SERVICE}/Fail" and s.kind == SpanKind.SERVER)
    fail_cli = next(s for s in spans if s.name == f"/{SERVICE}/Fail" and s.kind == SpanKind.CLIENT)
    assert fail_srv.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    # OpenTelemetry's semantic conventions (opentelemetry-instrumentation-grpc): a caller's mistake
    # is an error of the CLIENT span; the SERVER span marks ERROR only for server faults
    assert fail_srv.status.status_code == StatusCode.UNSET
    assert fail_cli.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert fail_cli.status.status_code == StatusCode.ERROR
    assert "job x not found" in (fail_cli.status.description or "")
    assert fail_srv.parent.span_id == fail_cli.context.span_id

    # aitbc.rpc.abort with google.rpc details (trailing grpc-status-details-bin, then a plain abort)
    # is recorded too (the instrumentation does not see context.abort_with_status: nothing uses it)
    rich_srv = next(s for s in spans if s.name == f"/{SERVICE}/Rich" and s.kind == SpanKind.SERVER)
    rich_cli = next(s for s in spans if s.name == f"/{SERVICE}/Rich" and s.kind == SpanKind.CLIENT)
    assert rich_srv.attributes["rpc.grpc.status_code"] == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert rich_cli.attributes["rpc.grpc.status_code"] == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert "slow down" in (rich_cli.status.description or "")

    count_srv = next(s for s in spans if s.name == f"/{SERVICE}/Count" and s.kind == SpanKind.SERVER)
    count_cli = next(s for s in spans if s.name == f"/{SERVICE}/Count" and s.kind == SpanKind.CLIENT)
    assert count_srv.parent.span_id == count_cli.context.span_id
    assert count_srv.attributes["rpc.grpc.status_code"] == 0


async def test_traceparent_carries_a_trace_across_a_stream_message() -> None:
    telemetry.configure("coordinator", exporter="memory")
    exporter = telemetry.memory_exporter()
    with telemetry.span("coordinator.dispatch", job_id="j-9") as dispatch:
        tp = telemetry.current_traceparent()
    assert TRACEPARENT_RE.match(tp), tp
    assert tp.split("-")[1] == f"{dispatch.get_span_context().trace_id:032x}"

    results: dict[str, object] = {}

    async def miner_side() -> None:  # a separate task: nothing shared but the string
        assert telemetry.current_traceparent() == ""
        with telemetry.attach_traceparent(tp):
            with telemetry.span("miner.job", job_id="j-9"):
                results["inner_tp"] = telemetry.current_traceparent()
        with telemetry.span("miner.other", parent=tp):
            pass
        with telemetry.span("miner.unrelated"):
            pass

    await asyncio.get_running_loop().create_task(miner_side(), context=contextvars.Context())
    spans = {s.name: s for s in exporter.get_finished_spans()}
    for name in ("miner.job", "miner.other"):
        assert spans[name].context.trace_id == dispatch.get_span_context().trace_id
        assert spans[name].parent.span_id == dispatch.get_span_context().span_id
    assert spans["miner.unrelated"].parent is None
    assert spans["miner.unrelated"].context.trace_id != dispatch.get_span_context().trace_id
    assert spans["miner.job"].attributes["job_id"] == "j-9"
    assert results["inner_tp"] != tp and TRACEPARENT_RE.match(str(results["inner_tp"]))

    # malformed or empty: a new root, no exception
    for bad in ("", "garbage", "00-" + "0" * 32 + "-" + "0" * 16 + "-01"):
        with telemetry.attach_traceparent(bad), telemetry.span("after.bad") as sp:
            assert sp.parent is None


def test_links_tie_a_block_to_the_traces_of_its_transactions() -> None:
    telemetry.configure("node", exporter="memory")
    exporter = telemetry.memory_exporter()
    tps = []
    for i in range(3):
        with telemetry.span("coordinator.settle", job_id=f"j-{i}"):
            tps.append(telemetry.current_traceparent())
    with telemetry.span("ledger.block", links=[*tps, "", "garbage"], height=7):
        pass
    block = next(s for s in exporter.get_finished_spans() if s.name == "ledger.block")
    settles = [s for s in exporter.get_finished_spans() if s.name == "coordinator.settle"]
    assert block.parent is None and block.attributes["height"] == 7
    assert [(ln.context.trace_id, ln.context.span_id) for ln in block.links] == [
        (s.context.trace_id, s.context.span_id) for s in settles]


def test_wrap_context_into_plain_thread() -> None:
    telemetry.configure("miner", exporter="memory")
    exporter = telemetry.memory_exporter()

    def step(i: int) -> None:
        with telemetry.span("denoise.step", step=i):
            pass

    with telemetry.span("miner.job") as job:
        threads = [threading.Thread(target=telemetry.wrap_context(step), args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        bare = threading.Thread(target=step, args=(99,))  # no wrap: the thread starts a new trace
        bare.start()
        bare.join()
    steps = [s for s in exporter.get_finished_spans() if s.name == "denoise.step"]
    assert len(steps) == 4
    wrapped = [s for s in steps if s.attributes["step"] != 99]
    assert all(s.parent.span_id == job.get_span_context().span_id for s in wrapped)
    assert next(s for s in steps if s.attributes["step"] == 99).parent is None


async def test_sync_channel_to_aio_server() -> None:
    telemetry.configure("cli", exporter="memory")
    exporter = telemetry.memory_exporter()
    running, _ = await start_echo()

    def blocking_call() -> bytes:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as raw:
            ch = telemetry.intercept_channel(raw)
            with telemetry.span("cli.submit"):
                return ch.unary_unary(f"/{SERVICE}/Say")(b"hi", timeout=5)

    try:
        assert await asyncio.to_thread(blocking_call) == b"hi"
        await settle()
    finally:
        await running.stop(None)
    spans = exporter.get_finished_spans()
    root = next(s for s in spans if s.name == "cli.submit")
    client = next(s for s in spans if s.name == f"/{SERVICE}/Say" and s.kind == SpanKind.CLIENT)
    server = next(s for s in spans if s.name == f"/{SERVICE}/Say" and s.kind == SpanKind.SERVER)
    assert client.parent.span_id == root.context.span_id
    assert server.parent.span_id == client.context.span_id


async def test_tracing_off_adds_no_spans_and_no_interceptors() -> None:
    telemetry.configure("x", exporter="memory")
    exporter = telemetry.memory_exporter()
    telemetry.configure("x", exporter="none")
    assert not telemetry.enabled()
    assert telemetry.server_interceptors() == []
    assert telemetry.client_interceptors() == []
    assert telemetry.span("anything", job_id="j") is telemetry.NOOP_SPAN
    assert telemetry.current_traceparent() == ""
    fn = len
    assert telemetry.wrap_context(fn) is fn
    running, _ = await start_echo()
    try:
        async with rpc.channel(f"127.0.0.1:{running.port}") as ch:
            with telemetry.span("client.op") as sp:
                sp.set_attribute("k", "v")
                assert await ch.unary_unary(f"/{SERVICE}/Say")(b"x") == b"x"
        await settle()
    finally:
        await running.stop(None)
    assert exporter.get_finished_spans() == ()
    with pytest.raises(RuntimeError):
        telemetry.memory_exporter()


def test_env_selects_exporter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AITBC_TRACING", "console")
    telemetry.configure("x")
    assert telemetry.enabled()
    monkeypatch.setenv("AITBC_TRACING", "none")
    telemetry.configure("x")
    assert not telemetry.enabled()
    monkeypatch.delenv("AITBC_TRACING")
    telemetry.configure("x")
    assert not telemetry.enabled()
    with pytest.raises(ValueError, match="tracing exporter"):
        telemetry.configure("x", exporter="jaeger")
    # otlp builds its exporter without connecting (the batch processor exports later)
    telemetry.configure("x", exporter="otlp", endpoint="http://127.0.0.1:9")
    assert telemetry.enabled()
