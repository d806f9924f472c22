"""A whole network of real processes for fault tests: ledger authorities and followers, a
coordinator, miners. Every process keeps its port across restarts; kill -9, SIGSTOP/SIGCONT and
restart act on the real OS process. Loopback only."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aitbc import crypto
from aitbc.ledger.genesis import make_genesis

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "chaos-client-key"
CHAIN = "aitbc-chaos"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(target: str, service: str = "", timeout: float = 1.0) -> bool:
    try:
        with grpc.insecure_channel(target) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
            return resp.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


@dataclass
class Proc:
    name: str
    kind: str  # "authority", "follower", "coordinator", "miner"
    argv: list[str]
    target: str  # where its health service answers
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    paused: bool = False
    restarts: int = 0
    recovery_s: list[float] = field(default_factory=list)

    def start(self) -> None:
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(self.argv, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT,
                                         start_new_session=True)
        self.paused = False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        if self.alive():
            self.proc.kill()  # type: ignore[union-attr]
            self.proc.wait(10)  # type: ignore[union-attr]
        self.paused = False

    def pause(self) -> None:
        if self.alive() and not self.paused:
            os.kill(self.proc.pid, signal.SIGSTOP)  # type: ignore[union-attr]
            self.paused = True

    def resume(self) -> None:
        if self.alive() and self.paused:
            os.kill(self.proc.pid, signal.SIGCONT)  # type: ignore[union-attr]
        self.paused = False

    def wait_healthy(self, timeout: float) -> float:
        """Seconds until the process answers its health check (raises after `timeout`)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if not self.alive():
                raise AssertionError(f"{self.name} exited: {self.tail()}")
            if healthy(self.target):
                return time.monotonic() - t0
            time.sleep(0.1)
        raise AssertionError(f"{self.name} not healthy within {timeout:.0f} s: {self.tail()}")

    def restart(self, timeout: float = 20.0) -> float:
        self.kill9()
        self.start()
        self.restarts += 1
        took = self.wait_healthy(timeout)
        self.recovery_s.append(took)
        return took

    def stop(self) -> None:
        if self.alive():
            self.resume()
            self.proc.terminate()  # type: ignore[union-attr]
            try:
                self.proc.wait(15)  # type: ignore[union-attr]
            except subprocess.TimeoutExpired:
                self.proc.kill()  # type: ignore[union-attr]
                self.proc.wait(10)  # type: ignore[union-attr]

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class Cluster:
    """authorities + followers + one coordinator (settling through the first follower) + miners."""

    def __init__(self, root: Path, *, authorities: int = 4, followers: int = 1, miners: int = 3,
                 block_time_ms: int = 500, miner_models: tuple[str, ...] = ("null", "null-text")) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        cli = [sys.executable, "-m", "aitbc.clients.cli"]
        self.auth_keys = [crypto.PrivateKey.generate() for _ in range(authorities)]
        self.coord_key = crypto.load_or_create_key(root / "coordinator.key")
        genesis = make_genesis(CHAIN, [k.address for k in self.auth_keys], [self.coord_key.address],
                               block_time_ms=block_time_ms, genesis_time_ms=int(time.time() * 1000))
        genesis.save(root / "genesis.json")
        self.chain_ref = genesis.ref  # what a transaction to this cluster signs
        node_ports = [free_port() for _ in range(authorities + followers)]
        node_targets = [f"127.0.0.1:{p}" for p in node_ports]
        self.nodes: list[Proc] = []
        for i in range(len(node_ports)):
            name = f"authority{i}" if i < authorities else f"follower{i - authorities}"
            d = root / name
            d.mkdir(exist_ok=True)
            argv = [*cli, "node", "--data-dir", str(d / "data"), "--genesis", str(root / "genesis.json"),
                    "--listen", node_targets[i], "--peers", ",".join(t for j, t in enumerate(node_targets) if j != i)]
            if i < authorities:
                (d / "key").write_text(self.auth_keys[i].secret.hex())
                argv += ["--key", str(d / "key")]
            self.nodes.append(Proc(name, "authority" if i < authorities else "follower", argv, node_targets[i],
                                   d / "node.log"))
        self.ledger_target = self.nodes[-1].target if followers else self.nodes[0].target
        cport = free_port()
        self.coordinator_target = f"127.0.0.1:{cport}"
        # the cluster's miners are its operator's own: established from the start (docs/hub.md, "Trust
        # bootstrap"; tests/security/test_trust_bootstrap.py covers miners that are not)
        self.miner_keys: list[crypto.PrivateKey] = []
        for i in range(miners):
            (root / f"miner{i}").mkdir(exist_ok=True)
            self.miner_keys.append(crypto.load_or_create_key(root / f"miner{i}" / "miner.key"))
        (root / "coordinator.toml").write_text("\n".join([
            f'listen = "{self.coordinator_target}"', f'data_dir = "{root / "coordinator"}"',
            f'key_file = "{root / "coordinator.key"}"', f'chain_id = "{CHAIN}"', f'ledger = "{self.ledger_target}"',
            "heartbeat_interval_s = 1.0", "heartbeat_timeout_s = 4.0", "max_attempts = 5",
            "verify_rate = 0.2", "verify_timeout_s = 20.0",  # the hub re-executes a fifth of the jobs
            "trusted_miners = [" + ", ".join(json.dumps(k.address) for k in self.miner_keys) + "]",
            f'event_log = "{root / "coordinator-events.jsonl"}"',  # replayed against the core afterwards
            "", "[[clients]]", 'id = "chaos"', f'api_key_sha256 = "{hashlib.sha256(API_KEY.encode()).hexdigest()}"',
            "rate_per_s = 10000.0", "burst = 10000",
            # paid jobs come out of miner0's escrow: it earns by serving, then pays as the client
            f'address = "{self.miner_keys[0].address}"', "",
        ]))
        self.event_log = root / "coordinator-events.jsonl"
        self.coordinator = Proc("coordinator", "coordinator",
                                [*cli, "coordinator", "--config", str(root / "coordinator.toml")],
                                self.coordinator_target, root / "coordinator.log")
        self.miners: list[Proc] = []
        for i in range(miners):
            d = root / f"miner{i}"
            ops = f"127.0.0.1:{free_port()}"
            (d / "miner.toml").write_text("\n".join([
                f'coordinator = "{self.coordinator_target}"', f'key_file = "{d / "miner.key"}"',
                "models = [" + ", ".join(json.dumps(m) for m in miner_models) + "]", f'ops_listen = "{ops}"',
                f"price_per_unit = {i + 1}", "max_concurrency = 2", "reconnect_max_s = 1.0", "",
            ]))
            self.miners.append(Proc(f"miner{i}", "miner", [*cli, "miner", "--config", str(d / "miner.toml")], ops,
                                    d / "miner.log"))

    @property
    def procs(self) -> list[Proc]:
        return [*self.nodes, self.coordinator, *self.miners]

    def start(self) -> None:
        for p in self.procs:
            p.start()
        for p in self.procs:
            p.wait_healthy(60)

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()
