"""Small results in one message: outputs inline in the JobResult, and a job's start implied by the
first word on it (progress, text, a chunk, the result) instead of a JobAccepted of its own
(docs/coordinator.md, "Miner protocol: messages per job")."""

from __future__ import annotations

import io
import random
import threading
import time
from typing import Any

import pytest

from aitbc.coordinator.uploads import INLINE_BYTES
from aitbc.jobs import TERMINAL
from aitbc.miner.backend import ImageOutput, NullImageBackend, null_png
from aitbc.v1 import coordinator_pb2, job_pb2, miner_pb2
from tests.coordinator.test_jobs_api import MD, fetch, image_job, stub, wait_done
from tests.coordinator.test_miner_gateway import RawMiner

S = job_pb2.JobState


async def _task(net: Any, miner: RawMiner, **params: Any) -> job_pb2.Job:
    """Submit a job and read its assignment; no JobAccepted is sent."""
    await stub(net).SubmitJob(image_job(model="null", seed=1, width=64, height=64, **params), metadata=MD)
    msg = await miner.read()
    assert msg.WhichOneof("msg") == "assignment"
    return msg.assignment.task


def steps(job: job_pb2.Job) -> list[tuple[int, int]]:
    return [(t.from_state, t.to_state) for t in job.story]


async def test_a_small_result_is_one_message_and_completes_the_job(net: Any) -> None:
    m = RawMiner(net)
    await m.connect()
    task = await _task(net, m)
    png = null_png("a red bicycle", 1, 64, 64)
    result = m.result_for(task, png)
    result.inline_artifacts.append(png)
    m.send(result=result)  # no JobAccepted, no ArtifactChunk: the result says it all
    reply = await m.read()
    assert reply.WhichOneof("msg") == "accepted", reply
    done = await wait_done(stub(net), task.job_id)
    assert done.state == S.JOB_STATE_COMPLETED and done.receipt_hash == reply.accepted.receipt_hash
    assert steps(done)[-2:] == [(S.JOB_STATE_QUEUED, S.JOB_STATE_ASSIGNED), (S.JOB_STATE_ASSIGNED, S.JOB_STATE_COMPLETED)]
    art, data = await fetch(stub(net), task.job_id)
    assert data == png and art.sha256 == result.artifacts[0].sha256
    assert net.core.uploads.total == 0


@pytest.mark.parametrize(
    ("shape", "needle"),
    [
        ("two_for_one", "result has 2 inline artifacts; job"),
        ("too_big", f"inline artifacts exceed {INLINE_BYTES} bytes"),
        ("chunks_and_inline", "came both as ArtifactChunk messages and inline"),
    ],
)
async def test_malformed_inline_results_are_rejected_and_the_job_requeued(net: Any, shape: str, needle: str) -> None:
    m = RawMiner(net)
    await m.connect()
    task = await _task(net, m)
    png = null_png("a red bicycle", 1, 64, 64)
    result = m.result_for(task, png)
    if shape == "two_for_one":
        result.inline_artifacts.extend([png, png])
    elif shape == "too_big":
        result.inline_artifacts.append(png + b"\0" * INLINE_BYTES)
    else:
        m.send(chunk=miner_pb2.ArtifactChunk(job_id=task.job_id, index=0, data=png))
        result.inline_artifacts.append(png)
    m.send(result=result)
    reply = await m.read()
    assert reply.WhichOneof("msg") == "rejected" and needle in reply.rejected.reason, reply
    await net.until(lambda: net.core.machine.job(task.job_id).state == S.JOB_STATE_QUEUED)
    assert needle in net.core.machine.job(task.job_id).wait_reason
    assert net.core.uploads.total == 0 and not net.core.uploads.files(task.job_id)  # nothing of it kept


async def test_inline_outputs_count_against_the_upload_limits(network_factory: Any) -> None:
    net = await network_factory(max_artifact_bytes=100, max_upload_bytes_per_miner=100, max_upload_bytes_in_flight=100)
    m = RawMiner(net)
    await m.connect()
    task = await _task(net, m)
    png = null_png("a red bicycle", 1, 64, 64)
    assert len(png) > 100
    result = m.result_for(task, png)
    result.inline_artifacts.append(png)
    m.send(result=result)
    reply = await m.read()
    assert reply.WhichOneof("msg") == "rejected" and "max_artifact_bytes" in reply.rejected.reason, reply
    assert net.core.uploads.total == 0


async def test_the_first_chunk_starts_an_assigned_job_and_is_kept(net: Any) -> None:
    """A chunk for a job still ASSIGNED moves it to RUNNING (it started) without dropping the bytes
    that came with it: the job is still held by the same miner."""
    m = RawMiner(net)
    await m.connect()
    task = await _task(net, m)
    png = null_png("a red bicycle", 1, 64, 64)
    m.send(chunk=miner_pb2.ArtifactChunk(job_id=task.job_id, index=0, data=png))
    await net.until(lambda: net.core.machine.job(task.job_id).state == S.JOB_STATE_RUNNING)
    job = net.core.machine.job(task.job_id)
    assert job.story[-1].cause.startswith("the miner sent its first artifact chunk") and job.started_at_unix_ms
    m.send(result=m.result_for(task, png))
    reply = await m.read()
    assert reply.WhichOneof("msg") == "accepted", reply


