"""One image job through real servers (coordinator, miner daemon, ledger node, all in this process)
with tracing to the in-memory exporter: the span tree a job makes.

    client.job
      └ CLIENT SubmitJob ─ SERVER SubmitJob {job_id, model}
          ├ coordinator.dispatch {job_id, model, miner_id}     (coordinator core)
          │   └ miner.job {job_id, model}                      (via Assignment.traceparent)
          │       └ miner.generate {job_kind, steps}  + one "denoise.step" event per step
          ├ coordinator.settle {job_id, receipt_hash}          (via Job.traceparent)
          │   └ CLIENT/SERVER LedgerService/BroadcastTransaction
          └ coordinator.settled {state: FINAL}
    ledger.block {height, txs} ── link ──> SERVER BroadcastTransaction

aitbc/coordinator.py sets Job.traceparent at submit and opens the dispatch span whose traceparent
travels in Assignment.traceparent to the miner.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opentelemetry.trace import SpanKind

from aitbc import telemetry
from aitbc.v1 import coordinator_pb2, coordinator_pb2_grpc, job_pb2, receipt_pb2
from tests.conftest import API_KEY
from tests.coordinator.test_settlement import LedgerNode, _settled

MD = (("x-api-key", API_KEY),)
COORD = "aitbc.v1.CoordinatorService"
LEDGER = "aitbc.v1.LedgerService"
STEPS = 3


@dataclass
class TracedJob:
    spans: list[Any]
    root: Any  # the client's own span around SubmitJob and WatchJob
    job: job_pb2.Job  # as GetJob answers once it completed
    settled: receipt_pb2.Receipt | None

    def by_id(self) -> dict[int, Any]:
        return {s.context.span_id: s for s in self.spans}

    def named(self, name: str, kind: SpanKind | None = None, **attrs: Any) -> list[Any]:
        return [s for s in self.spans if s.name == name and (kind is None or s.kind == kind)
                and all(s.attributes.get(k) == v for k, v in attrs.items())]

    def one(self, name: str, kind: SpanKind | None = None, **attrs: Any) -> Any:
        found = self.named(name, kind, **attrs)
        assert len(found) == 1, f"{len(found)} spans named {name} {attrs}; have {sorted({s.name for s in self.spans})}"
        return found[0]

    def children(self, parent: Any, name: str | None = None) -> list[Any]:
        return [s for s in self.spans if s.parent is not None and s.parent.span_id == parent.context.span_id
                and (name is None or s.name == name)]

    def is_descendant(self, span: Any, ancestor: Any) -> bool:
        index = self.by_id()
        while span.parent is not None:
            if span.parent.span_id == ancestor.context.span_id:
                return True
            span = index.get(span.parent.span_id)
            if span is None:
                return False
        return False


async def run_traced_job(network_factory: Any, backend: Any, tmp_path: Path, *, ledger: bool) -> TracedJob:
    telemetry.configure("test", exporter="memory")  # before servers and channels: they get the interceptors
    exporter = telemetry.memory_exporter()
    node = None
    overrides: dict[str, Any] = {}
    if ledger:
        node = LedgerNode.for_network(tmp_path)
        await node.start()
        overrides["ledger"] = node.address
    settled = None
    try:
        net = await network_factory(**overrides)
        await net.add_miner({"null": backend}, price=3 if ledger else 0)
        s = coordinator_pb2_grpc.CoordinatorServiceStub(net.channel())
        with telemetry.span("client.job") as root:
            req = coordinator_pb2.SubmitJobRequest(model="null", params=job_pb2.JobParams(
                image=job_pb2.ImageParams(prompt="a red bicycle", steps=STEPS, seed=5)))
            job = (await s.SubmitJob(req, metadata=MD)).job
            async for _ in s.WatchJob(coordinator_pb2.WatchJobRequest(job_id=job.job_id), metadata=MD, timeout=60):
                pass
        job = (await s.GetJob(coordinator_pb2.GetJobRequest(job_id=job.job_id), metadata=MD)).job
        assert job.state == job_pb2.JobState.JOB_STATE_COMPLETED, job.error
        if ledger:
            settled = await _settled(net, job.job_id)
        await net.close()  # ends the miner's Work stream and its spans
    finally:
        if node is not None:
            await node.stop()
    telemetry.force_flush()
    return TracedJob(list(exporter.get_finished_spans()), root, job, settled)


# ---- what the servicers, the miner and the ledger do on their own ------------------------------


async def test_submit_job_spans_carry_the_job_id(network_factory, null_backend, tmp_path) -> None:  # type: ignore[no-untyped-def]
    t = await run_traced_job(network_factory, null_backend, tmp_path, ledger=False)
    client = t.one(f"/{COORD}/SubmitJob", SpanKind.CLIENT)
    server = t.one(f"/{COORD}/SubmitJob", SpanKind.SERVER)
    assert client.parent.span_id == t.root.get_span_context().span_id
    assert server.parent.span_id == client.context.span_id
    assert server.context.trace_id == t.root.get_span_context().trace_id
    assert server.attributes["job_id"] == t.job.job_id
    assert server.attributes["model"] == "null"
    watch = t.one(f"/{COORD}/WatchJob", SpanKind.SERVER)
    assert watch.attributes["job_id"] == t.job.job_id


async def test_miner_job_span_with_generate_child_and_a_step_event_each(network_factory, null_backend, tmp_path) -> None:  # type: ignore[no-untyped-def]
    t = await run_traced_job(network_factory, null_backend, tmp_path, ledger=False)
    job_span = t.one("miner.job", job_id=t.job.job_id)
    assert job_span.attributes["model"] == "null"
    assert job_span.attributes["miner_id"] == t.job.miner_id
    assert job_span.attributes["unit_type"] == "tile_steps" and job_span.attributes["units"] == t.job.units
    [gen] = t.children(job_span, "miner.generate")
    assert gen.attributes["job_kind"] == "image" and gen.attributes["steps"] == STEPS
    steps = [e for e in gen.events if e.name == "denoise.step"]
    assert [e.attributes["step"] for e in steps] == list(range(1, STEPS + 1))
    assert gen.start_time >= job_span.start_time and gen.end_time <= job_span.end_time


async def test_diffusers_phases_are_children_of_generate_in_order(network_factory, tiny_backend, tmp_path) -> None:  # type: ignore[no-untyped-def]
    t = await run_traced_job(network_factory, tiny_backend, tmp_path, ledger=False)
    [gen] = t.children(t.one("miner.job", job_id=t.job.job_id), "miner.generate")
    names = ["miner.encode_prompt", "miner.denoise", "miner.vae_decode", "miner.encode_png"]
    phases = [t.children(gen, name) for name in names]
    assert all(len(p) == 1 for p in phases), [s.name for s in t.children(gen)]
    prompt, denoise, vae, png = (p[0] for p in phases)
    assert gen.start_time <= prompt.start_time <= prompt.end_time <= denoise.start_time
    assert denoise.end_time == vae.start_time <= vae.end_time <= png.start_time <= png.end_time <= gen.end_time
    assert denoise.attributes["steps"] == STEPS
    # the step events stay on miner.generate, as with every backend
    steps = [e for e in gen.events if e.name == "denoise.step"]
    assert [e.attributes["step"] for e in steps] == list(range(1, STEPS + 1))
    assert all(denoise.start_time <= e.timestamp <= denoise.end_time for e in steps)


async def test_settlement_span_wraps_the_mint_and_its_block_links_back(network_factory, null_backend, tmp_path) -> None:  # type: ignore[no-untyped-def]
    t = await run_traced_job(network_factory, null_backend, tmp_path, ledger=True)
    assert t.settled is not None
    settle = t.one("coordinator.settle", job_id=t.job.job_id)
    assert settle.attributes["receipt_hash"] == t.settled.receipt_hash
    assert settle.attributes["tx_hash"] == t.settled.settlement.tx_hash
    final = t.one("coordinator.settled", job_id=t.job.job_id)
    assert final.attributes["state"] == "SETTLEMENT_STATE_FINAL"
    assert final.attributes["block_height"] == t.settled.settlement.block_height
    # the MINT's broadcast reaches the node inside the settle span ...
    broadcasts = [s for s in t.named(f"/{LEDGER}/BroadcastTransaction", SpanKind.SERVER) if t.is_descendant(s, settle)]
    assert len(broadcasts) == 1
    # ... and the block that includes it links to that call
    block = t.one("ledger.block", height=t.settled.settlement.block_height, source="produced")
    assert block.attributes["txs"] >= 1
    assert any(link.context.span_id == broadcasts[0].context.span_id for link in block.links)


# ---- what needs the coordinator core (aitbc/coordinator.py) --------------------------------------


async def test_job_records_the_submit_traceparent(network_factory, null_backend, tmp_path) -> None:  # type: ignore[no-untyped-def]
    t = await run_traced_job(network_factory, null_backend, tmp_path, ledger=False)
    server = t.one(f"/{COORD}/SubmitJob", SpanKind.SERVER)
    ctx = server.context
    assert t.job.traceparent.startswith(f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-")


async def test_dispatch_span_parents_the_miner_job_span(network_factory, null_backend, tmp_path) -> None:  # type: ignore[no-untyped-def]
    t = await run_traced_job(network_factory, null_backend, tmp_path, ledger=False)
    trace_id = t.root.get_span_context().trace_id
    server = t.one(f"/{COORD}/SubmitJob", SpanKind.SERVER)
    dispatch = t.one("coordinator.dispatch", job_id=t.job.job_id)
    assert dispatch.parent.span_id == server.context.span_id
    assert dispatch.attributes["model"] == "null" and dispatch.attributes["miner_id"] == t.job.miner_id
    job_span = t.one("miner.job", job_id=t.job.job_id)
    assert job_span.parent.span_id == dispatch.context.span_id
    assert job_span.context.trace_id == trace_id
    assert t.children(job_span, "miner.generate")


async def test_settlement_spans_are_in_the_jobs_trace(network_factory, null_backend, tmp_path) -> None:  # type: ignore[no-untyped-def]
    t = await run_traced_job(network_factory, null_backend, tmp_path, ledger=True)
    server = t.one(f"/{COORD}/SubmitJob", SpanKind.SERVER)
    for name in ("coordinator.settle", "coordinator.settled"):
        span = t.one(name, job_id=t.job.job_id)
        assert span.parent.span_id == server.context.span_id
        assert span.context.trace_id == t.root.get_span_context().trace_id
