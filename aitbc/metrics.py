"""Process-wide metrics on prometheus-client: every metric the network exports is declared at the
bottom of this module, in one place, and docs/operations.md lists the same names (a test checks
both agree). `start_metrics_server` serves them on `GET /metrics` (prometheus-client's HTTP server:
text format 0.0.4 by default, OpenMetrics when the scraper asks for it).

One registry per process, `REGISTRY` (a CollectorRegistry of our own, not prometheus-client's
global one, so no process_/python_ collectors appear that the docs do not list). Each service runs
in its own process (`aitbc devnet` starts them as children, each with its own endpoint), so a
process's registry is its service's; the tests that run a coordinator, a miner and a node in one
process read them all from one endpoint, deliberately.

    from aitbc import metrics
    metrics.JOBS_TOTAL.labels(state="COMPLETED").inc()
    metrics.QUEUE_DEPTH.set_function(lambda: len(queue))   # read at scrape time
    metrics.DISPATCH_LATENCY.observe(0.0031)
    done = metrics.JOBS_TOTAL.labels(state="COMPLETED")    # bind once on a hot path
    done.inc()
"""

from __future__ import annotations

import logging
import math
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

log = logging.getLogger("aitbc.metrics")

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # what a plain `curl .../metrics` gets

# Latency buckets (seconds): sub-millisecond RPCs up to slow inference.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
JOB_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
BLOCK_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0)

# No `<name>_created` series beside every counter and histogram: Prometheus ignores them in the
# 0.0.4 text format, and they doubled the page. (A process-wide prometheus-client switch.)
prometheus_client.disable_created_metrics()

REGISTRY = CollectorRegistry(auto_describe=True)


class Gauge(prometheus_client.Gauge):
    """prometheus_client.Gauge with two things its `set_function` lacks, both relied on by the
    processes that point gauges at their state (the coordinator core, a ledger node, a miner):
    a callback that raises is logged and reads NaN instead of failing the whole scrape, and
    `set_function(None)` hands the gauge back to set()/inc() (a stopped coordinator or node must
    not be read at the next scrape, nor kept alive by the gauge). prometheus-client cannot undo
    set_function: it replaces the instance's sample method, so dropping that override restores
    the class's (tests/telemetry/test_telemetry_metrics.py checks it still does)."""

    def set_function(self, f: Callable[[], float] | None) -> None:
        if f is None:
            vars(self).pop("_child_samples", None)
            return
        name = self._name

        def read() -> float:
            try:
                return float(f())
            except Exception:  # a broken callback must not break the scrape
                log.exception("gauge %s callback failed", name)
                return math.nan

        super().set_function(read)


def value(name: str, **labels: str) -> float:
    """The current value of the sample `name` with exactly these labels (0 when it has none yet):
    `value("aitbc_jobs_total", state="COMPLETED")`, `value("aitbc_dispatch_latency_seconds_count")`."""
    got = REGISTRY.get_sample_value(name, labels)
    return 0.0 if got is None else got


def declared(registry: CollectorRegistry = REGISTRY) -> dict[str, str]:
    """{metric name as exposed (# TYPE line): type} of every family in `registry`."""
    out = {}
    for family in registry.collect():
        out[family.name + "_total" if family.type == "counter" else family.name] = family.type
    return out


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


class CudaVramCollector:
    """aitbc_vram_used_bytes{device}, read from torch at each scrape once `watch()` was called (the
    miner does): a custom collector, since the devices are only known then."""

    NAME = "aitbc_vram_used_bytes"
    HELP = "GPU memory held by the miner's torch allocator (reserved), by device."

    def __init__(self, read: Callable[[], dict[tuple[str, ...], float]] = cuda_vram_used) -> None:
        self.read = read
        self.watching = False

    def watch(self) -> None:
        self.watching = True

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(self.NAME, self.HELP, labels=["device"])

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(self.NAME, self.HELP, labels=["device"])
        for key, v in sorted(self.read().items()) if self.watching else ():
            family.add_metric(list(key), v)
        yield family


# ---------------------------------------------------------------------------------------------------
# The metrics of the network, declared once (docs/operations.md lists the same names).

_r: dict[str, Any] = {"registry": REGISTRY}
# coordinator
JOBS_TOTAL = Counter("aitbc_jobs_total", "Jobs that reached a state (QUEUED, ASSIGNED, RUNNING, COMPLETED, "
                     "FAILED, CANCELLED, EXPIRED), counted at each transition.", ["state"], **_r)
QUEUE_DEPTH = Gauge("aitbc_queue_depth", "Jobs waiting in the coordinator's queue for a miner.", **_r)
DISPATCH_LATENCY = Histogram("aitbc_dispatch_latency_seconds",
                             "Time from SubmitJob until a miner holds the job (assignment sent).",
                             buckets=LATENCY_BUCKETS, **_r)
