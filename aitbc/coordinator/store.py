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
import struct
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

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


class JobStore(Protocol):
    """What the coordinator keeps. Every write is one transaction: all of it or nothing."""

    def write(
        self,
        jobs: Iterable[job_pb2.Job],
        *,
        artifacts: Iterable[tuple[str, bytes]] = (),
        receipts: Iterable[tuple[job_pb2.Job, receipt_pb2.Receipt]] = (),
    ) -> None:
        """Jobs (as they are now), artifacts by sha256 (never overwritten), and new receipts
        with the job they belong to (indexed for the job's client, newest first)."""
        ...

    def get_job(self, job_id: str) -> job_pb2.Job | None: ...
    def active_jobs(self) -> list[job_pb2.Job]: ...
    def job_for_request(self, client_id: str, request_id: str) -> str | None: ...
    def get_artifact(self, sha256_hex: str) -> bytes | None: ...
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
    def reputation(self) -> ReputationStore: ...
    def close(self) -> None: ...


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


class LmdbJobStore:
    def __init__(self, path: str | Path, *, map_size: int = 1 << 36, flush_interval_s: float = 0.2) -> None:
        path = private_dir(path)
        self.env = lmdb.open(str(path), map_size=map_size, max_dbs=16, sync=False, metasync=False, mode=0o600)
        self._jobs = self.env.open_db(_V + b"jobs")
        self._active = self.env.open_db(_V + b"active")
        self._artifacts = self.env.open_db(_V + b"artifacts")
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

    def write(self, jobs: Iterable[job_pb2.Job], *, artifacts: Iterable[tuple[str, bytes]] = (),
              receipts: Iterable[tuple[job_pb2.Job, receipt_pb2.Receipt]] = ()) -> None:
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
            for sha, data in artifacts:
                txn.put(sha.encode(), data, db=self._artifacts, overwrite=False)
            for job, receipt in receipts:
                self._put_receipt(txn, receipt)
                txn.put(_client_receipt_key(job), receipt.receipt_hash.encode(), db=self._client_receipts)

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

    def active_jobs(self) -> list[job_pb2.Job]:
        with self.env.begin() as txn:
            ids = [k for k, _ in txn.cursor(db=self._active)]
            return [job_pb2.Job.FromString(txn.get(k, db=self._jobs)) for k in ids]

    def get_artifact(self, sha256_hex: str) -> bytes | None:
        with self.env.begin() as txn:
            return txn.get(sha256_hex.encode(), db=self._artifacts)

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


class MemoryJobStore:
    """The in-memory twin: same contract, nothing on disk (tests, and the core without I/O).
    Values are kept serialised, so what is read back is a copy, as from a real store."""

    def __init__(self) -> None:
        self._jobs: dict[str, bytes] = {}
        self._active: set[str] = set()
        self._requests: dict[bytes, str] = {}
        self._artifacts: dict[str, bytes] = {}
        self._receipts: dict[str, bytes] = {}
        self._client_receipts: list[tuple[bytes, str]] = []  # sorted by key
        self._meta: dict[str, bytes] = {}
        self._reputation = MemoryReputationStore()

    def close(self) -> None:
        pass

    def reputation(self) -> ReputationStore:
        return self._reputation

    def write(self, jobs: Iterable[job_pb2.Job], *, artifacts: Iterable[tuple[str, bytes]] = (),
              receipts: Iterable[tuple[job_pb2.Job, receipt_pb2.Receipt]] = ()) -> None:
        # build everything first: a failure half way leaves nothing written, as a transaction would
        staged_jobs = [(j.job_id, _stored(j), j.state in ACTIVE, j.client_id, j.request_id) for j in jobs]
        staged_arts = [(sha, bytes(data)) for sha, data in artifacts]
        staged_recs = [(_client_receipt_key(j), r.receipt_hash, r.SerializeToString(deterministic=True))
                       for j, r in receipts]
        for job_id, raw, active, client_id, request_id in staged_jobs:
            self._jobs[job_id] = raw
            (self._active.add if active else self._active.discard)(job_id)
            if request_id:
                self._requests[_request_key(client_id, request_id)] = job_id
        for sha, data in staged_arts:
            self._artifacts.setdefault(sha, data)
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

    def active_jobs(self) -> list[job_pb2.Job]:
        return [job_pb2.Job.FromString(self._jobs[j]) for j in sorted(self._active)]

    def get_artifact(self, sha256_hex: str) -> bytes | None:
        return self._artifacts.get(sha256_hex)

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
