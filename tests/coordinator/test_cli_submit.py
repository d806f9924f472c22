"""`aitbc submit` as a user runs it (a real process against a real coordinator): while queued it
says where the job stands; Ctrl-C leaves the job running and says how to follow it."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Any

from aitbc.v1 import job_pb2
from tests.conftest import API_KEY
from tests.coordinator.test_jobs_api import image_job, stub, wait_done
from tests.coordinator.test_queue_eta import GatedBackend

S = job_pb2.JobState


async def read_until(stream: asyncio.StreamReader, needle: str, seen: list[str]) -> None:
    while True:
        line = (await asyncio.wait_for(stream.readline(), 30)).decode()
        if not line:
            raise AssertionError(f"stream ended before {needle!r}: {''.join(seen)}")
        seen.append(line)
        if needle in line:
            return


async def test_ctrl_c_on_submit_says_the_job_goes_on_and_how_to_follow_it(net: Any, tmp_path: Any) -> None:
    from tests.coordinator.test_jobs_api import MD

    backend = GatedBackend()
    await net.add_miner({"null": backend})
    s = stub(net)
    blocker = (await s.SubmitJob(image_job(model="null", seed=1, steps=1), metadata=MD)).job.job_id
    env = dict(os.environ, AITBC_COORDINATOR=net.address, AITBC_API_KEY=API_KEY)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aitbc.clients.cli", "submit", "a green boat", "--model", "null", "--steps", "1",
        "--width", "64", "--height", "64", "-o", str(tmp_path / "boat.png"), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    seen: list[str] = []
    try:
        await read_until(proc.stderr, "queued: position 1, 1 miner slot", seen)  # behind the blocker
        job_id = next(line.split()[1].rstrip(":") for line in seen if line.startswith("job "))
        proc.send_signal(signal.SIGINT)
        rest = (await asyncio.wait_for(proc.stderr.read(), 30)).decode()
        assert await proc.wait() == 130
    finally:
        if proc.returncode is None:
            proc.kill()
    assert f"interrupted: job {job_id} keeps running" in rest and f"aitbc status {job_id}" in rest, rest
    assert "Traceback" not in rest
    backend.gate.release()
    backend.gate.release()
    await wait_done(s, blocker)
    done = await wait_done(s, job_id)  # the interrupted client's job was not lost
    assert done.state == S.JOB_STATE_COMPLETED
