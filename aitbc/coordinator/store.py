"""The coordinator's durable state behind one protocol: jobs, artifacts, receipts, reputation, meta.

`JobStore` is the contract; `LmdbJobStore` is the embedded default and `MemoryJobStore` its
in-memory twin. tests/coordinator/test_store_contract.py is one suite every backend passes, so a
new backend (PostgreSQL, for several coordinators on one database) is proven by the same tests.
Operations stay at the level a SQL store implements in one statement or transaction: write a batch
of jobs with their artifacts and receipts, read a job, list the active ones, update a receipt.

A job is stored without its receipt (it keeps the receipt hash): the receipt table is the one copy,
and the receipt book (aitbc.coordinator.receipts) is its only writer of settlement state.

LMDB keys are versioned (b"v1:"). LMDB is opened without a per-commit fsync and flushed by a
background thread every `flush_interval_s`: a killed process loses nothing (the pages are in the
OS), an OS crash may lose the last interval. The ledger keeps full sync.
"""

from __future__ import annotations

import bisect
import io
import os
import struct
import threading
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Protocol

import lmdb

from aitbc.config import private_dir
from aitbc.hub.reputation import LmdbReputationStore, MemoryReputationStore, ReputationStore
from aitbc.jobs import ACTIVE
from aitbc.v1 import job_pb2, receipt_pb2

_V = b"v1:"
UNSETTLED = frozenset({
    receipt_pb2.SETTLEMENT_STATE_PENDING,
    receipt_pb2.SETTLEMENT_STATE_SUBMITTED,
    receipt_pb2.SETTLEMENT_STATE_INCLUDED,
})
HELD = receipt_pb2.SETTLEMENT_STATE_HELD


@dataclass(frozen=True, slots=True)
class Claim:
    """A job a shared store handed to this coordinator (aitbc.coordinator.pgstore): the job as stored,
    the claim's epoch (every later write is fenced by it), the miners it must avoid, when it was
    queued, whether another coordinator asked to cancel it, and (taken over) its previous owner
    and whether that one's lease had expired (else: it died)."""

    job: job_pb2.Job
    epoch: int
    excluded: frozenset[str]
    queued_ms: int
    cancel_requested: bool = False
    previous_owner: str = ""
    lease_expired: bool = False


