"""The JobStore contract: one suite every backend passes (LMDB, memory, PostgreSQL).

A backend subclasses JobStoreContract and provides `make` (and `reopen`, for the ones that
persist). Nothing here knows which backend it runs on.
"""

from __future__ import annotations

import stat
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from aitbc.coordinator.pgstore import PostgresJobStore
from aitbc.coordinator.store import JobStore, LmdbJobStore, MemoryJobStore
from aitbc.hub.reputation import MinerRecord
from aitbc.v1 import job_pb2, receipt_pb2

S = job_pb2.JobState
St = receipt_pb2.SettlementState


def job(job_id: str, state: int = S.JOB_STATE_QUEUED, *, client: str = "alice", finished: int = 0,
        request_id: str = "") -> job_pb2.Job:
    return job_pb2.Job(job_id=job_id, model="tiny-sd", client_id=client, state=state,  # type: ignore[arg-type]
                       finished_at_unix_ms=finished, updated_at_unix_ms=finished or 1, request_id=request_id)


def receipt(rh: str, job_id: str, state: int, client: str = "alice") -> receipt_pb2.Receipt:
    rec = receipt_pb2.Receipt(receipt_hash=rh)
    rec.body.job_id, rec.body.client = job_id, client
    rec.settlement.state = state  # type: ignore[assignment]
    return rec


def done(job_id: str, artifacts: list[tuple[str, int]]) -> job_pb2.Job:
    j = job(job_id, S.JOB_STATE_COMPLETED, finished=10)
    j.artifacts.extend(job_pb2.Artifact(sha256=sha, expires_at_unix_ms=until) for sha, until in artifacts)
    return j


def read(store: JobStore, sha: str) -> bytes | None:
    f = store.open_artifact(sha)
    if f is None:
        return None
    with f:
        return f.read()


def eventually(probe: Any, tries: int = 500) -> Any:
    """The first truthy answer of `probe`, asked every 10 ms (a server frees a closed session's
    locks when its backend process has exited, a moment after the client closed it)."""
    for _ in range(tries):
        got = probe()
        if got:
            return got
        time.sleep(0.01)
    raise AssertionError(f"{probe} never answered")