JOB_DURATION = Histogram("aitbc_job_duration_seconds", "Time from SubmitJob until the job finished, by model.",
                         ["model"], buckets=JOB_BUCKETS, **_r)
GPU_SECONDS = Counter("aitbc_gpu_seconds_total", "GPU seconds served to clients in completed jobs (the receipts' "
                      "measured gpu_ms), by model; verification re-runs are counted apart.", ["model"], **_r)
MINERS_CONNECTED = Gauge("aitbc_miners_connected", "Miners with an open Work stream.", **_r)
UPLOAD_BYTES = Gauge("aitbc_upload_bytes_in_flight", "Bytes of unfinished artifact uploads (files under the data dir).",
                     **_r)
ARTIFACTS_COLLECTED = Counter("aitbc_artifacts_collected_total",
                              "Artifacts whose bytes were deleted after artifact_retention_s.", **_r)
VERIFY_GPU_SECONDS = Counter("aitbc_hub_verification_gpu_seconds_total",
                             "GPU seconds spent re-executing jobs to verify them (measured gpu_ms), by model.",
                             ["model"], **_r)
VERIFICATIONS = Counter("aitbc_hub_verifications_total", "Verifications decided, by outcome (passed, replaced: the "
                        "original miner was outvoted, unverified: no usable second execution).", ["outcome"], **_r)
WEBHOOK_DELIVERIES = Counter("aitbc_webhook_deliveries_total", "Webhook POSTs, by outcome (delivered: a 2xx answer; "
                             "retry: failed, tried again later; dropped: given up after webhook_attempts or "
                             "webhook_max_age_s).", ["outcome"], **_r)
WEBHOOK_DELAY = Histogram("aitbc_webhook_delivery_seconds", "Time from a job's end until its webhook was delivered.",
                          buckets=LATENCY_BUCKETS, **_r)
QUARANTINED = Gauge("aitbc_hub_quarantined_miners", "Miners in quarantine (never chosen until an operator releases "
                    "them).", **_r)
# miner
MINER_LOAD = Gauge("aitbc_miner_load", "Jobs running on this miner divided by its max_concurrency (0..1).", **_r)
VRAM_USED = CudaVramCollector()
REGISTRY.register(VRAM_USED)
# ledger node
MEMPOOL_SIZE = Gauge("aitbc_mempool_size", "Transactions waiting in the node's mempool.", **_r)
BLOCK_HEIGHT = Gauge("aitbc_block_height", "Height of the node's head block.", **_r)
BLOCK_INTERVAL = Histogram("aitbc_block_interval_seconds", "Time between consecutive blocks' timestamps.",
                           buckets=BLOCK_BUCKETS, **_r)
TXS_TOTAL = Counter("aitbc_txs_total", "Transactions committed in blocks (rate() of it is tx/s), by type.",
                    ["type"], **_r)
FINALITY_LAG = Gauge("aitbc_finality_lag_blocks", "Head height minus finalized height.", **_r)
SYNC_LAG = Gauge("aitbc_sync_lag_blocks", "Best known peer height minus this node's height (0 when caught up).",
                 **_r)
# every gRPC server (recorded by the interceptor in aitbc.telemetry when metrics are on)
RPC_REQUESTS = Counter("aitbc_rpc_requests_total", "gRPC calls served, by service, method and status code.",
                       ["service", "method", "code"], **_r)
RPC_LATENCY = Histogram("aitbc_rpc_latency_seconds",
                        "Server-side latency of unary-response gRPC calls (streams that return many "
                        "messages are counted in aitbc_rpc_requests_total only).", ["service", "method"],
                        buckets=LATENCY_BUCKETS, **_r)
del _r


def watch_cuda_vram() -> None:
    """Export aitbc_vram_used_bytes{device} from torch at each scrape (the miner calls this once)."""
    VRAM_USED.watch()


# ---------------------------------------------------------------------------------------------------
# The HTTP endpoint (prometheus-client's)

_server: Any = None  # the running wsgiref server
_server_lock = threading.Lock()


def split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep:
        raise ValueError(f"metrics listen address must be HOST:PORT, got {listen!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def start_metrics_server(listen: str, registry: CollectorRegistry = REGISTRY) -> int:
    """Serve `GET /metrics` on `listen` ("HOST:PORT", port 0 picks one) from a daemon thread; returns
    the port. One endpoint per process: a second call returns the running one's port. Also turns on
    the per-RPC metrics of the gRPC interceptor for servers started after it."""
    global _server, rpc_metrics_enabled
    with _server_lock:
        if _server is not None:
            return int(_server.server_address[1])
        host, port = split_listen(listen)
        try:
            server, _thread = prometheus_client.start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot serve metrics on {listen}: {exc.strerror or exc} "
                                     "(each process needs its own AITBC_METRICS_LISTEN port)") from None
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
