"""The job state machine: the only place a job's state changes. Sans-IO.

`JobMachine.handle(*events)` takes what happened (a job submitted, a miner joined, a result that
passed its checks, a tick of the clock, ...) and returns instructions for a runtime to execute
(store these jobs, send this assignment, publish this snapshot, record this failure). It does no
I/O, reads time only from the clock it is given, and changes a job's state only through
`_move`, which refuses any step that is not in TRANSITIONS and appends the step to the job's
story. docs/coordinator.md has the table, the events and the instructions.

The machine owns: one record per active job (the job as stored plus what only matters while it is
active: when it was queued and assigned, the miners it must avoid), the queue, and the slots of
connected miners (what matching needs: their view and the jobs each holds). Reputation, receipts,
streams and the store belong to other units; the machine asks for their effects in instructions.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from aitbc import jobs
from aitbc.coordinator import eta, fees
from aitbc.coordinator.clock import Clock
from aitbc.errors import AitbcError, PermissionDenied
from aitbc.hub.matching import JobNeeds, MinerView, Unplaceable, choose
from aitbc.hub.sharding import Shard, merge_in_order
from aitbc.v1 import job_pb2, receipt_pb2

if TYPE_CHECKING:
    from aitbc.coordinator.store import ArtifactData

S = job_pb2.JobState
NEW, QUEUED, ASSIGNED, RUNNING = S.JOB_STATE_UNSPECIFIED, S.JOB_STATE_QUEUED, S.JOB_STATE_ASSIGNED, S.JOB_STATE_RUNNING
COMPLETED, FAILED, CANCELLED, EXPIRED = S.JOB_STATE_COMPLETED, S.JOB_STATE_FAILED, S.JOB_STATE_CANCELLED, S.JOB_STATE_EXPIRED

# (from, to) -> what the step means. Nothing else is a legal step.
TRANSITIONS: dict[tuple[int, int], str] = {
    (NEW, QUEUED): "submitted (or restored, or a re-execution created)",
    (QUEUED, ASSIGNED): "matched to a miner and sent to it",
    (QUEUED, RUNNING): "a split job: its first shard went to a miner",
    (ASSIGNED, RUNNING): "the miner accepted the job (JobAccepted, or its first progress, text or chunk)",
    (ASSIGNED, QUEUED): "requeued: miner lost, stalled, failed or its result was rejected; or a restart",
    (RUNNING, QUEUED): "requeued: miner lost, stalled, failed or its result was rejected; or a restart",
    (ASSIGNED, COMPLETED): "a result passed every check (no JobAccepted came first)",
    (RUNNING, COMPLETED): "a result passed every check; a split job: its last shard completed",
    (QUEUED, FAILED): "a split job: one of its shards ended without completing",
    (ASSIGNED, FAILED): "a permanent failure confirmed by a second miner (or no other can run it); attempts ran out",
    (RUNNING, FAILED): "a permanent failure confirmed by a second miner (or no other can run it); attempts ran "
                       "out; a shard failed",
    (QUEUED, CANCELLED): "cancelled by the client (or its split job ended)",
    (ASSIGNED, CANCELLED): "cancelled by the client (or its split job ended)",
    (RUNNING, CANCELLED): "cancelled by the client (or its split job ended)",
    (QUEUED, EXPIRED): "no miner took the job within queue_ttl_s (verify_timeout_s for a re-execution)",
}
STORY_LIMIT = 32  # transitions kept per job: the first (creation) and the last 31
FAILING_STREAK = 3


class IllegalTransition(AitbcError):
    """A step outside TRANSITIONS: a bug in the caller, never the user's fault."""

    code = "INTERNAL"


def state_name(state: int) -> str:
    return "NEW" if state == NEW else jobs.state_name(state)


# ---- events (what happened) ---------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Submit:
    """A new job (state NEW). `shards`: it is split, they are queued instead. `also_store`: jobs
    written in the same transaction (the original of a re-execution). A re-execution gives the
    miners it must not go to and the device class it must run on."""

    job: job_pb2.Job
    shards: tuple[job_pb2.Job, ...] = ()
    cause: str = "submitted"
    exclude: frozenset[str] = frozenset()
    device_class: str | None = None
    also_store: tuple[job_pb2.Job, ...] = ()


@dataclass(frozen=True, slots=True)
class Restore:
    """An active job read back from the store at start-up, or claimed from a shared store (several
    coordinators on one database: `why` a job some miner held goes back to the queue, `queued_for_s`
    how long a queued one has waited already). A split job brings its shards that had already
    finished; a re-execution its exclusions and device class (as in Submit)."""

    job: job_pb2.Job
    finished_shards: tuple[job_pb2.Job, ...] = ()
    exclude: frozenset[str] = frozenset()
    device_class: str | None = None
    why: str = ""
    queued_for_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Released:
    """These jobs are no longer this machine's (a shared store: given back to the shared queue, or
    their claim was taken over by another coordinator). No transition: the job leaves the machine
    as it is; a miner that holds one is told to drop it."""

    job_ids: tuple[str, ...]
    reason: str


