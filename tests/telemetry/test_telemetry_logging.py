"""Structured logs: one JSON object per line with ts, level, logger, msg and extra fields."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from aitbc import telemetry


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    stream = io.StringIO()
    telemetry.configure_logging(json=True, stream=stream)
    yield stream
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in saved[0]:
        root.addHandler(h)
    root.setLevel(saved[1])


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_with_extra_fields(json_log: io.StringIO) -> None:
    logging.getLogger("aitbc.node").info("block %d committed", 7, extra={"height": 7, "txs": 3})
    logging.getLogger("aitbc.node").debug("not shown at INFO")
    (rec,) = lines(json_log)
    assert rec["msg"] == "block 7 committed"
    assert rec["level"] == "info" and rec["logger"] == "aitbc.node"
    assert rec["height"] == 7 and rec["txs"] == 3
    assert str(rec["ts"]).endswith("Z") and "T" in str(rec["ts"])
    assert "trace_id" not in rec


def test_job_line_is_merged_not_quoted(json_log: io.StringIO) -> None:
    job = {"event": "job_finished", "job_id": "j-1", "duration_ms": 812, "gpu_seconds": 0.75,
           "bytes_out": 1234, "prompt_hash": "ab" * 32}
    logging.getLogger("aitbc.jobs").info(json.dumps(job, sort_keys=True))
    logging.getLogger("aitbc.x").warning("{not json}")
    first, second = lines(json_log)
    assert first["logger"] == "aitbc.jobs" and first["msg"] == "job_finished"
    for k, v in job.items():
        if k != "event":
            assert first[k] == v
    assert second["msg"] == "{not json}" and second["level"] == "warning"


def test_trace_ids_and_exceptions(json_log: io.StringIO) -> None:
    telemetry.configure("n", exporter="memory")
    with telemetry.span("op") as sp:
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("aitbc.t").exception("failed", extra={"job_id": "j-2"})
    (rec,) = [r for r in lines(json_log) if r["logger"] == "aitbc.t"]  # each line parses as JSON
    assert rec["trace_id"] == f"{sp.get_span_context().trace_id:032x}"
    assert rec["span_id"] == f"{sp.get_span_context().span_id:016x}"
    assert rec["job_id"] == "j-2" and "ValueError: boom" in str(rec["exc"])


def test_text_mode_keeps_the_usual_format() -> None:
    root = logging.getLogger()
    saved = list(root.handlers)
    stream = io.StringIO()
    try:
        telemetry.configure_logging(json=False, stream=stream)
        logging.getLogger("aitbc.t").info("hello")
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved:
            root.addHandler(h)
    assert stream.getvalue().rstrip().endswith("INFO aitbc.t: hello")
