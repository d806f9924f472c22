"""Process configuration: TOML files with AITBC_* environment overrides, validated up front.

Each process reads one table-free TOML file; an environment variable AITBC_<PROCESS>_<KEY>
overrides a key (lists are comma-separated). Unknown keys are errors, so typos surface at start.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from aitbc import crypto, jobs
from aitbc.errors import AitbcError, CryptoError, InvalidArgument

T = TypeVar("T")


# The highest price ceiling a model may have: the largest job a client can submit (under 400,000
# units: at most 2,568 64x64 tiles x 150 steps, or about 132,000 text tokens) still costs an integer
# that quotes and receipts carry exactly (2^53-1); a higher one overflowed a quote's max_cost.
MAX_PRICE_PER_UNIT = 10**10


@dataclass
class ClientKey:
    """An API client: its id and the sha256 (hex) of its API key; the key itself is never stored."""

    id: str
    api_key_sha256: str
    rate_per_s: float = 50.0
    burst: int = 100
    max_streams: int = 64  # server streams (WatchJob, GetJobResult) and waiting GenerateImage calls at once
    max_active_jobs: int = 1000  # its jobs not yet ended (queued, assigned, running) at once
    operator: bool = False  # may call operator RPCs (ReleaseMiner)
    # webhooks (docs/coordinator.md, "Webhooks"): a signed POST on each of the client's jobs' end,
    # to webhook_url, or to the job's own webhook_url when it starts with one of webhook_url_prefixes
    # (set by the operator: a client cannot make the coordinator call anything else)
    webhook_url: str = ""
    webhook_url_prefixes: list[str] = field(default_factory=list)
    webhook_secret: str = ""  # the HMAC-SHA256 key both sides hold (16 characters at least)
    # the client's chain address (ait1...): its escrow for this coordinator pays its paid jobs
    # (docs/economy.md); "": the client submits free jobs only
    address: str = ""

    def __post_init__(self) -> None:
        if self.address:
            try:
                crypto.validate_address(self.address)
            except CryptoError as exc:
                raise InvalidArgument(f"client {self.id!r}: address: {exc.message}") from None
        if not isinstance(self.operator, bool):
            raise InvalidArgument(f"client {self.id!r}: operator must be true or false (got {self.operator!r})")
        for url in (self.webhook_url, *self.webhook_url_prefixes):
            if url and not (url.startswith("https://") or url.startswith("http://")) or len(url) > 2048:
                raise InvalidArgument(f"client {self.id!r}: webhook URL {url[:80]!r} must be http:// or https:// "
                                      "(2,048 characters at most)")
        for url in self.webhook_url_prefixes:
            if url_origin(url) is None:
                raise InvalidArgument(f"client {self.id!r}: webhook URL prefix {url[:80]!r} must name a host (and a "
                                      "port, if not the scheme's), without user info: a job's URL must go there")
        if (self.webhook_url or self.webhook_url_prefixes) and len(self.webhook_secret) < 16:
            raise InvalidArgument(f"client {self.id!r}: webhooks need a webhook_secret of 16 characters at least "
                                  "(the receiver checks each POST's HMAC with it)")
        _within(f"clients.{self.id}.rate_per_s", self.rate_per_s, 1e-9, float("inf"))
        _within(f"clients.{self.id}.burst", self.burst, 1, float("inf"))
        _within(f"clients.{self.id}.max_streams", self.max_streams, 1, float("inf"))
        _within(f"clients.{self.id}.max_active_jobs", self.max_active_jobs, 1, float("inf"))


def url_origin(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) an HTTP request to `url` goes to; None for a URL without a host, with user
    info or with a bad port. A webhook URL prefix allows its own origin only (aitbc.coordinator.webhooks)."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None
    if "@" in parts.netloc or not parts.hostname:
        return None
    return parts.scheme, parts.hostname, port


@dataclass
class ModelConfig:
    """A `[[models]]` entry of coordinator.toml: what a model is, set by the operator."""

    name: str
    kind: str = "image"  # "image" or "text"; a miner declaring the other kind is refused
    max_price_per_unit: int | None = None  # ceiling for this model; unset: default_max_price_per_unit
    native_size: int = 0  # image models: side of a job that leaves width/height 0; 0: from the first miner
    weights_sha256: str = ""  # the weights' identity (docs/receipts.md, "Model identity"); "": from the first miner

    def __post_init__(self) -> None:
        if self.weights_sha256 and (len(self.weights_sha256) != 64 or set(self.weights_sha256) - set("0123456789abcdef")):
            raise InvalidArgument(f"models.{self.name}: weights_sha256 must be 64 lower-case hex characters")
        size = self.native_size
        if isinstance(size, bool) or not isinstance(size, int) or (size and (
                not jobs.MIN_SIDE <= size <= jobs.MAX_SIDE or size % jobs.SIDE_MULTIPLE)):
            raise InvalidArgument(f"models.{self.name}: native_size must be 0 or a multiple of {jobs.SIDE_MULTIPLE} "
                                  f"between {jobs.MIN_SIDE} and {jobs.MAX_SIDE} (got {size!r})")
        if self.kind not in ("image", "text"):
            raise InvalidArgument(f"models.{self.name}: kind must be \"image\" or \"text\" (got {self.kind!r})")
        price = self.max_price_per_unit
        if price is not None and (isinstance(price, bool) or not isinstance(price, int)
                                  or not 0 <= price <= MAX_PRICE_PER_UNIT):
            raise InvalidArgument(f"models.{self.name}: max_price_per_unit must be an integer between 0 and "
                                  f"{MAX_PRICE_PER_UNIT:g} (got {price!r})")


@dataclass
class TlsConfig:
    """TLS keys every long-running process has (docs/operations.md, "TLS"): serve with this
    certificate chain + key (PEM); dial peers with TLS, checking their certificates against this
    CA (PEM). Empty: plaintext."""

    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_ca_file: str = ""
    allow_insecure: bool = False  # serve plaintext on a non-loopback listen address (refused otherwise)


@dataclass
class CoordinatorConfig(TlsConfig):
    listen: str = "127.0.0.1:18000"
    data_dir: str = "~/.aitbc/coordinator"
    # the store (docs/coordinator.md, "The store"): "" keeps it in LMDB under data_dir (the default);
    # a postgresql://user@host:port/dbname URL keeps it in that PostgreSQL database instead
    database_url: str = ""
    # PostgreSQL only: connections for the awaited client reads (GetJob, GetJobResult, GetReceipt,
    # ListReceipts, WatchJob of a job run elsewhere); a read waits for a free one
    database_read_pool: int = 4
    key_file: str = "~/.aitbc/coordinator.key"
    chain_id: str = "aitbc-devnet"
    hub_id: str = ""
    heartbeat_interval_s: float = 2.0
    heartbeat_timeout_s: float = 10.0
    stall_timeout_s: float = 120.0  # a miner silent on all its jobs this long (heartbeats aside) loses them
    # one attempt of a job on one miner ends this long after it was assigned, whatever the miner says
    # about it (a miner repeating one word would otherwise hold it for ever): requeued, a stall
    max_run_s: float = 3600.0
    max_attempts: int = 3
    queue_ttl_s: float = 600.0
    model_grace_s: float = 300.0
    # unfinished uploads are files under data_dir (docs/coordinator.md, "Uploads and artifacts")
    max_artifact_bytes: int = 64 * 1024 * 1024  # one job's outputs
    max_upload_bytes_per_miner: int = 128 * 1024 * 1024  # one miner's unfinished uploads together
    upload_spool_bytes: int = 256 * 1024  # an output up to this size stays in memory (8 MiB of them at most); 0: all to files
    max_upload_bytes_in_flight: int = 512 * 1024 * 1024  # all miners' unfinished uploads together
    artifact_retention_s: float = 7 * 24 * 3600.0  # artifact bytes are deleted this long after completion; 0 keeps them
    clients: list[ClientKey] = field(default_factory=list)
    ledger: str = ""  # ledger node address for settlement; "" disables it
    # hub: share of completed jobs re-executed on another miner (docs/hub.md); 0 turns it off
    verify_rate: float = 0.10
    verify_timeout_s: float = 120.0  # no other eligible miner in this time: the result stands unverified
    verify_tolerance: float = 0.03  # GPU runs: mean absolute pixel difference allowed (CPU runs: byte-exact)
    quarantine_after: int = 2  # failed verifications within 7 days that quarantine a miner
    probation_checks: int = 10  # after a failed verification, this many passed ones end the probation
    # trust bootstrap (docs/hub.md): a miner is established after this many passed verifications
    # (every result of a miner not yet established is re-executed, by established miners only);
    # trusted_miners are established from the start (the operator's own); 0 trusts every miner
    trust_checks: int = 5
    trusted_miners: list[str] = field(default_factory=list)
    event_log: str = ""  # a file: every job-machine call appended as JSON (docs/coordinator.md); "" off
    # the model registry (docs/coordinator.md): kinds and price ceilings are the operator's
    models: list[ModelConfig] = field(default_factory=list)
    allow_new_models: bool = True  # a model not under [[models]] is learned from its first miner
    default_max_price_per_unit: int = 1000  # ceiling for models without their own; no job pays more per unit
    port_file: str = ""
    # webhook delivery (docs/coordinator.md, "Webhooks"): attempts per event, how long an event is
    # retried at most, and each POST's timeout
    webhook_attempts: int = 12
    webhook_max_age_s: float = 24 * 3600.0
    quote_ttl_s: float = 300.0  # how long a signed quote is accepted by SubmitJob (docs/economy.md)
    stake_check_s: float = 30.0  # how often connected miners' stake is checked against the genesis min_stake
    webhook_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        """Refuse, at start, values the coordinator would trip over later."""
        if self.database_url:
            from aitbc.coordinator.pgstore import check_url  # psycopg only where it is used

            check_url(self.database_url)
        _within("database_read_pool", self.database_read_pool, 1, 64)
        _within("webhook_attempts", self.webhook_attempts, 1, 1000)
        _within("webhook_max_age_s", self.webhook_max_age_s, 1.0, float("inf"))
        _within("quote_ttl_s", self.quote_ttl_s, 1.0, 24 * 3600.0)
        _within("stake_check_s", self.stake_check_s, 0.1, 24 * 3600.0)
        _within("webhook_timeout_s", self.webhook_timeout_s, 0.1, 60.0)
        _within("default_max_price_per_unit", self.default_max_price_per_unit, 0, MAX_PRICE_PER_UNIT)
        _within("verify_rate", self.verify_rate, 0.0, 1.0)
        _within("verify_tolerance", self.verify_tolerance, 0.0, 1.0)
        _within("max_run_s", self.max_run_s, 1.0, float("inf"))
        for name in ("heartbeat_interval_s", "heartbeat_timeout_s", "stall_timeout_s", "queue_ttl_s",
                     "verify_timeout_s", "model_grace_s"):
            _within(name, getattr(self, name), 0.001, float("inf"))
        for name in ("max_attempts", "quarantine_after", "max_artifact_bytes", "max_upload_bytes_per_miner",
                     "max_upload_bytes_in_flight"):
            _within(name, getattr(self, name), 1, float("inf"))
        for name in ("max_upload_bytes_per_miner", "max_upload_bytes_in_flight"):
            if getattr(self, name) < self.max_artifact_bytes:
                raise InvalidArgument(f"config key {name!r} ({getattr(self, name)}) is below max_artifact_bytes "
                                      f"({self.max_artifact_bytes}): a job's full output could never be uploaded")
        _within("artifact_retention_s", self.artifact_retention_s, 0.0, float("inf"))
        _within("upload_spool_bytes", self.upload_spool_bytes, 0, 16 * 1024 * 1024)
        _within("probation_checks", self.probation_checks, 0, float("inf"))
        _within("trust_checks", self.trust_checks, 0, float("inf"))
        for address in self.trusted_miners:
            try:
                crypto.validate_address(address)
            except AitbcError as exc:
                raise InvalidArgument(f"config key 'trusted_miners': {address!r} is not a miner address ({exc.message})") from None


def _within(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        bounds = f"at least {low:g}" if high == float("inf") else f"between {low:g} and {high:g}"
        raise InvalidArgument(f"config key {name!r} must be {bounds} (got {value!r})")


MAX_COORDINATORS = 64


def coordinator_addresses(name: str, value: str | Sequence[str]) -> list[str]:
    """The coordinators a miner or client fails over between, from a list or a comma-separated
    string (one address is a list of one), each HOST:PORT ([IPv6]:PORT) or unix:PATH; refused
    with `name` (the config key, flag or variable it came from) when empty, malformed or repeated."""
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
    if not all(isinstance(v, str) for v in items):
        raise InvalidArgument(f"{_named(name)}: expected coordinator addresses (HOST:PORT), got {value!r}")
    items = [v.strip() for v in items if v.strip()]
    if not items:
        raise InvalidArgument(f"{_named(name)} lists no coordinator: give at least one HOST:PORT "
                              "(several, comma-separated or as a TOML list, to fail over between)")
    if len(items) > MAX_COORDINATORS:
        raise InvalidArgument(f"{_named(name)} lists {len(items)} coordinators; at most {MAX_COORDINATORS}")
    for address in items:
        if not _is_address(address):
            raise InvalidArgument(f"{_named(name)}: {address[:100]!r} is not a coordinator address "
                                  "(HOST:PORT with a port from 1 to 65535, [IPv6]:PORT, or unix:PATH)")
    seen = [a for i, a in enumerate(items) if a in items[:i]]
    if seen:
        raise InvalidArgument(f"{_named(name)} lists {seen[0]!r} twice")
    return items


def _named(name: str) -> str:
    return name if name.startswith(("-", "AITBC_")) else f"config key {name!r}"


def _is_address(address: str) -> bool:
    if address.startswith("unix:"):
        return len(address) > len("unix:")
    host, sep, port = address.rpartition(":")
    if not sep or not port.isascii() or not port.isdigit() or not 1 <= int(port) <= 65535:
        return False
    if host.startswith("["):
        return host.endswith("]") and len(host) > 2 and ":" in host
    return bool(host) and all(c.isalnum() or c in "-._" for c in host) and host.isascii()


@dataclass
class MinerConfig(TlsConfig):
    # one coordinator, or several to fail over between (round robin): a TOML list, or a
    # comma-separated string (AITBC_MINER_COORDINATOR); a single string is a list of one
    coordinator: list[str] = field(default_factory=lambda: ["127.0.0.1:18000"])
    key_file: str = "~/.aitbc/miner.key"
    models: list[str] = field(default_factory=lambda: ["tiny-sd"])
    price_per_unit: int = 0
    gpu_devices: list[str] = field(default_factory=lambda: ["auto"])
    max_concurrency: int = 1
    cpu_threads: int = 0  # torch threads on a CPU-only miner; 0 = cores - 1
    # image jobs sharing size, steps and guidance run in one pipeline call of at most this many
    # images (1 = no batching), collected for image_batch_wait_ms (docs/operations.md, "Image batching")
    image_batch_size: int = 4
    image_batch_wait_ms: float = 5.0
    # CUDA only (ignored on CPU): fp16/bf16, SDPA, channels_last; image_compile adds torch.compile of
    # the UNet, paid on the first call of each batch shape (docs/operations.md, "CUDA fast path")
    image_fast_path: bool = False
    image_compile: bool = False
    # how a transformers model's concurrent text streams decode (docs/operations.md, "Text streams"):
    # "exact" each alone (a job's tokens are those of the job alone), "stacked" in one batched
    # forward pass of at most text_max_batch rows (more tokens/s; verified within a tolerance)
    text_batching: str = "exact"
    text_max_batch: int = 16
    ops_listen: str = "127.0.0.1:18001"
    reconnect_max_s: float = 30.0
    port_file: str = ""

    def __post_init__(self) -> None:
        self.coordinator = coordinator_addresses("coordinator", self.coordinator)
        _within("price_per_unit", self.price_per_unit, 0, float("inf"))
        _within("max_concurrency", self.max_concurrency, 1, float("inf"))
        _within("cpu_threads", self.cpu_threads, 0, float("inf"))
        _within("image_batch_size", self.image_batch_size, 1, 64)
        _within("image_batch_wait_ms", self.image_batch_wait_ms, 0, 10_000)
        if self.text_batching not in ("exact", "stacked"):
            raise InvalidArgument(f"config key 'text_batching' must be \"exact\" or \"stacked\" (got {self.text_batching!r})")
        _within("text_max_batch", self.text_max_batch, 1, 256)
        _within("reconnect_max_s", self.reconnect_max_s, 0.001, float("inf"))


@dataclass
class WalletConfig(TlsConfig):
    # "unix": a socket in <keystore_dir>/.daemon (docs/wallet.md, Access); "unix:/PATH" another
    # socket; "127.0.0.1:PORT" loopback TCP. Every call needs the daemon's token; nothing else binds.
    listen: str = "unix"
    keystore_dir: str = "~/.aitbc/wallets"
    ledger: str = "127.0.0.1:26657"
    idle_lock_s: float = 300.0  # an unlocked wallet locks itself after this long without signing
    kdf_profile: str = "default"  # "fast" (libsodium's minimum Argon2id cost) is for tests only
    # wrong passphrases: after 3 in a row a wallet refuses unlocks for base, doubling up to max
    unlock_backoff_base_s: float = 1.0
    unlock_backoff_max_s: float = 60.0
    port_file: str = ""

    def __post_init__(self) -> None:
        _within("idle_lock_s", self.idle_lock_s, 0.001, float("inf"))
        _within("unlock_backoff_base_s", self.unlock_backoff_base_s, 0.001, float("inf"))
        _within("unlock_backoff_max_s", self.unlock_backoff_max_s, self.unlock_backoff_base_s, 86400.0)


def _coerce(name: str, value: Any, typ: Any) -> Any:
    origin = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
    try:
        if origin == "int":
            if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
                raise ValueError  # max_attempts = 3.5 is a typo, not 3
            return int(value)
        if origin == "float":
            return float(value)
        if origin == "str":
            if not isinstance(value, str):
                raise ValueError
            return value
        if origin == "list[str]":
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError
            return value
        if origin in ("list[ClientKey]", "list[ModelConfig]"):
            entry = ClientKey if origin == "list[ClientKey]" else ModelConfig
            known = [f.name for f in dataclasses.fields(entry)]
            for c in value:  # a typo in an entry names itself, like one at the top level
                unknown = sorted(set(c) - set(known)) if isinstance(c, dict) else []
                if unknown:
                    raise InvalidArgument(f"config key {name!r}: unknown keys {', '.join(unknown)} in an entry "
                                          f"(known: {', '.join(known)})")
            return [entry(**c) for c in value]
        if origin == "bool":
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
                return value.lower() in ("true", "1")
            if not isinstance(value, bool):
                raise ValueError
            return value
    except (TypeError, ValueError):
        raise InvalidArgument(f"config key {name!r}: expected {origin}, got {value!r}") from None
    raise InvalidArgument(f"config key {name!r}: unsupported type {origin}")


def load(cls: type[T], path: str | Path | None, env_prefix: str, **overrides: Any) -> T:
    """Defaults < TOML file < environment (AITBC_<PREFIX>_<KEY>) < explicit overrides."""
    values: dict[str, Any] = {}
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    if path:
        p = Path(path).expanduser()
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise InvalidArgument(f"config file {p} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise InvalidArgument(f"config file {p} is not valid TOML: {exc}") from None
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise InvalidArgument(f"config file {p}: unknown keys {', '.join(unknown)} (known: {', '.join(fields)})")
        values.update(data)
    for name in fields:
        env = os.environ.get(f"AITBC_{env_prefix}_{name.upper()}")
        if env is not None:
            values[name] = env
    values.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**{k: _coerce(k, v, fields[k].type) for k, v in values.items()})  # type: ignore[call-arg]


def expand(path: str) -> Path:
    return Path(path).expanduser()


def private_dir(path: str | Path) -> Path:
    """A data folder only its owner can read (0700 when this call creates it; parents too).
    Everything a service keeps (jobs, prompts, images, receipts, chain, keys) lives under one."""
    p = Path(path).expanduser()
    missing = [d for d in (p, *p.parents) if not d.exists()]
    p.mkdir(mode=0o700, parents=True, exist_ok=True)
    for d in missing:
        os.chmod(d, 0o700)  # mkdir's mode is masked by the umask; parents get the default otherwise
    return p


def write_port_file(path: str, port: int) -> None:
    """Atomically publish the bound port for supervisors (devnet) and tests."""
    if not path:
        return
    p = expand(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(f"{port}\n")
    os.replace(tmp, p)
