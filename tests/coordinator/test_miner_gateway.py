"""MinerService on the coordinator: registration proofs and a miner that misbehaves on its stream."""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets

import grpc
import pytest

from aitbc import crypto, jobs, receipts
from aitbc.coordinator import register_digest
from aitbc.miner.backend import null_png
from aitbc.v1 import coordinator_pb2, job_pb2, miner_pb2, miner_pb2_grpc, receipt_pb2
from tests.coordinator.test_jobs_api import MD, image_job, stub, wait_done

S = job_pb2.JobState


class RawMiner:
    """A hand-driven miner: every message is ours to forge."""

    def __init__(self, net, key: crypto.PrivateKey | None = None) -> None:
        self.net = net
        self.key = key or crypto.PrivateKey.generate()
        self.stub = miner_pb2_grpc.MinerServiceStub(net.channel())
        self.outbox: asyncio.Queue = asyncio.Queue()

    async def register(self, models=("null",), **info) -> miner_pb2.RegisterResponse:
        """GetChallenge + Register, signed with this miner's key (max_concurrency 1 unless given)."""
        ch = await self.stub.GetChallenge(miner_pb2.GetChallengeRequest())
        return await self.stub.Register(miner_pb2.RegisterRequest(
            public_key=self.key.pubkey, challenge=ch.challenge,
            signature=self.key.sign(register_digest(ch.challenge, self.key.pubkey)),
            info=miner_pb2.MinerInfo(models=list(models), **{"max_concurrency": 1, **info})))

    async def connect(self, models=("null",), **info) -> None:
        reg = await self.register(models, **info)

        async def requests():
            while True:
                msg = await self.outbox.get()
                if msg is None:
                    return
                yield msg

        self.call = self.stub.Work(requests(), metadata=(("x-miner-session", reg.session_token),))

    def send(self, **kw) -> None:
        self.outbox.put_nowait(miner_pb2.WorkRequest(**kw))

    async def read(self) -> miner_pb2.WorkResponse:
        return await asyncio.wait_for(self.call.read(), 10)

    def result_for(self, job: job_pb2.Job, png: bytes | list[bytes], *, key=None, **body_changes) -> miner_pb2.JobResult:
        """A signed version 2 result for `job` returning `png` (or several, one per image). The body is
        encoded and signed by hand (docs/receipts.md), so a forged body need not be a valid one."""
        pngs = png if isinstance(png, list) else [png]
        digests = [hashlib.sha256(p).digest() for p in pngs]
        now = jobs.now_ms()
        p = job.params.image
        fields = dict(version=2, job_id=job.job_id, provider=self.key.address, client=job.client_id, units=0,
                      unit_type="tile_steps", price_per_unit=job.price_per_unit, model=job.model,
                      prompt_hash=job.prompt_hash, started_at=now - 10, finished_at=now,
                      artifact_sha256=receipts.manifest_sha256(digests), nonce=secrets.token_hex(16), hub_id="",
                      chain_id="aitbc-devnet", gpu_ms=5, width=p.width or 64, height=p.height or 64, steps=p.steps,
                      images=len(pngs), prompt_tokens=0, generated_tokens=0)
        fields.update(body_changes)
        fields = {k: v for k, v in fields.items() if v is not None}  # None: the field is left out
        if "units" not in body_changes:  # the units the formula gives for the fields as they now are
            fields["units"] = (receipts.tile_steps(fields["width"], fields["height"], fields["steps"], fields["images"])
                               if fields["unit_type"] == "tile_steps" else fields["prompt_tokens"] + fields["generated_tokens"])
        canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
        receipt_hash = hashlib.sha256(canonical).digest()
        sig = (key or self.key).sign(crypto.domain_digest(receipts.PROVIDER_DOMAIN, receipt_hash))
        rec = receipt_pb2.Receipt(body=receipt_pb2.ReceiptBody(**fields), receipt_hash=receipt_hash.hex(),
                                  provider_signature=sig)
        arts = [job_pb2.Artifact(sha256=d.hex(), size=len(p), content_type="image/png", width=64, height=64)
                for p, d in zip(pngs, digests, strict=True)]
        return miner_pb2.JobResult(job_id=job.job_id, artifacts=arts, receipt=rec)