class JobStore(Protocol):
    """What the coordinator keeps. Every write is one transaction: all of it or nothing.

    `shared`: several coordinators use the store at once (PostgreSQL). Such a store also claims,
    releases and fences jobs (PostgresJobStore: claim, claim_ids, take_over, release, renew, holds,
    request_cancel, settler); LMDB and memory have a single owner and keep every job."""

    shared: bool

    def write(
        self,
        jobs: Iterable[job_pb2.Job],
        *,
        artifacts: Iterable[tuple[str, ArtifactData]] = (),
        receipts: Iterable[tuple[job_pb2.Job, receipt_pb2.Receipt]] = (),
    ) -> Collection[str] | None:
        """Jobs (as they are now), artifacts by sha256 (never overwritten; a Path is a finished
        upload the store takes over), and new receipts with the job they belong to (indexed for
        the job's client, newest first). An artifact is kept until the latest
        `expires_at_unix_ms` any job written names for it (0: kept for good). A shared store
        returns the jobs whose claim another coordinator took over: neither they nor their
        receipts were written."""
        ...

    def get_job(self, job_id: str) -> job_pb2.Job | None: ...
    def active_jobs(self) -> list[job_pb2.Job]: ...
    def job_for_request(self, client_id: str, request_id: str) -> str | None: ...

    def claim_request(self, client_id: str, request_id: str, job_id: str) -> str:
        """Just before `job_id` is written: the job that owns (client, request_id), `job_id` when
        none did. A shared store records the request at once (the first coordinator wins); a
        single-owner store records it with the job's write."""
        ...

    def open_artifact(self, sha256_hex: str) -> BinaryIO | None:
        """The artifact's bytes as a binary file (read it in pieces), or None: never stored or collected."""
        ...

    def expired_artifacts(self, now_ms: int, limit: int) -> list[tuple[str, str]]:
        """At most `limit` artifacts kept until `now_ms` or before, oldest first: (sha256, the job
        whose expiry it is)."""
        ...

    def keep_artifact(self, sha256_hex: str, until_ms: int) -> None:
        """Postpone an artifact's expiry (never earlier than it was)."""
        ...

    def delete_artifacts(self, shas: Iterable[str]) -> None:
        """Delete artifacts' bytes (garbage collection). Jobs and receipts that name them stay."""
        ...

    def get_receipt(self, receipt_hash: str) -> receipt_pb2.Receipt | None: ...
    def update_receipt(self, receipt: receipt_pb2.Receipt) -> None: ...
    def held_receipts(self) -> list[receipt_pb2.Receipt]: ...
    def unsettled_receipts(self) -> list[receipt_pb2.Receipt]: ...
    def iter_receipts(self) -> Iterator[receipt_pb2.Receipt]: ...

    def client_receipts(self, client_id: str, *, before: bytes | None,
                        limit: int) -> tuple[list[receipt_pb2.Receipt], bytes | None]:
        """Newest first. Returns the page and the key to continue before (None at the end)."""
        ...

    def get_meta(self, key: str) -> bytes | None: ...
    def put_meta(self, key: str, value: bytes) -> None: ...

    def first_meta(self, key: str, value: bytes) -> bytes:
        """The entry's value; `value` stored first when there is none (on a shared store the
        first coordinator's value wins: every coordinator gets the same one)."""
        ...

    def delete_meta(self, key: str) -> None: ...
    def meta_items(self, prefix: str) -> list[tuple[str, bytes]]:
        """Meta entries whose key starts with prefix, in key order (the webhook outbox)."""
        ...

    def decide_once(self, job_id: str, runs: int) -> bool:
        """May this process take the verification decision of original job `job_id` over `runs`
        runs? A shared store: only the first coordinator that asks (asking again, it still may;
        and the next one once that one died); a single-owner store: always."""
        ...

    def reputation(self) -> ReputationStore: ...
    def close(self) -> None: ...

    # The client-facing reads, awaited (GetJob, GetJobResult, GetReceipt, ListReceipts, WatchJob):
    # a store a network hop away (PostgreSQL) answers them without stalling the event loop; an
    # in-process store (LMDB, memory) answers them with its synchronous reads (InProcessReads).
    # Each returns what its synchronous twin returns.
    async def aget_job(self, job_id: str) -> job_pb2.Job | None: ...
    async def aget_receipt(self, receipt_hash: str) -> receipt_pb2.Receipt | None: ...

    async def aclient_receipts(self, client_id: str, *, before: bytes | None,
                               limit: int) -> tuple[list[receipt_pb2.Receipt], bytes | None]: ...

    async def aopen_artifact(self, sha256_hex: str) -> AsyncArtifact | None:
        """The artifact's bytes as an async file (`await f.read(n)`), or None, as `open_artifact`."""
        ...


class AsyncArtifact(Protocol):
    """An artifact being read: `await read(n)` gives the next n bytes (fewer at the end, b"" past
    it; -1: all that is left); `async with` closes it."""

    async def read(self, n: int = -1) -> bytes: ...
    def close(self) -> None: ...
    async def __aenter__(self) -> AsyncArtifact: ...

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None: ...


