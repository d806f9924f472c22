"""Checks on a miner's result, as pure functions: what the coordinator can verify itself before it
attests a receipt. Each raises InvalidArgument with the reason (sent back to the miner as
WorkRejected); the caller turns that into a Rejected event.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from aitbc import crypto, jobs, receipts
from aitbc.coordinator import png
from aitbc.errors import AitbcError, InvalidArgument
from aitbc.hub.verification import TextTrace
from aitbc.v1 import job_pb2, miner_pb2
from aitbc.wire import receipt_from_proto

TEXT_CONTENT_TYPE = "text/plain; charset=utf-8"
FINISH_REASONS = ("length", "stop", "eos")
UNIT_SLACK_MS = 2000
SPECIAL_TOKENS = 8  # BOS/EOS and template tokens a tokenizer adds beyond one per byte


@dataclass(frozen=True, slots=True)
class Expected:
    """What the receipt must say, from what the coordinator holds."""

    miner_id: str
    chain_id: str
    hub_id: str
    held_ms: float  # how long the miner has held the job


class Uploaded(Protocol):
    """A finished upload (aitbc.coordinator.uploads.Upload): its size and sha256, counted as it
    arrived, and its bytes read back from where they wait (a file), never all held in memory."""

    size: int

    @property
    def sha256(self) -> bytes: ...
    def open(self) -> AbstractContextManager[BinaryIO]: ...
    def read(self) -> bytes: ...


def check_result(
    job: job_pb2.Job, result: miner_pb2.JobResult, uploads: Mapping[int, Uploaded], streamed_text: str,
    expected: Expected, key: crypto.PrivateKey,
) -> tuple[list[tuple[job_pb2.Artifact, Uploaded | None]], receipts.SignedReceipt]:
    """The clean artifact descriptions with their uploads, and the receipt attested by `key`."""
    text_job = jobs.job_kind(job) == jobs.TEXT
    want = jobs.job_outputs(job)
    if len(result.artifacts) != want:
        raise InvalidArgument(f"job {job.job_id} must return {want} artifacts, got {len(result.artifacts)}")
    artifacts: list[tuple[job_pb2.Artifact, Uploaded | None]] = []
    digests: list[bytes] = []
    for i, art in enumerate(result.artifacts):
        up = uploads.get(i)  # none: nothing was uploaded for this output (an empty text is b"")
        size, digest = (up.size, up.sha256) if up is not None else (0, crypto.sha256(b""))
        if (not size and not text_job) or digest.hex() != art.sha256 or size != art.size:
            raise InvalidArgument(f"artifact {i} does not match its declared sha256/size (wrong artifact hash)")
        if text_job:
            if size != len(streamed_text.encode()):  # read only what the streamed text bounds
                raise InvalidArgument("the final text differs from the text streamed during generation")
            check_text(job, up.read() if up is not None else b"", result, streamed_text)
            check_text_trace(job, result, streamed_text)
            clean = job_pb2.Artifact(sha256=art.sha256, size=art.size, content_type=TEXT_CONTENT_TYPE)
        else:
            assert up is not None
            with up.open() as data:
                width, height = check_image(job, i, data, artifacts[0][0] if artifacts else None)
            clean = job_pb2.Artifact(sha256=art.sha256, size=art.size, content_type="image/png",
                                     width=width, height=height)  # from the bytes, not the miner's word
        artifacts.append((clean, up))
        digests.append(digest)
    try:
        signed = receipt_from_proto(result.receipt)
        attested = signed.attest(key)  # verifies the provider signature first
    except AitbcError as exc:
        raise InvalidArgument(f"receipt rejected: {exc.message}") from None
    b = signed.body
    fields = {
        "version": receipts.RECEIPT_VERSION,
        "job_id": job.job_id,
        "provider": expected.miner_id,
        "client": job.client_id,
        "unit_type": "tokens" if text_job else "tile_steps",
        "price_per_unit": job.price_per_unit,
        "model": job.model,
        "prompt_hash": job.prompt_hash,
        "artifact_sha256": receipts.manifest_sha256(digests),
        "hub_id": expected.hub_id,
        "chain_id": expected.chain_id,
    }
    # the units follow from these (the body checks the formula): the coordinator's own counts, never
    # the miner's word (docs/receipts.md, "Units")
    if text_job:
        fields |= {"prompt_tokens": result.prompt_tokens, "generated_tokens": result.generated_tokens}
    else:
        first = artifacts[0][0]
        fields |= {"width": first.width, "height": first.height, "steps": job.params.image.steps,
                   "images": len(artifacts)}
    for name, value in fields.items():
        if getattr(b, name) != value:
            raise InvalidArgument(f"receipt field {name} is {getattr(b, name)!r}, expected {value!r}")
    duration = b.finished_at - b.started_at
    if max(duration, b.gpu_ms) > expected.held_ms + UNIT_SLACK_MS:
        raise InvalidArgument(f"receipt claims {max(duration, b.gpu_ms)} ms of work but the miner held the job "
                              f"{expected.held_ms:.0f} ms")
    return artifacts, attested


def check_image(job: job_pb2.Job, i: int, data: bytes | BinaryIO, first: job_pb2.Artifact | None) -> tuple[int, int]:
    """One plain PNG (aitbc.coordinator.png) of the job's size; every image of a job the same size."""
    try:
        info = png.inspect(data)
    except InvalidArgument as exc:
        raise InvalidArgument(f"artifact {i}: {exc.message}") from None
    p = job.params.image
    if (p.width and info.width != p.width) or (p.height and info.height != p.height):
        raise InvalidArgument(f"artifact {i} is {info.width}x{info.height}; the job asked for "
                              f"{p.width or 'native'}x{p.height or 'native'}")
    if info.width > jobs.MAX_SIDE or info.height > jobs.MAX_SIDE:
        raise InvalidArgument(f"artifact {i} is {info.width}x{info.height}, larger than {jobs.MAX_SIDE} a side")
    if first is not None and (info.width, info.height) != (first.width, first.height):
        raise InvalidArgument(f"artifact {i} is {info.width}x{info.height} and artifact 0 {first.width}x{first.height}")
    return info.width, info.height


