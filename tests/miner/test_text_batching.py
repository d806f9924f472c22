"""Concurrent text streams (issue 19): up to max_concurrency jobs decode together, each with its own
KV cache and its own seeded generator, so every job's tokens are those of the job run alone."""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from aitbc import receipts
from aitbc.miner.backend import JobCancelled
from aitbc.miner.text import (
    TINY_TEXT_MODEL,
    TextOutput,
    TextRequest,
    TransformersTextBackend,
    load_text_backend,
)
from aitbc.v1 import coordinator_pb2, job_pb2
from aitbc.wire import receipt_from_proto
from tests.coordinator.test_jobs_api import MD, fetch, stub, wait_done

S = job_pb2.JobState


@pytest.fixture(scope="module")
def tiny() -> TransformersTextBackend:
    backend = load_text_backend(TINY_TEXT_MODEL, "cpu")
    assert isinstance(backend, TransformersTextBackend)
    return backend


# greedy, seeded sampling, top-k + top-p, a stop string: each its own sampling parameters
REQS = [
    TextRequest("Once upon a time", 48, 0.0, 1.0, 0, 1, ()),
    TextRequest("The miner runs jobs", 48, 0.9, 0.95, 50, 7, ()),
    TextRequest("Proof of authority", 48, 1.3, 0.8, 20, 123, ()),
    TextRequest("A block is sealed", 48, 0.7, 1.0, 0, 7, ("e",)),
]


def alone(backend: TransformersTextBackend, req: TextRequest) -> TextOutput:
    return backend.generate(req, lambda d: None, threading.Event())


def same(a: TextOutput, b: TextOutput) -> bool:
    return (a.text, a.generated_tokens, a.prompt_tokens, a.finish_reason) == (
        b.text, b.generated_tokens, b.prompt_tokens, b.finish_reason)


def test_jobs_joining_mid_stream_get_the_tokens_they_get_alone(tiny: TransformersTextBackend) -> None:
    """The first job is mid-generation when the others join (its on_text waits for their first
    deltas), so all four share decoding rounds; each output is that of the job alone."""
    expected = [alone(tiny, r) for r in REQS]
    joined = [threading.Event() for _ in REQS[1:]]
    results: dict[int, TextOutput] = {}
    pool = ThreadPoolExecutor(len(REQS))
    futures: list = []

    def first_on_text(delta: str) -> None:
        if not futures:  # the first delta of job 0: the others join now
            for n, r in enumerate(REQS[1:]):
                futures.append(pool.submit(tiny.generate, r, lambda d, e=joined[n]: e.set(), threading.Event()))
            for e in joined:
                assert e.wait(60), "a job that joined never streamed"

    before = tiny.decode_loop.most_streams
    results[0] = tiny.generate(REQS[0], first_on_text, threading.Event())
    for n, f in enumerate(futures, start=1):
        results[n] = f.result(60)
    pool.shutdown()
    assert all(same(results[n], expected[n]) for n in range(len(REQS)))
    assert max(before, tiny.decode_loop.most_streams) >= 2
    assert results[3].finish_reason == "stop"  # the stop string still ends its own job only


def test_a_cancelled_or_failing_neighbour_never_disturbs_the_others(tiny: TransformersTextBackend) -> None:
    expected = [alone(tiny, r) for r in REQS]
    cancel = threading.Event()
    started = [threading.Event(), threading.Event()]
    seen = {"cancelled": 0}

    def cancelled_on_text(delta: str) -> None:
        started[0].set()
        seen["cancelled"] += 1
        if seen["cancelled"] == 3:
            cancel.set()

    def failing_on_text(delta: str) -> None:
        started[1].set()
        raise RuntimeError("client went away")

    with ThreadPoolExecutor(4) as pool:
        first_deltas: list[str] = []

        def on_text0(delta: str) -> None:
            if not first_deltas:  # neighbours join while job 0 runs, then cancel / fail
                for e in started:
                    assert e.wait(60)
            first_deltas.append(delta)

        a = pool.submit(tiny.generate, REQS[0], on_text0, threading.Event())
        b = pool.submit(tiny.generate, REQS[1], cancelled_on_text, cancel)
        c = pool.submit(tiny.generate, REQS[2], failing_on_text, threading.Event())
        d = pool.submit(tiny.generate, REQS[3], lambda _: None, threading.Event())
        assert same(a.result(60), expected[0]) and same(d.result(60), expected[3])
        with pytest.raises(JobCancelled):
            b.result(60)
        with pytest.raises(RuntimeError, match="client went away"):
            c.result(60)
    assert seen["cancelled"] == 3  # nothing streamed after the cancel
    # the loop is still healthy for the next job
    assert same(alone(tiny, REQS[1]), expected[1])


