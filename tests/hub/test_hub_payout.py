"""hub.payout: exact integer amounts per contributor and the verification-cost arithmetic."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aitbc.hub.payout import expected_verification_cost_pct, split, split_amount, verification_cost_pct


def test_split_is_units_times_price() -> None:
    assert split({"b": 1500, "a": 2500, "c": 0}, 3) == {"a": 7500, "b": 4500, "c": 0}
    assert list(split({"b": 1, "a": 1}, 1)) == ["a", "b"]
    big = 2**62
    assert split({"a": big}, 4) == {"a": big * 4}  # no float anywhere


@pytest.mark.parametrize("bad", [{"a": -1}, {"a": 1.5}, {"a": True}])
def test_split_rejects_bad_units(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        split(bad, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        split({"a": 1}, -1)


@given(st.integers(0, 10**18), st.dictionaries(st.text(min_size=1, max_size=4), st.integers(0, 10**9), min_size=1, max_size=8))
def test_split_amount_is_exact_and_proportional(total: int, units: dict[str, int]) -> None:
    if sum(units.values()) == 0:
        if total:
            with pytest.raises(ValueError):
                split_amount(total, units)
        return
    out = split_amount(total, units)
    assert sum(out.values()) == total and set(out) == set(units)
    weight = sum(units.values())
    for m, u in units.items():
        assert abs(out[m] * weight - total * u) < weight  # within one unit of the exact share


def test_split_amount_example() -> None:
    assert split_amount(10, {"a": 1, "b": 1, "c": 1}) == {"a": 4, "b": 3, "c": 3}


def test_verification_cost() -> None:
    assert verification_cost_pct(100, 1000) == 10.0
    assert verification_cost_pct(0, 0) == 0.0
    for rate in (0.05, 0.10, 0.25):
        assert expected_verification_cost_pct(rate) == pytest.approx(rate * 100)
    assert expected_verification_cost_pct(0.10, shard_fraction=0.25) == pytest.approx(2.5)
    with pytest.raises(ValueError):
        expected_verification_cost_pct(1.5)
