"""Metrics (prometheus-client): every metric docs/operations.md lists is declared with its type and
labels, the page is strict text format 0.0.4, gauges read at scrape time survive a broken callback
and can be released; the HTTP endpoint serves it; the gRPC interceptor counts calls."""

from __future__ import annotations

import math
import re
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics import MetricWrapperBase

from aitbc import metrics, rpc, telemetry
from tests.telemetry.echo import SERVICE, start_echo

ROOT = Path(__file__).resolve().parents[2]
NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
SAMPLE_RE = re.compile(rf"^({NAME})(\{{.*\}})? (\S+)$")
LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')


def unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "\\": "\\", '"': '"'}[m.group(1)], value)


def parse(text: str) -> tuple[dict[str, str], list[tuple[str, dict[str, str], float]]]:
    """A strict reader of the text format 0.0.4: returns ({family: type}, [(name, labels, value)])."""
    types: dict[str, str] = {}
    helps: set[str] = set()
    samples: list[tuple[str, dict[str, str], float]] = []
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert re.fullmatch(NAME, name) and name not in helps
            helps.add(name)
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped") and name not in types
            types[name] = kind
        else:
            m = SAMPLE_RE.match(line)
            assert m, f"bad sample line {line!r}"
            labels: dict[str, str] = {}
            if m.group(2):
                body = m.group(2)[1:-1]
                pos = 0
                while pos < len(body):
                    lm = LABEL_RE.match(body, pos)
                    assert lm, f"bad labels in {line!r}"
                    labels[lm.group(1)] = unescape(lm.group(2))
                    pos = lm.end()
            value = {"+Inf": math.inf, "-Inf": -math.inf, "NaN": math.nan}.get(m.group(3))
            samples.append((m.group(1), labels, float(m.group(3)) if value is None else value))
            family = re.sub(r"_(bucket|sum|count)$", "", m.group(1)) if m.group(1) not in types else m.group(1)
            assert family in types, f"sample {m.group(1)} before its TYPE"
    return types, samples


def documented() -> dict[str, tuple[str, tuple[str, ...]]]:
    """{name: (type, label names)} from the metrics table of docs/operations.md."""
    rows = re.findall(r"^\| `(aitbc_[a-z_]+)` \| (\w+) \|([^|]*)\|", (ROOT / "docs" / "operations.md").read_text(),
                      flags=re.M)
    return {name: (kind, tuple(x.strip() for x in labels.split(",") if x.strip())) for name, kind, labels in rows}


def declared_objects() -> dict[str, Any]:
    """{exposed name: the object aitbc.metrics declares it with}."""
    out = {}
    for obj in vars(metrics).values():
        if isinstance(obj, MetricWrapperBase) or isinstance(obj, metrics.CudaVramCollector):
            (family,) = obj.describe()
            out[family.name + "_total" if family.type == "counter" else family.name] = obj
    return out


def test_declared_metrics_have_the_documented_types_and_labels() -> None:
    docs = documented()
    assert set(docs) == set(metrics.declared()) == set(declared_objects())
    for name, (kind, labels) in docs.items():
        assert metrics.declared()[name] == kind, name
        obj = declared_objects()[name]
        if isinstance(obj, metrics.CudaVramCollector):
            assert labels == ("device",)
            continue
        if not labels:
            with pytest.raises(ValueError):  # no labels: recorded as it is
                obj.labels("x")
            continue
        values = {label: "doc-check" for label in labels}
        obj.labels(**values)  # exactly these label names (prometheus-client refuses others)
        obj.remove(*values.values())
        with pytest.raises(ValueError):
            obj.labels(**values, extra="x")


def test_registry_page_is_strict_text_format_0_0_4() -> None:
    metrics.JOBS_TOTAL.labels(state="COMPLETED").inc()
    metrics.DISPATCH_LATENCY.observe(0.003)
    metrics.RPC_LATENCY.labels("aitbc.test.EchoService", "Say").observe(0.01)
    types, samples = parse(generate_latest(metrics.REGISTRY).decode())
    assert types == metrics.declared()
    names = {n for n, _, _ in samples}
    assert not any(n.endswith("_created") for n in names)  # disable_created_metrics()
    buckets = [lb["le"] for n, lb, _ in samples if n == "aitbc_dispatch_latency_seconds_bucket"]
    assert [float(b) for b in buckets] == [*metrics.LATENCY_BUCKETS, math.inf]


def test_gauges_read_at_scrape_time_survive_a_broken_callback_and_can_be_released() -> None:
    reg = CollectorRegistry()
    depth = metrics.Gauge("t_depth", "Queue depth.", registry=reg)
    queue = [1, 2, 3]
    depth.set_function(lambda: len(queue))
    assert reg.get_sample_value("t_depth") == 3
    queue.append(4)
    assert reg.get_sample_value("t_depth") == 4  # read at each scrape
    depth.set_function(lambda: 1 / 0)
    assert math.isnan(reg.get_sample_value("t_depth"))  # logged, and the rest of the page is served
    depth.set_function(None)  # a stopped owner releases it: set() counts again
    depth.set(7)
    assert reg.get_sample_value("t_depth") == 7


