#!/usr/bin/env python3
"""How exact stacked text decoding is (issue 19, text_batching = "stacked"), printed.

1. Tokens: J jobs (random prompts of 1-12 words, greedy and seeded sampling with assorted
   temperature / top-k / top-p) run on a stacked backend B at a time (B = 1, 4, 16; every other job
   of a group joins a few ms late, mid-batch) vs each job alone on an exact backend: how many jobs'
   texts differ, and whether each differing one passes the hub's rule (compare_text with the
   job's trace, DEFAULT_TEXT_EPSILON).
2. Logits: 16 streams of assorted prompt lengths decoded stacked for 100 steps beside the same
   streams decoded alone (same tokens forced into both): the largest |logit difference| of a
   stacked row and its stream alone, how many rows are bit-identical, and the smallest top-2
   logit margin seen, i.e. how close the noise comes to flipping a token.
   The hub's epsilon must sit well above the noise (2); (1) says how often it is needed.

CPU (always): tiny-llama, float32. CUDA (when present; skipped with the reason otherwise): a
~1B-parameter Llama-shaped model (Llama-3.2-1B's shape, random weights, bf16) built from its config.

    python bench/text_batching.py [--jobs 48] [--tokens 64]
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine  # noqa: E402

from aitbc.hub.verification import DEFAULT_TEXT_EPSILON, compare_text  # noqa: E402
from aitbc.miner.text import TEXT_STACKED, TextRequest, TransformersTextBackend  # noqa: E402

WORDS = ("the miner block token ledger proof of authority stream compute a receipt signed model and fast GPU job "
         "is to Once upon time").split()
GROUPS = (1, 4, 16)


def requests(n: int, tokens: int, greedy: bool, rng: random.Random) -> list[TextRequest]:
    out = []
    for _ in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
        if greedy:
            out.append(TextRequest(prompt, tokens, 0.0, 1.0, 0, 0, ()))
        else:
            out.append(TextRequest(prompt, tokens, rng.choice([0.7, 1.0, 1.3]), rng.choice([1.0, 0.9]),
                                   rng.choice([0, 50]), rng.randint(0, 10**6), ()))
    return out


def token_agreement(exact: TransformersTextBackend, stacked: TransformersTextBackend, jobs: int, tokens: int) -> None:
    rng = random.Random(1)
    for greedy in (True, False):
        for b in GROUPS:
            reqs = requests(jobs, tokens, greedy, rng)
            traces = [exact.trace(r) for r in reqs]
            differ = passed = made = 0
            close = sum(m < DEFAULT_TEXT_EPSILON for _, t in traces for m in t.margins)
            for k in range(0, len(reqs), b):
                group = reqs[k : k + b]

                def run(j: int, r: TextRequest) -> object:
                    if j % 2:
                        time.sleep(0.002 * j)  # joins mid-batch
                    return stacked.generate(r, lambda d: None, threading.Event())

                with ThreadPoolExecutor(b) as pool:
                    outs = list(pool.map(run, range(len(group)), group))
                for (alone, trace), out in zip(traces[k : k + b], outs, strict=True):
                    made += alone.generated_tokens
                    if out.text != alone.text:
                        differ += 1
                        passed += compare_text(trace, out.text).match
            kind = "greedy" if greedy else "seeded"
            print(f"  {kind}, {b:>2} at a time: {differ}/{len(reqs)} jobs' texts differ from the job alone "
                  f"({made} tokens); of those, {passed} pass compare_text; decisions with a margin under "
                  f"the hub's epsilon: {close}")


def logit_noise(backend: TransformersTextBackend, device: str, steps: int = 100) -> None:
    import torch

    from aitbc.miner.text import _Rows, _Stream

    rng = random.Random(3)
    lm, tok = backend.language_model, backend.tokenizer
    prompts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))) for _ in range(16)]
    worst, same, n, margin = 0.0, 0, 0, float("inf")
    with torch.inference_mode():
        rows, solos = _Rows(), []
        for p in prompts:
            ids = list(tok(p)["input_ids"])

            def make(ids: list[int] = ids, p: str = p) -> _Stream:
                return _Stream(ids, TextRequest(p, steps + 1, 0.0, 1.0, 0, 0, ()), frozenset(), threading.Event(),
                               device)

            s, o = make(), make()
            s.step(lm)
            o.step(lm)
            rows.join(s)
            solos.append(o)
        for _ in range(steps):
            stacked = rows.forward(lm)  # the miner's own batched step, without its sampling
            for i, (s, o) in enumerate(zip(rows.streams, solos, strict=True)):
                alone = lm(input_ids=o.ids[:, -1:], past_key_values=o.cache, use_cache=True)
                o.cache = alone.past_key_values
                a, b = alone.logits[0, -1].float(), stacked[i].float()
                worst = max(worst, float((a - b).abs().max()))
                same += int(torch.equal(a, b))
                n += 1
                top = torch.topk(a, 2).values
                margin = min(margin, float(top[0] - top[1]))
                t = torch.argmax(a).view(1, 1)  # both follow the alone run's tokens
                o.ids = torch.cat([o.ids, t], -1)
                s.ids = torch.cat([s.ids, t], -1)
    print(f"  logits, 16 stacked rows x {steps} steps: max |stacked - alone| {worst:.3g}, bit-identical rows "
          f"{same}/{n}, smallest top-2 margin seen {margin:.3g} (hub epsilon {DEFAULT_TEXT_EPSILON:g})")


def build_1b(device: str) -> tuple[TransformersTextBackend, TransformersTextBackend]:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from aitbc.miner.text import build_tiny_tokenizer

    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048,
                         bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):
        lm = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    lm.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    tok = build_tiny_tokenizer()  # ids < 512 fit the 32000 vocab; other ids decode to nothing
    return (TransformersTextBackend(tok, lm, model="llama-1b", device=device),
            TransformersTextBackend(tok, lm, model="llama-1b", device=device, batching=TEXT_STACKED))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=48)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    import torch

    from aitbc.miner.daemon import configure_cpu_threads
    from aitbc.miner.text import TINY_TEXT_MODEL, load_text_backend

    threads = configure_cpu_threads("cpu", 0)
    print(f"stacked text decoding vs alone ({machine()}), torch {torch.__version__}, {threads} torch threads")
    exact = load_text_backend(TINY_TEXT_MODEL, "cpu")
    stacked = load_text_backend(TINY_TEXT_MODEL, "cpu", batching=TEXT_STACKED, max_batch=16)
    assert isinstance(exact, TransformersTextBackend) and isinstance(stacked, TransformersTextBackend)
    print(f"tiny-llama on CPU, float32, {args.jobs} jobs per row, {args.tokens} new tokens each")
    token_agreement(exact, stacked, args.jobs, args.tokens)
    logit_noise(exact, "cpu")
    if not torch.cuda.is_available():
        print("GPU variant (1B Llama-shaped, bf16): skipped, torch.cuda.is_available() is false on this machine")
        return
    exact_1b, stacked_1b = build_1b("cuda:0")
    print(f"1B Llama-shaped (random, bf16) on {torch.cuda.get_device_name(0)}")
    token_agreement(exact_1b, stacked_1b, args.jobs, args.tokens)
    logit_noise(exact_1b, "cuda:0")


if __name__ == "__main__":
    main()
