"""hub.payout: exact integer amounts per contributor and the verification-cost arithmetic."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aitbc.hub.payout import expected_verification_cost_pct, shares, verification_cost_pct


def test_shares_sum_units_times_price_per_provider() -> None:
    # three shards: b served two of them, at its own price; c took part and earned nothing
    got = shares([("b", 1500, 3), ("a", 2500, 2), ("b", 500, 3), ("c", 0, 7)])
    assert got == {"a": 5000, "b": 6000, "c": 0} and list(got) == ["a", "b", "c"]
    big = 2**62
    assert shares([("a", big, 4)]) == {"a": big * 4}  # no float anywhere
    assert shares([]) == {}


@pytest.mark.parametrize("bad", [("a", -1, 1), ("a", 1.5, 1), ("a", True, 1), ("a", 1, -1)])
def test_shares_reject_bad_numbers(bad: tuple[str, object, object]) -> None:
    with pytest.raises(ValueError):
        shares([bad])  # type: ignore[list-item]


@given(st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 10**12), st.integers(0, 10**6)), max_size=12))
def test_shares_total_is_the_sum_of_the_mints(items: list[tuple[str, int, int]]) -> None:
    assert sum(shares(items).values()) == sum(u * p for _, u, p in items)


def test_verification_cost() -> None:
    assert verification_cost_pct(100, 1000) == 10.0
    assert verification_cost_pct(0, 0) == 0.0
    for rate in (0.05, 0.10, 0.25):
        assert expected_verification_cost_pct(rate) == pytest.approx(rate * 100)
    assert expected_verification_cost_pct(0.10, shard_fraction=0.25) == pytest.approx(2.5)
    with pytest.raises(ValueError):
        expected_verification_cost_pct(1.5)
