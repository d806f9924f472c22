"""hub.matching: eligibility order and reasons, scoring, round-robin among equals, VRAM estimate."""

from __future__ import annotations

from collections import Counter

import pytest

from aitbc.hub.matching import (
    IMAGE_BASE_MB,
    TEXT_BASE_MB,
    JobNeeds,
    MinerView,
    Placement,
    Unplaceable,
    choose,
    score,
    vram_needed_mb,
)


def miner(mid: str, **kw: object) -> MinerView:
    values: dict[str, object] = dict(models=frozenset({"sd"}), vram_mb=24_000, price_per_unit=1, max_concurrency=1)
    values.update(kw)
    return MinerView(mid, **values)  # type: ignore[arg-type]


def test_vram_estimate_formula() -> None:
    assert vram_needed_mb("image", 512, 512, 1) == IMAGE_BASE_MB + 1200  # 512*512*4800 B = 1200 MiB
    assert vram_needed_mb("image", 0, 0, 1) == vram_needed_mb("image", 512, 512, 1)  # native size
    assert vram_needed_mb("image", 512, 512, 4) == IMAGE_BASE_MB + 4800
    assert vram_needed_mb("image", 1024, 1024, 1) == IMAGE_BASE_MB + 4800
    assert vram_needed_mb("image", 64, 64, 1) == IMAGE_BASE_MB + 19  # ceil(18.75)
    assert vram_needed_mb("text", 0, 0, 1) == TEXT_BASE_MB
    assert vram_needed_mb("image", 512, 768, 2) > vram_needed_mb("image", 512, 512, 2)


def test_no_miner_serves_model() -> None:
    out = choose([miner("a", models=frozenset({"other"}))], JobNeeds("sd"), 0)
    assert isinstance(out, Unplaceable) and out.code == "no_model" and not out.wait
    assert out.reason == "no miner serves model 'sd'"
    assert choose([], JobNeeds("sd"), 0) == Unplaceable("no_model", "no miner serves model 'sd'")


def test_model_of_another_kind_is_not_served() -> None:
    out = choose([miner("a", models=frozenset({"llm"}), kinds={"llm": "text"})], JobNeeds("llm", kind="image"), 0)
    assert isinstance(out, Unplaceable) and out.code == "no_model"
    assert "no miner serves model 'llm' for image jobs" in out.reason
    ok = choose([miner("a", models=frozenset({"llm"}), kinds={"llm": "text"})], JobNeeds("llm", kind="text"), 0)
    assert isinstance(ok, Placement)


def test_all_above_max_price_names_cheapest() -> None:
    miners = [miner("a", price_per_unit=5), miner("b", price_per_unit=3), miner("c", price_per_unit=9)]
    out = choose(miners, JobNeeds("sd", max_price_per_unit=2), 0)
    assert isinstance(out, Unplaceable) and out.code == "price" and not out.wait
    assert out.reason == "all 3 miners serving 'sd' are above your max price 2 (cheapest: 3)"


def test_max_price_zero_with_only_paid_miners() -> None:
    out = choose([miner("a", price_per_unit=1)], JobNeeds("sd", max_price_per_unit=0), 0)
    assert isinstance(out, Unplaceable) and out.code == "price"
    assert out.reason == "all 1 miner serving 'sd' are above your max price 0 (cheapest: 1)"
    free = choose([miner("a", price_per_unit=1), miner("b", price_per_unit=0)], JobNeeds("sd", max_price_per_unit=0), 0)
    assert isinstance(free, Placement) and free.miner_id == "b"


def test_max_price_is_inclusive_and_none_means_any() -> None:
    assert isinstance(choose([miner("a", price_per_unit=4)], JobNeeds("sd", max_price_per_unit=4), 0), Placement)
    assert isinstance(choose([miner("a", price_per_unit=10**9)], JobNeeds("sd"), 0), Placement)


def test_not_enough_vram_names_need_and_largest() -> None:
    miners = [miner("a", vram_mb=4096), miner("b", vram_mb=6144)]
    needs = JobNeeds("sd", width=1024, height=1024, images=4)
    need = vram_needed_mb("image", 1024, 1024, 4)
    out = choose(miners, needs, 0)
    assert isinstance(out, Unplaceable) and out.code == "vram" and not out.wait
    assert out.reason == f"no miner serving 'sd' has enough VRAM: the job needs ~{need} MB, the largest has 6144 MB"


