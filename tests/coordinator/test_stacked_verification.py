"""Verification of a stacked text miner (docs/hub.md, "Text from stacked miners"): its text is judged
against an exact re-execution's token trace, within the near-tie tolerance, and its units by the
rule of "Units after a divergence"; an exact miner stays byte for byte; a malformed trace is refused.

The network tests run the real coordinator and real miner daemons with tiny-llama. A stacked
miner's noise never flipped a token of these jobs on CPU, so the flips are made: `Flipping` is a
miner backend that returns what a flip at decision j would give (the job's greedy run up to j, the
runner-up token there, the greedy run from that context, made with the real model), the run a
stacked miner returns when its batched pass flips that decision. The prompts were found by
searching tiny-llama's greedy decisions for a margin under DEFAULT_TEXT_EPSILON (1e-5)."""

from __future__ import annotations

import math
import threading
from typing import Any

import grpc
import pytest
import torch

from aitbc import crypto
from aitbc.coordinator.checks import check_text_trace
from aitbc.coordinator.verification import VERDICT_META
from aitbc.errors import InvalidArgument
from aitbc.hub.verification import DEFAULT_TEXT_EPSILON, TextTrace
from aitbc.miner.text import TEXT_STACKED, TextOutput, TextRequest, TransformersTextBackend, load_text_backend
from aitbc.v1 import coordinator_pb2, job_pb2, miner_pb2, receipt_pb2
from tests.coordinator.test_jobs_api import MD, fetch, stub
from tests.coordinator.test_miner_gateway import RawMiner
from tests.coordinator.test_text_jobs import text_job

S = job_pb2.JobState
V = job_pb2.VerificationState
St = receipt_pb2.SettlementState
STACKED, EXACT = job_pb2.TEXT_BATCHING_STACKED, job_pb2.TEXT_BATCHING_EXACT

# greedy tiny-llama jobs with a real near-tie (closest margin, at decision): 9.5e-7 at 11 (48 tokens,
# "length"), 3.8e-6 at 1 (17 tokens, "eos"; the run flipped there goes on to 48 tokens)
TIE = TextRequest("for block token stake 158", 48, 0.0, 1.0, 0, 0, ())
TIE_EOS = TextRequest("time runs a 27", 48, 0.0, 1.0, 0, 0, ())


@pytest.fixture(scope="module")
def exact() -> TransformersTextBackend:
    backend = load_text_backend("tiny-llama", "cpu")
    assert isinstance(backend, TransformersTextBackend)
    return backend


@pytest.fixture(scope="module")
def stacked() -> TransformersTextBackend:
    backend = load_text_backend("tiny-llama", "cpu", batching=TEXT_STACKED)
    assert isinstance(backend, TransformersTextBackend)
    return backend


