"""Text jobs over the network: tokens streamed while they are made, receipts that count tokens."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest

from aitbc import jobs, receipts
from aitbc.v1 import coordinator_pb2, job_pb2
from aitbc.wire import receipt_from_proto
from tests.coordinator.test_jobs_api import MD, fetch, image_job, stub, wait_done

S = job_pb2.JobState


@pytest.fixture(scope="module")
def tiny_llama():
    from aitbc.miner.text import load_text_backend

    return load_text_backend("tiny-llama", "cpu")




def text_job(prompt: str = "Explain proof of authority in one paragraph", model: str = "tiny-llama",
             **kw) -> coordinator_pb2.SubmitJobRequest:
    return coordinator_pb2.SubmitJobRequest(model=model, params=job_pb2.JobParams(text=job_pb2.TextParams(prompt=prompt, **kw)))


async def collect(s, job_id: str) -> tuple[list[job_pb2.TextChunk], job_pb2.Job]:
    chunks, job = [], None
    async for ev in s.WatchJob(coordinator_pb2.WatchJobRequest(job_id=job_id), metadata=MD, timeout=120):
        kind = ev.WhichOneof("event")
        if kind == "text":
            chunks.append(ev.text)
        elif kind == "job":
            job = ev.job
    return chunks, job


async def test_streamed_tokens_concatenate_to_the_result_and_match_direct_generation(net, tiny_llama) -> None:
    from aitbc.miner.text import TextRequest

    await net.add_miner({"tiny-llama": tiny_llama}, price=2)
    s = stub(net)
    job = (await s.SubmitJob(text_job(max_new_tokens=40, seed=11, temperature=0.8), metadata=MD)).job
    chunks, done = await collect(s, job.job_id)
    assert done.state == S.JOB_STATE_COMPLETED, done.error
    assert len(chunks) > 1  # streamed while made, not at the end
    streamed = "".join(c.text for c in chunks)
    assert [c.offset for c in chunks] == [sum(len(c.text) for c in chunks[:i]) for i in range(len(chunks))]
    _, data = await fetch(s, job.job_id)
    assert data.decode() == streamed
    direct = tiny_llama.generate(TextRequest("Explain proof of authority in one paragraph", 40, 0.8, 1.0, 0, 11, ()),
                                 lambda _: None, threading.Event())
    assert direct.text == streamed
    assert done.prompt_tokens == direct.prompt_tokens and done.generated_tokens == direct.generated_tokens
    rec = receipt_from_proto(done.receipt)
    receipts.verify_receipt(rec, attesters=frozenset({net.core.key.address}))
    assert rec.body.unit_type == "tokens" and rec.body.units == done.prompt_tokens + done.generated_tokens
    assert rec.body.price_per_unit == 2


async def test_text_jobs_route_only_to_text_miners(net, null_backend, null_text) -> None:
    image_miner = await net.add_miner({"null": null_backend})
    text_miner = await net.add_miner({"null-text": null_text})
    s = stub(net)
    models = {m.name: m for m in (await s.ListModels(coordinator_pb2.ListModelsRequest(), metadata=MD)).models}
    assert models["null-text"].kind == job_pb2.MODEL_KIND_TEXT and models["null"].kind == job_pb2.MODEL_KIND_IMAGE
    assert models["null-text"].context_length > 0
    done = await wait_done(s, (await s.SubmitJob(text_job(model="null-text", seed=1), metadata=MD)).job.job_id)
    assert done.state == S.JOB_STATE_COMPLETED and done.miner_id == text_miner.key.address
    assert image_miner.completed == 0
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.SubmitJob(text_job(model="null"), metadata=MD)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "is a image model and this is a text job" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.SubmitJob(image_job(model="null-text"), metadata=MD)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"prompt": " "}, "prompt is empty"),
        ({"max_new_tokens": 5000}, "max_new_tokens must be between 1 and 4096"),
        ({"temperature": 2.5}, "temperature must be between 0"),
        ({"top_p": 0.0}, "top_p must be in (0, 1]"),
        ({"top_k": 5000}, "top_k must be between 0"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "at most 4 stop sequences"),
        ({"stop": ["x" * 65]}, "1-64 characters"),
    ],
)
async def test_bad_text_parameters(net, null_text, kw, needle) -> None:
    await net.add_miner({"null-text": null_text})
    params = {"prompt": "hello", **kw}
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub(net).SubmitJob(text_job(model="null-text", **params), metadata=MD)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in err.value.details()


async def test_prompt_longer_than_the_context_fails_with_the_reason(net, tiny_llama) -> None:
    await net.add_miner({"tiny-llama": tiny_llama})
    s = stub(net)
    with pytest.raises(grpc.aio.AioRpcError) as err:  # max_new_tokens alone cannot fit
        await s.SubmitJob(text_job(max_new_tokens=tiny_llama.context_length), metadata=MD)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "context" in err.value.details()
    long_prompt = "proof of authority " * 400
    done = await wait_done(s, (await s.SubmitJob(text_job(long_prompt, max_new_tokens=16), metadata=MD)).job.job_id)
    assert done.state == S.JOB_STATE_FAILED and "context" in done.error and done.attempts == 1


async def test_cancel_mid_stream_stops_generation(net, tiny_llama) -> None:
    miner = await net.add_miner({"tiny-llama": tiny_llama})
    s = stub(net)
    job = (await s.SubmitJob(text_job(max_new_tokens=400, seed=3), metadata=MD)).job
    async for ev in s.WatchJob(coordinator_pb2.WatchJobRequest(job_id=job.job_id), metadata=MD, timeout=60):
        if ev.WhichOneof("event") == "text":
            break
    done = (await s.CancelJob(coordinator_pb2.CancelJobRequest(job_id=job.job_id), metadata=MD)).job
    assert done.state == S.JOB_STATE_CANCELLED
    await net.until(lambda: not miner.running, timeout=10)
    assert miner.completed == 0


async def test_slow_consumer_neither_stalls_the_miner_nor_loses_text(net, null_text) -> None:
    from aitbc.coordinator import WATCH_QUEUE

    first_miner = await net.add_miner({"null-text": null_text})
    first_miner.stop()  # the job waits in the queue until both watchers are attached
    await net.until(lambda: not net.core.miners)
    s = stub(net)
    job = (await s.SubmitJob(text_job(model="null-text", max_new_tokens=2000, seed=5), metadata=MD)).job
    call = s.WatchJob(coordinator_pb2.WatchJobRequest(job_id=job.job_id), metadata=MD, timeout=60)
    # a watcher inside the coordinator that reads nothing while the whole job runs
    idle = net.core.watch("alice", job.job_id)
    assert (await idle.__anext__()).state == S.JOB_STATE_QUEUED
    first = await call.read()  # the gRPC client also stops reading after the first event
    assert first.job.state == S.JOB_STATE_QUEUED
    await net.until(lambda: net.core.streams.watchers(job.job_id) == 2)
    await net.add_miner({"null-text": null_text})
    await net.until(lambda: net.core.store.get_job(job.job_id).state == S.JOB_STATE_COMPLETED, timeout=60)
    # 2000 deltas went by; the idle watcher holds at most WATCH_QUEUE small notifications
    sizes = net.core.streams.queue_sizes(job.job_id)
    assert sizes and max(sizes) <= WATCH_QUEUE
    _, data = await fetch(s, job.job_id)
    idle_text = ""
    async for ev in idle:
        if isinstance(ev, job_pb2.TextChunk):
            assert ev.offset == len(idle_text)
            idle_text += ev.text
    assert idle_text == data.decode()
    text, last = "", None
    while (ev := await call.read()) is not grpc.aio.EOF:
        if ev.WhichOneof("event") == "text":
            assert ev.text.offset == len(text)
            text += ev.text.text
        elif ev.WhichOneof("event") == "job":
            last = ev.job
    assert last.state == S.JOB_STATE_COMPLETED
    assert text == data.decode()
    assert last.generated_tokens == 2000 or last.finish_reason != "length"


async def test_miner_killed_mid_generation_requeues_and_the_text_restarts(net, tiny_llama) -> None:
    first = await net.add_miner({"tiny-llama": tiny_llama})
    s = stub(net)
    job = (await s.SubmitJob(text_job(max_new_tokens=300, seed=8, temperature=0.0), metadata=MD)).job
    call = s.WatchJob(coordinator_pb2.WatchJobRequest(job_id=job.job_id), metadata=MD, timeout=120)
    events = []

    async def read_all():
        async for ev in call:
            events.append(ev)

    reader = asyncio.create_task(read_all())
    await net.until(lambda: any(e.WhichOneof("event") == "text" for e in events), timeout=30)
    first.stop()
    second = await net.add_miner({"tiny-llama": tiny_llama})
    await asyncio.wait_for(reader, 120)
    done = [e.job for e in events if e.WhichOneof("event") == "job"][-1]
    assert done.state == S.JOB_STATE_COMPLETED and done.miner_id == second.key.address
    offsets = [e.text.offset for e in events if e.WhichOneof("event") == "text"]
    assert offsets.count(0) == 2  # the second attempt starts again at offset 0
    restart = len(offsets) - 1 - offsets[::-1].index(0)
    final = "".join(e.text.text for e in [e for e in events if e.WhichOneof("event") == "text"][restart:])
    _, data = await fetch(s, job.job_id)
    assert final == data.decode()
    assert jobs.state_name(done.state) == "COMPLETED"
