"""Time per image of the miner's diffusers backend (printed, not asserted).

    python bench/image_backend.py            # tiny pipeline on CPU (and on CUDA when present);
                                             # SD-1.5-sized pipeline too when CUDA is present
    python bench/image_backend.py --sd15     # force the SD-1.5-sized run (slow on a CPU)
    python bench/image_backend.py --no-sd15  # never run it

The SD-1.5-sized pipeline has SD-1.5's published architecture (UNet 860M parameters, VAE, CLIP
ViT-L/14 text encoder) with random weights: the same compute as the real model without a download.
Every run goes through DiffusersImageBackend.generate, i.e. the code path a miner job takes
(per-call scheduler, prompt encoding, denoising with the step callback, VAE decode, PNG encoding).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import threading
import time

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from aitbc.miner.backend import ImageRequest, load_image_backend
from aitbc.miner.image import DiffusersImageBackend, build_tiny_pipeline


def build_sd15_pipeline(device: str, dtype: torch.dtype) -> StableDiffusionPipeline:
    """SD-1.5's architecture from its published config values, random weights, built on `device`."""
    tokenizer = build_tiny_pipeline().tokenizer  # ids fit any vocab; prompts are padded to 77 anyway
    torch.manual_seed(0)
    with torch.device(device):  # initialise the weights where they will run (seconds, not minutes)
        unet = UNet2DConditionModel(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            down_block_types=(
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            cross_attention_dim=768,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            block_out_channels=[128, 256, 512, 512],
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                max_position_embeddings=77,
                hidden_act="quick_gelu",
                projection_dim=768,
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
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe.to(dtype=dtype)


def time_backend(backend, size: int, steps: int, runs: int, label: str) -> None:
    req = ImageRequest(
        prompt="a futuristic city skyline at night",
        negative_prompt="",
        steps=steps,
        guidance_scale=7.5,
        width=size,
        height=size,
        images=1,
        seed=7,
    )
    cancel = threading.Event()
    backend.generate(req, lambda i, n: None, cancel)  # warm-up: kernels, allocator, caches
    walls, gpus = [], []
    for _ in range(runs):
        started = time.perf_counter()
        out = backend.generate(req, lambda i, n: None, cancel)
        walls.append((time.perf_counter() - started) * 1000)
        gpus.append(out.gpu_ms)
    print(
        f"{label:<44} {size}x{size} {steps} steps, CFG on: "
        f"{statistics.median(walls):8.1f} ms/image wall (median of {runs}; min {min(walls):.1f}), "
        f"gpu_ms median {statistics.median(gpus):.0f}, {statistics.median(walls) / steps:.1f} ms/step"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--sd15", action="store_true", help="run the SD-1.5-sized pipeline even without CUDA")
    group.add_argument("--no-sd15", action="store_true", help="skip the SD-1.5-sized pipeline")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} CPU threads"
        + (f", {torch.cuda.get_device_name(0)}" if cuda else ", no CUDA")
    )

    started = time.perf_counter()
    tiny_cpu = load_image_backend("tiny-sd", "cpu")
    print(f"tiny-sd load (build from configs): {(time.perf_counter() - started) * 1000:.0f} ms")
    time_backend(tiny_cpu, 64, args.steps, args.runs, "tiny-sd, cpu, float32")
    if cuda:
        time_backend(
            load_image_backend("tiny-sd", "cuda:0"), 64, args.steps, args.runs, "tiny-sd, cuda:0, float32"
        )

    if args.no_sd15 or not (cuda or args.sd15):
        print("SD-1.5-sized pipeline: skipped (no CUDA here; pass --sd15 to run it on the CPU anyway)")
        return
    device = "cuda:0" if cuda else "cpu"
    dtype = torch.float16 if cuda else torch.float32
    started = time.perf_counter()
    pipe = build_sd15_pipeline(device, dtype)
    unet_params = sum(p.numel() for p in pipe.unet.parameters())
    print(
        f"SD-1.5-sized build (random weights): {(time.perf_counter() - started):.1f} s, "
        f"UNet {unet_params / 1e6:.0f}M parameters"
    )
    backend = DiffusersImageBackend(pipe, model="sd15-random", device=device)
    runs = args.runs if cuda else 1
    time_backend(
        backend, 512, args.steps, runs, f"SD-1.5-sized, {device}, {str(dtype).removeprefix('torch.')}"
    )


if __name__ == "__main__":
    main()