class JobStoreContract:
    def make(self) -> JobStore:
        raise NotImplementedError

    def reopen(self, store: JobStore) -> JobStore:
        return store  # a store that does not persist is "reopened" as itself

    @pytest.fixture
    def store(self):  # type: ignore[no-untyped-def]
        s = self.make()
        yield s
        s.close()

    def test_a_job_reads_back_as_written_and_only_active_ones_are_listed(self, store: JobStore) -> None:
        store.write([job("a"), job("b", S.JOB_STATE_RUNNING), job("c", S.JOB_STATE_COMPLETED)])
        assert store.get_job("a") == job("a")
        assert sorted(j.job_id for j in store.active_jobs()) == ["a", "b"]
        store.write([job("a", S.JOB_STATE_CANCELLED)])
        assert sorted(j.job_id for j in store.active_jobs()) == ["b"]
        assert store.get_job("missing") is None

    def test_what_is_read_is_a_copy(self, store: JobStore) -> None:
        store.write([job("a")])
        got = store.get_job("a")
        got.model = "changed"
        assert store.get_job("a").model == "tiny-sd"

    def test_a_job_is_stored_without_its_receipt(self, store: JobStore) -> None:
        j = job("a", S.JOB_STATE_COMPLETED)
        j.receipt_hash = "r1"
        j.receipt.CopyFrom(receipt("r1", "a", St.SETTLEMENT_STATE_PENDING))
        store.write([j], receipts=[(j, j.receipt)])
        assert not store.get_job("a").HasField("receipt") and store.get_job("a").receipt_hash == "r1"
        assert store.get_receipt("r1").body.job_id == "a"

    def test_request_ids_map_to_their_job_per_client(self, store: JobStore) -> None:
        store.write([job("a", request_id="req-1"), job("b", client="bob", request_id="req-1")])
        assert store.job_for_request("alice", "req-1") == "a"
        assert store.job_for_request("bob", "req-1") == "b"
        assert store.job_for_request("alice", "req-2") is None

    def test_a_request_id_keeps_the_job_written_first(self, store: JobStore) -> None:
        assert store.claim_request("alice", "r1", "j1") == "j1"
        store.write([job("j1", request_id="r1")])
        assert store.claim_request("alice", "r1", "j2") == "j1"  # the same request again: that job
        assert store.claim_request("bob", "r1", "j3") == "j3"  # per client

    def test_artifacts_are_content_addressed_and_never_overwritten(self, store: JobStore) -> None:
        store.write([], artifacts=[("aa", b"first")])
        store.write([], artifacts=[("aa", b"second")])
        assert read(store, "aa") == b"first" and read(store, "bb") is None

    def test_a_finished_upload_file_is_taken_over(self, store: JobStore, tmp_path: Path) -> None:
        up, again = tmp_path / "upload.part", tmp_path / "again.part"
        up.write_bytes(b"png bytes")
        again.write_bytes(b"png bytes")
        store.write([], artifacts=[("ab", up)])
        store.write([], artifacts=[("ab", again)])  # the same content again: nothing new is kept
        assert read(store, "ab") == b"png bytes"
        assert not up.exists() and not again.exists()

    def test_artifacts_expire_at_the_latest_time_a_job_names_and_go_in_batches(self, store: JobStore) -> None:
        a, b, c = (done(n, [(sha, until)]) for n, sha, until in
                   (("a", "a1", 1000), ("b", "b1", 3000), ("c", "a1", 2000)))
        store.write([a], artifacts=[("a1", b"x")])
        store.write([b], artifacts=[("b1", b"y")])
        store.write([c])  # another job with the same bytes: kept until the later of the two
        store.write([done("d", [("c1", 0)])], artifacts=[("c1", b"kept")])  # 0: kept for good
        store.write([], artifacts=[("d1", b"named by no job")])
        assert store.expired_artifacts(1500, 10) == []
        assert store.expired_artifacts(2000, 10) == [("a1", "c")]
        assert store.expired_artifacts(10**15, 1) == [("a1", "c")]  # at most `limit`, oldest first
        store.keep_artifact("a1", 2500)
        store.keep_artifact("a1", 100)  # never earlier
        assert store.expired_artifacts(2600, 10) == [("a1", "c")]
        assert store.expired_artifacts(10**15, 10) == [("a1", "c"), ("b1", "b")]
        store.delete_artifacts(["a1", "b1"])
        assert read(store, "a1") is None and read(store, "b1") is None
        assert store.expired_artifacts(10**15, 10) == []
        assert read(store, "c1") == b"kept" and read(store, "d1") == b"named by no job"
        # the jobs keep their descriptions; writing one again does not bring the bytes back
        assert [x.sha256 for x in store.get_job("a").artifacts] == ["a1"]
        store.write([a])
        assert read(store, "a1") is None and store.expired_artifacts(10**15, 10) == []

    def test_settlement_indexes_follow_the_receipt_state(self, store: JobStore) -> None:
        j1, j2, j3 = job("a", S.JOB_STATE_COMPLETED), job("b", S.JOB_STATE_COMPLETED), job("c", S.JOB_STATE_COMPLETED)
        held, pending = receipt("r1", "a", St.SETTLEMENT_STATE_HELD), receipt("r2", "b", St.SETTLEMENT_STATE_PENDING)
        free = receipt("r3", "c", St.SETTLEMENT_STATE_NOT_REQUIRED)
        store.write([j1, j2, j3], receipts=[(j1, held), (j2, pending), (j3, free)])
        assert [r.receipt_hash for r in store.held_receipts()] == ["r1"]
        assert [r.receipt_hash for r in store.unsettled_receipts()] == ["r2"]
        held.settlement.state = St.SETTLEMENT_STATE_PENDING
        store.update_receipt(held)
        assert store.held_receipts() == [] and [r.receipt_hash for r in store.unsettled_receipts()] == ["r1", "r2"]
        for rec in (held, pending):
            rec.settlement.state = St.SETTLEMENT_STATE_FINAL
            store.update_receipt(rec)
        assert store.unsettled_receipts() == [] and store.get_receipt("r2").settlement.state == St.SETTLEMENT_STATE_FINAL
        assert sorted(r.receipt_hash for r in store.iter_receipts()) == ["r1", "r2", "r3"]

    def test_client_receipts_page_newest_first_and_stay_per_client(self, store: JobStore) -> None:
        for n in range(5):
            j = job(f"a{n}", S.JOB_STATE_COMPLETED, finished=1000 + n)
            store.write([j], receipts=[(j, receipt(f"r{n}", j.job_id, St.SETTLEMENT_STATE_DISABLED))])
        other = job("b", S.JOB_STATE_COMPLETED, client="alicia", finished=5000)  # a prefix of no one
        store.write([other], receipts=[(other, receipt("rb", "b", St.SETTLEMENT_STATE_DISABLED, "alicia"))])
        page, nxt = store.client_receipts("alice", before=None, limit=2)
        assert [r.receipt_hash for r in page] == ["r4", "r3"] and nxt is not None
        page, nxt = store.client_receipts("alice", before=nxt, limit=2)
        assert [r.receipt_hash for r in page] == ["r2", "r1"] and nxt is not None
        page, nxt = store.client_receipts("alice", before=nxt, limit=2)
        assert [r.receipt_hash for r in page] == ["r0"] and nxt is None
        assert store.client_receipts("nobody", before=None, limit=5) == ([], None)
        assert [r.receipt_hash for r in store.client_receipts("alicia", before=None, limit=5)[0]] == ["rb"]

    def test_meta_and_reputation_live_in_the_same_store(self, store: JobStore) -> None:
        assert store.get_meta("verify_secret") is None
        store.put_meta("verify_secret", b"\x01" * 32)
        store.reputation().put(MinerRecord("ait1miner", jobs_served=3, reputation=0.7))
        store = self.reopen(store)
        assert store.get_meta("verify_secret") == b"\x01" * 32
        assert store.reputation().get("ait1miner").jobs_served == 3
        assert [r.miner_id for r in store.reputation().all()] == ["ait1miner"]

    def test_the_first_value_of_a_meta_entry_stays(self, store: JobStore) -> None:
        assert store.first_meta("verify_secret", b"\x01" * 32) == b"\x01" * 32
        assert store.first_meta("verify_secret", b"\x02" * 32) == b"\x01" * 32  # the first one wins
        store = self.reopen(store)
        assert store.first_meta("verify_secret", b"\x03" * 32) == b"\x01" * 32

    def test_reputation_updates_apply_to_the_stored_record(self, store: JobStore) -> None:
        rep = store.reputation()
        first = rep.update("ait1miner", lambda r: (r or MinerRecord("ait1miner"))._replace(failures=1))
        assert first.failures == 1 and first.jobs_served == 0
        got = rep.update("ait1miner", lambda r: r._replace(jobs_served=r.jobs_served + 1))  # type: ignore[union-attr]
        assert (got.failures, got.jobs_served) == (1, 1)
        assert rep.records(["ait1miner", "ait1nobody"]) == {"ait1miner": got}
        store = self.reopen(store)
        assert store.reputation().get("ait1miner") == got

    def test_meta_entries_by_prefix_and_deleted(self, store: JobStore) -> None:
        for k in ("webhook:b", "webhook:a", "webhooks", "other"):
            store.put_meta(k, k.encode())
        assert store.meta_items("webhook:") == [("webhook:a", b"webhook:a"), ("webhook:b", b"webhook:b")]
        store.delete_meta("webhook:a")
        store.delete_meta("webhook:none")  # nothing there: no error
        store = self.reopen(store)
        assert store.meta_items("webhook:") == [("webhook:b", b"webhook:b")] and store.get_meta("other") == b"other"

    def test_a_write_that_fails_half_way_writes_nothing(self, store: JobStore) -> None:
        store.write([job("a")])
        b = job("b", S.JOB_STATE_COMPLETED)
        with pytest.raises(AttributeError):  # the last item is not a receipt: the write fails after the rest
            store.write([job("a", S.JOB_STATE_COMPLETED), b], artifacts=[("aa", b"x")],
                        receipts=[(b, object())])  # type: ignore[list-item]
        assert store.get_job("a").state == S.JOB_STATE_QUEUED and store.get_job("b") is None
        assert read(store, "aa") is None

    def test_what_was_written_survives_a_reopen(self, store: JobStore) -> None:
        store.write([job("a"), job("b", S.JOB_STATE_FAILED)])
        store = self.reopen(store)
        assert [j.job_id for j in store.active_jobs()] == ["a"] and store.get_job("b").state == S.JOB_STATE_FAILED

    # ---- the awaited reads (GetJob, GetJobResult, GetReceipt, ListReceipts): what the sync ones return ----

    async def test_every_awaited_read_returns_what_its_synchronous_twin_does(self, store: JobStore) -> None:
        big = bytes(range(256)) * 40  # 10,240 bytes: several chunks on a store with small ones
        for n in range(3):
            j = done(f"a{n}", [(f"a{n}", 0)])
            j.receipt_hash = f"r{n}"
            store.write([j], artifacts=[(f"a{n}", big[n:])], receipts=[(j, receipt(f"r{n}", j.job_id,
                                                                                 St.SETTLEMENT_STATE_PENDING))])
        store.write([job("q")])
        for job_id in ("a0", "a2", "q", "missing"):
            assert await store.aget_job(job_id) == store.get_job(job_id)
        for rh in ("r0", "r1", "missing"):
            assert await store.aget_receipt(rh) == store.get_receipt(rh)
        before = None
        while True:  # page by page, the tokens the same
            page = store.client_receipts("alice", before=before, limit=2)
            assert await store.aclient_receipts("alice", before=before, limit=2) == page
            if page[1] is None:
                break
            before = page[1]
        assert await store.aclient_receipts("nobody", before=None, limit=5) == ([], None)
        assert await store.aopen_artifact("missing") is None
        for sha in ("a0", "a2"):
            f = await store.aopen_artifact(sha)
            assert f is not None
            async with f:
                pieces = [await f.read(3000), await f.read(3000), await f.read()]
                assert await f.read(10) == b""  # past the end
            assert b"".join(pieces) == read(store, sha) and len(pieces[0]) == 3000