@dataclass(frozen=True, slots=True)
class MinerJoined:
    view: MinerView


@dataclass(frozen=True, slots=True)
class MinerUpdated:
    """What matching knows of a connected miner changed (reputation, quarantine, failing)."""

    view: MinerView


@dataclass(frozen=True, slots=True)
class MinerLeft:
    """Its stream ended. `stalled`: it went silent while holding jobs (counts a stall)."""

    miner_id: str
    reason: str
    stalled: bool = False


@dataclass(frozen=True, slots=True)
class Heard:
    """The miner said something about one of its jobs (text, an artifact chunk)."""

    miner_id: str


@dataclass(frozen=True, slots=True)
class Accepted:
    """The miner started the job: a JobAccepted, or the first other word on a job still ASSIGNED
    (a text chunk, an artifact chunk; progress and results imply it themselves)."""

    miner_id: str
    job_id: str
    cause: str = "the miner accepted it"


@dataclass(frozen=True, slots=True)
class Progressed:
    miner_id: str
    progress: job_pb2.JobProgress


@dataclass(frozen=True, slots=True)
class Completed:
    """A result that passed every check (aitbc.coordinator.checks). `result` holds the fields the
    job takes from it; artifacts and the receipt are stored with the job in one transaction.
    `verification`: a re-execution job to queue in the same transaction (the job was sampled)."""

    miner_id: str
    job_id: str
    result: job_pb2.Job
    artifacts: tuple[tuple[str, ArtifactData], ...]  # sha256 and its bytes or finished upload file
    receipt: receipt_pb2.Receipt
    verification: Submit | None = None


@dataclass(frozen=True, slots=True)
class Rejected:
    """A result (or its stream) refused: the job goes elsewhere, the miner counts a failure."""

    miner_id: str
    job_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Failed:
    miner_id: str
    job_id: str
    reason: str
    permanent: bool


@dataclass(frozen=True, slots=True)
class Cancel:
    job_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed: expire jobs nobody took, take jobs back from miners that stalled."""


@dataclass(frozen=True, slots=True)
class CheckSplitJobs:
    """After Restore: a coordinator killed between a shard's end and its split job's end left the
    split job waiting for nothing; finish (or fail) such jobs now."""


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Hand queued jobs to free miners."""


Event = (Submit | Restore | Released | CheckSplitJobs | MinerJoined | MinerUpdated | MinerLeft | Heard | Accepted
         | Progressed | Completed | Rejected | Failed | Cancel | Tick | Dispatch)


# ---- instructions (what the runtime does) ---------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Store:
    """Write these jobs (as they are when executed: all of one handle call's changes), artifacts and
    receipts in one transaction. Always the first instruction of a handle call that changed jobs."""

    jobs: tuple[job_pb2.Job, ...]
    artifacts: tuple[tuple[str, ArtifactData], ...] = ()
    receipts: tuple[tuple[job_pb2.Job, receipt_pb2.Receipt], ...] = ()


@dataclass(frozen=True, slots=True)
class Assign:
    miner_id: str
    job: job_pb2.Job


@dataclass(frozen=True, slots=True)
class SendCancel:
    """Tell the miner to drop the job (and forget what it uploaded for it)."""

    miner_id: str
    job_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class SendRejected:
    miner_id: str
    job_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class SendAccepted:
    miner_id: str
    job_id: str
    receipt_hash: str


@dataclass(frozen=True, slots=True)
class Publish:
    """A snapshot (or progress) for the job's watchers."""

    job_id: str
    event: job_pb2.Job | job_pb2.JobProgress


@dataclass(frozen=True, slots=True)
class Moved:
    """A transition happened (metrics, the job log line, verification and settlement hooks)."""

    job: job_pb2.Job
    from_state: int
    to_state: int
    cause: str


@dataclass(frozen=True, slots=True)
class Record:
    """A reputation event for the miner."""

    miner_id: str
    kind: Literal["success", "failure", "stall"]
    draw: bool = False


@dataclass(frozen=True, slots=True)
class ResetText:
    """The job's streamed text starts again (requeued)."""

    job_id: str


Instruction = Store | Assign | SendCancel | SendRejected | SendAccepted | Publish | Moved | Record | ResetText


# ---- state ------------------------------------------------------------------------------------------

@dataclass(eq=False, slots=True)
class JobRecord:
    """One active job: the stored job and what matters only while it is active."""

    job: job_pb2.Job
    queued_at: float = 0.0
    assigned_at: float = 0.0
    excluded: set[str] = field(default_factory=set)  # miners whose result for it was rejected
    avoid: set[str] = field(default_factory=set)  # miners it failed or stalled on (elsewhere if possible)
    pinned: frozenset[str] = frozenset()  # a re-execution: miners that already ran the job
    device_class: str | None = None  # a re-execution: the device class of the original's miner
    stuck_epoch: int = -1  # the miner-set epoch in which no miner could take it
    finished_shards: dict[str, job_pb2.Job] = field(default_factory=dict)  # a split job's ended shards
    unconfirmed: tuple[str, str] | None = None  # (miner, reason) of a permanent failure another miner must confirm
    rate: int = 0  # a paid job's fee per unit in millionths (its place in the queue); 0: a free job


