#!/usr/bin/env python3
"""Text streaming through the network vs direct generation with the same tiny model.

Network path: SubmitJob -> coordinator process -> Work stream -> miner process (tiny-llama) ->
TextChunk up -> coordinator -> WatchJob -> this client. Direct path: the same backend's
generate() in this process, with the same torch thread setting the miner uses. Same prompt, seed
and parameters; time to first token measured from submit (network) or from the call (direct).

    python bench/text_stream.py [--runs 11] [--tokens 200]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import MD, machine, start_coordinator, start_miner, submit_and_watch  # noqa: E402

from aitbc.miner.daemon import configure_cpu_threads  # noqa: E402
from aitbc.miner.text import TextRequest, load_text_backend  # noqa: E402
from aitbc.rpc import channel  # noqa: E402
from aitbc.v1 import coordinator_pb2, coordinator_pb2_grpc, job_pb2  # noqa: E402

PROMPT = "Explain proof of authority in one paragraph"


async def run(runs: int, tokens: int) -> None:
    """Direct and network runs alternate (one of each per round, after a warm-up round), so both
    see the same background load on a shared machine."""
    backend = load_text_backend("tiny-llama", "cpu")
    threads = configure_cpu_threads("cpu", 0)
    direct_rate, direct_ttft, direct_stream = [], [], []
    net_rate, net_ttft, net_stream = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        proc, addr = start_coordinator(Path(tmp))
        try:
            miner = start_miner(Path(tmp), addr, ["tiny-llama"])  # its own process, as in production
            async with channel(addr) as ch:
                stub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
                while not (await stub.ListModels(coordinator_pb2.ListModelsRequest(), metadata=MD)).models:
                    await asyncio.sleep(0.1)
                for i in range(runs + 1):
                    req = TextRequest(PROMPT, tokens, 0.9, 1.0, 0, 100 + i, ())
                    stamps: list[float] = []
                    t = time.perf_counter()
                    out = backend.generate(req, lambda d, s=stamps: s.append(time.perf_counter()), threading.Event())
                    wall = time.perf_counter() - t
                    params = job_pb2.TextParams(prompt=PROMPT, max_new_tokens=tokens, temperature=0.9, top_p=1.0,
                                                seed=100 + i)
                    w = await submit_and_watch(stub, "tiny-llama", job_pb2.JobParams(text=params))
                    if i:  # round 0 warms both paths up
                        direct_rate.append(out.generated_tokens / wall)
                        direct_ttft.append((stamps[0] - t) * 1000)
                        direct_stream.append(out.generated_tokens / (stamps[-1] - t))
                        net_rate.append(w.job.generated_tokens / w.seconds)
                        net_ttft.append((w.first_text - w.submitted) * 1000)
                        net_stream.append(w.job.generated_tokens / (w.last_text - w.submitted))
            miner.terminate()
            miner.wait()
        finally:
            proc.terminate()
            proc.wait()
    dr, nr = statistics.median(direct_rate), statistics.median(net_rate)
    ds, ns = statistics.median(direct_stream), statistics.median(net_stream)
    dt, nt = statistics.median(direct_ttft), statistics.median(net_ttft)
    print(f"text streaming benchmark ({machine()}), tiny-llama, {tokens} new tokens, torch threads {threads}, "
          f"median of {runs}")
    print(f"  direct:  {ds:.0f} tokens/s to the last token, {dr:.0f} tokens/s to return; first token {dt:.1f} ms")
    print(f"  network: {ns:.0f} tokens/s to the last TextChunk at the client (from submit); first token "
          f"{nt:.1f} ms (submit -> first TextChunk)")
    print(f"           {nr:.0f} tokens/s end to end (submit -> COMPLETED with its receipt)")
    print(f"  overhead: streaming {100 * (ds - ns) / ds:+.1f}% (goal <= 5%), end to end "
          f"{100 * (dr - nr) / dr:+.1f}%, first token +{nt - dt:.1f} ms (goal <= 5 ms)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=11)
    ap.add_argument("--tokens", type=int, default=200)
    args = ap.parse_args()
    asyncio.run(run(args.runs, args.tokens))


if __name__ == "__main__":
    main()
