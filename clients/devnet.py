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
import pwd
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
from aitbc.pgserver import LocalPostgres, server_user
from aitbc.rpc import CHANNEL_OPTIONS, port_in_use
from aitbc.v1 import coordinator_pb2, coordinator_pb2_grpc, job_pb2, miner_pb2, miner_pb2_grpc
from aitbc.wallet.access import DaemonFiles, listen_address

CLIENT_ID = "devnet-client"
MAX_COORDINATORS = 8
PG_USER = "aitbc"  # the devnet server's superuser (its password on 127.0.0.1) and the coordinators' login
PG_DATABASE = "aitbc"
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


def _coordinator_name(i: int) -> str:
    return "coordinator" if i == 0 else f"coordinator-{i + 1}"


def _coordinator_file(i: int) -> str:
    return f"{_coordinator_name(i)}.toml"


def _one_line(message: object) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(message, as_one_line=True)  # type: ignore[arg-type]


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



def _write_private(path: Path, text: str) -> None:
    """A config file of the devnet, its owner's only (0600, also when it was there before)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)

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
    user: pwd.struct_passwd | None = None  # run as this user (PostgreSQL under root)
    stop_signal: int = signal.SIGTERM
    stops_last: bool = False  # stopped once every other service has exited (the database)

    def start(self) -> None:
        self.log.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fh = os.fdopen(os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab")  # its owner's only
        env = {**os.environ, **self.env} if self.env else None
        parent = os.getpid()
        as_user: dict[str, object] = {}
        if self.user is not None:
            as_user = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": [], "cwd": "/"}
        # the user is switched before preexec_fn runs, so the death signal it asks for is kept
        self.proc = subprocess.Popen(self.argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, env=env,
                                     preexec_fn=lambda: _die_with_parent(parent), **as_user)  # type: ignore[call-overload]  # noqa: PLW1509
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
    postgres: bool = False  # the coordinators' store: a PostgreSQL server in DIR/postgres (else LMDB)
    coordinators: int = 1  # more than one needs postgres: they share jobs through the one database
    log_to: object = sys.stdout
    children: list[Child] = field(default_factory=list)
    endpoints: dict[str, object] = field(default_factory=dict)
    _pg: LocalPostgres | None = field(default=None, repr=False)  # the --postgres cluster, once initialized

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
        named = [(str(state[name]), name) for name in ("miner_ops", "ledger", "wallet", "explorer")]
        named += [(a, _coordinator_name(i)) for i, a in enumerate(state["coordinators"])]  # type: ignore[arg-type]
        busy = [f"{addr} ({name})" for addr, name in sorted(named, key=lambda x: x[1] != "coordinator")
                if not addr.startswith("unix") and port_in_use(addr)]
        if busy:
            raise FailedPrecondition(
                f"already in use: {', '.join(busy)}: another devnet or service listens there; stop it, or give "
                "this devnet other addresses (--coordinator-listen, --miner-ops-listen, --ledger-listen, "
                "--wallet-listen, --explorer-listen; 127.0.0.1:0 picks free ones)")

    def prepare(self) -> dict[str, object]:
        """Create keys, the API key and configs on first start; reuse them afterwards."""
        d = self.data_dir
        if not 1 <= self.coordinators <= MAX_COORDINATORS:
            raise FailedPrecondition(f"--coordinators {self.coordinators}: give 1 to {MAX_COORDINATORS}")
        if self.coordinators > 1 and not self.postgres:
            raise FailedPrecondition(
                f"--coordinators {self.coordinators} needs --postgres: several coordinators share their jobs, "
                "receipts and settlement through one PostgreSQL database (docs/scaling.md); each on its own LMDB "
                "would be separate pools attesting with one key")
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
        extra = [a for a in state.get("more_coordinators", []) if a != state["coordinator"]]  # type: ignore[union-attr]
        while len(extra) < self.coordinators - 1:  # the second and later: free ports, kept from start to start
            extra.append(_resolve("127.0.0.1:0"))
        state["more_coordinators"] = extra
        coordinators = [state["coordinator"], *extra[:self.coordinators - 1]]
        state["postgres"] = f"127.0.0.1:{free_port()}" if self.postgres else ""  # picked anew at each start
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
        database = ""
        if self.postgres:  # the password of the cluster (made on first start): any local user reaches the port
            database = f"postgresql://{PG_USER}:{self._cluster(chain_id).password}@{state['postgres']}/{PG_DATABASE}"
        for i, listen in enumerate(coordinators):  # 0600: a coordinator's names the database's password
            _write_private(d / _coordinator_file(i), self._coordinator_toml(
                i, listen, database, chain_id, state, key_hash, keys["miner"].address))
        _write_private(d / "miner.toml", _toml({
            "coordinator": coordinators if len(coordinators) > 1 else coordinators[0],
            "key_file": str(d / "keys" / "miner.key"), "models": self.models,
            "ops_listen": state["miner_ops"], "price_per_unit": 1,
        }))
        state["coordinators"] = coordinators
        state["database_url"] = database
        return state

    def _coordinator_toml(self, i: int, listen: str, database: str, chain_id: str, state: dict[str, object],
                          key_hash: str, miner: str) -> str:
        """Coordinator number i (0: the first); every one attests with the same key (docs/scaling.md)."""
        d = self.data_dir
        return _toml({
            "listen": listen, "data_dir": str(d / ("coordinator" if i == 0 else f"coordinator-{i + 1}")),
            "key_file": str(d / "keys" / "coordinator.key"), "database_url": database,
            "chain_id": chain_id, "ledger": state["ledger"],
            "verify_rate": 0.0,  # one miner: a re-execution needs a second one (docs/hub.md)
            "trusted_miners": [miner],  # the operator's own miner (docs/hub.md, "Trust bootstrap")
            # the devnet's client pays paid jobs from the escrow of the miner's address: on a devnet the
            # operator earns as the miner, then spends (docs/economy.md; nothing is pre-minted)
            "clients": [{"id": CLIENT_ID, "api_key_sha256": key_hash, "operator": True, "address": miner}],
            # the devnet's own models have their kind fixed by the operator, not by the first miner
            "models": [{"name": _served_name(m), "kind": "text" if is_text_model(m) else "image"} for m in self.models],
        })

    def start(self, *, ready_timeout: float = 180.0) -> dict[str, object]:
        self.lock()
        state = self.prepare()
        self.check_ports(state)
        d = self.data_dir
        cli = [sys.executable, "-m", "aitbc.clients.cli"]
        coordinators = list(state["coordinators"])  # type: ignore[call-overload]
        self.children = []
        if self.postgres:
            self._start_postgres(str(state["postgres"]), str(state["chain_id"]))
        self.children += [
            Child("ledger", [*cli, "node", "--data-dir", str(d / "ledger"), "--genesis", str(d / "genesis.json"),
                             "--key", str(d / "keys" / "node.key"), "--listen", str(state["ledger"])],
                  d / "logs" / "ledger.log"),
            *(Child(_coordinator_name(i), [*cli, "coordinator", "--config", str(d / _coordinator_file(i))],
                    d / "logs" / f"{_coordinator_name(i)}.log") for i in range(len(coordinators))),
            Child("miner", [*cli, "miner", "--config", str(d / "miner.toml")], d / "logs" / "miner.log"),
            Child("wallet", [*cli, "wallet-daemon", "--listen", str(state["wallet"]), "--keystore-dir",
                             str(d / "wallets"), "--ledger", str(state["ledger"])], d / "logs" / "wallet.log"),
            Child("explorer", [*cli, "explorer", "--ledger", str(state["ledger"]), "--coordinator",
                               str(state["coordinator"]), "--listen", str(state["explorer"]), "--data-dir",
                               str(d / "explorer")], d / "logs" / "explorer.log"),
        ]
        metrics_on = os.environ.get("AITBC_METRICS_LISTEN", "").strip().lower() not in ("off", "none")
        for child in self.children:
            if child.alive():  # PostgreSQL, started first
                continue
            if metrics_on and child.name != "explorer":  # one endpoint per process: an inherited
                child.metrics = f"127.0.0.1:{free_port()}"  # AITBC_METRICS_LISTEN would clash
                child.env = {**(child.env or {}), "AITBC_METRICS_LISTEN": child.metrics}
            child.start()
        self._wait_ready(str(state["miner_ops"]), coordinators, str(state["api_key"]), ready_timeout)
        self.endpoints = {
            "coordinator": state["coordinator"],
            **({"coordinators": coordinators} if len(coordinators) > 1 else {}),
            **({"database_url": state["database_url"]} if self.postgres else {}),
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

    def _start_postgres(self, listen: str, chain_id: str) -> None:
        """The coordinators' database: a PostgreSQL server of the system's package in DIR/postgres
        (created on first start), supervised like every other service, on 127.0.0.1 only: any local
        user can reach the port, so a login there needs the cluster's password (aitbc.pgserver)."""
        pg = self._cluster(chain_id)
        child = Child("postgres", pg.server_argv(int(listen.rpartition(":")[2])), self.data_dir / "logs" / "postgres.log",
                      user=pg.run_as, stop_signal=signal.SIGINT, stops_last=True)
        self.children.append(child)
        child.start()
        try:
            pg.wait_ready(60, child.alive)
            pg.create_database(PG_DATABASE, exist_ok=True)
        except Exception as exc:
            self.stop()
            raise RuntimeError(f"devnet: PostgreSQL did not start: {exc}\n{child.tail()}") from None

    def _cluster(self, chain_id: str) -> LocalPostgres:
        """The devnet's PostgreSQL cluster, created (initdb, its password) on first use."""
        if self._pg is None:
            try:
                self._pg = LocalPostgres(folder=self._postgres_folder(chain_id), superuser=PG_USER, durable=True).init()
            except (FileNotFoundError, RuntimeError) as exc:
                raise FailedPrecondition(f"--postgres: {exc}") from None
        return self._pg

    def _postgres_folder(self, chain_id: str) -> Path:
        """DIR/postgres. Under root the server runs as another user (PostgreSQL refuses root), which
        cannot reach into DIR (0700, often under /root): then the cluster lives in
        /var/tmp/aitbc-devnet-pg/<hash of DIR and chain id>, owned by that user, and DIR/postgres
        links to it (a new devnet in the same folder, with its new chain, gets a new cluster)."""
        link = self.data_dir / "postgres"
        user = server_user()
        if user is None or (link.is_dir() and not link.is_symlink()):
            return link
        base = Path("/var/tmp/aitbc-devnet-pg")
        base.mkdir(mode=0o711, exist_ok=True)
        real = base / hashlib.sha256(f"{self.data_dir.resolve()}\0{chain_id}".encode()).hexdigest()[:16]
        if link.is_symlink() and link.readlink() != real:
            link.unlink()
        if not link.is_symlink():
            link.symlink_to(real)
        self.say(f"devnet: PostgreSQL runs as {user.pw_name} (it refuses root): its cluster is in {real} ({link} links there)")
        return real

    def _wallet_endpoint(self, listen: str) -> str:
        """What clients dial for the wallet daemon (its token: `wallet_token_file`)."""
        return listen_address(listen, DaemonFiles.of(self.data_dir / "wallets"))

    def _wait_ready(self, miner_ops: str, coordinators: list[str], api_key: str, timeout: float) -> None:
        """Ready when the miner reports a live Work stream to a coordinator and every coordinator
        accepts every model of the devnet as that one does: the others learn the miner's models and
        their native sizes from the database within a second (docs/scaling.md), and a job sent there
        before would be refused, or sized otherwise."""
        deadline = time.monotonic() + timeout
        waiting = "the miner is not connected to a coordinator yet"
        with grpc.insecure_channel(miner_ops, options=CHANNEL_OPTIONS) as ch:
            stub = miner_pb2_grpc.MinerOpsServiceStub(ch)
            while time.monotonic() < deadline:
                for child in self.children:
                    if not child.alive():
                        self.stop()
                        raise RuntimeError(f"devnet: {child.name} exited during start-up:\n{child.tail()}")
                try:
                    info = stub.GetInfo(miner_pb2.GetInfoRequest(), timeout=1)
                    if info.connected:
                        waiting = self._models_everywhere(info.coordinator, coordinators, api_key)
                        if not waiting:
                            return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"devnet: not ready within {timeout:.0f} s ({waiting}); see logs in {self.data_dir / 'logs'}")

    def _models_everywhere(self, serving: str, coordinators: list[str], api_key: str) -> str:
        """"" when every coordinator quotes every devnet model with the parameters the coordinator
        the miner serves (`serving`) quotes it with; else what is still missing."""
        md = (("x-api-key", api_key),)
        for model in self.models:
            name = _served_name(model)
            params = (job_pb2.JobParams(text=job_pb2.TextParams(prompt="ready?", max_new_tokens=1, seed=1))
                      if is_text_model(model) else job_pb2.JobParams(image=job_pb2.ImageParams(prompt="ready?", steps=1, seed=1)))
            want = None
            for address in sorted(coordinators, key=lambda a: a != serving):  # the miner's coordinator first
                with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as ch:
                    try:
                        got = coordinator_pb2_grpc.CoordinatorServiceStub(ch).QuoteJob(
                            coordinator_pb2.QuoteJobRequest(model=name, params=params), metadata=md, timeout=5).params
                    except grpc.RpcError as exc:
                        return f"coordinator {address} does not accept model {name} yet: {exc.details()}"
                if want is None:
                    want = got
                elif got != want:
                    return f"coordinator {address} does not quote model {name} as {serving} does yet ({_one_line(got)} against {_one_line(want)})"
        return ""

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
        """Every service, then the database once they have gone (their last writes land)."""
        deadline = time.monotonic() + timeout
        for phase in ([c for c in self.children if not c.stops_last], [c for c in self.children if c.stops_last]):
            for child in reversed(phase):
                if child.alive():
                    child.proc.send_signal(child.stop_signal)  # type: ignore[union-attr]
            for child in reversed(phase):
                if child.proc is None:
                    continue
                try:
                    child.proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    child.proc.kill()
                    child.proc.wait()
            deadline = max(deadline, time.monotonic() + 5)  # the database's own fast shutdown
        ep = self.data_dir / "endpoints.json"
        if ep.exists():
            ep.unlink()
        if getattr(self, "_lock", None) is not None:
            self._lock.close()
            self._lock = None