class JobRecords(dict[str, JobRecord]):
    """The active jobs by id, and how many each client has (a split job counts once: its shards do
    not), kept as records come and go, so a client's bound (`max_active_jobs`) is one lookup."""

    def __init__(self) -> None:
        super().__init__()
        self.per_client: collections.Counter[str] = collections.Counter()

    def _count(self, rec: JobRecord, n: int) -> None:
        if not rec.job.parent_job_id:
            self.per_client[rec.job.client_id] += n
            if self.per_client[rec.job.client_id] <= 0:
                del self.per_client[rec.job.client_id]

    def __setitem__(self, job_id: str, rec: JobRecord) -> None:
        old = self.get(job_id)
        if old is not None:
            self._count(old, -1)
        super().__setitem__(job_id, rec)
        self._count(rec, 1)

    def __delitem__(self, job_id: str) -> None:
        self._count(self[job_id], -1)
        super().__delitem__(job_id)

    def pop(self, job_id: str, *default: JobRecord | None) -> JobRecord | None:  # type: ignore[override]
        if job_id not in self:
            return default[0] if default else super().pop(job_id)
        rec = super().pop(job_id)
        self._count(rec, -1)
        return rec


class JobQueue:
    """Queued job ids in dispatch order: paid jobs first, highest fee per unit first (first come
    among equals), then free jobs in arrival order: the free tier is served whenever no paid job
    that a free miner could run is waiting. A requeued job goes to the front of its lane."""

    def __init__(self) -> None:
        self.free: collections.deque[str] = collections.deque()
        self.paid: list[tuple[int, int, str]] = []  # (-rate, seq, job id), sorted
        self._seq = itertools.count(1)
        self._front = itertools.count(-1, -1)
        self._popped: dict[str, tuple[int, int, str]] = {}

    def push(self, job_id: str, rate: int, *, front: bool = False) -> None:
        if rate <= 0:
            (self.free.appendleft if front else self.free.append)(job_id)
            return
        bisect.insort(self.paid, (-rate, next(self._front) if front else next(self._seq), job_id))

    def popleft(self) -> str:
        if self.paid:
            key = self.paid.pop(0)
            self._popped[key[2]] = key
            return key[2]
        return self.free.popleft()

    def unpop(self, job_ids: list[str]) -> None:
        """Put back jobs popped by this dispatch pass (in the order popped), each where it was."""
        free = []
        for job_id in job_ids:
            key = self._popped.get(job_id)
            if key is None:
                free.append(job_id)
            else:
                bisect.insort(self.paid, key)
        self.free.extendleft(reversed(free))
        self._popped.clear()

    def discard(self, job_id: str) -> None:
        """Take a queued job out (it left the machine without being dispatched)."""
        try:
            self.free.remove(job_id)
        except ValueError:
            self.paid = [k for k in self.paid if k[2] != job_id]

    def __iter__(self) -> Iterator[str]:
        for key in self.paid:
            yield key[2]
        yield from self.free

    def __len__(self) -> int:
        return len(self.paid) + len(self.free)


@dataclass(eq=False, slots=True)
class MinerSlot:
    view: MinerView
    held: set[str] = field(default_factory=set)
    active_at: float = 0.0  # last word about any of its jobs (stall detection)
    latency_ms: float = 0.0  # EWMA of assignment -> accepted result


class Recorder(Protocol):
    def encode(self, events: tuple[Event, ...]) -> object: ...
    def write(self, t: float, t_ms: int, encoded: object, out: list[Instruction], *, raised: str = "") -> None: ...


@dataclass(frozen=True, slots=True)
class Limits:
    max_attempts: int = 3
    queue_ttl_s: float = 600.0
    verify_timeout_s: float = 120.0
    stall_timeout_s: float = 60.0
    max_run_s: float = float("inf")  # an attempt's longest hold, whatever its miner says (CoordinatorConfig)


