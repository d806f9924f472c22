"""A coordinator restart, as a client sees it: nothing but latency.

The coordinator keeps what SubmitJob consults across a restart (the models served lately, with
their kind and context length), so a job submitted before any miner is back is queued; and the SDK
retries the calls that fail while it is down (jittered backoff, one request id per submission), so
a client that submits all along sees no error and gets every job with its receipt."""

from __future__ import annotations

import asyncio
import copy
import threading
from typing import Any

import pytest

from aitbc import crypto, receipts
from aitbc.v1 import coordinator_pb2, job_pb2
from aitbc.wire import receipt_from_proto
from tests.conftest import API_KEY
from tests.coordinator.test_jobs_api import MD, image_job, stub, wait_done

S = job_pb2.JobState


async def _stop_miner(net: Any, daemon: Any) -> None:
    i = net.miners.index(daemon)
    daemon.stop()
    await asyncio.wait_for(net.tasks[i], 10)


async def test_a_job_submitted_right_after_a_restart_before_any_miner_is_back_is_queued_then_served(
        net: Any, null_backend: Any, null_text: Any) -> None:
    key = crypto.PrivateKey.generate()
    small = copy.copy(null_text)  # a text model with a context smaller than the coordinator's own limit
    small.context_length = 256
    miner = await net.add_miner({"null": null_backend, "null-text": small}, key=key)
    declared = net.core.registry.context_lengths("null-text")
    assert declared == [256]
    await net.stop_coordinator()  # the miner is still connected when the coordinator goes
    await _stop_miner(net, miner)  # and stays away until after the submission below
    await net.start_coordinator()  # the same data folder and port
    assert not net.core.miners
    s = stub(net)
    job = (await s.SubmitJob(image_job(model="null", steps=1, width=64, height=64, seed=4), metadata=MD)).job
    assert job.state == S.JOB_STATE_QUEUED
    quote = await s.QuoteJob(coordinator_pb2.QuoteJobRequest(model="null", params=job.params), metadata=MD)
    assert not quote.miners and quote.unavailable_reason  # accepted, though nobody could run it this instant
    # what a text job is checked against survives too: a max_new_tokens past the model's context
    # is refused as it was before the restart, not queued for a miner that would fail it
    assert net.core.registry.context_lengths("null-text") == declared
    too_long = coordinator_pb2.SubmitJobRequest(model="null-text", params=job_pb2.JobParams(
        text=job_pb2.TextParams(prompt="hi", max_new_tokens=declared[0])))
    with pytest.raises(Exception) as refused:
        await s.SubmitJob(too_long, metadata=MD)
    assert "does not fit the context" in refused.value.details()
    await net.add_miner({"null": null_backend, "null-text": small}, key=key)
    done = await wait_done(s, job.job_id)
    assert done.state == S.JOB_STATE_COMPLETED, done.error
    rec = (await s.GetReceipt(coordinator_pb2.GetReceiptRequest(job_id=job.job_id), metadata=MD)).receipt
    receipts.verify_receipt(receipt_from_proto(rec), attesters=frozenset({net.core.key.address}))


async def test_a_model_not_served_within_the_grace_is_still_refused_after_a_restart(network_factory: Any,
                                                                                    null_backend: Any) -> None:
    from aitbc.coordinator.clock import FakeClock

    clock = FakeClock()
    net = await network_factory(clock=clock, model_grace_s=60.0)
    miner = await net.add_miner({"null": null_backend})
    await _stop_miner(net, miner)
    await net.until(lambda: not net.core.miners)
    await net.stop_coordinator()
    clock.advance(61.0)  # the restart came after the grace: what was served then is not served now
    await net.start_coordinator()
    with pytest.raises(Exception) as refused:
        await stub(net).SubmitJob(image_job(model="null", steps=1, width=64, height=64), metadata=MD)
    assert "no miner serves model 'null'" in refused.value.details()


def _submit_all(address: str, count: int, pause_at: int, down: threading.Event, out: dict[str, Any]) -> None:
    """A client that submits `count` jobs one after another (the coordinator goes down after
    `pause_at` of them), then follows each to its end and fetches its receipt."""
    from aitbc.clients.sdk import CoordinatorClient

    with CoordinatorClient(address, API_KEY, timeout=10) as client:
        try:
            ids = []
            for i in range(count):
                if i == pause_at:
                    down.wait(30)  # the next submission meets a coordinator that is not there
                ids.append(client.submit_image(f"restart {i}", model="null", steps=1, width=64, height=64,
                                               seed=i).job_id)
            out["ids"] = ids
            for job_id in ids:
                job = None
                for ev in client.watch(job_id, timeout=120):
                    if isinstance(ev, job_pb2.Job):
                        job = ev
                out.setdefault("final", []).append(job)
                out.setdefault("receipts", []).append(client.receipt(job_id=job_id))
        except BaseException as exc:  # the test asserts there was none
            out["error"] = exc
        out["retries"] = client.retries


