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


def test_a_real_node_in_json_mode_writes_only_json_lines(tmp_path) -> None:
    """AITBC_LOG_FORMAT=json: the banner on stdout ("... listening on ...") is a JSON line too,
    so stdout and stderr together are JSON lines only (issue: JSON logs mixed plain lines)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from aitbc import crypto
    from aitbc.ledger.genesis import make_genesis

    root = Path(__file__).resolve().parents[2]
    key = crypto.PrivateKey.generate()
    (tmp_path / "k").write_text(key.secret.hex())
    make_genesis("aitbc-json", [key.address], [key.address], block_time_ms=100).save(tmp_path / "g.json")
    proc = subprocess.Popen([sys.executable, "-m", "aitbc.clients.cli", "node", "--data-dir", str(tmp_path / "d"),
                             "--genesis", str(tmp_path / "g.json"), "--key", str(tmp_path / "k"), "--listen",
                             "127.0.0.1:0", "--port-file", str(tmp_path / "port")], cwd=root, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "AITBC_LOG_FORMAT": "json", "PYTHONPATH": str(root)})
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "port").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    got = [json.loads(line) for line in out.splitlines() if line.strip()]  # every line parses
    assert any(str(r["msg"]).startswith("ledger node listening on 127.0.0.1:") for r in got), out
