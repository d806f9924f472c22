"""Tracing, structured logs and the switches of aitbc.metrics, shared by every process.

Tracing (OpenTelemetry SDK) is off unless configured: `configure(service, exporter=...)` or the
environment (AITBC_TRACING=none|console|otlp, OTEL_EXPORTER_OTLP_ENDPOINT). Off means `span()` hands
back one shared no-op object and aitbc.rpc installs no interceptor, so the hot paths are what they
were. On, gRPC calls carry W3C `traceparent` metadata through opentelemetry-instrumentation-grpc's
interceptors (wired by aitbc.rpc.start_server and aitbc.rpc.channel), and long-lived streams that carry many jobs carry a
`traceparent` string per message instead: `current_traceparent()` on one side,
`attach_traceparent(tp)` or `span(name, parent=tp)` on the other.

    from aitbc import telemetry
    with telemetry.span("coordinator.dispatch", job_id=job.id, model=job.model):
        ...
    await telemetry.run_in_thread(pipeline, prompt)     # spans inside keep their parent
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import IO, Any, TypeVar

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from aitbc import metrics
from aitbc.metrics import start_metrics_server, stop_metrics_server  # noqa: F401 - re-exported

log = logging.getLogger("aitbc.telemetry")

T = TypeVar("T")
EXPORTERS = ("none", "console", "otlp", "memory")
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"

_propagator = TraceContextTextMapPropagator()
_enabled = False
_provider: Any = None  # opentelemetry.sdk.trace.TracerProvider while tracing is on
_tracer: trace.Tracer | None = None
_memory: Any = None  # InMemorySpanExporter when exporter == "memory"
_service_name = "aitbc"


# ---------------------------------------------------------------------------------------------------
# Configuration


def configure(service_name: str, *, exporter: Any = None, endpoint: str | None = None) -> None:
    """Turn tracing on or off for this process. `exporter` defaults to $AITBC_TRACING or "none";
    "otlp" sends to `endpoint` (default $OTEL_EXPORTER_OTLP_ENDPOINT, else the OTLP default
    localhost:4317) over gRPC; "memory" keeps spans for tests (`memory_exporter()`); an
    opentelemetry SpanExporter instance gets a batch processor (for benchmarks and custom sinks).
    Sampling follows OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG (default: every trace).

    Configure before starting servers and opening channels: the interceptors are chosen then.
    Calling again replaces the previous set-up (finished spans of the old one are flushed)."""
    global _enabled, _provider, _tracer, _memory, _service_name
    custom = None
    if exporter is not None and not isinstance(exporter, str):
        custom, exporter = exporter, "custom"
    else:
        exporter = (exporter or os.environ.get("AITBC_TRACING") or "none").strip().lower()
    if custom is None and exporter not in EXPORTERS:
        raise ValueError(f"tracing exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    shutdown()
    _service_name = service_name
    if exporter == "none":
        return

    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if custom is not None:
        provider.add_span_processor(BatchSpanProcessor(custom))
    elif exporter == "memory":
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        _memory = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(_memory))
    elif exporter == "console":  # one line per span, a tree per trace (aitbc.trace_console)
        from aitbc.trace_console import CompactConsoleExporter

        provider.add_span_processor(BatchSpanProcessor(CompactConsoleExporter(sys.stderr)))
    else:
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError as exc:  # pragma: no cover - a dependency of aitbc
            raise RuntimeError("AITBC_TRACING=otlp needs opentelemetry-exporter-otlp-proto-grpc") from exc
        endpoint = endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    _provider = provider
    _tracer = provider.get_tracer("aitbc")
    _enabled = True
    # Libraries that ask the global API get the same provider (the global can be set only once).
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        trace.set_tracer_provider(provider)
    log.info("tracing on: service %s, exporter %s%s", service_name, exporter,
             f" -> {endpoint}" if exporter == "otlp" and endpoint else "")


def shutdown() -> None:
    """Flush and stop the current tracer provider; tracing is off afterwards."""
    global _enabled, _provider, _tracer, _memory
    provider, _provider, _tracer, _enabled, _memory = _provider, None, None, False, None
    if provider is not None:
        try:
            provider.shutdown()
        except Exception:  # pragma: no cover - an exporter failing at exit
            log.exception("tracer provider shutdown failed")


def enabled() -> bool:
    return _enabled


def memory_exporter() -> Any:
    """The InMemorySpanExporter of `configure(..., exporter="memory")` (get_finished_spans(), clear())."""
    if _memory is None:
        raise RuntimeError('tracing is not configured with exporter="memory"')
    return _memory


def force_flush(timeout_ms: int = 5000) -> None:
    if _provider is not None:
        _provider.force_flush(timeout_ms)


def setup(service_name: str, *, tracing: str | None = None, endpoint: str | None = None,
          metrics_listen: str | None = None, log_json: bool | None = None,
          log_level: int = logging.INFO) -> int | None:
    """Everything a process does at start, each switch defaulting to the environment:
    tracing ($AITBC_TRACING, $OTEL_EXPORTER_OTLP_ENDPOINT), metrics endpoint ($AITBC_METRICS_LISTEN;
    unset or "" or "off": none) and JSON logs ($AITBC_LOG_FORMAT=json). Returns the metrics port."""
    if log_json is None:
        log_json = os.environ.get("AITBC_LOG_FORMAT", "").strip().lower() == "json"
    if log_json:
        configure_logging(json=True, level=log_level)
    configure(service_name, exporter=tracing, endpoint=endpoint)
    listen = metrics_listen if metrics_listen is not None else os.environ.get("AITBC_METRICS_LISTEN", "")
    if listen.strip().lower() in ("", "off", "none"):
        return None
    return start_metrics_server(listen.strip())


def reset_for_tests() -> None:
    """Tracing off, RPC metrics off, metrics endpoint stopped (values kept)."""
    shutdown()
    stop_metrics_server()
    metrics.rpc_metrics_enabled = False


# ---------------------------------------------------------------------------------------------------
# Spans


class _NoopSpan:
    """Stands in for a span while tracing is off: every method does nothing."""

    __slots__ = ()

    def __enter__(self) -> _NoopSpan:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def set_attribute(self, key: str, value: Any) -> None:
        pass

    def set_attributes(self, attributes: dict[str, Any]) -> None:
        pass

    def add_event(self, name: str, attributes: dict[str, Any] | None = None) -> None:
        pass

    def record_exception(self, exc: BaseException, *args: Any, **kwargs: Any) -> None:
        pass

    def set_status(self, *args: Any, **kwargs: Any) -> None:
        pass

    def is_recording(self) -> bool:
        return False


NOOP_SPAN = _NoopSpan()


def _clean(attributes: dict[str, Any]) -> dict[str, Any]:
    """OTel attributes are str/bool/int/float (or sequences of them): drop None, str() the rest."""
    out: dict[str, Any] = {}
    for k, v in attributes.items():
        if v is None:
            continue
        if isinstance(v, (str, bool, int, float)):
            out[k] = v
        elif isinstance(v, (bytes, bytearray)):
            out[k] = bytes(v).hex()
        elif isinstance(v, (list, tuple)) and all(isinstance(x, (str, bool, int, float)) for x in v):
            out[k] = list(v)
        else:
            out[k] = str(v)
    return out


def span(name: str, *, parent: str | None = None, links: Iterable[str] = (),
         kind: SpanKind = SpanKind.INTERNAL, **attributes: Any) -> Any:
    """A context manager (sync and async code alike) that opens a child span of the current one, or
    of the `traceparent` string `parent` when given. `links` (traceparent strings) tie the span to
    other traces without parenting it, e.g. a block commit to the traces of the transactions it
    includes. Yields the span (`.set_attribute`, `.add_event`); an exception leaving the block is
    recorded and marks the span ERROR. Off: a shared no-op."""
    if not _enabled:
        return NOOP_SPAN
    assert _tracer is not None
    ctx = context_from_traceparent(parent) if parent else None
    span_links = _links(links) if links else None
    return _tracer.start_as_current_span(name, context=ctx, kind=kind, attributes=_clean(attributes),
                                         links=span_links)


def record_span(name: str, start_ns: int, end_ns: int, **attributes: Any) -> None:
    """A finished child span of the current one with given times (time.time_ns()): for a phase
    inside a library call that only reports where it is through callbacks. Off: nothing."""
    if not _enabled or end_ns < start_ns:
        return
    assert _tracer is not None
    sp = _tracer.start_span(name, start_time=start_ns, attributes=_clean(attributes))
    sp.end(end_time=end_ns)


def _links(traceparents: Iterable[str]) -> list[trace.Link]:
    out = []
    for tp in traceparents:
        if tp:
            sc = trace.get_current_span(context_from_traceparent(tp)).get_span_context()
            if sc.is_valid:
                out.append(trace.Link(sc))
    return out


def traced(name: str | None = None, **attributes: Any) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorator: run the (sync or async) function inside `span(name or qualname, **attributes)`."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        span_name = name or fn.__qualname__
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def awrapper(*args: Any, **kwargs: Any) -> Any:
                with span(span_name, **attributes):
                    return await fn(*args, **kwargs)

            return awrapper

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with span(span_name, **attributes):
                return fn(*args, **kwargs)

        return wrapper

    return deco


def set_attributes(**attributes: Any) -> None:
    """Tag the current span (e.g. the server span of SubmitJob with the job id it created)."""
    if _enabled:
        trace.get_current_span().set_attributes(_clean(attributes))


def add_event(name: str, **attributes: Any) -> None:
    if _enabled:
        trace.get_current_span().add_event(name, _clean(attributes))


def current_trace_ids() -> tuple[str, str] | None:
    """(trace_id, span_id) in hex of the current span, for log lines; None when there is none."""
    if not _enabled:
        return None
    sc = trace.get_current_span().get_span_context()
    if not sc.is_valid:
        return None
    return f"{sc.trace_id:032x}", f"{sc.span_id:016x}"


# ---------------------------------------------------------------------------------------------------
# Context across messages and threads


def current_traceparent() -> str:
    """The W3C traceparent of the current span ("" when tracing is off or no span is current), to put
    in a message field where per-call metadata does not fit (e.g. Assignment on the Work stream)."""
    if not _enabled:
        return ""
    sc = trace.get_current_span().get_span_context()
    if not sc.is_valid:
        return ""
    return f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags):02x}"


def context_from_traceparent(traceparent: str, tracestate: str = "") -> Any:
    """An OTel Context whose parent is the remote span of `traceparent` (an empty Context when the
    string is empty or malformed: spans opened in it start a new trace)."""
    carrier = {TRACEPARENT: traceparent}
    if tracestate:
        carrier[TRACESTATE] = tracestate
    return _propagator.extract(carrier, context=otel_context.Context())


@contextlib.contextmanager
def attach_traceparent(traceparent: str | None) -> Iterator[None]:
    """Within the block, spans are children of the remote span `traceparent` (no-op when tracing is
    off or the string is empty)."""
    if not _enabled or not traceparent:
        yield
        return
    token = otel_context.attach(context_from_traceparent(traceparent))
    try:
        yield
    finally:
        otel_context.detach(token)


def wrap_context(fn: Callable[..., T]) -> Callable[..., T]:
    """`fn` bound to the caller's trace context, for a worker thread or executor that does not copy
    contextvars (loop.run_in_executor, threading.Thread, a diffusers callback thread)."""
    if not _enabled:
        return fn
    ctx = otel_context.get_current()

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> T:
        token = otel_context.attach(ctx)
        try:
            return fn(*args, **kwargs)
        finally:
            otel_context.detach(token)

    return run


async def run_in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """asyncio.to_thread with the current trace context carried into the worker thread."""
    return await asyncio.to_thread(wrap_context(fn), *args, **kwargs)


# ---------------------------------------------------------------------------------------------------
# gRPC interceptors
#
# Tracing: opentelemetry-instrumentation-grpc's aio server interceptor and aio/sync client
# interceptors (a CLIENT span on the caller, a SERVER span on the callee named after the full
# method, "/aitbc.v1.CoordinatorService/SubmitJob", with rpc.* attributes; W3C traceparent in the
# call's metadata through the global propagator). Installed only while tracing is on, with this
# module's tracer provider, so tracing off adds no interceptor at all.
#
# Metrics: aitbc_rpc_requests_total / aitbc_rpc_latency_seconds are this product's own names, and
# the instrumentation records no Prometheus metrics, so one small interceptor of ours records them.


def _split_method(full: str) -> tuple[str, str]:
    service, _, method = full.lstrip("/").partition("/")
    return service, method


class _RpcMetrics(grpc.aio.ServerInterceptor):
    """aitbc_rpc_requests_total{service, method, code} for every call and aitbc_rpc_latency_seconds
    for calls with one response. Wrapped handlers and bound metric children are cached per method,
    so the per-call cost is the wrapper, a lock-free dict read and the two records."""

    def __init__(self) -> None:
        self._handlers: dict[str, tuple[Any, Any]] = {}
        self._requests: dict[tuple[str, str], Any] = {}
        self._latency: dict[str, Any] = {}

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        cached = self._handlers.get(details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(details.method, handler)
        self._handlers[details.method] = (handler, wrapped)
        return wrapped

    def _wrap(self, full: str, handler: Any) -> Any:
        for attr, factory, unary_response in (
            ("unary_unary", grpc.unary_unary_rpc_method_handler, True),
            ("unary_stream", grpc.unary_stream_rpc_method_handler, False),
            ("stream_unary", grpc.stream_unary_rpc_method_handler, True),
            ("stream_stream", grpc.stream_stream_rpc_method_handler, False),
        ):
            behavior = getattr(handler, attr)
            if behavior is None:
                continue
            if inspect.isasyncgenfunction(behavior):
                new = self._wrap_asyncgen(full, behavior)
            elif inspect.iscoroutinefunction(behavior):
                new = self._wrap_coroutine(full, behavior, unary_response)
            else:
                return handler  # a sync handler on a thread pool: leave it alone
            return factory(new, request_deserializer=handler.request_deserializer,
                           response_serializer=handler.response_serializer)
        return handler

    def _record(self, full: str, context: Any, exc: BaseException | None, start: float | None) -> None:
        code = context.code()
        if code is None:
            if exc is None:
                code = grpc.StatusCode.OK
            elif isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
                code = grpc.StatusCode.CANCELLED
            else:
                code = grpc.StatusCode.UNKNOWN
        name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
        child = self._requests.get((full, name))
        if child is None:
            child = self._requests[(full, name)] = metrics.RPC_REQUESTS.labels(*_split_method(full), name)
        child.inc()
        if start is not None:
            hist = self._latency.get(full)
            if hist is None:
                hist = self._latency[full] = metrics.RPC_LATENCY.labels(*_split_method(full))
            hist.observe(time.perf_counter() - start)

    def _wrap_coroutine(self, full: str, behavior: Any, unary_response: bool) -> Any:
        async def wrapper(request: Any, context: Any) -> Any:
            start = time.perf_counter()
            try:
                result = await behavior(request, context)
            except BaseException as exc:
                self._record(full, context, exc, start if unary_response else None)
                raise
            self._record(full, context, None, start if unary_response else None)
            return result

        return wrapper

    def _wrap_asyncgen(self, full: str, behavior: Any) -> Any:
        async def wrapper(request: Any, context: Any) -> Any:
            try:
                async for item in behavior(request, context):
                    yield item
            except BaseException as exc:
                self._record(full, context, exc, None)
                raise
            self._record(full, context, None, None)

        return wrapper


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """What aitbc.rpc.start_server adds: nothing while tracing and RPC metrics are both off. With
    both on, the tracing interceptor comes first, so the metrics one runs inside its span."""
    chain: list[grpc.aio.ServerInterceptor] = []
    if _enabled:
        from opentelemetry.instrumentation.grpc import aio_server_interceptor

        chain.append(aio_server_interceptor(tracer_provider=_provider))
    if metrics.rpc_metrics_enabled:
        chain.append(_RpcMetrics())
    return chain


def client_interceptors() -> list[Any]:
    """What aitbc.rpc.channel adds: nothing while tracing is off."""
    if not _enabled:
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors(tracer_provider=_provider))


def intercept_channel(channel: grpc.Channel) -> grpc.Channel:
    """A blocking channel that propagates the trace (the channel itself while tracing is off)."""
    if not _enabled:
        return channel
    from opentelemetry.instrumentation.grpc import client_interceptor
    from opentelemetry.instrumentation.grpc.grpcext import intercept_channel as otel_intercept_channel

    return otel_intercept_channel(channel, client_interceptor(tracer_provider=_provider))


# ---------------------------------------------------------------------------------------------------
# Structured logs

_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime",
                                                                                    "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, then the record's extra fields (job_id,
    height, ...), trace_id/span_id inside a span, exc on exceptions. A message that is itself a JSON
    object (the coordinator's per-job line) is merged in, so it stays one flat object."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace(
                "+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        msg = record.getMessage()
        merged = False
        if msg.startswith("{") and msg.endswith("}"):
            try:
                obj = json.loads(msg)
            except ValueError:
                obj = None
            if isinstance(obj, dict):
                out["msg"] = obj.pop("msg", obj.get("event", record.name))
                out.update((k, v) for k, v in obj.items() if k not in ("ts", "level", "logger"))
                merged = True
        if not merged:
            out["msg"] = msg
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_") and key not in out:
                out[key] = value
        ids = current_trace_ids()
        if ids is not None:
            out.setdefault("trace_id", ids[0])
            out.setdefault("span_id", ids[1])
        if record.exc_info:
            out["exc"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        return json.dumps(out, default=str, separators=(",", ":"))


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_json_logs = False


def announce(text: str, *, logger: str = "aitbc", **fields: Any) -> None:
    """A process's banner on stdout ("... listening on HOST:PORT"): the plain line, or in JSON log
    mode ($AITBC_LOG_FORMAT=json) one JSON line like every log line, so nothing else is mixed in."""
    if not _json_logs:
        print(text, flush=True)
        return
    record = logging.LogRecord(logger, logging.INFO, "", 0, text, None, None)
    record.__dict__.update(fields)
    print(JsonFormatter().format(record), flush=True)


def configure_logging(json: bool, *, level: int = logging.INFO, stream: IO[str] | None = None) -> logging.Handler:
    """Replace the root logger's handlers with one writing to `stream` (stderr): JSON lines when
    `json`, else the usual text format. Returns the handler."""
    global _json_logs
    _json_logs = json
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if json else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
