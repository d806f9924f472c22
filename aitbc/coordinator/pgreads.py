"""The PostgreSQL store's client-facing reads through psycopg 3's async driver (issue 18).

GetJob, GetJobResult, GetReceipt, ListReceipts and WatchJob of a job this coordinator does not hold
read the database; through the synchronous connection each such read would stall the event loop
(every RPC, every miner stream) for its round trip, and for as long as a slow database takes.
These reads go through a small pool of `psycopg.AsyncConnection`s instead, and are awaited: while
one waits for the database, the loop serves everything else.

- **The pool** (`ReadPool`): at most `size` connections (coordinator.toml `database_read_pool`,
  default 4), opened as reads need them and kept for the next; a read waits for a free one. The
  same URL as the synchronous connection, so its `options` (a `statement_timeout`, for one) apply
  to these too. Closed with the store.
- **Errors**: a database that cannot be reached, a connection the server dropped, or a statement
  the server cancelled (its `statement_timeout`) is `Unavailable` (UNAVAILABLE, worth retrying:
  the SDK moves to another coordinator), naming the database without its password. A broken
  connection is dropped, the next read opens another; a read is never repeated blindly.
- **Not the decision path.** The machine's writes (claims, fenced writes, releases, renewals) stay
  on the synchronous connection inside one step of the event loop: "decide, write, then send"
  (docs/scaling.md, "Driver", says what the next slice would change).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any

import psycopg

from aitbc.errors import Unavailable
from aitbc.v1 import job_pb2, receipt_pb2

DEFAULT_POOL = 4
SETTING = "database_read_pool"

# the statements, shared with the synchronous reads of aitbc.coordinator.pgstore (one of each)
GET_JOB = "SELECT body FROM jobs WHERE job_id = %s"
GET_RECEIPT = "SELECT body FROM receipts WHERE receipt_hash = %s"
GET_ARTIFACT = "SELECT size, chunk_bytes FROM artifacts WHERE sha256 = %s"
GET_CHUNK = "SELECT data FROM artifact_chunks WHERE sha256 = %s AND n = %s"
READ_EVENTS = ("SELECT e.id, e.job_id, e.kind, e.attempt, e.payload FROM unnest(%s::text[], %s::bigint[]) "
               "AS w(job_id, last) JOIN job_events e ON e.job_id = w.job_id AND e.id > w.last ORDER BY e.id LIMIT %s")


def client_receipts_query(client_id: str, before: bytes | None, limit: int) -> tuple[str, tuple[Any, ...]]:
    sql = ("SELECT c.key, r.body FROM client_receipts c JOIN receipts r USING (receipt_hash) "
           "WHERE c.client_id = %s" + (" AND c.key < %s" if before is not None else "") +
           " ORDER BY c.key DESC LIMIT %s")
    return sql, ((client_id, before, limit) if before is not None else (client_id, limit))


def client_receipts_page(rows: list[Any], limit: int) -> tuple[list[receipt_pb2.Receipt], bytes | None]:
    page = [receipt_pb2.Receipt.FromString(r[1]) for r in rows]
    return page, (bytes(rows[-1][0]) if rows and len(rows) == limit else None)


def events_args(after: dict[str, int], limit: int) -> tuple[list[str], list[int], int]:
    ids = sorted(after)
    return ids, [after[j] for j in ids], limit


def event_rows(rows: list[Any]) -> list[tuple[int, str, int, int, bytes]]:
    return [(int(r[0]), r[1], int(r[2]), int(r[3]), bytes(r[4])) for r in rows]


def unavailable(shown: str, what: str, exc: BaseException) -> Unavailable:
    """The one message for a database this coordinator lost (`shown`: its URL without the password),
    for the awaited reads here and the synchronous store calls alike (PostgresJobStore.error)."""
    return Unavailable(f"the coordinator's database at {shown} {what}: {str(exc).strip()}; retry, or "
                       "ask another coordinator")


def lost(exc: BaseException) -> str | None:
    """What a connectivity error says of the database (for `unavailable`); None for any other error."""
    if isinstance(exc, psycopg.errors.QueryCanceled):
        return "cancelled the statement"
    if isinstance(exc, psycopg.OperationalError):  # AdminShutdown, a connection lost or refused, ...
        return "did not answer"
    return None


class ReadPool:
    """At most `size` async connections to the database, opened on demand and reused."""

    def __init__(self, url: str, shown: str, size: int, *, connect_timeout_s: int = 10) -> None:
        if not 1 <= size <= 64:
            raise ValueError(f"{SETTING} must be between 1 and 64 (got {size!r})")
        self.url, self.shown, self.size = url, shown, size
        self._timeout = connect_timeout_s
        self._idle: list[psycopg.AsyncConnection[Any]] = []
        self._busy: set[psycopg.AsyncConnection[Any]] = set()
        self._slots: asyncio.Semaphore | None = None  # made on first use, in the loop that reads
        self._closed = False
        # tests only: awaited on the read's connection before its statements (a test stalls the
        # database with it: a lock the read then waits for in the server)
        self.before_read: Callable[[psycopg.AsyncConnection[Any]], Awaitable[None]] | None = None

    def _unavailable(self, what: str, exc: BaseException) -> Unavailable:
        return unavailable(self.shown, what, exc)

    async def _open(self) -> psycopg.AsyncConnection[Any]:
        try:
            return await psycopg.AsyncConnection.connect(self.url, autocommit=True, connect_timeout=self._timeout,
                                                         application_name="aitbc-coordinator-reads")
        except psycopg.OperationalError as exc:
            raise self._unavailable("cannot be reached", exc) from None

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A connection of the pool for one read (waits for a free one); database errors become
        Unavailable, and a connection that broke is dropped."""
        if self._closed:
            raise Unavailable("the coordinator is stopping: its database connections are closed")
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.size)
        async with self._slots:
            conn = self._idle.pop() if self._idle else await self._open()
            self._busy.add(conn)
            try:
                if self.before_read is not None:
                    await self.before_read(conn)
                yield conn
            except psycopg.OperationalError as exc:
                what = "cancelled the read" if isinstance(exc, psycopg.errors.QueryCanceled) else "did not answer"
                raise self._unavailable(what, exc) from None
            finally:
                self._busy.discard(conn)
                # kept only when idle: a broken or closed connection's status is UNKNOWN
                if self._closed or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                    _finish(conn)
                else:
                    self._idle.append(conn)

    async def fetchone(self, sql: str, args: Any) -> Any:
        async with self.connection() as conn:
            cur = await conn.execute(sql, args)
            return await cur.fetchone()

    async def fetchall(self, sql: str, args: Any) -> list[Any]:
        async with self.connection() as conn:
            cur = await conn.execute(sql, args)
            return await cur.fetchall()

    def close(self) -> None:
        """Close every connection (synchronous: the store's close may run after its loop ended)."""
        self._closed = True
        for conn in [*self._idle, *self._busy]:
            _finish(conn)
        self._idle.clear()


