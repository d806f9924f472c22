"""CoordinatorService over a real grpc.aio server with real miner daemons (tiny pipeline / null)."""

from __future__ import annotations

import asyncio
import hashlib

import grpc
import pytest

from aitbc import crypto, jobs, receipts
from aitbc.miner.backend import ImageRequest
from aitbc.v1 import coordinator_pb2, coordinator_pb2_grpc, job_pb2
from aitbc.wire import receipt_from_proto
from tests.conftest import API_KEY, OTHER_KEY

MD = (("x-api-key", API_KEY),)
S = job_pb2.JobState


def stub(net) -> coordinator_pb2_grpc.CoordinatorServiceStub:
    return coordinator_pb2_grpc.CoordinatorServiceStub(net.channel())


def image_job(prompt: str = "a red bicycle", **kw) -> coordinator_pb2.SubmitJobRequest:
    model = kw.pop("model", "tiny-sd")
    request_id = kw.pop("request_id", "")
    return coordinator_pb2.SubmitJobRequest(model=model, request_id=request_id,
                                            params=job_pb2.JobParams(image=job_pb2.ImageParams(prompt=prompt, **kw)))


async def wait_done(s, job_id: str, md=MD) -> job_pb2.Job:
    job = None
    async for ev in s.WatchJob(coordinator_pb2.WatchJobRequest(job_id=job_id), metadata=md, timeout=120):
        if ev.WhichOneof("event") == "job":
            job = ev.job
    assert job is not None and job.state in jobs.TERMINAL
    return job


async def fetch(s, job_id: str, index: int = 0, md=MD) -> tuple[job_pb2.Artifact, bytes]:
    art, parts = None, []
    async for chunk in s.GetJobResult(coordinator_pb2.GetJobResultRequest(job_id=job_id, index=index), metadata=md):
        if chunk.HasField("artifact"):
            art = chunk.artifact
        parts.append(chunk.data)
    return art, b"".join(parts)


async def test_fixed_seed_image_matches_direct_pipeline_and_receipt_verifies(net, tiny_backend) -> None:
    await net.add_miner({"tiny-sd": tiny_backend}, price=3)
    s = stub(net)
    job = (await s.SubmitJob(image_job("a futuristic city", steps=4, seed=7), metadata=MD)).job
    assert job.state in (S.JOB_STATE_QUEUED, S.JOB_STATE_ASSIGNED) and job.params.image.seed == 7
    steps_seen = []
    states = []
    async for ev in s.WatchJob(coordinator_pb2.WatchJobRequest(job_id=job.job_id), metadata=MD, timeout=120):
        if ev.WhichOneof("event") == "progress":
            steps_seen.append((ev.progress.step, ev.progress.total_steps))
        else:
            states.append(ev.job.state)
            job = ev.job
    assert states[-1] == S.JOB_STATE_COMPLETED, job.error
    assert S.JOB_STATE_RUNNING in states
    assert steps_seen == [(i, 4) for i in range(1, 5)]
    art, png = await fetch(s, job.job_id)
    # the same request straight through the backend, in this process: identical bytes
    direct = tiny_backend.generate(ImageRequest("a futuristic city", "", 4, 7.5, 0, 0, 1, 7), lambda *_: None,
                                   __import__("threading").Event())
    assert hashlib.sha256(png).hexdigest() == hashlib.sha256(direct.pngs[0]).hexdigest() == art.sha256
    rec = (await s.GetReceipt(coordinator_pb2.GetReceiptRequest(job_id=job.job_id), metadata=MD)).receipt
    signed = receipt_from_proto(rec)
    receipts.verify_receipt(signed, attesters=frozenset({net.core.key.address}))
    assert signed.body.provider == net.miners[0].key.address
    b = signed.body  # tiny-sd's native 64x64 is one tile: 4 steps x 1 image = 4 units, whatever the time taken
    assert b.price_per_unit == 3 and b.unit_type == "tile_steps" and (b.width, b.height, b.steps, b.images) == (64, 64, 4, 1)
    assert b.units == 4 and b.gpu_ms >= 1
    assert signed.body.artifact_sha256 == receipts.manifest_sha256([hashlib.sha256(png).digest()])
    assert signed.body.prompt_hash == hashlib.sha256(b"a futuristic city").hexdigest()
    listed = (await s.ListReceipts(coordinator_pb2.ListReceiptsRequest(), metadata=MD)).receipts
    assert [r.receipt_hash for r in listed] == [rec.receipt_hash]


