"""devnet: the whole network on one machine, data in one folder, started by one command.

Each component is a real process (`aitbc coordinator`, `aitbc miner`, ...) supervised here:
a process that dies is restarted; Ctrl-C stops them all cleanly. First start creates keys, an
API key and config files in the data folder; later starts reuse them (jobs, receipts survive).

No service outlives the supervisor, however it dies: each child asks the kernel for SIGTERM when
its parent goes (Linux PR_SET_PDEATHSIG: SIGKILL of the supervisor, SIGPIPE or a closed terminal
included), and a lost stdout (`aitbc devnet | tee log`, tee gone) only silences its messages. One
supervisor per data folder (DIR/devnet.lock, flock), and the ports are checked before anything
starts, so a second `aitbc devnet` says which devnet or port is in the way instead of looping on
bind errors.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from aitbc import crypto
from aitbc.config import private_dir
from aitbc.errors import AitbcError, FailedPrecondition
from aitbc.ledger.genesis import Genesis, make_genesis, unique_chain_id
from aitbc.miner.text import TEXT_PREFIX, is_text_model
from aitbc.rpc import CHANNEL_OPTIONS, port_in_use
from aitbc.v1 import miner_pb2, miner_pb2_grpc
from aitbc.wallet.access import DaemonFiles, listen_address

CLIENT_ID = "devnet-client"
CHAIN_PREFIX = "aitbc-devnet"  # each devnet's chain id is this plus a random suffix
STABLE_S = 60.0  # a process that ran this long before it died is restarted at once: its backoff is reset
BACKOFF_BASE_S = 1.0  # the wait after a first quick exit; each next quick exit in a row doubles it
BACKOFF_CAP_S = 30.0


PR_SET_PDEATHSIG = 1
try:
    _LIBC = ctypes.CDLL(None, use_errno=True)  # loaded before any fork: the child only calls into it
except OSError:  # not Linux-like: children are stopped by stop() only
    _LIBC = None


def _die_with_parent(parent: int) -> None:
    """preexec_fn of every child: SIGTERM when the supervisor dies, whatever way (Linux)."""
    if _LIBC is not None and sys.platform.startswith("linux"):
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the supervisor died before prctl took effect
            os._exit(1)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _resolve(listen: str) -> str:
    host, _, port = listen.rpartition(":")
    return f"{host}:{free_port(host) if port == '0' else int(port)}"


def _toml(values: dict[str, object]) -> str:
    lines = []
    for k, v in values.items():
        if isinstance(v, list) and v and isinstance(v[0], dict):
            continue
        lines.append(f"{k} = {json.dumps(v)}")
    for k, v in values.items():
        if isinstance(v, list) and v and isinstance(v[0], dict):
            for item in v:
                lines.append(f"\n[[{k}]]")
                lines.extend(f"{ik} = {json.dumps(iv)}" for ik, iv in item.items())
    return "\n".join(lines) + "\n"


def _served_name(model: str) -> str:
    """The name a miner advertises for an entry of its model list (without a "text:" declaration)."""
    return model[len(TEXT_PREFIX):].strip() if model.startswith(TEXT_PREFIX) else model


@dataclass
class RestartBackoff:
    """When the supervisor restarts a process that died (pure: the caller says how long it ran).
    A process that ran STABLE_S or more is restarted at once and its backoff starts over; one that
    died sooner waits BACKOFF_BASE_S, doubling with each quick exit in a row, up to BACKOFF_CAP_S."""

    stable_s: float = STABLE_S
    base_s: float = BACKOFF_BASE_S
    cap_s: float = BACKOFF_CAP_S
    quick_exits: int = 0  # quick exits in a row (reset by a stable run)

    def died(self, ran_s: float) -> tuple[float, str]:
        """The wait before the restart, and why (for the log)."""
        if ran_s >= self.stable_s:
            self.quick_exits = 0
            return 0.0, f"it had run stably ({ran_s:.0f} s >= {self.stable_s:g} s): its backoff is reset"
        self.quick_exits += 1
        wait = min(self.cap_s, self.base_s * 2 ** min(self.quick_exits - 1, 32))
        return wait, (f"it ran only {ran_s:.1f} s, quick exit #{self.quick_exits} in a row (the wait doubles up to "
                      f"{self.cap_s:g} s and resets once it runs {self.stable_s:g} s)")


@dataclass
class Child:
    name: str
    argv: list[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: float = 0.0
    backoff: RestartBackoff = field(default_factory=RestartBackoff)
    restart_at: float | None = None  # when it is restarted, once its exit was seen
    env: dict[str, str] | None = None  # extra environment (its own AITBC_METRICS_LISTEN)
    metrics: str = ""  # "host:port" of its Prometheus endpoint, "" when metrics are off

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.log, "ab")
        env = {**os.environ, **self.env} if self.env else None
        parent = os.getpid()
        self.proc = subprocess.Popen(self.argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, env=env,
                                     preexec_fn=lambda: _die_with_parent(parent))  # noqa: PLW1509
        fh.close()
        self.started_at = time.monotonic()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class Devnet:
    data_dir: Path
    coordinator_listen: str = "127.0.0.1:18000"
    miner_ops_listen: str = "127.0.0.1:18001"
    ledger_listen: str = "127.0.0.1:26657"
    wallet_listen: str = "unix"  # a 0600 socket in DATA_DIR/wallets/.daemon, or loopback host:port
    explorer_listen: str = "127.0.0.1:18080"  # the web explorer (docs/explorer.md)
    block_time_ms: int = 1000
    models: list[str] = field(default_factory=lambda: ["tiny-sd", "tiny-llama"])
    log_to: object = sys.stdout
    children: list[Child] = field(default_factory=list)
    endpoints: dict[str, object] = field(default_factory=dict)

    def say(self, text: str) -> None:
        try:
            print(text, file=self.log_to, flush=True)  # type: ignore[arg-type]
        except (BrokenPipeError, OSError):  # stdout went (`| tee` gone, terminal closed): keep supervising
            self.log_to = open(os.devnull, "w")  # noqa: SIM115

    def lock(self) -> None:
        """Hold DIR/devnet.lock for the supervisor's life; a second supervisor on the folder is told
        which process runs the devnet there."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fh = open(self.data_dir / "devnet.lock", "a+")  # noqa: SIM115 (held open: the lock lives with it)
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "?"
            fh.close()
            raise FailedPrecondition(
                f"a devnet is already running in {self.data_dir} (supervisor pid {holder}): use it, stop it "
                f"(Ctrl-C in its terminal, or kill {holder}), or start another with --data-dir") from None
        fh.truncate(0)
        fh.write(str(os.getpid()))
        fh.flush()
        self._lock = fh

    def check_ports(self, state: dict[str, object]) -> None:
        """Every address the devnet will listen on must be free before any service starts."""
        busy = [f"{state[name]} ({name})" for name in ("coordinator", "miner_ops", "ledger", "wallet", "explorer")
                if not str(state[name]).startswith("unix") and port_in_use(str(state[name]))]
        if busy:
            raise FailedPrecondition(
                f"already in use: {', '.join(busy)}: another devnet or service listens there; stop it, or give "
                "this devnet other addresses (--coordinator-listen, --miner-ops-listen, --ledger-listen, "
                "--wallet-listen, --explorer-listen; 127.0.0.1:0 picks free ones)")

    def prepare(self) -> dict[str, object]:
        """Create keys, the API key and configs on first start; reuse them afterwards."""
        d = self.data_dir
        private_dir(d)  # keys, chain, jobs and wallets of the devnet
        os.chmod(d, 0o700)
        state_file = d / "devnet.json"
        state = json.loads(state_file.read_text()) if state_file.exists() else {}
        if "api_key" not in state:
            state["api_key"] = "aitbc_" + secrets.token_urlsafe(24)
        if "coordinator" not in state or self.coordinator_listen != "127.0.0.1:0":
            state["coordinator"] = _resolve(self.coordinator_listen)
        if "miner_ops" not in state or self.miner_ops_listen != "127.0.0.1:0":
            state["miner_ops"] = _resolve(self.miner_ops_listen)
        if "ledger" not in state or self.ledger_listen != "127.0.0.1:0":
            state["ledger"] = _resolve(self.ledger_listen)
        if "explorer" not in state or self.explorer_listen != "127.0.0.1:0":
            state["explorer"] = _resolve(self.explorer_listen)
        if "wallet" not in state or self.wallet_listen != "127.0.0.1:0":
            state["wallet"] = self.wallet_listen if self.wallet_listen.startswith("unix") else _resolve(self.wallet_listen)
        tmp = state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        os.chmod(tmp, 0o600)
        os.replace(tmp, state_file)
        key_hash = hashlib.sha256(state["api_key"].encode()).hexdigest()
        keys = {name: crypto.load_or_create_key(d / "keys" / f"{name}.key") for name in ("node", "coordinator", "miner")}
        genesis_file = d / "genesis.json"
        if not genesis_file.exists():  # one authority (the devnet node), the coordinator attests receipts
            # a chain id of its own (random suffix): a transaction of one devnet means nothing on another
            make_genesis(unique_chain_id(CHAIN_PREFIX), [keys["node"].address], [keys["coordinator"].address],
                         block_time_ms=self.block_time_ms, genesis_time_ms=int(time.time() * 1000)).save(genesis_file)
        try:
            chain_id = Genesis.load(genesis_file).chain_id
        except AitbcError as exc:
            raise FailedPrecondition(
                f"devnet folder {d}: {exc.message} (for a devnet: remove {genesis_file} and {d / 'ledger'}, or use "
                "another --data-dir)") from None
        state["chain_id"] = chain_id
        state["miner_address"] = keys["miner"].address
        (d / "coordinator.toml").write_text(_toml({
            "listen": state["coordinator"], "data_dir": str(d / "coordinator"), "key_file": str(d / "keys" / "coordinator.key"),
            "chain_id": chain_id, "ledger": state["ledger"],
            "verify_rate": 0.0,  # one miner: a re-execution needs a second one (docs/hub.md)
            "trusted_miners": [keys["miner"].address],  # the operator's own miner (docs/hub.md, "Trust bootstrap")
            # the devnet's client pays paid jobs from the escrow of the miner's address: on a devnet the
            # operator earns as the miner, then spends (docs/economy.md; nothing is pre-minted)
            "clients": [{"id": CLIENT_ID, "api_key_sha256": key_hash, "operator": True, "address": keys["miner"].address}],
            # the devnet's own models have their kind fixed by the operator, not by the first miner
            "models": [{"name": _served_name(m), "kind": "text" if is_text_model(m) else "image"} for m in self.models],
        }))
        (d / "miner.toml").write_text(_toml({
            "coordinator": state["coordinator"], "key_file": str(d / "keys" / "miner.key"), "models": self.models,
            "ops_listen": state["miner_ops"], "price_per_unit": 1,
        }))
        return state

    def start(self, *, ready_timeout: float = 180.0) -> dict[str, object]:
        self.lock()
        state = self.prepare()
        self.check_ports(state)
        d = self.data_dir
        cli = [sys.executable, "-m", "aitbc.clients.cli"]
        self.children = [
            Child("ledger", [*cli, "node", "--data-dir", str(d / "ledger"), "--genesis", str(d / "genesis.json"),
                             "--key", str(d / "keys" / "node.key"), "--listen", str(state["ledger"])],
                  d / "logs" / "ledger.log"),
            Child("coordinator", [*cli, "coordinator", "--config", str(d / "coordinator.toml")], d / "logs" / "coordinator.log"),
            Child("miner", [*cli, "miner", "--config", str(d / "miner.toml")], d / "logs" / "miner.log"),
            Child("wallet", [*cli, "wallet-daemon", "--listen", str(state["wallet"]), "--keystore-dir",
                             str(d / "wallets"), "--ledger", str(state["ledger"])], d / "logs" / "wallet.log"),
            Child("explorer", [*cli, "explorer", "--ledger", str(state["ledger"]), "--coordinator",
                               str(state["coordinator"]), "--listen", str(state["explorer"]), "--data-dir",
                               str(d / "explorer")], d / "logs" / "explorer.log"),
        ]
        metrics_on = os.environ.get("AITBC_METRICS_LISTEN", "").strip().lower() not in ("off", "none")
        for child in self.children:
            if metrics_on and child.name != "explorer":  # one endpoint per process: an inherited
                child.metrics = f"127.0.0.1:{free_port()}"  # AITBC_METRICS_LISTEN would clash
                child.env = {**(child.env or {}), "AITBC_METRICS_LISTEN": child.metrics}
            child.start()
        self._wait_ready(str(state["miner_ops"]), ready_timeout)
        self.endpoints = {
            "coordinator": state["coordinator"],
            "miner_ops": state["miner_ops"],
            "ledger": state["ledger"],
            "wallet": self._wallet_endpoint(str(state["wallet"])),
            "explorer": f"http://{state['explorer']}/",
            "wallet_token_file": str(DaemonFiles.of(d / "wallets").token),
            "miner_address": state["miner_address"],
            "miner_key_file": str(d / "keys" / "miner.key"),
            "api_key": state["api_key"],
            "client_id": CLIENT_ID,
            "chain_id": state["chain_id"],
            "genesis_hash": Genesis.load(d / "genesis.json").hash().hex(),  # what client commands expect
            "metrics": {c.name: f"http://{c.metrics}/metrics" for c in self.children if c.metrics},
            "data_dir": str(d),
            "pid": os.getpid(),
        }
        ep = d / "endpoints.json"
        ep.write_text(json.dumps(self.endpoints, indent=2))
        os.chmod(ep, 0o600)
        return self.endpoints

    def _wallet_endpoint(self, listen: str) -> str:
        """What clients dial for the wallet daemon (its token: `wallet_token_file`)."""
        return listen_address(listen, DaemonFiles.of(self.data_dir / "wallets"))

    def _wait_ready(self, miner_ops: str, timeout: float) -> None:
        """Ready when the miner reports a live Work stream to the coordinator."""
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(miner_ops, options=CHANNEL_OPTIONS) as ch:
            stub = miner_pb2_grpc.MinerOpsServiceStub(ch)
            while time.monotonic() < deadline:
                for child in self.children:
                    if not child.alive():
                        self.stop()
                        raise RuntimeError(f"devnet: {child.name} exited during start-up:\n{child.tail()}")
                try:
                    if stub.GetInfo(miner_pb2.GetInfoRequest(), timeout=1).connected:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"devnet: not ready within {timeout:.0f} s; see logs in {self.data_dir / 'logs'}")

    def supervise_once(self, now: float | None = None) -> None:
        """Restart any child that died, after the wait its RestartBackoff gives (said in the log)."""
        for child in self.children:
            if child.alive():
                continue
            now = time.monotonic() if now is None else now
            if child.restart_at is None:
                code = child.proc.returncode if child.proc else None
                ran = max(0.0, now - child.started_at)
                wait, why = child.backoff.died(ran)
                child.restart_at = now + wait
                self.say(f"devnet: {child.name} exited ({code}) after {ran:.1f} s; restarting in {wait:.1f} s: {why}")
            if now >= child.restart_at:
                child.restart_at = None
                child.restarts += 1
                self.say(f"devnet: {child.name}: restarting (restart #{child.restarts})")
                child.start()

    def run_forever(self) -> None:
        stop = False

        def on_signal(signum: int, frame: object) -> None:
            nonlocal stop
            stop = True

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not stop:
                self.supervise_once()
                time.sleep(0.5)
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def stop(self, timeout: float = 10.0) -> None:
        for child in reversed(self.children):
            if child.alive():
                child.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout
        for child in reversed(self.children):
            if child.proc is None:
                continue
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()
        ep = self.data_dir / "endpoints.json"
        if ep.exists():
            ep.unlink()
        if getattr(self, "_lock", None) is not None:
            self._lock.close()
            self._lock = None
