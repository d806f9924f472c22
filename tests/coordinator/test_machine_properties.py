"""Random event sequences against the job machine (Hypothesis), with a store and restarts.

A small runtime executes the instructions into a MemoryJobStore; a restart builds a new machine
from what the store holds, as the coordinator does. After every step: each job is in exactly one
state, never held by two miners, never lost, within its attempts, and attested at most once.
"""

from __future__ import annotations

import collections

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from aitbc import jobs
from aitbc.coordinator import machine as m
from aitbc.coordinator.clock import FakeClock
from aitbc.coordinator.store import MemoryJobStore
from aitbc.errors import PermissionDenied
from aitbc.hub.matching import MinerView
from aitbc.v1 import job_pb2, receipt_pb2

S = job_pb2.JobState
LIMITS = m.Limits(max_attempts=3, queue_ttl_s=60.0, verify_timeout_s=20.0, stall_timeout_s=15.0)
MINERS = ("m1", "m2", "m3")


def job(job_id: str, images: int = 1) -> job_pb2.Job:
    return job_pb2.Job(job_id=job_id, model="tiny-sd", client_id="alice",
                       params=job_pb2.JobParams(image=job_pb2.ImageParams(prompt="p", steps=2, images=images, seed=1)))


class Coordinator(RuleBasedStateMachine):
    @initialize()
    def start(self) -> None:
        self.clock = FakeClock()
        self.store = MemoryJobStore()
        self.sm = m.JobMachine(self.clock, LIMITS)
        self.submitted: list[str] = []
        self.attested: collections.Counter[str] = collections.Counter()
        self.n = 0

    def run(self, *events: m.Event) -> None:
        for ins in self.sm.handle(*events):
            if isinstance(ins, m.Store):
                self.store.write(ins.jobs, artifacts=ins.artifacts, receipts=ins.receipts)
            elif isinstance(ins, m.SendAccepted):
                self.attested[ins.job_id] += 1
            elif isinstance(ins, m.Moved):
                assert (ins.from_state, ins.to_state) in m.TRANSITIONS

    def held(self) -> list[tuple[str, str]]:
        return sorted((mid, j) for mid, slot in self.sm.miners.items() for j in slot.held)

    # ---- clients ------------------------------------------------------------------------------

    @rule(split=st.booleans())
    def submit(self, split: bool) -> None:
        self.n += 1
        parent = job(f"j{self.n}", images=2 if split else 1)
        shards = []
        if split:
            for i in range(2):
                sh = job(f"j{self.n}s{i}")
                sh.parent_job_id, sh.first_image = parent.job_id, i
                parent.shard_job_ids.append(sh.job_id)
                shards.append(sh)
        self.run(m.Submit(parent, tuple(shards)), m.Dispatch())
        self.submitted += [parent.job_id, *(s.job_id for s in shards)]

    @precondition(lambda self: self.submitted)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        job_id = data.draw(st.sampled_from(self.submitted))
        if self.sm.job(job_id) is not None:
            self.run(m.Cancel(job_id, "cancelled by client"), m.Dispatch())

    # ---- miners -------------------------------------------------------------------------------

    @rule(miner=st.sampled_from(MINERS), slots=st.integers(1, 2), price=st.integers(0, 3))
    def join(self, miner: str, slots: int, price: int) -> None:
        if miner in self.sm.miners:
            self.run(m.MinerLeft(miner, "replaced by a new Work stream"))
        self.run(m.MinerJoined(MinerView(miner, frozenset({"tiny-sd"}), price_per_unit=price, max_concurrency=slots,
                                         device_class="cpu")), m.Dispatch())

    @rule(miner=st.sampled_from(MINERS), stalled=st.booleans())
    def leave(self, miner: str, stalled: bool) -> None:
        self.run(m.MinerLeft(miner, "stream closed", stalled=stalled), m.Dispatch())

    @precondition(lambda self: self.held())
    @rule(data=st.data(), what=st.sampled_from(["accept", "progress", "complete", "reject", "fail", "fail_permanently"]))
    def report(self, data: st.DataObject, what: str) -> None:
        miner, job_id = data.draw(st.sampled_from(self.held()))
        if what == "accept":
            self.run(m.Accepted(miner, job_id))
        elif what == "progress":
            self.run(m.Progressed(miner, job_pb2.JobProgress(job_id=job_id, step=1, total_steps=2)))
        elif what == "complete":
            rh = f"{job_id}-receipt"
            fields = job_pb2.Job(receipt_hash=rh, units=3, unit_type="gpu_ms",
                                 artifacts=[job_pb2.Artifact(sha256=f"{job_id}-png")])
            self.run(m.Completed(miner, job_id, fields, ((f"{job_id}-png", b"png"),),
                                 receipt_pb2.Receipt(receipt_hash=rh)), m.Dispatch())
        elif what == "reject":
            self.run(m.Rejected(miner, job_id, "wrong artifact hash"), m.Dispatch())
        else:
            self.run(m.Failed(miner, job_id, "boom", permanent=what == "fail_permanently"), m.Dispatch())

    @rule(miner=st.sampled_from(MINERS), data=st.data())
    def report_on_someone_elses_job(self, miner: str, data: st.DataObject) -> None:
        others = [(mid, j) for mid, j in self.held() if mid != miner]
        if not others:
            return
        _, job_id = data.draw(st.sampled_from(others))
        before = self.sm.job(job_id).SerializeToString()
        try:
            self.run(m.Completed(miner, job_id, job_pb2.Job(receipt_hash="forged"), (), receipt_pb2.Receipt()))
        except PermissionDenied:
            pass
        else:
            raise AssertionError("a miner completed a job it does not hold")
        assert self.sm.job(job_id).SerializeToString() == before

    # ---- time and restarts ----------------------------------------------------------------------

    @rule(seconds=st.sampled_from([0.5, 5.0, 16.0, 61.0]))
    def tick(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.run(m.Tick(), m.Dispatch())

    @rule()
    def restart(self) -> None:
        """The process dies; a new one reads the store. Miners must connect again."""
        self.sm = m.JobMachine(self.clock, LIMITS)
        restored = sorted(self.store.active_jobs(), key=lambda j: j.job_id)
        events: list[m.Event] = []
        for j in restored:
            finished = tuple(s for s in (self.store.get_job(x) for x in j.shard_job_ids)
                             if s is not None and s.state in jobs.TERMINAL)
            events.append(m.Restore(j, finished))
        self.run(*events, m.CheckSplitJobs())

    # ---- invariants ---------------------------------------------------------------------------------

    @invariant()
    def each_job_is_in_one_state_and_never_lost(self) -> None:
        if not hasattr(self, "sm"):
            return
        for job_id in self.submitted:
            live, stored = self.sm.job(job_id), self.store.get_job(job_id)
            assert stored is not None, f"{job_id} was never stored"
            if live is not None:
                assert live.state in jobs.ACTIVE
                assert stored.state == live.state  # the store has what the machine has
            else:
                assert stored.state in jobs.TERMINAL, f"{job_id} is neither active nor ended"
            j = live or stored
            assert j.attempts <= LIMITS.max_attempts
            steps = [(t.from_state, t.to_state) for t in j.story]
            assert steps and steps[-1][1] == j.state
            if not j.story_dropped:
                assert all(a[1] == b[0] for a, b in zip(steps, steps[1:], strict=False))

    @invariant()
    def never_held_by_two_miners(self) -> None:
        if not hasattr(self, "sm"):
            return
        holders: dict[str, str] = {}
        for miner, job_id in self.held():
            assert job_id not in holders, f"{job_id} held by {holders[job_id]} and {miner}"
            holders[job_id] = miner
            j = self.sm.job(job_id)
            assert j is not None and j.miner_id == miner and j.state in (S.JOB_STATE_ASSIGNED, S.JOB_STATE_RUNNING)
        for rec in self.sm.records.values():
            if rec.job.state in (S.JOB_STATE_ASSIGNED, S.JOB_STATE_RUNNING) and not rec.job.shard_job_ids:
                assert holders.get(rec.job.job_id) == rec.job.miner_id

    @invariant()
    def attested_at_most_once(self) -> None:
        if not hasattr(self, "sm"):
            return
        assert all(n == 1 for n in self.attested.values())
        for job_id in self.attested:
            assert self.store.get_job(job_id).state == S.JOB_STATE_COMPLETED


TestCoordinatorMachine = Coordinator.TestCase
TestCoordinatorMachine.settings = settings(max_examples=300, stateful_step_count=50, deadline=None,
                                           suppress_health_check=[HealthCheck.too_slow])
