"""Metrics: the registry renders valid Prometheus text (parsed back here), histograms are
cumulative, label values escaped; the HTTP endpoint serves it; the gRPC interceptor counts calls;
docs/operations.md lists every declared metric."""

from __future__ import annotations

import math
import re
import threading
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

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


def test_registry_renders_parseable_text() -> None:
    reg = metrics.Registry()
    jobs = reg.counter("t_jobs_total", "Jobs by state.\nSecond line with a \\ backslash.", ["state"])
    jobs.inc(state="COMPLETED")
    jobs.inc(2, state="COMPLETED")
    done = jobs.labels(state="FAILED")
    done.inc()
    weird = reg.gauge("t_weird", "Escaping.", ["who"])
    weird.set(1.5, who='a "quoted" \\ back\nslash')
    depth = reg.gauge("t_depth", "Queue depth.")
    depth.set(3)
    depth.inc()
    depth.dec(2)
    reg.gauge("t_live", "Computed at scrape.").set_function(lambda: 42)
    reg.gauge("t_unused", "Never set: HELP and TYPE only.")
    lat = reg.histogram("t_latency_seconds", "Latency.", ["method"], buckets=[0.1, 1, 0.01])
    for v in (0.005, 0.01, 0.05, 0.5, 0.5, 7):
        lat.observe(v, method="Say")

    types, samples = parse(reg.render())
    assert types == {"t_jobs_total": "counter", "t_weird": "gauge", "t_depth": "gauge", "t_live": "gauge",
                     "t_unused": "gauge", "t_latency_seconds": "histogram"}
    values = {(n, tuple(sorted(lb.items()))): v for n, lb, v in samples}
    assert values[("t_jobs_total", (("state", "COMPLETED"),))] == 3
    assert values[("t_jobs_total", (("state", "FAILED"),))] == 1
    assert values[("t_weird", (("who", 'a "quoted" \\ back\nslash'),))] == 1.5
    assert values[("t_depth", ())] == 2
    assert values[("t_live", ())] == 42
    assert not any(n == "t_unused" for n, _, _ in samples)

    buckets = [(lb["le"], v) for n, lb, v in samples if n == "t_latency_seconds_bucket"]
    assert buckets == [("0.01", 2), ("0.1", 3), ("1", 5), ("+Inf", 6)]  # cumulative, le inclusive
    counts = [v for _, v in buckets]
    assert counts == sorted(counts)
    assert values[("t_latency_seconds_count", (("method", "Say"),))] == 6
    assert values[("t_latency_seconds_sum", (("method", "Say"),))] == pytest.approx(8.065)
    assert lat.count(method="Say") == 6


def test_label_checks_and_counter_only_goes_up() -> None:
    reg = metrics.Registry()
    c = reg.counter("t_c_total", "c", ["state"])
    with pytest.raises(ValueError):
        c.inc()
    with pytest.raises(ValueError):
        c.inc(state="A", extra="B")
    with pytest.raises(ValueError):
        c.inc(-1, state="A")
    assert reg.counter("t_c_total", "c", ["state"]) is c  # get-or-create
    with pytest.raises(ValueError):
        reg.gauge("t_c_total", "c")
    with pytest.raises(ValueError):
        reg.histogram("t_h", "h", ["le"])


def test_recording_from_threads_loses_nothing() -> None:
    reg = metrics.Registry()
    c = reg.counter("t_par_total", "c", ["k"]).labels(k="x")
    h = reg.histogram("t_par_seconds", "h")

    def work() -> None:
        for _ in range(5000):
            c.inc()
            h.observe(0.002)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert reg.get("t_par_total").value(k="x") == 20000  # type: ignore[union-attr]
    assert h.count() == 20000


