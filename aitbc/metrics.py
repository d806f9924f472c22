"""Process-wide metrics: counters, gauges and fixed-bucket histograms rendered in the Prometheus text
format (0.0.4) on a small HTTP endpoint of their own.

Recording is a dict update under a per-metric threading.Lock that is never held across an await (or
anything else that blocks), so the event loop, worker threads and the scrape thread can all record.
Every metric the network exports is declared at the bottom of this module, in one place, and
docs/operations.md lists the same names (a test checks both agree).

    from aitbc import metrics
    metrics.JOBS_TOTAL.inc(state="COMPLETED")
    metrics.QUEUE_DEPTH.set(len(queue))
    metrics.DISPATCH_LATENCY.observe(0.0031)
    done = metrics.JOBS_TOTAL.labels(state="COMPLETED")   # pre-bound child for hot paths
    done.inc()
"""

from __future__ import annotations

import bisect
import http.server
import logging
import math
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

log = logging.getLogger("aitbc.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Latency buckets (seconds): sub-millisecond RPCs up to slow inference.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
JOB_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
BLOCK_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0)


def _fmt(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    if value == -math.inf:
        return "-Inf"
    if value != value:
        return "NaN"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _labels_text(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{escape_label_value(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class Metric:
    kind = "untyped"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, Any]) -> tuple[str, ...]:
        names = self.labelnames
        if len(labels) != len(names):
            raise ValueError(f"{self.name} takes labels {names}, got {tuple(labels)}")
        try:
            key = tuple(map(labels.__getitem__, names))
        except KeyError:
            raise ValueError(f"{self.name} takes labels {names}, got {tuple(labels)}") from None
        for v in key:
            if type(v) is not str:
                return tuple(str(v) for v in key)
        return key

    def samples(self) -> Iterator[str]:  # pragma: no cover - overridden
        return iter(())

    def render(self) -> str:
        head = f"# HELP {self.name} {_escape_help(self.help)}\n# TYPE {self.name} {self.kind}\n"
        return head + "".join(line + "\n" for line in self.samples())


class _Child:
    """A metric with its label values resolved once: recording is one locked dict update."""

    __slots__ = ("_metric", "_key")

    def __init__(self, metric: Any, key: tuple[str, ...]) -> None:
        self._metric = metric
        self._key = key

    def inc(self, amount: float = 1.0) -> None:
        self._metric._add(self._key, amount)

    def dec(self, amount: float = 1.0) -> None:
        self._metric._add(self._key, -amount)

    def set(self, value: float) -> None:
        self._metric._set(self._key, value)

    def observe(self, value: float) -> None:
        self._metric._observe(self._key, value)


class Counter(Metric):
    """Monotonic total; by convention its name ends in `_total`."""

    kind = "counter"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help, labelnames)
        self._values: dict[tuple[str, ...], float] = {}

    def _add(self, key: tuple[str, ...], amount: float) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: a counter only goes up")
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def inc(self, amount: float = 1.0, **labels: Any) -> None:
        self._add(self._key(labels) if labels or self.labelnames else (), amount)

    def labels(self, **labels: Any) -> _Child:
        return _Child(self, self._key(labels))

    def value(self, **labels: Any) -> float:
        return self._values.get(self._key(labels), 0.0)

    def samples(self) -> Iterator[str]:
        with self._lock:
            items = sorted(self._values.items())
        for key, value in items:
            yield f"{self.name}{_labels_text(self.labelnames, key)} {_fmt(value)}"


class Gauge(Metric):
    """A value that goes up and down; `set_function` computes it at scrape time instead."""

    kind = "gauge"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help, labelnames)
        self._values: dict[tuple[str, ...], float] = {}
        self._fn: Callable[[], float | dict[tuple[str, ...], float]] | None = None

    def _set(self, key: tuple[str, ...], value: float) -> None:
        with self._lock:
            self._values[key] = float(value)

    def _add(self, key: tuple[str, ...], amount: float) -> None:
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def set(self, value: float, **labels: Any) -> None:
        self._set(self._key(labels) if labels or self.labelnames else (), value)

    def inc(self, amount: float = 1.0, **labels: Any) -> None:
        self._add(self._key(labels) if labels or self.labelnames else (), amount)

    def dec(self, amount: float = 1.0, **labels: Any) -> None:
        self._add(self._key(labels) if labels or self.labelnames else (), -amount)

    def labels(self, **labels: Any) -> _Child:
        return _Child(self, self._key(labels))

    def remove(self, **labels: Any) -> None:
        with self._lock:
            self._values.pop(self._key(labels), None)

    def set_function(self, fn: Callable[[], float | dict[tuple[str, ...], float]] | None) -> None:
        """Read the value(s) from `fn` at each scrape (called on the scrape thread: keep it a cheap
        read such as len(queue)). For a labelled gauge `fn` returns {label-values tuple: value}."""
        self._fn = fn

    def value(self, **labels: Any) -> float:
        return self._values.get(self._key(labels), 0.0)

    def samples(self) -> Iterator[str]:
        with self._lock:
            items = dict(self._values)
        if self._fn is not None:
            try:
                got = self._fn()
            except Exception:  # a broken callback must not break the scrape
                log.exception("gauge %s callback failed", self.name)
                got = {}
            if isinstance(got, dict):
                items.update({tuple(str(v) for v in k): float(v) for k, v in got.items()})
            else:
                items[()] = float(got)
        for key, value in sorted(items.items()):
            yield f"{self.name}{_labels_text(self.labelnames, key)} {_fmt(value)}"


