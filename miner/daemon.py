"""The miner daemon: registers with a coordinator (or hub), keeps one Work stream, runs jobs.

Inference runs in worker threads (never on the event loop); progress, results and receipts go
up the stream. On any stream loss the daemon registers with the next coordinator of its list
(the same one when it lists one), waiting with backoff after a whole round of failures; jobs in
flight are abandoned (the coordinator requeues them) and their compute is stopped. A stream that
ends with ABORTED was replaced by a newer one of the same key (another process holds it): the
daemon stops serving rather than take the key back (docs/scaling.md, "Miner-session ownership").
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

from aitbc import aio, crypto, jobs, metrics, receipts, rpc, telemetry
from aitbc.config import MinerConfig, write_port_file
from aitbc.coordinator import register_digest
from aitbc.errors import FailedPrecondition
from aitbc.limits import Backoff
from aitbc.miner.backend import (
    NULL_MODEL,
    BackendError,
    ImageRequest,
    JobCancelled,
    load_image_backend,
    pick_device,
)
from aitbc.miner.batching import ImageBatcher
from aitbc.rpc import CHUNK_BYTES, RunningServer, Service, channel, handle_errors, start_server
from aitbc.v1 import job_pb2, miner_pb2, miner_pb2_grpc
from aitbc.wire import receipt_to_proto

log = logging.getLogger("aitbc.miner")
T = TypeVar("T")
VERSION = "aitbc-miner/0.1"
TEXT_FLUSH_S = 0.01  # text deltas are sent at most this long after they are made
ACCEPT_AFTER_S = 0.05  # the start window: progress is held, and JobAccepted goes only for a job silent, this long
_load_owner: MinerDaemon | None = None  # the daemon aitbc_miner_load reads (one per process)


@dataclass
class RunningJob:
    job: miner_pb2.Task
    cancel: threading.Event = field(default_factory=threading.Event)
    task: asyncio.Task[None] | None = None
    accept: asyncio.TimerHandle | None = None  # the start window's end: JobAccepted, or the progress held
    held: list[miner_pb2.WorkRequest] = field(default_factory=list)  # progress said in the start window

    def drop_accept(self) -> None:
        """The start window is over without its JobAccepted and held progress: other word on the job
        went (a result, a failure, an output or text tells the coordinator the job started, and makes
        progress said before it moot), or the run ended or was abandoned."""
        if self.accept is not None:
            self.accept.cancel()
            self.accept = None
        self.held.clear()


class CoordinatorRing:
    """The coordinators a miner fails over between, in config order: the one it uses now, and
    when a failed round (every coordinator tried once since one last served, or since the last
    wait) calls for the backoff."""

    def __init__(self, targets: list[str]) -> None:
        if not targets:
            raise ValueError("no coordinator to connect to")
        self.targets = list(targets)
        self.index = 0
        self.failures = 0  # sessions in a row that did not serve, since the last wait

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def current(self) -> str:
        return self.targets[self.index]

    def failed(self, *, served: bool) -> bool:
        """The session with `current` ended: move to the next coordinator. True when the miner
        must wait before trying it: a full round went by without serving (a session that served
        and was lost later starts a new round, the lost coordinator its first try)."""
        self.index = (self.index + 1) % len(self.targets)
        self.failures = 1 if served else self.failures + 1
        if self.failures >= len(self.targets):
            self.failures = 0
            return True
        return False


class MinerDaemon:
    def __init__(self, config: MinerConfig, key: crypto.PrivateKey, backends: dict[str, Any]) -> None:
        self.config = config
        self.key = key
        self.backends = backends
        self.device = next(iter(backends.values())).device if backends else "cpu"
        self.kinds = {m: jobs.TEXT if hasattr(b, "count_tokens") else jobs.IMAGE for m, b in backends.items()}
        self.running: dict[str, RunningJob] = {}
        self.coordinator = config.coordinator[0]  # the one it uses (or tries) now: GetInfo says it
        self.chain_id = ""  # the chain of the coordinator it registered with (its receipts are for it)
        self._registered_at: tuple[float, float] | None = None  # (when, heartbeat interval) of this session
        self.connected = False
        self.replaced = ""  # why it stopped serving: a newer Work stream of its key took over (ABORTED)
        self.completed = 0  # results sent
        self.attested = 0  # results the coordinator checked and attested (ResultAccepted)
        self.failed = 0
        self._slots = asyncio.Semaphore(max(1, config.max_concurrency))
        # one worker thread per slot: asyncio's default pool has min(32, cores + 4) threads, which on
        # a small box would cap the text streams decoding together below max_concurrency
        self._workers = ThreadPoolExecutor(max(1, config.max_concurrency), thread_name_prefix="aitbc-job")
        # image backends that can batch get a batcher (one pipeline call for jobs that arrive
        # together); with image_batch_size 1 or one slot every job calls its backend alone, as before
        batching = config.image_batch_size > 1 and config.max_concurrency > 1
        self.batchers = {
            m: ImageBatcher(b, config.image_batch_size, config.image_batch_wait_ms / 1000, self._in_thread)
            for m, b in backends.items()
            if batching and self.kinds[m] == jobs.IMAGE and hasattr(b, "generate_batch")
        }
        self._outbox: asyncio.Queue[miner_pb2.WorkRequest | None] | None = None
        self._stop = asyncio.Event()
        self.registered = asyncio.Event()

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on one of this daemon's worker threads, in the caller's trace context."""
        return await asyncio.get_running_loop().run_in_executor(self._workers, telemetry.wrap_context(fn), *args)

    def info(self) -> miner_pb2.MinerInfo:
        name, vram = "cpu", 0
        if self.device.startswith("cuda"):
            import torch

            props = torch.cuda.get_device_properties(torch.device(self.device))
            name, vram = props.name, props.total_memory // (1024 * 1024)
        specs = [
            miner_pb2.ModelSpec(name=m, kind=self.kinds[m],
                                context_length=b.context_length if self.kinds[m] == jobs.TEXT else 0,
                                native_size=0 if self.kinds[m] == jobs.TEXT else b.native_size,
                                weights_sha256=getattr(b, "weights_sha256", ""))
            for m, b in self.backends.items()
        ]
        return miner_pb2.MinerInfo(
            gpu_name=name, vram_mb=vram, models=list(self.backends), price_per_unit=self.config.price_per_unit,
            max_concurrency=max(1, self.config.max_concurrency), device=self.device, version=VERSION,
            model_specs=specs, text_batching=self.text_batching(),
        )

    def text_batching(self) -> int:
        """What its text backends do (not what the config asked: the null backend never stacks):
        stacked when one stacks, else exact; unspecified without a text model."""
        from aitbc.miner.text import TEXT_STACKED

        texts = [b for m, b in self.backends.items() if self.kinds[m] == jobs.TEXT]
        if not texts:
            return job_pb2.TEXT_BATCHING_UNSPECIFIED
        stacked = any(getattr(b, "batching", "") == TEXT_STACKED for b in texts)
        return job_pb2.TEXT_BATCHING_STACKED if stacked else job_pb2.TEXT_BATCHING_EXACT

    # ---- connection -------------------------------------------------------------------------

    def load(self) -> float:
        """Running jobs / max_concurrency (0..1), exported as aitbc_miner_load."""
        return len(self.running) / max(1, self.config.max_concurrency)

    async def run(self) -> None:
        """Connect, serve, fail over or reconnect with exponential backoff until stop()."""
        global _load_owner
        metrics.MINER_LOAD.set_function(self.load)  # read at scrape time: nothing on the job path
        metrics.watch_cuda_vram()
        _load_owner = self
        try:
            await self._run()
        finally:
            self._workers.shutdown(wait=False)  # idle threads end; a running job's thread finishes its call
            if _load_owner is self:
                metrics.MINER_LOAD.set_function(None)
                _load_owner = None

    async def _run(self) -> None:
        """Serve one coordinator at a time, moving to the next in the list (round robin) whenever a
        session ends: its stream dropped, it refused the registration or did not answer. No wait
        between coordinators of a round (another may be up: the miner serves again at once); a
        full round without a registration waits through the Backoff (full jitter: a restarted
        coordinator's miners do not all come back at the same instant, and a miner whose every
        coordinator is down never spins)."""
        backoff = Backoff(0.5, max(0.5, self.config.reconnect_max_s))
        ring = CoordinatorRing(self.config.coordinator)
        while not self._stop.is_set():
            target = ring.current
            self.coordinator = target
            self._registered_at = None
            try:
                await self._session(target)
            except grpc.aio.AioRpcError as exc:
                log.warning("coordinator %s: %s: %s", target, exc.code().name, exc.details())
                if exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED):
                    log.error("registration refused by %s; fix the miner config: %s", target, exc.details())
                if exc.code() == grpc.StatusCode.ABORTED and self._registered_at is not None:
                    # a newer Work stream of this key replaced ours (here or on another coordinator of
                    # the pool): another process holds the key. Taking it back would end that one's
                    # stream in turn, and so on: this daemon stops serving until it is restarted
                    self.replaced = exc.details() or "replaced by a newer connection of this miner key"
            except Exception:
                log.exception("miner session with %s failed", target)
            finally:
                self.connected = False
                self.registered.clear()
                self._abandon_all("lost the coordinator stream")
            if self.replaced:
                log.error("stopped serving: %s; stop the other process with this key (or give one of them "
                          "another key_file), then restart this daemon", self.replaced)
                await self._stop.wait()
            if self._stop.is_set():
                break
            # served: registered and kept for a heartbeat interval at least (a coordinator that drops
            # every stream at once is a failure like one that refuses: the backoff grows)
            served = self._registered_at is not None and time.monotonic() - self._registered_at[0] >= self._registered_at[1]
            if served:
                backoff.reset()
            if ring.failed(served=served):  # a whole round without serving
                await aio.wait_event(self._stop, backoff.next())
            elif len(ring) > 1:
                log.warning("no session with coordinator %s; trying %s next", target, ring.current)

    async def _session(self, target: str) -> None:
        """Register with `target` and serve its Work stream until it ends or stop()."""
        async with channel(target) as ch:
            stub = miner_pb2_grpc.MinerServiceStub(ch)
            ch_resp = await stub.GetChallenge(miner_pb2.GetChallengeRequest(), timeout=10)
            sig = self.key.sign(register_digest(ch_resp.challenge, self.key.pubkey))
            reg = await stub.Register(miner_pb2.RegisterRequest(
                public_key=self.key.pubkey, challenge=ch_resp.challenge, signature=sig, info=self.info()), timeout=10)
            self.chain_id = reg.chain_id
            outbox: asyncio.Queue[miner_pb2.WorkRequest | None] = asyncio.Queue()
            self._outbox = outbox

            async def requests() -> AsyncIterator[miner_pb2.WorkRequest]:
                while True:
                    msg = await outbox.get()
                    if msg is None:
                        return
                    yield msg

            call = stub.Work(requests(), metadata=(("x-miner-session", reg.session_token),))
            self.connected = True
            self.registered.set()
            log.info("registered as %s with %s (models %s, device %s)", reg.miner_id, target,
                     list(self.backends), self.device)
            interval = reg.heartbeat_interval_ms / 1000 or 2.0
            self._registered_at = (time.monotonic(), interval)
            beat = asyncio.create_task(self._heartbeat(outbox, interval))
            stopper = asyncio.create_task(self._stop.wait())
            try:
                reader = asyncio.create_task(self._read(call))
                done, _ = await asyncio.wait({reader, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if reader in done:
                    reader.result()
                else:
                    reader.cancel()
                    call.cancel()
            finally:
                beat.cancel()
                stopper.cancel()
                outbox.put_nowait(None)
                self._outbox = None

    async def _read(self, call: Any) -> None:
        async for msg in call:
            kind = msg.WhichOneof("msg")
            if kind == "assignment":
                self._start_job(msg.assignment)
            elif kind == "cancel":
                rj = self.running.get(msg.cancel.job_id)
                if rj is not None:
                    log.info("job %s cancelled by coordinator: %s", msg.cancel.job_id, msg.cancel.reason)
                    rj.cancel.set()
            elif kind == "rejected":
                log.warning("coordinator rejected %s: %s", msg.rejected.job_id or "a message", msg.rejected.reason)
            elif kind == "accepted":
                self.attested += 1
                log.info("result for %s accepted, receipt %s", msg.accepted.job_id, msg.accepted.receipt_hash)

    async def _heartbeat(self, outbox: asyncio.Queue[miner_pb2.WorkRequest | None], interval: float) -> None:
        while True:
            outbox.put_nowait(miner_pb2.WorkRequest(heartbeat=miner_pb2.Heartbeat(running_jobs=len(self.running))))
            await asyncio.sleep(interval)

    def _send(self, msg: miner_pb2.WorkRequest) -> None:
        if self._outbox is not None:
            self._outbox.put_nowait(msg)

    def _send_job(self, rj: RunningJob, msg: miner_pb2.WorkRequest) -> None:
        """A message about one of its jobs: any of them tells the coordinator the job started, so the
        pending JobAccepted is not needed any more (a quick job's result is its only message).
        Progress said within the start window (ACCEPT_AFTER_S) is held until the window ends, and
        dropped when other word goes first: a job that ends within it costs no progress message."""
        if msg.HasField("progress") and rj.accept is not None:
            rj.held.append(msg)  # at most the job's steps (bounded by the job limits)
            return
        rj.drop_accept()
        self._send(msg)

    def _accepted(self, rj: RunningJob) -> None:
        """The start window ended with the job still running: its held progress goes now (it tells
        the coordinator the job started), or JobAccepted when it said nothing."""
        held, rj.held, rj.accept = rj.held, [], None
        for msg in held or [miner_pb2.WorkRequest(accepted=miner_pb2.JobAccepted(job_id=rj.job.job_id))]:
            self._send(msg)

    def _abandon_all(self, reason: str) -> None:
        for rj in self.running.values():
            rj.cancel.set()
            rj.drop_accept()

    def stop(self) -> None:
        self._stop.set()

    # ---- jobs -------------------------------------------------------------------------------

    def _start_job(self, assignment: miner_pb2.Assignment) -> None:
        job = assignment.task
        earlier = self.running.get(job.job_id)
        if earlier is not None and not earlier.cancel.is_set():
            return  # this very run is under way
        # An earlier run of the job that was abandoned (the stream to the coordinator dropped and the
        # coordinator gave the job back to this miner on the new stream) may still be winding down on
        # its worker thread: the new run starts once it has ended, instead of being dropped, which left
        # the coordinator waiting for the stall timeout on a job nobody ran.
        refused = self._refusal(assignment)
        if refused:  # not permanent: an honest coordinator gives the job to another miner
            self._send(miner_pb2.WorkRequest(failed=miner_pb2.JobFailed(job_id=job.job_id, reason=refused)))
            return
        rj = RunningJob(job)
        self.running[job.job_id] = rj
        rj.task = asyncio.create_task(self._run_job(rj, assignment, earlier.task if earlier is not None else None))

    def _refusal(self, assignment: miner_pb2.Assignment) -> str:
        """Why this miner will not run an assignment ("" : it will). The receipt it signs takes its
        price and chain from the assignment, and a coordinator sends at most max_concurrency jobs at
        once: one that does otherwise (broken, or hostile) gets no work and no signature, and cannot
        queue jobs here without bound (each a task with its parameters in memory)."""
        job = assignment.task
        live = sum(1 for r in self.running.values() if not r.cancel.is_set())
        if live >= max(1, self.config.max_concurrency):
            return (f"this miner runs {live} jobs already (max_concurrency {self.config.max_concurrency}): the "
                    "coordinator sent one more than it offered to run")
        if job.price_per_unit < self.config.price_per_unit:
            return (f"the coordinator offered price {job.price_per_unit} per unit, below this miner's price_per_unit "
                    f"{self.config.price_per_unit}: a receipt at that price is not signed")
        if self.chain_id and assignment.chain_id != self.chain_id:
            return (f"the job is for chain {assignment.chain_id!r}, but this miner registered on chain "
                    f"{self.chain_id!r}: a receipt for another chain is not signed")
        return ""

    async def _run_job(self, rj: RunningJob, assignment: miner_pb2.Assignment,
                       after: asyncio.Task[None] | None = None) -> None:
        if after is not None:
            await asyncio.wait({after})  # never raises, and cancelling this run leaves the earlier one be
        # one span per job, joined to the client's trace through the dispatch span's traceparent
        # (the Work stream carries many jobs, so the context travels in the Assignment, not metadata)
        with telemetry.span("miner.job", parent=assignment.traceparent or None, job_id=rj.job.job_id,
                            model=rj.job.model, attempt=rj.job.attempt, miner_id=self.key.address):
            await self._run_job_traced(rj, assignment)

    async def _run_job_traced(self, rj: RunningJob, assignment: miner_pb2.Assignment) -> None:
        job = rj.job
        job_id = job.job_id
        try:
            async with self._slots:
                backend = self.backends.get(job.model)
                if backend is None or self.kinds.get(job.model) != jobs.job_kind(job):
                    self._send(miner_pb2.WorkRequest(failed=miner_pb2.JobFailed(
                        job_id=job_id, reason=f"model '{job.model}' is not loaded on this miner for this job kind")))
                    return
                # started: said with the first text, output or result, or 50 ms in by its progress or JobAccepted
                rj.accept = asyncio.get_running_loop().call_later(ACCEPT_AFTER_S, self._accepted, rj)
                started = jobs.now_ms()
                if jobs.job_kind(job) == jobs.TEXT:
                    outputs, meter, extra = await self._generate_text(rj, backend)
                else:
                    outputs, meter, extra = await self._generate_image(rj, backend)
                finished = max(jobs.now_ms(), started)
                units, unit_type = meter["units"], meter["unit_type"]
                if rj.cancel.is_set():
                    return
                digests = []
                artifacts = []
                inline = sum(len(data) for data, _ in outputs) <= CHUNK_BYTES  # small: in the result itself
                for i, (data, art) in enumerate(outputs):
                    for off in range(0, 0 if inline else len(data), CHUNK_BYTES):
                        self._send_job(rj, miner_pb2.WorkRequest(chunk=miner_pb2.ArtifactChunk(
                            job_id=job_id, index=i, data=data[off:off + CHUNK_BYTES])))
                    digests.append(crypto.sha256(data))
                    art.sha256, art.size = digests[-1].hex(), len(data)
                    artifacts.append(art)
                body = receipts.ReceiptBody(
                    job_id=job_id, provider=self.key.address, client=job.client_id, **meter,
                    price_per_unit=job.price_per_unit, model=job.model,
                    prompt_hash=jobs.prompt_hash(jobs.job_prompt(job)), started_at=started, finished_at=finished,
                    artifact_sha256=receipts.manifest_sha256(digests), nonce=secrets.token_hex(16),
                    hub_id=assignment.hub_id, chain_id=assignment.chain_id,
                )
                signed = receipts.sign_receipt(body, self.key)
                telemetry.set_attributes(units=units, unit_type=unit_type, outputs=len(outputs))
                self._send_job(rj, miner_pb2.WorkRequest(result=miner_pb2.JobResult(
                    job_id=job_id, artifacts=artifacts, receipt=receipt_to_proto(signed),
                    inline_artifacts=[data for data, _ in outputs] if inline else [], **extra)))
                self.completed += 1
                log.info("job %s done: %d output(s), %d %s", job_id, len(outputs), units, unit_type)
        except JobCancelled:
            log.info("job %s stopped (cancelled)", job_id)
            telemetry.add_event("cancelled")
        except BackendError as exc:
            self.failed += 1
            telemetry.set_attributes(error=str(exc)[:200])
            self._send_job(rj, miner_pb2.WorkRequest(failed=miner_pb2.JobFailed(job_id=job_id, reason=str(exc), permanent=True)))
        except Exception as exc:
            self.failed += 1
            log.exception("job %s failed", job_id)
            self._send_job(rj, miner_pb2.WorkRequest(failed=miner_pb2.JobFailed(
                job_id=job_id, reason=f"{exc.__class__.__name__}: {exc}"[:500], permanent=False)))
        finally:
            rj.drop_accept()  # cancelled, or gone before it said anything
            if self.running.get(job_id) is rj:  # not a later run of the same job that waits for this one
                del self.running[job_id]

    async def _generate_image(self, rj: RunningJob, backend: Any) -> tuple[list[tuple[bytes, job_pb2.Artifact]], dict[str, Any], dict[str, Any]]:
        job_id, p = rj.job.job_id, rj.job.params.image
        req = ImageRequest(prompt=p.prompt, negative_prompt=p.negative_prompt, steps=p.steps,
                           guidance_scale=p.guidance_scale, width=p.width, height=p.height,
                           images=p.images or 1, seed=p.seed)
        loop = asyncio.get_running_loop()

        tracing = telemetry.enabled()

        def on_step(step: int, total: int) -> None:  # on the worker thread, inside miner.generate
            if tracing:
                telemetry.add_event("denoise.step", step=step, total_steps=total)
            loop.call_soon_threadsafe(self._send_job, rj, miner_pb2.WorkRequest(
                progress=job_pb2.JobProgress(job_id=job_id, step=step, total_steps=total)))

        with telemetry.span("miner.generate", job_id=job_id, model=rj.job.model, job_kind="image", steps=p.steps,
                            width=p.width, height=p.height, images=p.images or 1, device=self.device) as sp:
            batcher = self.batchers.get(rj.job.model)
            if batcher is not None:
                out = await batcher.generate(req, on_step, rj.cancel)
            else:
                out = await self._in_thread(backend.generate, req, on_step, rj.cancel)
            sp.set_attribute("gpu_ms", out.gpu_ms)
        arts = [(png, job_pb2.Artifact(content_type="image/png", width=out.width, height=out.height)) for png in out.pngs]
        # units follow from the job's parameters and the images' size (docs/receipts.md, "Units"), never
        # from the time it took: a faster GPU is paid the same for the same image, and a job in a batch
        # the same as alone (its gpu_ms is its images' share of the batch's device time)
        meter = {"unit_type": "tile_steps", "gpu_ms": max(1, out.gpu_ms), "width": out.width, "height": out.height,
                 "steps": p.steps, "images": len(out.pngs),
                 "units": receipts.tile_steps(out.width, out.height, p.steps, len(out.pngs))}
        return arts, meter, {}

    async def _generate_text(self, rj: RunningJob, backend: Any) -> tuple[list[tuple[bytes, job_pb2.Artifact]], dict[str, Any], dict[str, Any]]:
        from aitbc.miner.text import TextRequest

        job_id, p = rj.job.job_id, rj.job.params.text
        req = TextRequest(prompt=p.prompt, max_new_tokens=p.max_new_tokens, temperature=p.temperature,
                          top_p=p.top_p, top_k=p.top_k, seed=p.seed, stop=tuple(p.stop))
        loop = asyncio.get_running_loop()
        offset = 0
        pending: list[str] = []
        lock = threading.Lock()
        scheduled = sent_first = False

        def flush() -> None:  # on the event loop
            nonlocal offset, scheduled
            with lock:
                text = "".join(pending)
                pending.clear()
                scheduled = False
            if text:
                self._send_job(rj, miner_pb2.WorkRequest(text=job_pb2.TextChunk(job_id=job_id, offset=offset, text=text)))
                offset += len(text)

        def on_text(delta: str) -> None:  # on the generating thread
            # the first delta goes at once; later ones are coalesced per TEXT_FLUSH_S window, so a fast
            # model costs one loop wake-up and one message per window, not per token
            nonlocal scheduled, sent_first
            if not delta:
                return
            with lock:
                pending.append(delta)
                if scheduled:
                    return
                scheduled = True
                delay, sent_first = (TEXT_FLUSH_S if sent_first else 0.0), True
            loop.call_soon_threadsafe(loop.call_later, delay, flush)

        trace = None
        with telemetry.span("miner.generate", job_id=job_id, model=rj.job.model, job_kind="text",
                            max_new_tokens=p.max_new_tokens, device=self.device) as sp:
            if rj.job.want_text_trace:  # a re-execution of a stacked miner's job: exact, with its trace
                out, trace = await self._in_thread(backend.trace, req, rj.cancel, on_text)
            else:
                out = await self._in_thread(backend.generate, req, on_text, rj.cancel)
            sp.set_attributes({"prompt_tokens": out.prompt_tokens, "generated_tokens": out.generated_tokens,
                               "finish_reason": out.finish_reason})
        flush()  # what is left goes before the result
        extra: dict[str, Any] = {"prompt_tokens": out.prompt_tokens, "generated_tokens": out.generated_tokens,
                                 "finish_reason": out.finish_reason}
        if trace is not None:
            extra["text_trace"] = trace.to_proto()
        art = job_pb2.Artifact(content_type="text/plain; charset=utf-8")
        meter = {"unit_type": "tokens", "gpu_ms": max(1, out.gpu_ms), "prompt_tokens": out.prompt_tokens,
                 "generated_tokens": out.generated_tokens, "units": out.prompt_tokens + out.generated_tokens}
        return [(out.text.encode("utf-8"), art)], meter, extra


class MinerOpsServicer(miner_pb2_grpc.MinerOpsServiceServicer):
    """The miner daemon's MinerOpsService (GetInfo), for operators."""

    def __init__(self, daemon: MinerDaemon) -> None:
        self.daemon = daemon

    @handle_errors
    async def GetInfo(self, request: miner_pb2.GetInfoRequest, context: Any) -> miner_pb2.GetInfoResponse:
        d = self.daemon
        return miner_pb2.GetInfoResponse(
            miner_id=d.key.address, info=d.info(), coordinator=d.coordinator, connected=d.connected,
            running_jobs=len(d.running), jobs_completed=d.completed, jobs_failed=d.failed,
        )

    async def _elsewhere(self, context: Any) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                            "this is a miner daemon's ops port: GetChallenge/Register/Work are served by the coordinator")

    async def GetChallenge(self, request: Any, context: Any) -> Any:
        await self._elsewhere(context)

    async def Register(self, request: Any, context: Any) -> Any:
        await self._elsewhere(context)

    async def Work(self, request_iterator: Any, context: Any) -> Any:
        await self._elsewhere(context)


def configure_cpu_threads(device: str, cpu_threads: int) -> int:
    """On CPU, leave one core for the event loop and gRPC (0 = cores - 1). Measured here: with
    torch on every core of a 2-core box, the Work stream's traffic stalls torch's thread barrier
    and a 1.0 s generation takes 1.6 s; with one core left free it takes 1.1 s."""
    if device != "cpu":
        return 0
    import torch

    threads = cpu_threads or max(1, (os.cpu_count() or 2) - 1)
    torch.set_num_threads(threads)
    return threads


def build_daemon(config: MinerConfig) -> MinerDaemon:
    key = crypto.load_or_create_key(config.key_file)
    from aitbc.miner.text import NULL_TEXT_MODEL, is_text_model, load_text_backend

    no_inference = {NULL_MODEL, NULL_TEXT_MODEL}
    if all(m in no_inference for m in config.models):
        device = "cpu"  # no inference: do not pay for importing torch
    else:
        device = pick_device(config.gpu_devices[0] if config.gpu_devices else None)
    backends: dict[str, Any] = {
        m: load_text_backend(m, device, batching=config.text_batching, max_batch=config.text_max_batch)
        if is_text_model(m)
        else load_image_backend(m, device, fast_path=config.image_fast_path, compile_unet=config.image_compile)
        for m in config.models
    }
    if any(m not in no_inference for m in config.models):
        configure_cpu_threads(device, config.cpu_threads)
    return MinerDaemon(config, key, backends)


async def start_ops(daemon: MinerDaemon, listen: str) -> RunningServer:
    return await start_server(listen, [
        Service(miner_pb2_grpc.add_MinerOpsServiceServicer_to_server, MinerOpsServicer(daemon),
                miner_pb2.DESCRIPTOR.services_by_name["MinerOpsService"].full_name),
    ])


async def run_miner(config: MinerConfig) -> None:
    """Load models, serve the ops port, connect; until SIGINT/SIGTERM."""
    telemetry.setup("aitbc-miner")  # before any server or channel: the interceptors are chosen then
    rpc.configure_tls(config.tls_cert_file, config.tls_key_file, config.tls_ca_file, allow_insecure=config.allow_insecure)
    if rpc.port_in_use(config.ops_listen):  # said before seconds of model loading, not after
        raise FailedPrecondition(f"ops_listen {config.ops_listen} is already in use (a running devnet's miner, or "
                                 "another miner?): set ops_listen in miner.toml to a free port, or 127.0.0.1:0")
    t0 = time.perf_counter()
    daemon = build_daemon(config)
    telemetry.announce(f"miner {daemon.key.address}: loaded {', '.join(config.models)} on {daemon.device} "
                       f"in {time.perf_counter() - t0:.1f} s", logger="aitbc.miner")
    ops = await start_ops(daemon, config.ops_listen)
    host = config.ops_listen.rsplit(":", 1)[0]
    telemetry.announce(f"miner ops (MinerOpsService) listening on {host}:{ops.port}; coordinator {', '.join(config.coordinator)}", logger="aitbc.miner")
    write_port_file(config.port_file, ops.port)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, daemon.stop)
    await daemon.run()
    telemetry.announce("miner stopping", logger="aitbc.miner")
    await ops.stop(1.0)
