#!/usr/bin/env python3
"""Text streaming through the network vs direct generation with the same tiny model.

Network path: SubmitJob -> coordinator process -> Work stream -> miner process (tiny-llama) ->
TextChunk up -> coordinator -> WatchJob -> this client. Direct path: the same backend's
generate() in this process, with the same torch thread setting the miner uses. Same prompt, seed
and parameters; time to first token measured from submit (network) or from the call (direct).

    python bench/text_stream.py [--runs 5] [--tokens 200]
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
    backend = load_text_backend("tiny-llama", "cpu")
    threads = configure_cpu_threads("cpu", 0)
    direct_rate, direct_ttft = [], []
    for i in range(runs + 1):
        req = TextRequest(PROMPT, tokens, 0.9, 1.0, 0, 100 + i, ())
        stamps: list[float] = []
        t = time.perf_counter()
        out = backend.generate(req, lambda d, s=stamps: s.append(time.perf_counter()), threading.Event())
        wall = time.perf_counter() - t
        if i:
            direct_rate.append(out.generated_tokens / wall)
            direct_ttft.append((stamps[0] - t) * 1000)
    net_rate, net_ttft = [], []
    with tempfile.TemporaryDirectory() as tmp:
        proc, addr = start_coordinator(Path(tmp))
        try:
            miner = start_miner(Path(tmp), addr, ["tiny-llama"])  # its own process, as in production
            async with channel(addr) as ch:
                stub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
                while not (await stub.ListModels(coordinator_pb2.ListModelsRequest(), metadata=MD)).models:
                    await asyncio.sleep(0.1)
                for i in range(runs + 1):
                    params = job_pb2.TextParams(prompt=PROMPT, max_new_tokens=tokens, temperature=0.9, top_p=1.0,
                                                seed=100 + i)
                    w = await submit_and_watch(stub, "tiny-llama", job_pb2.JobParams(text=params))
                    if i:
                        net_rate.append(w.job.generated_tokens / w.seconds)
                        net_ttft.append((w.first_text - w.submitted) * 1000)
            miner.terminate()
            miner.wait()
        finally:
            proc.terminate()
            proc.wait()
    dr, nr = statistics.median(direct_rate), statistics.median(net_rate)
    dt, nt = statistics.median(direct_ttft), statistics.median(net_ttft)
    print(f"text streaming benchmark ({machine()}), tiny-llama, {tokens} new tokens, torch threads {threads}, "
          f"median of {runs}")
    print(f"  direct:  {dr:.0f} tokens/s, first token {dt:.1f} ms")
    print(f"  network: {nr:.0f} tokens/s, first token {nt:.1f} ms (submit -> first TextChunk at the client)")
    print(f"  overhead: tokens/s {100 * (dr - nr) / dr:+.1f}% (goal <= 5%), first token +{nt - dt:.1f} ms (goal <= 5 ms)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=200)
    args = ap.parse_args()
    asyncio.run(run(args.runs, args.tokens))


if __name__ == "__main__":
    main()
