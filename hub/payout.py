"""Payout: what each contributor of a (sharded) job is minted, in integer token units, exactly.

Each shard has its own receipt signed by its miner and attested by the hub; its MINT pays
units x price_per_unit to that miner. `split` is that arithmetic for a whole job, so a client
or operator can state each miner's share; there is no rounding anywhere.
"""

from __future__ import annotations

from collections.abc import Mapping


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer (got {value!r})")
    return value


def split(units_by_miner: Mapping[str, int], price_per_unit: int) -> dict[str, int]:
    """Each miner's amount = its measured units x the job's price per unit (sorted by miner id).

    Miners with 0 units get 0 (listed: they took part and earned nothing)."""
    _check_int("price_per_unit", price_per_unit)
    return {m: _check_int(f"units of {m}", units_by_miner[m]) * price_per_unit for m in sorted(units_by_miner)}


def split_amount(total: int, units_by_miner: Mapping[str, int]) -> dict[str, int]:
    """Divide a fixed `total` in proportion to units (largest remainder; ties to the smaller miner
    id), summing to `total` exactly. For a pool fee or an aggregate amount; not used per shard."""
    _check_int("total", total)
    units = {m: _check_int(f"units of {m}", u) for m, u in units_by_miner.items()}
    weight = sum(units.values())
    if weight == 0:
        if total:
            raise ValueError("cannot split a non-zero total over zero units")
        return {m: 0 for m in sorted(units)}
    out = {m: total * u // weight for m, u in units.items()}
    left = total - sum(out.values())
    by_remainder = sorted(units, key=lambda m: (-(total * units[m] % weight), m))
    for m in by_remainder[:left]:
        out[m] += 1
    return {m: out[m] for m in sorted(out)}


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