async def test_several_images_come_back_in_order(net, null_backend) -> None:
    await net.add_miner({"null": null_backend})
    s = stub(net)
    job = (await s.SubmitJob(image_job("three cats", model="null", images=3, seed=1, width=64, height=64), metadata=MD)).job
    job = await wait_done(s, job.job_id)
    assert job.state == S.JOB_STATE_COMPLETED and len(job.artifacts) == 3
    digests = []
    for i in range(3):
        art, data = await fetch(s, job.job_id, i)
        assert hashlib.sha256(data).hexdigest() == art.sha256 == job.artifacts[i].sha256
        digests.append(hashlib.sha256(data).digest())
    assert len(set(digests)) == 3
    assert job.receipt.body.artifact_sha256 == receipts.manifest_sha256(digests)


@pytest.mark.parametrize(
    ("request_", "code", "needle"),
    [
        (image_job(""), grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty"),
        (image_job("x" * 2001), grpc.StatusCode.INVALID_ARGUMENT, "limit is 2000"),
        (image_job(steps=151), grpc.StatusCode.INVALID_ARGUMENT, "steps must be between 1 and 150"),
        (image_job(guidance_scale=31), grpc.StatusCode.INVALID_ARGUMENT, "guidance_scale"),
        (image_job(width=65), grpc.StatusCode.INVALID_ARGUMENT, "multiple of 8"),
        (image_job(height=4096), grpc.StatusCode.INVALID_ARGUMENT, "height"),
        (image_job(images=9), grpc.StatusCode.INVALID_ARGUMENT, "images must be between 1 and 8"),
        (image_job(model="no-such-model"), grpc.StatusCode.FAILED_PRECONDITION, "no miner serves model 'no-such-model'"),
        (image_job(model="bad model!"), grpc.StatusCode.INVALID_ARGUMENT, "model"),
        (coordinator_pb2.SubmitJobRequest(model="tiny-sd"), grpc.StatusCode.INVALID_ARGUMENT, "params must set"),
    ],
)
async def test_bad_submissions_get_clear_statuses_and_queue_nothing(net, null_backend, request_, code, needle) -> None:
    await net.add_miner({"null": null_backend, "tiny-sd": null_backend})
    s = stub(net)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.SubmitJob(request_, metadata=MD)
    assert err.value.code() == code
    assert needle in err.value.details()
    assert not net.core.machine.records and not net.core.store.active_jobs()


async def test_auth_rate_limit_and_ownership(network_factory, null_backend) -> None:
    from aitbc.config import ClientKey

    net = await network_factory()
    await net.add_miner({"null": null_backend})
    s = stub(net)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.GetJob(coordinator_pb2.GetJobRequest(job_id="0" * 28))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "x-api-key" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.GetJob(coordinator_pb2.GetJobRequest(job_id="0" * 28), metadata=(("x-api-key", "nope"),))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    job = await wait_done(s, (await s.SubmitJob(image_job(model="null", seed=1), metadata=MD)).job.job_id)
    other = (("x-api-key", OTHER_KEY),)
    for call in (s.GetJob(coordinator_pb2.GetJobRequest(job_id=job.job_id), metadata=other),
                 s.GetReceipt(coordinator_pb2.GetReceiptRequest(job_id=job.job_id), metadata=other)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await fetch(s, job.job_id, md=other)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # rate limit: a tiny bucket for bob
    net.core.clients[[k for k, c in net.core.clients.items() if c.id == "bob"][0]] = ClientKey("bob", "", rate_per_s=1, burst=2)
    codes = []
    for _ in range(4):
        try:
            await s.GetJob(coordinator_pb2.GetJobRequest(job_id="0" * 28), metadata=other)
        except grpc.aio.AioRpcError as exc:
            codes.append(exc.code())
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                assert "retry in" in exc.details()
                assert dict(exc.trailing_metadata()).get("retry-after-ms")
    assert codes[:2] == [grpc.StatusCode.NOT_FOUND] * 2
    assert codes[2:] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2


async def test_unknown_and_malformed_ids_and_cancel_after_finish(net, null_backend) -> None:
    await net.add_miner({"null": null_backend})
    s = stub(net)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.GetJob(coordinator_pb2.GetJobRequest(job_id="f" * 28), metadata=MD)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.GetJob(coordinator_pb2.GetJobRequest(job_id="../etc"), metadata=MD)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    job = await wait_done(s, (await s.SubmitJob(image_job(model="null"), metadata=MD)).job.job_id)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.CancelJob(coordinator_pb2.CancelJobRequest(job_id=job.job_id), metadata=MD)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "already COMPLETED" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await fetch(s, job.job_id, index=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_request_id_makes_submit_idempotent(net, null_backend) -> None:
    await net.add_miner({"null": null_backend})
    s = stub(net)
    a = (await s.SubmitJob(image_job(model="null", request_id="order-42"), metadata=MD)).job
    b = (await s.SubmitJob(image_job(model="null", request_id="order-42"), metadata=MD)).job
    assert a.job_id == b.job_id
    again = image_job(model="null", request_id="order-42", seed=a.params.image.seed)  # the seed it was given
    assert (await s.SubmitJob(again, metadata=MD)).job.job_id == a.job_id
    # the same request_id with another prompt is not silently the old job (the old PNG)
    for other in (image_job("a blue bicycle", model="null", request_id="order-42"),
                  image_job(model="null", request_id="order-42", steps=7),
                  image_job(model="null", request_id="order-42", seed=a.params.image.seed + 1)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.SubmitJob(other, metadata=MD)
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert f"request_id 'order-42' was used for job {a.job_id}" in err.value.details()
    other_client = (await s.SubmitJob(image_job("a blue bicycle", model="null", request_id="order-42"),
                                      metadata=(("x-api-key", OTHER_KEY),))).job
    assert other_client.job_id != a.job_id  # request ids are per client


async def test_cancel_running_job_stops_the_miner(net, tiny_backend) -> None:
    miner = await net.add_miner({"tiny-sd": tiny_backend})
    s = stub(net)
    job = (await s.SubmitJob(image_job(steps=150, seed=3), metadata=MD)).job
    async for ev in s.WatchJob(coordinator_pb2.WatchJobRequest(job_id=job.job_id), metadata=MD, timeout=60):
        if ev.WhichOneof("event") == "progress":
            break
    cancelled = (await s.CancelJob(coordinator_pb2.CancelJobRequest(job_id=job.job_id, reason="changed my mind"), metadata=MD)).job
    assert cancelled.state == S.JOB_STATE_CANCELLED and "changed my mind" in cancelled.error
    await net.until(lambda: not miner.running, timeout=20)  # the miner's generation stopped
    assert miner.completed == 0
    # the miner is free again and serves the next job
    nxt = await wait_done(s, (await s.SubmitJob(image_job(steps=2, seed=1), metadata=MD)).job.job_id)
    assert nxt.state == S.JOB_STATE_COMPLETED


async def test_miner_lost_mid_job_the_job_finishes_on_another(net, tiny_backend) -> None:
    first = await net.add_miner({"tiny-sd": tiny_backend})
    s = stub(net)
    job = (await s.SubmitJob(image_job(steps=60, seed=5), metadata=MD)).job
    await net.until(lambda: first.running)
    first.stop()  # its stream ends: the coordinator requeues the job at once
    await net.until(lambda: net.core.machine.job(job.job_id).state == S.JOB_STATE_QUEUED, timeout=20)
    second = await net.add_miner({"tiny-sd": tiny_backend})
    done = await wait_done(s, job.job_id)
    assert done.state == S.JOB_STATE_COMPLETED
    assert done.miner_id == second.key.address and done.attempts == 2


async def test_silent_miner_loses_its_job_after_the_heartbeat_timeout(network_factory, null_backend) -> None:
    from aitbc.coordinator import register_digest
    from aitbc.v1 import miner_pb2, miner_pb2_grpc

    net = await network_factory(heartbeat_timeout_s=1.0)
    ms = miner_pb2_grpc.MinerServiceStub(net.channel())
    key = crypto.PrivateKey.generate()
    ch = await ms.GetChallenge(miner_pb2.GetChallengeRequest())
    reg = await ms.Register(miner_pb2.RegisterRequest(
        public_key=key.pubkey, challenge=ch.challenge, signature=key.sign(register_digest(ch.challenge, key.pubkey)),
        info=miner_pb2.MinerInfo(models=["null"], max_concurrency=1)))
    silent: asyncio.Queue = asyncio.Queue()

    async def nothing():
        await silent.get()
        yield  # pragma: no cover

    call = ms.Work(nothing(), metadata=(("x-miner-session", reg.session_token),))
    s = stub(net)
    job = (await s.SubmitJob(image_job(model="null"), metadata=MD)).job
    first = await call.read()
    assert first.assignment.task.job_id == job.job_id
    honest = await net.add_miner({"null": null_backend})
    done = await wait_done(s, job.job_id)
    assert done.state == S.JOB_STATE_COMPLETED and done.miner_id == honest.key.address
    assert done.attempts == 2
    call.cancel()


async def test_coordinator_restart_with_jobs_in_flight(net, tiny_backend) -> None:
    miner = await net.add_miner({"tiny-sd": tiny_backend})
    s = stub(net)
    running = (await s.SubmitJob(image_job(steps=40, seed=9), metadata=MD)).job
    queued = (await s.SubmitJob(image_job(steps=2, seed=10), metadata=MD)).job
    await net.until(lambda: miner.running)
    await net.restart_coordinator()
    s = stub(net)
    # both jobs survived and were queued again; the miner reconnects by itself and finishes them
    for job_id in (running.job_id, queued.job_id):
        assert (await s.GetJob(coordinator_pb2.GetJobRequest(job_id=job_id), metadata=MD)).job.state in jobs.ACTIVE
    for job_id in (running.job_id, queued.job_id):
        done = await wait_done(s, job_id)
        assert done.state == S.JOB_STATE_COMPLETED, done.error
    # results and receipts persist across another restart
    await net.restart_coordinator()
    s = stub(net)
    art, data = await fetch(s, running.job_id)
    assert hashlib.sha256(data).hexdigest() == art.sha256
    assert len((await s.ListReceipts(coordinator_pb2.ListReceiptsRequest(), metadata=MD)).receipts) == 2


async def test_client_disconnecting_mid_watch_loses_nothing(net, tiny_backend) -> None:
    await net.add_miner({"tiny-sd": tiny_backend})
    s = stub(net)
    job = (await s.SubmitJob(image_job(steps=8, seed=2), metadata=MD)).job
    call = s.WatchJob(coordinator_pb2.WatchJobRequest(job_id=job.job_id), metadata=MD)
    await call.read()
    call.cancel()
    done = await wait_done(s, job.job_id)
    assert done.state == S.JOB_STATE_COMPLETED
    await net.until(lambda: not net.core.streams.watching())


async def test_large_artifact_is_chunked_under_the_message_limit(net) -> None:
    big = bytes(range(256)) * (5 * 4096)  # 5 MiB
    sha = hashlib.sha256(big).hexdigest()
    job = job_pb2.Job(job_id=jobs.new_job_id(), model="tiny-sd", client_id="alice", state=S.JOB_STATE_COMPLETED,
                      artifacts=[job_pb2.Artifact(sha256=sha, size=len(big), content_type="image/png")])
    net.core.store.write([job], artifacts=[(sha, big)])
    s = stub(net)
    sizes = []
    data = b""
    async for chunk in s.GetJobResult(coordinator_pb2.GetJobResultRequest(job_id=job.job_id), metadata=MD):
        sizes.append(len(chunk.data))
        assert chunk.offset == len(data)
        data += chunk.data
    assert data == big and len(sizes) == 5 and max(sizes) <= 1024 * 1024


async def test_generate_image_waits_and_returns_the_png(net, null_backend) -> None:
    await net.add_miner({"null": null_backend})
    s = stub(net)
    resp = await s.GenerateImage(coordinator_pb2.GenerateImageRequest(
        model="null", params=job_pb2.ImageParams(prompt="a lighthouse", seed=4)), metadata=MD)
    assert resp.job.state == S.JOB_STATE_COMPLETED
    assert hashlib.sha256(resp.image).hexdigest() == resp.job.artifacts[0].sha256
    assert resp.receipt.receipt_hash == resp.job.receipt_hash
