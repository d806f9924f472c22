"""Who may call the wallet daemon (docs/wallet.md, "Access").

The daemon holds unlocked keys, so it serves only this host's owner of the keystore: by default on
a unix socket in a 0700 folder (the socket itself 0600), or, when configured, on loopback TCP (never
any other address). Either way every call carries the daemon's token, a random secret the daemon
writes 0600 into that folder at each start: a caller proves it may read the folder.

    <keystore_dir>/.daemon/        0700 (wallet names never start with '.', so it is no wallet)
        wallet.sock                0600, the default listen address `unix:<that path>`
        token                      0600, 43 characters, sent as `authorization: Bearer <token>`
        endpoint                   0600, the address the daemon serves (`unix:/...` or `127.0.0.1:PORT`)

A client needs only the keystore folder: `channel(keystore_dir)` reads the endpoint and the token.
"""

from __future__ import annotations

import hmac
import os
import secrets
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aitbc import rpc
from aitbc.config import private_dir
from aitbc.errors import FailedPrecondition, InvalidArgument, Unauthenticated, Unavailable

RUN_DIR = ".daemon"
SOCKET_FILE = "wallet.sock"
TOKEN_FILE = "token"
ENDPOINT_FILE = "endpoint"
METADATA_KEY = "authorization"
SCHEME = "Bearer "
UNIX = "unix"  # the `listen` value meaning "the default socket in the daemon folder"
MAX_SOCKET_PATH = 107  # bytes of sun_path on Linux, without its terminating NUL


@dataclass(frozen=True)
class DaemonFiles:
    """Where the daemon of one keystore folder keeps its socket, token and endpoint."""

    run_dir: Path

    @classmethod
    def of(cls, keystore_dir: str | os.PathLike[str]) -> DaemonFiles:
        return cls(Path(keystore_dir).expanduser().absolute() / RUN_DIR)

    @property
    def socket(self) -> Path:
        return self.run_dir / SOCKET_FILE

    @property
    def token(self) -> Path:
        return self.run_dir / TOKEN_FILE

    @property
    def endpoint(self) -> Path:
        return self.run_dir / ENDPOINT_FILE


def listen_address(listen: str, files: DaemonFiles) -> str:
    """The gRPC address to bind for a `listen` setting: "unix" (or "") is the default socket,
    `unix:PATH` another socket, HOST:PORT loopback TCP. Anything beyond loopback is refused: the
    daemon holds keys and TLS would not say who the caller is."""
    text = (listen or UNIX).strip()
    if text == UNIX:
        return f"unix:{files.socket}"
    if rpc.is_unix(text):
        path = Path(text[len("unix:"):]).expanduser()
        if not path.is_absolute():
            raise InvalidArgument(f"listen = {listen!r}: a unix socket path must be absolute")
        return f"unix:{path}"
    if ":" not in text or not rpc.is_loopback(text):
        raise FailedPrecondition(
            f"refusing to listen on {text}: the wallet daemon holds keys and serves only a unix socket "
            "(listen = \"unix\", the default) or loopback TCP (listen = \"127.0.0.1:PORT\") (docs/wallet.md, Access)")
    return text


def _check_private_dir(path: Path, what: str) -> None:
    st = path.stat()
    if st.st_mode & 0o077:
        raise FailedPrecondition(
            f"{what} {path} is open to other users (mode {stat.S_IMODE(st.st_mode):04o}): chmod 700 it")


def _write_private(path: Path, text: str) -> None:
    """Write `text` to `path` atomically, 0600 from its creation."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _refuse_busy_socket(path: Path) -> None:
    """grpc replaces a socket file silently: refuse to take one a live daemon serves, and never
    let it near a file that is not a socket."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FailedPrecondition(f"{path} exists and is not a socket: move it away or set another `listen`")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return  # a stale socket of a daemon that died: grpc replaces it
    raise FailedPrecondition(f"another wallet daemon is serving on {path}: stop it first")


