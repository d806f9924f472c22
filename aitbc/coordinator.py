"""The coordinator's core: jobs, miner sessions, dispatch, result verification and attestation.

Pure asyncio, no gRPC: server/coordinator.py is a thin layer over this class. Wire messages
(aitbc.v1 protos) are used as the records because they are also what is persisted.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import hmac
import itertools
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from aitbc import crypto, jobs, metrics, receipts, telemetry
from aitbc.config import ClientKey, CoordinatorConfig
from aitbc.errors import (
    AitbcError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from aitbc.hub.matching import JobNeeds, MinerView, Unplaceable, choose, score
from aitbc.hub.reputation import LmdbReputationStore, ReputationBook, ReputationPolicy
from aitbc.hub.sharding import Shard, merge_in_order, plan_shards, shard_seed
from aitbc.hub.verification import arbitrate, sample_key, should_verify
from aitbc.jobstore import JobStore
from aitbc.v1 import coordinator_pb2, job_pb2, miner_pb2, receipt_pb2
from aitbc.wire import receipt_from_proto, receipt_to_proto

S = job_pb2.JobState
M = TypeVar("M", job_pb2.Job, job_pb2.JobProgress)
log = logging.getLogger("aitbc.coordinator")
job_log = logging.getLogger("aitbc.jobs")

REGISTER_DOMAIN = b"AITBC/miner-register/v1"
CHALLENGE_TTL_S = 60.0
WATCH_QUEUE = 256
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TEXT_CONTENT_TYPE = "text/plain; charset=utf-8"
MAX_STREAMED_CHARS = 1 << 20
FINISH_REASONS = ("length", "stop", "eos")


def model_kind(info: miner_pb2.MinerInfo, model: str) -> int:
    """A model's kind as its miner declared it; undeclared models are image models."""
    for spec in info.model_specs:
        if spec.name == model:
            return spec.kind or jobs.IMAGE
    return jobs.IMAGE
UNIT_SLACK_MS = 2000
FAILING_STREAK = 3  # failures/stalls in a row after which a miner gets work only when no steady one is free
VERIFY_CLIENT = "hub-verify"  # client id of re-execution jobs: no client sees them
V = job_pb2.VerificationState


SESSION_TTL_S = 60.0  # a registration must open its Work stream within this; tokens are single-use
MAX_PENDING_SESSIONS = 10_000
MAX_INFO_TEXT = 128
MAX_MODELS = 64


def check_miner_info(info: miner_pb2.MinerInfo) -> None:
    """What a miner declares is bounded: Register is open to any key, so its size must be too."""
    if not info.models:
        raise InvalidArgument("a miner must declare at least one model")
    if len(info.models) > MAX_MODELS or len(info.model_specs) > MAX_MODELS:
        raise InvalidArgument(f"a miner may declare at most {MAX_MODELS} models")
    for m in [*info.models, *(spec.name for spec in info.model_specs)]:
        jobs.validate_model(m)
    for name in ("gpu_name", "device", "version"):
        if len(getattr(info, name)) > MAX_INFO_TEXT:
            raise InvalidArgument(f"{name} must be at most {MAX_INFO_TEXT} characters")
    if not 1 <= (info.max_concurrency or 1) <= 64:
        raise InvalidArgument("max_concurrency must be between 1 and 64")


def device_class(device: str) -> str:
    return "cuda" if device.startswith("cuda") else ("cpu" if device == "cpu" else "")


def register_digest(challenge: bytes, pubkey: bytes) -> bytes:
    return crypto.domain_digest(REGISTER_DOMAIN, challenge + pubkey)


