"""hub.sharding: plans, per-image seeds, in-order merge with out-of-order, duplicate and missing shards."""

from __future__ import annotations

import itertools
import random

import pytest

from aitbc import jobs
from aitbc.hub.sharding import Shard, image_seed, merge_in_order, plan_shards, shard_seed


def test_plans() -> None:
    assert plan_shards(8, 3, 8) == [Shard(0, 0, 3), Shard(1, 3, 3), Shard(2, 6, 2)]
    assert plan_shards(8, 1, 4) == [Shard(0, 0, 4), Shard(1, 4, 4)]
    assert plan_shards(1, 5, 8) == [Shard(0, 0, 1)]
    assert plan_shards(8, 8, 8) == [Shard(i, i, 1) for i in range(8)]
    assert plan_shards(8, 20, 8) == [Shard(i, i, 1) for i in range(8)]
    assert plan_shards(7, 2, 2) == [Shard(0, 0, 2), Shard(1, 2, 2), Shard(2, 4, 2), Shard(3, 6, 1)]


@pytest.mark.parametrize("images,candidates,cap", list(itertools.product(range(1, 10), range(1, 6), range(1, 9))))
def test_plan_invariants(images: int, candidates: int, cap: int) -> None:
    plan = plan_shards(images, candidates, cap)
    assert [s.index for s in plan] == list(range(len(plan)))
    assert [i for s in plan for i in s.images()] == list(range(images))  # every image once, in order
    counts = [s.count for s in plan]
    assert max(counts) <= cap and max(counts) - min(counts) <= 1 and counts == sorted(counts, reverse=True)
    assert len(plan) >= min(images, candidates)


@pytest.mark.parametrize("bad", [(0, 1, 1), (1, 0, 1), (1, 1, 0), (True, 1, 1), (1.5, 1, 1)])
def test_plan_rejects_bad_input(bad: tuple[object, object, object]) -> None:
    with pytest.raises(ValueError):
        plan_shards(*bad)  # type: ignore[arg-type]


def test_seeds_are_job_seed_plus_image_index() -> None:
    plan = plan_shards(8, 3, 8)
    assert [shard_seed(7, s) for s in plan] == [7, 10, 13]
    # a shard's images use the same seeds as the whole job would: s + i for global image i
    for s in plan:
        assert [image_seed(shard_seed(7, s), k) for k in range(s.count)] == [image_seed(7, i) for i in s.images()]
    with pytest.raises(ValueError):
        image_seed(2**64 - 1, 1)
    # the bound is what a miner accepts: the last image of a job with the highest client seed
    assert image_seed(jobs.MAX_SEED, jobs.MAX_IMAGES - 1) == jobs.MAX_RUN_SEED
    with pytest.raises(ValueError):
        image_seed(jobs.MAX_SEED, jobs.MAX_IMAGES)


def _results(plan: list[Shard]) -> list[tuple[int, list[bytes]]]:
    return [(s.index, [f"img{i}".encode() for i in s.images()]) for s in plan]


def test_merge_out_of_order_gives_image_order() -> None:
    plan = plan_shards(8, 3, 8)
    results = _results(plan)
    for perm in itertools.permutations(results):
        m = merge_in_order(plan, perm)
        assert m.complete and m.artifacts == tuple(f"img{i}".encode() for i in range(8))
        assert m.missing == () and m.duplicates == () and m.rejected == () and m.reason() == ""


def test_duplicate_shard_is_ignored_idempotently_and_reported() -> None:
    plan = plan_shards(8, 3, 8)
    results = _results(plan)
    forged = (1, [b"other", b"bytes", b"here"])
    m = merge_in_order(plan, [results[1], results[0], forged, results[2], results[1]])
    assert m.artifacts == tuple(f"img{i}".encode() for i in range(8))  # the first result of shard 1 is kept
    assert m.duplicates == (1,)
    assert "ignored duplicate result of shard 1" in m.reason()
    rng = random.Random(3)
    doubled = results * 2
    rng.shuffle(doubled)
    assert merge_in_order(plan, doubled).artifacts == m.artifacts


def test_missing_shard_is_named() -> None:
    plan = plan_shards(8, 3, 8)
    results = _results(plan)
    m = merge_in_order(plan, [results[2], results[0]])
    assert not m.complete and m.artifacts is None
    assert m.missing == (Shard(1, 3, 3),)
    assert m.reason() == "missing shard 1 (images 4-6)"
    single = merge_in_order(plan_shards(2, 2, 8), [])
    assert single.reason() == "missing shard 0 (image 1), shard 1 (image 2)"


def test_results_that_do_not_fit_the_plan_are_rejected() -> None:
    plan = plan_shards(4, 2, 8)
    m = merge_in_order(plan, [(0, [b"a", b"b"]), (1, [b"c"]), (5, [b"x"])])
    assert not m.complete and m.missing == (Shard(1, 2, 2),)
    assert [i for i, _ in m.rejected] == [1, 5]
    assert "must return 2 artifacts, got 1" in m.reason() and "no shard 5" in m.reason()
    fixed = merge_in_order(plan, [(0, [b"a", b"b"]), (1, [b"c"]), (1, [b"c", b"d"])])
    assert fixed.artifacts == (b"a", b"b", b"c", b"d") and fixed.duplicates == ()
