"""Real `aitbc node` processes for multi-node and crash tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from aitbc import crypto
from aitbc.ledger.genesis import Genesis


class NodeProc:
    def __init__(self, name: str, root: Path, genesis_path: Path, key: crypto.PrivateKey | None,
                 peers: list[str]) -> None:
        self.name = name
        self.dir = root / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.genesis_path = genesis_path
        self.key_path = None
        if key is not None:
            self.key_path = self.dir / "key"
            self.key_path.write_text(key.secret.hex())
        self.peers = peers
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.log = self.dir / "node.log"

    def start(self, timeout: float = 20.0) -> NodeProc:
        port_file = self.dir / "port"
        port_file.unlink(missing_ok=True)
        # keep the same port across restarts so peers find it again
        listen = f"127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "aitbc.clients.chain_cli", "node", "--data-dir", str(self.dir / "data"),
               "--genesis", str(self.genesis_path), "--listen", listen, "--port-file", str(port_file)]
        if self.key_path:
            cmd += ["--key", str(self.key_path)]
        if self.peers:
            cmd += ["--peers", ",".join(self.peers)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[2])
        deadline = time.monotonic() + timeout
        while not port_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)
        self.port = int(port_file.read_text())
        return self

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill9(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def pause(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def write_genesis(root: Path, g: Genesis) -> Path:
    path = root / "genesis.json"
    g.save(path)
    return path