class FileArtifact:
    """An in-process store's artifact file behind the AsyncArtifact interface: reads from a local
    file or memory, fast enough for the event loop (no thread)."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f

    async def read(self, n: int = -1) -> bytes:
        return self._f.read(n)

    def close(self) -> None:
        self._f.close()

    async def __aenter__(self) -> FileArtifact:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.close()


class InProcessReads:
    """The awaited reads of a store in this process (LMDB, memory): its synchronous reads, called
    directly (a memory-mapped file or a dict answers in microseconds; a thread would cost more)."""

    def get_job(self, job_id: str) -> job_pb2.Job | None: ...
    def get_receipt(self, receipt_hash: str) -> receipt_pb2.Receipt | None: ...
    def open_artifact(self, sha256_hex: str) -> BinaryIO | None: ...

    def client_receipts(self, client_id: str, *, before: bytes | None,
                        limit: int) -> tuple[list[receipt_pb2.Receipt], bytes | None]: ...

    async def aget_job(self, job_id: str) -> job_pb2.Job | None:
        return self.get_job(job_id)

    async def aget_receipt(self, receipt_hash: str) -> receipt_pb2.Receipt | None:
        return self.get_receipt(receipt_hash)

    async def aclient_receipts(self, client_id: str, *, before: bytes | None,
                               limit: int) -> tuple[list[receipt_pb2.Receipt], bytes | None]:
        return self.client_receipts(client_id, before=before, limit=limit)

    async def aopen_artifact(self, sha256_hex: str) -> FileArtifact | None:
        f = self.open_artifact(sha256_hex)
        return FileArtifact(f) if f is not None else None


ArtifactData = bytes | Path  # the bytes, or a finished upload's file (moved into the store, not copied)
_KEPT = 0  # an expiry of 0: kept for good (artifact_retention_s = 0, or no job names the artifact)


def _later(a: int, b: int) -> int:
    return _KEPT if _KEPT in (a, b) else max(a, b)


def _expiries(jobs: Iterable[job_pb2.Job]) -> dict[str, tuple[int, str]]:
    """sha256 -> (the latest expiry the jobs name for it, the job that names it)."""
    out: dict[str, tuple[int, str]] = {}
    for job in jobs:
        for art in job.artifacts:
            old = out.get(art.sha256)
            if old is None or _later(old[0], art.expires_at_unix_ms) != old[0]:
                out[art.sha256] = (art.expires_at_unix_ms, job.job_id)
    return out


def _check_sha(sha: str) -> str:
    if not sha or len(sha) > 64 or sha.strip("0123456789abcdef"):
        raise ValueError(f"not a lower-case hex sha256: {sha!r}")
    return sha


class ArtifactFiles:
    """Content-addressed files beside the LMDB: <folder>/<sha[:2]>/<sha>, 0600 in 0700 folders.
    The LMDB's record says which are stored; a file is written (or moved in) before the record."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = private_dir(folder)
        self._made: set[str] = set()

    def path(self, sha: str) -> Path:
        return self.folder / _check_sha(sha)[:2] / sha

    def place(self, sha: str, data: ArtifactData) -> Path | None:
        """Put the bytes in place; returns the path when this call created it (None: already there)."""
        dest = self.path(sha)
        if sha[:2] not in self._made:
            private_dir(dest.parent)
            self._made.add(sha[:2])
        if dest.exists():  # the same bytes (content-addressed): nothing to write
            if isinstance(data, Path):
                data.unlink(missing_ok=True)
            return None
        if isinstance(data, Path):
            os.chmod(data, 0o600)
            os.replace(data, dest)
            return dest
        tmp = dest.with_name(f".{sha}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, dest)
        return dest

    def open(self, sha: str) -> BinaryIO | None:
        try:
            return open(self.path(sha), "rb")
        except FileNotFoundError:
            return None

    def delete(self, sha: str) -> None:
        self.path(sha).unlink(missing_ok=True)


def _stored(job: job_pb2.Job) -> bytes:
    if job.HasField("receipt"):  # the receipt table is the one copy
        job = _copy(job)
        job.ClearField("receipt")
    return job.SerializeToString(deterministic=True)


def _copy(job: job_pb2.Job) -> job_pb2.Job:
    out = job_pb2.Job()
    out.CopyFrom(job)
    return out


def _request_key(client_id: str, request_id: str) -> bytes:
    return client_id.encode() + b"\x00" + request_id.encode()


def _client_receipt_key(job: job_pb2.Job) -> bytes:
    ordinal = struct.pack(">Q", job.finished_at_unix_ms or job.updated_at_unix_ms)
    return job.client_id.encode() + b"\x00" + ordinal + job.job_id.encode()


class LmdbJobStore(InProcessReads):
    """Jobs, receipts and meta in one LMDB; artifact bytes in content-addressed files beside it
    (`artifacts`, default <path>/../artifacts), their records and expiry index in the LMDB."""

    shared = False

    def __init__(self, path: str | Path, *, artifacts: str | Path | None = None, map_size: int = 1 << 36,
                 flush_interval_s: float = 0.2) -> None:
        path = private_dir(path)
        self.files = ArtifactFiles(artifacts if artifacts is not None else path.parent / "artifacts")
        self.env = lmdb.open(str(path), map_size=map_size, max_dbs=16, sync=False, metasync=False, mode=0o600)
        self._jobs = self.env.open_db(_V + b"jobs")
        self._active = self.env.open_db(_V + b"active")
        self._legacy_artifacts = self.env.open_db(_V + b"artifacts")  # bytes in the LMDB (before files): read only
        self._artifact_files = self.env.open_db(_V + b"artifact_files")  # sha -> expiry ms (8 bytes; 0 kept)
        self._artifact_expiry = self.env.open_db(_V + b"artifact_expiry")  # expiry ms (8) + sha -> job id
        self._receipts = self.env.open_db(_V + b"receipts")
        self._client_receipts = self.env.open_db(_V + b"client_receipts")
        self._requests = self.env.open_db(_V + b"requests")
        self._meta = self.env.open_db(_V + b"meta")
        self._unsettled = self.env.open_db(_V + b"unsettled")
        self._held = self.env.open_db(_V + b"held")
        self._reputation = LmdbReputationStore(self.env)
        self._closed = threading.Event()
        self._flusher = threading.Thread(target=self._flush_loop, args=(flush_interval_s,), daemon=True)
        self._flusher.start()

    def _flush_loop(self, interval: float) -> None:
        while not self._closed.wait(interval):
            try:
                self.env.sync(True)
            except lmdb.Error:
                return

    def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            self._flusher.join()
            self.env.sync(True)
            self.env.close()

    def reputation(self) -> ReputationStore:
        return self._reputation

    def write(self, jobs: Iterable[job_pb2.Job], *, artifacts: Iterable[tuple[str, ArtifactData]] = (),
              receipts: Iterable[tuple[job_pb2.Job, receipt_pb2.Receipt]] = ()) -> None:
        jobs = list(jobs)
        artifacts = list(artifacts)
        # the files first, then the records that make them stored: a write that fails removes the
        # files it created; a crash in between leaves at most this write's files unreferenced
        placed = [p for p in (self.files.place(sha, data) for sha, data in artifacts) if p is not None]
        try:
            with self.env.begin(write=True) as txn:
                for job in jobs:
                    key = job.job_id.encode()
                    txn.put(key, _stored(job), db=self._jobs)
                    if job.state in ACTIVE:
                        txn.put(key, b"", db=self._active)
                    else:
                        txn.delete(key, db=self._active)
                    if job.request_id:
                        txn.put(_request_key(job.client_id, job.request_id), key, db=self._requests)
                expiries = _expiries(jobs)
                for sha, _ in artifacts:
                    if txn.get(sha.encode(), db=self._artifact_files) is None:
                        until, job_id = expiries.pop(sha, (_KEPT, ""))
                        self._set_expiry(txn, sha, None, until, job_id)
                for sha, (until, job_id) in expiries.items():  # jobs naming stored artifacts extend them
                    raw = txn.get(sha.encode(), db=self._artifact_files)
                    if raw is not None:
                        old = struct.unpack(">Q", raw)[0]
                        if _later(old, until) != old:
                            self._set_expiry(txn, sha, old, until, job_id)
                for job, receipt in receipts:
                    self._put_receipt(txn, receipt)
                    txn.put(_client_receipt_key(job), receipt.receipt_hash.encode(), db=self._client_receipts)
        except BaseException:
            for p in placed:
                p.unlink(missing_ok=True)
            raise

    def _set_expiry(self, txn: lmdb.Transaction, sha: str, old: int | None, until: int, job_id: str) -> None:
        if old:
            txn.delete(struct.pack(">Q", old) + sha.encode(), db=self._artifact_expiry)
        txn.put(sha.encode(), struct.pack(">Q", until), db=self._artifact_files)
        if until != _KEPT:
            txn.put(struct.pack(">Q", until) + sha.encode(), job_id.encode(), db=self._artifact_expiry)

    def open_artifact(self, sha256_hex: str) -> BinaryIO | None:
        with self.env.begin() as txn:
            if txn.get(sha256_hex.encode(), db=self._artifact_files) is None:
                legacy = txn.get(sha256_hex.encode(), db=self._legacy_artifacts)
                return io.BytesIO(legacy) if legacy is not None else None
        return self.files.open(sha256_hex)

    def expired_artifacts(self, now_ms: int, limit: int) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        with self.env.begin() as txn:
            for key, job_id in txn.cursor(db=self._artifact_expiry):
                if len(out) >= limit or struct.unpack(">Q", key[:8])[0] > now_ms:
                    break
                out.append((key[8:].decode(), job_id.decode()))
        return out

    def keep_artifact(self, sha256_hex: str, until_ms: int) -> None:
        with self.env.begin(write=True) as txn:
            raw = txn.get(sha256_hex.encode(), db=self._artifact_files)
            if raw is None:
                return
            old = struct.unpack(">Q", raw)[0]
            if _later(old, until_ms) != old:
                key = struct.pack(">Q", old) + sha256_hex.encode()
                job_id = (txn.get(key, db=self._artifact_expiry) or b"").decode()
                self._set_expiry(txn, sha256_hex, old, until_ms, job_id)

    def delete_artifacts(self, shas: Iterable[str]) -> None:
        shas = list(shas)
        with self.env.begin(write=True) as txn:  # the records first: a file without one is never served
            for sha in shas:
                raw = txn.pop(sha.encode(), db=self._artifact_files)
                if raw is not None and struct.unpack(">Q", raw)[0]:
                    txn.delete(raw + sha.encode(), db=self._artifact_expiry)
        for sha in shas:
            self.files.delete(sha)

    def _put_receipt(self, txn: lmdb.Transaction, receipt: receipt_pb2.Receipt) -> None:
        key = receipt.receipt_hash.encode()
        txn.put(key, receipt.SerializeToString(deterministic=True), db=self._receipts)
        for db, member in ((self._unsettled, receipt.settlement.state in UNSETTLED),
                           (self._held, receipt.settlement.state == HELD)):
            if member:
                txn.put(key, b"", db=db)
            else:
                txn.delete(key, db=db)

    def update_receipt(self, receipt: receipt_pb2.Receipt) -> None:
        with self.env.begin(write=True) as txn:
            self._put_receipt(txn, receipt)

    def _indexed(self, db: object) -> list[receipt_pb2.Receipt]:
        with self.env.begin() as txn:
            keys = [k for k, _ in txn.cursor(db=db)]
            return [receipt_pb2.Receipt.FromString(txn.get(k, db=self._receipts)) for k in keys]

    def held_receipts(self) -> list[receipt_pb2.Receipt]:
        """Receipts whose MINT waits for a verification by re-execution."""
        return self._indexed(self._held)

    def unsettled_receipts(self) -> list[receipt_pb2.Receipt]:
        """Receipts whose MINT is not final yet (or not yet accepted), in receipt-hash order."""
        return self._indexed(self._unsettled)

    def get_job(self, job_id: str) -> job_pb2.Job | None:
        with self.env.begin() as txn:
            raw = txn.get(job_id.encode(), db=self._jobs)
        return job_pb2.Job.FromString(raw) if raw is not None else None

    def job_for_request(self, client_id: str, request_id: str) -> str | None:
        with self.env.begin() as txn:
            raw = txn.get(_request_key(client_id, request_id), db=self._requests)
        return raw.decode() if raw is not None else None

    def claim_request(self, client_id: str, request_id: str, job_id: str) -> str:
        return self.job_for_request(client_id, request_id) or job_id  # one owner: the job's write records it

    def active_jobs(self) -> list[job_pb2.Job]:
        with self.env.begin() as txn:
            ids = [k for k, _ in txn.cursor(db=self._active)]
            return [job_pb2.Job.FromString(txn.get(k, db=self._jobs)) for k in ids]

    def get_receipt(self, receipt_hash: str) -> receipt_pb2.Receipt | None:
        with self.env.begin() as txn:
            raw = txn.get(receipt_hash.encode(), db=self._receipts)
        return receipt_pb2.Receipt.FromString(raw) if raw is not None else None

    def iter_receipts(self) -> Iterator[receipt_pb2.Receipt]:
        with self.env.begin() as txn:
            for _, raw in txn.cursor(db=self._receipts):
                yield receipt_pb2.Receipt.FromString(raw)

    def client_receipts(self, client_id: str, *, before: bytes | None,
                        limit: int) -> tuple[list[receipt_pb2.Receipt], bytes | None]:
        prefix = client_id.encode() + b"\x00"
        out: list[receipt_pb2.Receipt] = []
        with self.env.begin() as txn:
            cur = txn.cursor(db=self._client_receipts)
            start = before if before is not None else prefix + b"\xff" * 9
            if not cur.set_range(start):
                if not cur.last():
                    return [], None
            elif cur.key() >= start:
                if not cur.prev():
                    return [], None
            while cur.key().startswith(prefix):
                raw = txn.get(cur.value(), db=self._receipts)
                if raw is not None:
                    out.append(receipt_pb2.Receipt.FromString(raw))
                if len(out) == limit:
                    return out, cur.key()
                if not cur.prev():
                    break
        return out, None

    def get_meta(self, key: str) -> bytes | None:
        with self.env.begin() as txn:
            return txn.get(key.encode(), db=self._meta)

    def put_meta(self, key: str, value: bytes) -> None:
        with self.env.begin(write=True) as txn:
            txn.put(key.encode(), value, db=self._meta)

    def first_meta(self, key: str, value: bytes) -> bytes:
        with self.env.begin(write=True) as txn:
            if txn.put(key.encode(), value, db=self._meta, overwrite=False):
                return bytes(value)
            return bytes(txn.get(key.encode(), db=self._meta))

    def decide_once(self, job_id: str, runs: int) -> bool:
        return True  # one owner

    def delete_meta(self, key: str) -> None:
        with self.env.begin(write=True) as txn:
            txn.delete(key.encode(), db=self._meta)

    def meta_items(self, prefix: str) -> list[tuple[str, bytes]]:
        p = prefix.encode()
        out = []
        with self.env.begin() as txn:
            cur = txn.cursor(db=self._meta)
            if cur.set_range(p):
                for k, v in cur:
                    if not bytes(k).startswith(p):
                        break
                    out.append((bytes(k).decode(), bytes(v)))
        return out


class MemoryJobStore(InProcessReads):
    """The in-memory twin: same contract, nothing on disk (tests, and the core without I/O).
    Values are kept serialised, so what is read back is a copy, as from a real store."""

    shared = False

    def __init__(self) -> None:
        self._jobs: dict[str, bytes] = {}
        self._active: set[str] = set()
        self._requests: dict[bytes, str] = {}
        self._artifacts: dict[str, bytes] = {}
        self._expiry: dict[str, tuple[int, str]] = {}  # sha -> (expiry ms, job id); 0: kept
        self._receipts: dict[str, bytes] = {}
        self._client_receipts: list[tuple[bytes, str]] = []  # sorted by key
        self._meta: dict[str, bytes] = {}
        self._reputation = MemoryReputationStore()

    def close(self) -> None:
        pass

    def reputation(self) -> ReputationStore:
        return self._reputation

    def write(self, jobs: Iterable[job_pb2.Job], *, artifacts: Iterable[tuple[str, ArtifactData]] = (),
              receipts: Iterable[tuple[job_pb2.Job, receipt_pb2.Receipt]] = ()) -> None:
        # build everything first: a failure half way leaves nothing written, as a transaction would
        jobs = list(jobs)
        staged_jobs = [(j.job_id, _stored(j), j.state in ACTIVE, j.client_id, j.request_id) for j in jobs]
        staged_arts = [(sha, data.read_bytes() if isinstance(data, Path) else bytes(data)) for sha, data in artifacts]
        staged_recs = [(_client_receipt_key(j), r.receipt_hash, r.SerializeToString(deterministic=True))
                       for j, r in receipts]
        for _, data in artifacts:
            if isinstance(data, Path):  # taken over, as the LMDB store moves it
                data.unlink(missing_ok=True)
        for job_id, raw, active, client_id, request_id in staged_jobs:
            self._jobs[job_id] = raw
            (self._active.add if active else self._active.discard)(job_id)
            if request_id:
                self._requests[_request_key(client_id, request_id)] = job_id
        expiries = _expiries(jobs)
        for sha, data in staged_arts:
            if sha not in self._artifacts:
                self._artifacts[sha] = data
                self._expiry[sha] = expiries.pop(sha, (_KEPT, ""))
        for sha, (until, job_id) in expiries.items():
            if sha in self._artifacts and _later(self._expiry[sha][0], until) != self._expiry[sha][0]:
                self._expiry[sha] = (until, job_id)
        for key, rh, raw in staged_recs:
            self._receipts[rh] = raw
            i = bisect.bisect_left(self._client_receipts, (key, ""))
            if i < len(self._client_receipts) and self._client_receipts[i][0] == key:
                self._client_receipts[i] = (key, rh)
            else:
                self._client_receipts.insert(i, (key, rh))

    def update_receipt(self, receipt: receipt_pb2.Receipt) -> None:
        self._receipts[receipt.receipt_hash] = receipt.SerializeToString(deterministic=True)

    def _where(self, pred: object) -> list[receipt_pb2.Receipt]:
        out = [receipt_pb2.Receipt.FromString(self._receipts[k]) for k in sorted(self._receipts)]
        return [r for r in out if pred(r.settlement.state)]  # type: ignore[operator]

    def held_receipts(self) -> list[receipt_pb2.Receipt]:
        return self._where(lambda st: st == HELD)

    def unsettled_receipts(self) -> list[receipt_pb2.Receipt]:
        return self._where(lambda st: st in UNSETTLED)

    def get_job(self, job_id: str) -> job_pb2.Job | None:
        raw = self._jobs.get(job_id)
        return job_pb2.Job.FromString(raw) if raw is not None else None

    def job_for_request(self, client_id: str, request_id: str) -> str | None:
        return self._requests.get(_request_key(client_id, request_id))

    def claim_request(self, client_id: str, request_id: str, job_id: str) -> str:
        return self.job_for_request(client_id, request_id) or job_id  # one owner: the job's write records it

    def active_jobs(self) -> list[job_pb2.Job]:
        return [job_pb2.Job.FromString(self._jobs[j]) for j in sorted(self._active)]

    def open_artifact(self, sha256_hex: str) -> BinaryIO | None:
        data = self._artifacts.get(sha256_hex)
        return io.BytesIO(data) if data is not None else None

    def expired_artifacts(self, now_ms: int, limit: int) -> list[tuple[str, str]]:
        due = sorted((until, sha, job_id) for sha, (until, job_id) in self._expiry.items()
                     if until != _KEPT and until <= now_ms)
        return [(sha, job_id) for _, sha, job_id in due[:limit]]

    def keep_artifact(self, sha256_hex: str, until_ms: int) -> None:
        old = self._expiry.get(sha256_hex)
        if old is not None and _later(old[0], until_ms) != old[0]:
            self._expiry[sha256_hex] = (until_ms, old[1])

    def delete_artifacts(self, shas: Iterable[str]) -> None:
        for sha in shas:
            self._artifacts.pop(sha, None)
            self._expiry.pop(sha, None)

    def get_receipt(self, receipt_hash: str) -> receipt_pb2.Receipt | None:
        raw = self._receipts.get(receipt_hash)
        return receipt_pb2.Receipt.FromString(raw) if raw is not None else None

    def iter_receipts(self) -> Iterator[receipt_pb2.Receipt]:
        for k in sorted(self._receipts):
            yield receipt_pb2.Receipt.FromString(self._receipts[k])

    def client_receipts(self, client_id: str, *, before: bytes | None,
                        limit: int) -> tuple[list[receipt_pb2.Receipt], bytes | None]:
        prefix = client_id.encode() + b"\x00"
        start = before if before is not None else prefix + b"\xff" * 9
        i = bisect.bisect_left(self._client_receipts, (start, "")) - 1
        out: list[receipt_pb2.Receipt] = []
        while i >= 0 and self._client_receipts[i][0].startswith(prefix):
            key, rh = self._client_receipts[i]
            raw = self._receipts.get(rh)
            if raw is not None:
                out.append(receipt_pb2.Receipt.FromString(raw))
            if len(out) == limit:
                return out, key
            i -= 1
        return out, None

    def get_meta(self, key: str) -> bytes | None:
        return self._meta.get(key)

    def put_meta(self, key: str, value: bytes) -> None:
        self._meta[key] = bytes(value)

    def first_meta(self, key: str, value: bytes) -> bytes:
        return self._meta.setdefault(key, bytes(value))

    def decide_once(self, job_id: str, runs: int) -> bool:
        return True  # one owner

    def delete_meta(self, key: str) -> None:
        self._meta.pop(key, None)

    def meta_items(self, prefix: str) -> list[tuple[str, bytes]]:
        return sorted((k, v) for k, v in self._meta.items() if k.startswith(prefix))
