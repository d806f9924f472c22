"""A job given back to the same miner while its abandoned run is still winding down runs again."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from aitbc import crypto
from aitbc.config import MinerConfig
from aitbc.miner.backend import ImageRequest, NullImageBackend
from aitbc.miner.daemon import MinerDaemon
from aitbc.v1 import job_pb2, miner_pb2


class SlowToStop(NullImageBackend):
    """The null backend, but the first call only notices a cancel once `release` is set: a GPU step
    that was in flight when the stream to the coordinator dropped."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Event()
        self.calls = 0

    def generate(self, req: ImageRequest, on_step: Any, cancel: threading.Event) -> Any:
        self.calls += 1
        if self.calls == 1:
            self.started.set()
            self.release.wait(10)
        return super().generate(req, on_step, cancel)


def assignment(job_id: str) -> miner_pb2.Assignment:
    task = miner_pb2.Task(job_id=job_id, model="null", client_id="alice",
                          params=job_pb2.JobParams(image=job_pb2.ImageParams(prompt="a kite", steps=3, seed=1)))
    return miner_pb2.Assignment(task=task, hub_id="hub", chain_id="aitbc-devnet")


async def test_a_job_reassigned_during_its_abandoned_run_is_run_again() -> None:
    backend = SlowToStop()
    daemon = MinerDaemon(MinerConfig(coordinator="127.0.0.1:1", models=["null"]), crypto.PrivateKey.generate(),
                         {"null": backend})
    outbox: asyncio.Queue[Any] = asyncio.Queue()
    daemon._outbox = outbox
    a = assignment("job-1")
    daemon._start_job(a)
    await asyncio.get_running_loop().run_in_executor(None, backend.started.wait, 10)
    daemon._abandon_all("lost the coordinator stream")  # the stream dropped; the run is still on its thread
    daemon._start_job(a)  # the coordinator, restarted, hands the job back on the new stream
    daemon._start_job(a)  # a duplicate of a live run is still ignored
    backend.release.set()
    kinds: list[str] = []
    async with asyncio.timeout(10):
        while "result" not in kinds:
            msg = await outbox.get()
            kinds.append(msg.WhichOneof("msg"))
    # the abandoned run ended without a word (at most the JobAccepted it sent after 50 ms, when the box
    # was slow); the new one ran the job: its result (and, past its 50 ms start window on a slow box,
    # its 3 steps' progress before it)
    assert [k for k in kinds if k not in ("accepted", "progress")] == ["result"], kinds
    assert kinds.count("progress") in (0, 3), kinds
    assert kinds.count("accepted") <= 1, kinds
    assert backend.calls == 2
    async with asyncio.timeout(5):
        while daemon.running:
            await asyncio.sleep(0.01)