def flipped_run(backend: TransformersTextBackend, req: TextRequest, j: int, *, tokens: int | None = None) -> TextOutput:
    """The greedy run of `req` with decision j taken the other way; `tokens`: cut there (a run that
    ended sooner after the flip)."""
    ids = backend.tokenizer(req.prompt)["input_ids"]
    made: list[int] = []
    with torch.inference_mode():
        for step in range(tokens or req.max_new_tokens):
            logits = backend.language_model(input_ids=torch.tensor([ids + made])).logits[0, -1]
            top = torch.topk(logits, 2).indices
            made.append(int(top[1] if step == j else top[0]))
            if made[-1] == 2:  # </s>
                break
    text = backend.tokenizer.decode(made, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    finish = "eos" if made[-1] == 2 or tokens else "length"
    return TextOutput(text, len(ids), len(made), 1, finish)


class Flipping:
    """A miner backend that returns `outputs[prompt]` for those prompts (streamed as one piece) and
    runs every other request, and every trace, on the real backend it wraps."""

    def __init__(self, backend: TransformersTextBackend, outputs: dict[str, TextOutput]) -> None:
        self._backend = backend
        self.outputs = outputs

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def generate(self, req: TextRequest, on_text: Any, cancel: threading.Event) -> TextOutput:
        out = self.outputs.get(req.prompt)
        if out is None:
            return self._backend.generate(req, on_text, cancel)
        on_text(out.text)
        return out


def params(req: TextRequest):  # type: ignore[no-untyped-def]
    return text_job(req.prompt, max_new_tokens=req.max_new_tokens, temperature=req.temperature, seed=req.seed)


async def run_checked(network_factory, first: Any, *, referee: Any, req: TextRequest = TIE,
                      first_is_established: bool = False):  # type: ignore[no-untyped-def]
    """`first` serves the job alone (a new miner: every result of it is re-executed); then a miner
    with backend `referee` that the operator trusts joins and re-executes it. Returns the network,
    the first miner, the original job and its re-execution as the coordinator stores them, once
    decided."""
    judge = crypto.PrivateKey.generate()
    net = await network_factory(verify_rate=1.0, verify_timeout_s=60, trust_checks=0 if first_is_established else 5,
                                trusted_miners=[judge.address])
    miner = await net.add_miner({"tiny-llama": first})
    s = stub(net)
    job = (await s.SubmitJob(params(req), metadata=MD)).job
    await net.until(lambda: net.core.store.get_job(job.job_id).state == S.JOB_STATE_COMPLETED, timeout=60)
    assert net.core.store.get_job(job.job_id).miner_id == miner.key.address
    await net.add_miner({"tiny-llama": referee}, key=judge)
    await net.until(lambda: net.core.store.get_job(job.job_id).verification not in (
        V.VERIFICATION_STATE_PENDING, V.VERIFICATION_STATE_UNSPECIFIED), timeout=60)
    orig = net.core.store.get_job(job.job_id)
    return net, miner, orig, net.core.store.get_job(orig.verification_job_ids[0])


def receipt_state(net, job: job_pb2.Job) -> int:  # type: ignore[no-untyped-def]
    return net.core.receipts.get(job.receipt_hash).settlement.state


# ---- through the network ---------------------------------------------------------------------------

@pytest.mark.parametrize("req", [TextRequest("Once upon a time", 40, 0.0, 1.0, 0, 0, ()),
                                 TextRequest("The miner runs jobs", 40, 0.9, 1.0, 0, 7, ())], ids=["greedy", "sampled"])
async def test_an_honest_stacked_miner_passes_against_an_exact_re_execution(
        network_factory, stacked, exact, req: TextRequest) -> None:
    """The stacked miner declares itself; its job's re-execution asks for a trace and gets one (the
    exact run's, one entry per token); the text agrees, the receipt is released, both pass."""
    net, miner, orig, rerun = await run_checked(network_factory, stacked, referee=exact, first_is_established=True,
                                                req=req)
    assert net.core.verifier.established(miner.key.address)  # both vote: the majority rule decides
    assert orig.verification == V.VERIFICATION_STATE_PASSED, orig
    assert orig.text_batching == STACKED and rerun.text_batching == EXACT
    assert rerun.want_text_trace and len(rerun.text_trace.margins) == len(rerun.text_trace.lengths) == rerun.generated_tokens
    alone, trace = exact.trace(req)
    assert TextTrace.from_proto(alone.text, rerun.text_trace).ends == trace.ends
    assert receipt_state(net, orig) == St.SETTLEMENT_STATE_DISABLED  # released (no ledger here)
    assert net.core.book.snapshot(miner.key.address).verifications_passed == 1
    listed = (await stub(net).ListMiners(coordinator_pb2.ListMinersRequest(), metadata=MD)).miners
    assert {m.miner_id: m.text_batching for m in listed} == {miner.key.address: STACKED, rerun.miner_id: EXACT}


async def test_a_stacked_result_is_verified_with_its_trace_after_a_coordinator_restart(
        network_factory, stacked, exact) -> None:
    """The mode is stored with the result and the request for a trace with the re-execution: a
    restart between the stacked result and its re-execution changes nothing."""
    _, trace = exact.trace(TIE)
    flip = flipped_run(exact, TIE, min(range(len(trace.margins)), key=trace.margins.__getitem__))
    judge = crypto.PrivateKey.generate()
    net = await network_factory(verify_rate=1.0, verify_timeout_s=60, trust_checks=5, trusted_miners=[judge.address])
    await net.add_miner({"tiny-llama": Flipping(stacked, {TIE.prompt: flip})})
    job = (await stub(net).SubmitJob(params(TIE), metadata=MD)).job
    await net.until(lambda: net.core.store.get_job(job.job_id).state == S.JOB_STATE_COMPLETED, timeout=60)
    await net.restart_coordinator()
    rerun_id = net.core.store.get_job(job.job_id).verification_job_ids[0]
    assert net.core.store.get_job(rerun_id).want_text_trace
    await net.add_miner({"tiny-llama": exact}, key=judge)
    await net.until(lambda: net.core.store.get_job(job.job_id).verification == V.VERIFICATION_STATE_PASSED,
                    timeout=60)
    assert len(net.core.store.get_job(rerun_id).text_trace.margins) == flip.generated_tokens


async def test_a_flip_at_a_near_tie_passes_and_is_paid_what_it_claims(network_factory, stacked, exact) -> None:
    alone, trace = exact.trace(TIE)
    j = min(range(len(trace.margins)), key=trace.margins.__getitem__)
    assert trace.margins[j] < DEFAULT_TEXT_EPSILON  # a real near-tie of the model, at the default epsilon
    flip = flipped_run(exact, TIE, j)
    assert flip.text != alone.text and flip.generated_tokens == alone.generated_tokens
    net, miner, orig, rerun = await run_checked(network_factory, Flipping(stacked, {TIE.prompt: flip}), referee=exact)
    assert orig.verification == V.VERIFICATION_STATE_PASSED, orig
    _, data = await fetch(stub(net), orig.job_id)
    assert data.decode() == flip.text  # the client keeps the stacked miner's text
    assert receipt_state(net, orig) == St.SETTLEMENT_STATE_DISABLED
    assert orig.units == flip.prompt_tokens + flip.generated_tokens
    assert net.core.book.snapshot(miner.key.address).verifications_passed == 1


async def test_a_token_changed_where_the_model_was_sure_fails(network_factory, stacked, exact) -> None:
    _, trace = exact.trace(TIE)
    clear = max(range(len(trace.margins)), key=trace.margins.__getitem__)
    cheat = flipped_run(exact, TIE, clear)
    net, miner, orig, rerun = await run_checked(network_factory, Flipping(stacked, {TIE.prompt: cheat}), referee=exact)
    assert orig.verification == V.VERIFICATION_STATE_REPLACED
    _, data = await fetch(stub(net), orig.job_id)
    assert data.decode() != cheat.text  # the client gets the verified text
    assert receipt_state(net, orig) == St.SETTLEMENT_STATE_REJECTED
    assert net.core.store.get_meta(VERDICT_META + orig.receipt_hash)  # proof for a SLASH
    assert net.core.book.snapshot(miner.key.address).verifications_failed == 1


async def test_an_exact_miner_is_held_to_byte_identical_text(network_factory, exact) -> None:
    """The same near-tie flip from a miner that declares exact batching fails: its text must be
    the job's alone, and its re-execution is not asked for a trace."""
    _, trace = exact.trace(TIE)
    flip = flipped_run(exact, TIE, min(range(len(trace.margins)), key=trace.margins.__getitem__))
    net, miner, orig, rerun = await run_checked(network_factory, Flipping(exact, {TIE.prompt: flip}), referee=exact)
    assert orig.text_batching == EXACT and not rerun.want_text_trace and not rerun.HasField("text_trace")
    assert orig.verification == V.VERIFICATION_STATE_REPLACED
    assert receipt_state(net, orig) == St.SETTLEMENT_STATE_REJECTED


async def test_after_a_flip_a_run_is_paid_up_to_the_re_executions_tokens_and_not_beyond(
        network_factory, stacked, exact) -> None:
    """The re-execution ended at its 17th token (EOS); the flipped run at decision 1 goes on to 48.
    Claiming 48 tokens: not paid, a failed verification, but no SLASH (an honest flip can do it).
    Claiming 17 of the same text (a run that stopped there): paid its 17 tokens."""
    alone, trace = exact.trace(TIE_EOS)
    j = min(range(len(trace.margins)), key=trace.margins.__getitem__)
    assert trace.margins[j] < DEFAULT_TEXT_EPSILON and alone.finish_reason == "eos"
    longer = flipped_run(exact, TIE_EOS, j)
    assert longer.generated_tokens > alone.generated_tokens
    net, miner, orig, _ = await run_checked(network_factory, Flipping(stacked, {TIE_EOS.prompt: longer}),
                                            referee=exact, req=TIE_EOS)
    assert orig.verification == V.VERIFICATION_STATE_REPLACED
    assert receipt_state(net, orig) == St.SETTLEMENT_STATE_REJECTED
    assert net.core.store.get_meta(VERDICT_META + orig.receipt_hash) is None  # not proof of cheating
    assert net.core.book.snapshot(miner.key.address).verifications_failed == 1

    shorter = flipped_run(exact, TIE_EOS, j, tokens=alone.generated_tokens)
    net, miner, orig, _ = await run_checked(network_factory, Flipping(stacked, {TIE_EOS.prompt: shorter}),
                                            referee=exact, req=TIE_EOS)
    assert orig.verification == V.VERIFICATION_STATE_PASSED, orig
    assert receipt_state(net, orig) == St.SETTLEMENT_STATE_DISABLED
    assert orig.units == shorter.prompt_tokens + alone.generated_tokens


class JunkTrace:
    """A re-executor whose trace is junk (one token short): its result is refused."""

    def __init__(self, backend: TransformersTextBackend) -> None:
        self._backend = backend

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def trace(self, req: TextRequest, cancel: Any = None, on_text: Any = None) -> tuple[TextOutput, Any]:
        out, trace = self._backend.trace(req, cancel, on_text)

        class Short:
            def to_proto(self) -> job_pb2.TextTrace:
                msg = trace.to_proto()
                del msg.margins[-1]
                return msg

        return out, Short()


async def test_a_junk_trace_is_refused_and_decides_nothing(network_factory, stacked, exact) -> None:
    """The first re-executor returns a malformed trace: its result is refused (WorkRejected, a
    failure on its record) and the re-execution runs again on the next established miner."""
    judge = crypto.PrivateKey.generate()
    junk = crypto.PrivateKey.generate()
    net = await network_factory(verify_rate=1.0, verify_timeout_s=60, trust_checks=5,
                                trusted_miners=[judge.address, junk.address])
    await net.add_miner({"tiny-llama": stacked})
    s = stub(net)
    job = (await s.SubmitJob(params(TIE), metadata=MD)).job
    await net.until(lambda: net.core.store.get_job(job.job_id).state == S.JOB_STATE_COMPLETED, timeout=60)
    await net.add_miner({"tiny-llama": JunkTrace(exact)}, key=junk)
    rerun_id = net.core.store.get_job(job.job_id).verification_job_ids[0]
    await net.until(lambda: any("text_trace must hold one length and one margin" in t.cause
                                for t in (net.core._find(rerun_id).story)), timeout=60)
    assert net.core.store.get_job(job.job_id).verification == V.VERIFICATION_STATE_PENDING
    assert net.core.book.snapshot(junk.address).failures >= 1
    await net.add_miner({"tiny-llama": exact}, key=judge)
    await net.until(lambda: net.core.store.get_job(job.job_id).verification == V.VERIFICATION_STATE_PASSED,
                    timeout=60)
    assert net.core.store.get_job(rerun_id).miner_id == judge.address


async def test_a_registration_with_an_unknown_text_batching_is_refused(net) -> None:
    m = RawMiner(net)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await m.register(models=("tiny-llama",), text_batching=7)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "text_batching 7" in err.value.details()


# ---- the trace's checks (aitbc.coordinator.checks.check_text_trace) ---------------------------------

def _result(text_trace: job_pb2.TextTrace | None, generated: int = 3, finish: str = "length") -> miner_pb2.JobResult:
    r = miner_pb2.JobResult(job_id="j", generated_tokens=generated, finish_reason=finish)
    if text_trace is not None:
        r.text_trace.CopyFrom(text_trace)
    return r


def test_a_trace_is_required_exactly_when_asked_and_must_fit_the_text() -> None:
    asked, not_asked = job_pb2.Job(want_text_trace=True), job_pb2.Job()
    good = job_pb2.TextTrace(lengths=[1, 0, 2], margins=[0.5, 1e-7, math.inf])
    check_text_trace(asked, _result(good), "abc")
    check_text_trace(not_asked, _result(None), "abc")
    cases = [
        (not_asked, _result(good), "only returned for a task with want_text_trace"),
        (asked, _result(None), "the result has none"),
        (asked, _result(job_pb2.TextTrace(lengths=[1, 2], margins=[0.5, 1.0])), "one length and one margin"),
        (asked, _result(job_pb2.TextTrace(lengths=[1, 0, 2], margins=[0.5, 1.0])), "2 margins"),
        (asked, _result(job_pb2.TextTrace(lengths=[1, 0, 2], margins=[0.5, math.nan, 1.0])), "never NaN"),
        (asked, _result(job_pb2.TextTrace(lengths=[1, 0, 2], margins=[0.5, -1.0, 1.0])), ">= 0"),
        (asked, _result(job_pb2.TextTrace(lengths=[1, 0, 1], margins=[0.5, 1.0, 1.0])), "fewer than its text"),
        (asked, _result(job_pb2.TextTrace(lengths=[1, 0, 9], margins=[0.5, 1.0, 1.0])), "only a stop string"),
    ]
    for job, result, needle in cases:
        with pytest.raises(InvalidArgument, match=needle):
            check_text_trace(job, result, "abc")
    # a stop string cut the decoded text: the tokens decoded more than the text holds
    check_text_trace(asked, _result(job_pb2.TextTrace(lengths=[1, 0, 9], margins=[0.5, 1.0, 1.0]), finish="stop"), "abc")
