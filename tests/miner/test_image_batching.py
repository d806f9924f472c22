"""Batched image jobs (issue 19): one pipeline call for jobs that share size, steps and guidance,
each image byte-identical on CPU to its job run alone, progress, cancel and metering per job."""

from __future__ import annotations

import asyncio
import hashlib
import threading

import pytest

from aitbc import receipts
from aitbc.miner.backend import BackendError, BatchItem, ImageOutput, ImageRequest, JobCancelled, share_ms
from aitbc.miner.batching import ImageBatcher
from aitbc.v1 import coordinator_pb2, job_pb2
from tests.coordinator.test_jobs_api import MD, fetch, image_job, stub, wait_done

S = job_pb2.JobState


def req(prompt: str, seed: int, *, images: int = 1, negative: str = "", steps: int = 4,
        guidance: float = 7.5, size: int = 64) -> ImageRequest:
    return ImageRequest(prompt, negative, steps, guidance, size, size, images, seed)


JOBS = [req("a cat", 3), req("a dog", 10, images=2, negative="blurry"), req("x", 5, images=3)]


def alone(backend, r: ImageRequest) -> ImageOutput:
    return backend.generate(r, lambda i, n: None, threading.Event())


def item(r: ImageRequest, steps: list | None = None, cancel: threading.Event | None = None) -> BatchItem:
    return BatchItem(r, (lambda i, n: steps.append(i)) if steps is not None else (lambda i, n: None),
                     cancel or threading.Event())


@pytest.mark.parametrize("guidance", [7.5, 1.0])  # with and without classifier-free guidance
def test_batched_images_are_the_images_of_each_job_alone(tiny_backend, guidance: float) -> None:
    jobs_ = [req(r.prompt, r.seed, images=r.images, negative=r.negative_prompt, guidance=guidance) for r in JOBS]
    expected = [alone(tiny_backend, r).pngs for r in jobs_]
    progress: list[list[int]] = [[] for _ in jobs_]
    out = tiny_backend.generate_batch([item(r, progress[n]) for n, r in enumerate(jobs_)])
    assert [o.pngs for o in out] == expected
    assert len({p for pngs in expected for p in pngs}) == 6  # six different images, none swapped
    assert progress == [[1, 2, 3, 4]] * 3  # every job sees its own progress, once per step
    # each job's gpu_ms is its images' share of the call; units never depend on it
    total = sum(o.gpu_ms for o in out)
    assert all(o.gpu_ms >= 1 for o in out) and out[2].gpu_ms >= out[0].gpu_ms
    assert abs(out[2].gpu_ms - 3 * total / 6) <= 2


def test_a_job_cancelled_mid_batch_leaves_it_and_the_others_are_undisturbed(tiny_backend) -> None:
    jobs_ = [req("a cat", 3, steps=6), req("a dog", 10, images=2, steps=6), req("x", 5, steps=6)]
    expected = [alone(tiny_backend, r).pngs for r in jobs_]
    cancel = threading.Event()
    progress: list[list[int]] = [[], [], []]

    def on_step(i: int, n: int) -> None:
        progress[1].append(i)
        if i == 2:
            cancel.set()

    out = tiny_backend.generate_batch(
        [item(jobs_[0], progress[0]), BatchItem(jobs_[1], on_step, cancel), item(jobs_[2], progress[2])]
    )
    assert isinstance(out[1], JobCancelled)
    assert progress[1] == [1, 2]  # no progress after the step that saw the cancel
    assert out[0].pngs == expected[0] and out[2].pngs == expected[2]
    assert progress[0] == progress[2] == [1, 2, 3, 4, 5, 6]


def test_a_failing_progress_callback_fails_only_its_job(tiny_backend) -> None:
    def broken(i: int, n: int) -> None:
        raise RuntimeError("stream gone")

    out = tiny_backend.generate_batch([BatchItem(JOBS[0], broken, threading.Event()), item(JOBS[2])])
    assert isinstance(out[0], RuntimeError) and out[1].pngs == alone(tiny_backend, JOBS[2]).pngs