async def test_a_client_submitting_through_a_coordinator_restart_sees_no_error(net: Any, null_backend: Any) -> None:
    await net.add_miner({"null": null_backend}, concurrency=2)
    count, pause_at = 24, 8
    down, out = threading.Event(), {}
    client = asyncio.get_running_loop().run_in_executor(None, _submit_all, net.address, count, pause_at, down, out)
    await net.until(lambda: len(net.core.store.active_jobs()) + _finished(net) >= pause_at)
    await net.stop_coordinator()
    down.set()
    await asyncio.sleep(0.5)  # down for a while: the client's calls fail and are retried
    await net.start_coordinator()
    await asyncio.wait_for(client, 180)
    assert "error" not in out, out.get("error")
    assert out["retries"] > 0  # the restart was met, and retried through
    assert len(set(out["ids"])) == count
    assert all(job is not None and job.state == S.JOB_STATE_COMPLETED for job in out["final"])
    for rec in out["receipts"]:
        receipts.verify_receipt(receipt_from_proto(rec), attesters=frozenset({net.core.key.address}))
    # one job per submission: a retry after a lost answer got the job already queued, not a second one
    listed = (await stub(net).ListReceipts(coordinator_pb2.ListReceiptsRequest(page_size=100), metadata=MD)).receipts
    assert len(listed) == count


def _finished(net: Any) -> int:
    return sum(1 for _ in net.core.store.iter_receipts())


class LosesFirstAnswer:
    """A real gRPC hop in front of the coordinator that forwards every unary call and, for the
    first SubmitJob, drops the coordinator's answer and says UNAVAILABLE instead (the connection
    broke after the job was queued): what a client meets when a coordinator dies mid-call."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.submits: list[bytes] = []  # every SubmitJob request as it arrived

    async def start(self) -> str:
        import grpc

        self.channel = grpc.aio.insecure_channel(self.upstream)
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers((self,))
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return f"127.0.0.1:{port}"

    async def stop(self) -> None:
        await self.server.stop(0)
        await self.channel.close()

    def service(self, details: Any) -> Any:
        import grpc

        method = details.method

        async def forward(request: bytes, context: Any) -> bytes:
            md = tuple((k, v) for k, v in context.invocation_metadata() if not k.startswith(":"))
            answer = await self.channel.unary_unary(method)(request, metadata=md, timeout=10)
            if method.endswith("/SubmitJob"):
                self.submits.append(request)
                if len(self.submits) == 1:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "connection lost (the answer never came back)")
            return answer

        return grpc.unary_unary_rpc_method_handler(forward)


@pytest.mark.parametrize("request_id", ["", "my-request-7"])
async def test_a_submission_whose_answer_was_lost_is_retried_under_its_request_id_and_billed_once(
        net: Any, null_backend: Any, request_id: str) -> None:
    from aitbc.clients.sdk import CoordinatorClient

    await net.add_miner({"null": null_backend})
    hop = LosesFirstAnswer(net.address)
    address = await hop.start()

    def submit() -> tuple[job_pb2.Job, int]:
        with CoordinatorClient(address, API_KEY, timeout=10) as client:
            job = client.submit_image("once", model="null", steps=1, width=64, height=64, seed=1,
                                      request_id=request_id)
            return job, client.retries

    try:
        job, retries = await asyncio.get_running_loop().run_in_executor(None, submit)
    finally:
        await hop.stop()
    sent = [coordinator_pb2.SubmitJobRequest.FromString(raw) for raw in hop.submits]
    assert retries == 1 and len(sent) == 2
    assert sent[0].request_id and sent[0].request_id == sent[1].request_id  # the retry is the same request
    assert request_id in ("", sent[0].request_id)
    done = await wait_done(stub(net), job.job_id)
    assert done.state == S.JOB_STATE_COMPLETED
    listed = (await stub(net).ListReceipts(coordinator_pb2.ListReceiptsRequest(), metadata=MD)).receipts
    assert [r.body.job_id for r in listed] == [job.job_id]  # one job queued, one receipt: billed once


async def test_a_watch_cut_by_a_restart_reattaches_and_ends_with_the_finished_job(net: Any) -> None:
    from aitbc.clients.sdk import CoordinatorClient
    from tests.coordinator.test_queue_eta import GatedBackend

    backend = GatedBackend()  # the job runs until the test lets it finish
    await net.add_miner({"null": backend})
    out: dict[str, Any] = {}

    def follow() -> None:
        with CoordinatorClient(net.address, API_KEY, timeout=10) as client:
            try:
                job = client.submit_image("held", model="null", steps=1, width=64, height=64, seed=2)
                out["job_id"] = job.job_id
                out["events"] = list(client.watch(job.job_id, timeout=120))
            except BaseException as exc:
                out["error"] = exc
            out["retries"] = client.retries

    watching = asyncio.get_running_loop().run_in_executor(None, follow)
    await net.until(lambda: "job_id" in out and net.core.streams.watchers(out["job_id"]) == 1
                    and net.core.machine.job(out["job_id"]).state == S.JOB_STATE_RUNNING)
    await net.restart_coordinator()  # the watch stream breaks; the job goes back to the queue
    await net.until(lambda: net.core.streams.watchers(out["job_id"]) == 1)  # the client is back, watching
    backend.gate.release()
    backend.gate.release()  # (one more, for an attempt the restart cut short)
    await asyncio.wait_for(watching, 60)
    assert "error" not in out, out.get("error")  # the stream the restart cut was opened again
    jobs_seen = [e for e in out["events"] if isinstance(e, job_pb2.Job)]
    assert jobs_seen[-1].state == S.JOB_STATE_COMPLETED and jobs_seen[-1].receipt_hash