def test_seeded_jobs_with_one_seed_draw_independently(tiny: TransformersTextBackend) -> None:
    """Two jobs with seed 7 at once: each has its own generator, so both are the alone output
    (with one shared RNG, each would take every other draw)."""
    req = REQS[1]
    expected = alone(tiny, req)
    with ThreadPoolExecutor(2) as pool:
        outs = [f.result(60) for f in [pool.submit(alone, tiny, req) for _ in range(2)]]
    assert all(same(o, expected) for o in outs)


async def test_text_jobs_served_at_once_through_the_network(net, tiny) -> None:
    miner = await net.add_miner({"tiny-llama": tiny}, concurrency=4)
    s = stub(net)
    params = [dict(prompt=r.prompt, max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                   top_k=r.top_k, seed=r.seed, stop=list(r.stop)) for r in REQS]
    submitted = await asyncio.gather(*(s.SubmitJob(coordinator_pb2.SubmitJobRequest(
        model="tiny-llama", params=job_pb2.JobParams(text=job_pb2.TextParams(**p))), metadata=MD) for p in params))
    done = [await wait_done(s, r.job.job_id) for r in submitted]
    assert [j.state for j in done] == [S.JOB_STATE_COMPLETED] * len(REQS), [j.error for j in done]
    for req, job in zip(REQS, done, strict=True):
        _, data = await fetch(s, job.job_id)
        direct = alone(tiny, req)
        assert data.decode() == direct.text and job.generated_tokens == direct.generated_tokens
        body = receipt_from_proto(job.receipt).body
        receipts.verify_receipt(receipt_from_proto(job.receipt), attesters=frozenset({net.core.key.address}))
        assert body.units == direct.prompt_tokens + direct.generated_tokens and body.gpu_ms >= 1
    assert miner.completed == len(REQS)


async def test_a_miner_runs_max_concurrency_jobs_at_once_whatever_its_core_count(net) -> None:
    """Every job of a miner with more slots than asyncio's default pool has threads (cores + 4) is
    inside its backend at the same time: the daemon has a worker thread per slot. The backend is
    the null text backend behind a barrier that opens when every call is in."""
    from aitbc.miner.text import NullTextBackend

    slots = min(32, (os.cpu_count() or 1) + 4) + 2
    barrier = threading.Barrier(slots, timeout=30)

    class AllAtOnce(NullTextBackend):
        def generate(self, req, on_text, cancel):  # type: ignore[no-untyped-def]
            barrier.wait()  # BrokenBarrierError (a failed job) unless all `slots` calls run together
            return super().generate(req, on_text, cancel)

    await net.add_miner({"null-text": AllAtOnce()}, concurrency=slots)
    s = stub(net)
    submitted = await asyncio.gather(*(s.SubmitJob(coordinator_pb2.SubmitJobRequest(
        model="null-text", params=job_pb2.JobParams(text=job_pb2.TextParams(prompt=f"p{i}", seed=i))), metadata=MD)
        for i in range(slots)))
    done = [await wait_done(s, r.job.job_id) for r in submitted]
    assert [j.state for j in done] == [S.JOB_STATE_COMPLETED] * slots, [j.error for j in done]
