"""The job state machine driven directly: events in, instructions out, a fake clock, no network.

Every (from, to) step of machine.TRANSITIONS has a scenario here that reaches it and asserts the
instructions it produces; anything outside the table is refused.
"""

from __future__ import annotations

import pytest

from aitbc.coordinator import machine as m
from aitbc.coordinator.clock import FakeClock
from aitbc.hub.matching import MinerView
from aitbc.v1 import job_pb2, receipt_pb2

S = job_pb2.JobState
Q, A, R = S.JOB_STATE_QUEUED, S.JOB_STATE_ASSIGNED, S.JOB_STATE_RUNNING
C, F, X, E = S.JOB_STATE_COMPLETED, S.JOB_STATE_FAILED, S.JOB_STATE_CANCELLED, S.JOB_STATE_EXPIRED
LIMITS = m.Limits(max_attempts=3, queue_ttl_s=30.0, verify_timeout_s=10.0, stall_timeout_s=5.0)


def view(miner_id: str, *, price: int = 1, slots: int = 1, quarantined: bool = False) -> MinerView:
    return MinerView(miner_id=miner_id, models=frozenset({"tiny-sd"}), price_per_unit=price, max_concurrency=slots,
                     device_class="cpu", quarantined=quarantined)


def image_job(job_id: str, *, images: int = 1) -> job_pb2.Job:
    return job_pb2.Job(job_id=job_id, model="tiny-sd", client_id="alice", prompt_hash="ab" * 32,
                       params=job_pb2.JobParams(image=job_pb2.ImageParams(prompt="p", steps=4, images=images, seed=1)))


def kinds(out: list[m.Instruction]) -> list[str]:
    return [type(i).__name__ for i in out]


def moves(out: list[m.Instruction]) -> list[tuple[int, int]]:
    return [(i.from_state, i.to_state) for i in out if isinstance(i, m.Moved)]


def result(job_id: str, receipt_hash: str = "cd" * 32) -> m.Completed:
    fields = job_pb2.Job(artifacts=[job_pb2.Artifact(sha256="ee" * 32, size=3, content_type="image/png")],
                         receipt_hash=receipt_hash, units=5, unit_type="gpu_ms", device_class="cpu")
    return m.Completed("", job_id, fields, (("ee" * 32, b"png"),), receipt_pb2.Receipt(receipt_hash=receipt_hash))


def split_job(n: int) -> m.Submit:
    """Job "p" split into shards "s0".."s{n-1}" of one image each."""
    parent = image_job("p", images=n)
    shards = []
    for i in range(n):
        sh = image_job(f"s{i}")
        sh.parent_job_id, sh.first_image = "p", i
        parent.shard_job_ids.append(sh.job_id)
        shards.append(sh)
    return m.Submit(parent, tuple(shards))


def completed_by(miner_id: str, job_id: str) -> m.Completed:
    ev = result(job_id)
    return m.Completed(miner_id, ev.job_id, ev.result, ev.artifacts, ev.receipt)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sm(clock: FakeClock) -> m.JobMachine:
    return m.JobMachine(clock, LIMITS)


def assigned(sm: m.JobMachine, job_id: str = "j1", miner: str = "m1") -> list[m.Instruction]:
    sm.handle(m.MinerJoined(view(miner)))
    sm.handle(m.Submit(image_job(job_id)))
    return sm.handle(m.Dispatch())


# ---- one test per transition -----------------------------------------------------------------------

def test_new_to_queued_stores_first_and_waits_without_miners(sm: m.JobMachine) -> None:
    out = sm.handle(m.Submit(image_job("j1")))
    assert kinds(out) == ["Store", "Moved", "Publish"]
    assert moves(out) == [(S.JOB_STATE_UNSPECIFIED, Q)]
    assert out[0].jobs[0].state == Q and out[0].jobs[0].story[0].cause == "submitted"
    assert sm.handle(m.Dispatch()) == []  # nobody to give it to
    assert sm.queued() == 1


def test_queued_to_assigned_sends_the_job_to_the_chosen_miner(sm: m.JobMachine) -> None:
    out = assigned(sm)
    assert kinds(out) == ["Store", "Moved", "Publish", "Assign"]
    assert moves(out) == [(Q, A)]
    assign = out[-1]
    assert assign.miner_id == "m1" and assign.job.attempts == 1 and assign.job.price_per_unit == 1
    assert sm.running("m1") == 1 and sm.queued() == 0


