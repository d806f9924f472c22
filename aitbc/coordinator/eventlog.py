"""An event log of the job machine: every handle call's time, events and the transitions it made.

Set `event_log` in coordinator.toml (a file path) and the coordinator appends one JSON line per
handle call; a process start writes a `start` line with the machine's limits. `replay` feeds a
log to fresh machines (a new one at every start, as a restart does) with the recorded times and
returns where the transitions differ. tests/vectors/coordinator/ holds logs recorded from real
chaos runs; tests/coordinator/test_event_replay.py replays them against the current core.

What a log keeps is what the machine decides on: jobs (whole), miner views, ids, reasons. Artifact
bytes (or the upload files holding them) are kept as their length and receipts as their hash only:
the machine passes both through.
"""

from __future__ import annotations

import base64
import dataclasses
import gzip
import json
import os
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

from aitbc.coordinator import machine as m
from aitbc.hub.matching import MinerView
from aitbc.v1 import job_pb2, receipt_pb2

VERSION = 1
_EVENTS = {cls.__name__: cls for cls in (
    m.Submit, m.Restore, m.Released, m.CheckSplitJobs, m.MinerJoined, m.MinerUpdated, m.MinerLeft, m.Heard, m.Accepted,
    m.Progressed, m.Completed, m.Rejected, m.Failed, m.Cancel, m.Tick, m.Dispatch)}
_PROTOS = {"Job": job_pb2.Job, "JobProgress": job_pb2.JobProgress}


def _enc(value: Any) -> Any:
    if isinstance(value, job_pb2.Job | job_pb2.JobProgress):
        return {"$pb": type(value).__name__, "b64": base64.b64encode(value.SerializeToString(deterministic=True)).decode()}
    if isinstance(value, receipt_pb2.Receipt):
        return {"$receipt": value.receipt_hash}
    if isinstance(value, MinerView):
        d = dataclasses.asdict(value)
        d["models"], d["kinds"] = sorted(value.models), dict(value.kinds)
        return {"$view": d}
    if isinstance(value, frozenset):
        return {"$set": sorted(value)}
    if isinstance(value, bytes):
        return {"$bytes": len(value)}
    if isinstance(value, Path):  # a finished upload's file: its length, as bytes are kept
        return {"$bytes": value.stat().st_size if value.exists() else 0}
    if dataclasses.is_dataclass(value):
        return encode_event(value)  # type: ignore[arg-type]
    if isinstance(value, tuple | list):
        return [_enc(v) for v in value]
    return value


def _dec(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_dec(v) for v in value)
    if not isinstance(value, dict):
        return value
    if "$pb" in value:
        return _PROTOS[value["$pb"]].FromString(base64.b64decode(value["b64"]))
    if "$receipt" in value:
        return receipt_pb2.Receipt(receipt_hash=value["$receipt"])
    if "$view" in value:
        d = dict(value["$view"])
        d["models"] = frozenset(d["models"])
        return MinerView(**d)
    if "$set" in value:
        return frozenset(value["$set"])
    if "$bytes" in value:
        return b""
    if "$ev" in value:
        return decode_event(value)
    raise ValueError(f"unknown value in event log: {sorted(value)}")


def encode_event(ev: m.Event) -> dict[str, Any]:
    out: dict[str, Any] = {"$ev": type(ev).__name__}
    for f in dataclasses.fields(ev):  # type: ignore[arg-type]
        out[f.name] = _enc(getattr(ev, f.name))
    return out


def decode_event(raw: dict[str, Any]) -> m.Event:
    cls = _EVENTS.get(raw.get("$ev", ""))
    if cls is None:
        raise ValueError(f"unknown event {raw.get('$ev')!r} in event log")
    return cls(**{k: _dec(v) for k, v in raw.items() if k != "$ev"})  # type: ignore[arg-type]


def transitions(out: Iterable[m.Instruction]) -> list[list[Any]]:
    return [[i.job.job_id, i.from_state, i.to_state] for i in out if isinstance(i, m.Moved)]


class EventLog:
    """Appends to a file; one line per handle call (written under a lock, flushed each time)."""

    def __init__(self, path: str | Path, limits: m.Limits) -> None:
        self.path = Path(path)
        from aitbc.config import private_dir

        private_dir(self.path.parent)  # prompts and client ids are in it
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._file: TextIO = open(fd, "a", encoding="utf-8")  # noqa: SIM115 - kept open for appends
        self._lock = threading.Lock()
        self._line({"v": VERSION, "start": dataclasses.asdict(limits)})

    def _line(self, obj: dict[str, Any]) -> None:
        with self._lock:
            self._file.write(json.dumps(obj, separators=(",", ":"), sort_keys=True) + "\n")
            self._file.flush()

    def encode(self, events: tuple[m.Event, ...]) -> object:
        return [encode_event(e) for e in events]  # before handle: the machine changes the jobs it is given

    def write(self, t: float, t_ms: int, encoded: object, out: list[m.Instruction], *, raised: str = "") -> None:
        self._line({"t": t, "ms": t_ms, "events": encoded, "moved": [["raised", raised]] if raised else transitions(out)})

    def close(self) -> None:
        with self._lock:
            self._file.close()


class _ReplayClock:
    def __init__(self) -> None:
        self.t, self.ms = 0.0, 0

    def monotonic(self) -> float:
        return self.t

    def now_ms(self) -> int:
        return self.ms


@dataclasses.dataclass
class Replay:
    calls: int = 0
    starts: int = 0
    transitions: int = 0
    mismatches: list[str] = dataclasses.field(default_factory=list)
    final: dict[str, int] = dataclasses.field(default_factory=dict)  # job id -> last state reached


def lines(path: str | Path) -> Iterator[dict[str, Any]]:
    """The records of a log (.jsonl, or .jsonl.gz). A process killed in the middle of a write
    leaves a partial line; one that is followed by a start line (or ends the file) is skipped: the
    machine that wrote it is gone, and the next one starts from the store."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        partial: tuple[int, str] | None = None
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                if partial is not None:
                    raise ValueError(f"{path}:{partial[0]}: not a JSON line ({partial[1]})") from None
                partial = (n, exc.msg)
                continue
            if partial is not None and "start" not in rec:
                raise ValueError(f"{path}:{partial[0]}: not a JSON line ({partial[1]})")
            partial = None
            yield rec


def replay(records: Iterable[dict[str, Any]], *, max_mismatches: int = 20) -> Replay:
    """Feed a log to fresh machines and compare every handle call's transitions with the recorded ones."""
    result = Replay()
    clock = _ReplayClock()
    sm: m.JobMachine | None = None
    for rec in records:
        if "start" in rec:
            if rec.get("v") != VERSION:
                raise ValueError(f"event log version {rec.get('v')} (this core reads {VERSION})")
            sm = m.JobMachine(clock, m.Limits(**rec["start"]))
            result.starts += 1
            continue
        if sm is None:
            raise ValueError("event log does not begin with a start line")
        clock.t, clock.ms = rec["t"], rec["ms"]
        events = [decode_event(e) for e in rec["events"]]
        try:
            got = transitions(sm.handle(*events))
        except m.AitbcError as exc:  # the recorded call raised too (a miner reporting on a job it lost)
            got = [["raised", exc.code]]
        result.calls += 1
        result.transitions += len(got)
        for job_id, _, to in (g for g in got if len(g) == 3):
            result.final[job_id] = to
        if got != rec["moved"] and len(result.mismatches) < max_mismatches:
            result.mismatches.append(f"call {result.calls}: recorded {rec['moved']}, replayed {got}")
    return result