class TestMemoryJobStore(JobStoreContract):
    def make(self) -> JobStore:
        return MemoryJobStore()


class TestLmdbJobStore(JobStoreContract):
    @pytest.fixture(autouse=True)
    def _folder(self, tmp_path: Path) -> None:
        self.path = tmp_path / "jobs"

    def make(self) -> JobStore:
        return LmdbJobStore(self.path)

    def reopen(self, store: JobStore) -> JobStore:
        store.close()
        return LmdbJobStore(self.path)

    def test_artifacts_are_files_beside_the_lmdb_its_owners_only(self, store: JobStore, tmp_path: Path) -> None:
        sha = "ab" * 32
        store.write([], artifacts=[(sha, b"png")])
        f = tmp_path / "artifacts" / "ab" / sha
        assert f.read_bytes() == b"png" and stat.S_IMODE(f.stat().st_mode) == 0o600
        assert all(stat.S_IMODE(d.stat().st_mode) == 0o700 for d in (f.parent, f.parent.parent))
        store.delete_artifacts([sha])
        assert not f.exists()

    def test_a_write_that_fails_removes_the_files_it_made(self, store: JobStore, tmp_path: Path) -> None:
        with pytest.raises(AttributeError):
            store.write([], artifacts=[("cd" * 32, b"x")], receipts=[(job("b"), object())])  # type: ignore[list-item]
        assert not (tmp_path / "artifacts" / "cd" / ("cd" * 32)).exists()

    def test_artifacts_stored_in_the_lmdb_by_older_versions_are_still_served(self, store: JobStore) -> None:
        assert isinstance(store, LmdbJobStore)
        with store.env.begin(write=True) as txn:
            txn.put(b"ef" * 32, b"old bytes", db=store._legacy_artifacts)
        assert read(store, "ef" * 32) == b"old bytes"


