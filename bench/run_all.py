#!/usr/bin/env python3
"""Run every benchmark once with moderate sizes (`make bench`); each prints its own figures.
Run a script by hand for the full sizes (e.g. `python bench/load.py` soaks for 10 minutes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = [
    ["dispatch.py", "--jobs", "1000"],
    ["pg_store.py", "--jobs", "1000"],
    ["overhead.py"],
    ["text_stream.py"],
    ["receipts.py", "--n", "10000"],
    ["receipt_proof.py"],
    ["settlement.py", "--jobs", "40"],
    ["hub_matching.py"],
    ["hub_scaling.py", "--jobs", "60"],
    ["image_backend.py"],
    ["text_backend.py"],
    ["miner_throughput.py"],
    ["ledger_throughput.py"],
    ["ledger_catchup.py"],
    ["telemetry_overhead.py"],
    ["load.py", "--duration", "60"],
    ["upload_memory.py", "--miners", "64", "--mib", "16"],
    ["webhooks.py", "--jobs", "100"],
    ["registrations.py"],
]


def main() -> int:
    failed = []
    for argv in RUNS:
        print(f"\n== bench/{' '.join(argv)}", flush=True)
        if subprocess.run([sys.executable, str(HERE / argv[0]), *argv[1:]], cwd=HERE.parent).returncode:
            failed.append(argv[0])
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