async def _assigned(net, miner: RawMiner) -> job_pb2.Job:
    s = stub(net)
    await s.SubmitJob(image_job(model="null", seed=1, width=64, height=64), metadata=MD)
    msg = await miner.read()
    assert msg.WhichOneof("msg") == "assignment"
    miner.send(accepted=miner_pb2.JobAccepted(job_id=msg.assignment.task.job_id))
    return msg.assignment.task


async def test_honest_raw_result_is_accepted(net) -> None:
    m = RawMiner(net)
    await m.connect()
    job = await _assigned(net, m)
    png = null_png("a red bicycle", 1, 64, 64)
    m.send(chunk=miner_pb2.ArtifactChunk(job_id=job.job_id, index=0, data=png))
    m.send(result=m.result_for(job, png))
    reply = await m.read()
    assert reply.WhichOneof("msg") == "accepted", reply
    done = await wait_done(stub(net), job.job_id)
    assert done.state == S.JOB_STATE_COMPLETED and done.receipt_hash == reply.accepted.receipt_hash


@pytest.mark.parametrize(
    ("forge", "needle"),
    [
        ("wrong_hash", "does not match its declared sha256"),
        ("wrong_hash_same_size", "does not match its declared sha256"),
        ("bad_signature", "provider signature is by"),
        ("other_provider", "receipt field provider"),
        ("other_jobs_receipt", "receipt field job_id"),
        ("wrong_client", "receipt field client"),
        ("wrong_chain", "receipt field chain_id"),
        ("inflated_units", "must be ceil(width x height / 4096) x steps x images = 20"),
        ("more_steps", "receipt field steps is 30, expected 20"),
        ("bigger_images", "receipt field width is 2048, expected 64"),
        ("more_images", "receipt field images is 8, expected 1"),
        ("inflated_gpu_ms", "receipt claims 3600000 ms of work"),
        ("version_1", "receipt field version is 1, expected 2"),
        ("not_png", "not a PNG"),
        ("self_set_price", "receipt field price_per_unit"),
        ("other_model", "receipt field model"),
        ("other_prompt", "receipt field prompt_hash"),
        ("other_hub", "receipt field hub_id"),
        ("other_unit_type", "a tokens receipt has prompt_tokens >= 1"),
        ("tokens_for_an_image", "receipt field unit_type is 'tokens', expected 'tile_steps'"),
        ("long_claimed_duration", "receipt claims"),
        ("other_manifest", "receipt field artifact_sha256"),
        ("wrong_size", "artifact 0 is 128x128; the job asked for 64x64"),
        ("padded", "bytes after its IEND chunk (padding)"),
    ],
)
async def test_forged_results_are_rejected_and_the_job_requeued(net, forge, needle) -> None:
    m = RawMiner(net)
    await m.connect()
    job = await _assigned(net, m)
    png = null_png("a red bicycle", 1, 64, 64)
    other = crypto.PrivateKey.generate()
    if forge == "wrong_hash":
        m.send(chunk=miner_pb2.ArtifactChunk(job_id=job.job_id, index=0, data=png + b"x"))
        result = m.result_for(job, png)
    elif forge == "wrong_hash_same_size":  # other bytes of the declared size: the hash alone tells
        m.send(chunk=miner_pb2.ArtifactChunk(job_id=job.job_id, index=0, data=png[:-1] + bytes([png[-1] ^ 1])))
        result = m.result_for(job, png)
    elif forge in ("not_png", "wrong_size", "padded"):
        junk = {"not_png": b"GIF89a" + png, "wrong_size": null_png("a red bicycle", 1, 128, 128),
                "padded": png + b"\0" * 100_000}[forge]
        m.send(chunk=miner_pb2.ArtifactChunk(job_id=job.job_id, index=0, data=junk))
        result = m.result_for(job, junk)
    else:
        m.send(chunk=miner_pb2.ArtifactChunk(job_id=job.job_id, index=0, data=png))
        changes = {
            "bad_signature": {"key": other},
            "other_provider": {"key": other, "provider": other.address},
            "other_jobs_receipt": {"job_id": "01" + "0" * 26},  # a result (and receipt) made for another job
            "wrong_client": {"client": "mallory"},
            "wrong_chain": {"chain_id": "another-chain"},
            "inflated_units": {"units": 10**9},
            # consistent receipts for more work than the job asked for: the coordinator's own count wins
            "more_steps": {"steps": 30},
            "bigger_images": {"width": 2048, "height": 2048},
            "more_images": {"images": 8},
            "inflated_gpu_ms": {"gpu_ms": 3_600_000},
            "version_1": {"version": 1, "unit_type": "gpu_ms", "units": 5, **dict.fromkeys(receipts.field_names(2)[15:])},
            "self_set_price": {"price_per_unit": job.price_per_unit + 10**6},
            "other_model": {"model": "tiny-sd"},
            "other_prompt": {"prompt_hash": "00" * 32},
            "other_hub": {"hub_id": "another-hub"},
            "other_unit_type": {"unit_type": "tokens"},
            # a well-formed text receipt for an image job
            "tokens_for_an_image": {"unit_type": "tokens", "width": 0, "height": 0, "steps": 0, "images": 0,
                                    "prompt_tokens": 5},
            # an hour of work claimed for a job held for milliseconds (units within that duration)
            "long_claimed_duration": {"started_at": jobs.now_ms() - 3_600_000},
            "other_manifest": {"artifact_sha256": "00" * 32},  # the receipt commits to other outputs
        }[forge]
        result = m.result_for(job, png, **changes)
    m.send(result=result)
    reply = await m.read()
    assert reply.WhichOneof("msg") == "rejected"
    assert needle in reply.rejected.reason
    current = net.core.machine.job(job.job_id)
    assert current.state == S.JOB_STATE_QUEUED and needle in current.wait_reason and not current.error
    assert not net.core.store.get_job(job.job_id).receipt_hash


