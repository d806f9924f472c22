"""The coordinator: a runtime around the job machine, composed of units that each own their state.

- aitbc.coordinator.auth: API keys and rate limits
- aitbc.coordinator.registry: challenges, sessions, Work streams, served models
- aitbc.coordinator.machine: the job state machine (sans-IO): jobs, queue, who holds what
- aitbc.coordinator.checks: result checks (pure)
- aitbc.coordinator.streams: watchers and streamed text
- aitbc.coordinator.verification: re-execution sampling and arbitration
- aitbc.coordinator.receipt_book: the one writer of settlement state
- aitbc.coordinator.store: the JobStore protocol (LMDB, memory)

`Coordinator` turns calls (a client's SubmitJob, a miner's WorkRequest, a housekeeping tick) into
machine events and executes the instructions that come back: store writes, sends to miners,
publishes to watchers, metrics, reputation. Pure asyncio, no gRPC: server/coordinator.py is a
thin layer over it. docs/coordinator.md describes the states, events and instructions.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Callable, Collection, Iterator
from datetime import UTC, datetime
from typing import Any

from aitbc import crypto, jobs, metrics, quotes, telemetry
from aitbc.config import ClientKey, CoordinatorConfig, expand
from aitbc.coordinator import fees
from aitbc.coordinator import machine as m
from aitbc.coordinator.auth import ClientAuth
from aitbc.coordinator.checks import Expected, check_result, token_bounds
from aitbc.coordinator.clock import Clock, SystemClock
from aitbc.coordinator.models import ModelRegistry, declared, from_config
from aitbc.coordinator.receipt_book import ReceiptBook
from aitbc.coordinator.registry import MinerConn, MinerRegistry, MinerSession, device_class
from aitbc.coordinator.store import AsyncArtifact, JobStore
from aitbc.coordinator.streams import EVENT_PROGRESS, EVENT_TEXT, JobStreams
from aitbc.coordinator.uploads import Uploads
from aitbc.coordinator.verification import Verifier
from aitbc.coordinator.webhooks import Webhooks
from aitbc.errors import (
    Aborted,
    AitbcError,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from aitbc.hub.matching import JobNeeds, MinerView, Unplaceable, choose, score
from aitbc.hub.reputation import MinerRecord, ReputationBook, ReputationPolicy
from aitbc.hub.sharding import plan_shards, shard_seed
from aitbc.v1 import coordinator_pb2, job_pb2, miner_pb2, receipt_pb2
from aitbc.wire import receipt_to_proto

S = job_pb2.JobState
log = logging.getLogger("aitbc.coordinator")
job_log = logging.getLogger("aitbc.jobs")
RECONCILE_S = 10.0
HELD = frozenset({S.JOB_STATE_ASSIGNED, S.JOB_STATE_RUNNING})  # states in which a miner holds a job
COLLECT_EVERY_S = 10.0  # artifact garbage collection: a pass this often (at once again after a full one)
COLLECT_BATCH = 500  # artifacts deleted per pass at most: a pass never stalls the event loop for long
COLLECT_HOLD_MS = 60_000  # an expired artifact a held receipt still needs is looked at again this much later
REPUTATION_STEP = 0.01
SERVED_META = "served_models"  # the models served lately (MinerRegistry.served_record), kept across restarts
QUOTE_META = "quote:"  # quote id -> "job id expires_at": each quote pays for one job (pruned once expired)
QUOTE_PRUNE_S = 60.0
MARKET_FILLS = 100  # completed jobs GetMarket shows (nothing in them names a client, a prompt or a job)
MAX_STAKES_SHOWN = 4096  # stake figures kept for ListMiners (pruned to the connected miners beyond 4x this)
SERVED_SAVE_S = 10.0  # while miners are connected, how often that record is refreshed (a kill -9 loses less)
# several coordinators on one database (a shared store; docs/scaling.md)
REAP_S = 1.0  # how often the reaper takes over jobs of dead owners and expired leases, and reads the served models
REAP_BATCH = 100
REQUEST_WAIT_S = 5.0  # a request id another coordinator holds: how long to wait for its job's row
SKIP_S = 5.0  # a job this coordinator claimed and could not place is not claimed again here for this long
# a reservation whose job row is still missing this long after the reaper first saw it is deleted: a paid
# SubmitJob reserves and writes its job in one step of the event loop (no await between; each statement
# bounded by the database, the connection by its 10 s timeout), so only a coordinator that died in
# between leaves one; the escrow looks that much smaller until then
ORPHAN_GRACE_S = 600.0
TAKEN_OVER = "another coordinator took the job over (this coordinator's claim on it expired)"
WATCH_POLL_S = 0.5  # WatchJob of a job another coordinator runs: its row (and its events) read this often
# progress and text of a job across coordinators (job_events, watchers; docs/scaling.md)
EVENT_FLUSH_S = 0.01  # an owner's progress and text for watchers elsewhere: written in one batch this often
WATCHED_CACHE_S = 0.5  # an owner asks whether another coordinator watches a job at most this often
WATCHER_TTL_S = 10.0  # a watcher row lives this long unless refreshed (a dead coordinator's rows expire)
WATCHER_REFRESH_S = 2.0
EVENT_KEEP_S = 600.0  # event rows of finished jobs are deleted after this long
EVENT_PRUNE_BATCH = 1000
EVENT_READ_BATCH = 1000
PROGRESS_ROWS_KEPT = 64  # a job's newest progress rows kept (text is bounded by MAX_STREAMED_CHARS)


class Coordinator:
    def __init__(self, store: JobStore, key: crypto.PrivateKey, config: CoordinatorConfig, *,
                 clock: Clock | None = None) -> None:
        self.store = store
        self.key = key
        self.config = config
        self.time = clock or SystemClock()
        self.auth = ClientAuth(config.clients, self._monotonic)
        self.registry = MinerRegistry(self._monotonic, model_grace_s=config.model_grace_s)
        self.streams = JobStreams()
        self.uploads = Uploads(expand(config.data_dir) / "uploads", max_job_bytes=config.max_artifact_bytes,
                               max_miner_bytes=config.max_upload_bytes_per_miner,
                               max_total_bytes=config.max_upload_bytes_in_flight,
                               spool_bytes=config.upload_spool_bytes)
        if self.uploads.removed_at_start:
            log.info("removed %d partial uploads left by the last run", self.uploads.removed_at_start)
        self.models = ModelRegistry(store, from_config(config.models), allow_new=config.allow_new_models,
                                    default_max_price=config.default_max_price_per_unit)
        self.machine = m.JobMachine(self.time, m.Limits(
            max_attempts=config.max_attempts, queue_ttl_s=config.queue_ttl_s,
            verify_timeout_s=config.verify_timeout_s, stall_timeout_s=config.stall_timeout_s,
            max_run_s=config.max_run_s,
        ), watched=self.streams.watched)
        self.event_log = None
        if config.event_log:
            from aitbc.coordinator.eventlog import EventLog

            self.event_log = self.machine.recorder = EventLog(expand(config.event_log), self.machine.limits)
        self.book = ReputationBook(store.reputation(), policy=ReputationPolicy(
            quarantine_after=config.quarantine_after, probation_checks=config.probation_checks))
        self.receipts = ReceiptBook(store, settles=bool(config.ledger))
        self.shared = store.shared  # other coordinators use the same store: jobs are claimed (docs/scaling.md)
        if self.shared:
            store.lease_s = 2 * config.heartbeat_timeout_s  # type: ignore[attr-defined]
        self._skip: dict[str, float] = {}  # job id -> until when this coordinator does not claim it again
        self._reaped_at = self._renewed_at = self._watchers_at = 0.0
        # the owner's side of job events: is a job watched elsewhere (and when that was read), the rows to write
        self._watched_elsewhere: dict[str, tuple[bool, float]] = {}
        self._events_out: list[tuple[str, int, job_pb2.JobProgress | job_pb2.TextChunk]] = []
        self._events_timer: asyncio.TimerHandle | None = None
        # the watcher's side: per job run elsewhere, the last event id read, its attempt, its last state published
        self._event_last: dict[str, int] = {}
        self._remote_attempt: dict[str, int] = {}
        self._remote_seen: dict[str, tuple[int, int]] = {}
        self._events_lock = asyncio.Lock()  # one read of job_events at a time (each row published once)
        self._events_pull: asyncio.Task[None] | None = None  # the doorbell's or the poll's read, in the background
        self._events_again = False  # rows announced while that read ran: read once more
        # paid jobs (docs/economy.md): what is reserved of each client's escrow, and the ledger
        # that holds the escrow (set by the server when a ledger is configured; None: free jobs only)
        # on a shared store the reservations are its rows (PostgresReservations: the same methods)
        self.reservations = store.reservations() if store.shared else fees.Reservations()  # type: ignore[attr-defined]
        self.stakes: dict[str, int] = {}  # miner -> its stake as last read (ListMiners shows it)
        self.fills: collections.deque[coordinator_pb2.Fill] = collections.deque(maxlen=MARKET_FILLS)  # GetMarket
        self.chain: fees.LedgerView | None = None
        self.receipts.closed_listeners.append(lambda rec: self.reservations.release(rec.body.job_id))
        self.verifier = Verifier(store, self.receipts, self.book, rate=config.verify_rate,
                                 tolerance=config.verify_tolerance, trust_checks=config.trust_checks,
                                 trusted=frozenset(config.trusted_miners), load=self._find,
                                 record=lambda miner, passed: self._reputation(miner, "verification", passed),
                                 now_ms=self.time.now_ms)
        self.webhooks = Webhooks(store, config.clients, attempts=config.webhook_attempts,
                                 max_age_s=config.webhook_max_age_s, timeout_s=config.webhook_timeout_s,
                                 now_ms=self.time.now_ms,
                                 elect=store.settler if store.shared else None)  # type: ignore[attr-defined]
        self._reconciled_at = 0.0
        self._served_saved_at = 0.0
        self._quotes_pruned_at = 0.0
        self._collect_at = 0.0  # next artifact garbage collection (monotonic)
        self._pending: list[m.Event] = []  # follow-up events raised while executing instructions
        self._queue_seen: dict[str, job_pb2.QueueInfo] = {}  # what watchers of queued jobs were last told
        self._unwritten: list[m.Store] = []  # Store instructions of the current pass (one write)
        # metrics: labels bound once (hot path); gauges read at scrape time
        self._jobs_in = {st: metrics.JOBS_TOTAL.labels(state=jobs.state_name(st)) for st in S.values() if st}
        metrics.QUEUE_DEPTH.set_function(self.machine.queued)
        metrics.MINERS_CONNECTED.set_function(lambda: len(self.registry.miners))
        metrics.UPLOAD_BYTES.set_function(lambda: self.uploads.total)
        metrics.QUARANTINED.set_function(lambda: sum(r.quarantined for r in self.book.all()))
        self._restore()

    # time for the units that take a plain callable (tests may replace `clock`)
    def _monotonic(self) -> float:
        return self.clock()

    def clock(self) -> float:
        return self.time.monotonic()

    # ---- the runtime: events in, instructions executed -------------------------------------------------

    def _run(self, *events: m.Event, dispatch: bool = True) -> None:
        """Feed events to the machine and execute what it decides, follow-ups included; then dispatch."""
        self._pending.extend(events)
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                for ins in self.machine.handle(*batch):
                    self._execute(ins)
            if dispatch:
                claimed: list[m.Event] = []
                if self.shared and (free := self._free_slots())[0] > 0:  # before a claim can give this process
                    self._flush()  # a job again, what was decided so far is written (fenced) under its claims
                    claimed = self._claim(*free)
                for ins in self.machine.handle(*claimed, m.Dispatch()):
                    self._execute(ins)
        finally:
            self._flush()
            if self.shared:
                self._give_back()

    def _flush(self) -> None:
        """Write what the machine asked to store since the last flush, in one transaction. Sends
        and publishes of the same pass only reach queues until the event loop runs again, which
        is after this: nothing leaves the process before it is written. On a shared store the job
        events for watchers elsewhere go first: a watcher that reads a new state has its events."""
        if self._events_out:
            self._flush_events()
        if not self._unwritten:
            return
        batch, self._unwritten = self._unwritten, []
        if len(batch) == 1:
            lost = self.store.write(batch[0].jobs, artifacts=batch[0].artifacts, receipts=batch[0].receipts)
        else:
            jobs_ = {j.job_id: j for st in batch for j in st.jobs}  # the same records: written as they are now
            lost = self.store.write(jobs_.values(), artifacts=[a for st in batch for a in st.artifacts],
                                    receipts=[r for st in batch for r in st.receipts])
        if lost:  # the fence refused them (a shared store): they are another coordinator's now
            self._let_go(lost, TAKEN_OVER)

    # ---- several coordinators on one database (a shared store; docs/scaling.md) ----------------------

    def _let_go(self, job_ids: Collection[str], reason: str) -> None:
        """Jobs that are no longer this coordinator's leave its machine; a miner holding one drops it."""
        log.warning("%d jobs left this coordinator: %s", len(job_ids), reason)
        self.store.drop_claims(job_ids)  # type: ignore[attr-defined]
        for ins in self.machine.handle(m.Released(tuple(sorted(job_ids)), reason)):
            self._execute(ins)

    def wake(self) -> None:
        """Jobs were given back to the shared queue: claim for the free slots now (dispatch does)."""
        try:
            self._run()
        except Exception:  # the doorbell only hurries what the 0.5 s tick does anyway
            log.exception("claiming after a queue notification failed")

    def _free_slots(self) -> tuple[int, set[str]]:
        """Miner slots free for jobs from the shared queue, and the models of the miners that have them."""
        free, models = 0, set()
        for miner_id in self.machine.miners:
            v = self.machine.view(miner_id)
            if v is not None and v.running < v.max_concurrency and not v.quarantined:
                free += v.max_concurrency - v.running
                models |= v.models
        return free - self.machine.queued(), models  # what it holds already is placed first

    def _claim(self, free: int, models: set[str]) -> list[m.Event]:
        """Queued jobs from the shared queue for this coordinator's free miner slots."""
        now = self.clock()
        self._skip = {j: t for j, t in self._skip.items() if t > now}
        return self._restored(self.store.claim(models, free, skip=self._skip))  # type: ignore[attr-defined]

    def _restored(self, claims: list[Any]) -> list[m.Event]:
        out: list[m.Event] = []
        now = self.time.now_ms()
        for c in claims:
            if self.machine.job(c.job.job_id) is not None:
                continue  # its own lease, expired and taken back by its own reaper: still here, under the new epoch
            exclude, device = c.excluded, None
            if c.job.verify_of:
                orig = self.store.get_job(c.job.verify_of)
                if orig is not None:
                    pinned, dev = self.verifier.placement(orig, without=c.job.job_id)
                    exclude, device = exclude | pinned, dev or None
            why = ""
            if c.previous_owner:
                why = (f"the lease of coordinator {c.previous_owner} on the job expired" if c.lease_expired else
                       f"coordinator {c.previous_owner} stopped while a miner held the job")
            out.append(m.Restore(c.job, exclude=exclude, device_class=device, why=why,
                                 queued_for_s=max(0, now - c.queued_ms) / 1000 if c.queued_ms else 0.0))
            if c.cancel_requested:
                out.append(m.Cancel(c.job.job_id, "cancelled by the client (asked on another coordinator)"))
        return out

    def _give_back(self) -> None:
        """Queued jobs no miner of this coordinator took go back to the shared queue at once."""
        left = [r for j in self.machine.queue if (r := self.machine.records.get(j)) is not None
                and r.job.state == S.JOB_STATE_QUEUED]
        if not left:
            return
        until = self.clock() + SKIP_S
        for r in left:
            self._skip[r.job.job_id] = until
        self.machine.handle(m.Released(tuple(r.job.job_id for r in left), "back to the shared queue"))
        self.store.release([(r.job.job_id, r.excluded | r.pinned) for r in left])  # type: ignore[attr-defined]

    def _share(self) -> list[m.Event]:
        """Housekeeping of a shared store: renew this coordinator's leases (and hear of cancels asked
        elsewhere, and of claims lost) every heartbeat interval; take over jobs of dead owners and
        expired leases, and learn the models the others serve, every REAP_S."""
        now = self.clock()
        events: list[m.Event] = []
        if now - self._renewed_at >= self.config.heartbeat_interval_s:
            self._renewed_at = now
            lost, cancels = self.store.renew()  # type: ignore[attr-defined]
            if lost:
                self._let_go(lost, TAKEN_OVER)
            events += [m.Cancel(j, "cancelled by the client (asked on another coordinator)") for j in cancels]
            running = {mid: v.running for mid in self.registry.miners if (v := self.machine.view(mid)) is not None}
            for miner_id in self.store.renew_miners(running):  # type: ignore[attr-defined]
                self._moved_elsewhere(miner_id)  # (its notification was lost)
        if now - self._reaped_at >= REAP_S:
            self._reaped_at = now
            events += self._restored(self.store.take_over(  # type: ignore[attr-defined]
                REAP_BATCH, now_ms=self.time.now_ms(), queue_ttl_ms=int(self.config.queue_ttl_s * 1000),
                verify_ttl_ms=int(self.config.verify_timeout_s * 1000)))
            self._recall_served(others=True)
            self._reread_reputation()
            self.models.learn_stored()
            if orphans := self.reservations.sweep_orphans(now, ORPHAN_GRACE_S):  # type: ignore[attr-defined]
                log.warning("deleted %d escrow reservations whose job was never written (its coordinator stopped "
                            "between the two), e.g. job %s", len(orphans), orphans[0])
            self.store.prune_events(EVENT_KEEP_S, EVENT_PRUNE_BATCH, WATCHER_TTL_S)  # type: ignore[attr-defined]
            self.store.prune_miners()  # type: ignore[attr-defined]
        if now - self._watchers_at >= WATCHER_REFRESH_S:
            self._watchers_at = now
            self.store.watch_jobs(self.streams.watched_ids(), WATCHER_TTL_S)  # type: ignore[attr-defined]
        self._look_for_watchers(now)
        self._pull_soon()
        return events

    def _look_for_watchers(self, now: float) -> None:
        """The owner, every tick: which of the jobs its miners hold another coordinator watches now
        (one query). A watcher that joined gets the text so far (offset 0) at once, even while the
        miner is silent; later progress and text follow as they come."""
        held = [j for j, r in self.machine.records.items() if r.job.state in HELD]
        self._watched_elsewhere = {j: v for j, v in self._watched_elsewhere.items() if j in self.machine.records}
        if not held:
            return
        watched = self.store.watched_elsewhere(held)  # type: ignore[attr-defined]
        for job_id in held:
            before = self._watched_elsewhere.get(job_id)
            self._watched_elsewhere[job_id] = (job_id in watched, now)
            job = self.machine.job(job_id)
            if job_id in watched and not (before is not None and before[0]) and job is not None:
                self._text_so_far(job)
        self._flush_events()

    def _text_so_far(self, job: job_pb2.Job) -> bool:
        """A watcher elsewhere joined: the job's text so far goes first, as one row from offset 0
        (then its later deltas follow by offset). False when it has streamed nothing yet."""
        if not self.streams.chars(job.job_id):
            return False
        self._events_out.append((job.job_id, job.attempts, job_pb2.TextChunk(
            job_id=job.job_id, offset=0, text=self.streams.text(job.job_id))))
        return True

    # ---- progress and text across coordinators (job_events; docs/scaling.md) --------------------------

    def _elsewhere(self, job_id: str) -> tuple[bool, bool]:
        """Does another coordinator watch this job (read at most every WATCHED_CACHE_S), and did it
        start to since the last look (then the text so far is written first, from offset 0)?"""
        now = self.clock()
        cached = self._watched_elsewhere.get(job_id)
        if cached is not None and now - cached[1] < WATCHED_CACHE_S:
            return cached[0], False
        watched = job_id in self.store.watched_elsewhere([job_id])  # type: ignore[attr-defined]
        self._watched_elsewhere[job_id] = (watched, now)
        return watched, watched and not (cached is not None and cached[0])

    def _share_event(self, job_id: str, event: job_pb2.JobProgress | job_pb2.TextChunk) -> None:
        """The owner: a job's progress or a text delta becomes a row for the watchers elsewhere,
        written with the next flush (within EVENT_FLUSH_S)."""
        job = self.machine.job(job_id)
        if job is None:
            return
        watched, new = self._elsewhere(job_id)
        if not watched:
            return
        if new and self._text_so_far(job) and isinstance(event, job_pb2.TextChunk):
            event = None  # type: ignore[assignment]  # (the delta is in the text so far)
        if event is not None:
            self._events_out.append((job_id, job.attempts, event))
        if self._events_timer is None:
            try:
                self._events_timer = asyncio.get_running_loop().call_later(EVENT_FLUSH_S, self._flush_events)
            except RuntimeError:
                pass  # no loop (a synchronous caller): the next flush writes them

    def _share_text(self, job_id: str, delta: str) -> None:
        if self.shared:
            self._share_event(job_id, job_pb2.TextChunk(job_id=job_id, offset=self.streams.chars(job_id) - len(delta),
                                                        text=delta))

    def _flush_events(self) -> None:
        """One transaction (and one NOTIFY aitbc_events) for the events since the last flush: the
        latest progress of each job, its text deltas joined where they follow each other."""
        if self._events_timer is not None:
            self._events_timer.cancel()
            self._events_timer = None
        batch, self._events_out = self._events_out, []
        if not batch:
            return
        rows: list[tuple[str, int, int, bytes]] = []
        progress: dict[str, tuple[int, job_pb2.JobProgress]] = {}
        text: list[tuple[str, int, job_pb2.TextChunk]] = []
        for job_id, attempt, ev in batch:
            if isinstance(ev, job_pb2.JobProgress):
                progress[job_id] = (attempt, ev)
                continue
            last = next((t for t in reversed(text) if t[0] == job_id), None)
            if last is not None and last[1] == attempt and last[2].offset + len(last[2].text) == ev.offset:
                last[2].text += ev.text
            else:
                chunk = job_pb2.TextChunk()
                chunk.CopyFrom(ev)
                text.append((job_id, attempt, chunk))
        rows += [(j, EVENT_TEXT, a, c.SerializeToString()) for j, a, c in text]
        rows += [(j, EVENT_PROGRESS, a, p.SerializeToString()) for j, (a, p) in progress.items()]
        try:
            self.store.append_events(rows, keep=PROGRESS_ROWS_KEPT)  # type: ignore[attr-defined]
        except Exception:  # watchers elsewhere miss these (their states still come from the job rows)
            log.exception("writing %d job events for watchers on other coordinators failed", len(rows))

    def heard_events(self) -> None:
        """An owner elsewhere appended job events (NOTIFY aitbc_events): stream them now."""
        self._pull_soon()

    def _watched_remote(self) -> dict[str, int]:
        """The jobs watched here that this machine does not hold: the last event id read of each."""
        return {j: self._event_last.get(j, 0) for j in self.streams.watched_ids() if self.machine.job(j) is None}

    def _pull_soon(self) -> None:
        """Read the new event rows in the background (awaited reads: the tick and the doorbell do
        not wait for the database); a read already running reads once more when it is done."""
        if self._events_pull is not None and not self._events_pull.done():
            self._events_again = True
        elif self._watched_remote():
            self._events_pull = asyncio.get_running_loop().create_task(self._pull_in_background())

    async def _pull_in_background(self) -> None:
        again = True
        while again:
            self._events_again = False
            try:
                await self._pull_events()
            except Exception:  # the poll reads them again 0.5 s later; the states come from the job rows
                log.exception("reading the job events of jobs run by other coordinators failed")
                return
            again = self._events_again

    async def _pull_events(self) -> None:
        """The watcher: new event rows of the jobs watched here that another coordinator runs go
        into this coordinator's streams (text by offset: a row seen twice, or the text so far
        written again for a watcher that joined late, adds nothing twice)."""
        async with self._events_lock:
            for _ in range(10):  # bounded per call: the rest comes with the next one
                if not await self._pull_batch():
                    return

    async def _pull_batch(self) -> bool:
        """One batch of event rows into the streams; True when there may be more."""
        after = self._watched_remote()
        rows = await self.store.aread_events(after, EVENT_READ_BATCH) if after else []  # type: ignore[attr-defined]
        for event_id, job_id, kind, attempt, payload in rows:
            if not self.streams.watched(job_id):
                continue  # its last watch here ended while the rows were read
            self._event_last[job_id] = event_id
            have = self._remote_attempt.get(job_id)
            if have is not None and attempt < have:
                continue  # an earlier attempt's, written late
            if have is not None and attempt > have:
                self.streams.reset_text(job_id)  # the next attempt's text starts again at offset 0
            self._remote_attempt[job_id] = attempt
            if kind == EVENT_PROGRESS:
                self.streams.publish(job_id, job_pb2.JobProgress.FromString(payload))
            elif kind == EVENT_TEXT:
                chunk = job_pb2.TextChunk.FromString(payload)
                chars = self.streams.chars(job_id)
                if chunk.offset <= chars < chunk.offset + len(chunk.text):
                    try:
                        self.streams.append_text(job_id, chunk.text[chars - chunk.offset:])
                    except InvalidArgument:
                        pass  # past MAX_STREAMED_CHARS: the owner refused it too
        return len(rows) == EVENT_READ_BATCH

    def _forget_watch(self, job_id: str) -> None:
        """The last watch here of a job ended: its watcher row goes, and what was kept to stream it."""
        if self.streams.watched(job_id):
            return
        self._event_last.pop(job_id, None)
        self._remote_attempt.pop(job_id, None)
        self._remote_seen.pop(job_id, None)
        try:
            self.store.unwatch_job(job_id)  # type: ignore[attr-defined]
        except Exception:  # the row expires by itself within WATCHER_TTL_S
            log.exception("removing the watcher row of job %s failed", job_id)

    def _execute(self, ins: m.Instruction) -> None:
        if isinstance(ins, m.Store):
            self._unwritten.append(ins)
        elif isinstance(ins, m.Publish):
            self.streams.publish(ins.job_id, ins.event)
            if self.shared and isinstance(ins.event, job_pb2.JobProgress):
                self._share_event(ins.job_id, ins.event)
        elif isinstance(ins, m.Moved):
            self._moved(ins)
        elif isinstance(ins, m.Assign):
            self._send_assignment(ins.miner_id, ins.job)
        elif isinstance(ins, m.SendCancel | m.SendRejected):  # the miner drops the job (its upload: _moved)
            conn = self.registry.miners.get(ins.miner_id)
            if isinstance(ins, m.SendCancel):
                msg = miner_pb2.WorkResponse(cancel=miner_pb2.CancelAssignment(job_id=ins.job_id, reason=ins.reason))
                log.warning("miner %s: job %s taken back: %s", ins.miner_id, ins.job_id, ins.reason)
            else:
                msg = miner_pb2.WorkResponse(rejected=miner_pb2.WorkRejected(job_id=ins.job_id, reason=ins.reason))
                log.warning("miner %s: result for %s rejected: %s", ins.miner_id, ins.job_id, ins.reason)
            if conn is not None:
                conn.send(msg)
        elif isinstance(ins, m.SendAccepted):
            conn = self.registry.miners.get(ins.miner_id)
            if conn is not None:
                conn.send(miner_pb2.WorkResponse(accepted=miner_pb2.ResultAccepted(
                    job_id=ins.job_id, receipt_hash=ins.receipt_hash)))
        elif isinstance(ins, m.Record):
            self._reputation(ins.miner_id, ins.kind, ins.draw)
        elif isinstance(ins, m.ResetText):
            self.streams.reset_text(ins.job_id)

    def _send_assignment(self, miner_id: str, job: job_pb2.Job) -> None:
        conn = self.registry.miners[miner_id]
        with telemetry.span("coordinator.dispatch", parent=job.traceparent or None, job_id=job.job_id,
                            model=job.model, miner_id=miner_id):
            conn.send(miner_pb2.WorkResponse(assignment=miner_pb2.Assignment(
                task=miner_pb2.Task(job_id=job.job_id, model=job.model, params=job.params, client_id=job.client_id,
                                    price_per_unit=job.price_per_unit, prompt_hash=job.prompt_hash,
                                    attempt=job.attempts, want_text_trace=job.want_text_trace),
                chain_id=self.config.chain_id, hub_id=self.config.hub_id,
                traceparent=telemetry.current_traceparent())))
        metrics.DISPATCH_LATENCY.observe(max(0.0, self.time.now_ms() - job.created_at_unix_ms) / 1000)

    def _moved(self, ins: m.Moved) -> None:
        job, to = ins.job, ins.to_state
        self._jobs_in[to].inc()
        if ins.from_state in HELD and to not in HELD:  # it left its miner (requeued, taken back, cancelled,
            self.uploads.drop(job.job_id)  # ended): an unfinished upload for it is deleted (a result's was taken)
        if to not in jobs.TERMINAL:
            return
        if to != S.JOB_STATE_COMPLETED and job.fee:  # not charged: a completed job's reservation ends with
            self.reservations.release(job.job_id)  # its SETTLE (final or refused: ReceiptBook.closed_listeners)
        if to == S.JOB_STATE_COMPLETED and job.receipt_hash and not job.verify_of:
            self.fills.appendleft(coordinator_pb2.Fill(
                model=job.model, unit_type=job.unit_type, units=job.units, price_per_unit=job.price_per_unit,
                fee=job.fee, duration_ms=max(0, job.finished_at_unix_ms - (job.started_at_unix_ms or job.created_at_unix_ms)),
                finished_at_unix_ms=job.finished_at_unix_ms, miner_id=job.miner_id))
        if to == S.JOB_STATE_COMPLETED and not job.shard_job_ids:  # a split job's shards count themselves
            metrics.JOB_DURATION.labels(model=job.model).observe(max(0, self.time.now_ms() - job.created_at_unix_ms) / 1000)
            if job.gpu_ms:
                spent = metrics.VERIFY_GPU_SECONDS if job.verify_of else metrics.GPU_SECONDS
                spent.labels(model=job.model).inc(job.gpu_ms / 1000)
        self.streams.ended(job.job_id)
        self._log_finished(job)
        self.webhooks.job_ended(job)
        if job.verify_of:
            self._flush()  # the verifier reads the runs from the store
            referee = self.verifier.run_ended(job)
            if referee is not None:
                self._pending.append(referee)

    def _reputation(self, miner_id: str, kind: str, arg: bool) -> None:
        """Update a miner's reputation (persisted); tell the machine when what matching sees changed."""
        before = self.book.get(miner_id)
        if kind == "success":
            rec = self.book.record_success(miner_id, draw=arg)
        elif kind == "verification":
            rec = self.book.record_verification(miner_id, arg)
        elif kind == "release":
            rec = self.book.release(miner_id)
        else:
            rec = self.book.record_failure(miner_id, kind)  # type: ignore[arg-type]
        self._follow_reputation(miner_id, rec, new=before is None)

    def heard_reputation(self, miners: set[str]) -> None:
        """Another coordinator changed these miners' reputation rows (NOTIFY aitbc_reputation):
        drop what this one cached; matching sees the new flags at once (quarantine, failing,
        established)."""
        try:
            for miner_id in miners:
                self.book.invalidate(miner_id)
            for miner_id in self.book.refresh([m for m in miners if m in self.registry.miners]):  # one query
                self._follow_reputation(miner_id, self.book.snapshot(miner_id), new=False)
            if self._pending:  # a view changed (most notifications are of this coordinator's own updates)
                self._run()
        except Exception:  # the poll every REAP_S reads the rows anyway
            log.exception("reading reputation after a notification failed")

    def _reread_reputation(self) -> None:
        """The poll behind the notifications (a shared store, every REAP_S): the rows of the
        miners connected here, read again; a changed one reaches matching."""
        for miner_id in self.book.refresh(list(self.registry.miners)):
            self._follow_reputation(miner_id, self.book.snapshot(miner_id), new=False)

    def _follow_reputation(self, miner_id: str, rec: MinerRecord, *, new: bool) -> None:
        """Tell the machine when what matching sees of a connected miner changed."""
        conn = self.registry.miners.get(miner_id)
        if conn is None:
            return
        seen = self.machine.view(miner_id)
        failing = rec.failure_streak >= m.FAILING_STREAK
        # what matching sees: flags at once, the score once it moved by REPUTATION_STEP (a served
        # job moves it by at most 2% of the distance to 1: no update per result)
        if seen is None or (seen.quarantined, seen.failing, seen.established) != (
                rec.quarantined, failing, self.verifier.established(miner_id)) \
                or abs(seen.reputation - rec.reputation) >= REPUTATION_STEP or new:
            self._pending.append(m.MinerUpdated(self._view(conn)))

    def _view(self, conn: MinerConn) -> MinerView:
        return self._view_of(conn.miner_id, conn.info)

    def _view_of(self, miner_id: str, info: miner_pb2.MinerInfo) -> MinerView:
        rec = self.book.get(miner_id)
        return MinerView(
            miner_id=miner_id, models=frozenset(info.models),
            kinds={mod: "text" for mod in info.models if declared(info, mod)[0] == jobs.TEXT},
            vram_mb=info.vram_mb, price_per_unit=info.price_per_unit, max_concurrency=info.max_concurrency or 1,
            running=0, reputation=rec.reputation if rec else self.book.policy.initial,
            recent_latency_ms=0.0, quarantined=bool(rec and rec.quarantined),
            device_class=device_class(info.device), failing=bool(rec and rec.failure_streak >= m.FAILING_STREAK),
            established=self.verifier.established(miner_id),
        )

    def _log_finished(self, job: job_pb2.Job) -> None:
        start = job.started_at_unix_ms or job.created_at_unix_ms
        line = {
            "event": "job_finished",
            "job_id": job.job_id,
            "state": jobs.state_name(job.state),
            "miner": job.miner_id,
            "model": job.model,
            "duration_ms": max(0, job.finished_at_unix_ms - start),
            "gpu_seconds": job.gpu_ms / 1000,
            "units": job.units,
            "unit_type": job.unit_type,
            "bytes_out": sum(a.size for a in job.artifacts),
            "prompt_hash": job.prompt_hash,
            "attempts": job.attempts,
        }
        if jobs.job_kind(job) == jobs.TEXT:
            line["prompt_tokens"], line["generated_tokens"] = job.prompt_tokens, job.generated_tokens
        if job.error:
            line["error"] = job.error
        job_log.info(json.dumps(line, sort_keys=True))

    # ---- start-up -----------------------------------------------------------------------------------

    def _served_key(self) -> str:
        """Each coordinator of a shared store keeps its own record (read by the others)."""
        return f"{SERVED_META}:{self.store.coordinator_id}" if self.shared else SERVED_META  # type: ignore[attr-defined]

    def _recall_served(self, *, others: bool = False) -> None:
        """The models the last run served count as served until model_grace_s after it last saw
        them: a job submitted right after a restart, before the miners re-register, is queued. With
        a shared store, the models every coordinator serves (`others`: read every REAP_S)."""
        items = self.store.meta_items(SERVED_META) if self.shared else [(SERVED_META, self.store.get_meta(SERVED_META))]
        served = 0
        for key, raw in items:
            if others and key == self._served_key():
                continue
            try:
                record = json.loads(raw) if raw else {}
                served = self.registry.recall(record, self.time.now_ms())
            except (ValueError, TypeError, KeyError, AttributeError):
                log.warning("ignored an unreadable %s record in the store", key)
                continue
            grace_ms = self.config.model_grace_s * 1000
            if self.shared and key != self._served_key() and all(
                    self.time.now_ms() - int(r["seen_at_unix_ms"]) > grace_ms for r in record.values()):
                self.store.delete_meta(key)  # a coordinator gone for longer than model_grace_s
        if served and not others:
            log.info("%d models served before the restart are accepted until their miners are back (model_grace_s %g)",
                     served, self.config.model_grace_s)

    def _save_served(self) -> None:
        self._served_saved_at = self.clock()
        self.store.put_meta(self._served_key(), json.dumps(self.registry.served_record(self.time.now_ms()),
                                                           sort_keys=True).encode())

    def _restore(self) -> None:
        """Reload active jobs; jobs that were with a miner go back to the queue."""
        self._recall_served()
        # a shared store's active jobs are other coordinators' (or, of a dead one, the reaper's)
        restored = [] if self.shared else sorted(self.store.active_jobs(), key=lambda j: j.created_at_unix_ms)
        events: list[m.Event] = []
        for job in restored:
            finished = tuple(s for s in (self.store.get_job(j) for j in job.shard_job_ids)
                             if s is not None and s.state in jobs.TERMINAL)
            exclude: frozenset[str] = frozenset()
            device = None
            if job.verify_of:
                orig = self.store.get_job(job.verify_of)
                if orig is not None:
                    exclude, dev = self.verifier.placement(orig, without=job.job_id)
                    device = dev or None
            events.append(m.Restore(job, finished, exclude, device))
        self._run(*events, m.CheckSplitJobs(), dispatch=False)
        self._run(*self.verifier.reconcile_held(), dispatch=False)
        # reservations: paid jobs still active, and paid jobs whose SETTLE is not final yet
        owed = [j for j in restored if j.quote]
        owed += [j for j in (self.store.get_job(r.body.job_id) for r in self.store.unsettled_receipts()
                             if r.settlement.fee) if j is not None and j.quote]
        self.reservations.restore(c for c in map(fees.charge_of, owed) if c is not None)
        if restored:
            log.info("restored %d active jobs into the queue", len(restored))

    # ---- clients ------------------------------------------------------------------------------------

    @property
    def clients(self) -> dict[str, ClientKey]:
        return self.auth.clients

    def authenticate(self, api_key: str | None) -> ClientKey:
        return self.auth.authenticate(api_key)

    def served_models(self) -> dict[str, int]:
        return self.registry.served_models()

    def list_models(self) -> list[coordinator_pb2.ServedModel]:
        return self.registry.list_models()

    async def submit(self, client_id: str, model: str, params: job_pb2.JobParams, *, request_id: str = "",
                     max_price_per_unit: int | None = None, webhook_url: str = "",
                     quote: quotes.SignedQuote | None = None, priority_fee: int | None = None) -> job_pb2.Job:
        jobs.validate_request_id(request_id)
        webhook_url = self.webhooks.job_url(client_id, webhook_url)
        paid = quote is not None or priority_fee is not None
        _check_fee(priority_fee or 0)
        if quote is not None and priority_fee is not None:
            raise InvalidArgument("give a quote or a priority_fee, not both (the quote states its priority fee)")
        # a paid job reads the client's escrow first: the only wait, so everything after it (the
        # request id's check, the reservation, the queueing) happens in one step of the event loop
        escrow = await self._escrow(client_id) if paid else None
        asked = params
        params, cap = self._prepare(model, params, max_price_per_unit, check_served=not request_id)
        async def same(existing: str) -> job_pb2.Job:  # (only answers: nothing is decided after its await)
            job = await self.get(client_id, existing)
            same_pay = paid == bool(job.quote) and (quote is None or job.quote == quote.body.canonical_bytes())
            if not _same_request(job, model, asked, params) or job.webhook_url != webhook_url or not same_pay:
                raise AlreadyExists(
                    f"request_id '{request_id}' was used for job {existing} with another model, other "
                    "parameters, another webhook_url or another quote; a new job needs a new request_id "
                    "(resubmit the same request to get that job)")
            return job

        if request_id:
            existing = self.store.job_for_request(client_id, request_id)
            if existing is not None and self._find(existing) is not None:
                return await same(existing)
            self._check_served(model, params)
        self._check_active(client_id)
        now = self.time.now_ms()
        job = job_pb2.Job(
            job_id=jobs.new_job_id(), model=model, params=params, client_id=client_id,
            created_at_unix_ms=now, prompt_hash=jobs.prompt_hash(jobs.job_prompt(job_pb2.Job(params=params))),
            request_id=request_id, traceparent=telemetry.current_traceparent(), webhook_url=webhook_url,
        )
        if cap is not None:
            job.max_price_per_unit = cap
        if request_id:  # the arbiter: on a shared store the first coordinator to record the request wins
            winner = await self._claim_request(client_id, request_id, job.job_id)
            if winner != job.job_id:
                return await same(winner)
        paid_by = None
        try:
            paid_by = self._charge(job, escrow, quote, priority_fee or 0) if escrow is not None else None
            self._placeable(job)
            telemetry.set_attributes(job_id=job.job_id, model=model)
            with self._pool_slot(client_id):  # (a shared store: counted on every coordinator, then written)
                # a paid job is never split: its one receipt settles its one quote
                self._run(m.Submit(job, () if paid_by is not None else tuple(self._shards_for(job))))
        except Exception:
            if self.shared and self.store.get_job(job.job_id) is None:  # never queued: give back what it took
                # (its write failed: the database lost under it) nor kept here, to run with no row
                placed = self.machine.job(job.job_id)
                self._let_go([job.job_id, *(placed.shard_job_ids if placed is not None else ())],
                             "its write to the database failed")
                if request_id:
                    self.store.forget_request(client_id, request_id, job.job_id)  # type: ignore[attr-defined]
                if paid_by is not None:
                    self.store.forget_quote(paid_by.quote_id, job.job_id)  # type: ignore[attr-defined]
            if paid_by is not None:
                self.reservations.release(job.job_id)
            raise
        if paid_by is not None and not self.shared:  # (a shared store recorded it in _charge)
            self.store.put_meta(QUOTE_META + paid_by.quote_id, f"{job.job_id} {paid_by.expires_at}".encode())
        return self._client_view(job, queue=False)  # GetJob / WatchJob say where it stands: not the hot path

    async def _claim_request(self, client_id: str, request_id: str, job_id: str) -> str:
        """The job that owns the request: `job_id` when this submission is the first. Another
        coordinator's job is waited for until its row is written (the request's row commits just
        before it); one never written (its coordinator died in between) gives the request to this job."""
        winner = self.store.claim_request(client_id, request_id, job_id)
        deadline = self.clock() + REQUEST_WAIT_S
        while self.shared and winner != job_id and self._find(winner) is None:
            if self.clock() >= deadline:
                if self.store.take_request(client_id, request_id, winner, job_id):  # type: ignore[attr-defined]
                    log.warning("request %s of client %s: job %s was never stored; it is job %s now",
                                request_id, client_id, winner, job_id)
                    return job_id
                deadline = self.clock() + REQUEST_WAIT_S
            await asyncio.sleep(0.01)
        return winner

    def _check_active(self, client_id: str) -> None:
        """A client's unfinished jobs are bounded (its `max_active_jobs`): the rate limit alone let one
        key fill the queue ahead of every other client's (THREAT-MODEL.md, "every queue bounded per actor").
        On a shared store the bound is the pool's, counted in _pool_slot."""
        limit = self._active_limit(client_id)
        if limit and not self.shared and self.machine.records.per_client[client_id] >= limit:
            raise ResourceExhausted(_too_many(client_id, limit))

    def _active_limit(self, client_id: str) -> int:
        return self.auth.by_id[client_id].max_active_jobs if client_id in self.auth.by_id else 0

    @contextlib.contextmanager
    def _pool_slot(self, client_id: str) -> Iterator[None]:
        """A shared store: the client's unfinished jobs on every coordinator are counted under a lock
        on the client that is held until the new job is written, so N coordinators do not let a
        client run N x its max_active_jobs (nor one more through two submissions at once)."""
        limit = self._active_limit(client_id)
        if not (self.shared and limit):
            yield
            return
        with self.store.client_jobs(client_id) as unfinished:  # type: ignore[attr-defined]
            if unfinished >= limit:
                raise ResourceExhausted(_too_many(client_id, limit))
            yield

    # ---- paid jobs (aitbc.coordinator.fees) --------------------------------------------------------

    async def _escrow(self, client_id: str) -> tuple[str, bytes, int]:
        """(client address, genesis hash, the escrow's available amount) for a paid job or quote."""
        client = self.auth.by_id.get(client_id)
        if client is None or not client.address:
            raise FailedPrecondition(f"client {client_id} has no chain address: paid jobs are charged to an escrow, so "
                                     "the operator sets `address` in this client's [[clients]] entry of coordinator.toml")
        if self.chain is None:
            raise FailedPrecondition("this coordinator has no ledger (`ledger` in coordinator.toml): it takes free jobs "
                                     "only")
        try:
            ref = await self.chain.chain_ref()
            available = await self.chain.escrow_available(client.address, self.key.address)
        except AitbcError as exc:
            if isinstance(exc, InvalidArgument | PermissionDenied | FailedPrecondition):
                raise
            raise Unavailable(f"cannot read the escrow of {client.address} on the ledger: {exc.message}") from None
        if ref.chain_id != self.config.chain_id:
            raise FailedPrecondition(f"the ledger runs chain {ref.chain_id}, this coordinator attests for "
                                     f"{self.config.chain_id}: fix chain_id or ledger in coordinator.toml")
        return client.address, ref.genesis_hash, available

    def _charge(self, job: job_pb2.Job, escrow: tuple[str, bytes, int], quote: quotes.SignedQuote | None,
                priority_fee: int) -> quotes.QuoteBody:
        """Bind a paid job to its quote (the client's, checked; or one made now), reserve its total,
        and return the quote."""
        address, genesis_hash, available = escrow
        units, unit_type = self._units(job.params)
        now = self.time.now_ms()
        if quote is None:
            price, reason = self._price_now(job)
            if reason:
                raise FailedPrecondition(f"cannot quote a paid job now: {reason}")
            quote = self._new_quote(job, escrow, unit_type, units, price, priority_fee)
        else:
            fees.check_quote(quote, attester=self.key.address, chain_id=self.config.chain_id,
                             genesis_hash=genesis_hash, client_id=job.client_id, client_address=address,
                             model=job.model, prompt_hash=job.prompt_hash, unit_type=unit_type, units=units,
                             now_ms=now)
        b = quote.body
        if self.shared:  # the insert is the check: one quote, one job, on every coordinator
            used = self.store.use_quote(b.quote_id, job.job_id, b.expires_at)  # type: ignore[attr-defined]
        else:
            raw = self.store.get_meta(QUOTE_META + b.quote_id)
            used = raw.decode().split()[0] if raw is not None else None
        if used is not None:
            raise AlreadyExists(f"quote {b.quote_id} was used for job {used}: each quote pays for one job "
                                "(ask for a new quote)")
        job.quote, job.quote_signature, job.fee = b.canonical_bytes(), quote.signature, b.total
        job.max_price_per_unit = min(job.max_price_per_unit, b.price_per_unit) if job.HasField(
            "max_price_per_unit") else b.price_per_unit  # only miners at or below the quoted price
        try:
            self.reservations.reserve(fees.Charge(job.job_id, address, b.total, b.hash().hex(), b.units), available)
        except AitbcError:
            if self.shared:
                self.store.forget_quote(b.quote_id, job.job_id)  # type: ignore[attr-defined]
            raise
        return b

    def _units(self, params: job_pb2.JobParams) -> tuple[int, str]:
        prompt_most = token_bounds(params.text, "")[0] if jobs.job_kind(params) == jobs.TEXT else 0
        return fees.quote_units(params, prompt_most)

    def _new_quote(self, job: job_pb2.Job, escrow: tuple[str, bytes, int], unit_type: str, units: int, price: int,
                   priority_fee: int) -> quotes.SignedQuote:
        """A quote for `job` (its client, model and prompt) from this coordinator, valid quote_ttl_s."""
        address, genesis_hash, _ = escrow
        return fees.new_quote(self.key, chain_id=self.config.chain_id, genesis_hash=genesis_hash,
                              client_id=job.client_id, client_address=address, model=job.model,
                              prompt_hash=job.prompt_hash, unit_type=unit_type, units=units, price_per_unit=price,
                              priority_fee=priority_fee,
                              expires_at=self.time.now_ms() + int(self.config.quote_ttl_s * 1000))

    def _price_now(self, job: job_pb2.Job) -> tuple[int, str]:
        """The price per unit of the miner that would get the job now, or (0, why none would)."""
        views = self.machine.idle_views()
        pick = choose(views, self.machine.needs(job), 0)
        if isinstance(pick, Unplaceable):
            return 0, pick.reason
        return next(v.price_per_unit for v in views if v.miner_id == pick.miner_id), ""

    async def quote(self, model: str, params: job_pb2.JobParams, max_price_per_unit: int | None = None, *,
                    client_id: str = "", priority_fee: int = 0) -> coordinator_pb2.QuoteJobResponse:
        """What a job would cost, without queueing it: the same validation as SubmitJob, its units
        from its parameters (docs/receipts.md, "Units"), and the miners that would qualify now; and,
        for a client with a chain address, a signed quote SubmitJob accepts until it expires."""
        _check_fee(priority_fee)
        escrow: tuple[str, bytes, int] | None = None
        no_quote = ""
        try:
            escrow = await self._escrow(client_id)
        except AitbcError as exc:
            no_quote = exc.message
        params, cap = self._prepare(model, params, max_price_per_unit)
        job = job_pb2.Job(model=model, params=params, client_id=client_id,
                          prompt_hash=jobs.prompt_hash(jobs.job_prompt(job_pb2.Job(params=params))))
        if cap is not None:
            job.max_price_per_unit = cap
        units, unit_type = self._units(params)
        exact = unit_type == "tile_steps"
        out = coordinator_pb2.QuoteJobResponse(params=params, unit_type=unit_type, units=units, units_exact=exact)
        if cap is not None:
            out.max_price_per_unit, out.max_cost = cap, units * cap
        needs = self.machine.needs(job)
        views = self.machine.idle_views()
        able = sorted((v for v in views if not isinstance(choose([v], needs, 0), Unplaceable)),
                      key=lambda v: (v.price_per_unit, v.miner_id))
        out.miners.extend(coordinator_pb2.QuotedMiner(miner_id=v.miner_id, price_per_unit=v.price_per_unit,
                                                      cost=units * v.price_per_unit, device_class=v.device_class)
                          for v in able)
        price, out.unavailable_reason = self._price_now(job)
        if not out.unavailable_reason:
            out.price_per_unit, out.cost = price, units * price
        if escrow is not None:
            out.escrow_available = max(0, escrow[2] - self.reservations.reserved(escrow[0]))
            if not out.unavailable_reason and out.cost + priority_fee >= 1:
                signed = self._new_quote(job, escrow, unit_type, units, price, priority_fee)
                out.quote, out.quote_signature = signed.body.canonical_bytes(), signed.signature
            else:
                no_quote = out.unavailable_reason or "the job costs nothing (price 0 and no priority fee): submit it free"
        out.no_quote_reason = no_quote
        return out

    def _prepare(self, model: str, params: job_pb2.JobParams, max_price_per_unit: int | None, *,
                 check_served: bool = True) -> tuple[job_pb2.JobParams, int | None]:
        """A submission's parameters as the job runs (validated, defaults filled, sizes explicit) and
        its price cap (the client's, never above the operator's ceiling)."""
        jobs.validate_model(model)
        params = self._explicit(model, jobs.normalize_params(params))
        if check_served:
            self._check_served(model, params)
        ceiling = self.models.ceiling(model)
        if ceiling is not None:
            max_price_per_unit = ceiling if max_price_per_unit is None else min(max_price_per_unit, ceiling)
        return params, max_price_per_unit

    def _check_served(self, model: str, params: job_pb2.JobParams) -> None:
        served = self.served_models()
        kind = jobs.job_kind(params)
        if model not in served:
            have = ", ".join(f"{mod} ({jobs.kind_name(k)})" for mod, k in sorted(served.items())) \
                or "none: no miner is connected"
            raise FailedPrecondition(f"no miner serves model '{model}' (models served now: {have})")
        if served[model] != kind:
            same = ", ".join(sorted(mod for mod, k in served.items() if k == kind)) or "none"
            raise FailedPrecondition(f"model '{model}' is a {jobs.kind_name(served[model])} model and this is a "
                                     f"{jobs.kind_name(kind)} job (served {jobs.kind_name(kind)} models: {same})")
        if kind == jobs.TEXT:
            contexts = self.registry.context_lengths(model)
            if contexts and params.text.max_new_tokens >= max(contexts):
                raise InvalidArgument(f"max_new_tokens {params.text.max_new_tokens} does not fit the context of model "
                                      f"'{model}' ({max(contexts)} tokens, prompt included)")

    def _explicit(self, model: str, params: job_pb2.JobParams) -> job_pb2.JobParams:
        """An image job's width and height, 0 for the model's native size, become that size (the
        model registry's): the miner is told how many pixels to make, and paid for (docs/receipts.md)."""
        if params.WhichOneof("kind") == "image" and not (params.image.width and params.image.height):
            side = self.models.native_size(model)
            params.image.width, params.image.height = params.image.width or side, params.image.height or side
            if params.image.width * params.image.height * params.image.images > jobs.MAX_PIXELS:
                raise InvalidArgument(f"width x height x images exceeds {jobs.MAX_PIXELS} pixels at model '{model}'s "
                                      f"native size {side}: ask for fewer or smaller images")
        return params

    def _find(self, job_id: str) -> job_pb2.Job | None:
        return self.machine.job(job_id) or self.store.get_job(job_id)

    def _load(self, job_id: str) -> job_pb2.Job:
        jobs.validate_job_id(job_id)
        job = self._find(job_id)
        if job is None:
            raise NotFound(f"job {job_id} not found")
        return job

    async def _job_view(self, job: job_pb2.Job, *, queue: bool = True) -> job_pb2.Job:
        """`_client_view` with the receipt as the book has it now (an awaited read)."""
        rec = await self.receipts.aget(job.receipt_hash) if job.receipt_hash else None
        return self._client_view(job, receipt=rec, queue=queue)

    def _client_view(self, job: job_pb2.Job, *, receipt: receipt_pb2.Receipt | None = None,
                     queue: bool = True) -> job_pb2.Job:
        """A copy to hand out, with `receipt` (or, while the job is queued and `queue`, its queue
        position and ETA)."""
        out = job_pb2.Job()
        out.CopyFrom(job)
        if receipt is not None:
            out.receipt.CopyFrom(receipt)
        if queue and out.state == S.JOB_STATE_QUEUED:
            info = self.machine.queue_infos([out.job_id]).get(out.job_id)
            if info is not None:
                out.queue.CopyFrom(info)
        return out

    def _publish_queue_moves(self) -> None:
        """Watchers of queued jobs get a fresh snapshot when the job's place or ETA changed."""
        watched = [j for j in self.streams.watched_ids() if (job := self.machine.job(j)) is not None
                   and job.state == S.JOB_STATE_QUEUED]
        if not watched:
            self._queue_seen.clear()
            return
        infos = self.machine.queue_infos(watched)
        for job_id, info in infos.items():
            seen = self._queue_seen.get(job_id)
            if seen is not None and (seen.position, seen.slots, seen.eta_p50_ms // 1000) == (
                    info.position, info.slots, info.eta_p50_ms // 1000):
                continue
            self._queue_seen[job_id] = info  # (the first time, the watcher may have it already: harmless)
            self.streams.publish(job_id, self._client_view(self.machine.job(job_id)))  # type: ignore[arg-type]
        for job_id in list(self._queue_seen):
            if job_id not in infos:
                del self._queue_seen[job_id]

    async def get(self, client_id: str, job_id: str) -> job_pb2.Job:
        """The job as its client sees it: from this machine when it holds the job, else read from
        the store (awaited: a shared store's database may be slow)."""
        jobs.validate_job_id(job_id)
        job = self.machine.job(job_id) or await self.store.aget_job(job_id)
        if job is None:
            raise NotFound(f"job {job_id} not found")
        if job.client_id != client_id:
            raise PermissionDenied(f"job {job_id} belongs to another client")
        return await self._job_view(job)

    async def cancel(self, client_id: str, job_id: str, reason: str = "", *, looked: int = 0) -> job_pb2.Job:
        job = self._load(job_id)
        if job.client_id != client_id:
            raise PermissionDenied(f"job {job_id} belongs to another client")
        if job.state in jobs.TERMINAL:
            raise FailedPrecondition(f"job {job_id} is already {jobs.state_name(job.state)}; only unfinished jobs can be cancelled")
        why = f"cancelled by client{': ' + reason[:200] if reason else ''}"
        if self.shared and self.machine.job(job_id) is None:  # in the shared queue, or another coordinator's
            claimed = self._restored(self.store.claim_ids([job_id]))  # type: ignore[attr-defined]
            if not claimed:
                owner = self.store.request_cancel(job_id)  # type: ignore[attr-defined]
                if owner is None and self.machine.job(job_id) is None:
                    if looked >= 3:
                        raise Unavailable(f"job {job_id} moved between coordinators while it was being cancelled: "
                                          "CancelJob again")
                    return await self.cancel(client_id, job_id, reason, looked=looked + 1)  # it moved: look again
                log.info("job %s: cancel asked of coordinator %s, which runs it", job_id, owner)
                return await self.get(client_id, job_id)  # cancelled by its owner within a heartbeat interval
            self._run(*claimed, m.Cancel(job_id, why), dispatch=False)
            return await self.get(client_id, job_id)
        self._run(m.Cancel(job_id, why))
        return await self.get(client_id, job_id)

    async def watch(self, client_id: str, job_id: str) -> AsyncIterator[job_pb2.Job | job_pb2.JobProgress | job_pb2.TextChunk]:
        """First a snapshot, then progress, text and every state change, until the job finishes."""
        await self.get(client_id, job_id)  # existence and ownership before anything is streamed
        events = self.streams.watch(job_id, lambda: self.get(client_id, job_id),
                                    lambda j: self.machine.job(j) is not None)
        if self.shared:
            events = self._watch_shared(client_id, job_id, events)
        async for event in events:
            if isinstance(event, job_pb2.Job) and (event.state == S.JOB_STATE_QUEUED or (
                    event.state == S.JOB_STATE_COMPLETED and event.receipt_hash)):
                event = await self._job_view(event)  # the receipt as the book has it now; a queued job's place
            yield event

    async def _watch_shared(self, client_id: str, job_id: str, local: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """A watch on a shared store: what this coordinator publishes, and while the job is not in
        this machine (queued in the shared queue, or another coordinator's), its row read every
        WATCH_POLL_S: a new state is published as a snapshot (after the events written before it),
        the terminal one ends the watch. A watcher row tells the job's owner to write its progress
        and text as job_events rows, which come in on NOTIFY aitbc_events or with the poll."""
        self.store.watch_jobs([job_id], WATCHER_TTL_S)  # type: ignore[attr-defined]  # before the snapshot
        nxt: asyncio.Future[Any] | None = None
        try:
            while True:
                if nxt is None:
                    nxt = asyncio.ensure_future(local.__anext__())
                done, _ = await asyncio.wait({nxt}, timeout=WATCH_POLL_S)
                if done:
                    fut, nxt = nxt, None
                    try:
                        event = fut.result()
                    except StopAsyncIteration:
                        return
                    if isinstance(event, job_pb2.Job):
                        self._remote_seen[job_id] = (event.state, event.updated_at_unix_ms)
                    yield event
                    continue
                if self.machine.job(job_id) is not None:
                    continue  # ours now: its events come from this machine
                job = await self.store.aget_job(job_id)
                if job is None or (job.state, job.updated_at_unix_ms) == self._remote_seen.get(job_id):
                    continue  # (another watch of this job here may have published it already)
                self._remote_seen[job_id] = (job.state, job.updated_at_unix_ms)
                await self._pull_events()  # what the owner wrote before this state, first
                self.streams.publish(job_id, await self._job_view(job))
        finally:
            if nxt is not None:
                nxt.cancel()
                await asyncio.gather(nxt, return_exceptions=True)
            await local.aclose()  # type: ignore[attr-defined]
            self._forget_watch(job_id)

    async def artifact(self, client_id: str, job_id: str, index: int) -> tuple[job_pb2.Artifact, AsyncArtifact]:
        """The artifact's description and its bytes as an async file (the caller closes it)."""
        job = await self.get(client_id, job_id)
        if job.state != S.JOB_STATE_COMPLETED:
            raise FailedPrecondition(f"job {job_id} is {jobs.state_name(job.state)}; results exist only for COMPLETED jobs")
        if index >= len(job.artifacts):
            raise InvalidArgument(f"artifact index {index} is out of range: job {job_id} has {len(job.artifacts)}")
        art = job.artifacts[index]
        data = await self.store.aopen_artifact(art.sha256)
        if data is None and art.expires_at_unix_ms and art.expires_at_unix_ms <= self.time.now_ms():
            when = datetime.fromtimestamp(art.expires_at_unix_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
            raise NotFound(f"artifact {index} of job {job_id} expired at {when} and was deleted (the coordinator keeps "
                           f"results artifact_retention_s = {self.config.artifact_retention_s:g} s); the job keeps "
                           f"its sha256 {art.sha256} and its receipt (GetJob, GetReceipt)")
        if data is None:
            raise NotFound(f"artifact {art.sha256} of job {job_id} is no longer stored")
        return art, data

    async def receipt(self, client_id: str, *, receipt_hash: str = "", job_id: str = "") -> receipt_pb2.Receipt:
        if job_id:
            job = await self.get(client_id, job_id)
            if job.shard_job_ids:
                raise FailedPrecondition(f"job {job_id} was split into {len(job.shard_job_ids)} shards, each with its "
                                         f"own receipt: list them with ListReceipts(job_id={job_id})")
            if not job.receipt_hash:
                raise FailedPrecondition(f"job {job_id} is {jobs.state_name(job.state)} and has no receipt")
            receipt_hash = job.receipt_hash
        if not receipt_hash:
            raise InvalidArgument("give a receipt_hash or a job_id")
        rec = await self.receipts.aget(receipt_hash.lower())
        if rec is None:
            raise NotFound(f"receipt {receipt_hash} not found")
        if rec.body.client != client_id:
            raise PermissionDenied(f"receipt {receipt_hash} belongs to another client")
        return rec

    async def list_receipts(self, client_id: str, *, job_id: str = "", page_size: int = 0,
                            page_token: str = "") -> tuple[list[receipt_pb2.Receipt], str]:
        if job_id:
            job = await self.get(client_id, job_id)  # a split job's receipts are its shards', in image order
            return [await self.receipt(client_id, job_id=j) for j in (job.shard_job_ids or [job_id])], ""
        limit = min(page_size or 20, 100)
        try:
            before = bytes.fromhex(page_token) if page_token else None
        except ValueError:
            raise InvalidArgument("page_token is malformed: pass the next_page_token of the previous page") from None
        page, nxt = await self.store.aclient_receipts(client_id, before=before, limit=limit)
        return page, nxt.hex() if nxt else ""

    # ---- miners -------------------------------------------------------------------------------------

    @property
    def miners(self) -> dict[str, MinerConn]:
        return self.registry.miners

    def challenge(self) -> tuple[bytes, float]:
        return self.registry.challenge()

    def register(self, pubkey: bytes, challenge: bytes, signature: bytes, info: miner_pb2.MinerInfo) -> MinerSession:
        return self.registry.register(pubkey, challenge, signature, info, self.models.admit)

    async def check_stake(self, miner_id: str) -> None:
        """Refuse a miner whose stake is below the network's minimum (genesis min_stake; 0 on a new
        devnet: every miner qualifies). Stake gates eligibility, not the share of work. The operator's
        `trusted_miners` are exempt: a network that starts with a minimum stake and no tokens (nothing
        is pre-minted) needs miners that can earn before anyone can stake."""
        if self.chain is None or miner_id in self.config.trusted_miners:
            return
        try:
            need = await self.chain.min_stake()
            have = self.stakes[miner_id] = await self.chain.stake_of(miner_id)
            if len(self.stakes) > 4 * MAX_STAKES_SHOWN:  # bounded: keep the connected miners' figures
                self.stakes = {m: v for m, v in self.stakes.items() if m in self.registry.miners or m == miner_id}
        except AitbcError as exc:  # the ledger is away: admitted now, checked again (watch_stakes) once it is back,
            log.warning("stake of miner %s not checked: %s", miner_id, exc.message)  # as jobs run through an outage
            return
        if have < need:
            raise FailedPrecondition(f"miner {miner_id} has staked {have}, the network's minimum stake is {need}: stake "
                                     f"{need - have} more from the miner's wallet (aitbc stake {need - have}) and "
                                     "reconnect")

    async def watch_stakes(self) -> None:
        """Connected miners whose stake fell below the minimum (unstaked, slashed) are dropped."""
        while True:
            await asyncio.sleep(self.config.stake_check_s)
            for conn in list(self.registry.miners.values()):
                try:
                    await self.check_stake(conn.miner_id)
                except FailedPrecondition as exc:
                    self.disconnect(conn, exc.message)
                except Exception:  # keep watching; the error is logged with its stack
                    log.exception("stake check of miner %s failed", conn.miner_id)

    def connect(self, token: str) -> MinerConn:
        conn, old = self.registry.open(token)
        events: list[m.Event] = []
        if old is not None and self.registry.close(old, _replaced(old.miner_id, "on this coordinator")):
            events.append(m.MinerLeft(old.miner_id, "replaced by a new Work stream from the same miner"))
            log.info("miner %s disconnected: replaced by a new Work stream", old.miner_id)
        if self.shared:  # the miner's session is this coordinator's now: its previous owner ends its stream
            try:
                self.store.own_miner(conn.miner_id, conn.info)  # type: ignore[attr-defined]
            except Exception as exc:
                self.registry.close(conn)
                self._run(*events)
                raise Unavailable(f"this coordinator cannot record the miner's connection in its database "
                                  f"({exc.__class__.__name__}): Register again, here or with another coordinator") from None
        events.append(m.MinerJoined(self._view(conn)))
        self._run(*events)
        self._save_served()
        return conn

    def disconnect(self, conn: MinerConn, reason: str, *, stalled: bool = False) -> None:
        current = self.registry.miners.get(conn.miner_id) is conn
        if not self.registry.close(conn):
            return
        log.info("miner %s disconnected: %s", conn.miner_id, reason)
        if current:
            if self.shared:
                try:
                    self.store.disown_miner(conn.miner_id)  # type: ignore[attr-defined]
                except Exception:  # its row expires with its lease
                    log.exception("removing the session row of miner %s failed", conn.miner_id)
            self._run(m.MinerLeft(conn.miner_id, reason, stalled=stalled))
        self._save_served()

    def heard_miners(self, connections: list[tuple[str, int]]) -> None:
        """Miners opened Work streams somewhere (NOTIFY aitbc_miners, (miner, epoch)): those connected
        here under an older epoch are another coordinator's now."""
        try:
            for miner_id, epoch in connections:
                if self.store.miner_moved(miner_id, epoch):  # type: ignore[attr-defined]
                    self._moved_elsewhere(miner_id)
        except Exception:  # the renewal (every heartbeat interval) finds them too
            log.exception("handling a miner connection on another coordinator failed")

    def _moved_elsewhere(self, miner_id: str) -> None:
        """The miner connected to another coordinator: its stream here ends (ABORTED: the daemon
        stops serving rather than take the key back) and its jobs go back to the queue."""
        conn = self.registry.miners.get(miner_id)
        if conn is None or not self.registry.close(conn, _replaced(miner_id, "on another coordinator of this pool")):
            return
        log.info("miner %s disconnected: connected to another coordinator", miner_id)
        self._run(m.MinerLeft(miner_id, "connected to another coordinator"))
        self._save_served()

    def on_work(self, conn: MinerConn, msg: miner_pb2.WorkRequest) -> None:
        """Handle one message from a miner; a refusal goes back to it as WorkRejected."""
        conn.last_seen = self.clock()
        kind = msg.WhichOneof("msg")
        try:
            if kind == "heartbeat":
                return
            if kind == "accepted":
                self._run(m.Accepted(conn.miner_id, msg.accepted.job_id), dispatch=False)
            elif kind == "progress":
                p = msg.progress
                self.machine.held(conn.miner_id, p.job_id)
                if p.total_steps == 0 or p.step > p.total_steps:
                    raise InvalidArgument("progress step must be between 0 and total_steps > 0")
                self._run(m.Progressed(conn.miner_id, p), dispatch=False)
            elif kind == "chunk":
                self._on_chunk(conn, msg.chunk)
            elif kind == "result":
                self._on_result(conn, msg.result)
            elif kind == "failed":
                self._run(m.Failed(conn.miner_id, msg.failed.job_id, msg.failed.reason, msg.failed.permanent))
            elif kind == "text":
                self._on_text(conn, msg.text)
            else:
                raise InvalidArgument("empty WorkRequest: set one of heartbeat, accepted, progress, chunk, result, failed")
        except AitbcError as exc:
            job_id = getattr(getattr(msg, kind), "job_id", "") if kind else ""
            conn.send(miner_pb2.WorkResponse(rejected=miner_pb2.WorkRejected(job_id=job_id, reason=exc.message)))
            log.warning("miner %s: %s rejected: %s", conn.miner_id, kind, exc.message)

    def _on_text(self, conn: MinerConn, chunk: job_pb2.TextChunk) -> None:
        job = self.machine.held(conn.miner_id, chunk.job_id)
        if jobs.job_kind(job) != jobs.TEXT:
            raise InvalidArgument(f"job {job.job_id} is not a text job")
        try:
            self.streams.append_text(job.job_id, chunk.text)
        except InvalidArgument as exc:
            self._run(m.Rejected(conn.miner_id, job.job_id, exc.message))
            return
        self._share_text(job.job_id, chunk.text)
        self._heard(conn, job, "the miner streamed its first text (it started the job)")

    def _heard(self, conn: MinerConn, job: job_pb2.Job, started: str) -> None:
        """A word on a held job: the miner is not stalled, and a job still ASSIGNED has started."""
        if job.state == S.JOB_STATE_ASSIGNED:
            self._run(m.Accepted(conn.miner_id, job.job_id, started), dispatch=False)
        self.machine.handle(m.Heard(conn.miner_id))

    def _on_chunk(self, conn: MinerConn, chunk: miner_pb2.ArtifactChunk) -> None:
        job = self.machine.held(conn.miner_id, chunk.job_id)
        if chunk.index >= jobs.job_outputs(job):
            raise InvalidArgument(f"artifact index {chunk.index} out of range for job {job.job_id}")
        try:  # to a file, hashed on the way; bounded per job, per miner and over all miners
            self.uploads.append(conn.miner_id, job.job_id, chunk.index, chunk.data)
        except ResourceExhausted as exc:
            self._run(m.Rejected(conn.miner_id, job.job_id, exc.message))  # requeued; its upload deleted
            return
        self._heard(conn, job, "the miner sent its first artifact chunk (it started the job)")

    def _on_result(self, conn: MinerConn, result: miner_pb2.JobResult) -> None:
        job = self.machine.held(conn.miner_id, result.job_id)
        if self.shared and not self.store.holds(job.job_id):  # type: ignore[attr-defined]
            self._let_go([job.job_id], TAKEN_OVER)  # its result is refused, never attested: the miner drops it
            return
        try:  # small outputs inline: through the same bounded, hashed uploads as chunks
            self.uploads.inline(conn.miner_id, job.job_id, jobs.job_outputs(job), result.inline_artifacts)
        except AitbcError as exc:  # requeued, or failed: it leaves the miner, and its upload is deleted (_moved)
            self._run(m.Rejected(conn.miner_id, job.job_id, exc.message))
            return
        uploads = self.uploads.take(job.job_id)
        held_ms = (self.clock() - self.machine.held_since(job.job_id)) * 1000
        try:
            artifacts, attested = check_result(job, result, uploads, self.streams.text(job.job_id),
                                               Expected(conn.miner_id, self.config.chain_id, self.config.hub_id, held_ms),
                                               self.key)
        except AitbcError as exc:
            for up in uploads.values():
                up.discard()
            self._run(m.Rejected(conn.miner_id, job.job_id, exc.message))
            return
        retention_ms = int(self.config.artifact_retention_s * 1000)
        for art, _ in artifacts:
            art.expires_at_unix_ms = self.time.now_ms() + retention_ms if retention_ms else 0
        rec = receipt_to_proto(attested)
        if job.fee:  # settled by a SETTLE with the job's quote (docs/economy.md)
            rec.settlement.fee = job.fee
            rec.settlement.quote_hash = quotes.QuoteBody.from_canonical(job.quote).hash().hex()
        sampled = self.verifier.sampled(conn.miner_id, job)
        self.receipts.attested(rec, held=sampled or bool(job.verify_of))  # minted only once verification decides
        dev = device_class(conn.info.device)
        fields = job_pb2.Job(artifacts=[a for a, _ in artifacts], device_class=dev, receipt_hash=rec.receipt_hash,
                             units=attested.body.units, unit_type=attested.body.unit_type, gpu_ms=attested.body.gpu_ms)
        if jobs.job_kind(job) == jobs.TEXT:
            fields.prompt_tokens, fields.generated_tokens = result.prompt_tokens, result.generated_tokens
            fields.finish_reason = result.finish_reason
            # how this text was made: a run that returned a trace ran exact (docs/hub.md)
            fields.text_batching = job_pb2.TEXT_BATCHING_EXACT if job.want_text_trace else (
                conn.info.text_batching or job_pb2.TEXT_BATCHING_EXACT)
            if job.want_text_trace:  # checked by check_result
                fields.text_trace.CopyFrom(result.text_trace)
        verification = None
        if sampled:
            scratch = job_pb2.Job(job_id=job.job_id, model=job.model, params=job.params, prompt_hash=job.prompt_hash,
                                  traceparent=job.traceparent, text_batching=fields.text_batching)
            verification = self.verifier.new_run(scratch, ran_on=conn.miner_id, device_class=dev)
            fields.verification = scratch.verification
            fields.verification_job_ids.extend(scratch.verification_job_ids)
        stored = tuple((a.sha256, up.content() if up is not None else b"") for a, up in artifacts)  # files move in
        self._run(m.Completed(conn.miner_id, job.job_id, fields, stored, rec, verification))
        self.receipts.announce(rec)

    # ---- hub ----------------------------------------------------------------------------------------

    def _shards_for(self, job: job_pb2.Job) -> list[job_pb2.Job]:
        """Split a multi-image job by image across the miners that could serve it (one shard each);
        image i keeps seed + i, so the images are those of the whole job."""
        p = job.params.image
        if jobs.job_kind(job) != jobs.IMAGE or p.images < 2 or self.shared:  # shared: its shards could run anywhere,
            return []  # and a split job waits for them in one machine (docs/scaling.md)
        needs = self.machine.needs(job)
        able = [v for v in self.machine.idle_views() if not isinstance(choose([v], needs, 0), Unplaceable)]
        plan = plan_shards(p.images, max(1, len(able)), p.images)
        if len(plan) < 2:
            return []
        shards = []
        for sh in plan:
            params = job_pb2.JobParams()
            params.CopyFrom(job.params)
            params.image.images, params.image.seed = sh.count, shard_seed(p.seed, sh)
            shard = job_pb2.Job(job_id=jobs.new_job_id(), model=job.model, params=params, client_id=job.client_id,
                                created_at_unix_ms=job.created_at_unix_ms, prompt_hash=job.prompt_hash,
                                parent_job_id=job.job_id, first_image=sh.first_image, traceparent=job.traceparent)
            if job.HasField("max_price_per_unit"):
                shard.max_price_per_unit = job.max_price_per_unit
            job.shard_job_ids.append(shard.job_id)
            shards.append(shard)
        return shards

    def _placeable(self, job: job_pb2.Job) -> None:
        """At submission: refuse, with the reason, a job no connected miner could ever take."""
        views = self.machine.idle_views()
        if not views:
            return
        outcome = choose(views, self.machine.needs(job), 0)
        if isinstance(outcome, Unplaceable) and not outcome.wait and outcome.code != "no_model":
            raise FailedPrecondition(outcome.reason)

    def release_miner(self, client: ClientKey, miner_id: str) -> coordinator_pb2.MinerStatus:
        """An operator lifts a quarantine; the miner is on probation (docs/hub.md)."""
        if not client.operator:
            raise PermissionDenied(f"client '{client.id}' is not an operator: releasing a miner needs an API key "
                                   "with operator = true in the coordinator's [[clients]]")
        if not miner_id:
            raise InvalidArgument("miner_id is required (an ait1... address from ListMiners)")
        rec = self.book.get(miner_id)
        if rec is None and miner_id not in self.registry.miners:
            raise NotFound(f"miner {miner_id} is not known to this hub (ListMiners shows the known ones)")
        if rec is None or not rec.quarantined:
            raise FailedPrecondition(f"miner {miner_id} is not quarantined")
        self._reputation(miner_id, "release", False)
        log.warning("miner %s released from quarantine by operator '%s'; on probation", miner_id, client.id)
        self._run()
        return next(st for st in self.list_miners() if st.miner_id == miner_id)

    def _connected(self) -> dict[str, tuple[miner_pb2.MinerInfo, MinerView, str]]:
        """Every connected miner: what it declared, its matching view and the coordinator it is
        connected to. This coordinator's own, and on a shared store every coordinator's of the
        pool (miner_sessions; another's view has the jobs it ran at its owner's last renewal)."""
        here = self.store.coordinator_id if self.shared else ""  # type: ignore[attr-defined]
        out = {c.miner_id: (c.info, self.machine.view(c.miner_id) or self._view(c), here)
               for c in self.registry.miners.values()}
        if self.shared:
            for pm in self.store.pool_miners():  # type: ignore[attr-defined]
                if pm.coordinator != here:  # the table is the truth: a stream here not ended yet is theirs
                    out[pm.miner_id] = (pm.info, dataclasses.replace(self._view_of(pm.miner_id, pm.info),
                                                                     running=pm.running), pm.coordinator)
        return out

    def list_miners(self) -> list[coordinator_pb2.MinerStatus]:
        out = {}
        for rec in self.book.all():
            out[rec.miner_id] = coordinator_pb2.MinerStatus(miner_id=rec.miner_id)
        for miner_id, (info, view, where) in self._connected().items():
            st = out.setdefault(miner_id, coordinator_pb2.MinerStatus(miner_id=miner_id))
            st.connected, st.device, st.gpu_name, st.vram_mb = True, info.device, info.gpu_name, info.vram_mb
            st.coordinator = where
            st.models.extend(info.models)
            st.price_per_unit, st.max_concurrency = info.price_per_unit, info.max_concurrency or 1
            st.text_batching = info.text_batching
            st.running = view.running
            st.recent_latency_ms = view.recent_latency_ms
            st.score = score(view, JobNeeds(model=info.models[0], kind=view.kind_of(info.models[0])))
        for miner_id, st in out.items():
            rec = self.book.snapshot(miner_id)
            st.reputation, st.jobs_served, st.failures, st.stalls = rec.reputation, rec.jobs_served, rec.failures, rec.stalls
            st.verifications_passed, st.verifications_failed = rec.verifications_passed, rec.verifications_failed
            st.quarantined, st.probation_left = rec.quarantined, rec.probation_left
            st.staked = self.stakes.get(miner_id, 0)
        return sorted(out.values(), key=lambda s: (not s.connected, -s.reputation, s.miner_id))

    def market(self, miner_id: str = "") -> coordinator_pb2.GetMarketResponse:
        """The public market (MarketService): offers, demand per model, recent fills, and with
        `miner_id` that miner's record (connected or not). Built from what the machine, the registry
        and the reputation book hold; names no client or job."""
        out = coordinator_pb2.GetMarketResponse(queued=self.machine.queued(), at_unix_ms=self.time.now_ms())
        pool = self._connected()
        if miner_id:
            crypto.validate_address(miner_id)  # INVALID_ARGUMENT with the reason
            rec = self.book.get(miner_id)
            connected = miner_id in pool
            if rec is not None or connected:
                rec = rec or self.book.snapshot(miner_id)
                out.miner.CopyFrom(coordinator_pb2.MarketMiner(
                    miner_id=miner_id, jobs_served=rec.jobs_served, verifications_passed=rec.verifications_passed,
                    verifications_failed=rec.verifications_failed, failures=rec.failures, stalls=rec.stalls,
                    reputation=rec.reputation, quarantined=rec.quarantined, connected=connected))
        out.recent_fills.extend(self.fills)
        models: dict[str, coordinator_pb2.ModelMarket] = {}
        for served in self.registry.list_models():
            models[served.name] = coordinator_pb2.ModelMarket(name=served.name, kind=served.kind)
        for offer_id, (info, view, _) in pool.items():
            free = max(0, view.max_concurrency - view.running)
            rec = self.book.snapshot(offer_id)
            if rec.quarantined:
                continue  # not an offer: no work goes to it
            out.offers.add(miner_id=offer_id, models=sorted(info.models), price_per_unit=view.price_per_unit,
                           max_concurrency=view.max_concurrency, free_slots=free, reputation=rec.reputation,
                           device_class=view.device_class, staked=self.stakes.get(offer_id, 0),
                           jobs_served=rec.jobs_served, verifications_passed=rec.verifications_passed,
                           verifications_failed=rec.verifications_failed)
            for name in info.models:
                mm = models.setdefault(name, coordinator_pb2.ModelMarket(name=name))
                mm.min_price_per_unit = view.price_per_unit if not mm.miners else min(mm.min_price_per_unit,
                                                                                       view.price_per_unit)
                mm.max_price_per_unit = max(mm.max_price_per_unit, view.price_per_unit)
                mm.miners += 1
                mm.slots += view.max_concurrency
                mm.free_slots += free
        for job_id in self.machine.queue:
            rec = self.machine.records.get(job_id)
            if rec is None or rec.job.state != S.JOB_STATE_QUEUED or rec.job.verify_of:
                continue
            mm = models.setdefault(rec.job.model, coordinator_pb2.ModelMarket(name=rec.job.model))
            mm.queued += 1
            if rec.rate:
                mm.queued_paid += 1
                mm.best_fee_per_unit_micro = max(mm.best_fee_per_unit_micro, rec.rate)
        for name, mm in models.items():
            q = self.machine.service.quantiles(name)
            if q is not None:
                mm.service_p50_ms = round(q[0] * 1000)
        out.models.extend(sorted(models.values(), key=lambda m: m.name))
        out.offers.sort(key=lambda o: (o.price_per_unit, o.miner_id))
        return out

    # ---- housekeeping ---------------------------------------------------------------------------------

    def tick(self) -> None:
        """Drop silent miners (their jobs go back to the queue), take jobs back from miners that
        stalled, expire jobs nobody took, and every 10 s release receipts whose verification can
        no longer progress."""
        now = self.clock()
        if now - self._reconciled_at > RECONCILE_S:
            self._reconciled_at = now
            self._run(*self.verifier.reconcile_held())
        for conn, quiet in self.registry.silent(self.config.heartbeat_timeout_s):
            self.disconnect(conn, f"no heartbeat for {quiet:.1f} s", stalled=True)
        if self.registry.miners and now - self._served_saved_at > SERVED_SAVE_S:
            self._save_served()
        if now - self._quotes_pruned_at > QUOTE_PRUNE_S:
            self._quotes_pruned_at = now
            self._prune_quotes()
        self._run(*(self._share() if self.shared else ()), m.Tick())
        self._publish_queue_moves()
        if now >= self._collect_at:
            full = self.collect_artifacts() == COLLECT_BATCH
            self._collect_at = now + (0.0 if full else COLLECT_EVERY_S)

    def _prune_quotes(self) -> None:
        """Forget used quotes that expired: SubmitJob refuses them anyway (and the ledger settles a
        quote once, ever)."""
        now = self.time.now_ms()
        if self.shared:
            self.store.prune_quotes(now)  # type: ignore[attr-defined]
            return
        for key, value in self.store.meta_items(QUOTE_META):
            try:
                expired = int(value.split()[1]) < now
            except (IndexError, ValueError):
                expired = True
            if expired:
                self.store.delete_meta(key)

    def collect_artifacts(self) -> int:
        """One garbage-collection pass (at most COLLECT_BATCH artifacts): delete the bytes of
        artifacts past their retention. Jobs keep their artifact descriptions (sha256, size) and
        receipts; only the bytes go. Bytes a held receipt still needs (its verification compares
        them) are kept until the verification decides. Returns how many it looked at."""
        now = self.time.now_ms()
        expired = self.store.expired_artifacts(now, COLLECT_BATCH)
        needed = {sha for sha, job_id in expired if self._receipt_held(job_id)}
        for sha in needed:
            self.store.keep_artifact(sha, now + COLLECT_HOLD_MS)
        gone = [sha for sha, _ in expired if sha not in needed]
        self.store.delete_artifacts(gone)
        if gone:
            metrics.ARTIFACTS_COLLECTED.inc(len(gone))
            log.info("deleted %d artifacts past artifact_retention_s (%g s)", len(gone), self.config.artifact_retention_s)
        return len(expired)

    def _receipt_held(self, job_id: str) -> bool:
        job = self._find(job_id)
        rec = self.receipts.get(job.receipt_hash) if job is not None and job.receipt_hash else None
        return rec is not None and rec.settlement.state == receipt_pb2.SETTLEMENT_STATE_HELD

    async def run_housekeeping(self, interval_s: float = 0.5) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                self.tick()
            except Exception:  # keep the loop alive; the error is logged with its stack
                log.exception("housekeeping failed")

    @property
    def receipt_listeners(self) -> list[Callable[[receipt_pb2.Receipt], None]]:
        return self.receipts.listeners

    def close(self) -> None:
        if self._events_pull is not None:
            self._events_pull.cancel()
        if self._events_timer is not None:  # events not written yet: watchers elsewhere read the states
            self._events_timer.cancel()
            self._events_timer = None
        self._save_served()  # the miners connected now were serving until now
        self.registry.close_all()
        self.uploads.close()
        if self.event_log is not None:
            self.event_log.close()
            self.machine.recorder = self.event_log = None
        metrics.QUEUE_DEPTH.set_function(None)
        metrics.MINERS_CONNECTED.set_function(None)
        metrics.UPLOAD_BYTES.set_function(None)
        metrics.QUARANTINED.set_function(None)


def _too_many(client_id: str, limit: int) -> str:
    return (f"client '{client_id}' already has {limit} unfinished jobs (max_active_jobs {limit}): "
            "wait for some to end, or cancel some, before submitting more")


def _replaced(miner_id: str, where: str) -> Aborted:
    """The status of a Work stream a newer one of the same miner key replaced (docs/scaling.md,
    "Miner-session ownership"): the miner daemon stops serving on ABORTED, so two processes holding
    one key do not take it from each other in turn."""
    return Aborted(f"miner {miner_id} opened a newer Work stream {where}: this one ends (a miner key is connected "
                   "to one coordinator at a time, the newest connection wins); if no other process of yours runs "
                   "with this key, someone else holds it")


def _check_fee(priority_fee: int) -> None:
    if not 0 <= priority_fee <= quotes.MAX_UINT:
        raise InvalidArgument(f"priority_fee must be between 0 and 2^53-1, got {priority_fee}")


def _same_request(job: job_pb2.Job, model: str, asked: job_pb2.JobParams, params: job_pb2.JobParams) -> bool:
    """Is this submission the one that made `job`? A seed the client left out is the job's."""
    mine = job_pb2.JobParams()
    mine.CopyFrom(params)
    kind = mine.WhichOneof("kind")
    if kind is not None and kind == job.params.WhichOneof("kind") and not getattr(asked, kind).HasField("seed"):
        getattr(mine, kind).seed = getattr(job.params, kind).seed
    return job.model == model and mine == job.params