class Histogram(Metric):
    """Fixed buckets; stored per bucket, rendered cumulative with `+Inf`, `_sum` and `_count`."""

    kind = "histogram"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = (),
                 buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        super().__init__(name, help, labelnames)
        if "le" in self.labelnames:
            raise ValueError("'le' is reserved for histogram buckets")
        bounds = sorted(float(b) for b in buckets if b != math.inf)
        self.buckets = tuple(bounds)
        # per key: [count per finite bucket..., overflow count, sum]
        self._values: dict[tuple[str, ...], list[float]] = {}

    def _observe(self, key: tuple[str, ...], value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)  # le is inclusive: value == bound lands in it
        with self._lock:
            row = self._values.get(key)
            if row is None:
                row = self._values[key] = [0.0] * (len(self.buckets) + 2)
            row[i] += 1
            row[-1] += value

    def observe(self, value: float, **labels: Any) -> None:
        self._observe(self._key(labels) if labels or self.labelnames else (), value)

    def labels(self, **labels: Any) -> _Child:
        return _Child(self, self._key(labels))

    @contextmanager
    def time(self, **labels: Any) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.observe(time.perf_counter() - start, **labels)

    def count(self, **labels: Any) -> int:
        row = self._values.get(self._key(labels))
        return int(sum(row[:-1])) if row else 0

    def samples(self) -> Iterator[str]:
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._values.items())
        for key, row in items:
            cumulative = 0.0
            for bound, n in zip((*self.buckets, math.inf), row[:-1], strict=True):
                cumulative += n
                le = f'le="{_fmt(bound)}"'
                yield f"{self.name}_bucket{_labels_text(self.labelnames, key, le)} {_fmt(cumulative)}"
            labels = _labels_text(self.labelnames, key)
            yield f"{self.name}_sum{labels} {_fmt(row[-1])}"
            yield f"{self.name}_count{labels} {_fmt(cumulative)}"


