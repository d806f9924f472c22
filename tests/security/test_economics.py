"""Economic attacks by an anonymous miner (THREAT-MODEL.md), over real gRPC with a hand-written
miner and a fresh key: inflated token counts, a self-set price above the ceiling or the client's
cap, permanent-failure spam, and re-declaring what a model is. Each gets a clear status or a
recorded penalty, and no client job is lost.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from aitbc.config import ModelConfig
from aitbc.coordinator.checks import SPECIAL_TOKENS
from aitbc.v1 import coordinator_pb2, job_pb2, miner_pb2
from tests.coordinator.test_jobs_api import MD, stub, wait_done
from tests.coordinator.test_miner_gateway import RawMiner

S = job_pb2.JobState
TEXT_SPEC = miner_pb2.ModelSpec(name="null-text", kind=job_pb2.MODEL_KIND_TEXT, context_length=4096)


def image_req(**kw: Any) -> coordinator_pb2.SubmitJobRequest:
    return coordinator_pb2.SubmitJobRequest(model="null", params=job_pb2.JobParams(
        image=job_pb2.ImageParams(prompt="a red bicycle", steps=2, width=64, height=64, **kw)))


def text_req(prompt: str = "hi", **kw: Any) -> coordinator_pb2.SubmitJobRequest:
    return coordinator_pb2.SubmitJobRequest(model="null-text", params=job_pb2.JobParams(
        text=job_pb2.TextParams(prompt=prompt, max_new_tokens=16, seed=1, **kw)))


async def register_status(miner: RawMiner, models: tuple[str, ...], **info: Any) -> tuple[grpc.StatusCode, str]:
    try:
        await miner.register(models, **info)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def text_result(miner: RawMiner, task: miner_pb2.Task, text: str, prompt_tokens: int,
                generated: int, units: int | None = None, receipt_prompt: int | None = None,
                **receipt_changes: Any) -> miner_pb2.JobResult:
    """`receipt_prompt`: the receipt claims this many prompt tokens (units to match) while the
    result beside it says `prompt_tokens`; `receipt_changes`: other receipt fields, forged."""
    data = text.encode()
    signed = prompt_tokens if receipt_prompt is None else receipt_prompt
    res = miner.result_for(task, data, units=signed + generated if units is None else units, unit_type="tokens",
                           width=0, height=0, steps=0, images=0, prompt_tokens=signed, generated_tokens=generated,
                           **receipt_changes)
    res.artifacts[0].content_type = "text/plain; charset=utf-8"
    res.prompt_tokens, res.generated_tokens, res.finish_reason = prompt_tokens, generated, "length"
    return res


@pytest.mark.parametrize(("prompt_tokens", "generated", "needle"), [
    (2**32 - 1, 3, "more than any tokenizer makes of this prompt"),  # the 4-billion-token prompt
    (3, 16, "more than the streamed text can hold"),  # 16 tokens claimed for 3 bytes of text
])
async def test_inflated_token_counts_are_rejected_and_the_job_goes_to_an_honest_miner(
        net: Any, null_text: Any, prompt_tokens: int, generated: int, needle: str) -> None:
    liar = RawMiner(net)
    await liar.connect(models=("null-text",), model_specs=[TEXT_SPEC])
    s = stub(net)
    job = (await s.SubmitJob(text_req(), metadata=MD)).job
    task = (await liar.read()).assignment.task
    liar.send(accepted=miner_pb2.JobAccepted(job_id=task.job_id))
    liar.send(text=job_pb2.TextChunk(job_id=task.job_id, text="abc"))
    liar.send(chunk=miner_pb2.ArtifactChunk(job_id=task.job_id, index=0, data=b"abc"))
    liar.send(result=text_result(liar, task, "abc", prompt_tokens, generated))
    reply = await liar.read()
    assert reply.WhichOneof("msg") == "rejected" and needle in reply.rejected.reason, reply
    await net.add_miner({"null-text": null_text})
    done = await wait_done(s, job.job_id)
    assert done.state == S.JOB_STATE_COMPLETED and done.miner_id != liar.key.address
    assert done.units == done.prompt_tokens + done.generated_tokens <= len("hi") + 8 + 16
    assert net.core.book.snapshot(liar.key.address).failures == 1


async def streamed_text_result(net: Any, streamed: str, uploaded: str, prompt_tokens: int, generated: int,
                               units: int | None = None, receipt_prompt: int | None = None, **receipt_changes: Any,
                               ) -> tuple[RawMiner, job_pb2.Job, miner_pb2.WorkResponse]:
    """A fresh text miner takes a job, streams `streamed`, uploads `uploaded` and claims the counts."""
    m = RawMiner(net)
    await m.connect(models=("null-text",), model_specs=[TEXT_SPEC])
    job = (await stub(net).SubmitJob(text_req(), metadata=MD)).job
    task = (await m.read()).assignment.task
    m.send(text=job_pb2.TextChunk(job_id=task.job_id, text=streamed))
    m.send(chunk=miner_pb2.ArtifactChunk(job_id=task.job_id, index=0, data=uploaded.encode()))
    m.send(result=text_result(m, task, uploaded, prompt_tokens, generated, units, receipt_prompt, **receipt_changes))
    return m, job, await m.read()


@pytest.mark.parametrize(("uploaded", "units", "receipt_prompt", "needle"), [
    ("abc", 1000, None, "receipt units 1000 must be prompt_tokens + generated_tokens (3 + 3)"),
    ("abd", None, None, "the final text differs from the text streamed during generation"),
    # honest counts in the result (they pass the bounds), a million in the signed receipt: what is paid
    ("abc", None, 10**6, "receipt field prompt_tokens is 1000000, expected 3"),
])
async def test_a_text_result_must_be_what_was_streamed_and_counted(net: Any, uploaded: str, units: int | None,
                                                                   receipt_prompt: int | None, needle: str) -> None:
    m, job, reply = await streamed_text_result(net, "abc", uploaded, 3, 3, units, receipt_prompt)
    assert reply.WhichOneof("msg") == "rejected" and needle in reply.rejected.reason, reply
    assert net.core.machine.job(job.job_id).state == S.JOB_STATE_QUEUED


@pytest.mark.parametrize(("changes", "needle"), [
    ({"price_per_unit": 10**6}, "receipt field price_per_unit is 1000000"),
    ({"client": "mallory"}, "receipt field client is 'mallory'"),
    ({"job_id": "01" + "0" * 26}, "receipt field job_id"),
    ({"chain_id": "another-chain"}, "receipt field chain_id is 'another-chain'"),
    ({"model": "null"}, "receipt field model is 'null'"),
    ({"artifact_sha256": "00" * 32}, "receipt field artifact_sha256"),
], ids=["price", "client", "job_id", "chain_id", "model", "manifest"])
async def test_a_text_receipt_gets_every_field_check_an_image_receipt_does(net: Any, changes: dict,
                                                                            needle: str) -> None:
    """Honest token counts beside one forged field: the text path checks the same fields as the image
    path (the forged-result test in test_miner_gateway covers images only), not the counts alone."""
    _, job, reply = await streamed_text_result(net, "abc", "abc", 2 + 1, 3, **changes)
    assert reply.WhichOneof("msg") == "rejected" and needle in reply.rejected.reason, reply
    assert net.core.machine.job(job.job_id).state == S.JOB_STATE_QUEUED


@pytest.mark.parametrize("prompt_tokens", [2 + 1, 1, len("hi") + SPECIAL_TOKENS],
                         ids=["hi and BOS", "one token", "at the bound"])
async def test_an_honest_token_count_is_accepted(net: Any, prompt_tokens: int) -> None:
    """One token per byte and a BOS, or any count up to the bound inclusive (docs/receipts.md, "Text units")."""
    _, job, reply = await streamed_text_result(net, "abc", "abc", prompt_tokens, 3)
    assert reply.WhichOneof("msg") == "accepted"
    assert (await wait_done(stub(net), job.job_id)).units == prompt_tokens + 3


async def test_a_price_above_the_operators_ceiling_is_refused_at_register(network_factory: Any) -> None:
    net = await network_factory(models=[ModelConfig("null", "image", max_price_per_unit=5)])
    greedy = RawMiner(net)
    code, details = await register_status(greedy, ("null",), price_per_unit=10**12)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "price_per_unit 1000000000000 is above this coordinator's ceiling for model 'null' (5" in details
    other = RawMiner(net)  # a model without its own ceiling gets the default (1000)
    code, details = await register_status(other, ("null-x",), price_per_unit=1001)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "(1000;" in details
    assert (await register_status(RawMiner(net), ("null",), price_per_unit=5))[0] == grpc.StatusCode.OK


async def test_no_job_goes_above_the_clients_cap_and_an_uncapped_job_gets_the_ceiling(network_factory: Any) -> None:
    net = await network_factory(models=[ModelConfig("null", "image", max_price_per_unit=50)])
    dear = RawMiner(net)
    await dear.connect(price_per_unit=40)
    s = stub(net)
    req = image_req(seed=1)
    req.max_price_per_unit = 10
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.SubmitJob(req, metadata=MD)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "above your max price 10" in err.value.details()
    req.max_price_per_unit = 10**9  # a client cap above the ceiling is lowered to it
    job = (await s.SubmitJob(req, metadata=MD)).job
    assert job.max_price_per_unit == 50
    assert (await s.SubmitJob(image_req(seed=2), metadata=MD)).job.max_price_per_unit == 50
    task = (await dear.read()).assignment.task
    assert task.price_per_unit == 40


async def test_permanent_failure_spam_from_a_cheap_fresh_key_fails_no_client_job(net: Any, null_backend: Any) -> None:
    spammer = RawMiner(net)
    await spammer.connect(price_per_unit=0, max_concurrency=64)  # free: it wins matching
    await net.add_miner({"null": null_backend}, price=1)
    s = stub(net)
    ids = [(await s.SubmitJob(image_req(seed=i), metadata=MD)).job.job_id for i in range(6)]

    async def spam() -> None:
        while True:
            msg = await spammer.call.read()
            if msg is grpc.aio.EOF:
                return
            if msg.WhichOneof("msg") == "assignment":
                spammer.send(failed=miner_pb2.JobFailed(job_id=msg.assignment.task.job_id,
                                                        reason="model cannot draw this", permanent=True))

    task = asyncio.create_task(spam())
    try:
        done = [await wait_done(s, j) for j in ids]
    finally:
        task.cancel()
    assert [d.state for d in done] == [S.JOB_STATE_COMPLETED] * 6
    rec = net.core.book.snapshot(spammer.key.address)
    assert rec.failures >= 1 and rec.reputation < net.core.book.policy.initial
    honest = net.core.book.snapshot(net.miners[0].key.address)
    assert honest.failures == 0 and honest.jobs_served == 6


async def test_a_registration_cannot_change_what_a_model_is(net: Any, null_backend: Any) -> None:
    await net.add_miner({"null": null_backend})  # learns "null" as an image model
    hijacker = RawMiner(net)
    code, details = await register_status(
        hijacker, ("null",), model_specs=[miner_pb2.ModelSpec(name="null", kind=job_pb2.MODEL_KIND_TEXT)])
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "model 'null' is a image model on this coordinator" in details and "declares it as text" in details
    done = await wait_done(stub(net), (await stub(net).SubmitJob(image_req(seed=3), metadata=MD)).job.job_id)
    assert done.state == S.JOB_STATE_COMPLETED
    await net.restart_coordinator()  # what was learned survives a restart
    code, _ = await register_status(
        RawMiner(net), ("null",), model_specs=[miner_pb2.ModelSpec(name="null", kind=job_pb2.MODEL_KIND_TEXT)])
    assert code == grpc.StatusCode.FAILED_PRECONDITION


async def test_the_operators_model_list_fixes_kinds_and_can_close_the_door(network_factory: Any) -> None:
    net = await network_factory(models=[ModelConfig("null-text", "text")], allow_new_models=False)
    first = RawMiner(net)  # the very first registration cannot turn a text model into an image model
    code, details = await register_status(first, ("null-text",))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "set by coordinator.toml" in details
    code, details = await register_status(RawMiner(net), ("something-else",))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "allow_new_models = false" in details
    assert (await register_status(RawMiner(net), ("null-text",), model_specs=[TEXT_SPEC]))[0] == grpc.StatusCode.OK




async def test_a_job_at_native_size_is_paid_for_the_models_size_not_the_miners(net: Any, null_backend: Any) -> None:
    """A job that leaves width and height at 0 gets the model's native size when it is submitted (the
    first miner declared 64), so a miner cannot make (and be paid for) 2048x2048 images instead; one
    that declares another native size for the model is refused at Register."""
    await net.add_miner({"null": null_backend})  # the daemon declares null's native size: 64
    s = stub(net)
    req = coordinator_pb2.SubmitJobRequest(model="null", params=job_pb2.JobParams(
        image=job_pb2.ImageParams(prompt="a red bicycle", steps=3, seed=1)))
    job = (await s.SubmitJob(req, metadata=MD)).job
    assert (job.params.image.width, job.params.image.height) == (64, 64)
    again = (await s.SubmitJob(req, metadata=MD)).job  # the same request resolves the same way
    assert again.params.image == job.params.image
    done = await wait_done(s, job.job_id)
    assert done.state == S.JOB_STATE_COMPLETED and done.unit_type == "tile_steps" and done.units == 3  # 1 tile x 3 steps
    code, details = await register_status(RawMiner(net), ("null",), model_specs=[
        miner_pb2.ModelSpec(name="null", kind=job_pb2.MODEL_KIND_IMAGE, native_size=512)])
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "makes 64x64 images on this coordinator" in details and "declares 512x512" in details


async def test_the_operators_native_size_wins_and_a_retried_request_matches(network_factory: Any) -> None:
    net = await network_factory(models=[ModelConfig("null", "image", native_size=128)])
    s = stub(net)
    code, details = await register_status(RawMiner(net), ("null",), model_specs=[
        miner_pb2.ModelSpec(name="null", kind=job_pb2.MODEL_KIND_IMAGE, native_size=64)])
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "set by coordinator.toml" in details
    await RawMiner(net).connect(models=("null",))  # declares no size: takes the registry's
    req = coordinator_pb2.SubmitJobRequest(model="null", request_id="r-1", params=job_pb2.JobParams(
        image=job_pb2.ImageParams(prompt="a red bicycle", seed=1)))
    job = (await s.SubmitJob(req, metadata=MD)).job
    assert (job.params.image.width, job.params.image.height) == (128, 128)
    assert (await s.SubmitJob(req, metadata=MD)).job.job_id == job.job_id  # idempotent after the size is filled


def test_token_bounds_are_what_the_receipt_spec_says() -> None:
    from aitbc.coordinator.checks import SPECIAL_TOKENS, token_bounds

    p = job_pb2.TextParams(prompt="héllo", max_new_tokens=100, stop=["\n\n", "END"])
    assert token_bounds(p, "abc") == (len("héllo".encode()) + SPECIAL_TOKENS, 3 + 3 + SPECIAL_TOKENS)
    assert token_bounds(job_pb2.TextParams(prompt="x", max_new_tokens=4), "a" * 100) == (1 + SPECIAL_TOKENS, 4)


async def test_unfinished_uploads_are_bounded_per_miner_and_in_all(network_factory: Any, null_backend: Any) -> None:
    net = await network_factory(max_artifact_bytes=1_000_000, max_upload_bytes_per_miner=1_000_000,
                                max_upload_bytes_in_flight=1_500_000)
    hoarder, other = RawMiner(net), RawMiner(net)
    await hoarder.connect(max_concurrency=4)
    s = stub(net)
    ids = [(await s.SubmitJob(image_req(seed=i), metadata=MD)).job.job_id for i in range(4)]
    tasks = [(await hoarder.read()).assignment.task for _ in range(4)]
    for t in tasks[:2]:  # 2 x 400 KB in flight: within the miner's 1 MB
        hoarder.send(chunk=miner_pb2.ArtifactChunk(job_id=t.job_id, index=0, data=b"\0" * 400_000))
    hoarder.send(chunk=miner_pb2.ArtifactChunk(job_id=tasks[2].job_id, index=0, data=b"\0" * 400_000))
    reply = await hoarder.read()
    assert reply.WhichOneof("msg") == "rejected" and reply.rejected.job_id == tasks[2].job_id
    assert "this miner's uploads in flight exceed 1000000 bytes" in reply.rejected.reason
    await other.connect()
    job = (await other.read()).assignment.task  # the rejected job went to the other miner
    other.send(chunk=miner_pb2.ArtifactChunk(job_id=job.job_id, index=0, data=b"\0" * 800_000))
    reply = await other.read()  # 800 KB + 800 KB held by the hoarder > 1.5 MB for everyone
    assert reply.WhichOneof("msg") == "rejected" and "the coordinator's 1500000 bytes" in reply.rejected.reason
    await net.add_miner({"null": null_backend})
    hoarder.outbox.put_nowait(None)  # the hoarder leaves: its jobs and uploads go, nothing is lost
    done = [await wait_done(s, j) for j in ids]
    assert all(d.state == S.JOB_STATE_COMPLETED for d in done)


async def test_fresh_keys_cannot_grow_the_model_registry_without_bound(network_factory: Any) -> None:
    """Registrations are free: each could declare 64 new model names, persisted for good."""
    net = await network_factory(models=[ModelConfig("null", "image")])
    net.core.models.max_learned = 100
    for n in range(100 // 64):
        assert (await register_status(RawMiner(net), tuple(f"junk-{n}-{i}" for i in range(64))))[0] == grpc.StatusCode.OK
    code, details = await register_status(RawMiner(net), tuple(f"junk-x-{i}" for i in range(64)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "at most 100" in details and "[[models]]" in details
    assert len(net.core.models.entries) == 1 + 64  # nothing of the refused registration was kept
    # the operator's models are not crowded out
    assert (await register_status(RawMiner(net), ("null",)))[0] == grpc.StatusCode.OK
    await net.restart_coordinator()
    assert sum(e.source != "config" for e in net.core.models.entries.values()) == 64


async def test_a_miner_loading_other_weights_under_a_models_name_is_refused(net: Any, tiny_backend: Any) -> None:
    """The model's identity is its weights: the first miner's tiny-sd fixes their sha256 (the same on
    every machine: the tiny pipeline is built from a fixed seed), and a miner that declares other
    weights under that name is refused at Register; the honest miner's twin is accepted."""
    honest = await net.add_miner({"tiny-sd": tiny_backend})
    spec = next(s for s in honest.info().model_specs if s.name == "tiny-sd")
    assert len(spec.weights_sha256) == 64 and spec.native_size == 64
    forged = miner_pb2.ModelSpec(name="tiny-sd", kind=job_pb2.MODEL_KIND_IMAGE, weights_sha256="ab" * 32)
    code, details = await register_status(RawMiner(net), ("tiny-sd",), model_specs=[forged])
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "loads other weights under this name" in details
    twin = miner_pb2.ModelSpec(name="tiny-sd", kind=job_pb2.MODEL_KIND_IMAGE, weights_sha256=spec.weights_sha256)
    assert (await register_status(RawMiner(net), ("tiny-sd",), model_specs=[twin]))[0] == grpc.StatusCode.OK
    await net.restart_coordinator()  # what was learned survives a restart
    code, _ = await register_status(RawMiner(net), ("tiny-sd",), model_specs=[forged])
    assert code == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize(("spec", "needle"), [
    (miner_pb2.ModelSpec(name="null", kind=job_pb2.MODEL_KIND_IMAGE, native_size=2**32 - 1), "native_size must be"),
    (miner_pb2.ModelSpec(name="null", kind=job_pb2.MODEL_KIND_IMAGE, native_size=65), "native_size must be"),
    (miner_pb2.ModelSpec(name="null", kind=job_pb2.MODEL_KIND_IMAGE, weights_sha256="x" * 100_000),
     "weights_sha256 must be 64 lower-case hex"),
])
async def test_a_fresh_key_cannot_fix_a_models_identity_to_junk(net: Any, spec: Any, needle: str) -> None:
    """The first miner fixes a model's native size and weights hash: junk is refused, not learned
    (a huge native size would refuse every native-size job; a huge string would be persisted)."""
    code, details = await register_status(RawMiner(net), ("null",), model_specs=[spec])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and needle in details
    assert net.core.models.get("null") is None  # nothing was learned
