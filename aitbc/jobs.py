"""Job vocabulary shared by coordinator, hub, miners and clients: states, limits, validation, ids.

This is the one definition of the job limits: the coordinator validates submissions against them
and the miner backends and the hub import them, so a miner accepts exactly what it can be sent.
Limits are documented in README.md ("Job limits"); keep the two in step.
"""

from __future__ import annotations

import math
import os
import re
import secrets
import time

from aitbc import crypto
from aitbc.errors import InvalidArgument
from aitbc.v1 import job_pb2, miner_pb2

S = job_pb2.JobState
TERMINAL = frozenset({S.JOB_STATE_COMPLETED, S.JOB_STATE_FAILED, S.JOB_STATE_CANCELLED, S.JOB_STATE_EXPIRED})
ACTIVE = frozenset({S.JOB_STATE_QUEUED, S.JOB_STATE_ASSIGNED, S.JOB_STATE_RUNNING})

MAX_PROMPT_CHARS = 2000
DEFAULT_STEPS = 20
MAX_STEPS = 150
DEFAULT_GUIDANCE = 7.5
MAX_GUIDANCE = 30.0
MIN_SIDE, MAX_SIDE = 64, 2048
SIDE_MULTIPLE = 8  # latents are 1/8 of the image side
MAX_IMAGES = 8
MAX_PIXELS = 2048 * 2048 * 2  # width x height x images
MAX_SEED = 2**63 - 1  # what a client may ask for (README); protos carry uint64
# Image i of a job is generated with seed + i (docs/hub.md, "Sharding and seeds"), so the highest
# seed a miner can ever be asked to run is the last image's of a full job with the highest seed.
# Still well inside torch.Generator.manual_seed's unsigned 64-bit range.
MAX_RUN_SEED = MAX_SEED + MAX_IMAGES - 1
MAX_REQUEST_ID = 64
MAX_TEXT_PROMPT_CHARS = 32_000
DEFAULT_MAX_NEW_TOKENS = 128
MAX_NEW_TOKENS = 4096
DEFAULT_TEMPERATURE = 0.7
MAX_TEMPERATURE = 2.0
MAX_TOP_K = 1000
MAX_STOP = 4
MAX_STOP_CHARS = 64
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"  # the first 8 bytes of every image artifact
IMAGE, TEXT = job_pb2.MODEL_KIND_IMAGE, job_pb2.MODEL_KIND_TEXT
_MODEL_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}\Z")  # \Z, not $: "$" also matches before a trailing newline
_REQUEST_ID_RE = re.compile(r"\A[A-Za-z0-9._:-]{1,64}\Z")
_JOB_ID_RE = re.compile(r"\A[0-9a-f]{28}\Z")


def state_name(state: int) -> str:
    return S.Name(state).removeprefix("JOB_STATE_")


def now_ms() -> int:
    return int(time.time() * 1000)


def new_job_id() -> str:
    """28 hex characters, time-ordered: 12 of unix milliseconds, 16 random."""
    return f"{now_ms():012x}{secrets.token_hex(8)}"


def validate_job_id(job_id: str) -> str:
    if not _JOB_ID_RE.match(job_id or ""):
        raise InvalidArgument(f"job_id {job_id!r} is malformed: expected 28 lower-case hex characters", "job_id")
    return job_id


def validate_model(model: str) -> str:
    if not model:
        raise InvalidArgument("model is required (the devnet's default model is 'tiny-sd')", "model")
    if not _MODEL_RE.match(model):
        raise InvalidArgument(
            f"model {model[:64]!r} is malformed: up to 128 characters of letters, digits and ._:/-", "model"
        )
    return model


def validate_request_id(request_id: str) -> str:
    if request_id and not _REQUEST_ID_RE.match(request_id):
        raise InvalidArgument("request_id must be 1-64 characters of letters, digits and ._:-", "request_id")
    return request_id


def prompt_hash(prompt: str) -> str:
    return crypto.sha256(prompt.encode()).hex()


def normalize_image_params(p: job_pb2.ImageParams) -> job_pb2.ImageParams:
    """Validate and fill defaults; raise InvalidArgument naming the field and its limits."""
    prompt = p.prompt
    if not prompt.strip():
        raise InvalidArgument("prompt is empty: describe the image to make", "prompt")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidArgument(f"prompt is {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}", "prompt")
    if len(p.negative_prompt) > MAX_PROMPT_CHARS:
        raise InvalidArgument(f"negative_prompt is {len(p.negative_prompt)} characters; the limit is {MAX_PROMPT_CHARS}",
                              "negative_prompt")
    steps = p.steps or DEFAULT_STEPS
    if not 1 <= steps <= MAX_STEPS:
        raise InvalidArgument(f"steps must be between 1 and {MAX_STEPS} (got {steps})", "steps")
    guidance = p.guidance_scale if p.HasField("guidance_scale") else DEFAULT_GUIDANCE
    if not math.isfinite(guidance) or not 0.0 <= guidance <= MAX_GUIDANCE:
        raise InvalidArgument(f"guidance_scale must be between 0 and {MAX_GUIDANCE:g} (got {guidance})", "guidance_scale")
    for name in ("width", "height"):
        side = getattr(p, name)
        if side and (not MIN_SIDE <= side <= MAX_SIDE or side % SIDE_MULTIPLE):
            raise InvalidArgument(
                f"{name} must be 0 (the model's native size) or a multiple of {SIDE_MULTIPLE} between {MIN_SIDE} and {MAX_SIDE} (got {side})",
                name,
            )
    images = p.images or 1
    if not 1 <= images <= MAX_IMAGES:
        raise InvalidArgument(f"images must be between 1 and {MAX_IMAGES} (got {images})", "images")
    if (p.width or 512) * (p.height or 512) * images > MAX_PIXELS:
        raise InvalidArgument(f"width x height x images exceeds {MAX_PIXELS} pixels: ask for fewer or smaller images",
                              "images")
    seed = _seed(p)
    return job_pb2.ImageParams(
        prompt=prompt,
        negative_prompt=p.negative_prompt,
        steps=steps,
        guidance_scale=guidance,
        width=p.width,
        height=p.height,
        images=images,
        seed=seed,
    )