def test_assigned_to_running_on_accept(sm: m.JobMachine, clock: FakeClock) -> None:
    assigned(sm)
    clock.advance(1)
    out = sm.handle(m.Accepted("m1", "j1"))
    assert moves(out) == [(A, R)] and kinds(out) == ["Store", "Moved", "Publish"]
    assert out[0].jobs[0].started_at_unix_ms == clock.now_ms()
    assert sm.handle(m.Accepted("m1", "j1")) == []  # a second accept changes nothing


@pytest.mark.parametrize("accept", [True, False], ids=["running", "assigned"])
def test_result_completes_stores_artifacts_and_receipt_in_one_write(sm: m.JobMachine, accept: bool) -> None:
    assigned(sm)
    if accept:
        sm.handle(m.Accepted("m1", "j1"))
    out = sm.handle(completed_by("m1", "j1"))
    assert moves(out) == [(R if accept else A, C)]
    store = out[0]
    assert isinstance(store, m.Store) and store.artifacts == (("ee" * 32, b"png"),)
    assert [rec.receipt_hash for _, rec in store.receipts] == ["cd" * 32]
    assert kinds(out)[1:] == ["Record", "Moved", "Publish", "SendAccepted"]
    assert out[1] == m.Record("m1", "success", draw=True)
    assert sm.job("j1") is None and sm.running("m1") == 0  # not active any more
    done = store.jobs[0]
    assert done.state == C and done.receipt_hash == "cd" * 32 and done.units == 5 and not done.error


@pytest.mark.parametrize("frm", [A, R], ids=["assigned", "running"])
def test_lost_miner_requeues_its_jobs_to_the_front(sm: m.JobMachine, frm: int) -> None:
    assigned(sm)
    if frm == R:
        sm.handle(m.Accepted("m1", "j1"))
    sm.handle(m.Submit(image_job("j2")))
    out = sm.handle(m.MinerLeft("m1", "stream closed"))
    assert moves(out) == [(frm, Q)]
    assert kinds(out) == ["Store", "Moved", "Publish", "ResetText"]
    job = out[0].jobs[0]
    assert job.miner_id == "" and "miner m1 lost: stream closed" in job.wait_reason and not job.error
    assert list(sm.queue)[0] == "j1"  # ahead of j2
    sm.handle(m.MinerJoined(view("m2")))
    again = sm.handle(m.Dispatch())
    assert [i.job.job_id for i in again if isinstance(i, m.Assign)] == ["j1"]
    assert sm.job("j1").attempts == 2 and sm.job("j1").wait_reason == ""


def test_a_stalled_miner_loses_its_job_and_is_told_to_drop_it(sm: m.JobMachine, clock: FakeClock) -> None:
    assigned(sm)
    clock.advance(LIMITS.stall_timeout_s - 0.5)
    assert sm.handle(m.Tick()) == []
    clock.advance(1)
    out = sm.handle(m.Tick())
    assert moves(out) == [(A, Q)]
    assert [type(i).__name__ for i in out if not isinstance(i, m.Store | m.Moved | m.Publish)] == \
        ["SendCancel", "Record", "ResetText"]
    assert m.Record("m1", "stall") in out
    assert "made no progress" in sm.job("j1").wait_reason


def test_progress_keeps_a_slow_miner_from_counting_as_stalled(sm: m.JobMachine, clock: FakeClock) -> None:
    assigned(sm)
    for step in range(1, 5):
        clock.advance(LIMITS.stall_timeout_s - 1)
        out = sm.handle(m.Progressed("m1", job_pb2.JobProgress(job_id="j1", step=step, total_steps=4)), m.Tick())
        if step == 1:  # the first progress of a job still ASSIGNED says it started: no JobAccepted needed
            assert moves(out) == [(A, R)] and kinds(out) == ["Store", "Moved", "Publish", "Publish"]
            assert sm.job("j1").story[-1].cause.startswith("the miner reported progress")
            assert sm.job("j1").started_at_unix_ms > 0
        else:
            assert moves(out) == [] and kinds(out) == ["Publish"]


