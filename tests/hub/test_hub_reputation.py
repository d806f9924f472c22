"""hub.reputation: the update rule, quarantine after K mismatches in a window, LMDB == memory, persistence."""

from __future__ import annotations

from pathlib import Path

import lmdb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aitbc.hub.reputation import (
    LmdbReputationStore,
    MemoryReputationStore,
    MinerRecord,
    ReputationBook,
    ReputationPolicy,
)


class Clock:
    def __init__(self, t: float = 1_790_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_new_miner_starts_at_half() -> None:
    book = ReputationBook()
    assert book.snapshot("m") == MinerRecord("m", reputation=0.5)
    assert book.all() == []  # a snapshot of an unknown miner writes nothing


def test_update_rule() -> None:
    book = ReputationBook()
    assert book.record_success("m").reputation == pytest.approx(0.5 + 0.02 * 0.5)
    r = book.record_verification("m", True)
    assert r.reputation == pytest.approx(0.51 + 0.05 * 0.49) and r.verifications_passed == 1
    before = r.reputation
    r = book.record_failure("m")
    assert r.reputation == pytest.approx(before * 0.9) and r.failures == 1
    r = book.record_failure("m", "stall")
    assert r.reputation == pytest.approx(before * 0.81) and r.stalls == 1
    r2 = book.record_verification("m", False)
    assert r2.reputation == pytest.approx(r.reputation * 0.5) and r2.verifications_failed == 1
    assert not r2.quarantined
    assert r2.jobs_served == 1
    with pytest.raises(ValueError):
        book.record_failure("m", "bogus")  # type: ignore[arg-type]


def test_score_stays_in_bounds_and_recovers_slowly() -> None:
    book = ReputationBook()
    for _ in range(500):
        book.record_success("m")
    assert 0.99 < book.snapshot("m").reputation <= 1.0
    book.record_verification("m", False)
    r = book.snapshot("m")
    assert r.reputation < 0.5
    for _ in range(20):
        r = book.record_success("m")
    assert r.reputation < 0.75  # one lie costs more than 20 honest jobs earn


def test_quarantine_after_two_mismatches_within_the_window() -> None:
    clock = Clock()
    book = ReputationBook(clock=clock)
    book.record_verification("m", False)
    clock.t += 8 * 24 * 3600  # outside the 7-day window: the first mismatch has expired
    r = book.record_verification("m", False)
    assert not r.quarantined and len(r.recent_mismatches) == 1
    clock.t += 3600
    r = book.record_verification("m", False)
    assert r.quarantined and r.quarantined_at == clock.t and r.verifications_failed == 3
    r = book.record_verification("m", True)
    assert r.quarantined  # a passed check does not lift it
    r = book.release("m")
    assert not r.quarantined and r.recent_mismatches == () and r.verifications_failed == 3


def test_a_failed_verification_puts_the_miner_on_probation() -> None:
    book = ReputationBook(policy=ReputationPolicy(probation_checks=3))
    assert book.record_verification("m", False).probation_left == 3
    assert book.record_success("m", draw=True).probation_left == 3  # serving does not end it
    assert book.record_verification("m", True).probation_left == 2
    book.record_verification("m", True)
    assert book.record_verification("m", True).probation_left == 0
    assert book.record_verification("m", True).probation_left == 0  # never below 0
    assert book.record_verification("m", False).quarantined  # the second mismatch in the window
    released = book.release("m")
    assert not released.quarantined and released.probation_left == 3  # released on probation


def test_failure_streak_counts_failures_and_stalls_since_the_last_success() -> None:
    book = ReputationBook()
    book.record_failure("m")
    assert book.record_failure("m", "stall").failure_streak == 2
    assert book.record_verification("m", True).failure_streak == 2  # a verification is not a served job
    assert book.record_success("m").failure_streak == 0


def test_draws_count_original_results_only() -> None:
    book = ReputationBook()
    book.record_success("m", draw=True)
    book.record_success("m")  # a verification re-run: served, but not a sampling draw
    r = book.record_success("m", draw=True)
    assert (r.draws, r.jobs_served) == (2, 3)


def test_old_records_without_the_new_fields_still_load() -> None:
    raw = (b'{"failures":0,"jobs_served":4,"miner_id":"m","quarantined":false,"quarantined_at":0.0,'
           b'"recent_mismatches":[],"reputation":0.6,"stalls":0,"verifications_failed":0,"verifications_passed":1}')
    r = MinerRecord.from_bytes(raw)
    assert (r.jobs_served, r.draws, r.probation_left) == (4, 0, 0)


def test_quarantine_threshold_is_configurable() -> None:
    book = ReputationBook(policy=ReputationPolicy(quarantine_after=3))
    assert not book.record_verification("m", False).quarantined
    assert not book.record_verification("m", False).quarantined
    assert book.record_verification("m", False).quarantined


def _env(path: Path, max_dbs: int = 4) -> lmdb.Environment:
    return lmdb.open(str(path), map_size=1 << 24, max_dbs=max_dbs)


def test_lmdb_store_persists_across_reopen(tmp_path: Path) -> None:
    clock = Clock()
    env = _env(tmp_path)
    book = ReputationBook(LmdbReputationStore(env), clock=clock)
    book.record_success("alice")
    book.record_verification("bob", False)
    book.record_verification("bob", False)
    before = book.all()
    env.close()
    env = _env(tmp_path)
    again = ReputationBook(LmdbReputationStore(env), clock=clock)
    assert again.all() == before
    assert again.snapshot("bob").quarantined and again.snapshot("alice").jobs_served == 1
    env.close()


def test_lmdb_store_shares_an_environment_with_other_databases(tmp_path: Path) -> None:
    env = _env(tmp_path)
    other = env.open_db(b"v1:jobs")
    with env.begin(write=True) as txn:
        txn.put(b"v1:rep:zz", b"not a record", db=other)  # same key in another db: invisible
    store = LmdbReputationStore(env)
    store.put(MinerRecord("m1", jobs_served=3))
    assert [r.miner_id for r in store.all()] == ["m1"]
    env.close()


def test_lmdb_store_explains_a_full_environment(tmp_path: Path) -> None:
    env = _env(tmp_path, max_dbs=1)
    env.open_db(b"v1:jobs")
    with pytest.raises(RuntimeError, match="larger max_dbs"):
        LmdbReputationStore(env)
    env.close()


ops = st.lists(st.tuples(
    st.sampled_from(["success", "original", "failure", "stall", "pass", "fail", "release", "tick"]),
    st.sampled_from(["m1", "m2", "aitb1xyz"]),
), max_size=40)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops)
def test_lmdb_store_equals_memory_store(tmp_path_factory: pytest.TempPathFactory, program: list[tuple[str, str]]) -> None:
    clock = Clock()
    env = _env(tmp_path_factory.mktemp("rep"))
    books = [ReputationBook(MemoryReputationStore(), clock=clock), ReputationBook(LmdbReputationStore(env), clock=clock)]
    try:
        for op, miner in program:
            if op == "tick":
                clock.t += 2 * 24 * 3600
                continue
            outs = []
            for book in books:
                if op in ("success", "original"):
                    outs.append(book.record_success(miner, draw=op == "original"))
                elif op in ("failure", "stall"):
                    outs.append(book.record_failure(miner, op))  # type: ignore[arg-type]
                elif op == "release":
                    outs.append(book.release(miner))
                else:
                    outs.append(book.record_verification(miner, op == "pass"))
            assert outs[0] == outs[1]
            assert books[0].snapshot(miner) == books[1].snapshot(miner) == outs[0]
        assert books[0].all() == books[1].all()
    finally:
        env.close()
