"""Sharding: split a multi-image job by image across miners and merge the results in image order.

Seeds: image i (0-based, in the whole job) of a job with seed s is generated with seed s + i, so a
shard starting at image f with seed s + f reproduces exactly the images the whole job would
have, whichever way the job was split (docs/hub.md, "Sharding and seeds").
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, NamedTuple, TypeVar

from aitbc import jobs

T = TypeVar("T")


class Shard(NamedTuple):
    index: int
    first_image: int
    count: int

    def images(self) -> range:
        return range(self.first_image, self.first_image + self.count)

    def describe(self) -> str:
        last = self.first_image + self.count - 1
        span = f"image {self.first_image + 1}" if self.count == 1 else f"images {self.first_image + 1}-{last + 1}"
        return f"shard {self.index} ({span})"


def plan_shards(images: int, candidates: int, max_per_shard: int) -> list[Shard]:
    """As many shards as there are candidate miners (at most one per image, at least enough that no
    shard exceeds `max_per_shard`), sizes differing by at most one, larger shards first.

    plan_shards(8, 3, 8) -> counts 3, 3, 2; plan_shards(8, 1, 4) -> 4, 4; plan_shards(1, 5, 8) -> 1."""
    for name, value in (("images", images), ("candidates", candidates), ("max_per_shard", max_per_shard)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer (got {value!r})")
    n = max(min(images, candidates), -(-images // max_per_shard))
    size, extra = divmod(images, n)
    out: list[Shard] = []
    first = 0
    for i in range(n):
        count = size + (1 if i < extra else 0)
        out.append(Shard(i, first, count))
        first += count
    return out


def image_seed(job_seed: int, image: int) -> int:
    """The seed of image `image` (0-based) of a job with seed `job_seed`."""
    seed = job_seed + image
    if not 0 <= seed <= jobs.MAX_RUN_SEED:  # what a miner accepts: jobs.MAX_SEED + jobs.MAX_IMAGES - 1
        raise ValueError(f"seed {job_seed} + image {image} is outside 0..{jobs.MAX_RUN_SEED}")
    return seed


def shard_seed(job_seed: int, shard: Shard) -> int:
    """The seed to send with a shard: its first image's seed (the miner adds its local index)."""
    return image_seed(job_seed, shard.first_image)


@dataclass(frozen=True, slots=True)
class Merge(Generic[T]):
    """The outcome of merging shard results.

    `artifacts` is the job's artifacts in image order when every shard is in, else None.
    `duplicates` lists shard indexes that arrived more than once (the first result is kept; a
    later one, identical or not, is ignored). `rejected` lists (index, why) for results that do
    not fit the plan (unknown shard, wrong artifact count); they count as not arrived."""

    artifacts: tuple[T, ...] | None
    missing: tuple[Shard, ...]
    duplicates: tuple[int, ...]
    rejected: tuple[tuple[int, str], ...]

    @property
    def complete(self) -> bool:
        return self.artifacts is not None

    def reason(self) -> str:
        """Person-readable: what is missing, ignored or rejected ("" when complete and clean)."""
        parts = []
        if self.missing:
            parts.append("missing " + ", ".join(s.describe() for s in self.missing))
        if self.duplicates:
            parts.append("ignored duplicate result of shard " + ", ".join(map(str, self.duplicates)))
        parts += [f"rejected result of shard {i}: {why}" for i, why in self.rejected]
        return "; ".join(parts)


def merge_in_order(plan: Sequence[Shard], results: Iterable[tuple[int, Sequence[T]]]) -> Merge[T]:
    """Merge (shard index, that shard's artifacts in its image order) pairs, in any arrival order.

    Idempotent: feeding the same results again, or a shard twice, gives the same artifacts."""
    by_index = {s.index: s for s in plan}
    got: dict[int, Sequence[T]] = {}
    duplicates: list[int] = []
    rejected: list[tuple[int, str]] = []
    for index, arts in results:
        shard = by_index.get(index)
        if shard is None:
            rejected.append((index, f"no shard {index} in a plan of {len(plan)}"))
        elif len(arts) != shard.count:
            rejected.append((index, f"{shard.describe()} must return {shard.count} artifacts, got {len(arts)}"))
        elif index in got:
            if index not in duplicates:
                duplicates.append(index)
        else:
            got[index] = arts
    ordered = sorted(plan, key=lambda s: s.first_image)
    missing = tuple(s for s in ordered if s.index not in got)
    artifacts: tuple[T, ...] | None = None
    if not missing:
        artifacts = tuple(a for s in ordered for a in got[s.index])
    return Merge(artifacts, missing, tuple(sorted(duplicates)), tuple(rejected))
