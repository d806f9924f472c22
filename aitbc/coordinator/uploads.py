"""Artifact uploads in progress: streamed to files as they arrive, hashed on the way, bounded.

Each output of a job a miner uploads is one file in a private folder (`<data_dir>/uploads`, 0700;
files 0600): every ArtifactChunk is appended to it and fed to a running sha256, so nothing of an
upload stays in memory beyond the chunk being written. Bytes in flight are counted as they
arrive, per job (`max_artifact_bytes`), per miner (`max_upload_bytes_per_miner`) and over all
miners (`max_upload_bytes_in_flight`), with running totals (no walk over miners per chunk); a chunk
that would pass a limit is refused with ResourceExhausted naming it (the caller rejects the job's
attempt: the job goes back to the queue, nothing of the upload is kept).

An upload ends when its result arrives (`take`: the finished files go to the artifact store, or
are discarded when a check refuses them) or when it is dropped: the job left the miner (requeued,
cancelled, taken back after a stall, its miner gone), see `Coordinator._moved`. Files left by a
crash are deleted when the folder is opened at start-up.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from aitbc.config import private_dir
from aitbc.errors import ResourceExhausted

SUFFIX = ".part"


class Upload:
    """One output's file: appended to, hashed as it grows; read back once finished."""

    __slots__ = ("_fd", "_sha", "path", "size")

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._sha = hashlib.sha256()
        self.size = 0

    def append(self, data: bytes) -> None:
        assert self._fd is not None, "append after finish"
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        self._sha.update(data)
        self.size += len(data)

    def finish(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def sha256(self) -> bytes:
        return self._sha.digest()

    @contextmanager
    def open(self) -> Iterator[BinaryIO]:
        """The finished bytes, for a check that reads them (a file object: never all in memory)."""
        self.finish()
        with open(self.path, "rb") as f:
            yield f

    def read(self) -> bytes:
        """All of it (for outputs whose size is already bounded small, such as streamed text)."""
        with self.open() as f:
            return f.read()

    def discard(self) -> None:
        self.finish()
        self.path.unlink(missing_ok=True)


class Uploads:
    """Every unfinished upload, by job (with the miner it came from), with running byte totals per
    job, per miner and in all: a chunk costs O(1) whatever the number of miners."""

    def __init__(self, folder: str | Path, *, max_job_bytes: int, max_miner_bytes: int, max_total_bytes: int) -> None:
        self.folder = private_dir(folder)
        self.max_job_bytes, self.max_miner_bytes, self.max_total_bytes = max_job_bytes, max_miner_bytes, max_total_bytes
        self.removed_at_start = self._remove_leftovers()
        self._jobs: dict[str, tuple[str, dict[int, Upload]]] = {}  # job -> (miner, outputs)
        self._job_bytes: dict[str, int] = {}
        self._miner_bytes: dict[str, int] = {}
        self.total = 0

    def _remove_leftovers(self) -> int:
        """Partial uploads of a process that ended without finishing them (a crash, kill -9)."""
        n = 0
        for p in self.folder.iterdir():
            if p.is_file() and p.name.endswith(SUFFIX):
                p.unlink(missing_ok=True)
                n += 1
        return n

    def miner_bytes(self, miner_id: str) -> int:
        return self._miner_bytes.get(miner_id, 0)

    def files(self, job_id: str) -> list[Path]:
        return [u.path for u in self._jobs.get(job_id, ("", {}))[1].values()]

    def append(self, miner_id: str, job_id: str, index: int, data: bytes) -> None:
        """Add a chunk to output `index` of the job's upload; ResourceExhausted past a limit
        (nothing of this chunk is written then; the caller drops the upload)."""
        n = len(data)
        if self._job_bytes.get(job_id, 0) + n > self.max_job_bytes:
            raise ResourceExhausted(f"artifacts exceed {self.max_job_bytes} bytes (max_artifact_bytes: one job's outputs)")
        if self._miner_bytes.get(miner_id, 0) + n > self.max_miner_bytes:
            raise ResourceExhausted(f"this miner's uploads in flight exceed {self.max_miner_bytes} bytes "
                                    "(max_upload_bytes_per_miner): finish an upload before starting more")
        if self.total + n > self.max_total_bytes:
            raise ResourceExhausted(f"uploads in flight exceed the coordinator's {self.max_total_bytes} bytes "
                                    "(max_upload_bytes_in_flight)")
        owner, outputs = self._jobs.get(job_id, (miner_id, {}))
        if owner != miner_id:  # the job changed hands: the old holder's bytes are not this upload's
            self.drop(job_id)
            outputs = {}
        self._jobs[job_id] = (miner_id, outputs)
        up = outputs.get(index)
        if up is None:
            up = outputs[index] = Upload(self.folder / f"{job_id}.{index}.{secrets.token_hex(6)}{SUFFIX}")
        up.append(data)
        self._job_bytes[job_id] = self._job_bytes.get(job_id, 0) + n
        self._miner_bytes[miner_id] = self._miner_bytes.get(miner_id, 0) + n
        self.total += n

    def take(self, job_id: str) -> dict[int, Upload]:
        """The job's finished outputs, no longer counted in flight; the caller moves or discards them."""
        miner_id, outputs = self._jobs.pop(job_id, ("", {}))
        n = self._job_bytes.pop(job_id, 0)
        if n:
            left = self._miner_bytes[miner_id] - n
            if left:
                self._miner_bytes[miner_id] = left
            else:
                del self._miner_bytes[miner_id]
            self.total -= n
        for up in outputs.values():
            up.finish()
        return outputs

    def drop(self, job_id: str) -> None:
        """Forget the job's unfinished upload (if any) and delete its files."""
        for up in self.take(job_id).values():
            up.discard()

    def close(self) -> None:
        for job_id in list(self._jobs):
            self.drop(job_id)
