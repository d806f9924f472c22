"""Verification by re-execution: which jobs are sampled, and whether two executions agree.

A sampled job is run again on a different miner with the same parameters and seed; on CPU the
artifacts must be byte-identical, on GPU (kernels are not bit-exact across hardware) decoded
pixels must be within a tolerance. docs/hub.md, "Verification", gives the rules and defaults.
"""

from __future__ import annotations

import hashlib
import hmac
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from aitbc.jobs import PNG_MAGIC

DEFAULT_RATE = 0.10
# Mean absolute difference of RGB(A) pixel values, normalised to 0..1 (0.03 = 3% of full scale,
# about 7.7 levels of 255 on average). A miner that did not run the model (another prompt, another
# seed, noise, another job's image) lands around 0.1-0.4; see docs/hub.md for the calibration.
DEFAULT_TOLERANCE = 0.03
SAMPLE_DOMAIN = b"AITBC/hub-verify-sample/v1\x00"


def sample_key(miner_id: str, draw: int) -> str:
    """What the coordinator samples: draw number `draw` (0, 1, 2 ...) of one miner, i.e. its
    (draw+1)-th original result. Per-miner draws make each miner's chance of being checked within
    its first N results exactly 1 - (1 - rate)^N, however jobs are spread over miners."""
    if draw < 0:
        raise ValueError(f"draw must be >= 0 (got {draw})")
    return f"{miner_id}/{draw}"


def should_verify(key: str, rate: float = DEFAULT_RATE, *, secret: bytes = b"") -> bool:
    """Deterministic sampling: the first 8 bytes of sha256(domain || key), read big-endian, fall
    below rate x 2^64. With `secret` the digest is HMAC-SHA256(secret, domain || key).

    Use a secret in production: a miner knows its own id and can count its results, and without a
    secret it could compute which of them will be checked and cheat on the others."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be between 0 and 1 (got {rate})")
    msg = SAMPLE_DOMAIN + key.encode()
    digest = hmac.new(secret, msg, hashlib.sha256).digest() if secret else hashlib.sha256(msg).digest()
    return int.from_bytes(digest[:8], "big") < rate * 2.0**64


@dataclass(frozen=True, slots=True)
class Verdict:
    match: bool
    distance: float  # 0 identical .. 1 maximally different (the worst artifact)
    reason: str


def compare_artifacts(a: Sequence[bytes], b: Sequence[bytes], *, exact: bool,
                      tolerance: float = DEFAULT_TOLERANCE) -> Verdict:
    """Compare the artifacts of two executions of one job.

    exact (CPU): byte for byte. Not exact (GPU): PNGs are decoded and compared by mean absolute
    pixel difference (0..1) against `tolerance`; other artifacts (UTF-8 text) are still compared
    byte for byte. distance is the worst artifact's; reason names the first artifact that fails."""
    if len(a) != len(b):
        return Verdict(False, 1.0, f"artifact counts differ: {len(a)} vs {len(b)}")
    worst = 0.0
    first_bad = ""
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x == y:
            continue
        if exact or not (x.startswith(PNG_MAGIC) and y.startswith(PNG_MAGIC)):
            d, why = 1.0, f"artifact {i} differs byte for byte (sha256 {_short(x)} vs {_short(y)})"
        else:
            d, why = _pixel_distance(x, y)
            if not why and d > tolerance:
                why = f"artifact {i}: pixel distance {d:.4f} exceeds the tolerance {tolerance:g}"
            elif why:
                why = f"artifact {i}: {why}"
        worst = max(worst, d)
        if why and not first_bad:
            first_bad = why
    if first_bad:
        return Verdict(False, worst, first_bad)
    how = "byte-identical" if worst == 0.0 else f"within tolerance (distance {worst:.4f} <= {tolerance:g})"
    return Verdict(True, worst, f"{len(a)} artifact{'s' if len(a) != 1 else ''} {how}")


def pixel_distance(x: bytes, y: bytes) -> float:
    """Mean absolute difference of two PNGs' pixels, 0..1; raises ValueError when not comparable."""
    d, why = _pixel_distance(x, y)
    if why:
        raise ValueError(why)
    return d


def _pixel_distance(x: bytes, y: bytes) -> tuple[float, str]:
    try:
        ix, iy = _decode(x), _decode(y)
    except Exception as exc:  # Pillow raises several types for corrupt data
        return 1.0, f"not a decodable PNG ({type(exc).__name__})"
    if ix.shape != iy.shape:
        return 1.0, f"sizes differ: {ix.shape[1]}x{ix.shape[0]} vs {iy.shape[1]}x{iy.shape[0]}"
    return float(np.abs(ix - iy).mean()) / 255.0, ""


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        if im.format != "PNG":
            raise ValueError("not a PNG")
        mode = "RGBA" if "A" in im.getbands() else "RGB"
        return np.asarray(im.convert(mode), dtype=np.int16)


def _short(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class Arbitration:
    """Who agrees with whom among several executions of one job.

    `agreed`: the largest group (at least 2, and a strict majority) of executions that match one
    of them (the anchor; byte-exact matching is transitive, tolerant matching nearly so);
    `outvoted`: the others. `decided` False when there is no such group (two executions that
    disagree: run a third on another miner)."""

    decided: bool
    agreed: frozenset[str]
    outvoted: frozenset[str]


def arbitrate(results: Mapping[str, Sequence[bytes]], *, exact: bool,
              tolerance: float = DEFAULT_TOLERANCE) -> Arbitration:
    """Majority among executions keyed by miner id (2 that agree, or 2 of 3 with a referee)."""
    ids = sorted(results)
    best: list[str] = []
    for i, anchor in enumerate(ids):
        group = [anchor] + [o for o in ids[i + 1:]
                            if compare_artifacts(results[anchor], results[o], exact=exact, tolerance=tolerance).match]
        if len(group) > len(best):
            best = group
    if len(best) < 2 or len(best) * 2 <= len(ids):
        return Arbitration(False, frozenset(), frozenset())
    return Arbitration(True, frozenset(best), frozenset(ids) - frozenset(best))