def test_vram_gauge_reads_torch_only_when_watched_and_cuda_is_initialised(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    cuda = types.SimpleNamespace(is_initialized=lambda: False, device_count=lambda: 2,
                                 memory_reserved=lambda i: (i + 1) * 1024.0)
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    assert metrics.cuda_vram_used() == {}
    cuda.is_initialized = lambda: True
    assert metrics.cuda_vram_used() == {("cuda:0",): 1024.0, ("cuda:1",): 2048.0}
    reg = CollectorRegistry()
    vram = metrics.CudaVramCollector()
    reg.register(vram)
    assert reg.get_sample_value("aitbc_vram_used_bytes", {"device": "cuda:0"}) is None  # not a miner
    vram.watch()
    _, samples = parse(generate_latest(reg).decode())
    assert samples == [("aitbc_vram_used_bytes", {"device": "cuda:0"}, 1024.0),
                       ("aitbc_vram_used_bytes", {"device": "cuda:1"}, 2048.0)]


def scrape(port: int, path: str = "/metrics") -> tuple[int, str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
        return resp.status, resp.headers["Content-Type"], resp.read().decode()


async def test_endpoint_serves_declared_metrics_and_rpc_counts() -> None:
    port = telemetry.setup("test-node", metrics_listen="127.0.0.1:0")
    assert port and metrics.rpc_metrics_enabled
    assert telemetry.start_metrics_server("127.0.0.1:0") == port  # one endpoint per process
    before = metrics.value("aitbc_rpc_requests_total", service=SERVICE, method="Say", code="OK")
    metrics.JOBS_TOTAL.labels(state="COMPLETED").inc()
    metrics.BLOCK_HEIGHT.set(12)
    metrics.DISPATCH_LATENCY.observe(0.003)

    running, _ = await start_echo()  # after setup: the server gets the metrics interceptor
    try:
        async with rpc.channel(f"127.0.0.1:{running.port}") as ch:
            for _ in range(3):
                await ch.unary_unary(f"/{SERVICE}/Say")(b"x")
            with pytest.raises(grpc.aio.AioRpcError):
                await ch.unary_unary(f"/{SERVICE}/Fail")(b"")
            assert [x async for x in ch.unary_stream(f"/{SERVICE}/Count")(b"2")] == [b"0", b"1"]
    finally:
        await running.stop(None)

    status, ctype, body = scrape(port)
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
    types, samples = parse(body)
    for name, kind in metrics.declared().items():
        assert types[name] == kind
    got = {(n, tuple(sorted(lb.items()))): v for n, lb, v in samples}
    assert got[("aitbc_rpc_requests_total", (("code", "OK"), ("method", "Say"), ("service", SERVICE)))] == before + 3
    assert got[("aitbc_rpc_requests_total", (("code", "NOT_FOUND"), ("method", "Fail"), ("service", SERVICE)))] >= 1
    assert got[("aitbc_rpc_requests_total", (("code", "OK"), ("method", "Count"), ("service", SERVICE)))] >= 1
    assert ("aitbc_rpc_latency_seconds_count", (("method", "Say"), ("service", SERVICE))) in got
    # a server-streaming call is counted but stays out of the latency histogram
    assert ("aitbc_rpc_latency_seconds_count", (("method", "Count"), ("service", SERVICE))) not in got
    assert got[("aitbc_block_height", ())] == 12
    assert got[("aitbc_jobs_total", (("state", "COMPLETED"),))] >= 1

    # a Prometheus server that asks for OpenMetrics gets it (prometheus-client's negotiation)
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics",
                                 headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
        assert resp.read().decode().endswith("# EOF\n")


def test_port_in_use_says_so() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{port}: .*own AITBC_METRICS_LISTEN"):
            metrics.start_metrics_server(f"127.0.0.1:{port}")
    assert not metrics.rpc_metrics_enabled


async def test_metrics_off_means_no_interceptor() -> None:
    assert not metrics.rpc_metrics_enabled and not telemetry.enabled()
    assert telemetry.server_interceptors() == []
    assert telemetry.setup("x", metrics_listen="") is None
    assert telemetry.server_interceptors() == []


def test_docs_list_every_metric() -> None:
    doc = (ROOT / "docs" / "operations.md").read_text()
    missing = [name for name in metrics.declared() if name.startswith("aitbc_") and f"`{name}`" not in doc]
    assert not missing, f"docs/operations.md does not list {missing}"
    documented = set(re.findall(r"`(aitbc_[a-z_]+)`", doc))
    undeclared = {n for n in documented if n not in metrics.declared()
                  and not re.search(r"_(bucket|sum|count)$", n)}
    assert not undeclared, f"docs/operations.md lists metrics the code does not declare: {undeclared}"
