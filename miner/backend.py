"""The image backend contract the miner daemon runs jobs through.

This module stays import-light (no torch, no diffusers at import time) so that the daemon, its
tests and the dispatch benchmark start fast; the diffusers code lives in `aitbc.miner.image` and is
imported only when a real model is loaded.
"""

from __future__ import annotations

import hashlib
import math
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from aitbc import jobs
from aitbc.errors import AitbcError

# The in-process default: a tiny Stable Diffusion pipeline built from configs with fixed seeds.
TINY_MODEL = "tiny-sd"
# A backend that does everything but inference (dispatch benchmarks).
NULL_MODEL = "null"


@dataclass(frozen=True)
class ImageRequest:
    prompt: str
    negative_prompt: str
    steps: int
    guidance_scale: float
    width: int  # 0 = the model's native size
    height: int  # 0 = the model's native size
    images: int
    seed: int


@dataclass(frozen=True)
class ImageOutput:
    pngs: list[bytes]
    width: int
    height: int
    gpu_ms: int  # device time of the generation, >= 1 (see each backend for how it is measured)


@dataclass(frozen=True)
class BatchItem:
    """One job of a batched image call: its request, its own progress callback and cancel event."""

    req: ImageRequest
    on_step: Callable[[int, int], None]
    cancel: threading.Event


def batch_key(req: ImageRequest, native_size: int) -> tuple[Any, ...]:
    """What must be equal for jobs to share one pipeline call: everything that changes the call
    but the prompts and seeds (size after 0 -> native, steps, guidance, which also decides
    classifier-free guidance). Validates `req` first (BackendError)."""
    width, height = resolve_size(req, native_size)
    return (width, height, req.steps, float(req.guidance_scale))


def share_ms(total_ms: int, images: int, batch_images: int) -> int:
    """A job's part of a batch's device time: in proportion to its images, at least 1. The units
    a job is paid for never depend on it (docs/receipts.md, "Units")."""
    return max(1, round(total_ms * images / max(1, batch_images)))


class JobCancelled(Exception):
    """The job's cancel event was set while it ran; no output is produced."""


class BackendError(AitbcError):
    """Permanent failure: the request asks for something this model cannot do, or the model cannot
    be loaded. The message is meant for the person who submitted the job."""

    code = "INVALID_ARGUMENT"


@runtime_checkable
class ImageBackend(Protocol):
    model: str  # the name the miner advertises
    device: str  # "cuda:0" / "cpu"
    native_size: int  # default width/height

    def generate(
        self,
        req: ImageRequest,
        on_step: Callable[[int, int], None],
        cancel: threading.Event,
    ) -> ImageOutput: ...


# Limits of what any backend here accepts are those of aitbc.jobs, so a miner takes exactly what
# the coordinator can send it (a model may narrow them, steps by its scheduler). One exception:
# sizes go down to MIN_SIZE, below jobs.MIN_SIDE, for direct use of a backend (tests, benchmarks).
MIN_SIZE = jobs.SIDE_MULTIPLE