def test_vram_zero_means_undeclared_cpu_miner_and_is_not_checked() -> None:
    out = choose([miner("cpu", vram_mb=0)], JobNeeds("sd", width=2048, height=2048, images=2), 0)
    assert isinstance(out, Placement) and out.miner_id == "cpu"


def test_vram_reason_mentions_price_filter_when_it_applied() -> None:
    miners = [miner("cheap", vram_mb=4000, price_per_unit=1), miner("big", vram_mb=80_000, price_per_unit=50)]
    out = choose(miners, JobNeeds("sd", images=8, max_price_per_unit=10), 0)
    assert isinstance(out, Unplaceable) and out.code == "vram"
    assert "at or below your max price" in out.reason and "the largest has 4000 MB" in out.reason


def test_every_miner_quarantined() -> None:
    out = choose([miner("a", quarantined=True), miner("b", quarantined=True)], JobNeeds("sd"), 0)
    assert isinstance(out, Unplaceable) and out.code == "quarantined" and not out.wait
    assert out.reason == "every miner serving 'sd' is quarantined"


def test_quarantined_miner_never_chosen() -> None:
    miners = [miner("bad", quarantined=True, price_per_unit=0, reputation=1.0), miner("ok", price_per_unit=5)]
    for rr in range(10):
        out = choose(miners, JobNeeds("sd"), rr)
        assert isinstance(out, Placement) and out.miner_id == "ok"


def test_all_busy_is_a_wait_not_an_error() -> None:
    miners = [miner("a", running=1), miner("b", running=2, max_concurrency=2)]
    out = choose(miners, JobNeeds("sd"), 0)
    assert isinstance(out, Unplaceable) and out.code == "busy" and out.wait
    assert out.reason.startswith("all miners serving 'sd' are busy")


def test_excluded_miners_are_skipped_and_all_excluded_waits() -> None:
    miners = [miner("a"), miner("b")]
    out = choose(miners, JobNeeds("sd", exclude=frozenset({"a"})), 0)
    assert isinstance(out, Placement) and out.miner_id == "b"
    out = choose(miners, JobNeeds("sd", exclude=frozenset({"a", "b"})), 0)
    assert isinstance(out, Unplaceable) and out.code == "excluded" and out.wait


def test_avoided_miners_get_the_job_back_only_when_nobody_else_could_take_it() -> None:
    liar, honest = miner("a", price_per_unit=0), miner("b", price_per_unit=5)
    # the job failed on the cheaper miner: it goes elsewhere though the other one costs more
    out = choose([liar, honest], JobNeeds("sd", avoid=frozenset({"a"})), 0)
    assert isinstance(out, Placement) and out.miner_id == "b"
    # the other one is busy: the job waits for it rather than going back to where it failed
    out = choose([liar, miner("b", running=1)], JobNeeds("sd", avoid=frozenset({"a"})), 0)
    assert isinstance(out, Unplaceable) and out.code == "busy" and out.wait
    # nobody else serves the model (a one-miner devnet): it is retried there
    out = choose([liar], JobNeeds("sd", avoid=frozenset({"a"})), 0)
    assert isinstance(out, Placement) and out.miner_id == "a"
    # a miner that could not take it anyway (another model, quarantined) does not count as "somebody else"
    out = choose([liar, miner("c", quarantined=True), miner("d", models=frozenset({"xl"}))],
                 JobNeeds("sd", avoid=frozenset({"a"})), 0)
    assert isinstance(out, Placement) and out.miner_id == "a"


def test_a_failing_miner_gets_work_only_when_no_steady_one_is_free() -> None:
    failing, steady = miner("a", price_per_unit=0, failing=True), miner("b", price_per_unit=5)
    assert choose([failing, steady], JobNeeds("sd"), 0).miner_id == "b"  # type: ignore[union-attr]
    # the steady one is busy: the failing one may try (and so can recover)
    assert choose([failing, miner("b", running=1)], JobNeeds("sd"), 0).miner_id == "a"  # type: ignore[union-attr]


