"""Matching: which miner gets a job, or a person-readable reason why none can.

Pure and synchronous: the coordinator builds a `MinerView` per connected miner and a `JobNeeds`
per queued job, calls `choose`, and assigns (a `Placement`) or keeps/refuses the job (an
`Unplaceable`). Formula, weights and the VRAM estimate are documented in docs/hub.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

Kind = Literal["image", "text"]

# VRAM estimate for SD-class (Stable Diffusion 1.x/2.x, fp16) jobs; see docs/hub.md
IMAGE_BASE_MB = 3000  # weights (UNet + VAE + text encoder, fp16) + CUDA context + workspace
IMAGE_BYTES_PER_PIXEL = 4800  # activations per output pixel per image (CFG doubles the UNet batch)
NATIVE_SIDE = 512  # width/height 0 means the model's native size; 512 is the SD 1.x size (conservative)
TEXT_BASE_MB = 2000  # a text job: a fixed floor; the model's own size is the miner's declaration

# score weights (sum to 1) and reference scales
W_PRICE, W_REPUTATION, W_LOAD, W_LATENCY = 0.35, 0.30, 0.20, 0.15
PRICE_REF = 1.0  # price per unit at which the price term is 0.5
LATENCY_REF_MS = 1000.0  # latency at which the latency term is 0.5
UNKNOWN_LATENCY_TERM = 0.5  # a miner with no latency history yet is neither rewarded nor punished
SCORE_DIGITS = 9  # scores are rounded so that equal inputs tie exactly and round-robin applies


@dataclass(frozen=True, slots=True)
class MinerView:
    """What matching needs to know about one connected miner (built from MinerInfo + hub state).

    `vram_mb` 0 means not declared (a CPU miner): the VRAM fit is not checked for it; a miner
    that lies fails jobs, and failures cost reputation (hub/reputation.py)."""

    miner_id: str
    models: frozenset[str]
    kinds: Mapping[str, Kind] = field(default_factory=dict)  # model -> kind; a model not listed is "image"
    vram_mb: int = 0
    price_per_unit: int = 0
    max_concurrency: int = 1
    running: int = 0
    reputation: float = 0.5
    recent_latency_ms: float = 0.0  # EWMA of assignment -> result; 0 = no history yet
    quarantined: bool = False
    device_class: str = ""  # "cpu" or "cuda" (from MinerInfo.device); "" unknown
    failing: bool = False  # its last jobs all failed or stalled: chosen only when no steady miner is free
    established: bool = True  # trusted (docs/hub.md, "Trust bootstrap"): may re-execute others' jobs

    def kind_of(self, model: str) -> Kind:
        return self.kinds.get(model, "image")


@dataclass(frozen=True, slots=True)
class JobNeeds:
    model: str
    kind: Kind = "image"
    width: int = 0  # 0: the model's native size
    height: int = 0
    images: int = 1  # images of this (shard of a) job; the batch size
    max_price_per_unit: int | None = None  # None: any price
    exclude: frozenset[str] = frozenset()  # miners that must not get it (rejected result, original of a verification)
    avoid: frozenset[str] = frozenset()  # miners it failed or stalled on: used only when no other miner could take it
    # a verification re-run runs on the original's device class: CPU-vs-CUDA agreement is not
    # measured yet, so the two are not compared with each other (docs/hub.md)
    device_class: str | None = None
    # a re-execution (verification run or referee) goes only to established miners: a fresh key
    # never gets a vote on another miner's result (docs/hub.md, "Trust bootstrap")
    established_only: bool = False


@dataclass(frozen=True, slots=True)
class Placement:
    miner_id: str
    score: float
    tied: int  # how many miners shared the top score (round-robin among them)


UnplaceableCode = Literal["no_model", "price", "vram", "quarantined", "unproven", "device", "excluded", "busy"]


@dataclass(frozen=True, slots=True)
class Unplaceable:
    """Why no miner can take the job now.

    `wait` True (busy, or every server already tried): not an error, keep the job queued.
    `wait` False: no connected miner can take it as things stand; at submission the coordinator
    answers FAILED_PRECONDITION with `reason`; a job already queued waits (a miner may connect)
    until its queue TTL, with `reason` as its error."""

    code: UnplaceableCode
    reason: str
    wait: bool = False


def vram_needed_mb(kind: Kind, width: int, height: int, images: int) -> int:
    """Estimated peak VRAM of a job in MB (MiB).

    image: IMAGE_BASE_MB + width x height x images x IMAGE_BYTES_PER_PIXEL / 2^20, rounded up;
    0 for a side means the native 512. text: TEXT_BASE_MB."""
    if kind == "text":
        return TEXT_BASE_MB
    pixels = (width or NATIVE_SIDE) * (height or NATIVE_SIDE) * max(1, images)
    return IMAGE_BASE_MB + math.ceil(pixels * IMAGE_BYTES_PER_PIXEL / (1 << 20))


def score(miner: MinerView, needs: JobNeeds) -> float:
    """Higher is better; in [0, 1]. Eligibility (model, price, VRAM, quarantine) is choose()'s job.

    score = 0.35 * 1/(1 + price/PRICE_REF) + 0.30 * reputation + 0.20 * (1 - running/max_concurrency)
          + 0.15 * latency_term, latency_term = 1/(1 + latency_ms/LATENCY_REF_MS) (0.5 with no history)."""
    return _score(miner)


def _score(m: MinerView) -> float:
    lat = m.recent_latency_ms
    cap = m.max_concurrency if m.max_concurrency > 0 else 1
    load = m.running / cap
    rep = m.reputation
    s = (
        W_PRICE / (1.0 + m.price_per_unit / PRICE_REF)
        + W_REPUTATION * (0.0 if rep < 0.0 else 1.0 if rep > 1.0 else rep)
        + W_LOAD * (0.0 if load >= 1.0 else 1.0 - load)
        + W_LATENCY * (UNKNOWN_LATENCY_TERM if lat <= 0.0 else 1.0 / (1.0 + lat / LATENCY_REF_MS))
    )
    return round(s, SCORE_DIGITS)


def choose(miners: Iterable[MinerView], needs: JobNeeds, rr_counter: int) -> Placement | Unplaceable:
    """The best eligible miner with a free slot, round-robin (by `rr_counter`) among equal scores.

    Filters apply in this order, and the first one that leaves nobody names the reason:
    model (and kind) -> max price -> VRAM fit -> quarantine -> established (re-executions only) ->
    device class -> exclusions -> free slots (busy). Miners in `needs.avoid` are dropped before the free-slot step unless that would
    leave nobody (a soft exclusion: the job may go back to them when they are all there is); so are
    miners not established once the job lost an attempt (avoid or exclude set), when an established
    one could take it; among the free miners, `failing` ones are chosen only when no other one is free."""
    model, kind = needs.model, needs.kind
    serving: list[MinerView] = []
    other_kind = False
    for m in miners:
        if model in m.models:
            if m.kinds.get(model, "image") == kind:
                serving.append(m)
            else:
                other_kind = True
    if not serving:
        if other_kind:
            return Unplaceable("no_model", f"no miner serves model '{model}' for {kind} jobs "
                                           f"(it is served as a {'text' if kind == 'image' else 'image'} model)")
        return Unplaceable("no_model", f"no miner serves model '{model}'")

    pool = serving
    cap = needs.max_price_per_unit
    if cap is not None:
        pool = [m for m in serving if m.price_per_unit <= cap]
        if not pool:
            cheapest = min(m.price_per_unit for m in serving)
            n = len(serving)
            return Unplaceable("price", f"all {n} miner{'s' if n != 1 else ''} serving '{model}' are above your "
                                        f"max price {cap} (cheapest: {cheapest})")

    need = vram_needed_mb(kind, needs.width, needs.height, needs.images)
    fits = [m for m in pool if m.vram_mb == 0 or m.vram_mb >= need]
    if not fits:
        largest = max(m.vram_mb for m in pool)
        within = " at or below your max price" if len(pool) < len(serving) else ""
        return Unplaceable("vram", f"no miner serving '{model}'{within} has enough VRAM: the job needs ~{need} MB, "
                                   f"the largest has {largest} MB")

    healthy = [m for m in fits if not m.quarantined]
    if not healthy:
        return Unplaceable("quarantined", f"every miner serving '{model}' that fits the job is quarantined"
                           if len(fits) < len(serving) else f"every miner serving '{model}' is quarantined")

    if needs.established_only:
        healthy = [m for m in healthy if m.established]
        if not healthy:
            return Unplaceable("unproven", f"no established miner serving '{model}' is connected (re-executions run "
                                           "only on established miners: docs/hub.md, \"Trust bootstrap\"); waiting for one",
                               wait=True)

    if needs.device_class is not None:
        healthy = [m for m in healthy if m.device_class == needs.device_class]
        if not healthy:
            return Unplaceable("device", f"no eligible miner serving '{model}' runs on {needs.device_class or 'an unknown device'}"
                                         " (a verification re-run needs the original's device class); waiting for one",
                               wait=True)

    exclude = needs.exclude
    allowed = [m for m in healthy if m.miner_id not in exclude] if exclude else healthy
    if not allowed:
        return Unplaceable("excluded", f"every eligible miner serving '{model}' was already tried on this job; "
                                       "waiting for another miner", wait=True)
    if needs.avoid:  # retry elsewhere whenever another eligible miner exists, even a busy one (wait for it)
        others = [m for m in allowed if m.miner_id not in needs.avoid]
        if others:
            allowed = others
    if needs.avoid or needs.exclude:
        # a job that lost an attempt is retried on an established miner whenever one could take it, even a
        # busy one: fresh keys (free) failing it in turn would use up its max_attempts (THREAT-MODEL.md)
        proven = [m for m in allowed if m.established]
        if proven:
            allowed = proven

    free = [m for m in allowed if m.running < (m.max_concurrency if m.max_concurrency > 0 else 1)]
    steady = [m for m in free if not m.failing]
    best = -1.0
    top: list[MinerView] = []
    for m in steady or free:
        s = _score(m)
        if s > best:
            best, top = s, [m]
        elif s == best:
            top.append(m)
    if not top:
        n = len(allowed)
        return Unplaceable("busy", f"all miners serving '{model}' are busy ({n} eligible, no free slot); "
                                   "the job waits in the queue", wait=True)
    if len(top) > 1:
        top.sort(key=_miner_id)  # a stable order, whatever order the caller lists miners in
    return Placement(top[rr_counter % len(top)].miner_id, best, len(top))


def _miner_id(m: MinerView) -> str:
    return m.miner_id
