"""Queue position and ETA of queued jobs (docs/coordinator.md, "Queue position and ETA"): the
pure rule, then GetJob and WatchJob over real gRPC with a miner whose jobs finish when the test
says (no sleeps, no timed assertions)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

from aitbc.coordinator import eta
from aitbc.miner.backend import ImageOutput, ImageRequest, NullImageBackend
from aitbc.v1 import coordinator_pb2, job_pb2
from tests.coordinator.test_jobs_api import MD, image_job, stub, wait_done

S = job_pb2.JobState


def test_positions_count_only_jobs_that_compete_for_the_same_miners() -> None:
    def job(jid: str, model: str, text: bool = False) -> job_pb2.Job:
        params = job_pb2.JobParams(text=job_pb2.TextParams(prompt="x")) if text else job_pb2.JobParams(
            image=job_pb2.ImageParams(prompt="x"))
        return job_pb2.Job(job_id=jid, model=model, params=params)

    q = [job("a", "sd"), job("b", "llm", text=True), job("c", "sd"), job("d", "other"), job("e", "sd")]
    assert eta.positions(q) == {"a": 1, "b": 1, "c": 2, "d": 1, "e": 3}


def test_the_estimate_is_rounds_of_the_measured_service_time() -> None:
    times = eta.ServiceTimes(keep=4)
    assert times.quantiles("sd") is None
    for s in (1.0, 2.0, 3.0, 10.0, 4.0):  # the oldest (1.0) falls out: the last 4 are kept
        times.add("sd", s)
    assert times.quantiles("sd") == (3.0, 10.0, 4)
    service = times.quantiles("sd")
    # 2 slots, both busy: positions 1-2 wait one round, 3-4 two rounds
    assert eta.queue_info(1, eta.Capacity(2, 0), service).eta_p50_ms == 3000
    assert eta.queue_info(3, eta.Capacity(2, 0), service).eta_p50_ms == 6000
    assert eta.queue_info(3, eta.Capacity(2, 0), service).eta_p90_ms == 20000
    # a free slot: the next job starts at once
    assert eta.queue_info(1, eta.Capacity(2, 1), service).eta_p50_ms == 0
    unknown = eta.queue_info(2, eta.Capacity(1, 0), None)
    assert unknown.can_run and not unknown.eta_known and unknown.position == 2
    nobody = eta.queue_info(1, eta.Capacity(0, 0), service)
    assert not nobody.can_run and not nobody.eta_known


class GatedBackend(NullImageBackend):
    """Each job waits until the test opens its gate (one release per job)."""

    def __init__(self) -> None:
        self.gate = threading.Semaphore(0)

    def generate(self, req: ImageRequest, on_step: Callable[[int, int], None], cancel: threading.Event) -> ImageOutput:
        while not self.gate.acquire(timeout=0.05):
            if cancel.is_set():
                break
        return super().generate(req, on_step, cancel)


async def get(s: Any, job_id: str) -> job_pb2.Job:
    return (await s.GetJob(coordinator_pb2.GetJobRequest(job_id=job_id), metadata=MD)).job


async def test_get_and_watch_show_position_slots_and_eta(net: Any) -> None:
    backend = GatedBackend()
    miner = await net.add_miner({"null": backend})
    s = stub(net)
    ids = [(await s.SubmitJob(image_job(model="null", seed=i, steps=1), metadata=MD)).job.job_id for i in range(4)]
    await net.until(lambda: net.core.machine.job(ids[0]).state == S.JOB_STATE_RUNNING)
    d = await get(s, ids[3])
    assert d.state == S.JOB_STATE_QUEUED
    assert (d.queue.position, d.queue.slots, d.queue.can_run, d.queue.eta_known) == (3, 1, True, False)
    assert not (await get(s, ids[0])).HasField("queue")  # only queued jobs have a place in line

    backend.gate.release()  # the first job finishes: now there is a service time to estimate from
    await wait_done(s, ids[0])
    await net.until(lambda: net.core.machine.job(ids[1]).state == S.JOB_STATE_RUNNING)
    c, d = await get(s, ids[2]), await get(s, ids[3])
    assert (c.queue.position, d.queue.position) == (1, 2) and c.queue.eta_known and d.queue.service_samples == 1
    assert d.queue.eta_p50_ms >= c.queue.eta_p50_ms and d.queue.eta_p90_ms >= d.queue.eta_p50_ms

    watch = s.WatchJob(coordinator_pb2.WatchJobRequest(job_id=ids[3]), metadata=MD)
    first = (await asyncio.wait_for(watch.read(), 10)).job
    assert first.queue.position == 2
    backend.gate.release()  # the second job finishes: the watcher hears that the fourth moved up
    while True:
        ev = await asyncio.wait_for(watch.read(), 10)
        if ev.WhichOneof("event") == "job" and ev.job.state == S.JOB_STATE_QUEUED and ev.job.queue.position == 1:
            break
    watch.cancel()

    miner.stop()  # the only miner leaves: the queued jobs say nobody can run them now
    await net.until(lambda: miner.key.address not in net.core.miners)
    d = await get(s, ids[3])
    assert d.state == S.JOB_STATE_QUEUED and not d.queue.can_run and d.queue.slots == 0
    for _ in range(4):
        backend.gate.release()


def test_the_cli_says_where_a_queued_job_stands_and_when_the_bar_ends() -> None:
    import io

    from aitbc.clients.cli import Progress, queue_line

    q = job_pb2.QueueInfo(position=3, slots=2, can_run=True, eta_known=True, eta_p50_ms=6000, eta_p90_ms=9000)
    assert queue_line(q, 4.2) == "queued: position 3, 2 miner slots, waiting 4 s, ETA ~6 s (p90 9 s)"
    assert "ETA unknown" in queue_line(job_pb2.QueueInfo(position=1, slots=1, can_run=True), 0)
    assert "no connected miner can run it now" in queue_line(job_pb2.QueueInfo(position=1), 7)
    now = [100.0]
    out = io.StringIO()
    bar = Progress(out, clock=lambda: now[0])
    bar.step(job_pb2.JobProgress(step=1, total_steps=11))
    now[0] += 2.0  # 2 s for 4 steps: 0.5 s a step, 6 steps left
    bar.step(job_pb2.JobProgress(step=5, total_steps=11))
    assert out.getvalue().splitlines()[-1].endswith("step 5/11, ETA 3 s")