def test_when_every_job_has_left_the_call_stops(tiny_backend) -> None:
    cancels = [threading.Event(), threading.Event()]
    seen: list[int] = []

    def on_step(i: int, n: int) -> None:
        seen.append(i)
        for c in cancels:
            c.set()

    out = tiny_backend.generate_batch([BatchItem(req("a", 1, steps=30), on_step, cancels[0]),
                                       BatchItem(req("b", 2, steps=30), lambda i, n: None, cancels[1])])
    assert all(isinstance(o, JobCancelled) for o in out)
    assert seen == [1]


def test_invalid_or_cancelled_jobs_fail_alone_and_keys_must_match(tiny_backend) -> None:
    cancelled = threading.Event()
    cancelled.set()
    out = tiny_backend.generate_batch([item(req("a", 1, size=60)), item(JOBS[0]), item(JOBS[2], cancel=cancelled)])
    assert isinstance(out[0], BackendError) and "width" in str(out[0])
    assert out[1].pngs == alone(tiny_backend, JOBS[0]).pngs
    assert isinstance(out[2], JobCancelled)
    with pytest.raises(ValueError, match="batch_key"):
        tiny_backend.generate_batch([item(JOBS[0]), item(req("a", 1, steps=5))])


def test_share_ms() -> None:
    assert share_ms(100, 1, 4) == 25 and share_ms(100, 4, 4) == 100 and share_ms(1, 1, 8) == 1


async def test_batcher_groups_jobs_by_key_up_to_its_size(tiny_backend) -> None:
    batcher = ImageBatcher(tiny_backend, max_images=4, wait_s=30.0)  # only a full batch starts
    group = [req("a", 1), req("b", 2, images=2), req("c", 3)]  # 4 images: one call
    results = await asyncio.gather(*(batcher.generate(r, lambda i, n: None, threading.Event()) for r in group))
    assert batcher.calls == 1
    assert [r.pngs for r in results] == [alone(tiny_backend, r).pngs for r in group]
    batcher = ImageBatcher(tiny_backend, max_images=2, wait_s=0.0)
    mixed = [req("a", 1), req("b", 2, steps=3), req("c", 3)]  # steps differ: never one call
    results = await asyncio.gather(*(batcher.generate(r, lambda i, n: None, threading.Event()) for r in mixed))
    assert [r.pngs for r in results] == [alone(tiny_backend, r).pngs for r in mixed]
    assert batcher.calls == 2  # a + c share a call, b has its own
    with pytest.raises(BackendError, match="width"):
        await batcher.generate(req("a", 1, size=60), lambda i, n: None, threading.Event())


async def test_jobs_batched_on_a_miner_are_paid_and_verified_as_alone(net, tiny_backend) -> None:
    """Through a coordinator: four jobs reach a miner with 4 slots, run in one call, and each PNG,
    receipt check and unit count is that of the job alone."""
    single = await net.add_miner({"tiny-sd": tiny_backend}, concurrency=1, wait=False)
    single.stop()
    assert single.batchers == {}  # one slot: nothing to batch, no wait
    miner = await net.add_miner({"tiny-sd": tiny_backend}, concurrency=4)
    assert miner.batchers["tiny-sd"].max_images == 4  # the default image_batch_size
    miner.batchers["tiny-sd"] = batcher = ImageBatcher(tiny_backend, 4, 30.0, miner._in_thread)  # only when full
    s = stub(net)
    params = [("a futuristic city", 7), ("a red bicycle", 8), ("a lake", 9), ("a cat", 10)]
    submitted = await asyncio.gather(*(s.SubmitJob(image_job(p, steps=4, seed=seed), metadata=MD) for p, seed in params))
    done = [await wait_done(s, r.job.job_id) for r in submitted]
    assert [j.state for j in done] == [S.JOB_STATE_COMPLETED] * 4, [j.error for j in done]
    assert batcher.calls == 1
    for (prompt, seed), job in zip(params, done, strict=True):
        _, png = await fetch(s, job.job_id)
        assert png == alone(tiny_backend, ImageRequest(prompt, "", 4, 7.5, 0, 0, 1, seed)).pngs[0]
        rec = (await s.GetReceipt(coordinator_pb2.GetReceiptRequest(job_id=job.job_id), metadata=MD)).receipt
        body = job.receipt.body
        assert rec.receipt_hash and body.units == 4 and body.unit_type == "tile_steps" and body.gpu_ms >= 1
        assert body.artifact_sha256 == receipts.manifest_sha256([hashlib.sha256(png).digest()])