def resolve_size(req: ImageRequest, native_size: int) -> tuple[int, int]:
    """Check `req` against the shared limits and return (width, height) with 0 -> native size."""
    if not isinstance(req.prompt, str) or not isinstance(req.negative_prompt, str):
        raise BackendError("prompt and negative_prompt must be text")
    for name in ("prompt", "negative_prompt"):
        if len(getattr(req, name)) > jobs.MAX_PROMPT_CHARS:
            raise BackendError(f"{name} is {len(getattr(req, name))} characters; the limit is {jobs.MAX_PROMPT_CHARS}")
    if not 1 <= req.steps <= jobs.MAX_STEPS:
        raise BackendError(f"steps must be between 1 and {jobs.MAX_STEPS}, got {req.steps}")
    if not math.isfinite(req.guidance_scale) or not 0.0 <= req.guidance_scale <= jobs.MAX_GUIDANCE:
        raise BackendError(f"guidance_scale must be between 0 and {jobs.MAX_GUIDANCE:g}, got {req.guidance_scale}")
    if not 1 <= req.images <= jobs.MAX_IMAGES:
        raise BackendError(f"images must be between 1 and {jobs.MAX_IMAGES}, got {req.images}")
    if not 0 <= req.seed <= jobs.MAX_RUN_SEED - (req.images - 1):  # image i uses seed + i
        raise BackendError(
            f"seed must be between 0 and {jobs.MAX_RUN_SEED - (req.images - 1)} for {req.images} image(s), got {req.seed}"
        )
    width = req.width or native_size
    height = req.height or native_size
    for name, value in (("width", width), ("height", height)):
        if value < 0 or not MIN_SIZE <= value <= jobs.MAX_SIDE or value % jobs.SIDE_MULTIPLE:
            raise BackendError(
                f"{name} must be 0 (native {native_size}) or a multiple of {jobs.SIDE_MULTIPLE} "
                f"between {MIN_SIZE} and {jobs.MAX_SIDE}, got {getattr(req, name)}"
            )
    if width * height * req.images > jobs.MAX_PIXELS:  # the coordinator's bound too: no more is ever sent
        raise BackendError(f"width x height x images is {width * height * req.images} pixels; the limit is "
                           f"{jobs.MAX_PIXELS}")
    return width, height


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def null_png(prompt: str, seed: int, width: int, height: int) -> bytes:
    """A valid width x height PNG, an 8x8 two-colour pattern chosen by a hash of the inputs.

    1-bit palette image: a 512x512 one is ~33 KB raw before zlib, so it costs well under a
    millisecond, which keeps the null backend out of the dispatch benchmark's figures.
    """
    digest = hashlib.sha256(f"{seed}|{width}|{height}|{prompt}".encode()).digest()
    palette = digest[0:3] + bytes(255 - b for b in digest[0:3])
    cells = int.from_bytes(digest[8:16], "big")  # bit (row*8 + col) picks the colour of a cell
    row_bytes = (width + 7) // 8
    # pixel x lies in cell column x * 8 // width: the run of each column, then each cell row's bits
    starts = [-(-col * width // 8) for col in range(9)]  # ceil(col * width / 8)
    runs = [starts[col + 1] - starts[col] for col in range(8)]
    cell_rows = []
    for cell_y in range(8):
        text = "".join(("1" if cells >> (cell_y * 8 + col) & 1 else "0") * runs[col] for col in range(8))
        bits = int(text.ljust(row_bytes * 8, "0"), 2)
        cell_rows.append(b"\x00" + bits.to_bytes(row_bytes, "big"))  # filter type 0 per row
    raw = b"".join(cell_rows[y * 8 // height] for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 1, 3, 0, 0, 0)  # 1-bit, palette
    return (
        jobs.PNG_MAGIC
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"PLTE", palette)
        + _png_chunk(b"IDAT", zlib.compress(raw, 6))
        + _png_chunk(b"IEND", b"")
    )


class NullImageBackend:
    """Everything real but the model: validates the request, reports every step, honours cancel,
    and returns deterministic PNGs at once. Torch is never imported. gpu_ms is the wall time of the
    call, at least 1."""

    model = NULL_MODEL
    device = "cpu"
    native_size = 64

    def generate(
        self,
        req: ImageRequest,
        on_step: Callable[[int, int], None],
        cancel: threading.Event,
    ) -> ImageOutput:
        started = time.perf_counter()
        width, height = resolve_size(req, self.native_size)
        for step in range(1, req.steps + 1):
            if cancel.is_set():
                raise JobCancelled("cancelled")
            on_step(step, req.steps)
        if cancel.is_set():
            raise JobCancelled("cancelled")
        # each image of a batch differs, as in a real pipeline
        # image i uses seed + i, as the diffusers backend does, so shards of a job match the whole job
        pngs = [null_png(req.prompt, req.seed + i, width, height) for i in range(req.images)]
        gpu_ms = max(1, round((time.perf_counter() - started) * 1000))
        return ImageOutput(pngs=pngs, width=width, height=height, gpu_ms=gpu_ms)


def weights_sha256(components: dict[str, Any]) -> str:
    """The identity of a model's weights (docs/receipts.md, "Model identity"): sha256 over every
    tensor of every torch module among `components`, components and tensors in name order, each as
    utf8(component "." name) 0x00 utf8(dtype) 0x00 utf8(shape, comma-separated) 0x00 u64 length
    raw little-endian bytes. Computed on the CPU copy before the model moves to its device."""
    import torch

    h = hashlib.sha256()
    for comp in sorted(components):
        module = components[comp]
        if not isinstance(module, torch.nn.Module):
            continue
        for name, tensor in sorted(module.state_dict().items()):
            t = tensor.detach().to("cpu").contiguous().reshape(-1)
            data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
            h.update(f"{comp}.{name}".encode() + b"\0" + str(t.dtype).removeprefix("torch.").encode() + b"\0"
                     + ",".join(map(str, tensor.shape)).encode() + b"\0" + len(data).to_bytes(8, "big") + data)
    return h.hexdigest()


def pick_device(preferred: str | None) -> str:
    """Resolve a device setting: "auto"/None -> "cuda:0" when CUDA is usable, else "cpu". "cuda" means "cuda:0"."""
    choice = (preferred or "auto").strip().lower()
    if choice == "cpu":
        return "cpu"
    import torch  # deferred: torch costs seconds to import

    if choice == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if choice == "cuda":
        choice = "cuda:0"
    if choice.startswith("cuda:"):
        index_text = choice.removeprefix("cuda:")
        if not index_text.isdigit():
            raise BackendError(f"bad device {preferred!r}: expected 'cuda:N', 'cpu' or 'auto'")
        if not torch.cuda.is_available():
            raise BackendError(f"device {preferred!r} requested but CUDA is not available on this machine")
        count = torch.cuda.device_count()
        if int(index_text) >= count:
            raise BackendError(f"device {preferred!r} requested but this machine has {count} CUDA device(s)")
        return f"cuda:{int(index_text)}"
    raise BackendError(f"unsupported device {preferred!r}: expected 'cuda:N', 'cpu' or 'auto'")


def load_image_backend(
    model: str, device: str | None = None, *, fast_path: bool = False, compile_unet: bool = False
) -> ImageBackend:
    """Load `model` once and return a backend for it.

    "tiny-sd": the tiny pipeline built in-process (no download). "null": no inference at all.
    Anything else: a Hugging Face model id or a local folder, loaded with
    `StableDiffusionPipeline.from_pretrained` through the same backend class as the tiny one.
    `fast_path` / `compile_unet`: the CUDA fast path (`aitbc.miner.image.plan_fast_path`; off on CPU).
    """
    if not isinstance(model, str) or not model.strip():
        raise BackendError("model name is empty")
    model = model.strip()
    if model == NULL_MODEL:
        return NullImageBackend()
    from aitbc.miner import image  # deferred: imports torch and diffusers

    resolved = pick_device(device)
    plan = image.plan_fast_path(resolved, fast_path, compile_unet, bf16=_bf16(resolved))
    pipe = image.build_tiny_pipeline() if model == TINY_MODEL else image.load_pretrained_pipeline(model, resolved)
    return image.DiffusersImageBackend(pipe, model=model, device=resolved, fast_path=plan)


def _bf16(device: str) -> bool:
    if not device.startswith("cuda"):
        return False
    import torch

    return bool(torch.cuda.is_bf16_supported())


class DeviceTimer:
    """Milliseconds of device time on CUDA (events), wall time on CPU; at least 1."""

    def __init__(self, device: str) -> None:
        self._cuda = device.startswith("cuda")
        self._device = device
        self.ms = 1

    def __enter__(self) -> DeviceTimer:
        import torch

        if self._cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record(torch.cuda.current_stream(self._device))
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        if self._cuda:
            self._end.record(torch.cuda.current_stream(self._device))
            self._end.synchronize()
            elapsed = self._start.elapsed_time(self._end)
        else:
            elapsed = (time.perf_counter() - self._t0) * 1000
        self.ms = max(1, round(elapsed))