class TokenBucket:
    def __init__(self, rate: float, burst: int, clock: Callable[[], float]) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens = float(burst)
        self.at = clock()

    def take(self) -> float:
        """0 when allowed, else seconds until a token is available."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


@dataclass
class MinerSession:
    miner_id: str
    pubkey: bytes
    info: miner_pb2.MinerInfo
    token: str


@dataclass(eq=False)
class MinerConn:
    """One live Work stream. `outbox` feeds the stream; None ends it."""

    session: MinerSession
    outbox: asyncio.Queue[miner_pb2.WorkResponse | None]
    last_seen: float
    running: set[str] = field(default_factory=set)
    uploads: dict[str, dict[int, bytearray]] = field(default_factory=dict)
    upload_bytes: dict[str, int] = field(default_factory=dict)
    closed: bool = False
    latency_ms: float = 0.0  # EWMA of assignment -> accepted result
    active_at: float = 0.0  # last message about any of its jobs (stall detection)

    @property
    def miner_id(self) -> str:
        return self.session.miner_id

    def send(self, msg: miner_pb2.WorkResponse) -> None:
        if not self.closed:
            self.outbox.put_nowait(msg)


class Coordinator:
    def __init__(
        self,
        store: JobStore,
        key: crypto.PrivateKey,
        config: CoordinatorConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.key = key
        self.config = config
        self.clock = clock
        self.clients: dict[str, ClientKey] = {c.api_key_sha256: c for c in config.clients}
        self._buckets: dict[str, TokenBucket] = {}
        self._challenge_key = secrets.token_bytes(32)  # challenges are MACs: nothing is kept per GetChallenge
        self._used_challenges: dict[bytes, float] = {}  # challenge -> expiry, so each is used once
        self._sessions: dict[str, tuple[MinerSession, float]] = {}  # token -> (session, expiry); used once
        self.miners: dict[str, MinerConn] = {}
        self._model_seen: dict[str, tuple[float, int]] = {}  # model -> (last seen, kind)
        self._text: dict[str, list[str]] = {}  # text job -> deltas streamed in the current attempt
        self._queue: collections.deque[str] = collections.deque()
        self._jobs: dict[str, job_pb2.Job] = {}  # active jobs, the source of truth while active
        self._assigned_at: dict[str, float] = {}
        self._queued_at: dict[str, float] = {}
        self._excluded: dict[str, set[str]] = {}  # job -> miners whose result for it was rejected
        self._avoid: dict[str, set[str]] = {}  # job -> miners it failed or stalled on (retried elsewhere if possible)
        self._watchers: dict[str, set[asyncio.Queue[job_pb2.Job | job_pb2.JobProgress]]] = {}
        self._rr = itertools.count()
        self.receipt_listeners: list[Callable[[receipt_pb2.Receipt], None]] = []
        self.book = ReputationBook(LmdbReputationStore(store.env), policy=ReputationPolicy(
            quarantine_after=config.quarantine_after, probation_checks=config.probation_checks))
        secret = store.get_meta("verify_secret")
        if secret is None:  # keyed sampling: miners cannot tell which of their jobs will be checked
            secret = secrets.token_bytes(32)
            store.put_meta("verify_secret", secret)
        self._verify_secret = secret
        self._reconciled_at = 0.0
        # metrics: labels bound once (hot path); gauges read at scrape time
        self._jobs_in = {st: metrics.JOBS_TOTAL.labels(state=jobs.state_name(st)) for st in S.values() if st}
        metrics.QUEUE_DEPTH.set_function(lambda: len(self._queue))
        metrics.MINERS_CONNECTED.set_function(lambda: len(self.miners))
        metrics.QUARANTINED.set_function(lambda: sum(r.quarantined for r in self.book.all()))
        # jobs no miner can take until the set of miners changes: not re-matched at every dispatch
        self._epoch = 0
        self._stuck: dict[str, int] = {}
        self._restore()
        for parent in [j for j in self._jobs.values() if j.shard_job_ids]:
            self._check_parent(parent)
        self._reconcile_held()

    # ---- start-up ---------------------------------------------------------------------------

    def _restore(self) -> None:
        """Reload active jobs; jobs that were with a miner go back to the queue."""
        restored = sorted(self.store.active_jobs(), key=lambda j: j.created_at_unix_ms)
        for job in restored:
            if job.shard_job_ids:  # a split job waits for its shards, which are restored below
                self._jobs[job.job_id] = job
                continue
            if job.state != S.JOB_STATE_QUEUED:
                job.state = S.JOB_STATE_QUEUED
                job.miner_id = ""
                job.error = "requeued: the coordinator restarted while a miner held the job"
                job.updated_at_unix_ms = jobs.now_ms()
                self.store.put_job(job)
            self._enqueue(job)
        if restored:
            log.info("restored %d active jobs into the queue", len(restored))

    # ---- clients ----------------------------------------------------------------------------

    def authenticate(self, api_key: str | None) -> ClientKey:
        if not api_key:
            raise Unauthenticated(
                "missing API key: send it in the x-api-key metadata (`aitbc devnet` prints the devnet key)"
            )
        client = self.clients.get(hashlib.sha256(api_key.encode()).hexdigest())
        if client is None:
            raise Unauthenticated("unknown API key: check the key (a devnet prints its key at start-up)")
        bucket = self._buckets.get(client.id)
        if bucket is None:
            bucket = self._buckets[client.id] = TokenBucket(client.rate_per_s, client.burst, self.clock)
        wait = bucket.take()
        if wait:
            raise ResourceExhausted(
                f"rate limit of {client.rate_per_s:g} requests/s (burst {client.burst}) exceeded for client "
                f"'{client.id}': retry in {wait * 1000:.0f} ms",
                retry_after_s=wait,
            )
        return client

    def served_models(self) -> dict[str, int]:
        """Models served now (or within model_grace_s) and their kind."""
        now = self.clock()
        served = {m: kind for m, (t, kind) in self._model_seen.items() if now - t < self.config.model_grace_s}
        for c in self.miners.values():
            for m in c.session.info.models:
                served[m] = model_kind(c.session.info, m)
        return served

    def _seen(self, info: miner_pb2.MinerInfo) -> None:
        now = self.clock()
        for m in info.models:
            self._model_seen[m] = (now, model_kind(info, m))

    def list_models(self) -> list[coordinator_pb2.ServedModel]:
        out: dict[str, coordinator_pb2.ServedModel] = {}
        for c in self.miners.values():
            info = c.session.info
            for m in info.models:
                sm = out.setdefault(m, coordinator_pb2.ServedModel(name=m, kind=model_kind(info, m),
                                                                   min_price_per_unit=info.price_per_unit))
                sm.miners += 1
                sm.min_price_per_unit = min(sm.min_price_per_unit, info.price_per_unit)
                for spec in info.model_specs:
                    if spec.name == m:
                        sm.context_length = max(sm.context_length, spec.context_length)
        return [out[m] for m in sorted(out)]

    async def submit(
        self,
        client_id: str,
        model: str,
        params: job_pb2.JobParams,
        *,
        request_id: str = "",
        max_price_per_unit: int | None = None,
    ) -> job_pb2.Job:
        jobs.validate_model(model)
        jobs.validate_request_id(request_id)
        params = jobs.normalize_params(params)
        if request_id:
            existing = self.store.job_for_request(client_id, request_id)
            if existing is not None:
                return self.get(client_id, existing)
        served = self.served_models()
        kind = jobs.job_kind(params)
        if model not in served:
            have = ", ".join(f"{m} ({jobs.kind_name(k)})" for m, k in sorted(served.items())) or "none: no miner is connected"
            raise FailedPrecondition(f"no miner serves model '{model}' (models served now: {have})")
        if served[model] != kind:
            same = ", ".join(sorted(m for m, k in served.items() if k == kind)) or "none"
            raise FailedPrecondition(f"model '{model}' is a {jobs.kind_name(served[model])} model and this is a "
                                     f"{jobs.kind_name(kind)} job (served {jobs.kind_name(kind)} models: {same})")
        if kind == jobs.TEXT:
            contexts = [spec.context_length for c in self.miners.values() for spec in c.session.info.model_specs
                        if spec.name == model and spec.context_length]
            if contexts and params.text.max_new_tokens >= max(contexts):
                raise InvalidArgument(f"max_new_tokens {params.text.max_new_tokens} does not fit the context of model "
                                      f"'{model}' ({max(contexts)} tokens, prompt included)")
        now = jobs.now_ms()
        probe = job_pb2.Job(model=model, params=params)
        if max_price_per_unit is not None:
            probe.max_price_per_unit = max_price_per_unit
        self._placeable(probe)
        job = job_pb2.Job(
            job_id=jobs.new_job_id(),
            model=model,
            params=params,
            state=S.JOB_STATE_QUEUED,
            client_id=client_id,
            created_at_unix_ms=now,
            updated_at_unix_ms=now,
            prompt_hash=jobs.prompt_hash(jobs.job_prompt(job_pb2.Job(params=params))),
            request_id=request_id,
            traceparent=telemetry.current_traceparent(),
        )
        if max_price_per_unit is not None:
            job.max_price_per_unit = max_price_per_unit
        shards = self._shards_for(job)
        self.store.put_jobs([*shards, job])  # one transaction: the job and its shards, or nothing
        telemetry.set_attributes(job_id=job.job_id, model=model)
        self._jobs_in[S.JOB_STATE_QUEUED].inc()
        self._jobs[job.job_id] = job
        for queued in shards or [job]:
            self._enqueue(queued)
        self._dispatch()
        return self._snapshot(job)

    def _load(self, job_id: str) -> job_pb2.Job:
        jobs.validate_job_id(job_id)
        job = self._jobs.get(job_id) or self.store.get_job(job_id)
        if job is None:
            raise NotFound(f"job {job_id} not found")
        return job

    def get(self, client_id: str, job_id: str) -> job_pb2.Job:
        job = self._load(job_id)
        if job.client_id != client_id:
            raise PermissionDenied(f"job {job_id} belongs to another client")
        out = self._snapshot(job)
        if out.receipt_hash:  # the stored receipt carries the latest settlement state
            rec = self.store.get_receipt(out.receipt_hash)
            if rec is not None:
                out.receipt.CopyFrom(rec)
        return out

    async def cancel(self, client_id: str, job_id: str, reason: str = "") -> job_pb2.Job:
        job = self._load(job_id)
        if job.client_id != client_id:
            raise PermissionDenied(f"job {job_id} belongs to another client")
        if job.state in jobs.TERMINAL:
            raise FailedPrecondition(f"job {job_id} is already {jobs.state_name(job.state)}; only unfinished jobs can be cancelled")
        why = f"cancelled by client{': ' + reason[:200] if reason else ''}"
        self._stop(job, S.JOB_STATE_CANCELLED, why)
        self._dispatch()
        return self.get(client_id, job_id)

    def _stop(self, job: job_pb2.Job, state: int, why: str) -> None:
        """End an unfinished job now (and its shards), telling the miner that holds it."""
        conn = self.miners.get(job.miner_id)
        if conn is not None and job.job_id in conn.running:
            conn.running.discard(job.job_id)
            conn.uploads.pop(job.job_id, None)
            conn.send(miner_pb2.WorkResponse(cancel=miner_pb2.CancelAssignment(job_id=job.job_id, reason=why)))
        self._finish(job, state, why)
        for shard_id in job.shard_job_ids:
            shard = self._jobs.get(shard_id)
            if shard is not None and shard.state in jobs.ACTIVE:
                self._stop(shard, S.JOB_STATE_CANCELLED, f"job {job.job_id} ended: {why}")

    async def watch(self, client_id: str, job_id: str) -> AsyncIterator[job_pb2.Job | job_pb2.JobProgress]:
        """First a snapshot, then progress and every state change, until the job finishes."""
        job = self.get(client_id, job_id)
        if job.state in jobs.TERMINAL:
            yield job
            return
        # subscribe before the snapshot is handed out: nothing between the two is missed
        queue: asyncio.Queue[job_pb2.Job | job_pb2.JobProgress] = asyncio.Queue(WATCH_QUEUE)
        self._watchers.setdefault(job_id, set()).add(queue)
        streamed, offset = 0, 0  # deltas and characters of the current attempt sent to this watcher
        try:
            yield job
            while True:
                event = await queue.get()
                if isinstance(event, job_pb2.TextChunk) or (isinstance(event, job_pb2.Job) and event.state in jobs.TERMINAL):
                    deltas = self._text.get(job_id, [])
                    if len(deltas) > streamed:  # coalesce whatever this watcher has not seen yet
                        text = "".join(deltas[streamed:])
                        chunk = job_pb2.TextChunk(job_id=job_id, offset=offset, text=text)
                        streamed, offset = len(deltas), offset + len(text)  # before yielding: more may arrive
                        yield chunk
                    if isinstance(event, job_pb2.TextChunk):
                        continue
                elif isinstance(event, job_pb2.Job) and event.state == S.JOB_STATE_QUEUED:
                    streamed = offset = 0  # requeued: the next attempt's text starts again at offset 0
                yield event
                if isinstance(event, job_pb2.Job) and event.state in jobs.TERMINAL:
                    return
        finally:
            watchers = self._watchers.get(job_id)
            if watchers is not None:
                watchers.discard(queue)
                if not watchers:
                    del self._watchers[job_id]
                    if job_id not in self._jobs:
                        self._text.pop(job_id, None)

    def _publish(self, job_id: str, event: job_pb2.Job | job_pb2.JobProgress) -> None:
        for queue in self._watchers.get(job_id, ()):
            if queue.full():
                if not isinstance(event, job_pb2.Job):
                    continue  # a slow watcher misses progress; text it catches up on at the next event
                while not queue.empty():
                    queue.get_nowait()
            queue.put_nowait(event)

    def artifact(self, client_id: str, job_id: str, index: int) -> tuple[job_pb2.Artifact, bytes]:
        job = self.get(client_id, job_id)
        if job.state != S.JOB_STATE_COMPLETED:
            raise FailedPrecondition(f"job {job_id} is {jobs.state_name(job.state)}; results exist only for COMPLETED jobs")
        if index >= len(job.artifacts):
            raise InvalidArgument(f"artifact index {index} is out of range: job {job_id} has {len(job.artifacts)}")
        art = job.artifacts[index]
        data = self.store.get_artifact(art.sha256)
        if data is None:
            raise NotFound(f"artifact {art.sha256} of job {job_id} is no longer stored")
        return art, data

    def receipt(self, client_id: str, *, receipt_hash: str = "", job_id: str = "") -> receipt_pb2.Receipt:
        if job_id:
            job = self.get(client_id, job_id)
            if job.shard_job_ids:
                raise FailedPrecondition(f"job {job_id} was split into {len(job.shard_job_ids)} shards, each with its "
                                         f"own receipt: list them with ListReceipts(job_id={job_id})")
            if not job.receipt_hash:
                raise FailedPrecondition(f"job {job_id} is {jobs.state_name(job.state)} and has no receipt")
            receipt_hash = job.receipt_hash
        if not receipt_hash:
            raise InvalidArgument("give a receipt_hash or a job_id")
        rec = self.store.get_receipt(receipt_hash.lower())
        if rec is None:
            raise NotFound(f"receipt {receipt_hash} not found")
        if rec.body.client != client_id:
            raise PermissionDenied(f"receipt {receipt_hash} belongs to another client")
        return rec

    def list_receipts(self, client_id: str, *, job_id: str = "", page_size: int = 0, page_token: str = "") -> tuple[list[receipt_pb2.Receipt], str]:
        if job_id:
            job = self.get(client_id, job_id)  # a split job's receipts are its shards', in image order
            return [self.receipt(client_id, job_id=j) for j in (job.shard_job_ids or [job_id])], ""
        limit = min(page_size or 20, 100)
        try:
            before = bytes.fromhex(page_token) if page_token else None
        except ValueError:
            raise InvalidArgument("page_token is malformed: pass the next_page_token of the previous page") from None
        page, nxt = self.store.client_receipts(client_id, before=before, limit=limit)
        return page, nxt.hex() if nxt else ""

    # ---- miners -----------------------------------------------------------------------------

    def challenge(self) -> tuple[bytes, float]:
        """32 bytes: expiry (ms, 8) || random (8) || HMAC-SHA256 of both (16). Stateless, so a flood
        of GetChallenge calls costs the coordinator no memory and locks nobody out."""
        body = int((self.clock() + CHALLENGE_TTL_S) * 1000).to_bytes(8, "big") + secrets.token_bytes(8)
        return body + hmac.new(self._challenge_key, body, hashlib.sha256).digest()[:16], CHALLENGE_TTL_S

    def _take_challenge(self, challenge: bytes) -> None:
        now = self.clock()
        body, tag = challenge[:16], challenge[16:]
        if len(challenge) != 32 or not hmac.compare_digest(
                tag, hmac.new(self._challenge_key, body, hashlib.sha256).digest()[:16]):
            raise Unauthenticated("unknown challenge: call GetChallenge on this coordinator and sign it")
        expiry = int.from_bytes(body[:8], "big") / 1000
        if expiry < now or challenge in self._used_challenges:
            raise Unauthenticated("expired or already used challenge: call GetChallenge again and sign within 60 s")
        for c, exp in list(self._used_challenges.items()):
            if exp < now:
                del self._used_challenges[c]
        self._used_challenges[challenge] = expiry

    def register(self, pubkey: bytes, challenge: bytes, signature: bytes, info: miner_pb2.MinerInfo) -> MinerSession:
        self._take_challenge(challenge)
        if len(pubkey) != 33:
            raise InvalidArgument("public_key must be a 33-byte compressed secp256k1 key")
        try:
            signer = crypto.recover_pubkey(register_digest(challenge, pubkey), signature)
        except AitbcError as exc:
            raise Unauthenticated(f"registration signature rejected: {exc.message}") from None
        if signer != pubkey:
            raise Unauthenticated("registration signature was not made by public_key")
        check_miner_info(info)
        now = self.clock()
        for token, (_, expiry) in list(self._sessions.items()):
            if expiry < now:
                del self._sessions[token]
        if len(self._sessions) >= MAX_PENDING_SESSIONS:
            # evict the oldest unused registration rather than refuse: an honest miner opens its Work
            # stream right after Register, so a flood of registrations cannot lock it out
            del self._sessions[next(iter(self._sessions))]
        session = MinerSession(crypto.address_from_pubkey(pubkey), pubkey, info, secrets.token_hex(24))
        self._sessions[session.token] = (session, now + SESSION_TTL_S)
        log.info("miner %s registered: models=%s device=%s price=%d", session.miner_id, list(info.models), info.device, info.price_per_unit)
        return session

    def connect(self, token: str) -> MinerConn:
        session, expiry = self._sessions.pop(token or "", (None, 0.0))
        if session is None or expiry < self.clock():
            raise Unauthenticated("unknown or expired miner session: Register again and open the Work stream "
                                  f"within {SESSION_TTL_S:g} s with the token in x-miner-session")
        old = self.miners.get(session.miner_id)
        if old is not None:
            self.disconnect(old, "replaced by a new Work stream from the same miner")
        conn = MinerConn(session, asyncio.Queue(), self.clock())
        self.miners[session.miner_id] = conn
        self._epoch += 1
        self._seen(session.info)
        self._dispatch()
        return conn

    def disconnect(self, conn: MinerConn, reason: str) -> None:
        if conn.closed:
            return
        conn.closed = True
        conn.outbox.put_nowait(None)
        if self.miners.get(conn.miner_id) is conn:
            del self.miners[conn.miner_id]
            self._epoch += 1
        self._seen(conn.session.info)
        for job_id in list(conn.running):
            job = self._jobs.get(job_id)
            if job is not None and job.miner_id == conn.miner_id:
                self._requeue(job, f"miner {conn.miner_id} lost: {reason}")
        conn.running.clear()
        log.info("miner %s disconnected: %s", conn.miner_id, reason)
        self._dispatch()

    def on_work(self, conn: MinerConn, msg: miner_pb2.WorkRequest) -> None:
        """Handle one message from a miner; a refusal goes back to it as WorkRejected."""
        conn.last_seen = self.clock()
        kind = msg.WhichOneof("msg")
        try:
            if kind == "heartbeat":
                return
            if kind == "accepted":
                self._on_accepted(conn, msg.accepted.job_id)
            elif kind == "progress":
                self._on_progress(conn, msg.progress)
            elif kind == "chunk":
                self._on_chunk(conn, msg.chunk)
            elif kind == "result":
                self._on_result(conn, msg.result)
            elif kind == "failed":
                self._on_failed(conn, msg.failed)
            elif kind == "text":
                self._on_text(conn, msg.text)
            else:
                raise InvalidArgument("empty WorkRequest: set one of heartbeat, accepted, progress, chunk, result, failed")
        except AitbcError as exc:
            job_id = getattr(getattr(msg, kind), "job_id", "") if kind else ""
            conn.send(miner_pb2.WorkResponse(rejected=miner_pb2.WorkRejected(job_id=job_id, reason=exc.message)))
            log.warning("miner %s: %s rejected: %s", conn.miner_id, kind, exc.message)

    def _held(self, conn: MinerConn, job_id: str) -> job_pb2.Job:
        job = self._jobs.get(job_id)
        if job is None or job.miner_id != conn.miner_id or job_id not in conn.running:
            raise PermissionDenied(f"job {job_id[:64]} is not assigned to miner {conn.miner_id}")
        conn.active_at = conn.last_seen
        return job

    def _on_accepted(self, conn: MinerConn, job_id: str) -> None:
        job = self._held(conn, job_id)
        if job.state == S.JOB_STATE_ASSIGNED:
            self._jobs_in[S.JOB_STATE_RUNNING].inc()
            job.state = S.JOB_STATE_RUNNING
            job.started_at_unix_ms = job.updated_at_unix_ms = jobs.now_ms()
            self.store.put_job(job)
            self._publish(job_id, self._snapshot(job))

    def _on_progress(self, conn: MinerConn, progress: job_pb2.JobProgress) -> None:
        job = self._held(conn, progress.job_id)
        if progress.total_steps == 0 or progress.step > progress.total_steps:
            raise InvalidArgument("progress step must be between 0 and total_steps > 0")
        job.progress.CopyFrom(progress)
        self._publish(job.job_id, job_pb2.JobProgress(job_id=job.job_id, step=progress.step, total_steps=progress.total_steps))
        parent = self._jobs.get(job.parent_job_id) if job.parent_job_id else None
        if parent is not None:  # a split job's progress: steps done over all its shards
            per_shard = jobs.job_steps_total(parent)  # every shard runs the job's steps; an ended one ran them all
            steps = sum(self._jobs[j].progress.step if j in self._jobs else per_shard for j in parent.shard_job_ids)
            total = per_shard * len(parent.shard_job_ids)
            parent.progress.CopyFrom(job_pb2.JobProgress(job_id=parent.job_id, step=steps, total_steps=total))
            self._publish(parent.job_id, self._snapshot(parent.progress))

    def _on_text(self, conn: MinerConn, chunk: job_pb2.TextChunk) -> None:
        job = self._held(conn, chunk.job_id)
        if jobs.job_kind(job) != jobs.TEXT:
            raise InvalidArgument(f"job {job.job_id} is not a text job")
        deltas = self._text.setdefault(job.job_id, [])
        if sum(map(len, deltas)) + len(chunk.text) > MAX_STREAMED_CHARS:
            self._reject_result(conn, job, f"streamed text exceeds {MAX_STREAMED_CHARS} characters")
            return
        deltas.append(chunk.text)
        self._publish(job.job_id, job_pb2.TextChunk(job_id=job.job_id))

    def _on_chunk(self, conn: MinerConn, chunk: miner_pb2.ArtifactChunk) -> None:
        job = self._held(conn, chunk.job_id)
        if chunk.index >= jobs.job_outputs(job):
            raise InvalidArgument(f"artifact index {chunk.index} out of range for job {job.job_id}")
        total = conn.upload_bytes.get(job.job_id, 0) + len(chunk.data)
        if total > self.config.max_artifact_bytes:
            conn.uploads.pop(job.job_id, None)
            conn.upload_bytes.pop(job.job_id, None)
            self._reject_result(conn, job, f"artifacts exceed {self.config.max_artifact_bytes} bytes")
            return
        conn.upload_bytes[job.job_id] = total
        conn.uploads.setdefault(job.job_id, {}).setdefault(chunk.index, bytearray()).extend(chunk.data)

    def _reject_result(self, conn: MinerConn, job: job_pb2.Job, reason: str) -> None:
        conn.running.discard(job.job_id)
        conn.send(miner_pb2.WorkResponse(rejected=miner_pb2.WorkRejected(job_id=job.job_id, reason=reason)))
        log.warning("miner %s: result for %s rejected: %s", conn.miner_id, job.job_id, reason)
        self._excluded.setdefault(job.job_id, set()).add(conn.miner_id)
        self._record(conn.miner_id, "record_failure", "failure")
        self._requeue(job, f"result from miner {conn.miner_id} rejected: {reason}")
        self._dispatch()

    def _on_result(self, conn: MinerConn, result: miner_pb2.JobResult) -> None:
        job = self._held(conn, result.job_id)
        uploads = conn.uploads.pop(job.job_id, {})
        conn.upload_bytes.pop(job.job_id, None)
        try:
            artifacts, attested = self._check_result(conn, job, result, uploads)
        except AitbcError as exc:
            self._reject_result(conn, job, exc.message)
            return
        rec = receipt_to_proto(attested)
        sampled = self._sampled(conn.miner_id, job)
        held = sampled or bool(job.verify_of)  # minted only once verification decides
        rec.settlement.state = receipt_pb2.SETTLEMENT_STATE_HELD if held else self._unheld_state(rec)
        self._record(conn.miner_id, "record_success", draw=not job.verify_of)
        took = (self.clock() - self._assigned_at.get(job.job_id, self.clock())) * 1000
        conn.latency_ms = took if not conn.latency_ms else 0.8 * conn.latency_ms + 0.2 * took
        conn.running.discard(job.job_id)
        job.artifacts.extend(a for a, _ in artifacts)
        job.device_class = device_class(conn.session.info.device)
        job.receipt_hash = rec.receipt_hash
        job.units = attested.body.units
        job.unit_type = attested.body.unit_type
        if jobs.job_kind(job) == jobs.TEXT:
            job.prompt_tokens, job.generated_tokens = result.prompt_tokens, result.generated_tokens
            job.finish_reason = result.finish_reason
        job.receipt.CopyFrom(rec)
        self._finish(job, S.JOB_STATE_COMPLETED, "", artifacts=[(a.sha256, d) for a, d in artifacts], receipt=rec)
        conn.send(miner_pb2.WorkResponse(accepted=miner_pb2.ResultAccepted(job_id=job.job_id, receipt_hash=rec.receipt_hash)))
        if sampled:
            self._start_verification(job)
        for listener in self.receipt_listeners:
            listener(rec)
        self._dispatch()

    def _check_result(
        self, conn: MinerConn, job: job_pb2.Job, result: miner_pb2.JobResult, uploads: dict[int, bytearray]
    ) -> tuple[list[tuple[job_pb2.Artifact, bytes]], receipts.SignedReceipt]:
        text_job = jobs.job_kind(job) == jobs.TEXT
        want = jobs.job_outputs(job)
        if len(result.artifacts) != want:
            raise InvalidArgument(f"job {job.job_id} must return {want} artifacts, got {len(result.artifacts)}")
        artifacts: list[tuple[job_pb2.Artifact, bytes]] = []
        digests: list[bytes] = []
        for i, art in enumerate(result.artifacts):
            data = bytes(uploads.get(i, b""))
            digest = crypto.sha256(data)
            if (not data and not text_job) or digest.hex() != art.sha256 or len(data) != art.size:
                raise InvalidArgument(f"artifact {i} does not match its declared sha256/size (wrong artifact hash)")
            if text_job:
                self._check_text(job, data, result)
                clean = job_pb2.Artifact(sha256=art.sha256, size=art.size, content_type=TEXT_CONTENT_TYPE)
            else:
                if not data.startswith(PNG_MAGIC):
                    raise InvalidArgument(f"artifact {i} is not a PNG image")
                clean = job_pb2.Artifact(sha256=art.sha256, size=art.size, content_type="image/png",
                                         width=art.width, height=art.height)
            artifacts.append((clean, data))
            digests.append(digest)
        try:
            signed = receipt_from_proto(result.receipt)
            attested = signed.attest(self.key)  # verifies the provider signature first
        except AitbcError as exc:
            raise InvalidArgument(f"receipt rejected: {exc.message}") from None
        b = signed.body
        expected = {
            "job_id": job.job_id,
            "provider": conn.miner_id,
            "client": job.client_id,
            "unit_type": "tokens" if text_job else "gpu_ms",
            "price_per_unit": job.price_per_unit,
            "model": job.model,
            "prompt_hash": job.prompt_hash,
            "artifact_sha256": receipts.manifest_sha256(digests),
            "hub_id": self.config.hub_id,
            "chain_id": self.config.chain_id,
        }
        for name, value in expected.items():
            if getattr(b, name) != value:
                raise InvalidArgument(f"receipt field {name} is {getattr(b, name)!r}, expected {value!r}")
        held_ms = (self.clock() - self._assigned_at.get(job.job_id, self.clock())) * 1000
        duration = b.finished_at - b.started_at
        if duration > held_ms + UNIT_SLACK_MS:
            raise InvalidArgument(f"receipt claims {duration} ms of work but the miner held the job {held_ms:.0f} ms")
        if text_job:
            if b.units != result.prompt_tokens + result.generated_tokens:
                raise InvalidArgument(f"receipt units {b.units} must equal prompt_tokens + generated_tokens "
                                      f"({result.prompt_tokens} + {result.generated_tokens})")
        elif not 1 <= b.units <= duration + UNIT_SLACK_MS:
            raise InvalidArgument(f"receipt units {b.units} gpu_ms are implausible for {duration} ms of work")
        return artifacts, attested

    def _check_text(self, job: job_pb2.Job, data: bytes, result: miner_pb2.JobResult) -> None:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidArgument("the text artifact is not valid UTF-8") from None
        if text != "".join(self._text.get(job.job_id, [])):
            raise InvalidArgument("the final text differs from the text streamed during generation")
        if result.finish_reason not in FINISH_REASONS:
            raise InvalidArgument(f"finish_reason must be one of {', '.join(FINISH_REASONS)}")
        if not 1 <= result.prompt_tokens or result.generated_tokens > job.params.text.max_new_tokens:
            raise InvalidArgument(f"token counts are implausible: prompt {result.prompt_tokens}, generated "
                                  f"{result.generated_tokens} of at most {job.params.text.max_new_tokens}")

    def _on_failed(self, conn: MinerConn, failed: miner_pb2.JobFailed) -> None:
        job = self._held(conn, failed.job_id)
        conn.running.discard(job.job_id)
        conn.uploads.pop(job.job_id, None)
        reason = failed.reason[:500] or "no reason given"
        if failed.permanent:  # the request's fault, not the miner's
            self._finish(job, S.JOB_STATE_FAILED, f"miner {conn.miner_id}: {reason}")
        else:  # a miner that cannot run what it advertised loses reputation; the job goes elsewhere
            self._record(conn.miner_id, "record_failure", "failure")
            self._avoid.setdefault(job.job_id, set()).add(conn.miner_id)
            self._requeue(job, f"miner {conn.miner_id} failed: {reason}")
        self._dispatch()

    # ---- transitions --------------------------------------------------------------------------

    @staticmethod
    def _snapshot(msg: M) -> M:
        """A copy to hand out: watchers must not see later changes to the live record."""
        out = type(msg)()
        out.CopyFrom(msg)
        return out

    def _enqueue(self, job: job_pb2.Job, *, front: bool = False) -> None:
        """An active job waits for a miner (a requeued one goes to the front)."""
        self._jobs[job.job_id] = job
        if front:
            self._queue.appendleft(job.job_id)
        else:
            self._queue.append(job.job_id)
        self._queued_at[job.job_id] = self.clock()

    def _requeue(self, job: job_pb2.Job, reason: str) -> None:
        self._assigned_at.pop(job.job_id, None)
        if job.attempts >= self.config.max_attempts:
            self._finish(job, S.JOB_STATE_FAILED, f"gave up after {job.attempts} attempts; last: {reason}")
            return
        self._text.pop(job.job_id, None)
        self._stuck.pop(job.job_id, None)  # its exclusions may have changed: match it afresh
        self._jobs_in[S.JOB_STATE_QUEUED].inc()
        job.state = S.JOB_STATE_QUEUED
        job.miner_id = ""
        job.error = reason
        job.ClearField("progress")
        job.updated_at_unix_ms = jobs.now_ms()
        self.store.put_job(job)
        self._enqueue(job, front=True)
        self._publish(job.job_id, self._snapshot(job))

    def _finish(self, job: job_pb2.Job, state: int, error: str, **extra: object) -> None:
        self._jobs_in[state].inc()
        if state == S.JOB_STATE_COMPLETED and not job.shard_job_ids:  # a split job's shards count themselves
            metrics.JOB_DURATION.observe(max(0, jobs.now_ms() - job.created_at_unix_ms) / 1000, model=job.model)
            if job.unit_type == "gpu_ms":
                spent = metrics.VERIFY_GPU_SECONDS if job.verify_of else metrics.GPU_SECONDS
                spent.inc(job.units / 1000, model=job.model)
        job.state = state  # type: ignore[assignment]
        job.error = error
        job.finished_at_unix_ms = job.updated_at_unix_ms = jobs.now_ms()
        self.store.put_job(job, **extra)  # type: ignore[arg-type]
        self._jobs.pop(job.job_id, None)
        self._assigned_at.pop(job.job_id, None)
        self._queued_at.pop(job.job_id, None)
        self._excluded.pop(job.job_id, None)
        self._avoid.pop(job.job_id, None)
        self._stuck.pop(job.job_id, None)
        self._publish(job.job_id, self._snapshot(job))
        if job.job_id not in self._watchers:
            self._text.pop(job.job_id, None)
        self._log_finished(job)
        if job.verify_of:
            self._verification_done(job)
        if job.parent_job_id:
            self._shard_done(job)

    def _log_finished(self, job: job_pb2.Job) -> None:
        start = job.started_at_unix_ms or job.created_at_unix_ms
        line = {
            "event": "job_finished",
            "job_id": job.job_id,
            "state": jobs.state_name(job.state),
            "miner": job.miner_id,
            "model": job.model,
            "duration_ms": max(0, job.finished_at_unix_ms - start),
            "gpu_seconds": job.units / 1000 if job.unit_type == "gpu_ms" else 0.0,
            "bytes_out": sum(a.size for a in job.artifacts),
            "prompt_hash": job.prompt_hash,
            "attempts": job.attempts,
        }
        if jobs.job_kind(job) == jobs.TEXT:
            line["prompt_tokens"], line["generated_tokens"] = job.prompt_tokens, job.generated_tokens
        if job.error:
            line["error"] = job.error
        job_log.info(json.dumps(line, sort_keys=True))

    # ---- hub: matching, reputation, verification (pure rules in aitbc.hub) --------------------

    def _record(self, miner_id: str, event: str, *args: object, **kwargs: object) -> None:
        """Update a miner's reputation (persisted; the book keeps it in memory for matching)."""
        before = self.book.get(miner_id)
        rec = getattr(self.book, event)(miner_id, *args, **kwargs)
        if before is None or before.quarantined != rec.quarantined:
            self._epoch += 1

    def _sampled(self, miner_id: str, job: job_pb2.Job) -> bool:
        """Is this original result re-executed? Every one while the miner is on probation, else
        its next sampling draw at verify_rate (the draw is counted by record_success)."""
        if job.verify_of or self.config.verify_rate <= 0:
            return False
        rec = self.book.snapshot(miner_id)
        return rec.probation_left > 0 or should_verify(sample_key(miner_id, rec.draws), self.config.verify_rate,
                                                       secret=self._verify_secret)

    def _view(self, c: MinerConn) -> MinerView:
        info = c.session.info
        rec = self.book.get(c.miner_id)
        return MinerView(
            miner_id=c.miner_id, models=frozenset(info.models),
            kinds={m: "text" for m in info.models if model_kind(info, m) == jobs.TEXT},
            vram_mb=info.vram_mb, price_per_unit=info.price_per_unit, max_concurrency=info.max_concurrency or 1,
            running=len(c.running), reputation=rec.reputation if rec else self.book.policy.initial,
            recent_latency_ms=c.latency_ms, quarantined=bool(rec and rec.quarantined),
            device_class=device_class(info.device), failing=bool(rec and rec.failure_streak >= FAILING_STREAK),
        )

    def _needs(self, job: job_pb2.Job) -> JobNeeds:
        p = job.params.image
        exclude = set(self._excluded.get(job.job_id, ()))
        device = None
        if job.verify_of:  # a re-execution runs where the original did, never on a miner that already ran it
            orig = self._load(job.verify_of)
            exclude |= {r.miner_id for r in self._runs(orig) if r.miner_id}
            device = orig.device_class
        return JobNeeds(
            model=job.model, kind="text" if jobs.job_kind(job) == jobs.TEXT else "image",
            width=p.width, height=p.height, images=p.images or 1,
            max_price_per_unit=job.max_price_per_unit if job.HasField("max_price_per_unit") else None,
            exclude=frozenset(exclude), device_class=device,
            avoid=frozenset(self._avoid.get(job.job_id, ())),
        )

    def _idle_views(self) -> list[MinerView]:
        """Every connected miner as if it had nothing running: who could ever take a job."""
        return [dataclasses.replace(self._view(c), running=0) for c in self.miners.values()]

    def _placeable(self, job: job_pb2.Job) -> None:
        """At submission: refuse, with the reason, a job no connected miner could ever take."""
        views = self._idle_views()
        if not views:
            return
        outcome = choose(views, self._needs(job), 0)
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
        if rec is None and miner_id not in self.miners:
            raise NotFound(f"miner {miner_id} is not known to this hub (ListMiners shows the known ones)")
        if rec is None or not rec.quarantined:
            raise FailedPrecondition(f"miner {miner_id} is not quarantined")
        self._record(miner_id, "release")
        log.warning("miner %s released from quarantine by operator '%s'; on probation", miner_id, client.id)
        self._dispatch()
        return next(m for m in self.list_miners() if m.miner_id == miner_id)

    def list_miners(self) -> list[coordinator_pb2.MinerStatus]:
        out = {}
        for rec in self.book.all():
            out[rec.miner_id] = coordinator_pb2.MinerStatus(miner_id=rec.miner_id)
        for c in self.miners.values():
            info = c.session.info
            view = self._view(c)
            st = out.setdefault(c.miner_id, coordinator_pb2.MinerStatus(miner_id=c.miner_id))
            st.connected, st.device, st.gpu_name, st.vram_mb = True, info.device, info.gpu_name, info.vram_mb
            st.models.extend(info.models)
            st.price_per_unit, st.max_concurrency, st.running = info.price_per_unit, info.max_concurrency or 1, len(c.running)
            st.recent_latency_ms = c.latency_ms
            st.score = score(view, JobNeeds(model=info.models[0], kind=view.kind_of(info.models[0])))
        for miner_id, st in out.items():
            rec = self.book.snapshot(miner_id)
            st.reputation, st.jobs_served, st.failures, st.stalls = rec.reputation, rec.jobs_served, rec.failures, rec.stalls
            st.verifications_passed, st.verifications_failed = rec.verifications_passed, rec.verifications_failed
            st.quarantined, st.probation_left = rec.quarantined, rec.probation_left
        return sorted(out.values(), key=lambda m: (not m.connected, -m.reputation, m.miner_id))

    def _runs(self, orig: job_pb2.Job) -> list[job_pb2.Job]:
        """The original job and its re-executions, as stored."""
        runs = [orig]
        for vid in orig.verification_job_ids:
            v = self._jobs.get(vid) or self.store.get_job(vid)
            if v is not None:
                runs.append(v)
        return runs

    def _start_verification(self, orig: job_pb2.Job) -> None:
        now = jobs.now_ms()
        v = job_pb2.Job(job_id=jobs.new_job_id(), model=orig.model, params=orig.params, state=S.JOB_STATE_QUEUED,
                        client_id=VERIFY_CLIENT, created_at_unix_ms=now, updated_at_unix_ms=now,
                        prompt_hash=orig.prompt_hash, verify_of=orig.job_id, traceparent=orig.traceparent)
        orig.verification = V.VERIFICATION_STATE_PENDING
        orig.verification_job_ids.append(v.job_id)
        self.store.put_jobs([orig, v])  # one transaction: a crash leaves neither half
        self._enqueue(v)

    def _settle_runs(self, runs: list[job_pb2.Job], outvoted: frozenset[str], reason: str) -> None:
        """Release the held receipts of runs that agreed; reject those that were outvoted."""
        for run in runs:
            rec = self.store.get_receipt(run.receipt_hash) if run.receipt_hash else None
            if rec is None or rec.settlement.state != receipt_pb2.SETTLEMENT_STATE_HELD:
                continue
            if run.miner_id in outvoted:
                rec.settlement.state = receipt_pb2.SETTLEMENT_STATE_REJECTED
                rec.settlement.error = f"failed verification: {reason}"
            else:
                rec.settlement.state = self._unheld_state(rec)
            self.store.update_receipt(rec)
            for listener in self.receipt_listeners:
                listener(rec)

    def _unheld_state(self, rec: receipt_pb2.Receipt) -> int:
        if not self.config.ledger:
            return receipt_pb2.SETTLEMENT_STATE_DISABLED
        if rec.body.units * rec.body.price_per_unit == 0:
            return receipt_pb2.SETTLEMENT_STATE_NOT_REQUIRED
        return receipt_pb2.SETTLEMENT_STATE_PENDING

    def _verification_done(self, v: job_pb2.Job) -> None:
        """A re-execution ended: decide by majority, or run a referee, or give up unverified."""
        orig = self.store.get_job(v.verify_of)
        if orig is not None and orig.verification == V.VERIFICATION_STATE_PENDING:
            self._decide(orig)

    def _artifacts(self, job: job_pb2.Job) -> list[bytes]:
        return [self.store.get_artifact(a.sha256) or b"" for a in job.artifacts]

    def _decide(self, orig: job_pb2.Job) -> None:
        all_runs = self._runs(orig)
        if any(r.state in jobs.ACTIVE for r in all_runs):
            return
        runs = [r for r in all_runs if r.state == S.JOB_STATE_COMPLETED]
        exact = all(r.device_class != "cuda" for r in runs)  # CPU runs byte for byte; GPU ones within a tolerance
        verdict = arbitrate({r.miner_id: self._artifacts(r) for r in runs}, exact=exact,
                            tolerance=self.config.verify_tolerance) if len(runs) >= 2 else None
        if verdict is None or not verdict.decided:
            if verdict is not None and len(runs) < 3:  # two runs disagree: a third miner referees
                self._start_verification(orig)
                self._dispatch()
                return
            orig.verification = V.VERIFICATION_STATE_UNVERIFIED
            metrics.VERIFICATIONS.inc(outcome="unverified")
            self.store.put_job(orig)
            self._settle_runs(runs, frozenset(), "")
            log.info("job %s stays unverified (%d usable executions)", orig.job_id, len(runs))
            return
        for r in runs:
            self._record(r.miner_id, "record_verification", r.miner_id not in verdict.outvoted)
        winner = next(r for r in runs if r.miner_id in verdict.agreed)
        if orig.miner_id in verdict.outvoted:
            # the client gets the verified result; the first miner's receipt is not minted
            orig.verification = V.VERIFICATION_STATE_REPLACED
            metrics.VERIFICATIONS.inc(outcome="replaced")
            del orig.artifacts[:]
            orig.artifacts.extend(winner.artifacts)
            log.warning("job %s: miner %s failed verification; result replaced by %s's", orig.job_id,
                        orig.miner_id, winner.miner_id)
        else:
            orig.verification = V.VERIFICATION_STATE_PASSED
            metrics.VERIFICATIONS.inc(outcome="passed")
        self.store.put_job(orig)
        self._settle_runs(runs, verdict.outvoted, f"its result differs from {len(verdict.agreed)} other executions")

    def _reconcile_held(self) -> None:
        """Receipts held for a verification that can no longer progress (the coordinator was killed
        between two of its steps) are decided or released now: a held MINT never waits forever."""
        for rec in self.store.held_receipts():
            job = self._jobs.get(rec.body.job_id) or self.store.get_job(rec.body.job_id)
            orig = (self.store.get_job(job.verify_of) if job.verify_of else job) if job is not None else None
            if orig is None or any(r.state in jobs.ACTIVE for r in self._runs(orig)):
                continue
            if orig.verification == V.VERIFICATION_STATE_PENDING:
                self._decide(orig)
            else:  # decided before the crash: release what agrees with the job's final result
                final = self._artifacts(orig)
                runs = [r for r in self._runs(orig) if r.state == S.JOB_STATE_COMPLETED]
                outvoted = {r.miner_id for r in runs[1:] if self._artifacts(r) != final}
                if orig.verification == V.VERIFICATION_STATE_REPLACED:
                    outvoted.add(orig.miner_id)
                self._settle_runs(runs, frozenset(outvoted), "its result differs from the verified one")

    def _shards_for(self, job: job_pb2.Job) -> list[job_pb2.Job]:
        """Split a multi-image job by image across the miners that could serve it (one shard each);
        image i keeps seed + i, so the images are those of the whole job. Returns the shards."""
        p = job.params.image
        if jobs.job_kind(job) != jobs.IMAGE or p.images < 2:
            return []
        needs = self._needs(job)
        able = [v for v in self._idle_views() if not isinstance(choose([v], needs, 0), Unplaceable)]
        plan = plan_shards(p.images, max(1, len(able)), p.images)
        if len(plan) < 2:
            return []
        shards = []
        for sh in plan:
            params = job_pb2.JobParams()
            params.CopyFrom(job.params)
            params.image.images, params.image.seed = sh.count, shard_seed(p.seed, sh)
            shard = job_pb2.Job(job_id=jobs.new_job_id(), model=job.model, params=params, state=S.JOB_STATE_QUEUED,
                                client_id=job.client_id, created_at_unix_ms=job.created_at_unix_ms,
                                updated_at_unix_ms=job.updated_at_unix_ms, prompt_hash=job.prompt_hash,
                                parent_job_id=job.job_id, first_image=sh.first_image, traceparent=job.traceparent)
            if job.HasField("max_price_per_unit"):
                shard.max_price_per_unit = job.max_price_per_unit
            self._jobs[shard.job_id] = shard
            job.shard_job_ids.append(shard.job_id)
            shards.append(shard)
        return shards

    def _shard_done(self, shard: job_pb2.Job) -> None:
        parent = self._jobs.get(shard.parent_job_id)
        if parent is not None:
            self._check_parent(parent)

    def _check_parent(self, parent: job_pb2.Job) -> None:
        """A split job completes when all its shards did (images merged in order), and fails when
        one cannot finish (the others are stopped). Called when a shard ends, and at start-up for
        a coordinator killed between a shard's end and this step. A requeued shard is still active."""
        if parent.state in jobs.TERMINAL:
            return
        shards = [self._jobs.get(j) or self.store.get_job(j) for j in parent.shard_job_ids]
        for sh in shards:
            if sh is not None and sh.state in jobs.TERMINAL and sh.state != S.JOB_STATE_COMPLETED:
                last = sh.first_image + sh.params.image.images
                self._stop(parent, S.JOB_STATE_FAILED,
                           f"shard for images {sh.first_image + 1}-{last} {jobs.state_name(sh.state)}: {sh.error}")
                return
        done = [sh for sh in shards if sh is not None and sh.state == S.JOB_STATE_COMPLETED]
        if len(done) < len(shards):
            return
        plan = [Shard(i, sh.first_image, sh.params.image.images) for i, sh in enumerate(done)]
        merged = merge_in_order(plan, [(i, list(sh.artifacts)) for i, sh in enumerate(done)])
        if merged.artifacts is None:  # every shard's artifact count was checked with its result
            self._stop(parent, S.JOB_STATE_FAILED, f"cannot merge the shards: {merged.reason()}")
            return
        parent.artifacts.extend(merged.artifacts)
        parent.units = sum(sh.units for sh in done)
        parent.unit_type = done[0].unit_type
        parent.miner_id = ",".join(dict.fromkeys(sh.miner_id for sh in done))
        self._finish(parent, S.JOB_STATE_COMPLETED, "")

    def _dispatch(self) -> None:
        """Hand queued jobs to miners: aitbc.hub.matching scores model, kind, VRAM fit, price,
        reputation, load and latency; round-robin among equals. Jobs no miner can take stay queued."""
        if not self._queue or not self.miners:
            return
        views = {c.miner_id: self._view(c) for c in self.miners.values()}
        free = sum(v.max_concurrency - v.running for v in views.values() if v.running < v.max_concurrency)
        if not free:
            return
        skipped: list[str] = []
        while self._queue and free:
            job_id = self._queue.popleft()
            job = self._jobs.get(job_id)
            if job is None or job.state != S.JOB_STATE_QUEUED:
                continue
            if self._stuck.get(job_id) == self._epoch:
                skipped.append(job_id)
                continue
            outcome = choose(views.values(), self._needs(job), next(self._rr))
            if isinstance(outcome, Unplaceable):
                skipped.append(job_id)
                if not outcome.wait:
                    job.error = outcome.reason  # shown by GetJob while the job waits
                if outcome.code != "busy":
                    self._stuck[job_id] = self._epoch
                continue
            self._stuck.pop(job_id, None)
            conn = self.miners[outcome.miner_id]
            self._assign(job, conn)
            views[conn.miner_id] = dataclasses.replace(views[conn.miner_id], running=len(conn.running))
            free -= 1
        self._queue.extendleft(reversed(skipped))

    def _assign(self, job: job_pb2.Job, conn: MinerConn) -> None:
        job.state = S.JOB_STATE_ASSIGNED
        job.miner_id = conn.miner_id
        job.attempts += 1
        job.price_per_unit = conn.session.info.price_per_unit
        job.updated_at_unix_ms = jobs.now_ms()
        self.store.put_job(job)
        conn.running.add(job.job_id)
        self._assigned_at[job.job_id] = self.clock()
        self._queued_at.pop(job.job_id, None)
        parent = self._jobs.get(job.parent_job_id) if job.parent_job_id else None
        if parent is not None and parent.state == S.JOB_STATE_QUEUED:
            parent.state = S.JOB_STATE_RUNNING
            parent.started_at_unix_ms = parent.updated_at_unix_ms = jobs.now_ms()
            self.store.put_job(parent)
            self._publish(parent.job_id, self._snapshot(parent))
        with telemetry.span("coordinator.dispatch", parent=job.traceparent or None, job_id=job.job_id,
                            model=job.model, miner_id=conn.miner_id):
            conn.send(miner_pb2.WorkResponse(assignment=miner_pb2.Assignment(
                job=job, chain_id=self.config.chain_id, hub_id=self.config.hub_id,
                traceparent=telemetry.current_traceparent())))
        self._jobs_in[S.JOB_STATE_ASSIGNED].inc()
        metrics.DISPATCH_LATENCY.observe(max(0.0, jobs.now_ms() - job.created_at_unix_ms) / 1000)
        self._publish(job.job_id, self._snapshot(job))

    # ---- housekeeping -------------------------------------------------------------------------

    def tick(self) -> None:
        """Drop silent miners (their jobs go back to the queue), expire jobs nobody took, and
        every 10 s release receipts whose verification can no longer progress."""
        now = self.clock()
        if now - self._reconciled_at > 10.0:
            self._reconciled_at = now
            self._reconcile_held()
        for conn in list(self.miners.values()):
            if now - conn.last_seen > self.config.heartbeat_timeout_s:
                if conn.running:
                    self._record(conn.miner_id, "record_failure", "stall")
                self.disconnect(conn, f"no heartbeat for {now - conn.last_seen:.1f} s")
                continue
            if conn.running:  # working miners talk about some job; a miner may queue jobs internally
                since = max(conn.active_at, *(self._assigned_at.get(j, now) for j in conn.running))
                if now - since > self.config.stall_timeout_s:
                    for job_id in list(conn.running):
                        self._stalled(conn, job_id, now - since)
        for job_id, since in list(self._queued_at.items()):
            job = self._jobs.get(job_id)
            ttl = self.config.verify_timeout_s if job is not None and job.verify_of else self.config.queue_ttl_s
            if job is not None and job.state == S.JOB_STATE_QUEUED and now - since > ttl:
                self._finish(job, S.JOB_STATE_EXPIRED, f"no miner took the job within {ttl:g} s")

    def _stalled(self, conn: MinerConn, job_id: str, quiet: float) -> None:
        """A miner that heartbeats but has said nothing about any of its jobs for stall_timeout_s
        (since the last of them was assigned): take the job back (it goes to another miner when
        there is one), tell the miner to drop it, and count a stall."""
        why = f"miner {conn.miner_id} made no progress for {quiet:.0f} s (stall_timeout_s {self.config.stall_timeout_s:g})"
        conn.running.discard(job_id)
        conn.uploads.pop(job_id, None)
        conn.upload_bytes.pop(job_id, None)
        conn.send(miner_pb2.WorkResponse(cancel=miner_pb2.CancelAssignment(job_id=job_id, reason=why)))
        self._record(conn.miner_id, "record_failure", "stall")
        log.warning("%s: job %s goes back to the queue", why, job_id)
        job = self._jobs.get(job_id)
        if job is not None and job.miner_id == conn.miner_id:
            self._avoid.setdefault(job_id, set()).add(conn.miner_id)
            self._requeue(job, why)
            self._dispatch()

    async def run_housekeeping(self, interval_s: float = 0.5) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                self.tick()
            except Exception:  # keep the loop alive; the error is logged with its stack
                log.exception("housekeeping failed")

    def close(self) -> None:
        for conn in list(self.miners.values()):
            conn.closed = True
            conn.outbox.put_nowait(None)
        self.miners.clear()
        metrics.QUEUE_DEPTH.set_function(None)
        metrics.MINERS_CONNECTED.set_function(None)
        metrics.QUARANTINED.set_function(None)

