"""A real coordinator, miner daemon and ledger node (in this process, one metrics endpoint) after one
settled job: every metric docs/operations.md lists is exposed, and the live ones carry real values."""

from __future__ import annotations

import asyncio
import re
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from aitbc import metrics, telemetry
from tests.coordinator.test_jobs_api import MD, image_job, stub, wait_done
from tests.coordinator.test_settlement import LedgerNode, _settled

DOCS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def documented_metrics() -> list[str]:
    return re.findall(r"^\| `(aitbc_[a-z_]+)` \|", DOCS.read_text(), flags=re.M)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise AssertionError(f"no sample {name}{labels}")


async def _one_settled_job(network_factory, null_backend, tmp_path):  # type: ignore[no-untyped-def]
    ledger = LedgerNode.for_network(tmp_path)
    await ledger.start()
    net = await network_factory(ledger=ledger.address)
    await net.add_miner({"null": null_backend}, price=3)
    s = stub(net)
    job = await wait_done(s, (await s.SubmitJob(image_job(model="null", steps=2), metadata=MD)).job.job_id)
    rec = await _settled(net, job.job_id)
    return ledger, net, job, rec


async def test_scrape_exposes_every_documented_metric_with_live_values(network_factory, null_backend, tmp_path) -> None:  # type: ignore[no-untyped-def]
    port = telemetry.setup("test", tracing="none", metrics_listen="127.0.0.1:0")
    assert port
    ledger, net, job, rec = await _one_settled_job(network_factory, null_backend, tmp_path)
    try:
        text = await asyncio.to_thread(scrape, port)
    finally:
        await ledger.stop()
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.M))
    documented = documented_metrics()
    assert set(documented) == set(metrics.declared())  # docs and code list the same metrics
    missing = [name for name in documented if name not in types]
    assert not missing, f"documented but not exposed: {missing}"
    list(text_string_to_metric_families(text))  # the reference parser accepts the whole page

    # coordinator (gauges read at scrape time)
    assert sample(text, "aitbc_miners_connected") == 1
    assert sample(text, "aitbc_queue_depth") == 0
    assert sample(text, "aitbc_rpc_requests_total", service="aitbc.v1.CoordinatorService", method="SubmitJob",
                  code="OK") >= 1
    # miner
    assert sample(text, "aitbc_miner_load") == 0  # the job is done
    # ledger node
    assert sample(text, "aitbc_block_height") >= rec.settlement.block_height
    # one authority: its vote on a block's child certifies the block, so the head waits for its child
    assert sample(text, "aitbc_finality_lag_blocks") <= 1
    assert sample(text, "aitbc_sync_lag_blocks") == 0
    assert sample(text, "aitbc_mempool_size") == 0
    assert sample(text, "aitbc_txs_total", type="MINT") >= 1
    assert sample(text, "aitbc_block_interval_seconds_count") >= 1


async def test_job_metrics_count_the_job(network_factory, null_backend, tmp_path) -> None:  # type: ignore[no-untyped-def]
    before = {
        "completed": metrics.value("aitbc_jobs_total", state="COMPLETED"),
        "queued": metrics.value("aitbc_jobs_total", state="QUEUED"),
        "assigned": metrics.value("aitbc_jobs_total", state="ASSIGNED"),
        "dispatch": metrics.value("aitbc_dispatch_latency_seconds_count"),
        "duration": metrics.value("aitbc_job_duration_seconds_count", model="null"),
        "gpu": metrics.value("aitbc_gpu_seconds_total", model="null"),
    }
    ledger, net, job, rec = await _one_settled_job(network_factory, null_backend, tmp_path)
    await ledger.stop()
    assert metrics.value("aitbc_jobs_total", state="QUEUED") == before["queued"] + 1
    assert metrics.value("aitbc_jobs_total", state="ASSIGNED") == before["assigned"] + 1
    assert metrics.value("aitbc_jobs_total", state="COMPLETED") == before["completed"] + 1
    assert metrics.value("aitbc_dispatch_latency_seconds_count") == before["dispatch"] + 1
    assert metrics.value("aitbc_job_duration_seconds_count", model="null") == before["duration"] + 1
    assert metrics.value("aitbc_gpu_seconds_total", model="null") == pytest.approx(before["gpu"] + job.gpu_ms / 1000)