def check_text(job: job_pb2.Job, data: bytes, result: miner_pb2.JobResult, streamed: str) -> None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgument("the text artifact is not valid UTF-8") from None
    if text != streamed:
        raise InvalidArgument("the final text differs from the text streamed during generation")
    if result.finish_reason not in FINISH_REASONS:
        raise InvalidArgument(f"finish_reason must be one of {', '.join(FINISH_REASONS)}")
    if not 1 <= result.prompt_tokens or result.generated_tokens > job.params.text.max_new_tokens:
        raise InvalidArgument(f"token counts are implausible: prompt {result.prompt_tokens}, generated "
                              f"{result.generated_tokens} of at most {job.params.text.max_new_tokens}")
    most_prompt, most_generated = token_bounds(job.params.text, text)
    if result.prompt_tokens > most_prompt:
        raise InvalidArgument(f"prompt_tokens {result.prompt_tokens} is more than any tokenizer makes of this prompt "
                              f"({len(job.params.text.prompt.encode())} UTF-8 bytes: at most {most_prompt} tokens)")
    if result.generated_tokens > most_generated:
        raise InvalidArgument(f"generated_tokens {result.generated_tokens} is more than the streamed text can hold "
                              f"({len(data)} UTF-8 bytes: at most {most_generated} tokens)")


def check_text_trace(job: job_pb2.Job, result: miner_pb2.JobResult, text: str) -> None:
    """A re-execution of a stacked miner's text job returns its token trace, and no other result
    carries one (docs/hub.md, "Text from stacked miners"): one length and one margin per generated
    token (so at most max_new_tokens of each), margins >= 0 or +inf, and the lengths add up to the
    text (to at least the text when a stop string cut it). A verification is never decided from a
    malformed one: the result is refused and the re-execution runs again elsewhere."""
    if not job.want_text_trace:
        if result.HasField("text_trace"):
            raise InvalidArgument("text_trace is only returned for a task with want_text_trace")
        return
    if not result.HasField("text_trace"):
        raise InvalidArgument("this task asked for a text_trace (want_text_trace: a re-execution of a stacked "
                              "miner's job); the result has none")
    t, n = result.text_trace, result.generated_tokens
    if len(t.lengths) != n or len(t.margins) != n:
        raise InvalidArgument(f"text_trace must hold one length and one margin per generated token ({n}); it holds "
                              f"{len(t.lengths)} lengths and {len(t.margins)} margins")
    try:
        trace = TextTrace.from_proto(text, t)
    except ValueError as exc:
        raise InvalidArgument(f"text_trace is malformed: {exc}") from None
    decoded = trace.ends[-1] if trace.ends else 0
    if result.finish_reason != "stop" and decoded != len(text):
        raise InvalidArgument(f"text_trace's tokens decode {decoded} characters but the text has {len(text)} (only a "
                              "stop string cuts the decoded text)")


def token_bounds(params: job_pb2.TextParams, text: str) -> tuple[int, int]:
    """The most tokens an honest miner can report (docs/receipts.md, "Text units"): every token of
    a tokenizer stands for at least one byte of UTF-8 (byte-level BPE, SentencePiece with byte
    fallback), plus SPECIAL_TOKENS the tokenizer or the end of generation add; generated tokens
    that made up a stop string are cut from the text, so the longest stop string counts too."""
    prompt = len(params.prompt.encode()) + SPECIAL_TOKENS
    stop = max((len(s.encode()) for s in params.stop), default=0)
    generated = min(params.max_new_tokens, len(text.encode()) + stop + SPECIAL_TOKENS)
    return prompt, generated
