"""Tokens/s and time to first token of the miner's text backend, direct (no network). Printed, not asserted.

    python bench/text_backend.py                 # tiny-llama on CPU (and on CUDA when present)
    python bench/text_backend.py --runs 10 --tokens 256

Every timed run goes through TransformersTextBackend.generate, the code path a miner job takes
(validation, tokenization, the lock, generate with the streaming/stop/cancel hooks, incremental
decoding). "raw generate" is LlamaForCausalLM.generate on the same model with no streamer or
stopping criteria: the difference is the backend's own per-token cost. Sampling (temperature
0.9, top_p 0.95, top_k 50) with a fixed seed and no stop strings; a run can end early on </s>,
so rates are generated tokens / wall time. The network path (Work stream -> WatchJob) is measured
by the network benchmarks against these direct figures.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, pct  # noqa: E402

from aitbc.miner.text import TextRequest, TransformersTextBackend, load_text_backend  # noqa: E402

PROMPT = "Explain proof of authority in one paragraph"


def time_backend(backend, tokens: int, runs: int, label: str) -> None:
    req = TextRequest(PROMPT, tokens, 0.9, 0.95, 50, 7, ())
    cancel = threading.Event()
    backend.generate(req, lambda d: None, cancel)  # warm-up: kernels, allocator, caches
    rates, ttfts, gaps, counts = [], [], [], []
    for run in range(runs):
        req = TextRequest(PROMPT, tokens, 0.9, 0.95, 50, 7 + run, ())
        stamps: list[float] = []
        started = time.perf_counter()
        out = backend.generate(req, lambda d, stamps=stamps: stamps.append(time.perf_counter()), cancel)
        wall = time.perf_counter() - started
        rates.append(out.generated_tokens / wall)
        counts.append(out.generated_tokens)
        if stamps:
            ttfts.append((stamps[0] - started) * 1000)
            gaps += [(b - a) * 1000 for a, b in zip(stamps, stamps[1:], strict=False)]
    print(
        f"{label:<28} {pct(rates, 50):8.0f} tokens/s (p50 of {runs} runs, min {min(rates):.0f}, "
        f"mean {sum(counts) / len(counts):.0f} tokens/run)  first token p50 {pct(ttfts, 50):.2f} ms "
        f"p99 {pct(ttfts, 99):.2f} ms  inter-delta p50 {pct(gaps, 50):.2f} ms p99 {pct(gaps, 99):.2f} ms"
    )


def time_raw(backend: TransformersTextBackend, tokens: int, runs: int, label: str) -> None:
    import torch

    ids = torch.tensor([backend.tokenizer(PROMPT)["input_ids"]], device=backend.device)
    lm = backend.language_model
    rates = []
    for run in range(runs + 1):
        torch.manual_seed(7 + run)
        started = time.perf_counter()
        with torch.inference_mode():
            out = lm.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                do_sample=True, temperature=0.9, top_p=0.95, top_k=50, pad_token_id=2,
            )
        if backend.device.startswith("cuda"):
            torch.cuda.synchronize()
        if run:  # the first is the warm-up
            rates.append((out.shape[1] - ids.shape[1]) / (time.perf_counter() - started))
    print(f"{label:<28} {pct(rates, 50):8.0f} tokens/s (p50 of {runs} runs, min {min(rates):.0f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()

    import torch

    cuda = torch.cuda.is_available()
    print(
        f"{machine()}; torch {torch.__version__}, {torch.get_num_threads()} torch threads"
        + (f", {torch.cuda.get_device_name(0)}" if cuda else ", no CUDA")
    )
    null = load_text_backend("null-text")
    time_backend(null, args.tokens, args.runs, "null-text (no model)")
    started = time.perf_counter()
    tiny = load_text_backend("tiny-llama", "cpu")
    print(f"tiny-llama load (build tokenizer + model): {(time.perf_counter() - started) * 1000:.0f} ms")
    assert isinstance(tiny, TransformersTextBackend)
    time_backend(tiny, args.tokens, args.runs, "tiny-llama, cpu, backend")
    time_raw(tiny, args.tokens, args.runs, "tiny-llama, cpu, raw generate")
    if cuda:
        gpu = load_text_backend("tiny-llama", "cuda:0")
        assert isinstance(gpu, TransformersTextBackend)
        time_backend(gpu, args.tokens, args.runs, "tiny-llama, cuda:0, backend")
        time_raw(gpu, args.tokens, args.runs, "tiny-llama, cuda:0, raw generate")


if __name__ == "__main__":
    main()