class DaemonAccess:
    """The daemon side: prepares the folder and the socket path, makes this start's token, checks
    every call, and removes what it published when the daemon stops."""

    def __init__(self, files: DaemonFiles, address: str, token: str) -> None:
        self.files = files
        self.address = address  # what the server binds
        self.published_address = ""  # what clients dial, once bound
        self._token = token.encode()

    @classmethod
    def prepare(cls, keystore_dir: str | os.PathLike[str], listen: str) -> DaemonAccess:
        files = DaemonFiles.of(keystore_dir)
        address = listen_address(listen, files)
        private_dir(files.run_dir)
        _check_private_dir(files.run_dir, "wallet daemon folder")
        if rpc.is_unix(address):
            sock = Path(address[len("unix:"):])
            if len(os.fsencode(sock)) > MAX_SOCKET_PATH:
                raise FailedPrecondition(
                    f"unix socket path {sock} is {len(os.fsencode(sock))} bytes long, the limit is {MAX_SOCKET_PATH}: "
                    "use a shorter keystore_dir or set listen = \"unix:/SHORTER/PATH\"")
            if sock.parent != files.run_dir:
                private_dir(sock.parent)
                _check_private_dir(sock.parent, "wallet socket folder")
            _refuse_busy_socket(sock)
        token = secrets.token_urlsafe(32)
        _write_private(files.token, token + "\n")
        return cls(files, address, token)

    def published(self, port: int) -> str:
        """After the bind: tighten the socket to 0600 and publish the address clients dial."""
        if rpc.is_unix(self.address):
            os.chmod(self.address[len("unix:"):], 0o600)
            served = self.address
        else:
            served = f"{rpc.host_of(self.address)}:{port}"
        _write_private(self.files.endpoint, served + "\n")
        self.published_address = served
        return served

    def check(self, metadata: Any) -> None:
        """Raise Unauthenticated unless the call carries this start's token (constant-time compare)."""
        sent = b""
        for item in metadata or ():
            if item[0] == METADATA_KEY:
                value = item[1] if isinstance(item[1], bytes) else str(item[1]).encode()
                sent = value[len(SCHEME):] if value.startswith(SCHEME.encode()) else b""
                break
        if not sent:
            raise Unauthenticated(
                f"the wallet daemon needs its token: send `{METADATA_KEY}: {SCHEME}<token>` with the token "
                f"from {self.files.token} (readable only by the keystore's owner)")
        if not hmac.compare_digest(sent, self._token):
            raise Unauthenticated(
                f"wrong wallet daemon token: read it again from {self.files.token} (it changes at every daemon start)")

    def close(self) -> None:
        for path in (self.files.endpoint, self.files.token):
            path.unlink(missing_ok=True)


# ---- the client side ----------------------------------------------------------------------------

def read_connection(keystore_dir: str | os.PathLike[str]) -> tuple[str, str]:
    """(address, token) of the daemon serving `keystore_dir`, read from its folder."""
    files = DaemonFiles.of(keystore_dir)
    try:
        address = files.endpoint.read_text().strip()
        token = files.token.read_text().strip()
    except FileNotFoundError:
        raise Unavailable(
            f"no wallet daemon is running for keystore {files.run_dir.parent} (no {files.endpoint}): "
            f"start `aitbc wallet-daemon --keystore-dir {files.run_dir.parent}`") from None
    except PermissionError:
        raise Unauthenticated(f"cannot read {files.run_dir}: only the keystore's owner may use its wallet daemon") from None
    return address, token


def credential(token: str) -> tuple[tuple[str, str]]:
    return ((METADATA_KEY, SCHEME + token),)


def channel(keystore_dir: str | os.PathLike[str]) -> Any:
    """An aio channel to the daemon of `keystore_dir` whose every call carries its token."""
    address, token = read_connection(keystore_dir)
    return rpc.channel(address, interceptors=rpc.metadata_interceptors(credential(token)))


def sync_channel(keystore_dir: str | os.PathLike[str]) -> Any:
    """The same as a blocking channel."""
    address, token = read_connection(keystore_dir)
    return rpc.open_sync_channel_with(address, credential(token))