class TestPostgresJobStore(JobStoreContract):
    """On a real PostgreSQL server (tests/conftest.py `postgres`), a new database per test."""

    @pytest.fixture(autouse=True)
    def _database(self, pg_url: str) -> None:
        self.url = pg_url

    def make(self) -> JobStore:
        return PostgresJobStore(self.url, chunk_bytes=4096)  # artifacts of several chunks in the tests

    def reopen(self, store: JobStore) -> JobStore:
        store.close()
        return PostgresJobStore(self.url)

    # ---- several coordinators on one database: claims, fences, takeover, the arbiter, the settler ----

    @pytest.fixture
    def other(self):  # type: ignore[no-untyped-def]
        s = PostgresJobStore(self.url)
        yield s
        s.close()

    def test_a_queued_job_is_claimed_by_one_coordinator_only(self, store: PostgresJobStore,
                                                             other: PostgresJobStore) -> None:
        store.write([job("q1"), job("q2")])
        store.release([("q1", ()), ("q2", ())])
        first = other.claim(["tiny-sd"], 1)
        second = store.claim(["tiny-sd"], 5)
        assert [c.job.job_id for c in first] == ["q1"] and [c.job.job_id for c in second] == ["q2"]
        assert first[0].epoch == 2  # epoch 1 was the submitter's own claim
        assert store.claim(["tiny-sd"], 5) == other.claim(["tiny-sd"], 5) == []
        assert other.claim(["other-model"], 5) == []

    def test_only_queued_rows_are_claimed(self, store: PostgresJobStore, other: PostgresJobStore) -> None:
        other.write([job("fin", S.JOB_STATE_COMPLETED, finished=5)])  # finished: written with no owner
        store.write([job("q")])
        store.release([("q", ())])
        assert [c.job.job_id for c in other.claim(["tiny-sd"], 5)] == ["q"]

    def test_a_write_after_a_takeover_is_refused_and_its_receipt_never_stored(
            self, store: PostgresJobStore, other: PostgresJobStore) -> None:
        store.lease_s = 0.0  # its lease runs out at once
        store.write([job("j")])
        taken = other.take_over(10, now_ms=0, queue_ttl_ms=1 << 40, verify_ttl_ms=1 << 40)
        assert [(c.job.job_id, c.previous_owner, c.lease_expired) for c in taken] == [("j", store.coordinator_id, True)]
        assert not store.holds("j") and other.holds("j")
        late = job("j", S.JOB_STATE_COMPLETED, finished=9)
        late.receipt_hash = "ab" * 32
        lost = store.write([late], receipts=[(late, receipt("ab" * 32, "j", St.SETTLEMENT_STATE_PENDING))])
        assert lost == {"j"}
        assert store.get_job("j").state == S.JOB_STATE_QUEUED and store.get_receipt("ab" * 32) is None  # type: ignore[union-attr]
        assert other.write([job("j", S.JOB_STATE_RUNNING)]) == set()  # the new owner writes on
        assert other.get_job("j").state == S.JOB_STATE_RUNNING  # type: ignore[union-attr]

    def test_renewing_keeps_a_claim_and_names_the_ones_taken_over(self, store: PostgresJobStore,
                                                                 other: PostgresJobStore) -> None:
        store.write([job("kept"), job("lost")])
        assert store.renew() == (frozenset(), [])
        assert other.take_over(10, now_ms=0, queue_ttl_ms=1 << 40, verify_ttl_ms=1 << 40) == []  # alive, leased
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute("UPDATE jobs SET lease_until = now() - interval '1 second' WHERE job_id = 'lost'")
        assert [c.job.job_id for c in other.take_over(10, now_ms=0, queue_ttl_ms=1 << 40, verify_ttl_ms=1 << 40)] == ["lost"]
        assert store.renew() == (frozenset({"lost"}), [])
        assert store.holds("kept")

    def test_the_jobs_of_a_dead_coordinator_are_taken_over_before_their_lease_ends(
            self, store: PostgresJobStore, other: PostgresJobStore) -> None:
        dead = PostgresJobStore(self.url, lease_s=3600)
        dead.write([job("a", S.JOB_STATE_RUNNING), job("b")])
        assert other.take_over(10, now_ms=0, queue_ttl_ms=1 << 40, verify_ttl_ms=1 << 40) == []
        dead.close()  # its connection ends: the server frees its lock (as for kill -9) once its backend exits
        taken = eventually(lambda: other.take_over(10, now_ms=0, queue_ttl_ms=1 << 40, verify_ttl_ms=1 << 40))
        assert sorted((c.job.job_id, c.lease_expired) for c in taken) == [("a", False), ("b", False)]
        assert store.take_over(10, now_ms=0, queue_ttl_ms=1 << 40, verify_ttl_ms=1 << 40) == []  # once

    def test_a_verification_is_decided_by_the_first_store_that_claims_it_until_that_one_dies(
            self, store: PostgresJobStore, other: PostgresJobStore) -> None:
        dead = PostgresJobStore(self.url)
        assert dead.decide_once("orig", 2)
        assert dead.decide_once("orig", 2)  # the same coordinator again (its decision was interrupted)
        assert not other.decide_once("orig", 2) and not store.decide_once("orig", 2)
        assert other.decide_once("orig", 3)  # a referee's run later: another decision
        dead.close()  # it claimed and died before it decided: the next one to ask takes the claim over
        eventually(lambda: other.decide_once("orig", 2))
        assert not store.decide_once("orig", 2)  # once: the taker is alive

    def test_a_queued_job_past_its_queue_time_is_handed_to_a_reaper_to_expire(
            self, store: PostgresJobStore, other: PostgresJobStore) -> None:
        store.write([job("old")])  # queued at updated_at_unix_ms = 1
        store.release([("old", ["m1"])])
        assert other.take_over(10, now_ms=500, queue_ttl_ms=1000, verify_ttl_ms=1000) == []
        (c,) = other.take_over(10, now_ms=5000, queue_ttl_ms=1000, verify_ttl_ms=1000)
        assert c.job.job_id == "old" and c.queued_ms == 1 and c.excluded == {"m1"}

    def test_a_cancel_asked_elsewhere_reaches_the_owner_on_its_next_renewal(
            self, store: PostgresJobStore, other: PostgresJobStore) -> None:
        store.write([job("c", S.JOB_STATE_RUNNING)])
        assert other.request_cancel("c") == store.coordinator_id
        assert store.request_cancel("c") is None  # the owner itself does not ask
        assert store.renew() == (frozenset(), ["c"])

    def test_two_coordinators_given_one_request_id_return_the_same_job(
            self, store: PostgresJobStore, other: PostgresJobStore) -> None:
        assert store.claim_request("alice", "r", "j-a") == "j-a"
        assert other.claim_request("alice", "r", "j-b") == "j-a"  # before j-a is even written
        store.write([job("j-a", request_id="r")])
        assert other.job_for_request("alice", "r") == "j-a"
        # a request whose job was never written (its coordinator died in between) can be taken
        assert other.claim_request("alice", "r2", "dead") == "dead"
        assert not store.take_request("alice", "r", "j-a", "j-c")  # j-a exists
        assert store.take_request("alice", "r2", "dead", "j-d") and store.claim_request("alice", "r2", "x") == "j-d"

    def test_one_settler_at_a_time_and_the_next_takes_over_when_it_goes(
            self, store: PostgresJobStore, other: PostgresJobStore) -> None:
        assert store.settler() and store.settler()  # held, and asked again: still
        assert not other.settler()
        store.close()  # the lock goes when its backend has exited
        assert eventually(other.settler)

    def test_a_reservation_whose_job_was_never_written_is_deleted_after_the_grace_one_with_a_job_kept(
            self, store: PostgresJobStore, other: PostgresJobStore) -> None:
        from aitbc.coordinator.fees import Charge

        dying = other.reservations()  # reserves, then dies before the job's write (the job never appears)
        dying.reserve(Charge("orphan", "ait1client", 500, "q1", 5), 10_000)
        dying.reserve(Charge("late", "ait1client", 300, "q2", 3), 10_000)
        store.reservations().reserve(Charge("paid", "ait1client", 200, "q3", 2), 10_000)
        store.write([job("paid")])
        reaper = store.reservations()
        assert reaper.sweep_orphans(100.0, 600.0) == []  # first seen without a job: the grace starts
        store.write([job("late")])  # its job written since (a submit in its last step): it keeps its escrow
        dying.reserve(Charge("young", "ait1client", 100, "q4", 1), 10_000)
        assert reaper.reserved("ait1client") == 1100
        assert reaper.sweep_orphans(700.0, 600.0) == ["orphan"]  # "young" first seen now
        assert reaper.reserved("ait1client") == 600 and not reaper.holds("orphan")
        assert reaper.sweep_orphans(1299.0, 600.0) == []  # within its grace: kept
        assert reaper.sweep_orphans(1300.0, 600.0) == ["young"]
        assert reaper.holds("paid") and reaper.holds("late")  # with their jobs: kept, however long
        assert reaper.sweep_orphans(10_000.0, 600.0) == [] and len(reaper) == 2

    async def test_the_awaited_event_read_returns_what_the_synchronous_one_does(self, store: PostgresJobStore) -> None:
        from aitbc.coordinator.streams import EVENT_PROGRESS, EVENT_TEXT

        store.write([job("a", S.JOB_STATE_RUNNING), job("b", S.JOB_STATE_RUNNING)])
        store.append_events([("a", EVENT_PROGRESS, 1, b"p1"), ("b", EVENT_TEXT, 1, b"t1"), ("a", EVENT_TEXT, 1, b"t2"),
                             ("a", EVENT_PROGRESS, 2, b"p2")], keep=64)
        first = store.read_events({"a": 0, "b": 0}, 10)
        assert [r[4] for r in first] == [b"p1", b"t1", b"t2", b"p2"]
        for after, limit in (({"a": 0, "b": 0}, 10), ({"a": first[0][0]}, 10), ({"a": 0, "b": 0}, 2), ({}, 5)):
            assert await store.aread_events(after, limit) == store.read_events(after, limit)
