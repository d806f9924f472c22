"""The CUDA fast path switch for images (issue 19): what it would set, checked on CPU."""

from __future__ import annotations

import threading

import torch

from aitbc.config import MinerConfig
from aitbc.miner.backend import ImageRequest, load_image_backend
from aitbc.miner.image import (
    DiffusersImageBackend,
    FastPath,
    apply_fast_path,
    build_tiny_pipeline,
    plan_fast_path,
)


def test_off_by_default_and_always_off_on_cpu() -> None:
    conf = MinerConfig()
    assert (conf.image_fast_path, conf.image_compile, conf.image_batch_size) == (False, False, 4)
    for plan in (plan_fast_path("cuda:0", False, True), plan_fast_path("cpu", True, True, bf16=True)):
        assert plan == FastPath(reason=plan.reason) and plan.reason.startswith("off")
    assert "not a CUDA device" in plan_fast_path("cpu", True, False).reason


def test_on_cuda_it_sets_half_precision_sdpa_channels_last_and_compile_only_when_asked() -> None:
    plan = plan_fast_path("cuda:0", True, False)
    assert (plan.dtype, plan.sdpa, plan.channels_last, plan.compile_unet) == (torch.float16, True, True, False)
    assert plan_fast_path("cuda:1", True, False, bf16=True).dtype == torch.bfloat16
    compiled = plan_fast_path("cuda:0", True, True)
    assert compiled.compile_unet and "torch.compile" in compiled.reason


def test_applying_the_settings_changes_the_pipeline_as_planned() -> None:
    """On CPU in float32 (the dtype CPUs run): processors and memory format as the plan says, and
    the pipeline still makes a valid image."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    pipe = apply_fast_path(build_tiny_pipeline(), FastPath(torch.float32, sdpa=True, channels_last=True))
    assert all(isinstance(p, AttnProcessor2_0) for p in pipe.unet.attn_processors.values())
    assert all(isinstance(p, AttnProcessor2_0) for p in pipe.vae.attn_processors.values())
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert pipe.unet._compiled_call_impl is None  # compile only when asked
    backend = DiffusersImageBackend(pipe, model="tiny-sd", device="cpu")
    out = backend.generate(ImageRequest("a cat", "", 2, 7.5, 64, 64, 1, 1), lambda i, n: None, threading.Event())
    assert len(out.pngs) == 1


def test_asking_for_it_on_cpu_changes_nothing(tiny_backend) -> None:
    backend = load_image_backend("tiny-sd", "cpu", fast_path=True, compile_unet=True)
    assert backend.fast_path.reason.startswith("off") and backend.weights_sha256 == tiny_backend.weights_sha256
    req = ImageRequest("a cat", "", 3, 7.5, 64, 64, 1, 1)
    assert backend.generate(req, lambda i, n: None, threading.Event()).pngs == tiny_backend.generate(
        req, lambda i, n: None, threading.Event()).pngs