async def test_a_watcher_sees_a_miners_progress_within_its_total_and_never_going_back(net) -> None:
    m = RawMiner(net)
    await m.connect()
    job = await _assigned(net, m)
    s = stub(net)
    watch = s.WatchJob(coordinator_pb2.WatchJobRequest(job_id=job.job_id), metadata=MD, timeout=30)
    assert (await watch.read()).WhichOneof("event") == "job"  # the snapshot first
    m.send(progress=job_pb2.JobProgress(job_id=job.job_id, step=10, total_steps=20))
    m.send(progress=job_pb2.JobProgress(job_id=job.job_id, step=5, total_steps=20))  # backwards: not shown
    m.send(progress=job_pb2.JobProgress(job_id=job.job_id, step=30, total_steps=25))  # past its total: refused
    reply = await m.read()
    assert reply.WhichOneof("msg") == "rejected" and "between 0 and total_steps" in reply.rejected.reason
    m.send(progress=job_pb2.JobProgress(job_id=job.job_id, step=900, total_steps=1000))  # its scheduler's count
    png = null_png("a red bicycle", 1, 64, 64)
    m.send(chunk=miner_pb2.ArtifactChunk(job_id=job.job_id, index=0, data=png))
    m.send(result=m.result_for(job, png))
    seen = []
    for _ in range(20):  # bounded: the events of one job
        ev = await watch.read()
        if ev.WhichOneof("event") == "progress":
            seen.append((ev.progress.step, ev.progress.total_steps))
        elif ev.job.state == S.JOB_STATE_COMPLETED:
            break
    else:
        pytest.fail("the job did not complete")
    assert seen == [(10, 20), (900, 1000)]


async def test_reports_on_jobs_not_assigned_to_the_miner_are_refused(net) -> None:
    a, b = RawMiner(net), RawMiner(net)
    await a.connect()
    job = await _assigned(net, a)
    await b.connect()
    png = null_png("a red bicycle", 1, 64, 64)
    b.send(progress=job_pb2.JobProgress(job_id=job.job_id, step=1, total_steps=2))
    reply = await b.read()
    assert reply.WhichOneof("msg") == "rejected" and "not assigned to miner" in reply.rejected.reason
    b.send(result=b.result_for(job, png))
    reply = await b.read()
    assert "not assigned to miner" in reply.rejected.reason
    # the rightful miner is undisturbed
    assert net.core.machine.job(job.job_id).miner_id == a.key.address