def _seed(p: job_pb2.ImageParams | job_pb2.TextParams) -> int:
    seed = p.seed if p.HasField("seed") else int.from_bytes(os.urandom(4), "big")
    if seed > MAX_SEED:
        raise InvalidArgument(f"seed must be between 0 and {MAX_SEED}", "seed")
    return seed


def normalize_text_params(p: job_pb2.TextParams) -> job_pb2.TextParams:
    """Validate and fill defaults; raise InvalidArgument naming the field and its limits. The
    prompt's length in tokens is checked by the miner, which holds the tokenizer."""
    if not p.prompt.strip():
        raise InvalidArgument("prompt is empty: write the text to continue or the question to answer", "prompt")
    if len(p.prompt) > MAX_TEXT_PROMPT_CHARS:
        raise InvalidArgument(f"prompt is {len(p.prompt)} characters; the limit is {MAX_TEXT_PROMPT_CHARS}", "prompt")
    max_new = p.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    if not 1 <= max_new <= MAX_NEW_TOKENS:
        raise InvalidArgument(f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS} (got {max_new})", "max_new_tokens")
    temperature = p.temperature if p.HasField("temperature") else DEFAULT_TEMPERATURE
    if not math.isfinite(temperature) or not 0.0 <= temperature <= MAX_TEMPERATURE:
        raise InvalidArgument(f"temperature must be between 0 (greedy) and {MAX_TEMPERATURE:g} (got {temperature})",
                              "temperature")
    top_p = p.top_p if p.HasField("top_p") else 1.0
    if not math.isfinite(top_p) or not 0.0 < top_p <= 1.0:
        raise InvalidArgument(f"top_p must be in (0, 1] (got {top_p})", "top_p")
    if p.top_k > MAX_TOP_K:
        raise InvalidArgument(f"top_k must be between 0 (off) and {MAX_TOP_K} (got {p.top_k})", "top_k")
    if len(p.stop) > MAX_STOP:
        raise InvalidArgument(f"at most {MAX_STOP} stop sequences (got {len(p.stop)})", "stop")
    for stop in p.stop:
        if not 1 <= len(stop) <= MAX_STOP_CHARS:
            raise InvalidArgument(f"each stop sequence must be 1-{MAX_STOP_CHARS} characters (got {len(stop)})", "stop")
    return job_pb2.TextParams(prompt=p.prompt, max_new_tokens=max_new, temperature=temperature, top_p=top_p,
                              top_k=p.top_k, seed=_seed(p), stop=list(p.stop))


def normalize_params(params: job_pb2.JobParams) -> job_pb2.JobParams:
    """normalize_image_params / normalize_text_params; an error's field is named from the request
    (SubmitJobRequest, QuoteJobRequest): "params.image.steps"."""
    kind = params.WhichOneof("kind")
    try:
        if kind == "image":
            return job_pb2.JobParams(image=normalize_image_params(params.image))
        if kind == "text":
            return job_pb2.JobParams(text=normalize_text_params(params.text))
    except InvalidArgument as exc:
        raise exc.within(f"params.{kind}") from None
    raise InvalidArgument("params must set one job kind (image or text)", "params")


def job_kind(job: job_pb2.Job | miner_pb2.Task | job_pb2.JobParams) -> int:
    params = job if isinstance(job, job_pb2.JobParams) else job.params
    return TEXT if params.WhichOneof("kind") == "text" else IMAGE


def kind_name(kind: int) -> str:
    return job_pb2.ModelKind.Name(kind).removeprefix("MODEL_KIND_").lower()


def job_prompt(job: job_pb2.Job | miner_pb2.Task) -> str:
    return job.params.text.prompt if job_kind(job) == TEXT else job.params.image.prompt


def job_steps_total(job: job_pb2.Job) -> int:
    """Denoising steps an image job runs (per image batch); 0 for text jobs."""
    return 0 if job_kind(job) == TEXT else job.params.image.steps


def job_outputs(job: job_pb2.Job) -> int:
    """How many artifacts a completed job must return."""
    return 1 if job_kind(job) == TEXT else (job.params.image.images or 1)


