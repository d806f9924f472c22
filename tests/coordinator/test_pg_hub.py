"""Shared hub state on one PostgreSQL database (docs/scaling.md, "What exists today (fifth slice)"):
reputation rows are the truth for every coordinator (each update locks the row; NOTIFY
aitbc_reputation drops the others' caches), and a verification is decided by one coordinator only.
A real server, real stores, real coordinators and miners."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from pathlib import Path
from typing import Any

import psycopg

from aitbc.coordinator.pgstore import PostgresJobStore
from aitbc.coordinator.receipt_book import ReceiptBook
from aitbc.coordinator.verification import Verifier
from aitbc.hub.reputation import MinerRecord, ReputationBook
from aitbc.hub.verification import DEFAULT_TOLERANCE
from aitbc.miner.backend import NullImageBackend
from aitbc.v1 import coordinator_pb2, job_pb2, receipt_pb2
from tests.coordinator.test_jobs_api import MD, image_job, stub, wait_done
from tests.coordinator.test_pg_shared import pair
from tests.security.test_trust_bootstrap import FakingBackend

S = job_pb2.JobState
V = job_pb2.VerificationState
St = receipt_pb2.SettlementState
MINER = "ait1sharedminer"


def waiting_locks(url: str) -> int:
    """Backends of this database waiting for a lock right now."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                           "WHERE NOT l.granted AND a.datname = current_database()").fetchone()
    return int(row[0]) if row else 0


def lock_held(url: str, key: int) -> bool:
    """Is this session advisory lock (a coordinator's: it is alive) held by anyone?"""
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute("SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND classid = %s "
                            "AND objid = %s AND objsubid = 1", (key >> 32, key & 0xFFFFFFFF)).fetchone() is not None


def wait_for(predicate: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.01)


# ---- the store: one miner's row updated by two coordinators at once ---------------------------------