def _finish(conn: psycopg.AsyncConnection[Any]) -> None:
    """Close an async connection without awaiting: libpq's PQfinish (what AsyncConnection.close does)."""
    if not conn.closed:
        conn.pgconn.finish()


class AsyncReads:
    """The awaited reads of PostgresJobStore (JobStore's `aget_job`, ...); each returns what its
    synchronous twin in pgstore returns."""

    _reads: ReadPool

    async def aget_job(self, job_id: str) -> job_pb2.Job | None:
        row = await self._reads.fetchone(GET_JOB, (job_id,))
        return job_pb2.Job.FromString(row[0]) if row is not None else None

    async def aget_receipt(self, receipt_hash: str) -> receipt_pb2.Receipt | None:
        row = await self._reads.fetchone(GET_RECEIPT, (receipt_hash,))
        return receipt_pb2.Receipt.FromString(row[0]) if row is not None else None

    async def aclient_receipts(self, client_id: str, *, before: bytes | None,
                               limit: int) -> tuple[list[receipt_pb2.Receipt], bytes | None]:
        sql, args = client_receipts_query(client_id, before, limit)
        return client_receipts_page(await self._reads.fetchall(sql, args), limit)

    async def aopen_artifact(self, sha256_hex: str) -> AsyncArtifactReader | None:
        row = await self._reads.fetchone(GET_ARTIFACT, (sha256_hex,))
        if row is None:
            return None
        return AsyncArtifactReader(self._reads, sha256_hex, int(row[0]), int(row[1]))

    async def aread_events(self, after: dict[str, int], limit: int) -> list[tuple[int, str, int, int, bytes]]:
        """As `read_events`: the event rows of these jobs past the last id seen of each."""
        if not after:
            return []
        return event_rows(await self._reads.fetchall(READ_EVENTS, events_args(after, limit)))


class AsyncArtifactReader:
    """An artifact's bytes fetched a chunk (one row) at a time through the read pool; holds at most
    one chunk besides what `read` returns. An artifact collected while it is read ends the read
    with an error rather than short data (as the synchronous reader)."""

    def __init__(self, reads: ReadPool, sha: str, size: int, chunk_bytes: int) -> None:
        self._reads, self._sha, self.size, self._chunk_bytes = reads, sha, size, chunk_bytes
        self._pos = 0
        self._n = -1
        self._data = b""

    async def read(self, n: int = -1) -> bytes:
        end = self.size if n < 0 else min(self.size, self._pos + n)
        out = []
        while self._pos < end:
            k, off = divmod(self._pos, self._chunk_bytes)
            if k != self._n:
                row = await self._reads.fetchone(GET_CHUNK, (self._sha, k))
                if row is None:
                    raise OSError(f"artifact {self._sha} was deleted while it was being read")
                self._n, self._data = k, bytes(row[0])
            piece = self._data[off:off + end - self._pos]
            if not piece:
                raise OSError(f"artifact {self._sha} is shorter than its record ({self.size} bytes)")
            out.append(piece)
            self._pos += len(piece)
        return b"".join(out)

    def close(self) -> None:
        self._data = b""

    async def __aenter__(self) -> AsyncArtifactReader:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.close()
