"""aitbc.limits: the token bucket and the jittered backoff every service retry loop uses
(settlement, miner reconnect, ledger sync; the SDK's RetryPolicy draws the same way)."""

from __future__ import annotations

import random

import pytest

from aitbc.limits import Backoff, TokenBucket


def test_backoff_ceilings_double_up_to_the_cap_and_reset():
    b = Backoff(0.5, 4.0, random.Random(1))
    ceilings = []
    for _ in range(6):
        ceilings.append(b.ceiling())
        assert 0 <= b.next() <= ceilings[-1]
    assert ceilings == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    b.reset()
    assert b.ceiling() == 0.5
    with pytest.raises(ValueError):
        Backoff(0, 1)


def test_backoff_is_jittered_so_restarted_peers_do_not_come_back_in_lockstep():
    """100 miners that lost the same coordinator at the same instant: their first waits spread over
    the whole first interval instead of all being 0.5 s."""
    waits = [Backoff(0.5, 30.0).next() for _ in range(100)]
    assert len({round(w, 6) for w in waits}) > 90
    assert min(waits) < 0.1 and max(waits) > 0.4 and max(waits) <= 0.5


def test_token_bucket_spends_and_refills():
    now = [0.0]
    tb = TokenBucket(rate=2.0, burst=3, clock=lambda: now[0])
    assert [tb.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert tb.take() == pytest.approx(0.5)  # one token needs half a second
    now[0] = 0.5
    assert tb.take() == 0.0
    assert tb.take(5) == pytest.approx(0.5)  # empty: nothing spent
    now[0] = 2.0
    assert tb.full and tb.take(5) == 0.0 and tb.wait_s() == pytest.approx(1.5)  # a big spend is owed


def test_keyed_buckets_stay_bounded_and_forget_the_callers_that_owe_nothing_first() -> None:
    from aitbc.limits import KeyedBuckets

    now = [0.0]
    kb = KeyedBuckets(1.0, 2, lambda: now[0], max_keys=3)
    kb.bucket("a").take(2)  # a owes: its bucket is empty
    kb.bucket("b")
    kb.bucket("c")
    assert len(kb) == 3 and kb.get("zz") is None
    kb.bucket("d")  # full map: b and c (full buckets) go, a (it owes) stays
    assert len(kb) == 2 and kb.get("a") is not None and kb.get("b") is None and kb.get("d") is not None
    for k in "efg":  # nobody full but the newest: the oldest goes each time
        kb.bucket(k).take(2)
    assert len(kb) <= 3
