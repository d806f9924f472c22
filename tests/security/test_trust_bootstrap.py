"""Trust bootstrap (docs/hub.md): new identities start unproven. Every result of a miner that is
not established is re-executed, re-executions run only on established miners, and only established
miners' runs vote, so fresh keys (free to make) cannot outvote one established miner. Real miner
daemons over real gRPC; the colluders run the real daemon with a backend that fakes its images.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from aitbc.config import CoordinatorConfig
from aitbc.errors import InvalidArgument
from aitbc.miner.backend import ImageOutput, ImageRequest, NullImageBackend, null_png
from aitbc.v1 import coordinator_pb2, job_pb2, receipt_pb2
from tests.coordinator.test_jobs_api import MD, image_job, stub, wait_done

V = job_pb2.VerificationState
St = receipt_pb2.SettlementState


class FakingBackend(NullImageBackend):
    """A colluder: a valid PNG of the right size, the same fake for every colluder, no model run."""

    def generate(self, req: ImageRequest, on_step: Callable[[int, int], None], cancel: threading.Event) -> ImageOutput:
        out = super().generate(req, on_step, cancel)
        fakes = [null_png("not what was asked " + req.prompt, req.seed + i, out.width, out.height)
                 for i in range(req.images)]
        return ImageOutput(pngs=fakes, width=out.width, height=out.height, gpu_ms=out.gpu_ms)


async def settled(net: Any, job_id: str) -> job_pb2.Job:
    """The job once its verification is decided (no longer PENDING)."""
    await net.until(lambda: net.core.store.get_job(job_id).verification not in (
        V.VERIFICATION_STATE_PENDING,) and net.core.store.get_job(job_id).state == job_pb2.JOB_STATE_COMPLETED)
    return net.core.store.get_job(job_id)


async def receipt_state(net: Any, job: job_pb2.Job) -> int:
    rec = net.core.receipts.get(job.receipt_hash)
    return rec.settlement.state


async def test_two_colluding_fresh_keys_never_outvote_an_established_honest_miner(network_factory: Any) -> None:
    from aitbc import crypto

    honest_key = crypto.PrivateKey.generate()
    net = await network_factory(trust_checks=3, trusted_miners=[honest_key.address], verify_rate=0.0,
                                verify_timeout_s=5)
    honest = await net.add_miner({"null": NullImageBackend()}, price=5, key=honest_key)
    colluders = [await net.add_miner({"null": FakingBackend()}, price=0) for _ in range(2)]
    colluder_ids = {c.key.address for c in colluders}
    before = net.core.book.snapshot(honest.key.address)
    s = stub(net)
    by_colluders, runs = [], []
    for i in range(6):
        job = await wait_done(s, (await s.SubmitJob(image_job(model="null", seed=i, steps=2), metadata=MD)).job.job_id)
        job = await settled(net, job.job_id)
        runs += [net.core.store.get_job(v) for v in job.verification_job_ids]
        if job.miner_id in colluder_ids:
            by_colluders.append(job)
            # the fake was checked by the established miner, and lost: the client gets the honest image
            assert job.verification == V.VERIFICATION_STATE_REPLACED, job
            [vid] = job.verification_job_ids
            assert net.core.store.get_job(vid).miner_id == honest.key.address
            assert await receipt_state(net, job) == St.SETTLEMENT_STATE_REJECTED
            with net.core.store.open_artifact(job.artifacts[0].sha256) as f:
                data = f.read()
            assert data == null_png("a red bicycle", i, 64, 64)
    assert by_colluders, "the cheaper colluders never got a job: the test proves nothing"
    # no re-execution ever ran on an unproven miner: a fresh key gets no vote on anyone's result
    assert runs and all(r.miner_id == honest.key.address for r in runs)
    after = net.core.book.snapshot(honest.key.address)
    assert after.verifications_failed == 0 and after.reputation >= before.reputation
    for c in colluders:
        rec = net.core.book.snapshot(c.key.address)
        assert rec.verifications_passed == 0 and not net.core.verifier.established(c.key.address)


async def test_a_new_honest_miner_is_checked_until_established_then_sampled(network_factory: Any) -> None:
    from aitbc import crypto

    veteran_key = crypto.PrivateKey.generate()
    net = await network_factory(trust_checks=2, trusted_miners=[veteran_key.address], verify_rate=0.0)
    veteran = await net.add_miner({"null": NullImageBackend()}, price=5, key=veteran_key)
    newcomer = await net.add_miner({"null": NullImageBackend()}, price=0)
    assert not net.core.verifier.established(newcomer.key.address)
    s = stub(net)
    checked = 0
    for i in range(6):
        job = await settled(net, (await s.SubmitJob(image_job(model="null", seed=i, steps=2), metadata=MD)).job.job_id)
        if job.miner_id == newcomer.key.address:
            if job.verification_job_ids:
                checked += 1
                assert job.verification == V.VERIFICATION_STATE_PASSED
                assert net.core.store.get_job(job.verification_job_ids[0]).miner_id == veteran.key.address
            else:  # established by then: at verify_rate 0 nothing more is re-executed
                assert net.core.verifier.established(newcomer.key.address)
            assert await receipt_state(net, job) == St.SETTLEMENT_STATE_DISABLED  # released (no ledger here)
    assert checked == 2 and net.core.verifier.established(newcomer.key.address)


async def test_an_unproven_result_nobody_established_can_check_is_not_minted(network_factory: Any) -> None:
    net = await network_factory(trust_checks=1, verify_rate=0.0, verify_timeout_s=0.5)
    first = await net.add_miner({"null": NullImageBackend()})
    second = await net.add_miner({"null": NullImageBackend()})  # free, connected, and as unproven
    s = stub(net)
    job = await wait_done(s, (await s.SubmitJob(image_job(model="null", seed=1, steps=2), metadata=MD)).job.job_id)
    assert job.state == job_pb2.JOB_STATE_COMPLETED  # the client has its image at once
    job = await settled(net, job.job_id)
    assert job.verification == V.VERIFICATION_STATE_UNVERIFIED
    # the re-execution waited for an established miner: the other fresh key, free all along, never ran it
    fresh = first if job.miner_id == first.key.address else second
    assert job.verification_job_ids
    assert all(net.core.store.get_job(v).miner_id == "" for v in job.verification_job_ids), \
        [net.core.store.get_job(v) for v in job.verification_job_ids]
    rec = net.core.receipts.get(job.receipt_hash)
    assert rec.settlement.state == St.SETTLEMENT_STATE_REJECTED and "Trust bootstrap" in rec.settlement.error
    mrec = net.core.book.snapshot(fresh.key.address)
    assert mrec.verifications_failed == 0 and mrec.failures == 0  # nothing was proven against it either
    got = (await s.GetJob(coordinator_pb2.GetJobRequest(job_id=job.job_id), metadata=MD)).job
    assert got.artifacts and got.receipt.settlement.state == St.SETTLEMENT_STATE_REJECTED


def test_trusted_miners_must_be_addresses() -> None:
    with pytest.raises(InvalidArgument, match="trusted_miners"):
        CoordinatorConfig(trusted_miners=["alice"])
    assert CoordinatorConfig().trust_checks == 5  # new identities start unproven by default


async def test_a_rerun_that_agrees_on_the_text_but_not_on_the_token_count_outvotes_it(network_factory: Any,
                                                                                       null_text: Any) -> None:
    """A verification compares the units too: a miner that streams the right text but counts a few
    tokens more (still within the receipt bounds) is outvoted by the established miner's count."""
    from aitbc import crypto
    from aitbc.miner.text import TextRequest
    from aitbc.v1 import miner_pb2
    from tests.coordinator.test_miner_gateway import RawMiner
    from tests.security.test_economics import MD as EMD
    from tests.security.test_economics import TEXT_SPEC, text_req, text_result

    honest_key = crypto.PrivateKey.generate()
    net = await network_factory(trust_checks=1, trusted_miners=[honest_key.address], verify_rate=0.0)
    await net.add_miner({"null-text": null_text}, price=5, key=honest_key)
    padder = RawMiner(net)
    await padder.connect(models=("null-text",), model_specs=[TEXT_SPEC])
    s = stub(net)
    job = (await s.SubmitJob(text_req(), metadata=EMD)).job
    task = (await padder.read()).assignment.task
    p = task.params.text
    out = null_text.generate(TextRequest(prompt=p.prompt, max_new_tokens=p.max_new_tokens, temperature=p.temperature,
                                         top_p=p.top_p, top_k=p.top_k, seed=p.seed, stop=tuple(p.stop)),
                             lambda _delta: None, threading.Event())
    padder.send(accepted=miner_pb2.JobAccepted(job_id=task.job_id))
    padder.send(text=job_pb2.TextChunk(job_id=task.job_id, text=out.text))
    padder.send(chunk=miner_pb2.ArtifactChunk(job_id=task.job_id, index=0, data=out.text.encode()))
    padder.send(result=text_result(padder, task, out.text, out.prompt_tokens + 3, out.generated_tokens))
    assert (await padder.read()).WhichOneof("msg") == "accepted"  # within the bounds: only a re-run can tell
    job = await settled(net, job.job_id)
    assert job.verification == V.VERIFICATION_STATE_REPLACED
    [rerun] = [net.core.store.get_job(v) for v in job.verification_job_ids]
    assert rerun.units == out.prompt_tokens + out.generated_tokens and job.units == rerun.units + 3
    assert net.core.receipts.get(job.receipt_hash).settlement.state == St.SETTLEMENT_STATE_REJECTED
