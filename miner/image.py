"""diffusers Stable Diffusion backend: the tiny in-process pipeline and from_pretrained models.

Both go through `DiffusersImageBackend`; the tiny pipeline is only *built* from configs with fixed
seeds (no download) instead of loaded, so the code that runs a job is the same for every model.

Concurrency: `generate` may run on several worker threads at once. The modules (UNet, VAE, text
encoder) are shared and only read under `torch.inference_mode`; everything a call mutates, the
scheduler (timesteps, step counter) and the pipeline's per-call attributes (`_guidance_scale`,
`_num_timesteps`, ...), belongs to a per-call pipeline view with its own scheduler made from the
shared config. The tokenizer is a Rust `tokenizers` object whose padding/truncation settings are
mutable state, so prompt encoding runs under a lock (milliseconds); denoising runs unlocked.

Determinism: the initial latents of image i come from a CPU `torch.Generator` seeded seed + i on
every device (diffusers draws them on the CPU and moves them to the GPU), so a job split into
shards gives the same images as the whole job, and a CPU and a CUDA run of one job start from the
same noise (CUDA generators give other numbers for the same seed). PNGs are encoded with a fixed
compress level and no metadata, so on CPU the same request gives the same bytes in every process.
On CUDA, kernels (fp16 above all) differ across GPUs and driver versions: close, not equal.
"""

from __future__ import annotations

import io
import json
import logging
import os
import string
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from aitbc import telemetry
from aitbc.miner.backend import (
    BackendError,
    BatchItem,
    DeviceTimer,
    ImageOutput,
    ImageRequest,
    JobCancelled,
    batch_key,
    share_ms,
    weights_sha256,
)

log = logging.getLogger("aitbc.miner")
PNG_COMPRESS_LEVEL = 6
TINY_SEED = 0  # fixed: the tiny pipeline's random weights are part of its identity
TOKENIZER_MAX_LENGTH = 77

# Allow from_pretrained to reach the Hugging Face Hub for an id that is not in the local cache.
# Off by default: a miner with no network must fail fast with a clear message, not hang.
DOWNLOAD_ENV = "AITBC_MODEL_DOWNLOAD"


def _write_tiny_tokenizer_files(folder: Path) -> None:
    """A CLIP BPE vocabulary of the printable ASCII characters (bare and word-final) and no merges:
    every character is one token (ids: <|startoftext|> 0, <|endoftext|> 1). Enough to exercise the
    real tokenizer code."""
    chars = [c for c in string.printable if not c.isspace()]
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")


