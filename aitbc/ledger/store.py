"""Storage behind a small interface: get, atomic commit of a write set, prefix scan.

LmdbStore commits each write set in ONE LMDB write transaction, so a block and the state it
produces land together or not at all (a kill -9 at any instant leaves the last committed block).
MemoryStore is its in-memory twin for tests. Keys are versioned (b"v1:...")."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol


class Store(Protocol):
    def get(self, key: bytes) -> bytes | None: ...

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """get of each key, from one snapshot (LMDB: one read transaction, ~4x cheaper a key)."""

    def commit(self, writes: Mapping[bytes, bytes | None]) -> None:
        """Apply every write (None deletes) atomically."""

    def scan(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        """Items whose key starts with prefix, in key order."""

    def close(self) -> None: ...


class MemoryStore:
    def __init__(self) -> None:
        self._data: dict[bytes, bytes] = {}
        self._lock = threading.Lock()

    def get(self, key: bytes) -> bytes | None:
        return self._data.get(key)

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        data = self._data
        return [data.get(k) for k in keys]

    def commit(self, writes: Mapping[bytes, bytes | None]) -> None:
        with self._lock:
            data = dict(self._data)  # readers in other threads never see half a write set
            for k, v in writes.items():
                if v is None:
                    data.pop(k, None)
                else:
                    data[bytes(k)] = bytes(v)
            self._data = data

    def scan(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        data = self._data
        keys = sorted(k for k in data if k.startswith(prefix))
        for k in keys:
            yield k, data[k]

    def close(self) -> None:
        pass


class LmdbStore:
    def __init__(self, path: str | Path, *, map_size: int = 1 << 36, sync: bool = True) -> None:
        import lmdb

        from aitbc.config import private_dir

        private_dir(path)
        # map_size is a sparse upper bound (64 GiB); max_readers covers the gRPC + executor threads.
        # sync=False only for bulk tools (benchmarks): a kill -9 stays safe, a power cut may not.
        self._env = lmdb.open(os.fspath(path), map_size=map_size, max_readers=256, max_dbs=0,
                              readahead=False, metasync=sync, sync=sync, lock=True, mode=0o600)

    def get(self, key: bytes) -> bytes | None:
        with self._env.begin(buffers=False) as txn:
            return txn.get(key)

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        with self._env.begin(buffers=False) as txn:
            return [txn.get(k) for k in keys]

    def commit(self, writes: Mapping[bytes, bytes | None]) -> None:
        with self._env.begin(write=True) as txn:
            for k, v in writes.items():
                if v is None:
                    txn.delete(k)
                else:
                    txn.put(k, v)

    def scan(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        with self._env.begin() as txn:
            cur = txn.cursor()
            if not cur.set_range(prefix):
                return
            items = []
            for k, v in cur:
                if not k.startswith(prefix):
                    break
                items.append((bytes(k), bytes(v)))
        yield from items

    def close(self) -> None:
        self._env.close()


