"""A short run of the load soak (bench/load.py): at 70% of the saturation measured in the same
run, nothing the network accepted is lost, every job finishes, memory stays bounded. The full
10-minute soak is `python bench/load.py`; its figures are in README.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_short_soak_loses_nothing_and_memory_stays_bounded(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    seconds = os.environ.get("AITBC_SOAK_SECONDS", "20")
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "load.py"), "--duration", seconds, "--json", str(out)],
                       capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    print(r.stdout)
    figures = json.loads(out.read_text())
    assert figures["accepted"] > 100
    assert figures["lost"] == 0 and figures["refused"] == 0, figures.get("refusals")
    assert figures["states"] == {"COMPLETED": figures["accepted"]}
    mem = figures["memory_mb"]
    for proc in ("coordinator", "miner"):  # private memory (a leak), not LMDB file pages
        assert mem[-1][proc] - mem[0][proc] < 50, f"{proc} grew from {mem[0][proc]:.0f} to {mem[-1][proc]:.0f} MiB"