def test_vram_gauge_reads_torch_only_when_cuda_is_initialised(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    cuda = types.SimpleNamespace(is_initialized=lambda: False, device_count=lambda: 2,
                                 memory_reserved=lambda i: (i + 1) * 1024.0)
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    assert metrics.cuda_vram_used() == {}
    cuda.is_initialized = lambda: True
    assert metrics.cuda_vram_used() == {("cuda:0",): 1024.0, ("cuda:1",): 2048.0}
    reg = metrics.Registry()
    g = reg.gauge("t_vram_bytes", "v", ["device"])
    g.set_function(metrics.cuda_vram_used)
    _, samples = parse(reg.render())
    assert samples == [("t_vram_bytes", {"device": "cuda:0"}, 1024.0), ("t_vram_bytes", {"device": "cuda:1"}, 2048.0)]


def scrape(port: int, path: str = "/metrics") -> tuple[int, str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
        return resp.status, resp.headers["Content-Type"], resp.read().decode()


async def test_endpoint_serves_declared_metrics_and_rpc_counts() -> None:
    port = telemetry.setup("test-node", metrics_listen="127.0.0.1:0")
    assert port and metrics.rpc_metrics_enabled
    assert telemetry.start_metrics_server("127.0.0.1:0") == port  # one endpoint per process
    before = metrics.RPC_REQUESTS.value(service=SERVICE, method="Say", code="OK")
    metrics.JOBS_TOTAL.inc(state="COMPLETED")
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
    for m in metrics.REGISTRY:
        assert types[m.name] == m.kind
    got = {(n, tuple(sorted(lb.items()))): v for n, lb, v in samples}
    assert got[("aitbc_rpc_requests_total", (("code", "OK"), ("method", "Say"), ("service", SERVICE)))] == before + 3
    assert got[("aitbc_rpc_requests_total", (("code", "NOT_FOUND"), ("method", "Fail"), ("service", SERVICE)))] >= 1
    assert got[("aitbc_rpc_requests_total", (("code", "OK"), ("method", "Count"), ("service", SERVICE)))] >= 1
    assert ("aitbc_rpc_latency_seconds_count", (("method", "Say"), ("service", SERVICE))) in got
    # a server-streaming call is counted but stays out of the latency histogram
    assert ("aitbc_rpc_latency_seconds_count", (("method", "Count"), ("service", SERVICE))) not in got
    assert got[("aitbc_block_height", ())] == 12
    assert got[("aitbc_jobs_total", (("state", "COMPLETED"),))] >= 1

    with pytest.raises(urllib.error.HTTPError) as err:
        scrape(port, "/nope")
    assert err.value.code == 404
    err.value.close()


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


def test_official_parser_reads_the_output() -> None:
    parser = pytest.importorskip("prometheus_client.parser")
    reg = metrics.Registry()
    reg.counter("t_req_total", "Requests.", ["service", "method", "code"]).inc(
        service='we"ird\\svc', method="a\nb", code="OK")
    h = reg.histogram("t_lat_seconds", "Latency.", ["method"], buckets=[0.01, 0.1])
    for v in (0.005, 0.05, 5):
        h.observe(v, method="Say")
    reg.gauge("t_up", "Up.").set(1)
    fams = {f.name: f for f in parser.text_string_to_metric_families(reg.render())}
    assert fams["t_req"].type == "counter"
    (req,) = fams["t_req"].samples
    assert req.labels == {"service": 'we"ird\\svc', "method": "a\nb", "code": "OK"} and req.value == 1
    buckets = [(s.labels["le"], s.value) for s in fams["t_lat_seconds"].samples if s.name.endswith("_bucket")]
    assert buckets == [("0.01", 1), ("0.1", 2), ("+Inf", 3)]
    assert fams["t_up"].samples[0].value == 1


def test_docs_list_every_metric() -> None:
    doc = (ROOT / "docs" / "operations.md").read_text()
    missing = [name for name in metrics.REGISTRY.names() if name.startswith("aitbc_") and f"`{name}`" not in doc]
    assert not missing, f"docs/operations.md does not list {missing}"
    documented = set(re.findall(r"`(aitbc_[a-z_]+)`", doc))
    undeclared = {n for n in documented if metrics.REGISTRY.get(n) is None
                  and not re.search(r"_(bucket|sum|count)$", n)}
    assert not undeclared, f"docs/operations.md lists metrics the code does not declare: {undeclared}"
