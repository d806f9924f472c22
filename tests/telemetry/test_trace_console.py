"""AITBC_TRACING=console prints one line per span, a tree per trace, and nothing for an idle
process's polls (aitbc.trace_console), instead of ~40 lines of JSON per span."""

from __future__ import annotations

import io
import re

from aitbc import telemetry
from aitbc.trace_console import CompactConsoleExporter


def test_one_line_per_span_as_a_tree_and_idle_polls_left_out() -> None:
    out = io.StringIO()
    telemetry.configure("test", exporter=CompactConsoleExporter(out))
    try:
        with telemetry.span("coordinator.dispatch", job_id="j1", model="tiny-sd"):
            with telemetry.span("miner.job", job_id="j1"):
                with telemetry.span("miner.denoise", steps=4):
                    pass
            with telemetry.span("coordinator.settle", job_id="j1"):
                pass
        with telemetry.span("ledger.block", height=7, txs=0):  # an empty block: an idle tick
            pass
        with telemetry.span("ledger.block", height=8, txs=3):
            pass
        telemetry.force_flush()
    finally:
        telemetry.configure("test", exporter="none")
    lines = out.getvalue().splitlines()
    assert len(lines) == 5, lines
    assert [re.match(r"^\S+ \S+ ( *)", line).group(1) for line in lines] == ["", "  ", "    ", "  ", ""]
    assert "coordinator.dispatch" in lines[0] and "job_id=j1 model=tiny-sd" in lines[0]
    assert "miner.denoise" in lines[2] and "steps=4" in lines[2] and " ms" in lines[2]
    assert "height=8" in lines[4] and not any("height=7" in line for line in lines), lines
    assert len({line.split(" ")[1] for line in lines[:4]}) == 1  # one trace id on the tree's lines