def test_a_rejected_result_excludes_that_miner_for_the_job(sm: m.JobMachine) -> None:
    assigned(sm)
    sm.handle(m.MinerJoined(view("m2", price=9)))  # dearer: chosen only when m1 may not take it
    out = sm.handle(m.Rejected("m1", "j1", "wrong artifact hash"))
    assert moves(out) == [(A, Q)]
    assert m.SendRejected("m1", "j1", "wrong artifact hash") in out and m.Record("m1", "failure") in out
    again = sm.handle(m.Dispatch())
    assert [(i.miner_id, i.job.job_id) for i in again if isinstance(i, m.Assign)] == [("m2", "j1")]


def test_attempts_run_out_and_the_job_fails(sm: m.JobMachine) -> None:
    for n in range(1, LIMITS.max_attempts + 1):
        sm.handle(m.MinerJoined(view(f"m{n}")))
        if n == 1:
            sm.handle(m.Submit(image_job("j1")))
        sm.handle(m.Dispatch())
        out = sm.handle(m.Failed(f"m{n}", "j1", "CUDA out of memory", permanent=False))
        sm.handle(m.MinerLeft(f"m{n}", "gone"))
    assert moves(out) == [(A, F)]
    job = out[0].jobs[0]
    assert job.attempts == 3 and job.error.startswith("gave up after 3 attempts; last: miner m3 failed: CUDA")
    assert job.wait_reason == ""


def test_a_permanent_failure_no_other_miner_could_check_ends_the_job_at_once(sm: m.JobMachine) -> None:
    assigned(sm)
    sm.handle(m.Accepted("m1", "j1"))
    out = sm.handle(m.Failed("m1", "j1", "model cannot draw 64x64", permanent=True))
    assert moves(out) == [(R, F)] and not any(isinstance(i, m.Record) for i in out)
    assert out[0].jobs[0].error == "miner m1: model cannot draw 64x64 (not confirmed: no other miner can run it)"


def test_a_permanent_failure_is_confirmed_by_a_second_miner_before_the_job_fails(sm: m.JobMachine) -> None:
    assigned(sm)
    sm.handle(m.MinerJoined(view("m2", price=5)))
    out = sm.handle(m.Failed("m1", "j1", "prompt too long", permanent=True))
    assert moves(out) == [(A, Q)] and not any(isinstance(i, m.Record) for i in out)
    assert "another miner confirms" in sm.job("j1").wait_reason
    out = sm.handle(m.Dispatch())
    assert [(i.miner_id, i.job.job_id) for i in out if isinstance(i, m.Assign)] == [("m2", "j1")]
    out = sm.handle(m.Failed("m2", "j1", "prompt too long", permanent=True))
    assert moves(out) == [(A, F)] and not any(isinstance(i, m.Record) for i in out)
    assert "confirmed: miner m1 reported 'prompt too long'" in out[0].jobs[0].error


def test_a_permanent_failure_another_miner_disproves_costs_the_reporter(sm: m.JobMachine) -> None:
    assigned(sm)
    sm.handle(m.MinerJoined(view("m2", price=5)))
    sm.handle(m.Failed("m1", "j1", "cannot", permanent=True))
    sm.handle(m.Dispatch())
    out = sm.handle(completed_by("m2", "j1"))
    assert moves(out) == [(A, C)]
    assert m.Record("m1", "failure") in out and m.Record("m2", "success", draw=True) in out


def test_a_miner_busy_elsewhere_still_confirms_later(sm: m.JobMachine) -> None:
    assigned(sm)
    sm.handle(m.MinerJoined(view("m2")), m.Submit(image_job("j2")), m.Dispatch())  # m2 busy with j2
    out = sm.handle(m.Failed("m1", "j1", "cannot", permanent=True))
    assert moves(out) == [(A, Q)]  # waits for m2 rather than failing unconfirmed


@pytest.mark.parametrize("frm", [Q, A, R], ids=["queued", "assigned", "running"])
def test_cancel_tells_the_holding_miner(sm: m.JobMachine, frm: int) -> None:
    if frm == Q:
        sm.handle(m.Submit(image_job("j1")))
    else:
        assigned(sm)
        if frm == R:
            sm.handle(m.Accepted("m1", "j1"))
    out = sm.handle(m.Cancel("j1", "cancelled by client"))
    assert moves(out) == [(frm, X)]
    cancels = [i for i in out if isinstance(i, m.SendCancel)]
    assert cancels == ([] if frm == Q else [m.SendCancel("m1", "j1", "cancelled by client")])
    assert sm.job("j1") is None