def test_two_stores_updating_one_miner_at_once_lose_no_update(pg_url: str) -> None:
    stores = [PostgresJobStore(pg_url), PostgresJobStore(pg_url)]
    try:
        books = [ReputationBook(s.reputation()) for s in stores]
        n = 200

        def hammer(book: ReputationBook, failures: bool) -> None:
            for _ in range(n):
                book.record_success(MINER, draw=True)
                if failures:
                    book.record_failure(MINER, "stall")
                else:
                    book.record_verification(MINER, True)

        threads = [threading.Thread(target=hammer, args=(b, i == 1)) for i, b in enumerate(books)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rec = stores[0].reputation().get(MINER)
        assert rec is not None
        assert (rec.jobs_served, rec.draws, rec.stalls, rec.verifications_passed) == (2 * n, 2 * n, n, n)
        # the policy applied once per update, in some order: the score is what that many steps give
        assert 0.0 <= rec.reputation <= 1.0
    finally:
        for s in stores:
            s.close()


def test_a_first_record_written_at_once_elsewhere_is_changed_not_overwritten(pg_url: str) -> None:
    store = PostgresJobStore(pg_url)
    try:
        book = ReputationBook(store.reputation())
        with psycopg.connect(pg_url) as other:  # another coordinator's first record, not committed yet
            other.execute("INSERT INTO reputation (miner_id, record) VALUES (%s, %s)",
                          (MINER, MinerRecord(MINER, jobs_served=5).to_bytes()))
            done = threading.Thread(target=book.record_success, args=(MINER,))
            done.start()
            wait_for(lambda: waiting_locks(pg_url) > 0, "our first insert waiting for theirs")
            other.commit()
        done.join()
        assert store.reputation().get(MINER).jobs_served == 6  # type: ignore[union-attr]
    finally:
        store.close()


def test_a_book_on_a_shared_store_reads_what_another_wrote_once_invalidated_or_refreshed(pg_url: str) -> None:
    a, b = PostgresJobStore(pg_url), PostgresJobStore(pg_url)
    try:
        book_a, book_b = ReputationBook(a.reputation()), ReputationBook(b.reputation())
        assert book_b.get(MINER) is None  # cached: no row
        book_a.record_verification(MINER, True)
        assert book_b.refresh([MINER]) == [MINER]
        assert book_b.snapshot(MINER).verifications_passed == 1
        book_a.record_verification(MINER, True)
        book_b.invalidate(MINER)
        assert book_b.snapshot(MINER).verifications_passed == 2
        assert [r.miner_id for r in book_b.all()] == [MINER]
    finally:
        a.close()
        b.close()


# ---- a held receipt decided once ---------------------------------------------------------------------

def _held_pair(store: PostgresJobStore) -> None:
    """An original job (miner m1) and its re-execution (miner m2), both completed with the same
    image, their receipts held: what a verification decides."""
    data = b"\x89PNG\r\n\x1a\n the same image"
    art = job_pb2.Artifact(sha256=hashlib.sha256(data).hexdigest(), size=len(data), content_type="image/png")
    orig = job_pb2.Job(job_id="orig", model="null", client_id="alice", state=S.JOB_STATE_COMPLETED, miner_id="ait1m1",
                       receipt_hash="r-orig", verification=V.VERIFICATION_STATE_PENDING, verification_job_ids=["rerun"],
                       artifacts=[art], created_at_unix_ms=1)
    rerun = job_pb2.Job(job_id="rerun", model="null", client_id="hub-verify", state=S.JOB_STATE_COMPLETED,
                        miner_id="ait1m2", receipt_hash="r-rerun", verify_of="orig", artifacts=[art], created_at_unix_ms=2)
    receipts = [(j, receipt_pb2.Receipt(receipt_hash=j.receipt_hash, body=receipt_pb2.ReceiptBody(job_id=j.job_id),
                                        settlement=receipt_pb2.ReceiptSettlement(state=St.SETTLEMENT_STATE_HELD)))
                for j in (orig, rerun)]
    store.write([orig, rerun], artifacts=[(art.sha256, data)], receipts=receipts)


def _verifier(store: PostgresJobStore) -> tuple[Verifier, ReputationBook]:
    book = ReputationBook(store.reputation())
    return Verifier(store, ReceiptBook(store, settles=False), book, rate=1.0, tolerance=DEFAULT_TOLERANCE,
                    load=store.get_job, record=lambda miner, passed: book.record_verification(miner, passed),
                    now_ms=lambda: 1000), book


def test_a_held_receipt_both_coordinators_could_decide_is_decided_once(pg_url: str) -> None:
    a, b = PostgresJobStore(pg_url), PostgresJobStore(pg_url)
    try:
        _held_pair(a)
        (va, book_a), (vb, _) = _verifier(a), _verifier(b)
        book_a.record_success("ait1m1")  # m1's row exists: the lock below holds A inside its decision
        origs = [a.get_job("orig"), b.get_job("orig")]  # both read it PENDING: both could decide it
        with psycopg.connect(pg_url) as locker:
            locker.execute("SELECT 1 FROM reputation WHERE miner_id = 'ait1m1' FOR UPDATE")
            ta = threading.Thread(target=va.decide, args=(origs[0],))
            ta.start()
            wait_for(lambda: waiting_locks(pg_url) == 1, "A deciding (waiting to count m1's pass)")
            tb = threading.Thread(target=vb.decide, args=(origs[1],))
            tb.start()
            # B gives up (A decides these runs), or, deciding as well, waits on the same row
            wait_for(lambda: not tb.is_alive() or waiting_locks(pg_url) == 2, "B done or deciding too")
            locker.rollback()
        ta.join()
        tb.join()
        for miner in ("ait1m1", "ait1m2"):
            rec = a.reputation().get(miner)
            assert rec is not None and rec.verifications_passed == 1, rec  # counted once, not once per coordinator
        assert a.get_job("orig").verification == V.VERIFICATION_STATE_PASSED  # type: ignore[union-attr]
        for h in ("r-orig", "r-rerun"):
            assert a.get_receipt(h).settlement.state == St.SETTLEMENT_STATE_DISABLED  # type: ignore[union-attr]
        with psycopg.connect(pg_url) as conn:
            assert conn.execute("SELECT job_id, runs, coordinator FROM verification_decisions").fetchall() == [
                ("orig", 2, a.coordinator_id)]
    finally:
        a.close()
        b.close()


def test_a_decision_taken_over_from_a_dead_coordinator_is_not_taken_again_when_it_was_made(pg_url: str) -> None:
    a, b = PostgresJobStore(pg_url), PostgresJobStore(pg_url)
    try:
        _held_pair(a)
        (va, _), (vb, _) = _verifier(a), _verifier(b)
        stale = b.get_job("orig")  # B read it PENDING ...
        va.decide(a.get_job("orig"))  # type: ignore[arg-type]  # ... A claimed the runs, decided them ...
        a.close()  # ... and died: its claim row is free to take over once the server freed its lock
        wait_for(lambda: not lock_held(pg_url, a._lock_key), "A's advisory lock freed")
        assert vb.decide(stale) is None  # type: ignore[arg-type]
        assert b.decide_once("orig", 2)  # B holds the claim now, and still counted nothing twice
        for miner in ("ait1m1", "ait1m2"):
            assert b.reputation().get(miner).verifications_passed == 1  # type: ignore[union-attr]
    finally:
        a.close()
        b.close()


def test_every_coordinator_samples_with_one_secret_and_draws_the_same(pg_url: str) -> None:
    a, b = PostgresJobStore(pg_url), PostgresJobStore(pg_url)
    try:
        (va, book_a), (vb, _) = _verifier(a), _verifier(b)
        va.rate = vb.rate = 0.3
        assert va.secret == vb.secret == a.get_meta("verify_secret")
        job = job_pb2.Job(job_id="j", model="null")
        seen = []
        for _ in range(40):  # the draws counted on the shared row: B samples the draw A counted up to
            got = (va.sampled(MINER, job), vb.sampled(MINER, job))
            assert got[0] == got[1]
            seen.append(got[0])
            book_a.record_success(MINER, draw=True)
            vb.reputation.invalidate(MINER)  # what B's doorbell does on A's NOTIFY
        assert True in seen and False in seen  # the draws differ: equal answers are not a constant
    finally:
        a.close()
        b.close()


# ---- two coordinators, real miners -------------------------------------------------------------------

async def stop_miner(net: Any, daemon: Any) -> None:
    i = net.miners.index(daemon)
    daemon.stop()
    await asyncio.wait_for(net.tasks[i], 20)
    await net.until(lambda: daemon.key.address not in net.core.miners)


async def decided(net: Any, job_id: str) -> job_pb2.Job:
    over = (V.VERIFICATION_STATE_PASSED, V.VERIFICATION_STATE_REPLACED, V.VERIFICATION_STATE_UNVERIFIED)
    await net.until(lambda: net.core.store.get_job(job_id).verification in over)
    return net.core.store.get_job(job_id)


async def test_failures_verified_on_a_and_on_b_quarantine_the_miner_on_both(
        network_factory: Any, pg_url: str, tmp_path: Path) -> None:
    from aitbc import crypto

    honest_keys = {"a": crypto.PrivateKey.generate(), "b": crypto.PrivateKey.generate()}
    # the honest miners are trusted (the cheater is not: only theirs vote, so each check is decided by them)
    a, b = await pair(network_factory, pg_url, tmp_path, verify_rate=1.0, quarantine_after=2, verify_timeout_s=60,
                      trust_checks=5, trusted_miners=[k.address for k in honest_keys.values()])
    cheat_key = None
    for net in (a, b):  # the cheater's first failure is decided on A, its second on B
        cheater = await net.add_miner({"null": FakingBackend()}, key=cheat_key)
        cheat_key = cheater.key
        job_id = (await stub(net).SubmitJob(image_job(model="null", seed=7 if net is a else 8), metadata=MD)).job.job_id
        await net.until(lambda: (j := net.core.store.get_job(job_id)) is not None  # noqa: B023
                        and j.verification == V.VERIFICATION_STATE_PENDING)
        honest = await net.add_miner({"null": NullImageBackend()}, price=5,  # re-executes it here
                                     key=honest_keys["a" if net is a else "b"])
        job = await decided(net, job_id)
        assert job.verification == V.VERIFICATION_STATE_REPLACED and job.miner_id == cheat_key.address
        [vid] = job.verification_job_ids
        assert net.core.store.get_job(vid).miner_id == honest.key.address
        if net is a:
            assert not a.core.book.snapshot(cheat_key.address).quarantined  # one failure: not yet
            await stop_miner(a, cheater)
            await stop_miner(a, honest)
    assert cheat_key is not None
    cheat = cheat_key.address
    rec = b.core.book.snapshot(cheat)
    assert rec.verifications_failed == 2 and rec.quarantined  # one failure on A and one on B: the total counts
    assert b.core.machine.view(cheat).quarantined  # B gives it no work
    await a.until(lambda: a.core.book.snapshot(cheat).quarantined)  # A, where it failed once, follows the row
    for net in (a, b):
        listed = {m.miner_id: m for m in (await stub(net).ListMiners(coordinator_pb2.ListMinersRequest(),
                                                                      metadata=MD)).miners}
        assert listed[cheat].quarantined and listed[cheat].verifications_failed == 2


async def _established_elsewhere(network_factory: Any, pg_url: str, tmp_path: Path, *, doorbell: bool) -> None:
    """A fresh miner on B; its result re-executed by a trusted miner on A, which decides and counts
    the pass: B's view of it (matching) becomes established, and B stops re-executing its results."""
    from aitbc import crypto

    trusted = crypto.PrivateKey.generate()
    a, b = await pair(network_factory, pg_url, tmp_path, trust_checks=1, trusted_miners=[trusted.address],
                      verify_rate=0.0, verify_timeout_s=60)
    if not doorbell:
        b.core.store.stop_listening()  # no NOTIFY heard on B: the poll of the rows must do it
    await a.add_miner({"null": NullImageBackend()}, price=5, key=trusted)
    fresh = await b.add_miner({"null": NullImageBackend()})
    fid = fresh.key.address
    assert not b.core.machine.view(fid).established
    if doorbell:
        b.proc.tasks[0].cancel()  # B's housekeeping (and its poll of the rows) stops: only NOTIFY can tell B
        await asyncio.gather(b.proc.tasks[0], return_exceptions=True)
    sb = stub(b)
    first = await wait_done(sb, (await sb.SubmitJob(image_job(model="null", seed=1), metadata=MD)).job.job_id)
    assert first.miner_id == fid
    job = await decided(b, first.job_id)
    assert job.verification == V.VERIFICATION_STATE_PASSED
    [vid] = job.verification_job_ids
    assert b.core.store.get_job(vid).miner_id == trusted.address  # run, and decided, on A
    await b.until(lambda: b.core.machine.view(fid).established)  # the pass counted on A, followed on B
    assert b.core.verifier.established(fid) and a.core.verifier.established(fid)
    second = await wait_done(sb, (await sb.SubmitJob(image_job(model="null", seed=2), metadata=MD)).job.job_id)
    assert second.miner_id == fid and second.state == S.JOB_STATE_COMPLETED
    assert not second.verification_job_ids  # established everywhere: no longer re-executed on B
    assert b.core.receipts.get(second.receipt_hash).settlement.state != St.SETTLEMENT_STATE_HELD


async def test_a_pass_counted_on_a_makes_the_miner_established_on_b_at_its_notification(
        network_factory: Any, pg_url: str, tmp_path: Path) -> None:
    await _established_elsewhere(network_factory, pg_url, tmp_path, doorbell=True)


async def test_without_the_notification_the_poll_of_the_rows_makes_it_established_on_b(
        network_factory: Any, pg_url: str, tmp_path: Path) -> None:
    await _established_elsewhere(network_factory, pg_url, tmp_path, doorbell=False)
