"""Event logs replayed against the job machine: the same events give the same transitions.

tests/vectors/coordinator/*.jsonl.gz were recorded by the coordinator of real chaos runs
(tests/fault/test_chaos.py with AITBC_CHAOS_KEEP_EVENTS; processes killed -9 and restarted under
load). A change to the core that decides differently shows up here as a mismatch, call by call.
"""

from __future__ import annotations

import collections
import gzip
import json
from pathlib import Path

import pytest

from aitbc.coordinator import eventlog
from tests.coordinator.test_jobs_api import MD, image_job, stub, wait_done

VECTORS = sorted((Path(__file__).resolve().parents[1] / "vectors" / "coordinator").glob("*.jsonl.gz"))


def steps(records: list[dict]) -> collections.Counter[tuple[int, int]]:
    return collections.Counter((m[1], m[2]) for r in records if "moved" in r for m in r["moved"] if len(m) == 3)


@pytest.mark.parametrize("path", VECTORS, ids=[p.name for p in VECTORS])
def test_a_recorded_chaos_run_replays_with_the_same_transitions(path: Path) -> None:
    records = list(eventlog.lines(path))
    result = eventlog.replay(records)
    assert not result.mismatches, "\n".join(result.mismatches)
    assert result.starts >= 2  # the coordinator was killed and restarted during the run
    assert result.transitions == sum(steps(records).values()) >= 500
    assert (3, 4) in steps(records)  # RUNNING -> COMPLETED


def test_vectors_exist_and_cover_restarts() -> None:
    assert VECTORS, "no recorded event logs in tests/vectors/coordinator/"
    kinds = collections.Counter(e["$ev"] for p in VECTORS for r in eventlog.lines(p) for e in r.get("events", ()))
    for kind in ("Submit", "MinerJoined", "MinerLeft", "Accepted", "Completed", "Dispatch", "Tick", "CheckSplitJobs"):
        assert kinds[kind], f"no {kind} event in any vector"
    moved = sum((steps(list(eventlog.lines(p))) for p in VECTORS), collections.Counter())
    assert moved[(2, 1)]  # a miner lost while it held a job: requeued


def test_a_changed_event_is_caught_by_the_replay(tmp_path: Path) -> None:
    """The comparison can fail: a permanent failure turned into a completion diverges at once."""
    records = list(eventlog.lines(VECTORS[0]))
    for r in records:
        for e in r.get("events", ()):
            if e["$ev"] == "Accepted":
                e["$ev"] = "Cancel"  # the client cancelled instead of the miner accepting
                e["reason"] = "cancelled by client"
                e.pop("miner_id")
                break
        else:
            continue
        break
    result = eventlog.replay(records)
    assert result.mismatches


def test_a_partial_last_line_from_a_kill_is_skipped_and_anything_else_refused(tmp_path: Path) -> None:
    lines = gzip.decompress(VECTORS[0].read_bytes()).decode().splitlines()
    starts = [i for i, line in enumerate(lines) if '"start"' in line]
    cut = lines[: starts[1]] + [lines[starts[1] - 1][:40]] + lines[starts[1]:]  # killed mid-write
    log = tmp_path / "events.jsonl"
    log.write_text("\n".join(cut) + "\n")
    assert not eventlog.replay(eventlog.lines(log)).mismatches
    broken = lines[:5] + ["{not json"] + lines[5:]
    log.write_text("\n".join(broken) + "\n")
    with pytest.raises(ValueError, match="not a JSON line"):
        list(eventlog.lines(log))


async def test_a_live_coordinator_logs_what_replays_identically(network_factory, null_backend, tmp_path) -> None:
    log = tmp_path / "events.jsonl"
    net = await network_factory(event_log=str(log), verify_rate=1.0)
    await net.add_miner({"null": null_backend})
    await net.add_miner({"null": null_backend})
    s = stub(net)
    for seed in range(3):
        await wait_done(s, (await s.SubmitJob(image_job(model="null", seed=seed), metadata=MD)).job.job_id)
    split = (await s.SubmitJob(image_job(model="null", images=3, seed=9, width=64, height=64), metadata=MD)).job
    await wait_done(s, split.job_id)
    await net.until(lambda: not net.core.store.held_receipts())  # every verification decided
    await net.restart_coordinator()
    await net.until(lambda: len(net.core.miners) == 2)  # the miners reconnect by themselves
    await wait_done(s, (await s.SubmitJob(image_job(model="null", seed=5), metadata=MD)).job.job_id)
    await net.stop_coordinator()
    records = [json.loads(line) for line in log.read_text().splitlines()]
    result = eventlog.replay(records)
    assert not result.mismatches, "\n".join(result.mismatches)
    assert result.starts == 2 and result.transitions >= 4 * (3 + 1) + 3
    assert result.final[split.job_id] == 4  # COMPLETED
