"""A throwaway local PostgreSQL server: initdb + pg_ctl in a folder, on loopback only.

Tests and benchmarks start one (the coordinator's PostgreSQL store runs against a real server,
never a mock); `aitbc devnet --postgres` runs one in the devnet folder. The binaries come from PATH or
Debian's /usr/lib/postgresql/<version>/bin (`make test` installs the `postgresql` package where
they are missing). The server listens on 127.0.0.1 alone. Authentication: `trust` on the unix
socket in the folder (0700, so only its owner and root reach it) and a password (scram-sha-256) on
127.0.0.1, since any local user can connect to a loopback port (THREAT-MODEL.md, "local process"):
a random one, set when the cluster is made (or found without one) and kept in FOLDER/password
(0600); `url()` carries it.

PostgreSQL refuses to run as root: under root the server runs as the `postgres` user (the one
Debian's package creates) or `nobody`, and the folder is handed to that user.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

MISSING = ("no PostgreSQL server binaries (initdb, pg_ctl) on PATH or in /usr/lib/postgresql/*/bin: "
           "run `make test`, which installs Debian's postgresql package (as root), or install it yourself "
           "(apt-get install postgresql)")


def find_bin_dir(path: str | None = None, debian_root: str = "/usr/lib/postgresql") -> Path | None:
    """The folder holding initdb and pg_ctl: PATH (or `path`) first, then the newest
    <debian_root>/<version>/bin. None: no server installed."""
    found = shutil.which("initdb", path=path)
    if found and shutil.which("pg_ctl", path=path):
        return Path(found).resolve().parent
    candidates = [Path(p).parent for p in glob.glob(f"{glob.escape(debian_root)}/*/bin/initdb")]
    candidates = [d for d in candidates if (d / "pg_ctl").exists()]

    def version(d: Path) -> tuple[int, ...]:
        return tuple(int(x) for x in d.parent.name.split(".") if x.isdigit())

    return max(candidates, key=version) if candidates else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_user() -> pwd.struct_passwd | None:
    """The user a server started by this process runs as: None (this process's own), or under
    root the `postgres` user (Debian's package makes it) or `nobody`."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("PostgreSQL cannot run as root and neither a 'postgres' nor a 'nobody' user exists")


@dataclass
class LocalPostgres:
    """One server: `start()`, then `url(dbname)` / `create_database(name)`, and `stop()`."""

    folder: Path | None = None  # None: a new temporary folder, deleted by stop()
    superuser: str = "aitbc"
    durable: bool = False  # False: fsync off (tests, benchmarks of the store's own cost); True: the defaults
    port: int = 0
    bin_dir: Path | None = None
    _owned: bool = field(default=False, repr=False)
    _user: pwd.struct_passwd | None = field(default=None, repr=False)

    @property
    def data(self) -> Path:
        assert self.folder is not None
        return self.folder / "data"

    @property
    def socket_dir(self) -> Path:
        assert self.folder is not None
        return self.folder / "sock"

    @property
    def password_file(self) -> Path:
        assert self.folder is not None
        return self.folder / "password"

    @property
    def password(self) -> str:
        """The superuser's password for TCP logins (init() sets it)."""
        return self.password_file.read_text().strip()

    def _cmd(self, *args: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        assert self.bin_dir is not None
        kwargs = {}
        if self._user is not None:
            kwargs = {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}
        return subprocess.run([str(self.bin_dir / args[0]), *args[1:]], capture_output=True, text=True,
                              check=check, cwd="/", input=stdin, **kwargs)  # type: ignore[call-overload]

    def init(self) -> LocalPostgres:
        """Find the binaries, pick the user the server runs as, and create the cluster (initdb) when
        the folder has none yet. start() calls it; a supervisor that runs the server itself
        (`aitbc devnet --postgres`) calls it, then runs server_argv()."""
        self.bin_dir = self.bin_dir or find_bin_dir()
        if self.bin_dir is None:
            raise FileNotFoundError(MISSING)
        self._user = server_user()
        if self.folder is None:
            self.folder, self._owned = Path(tempfile.mkdtemp(prefix="aitbc-pg-")), True
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.socket_dir.mkdir(mode=0o700, exist_ok=True)
        if self._user is not None:
            for p in (self.folder, self.socket_dir):
                os.chown(p, self._user.pw_uid, self._user.pw_gid)
        if not (self.data / "PG_VERSION").exists():
            try:
                self._cmd("initdb", "-D", str(self.data), "-U", self.superuser, "--auth=trust", "-E", "UTF8",
                          "--locale=C", *([] if self.durable else ["--no-sync"]))
            except subprocess.CalledProcessError as exc:
                raise RuntimeError(f"initdb failed: {exc.stderr.strip() or exc.stdout.strip()}") from None
        if not self.password_file.exists():  # a new cluster, or one made before TCP logins needed a password
            self._set_password()
        return self

    def _set_password(self) -> None:
        """A random superuser password (single-user mode: the server is not running yet), then
        pg_hba.conf: trust on the folder's socket, the password on 127.0.0.1, nothing else (initdb's
        default trusts 127.0.0.1 and ::1, where any local user connects). The password file is
        written last: a cluster without one gets a new one at the next init()."""
        password = secrets.token_urlsafe(24)
        res = self._cmd("postgres", "--single", "-D", str(self.data), "postgres", check=False,
                        stdin=f"ALTER ROLE \"{self.superuser}\" PASSWORD '{password}';\n")
        if res.returncode != 0 or "ERROR" in res.stdout + res.stderr:
            raise RuntimeError(f"setting the superuser's password failed: {(res.stderr or res.stdout).strip()}")
        (self.data / "pg_hba.conf").write_text(
            "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n")
        fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(password + "\n")

    @property
    def run_as(self) -> pwd.struct_passwd | None:
        """The user the server runs as when this process is root (PostgreSQL refuses root), else None."""
        return self._user

    def _options(self, port: int) -> list[str]:
        # a unix socket path is limited to 107 bytes: past that the server listens on 127.0.0.1 only
        sock = str(self.socket_dir) if len(str(self.socket_dir)) <= 80 else ""
        opts = ["-p", str(port), "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={sock}"]
        if not self.durable:
            opts += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        return opts

    def server_argv(self, port: int) -> list[str]:
        """The server in the foreground on `port` (after init()): what a supervisor runs. SIGINT
        stops it at once (fast shutdown), SIGTERM once its clients have gone."""
        assert self.bin_dir is not None
        self.port = port
        return [str(self.bin_dir / "postgres"), "-D", str(self.data), *self._options(port)]

    def start(self) -> LocalPostgres:
        self.init()
        last = ""
        for _ in range(3):  # a port taken between free_port() and the bind: try another
            port = self.port or free_port()
            opts = " ".join(f"'{o}'" if o.startswith("unix_socket_directories=") else o for o in self._options(port))
            res = self._cmd("pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data), "-l",
                            str(self.folder / "server.log"), "-o", opts, check=False)
            if res.returncode == 0:
                self.port = port
                return self
            last = (self.folder / "server.log").read_text()[-2000:] if (self.folder / "server.log").exists() else res.stderr
            if self.port:
                break
        raise RuntimeError(f"PostgreSQL did not start: {last.strip()}")

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.superuser}:{self.password}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str, *, exist_ok: bool = False) -> str:
        """A new empty database (or, with exist_ok, the one already there); returns its URL."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            if not (exist_ok and conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()):
                conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def wait_ready(self, timeout: float, alive: Callable[[], bool] = lambda: True) -> None:
        """Until the server accepts connections on its port; RuntimeError when it does not within
        `timeout` or `alive()` says its process ended."""
        import psycopg

        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline and alive():
            try:
                psycopg.connect(self.url(), connect_timeout=2).close()
                return
            except psycopg.OperationalError as exc:
                last = str(exc).strip()
            time.sleep(0.1)
        raise RuntimeError(f"PostgreSQL on 127.0.0.1:{self.port} did not accept connections"
                           f"{'' if alive() else ' (its process exited)'}: {last}")

    def stop(self) -> None:
        if self.bin_dir is not None and self.folder is not None and (self.data / "postmaster.pid").exists():
            self._cmd("pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w", check=False)
        if self._owned and self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