async def test_registration_needs_a_fresh_challenge_signed_by_the_key(net) -> None:
    m = RawMiner(net)
    ch = await m.stub.GetChallenge(miner_pb2.GetChallengeRequest())
    other = crypto.PrivateKey.generate()
    info = miner_pb2.MinerInfo(models=["null"])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await m.stub.Register(miner_pb2.RegisterRequest(public_key=m.key.pubkey, challenge=ch.challenge,
                                                        signature=other.sign(register_digest(ch.challenge, m.key.pubkey)), info=info))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # the challenge was consumed by the failed attempt: one use only
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await m.stub.Register(miner_pb2.RegisterRequest(public_key=m.key.pubkey, challenge=ch.challenge,
                                                        signature=m.key.sign(register_digest(ch.challenge, m.key.pubkey)), info=info))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "challenge" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        call = m.stub.Work(iter(()), metadata=(("x-miner-session", "forged"),))
        await call.read()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_garbage_bytes_on_the_work_stream_end_only_that_session(net, null_backend) -> None:
    m = RawMiner(net)
    await m.connect()
    job = await _assigned(net, m)
    # a raw call whose request bytes are not a WorkRequest
    ch = net.channel()
    garbage = ch.stream_stream("/aitbc.v1.MinerService/Work", request_serializer=lambda b: b,
                               response_deserializer=lambda b: b)
    reg_key = crypto.PrivateKey.generate()
    c = await m.stub.GetChallenge(miner_pb2.GetChallengeRequest())
    reg = await m.stub.Register(miner_pb2.RegisterRequest(
        public_key=reg_key.pubkey, challenge=c.challenge,
        signature=reg_key.sign(register_digest(c.challenge, reg_key.pubkey)), info=miner_pb2.MinerInfo(models=["null"])))
    call = garbage(iter([b"\xff\xfe garbage \x00" * 10]), metadata=(("x-miner-session", reg.session_token),))
    with pytest.raises(grpc.aio.AioRpcError):
        async for _ in call:
            pass
    # the coordinator still works: the honest raw miner's job is intact, a new miner gets new work
    assert net.core.machine.job(job.job_id).miner_id == m.key.address
    await net.add_miner({"null": null_backend})
    s = stub(net)
    done = await wait_done(s, (await s.SubmitJob(image_job(model="null"), metadata=MD)).job.job_id)
    assert done.state == S.JOB_STATE_COMPLETED


async def test_a_miner_failing_permanently_fails_the_job_with_its_reason(net) -> None:
    m = RawMiner(net)
    await m.connect()
    job = await _assigned(net, m)
    m.send(failed=miner_pb2.JobFailed(job_id=job.job_id, reason="model cannot draw 64x64", permanent=True))
    done = await wait_done(stub(net), job.job_id)
    assert done.state == S.JOB_STATE_FAILED and "model cannot draw 64x64" in done.error


async def test_bounded_attempts_then_failed_with_reason(network_factory) -> None:
    net = await network_factory(max_attempts=2)
    m = RawMiner(net)
    await m.connect()
    job = await _assigned(net, m)
    m.send(failed=miner_pb2.JobFailed(job_id=job.job_id, reason="CUDA out of memory"))
    again = await m.read()
    assert again.assignment.task.job_id == job.job_id and again.assignment.task.attempt == 2
    m.send(failed=miner_pb2.JobFailed(job_id=job.job_id, reason="CUDA out of memory"))
    done = await wait_done(stub(net), job.job_id)
    assert done.state == S.JOB_STATE_FAILED
    assert "gave up after 2 attempts" in done.error and "CUDA out of memory" in done.error


async def test_health_per_service_and_reflection(net) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    ch = net.channel()
    h = health_pb2_grpc.HealthStub(ch)
    for name in ("", "aitbc.v1.CoordinatorService", "aitbc.v1.MinerService"):
        resp = await h.Check(health_pb2.HealthCheckRequest(service=name))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await h.Check(health_pb2.HealthCheckRequest(service="aitbc.v1.Nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    r = reflection_pb2_grpc.ServerReflectionStub(ch)
    call = r.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = set()
    async for resp in call:
        names = {s.name for s in resp.list_services_response.service}
    assert {"aitbc.v1.CoordinatorService", "aitbc.v1.MinerService", "grpc.health.v1.Health"} <= names
    assert "aitbc.v1.MinerOpsService" not in names  # served by miner daemons, not here
    # a client request for a job list of the coordinator: unauthenticated calls stay refused
    with pytest.raises(grpc.aio.AioRpcError):
        await stub(net).ListReceipts(coordinator_pb2.ListReceiptsRequest())