class Registry:
    def __init__(self) -> None:
        self._metrics: dict[str, Metric] = {}
        self._lock = threading.Lock()

    def register(self, metric: Metric) -> Metric:
        with self._lock:
            old = self._metrics.get(metric.name)
            if old is not None and old is not metric:
                raise ValueError(f"metric {metric.name} is already registered")
            self._metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Counter:
        return self._get_or_make(Counter, name, help, labelnames)

    def gauge(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Gauge:
        return self._get_or_make(Gauge, name, help, labelnames)

    def histogram(self, name: str, help: str, labelnames: Sequence[str] = (),
                  buckets: Sequence[float] = LATENCY_BUCKETS) -> Histogram:
        return self._get_or_make(Histogram, name, help, labelnames, buckets=buckets)

    def _get_or_make(self, cls: type, name: str, help: str, labelnames: Sequence[str], **kw: Any) -> Any:
        with self._lock:
            existing = self._metrics.get(name)
            if existing is not None:
                if type(existing) is not cls or existing.labelnames != tuple(labelnames):
                    raise ValueError(f"metric {name} exists as {existing.kind}{existing.labelnames}")
                return existing
            metric = self._metrics[name] = cls(name, help, labelnames, **kw)
            return metric

    def get(self, name: str) -> Metric | None:
        return self._metrics.get(name)

    def names(self) -> list[str]:
        return sorted(self._metrics)

    def __iter__(self) -> Iterator[Metric]:
        return iter(sorted(self._metrics.values(), key=lambda m: m.name))

    def render(self) -> str:
        return "".join(m.render() for m in self)


REGISTRY = Registry()


def counter(name: str, help: str, labelnames: Iterable[str] = ()) -> Counter:
    """The process-wide counter `name` (created on first use, the same object after)."""
    return REGISTRY.counter(name, help, tuple(labelnames))


def gauge(name: str, help: str, labelnames: Iterable[str] = ()) -> Gauge:
    return REGISTRY.gauge(name, help, tuple(labelnames))


def histogram(name: str, help: str, labelnames: Iterable[str] = (),
              buckets: Sequence[float] = LATENCY_BUCKETS) -> Histogram:
    return REGISTRY.histogram(name, help, tuple(labelnames), buckets)


# ---------------------------------------------------------------------------------------------------
# The metrics of the network, declared once (docs/operations.md lists the same names).

# coordinator
JOBS_TOTAL = counter("aitbc_jobs_total", "Jobs that reached a state (QUEUED, ASSIGNED, RUNNING, COMPLETED, "
                     "FAILED, CANCELLED, EXPIRED), counted at each transition.", ["state"])
QUEUE_DEPTH = gauge("aitbc_queue_depth", "Jobs waiting in the coordinator's queue for a miner.")
DISPATCH_LATENCY = histogram("aitbc_dispatch_latency_seconds",
                             "Time from SubmitJob until a miner holds the job (assignment sent).")
JOB_DURATION = histogram("aitbc_job_duration_seconds", "Time from SubmitJob until the job finished, by model.",
                         ["model"], buckets=JOB_BUCKETS)
GPU_SECONDS = counter("aitbc_gpu_seconds_total", "GPU seconds served to clients in completed jobs (the receipts' measured gpu_ms), "
                      "by model; verification re-runs are counted apart.", ["model"])
MINERS_CONNECTED = gauge("aitbc_miners_connected", "Miners with an open Work stream.")
UPLOAD_BYTES = gauge("aitbc_upload_bytes_in_flight", "Bytes of unfinished artifact uploads (files under the data dir).")
ARTIFACTS_COLLECTED = counter("aitbc_artifacts_collected_total",
                              "Artifacts whose bytes were deleted after artifact_retention_s.")
VERIFY_GPU_SECONDS = counter("aitbc_hub_verification_gpu_seconds_total",
                             "GPU seconds spent re-executing jobs to verify them (measured gpu_ms), by model.", ["model"])
VERIFICATIONS = counter("aitbc_hub_verifications_total", "Verifications decided, by outcome (passed, replaced: the "
                        "original miner was outvoted, unverified: no usable second execution).", ["outcome"])
WEBHOOK_DELIVERIES = counter("aitbc_webhook_deliveries_total", "Webhook POSTs, by outcome (delivered: a 2xx answer; "
                             "retry: failed, tried again later; dropped: given up after webhook_attempts or "
                             "webhook_max_age_s).", ["outcome"])
WEBHOOK_DELAY = histogram("aitbc_webhook_delivery_seconds", "Time from a job's end until its webhook was delivered.")
QUARANTINED = gauge("aitbc_hub_quarantined_miners", "Miners in quarantine (never chosen until an operator releases them).")
# miner
MINER_LOAD = gauge("aitbc_miner_load", "Jobs running on this miner divided by its max_concurrency (0..1).")
VRAM_USED = gauge("aitbc_vram_used_bytes", "GPU memory held by the miner's torch allocator (reserved), by device.",
                  ["device"])
# ledger node
MEMPOOL_SIZE = gauge("aitbc_mempool_size", "Transactions waiting in the node's mempool.")
BLOCK_HEIGHT = gauge("aitbc_block_height", "Height of the node's head block.")
BLOCK_INTERVAL = histogram("aitbc_block_interval_seconds", "Time between consecutive blocks' timestamps.",
                           buckets=BLOCK_BUCKETS)
TXS_TOTAL = counter("aitbc_txs_total", "Transactions committed in blocks (rate() of it is tx/s), by type.",
                    ["type"])
FINALITY_LAG = gauge("aitbc_finality_lag_blocks", "Head height minus finalized height.")
SYNC_LAG = gauge("aitbc_sync_lag_blocks", "Best known peer height minus this node's height (0 when caught up).")
# every gRPC server (recorded by the interceptor in aitbc.telemetry when metrics are on)
RPC_REQUESTS = counter("aitbc_rpc_requests_total", "gRPC calls served, by service, method and status code.",
                       ["service", "method", "code"])
RPC_LATENCY = histogram("aitbc_rpc_latency_seconds",
                        "Server-side latency of unary-response gRPC calls (streams that return many "
                        "messages are counted in aitbc_rpc_requests_total only).", ["service", "method"])


def cuda_vram_used() -> dict[tuple[str, ...], float]:
    """{("cuda:N",): bytes held by this process's torch allocator} for each CUDA device, read at
    scrape time; {} when torch is not imported or CUDA is not initialised (a scrape never imports
    torch nor creates a CUDA context)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return {}
    try:
        if not torch.cuda.is_initialized():
            return {}
        return {(f"cuda:{i}",): float(torch.cuda.memory_reserved(i)) for i in range(torch.cuda.device_count())}
    except Exception:  # a driver error must not break the scrape
        log.debug("reading CUDA memory failed", exc_info=True)
        return {}


def watch_cuda_vram() -> None:
    """Export aitbc_vram_used_bytes{device} from torch at each scrape (the miner calls this once)."""
    VRAM_USED.set_function(cuda_vram_used)


# ---------------------------------------------------------------------------------------------------
# The HTTP endpoint

_server: http.server.ThreadingHTTPServer | None = None
_server_lock = threading.Lock()


class _Handler(http.server.BaseHTTPRequestHandler):
    registry: Registry = REGISTRY
    server_version = "aitbc-metrics"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            body = self.registry.render().encode()
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
        elif path == "/":
            body = b"aitbc metrics: GET /metrics\n"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
        else:
            body = b"not found: GET /metrics\n"
            self.send_response(404)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # scrapes every few seconds: keep quiet
        log.debug("metrics %s " + format, self.address_string(), *args)


def split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep:
        raise ValueError(f"metrics listen address must be HOST:PORT, got {listen!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def start_metrics_server(listen: str, registry: Registry = REGISTRY) -> int:
    """Serve `GET /metrics` on `listen` ("HOST:PORT", port 0 picks one) from a daemon thread; returns
    the port. One endpoint per process: a second call returns the running one's port. Also turns on
    the per-RPC metrics of the gRPC interceptor for servers started after it."""
    global _server, rpc_metrics_enabled
    with _server_lock:
        if _server is not None:
            return int(_server.server_address[1])
        host, port = split_listen(listen)
        handler = type("MetricsHandler", (_Handler,), {"registry": registry})
        try:
            server = http.server.ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot serve metrics on {listen}: {exc.strerror or exc} "
                                     "(each process needs its own AITBC_METRICS_LISTEN port)") from None
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="aitbc-metrics", daemon=True).start()
        _server = server
        rpc_metrics_enabled = True
        bound = int(server.server_address[1])
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound


def stop_metrics_server() -> None:
    global _server
    with _server_lock:
        if _server is not None:
            _server.shutdown()
            _server.server_close()
            _server = None


# Read by aitbc.telemetry.server_interceptors(): True once an endpoint serves the numbers (or when a
# process sets it, e.g. to export RPC metrics some other way).
rpc_metrics_enabled = False
