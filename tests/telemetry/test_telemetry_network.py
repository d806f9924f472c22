"""The real coordinator and miner daemon (null backend) with tracing and RPC metrics on: a job still
completes, and the RPCs it made show up as client -> server span pairs and in aitbc_rpc_* metrics.
(Job-level spans - dispatch, miner.job - are added by the coordinator and miner themselves.)"""

from __future__ import annotations

from opentelemetry.trace import SpanKind

from aitbc import metrics, telemetry
from aitbc.v1 import coordinator_pb2, coordinator_pb2_grpc, job_pb2
from tests.conftest import API_KEY

MD = (("x-api-key", API_KEY),)
COORD = "aitbc.v1.CoordinatorService"


async def test_job_through_instrumented_coordinator_and_miner(network_factory, null_backend) -> None:  # type: ignore[no-untyped-def]
    telemetry.configure("coordinator", exporter="memory")
    metrics.rpc_metrics_enabled = True  # as start_metrics_server does, without opening a port
    exporter = telemetry.memory_exporter()
    before = metrics.value("aitbc_rpc_requests_total", service=COORD, method="SubmitJob", code="OK")

    net = await network_factory()  # servers and channels made after configure: instrumented
    await net.add_miner({"null": null_backend})
    s = coordinator_pb2_grpc.CoordinatorServiceStub(net.channel())
    with telemetry.span("client.job") as root:
        req = coordinator_pb2.SubmitJobRequest(
            model="null", params=job_pb2.JobParams(image=job_pb2.ImageParams(prompt="a red bicycle", steps=2)))
        job = (await s.SubmitJob(req, metadata=MD)).job
        final = None
        async for ev in s.WatchJob(coordinator_pb2.WatchJobRequest(job_id=job.job_id), metadata=MD, timeout=60):
            if ev.WhichOneof("event") == "job":
                final = ev.job
    assert final is not None
    assert final.state == job_pb2.JobState.JOB_STATE_COMPLETED, final.error
    await net.close()  # ends the miner's Work stream and its spans
    telemetry.force_flush()

    spans = exporter.get_finished_spans()
    trace_id = root.get_span_context().trace_id
    for method in ("SubmitJob", "WatchJob"):
        client = next(x for x in spans if x.name == f"/{COORD}/{method}" and x.kind == SpanKind.CLIENT)
        server = next(x for x in spans if x.name == f"/{COORD}/{method}" and x.kind == SpanKind.SERVER)
        assert client.parent.span_id == root.get_span_context().span_id
        assert server.parent.span_id == client.context.span_id
        assert server.context.trace_id == trace_id
        assert server.attributes["rpc.grpc.status_code"] == 0
    names = {x.name for x in spans if x.kind == SpanKind.SERVER}
    assert {"/aitbc.v1.MinerService/GetChallenge", "/aitbc.v1.MinerService/Register",
            "/aitbc.v1.MinerService/Work"} <= names

    assert metrics.value("aitbc_rpc_requests_total", service=COORD, method="SubmitJob", code="OK") == before + 1
    assert metrics.value("aitbc_rpc_latency_seconds_count", service=COORD, method="SubmitJob") >= 1