def test_a_job_nobody_takes_expires(sm: m.JobMachine, clock: FakeClock) -> None:
    sm.handle(m.Submit(image_job("j1")))
    clock.advance(LIMITS.queue_ttl_s)
    assert sm.handle(m.Tick()) == []
    clock.advance(0.1)
    out = sm.handle(m.Tick())
    assert moves(out) == [(Q, E)] and out[0].jobs[0].error == "no miner took the job within 30 s"


def test_a_split_job_runs_with_its_first_shard_and_completes_with_its_last(sm: m.JobMachine) -> None:
    out = sm.handle(split_job(2))
    assert moves(out) == [(S.JOB_STATE_UNSPECIFIED, Q)] * 3
    sm.handle(m.MinerJoined(view("m1")), m.MinerJoined(view("m2")))
    out = sm.handle(m.Dispatch())
    assert (Q, R) in moves(out)  # the split job runs as soon as one shard does
    assert sorted(i.job.job_id for i in out if isinstance(i, m.Assign)) == ["s0", "s1"]
    held = {i.job.job_id: i.miner_id for i in out if isinstance(i, m.Assign)}
    sm.handle(completed_by(held["s0"], "s0"))
    assert sm.job("p").state == R
    out = sm.handle(completed_by(held["s1"], "s1"))
    assert (R, C) in moves(out)
    written = {j.job_id: j for j in out[0].jobs}
    assert written["p"].state == C and written["s1"].state == C  # one transaction: no crash between them
    assert len(written["p"].artifacts) == 2 and written["p"].units == 10


@pytest.mark.parametrize("frm", [Q, R], ids=["queued", "running"])
def test_a_split_job_fails_when_a_shard_fails_and_its_other_shards_stop(sm: m.JobMachine, frm: int) -> None:
    sm.handle(split_job(2))
    if frm == Q:  # a shard ends before any shard reached a miner
        sm.handle(m.Cancel("s0", "cancelled"))
        assert sm.job("p") is None
        return
    sm.handle(m.MinerJoined(view("m1", slots=2)))
    sm.handle(m.Dispatch())
    out = sm.handle(m.Failed("m1", "s0", "bad prompt", permanent=True))
    assert (R, F) in moves(out) and sm.job("p") is None and sm.job("s1") is None
    assert m.SendCancel("m1", "s1", "job p ended: shard for images 1-1 FAILED: miner m1: bad prompt (not confirmed: "
                        "no other miner can run it)") in out


def test_a_queued_split_job_fails_when_its_shard_expires(sm: m.JobMachine, clock: FakeClock) -> None:
    parent = image_job("p", images=2)
    sh = image_job("s0")
    sh.parent_job_id = "p"
    parent.shard_job_ids.append("s0")
    sm.handle(m.Submit(parent, (sh,)))
    clock.advance(LIMITS.queue_ttl_s + 1)
    out = sm.handle(m.Tick())
    assert moves(out) == [(Q, E), (Q, F)]


def test_restore_requeues_what_a_miner_held_and_keeps_the_story(sm: m.JobMachine, clock: FakeClock) -> None:
    out = assigned(sm)
    stored = job_pb2.Job()
    stored.CopyFrom(out[0].jobs[0])
    again = m.JobMachine(clock, LIMITS)
    out = again.handle(m.Restore(stored))
    assert moves(out) == [(A, Q)]
    job = again.job("j1")
    assert [(t.from_state, t.to_state) for t in job.story] == [(S.JOB_STATE_UNSPECIFIED, Q), (Q, A), (A, Q)]
    assert "restarted" in job.wait_reason and job.attempts == 1


def test_every_transition_in_the_table_has_a_scenario_above() -> None:
    covered = {
        (S.JOB_STATE_UNSPECIFIED, Q), (Q, A), (Q, R), (A, R), (A, Q), (R, Q), (A, C), (R, C), (Q, F), (A, F),
        (R, F), (Q, X), (A, X), (R, X), (Q, E),
    }
    assert covered == set(m.TRANSITIONS)


# ---- refusals ------------------------------------------------------------------------------------

