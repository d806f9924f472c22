"""The coordinator's durable state in LMDB: jobs, artifacts, receipts and their indexes.

Keys are versioned (b"v1:"). A job and everything its transition implies (artifacts, receipt,
indexes) are written in one LMDB transaction. LMDB is opened without a per-commit fsync and
flushed by a background thread every `flush_interval_s`: a killed process loses nothing (the
pages are in the OS), an OS crash may lose the last interval. The ledger keeps full sync.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import lmdb

from aitbc.jobs import ACTIVE
from aitbc.v1 import job_pb2, receipt_pb2

_V = b"v1:"
UNSETTLED = frozenset({
    receipt_pb2.SETTLEMENT_STATE_PENDING,
    receipt_pb2.SETTLEMENT_STATE_SUBMITTED,
    receipt_pb2.SETTLEMENT_STATE_INCLUDED,
})


class JobStore:
    def __init__(self, path: str | Path, *, map_size: int = 1 << 36, flush_interval_s: float = 0.2) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.env = lmdb.open(str(path), map_size=map_size, max_dbs=16, sync=False, metasync=False)
        self._jobs = self.env.open_db(_V + b"jobs")
        self._active = self.env.open_db(_V + b"active")
        self._artifacts = self.env.open_db(_V + b"artifacts")
        self._receipts = self.env.open_db(_V + b"receipts")
        self._client_receipts = self.env.open_db(_V + b"client_receipts")
        self._requests = self.env.open_db(_V + b"requests")
        self._meta = self.env.open_db(_V + b"meta")
        self._unsettled = self.env.open_db(_V + b"unsettled")
        self._held = self.env.open_db(_V + b"held")
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

    # jobs -----------------------------------------------------------------------------------

    def put_job(
        self,
        job: job_pb2.Job,
        *,
        artifacts: list[tuple[str, bytes]] = (),  # type: ignore[assignment]
        receipt: receipt_pb2.Receipt | None = None,
    ) -> None:
        with self.env.begin(write=True) as txn:
            self._put_job(txn, job)
            for sha, data in artifacts:
                txn.put(sha.encode(), data, db=self._artifacts, overwrite=False)
            if receipt is not None:
                self._put_receipt(txn, job, receipt)

    def _put_receipt(self, txn: lmdb.Transaction, job: job_pb2.Job, receipt: receipt_pb2.Receipt) -> None:
        rh = receipt.receipt_hash.encode()
        txn.put(rh, receipt.SerializeToString(deterministic=True), db=self._receipts)
        self._index_settlement(txn, receipt)
        ordinal = struct.pack(">Q", job.finished_at_unix_ms or job.updated_at_unix_ms)
        txn.put(job.client_id.encode() + b"\x00" + ordinal + job.job_id.encode(), rh, db=self._client_receipts)

    def _put_job(self, txn: lmdb.Transaction, job: job_pb2.Job) -> None:
        key = job.job_id.encode()
        txn.put(key, job.SerializeToString(deterministic=True), db=self._jobs)
        if job.state in ACTIVE:
            txn.put(key, b"", db=self._active)
        else:
            txn.delete(key, db=self._active)
        if job.request_id:
            txn.put(_request_key(job.client_id, job.request_id), key, db=self._requests)

    def _index_settlement(self, txn: lmdb.Transaction, receipt: receipt_pb2.Receipt) -> None:
        key = receipt.receipt_hash.encode()
        if receipt.settlement.state in UNSETTLED:
            txn.put(key, b"", db=self._unsettled)
        else:
            txn.delete(key, db=self._unsettled)
        if receipt.settlement.state == receipt_pb2.SETTLEMENT_STATE_HELD:
            txn.put(key, b"", db=self._held)
        else:
            txn.delete(key, db=self._held)

    def update_receipt(self, receipt: receipt_pb2.Receipt) -> None:
        with self.env.begin(write=True) as txn:
            txn.put(receipt.receipt_hash.encode(), receipt.SerializeToString(deterministic=True), db=self._receipts)
            self._index_settlement(txn, receipt)

    def held_receipts(self) -> list[receipt_pb2.Receipt]:
        """Receipts whose MINT waits for a verification by re-execution."""
        with self.env.begin() as txn:
            keys = [k for k, _ in txn.cursor(db=self._held)]
            return [receipt_pb2.Receipt.FromString(txn.get(k, db=self._receipts)) for k in keys]

    def unsettled_receipts(self) -> list[receipt_pb2.Receipt]:
        """Receipts whose MINT is not final yet (or not yet accepted), oldest index order."""
        with self.env.begin() as txn:
            keys = [k for k, _ in txn.cursor(db=self._unsettled)]
            return [receipt_pb2.Receipt.FromString(txn.get(k, db=self._receipts)) for k in keys]

    def put_jobs(self, batch: list[job_pb2.Job]) -> None:
        """Several jobs in one transaction."""
        with self.env.begin(write=True) as txn:
            for job in batch:
                self._put_job(txn, job)

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

    # artifacts and receipts --------------------------------------------------------------------

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

    def client_receipts(self, client_id: str, *, before: bytes | None, limit: int) -> tuple[list[receipt_pb2.Receipt], bytes | None]:
        """Newest first. Returns the page and the key to continue before (None at the end)."""
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


def _request_key(client_id: str, request_id: str) -> bytes:
    return client_id.encode() + b"\x00" + request_id.encode()
