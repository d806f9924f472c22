"""Hub benchmark: matching decision time with 1,000 registered miners, and the verification-cost model.

    .venv/bin/python bench/hub_matching.py [--miners 1000] [--decisions 20000]

    .venv/bin/python bench/hub_matching.py --calibrate [--seeds 8]   # needs torch/diffusers; CUDA if present

Decision time is one `choose()` call over every registered miner (the coordinator's dispatch
passes its whole miner list), measured with perf_counter_ns. Two fleets: a realistic one (20
models, each miner serving 1-3) and a worst case where all miners serve the requested model.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, pct  # noqa: E402

from aitbc.hub.matching import JobNeeds, MinerView, choose  # noqa: E402
from aitbc.hub.payout import expected_verification_cost_pct  # noqa: E402

MODELS = [f"model-{i:02d}" for i in range(20)]
VRAM = [0, 8192, 12288, 16384, 24576, 49152, 81920]


def fleet(n: int, rng: random.Random, *, all_serve: str | None = None) -> list[MinerView]:
    out = []
    for i in range(n):
        models = frozenset(rng.sample(MODELS, rng.randint(1, 3)))
        if all_serve:
            models |= {all_serve}
        cap = rng.choice([1, 1, 2, 4])
        out.append(MinerView(
            miner_id=f"aitb1miner{i:05d}", models=models, kinds={}, vram_mb=rng.choice(VRAM),
            price_per_unit=rng.randint(0, 10), max_concurrency=cap, running=rng.randint(0, cap),
            reputation=round(rng.random(), 3), recent_latency_ms=rng.choice([0.0, rng.uniform(200, 20_000)]),
            quarantined=rng.random() < 0.02,
        ))
    return out


def needs(rng: random.Random, model: str | None = None) -> JobNeeds:
    side = rng.choice([0, 512, 768, 1024])
    return JobNeeds(model=model or rng.choice(MODELS), width=side, height=side, images=rng.choice([1, 1, 2, 4, 8]),
                    max_price_per_unit=rng.choice([None, None, 5, 8]))


def measure(miners: list[MinerView], jobs: list[JobNeeds]) -> tuple[list[float], dict[str, int]]:
    for j in jobs[:500]:  # warm up
        choose(miners, j, 0)
    lat: list[float] = []
    outcomes: dict[str, int] = {}
    for rr, j in enumerate(jobs):
        t = time.perf_counter_ns()
        out = choose(miners, j, rr)
        lat.append((time.perf_counter_ns() - t) / 1e6)
        key = getattr(out, "code", "placed")
        outcomes[key] = outcomes.get(key, 0) + 1
    return lat, outcomes


def calibrate(seeds: int) -> None:
    """Pixel distance (hub.verification) between executions of the same tiny-sd job on CPU fp32,
    CUDA fp32 and CUDA fp16, against the distance between different seeds (what a miner that did
    not run the job returns). The tiny pipeline has random weights: real SD models need their own
    measurement, but the gap between hardware noise and a wrong image is the point."""
    import threading

    import torch

    from aitbc.hub.verification import DEFAULT_TOLERANCE, pixel_distance
    from aitbc.miner.backend import ImageRequest
    from aitbc.miner.image import DiffusersImageBackend, build_tiny_pipeline

    backends = {"cpu fp32": DiffusersImageBackend(build_tiny_pipeline(), model="tiny-sd", device="cpu")}
    if torch.cuda.is_available():
        print(f"gpu: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
        backends["cuda fp32"] = DiffusersImageBackend(build_tiny_pipeline(), model="tiny-sd", device="cuda:0")
        backends["cuda fp16"] = DiffusersImageBackend(build_tiny_pipeline().to(torch.float16), model="tiny-sd",
                                                      device="cuda:0")
    names = list(backends)
    pairs: dict[str, list[float]] = {}
    for side in (0, 256):
        for seed in range(seeds):
            outs = {}
            for name, b in backends.items():
                req = ImageRequest("a futuristic city skyline at night", "", 20, 7.5, side, side, 1, seed)
                outs[name] = b.generate(req, lambda *_: None, threading.Event()).pngs[0]
                again = b.generate(req, lambda *_: None, threading.Event()).pngs[0]
                pairs.setdefault(f"{name} vs itself (rerun)", []).append(pixel_distance(outs[name], again))
                other = b.generate(req.__class__(**{**req.__dict__, "seed": seed + 1000}), lambda *_: None,
                                   threading.Event()).pngs[0]
                pairs.setdefault(f"{name} vs another seed (a cheat)", []).append(pixel_distance(outs[name], other))
            for i, a in enumerate(names):
                for b2 in names[i + 1:]:
                    pairs.setdefault(f"{a} vs {b2}", []).append(pixel_distance(outs[a], outs[b2]))
    print(f"pixel distance (mean |diff| / 255), {seeds} seeds x sizes native and 256x256; "
          f"default tolerance {DEFAULT_TOLERANCE}")
    for label, ds in pairs.items():
        print(f"  {label:40s} median {pct(ds, 50):.4f}  max {max(ds):.4f}  min {min(ds):.4f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--miners", type=int, default=1000)
    ap.add_argument("--decisions", type=int, default=20_000)
    ap.add_argument("--calibrate", action="store_true", help="measure pixel distances across devices instead")
    ap.add_argument("--seeds", type=int, default=8)
    args = ap.parse_args()
    if args.calibrate:
        print(f"machine: {machine()}")
        calibrate(args.seeds)
        return
    rng = random.Random(2026)
    print(f"machine: {machine()}")
    print(f"matching: choose() over {args.miners} registered miners, {args.decisions} decisions each")
    for label, miners, model in (
        ("realistic (20 models, 1-3 per miner)", fleet(args.miners, rng), None),
        ("worst case (every miner serves it)", fleet(args.miners, rng, all_serve="model-00"), "model-00"),
    ):
        jobs = [needs(rng, model) for _ in range(args.decisions)]
        lat, outcomes = measure(miners, jobs)
        goal = "ok" if pct(lat, 50) <= 1.0 else "ABOVE the 1 ms goal"
        print(f"  {label:38s} p50 {pct(lat, 50):.3f} ms  p99 {pct(lat, 99):.3f} ms  max {max(lat):.3f} ms  "
              f"[p50 goal 1 ms: {goal}]  outcomes {dict(sorted(outcomes.items()))}")
    print()
    print("verification cost (expected, single-image jobs): extra compute = rate x 100 % of served compute")
    print(f"  {'rate':>6}  {'% of served compute':>20}  {'% of all compute':>17}")
    for rate in (0.05, 0.10, 0.25):
        extra = expected_verification_cost_pct(rate)
        print(f"  {rate:6.2f}  {extra:19.1f}%  {100 * extra / (100 + extra):16.2f}%")
    print("  (expected cost: each receipt (a job, or one shard of a sharded job) is sampled independently and its"
          " re-run costs about its own units, so the figure holds for any job mix."
          " Measured figures come from the coordinator's counters of re-run vs served units.)")


if __name__ == "__main__":
    main()