class Spy:
    """Every message a real MinerDaemon sends on its Work stream, in order."""

    def __init__(self, daemon: Any) -> None:
        self.sent: list[miner_pb2.WorkRequest] = []
        send = daemon._send

        def spy(msg: miner_pb2.WorkRequest) -> None:
            self.sent.append(msg)
            send(msg)

        daemon._send = spy

    def kinds(self, job_id: str) -> list[str]:
        out = []
        for msg in self.sent:
            kind = msg.WhichOneof("msg")
            if kind != "heartbeat" and getattr(msg, kind).job_id == job_id:
                out.append(kind)
        return out

    def result(self, job_id: str) -> miner_pb2.JobResult:
        return next(msg.result for msg in self.sent if msg.WhichOneof("msg") == "result" and msg.result.job_id == job_id)


class Slow(NullImageBackend):
    """The null backend after 0.3 s without a word (a model loading, a long first step)."""

    def generate(self, req: Any, on_step: Any, cancel: threading.Event) -> ImageOutput:
        time.sleep(0.3)
        return super().generate(req, on_step, cancel)


class Noisy(NullImageBackend):
    """A real PNG of random pixels: over 1 MiB, so it must travel as chunks."""

    def generate(self, req: Any, on_step: Any, cancel: threading.Event) -> ImageOutput:
        from PIL import Image

        out = super().generate(req, on_step, cancel)
        rnd = random.Random(req.seed)
        img = Image.frombytes("RGB", (out.width, out.height), rnd.randbytes(out.width * out.height * 3))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return ImageOutput(pngs=[buf.getvalue()], width=out.width, height=out.height, gpu_ms=out.gpu_ms)


async def test_the_miner_sends_a_quick_job_as_one_result(net: Any, null_backend: Any) -> None:
    daemon = await net.add_miner({"null": null_backend})
    spy = Spy(daemon)
    s = stub(net)
    job = (await s.SubmitJob(image_job(model="null", seed=4, width=64, height=64, steps=2), metadata=MD)).job
    done = await wait_done(s, job.job_id)
    assert done.state == S.JOB_STATE_COMPLETED, done.error
    # its two steps came within the start window: held, then moot once the result went
    assert spy.kinds(job.job_id) == ["result"]  # no JobAccepted, no progress, no chunk
    result = spy.result(job.job_id)
    _, data = await fetch(s, job.job_id)
    assert list(result.inline_artifacts) == [data]
    assert (S.JOB_STATE_ASSIGNED, S.JOB_STATE_COMPLETED) in steps(done)  # the result started and ended it


class Paused(NullImageBackend):
    """Steps 1 and 2 at once, then 0.3 s of work before step 3 (a job longer than the start window)."""

    def generate(self, req: Any, on_step: Any, cancel: threading.Event) -> ImageOutput:
        for step in (1, 2, 3):
            if step == 3:
                time.sleep(0.3)
            on_step(step, 3)
        return super().generate(req, lambda *_: None, cancel)


async def test_progress_said_in_the_start_window_goes_in_order_when_it_ends(net: Any) -> None:
    daemon = await net.add_miner({"null": Paused()})
    spy = Spy(daemon)
    s = stub(net)
    job = (await s.SubmitJob(image_job(model="null", seed=7, width=64, height=64, steps=3), metadata=MD)).job
    seen: list[tuple[int, int]] = []
    async for ev in s.WatchJob(coordinator_pb2.WatchJobRequest(job_id=job.job_id), metadata=MD, timeout=30):
        if ev.WhichOneof("event") == "progress":
            seen.append((ev.progress.step, ev.progress.total_steps))
            if len(seen) == 2:  # the held steps, 50 ms in, while step 3 is still being worked on
                assert spy.kinds(job.job_id) == ["progress", "progress"]  # they started it: no JobAccepted
        elif ev.job.state in TERMINAL:
            assert ev.job.state == S.JOB_STATE_COMPLETED, ev.job.error
    assert seen == [(1, 3), (2, 3), (3, 3)]  # none lost, in order
    assert spy.kinds(job.job_id) == ["progress", "progress", "progress", "result"]


async def test_the_miner_accepts_a_job_that_says_nothing_for_50_ms(net: Any) -> None:
    daemon = await net.add_miner({"null": Slow()})
    spy = Spy(daemon)
    s = stub(net)
    job = (await s.SubmitJob(image_job(model="null", seed=5, width=64, height=64, steps=1), metadata=MD)).job
    await net.until(lambda: net.core.machine.job(job.job_id).state == S.JOB_STATE_RUNNING, timeout=10)
    assert spy.kinds(job.job_id) == ["accepted"]  # while the model still works: the client sees RUNNING
    done = await wait_done(s, job.job_id)
    assert done.state == S.JOB_STATE_COMPLETED, done.error
    assert spy.kinds(job.job_id) == ["accepted", "progress", "result"]


async def test_the_miner_sends_outputs_over_1_mib_as_chunks(net: Any) -> None:
    daemon = await net.add_miner({"null": Noisy()})
    spy = Spy(daemon)
    s = stub(net)
    job = (await s.SubmitJob(image_job(model="null", seed=6, width=1024, height=1024, steps=1), metadata=MD)).job
    done = await wait_done(s, job.job_id)
    assert done.state == S.JOB_STATE_COMPLETED, done.error
    kinds = spy.kinds(job.job_id)
    assert done.artifacts[0].size > INLINE_BYTES
    assert kinds.count("chunk") == -(-done.artifacts[0].size // INLINE_BYTES) and kinds[-1] == "result"
    assert not spy.result(job.job_id).inline_artifacts
    _, data = await fetch(s, job.job_id)
    assert len(data) == done.artifacts[0].size
