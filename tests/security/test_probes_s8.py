"""Attack probes written from THREAT-MODEL.md alone (an outside reviewer's view), against real servers
on loopback: each plays one actor of the table and tries what its "must not" column forbids. Only
probes that cover something no other test covers stay here (the rest are in tests/security/ and
tests/coordinator/ already). Each marked (hole) succeeded before the fix its test names:

- colluding fresh keys (hole): failing a job once each in turn used up its max_attempts while an
  established miner was online; a job that lost an attempt now goes to an established miner;
- anonymous miner (hole): streaming a text job in 2-character deltas held ~30x the per-job cap in
  memory; a delta counts as at least DELTA_CHARS;
- anonymous miner (hole): repeating one word about a job (the same JobProgress, JobAccepted again)
  kept stall detection quiet for ever; an attempt ends at max_run_s whatever the miner says;
- client (hole): the rate limit alone let one key queue rate x queue_ttl_s jobs ahead of everyone
  else's and hold any number of WatchJob/GetJobResult streams: max_active_jobs, max_streams;
- client: another client's job ids, prompt hashes and client ids do not leak through the public
  GetMarket or ListMiners (regression);
- local process (hole): the PostgreSQL server of tests and `aitbc devnet --postgres` trusted every
  login on 127.0.0.1, a port any local user reaches; a login there needs the cluster's password
  (a 0600 file); the devnet's service logs and config files are its owner's only;
- operator mistake (hole): a chain_id that is not the ledger's started a coordinator whose receipts
  were all REJECTED; it is refused at start, and with the ledger down then, no receipt is sent to
  the wrong chain later. A typo inside a [[clients]] or [[models]] entry is named, a fractional
  count refused (it was truncated), and a max_run_s under 1 s refused.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
from pathlib import Path
from typing import Any

import grpc
import pytest

from aitbc.config import ClientKey, CoordinatorConfig
from aitbc.coordinator.clock import FakeClock
from aitbc.errors import FailedPrecondition, InvalidArgument
from aitbc.v1 import coordinator_pb2, coordinator_pb2_grpc, job_pb2, miner_pb2
from tests.conftest import API_KEY, OTHER_KEY
from tests.security.test_security import RawMiner, image_job, wait_done

pytestmark = pytest.mark.timeout(120)

S = job_pb2.JobState
MD = (("x-api-key", API_KEY),)
BOB_MD = (("x-api-key", OTHER_KEY),)


def mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


# ---- anonymous miner: hold a job without running it -----------------------------------------------


async def _held_task(net: Any, m: RawMiner) -> miner_pb2.Task:
    s = coordinator_pb2_grpc.CoordinatorServiceStub(net.channel())
    await s.SubmitJob(image_job(seed=3, width=64, height=64, steps=2), metadata=MD)
    msg = await m.read()
    assert msg.WhichOneof("msg") == "assignment"
    return msg.assignment.task


@pytest.mark.parametrize("word", ["same_progress", "accepted_again"])
async def test_a_miner_repeating_one_word_cannot_hold_a_job_past_max_run_s(network_factory: Any, word: str) -> None:
    """Each word comes well within stall_timeout_s, so the miner never counts as silent; it never
    gets further than step 1 of 2. The attempt still ends at max_run_s: the job goes back to the
    queue with the reason, the miner is told to drop it, and counts a stall."""
    clock = FakeClock()
    net = await network_factory(clock=clock, stall_timeout_s=30.0, max_run_s=100.0,
                                heartbeat_timeout_s=1e6)  # heartbeats are not what this probe is about
    m = RawMiner(net)
    await m.connect()
    task = await _held_task(net, m)
    held = net.core.machine.miners[m.key.address]
    for _ in range(6):  # 6 x 20 s: past max_run_s, each word within stall_timeout_s of the last
        if word == "same_progress":
            m.send(progress=job_pb2.JobProgress(job_id=task.job_id, step=1, total_steps=2))
        else:
            m.send(accepted=miner_pb2.JobAccepted(job_id=task.job_id))
        await net.until(lambda: held.active_at == clock.t)  # the coordinator heard it at this instant
        clock.advance(20.0)
        if net.core.machine.job(task.job_id).attempts > 1:
            break
    # taken back (and, with no other miner, offered to it again: a new attempt, with its own clock)
    await net.until(lambda: net.core.machine.job(task.job_id).attempts == 2)
    job = net.core.machine.job(task.job_id)
    assert any("held the job past max_run_s 100 s" in e.cause for e in job.story), job.story
    cancel = await m.read()
    assert cancel.WhichOneof("msg") == "cancel" and cancel.cancel.job_id == task.job_id
    assert "max_run_s" in cancel.cancel.reason
    assert net.core.book.snapshot(m.key.address).stalls == 1


async def test_fresh_keys_failing_in_turn_do_not_use_up_a_jobs_attempts(network_factory: Any, null_backend: Any) -> None:
    """Colluding fresh keys, free (price 0) so they win matching, each fail a job once (not
    permanently): three of them used up every job's max_attempts (3) while an established honest
    miner was online, and the client's jobs FAILED. A job that lost an attempt now goes to an
    established miner when one could take it (waiting for it when busy)."""
    from aitbc import crypto

    honest_key = crypto.PrivateKey.generate()
    net = await network_factory(trust_checks=5, trusted_miners=[honest_key.address])  # the product's bootstrap
    honest = await net.add_miner({"null": null_backend}, price=1, key=honest_key)
    sybils = [RawMiner(net) for _ in range(3)]
    for sybil in sybils:
        await sybil.connect(price_per_unit=0, max_concurrency=64)

    async def fail_everything(m: RawMiner) -> None:
        while (msg := await m.call.read()) is not grpc.aio.EOF:
            if msg.WhichOneof("msg") == "assignment":
                m.send(failed=miner_pb2.JobFailed(job_id=msg.assignment.task.job_id, reason="out of memory"))

    tasks = [asyncio.create_task(fail_everything(m)) for m in sybils]
    s = coordinator_pb2_grpc.CoordinatorServiceStub(net.channel())
    try:
        ids = [(await s.SubmitJob(image_job(seed=i, width=64, height=64, steps=2), metadata=MD)).job.job_id
               for i in range(3)]
        done = [await wait_done(s, j) for j in ids]
    finally:
        for t in tasks:
            t.cancel()
    assert [(d.state, d.miner_id) for d in done] == [(S.JOB_STATE_COMPLETED, honest.key.address)] * 3, \
        [d.error for d in done]
    assert sum(net.core.book.snapshot(m.key.address).failures for m in sybils) >= 1  # they did take first attempts
    assert all(d.attempts <= 2 for d in done)  # one lost attempt at most: the retry went to the established miner


def test_tiny_text_deltas_cannot_hold_many_times_the_streamed_text_cap_in_memory() -> None:
    """A miner streaming a text job two characters at a time: each delta is a str object (~50 bytes)
    and a list slot, so 1 MiB of characters as 524,288 deltas held ~30 MiB per job (64 jobs per
    fresh key). A delta counts as at least DELTA_CHARS now; an honest stream (a token's text per
    TextChunk, max_new_tokens of them) stays far below the cap."""
    from aitbc import jobs
    from aitbc.coordinator.streams import DELTA_CHARS, MAX_STREAMED_CHARS, JobStreams

    streams = JobStreams()
    accepted = 0
    with pytest.raises(InvalidArgument, match="send a token's text"):
        while accepted < MAX_STREAMED_CHARS:  # bounded: the cap ends it long before
            streams.append_text("j1", "ab")
            accepted += 1
    assert accepted == MAX_STREAMED_CHARS // DELTA_CHARS
    honest = JobStreams()
    for _ in range(jobs.MAX_NEW_TOKENS):
        honest.append_text("j2", " word")
    assert honest.text("j2") == " word" * jobs.MAX_NEW_TOKENS
    # the budget is not the offset: chars() stays the real count, which text offsets are made from
    # (a watcher on another coordinator places each delta by it: docs/scaling.md)
    assert honest.chars("j2") == len(" word") * jobs.MAX_NEW_TOKENS


def test_a_max_run_s_the_coordinator_would_trip_over_is_refused_naming_it(tmp_path: Path) -> None:
    for bad in (0.0, -1.0, 0.5):  # every job taken back at the next tick
        with pytest.raises(InvalidArgument, match="'max_run_s' must be at least 1"):
            CoordinatorConfig(data_dir=str(tmp_path), max_run_s=bad)


async def test_a_chain_id_that_is_not_the_ledgers_is_refused_at_start_and_never_rejects_receipts(
        network_factory: Any, null_backend: Any, tmp_path: Path, caplog: Any) -> None:
    """A typo in chain_id (or a ledger of another chain) started a coordinator whose every receipt
    the ledger then REJECTED for good: miners unpaid, silently but for a log line per receipt. A
    ledger that answers at start must serve the coordinator's chain_id; one reached later that does
    not gets no receipt (they wait, health NOT_SERVING), so fixing the setting pays them all."""
    from aitbc.server.coordinator import start_coordinator
    from aitbc.v1 import receipt_pb2
    from tests.coordinator.test_settlement import LedgerNode

    ledger = LedgerNode.for_network(tmp_path)  # chain "aitbc-devnet"
    await ledger.start()
    try:
        conf = CoordinatorConfig(listen="127.0.0.1:0", data_dir=str(tmp_path / "c"), key_file=str(tmp_path / "c.key"),
                                 ledger=ledger.address, chain_id="aitbc-devnt")
        with pytest.raises(FailedPrecondition) as err:
            await start_coordinator(conf)
        assert "serves chain 'aitbc-devnet' but this coordinator's chain_id is 'aitbc-devnt'" in err.value.message
        assert not (tmp_path / "c").exists()  # refused before anything was opened
    finally:
        await ledger.stop()  # down at the coordinator's start: it cannot tell yet
    net = await network_factory(ledger=ledger.address, chain_id="aitbc-devnt")
    await net.add_miner({"null": null_backend}, price=2)
    s = coordinator_pb2_grpc.CoordinatorServiceStub(net.channel())
    job = (await s.SubmitJob(image_job(seed=1, width=64, height=64), metadata=MD)).job
    async for _ in s.WatchJob(coordinator_pb2.WatchJobRequest(job_id=job.job_id), metadata=MD, timeout=60):
        pass
    await ledger.start()
    try:
        await net.until(lambda: "receipts wait, retrying with backoff: ledger" in caplog.text)  # it reached it
        rec = (await s.GetReceipt(coordinator_pb2.GetReceiptRequest(job_id=job.job_id), metadata=MD)).receipt
        assert rec.settlement.state == receipt_pb2.SETTLEMENT_STATE_PENDING, rec.settlement.error
        assert not net.proc.settlement.ledger_reachable  # the settlement health says NOT_SERVING
    finally:
        await ledger.stop()


@pytest.mark.parametrize(("text", "needle"), [
    ('[[clients]]\nid = "alice"\napi_key_sha256 = "00"\nrate_per_sec = 5\n',  # meant rate_per_s: no limit
     "config key 'clients': unknown keys rate_per_sec in an entry"),
    ('[[models]]\nname = "tiny-sd"\nkind = "image"\nmax_price_per_units = 5\n',  # meant the ceiling
     "config key 'models': unknown keys max_price_per_units in an entry"),
    ("max_attempts = 2.5\n", "config key 'max_attempts': expected int, got 2.5"),  # not silently 2
])
def test_a_typo_in_a_config_entry_or_a_fractional_count_is_refused_naming_it(tmp_path: Path, text: str,
                                                                              needle: str) -> None:
    from aitbc import config

    f = tmp_path / "coordinator.toml"
    f.write_text(text)
    with pytest.raises(InvalidArgument) as err:
        config.load(CoordinatorConfig, f, "COORDINATOR")
    assert needle in err.value.message, err.value.message


# ---- client: another client's jobs through the public views ---------------------------------------


async def test_a_client_has_at_most_max_active_jobs_unfinished_and_others_still_submit(network_factory: Any) -> None:
    """The rate limit alone let one key queue rate x queue_ttl_s jobs (50/s for 600 s: 30,000), every
    one ahead of the next client's. At max_active_jobs the next submission is RESOURCE_EXHAUSTED
    naming the setting; a resubmission of a request id still answers its job; another client
    submits; a cancelled job frees its place."""
    net = await network_factory(clients=[
        ClientKey("alice", hashlib.sha256(API_KEY.encode()).hexdigest(), max_active_jobs=3),
        ClientKey("bob", hashlib.sha256(OTHER_KEY.encode()).hexdigest(), max_active_jobs=3)])
    m = RawMiner(net)
    await m.connect()  # takes one job and never finishes it: the others wait in the queue
    s = coordinator_pb2_grpc.CoordinatorServiceStub(net.channel())
    mine = [(await s.SubmitJob(image_job(seed=i, width=64, height=64), metadata=MD)).job
            for i in range(2)]
    kept = image_job(seed=7, width=64, height=64)
    kept.request_id = "alice-7"
    mine.append((await s.SubmitJob(kept, metadata=MD)).job)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.SubmitJob(image_job(seed=8, width=64, height=64), metadata=MD)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "already has 3 unfinished jobs (max_active_jobs 3)" in err.value.details()
    assert (await s.SubmitJob(kept, metadata=MD)).job.job_id == mine[2].job_id  # the same request: its job
    await s.SubmitJob(image_job(seed=9, width=64, height=64), metadata=BOB_MD)  # bob is not alice
    await s.CancelJob(coordinator_pb2.CancelJobRequest(job_id=mine[1].job_id), metadata=MD)
    assert (await s.SubmitJob(image_job(seed=8, width=64, height=64), metadata=MD)).job.state == S.JOB_STATE_QUEUED


async def test_the_public_market_and_miner_list_name_no_job_prompt_or_client(net: Any, null_backend: Any) -> None:
    await net.add_miner({"null": null_backend})
    s = coordinator_pb2_grpc.CoordinatorServiceStub(net.channel())
    job = (await s.SubmitJob(image_job(prompt="alice's secret plan", seed=9, width=64, height=64),
                             metadata=MD)).job
    async for _ in s.WatchJob(coordinator_pb2.WatchJobRequest(job_id=job.job_id), metadata=MD, timeout=60):
        pass
    done = (await s.GetJob(coordinator_pb2.GetJobRequest(job_id=job.job_id), metadata=MD)).job
    assert done.state == S.JOB_STATE_COMPLETED
    market = await coordinator_pb2_grpc.MarketServiceStub(net.channel()).GetMarket(coordinator_pb2.GetMarketRequest())
    assert market.recent_fills  # the fill is public, as docs/coordinator.md says
    miners = await s.ListMiners(coordinator_pb2.ListMinersRequest(), metadata=BOB_MD)
    for public in (market.SerializeToString(), miners.SerializeToString()):
        for secret in (done.job_id, done.prompt_hash, done.receipt_hash, "alice", done.receipt.body.nonce):
            assert secret.encode() not in public, secret
    with pytest.raises(grpc.aio.AioRpcError) as err:  # and the id itself opens nothing to bob
        await s.GetJob(coordinator_pb2.GetJobRequest(job_id=done.job_id), metadata=BOB_MD)
    assert err.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED)


async def test_a_client_holds_at_most_max_streams_open_and_a_closed_one_frees_its_place(network_factory: Any) -> None:
    """The rate limit alone let one key pile up WatchJob streams on a job that does not end (or
    downloads it never reads): each holds a queue and a call in the coordinator for as long as it
    likes. At max_streams the next is RESOURCE_EXHAUSTED naming the setting; other clients are not
    affected, and a closed stream frees its place."""
    net = await network_factory(clients=[
        ClientKey("alice", hashlib.sha256(API_KEY.encode()).hexdigest(), max_streams=3),
        ClientKey("bob", hashlib.sha256(OTHER_KEY.encode()).hexdigest(), max_streams=3)])
    m = RawMiner(net)
    await m.connect()
    task = await _held_task(net, m)  # held by a miner that never finishes it: its watchers stay
    s = coordinator_pb2_grpc.CoordinatorServiceStub(net.channel())
    watch = coordinator_pb2.WatchJobRequest(job_id=task.job_id)
    calls = [s.WatchJob(watch, metadata=MD, timeout=60) for _ in range(3)]
    for c in calls:
        await c.read()  # the snapshot: the stream is open
    assert net.core.auth.streams("alice") == 3
    extra = s.WatchJob(watch, metadata=MD, timeout=60)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await extra.read()
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "already has 3 streams open" in err.value.details() and "max_streams 3" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:  # downloads count too (refused before the job is read)
        async for _ in s.GetJobResult(coordinator_pb2.GetJobResultRequest(job_id=task.job_id), metadata=MD):
            pass
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    bob = await coordinator_pb2_grpc.CoordinatorServiceStub(net.channel()).SubmitJob(
        image_job(seed=4, width=64, height=64), metadata=BOB_MD)  # bob's own calls are not alice's streams
    bob_watch = s.WatchJob(coordinator_pb2.WatchJobRequest(job_id=bob.job.job_id), metadata=BOB_MD, timeout=60)
    await bob_watch.read()
    bob_watch.cancel()
    calls[0].cancel()  # a closed stream frees its place
    await net.until(lambda: net.core.auth.streams("alice") == 2)
    again = s.WatchJob(watch, metadata=MD, timeout=60)
    assert (await again.read()).job.job_id == task.job_id
    for c in (*calls[1:], again):
        c.cancel()
    await net.until(lambda: net.core.auth.streams("alice") == 0)


# ---- local process: the database and the devnet's files -------------------------------------------


def test_a_tcp_login_to_the_local_postgres_needs_its_password(postgres: Any) -> None:
    import psycopg

    with pytest.raises(psycopg.OperationalError, match="password"):  # any local user reaches the port
        psycopg.connect(f"postgresql://{postgres.superuser}@127.0.0.1:{postgres.port}/postgres", connect_timeout=10)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(f"postgresql://{postgres.superuser}:guess@127.0.0.1:{postgres.port}/postgres",
                        connect_timeout=10)
    psycopg.connect(postgres.url(), connect_timeout=10).close()  # the URL the coordinator is given works
    assert mode(postgres.password_file) == 0o600 and mode(postgres.folder) == 0o700
    assert mode(postgres.data) == 0o700


def test_a_devnet_services_log_is_its_owners_only(tmp_path: Path) -> None:
    from aitbc.clients.devnet import Child

    child = Child("probe", ["/bin/sh", "-c", "echo a line of a log"], tmp_path / "logs" / "probe.log")
    child.start()
    assert child.proc is not None and child.proc.wait(30) == 0
    assert child.tail() == "a line of a log"
    assert mode(tmp_path / "logs" / "probe.log") == 0o600 and mode(tmp_path / "logs") == 0o700


def test_what_a_devnet_writes_before_it_starts_is_its_owners_only(tmp_path: Path) -> None:
    """Configs (a coordinator's names the database's password with --postgres), keys and state:
    0600 in 0700 folders; only the genesis, which every node of the chain is given, is public."""
    from aitbc.clients.devnet import Devnet

    d = tmp_path / "devnet"
    Devnet(d, coordinator_listen="127.0.0.1:0", miner_ops_listen="127.0.0.1:0", ledger_listen="127.0.0.1:0",
           explorer_listen="127.0.0.1:0").prepare()
    (d / "miner.toml").chmod(0o644)  # a file left readable by an older devnet is made private again
    Devnet(d, coordinator_listen="127.0.0.1:0", miner_ops_listen="127.0.0.1:0", ledger_listen="127.0.0.1:0",
           explorer_listen="127.0.0.1:0").prepare()
    written = {p.relative_to(d).as_posix(): mode(p) for p in d.rglob("*")}
    assert {"coordinator.toml", "miner.toml", "keys/miner.key", "devnet.json"} <= set(written)
    for name, m in written.items():
        want = 0o700 if (d / name).is_dir() else 0o644 if name == "genesis.json" else 0o600
        assert m & ~want == 0 and (name == "genesis.json" or m == want), (name, oct(m))
