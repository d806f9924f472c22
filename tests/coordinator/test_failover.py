"""Several coordinators in a miner's and a client's list (issue 18, first slice): real coordinators
on loopback, each with its own LMDB folder (they share no database yet). A miner whose coordinator
goes away registers with the next one and serves there; the SDK moves reads, WatchJob and a
SubmitJob with a request id to the next coordinator, never a call that is not safe to send twice,
and says so, naming both, when a job lives on a coordinator that is down."""

from __future__ import annotations

import asyncio
import re
import threading
from typing import Any

import grpc
import pytest

from aitbc import crypto, jobs
from aitbc.clients.retry import RetryPolicy
from aitbc.config import MinerConfig
from aitbc.errors import InvalidArgument
from aitbc.v1 import job_pb2, miner_pb2, miner_pb2_grpc
from tests.conftest import API_KEY
from tests.coordinator.test_jobs_api import MD, image_job, stub, wait_done

S = job_pb2.JobState
QUICK = RetryPolicy(attempts=6, total_s=5.0, base_s=0.01, cap_s=0.05)


def in_thread(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """A blocking SDK call, off the event loop that serves the coordinators."""
    return asyncio.get_running_loop().run_in_executor(None, lambda: fn(*args, **kwargs))


async def served_by(net: Any, daemon: Any) -> None:
    await net.until(lambda: daemon.key.address in net.core.miners, timeout=30)


async def test_a_miner_fails_over_to_the_next_coordinator_and_back(network_factory: Any, null_backend: Any) -> None:
    from aitbc.miner.daemon import MinerDaemon, start_ops

    a, b = await network_factory(), await network_factory()
    daemon = MinerDaemon(MinerConfig(coordinator=[a.address, b.address], models=["null"], reconnect_max_s=0.5),
                         crypto.PrivateKey.generate(), {"null": null_backend})
    task = asyncio.create_task(daemon.run())
    ops = await start_ops(daemon, "127.0.0.1:0")
    ops_ch = grpc.aio.insecure_channel(f"127.0.0.1:{ops.port}")
    info = miner_pb2_grpc.MinerOpsServiceStub(ops_ch)
    try:
        await served_by(a, daemon)
        assert (await info.GetInfo(miner_pb2.GetInfoRequest())).coordinator == a.address

        await a.stop_coordinator()  # its Work stream ends: the miner registers with b and serves there
        await served_by(b, daemon)
        job = (await stub(b).SubmitJob(image_job(model="null"), metadata=MD)).job
        assert (await wait_done(stub(b), job.job_id)).state == S.JOB_STATE_COMPLETED
        got = await info.GetInfo(miner_pb2.GetInfoRequest())
        assert got.coordinator == b.address and got.connected

        await a.start_coordinator()  # same port, same data
        await b.stop_coordinator()  # and back to a
        await served_by(a, daemon)
        job = (await stub(a).SubmitJob(image_job(model="null"), metadata=MD)).job
        assert (await wait_done(stub(a), job.job_id)).state == S.JOB_STATE_COMPLETED
        assert (await info.GetInfo(miner_pb2.GetInfoRequest())).coordinator == a.address
    finally:
        daemon.stop()
        await asyncio.wait_for(task, 10)
        await ops_ch.close()
        await ops.stop(0)


async def test_a_miner_whose_every_coordinator_is_down_waits_between_rounds(null_backend: Any) -> None:
    """Two addresses nobody listens on: every round of two failed sessions is followed by one
    backoff wait (no hot loop), and the daemon keeps trying both in turn."""
    from aitbc.miner import daemon as d

    tried: list[str] = []
    waits: list[float] = []
    daemon = d.MinerDaemon(MinerConfig(coordinator=["127.0.0.1:1", "127.0.0.1:2"], models=["null"],
                                       reconnect_max_s=0.05), crypto.PrivateKey.generate(), {"null": null_backend})
    session = daemon._session

    async def counting(target: str) -> None:
        tried.append(target)
        if len(tried) >= 6:
            daemon.stop()
        await session(target)

    real_wait = d.aio.wait_event

    async def wait(event: asyncio.Event, timeout: float) -> bool:
        waits.append(timeout)
        return await real_wait(event, timeout)

    daemon._session = counting  # type: ignore[method-assign]
    d.aio.wait_event = wait  # type: ignore[assignment]
    try:
        await asyncio.wait_for(daemon.run(), 30)
    finally:
        d.aio.wait_event = real_wait  # type: ignore[assignment]
    assert tried == ["127.0.0.1:1", "127.0.0.1:2"] * 3
    assert len(waits) == 2  # after the 1st and the 2nd round; the 3rd ended with stop()


async def test_the_sdk_fails_over_reads_and_a_submit_with_a_request_id(network_factory: Any, null_backend: Any) -> None:
    from aitbc.clients.sdk import CoordinatorClient

    a, b = await network_factory(), await network_factory()
    await b.add_miner({"null": null_backend})
    await a.stop_coordinator()
    moves: list[tuple[str, str, str]] = []

    def fresh() -> CoordinatorClient:  # a client as a script makes it: a first, and a is down
        return CoordinatorClient([a.address, b.address], API_KEY, timeout=5, retry=QUICK,
                                 on_failover=lambda src, err, to: moves.append((src, err.code, to)))

    with fresh() as client:
        assert [m.name for m in await in_thread(client.list_models)] == ["null"]
        assert moves == [(a.address, "UNAVAILABLE", b.address)] and client.target == b.address
    with fresh() as client:
        job = await in_thread(client.submit_image, "a lighthouse", model="null", request_id="fo-1")
        assert client.target == b.address and job.job_id in b.core.machine.records
    with fresh() as client:
        again = await in_thread(client.submit_image, "a lighthouse", model="null", request_id="fo-1")
        assert again.job_id == job.job_id  # the request id: b answers with the job it queued
    with fresh() as client:
        states = [ev.state for ev in await in_thread(lambda: list(client.watch(job.job_id)))
                  if isinstance(ev, job_pb2.Job)]
        assert states[-1] == S.JOB_STATE_COMPLETED
    with fresh() as client:
        art, data = await in_thread(client.result, job.job_id)
        assert art.sha256 and data
    with fresh() as client:
        assert (await in_thread(client.receipt, job_id=job.job_id)).receipt_hash
    assert len(moves) == 6 and all(m == (a.address, "UNAVAILABLE", b.address) for m in moves)


def test_the_sdk_tries_every_coordinator_at_once_and_waits_only_after_a_full_round() -> None:
    from aitbc.clients.sdk import ClientError, CoordinatorClient

    sleeps: list[float] = []
    moves: list[tuple[str, str]] = []
    down = ["127.0.0.1:1", "127.0.0.1:2"]  # nobody listens: UNAVAILABLE at once
    with CoordinatorClient(down, API_KEY, timeout=5, sleep=sleeps.append,
                           retry=RetryPolicy(attempts=6, total_s=30.0, base_s=0.001, cap_s=0.001),
                           on_failover=lambda src, err, to: moves.append((src, to))) as client:
        with pytest.raises(ClientError) as err:
            client.list_models()
    assert err.value.code == "UNAVAILABLE" and "ListModels failed on every coordinator" in err.value.message
    assert all(f"{t}: UNAVAILABLE" in err.value.message for t in down)
    # 6 attempts: a, b (wait), a, b (wait), a, b: a move inside each round, a wait between rounds
    assert moves == [(down[0], down[1])] * 3 and len(sleeps) == 2 and client.retries == 5


async def test_a_submit_without_a_request_id_goes_to_one_coordinator_only(network_factory: Any,
                                                                         null_backend: Any) -> None:
    from aitbc.clients.sdk import ClientError, CoordinatorClient

    a, b = await network_factory(), await network_factory()
    await b.add_miner({"null": null_backend})
    await a.stop_coordinator()
    client = CoordinatorClient([a.address, b.address], API_KEY, timeout=5, retry=QUICK)
    try:
        with pytest.raises(ClientError) as err:
            await in_thread(client.submit_image, "not twice", model="null", request_id=None)
        assert err.value.code == "UNAVAILABLE"
        message = err.value.message
        assert a.address in message and f"not sent to {b.address}" in message and "request_id" in message
        assert b.core.machine.records == {}  # b never saw it
        assert client.retries == 0

        # CancelJob is not sent to another coordinator either (a NOT_FOUND would ask the others)
        with pytest.raises(ClientError) as err:
            await in_thread(client.cancel, jobs.new_job_id())
        assert err.value.code == "UNAVAILABLE" and f"not sent to {b.address}" in err.value.message
    finally:
        client.close()


async def test_a_job_lives_on_the_coordinator_that_accepted_it(network_factory: Any, null_backend: Any) -> None:
    """Until coordinators share a database: B does not know A's job. A read asks each coordinator;
    while A is down the error names both and says where the job lives; a watch resumes when A is back."""
    from aitbc.clients.sdk import ClientError, CoordinatorClient

    a, b = await network_factory(), await network_factory()
    gone = await a.add_miner({"null": null_backend})  # a learns the model, then its miner leaves
    gone.stop()
    await a.until(lambda: gone.key.address not in a.core.miners)
    job = (await stub(a).SubmitJob(image_job(model="null", request_id="on-a"), metadata=MD)).job  # queued on a
    client = CoordinatorClient([b.address, a.address], API_KEY, timeout=5, retry=QUICK)
    try:
        assert (await in_thread(client.get_job, job.job_id)).job_id == job.job_id  # b: NOT_FOUND, then a
        assert client.target == a.address
        with pytest.raises(ClientError) as err:
            await in_thread(client.get_job, job.job_id[:-1] + ("0" if job.job_id[-1] != "0" else "1"))
        assert err.value.code == "NOT_FOUND" and a.address in err.value.message and b.address in err.value.message

        await a.stop_coordinator()
        with pytest.raises(ClientError) as err:
            await in_thread(client.get_job, job.job_id)
        assert err.value.code == "UNAVAILABLE"
        assert f"{b.address}: NOT_FOUND" in err.value.message and f"{a.address}: UNAVAILABLE" in err.value.message
        assert "live only on the coordinator that accepted the job" in err.value.message

        # a watch over a's restart: a lost stream moves to b (NOT_FOUND there), back to a when it is up
        await a.start_coordinator()
        patient = CoordinatorClient([a.address, b.address], API_KEY, timeout=5,
                                    retry=RetryPolicy(attempts=200, total_s=60.0, base_s=0.05, cap_s=0.2))
        seen: list[Any] = []
        first = threading.Event()

        def watch() -> None:
            for ev in patient.watch(job.job_id):
                seen.append(ev)
                first.set()

        watcher = in_thread(watch)
        await asyncio.get_running_loop().run_in_executor(None, first.wait, 30)
        await a.restart_coordinator()
        await a.add_miner({"null": null_backend})
        await asyncio.wait_for(watcher, 60)
        states = [ev.state for ev in seen if isinstance(ev, job_pb2.Job)]
        assert states[-1] == S.JOB_STATE_COMPLETED and patient.retries >= 1
        patient.close()
    finally:
        client.close()


def test_coordinator_lists_are_validated_naming_the_key(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from aitbc import config
    from aitbc.clients import cli
    from aitbc.clients.sdk import CoordinatorClient

    f = tmp_path / "miner.toml"
    f.write_text('coordinator = ["a.example:18000", "[::1]:18001", "unix:/run/aitbc.sock"]\n')
    assert config.load(MinerConfig, f, "MINER").coordinator == ["a.example:18000", "[::1]:18001", "unix:/run/aitbc.sock"]
    f.write_text('coordinator = "a:18000"\n')  # one string stays valid
    assert config.load(MinerConfig, f, "MINER").coordinator == ["a:18000"]
    monkeypatch.setenv("AITBC_MINER_COORDINATOR", "a:1, b:2")
    assert config.load(MinerConfig, f, "MINER").coordinator == ["a:1", "b:2"]
    monkeypatch.delenv("AITBC_MINER_COORDINATOR")
    for text, needle in (("coordinator = []\n", "config key 'coordinator' lists no coordinator"),
                         ('coordinator = ["a:1", "nohost"]\n', "'nohost' is not a coordinator address"),
                         ('coordinator = ["a:99999"]\n', "'a:99999' is not a coordinator address"),
                         ('coordinator = ["a:1", "a:1"]\n', "lists 'a:1' twice"),
                         ("coordinator = 5\n", "config key 'coordinator': expected list[str]")):
        f.write_text(text)
        with pytest.raises(InvalidArgument, match=re.escape(needle)):
            config.load(MinerConfig, f, "MINER")
    with pytest.raises(InvalidArgument, match="config key 'coordinator' lists no coordinator"):
        CoordinatorClient([], API_KEY)
    with pytest.raises(InvalidArgument, match="'b' is not a coordinator address"):
        CoordinatorClient("a:1,b", API_KEY)
    assert CoordinatorClient("a:1, b:2", API_KEY).targets == ["a:1", "b:2"]

    monkeypatch.setenv("AITBC_API_KEY", API_KEY)
    for argv, env, needle in ((["--coordinator", "a:1,b"], {}, "--coordinator: 'b' is not a coordinator address"),
                              ([], {"AITBC_COORDINATOR": " , "}, "AITBC_COORDINATOR lists no coordinator")):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        args = cli.build_parser().parse_args(["status", "some-job", *argv])
        with pytest.raises(InvalidArgument, match=needle):
            cli._coordinators(args, {})
    args = cli.build_parser().parse_args(["status", "some-job"])
    monkeypatch.delenv("AITBC_COORDINATOR")
    assert cli._coordinators(args, {"coordinators": ["x:1", "y:2"], "coordinator": "x:1"}) == ["x:1", "y:2"]


async def test_the_cli_takes_a_comma_separated_list_and_fails_over(network_factory: Any, null_backend: Any,
                                                                   tmp_path: Any) -> None:
    import os
    import sys

    b = await network_factory()
    await b.add_miner({"null": null_backend})
    dead = "127.0.0.1:1"
    env = dict(os.environ, AITBC_COORDINATOR=f"{dead},{b.address}", AITBC_API_KEY=API_KEY)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aitbc.clients.cli", "submit", "a green boat", "--model", "null", "--steps", "1",
        "-o", str(tmp_path / "boat.png"), env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert f"note: coordinator {dead}: UNAVAILABLE" in err.decode() and f"trying {b.address}" in err.decode()
    assert (tmp_path / "boat.png").read_bytes().startswith(b"\x89PNG")

    bad = dict(env, AITBC_COORDINATOR=f"{b.address},nohost")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aitbc.clients.cli", "status", jobs.new_job_id(), env=bad,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode != 0
    assert "error: AITBC_COORDINATOR: 'nohost' is not a coordinator address" in err.decode(), err.decode()