def test_reason_priority_order() -> None:
    """Each filter only speaks when the ones before it left somebody."""
    expensive_small = miner("a", price_per_unit=9, vram_mb=1000, quarantined=True, running=1)
    assert choose([expensive_small], JobNeeds("x"), 0).code == "no_model"  # type: ignore[union-attr]
    assert choose([expensive_small], JobNeeds("sd", max_price_per_unit=1), 0).code == "price"  # type: ignore[union-attr]
    assert choose([expensive_small], JobNeeds("sd"), 0).code == "vram"  # type: ignore[union-attr]
    big = expensive_small.__class__(**{**_fields(expensive_small), "vram_mb": 80_000})
    assert choose([big], JobNeeds("sd"), 0).code == "quarantined"  # type: ignore[union-attr]
    healthy = big.__class__(**{**_fields(big), "quarantined": False})
    assert choose([healthy], JobNeeds("sd", exclude=frozenset({"a"})), 0).code == "excluded"  # type: ignore[union-attr]
    assert choose([healthy], JobNeeds("sd"), 0).code == "busy"  # type: ignore[union-attr]


def _fields(m: MinerView) -> dict[str, object]:
    return {f: getattr(m, f) for f in MinerView.__slots__}  # type: ignore[attr-defined]


def test_score_prefers_cheaper_reputable_idle_fast() -> None:
    base = miner("a", price_per_unit=2, reputation=0.5, running=0, max_concurrency=4, recent_latency_ms=500)
    needs = JobNeeds("sd")
    for better in (
        miner("b", price_per_unit=1, reputation=0.5, running=0, max_concurrency=4, recent_latency_ms=500),
        miner("b", price_per_unit=2, reputation=0.9, running=0, max_concurrency=4, recent_latency_ms=500),
        miner("b", price_per_unit=2, reputation=0.5, running=0, max_concurrency=8, recent_latency_ms=500),
        miner("b", price_per_unit=2, reputation=0.5, running=0, max_concurrency=4, recent_latency_ms=100),
    ):
        assert score(better, needs) >= score(base, needs)
        assert score(better, needs) > score(miner("c", price_per_unit=2, reputation=0.5, running=2,
                                                  max_concurrency=4, recent_latency_ms=500), needs)
    assert 0.0 <= score(base, needs) <= 1.0
    perfect = miner("p", price_per_unit=0, reputation=1.0, running=0, recent_latency_ms=1e-9)
    assert score(perfect, needs) == pytest.approx(1.0, abs=1e-6)


def test_choose_picks_the_top_score() -> None:
    miners = [miner("slow", recent_latency_ms=5000), miner("fast", recent_latency_ms=50), miner("pricey", price_per_unit=20)]
    out = choose(miners, JobNeeds("sd"), 0)
    assert isinstance(out, Placement) and out.miner_id == "fast" and out.tied == 1


def test_round_robin_is_fair_among_equal_scores_whatever_the_listing_order() -> None:
    equals = [miner(f"m{i}") for i in range(4)]
    picks = Counter()
    for rr in range(400):
        listing = equals if rr % 2 else list(reversed(equals))
        out = choose([*listing, miner("worse", price_per_unit=3)], JobNeeds("sd"), rr)
        assert isinstance(out, Placement) and out.tied == 4
        picks[out.miner_id] += 1
    assert picks == {f"m{i}": 100 for i in range(4)}


def test_busy_top_miner_falls_back_to_next() -> None:
    out = choose([miner("best", price_per_unit=0, running=1), miner("next", price_per_unit=5)], JobNeeds("sd"), 0)
    assert isinstance(out, Placement) and out.miner_id == "next"


def test_device_class_constraint_for_verification_reruns() -> None:
    miners = [miner("gpu", device_class="cuda"), miner("cpu", device_class="cpu", price_per_unit=0)]
    out = choose(miners, JobNeeds("sd", device_class="cuda"), 0)
    assert isinstance(out, Placement) and out.miner_id == "gpu"
    out = choose(miners, JobNeeds("sd", device_class="cuda", exclude=frozenset({"gpu"})), 0)
    assert isinstance(out, Unplaceable) and out.code == "excluded" and out.wait
    out = choose([miners[1]], JobNeeds("sd", device_class="cuda"), 0)
    assert isinstance(out, Unplaceable) and out.code == "device" and out.wait and "runs on cuda" in out.reason
    assert isinstance(choose(miners, JobNeeds("sd"), 0), Placement)  # no constraint for ordinary jobs
