"""A compact console trace exporter (AITBC_TRACING=console): one line per span, indented as a tree
per trace, a trace printed once its root span ended; the polls an idle process makes (health
checks, GetHead probes, empty blocks) are left out. The OpenTelemetry SDK's ConsoleSpanExporter
prints ~40 lines of JSON per span, which nobody reads in a terminal.

    16:05:01.204 4bf92f35 coordinator.dispatch 0.41 ms  job_id=0193... model=tiny-sd miner_id=ait1...
    16:05:01.205 4bf92f35   /aitbc.v1.MinerService/Work 1204.00 ms
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Sequence
from typing import IO, Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import StatusCode

# span names as opentelemetry-instrumentation-grpc gives them: the full method, leading slash included
QUIET_NAMES = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch",
                         "/aitbc.v1.LedgerService/GetHead"})
MAX_TRACES = 1024  # traces whose root has not ended yet, kept at most (oldest dropped)
MAX_AGE_S = 60.0  # a trace whose root never ends here (its root is in another process) is printed after this
MAX_ATTRS = 8


def quiet(spans: Sequence[ReadableSpan]) -> bool:
    """An idle process's poll: one span, a health check / head probe / empty block."""
    if len(spans) != 1:
        return False
    s = spans[0]
    return s.name in QUIET_NAMES or (s.name == "ledger.block" and (s.attributes or {}).get("txs") == 0)


def _line(span: ReadableSpan, depth: int) -> str:
    start = (span.start_time or 0) / 1e9
    ms = ((span.end_time or span.start_time or 0) - (span.start_time or 0)) / 1e6
    clock = time.strftime("%H:%M:%S", time.localtime(start)) + f".{int(start * 1000) % 1000:03d}"
    attrs = " ".join(f"{k}={v}" for k, v in list((span.attributes or {}).items())[:MAX_ATTRS]
                     if not k.startswith("rpc.") and k != "duration_ms")
    status = "" if span.status.status_code != StatusCode.ERROR else f" ERROR {span.status.description or ''}"
    trace = f"{span.context.trace_id:032x}"[:8] if span.context else "--------"
    return f"{clock} {trace} {'  ' * depth}{span.name} {ms:.2f} ms{status}  {attrs}".rstrip()


class CompactConsoleExporter(SpanExporter):
    def __init__(self, out: IO[str] | None = None) -> None:
        self.out = out or sys.stderr
        self._traces: dict[int, tuple[float, list[ReadableSpan]]] = {}  # trace id -> (first seen, spans)
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        now = time.monotonic()
        ready: list[list[ReadableSpan]] = []
        with self._lock:
            for s in spans:
                tid = s.context.trace_id if s.context else 0
                seen, group = self._traces.setdefault(tid, (now, []))
                group.append(s)
                if s.parent is None or s.parent.is_remote:  # its root here ended: the trace is complete
                    ready.append(self._traces.pop(tid)[1])
            stale = [t for t, (seen, _) in self._traces.items() if now - seen > MAX_AGE_S]
            while len(self._traces) - len(stale) > MAX_TRACES:
                stale.append(next(t for t in self._traces if t not in stale))
            ready.extend(self._traces.pop(t)[1] for t in stale)
        for group in ready:
            if not quiet(group):
                self._print(group)
        return SpanExportResult.SUCCESS

    def _print(self, group: list[ReadableSpan]) -> None:
        ids = {s.context.span_id for s in group if s.context}
        children: dict[int | None, list[ReadableSpan]] = {}
        for s in group:
            parent = s.parent.span_id if s.parent is not None and s.parent.span_id in ids else None
            children.setdefault(parent, []).append(s)
        lines: list[str] = []

        def walk(parent: int | None, depth: int) -> None:
            for s in sorted(children.get(parent, []), key=lambda x: x.start_time or 0):
                lines.append(_line(s, depth))
                walk(s.context.span_id if s.context else None, depth + 1)

        walk(None, 0)
        try:
            self.out.write("\n".join(lines) + "\n")
            self.out.flush()
        except (OSError, ValueError):  # the terminal went away
            pass

    def shutdown(self) -> None:
        with self._lock:
            rest = [g for _, g in self._traces.values()]
            self._traces.clear()
        for group in rest:
            if not quiet(group):
                self._print(group)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def exporter(out: Any = None) -> CompactConsoleExporter:
    return CompactConsoleExporter(out)
