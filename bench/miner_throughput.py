#!/usr/bin/env python3
"""Miner throughput with concurrent text streams and batched image jobs (issue 19), printed.

Text: N streams (1, 4, 16) on one miner (max_concurrency 16), submitted at once, on a miner with
text_batching "exact" and on one with "stacked" (text_max_batch 16), vs the same N streams
submitted one after another; aggregate tokens/s (all tokens / first submit -> last completion)
and per-stream first-token latency from the moment all N were wanted (p50, max).
Images: B jobs of one image (B = 1, 4, 8) submitted at once to a miner with image_batch_size 8,
vs the same B images in one direct `generate_batch` call of the same backend in this process.
Everything goes through real processes: a coordinator and a miner, as in production.

CPU (always): tiny-llama and tiny-sd. CUDA (when present; skipped with the reason otherwise): a
~1B-parameter Llama-shaped model and an SD-1.5-sized pipeline, both random weights built from
their configs and saved to a temporary folder the miner loads, at 512x512, 30 steps, with and
without image_compile (the fast path on).

    python bench/miner_throughput.py [--text-only | --images-only] [--tokens 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import MD, machine, pct, start_coordinator, start_miner, submit_and_watch  # noqa: E402

from aitbc.miner.backend import BatchItem, ImageRequest  # noqa: E402
from aitbc.rpc import channel  # noqa: E402
from aitbc.v1 import coordinator_pb2, coordinator_pb2_grpc, job_pb2  # noqa: E402

PROMPT = "Explain proof of authority in one paragraph"
STREAMS = (1, 4, 16)
BATCHES = (1, 4, 8)


async def _ready(stub: coordinator_pb2_grpc.CoordinatorServiceStub) -> None:
    while not (await stub.ListModels(coordinator_pb2.ListModelsRequest(), metadata=MD)).models:
        await asyncio.sleep(0.1)


def text_params(tokens: int, seed: int) -> job_pb2.JobParams:
    # min tokens = max: eos is not special to a random model, so every stream makes `tokens` tokens
    return job_pb2.JobParams(text=job_pb2.TextParams(prompt=PROMPT, max_new_tokens=tokens, temperature=0.9,
                                                     top_p=1.0, seed=seed))


async def _text_rows(stub: coordinator_pb2_grpc.CoordinatorServiceStub, name: str, tokens: int, n: int,
                     concurrent: bool) -> tuple[float, list[float]]:
    """(aggregate tokens/s, first-token ms of each stream from when all n were wanted)"""
    t0 = time.perf_counter()
    if concurrent:
        watched = await asyncio.gather(*(submit_and_watch(stub, name, text_params(tokens, 100 + i)) for i in range(n)))
    else:
        watched = [await submit_and_watch(stub, name, text_params(tokens, 100 + i)) for i in range(n)]
    total = time.perf_counter() - t0
    return sum(w.job.generated_tokens for w in watched) / total, [(w.first_text - t0) * 1000 for w in watched]


async def text_bench(model: str, device: str, tokens: int, label: str) -> None:
    """Each stream count on a miner with text_batching "exact" (each stream its own batch-1 forward
    pass) and on one with "stacked" (one batched forward pass per round), vs one after another."""
    rows: dict[tuple[str, int], tuple[float, list[float]]] = {}
    for batching in ("exact", "stacked"):
        with tempfile.TemporaryDirectory() as tmp:
            proc, addr = start_coordinator(Path(tmp))
            miner = start_miner(Path(tmp), addr, [model], max_concurrency=max(STREAMS), gpu_devices=[device],
                                text_batching=batching, text_max_batch=max(STREAMS))
            try:
                async with channel(addr) as ch:
                    stub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
                    await _ready(stub)
                    await submit_and_watch(stub, model, text_params(tokens, 1))  # warm-up
                    for n in STREAMS:
                        if batching == "exact":
                            rows["one after another", n] = await _text_rows(stub, model, tokens, n, False)
                        rows[batching, n] = await _text_rows(stub, model, tokens, n, True)
            finally:
                miner.terminate()
                miner.wait()
                proc.terminate()
                proc.wait()
    print(f"text, {label}, {tokens} new tokens per stream (temperature 0.9, own seed each), through the network")
    for n in STREAMS:
        for mode in ("one after another", "exact", "stacked"):
            rate, first = rows[mode, n]
            print(f"  {n:>2} streams, {mode:<17}: {rate:7.0f} tokens/s aggregate; first token "
                  f"p50 {pct(first, 50):7.1f} ms, max {max(first):7.1f} ms (from when all {n} were wanted)")
        seq, exact, stacked = (rows[m, n][0] for m in ("one after another", "exact", "stacked"))
        print(f"  {n:>2} streams: stacked / one after another {stacked / seq:.2f}x, stacked / exact "
              f"{stacked / exact:.2f}x, stacked vs 1 stream stacked {stacked / rows['stacked', 1][0]:.2f}x")


def image_req(i: int, size: int, steps: int) -> ImageRequest:
    return ImageRequest(f"a futuristic city, view {i}", "", steps, 7.5, size, size, 1, 1000 + i)


async def image_bench(model: str, backend, device: str, size: int, steps: int, rounds: int, label: str,
                      **miner_extra: object) -> None:
    cancel = threading.Event()
    direct = {}
    backend.generate_batch([BatchItem(image_req(0, size, steps), lambda i, n: None, cancel)])  # warm-up
    for b in BATCHES:
        t0 = time.perf_counter()
        for r in range(rounds):
            backend.generate_batch([BatchItem(image_req(r * b + i, size, steps), lambda i, n: None, cancel)
                                    for i in range(b)])
        direct[b] = b * rounds / (time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as tmp:
        proc, addr = start_coordinator(Path(tmp))
        miner = start_miner(Path(tmp), addr, [model], max_concurrency=max(BATCHES), image_batch_size=max(BATCHES),
                            image_batch_wait_ms=50, gpu_devices=[device], **miner_extra)
        try:
            async with channel(addr) as ch:
                stub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
                await _ready(stub)

                def params(i: int) -> job_pb2.JobParams:
                    r = image_req(i, size, steps)
                    return job_pb2.JobParams(image=job_pb2.ImageParams(prompt=r.prompt, steps=steps, guidance_scale=7.5,
                                                                       width=size, height=size, images=1, seed=r.seed))

                for b in BATCHES:  # warm-up of each shape (and its compile, with image_compile)
                    await asyncio.gather(*(submit_and_watch(stub, model, params(i)) for i in range(b)))
                print(f"images, {label}, {size}x{size}, {steps} steps, guidance 7.5, {rounds} rounds")
                for b in BATCHES:
                    t0 = time.perf_counter()
                    for r in range(rounds):
                        await asyncio.gather(*(submit_and_watch(stub, model, params(r * b + i), fetch_result=True)
                                               for i in range(b)))
                    net = b * rounds / (time.perf_counter() - t0)
                    print(f"  batch {b}: network {net:6.2f} images/s ({1000 / net:7.1f} ms/image), direct "
                          f"{direct[b]:6.2f} images/s; network / direct {net / direct[b]:.2f}")
        finally:
            miner.terminate()
            miner.wait()
            proc.terminate()
            proc.wait()


def build_1b_llama(folder: Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from aitbc.miner.text import build_tiny_tokenizer

    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048,
                         bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device("cuda:0"):
        lm = LlamaForCausalLM(config).to(torch.bfloat16)
    lm.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    lm.save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)  # ids < 512 fit the 32000 vocab


async def run(args: argparse.Namespace) -> None:
    import torch

    from aitbc.miner.backend import load_image_backend
    from aitbc.miner.daemon import configure_cpu_threads

    cuda = torch.cuda.is_available()
    threads = configure_cpu_threads("cpu", 0)
    print(f"miner throughput ({machine()}), torch {torch.__version__}, {threads} torch threads, "
          + (torch.cuda.get_device_name(0) if cuda else "no CUDA"))
    if not args.images_only:
        await text_bench("tiny-llama", "cpu", args.tokens, "tiny-llama on CPU")
    if not args.text_only:
        await image_bench("tiny-sd", load_image_backend("tiny-sd", "cpu"), "cpu", 64, 20, args.rounds,
                          "tiny-sd on CPU")
    if not cuda:
        print("GPU variants (1B Llama text, SD-1.5-sized images at 512x512, 30 steps): skipped, "
              "torch.cuda.is_available() is false on this machine")
        return
    with tempfile.TemporaryDirectory() as tmp:
        if not args.images_only:
            build_1b_llama(Path(tmp) / "llama-1b")
            # a folder whose config.json names a *ForCausalLM: the miner serves it as a text model
            await text_bench(str(Path(tmp) / "llama-1b"), "cuda:0", args.tokens,
                             f"1B Llama-shaped (random, bf16) on {torch.cuda.get_device_name(0)}")
        if not args.text_only:
            from image_backend import build_sd15_pipeline

            folder = Path(tmp) / "sd15"
            build_sd15_pipeline("cuda:0", torch.float16).save_pretrained(folder)
            for compile_unet in (False, True):
                backend = load_image_backend(str(folder), "cuda:0", fast_path=True, compile_unet=compile_unet)
                await image_bench(str(folder), backend, "cuda:0", 512, 30, args.rounds,
                                  f"SD-1.5-sized on {torch.cuda.get_device_name(0)}, fast path, "
                                  f"compile {'on' if compile_unet else 'off'}",
                                  image_fast_path="true", image_compile=str(compile_unet).lower())
                del backend
                torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    only = ap.add_mutually_exclusive_group()
    only.add_argument("--text-only", action="store_true")
    only.add_argument("--images-only", action="store_true")
    asyncio.run(run(ap.parse_args()))


if __name__ == "__main__":
    main()
