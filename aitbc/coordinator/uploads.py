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
import io
import os
import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from aitbc.config import private_dir
from aitbc.errors import InvalidArgument, ResourceExhausted
from aitbc.rpc import CHUNK_BYTES

SUFFIX = ".part"
INLINE_BYTES = CHUNK_BYTES  # a result's outputs together at most this, inline in the JobResult (one message)
SPOOL_BYTES = 256 * 1024  # an output up to this size stays in memory: no upload file, one write at most
SPOOL_TOTAL = 8 * 1024 * 1024  # all such outputs together; past it, new bytes go to files


class Upload:
    """One output: appended to, hashed as it grows; read back once finished. A small one stays in
    memory (the first `spool` bytes, within the coordinator's spool budget) and needs no file at
    all; past that it goes to its file, and everything after is appended there."""

    __slots__ = ("_buf", "_fd", "_sha", "path", "size")

    def __init__(self, path: Path) -> None:
        self.path = path
        self._buf: bytearray | None = bytearray()
        self._fd: int | None = None
        self._sha = hashlib.sha256()
        self.size = 0

    @property
    def spooled(self) -> int:
        """Bytes held in memory (0 once it is a file)."""
        return len(self._buf) if self._buf is not None else 0

    def append(self, data: bytes, *, in_memory: bool = False) -> None:
        """Add a chunk; `in_memory`: it may stay in memory (else it, and all before it, go to the file)."""
        if self._buf is not None and in_memory:
            self._buf += data
        else:
            if self._fd is None:
                assert self._buf is not None, "append after finish"
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                head, self._buf = self._buf, None
                self._write(head)
            self._write(data)
        self._sha.update(data)
        self.size += len(data)

    def _write(self, data: bytes | bytearray) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]  # type: ignore[arg-type]

    def finish(self) -> None:
        if self._fd is not None and self._fd >= 0:
            os.close(self._fd)
            self._fd = -1  # written and closed

    @property
    def sha256(self) -> bytes:
        return self._sha.digest()

    def content(self) -> Path | bytes:
        """What the artifact store takes: the finished file (moved in), or the bytes of a small one."""
        self.finish()
        return bytes(self._buf) if self._buf is not None else self.path

    @contextmanager
    def open(self) -> Iterator[BinaryIO]:
        """The finished bytes, for a check that reads them (a file object: never all in memory)."""
        self.finish()
        if self._buf is not None:
            yield io.BytesIO(self._buf)
            return
        with open(self.path, "rb") as f:
            yield f

    def read(self) -> bytes:
        """All of it (for outputs whose size is already bounded small, such as streamed text)."""
        with self.open() as f:
            return f.read()

    def discard(self) -> None:
        self.finish()
        self._buf = None
        self.path.unlink(missing_ok=True)


class Uploads:
    """Every unfinished upload, by job (with the miner it came from), with running byte totals per
    job, per miner and in all: a chunk costs O(1) whatever the number of miners."""

    def __init__(self, folder: str | Path, *, max_job_bytes: int, max_miner_bytes: int, max_total_bytes: int,
                 spool_bytes: int = SPOOL_BYTES, spool_total: int = SPOOL_TOTAL) -> None:
        self.folder = private_dir(folder)
        self.max_job_bytes, self.max_miner_bytes, self.max_total_bytes = max_job_bytes, max_miner_bytes, max_total_bytes
        self.spool_bytes, self.spool_total = spool_bytes, spool_total
        self.spooled = 0  # bytes of small uploads held in memory, at most spool_total
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
        """The job's upload files (outputs still small enough to be in memory have none)."""
        return [u.path for u in self._jobs.get(job_id, ("", {}))[1].values() if not u.spooled and u.size]

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
        before = up.spooled
        up.append(data, in_memory=before + n <= self.spool_bytes and self.spooled + n <= self.spool_total)
        self.spooled += up.spooled - before
        self._job_bytes[job_id] = self._job_bytes.get(job_id, 0) + n
        self._miner_bytes[miner_id] = self._miner_bytes.get(miner_id, 0) + n
        self.total += n

    def inline(self, miner_id: str, job_id: str, outputs: int, datas: Sequence[bytes]) -> None:
        """A result's inline outputs (JobResult.inline_artifacts): each whole output as one chunk,
        under the same limits. Nothing when `datas` is empty (the outputs came as chunks). Refused
        InvalidArgument when they are not one per output, together above INLINE_BYTES, or the job
        also sent chunks; ResourceExhausted past a limit (the caller drops the upload)."""
        if not datas:
            return
        if len(datas) != outputs:
            raise InvalidArgument(f"result has {len(datas)} inline artifacts; job {job_id} has {outputs} output(s): "
                                  "send one per output, or none and the outputs as ArtifactChunk messages")
        if sum(len(d) for d in datas) > INLINE_BYTES:
            raise InvalidArgument(f"inline artifacts exceed {INLINE_BYTES} bytes: send larger outputs as "
                                  "ArtifactChunk messages")
        if job_id in self._jobs:
            raise InvalidArgument(f"job {job_id}'s outputs came both as ArtifactChunk messages and inline: send one or the other")
        for i, data in enumerate(datas):
            self.append(miner_id, job_id, i, data)

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
            self.spooled -= up.spooled  # handed over: the caller stores or discards it now
            up.finish()
        return outputs

    def drop(self, job_id: str) -> None:
        """Forget the job's unfinished upload (if any) and delete its files."""
        for up in self.take(job_id).values():
            up.discard()

    def close(self) -> None:
        for job_id in list(self._jobs):
            self.drop(job_id)
