"""Several coordinators on one PostgreSQL database (docs/scaling.md): a real server, real
coordinators sharing one attester key, real miners, a real ledger node."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest

from aitbc import crypto
from aitbc.config import ModelConfig
from aitbc.ledger.client import LedgerClient
from aitbc.miner.backend import NullImageBackend
from aitbc.v1 import coordinator_pb2, job_pb2, receipt_pb2
from tests.coordinator.test_jobs_api import MD, image_job, stub, wait_done
from tests.coordinator.test_pg_coordinator import fetch
from tests.coordinator.test_settlement import LedgerNode

S = job_pb2.JobState
St = receipt_pb2.SettlementState


class Gated(NullImageBackend):
    """The null backend, but each run waits until `release` is set (or the job is cancelled): a
    miner in the middle of a job."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Event()

    def generate(self, req: Any, on_step: Any, cancel: threading.Event) -> Any:
        self.started.set()
        while not self.release.is_set() and not cancel.is_set():
            self.release.wait(0.05)
        return super().generate(req, on_step, cancel)


async def pair(network_factory: Any, pg_url: str, tmp_path: Path, **overrides: Any) -> tuple[Any, Any]:
    """Two coordinators on one database with one attester key (docs/scaling.md, "Attestation keys")."""
    key_file = str(tmp_path / "attester.key")
    a = await network_factory(database_url=pg_url, key_file=key_file, **overrides)
    b = await network_factory(database_url=pg_url, key_file=key_file, **overrides)
    return a, b


async def crash(net: Any) -> None:
    """What kill -9 looks like to the others: its database connection ends (the server frees its
    advisory lock), its sockets close, and nothing of it runs again."""
    proc, net.proc = net.proc, None
    for t in proc.tasks:
        t.cancel()
    proc.core.store._closed = True
    proc.core.store._conn.close()
    await proc.running.stop(0)


async def state_of(s: Any, job_id: str) -> int:
    return (await s.GetJob(coordinator_pb2.GetJobRequest(job_id=job_id), metadata=MD)).job.state