class JobMachine:
    def __init__(self, clock: Clock, limits: Limits = Limits(), *,
                 watched: Callable[[str], bool] = lambda job_id: True) -> None:
        self.clock = clock
        self.limits = limits
        self.watched = watched  # snapshots are copied only for jobs someone watches
        self.recorder: Recorder | None = None  # aitbc.coordinator.eventlog.EventLog when event_log is set
        self._t, self._t_ms = clock.monotonic(), clock.now_ms()  # the instant of the current handle call
        self.records = JobRecords()
        self.queue = JobQueue()
        self.miners: dict[str, MinerSlot] = {}
        self._epoch = 0  # bumped whenever the set of miners (or a quarantine) changes
        self._rr = itertools.count()
        self._out: list[Instruction] = []
        self._dirty: dict[str, job_pb2.Job] = {}
        self._artifacts: list[tuple[str, ArtifactData]] = []
        self._receipts: list[tuple[job_pb2.Job, receipt_pb2.Receipt]] = []
        self.service = eta.ServiceTimes()  # measured assignment -> result times, for queue ETAs

    # ---- queries (no change of state) ------------------------------------------------------------

    def job(self, job_id: str) -> job_pb2.Job | None:
        rec = self.records.get(job_id)
        return rec.job if rec is not None else None

    def held(self, miner_id: str, job_id: str) -> job_pb2.Job:
        """The job, if this miner holds it now; else PermissionDenied (miners report only on their jobs)."""
        slot = self.miners.get(miner_id)
        rec = self.records.get(job_id)
        if slot is None or rec is None or job_id not in slot.held or rec.job.miner_id != miner_id:
            raise PermissionDenied(f"job {job_id[:64]} is not assigned to miner {miner_id}")
        return rec.job

    def held_since(self, job_id: str) -> float:
        """Monotonic seconds at which the job's current miner got it."""
        rec = self.records.get(job_id)
        return rec.assigned_at if rec is not None else self.clock.monotonic()

    def queued(self) -> int:
        return sum(1 for j in self.queue if j in self.records and self.records[j].job.state == QUEUED)

    def running(self, miner_id: str) -> int:
        slot = self.miners.get(miner_id)
        return len(slot.held) if slot is not None else 0

    def view(self, miner_id: str) -> MinerView | None:
        slot = self.miners.get(miner_id)
        if slot is None:
            return None
        return dataclasses.replace(slot.view, running=len(slot.held), recent_latency_ms=slot.latency_ms)

    def queue_infos(self, wanted: Iterable[str]) -> dict[str, job_pb2.QueueInfo]:
        """Queue position and ETA (aitbc.coordinator.eta) of each wanted job that is QUEUED; a split
        job has its first queued shard's."""
        pos = eta.positions(self._queued_up_to(set(wanted)))
        views = [v for v in (self.view(m) for m in self.miners) if v is not None]
        out = {}
        for job_id in wanted:
            rec = self.records.get(job_id)
            if rec is None or rec.job.state != QUEUED:
                continue
            ids = [s for s in rec.job.shard_job_ids if s in pos] or [job_id]
            first = min(ids, key=lambda j: pos.get(j, 1 << 30))
            if first not in pos:
                continue
            needs = self.needs(self.records[first].job, self.records[first])
            able = [v for v in views if not isinstance(choose([dataclasses.replace(v, running=0)], needs, 0), Unplaceable)]
            capacity = eta.Capacity(sum(v.max_concurrency for v in able),
                                    sum(max(0, v.max_concurrency - v.running) for v in able))
            out[job_id] = eta.queue_info(pos[first], capacity, self.service.quantiles(rec.job.model))
        return out

    def _queued_up_to(self, wanted: set[str]) -> Iterator[job_pb2.Job]:
        """Queued jobs in queue order, up to the last of `wanted` (or its shards) met."""
        left = set(wanted)
        for w in wanted:
            rec = self.records.get(w)
            if rec is not None:
                left.update(rec.job.shard_job_ids)
        for j in self.queue:
            if not left:
                return
            rec = self.records.get(j)
            if rec is not None and rec.job.state == QUEUED and not rec.job.shard_job_ids:
                left.discard(j)
                yield rec.job

    def idle_views(self) -> list[MinerView]:
        """Every connected miner as if it had nothing running: who could ever take a job."""
        return [dataclasses.replace(s.view, running=0, recent_latency_ms=s.latency_ms) for s in self.miners.values()]

    def needs(self, job: job_pb2.Job, rec: JobRecord | None = None) -> JobNeeds:
        p = job.params.image
        rec = rec if rec is not None else self.records.get(job.job_id)
        exclude: set[str] = set()
        avoid: frozenset[str] = frozenset()
        device = None
        if rec is not None:
            exclude = rec.excluded | rec.pinned
            avoid = frozenset(rec.avoid)
            device = rec.device_class
        return JobNeeds(
            model=job.model, kind="text" if jobs.job_kind(job) == jobs.TEXT else "image",
            width=p.width, height=p.height, images=p.images or 1,
            max_price_per_unit=job.max_price_per_unit if job.HasField("max_price_per_unit") else None,
            exclude=frozenset(exclude), device_class=device, avoid=avoid, established_only=bool(job.verify_of),
        )

    # ---- the one entry point --------------------------------------------------------------------------

    def handle(self, *events: Event) -> list[Instruction]:
        """Apply events in order; return what to do. Time is read once: the whole call happens at
        one instant (so a recorded call replays exactly). An event that raises (a miner reporting
        on a job it does not hold) changes nothing; what earlier events of the call decided is
        returned by the next call."""
        self._t, self._t_ms = self.clock.monotonic(), self.clock.now_ms()
        encoded = self.recorder.encode(events) if self.recorder is not None else None
        try:
            for event in events:
                self._handle(event)
        except AitbcError as exc:
            if self.recorder is not None:
                self.recorder.write(self._t, self._t_ms, encoded, [], raised=exc.code)
            raise
        out, self._out = self._out, []
        if self._dirty:
            out.insert(0, Store(tuple(self._dirty.values()), tuple(self._artifacts), tuple(self._receipts)))
            self._dirty, self._artifacts, self._receipts = {}, [], []
        if self.recorder is not None:
            self.recorder.write(self._t, self._t_ms, encoded, out)
        return out

    def _handle(self, ev: Event) -> None:
        if isinstance(ev, Dispatch):
            self._dispatch()
        elif isinstance(ev, Heard):
            slot = self.miners.get(ev.miner_id)
            if slot is not None:
                slot.active_at = self._t
        elif isinstance(ev, Progressed):
            self._progressed(ev)
        elif isinstance(ev, Accepted):
            self._started(self._held(ev.miner_id, ev.job_id), ev.miner_id, ev.cause)
        elif isinstance(ev, Completed):
            self._completed(ev)
        elif isinstance(ev, Rejected):
            self._rejected(ev)
        elif isinstance(ev, Failed):
            self._failed(ev)
        elif isinstance(ev, Submit):
            self._submit(ev)
        elif isinstance(ev, Restore):
            self._restore(ev)
        elif isinstance(ev, Released):
            self._released(ev)
        elif isinstance(ev, Cancel):
            rec = self.records.get(ev.job_id)
            if rec is not None:
                self._stop(rec.job, CANCELLED, ev.reason)
        elif isinstance(ev, MinerJoined | MinerUpdated):
            slot = self.miners.get(ev.view.miner_id)
            if slot is None:
                if isinstance(ev, MinerUpdated):
                    return  # it left meanwhile
                self.miners[ev.view.miner_id] = MinerSlot(ev.view, active_at=self._t)
                self._epoch += 1
            else:
                if isinstance(ev, MinerJoined) or slot.view.quarantined != ev.view.quarantined:
                    self._epoch += 1  # who can take a job changed: stuck jobs are matched again
                slot.view = ev.view
        elif isinstance(ev, MinerLeft):
            self._miner_left(ev)
        elif isinstance(ev, Tick):
            self._tick()
        elif isinstance(ev, CheckSplitJobs):
            for rec in [r for r in self.records.values() if r.job.shard_job_ids]:
                self._check_parent(rec)
        else:  # pragma: no cover - the Event union is closed
            raise TypeError(f"unknown event {ev!r}")

    # ---- transitions -----------------------------------------------------------------------------

    def _move(self, job: job_pb2.Job, to: int, cause: str, *, miner_id: str = "") -> None:
        frm = job.state
        if (frm, to) not in TRANSITIONS:
            raise IllegalTransition(f"job {job.job_id}: {state_name(frm)} -> {state_name(to)} is not a transition "
                                    f"({cause})")
        now = self._t_ms
        job.state = to  # type: ignore[assignment]
        job.updated_at_unix_ms = now
        if len(job.story) >= STORY_LIMIT:
            del job.story[1]  # keep the creation, drop the oldest after it
            job.story_dropped += 1
        job.story.append(job_pb2.JobTransition(at_unix_ms=now, from_state=frm, to_state=to, cause=cause[:300],  # type: ignore[arg-type]
                                               miner_id=miner_id))
        self._dirty[job.job_id] = job
        self._out.append(Moved(job, frm, to, cause))
        if self.watched(job.job_id):
            snap = job_pb2.Job()
            snap.CopyFrom(job)
            self._out.append(Publish(job.job_id, snap))

    def _enqueue(self, rec: JobRecord, *, front: bool = False) -> None:
        self.records[rec.job.job_id] = rec
        self.queue.push(rec.job.job_id, rec.rate, front=front)
        rec.queued_at = self._t

    def _rate(self, job: job_pb2.Job) -> int:
        """A paid job's fee per unit (a shard has its parent's); 0 for a free job."""
        if job.quote:
            charge = fees.charge_of(job)
            return charge.rate if charge is not None else 0
        parent = self.records.get(job.parent_job_id) if job.parent_job_id else None
        return parent.rate if parent is not None else 0

    def _submit(self, ev: Submit) -> None:
        job = ev.job
        job.created_at_unix_ms = job.created_at_unix_ms or self._t_ms
        for j in ev.also_store:
            self._dirty[j.job_id] = j
        rec = JobRecord(job, pinned=ev.exclude, device_class=ev.device_class, rate=self._rate(job))
        self._move(job, QUEUED, ev.cause)
        if not ev.shards:
            self._enqueue(rec)
            return
        self.records[job.job_id] = rec
        for shard in ev.shards:
            self._move(shard, QUEUED, f"shard of job {job.job_id}")
            self._enqueue(JobRecord(shard, rate=rec.rate))

    def _restore(self, ev: Restore) -> None:
        job = ev.job
        rec = JobRecord(job, pinned=ev.exclude, device_class=ev.device_class,
                        finished_shards={s.job_id: s for s in ev.finished_shards}, rate=self._rate(job))
        if job.shard_job_ids:  # a split job waits for its shards, restored on their own
            self.records[job.job_id] = rec
            return
        if job.state != QUEUED:
            why = ev.why or "the coordinator restarted while a miner held the job"
            if job.attempts >= self.limits.max_attempts:  # a restart is a lost attempt like any other
                self.records[job.job_id] = rec
                self._finish(job, FAILED, f"gave up after {job.attempts} attempts; last: {why}")
                return
            job.miner_id = ""
            job.ClearField("progress")
            self._move(job, QUEUED, why)
            job.wait_reason = f"requeued: {why}"
        self._enqueue(rec)
        rec.queued_at -= ev.queued_for_s

    def _released(self, ev: Released) -> None:
        for job_id in ev.job_ids:
            rec = self.records.pop(job_id, None)
            if rec is None:
                continue
            miner = self._release(rec.job)
            if miner:
                self._out.append(SendCancel(miner, job_id, ev.reason))
            else:
                self.queue.discard(job_id)
            self._dirty.pop(job_id, None)  # nothing of it is written by this machine any more

    def _dispatch(self) -> None:
        """Hand queued jobs to miners: aitbc.hub.matching scores model, kind, VRAM fit, price,
        reputation, load and latency; round-robin among equals. Jobs no miner can take stay queued
        (and are not matched again until the set of miners changes)."""
        if not self.queue or not self.miners:
            return
        views = {m: self.view(m) for m in self.miners}
        free = sum(v.max_concurrency - v.running for v in views.values() if v and v.running < v.max_concurrency)
        skipped: list[str] = []
        while self.queue and free:
            job_id = self.queue.popleft()
            rec = self.records.get(job_id)
            if rec is None or rec.job.state != QUEUED or rec.job.shard_job_ids:
                continue
            if rec.stuck_epoch == self._epoch:
                skipped.append(job_id)
                continue
            outcome = choose(views.values(), self.needs(rec.job, rec), next(self._rr))  # type: ignore[arg-type]
            if isinstance(outcome, Unplaceable):
                skipped.append(job_id)
                if not outcome.wait:
                    rec.job.wait_reason = outcome.reason  # shown by GetJob while the job waits
                if outcome.code != "busy":
                    rec.stuck_epoch = self._epoch
                continue
            rec.stuck_epoch = -1
            self._assign(rec, outcome.miner_id)
            views[outcome.miner_id] = self.view(outcome.miner_id)
            free -= 1
        self.queue.unpop(skipped)

    def _assign(self, rec: JobRecord, miner_id: str) -> None:
        job = rec.job
        slot = self.miners[miner_id]
        job.miner_id = miner_id
        job.attempts += 1
        job.price_per_unit = slot.view.price_per_unit
        job.wait_reason = ""
        self._move(job, ASSIGNED, f"attempt {job.attempts}: sent to miner {miner_id}", miner_id=miner_id)
        slot.held.add(job.job_id)
        rec.assigned_at = self._t
        parent = self.records.get(job.parent_job_id) if job.parent_job_id else None
        if parent is not None and parent.job.state == QUEUED:
            self._move(parent.job, RUNNING, f"shard {job.job_id} went to miner {miner_id}", miner_id=miner_id)
            parent.job.started_at_unix_ms = parent.job.updated_at_unix_ms
        self._out.append(Assign(miner_id, job))

    def _held(self, miner_id: str, job_id: str) -> job_pb2.Job:
        job = self.held(miner_id, job_id)
        self.miners[miner_id].active_at = self._t
        return job

    def _release(self, job: job_pb2.Job) -> str:
        """The job's miner no longer holds it. Returns that miner's id ("" when none did)."""
        slot = self.miners.get(job.miner_id)
        if slot is not None and job.job_id in slot.held:
            slot.held.discard(job.job_id)
            return job.miner_id
        return ""

    def _requeue(self, job: job_pb2.Job, reason: str) -> None:
        rec = self.records[job.job_id]
        rec.assigned_at = 0.0
        self._release(job)
        if job.attempts >= self.limits.max_attempts:
            self._finish(job, FAILED, f"gave up after {job.attempts} attempts; last: {reason}")
            return
        rec.stuck_epoch = -1  # its exclusions may have changed: match it afresh
        job.miner_id = ""
        job.ClearField("progress")
        self._move(job, QUEUED, reason)
        job.wait_reason = f"requeued: {reason}"
        self._out.append(ResetText(job.job_id))
        self._enqueue(rec, front=True)

    def _finish(self, job: job_pb2.Job, state: int, error: str) -> None:
        self._release(job)
        job.error = error
        job.wait_reason = ""
        job.finished_at_unix_ms = self._t_ms
        self._move(job, state, error or "completed")
        self.records.pop(job.job_id, None)
        if job.parent_job_id:
            parent = self.records.get(job.parent_job_id)
            if parent is not None:
                parent.finished_shards[job.job_id] = job
                self._check_parent(parent)

    def _stop(self, job: job_pb2.Job, state: int, why: str) -> None:
        """End an unfinished job now (and its shards), telling the miner that holds it."""
        miner = self._release(job)
        if miner:
            self._out.append(SendCancel(miner, job.job_id, why))
        self._finish(job, state, why)
        for shard_id in job.shard_job_ids:
            shard = self.records.get(shard_id)
            if shard is not None:
                self._stop(shard.job, CANCELLED, f"job {job.job_id} ended: {why}")

    def _check_parent(self, parent: JobRecord) -> None:
        """A split job completes when all its shards did (images merged in order), and fails when
        one cannot finish (the others are stopped)."""
        job = parent.job
        if job.state in jobs.TERMINAL:
            return
        done = []
        for shard_id in job.shard_job_ids:
            sh = parent.finished_shards.get(shard_id)
            if sh is None:
                if shard_id in self.records:
                    continue
                return  # neither active nor known to have ended: wait (it cannot happen; never guess)
            if sh.state != COMPLETED:
                last = sh.first_image + sh.params.image.images
                self._stop(job, FAILED,
                           f"shard for images {sh.first_image + 1}-{last} {jobs.state_name(sh.state)}: {sh.error}")
                return
            done.append(sh)
        if len(done) < len(job.shard_job_ids):
            return
        plan = [Shard(i, sh.first_image, sh.params.image.images) for i, sh in enumerate(done)]
        merged = merge_in_order(plan, [(i, list(sh.artifacts)) for i, sh in enumerate(done)])
        if merged.artifacts is None:  # every shard's artifact count was checked with its result
            self._stop(job, FAILED, f"cannot merge the shards: {merged.reason()}")
            return
        job.artifacts.extend(merged.artifacts)
        job.units = sum(sh.units for sh in done)
        job.gpu_ms = sum(sh.gpu_ms for sh in done)
        job.unit_type = done[0].unit_type
        job.miner_id = ",".join(dict.fromkeys(sh.miner_id for sh in done))
        self._finish(job, COMPLETED, "")

    # ---- miner events ------------------------------------------------------------------------------

    def _started(self, job: job_pb2.Job, miner_id: str, cause: str) -> None:
        if job.state == ASSIGNED:
            self._move(job, RUNNING, cause, miner_id=miner_id)
            job.started_at_unix_ms = job.updated_at_unix_ms

    def _progressed(self, ev: Progressed) -> None:
        """A miner's step count is its scheduler's (it may run other than the steps asked for): its
        total is taken as reported, the step within it, and the job's progress never goes back in an
        attempt (docs/coordinator.md, "Miner protocol", Progress)."""
        job = self._held(ev.miner_id, ev.progress.job_id)
        self._started(job, ev.miner_id, "the miner reported progress (it started the job)")
        total = max(ev.progress.total_steps, 1)
        step = min(ev.progress.step, total)
        was = job.progress
        if was.total_steps and step * was.total_steps < was.step * total:
            return  # behind what the job already showed: a later message never takes it back
        p = job_pb2.JobProgress(job_id=job.job_id, step=step, total_steps=total)
        job.progress.CopyFrom(p)
        self._out.append(Publish(job.job_id, p))
        parent = self.records.get(job.parent_job_id) if job.parent_job_id else None
        if parent is not None:  # a split job's progress: steps done over all its shards
            per_shard = jobs.job_steps_total(parent.job)  # every shard runs the job's steps; an ended one ran them all
            steps = sum(_steps_of(self.records[j].job.progress, per_shard) if j in self.records else per_shard
                        for j in parent.job.shard_job_ids)
            total = per_shard * len(parent.job.shard_job_ids)
            parent.job.progress.CopyFrom(job_pb2.JobProgress(job_id=parent.job.job_id, step=steps, total_steps=total))
            self._out.append(Publish(parent.job.job_id, job_pb2.JobProgress(job_id=parent.job.job_id, step=steps,
                                                                            total_steps=total)))

    def _completed(self, ev: Completed) -> None:
        job = self._held(ev.miner_id, ev.job_id)
        rec = self.records[job.job_id]
        took = (self._t - rec.assigned_at) * 1000
        self.service.add(job.model, took / 1000)
        slot = self.miners[ev.miner_id]
        slot.latency_ms = took if not slot.latency_ms else 0.8 * slot.latency_ms + 0.2 * took
        self._out.append(Record(ev.miner_id, "success", draw=not job.verify_of))
        if rec.unconfirmed is not None:  # it could run after all: the miner that said it cannot pays
            self._out.append(Record(rec.unconfirmed[0], "failure"))
        r = ev.result
        job.artifacts.extend(r.artifacts)
        job.device_class, job.receipt_hash, job.units, job.unit_type = r.device_class, r.receipt_hash, r.units, r.unit_type
        job.gpu_ms = r.gpu_ms
        job.prompt_tokens, job.generated_tokens, job.finish_reason = r.prompt_tokens, r.generated_tokens, r.finish_reason
        job.text_batching = r.text_batching
        if r.HasField("text_trace"):
            job.text_trace.CopyFrom(r.text_trace)
        job.verification = r.verification
        job.verification_job_ids.extend(r.verification_job_ids)
        self._artifacts.extend(ev.artifacts)
        self._receipts.append((job, ev.receipt))
        self._finish(job, COMPLETED, "")
        self._out.append(SendAccepted(ev.miner_id, job.job_id, r.receipt_hash))
        if ev.verification is not None:
            self._submit(ev.verification)

    def _rejected(self, ev: Rejected) -> None:
        job = self.held(ev.miner_id, ev.job_id)
        self.records[job.job_id].excluded.add(ev.miner_id)
        self._out.append(SendRejected(ev.miner_id, job.job_id, ev.reason))
        self._out.append(Record(ev.miner_id, "failure"))
        self._requeue(job, f"result from miner {ev.miner_id} rejected: {ev.reason}")

    def _failed(self, ev: Failed) -> None:
        job = self._held(ev.miner_id, ev.job_id)
        reason = ev.reason[:500] or "no reason given"
        rec = self.records[job.job_id]
        if ev.permanent:  # the request's fault, if another miner agrees (a miner's word alone costs it nothing)
            if rec.unconfirmed is not None and rec.unconfirmed[0] != ev.miner_id:
                self._finish(job, FAILED, f"miner {ev.miner_id}: {reason} (confirmed: miner {rec.unconfirmed[0]} "
                                          f"reported {rec.unconfirmed[1]!r})")
                return
            rec.excluded.add(ev.miner_id)
            elsewhere = choose(self.idle_views(), self.needs(job, rec), 0)
            if isinstance(elsewhere, Unplaceable) and elsewhere.code != "busy":
                self._finish(job, FAILED, f"miner {ev.miner_id}: {reason} (not confirmed: no other miner can run it)")
                return
            rec.unconfirmed = (ev.miner_id, reason)
            self._requeue(job, f"miner {ev.miner_id} reports the job cannot run ({reason}); another miner confirms")
            return
        # a miner that cannot run what it advertised loses reputation; the job goes elsewhere
        self._out.append(Record(ev.miner_id, "failure"))
        rec.avoid.add(ev.miner_id)
        self._requeue(job, f"miner {ev.miner_id} failed: {reason}")

    def _miner_left(self, ev: MinerLeft) -> None:
        slot = self.miners.pop(ev.miner_id, None)
        if slot is None:
            return
        self._epoch += 1
        if ev.stalled and slot.held:
            self._out.append(Record(ev.miner_id, "stall"))
        for job_id in sorted(slot.held, key=self._order):
            rec = self.records.get(job_id)
            if rec is not None and rec.job.miner_id == ev.miner_id:
                self._requeue(rec.job, f"miner {ev.miner_id} lost: {ev.reason}")
        slot.held.clear()

    def _order(self, job_id: str) -> tuple[float, str]:
        """A miner's jobs in the order it got them. Jobs assigned in one call share the instant, so
        the id breaks the tie: a set's order changes from process to process (hash seeds), and the
        event log's replay must requeue them in the order the live machine did."""
        rec = self.records.get(job_id)
        return (rec.assigned_at if rec is not None else 0.0), job_id

    # ---- time --------------------------------------------------------------------------------------

    def _tick(self) -> None:
        now = self._t
        for miner_id, slot in list(self.miners.items()):
            if not slot.held:
                continue
            # a working miner talks about some job; a miner may queue jobs internally, so it is
            # silent only when it said nothing since the last of its jobs was assigned
            since = max(slot.active_at, *(self.held_since(j) for j in slot.held))
            quiet = now - since
            # whatever it says, no attempt outlives max_run_s (one repeated word is not progress)
            overdue = {j for j in slot.held if now - self.held_since(j) > self.limits.max_run_s}
            if quiet <= self.limits.stall_timeout_s and not overdue:
                continue
            why = f"miner {miner_id} made no progress for {quiet:.0f} s (stall_timeout_s {self.limits.stall_timeout_s:g})"
            if quiet <= self.limits.stall_timeout_s:
                why = f"miner {miner_id} held the job past max_run_s {self.limits.max_run_s:g} s"
            for job_id in sorted(slot.held if quiet > self.limits.stall_timeout_s else overdue, key=self._order):
                self._out.append(SendCancel(miner_id, job_id, why))
                self._out.append(Record(miner_id, "stall"))
                rec = self.records.get(job_id)
                if rec is not None and rec.job.miner_id == miner_id:
                    rec.avoid.add(miner_id)
                    self._requeue(rec.job, why)
                else:
                    slot.held.discard(job_id)
        for rec in [self.records[j] for j in self.queue if j in self.records]:
            job = rec.job
            ttl = self.limits.verify_timeout_s if job.verify_of else self.limits.queue_ttl_s
            if job.state == QUEUED and not job.shard_job_ids and now - rec.queued_at > ttl:
                self._finish(job, EXPIRED, f"no miner took the job within {ttl:g} s")


def _steps_of(progress: job_pb2.JobProgress, per_shard: int) -> int:
    """A shard's progress in the job's own steps: a miner's total may differ from them, so its part
    is scaled (its step is within its total: no shard counts more than the steps it was asked for)."""
    return progress.step * per_shard // progress.total_steps if progress.total_steps else 0


def transitions_of(jobs_: Iterable[job_pb2.Job]) -> list[tuple[str, str, str]]:
    """(from, to, cause) of every step in the jobs' stories, in order (tests and `--story`)."""
    return [(state_name(t.from_state), state_name(t.to_state), t.cause) for j in jobs_ for t in j.story]
