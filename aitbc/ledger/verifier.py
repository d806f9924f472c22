"""Stateless tx checks (chain id, signature, receipt proof) spread over a worker process.

libsecp256k1 calls through coincurve hold the GIL, so threads cannot verify in parallel; a spawned
worker process can (spawn, not fork: forking after gRPC objects exist is unsupported). Used for
big batches of transactions that are not already verified (a follower catching up); small
batches stay in-process."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from aitbc.errors import AitbcError
from aitbc.ledger import state
from aitbc.ledger.genesis import Genesis
from aitbc.ledger.tx import decode_tx

MIN_PARALLEL = 256  # below this, a process round trip costs more than it saves

_worker_genesis: Genesis | None = None


def _init_worker(genesis_dict: dict[str, Any], parent_pid: int) -> None:
    global _worker_genesis
    _worker_genesis = Genesis.from_dict(genesis_dict)
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()


def _exit_with_parent(parent_pid: int) -> None:
    """A node killed with -9 cannot shut its pool down: the worker leaves on its own."""
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(0)


def check_raws(raws: Sequence[bytes], genesis: Genesis | None = None) -> list[bytes]:
    """Hashes of the txs whose decoding and stateless checks pass (the others are left out)."""
    g = genesis or _worker_genesis
    assert g is not None
    ok = []
    for raw in raws:
        try:
            tx = decode_tx(raw)
            state.check_stateless(tx, g)
        except AitbcError:
            continue
        ok.append(tx.hash)
    return ok


class ParallelVerifier:
    def __init__(self, genesis: Genesis, workers: int | None = None) -> None:
        self.genesis = genesis
        cpus = os.cpu_count() or 1
        env = os.environ.get("AITBC_LEDGER_VERIFY_WORKERS", "")
        if workers is None and env.isdigit():
            workers = int(env)
        self.workers = max(0, cpus - 1) if workers is None else workers
        self._pool: ProcessPoolExecutor | None = None

    def _get_pool(self) -> ProcessPoolExecutor | None:
        if self.workers <= 0:
            return None
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init_worker, initargs=(self.genesis.to_dict(), os.getpid()))
        return self._pool

    async def verified_hashes(self, raws: Sequence[bytes]) -> set[bytes]:
        """Check raws with this process (one thread) and the workers together."""
        pool = self._get_pool() if len(raws) >= MIN_PARALLEL else None
        if pool is None:
            return set(await asyncio.to_thread(check_raws, raws, self.genesis))
        loop = asyncio.get_running_loop()
        parts = self.workers + 1
        size = (len(raws) + parts - 1) // parts
        chunks = [list(raws[i:i + size]) for i in range(0, len(raws), size)]
        local = asyncio.to_thread(check_raws, chunks[0], self.genesis)
        remote = [loop.run_in_executor(pool, check_raws, chunk) for chunk in chunks[1:]]
        out: set[bytes] = set()
        try:
            for hashes in await asyncio.gather(local, *remote):
                out.update(hashes)
        except Exception:  # a broken worker pool must not stop sync: fall back to checking here
            self.close()
            self.workers = 0
            return set(await asyncio.to_thread(check_raws, raws, self.genesis))
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
