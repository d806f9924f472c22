"""The JobStore on PostgreSQL (psycopg 3): the same contract as the LMDB store, in SQL tables.

`PostgresJobStore(database_url)` is what the coordinator opens when coordinator.toml sets
`database_url` (docs/coordinator.md, "The store"). It passes tests/coordinator/test_store_contract.py
like the LMDB and memory stores.

- **Synchronous writes, awaited reads.** The machine's step (decide, write, then send) calls its
  store without awaiting, so this store holds one synchronous connection for the writes, claims
  and housekeeping: a statement on loopback is a round trip of ~0.1 ms (plus one for the doorbell's
  LISTEN). The client-facing reads (`aget_job`, `aget_receipt`, `aclient_receipts`,
  `aopen_artifact`, `aread_events`) go through a small pool of async connections and are awaited
  (aitbc/coordinator/pgreads.py): a slow database does not stall the event loop for them.
- **One transaction per write.** `write` runs every statement in one transaction; an exception
  anywhere in it (a bad receipt, a lost connection) rolls all of it back. Reads run in autocommit.
- **Artifacts are bytea rows.** `artifacts` holds the record (size, expiry) and `artifact_chunks`
  the bytes, one row per 1 MiB chunk, stored out of line without compression (they are PNGs).
  A finished upload is streamed in a chunk at a time inside the write's transaction and its file
  deleted; `open_artifact` returns a file that fetches one chunk at a time, so a download holds one
  chunk, never the artifact. Deleting the record deletes the chunks (ON DELETE CASCADE) and the
  space is reused after VACUUM. Large objects were the alternative: they outlive the rows that name
  them unless every delete also unlinks them (vacuumlo), and need per-object permissions.
- **Shared by several coordinators** (docs/scaling.md, schema 0002). Each store registers its
  coordinator in `coordinators` with a random id and holds a session advisory lock on its key
  while its connection lives. A job row carries its owner and `claim_epoch`: `claim` takes queued
  rows with `FOR UPDATE SKIP LOCKED`, every later `write` of a claimed job is fenced (the rows are
  locked and checked against (owner, epoch) first: a job whose claim was taken over is not written,
  nor its receipt, and `write` returns its id), `renew` extends the leases in one statement,
  `take_over` requeues what a dead owner (its lock free) or an expired lease left. `claim_request`
  is the arbiter of (client, request_id): the first insert wins on every coordinator. `settler`
  holds the one settlement lock.
- **Job events** (schema 0003): `watchers` rows say which coordinator streams which job;
  `append_events` writes an owner's progress and text for them with `NOTIFY aitbc_events`,
  `read_events` reads the rows past the last id seen of each job, `prune_events` deletes old rows.
- **Shared hub state** (schema 0004): `PostgresReputationStore.update` locks the miner's row,
  writes the change and sends `NOTIFY aitbc_reputation, '<miner>'` in one transaction (heard by
  the doorbell); `decide_once` claims a verification decision (the first insert wins);
  `first_meta` keeps the first value (the verification secret).
- **Miner sessions** (schema 0005): `own_miner` makes this coordinator the owner of a miner key
  (epoch + 1, NOTIFY aitbc_miners), `renew_miners` renews its miners' leases in one statement and
  names those connected elsewhere since, `pool_miners` lists the pool's live rows (ListMiners).
  `client_jobs` counts a client's unfinished jobs under a lock on the client (max_active_jobs).
- **Versioned schema.** aitbc/coordinator/migrations/NNNN_name.sql, applied in order at open, all
  missing ones in one transaction under an advisory lock (two coordinators starting at once
  migrate once); `schema_version` records each. A database at a newer version than this code knows
  is refused with a message saying so.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import re
import secrets
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO, cast

import psycopg

from aitbc.coordinator import pgreads
from aitbc.coordinator.fees import Charge, charge_of, check_escrow
from aitbc.coordinator.store import (
    _KEPT,
    HELD,
    UNSETTLED,
    ArtifactData,
    Claim,
    _check_sha,
    _client_receipt_key,
    _expiries,
    _stored,
)
from aitbc.coordinator.streams import EVENT_PROGRESS
from aitbc.errors import FailedPrecondition, InvalidArgument, Unavailable
from aitbc.hub.reputation import Change, MinerRecord, ReputationStore
from aitbc.jobs import ACTIVE
from aitbc.v1 import job_pb2, miner_pb2, receipt_pb2

log = logging.getLogger("aitbc.coordinator.pgstore")
CHUNK_BYTES = 1 << 20
SETTING = "database_url"
_MIGRATION_LOCK = 0x61697462_63000001  # pg_advisory_xact_lock key: "aitbc" + 1 (any constant will do)
_SETTLER_LOCK = 0x61697462_63000003  # session lock: the one coordinator that settles (docs/scaling.md)
_ESCROW_LOCKS = 0x61697465  # pg_advisory_xact_lock(this, hashtext(client address)): one reservation at a time
_CLIENT_LOCKS = 0x61697466  # pg_advisory_lock(this, hashtext(client id)): one count-then-queue at a time (client_jobs)
_QUEUED = job_pb2.JOB_STATE_QUEUED
_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
_PAGE = 500  # iter_receipts reads this many rows per query
DECISION_KEEP_S = 24 * 3600.0  # verification_decisions rows older than this are deleted by any reaper pass


# ---- the URL: checked, shown without its password ----------------------------------------------------

def check_url(url: str) -> None:
    """Refuse what is not a PostgreSQL URL, naming the setting and never echoing the value (it may
    hold a password)."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme not in ("postgresql", "postgres"):
        shown = f"a {scheme}:// URL" if scheme else "a value that is not a URL"
        raise InvalidArgument(f"config key {SETTING!r} must be a postgresql:// URL such as "
                              f"postgresql://aitbc@127.0.0.1:5432/aitbc (got {shown}); leave it empty for LMDB")
    try:
        psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        raise InvalidArgument(f"config key {SETTING!r} is not a valid PostgreSQL URL: "
                              f"{_scrub(str(exc), url)}") from None


def display_url(url: str) -> str:
    """user@host:port/dbname, without the password (for messages and logs)."""
    try:
        d = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://(unparsable)"
    user = f"{d['user']}@" if d.get("user") else ""
    port = f":{d['port']}" if d.get("port") else ""
    return f"postgresql://{user}{d.get('host', '')}{port}/{d.get('dbname', '')}"


_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")


def _scrub(message: str, url: str) -> str:
    """The message without the URL's password (psycopg may quote the URL it could not parse)."""
    try:
        password = psycopg.conninfo.conninfo_to_dict(url).get("password")
    except psycopg.ProgrammingError:
        password = None
    message = _URL_PASSWORD.sub(r"\1***@", message)
    return message.replace(str(password), "***") if password else message


def _connect(url: str, connect_timeout_s: int) -> psycopg.Connection[Any]:
    return psycopg.connect(url, autocommit=True, connect_timeout=connect_timeout_s, application_name="aitbc-coordinator")


def connect(url: str, *, connect_timeout_s: int = 10) -> psycopg.Connection[Any]:
    """A connection in autocommit, or an error naming `database_url` (the password never shown)."""
    check_url(url)
    try:
        return _connect(url, connect_timeout_s)
    except psycopg.OperationalError as exc:
        raise FailedPrecondition(f"config key {SETTING!r}: cannot reach the database at {display_url(url)}: "
                                 f"{_scrub(str(exc).strip(), url)}") from None
    except psycopg.ProgrammingError as exc:
        raise InvalidArgument(f"config key {SETTING!r} is not a valid PostgreSQL URL: "
                              f"{_scrub(str(exc), url)}") from None


