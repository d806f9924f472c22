"""Payout: what each contributor of a (sharded) job is minted, in integer token units, exactly.

Each shard has its own receipt signed by its miner and attested by the hub; its MINT pays
units x price_per_unit to that miner. `shares` is that arithmetic over a whole job's receipts, so
a client or operator can state each miner's share (`aitbc receipts --job-id`); no rounding.
"""

from __future__ import annotations

from collections.abc import Iterable


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer (got {value!r})")
    return value


def shares(receipts: Iterable[tuple[str, int, int]]) -> dict[str, int]:
    """What each contributor of a job is minted: for (provider, units, price_per_unit) of each of
    the job's receipts (one per shard), the sum of units x price_per_unit per provider, sorted by
    provider. Integers throughout: no rounding anywhere. A provider with 0 units is listed with 0
    (it took part and earned nothing)."""
    out: dict[str, int] = {}
    for provider, units, price in receipts:
        out[provider] = out.get(provider, 0) + _check_int(f"units of {provider}", units) * _check_int("price_per_unit", price)
    return {p: out[p] for p in sorted(out)}


def verification_cost_pct(extra_units: int, total_units: int) -> float:
    """Compute spent on verification re-runs as a % of the compute served to clients.

    `total_units` excludes the re-runs. With sampling rate r and single-image jobs the expected
    value is r x 100 (e.g. 10.0 at the default 0.10); as a share of all compute (re-runs
    included) it is 100 x extra / (total + extra)."""
    _check_int("extra_units", extra_units)
    _check_int("total_units", total_units)
    if total_units == 0:
        return 0.0 if extra_units == 0 else float("inf")
    return 100.0 * extra_units / total_units


def expected_verification_cost_pct(rate: float, *, shard_fraction: float = 1.0) -> float:
    """The expected extra compute in % of served compute: rate x shard_fraction x 100, where
    shard_fraction is the part of a sampled job that is re-run (1 for single-image jobs)."""
    if not 0.0 <= rate <= 1.0 or not 0.0 < shard_fraction <= 1.0:
        raise ValueError("rate must be in [0, 1] and shard_fraction in (0, 1]")
    return rate * shard_fraction * 100.0