async def until_state(s: Any, job_id: str, want: int, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while await state_of(s, job_id) != want:
        assert loop.time() < deadline, f"job {job_id} never reached {S.Name(want)}"
        await asyncio.sleep(0.05)


async def test_a_job_submitted_on_a_runs_on_a_miner_of_b_and_reads_the_same_on_both(
        network_factory: Any, pg_url: str, tmp_path: Path, null_backend: Any) -> None:
    a, b = await pair(network_factory, pg_url, tmp_path)
    assert a.core.key.address == b.core.key.address
    miner = await b.add_miner({"null": null_backend})
    sa, sb = stub(a), stub(b)
    await a.until(lambda: "null" in a.core.served_models())  # B's record of what its miners serve
    sub = (await sa.SubmitJob(image_job(model="null", seed=3, steps=2, request_id="cross-1"), metadata=MD)).job
    assert not a.core.miners and sub.job_id not in a.core.machine.records  # A has no miner: back to the shared queue
    done = await wait_done(sa, sub.job_id)  # watched on A, run by B's miner: A reads the row
    assert done.state == S.JOB_STATE_COMPLETED and done.miner_id == miner.key.address, done.error
    for s in (sa, sb):
        got = (await s.GetJob(coordinator_pb2.GetJobRequest(job_id=sub.job_id), metadata=MD)).job
        assert got.state == S.JOB_STATE_COMPLETED and got.receipt_hash == done.receipt_hash
        rec = (await s.GetReceipt(coordinator_pb2.GetReceiptRequest(job_id=sub.job_id), metadata=MD)).receipt
        assert rec.receipt_hash == done.receipt_hash and rec.body.provider == miner.key.address
        art, data = await fetch(s, sub.job_id)
        assert hashlib.sha256(data).hexdigest() == art.sha256
        listed = (await s.ListReceipts(coordinator_pb2.ListReceiptsRequest(), metadata=MD)).receipts
        assert [r.receipt_hash for r in listed] == [done.receipt_hash]


async def test_the_same_request_id_on_a_and_b_gives_one_job(network_factory: Any, pg_url: str, tmp_path: Path,
                                                            null_backend: Any) -> None:
    a, b = await pair(network_factory, pg_url, tmp_path)
    await b.add_miner({"null": null_backend})
    await a.until(lambda: "null" in a.core.served_models())
    req = image_job(model="null", seed=5, request_id="once-please")
    for _ in range(3):  # at once on both, again and again
        got = await asyncio.gather(stub(a).SubmitJob(req, metadata=MD), stub(b).SubmitJob(req, metadata=MD))
        assert got[0].job.job_id == got[1].job.job_id
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT count(*) FROM jobs").fetchone() == (1,)
    assert (await wait_done(stub(b), got[0].job.job_id)).state == S.JOB_STATE_COMPLETED



async def test_jobs_submitted_to_the_coordinator_without_the_miner_get_the_size_its_miner_declared(
        network_factory: Any, pg_url: str, tmp_path: Path, null_backend: Any) -> None:
    """The devnet's stall (docs/scaling.md, third slice): its coordinators name each model's kind
    in [[models]] and leave the native size to the miner. The first coordinator, where the miner
    registered, learns 64 and saves it; the second learned nothing of a model it already knew, so a
    job submitted there without a size got DEFAULT_NATIVE_SIZE (512 x 512, 64 times the pixels):
    on the devnet's CPU, under load, such a tiny-sd job ran for minutes."""
    a, b = await pair(network_factory, pg_url, tmp_path, models=[ModelConfig(name="null", kind="image")])
    miner = await a.add_miner({"null": null_backend})
    await b.until(lambda: "null" in b.core.served_models())  # read in the pass that reads the model record
    sa, sb = stub(a), stub(b)
    on_a = (await sa.SubmitJob(image_job(model="null", seed=1, steps=2), metadata=MD)).job
    on_b = await asyncio.gather(*(sb.SubmitJob(image_job(model="null", seed=i, steps=2), metadata=MD)
                                  for i in range(2, 8)))
    for job in [on_a, *(r.job for r in on_b)]:  # every coordinator sizes the job as the miner's model does
        assert (job.params.image.width, job.params.image.height) == (64, 64), job.job_id
        done = await wait_done(sb, job.job_id)
        assert done.state == S.JOB_STATE_COMPLETED and done.miner_id == miner.key.address, done.error
        assert (done.artifacts[0].width, done.artifacts[0].height) == (64, 64)
    with psycopg.connect(pg_url) as conn:  # and nothing was left in the queue
        assert conn.execute("SELECT count(*) FROM jobs WHERE active").fetchone() == (0,)


async def test_the_devnet_is_ready_once_every_coordinator_accepts_every_model_as_the_miners_does(
        network_factory: Any, pg_url: str, tmp_path: Path, null_backend: Any) -> None:
    """clients/devnet.py's readiness against real coordinators: a coordinator that refuses a model,
    or sizes it otherwise than the one the miner is on, keeps the devnet from announcing itself."""
    from aitbc.clients.devnet import Devnet
    from tests.conftest import API_KEY

    a, b = await pair(network_factory, pg_url, tmp_path, models=[ModelConfig(name="null", kind="image")])
    odd = await network_factory(database_url=pg_url, key_file=str(tmp_path / "attester.key"),
                                models=[ModelConfig(name="null", kind="image", native_size=128)])
    devnet = Devnet(tmp_path / "devnet", models=["null"])

    async def waiting(*coordinators: Any) -> str:
        return await asyncio.to_thread(devnet._models_everywhere, a.address, [c.address for c in coordinators], API_KEY)

    assert f"coordinator {a.address} does not accept model null yet" in await waiting(a, b)  # no miner anywhere
    await a.add_miner({"null": null_backend})
    await b.until(lambda: "null" in b.core.served_models() and "null" in odd.core.served_models())
    assert await waiting(a, b) == ""  # b sizes it as a's miner does (64)
    assert f"coordinator {odd.address} does not quote model null as {a.address} does yet" in await waiting(a, b, odd)

@pytest.mark.slow
async def test_a_dead_owners_job_is_taken_over_completes_once_elsewhere_and_is_minted_once(
        network_factory: Any, pg_url: str, tmp_path: Path, null_backend: Any) -> None:
    attester = crypto.load_or_create_key(tmp_path / "attester.key").address
    async with LedgerNode(tmp_path, attester) as ledger:
        a, b = await pair(network_factory, pg_url, tmp_path, ledger=ledger.address)
        await a.until(lambda: a.proc.settlement.settling)  # the first one up settles
        assert not b.proc.settlement.settling
        gated = Gated()
        await a.add_miner({"null": gated}, price=7)
        sa, sb = stub(a), stub(b)
        job_id = (await sa.SubmitJob(image_job(model="null", seed=9, steps=2), metadata=MD)).job.job_id
        await until_state(sb, job_id, S.JOB_STATE_RUNNING)  # on A's miner, as B reads it
        assert gated.started.is_set()
        honest = await b.add_miner({"null": null_backend}, price=7)
        dead = a.core.store.coordinator_id
        await crash(a)  # mid-job, A's claim on it never released
        done = await wait_done(sb, job_id)
        assert done.state == S.JOB_STATE_COMPLETED and done.miner_id == honest.key.address, done.error
        assert done.attempts == 2
        assert [t.cause for t in done.story if t.to_state == S.JOB_STATE_QUEUED][-1] == (
            f"coordinator {dead} stopped while a miner held the job")
        await b.until(lambda: b.proc.settlement.settling)  # A's settler lock went with its connection
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while (rec := b.core.store.get_receipt(done.receipt_hash)).settlement.state != St.SETTLEMENT_STATE_FINAL:
            assert loop.time() < deadline, rec.settlement
            await asyncio.sleep(0.1)
        assert [r.body.job_id for r in b.core.store.iter_receipts()] == [job_id]  # one receipt for the job
        async with LedgerClient(ledger.address) as lc:
            assert (await lc.get_account(honest.key.address)).balance == rec.settlement.amount == rec.body.units * 7
        gated.release.set()


async def test_a_taken_over_claim_is_dropped_by_its_old_owner_and_its_miner_told(
        network_factory: Any, pg_url: str, tmp_path: Path, null_backend: Any) -> None:
    a, b = await pair(network_factory, pg_url, tmp_path)
    gated = Gated()
    old = await a.add_miner({"null": gated})
    job_id = (await stub(a).SubmitJob(image_job(model="null", seed=11, steps=2), metadata=MD)).job.job_id
    await until_state(stub(b), job_id, S.JOB_STATE_RUNNING)
    honest = await b.add_miner({"null": null_backend})
    a.core.store.lease_s = 0.0  # A stalls: its renewals no longer keep the lease (B's reaper takes the job)
    await a.until(lambda: job_id not in a.core.machine.records)  # A's renewal found the claim gone
    assert not a.core.machine.miners[old.key.address].held  # and its miner was told to drop the job
    a.core.store.lease_s = 30.0
    done = await wait_done(stub(a), job_id)
    assert done.state == S.JOB_STATE_COMPLETED and done.miner_id == honest.key.address, done.error
    assert [r.body.job_id for r in b.core.store.iter_receipts()] == [job_id]
    gated.release.set()


async def test_cancel_on_any_coordinator(network_factory: Any, pg_url: str, tmp_path: Path) -> None:
    a, b = await pair(network_factory, pg_url, tmp_path, model_grace_s=600.0)
    gated = Gated()
    await a.add_miner({"null": gated})
    sa, sb = stub(a), stub(b)
    running = (await sa.SubmitJob(image_job(model="null", seed=1), metadata=MD)).job.job_id
    await until_state(sb, running, S.JOB_STATE_RUNNING)
    queued = (await sa.SubmitJob(image_job(model="null", seed=2), metadata=MD)).job.job_id  # the miner is busy
    assert await state_of(sb, queued) == S.JOB_STATE_QUEUED
    got = (await sb.CancelJob(coordinator_pb2.CancelJobRequest(job_id=queued), metadata=MD)).job
    assert got.state == S.JOB_STATE_CANCELLED  # a queued job: cancelled where it was asked
    asked = (await sb.CancelJob(coordinator_pb2.CancelJobRequest(job_id=running), metadata=MD)).job
    assert asked.state == S.JOB_STATE_RUNNING  # A runs it: asked of A, which cancels it on its next renewal
    ended = await wait_done(sb, running)
    assert ended.state == S.JOB_STATE_CANCELLED and "asked on another coordinator" in ended.error


async def test_an_idle_coordinator_claims_a_job_given_back_elsewhere_when_the_doorbell_rings(
        network_factory: Any, pg_url: str, tmp_path: Path, null_backend: Any) -> None:
    a, b = await pair(network_factory, pg_url, tmp_path)
    miner = await b.add_miner({"null": null_backend})
    await a.until(lambda: "null" in a.core.served_models())
    b.proc.tasks[0].cancel()  # B's housekeeping (its 0.5 s claim poll) stops: only NOTIFY can wake it
    await asyncio.gather(b.proc.tasks[0], return_exceptions=True)
    job_id = (await stub(a).SubmitJob(image_job(model="null", seed=21), metadata=MD)).job.job_id
    done = await wait_done(stub(a), job_id)
    assert done.state == S.JOB_STATE_COMPLETED and done.miner_id == miner.key.address, done.error


async def test_a_result_for_a_job_taken_over_is_refused_and_never_attested(
        network_factory: Any, pg_url: str, tmp_path: Path, null_backend: Any) -> None:
    a, b = await pair(network_factory, pg_url, tmp_path)
    gated = Gated()
    await a.add_miner({"null": gated})
    job_id = (await stub(a).SubmitJob(image_job(model="null", seed=23, steps=2), metadata=MD)).job.job_id
    await until_state(stub(b), job_id, S.JOB_STATE_RUNNING)
    a.core._renewed_at = a.core._reaped_at = float("inf")  # A stalls and does not notice (no renewal) ...
    with psycopg.connect(pg_url, autocommit=True) as conn:  # ... while its lease runs out
        conn.execute("UPDATE jobs SET lease_until = now() - interval '1 second' WHERE job_id = %s", (job_id,))
    await b.until(lambda: not a.core.store.holds(job_id))  # B's reaper took it over (and queued it again)
    assert job_id in a.core.machine.records  # A still thinks it runs the job
    gated.release.set()  # A's miner sends its result: A checks its claim first
    await a.until(lambda: job_id not in a.core.machine.records)
    a.core._renewed_at = a.core._reaped_at = 0.0  # A is back: its miner runs the job again, as a new attempt
    done = await wait_done(stub(b), job_id)
    assert done.state == S.JOB_STATE_COMPLETED and done.attempts == 2, done.error
    assert [r.receipt_hash for r in b.core.store.iter_receipts()] == [done.receipt_hash]  # the refused run: none
    assert [f.finished_at_unix_ms for f in a.core.fills] == [done.finished_at_unix_ms]  # A completed it once


async def test_two_coordinators_cannot_over_reserve_one_escrow_nor_use_one_quote_twice(
        network_factory: Any, pg_url: str, tmp_path: Path, null_backend: Any) -> None:
    import grpc

    from tests.coordinator.test_paid_jobs import clients, economy, quote_req

    eco = await economy(network_factory, null_backend, tmp_path, escrow=2_000, database_url=pg_url)
    try:  # B: the same database and attester key (the ledger's genesis names A's key)
        b = await network_factory(database_url=pg_url, key_file=str(tmp_path / "net0" / "coordinator.key"),
                                  ledger=eco.ledger.address, clients=clients(eco.client.address))
        await eco.net.add_miner({"null": null_backend}, price=3)
        sa, sb = stub(eco.net), stub(b)
        q1, q2 = [await sa.QuoteJob(quote_req(fee=1_200, seed=n), metadata=MD) for n in (1, 2)]  # 1,230 each

        def paid(q: Any, seed: int) -> Any:
            req = image_job(model="null", steps=10, seed=seed)
            req.quote, req.quote_signature = q.quote, q.quote_signature
            return req

        got = await asyncio.gather(sa.SubmitJob(paid(q1, 1), metadata=MD), sb.SubmitJob(paid(q2, 2), metadata=MD),
                                   return_exceptions=True)
        ok = [g for g in got if not isinstance(g, Exception)]
        refused = [g for g in got if isinstance(g, grpc.aio.AioRpcError)]
        assert len(ok) == 1 and len(refused) == 1, got  # one fits in 2,000, two do not: wherever they went
        assert refused[0].code() == grpc.StatusCode.FAILED_PRECONDITION and "escrow too low" in refused[0].details()
        again = await asyncio.gather(sa.SubmitJob(paid(q1 if ok[0] is got[0] else q2, 3), metadata=MD),
                                     sb.SubmitJob(paid(q1 if ok[0] is got[0] else q2, 4), metadata=MD),
                                     return_exceptions=True)
        assert all(isinstance(g, grpc.aio.AioRpcError) and g.code() == grpc.StatusCode.ALREADY_EXISTS
                   for g in again), again  # its quote is used, on either coordinator
        done = await wait_done(sa, ok[0].job.job_id)
        assert done.state == S.JOB_STATE_COMPLETED, done.error
    finally:
        await eco.lc.close()
        await eco.ledger.stop()


# ---- progress and text across coordinators (job_events, watchers: docs/scaling.md) ----------------------

class Stepped(NullImageBackend):
    """The null backend, but it waits for `release` first and then takes a moment per step, so
    that the miner reports each step (a job that ends inside the miner's start window sends none)."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def generate(self, req: Any, on_step: Any, cancel: threading.Event) -> Any:
        self.release.wait(30)

        def slowly(step: int, total: int) -> None:
            cancel.wait(0.1)
            on_step(step, total)

        return super().generate(req, slowly, cancel)


class PausedText:
    """The null text backend, paused after `pause_after` deltas until `release` is set."""

    def __init__(self, inner: Any, pause_after: int) -> None:
        self.inner, self.pause_after = inner, pause_after
        self.paused, self.release = threading.Event(), threading.Event()
        self.model, self.device, self.context_length = inner.model, inner.device, inner.context_length

    def count_tokens(self, text: str) -> int:
        return self.inner.count_tokens(text)

    def generate(self, req: Any, on_text: Any, cancel: threading.Event) -> Any:
        n = 0

        def gated(delta: str) -> None:
            nonlocal n
            n += 1
            if n == self.pause_after:
                on_text(delta)
                self.paused.set()
                self.release.wait(30)
                return
            on_text(delta)

        return self.inner.generate(req, gated, cancel)

    def trace(self, *args: Any, **kw: Any) -> Any:
        return self.inner.trace(*args, **kw)


def rows(pg_url: str, sql: str, *args: Any) -> Any:
    with psycopg.connect(pg_url) as conn:
        return conn.execute(sql, args).fetchone()[0]


async def watch_all(s: Any, job_id: str, into: list[Any]) -> None:
    async for ev in s.WatchJob(coordinator_pb2.WatchJobRequest(job_id=job_id), metadata=MD, timeout=120):
        into.append(ev)


def of(events: list[Any], kind: str) -> list[Any]:
    return [getattr(e, kind) for e in events if e.WhichOneof("event") == kind]


async def test_progress_of_a_job_run_elsewhere_reaches_watchers_on_two_other_coordinators_and_old_rows_go(
        network_factory: Any, pg_url: str, tmp_path: Path, monkeypatch: Any) -> None:
    from aitbc.coordinator import core

    a, b = await pair(network_factory, pg_url, tmp_path)
    c = await network_factory(database_url=pg_url, key_file=str(tmp_path / "attester.key"))
    stepped = Stepped()
    await b.add_miner({"null": stepped})
    await a.until(lambda: "null" in a.core.served_models())
    job_id = (await stub(a).SubmitJob(image_job(model="null", seed=31, steps=5), metadata=MD)).job.job_id
    on_a, on_b, on_c = [], [], []
    tasks = [asyncio.create_task(watch_all(stub(n), job_id, out)) for n, out in ((a, on_a), (b, on_b), (c, on_c))]
    live = "SELECT count(*) FROM watchers WHERE job_id = %s AND expires > now()"
    await a.until(lambda: rows(pg_url, live, job_id) == 3)
    await b.until(lambda: b.core._watched_elsewhere.get(job_id, (False,))[0])  # the owner has seen them (<= 0.5 s)
    stepped.release.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 60)
    owner = [(p.step, p.total_steps) for p in of(on_b, "progress")]  # what the owner's miner reported
    assert len(owner) >= 2 and owner == sorted(owner) and owner[-1] == (5, 5)
    for events in (on_a, on_c):  # watched on two coordinators that do not run it: every step, then the end
        assert [(p.step, p.total_steps) for p in of(events, "progress")] == owner
        assert of(events, "job")[-1].state == S.JOB_STATE_COMPLETED
        assert events[-1].WhichOneof("event") == "job"
    await a.until(lambda: rows(pg_url, "SELECT count(*) FROM watchers WHERE job_id = %s", job_id) == 0)
    assert rows(pg_url, "SELECT count(*) FROM job_events WHERE job_id = %s", job_id) > 0
    monkeypatch.setattr(core, "EVENT_KEEP_S", 0.0)  # rows of finished jobs: deleted by any housekeeping
    await a.until(lambda: rows(pg_url, "SELECT count(*) FROM job_events") == 0)


async def test_text_of_a_job_run_elsewhere_reaches_late_watchers_from_offset_zero_and_equals_the_result(
        network_factory: Any, pg_url: str, tmp_path: Path, null_text: Any) -> None:
    a, b = await pair(network_factory, pg_url, tmp_path)
    c = await network_factory(database_url=pg_url, key_file=str(tmp_path / "attester.key"))
    paused = PausedText(null_text, pause_after=30)
    await b.add_miner({"null-text": paused})
    await a.until(lambda: "null-text" in a.core.served_models())
    req = coordinator_pb2.SubmitJobRequest(model="null-text", params=job_pb2.JobParams(
        text=job_pb2.TextParams(prompt="several coordinators", max_new_tokens=300, seed=4)))
    job_id = (await stub(a).SubmitJob(req, metadata=MD)).job.job_id
    with psycopg.connect(pg_url, autocommit=True) as conn:  # a watcher row that expired: ignored
        conn.execute("INSERT INTO watchers VALUES (%s, 'gone', now() - interval '1 second')", (job_id,))
    on_b: list[Any] = []
    tasks = [asyncio.create_task(watch_all(stub(b), job_id, on_b))]  # its owner watches it: no rows for that
    await asyncio.to_thread(paused.paused.wait, 30)
    await b.until(lambda: b.core.streams.chars(job_id) > 0 and b.core.streams.watched(job_id))
    await b.until(lambda: rows(pg_url, "SELECT count(*) FROM watchers WHERE coordinator = %s",
                               b.core.store.coordinator_id) == 1)
    for _ in range(3):  # ticks of the owner's housekeeping: nobody else watches, nothing is written
        ticks = b.core._reaped_at
        await b.until(lambda t=ticks: b.core._reaped_at != t)
    assert rows(pg_url, "SELECT count(*) FROM job_events") == 0
    on_a: list[Any] = []
    tasks.append(asyncio.create_task(watch_all(stub(a), job_id, on_a)))  # joins mid-stream, the miner silent
    await a.until(lambda: bool(of(on_a, "text")))
    assert of(on_a, "text")[0].offset == 0 and of(on_a, "text")[0].text == b.core.streams.text(job_id)
    on_c: list[Any] = []
    tasks.append(asyncio.create_task(watch_all(stub(c), job_id, on_c)))  # a second late one: from the rows
    await c.until(lambda: bool(of(on_c, "text")))
    paused.release.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 60)
    _, data = await fetch(stub(a), job_id)
    for events in (on_a, on_b, on_c):
        chunks = of(events, "text")
        assert [t.offset for t in chunks] == [sum(len(t.text) for t in chunks[:i]) for i in range(len(chunks))]
        assert "".join(t.text for t in chunks) == data.decode()
        assert of(events, "job")[-1].state == S.JOB_STATE_COMPLETED
    assert len(of(on_a, "text")) > 1  # streamed as it came, not only at the end


async def test_with_the_doorbell_and_the_poll_of_events_stopped_the_text_still_comes_before_the_end(
        network_factory: Any, pg_url: str, tmp_path: Path, null_text: Any) -> None:
    a, b = await pair(network_factory, pg_url, tmp_path)
    paused = PausedText(null_text, pause_after=10)
    await b.add_miner({"null-text": paused})
    await a.until(lambda: "null-text" in a.core.served_models())
    a.core.store.stop_listening()  # no NOTIFY aitbc_events heard on A ...
    a.proc.tasks[0].cancel()  # ... nor its housekeeping's reads: only the watch's poll of the job row
    await asyncio.gather(a.proc.tasks[0], return_exceptions=True)
    req = coordinator_pb2.SubmitJobRequest(model="null-text", params=job_pb2.JobParams(
        text=job_pb2.TextParams(prompt="a lost notification", max_new_tokens=400, seed=6)))
    job_id = (await stub(a).SubmitJob(req, metadata=MD)).job.job_id
    on_a: list[Any] = []
    watching = asyncio.create_task(watch_all(stub(a), job_id, on_a))
    await asyncio.to_thread(paused.paused.wait, 30)
    await b.until(lambda: b.core._watched_elsewhere.get(job_id, (False,))[0])  # B writes rows for A's watch
    paused.release.set()
    await asyncio.wait_for(watching, 60)
    _, data = await fetch(stub(a), job_id)
    assert of(on_a, "job")[-1].state == S.JOB_STATE_COMPLETED
    assert "".join(t.text for t in of(on_a, "text")) == data.decode()  # read before the end was published


async def test_the_reaper_deletes_a_reservation_whose_job_was_never_written_after_the_grace(
        network_factory: Any, pg_url: str, tmp_path: Path) -> None:
    from aitbc.coordinator.clock import FakeClock
    from aitbc.coordinator.core import ORPHAN_GRACE_S, REAP_S
    from aitbc.coordinator.fees import Charge
    from aitbc.coordinator.pgstore import PostgresJobStore

    clock = FakeClock()
    a = await network_factory(clock=clock, database_url=pg_url)
    dead = PostgresJobStore(pg_url)  # a coordinator that reserved for a paid job and died before its write
    dead.reservations().reserve(Charge("never-written", "ait1client", 500, "q", 5), 10_000)
    dead.close()
    clock.advance(REAP_S)
    await a.until(lambda: "never-written" in a.core.reservations._orphans)  # seen without its job: the grace starts
    assert rows(pg_url, "SELECT count(*) FROM reservations") == 1
    clock.advance(ORPHAN_GRACE_S)
    await a.until(lambda: rows(pg_url, "SELECT count(*) FROM reservations") == 0, interval=0.2)