# ---- migrations --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations(folder: str | Path | None = None) -> list[Migration]:
    """The migrations in order (default: the package's migrations/); versions must run 1..N."""
    root: Any = Path(folder) if folder is not None else resources.files("aitbc.coordinator") / "migrations"
    found = []
    for entry in root.iterdir():
        m = _MIGRATION_NAME.match(entry.name)
        if m:
            found.append(Migration(int(m.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    found.sort(key=lambda x: x.version)
    if [x.version for x in found] != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migrations in {root} must be numbered 0001, 0002, ... without gaps: "
                           f"{[x.name for x in found]}")
    return found


def migrate(conn: psycopg.Connection[Any], migrations: list[Migration], *, where: str = "the database") -> int:
    """Bring the schema to the newest migration in one transaction; returns the version. A database
    newer than the migrations is refused (a newer coordinator upgraded it)."""
    known = migrations[-1].version if migrations else 0
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version integer PRIMARY KEY, "
                     "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
        row = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()
        have = int(row[0]) if row else 0
        if have > known:
            raise FailedPrecondition(
                f"config key {SETTING!r}: {where} has schema version {have}, newer than this coordinator "
                f"knows ({known}): a newer aitbc upgraded it; run that version, or point {SETTING} at another database")
        for mig in migrations[have:]:
            conn.execute(mig.sql.encode())  # several statements, no parameters: one simple query
            conn.execute("INSERT INTO schema_version (version, name) VALUES (%s, %s)", (mig.version, mig.name))
    return known


# ---- the store -----------------------------------------------------------------------------------------

class PostgresJobStore(pgreads.AsyncReads):
    """Jobs, artifacts, receipts, meta and reputation in one PostgreSQL database."""

    shared = True  # several coordinators may open the same database: jobs are claimed, writes fenced

    def __init__(self, url: str, *, chunk_bytes: int = CHUNK_BYTES, migrations: str | Path | None = None,
                 connect_timeout_s: int = 10, lease_s: float = 10.0, read_pool: int = pgreads.DEFAULT_POOL) -> None:
        self.url = url
        self.display_url = display_url(url)
        self.chunk_bytes = chunk_bytes
        self.lease_s = lease_s  # a claim lasts this long unless renewed (the coordinator sets it)
        self._timeout = connect_timeout_s
        # the awaited reads' connections (opened as reads need them): checked before anything opens
        self._reads = pgreads.ReadPool(url, self.display_url, read_pool, connect_timeout_s=connect_timeout_s)
        self._conn = connect(url, connect_timeout_s=connect_timeout_s)
        self._closed = False
        self.coordinator_id = secrets.token_hex(8)  # this process, as `owner` of the jobs it claims
        self._lock_key = secrets.randbits(62) + 1  # positive: pg_locks shows it as (classid, objid) as is
        self._claims: dict[str, int] = {}  # job id -> claim_epoch: the active jobs this process owns
        self._miners: dict[str, tuple[int, bytes]] = {}  # miner -> (epoch, MinerInfo) of the Work streams held here
        self._settler_conn: psycopg.Connection[Any] | None = None  # the connection holding the settler lock
        self._listener: psycopg.Connection[Any] | None = None  # LISTEN aitbc_queue (the doorbell)
        try:
            self.schema_version = migrate(self._conn, load_migrations(migrations), where=f"the database at {self.display_url}")
            self._conn.execute("INSERT INTO coordinators (id, lock_key) VALUES (%s, %s)",
                               (self.coordinator_id, self._lock_key))
            self._own(self._conn)
            self._fill_client_ids()
        except BaseException:
            self._conn.close()
            raise
        self._reputation = PostgresReputationStore(self)

    def _own(self, conn: psycopg.Connection[Any]) -> None:
        """Hold this coordinator's lock for as long as the connection lives: the server frees it
        when the connection ends (a killed coordinator's backend too), and the other coordinators'
        reapers take its jobs over at once (take_over)."""
        conn.execute("SELECT pg_advisory_lock(%s)", (self._lock_key,))

    @property
    def conn(self) -> psycopg.Connection[Any]:
        """The connection, opened again after the server dropped it (the next call after a failure).
        Our lock was free meanwhile: claims taken over since are refused by the fence. A database
        that cannot be reached now raises psycopg's error: the call is Unavailable (`error`), not a
        setting to fix as at start-up."""
        if self._conn.closed and not self._closed:
            conn = _connect(self.url, self._timeout)
            try:
                self._own(conn)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def error(self, exc: BaseException) -> Unavailable | None:
        """A call that lost the database (its connection dropped, the server away, a statement it
        cancelled) is Unavailable, naming the database without its password; None for any other
        error. The statement that failed was not committed and is never repeated blindly: the
        next call reconnects (`conn`)."""
        what = pgreads.lost(exc)
        return pgreads.unavailable(self.display_url, what, exc) if what is not None else None

    def close(self) -> None:
        self._closed = True
        self.stop_listening()
        self._reads.close()
        self._conn.close()

    def listen(self, on_queued: Callable[[], None], on_events: Callable[[], None] | None = None,
               on_reputation: Callable[[set[str]], None] | None = None,
               on_miners: Callable[[list[tuple[str, int]]], None] | None = None) -> None:
        """The doorbell: call `on_queued` (on the running event loop) when a coordinator gives jobs
        back to the shared queue (`NOTIFY aitbc_queue`, sent with SubmitJob's or a requeue's
        release), `on_events` when an owner appended job events (`NOTIFY aitbc_events`, sent
        with the rows), and `on_reputation` with the miners whose reputation row changed (`NOTIFY
        aitbc_reputation, '<miner>'`, sent with each update), and `on_miners` with the (miner,
        epoch) pairs of Work streams opened anywhere (`NOTIFY aitbc_miners`, sent by own_miner). A
        connection of its own, read when
        its socket is readable; a notification lost while it is down costs only the polls'
        interval (0.5 s for claims and events, 1 s for reputation): the tables are the delivery."""
        loop = asyncio.get_running_loop()
        conn = connect(self.url, connect_timeout_s=self._timeout)
        conn.execute("LISTEN aitbc_queue")
        if on_events is not None:
            conn.execute("LISTEN aitbc_events")
        if on_reputation is not None:
            conn.execute("LISTEN aitbc_reputation")
        if on_miners is not None:  # a miner opened its Work stream somewhere (own_miner): (miner, epoch)
            conn.execute("LISTEN aitbc_miners")
        fd = conn.pgconn.socket

        def readable() -> None:
            try:
                conn.pgconn.consume_input()
            except psycopg.OperationalError as exc:
                log.warning("the doorbell's connection ended (claims and events are read every 0.5 s): %s", exc)
                self.stop_listening()
                return
            queued = events = False
            reputation: set[str] = set()
            miners: list[tuple[str, int]] = []
            while (n := conn.pgconn.notifies()) is not None:
                if n.relname == b"aitbc_events":
                    events = True
                elif n.relname == b"aitbc_reputation":
                    reputation.add(n.extra.decode())
                elif n.relname == b"aitbc_miners":
                    miner, _, epoch = n.extra.decode().rpartition(":")
                    if epoch.isdigit():
                        miners.append((miner, int(epoch)))
                else:
                    queued = True
            if reputation and on_reputation is not None:
                on_reputation(reputation)
            if miners and on_miners is not None:
                on_miners(miners)
            if events and on_events is not None:
                on_events()
            if queued:
                on_queued()

        loop.add_reader(fd, readable)
        self._listener = conn
        self._listener_stop = lambda: loop.remove_reader(fd)

    def stop_listening(self) -> None:
        if self._listener is not None:
            try:
                self._listener_stop()
            except RuntimeError:
                pass  # the loop is closed already
            self._listener.close()
            self._listener = None

    def reputation(self) -> ReputationStore:
        return self._reputation

    def reservations(self) -> PostgresReservations:
        """Escrow reservations as rows (fees.Reservations for several coordinators)."""
        return PostgresReservations(self)

    # -- write: one transaction --

    def write(self, jobs: Iterable[job_pb2.Job], *, artifacts: Iterable[tuple[str, ArtifactData]] = (),
              receipts: Iterable[tuple[job_pb2.Job, receipt_pb2.Receipt]] = ()) -> frozenset[str]:
        """As the protocol says; returns the jobs whose claim another coordinator took over: they
        (and their receipts) were not written, and this process must drop them."""
        jobs = list(jobs)
        artifacts = list(artifacts)
        fenced: dict[str, psycopg.Cursor[Any]] = {}  # claimed job -> the cursor of its fenced UPDATE
        try:
            with self._pipelined() as cur:
                self._statements(cur, jobs, artifacts, receipts, fenced)
            lost = {job_id for job_id, c in fenced.items() if c.fetchone() is None}
            for c in fenced.values():
                c.close()
        finally:
            for _, data in artifacts:  # taken over, as the LMDB store moves the file in
                if isinstance(data, Path):
                    data.unlink(missing_ok=True)
        for j in jobs:  # committed: what this process owns now
            if j.job_id in lost or j.state not in ACTIVE:
                self._claims.pop(j.job_id, None)
            else:
                self._claims.setdefault(j.job_id, 1)
        return frozenset(lost)

    @contextlib.contextmanager
    def _pipelined(self) -> Iterator[psycopg.Cursor[Any]]:
        """One transaction in one pipeline: BEGIN, the caller's statements and COMMIT go out together
        and the caller waits for the server once (not conn.transaction(): that waits for BEGIN and
        COMMIT apart). Any error, in Python half way or refused by the server, rolls all of it back,
        so the connection is never left inside a transaction for the autocommit calls after it."""
        conn = self.conn
        try:
            with conn.pipeline(), conn.cursor() as cur:
                cur.execute("BEGIN")
                yield cur
                cur.execute("COMMIT")
        except BaseException:
            if not conn.closed and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                try:
                    conn.execute("ROLLBACK")  # a Python error half way: nothing of it stays
                except psycopg.Error:
                    pass  # the connection broke too: the server rolls back; the first error is the news
            raise

    def _statements(self, cur: psycopg.Cursor[Any], jobs: list[job_pb2.Job],
                    artifacts: list[tuple[str, ArtifactData]],
                    receipts: Iterable[tuple[job_pb2.Job, receipt_pb2.Receipt]],
                    fenced: dict[str, psycopg.Cursor[Any]]) -> None:
        # execute() per row, not executemany(): inside a pipeline executemany syncs (waits) each time
        me = self.coordinator_id
        for j in jobs:
            cols = _job_columns(j)
            if j.job_id in self._claims:  # the fence: written only while the claim is still ours (its row
                c = fenced[j.job_id] = cur.connection.cursor()  # then stays locked until COMMIT); else no row
                c.execute(_UPDATE_JOB, (*cols, j.job_id, me, self._claims[j.job_id]))
            else:  # a new job (ours from now: epoch 1), or a finished one written again (never an active row of another)
                cur.execute(_INSERT_JOB, (j.job_id, *cols, self.coordinator_id if j.state in ACTIVE else None,
                                          self.lease_s))
            if j.request_id:
                cur.execute(_PUT_REQUEST, (j.client_id, j.request_id, j.job_id))
        expiries = _expiries(jobs)
        for sha, data in artifacts:
            # content-addressed: a stored sha256 has these bytes already, so both inserts do
            # nothing then (ON CONFLICT); a file is looked up first, not to send its bytes again
            if isinstance(data, Path) and cur.execute("SELECT 1 FROM artifacts WHERE sha256 = %s",
                                                      (sha,)).fetchone() is not None:
                continue
            until, job_id = expiries.get(sha, (_KEPT, ""))
            size = data.stat().st_size if isinstance(data, Path) else len(data)
            cur.execute("INSERT INTO artifacts (sha256, size, chunk_bytes, expires_at_ms, job_id) "
                        "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (sha256) DO NOTHING",
                        (_check_sha(sha), size, self.chunk_bytes, until, job_id))
            self._put_chunks(cur, sha, data)
        # jobs naming stored artifacts extend them (for one inserted above, the same expiry: no-op)
        for sha, (until, job_id) in expiries.items():
            cur.execute("UPDATE artifacts SET expires_at_ms = %s, job_id = %s WHERE sha256 = %s "
                        "AND expires_at_ms <> 0 AND (%s = 0 OR %s > expires_at_ms)",
                        (until, job_id, sha, until, until))
        for j, r in receipts:
            if j.job_id in fenced:  # stored only if the job's fenced UPDATE held: a job taken over by
                fence = (j.job_id, me, self._claims[j.job_id])  # another coordinator is never attested
                cur.execute(_PUT_RECEIPT_FENCED, (r.receipt_hash, *_receipt_columns(r), *fence))
                cur.execute(_PUT_CLIENT_RECEIPT_FENCED, (_client_receipt_key(j), j.client_id, r.receipt_hash, *fence))
                continue
            cur.execute(_PUT_RECEIPT, (r.receipt_hash, *_receipt_columns(r)))
            cur.execute(_PUT_CLIENT_RECEIPT, (_client_receipt_key(j), j.client_id, r.receipt_hash))

    def _put_chunks(self, cur: psycopg.Cursor[Any], sha: str, data: ArtifactData) -> None:
        sql = "INSERT INTO artifact_chunks (sha256, n, data) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING"
        if isinstance(data, Path):
            with open(data, "rb") as f:  # one chunk in memory at a time
                n = 0
                while chunk := f.read(self.chunk_bytes):
                    cur.execute(sql, (sha, n, chunk))
                    n += 1
            return
        view = memoryview(data)
        for n, off in enumerate(range(0, len(view), self.chunk_bytes)):
            cur.execute(sql, (sha, n, view[off:off + self.chunk_bytes]))

    # -- artifacts --

    def open_artifact(self, sha256_hex: str) -> BinaryIO | None:
        row = self.conn.execute(pgreads.GET_ARTIFACT, (sha256_hex,)).fetchone()
        if row is None:
            return None
        raw = _ArtifactReader(self, sha256_hex, int(row[0]), int(row[1]))
        return cast(BinaryIO, io.BufferedReader(raw, buffer_size=max(io.DEFAULT_BUFFER_SIZE, min(int(row[1]), 1 << 20))))

    def _chunk(self, sha: str, n: int) -> bytes | None:
        row = self.conn.execute(pgreads.GET_CHUNK, (sha, n)).fetchone()
        return bytes(row[0]) if row is not None else None

    def expired_artifacts(self, now_ms: int, limit: int) -> list[tuple[str, str]]:
        rows = self.conn.execute(
            "SELECT sha256, job_id FROM artifacts WHERE expires_at_ms <> 0 AND expires_at_ms <= %s "
            "ORDER BY expires_at_ms, sha256 LIMIT %s", (now_ms, limit)).fetchall()
        return [(r[0], r[1]) for r in rows]

    def keep_artifact(self, sha256_hex: str, until_ms: int) -> None:
        self.conn.execute("UPDATE artifacts SET expires_at_ms = %s WHERE sha256 = %s AND expires_at_ms <> 0 "
                          "AND (%s = 0 OR %s > expires_at_ms)", (until_ms, sha256_hex, until_ms, until_ms))

    def delete_artifacts(self, shas: Iterable[str]) -> None:
        shas = list(shas)
        if shas:
            self.conn.execute("DELETE FROM artifacts WHERE sha256 = ANY(%s)", (shas,))  # chunks cascade

    # -- jobs --

    def get_job(self, job_id: str) -> job_pb2.Job | None:
        row = self.conn.execute(pgreads.GET_JOB, (job_id,)).fetchone()
        return job_pb2.Job.FromString(row[0]) if row is not None else None

    def active_jobs(self) -> list[job_pb2.Job]:
        rows = self.conn.execute("SELECT body FROM jobs WHERE active ORDER BY job_id").fetchall()
        return [job_pb2.Job.FromString(r[0]) for r in rows]

    def job_for_request(self, client_id: str, request_id: str) -> str | None:
        row = self.conn.execute("SELECT job_id FROM requests WHERE client_id = %s AND request_id = %s",
                                (client_id, request_id)).fetchone()
        return row[0] if row is not None else None

    def claim_request(self, client_id: str, request_id: str, job_id: str) -> str:
        """The arbiter of a request id across coordinators: the first insert wins (its row commits
        at once, before the job's write); returns the job that owns the request."""
        row = self.conn.execute(
            "WITH ins AS (INSERT INTO requests (client_id, request_id, job_id) VALUES (%s, %s, %s) "
            "ON CONFLICT (client_id, request_id) DO NOTHING RETURNING job_id) "
            "SELECT job_id FROM ins UNION ALL SELECT job_id FROM requests WHERE client_id = %s AND request_id = %s "
            "LIMIT 1", (client_id, request_id, job_id, client_id, request_id)).fetchone()
        if row is None:  # the winner's row, inserted after our snapshot: read it again
            return self.job_for_request(client_id, request_id) or job_id
        return str(row[0])

    def take_request(self, client_id: str, request_id: str, dead_job_id: str, job_id: str) -> bool:
        """Move a request whose job was never written (its coordinator died between the request's
        row and the job's) to a new job. False: the job appeared meanwhile."""
        row = self.conn.execute(
            "UPDATE requests SET job_id = %s WHERE client_id = %s AND request_id = %s AND job_id = %s "
            "AND NOT EXISTS (SELECT 1 FROM jobs WHERE job_id = %s) RETURNING job_id",
            (job_id, client_id, request_id, dead_job_id, dead_job_id)).fetchone()
        return row is not None

    # -- claims (several coordinators on one database) --

    def claim(self, models: Iterable[str], limit: int, *, skip: Iterable[str] = ()) -> list[Claim]:
        """Up to `limit` queued jobs of these models nobody owns, best first, now this process's."""
        models = sorted(set(models))
        if not models or limit <= 0:
            return []
        return self._claimed(self.conn.execute(_CLAIM, {
            "me": self.coordinator_id, "lease": self.lease_s, "models": models, "skip": sorted(skip), "n": limit}))

    def claim_ids(self, job_ids: Iterable[str]) -> list[Claim]:
        """These jobs, where they are queued and nobody owns them (CancelJob on any coordinator)."""
        return self._claimed(self.conn.execute(_CLAIM_IDS, {
            "me": self.coordinator_id, "lease": self.lease_s, "ids": sorted(job_ids)}))

    def take_over(self, limit: int, *, now_ms: int, queue_ttl_ms: int, verify_ttl_ms: int) -> list[Claim]:
        """The reaper: active jobs whose owner died (its advisory lock is free) or whose lease expired
        (this process's own too: a job it still holds keeps running under the new epoch), and queued
        jobs past their queue time (for this machine to expire), now this process's."""
        return self._claimed(self.conn.execute(_TAKE_OVER, {
            "me": self.coordinator_id, "lease": self.lease_s, "n": limit, "now": now_ms,
            "ttl": queue_ttl_ms, "vttl": verify_ttl_ms}))

    def _claimed(self, cur: psycopg.Cursor[Any]) -> list[Claim]:
        out = []
        for job_id, epoch, body, excluded, queued_ms, cancel, owner, expired in cur.fetchall():
            self._claims[job_id] = int(epoch)
            out.append(Claim(job_pb2.Job.FromString(body), int(epoch), frozenset(excluded), int(queued_ms),
                             bool(cancel), owner or "", bool(expired)))
        out.sort(key=lambda c: (-_rate(c.job), c.job.created_at_unix_ms, c.job.job_id))
        return out

    def release(self, jobs: Iterable[tuple[str, Iterable[str]]]) -> None:
        """Give queued jobs back to the shared queue (with the miners each must avoid); the other
        coordinators hear of it at once (NOTIFY aitbc_queue)."""
        rows = [(sorted(excluded), job_id, self.coordinator_id, self._claims.pop(job_id))
                for job_id, excluded in jobs if job_id in self._claims]
        if not rows:
            return
        with self._pipelined() as cur:
            for row in rows:
                cur.execute("UPDATE jobs SET owner = NULL, lease_until = NULL, excluded = %s::text[] WHERE job_id = %s "
                            "AND owner = %s AND claim_epoch = %s AND state = 1", row)
            cur.execute("NOTIFY aitbc_queue")

    def holds(self, job_id: str) -> bool:
        """Is this process's claim on the job still the current one (nobody took it over)?"""
        epoch = self._claims.get(job_id)
        if epoch is None:
            return False
        row = self.conn.execute("SELECT 1 FROM jobs WHERE job_id = %s AND owner = %s AND claim_epoch = %s",
                                (job_id, self.coordinator_id, epoch)).fetchone()
        return row is not None

    def drop_claims(self, job_ids: Iterable[str]) -> None:
        for job_id in job_ids:
            self._claims.pop(job_id, None)

    def renew(self) -> tuple[frozenset[str], list[str]]:
        """Extend every lease of this process in one statement. Returns the claims lost (taken over
        by another coordinator: drop them) and the jobs whose cancel another coordinator asked for."""
        rows = self.conn.execute(
            "UPDATE jobs SET lease_until = now() + make_interval(secs => %s) WHERE owner = %s AND active "
            "RETURNING job_id, claim_epoch, cancel_requested", (self.lease_s, self.coordinator_id)).fetchall()
        held = {r[0]: int(r[1]) for r in rows}
        lost = frozenset(j for j, e in self._claims.items() if held.get(j) != e)
        for j in lost:
            self._claims.pop(j, None)
        return lost, sorted(r[0] for r in rows if r[2] and r[0] in self._claims)

    def request_cancel(self, job_id: str) -> str | None:
        """Ask the coordinator that owns an active job to cancel it; returns that owner (None: not owned elsewhere)."""
        row = self.conn.execute("UPDATE jobs SET cancel_requested = true WHERE job_id = %s AND active "
                                "AND owner IS NOT NULL AND owner <> %s RETURNING owner",
                                (job_id, self.coordinator_id)).fetchone()
        return str(row[0]) if row is not None else None

    def use_quote(self, quote_id: str, job_id: str, expires_ms: int) -> str | None:
        """Record that `job_id` pays with this quote; None when it is the first, else the job that did."""
        row = self.conn.execute(
            "WITH ins AS (INSERT INTO used_quotes (quote_id, job_id, expires_ms) VALUES (%s, %s, %s) "
            "ON CONFLICT (quote_id) DO NOTHING RETURNING job_id) "
            "SELECT job_id, true FROM ins UNION ALL SELECT job_id, false FROM used_quotes WHERE quote_id = %s LIMIT 1",
            (quote_id, job_id, expires_ms, quote_id)).fetchone()
        if row is None or row[1]:
            return None
        return str(row[0])

    def forget_quote(self, quote_id: str, job_id: str) -> None:
        """A job that was never queued gives its quote back."""
        self.conn.execute("DELETE FROM used_quotes WHERE quote_id = %s AND job_id = %s", (quote_id, job_id))

    def prune_quotes(self, now_ms: int) -> None:
        self.conn.execute("DELETE FROM used_quotes WHERE expires_ms < %s", (now_ms,))

    def forget_request(self, client_id: str, request_id: str, job_id: str) -> None:
        """A job refused before it was written gives its request id back."""
        self.conn.execute("DELETE FROM requests WHERE client_id = %s AND request_id = %s AND job_id = %s",
                          (client_id, request_id, job_id))

    def settler(self) -> bool:
        """Is this process the one that settles? Takes the settler lock when it is free (its holder
        died or stopped: the server freed it with its connection); held until this connection ends."""
        conn = self.conn
        if self._settler_conn is conn:
            return True
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (_SETTLER_LOCK,)).fetchone()
        if row and row[0]:
            self._settler_conn = conn
            return True
        return False

    # -- job events across coordinators (schema 0003; docs/scaling.md, "Events across coordinators") --

    def watch_jobs(self, job_ids: Iterable[str], ttl_s: float) -> None:
        """This coordinator streams these jobs to its WatchJob calls: their owners append their
        progress and text as rows until the row expires (refreshed while the watch lasts)."""
        ids = sorted(set(job_ids))
        if ids:
            self.conn.execute("INSERT INTO watchers (job_id, coordinator, expires) "
                              "SELECT unnest(%s::text[]), %s, now() + make_interval(secs => %s) "
                              "ON CONFLICT (job_id, coordinator) DO UPDATE SET expires = EXCLUDED.expires",
                              (ids, self.coordinator_id, ttl_s))

    def unwatch_job(self, job_id: str) -> None:
        self.conn.execute("DELETE FROM watchers WHERE job_id = %s AND coordinator = %s", (job_id, self.coordinator_id))

    def watched_elsewhere(self, job_ids: Iterable[str]) -> set[str]:
        """Of these jobs, those another coordinator watches now (a live watcher row not ours)."""
        ids = sorted(set(job_ids))
        if not ids:
            return set()
        rows = self.conn.execute("SELECT DISTINCT job_id FROM watchers WHERE job_id = ANY(%s::text[]) "
                                 "AND coordinator <> %s AND expires > now()", (ids, self.coordinator_id)).fetchall()
        return {r[0] for r in rows}

    def append_events(self, rows: Iterable[tuple[str, int, int, bytes]], *, keep: int) -> None:
        """Append (job_id, kind, attempt, payload) rows in one transaction with NOTIFY aitbc_events;
        each job keeps its `keep` newest progress rows (text is bounded by the job's own limits)."""
        rows = list(rows)
        if not rows:
            return
        with self._pipelined() as cur:
            for row in rows:
                cur.execute("INSERT INTO job_events (job_id, kind, attempt, payload) VALUES (%s, %s, %s, %s)", row)
            for job_id in sorted({r[0] for r in rows if r[1] == EVENT_PROGRESS}):
                cur.execute("DELETE FROM job_events WHERE job_id = %s AND kind = %s AND id <= (SELECT id FROM job_events "
                            "WHERE job_id = %s AND kind = %s ORDER BY id DESC OFFSET %s LIMIT 1)",
                            (job_id, EVENT_PROGRESS, job_id, EVENT_PROGRESS, keep))
            cur.execute("NOTIFY aitbc_events")

    def read_events(self, after: dict[str, int], limit: int) -> list[tuple[int, str, int, int, bytes]]:
        """Rows (id, job_id, kind, attempt, payload) of these jobs past the last id seen of each, in
        id order (at most `limit`)."""
        if not after:
            return []
        return pgreads.event_rows(self.conn.execute(pgreads.READ_EVENTS, pgreads.events_args(after, limit)).fetchall())

    def prune_events(self, keep_s: float, limit: int, watchers_s: float) -> int:
        """Delete up to `limit` event rows of finished jobs older than `keep_s`, and watcher rows
        expired `watchers_s` ago (ignored since they expired); any coordinator's housekeeping does.
        Returns the event rows deleted."""
        conn = self.conn
        n = conn.execute("DELETE FROM job_events WHERE id IN (SELECT e.id FROM job_events e LEFT JOIN jobs j "
                         "USING (job_id) WHERE e.created < now() - make_interval(secs => %s) "
                         "AND (j.job_id IS NULL OR NOT j.active) ORDER BY e.created LIMIT %s)",
                         (keep_s, limit)).rowcount
        conn.execute("DELETE FROM watchers WHERE (job_id, coordinator) IN (SELECT job_id, coordinator FROM watchers "
                     "WHERE expires < now() - make_interval(secs => %s) ORDER BY expires LIMIT %s)", (watchers_s, limit))
        conn.execute("DELETE FROM verification_decisions WHERE (job_id, runs) IN (SELECT job_id, runs FROM "
                     "verification_decisions WHERE claimed < now() - make_interval(secs => %s) ORDER BY claimed "
                     "LIMIT %s)", (DECISION_KEEP_S, limit))
        return max(0, n)

    # -- miner sessions and the pool-wide max_active_jobs (schema 0005; docs/scaling.md) --------------

    def own_miner(self, miner_id: str, info: miner_pb2.MinerInfo) -> int:
        """A miner opened its Work stream here: its row names this coordinator with the next epoch,
        and NOTIFY aitbc_miners 'miner:epoch' tells the previous owner to end its stream. Returns the epoch."""
        declared = info.SerializeToString(deterministic=True)
        row = self.conn.execute(_OWN_MINER, {"miner": miner_id, "me": self.coordinator_id, "lease": self.lease_s,
                                             "info": declared}).fetchone()
        epoch = int(row[0]) if row else 0
        self._miners[miner_id] = (epoch, declared)
        return epoch

    def disown_miner(self, miner_id: str) -> None:
        """The miner's stream here ended: its row goes, unless a newer connection elsewhere owns it."""
        held = self._miners.pop(miner_id, None)
        if held is not None:
            self.conn.execute("DELETE FROM miner_sessions WHERE miner = %s AND coordinator = %s AND epoch = %s",
                              (miner_id, self.coordinator_id, held[0]))

    def miner_moved(self, miner_id: str, epoch: int) -> bool:
        """A notification: is the miner, connected here under an older epoch, connected elsewhere now?"""
        held = self._miners.get(miner_id)
        if held is None or epoch <= held[0]:
            return False
        del self._miners[miner_id]
        return True

    def renew_miners(self, running: dict[str, int]) -> frozenset[str]:
        """Extend the leases of this coordinator's miners, and record what each runs, in one statement.
        Returns the miners whose row is another coordinator's now (connected there since, its
        notification lost): their streams here must end. A row that is gone (its lease ran out while
        this coordinator stalled, and a reaper deleted it) is written again: the miner is still here."""
        ids = sorted(self._miners)
        if not ids:
            return frozenset()
        me = self.coordinator_id
        rows = self.conn.execute(
            "UPDATE miner_sessions s SET lease_until = now() + make_interval(secs => %s), running = u.running "
            "FROM unnest(%s::text[], %s::bigint[], %s::int[]) AS u(miner, epoch, running) "
            "WHERE s.miner = u.miner AND s.coordinator = %s AND s.epoch = u.epoch RETURNING s.miner",
            (self.lease_s, ids, [self._miners[m][0] for m in ids], [running.get(m, 0) for m in ids], me)).fetchall()
        missed = sorted(set(ids) - {r[0] for r in rows})
        if not missed:
            return frozenset()
        moved = set(missed)
        for miner_id in missed:  # rare: a lost notification, or a row deleted under a stalled owner
            epoch, declared = self._miners[miner_id]
            if self.conn.execute(_REOWN_MINER, (miner_id, me, epoch, self.lease_s, declared)).fetchone() is not None:
                moved.discard(miner_id)  # nobody else connected it meanwhile: still ours
        for miner_id in moved:
            self._miners.pop(miner_id, None)
        return frozenset(moved)

    def pool_miners(self) -> list[PoolMiner]:
        """Every miner connected to a live coordinator of the pool (its lease running, its owner's
        lock held), in miner order."""
        rows = self.conn.execute(
            "SELECT s.miner, s.coordinator, s.info, s.running FROM miner_sessions s "
            "WHERE s.lease_until > now() AND " + _ALIVE.replace("t.owner", "s.coordinator") +
            " ORDER BY s.miner").fetchall()
        return [PoolMiner(r[0], r[1], miner_pb2.MinerInfo.FromString(r[2]), int(r[3])) for r in rows]

    def prune_miners(self) -> None:
        """Rows whose lease ran out (their coordinator died or stalled) go; any coordinator's reaper does."""
        self.conn.execute("DELETE FROM miner_sessions WHERE lease_until < now()")

    @contextlib.contextmanager
    def client_jobs(self, client_id: str) -> Iterator[int]:
        """A client's unfinished jobs on every coordinator, counted under a lock on the client held
        until the block ends: SubmitJob counts, then queues (writes) the job inside it, so two
        coordinators cannot each let a client past its max_active_jobs with one job more."""
        conn = self.conn
        conn.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", (_CLIENT_LOCKS, client_id))
        try:
            row = conn.execute("SELECT count(*) FROM jobs WHERE client_id = %s AND active", (client_id,)).fetchone()
            yield int(row[0]) if row else 0
        finally:
            if not conn.closed:  # (a connection that broke took its lock with it)
                try:
                    conn.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", (_CLIENT_LOCKS, client_id))
                except psycopg.Error:
                    log.exception("unlocking the job count of client %s failed", client_id)

    def _fill_client_ids(self) -> None:
        """Active jobs written before schema 5 get their client_id column (once: later writes fill it)."""
        rows = self._conn.execute("SELECT job_id, body FROM jobs WHERE active AND client_id = ''").fetchall()
        for job_id, body in rows:
            client = _counted_client(job_pb2.Job.FromString(body))
            if client:
                self._conn.execute("UPDATE jobs SET client_id = %s WHERE job_id = %s", (client, job_id))

    # -- receipts --

    def get_receipt(self, receipt_hash: str) -> receipt_pb2.Receipt | None:
        row = self.conn.execute(pgreads.GET_RECEIPT, (receipt_hash,)).fetchone()
        return receipt_pb2.Receipt.FromString(row[0]) if row is not None else None

    def update_receipt(self, receipt: receipt_pb2.Receipt) -> None:
        self.conn.execute(_PUT_RECEIPT, (receipt.receipt_hash, *_receipt_columns(receipt)))

    def held_receipts(self) -> list[receipt_pb2.Receipt]:
        """Receipts whose MINT waits for a verification by re-execution."""
        rows = self.conn.execute("SELECT body FROM receipts WHERE held ORDER BY receipt_hash").fetchall()
        return [receipt_pb2.Receipt.FromString(r[0]) for r in rows]

    def unsettled_receipts(self) -> list[receipt_pb2.Receipt]:
        """Receipts whose MINT is not final yet (or not yet accepted), in receipt-hash order."""
        rows = self.conn.execute("SELECT body FROM receipts WHERE unsettled ORDER BY receipt_hash").fetchall()
        return [receipt_pb2.Receipt.FromString(r[0]) for r in rows]

    def iter_receipts(self) -> Iterator[receipt_pb2.Receipt]:
        after = ""  # pages by key: no transaction or cursor held open between the caller's steps
        while True:
            rows = self.conn.execute("SELECT receipt_hash, body FROM receipts WHERE receipt_hash > %s "
                                     "ORDER BY receipt_hash LIMIT %s", (after, _PAGE)).fetchall()
            for _, body in rows:
                yield receipt_pb2.Receipt.FromString(body)
            if len(rows) < _PAGE:
                return
            after = rows[-1][0]

    def client_receipts(self, client_id: str, *, before: bytes | None,
                        limit: int) -> tuple[list[receipt_pb2.Receipt], bytes | None]:
        sql, args = pgreads.client_receipts_query(client_id, before, limit)
        return pgreads.client_receipts_page(self.conn.execute(sql, args).fetchall(), limit)

    # -- meta --

    def get_meta(self, key: str) -> bytes | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = %s", (key,)).fetchone()
        return bytes(row[0]) if row is not None else None

    def put_meta(self, key: str, value: bytes) -> None:
        self.conn.execute("INSERT INTO meta (key, value) VALUES (%s, %s) "
                          "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value", (key, bytes(value)))

    def first_meta(self, key: str, value: bytes) -> bytes:
        row = self.conn.execute(
            "WITH ins AS (INSERT INTO meta (key, value) VALUES (%s, %s) ON CONFLICT (key) DO NOTHING RETURNING value) "
            "SELECT value FROM ins UNION ALL SELECT value FROM meta WHERE key = %s LIMIT 1",
            (key, bytes(value), key)).fetchone()
        return bytes(row[0]) if row is not None else self.get_meta(key) or bytes(value)

    def delete_meta(self, key: str) -> None:
        self.conn.execute("DELETE FROM meta WHERE key = %s", (key,))

    # -- verification decisions (schema 0004; docs/scaling.md, "What exists today (fifth slice)") --

    def decide_once(self, job_id: str, runs: int) -> bool:
        """The first coordinator to insert (job, runs) decides it; the same one may ask again (a
        decision interrupted by an error); another takes the row over only once its holder died
        (its advisory lock is free: it may have claimed and never decided)."""
        conn = self.conn
        me = self.coordinator_id
        if conn.execute("INSERT INTO verification_decisions (job_id, runs, coordinator) VALUES (%s, %s, %s) "
                        "ON CONFLICT (job_id, runs) DO NOTHING RETURNING 1", (job_id, runs, me)).fetchone():
            return True
        return conn.execute(_TAKE_DECISION, (me, job_id, runs, me)).fetchone() is not None

    def meta_items(self, prefix: str) -> list[tuple[str, bytes]]:
        rows = self.conn.execute("SELECT key, value FROM meta WHERE key >= %s AND starts_with(key, %s) "
                                 "ORDER BY key", (prefix, prefix)).fetchall()
        return [(r[0], bytes(r[1])) for r in rows]


_COLS = "active, body, state, model, priority, created_ms, queued_ms, verify, client_id"
_STILL_OURS = " WHERE EXISTS (SELECT 1 FROM jobs WHERE job_id = %s AND owner = %s AND claim_epoch = %s) "
_UPDATE_JOB = ("UPDATE jobs SET (" + _COLS + ") = (%s, %s, %s, %s, %s, %s, %s, %s, %s) "
               "WHERE job_id = %s AND owner = %s AND claim_epoch = %s RETURNING job_id")  # the fence
_INSERT_JOB = ("INSERT INTO jobs (job_id, " + _COLS + ", owner, claim_epoch, lease_until) "
               "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, 1, now() + make_interval(secs => %s)) "
               "ON CONFLICT (job_id) DO UPDATE SET (" + _COLS + ") = (EXCLUDED.active, EXCLUDED.body, EXCLUDED.state, "
               "EXCLUDED.model, EXCLUDED.priority, EXCLUDED.created_ms, EXCLUDED.queued_ms, EXCLUDED.verify, "
               "EXCLUDED.client_id) "
               "WHERE NOT jobs.active")  # a finished job written again; an active row of another is never overwritten
_CLAIMED = ("RETURNING j.job_id, j.claim_epoch, j.body, j.excluded, j.queued_ms, j.cancel_requested, "
            "q.owner, q.expired")
_SET_OWNER = ("UPDATE jobs j SET owner = %(me)s, claim_epoch = j.claim_epoch + 1, "
              "lease_until = now() + make_interval(secs => %(lease)s) FROM ")
_CLAIM = (_SET_OWNER + "(SELECT job_id, NULL::text AS owner, false AS expired FROM jobs "
          "WHERE state = 1 AND owner IS NULL AND model = ANY(%(models)s::text[]) AND NOT (job_id = ANY(%(skip)s::text[])) "
          "ORDER BY priority DESC, created_ms, job_id LIMIT %(n)s FOR UPDATE SKIP LOCKED) q "
          "WHERE j.job_id = q.job_id " + _CLAIMED)
_CLAIM_IDS = (_SET_OWNER + "(SELECT job_id, NULL::text AS owner, false AS expired FROM jobs "
              "WHERE state = 1 AND owner IS NULL AND job_id = ANY(%(ids)s::text[]) FOR UPDATE SKIP LOCKED) q "
              "WHERE j.job_id = q.job_id " + _CLAIMED)
# an owner is alive while its session lock is held (pg_locks: classid and objid are the key's halves)
_ALIVE = ("EXISTS (SELECT 1 FROM coordinators c JOIN pg_locks l ON l.locktype = 'advisory' AND l.granted "
          "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
          "AND l.classid = (c.lock_key >> 32)::oid AND l.objid = (c.lock_key & 4294967295)::oid "
          "AND l.objsubid = 1 WHERE c.id = t.owner)")
# a verification decision claimed by a coordinator that died before it decided: the next one takes it
# (the row locked by the UPDATE: of two that try at once, the second finds the first alive and loses)
_TAKE_DECISION = ("UPDATE verification_decisions t SET coordinator = %s, claimed = now() WHERE t.job_id = %s "
                  "AND t.runs = %s AND (t.coordinator = %s OR NOT " + _ALIVE.replace("t.owner", "t.coordinator")
                  + ") RETURNING 1")
_TAKE_OVER = (_SET_OWNER + "(SELECT job_id, owner, coalesce(lease_until < now(), true) AS expired FROM jobs t "
              "WHERE (t.active AND t.owner IS NOT NULL AND (t.lease_until < now() OR (t.owner <> %(me)s AND NOT "
              + _ALIVE + "))) OR (t.state = 1 AND t.owner IS NULL AND t.queued_ms < %(now)s - "
              "CASE WHEN t.verify THEN %(vttl)s ELSE %(ttl)s END) "
              "ORDER BY t.created_ms LIMIT %(n)s FOR UPDATE SKIP LOCKED) q "
              "WHERE j.job_id = q.job_id " + _CLAIMED)
# the epoch comes from one sequence: a newer connection has the higher epoch, even after the row was deleted
_OWN_MINER = ("WITH up AS (INSERT INTO miner_sessions (miner, coordinator, epoch, lease_until, info) "
              "VALUES (%(miner)s, %(me)s, nextval('miner_session_epochs'), now() + make_interval(secs => %(lease)s), "
              "%(info)s) ON CONFLICT (miner) DO UPDATE SET coordinator = EXCLUDED.coordinator, epoch = EXCLUDED.epoch, "
              "lease_until = EXCLUDED.lease_until, info = EXCLUDED.info, running = 0, since = now() RETURNING epoch) "
              "SELECT epoch, pg_notify('aitbc_miners', %(miner)s || ':' || epoch) FROM up")  # the newest connection wins
_REOWN_MINER = ("INSERT INTO miner_sessions (miner, coordinator, epoch, lease_until, info) "
                "VALUES (%s, %s, %s, now() + make_interval(secs => %s), %s) ON CONFLICT (miner) DO NOTHING RETURNING miner")
_PUT_REQUEST = ("INSERT INTO requests (client_id, request_id, job_id) VALUES (%s, %s, %s) "
                "ON CONFLICT (client_id, request_id) DO NOTHING")  # the first job keeps it (claim_request)
_PUT_CLIENT_RECEIPT = ("INSERT INTO client_receipts (key, client_id, receipt_hash) VALUES (%s, %s, %s) "
                       "ON CONFLICT (key) DO UPDATE SET receipt_hash = EXCLUDED.receipt_hash")
_PUT_CLIENT_RECEIPT_FENCED = ("INSERT INTO client_receipts (key, client_id, receipt_hash) SELECT %s, %s, %s"
                              + _STILL_OURS + "ON CONFLICT (key) DO UPDATE SET receipt_hash = EXCLUDED.receipt_hash")
_RECEIPT_UPSERT = ("ON CONFLICT (receipt_hash) DO UPDATE SET held = EXCLUDED.held, unsettled = EXCLUDED.unsettled, "
                   "body = EXCLUDED.body")
_PUT_RECEIPT = "INSERT INTO receipts (receipt_hash, held, unsettled, body) VALUES (%s, %s, %s, %s) " + _RECEIPT_UPSERT
_LOCK_REPUTATION = "SELECT record FROM reputation WHERE miner_id = %s FOR UPDATE"  # the row, held until COMMIT
_PUT_RECEIPT_FENCED = ("INSERT INTO receipts (receipt_hash, held, unsettled, body) SELECT %s, %s, %s, %s"
                       + _STILL_OURS + _RECEIPT_UPSERT)


def _rate(job: job_pb2.Job) -> int:
    charge = charge_of(job)
    return charge.rate if charge is not None else 0


def _job_columns(j: job_pb2.Job) -> tuple[Any, ...]:
    return (j.state in ACTIVE, _stored(j), int(j.state), j.model, _rate(j), j.created_at_unix_ms,
            j.updated_at_unix_ms if j.state == _QUEUED else 0, bool(j.verify_of), _counted_client(j))


def _counted_client(j: job_pb2.Job) -> str:
    """The client whose max_active_jobs the job counts against: a split job's shards do not count
    (their parent does), as in machine.JobRecords."""
    return "" if j.parent_job_id else j.client_id


def _receipt_columns(receipt: receipt_pb2.Receipt) -> tuple[bool, bool, bytes]:
    state = receipt.settlement.state
    return state == HELD, state in UNSETTLED, receipt.SerializeToString(deterministic=True)


@dataclass(frozen=True)
class PoolMiner:
    """A miner connected to some coordinator of the pool (a live miner_sessions row)."""

    miner_id: str
    coordinator: str  # the id of the coordinator its Work stream is on
    info: miner_pb2.MinerInfo
    running: int  # as of that coordinator's last renewal


class _ArtifactReader(io.RawIOBase):
    """An artifact's bytes fetched a chunk (one row) at a time; holds at most one chunk."""

    def __init__(self, store: PostgresJobStore, sha: str, size: int, chunk_bytes: int) -> None:
        self._store, self._sha, self._size, self._chunk_bytes = store, sha, size, chunk_bytes
        self._pos = 0
        self._n = -1
        self._data = memoryview(b"")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        if self._pos >= self._size:
            return 0
        n, off = divmod(self._pos, self._chunk_bytes)
        if n != self._n:
            data = self._store._chunk(self._sha, n)
            if data is None:
                raise OSError(f"artifact {self._sha} was deleted while it was being read")
            self._n, self._data = n, memoryview(data)
        out = memoryview(buffer).cast("B")
        take = min(len(out), len(self._data) - off)
        if take <= 0:
            raise OSError(f"artifact {self._sha} is shorter than its record ({self._size} bytes)")
        out[:take] = self._data[off:off + take]
        self._pos += take
        return take


class PostgresReservations:
    """fees.Reservations in the shared database: every coordinator sees every reservation, and
    check-then-reserve of one client's escrow runs in one transaction under an advisory lock on the
    client's address, so two coordinators cannot together reserve more than the escrow holds."""

    def __init__(self, store: PostgresJobStore) -> None:
        self._store = store
        self._orphans: dict[str, float] = {}  # job id -> when this process first saw its reservation without a job

    def restore(self, charges: Iterable[Charge]) -> None:
        pass  # the rows are the truth: nothing to rebuild

    def sweep_orphans(self, now: float, grace_s: float) -> list[str]:
        """Delete the reservations that had no job row when an earlier call of this process saw them
        `grace_s` or more ago and still have none: a coordinator that died between a paid SubmitJob's
        reservation and its job's write left them, holding escrow for nothing. `now` is monotonic
        seconds; returns the job ids of the rows deleted."""
        conn = self._store.conn
        due = sorted(j for j, seen in self._orphans.items() if now - seen >= grace_s)
        gone = []
        if due:  # the job is looked for again as the row goes: one written since the sighting keeps it
            gone = sorted(r[0] for r in conn.execute(
                "DELETE FROM reservations r WHERE r.job_id = ANY(%s::text[]) AND NOT EXISTS "
                "(SELECT 1 FROM jobs j WHERE j.job_id = r.job_id) RETURNING r.job_id", (due,)).fetchall())
        rows = conn.execute("SELECT r.job_id FROM reservations r WHERE NOT EXISTS "
                            "(SELECT 1 FROM jobs j WHERE j.job_id = r.job_id)").fetchall()
        self._orphans = {r[0]: self._orphans.get(r[0], now) for r in rows}  # when each was first seen so
        return gone

    def reserved(self, client_address: str) -> int:
        row = self._store.conn.execute("SELECT coalesce(sum(total), 0) FROM reservations WHERE client_address = %s",
                                       (client_address,)).fetchone()
        return int(row[0]) if row else 0

    def holds(self, job_id: str) -> bool:
        return self._store.conn.execute("SELECT 1 FROM reservations WHERE job_id = %s", (job_id,)).fetchone() is not None

    def reserve(self, charge: Charge, escrow_available: int) -> None:
        conn = self._store.conn
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_ESCROW_LOCKS, charge.client_address))
            if conn.execute("SELECT 1 FROM reservations WHERE job_id = %s", (charge.job_id,)).fetchone():
                return
            row = conn.execute("SELECT coalesce(sum(total), 0) FROM reservations WHERE client_address = %s",
                               (charge.client_address,)).fetchone()
            check_escrow(charge, escrow_available, int(row[0]) if row else 0)
            conn.execute("INSERT INTO reservations (job_id, client_address, total, quote_hash, units) "
                         "VALUES (%s, %s, %s, %s, %s)", (charge.job_id, charge.client_address, charge.total,
                                                         charge.quote_hash, charge.units))

    def release(self, job_id: str) -> Charge | None:
        row = self._store.conn.execute("DELETE FROM reservations WHERE job_id = %s "
                                       "RETURNING client_address, total, quote_hash, units", (job_id,)).fetchone()
        return Charge(job_id, row[0], int(row[1]), row[2], int(row[3])) if row is not None else None

    def __len__(self) -> int:
        row = self._store.conn.execute("SELECT count(*) FROM reservations").fetchone()
        return int(row[0]) if row else 0


