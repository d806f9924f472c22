"""Verification by re-execution: which jobs are sampled, and whether two executions agree.

A sampled job is run again on a different miner with the same parameters and seed; on CPU the
artifacts must be byte-identical, on GPU (kernels are not bit-exact across hardware) decoded
pixels must be within a tolerance; the text of a miner that stacks its text streams is compared with
the re-executor's token trace up to a first divergence at a near-tie (`compare_text`). docs/hub.md,
"Verification", gives the rules and defaults.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from aitbc.jobs import PNG_MAGIC
from aitbc.v1 import job_pb2

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
    # a mismatch an honest run cannot produce (evidence for a SLASH); False for one it can, rarely:
    # a stacked run that agrees on the text but counted more tokens than the re-execution
    # (compare_stacked, docs/hub.md "Units after a divergence")
    proven: bool = True


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


# Text runs of a miner with text_batching = "stacked" (docs/hub.md, "Text from stacked miners").
# A decision whose two best candidates are closer than this, in logit units, may flip between a
# batched and a batch-1 forward pass. Measured on CPU float32 (bench/text_batching.py, tiny-llama,
# 16 stacked rows): a stacked row's logits and those of the stream alone differ by at most 3.6e-7;
# 1e-5 is ~30x that, and honest gaps that small are rare (tiny-llama, 150 jobs of 64 tokens each:
# 4 of 8,893 greedy decisions, none of 8,872 sampled ones; its random weights make its logits
# flatter than a trained model's). On CUDA in bf16/fp16 the noise is larger: calibrate there first.
DEFAULT_TEXT_EPSILON = 1e-5


@dataclass(frozen=True, slots=True)
class TextTrace:
    """A text run as the re-executor made it, token by token, alone (batch 1).

    `text`: the text it returned. `ends[i]`: the length (characters) of the text decoded after
    token i (the decoder holds back a half-made UTF-8 character, so ends never decrease and can
    repeat), before any stop string cut it. `margins[i]`: the gap between the best and the
    second-best candidate of the decision that chose token i, in logit units (inf when only one
    was allowed): greedy, the gap of the two largest logits; sampled, temperature x the gap of the
    two largest log p - log q, where q ~ Exp(1) is the draw the job's generator makes there
    (torch.multinomial takes the argmax of p / q). A logit error of d moves either by at most 2d."""

    text: str
    ends: tuple[int, ...]
    margins: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.ends) != len(self.margins):
            raise ValueError(f"a trace has one end per margin (got {len(self.ends)} and {len(self.margins)})")
        if any(b < a for a, b in zip(self.ends, self.ends[1:], strict=False)):
            raise ValueError("a trace's ends never decrease")
        if any(math.isnan(m) or m < 0 for m in self.margins):
            raise ValueError("a trace's margins are >= 0 (+inf where only one candidate was allowed), never NaN")
        decoded = self.ends[-1] if self.ends else 0
        if decoded < len(self.text):
            raise ValueError(f"a trace's tokens decode {decoded} characters, fewer than its text's {len(self.text)}")

    def to_proto(self) -> job_pb2.TextTrace:
        """The wire form: per token the characters it added (ends as differences) and the margin
        (float32: ~7 significant digits, far finer than any epsilon)."""
        lengths = [b - a for a, b in zip((0, *self.ends), self.ends, strict=False)]
        return job_pb2.TextTrace(lengths=lengths, margins=list(self.margins))

    @classmethod
    def from_proto(cls, text: str, msg: job_pb2.TextTrace) -> TextTrace:
        """The trace of the run that returned `text`; ValueError when it is malformed."""
        return cls(text, tuple(itertools.accumulate(msg.lengths)), tuple(msg.margins))


def compare_text(reference: TextTrace, candidate: str, *, epsilon: float = DEFAULT_TEXT_EPSILON) -> Verdict:
    """Does `candidate` (a stacked miner's text for the job) agree with the re-executor's trace?

    Identical texts agree. Otherwise the runs agree only when the candidate equals the reference
    up to its first differing character and the decision that diverged was one the reference
    itself nearly took the other way: a margin below `epsilon` at one of the tokens that could
    have diverged there: the token that decoded that character; the tokens just before it that
    decoded nothing yet (the first bytes of a character made of several byte tokens); and, when
    the difference starts exactly at a token boundary, the token before that (an honest run may
    have taken a longer token, " runs" for " run", whose extra text differs only after it). Once
    two runs take different tokens they continue from different contexts, so nothing after the
    divergence is compared. distance: 1 - (common prefix / reference length)."""
    ref = reference.text
    if candidate == ref:
        return Verdict(True, 0.0, "text identical")
    common = 0
    for x, y in zip(ref, candidate, strict=False):
        if x != y:
            break
        common += 1
    distance = 1.0 - common / max(1, len(ref))
    ends = reference.ends
    if not ends:
        return Verdict(False, distance, "the reference run made no tokens")
    # the first token whose decoded text reaches past the common prefix (the last one if none does)
    k = next((i for i, end in enumerate(ends) if end > common), len(ends) - 1)
    lo = k
    while lo > 0 and ends[lo - 1] == (ends[lo - 2] if lo >= 2 else 0):
        lo -= 1  # token lo - 1 decoded nothing: part of the character token k completed
    if lo > 0 and ends[lo - 1] == common:
        lo -= 1
    closest = min(reference.margins[lo : k + 1])
    if closest < epsilon:
        return Verdict(True, distance, f"texts agree up to character {common}, where the reference's decision "
                                       f"at token {k} or just before was a near-tie (margin {closest:.3g} < {epsilon:g})")
    return Verdict(False, distance, f"texts differ at character {common} (token {k}), where the reference's "
                                    f"decision was clear (smallest margin {closest:.3g} >= {epsilon:g})")


def compare_stacked(reference: TextTrace, reference_tokens: tuple[int, int], candidate: str,
                    candidate_tokens: tuple[int, int], *, epsilon: float = DEFAULT_TEXT_EPSILON) -> Verdict:
    """A stacked miner's run (`candidate`, its receipt's (prompt_tokens, generated_tokens)) against
    a re-executor's exact run (its trace and counts): the text by `compare_text`, then the units
    rule of docs/hub.md, "Units after a divergence": the prompt is the same prompt through the same
    tokenizer, so its count is equal; the generated count is at most the re-execution's (a run
    that diverged at a near-tie may have stopped sooner, and is paid what it claims; one that claims
    more is paid nothing, since nothing the coordinator holds proves tokens after a divergence).
    That last mismatch is not `proven`: an honest flip can run longer."""
    verdict = compare_text(reference, candidate, epsilon=epsilon)
    if not verdict.match:
        return verdict
    (ref_prompt, ref_generated), (prompt, generated) = reference_tokens, candidate_tokens
    if prompt != ref_prompt:
        return Verdict(False, verdict.distance, f"prompt_tokens {prompt} differ from the re-execution's {ref_prompt} "
                                                "(the same prompt through the same tokenizer)")
    if generated > ref_generated:
        return Verdict(False, verdict.distance, f"{verdict.reason}, but generated_tokens {generated} exceed the "
                                                f"re-execution's {ref_generated}", proven=False)
    return verdict


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
    return majority(results, lambda a, b: compare_artifacts(results[a], results[b], exact=exact,
                                                             tolerance=tolerance).match)


def majority(ids: Sequence[str] | Mapping[str, object], agree: Callable[[str, str], bool]) -> Arbitration:
    """The strict-majority group of executions that agree with one of them (`agree(anchor, other)`,
    symmetric), as `arbitrate` decides it for any comparison (compare_artifacts, compare_stacked)."""
    ids = sorted(ids)
    best: list[str] = []
    for i, anchor in enumerate(ids):
        group = [anchor] + [o for o in ids[i + 1:] if agree(anchor, o)]
        if len(group) > len(best):
            best = group
    if len(best) < 2 or len(best) * 2 <= len(ids):
        return Arbitration(False, frozenset(), frozenset())
    return Arbitration(True, frozenset(best), frozenset(ids) - frozenset(best))