def test_a_step_outside_the_table_is_refused(sm: m.JobMachine) -> None:
    sm.handle(m.Submit(image_job("j1")))
    with pytest.raises(m.IllegalTransition, match="QUEUED -> COMPLETED is not a transition"):
        sm._move(sm.job("j1"), C, "by hand")


def test_a_miner_reports_only_on_jobs_it_holds(sm: m.JobMachine) -> None:
    assigned(sm)
    sm.handle(m.MinerJoined(view("m2")))
    for ev in (m.Accepted("m2", "j1"), completed_by("m2", "j1"), m.Failed("m2", "j1", "x", True),
               m.Rejected("m2", "j1", "x"), m.Accepted("m1", "nope")):
        with pytest.raises(m.PermissionDenied):
            sm.handle(ev)
    assert sm.job("j1").state == A and sm.job("j1").miner_id == "m1"


def test_quarantine_makes_a_stuck_job_placeable_again(sm: m.JobMachine) -> None:
    sm.handle(m.MinerJoined(view("m1", quarantined=True)))
    sm.handle(m.Submit(image_job("j1")))
    assert not any(isinstance(i, m.Assign) for i in sm.handle(m.Dispatch()))
    assert "quarantined" in sm.job("j1").wait_reason
    sm.handle(m.MinerUpdated(view("m1")))  # released by the operator
    assert [i.miner_id for i in sm.handle(m.Dispatch()) if isinstance(i, m.Assign)] == ["m1"]


def test_the_story_is_bounded_and_keeps_the_submission(sm: m.JobMachine) -> None:
    sm.handle(m.Submit(image_job("j1")))
    for n in range(40):
        sm.handle(m.MinerJoined(view(f"m{n}")), m.Dispatch())
        sm.handle(m.MinerLeft(f"m{n}", "gone"))
        sm.job("j1").attempts = 0  # keep it alive: this test is about the story, not retries
    job = sm.job("j1")
    assert len(job.story) == m.STORY_LIMIT and job.story[0].cause == "submitted"
    assert job.story_dropped == 1 + 2 * 40 - m.STORY_LIMIT
    assert job.story[-1].to_state == Q and "m39 lost" in job.story[-1].cause


def test_jobs_a_lost_miner_got_in_one_call_are_requeued_in_an_order_that_replays() -> None:
    """Jobs assigned in one call share the instant; the order they go back in must not depend on
    how a set of ids iterates (it changes from process to process with the hash seed, and the event
    log's replay must decide exactly as the live machine did): the same order under every seed."""
    import os
    import subprocess
    import sys

    script = (
        "from tests.coordinator.test_machine import *\n"
        "sm = m.JobMachine(FakeClock(), LIMITS)\n"
        "sm.handle(m.MinerJoined(view('m1', slots=6)))\n"
        "sm.handle(*(m.Submit(image_job(f'j-{i}')) for i in 'fbdaec'))\n"
        "sm.handle(m.Dispatch())\n"  # all six in one call: one instant
        "sm.handle(m.MinerLeft('m1', 'stream closed'))\n"
        "print(','.join(sm.queue))\n"
    )
    orders = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                             env=dict(os.environ, PYTHONHASHSEED=str(seed))).stdout.strip() for seed in range(6)}
    assert len(orders) == 1, orders


# ---- a shared store (several coordinators on one database) ------------------------------------------

def test_released_jobs_leave_the_machine_without_a_transition_and_their_miner_drops_them(sm: m.JobMachine) -> None:
    assigned(sm, "held")
    sm.handle(m.Submit(image_job("waiting")))  # the only miner is busy
    out = sm.handle(m.Released(("held", "waiting"), "taken over"))
    assert moves(out) == [] and not any(isinstance(i, m.Store) for i in out)
    assert [(i.miner_id, i.job_id, i.reason) for i in out if isinstance(i, m.SendCancel)] == [("m1", "held", "taken over")]
    assert sm.job("held") is None and sm.job("waiting") is None and list(sm.queue) == [] and sm.running("m1") == 0