class PostgresReputationStore:
    """hub.reputation.ReputationStore in the coordinator's database (table `reputation`), shared by
    every coordinator on it: the rows are the truth. `update` locks the miner's row (`SELECT ...
    FOR UPDATE`; a first record is inserted, and a concurrent first insert waited for), applies the
    policy's change to the record as committed, writes it and sends `NOTIFY aitbc_reputation,
    '<miner>'` in the same transaction: two coordinators updating one miner at once apply their
    changes one after the other, none lost, and every coordinator hears of each change at commit."""

    shared = True

    def __init__(self, store: PostgresJobStore) -> None:
        self._store = store

    def get(self, miner_id: str) -> MinerRecord | None:
        row = self._store.conn.execute("SELECT record FROM reputation WHERE miner_id = %s", (miner_id,)).fetchone()
        return MinerRecord.from_bytes(bytes(row[0])) if row is not None else None

    def put(self, record: MinerRecord) -> None:
        self._store.conn.execute("INSERT INTO reputation (miner_id, record) VALUES (%s, %s) "
                                 "ON CONFLICT (miner_id) DO UPDATE SET record = EXCLUDED.record",
                                 (record.miner_id, record.to_bytes()))

    def update(self, miner_id: str, change: Change) -> MinerRecord:
        # two round trips: BEGIN with the locking read, then the write, the notification and COMMIT
        with self._store._pipelined() as cur:
            row = cur.execute(_LOCK_REPUTATION, (miner_id,)).fetchone()
            if row is None:  # a first record: the insert waits for (and then loses to) a concurrent first one
                record = change(None)
                if cur.execute("INSERT INTO reputation (miner_id, record) VALUES (%s, %s) ON CONFLICT (miner_id) "
                               "DO NOTHING RETURNING miner_id", (miner_id, record.to_bytes())).fetchone() is None:
                    row = cur.execute(_LOCK_REPUTATION, (miner_id,)).fetchone()  # it committed first: change that
            if row is not None:
                record = change(MinerRecord.from_bytes(bytes(row[0])))
                cur.execute("UPDATE reputation SET record = %s WHERE miner_id = %s", (record.to_bytes(), miner_id))
            cur.execute("SELECT pg_notify('aitbc_reputation', %s)", (miner_id,))
        return record

    def records(self, miner_ids: list[str]) -> dict[str, MinerRecord]:
        if not miner_ids:
            return {}
        rows = self._store.conn.execute("SELECT record FROM reputation WHERE miner_id = ANY(%s::text[])",
                                        (list(miner_ids),)).fetchall()
        return {(r := MinerRecord.from_bytes(bytes(row[0]))).miner_id: r for row in rows}

    def all(self) -> list[MinerRecord]:
        rows = self._store.conn.execute("SELECT record FROM reputation ORDER BY miner_id").fetchall()
        return [MinerRecord.from_bytes(bytes(r[0])) for r in rows]
