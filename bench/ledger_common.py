"""Shared helpers for the ledger benchmarks: node processes, funded senders, timing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from aitbc import crypto
from aitbc.ledger.genesis import Genesis
from aitbc.receipts import ReceiptBody, sign_receipt

ROOT = Path(__file__).resolve().parents[1]
ATTESTER = crypto.PrivateKey(crypto.sha256(b"bench-attester"))
PROVIDER_SEED = b"bench-sender-%d"


def key(seed: bytes) -> crypto.PrivateKey:
    return crypto.PrivateKey(crypto.sha256(seed))


def funding_receipt(provider: crypto.PrivateKey, chain_id: str, i: int, units: int = 10**9):
    body = ReceiptBody(job_id=f"bench-{i}", provider=provider.address, client="bench", units=units,
                       unit_type="gpu_ms", version=1, price_per_unit=1, model="bench", prompt_hash="ab" * 32,
                       started_at=0, finished_at=1, artifact_sha256="cd" * 32, nonce=f"{i:032x}", hub_id="",
                       chain_id=chain_id)
    return sign_receipt(body, provider).attest(ATTESTER)


class NodeProc:
    def __init__(self, root: Path, name: str, genesis: Genesis, authority: crypto.PrivateKey | None,
                 peers: list[str] = (), data_dir: Path | None = None) -> None:
        self.dir = root / name
        self.dir.mkdir(parents=True, exist_ok=True)
        gpath = self.dir / "genesis.json"
        genesis.save(gpath)
        self.cmd = [sys.executable, "-m", "aitbc.clients.chain_cli", "node", "--genesis", str(gpath),
                    "--data-dir", str(data_dir or self.dir / "data"), "--listen", "127.0.0.1:0",
                    "--port-file", str(self.dir / "port")]
        if authority is not None:
            (self.dir / "key").write_text(authority.secret.hex())
            self.cmd += ["--key", str(self.dir / "key")]
        if peers:
            self.cmd += ["--peers", ",".join(peers)]
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self) -> NodeProc:
        (self.dir / "port").unlink(missing_ok=True)
        log = open(self.dir / "node.log", "ab")
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + 30
        while not (self.dir / "port").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((self.dir / "node.log").read_text()[-3000:])
            time.sleep(0.02)
        self.port = int((self.dir / "port").read_text())
        return self

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def machine() -> str:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {model}"


def percentile(values: list[float], p: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]