def test_a_claimed_job_a_dead_coordinators_miner_held_is_requeued_with_the_reason_and_its_wait(
        sm: m.JobMachine, clock: FakeClock) -> None:
    held = image_job("j")
    held.state, held.attempts, held.miner_id = S.JOB_STATE_RUNNING, 1, "elsewhere"  # type: ignore[assignment]
    out = sm.handle(m.Restore(held, why="coordinator c1 stopped while a miner held the job"))
    assert moves(out) == [(S.JOB_STATE_RUNNING, S.JOB_STATE_QUEUED)]
    assert sm.job("j").wait_reason == "requeued: coordinator c1 stopped while a miner held the job"  # type: ignore[union-attr]
    waited = image_job("old")
    waited.state = S.JOB_STATE_QUEUED  # type: ignore[assignment]
    sm.handle(m.Restore(waited, queued_for_s=LIMITS.queue_ttl_s + 1))
    out = sm.handle(m.Tick())
    assert (S.JOB_STATE_QUEUED, S.JOB_STATE_EXPIRED) in moves(out) and sm.job("old") is None


def test_job_records_keep_each_clients_count_as_records_come_and_go() -> None:
    from aitbc.coordinator.machine import JobRecord, JobRecords

    recs = JobRecords()
    a1, a2 = job_pb2.Job(job_id="a1", client_id="alice"), job_pb2.Job(job_id="a2", client_id="alice")
    shard = job_pb2.Job(job_id="a1-s0", client_id="alice", parent_job_id="a1")
    recs["a1"], recs["a2"], recs["a1-s0"] = JobRecord(a1), JobRecord(a2), JobRecord(shard)
    recs["b1"] = JobRecord(job_pb2.Job(job_id="b1", client_id="bob"))
    assert recs.per_client == {"alice": 2, "bob": 1}  # a split job counts once, not per shard
    recs["a1"] = JobRecord(a1)  # the same job's record again (requeued): still one
    assert recs.per_client["alice"] == 2
    assert recs.pop("a1") is not None and recs.pop("a1", None) is None  # popped twice: counted down once
    del recs["b1"]
    assert recs.per_client == {"alice": 1} and len(recs) == 2


def progress(sm: m.JobMachine, job_id: str, step: int, total: int, miner: str = "m1") -> list[m.Instruction]:
    return sm.handle(m.Progressed(miner, job_pb2.JobProgress(job_id=job_id, step=step, total_steps=total)))


def published(out: list[m.Instruction], job_id: str) -> list[tuple[int, int]]:
    return [(i.event.step, i.event.total_steps) for i in out
            if isinstance(i, m.Publish) and i.job_id == job_id and isinstance(i.event, job_pb2.JobProgress)]


def test_a_miners_progress_stays_within_its_total_and_never_goes_back(sm: m.JobMachine) -> None:
    """The miner's total is its scheduler's (taken as reported, 50 for a job of 4 steps here); its
    step is kept within it, and a message behind what the job showed is not shown."""
    assigned(sm)
    assert published(progress(sm, "j1", 2, 4), "j1") == [(2, 4)]
    assert published(progress(sm, "j1", 1, 4), "j1") == []  # backwards: watchers keep 2 of 4
    assert (sm.job("j1").progress.step, sm.job("j1").progress.total_steps) == (2, 4)
    assert published(progress(sm, "j1", 30, 50), "j1") == [(30, 50)]  # another count, further along
    assert published(progress(sm, "j1", 99, 50), "j1") == [(50, 50)]  # past its total: at its total
    assert (sm.job("j1").progress.step, sm.job("j1").progress.total_steps) == (50, 50)


def test_a_split_jobs_progress_counts_each_shard_in_the_jobs_own_steps(sm: m.JobMachine) -> None:
    sm.handle(split_job(2))  # two shards of 4 steps each: the job's progress is out of 8
    sm.handle(m.MinerJoined(view("m1")), m.MinerJoined(view("m2")))
    held = {i.job.job_id: i.miner_id for i in sm.handle(m.Dispatch()) if isinstance(i, m.Assign)}
    assert published(progress(sm, "s0", 900, 1000, held["s0"]), "p") == [(3, 8)]  # 90 % of 4 steps
    assert published(progress(sm, "s0", 1000, 1000, held["s0"]), "p") == [(4, 8)]
    assert published(progress(sm, "s1", 5, 5, held["s1"]), "p") == [(8, 8)]  # never above the job's total
    assert (sm.job("p").progress.step, sm.job("p").progress.total_steps) == (8, 8)