def build_tiny_pipeline() -> StableDiffusionPipeline:
    """The default model: a real StableDiffusionPipeline at toy size with fixed random weights.

    Native size 64x64 (UNet sample_size 32, VAE downsampling 2). Built in float32 on the CPU;
    the backend moves it to its device.
    """
    with tempfile.TemporaryDirectory(prefix="aitbc-tiny-clip-") as tmp:
        _write_tiny_tokenizer_files(Path(tmp))
        # from_pretrained reads vocab.json/merges.txt; transformers 5's constructor ignores *_file kwargs
        tokenizer = CLIPTokenizer.from_pretrained(tmp, model_max_length=TOKENIZER_MAX_LENGTH)
    # Seed each module separately so one module's construction order never shifts another's weights.
    torch.manual_seed(TINY_SEED)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
    )
    torch.manual_seed(TINY_SEED + 1)
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
    )
    torch.manual_seed(TINY_SEED + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,  # ids as in the tokenizer's vocab above
            eos_token_id=1,
            pad_token_id=1,
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=5,
            vocab_size=1000,
            max_position_embeddings=TOKENIZER_MAX_LENGTH,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def load_pretrained_pipeline(model: str, device: str) -> StableDiffusionPipeline:
    """Load a Stable Diffusion model from a local folder or the Hugging Face cache.

    float16 on CUDA, float32 on CPU (passed as `dtype`: diffusers 0.42 deprecates `torch_dtype`).
    A Hub id is looked up in the local cache only, unless AITBC_MODEL_DOWNLOAD=1 (and not
    HF_HUB_OFFLINE) allows a download; every failure becomes a BackendError that names the model.
    """
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    folder = Path(model).expanduser()
    is_folder = folder.is_dir()
    if not is_folder and model.startswith((".", "/", "~")):
        raise BackendError(f"model folder {model!r} does not exist")
    if is_folder and not (folder / "model_index.json").is_file():
        raise BackendError(f"model folder {model!r} has no model_index.json: not a diffusers pipeline")
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    allow_download = os.environ.get(DOWNLOAD_ENV, "") == "1" and not offline
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            str(folder) if is_folder else model,
            dtype=dtype,  # diffusers 0.42 deprecates the torch_dtype spelling
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            local_files_only=is_folder or not allow_download,
        )
    except BackendError:
        raise
    except Exception as exc:  # diffusers/hub raise a zoo of types (OSError, EnvironmentError, ValueError ...)
        if is_folder:
            raise BackendError(f"cannot load model folder {model!r}: {exc}") from exc
        hint = (
            ""
            if allow_download
            else f" (not in the local Hugging Face cache; set {DOWNLOAD_ENV}=1 to download)"
        )
        raise BackendError(f"cannot load model {model!r}{hint}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(pipe, StableDiffusionPipeline):
        raise BackendError(f"model {model!r} is a {type(pipe).__name__}, not a Stable Diffusion pipeline")
    return pipe


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes that depend only on the pixels: no text chunks, fixed compression settings."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL, optimize=False)
    return buf.getvalue()


@dataclass(frozen=True)
class FastPath:
    """What the CUDA fast path sets on a pipeline (docs/operations.md, "CUDA fast path")."""

    dtype: torch.dtype = torch.float32
    sdpa: bool = False  # torch scaled_dot_product_attention processors on the UNet and VAE
    channels_last: bool = False  # NHWC memory format for the UNet and VAE convolutions
    compile_unet: bool = False  # torch.compile of the UNet, compiled on first use of each shape
    reason: str = ""  # why it is off, or what it does, for the start-up log


def plan_fast_path(device: str, enabled: bool, compile_unet: bool, *, bf16: bool = False) -> FastPath:
    """The fast path for `device`: off on CPU (the CPU path is the exact, batch-invariant one) and
    whenever `enabled` is false; on CUDA, fp16 (bf16 where `bf16` says the GPU has it: same speed,
    no fp16 overflow), SDPA attention, channels_last, and torch.compile of the UNet if asked."""
    if not enabled:
        return FastPath(reason="off (image_fast_path = false)")
    if not device.startswith("cuda"):
        return FastPath(reason=f"off: {device} is not a CUDA device (CPU runs stay exact, in float32)")
    dtype = torch.bfloat16 if bf16 else torch.float16
    what = f"{str(dtype).removeprefix('torch.')}, SDPA, channels_last" + (", torch.compile(unet)" if compile_unet else "")
    return FastPath(dtype=dtype, sdpa=True, channels_last=True, compile_unet=compile_unet, reason=f"on: {what}")


def apply_fast_path(pipe: StableDiffusionPipeline, plan: FastPath) -> StableDiffusionPipeline:
    """Set `plan` on `pipe` (before the backend takes it). Weights identity is computed before."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    if pipe.unet.dtype != plan.dtype:
        pipe.to(dtype=plan.dtype)
    if plan.sdpa:
        pipe.unet.set_attn_processor(AttnProcessor2_0())
        pipe.vae.set_attn_processor(AttnProcessor2_0())
    if plan.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if plan.compile_unet:
        pipe.unet.compile()  # in place (nn.Module.compile): the module and its type stay the pipeline's
    return pipe


def _shared_row_linear(linear: torch.nn.Linear) -> None:
    """Make `linear` compute a 2-D input whose rows are all equal from its first row alone.

    The timestep embedding (UNet `time_embedding` and every ResNet's `time_emb_proj`) is one
    timestep broadcast over the batch, so its rows are equal; but a CPU GEMM gives other bits for 1,
    2 or 8 rows (small-M kernels), so an image's numbers would depend on how many others share the
    call. Computed from one row, it is the same in a batch of any size."""
    forward = linear.forward

    def one_row(x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] > 1 and torch.equal(x, x[:1].expand_as(x)):
            return forward(x[:1]).expand(x.shape[0], -1)
        return forward(x)

    linear.forward = one_row  # type: ignore[method-assign]


def make_batch_invariant(pipe: StableDiffusionPipeline) -> int:
    """Batch-invariant numbers on CPU (docs/operations.md, "Image batching"): the timestep
    embedding from one row (`_shared_row_linear`) and the VAE decoding one image at a time (CPU
    convolutions pick kernels by batch size). Other UNet layers see batch x tokens or pixel rows,
    where the kernels give each row the same bits at any batch size (tests/miner check the PNGs).
    Returns how many linears were changed."""
    changed = 0
    for name, module in pipe.unet.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, torch.nn.Linear) and (leaf == "time_emb_proj" or ".time_embedding." in f".{name}"):
            _shared_row_linear(module)
            changed += 1
    pipe.vae.enable_slicing()
    return changed


class DiffusersImageBackend:
    """Runs ImageRequests on one StableDiffusionPipeline, loaded once.

    gpu_ms: on CUDA, the time between CUDA events recorded around the pipeline call on the current
    stream (synchronised), which includes other concurrent calls' kernels that interleave on that
    stream; on CPU, the wall time of the pipeline call. Neither includes validation or PNG encoding.
    """

    def __init__(
        self, pipe: StableDiffusionPipeline, *, model: str, device: str, fast_path: FastPath | None = None
    ) -> None:
        self.model = model
        self.device = device
        self.weights_sha256 = weights_sha256(dict(pipe.components))  # declared at Register (model identity)
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        self.fast_path = fast_path or FastPath(reason="off")
        if self.fast_path.sdpa or self.fast_path.channels_last or self.fast_path.compile_unet:
            apply_fast_path(pipe, self.fast_path)
        log.info("image model %s on %s: fast path %s", model, device, self.fast_path.reason)
        self._compiled_shapes: set[tuple[int, int, int]] = set()  # (UNet rows, width, height) seen
        if device == "cpu":  # CPU results are compared byte for byte (docs/hub.md, "Re-execution")
            make_batch_invariant(pipe)
        self._pipe = pipe
        self._encode_lock = threading.Lock()
        self.native_size = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
        self.max_steps = int(pipe.scheduler.config.num_train_timesteps)

    @property
    def pipeline(self) -> StableDiffusionPipeline:
        """The shared pipeline (for save_pretrained, benchmarks); do not call it from worker threads."""
        return self._pipe

    def _call_view(self) -> StableDiffusionPipeline:
        """A pipeline sharing every module with the loaded one but with its own scheduler."""
        components: dict[str, Any] = dict(self._pipe.components)
        components["scheduler"] = type(self._pipe.scheduler).from_config(self._pipe.scheduler.config)
        components["requires_safety_checker"] = False
        view = StableDiffusionPipeline(**components)
        view.set_progress_bar_config(disable=True)
        return view

    def generate(
        self,
        req: ImageRequest,
        on_step: Callable[[int, int], None],
        cancel: threading.Event,
    ) -> ImageOutput:
        """One job alone: a batch of one (the same code, so a job's images never depend on whether
        it was batched)."""
        outcome = self.generate_batch([BatchItem(req, on_step, cancel)])[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def generate_batch(self, items: list[BatchItem]) -> list[ImageOutput | BaseException]:
        """Run jobs that share `batch_key` in one pipeline call; one outcome per item, in order.

        Image i of each job starts from its own CPU generator seeded seed + i, as alone. Progress
        goes to each job's own on_step. A job whose cancel is set (or whose on_step raises) leaves
        the batch: it gets no more progress and its outcome is JobCancelled (or that exception),
        while its rows are still computed and thrown away, so the other jobs' numbers are those of
        the call they started in; once every job has left, the call stops after the current step.
        An invalid request fails alone (BackendError as its outcome) and does not join the call.
        """
        outcomes: list[ImageOutput | BaseException | None] = [None] * len(items)
        live: list[int] = []
        key: tuple[Any, ...] | None = None
        for n, item in enumerate(items):
            try:
                item_key = batch_key(item.req, self.native_size)
                if item.req.steps > self.max_steps:
                    raise BackendError(
                        f"steps must be at most {self.max_steps} for model {self.model}, got {item.req.steps}"
                    )
                if key is not None and item_key != key:
                    raise ValueError(f"batch mixes {item_key} with {key}: only equal batch_key may share a call")
                key = item_key
                if item.cancel.is_set():
                    raise JobCancelled("cancelled before start")
                live.append(n)
            except (BackendError, JobCancelled) as exc:
                outcomes[n] = exc
        if not live:
            return outcomes  # type: ignore[return-value]
        assert key is not None
        width, height, steps, guidance_scale = key
        view = self._call_view()
        # classifier-free guidance only above 1, as in diffusers
        do_cfg = guidance_scale > 1.0 and view.unet.config.time_cond_proj_dim is None
        batch_images = sum(items[n].req.images for n in live)

        # phases as child spans of miner.generate (tracing on): encode_prompt and encode_png around
        # our own calls; denoise (pipeline start -> last step) and vae_decode (last step -> the
        # pipeline returns: VAE decode, safety checker if the model has one, PIL conversion) from
        # the step callback's clock, so the diffusers call itself stays untouched
        last_step_ns = 0
        staying = set(live)

        def leave(n: int, exc: BaseException) -> None:
            staying.discard(n)
            outcomes[n] = exc

        def step_end(
            pipe: StableDiffusionPipeline, step: int, timestep: Any, kwargs: dict[str, Any]
        ) -> dict[str, Any]:
            nonlocal last_step_ns
            for n in sorted(staying):
                try:
                    items[n].on_step(step + 1, pipe.num_timesteps)
                except Exception as exc:  # this job's own callback: it alone leaves
                    leave(n, exc)
            last_step_ns = time.time_ns()
            for n in sorted(staying):
                if items[n].cancel.is_set():
                    leave(n, JobCancelled(f"cancelled after step {step + 1}"))
            if not staying:
                raise JobCancelled(f"every job of the batch left after step {step + 1}")
            return kwargs

        with torch.inference_mode():
            positive, negative, generator = [], [], []
            with self._encode_lock, telemetry.span("miner.encode_prompt", cfg=do_cfg, jobs=len(live)):
                for n in live:
                    req = items[n].req
                    prompt_embeds, negative_embeds = view.encode_prompt(
                        req.prompt, self.device, req.images, do_cfg, negative_prompt=req.negative_prompt or None
                    )
                    positive.append(prompt_embeds)
                    if negative_embeds is not None:
                        negative.append(negative_embeds)
                    # one CPU generator per image, seeded seed + i: image i of a job is the same
                    # whether the job runs whole, split into shards across miners or in a batch
                    # with others, and starts from the same latents on any device (docs/hub.md)
                    generator += [torch.Generator("cpu").manual_seed(req.seed + i) for i in range(req.images)]
            timer = DeviceTimer(self.device)
            started_ns = time.time_ns()
            try:
                with timer:
                    result = view(
                        prompt_embeds=torch.cat(positive),
                        negative_prompt_embeds=torch.cat(negative) if negative else None,
                        num_inference_steps=steps,
                        guidance_scale=guidance_scale,
                        width=width,
                        height=height,
                        num_images_per_prompt=1,
                        generator=generator,
                        callback_on_step_end=step_end,
                        output_type="pil",
                    )
            except JobCancelled:  # raised by step_end only once every job has left
                return outcomes  # type: ignore[return-value]
            done_ns = time.time_ns()
        if self.fast_path.compile_unet:
            shape = (batch_images * (2 if do_cfg else 1), width, height)
            if shape not in self._compiled_shapes:  # the first call of a shape pays the compile
                self._compiled_shapes.add(shape)
                log.info("UNet compiled for %d rows at %dx%d: first call took %.1f s (%d steps)",
                         shape[0], width, height, (done_ns - started_ns) / 1e9, steps)
        if last_step_ns:
            telemetry.record_span("miner.denoise", started_ns, last_step_ns, steps=steps, images=batch_images)
            telemetry.record_span("miner.vae_decode", last_step_ns, done_ns, images=batch_images)
        first = 0
        with telemetry.span("miner.encode_png", images=batch_images):
            for n in live:
                count = items[n].req.images
                own = result.images[first : first + count]
                first += count
                if n in staying:
                    outcomes[n] = ImageOutput(
                        pngs=[encode_png(img) for img in own], width=width, height=height,
                        gpu_ms=share_ms(timer.ms, count, batch_images),
                    )
        return outcomes  # type: ignore[return-value]
