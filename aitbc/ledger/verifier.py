"""Stateless tx checks (chain id, signature, receipt proof): spread over worker processes, and
remembered once passed.

libsecp256k1 calls through coincurve hold the GIL, so threads cannot verify in parallel; a spawned
worker process can (spawn, not fork: forking after gRPC objects exist is unsupported). Used for
big batches of transactions that are not already verified (a client's or a peer's batch at
admission, a follower catching up), and for the proposer and vote signatures of the blocks and
certificates a catching-up node receives (aitbc.ledger.signers); small batches stay in-process.

The checks are a pure function of the tx's bytes and the genesis, so a node that has checked a tx
once need not check it again: VerifiedTxs remembers the hashes (sha256 of the signed bytes) of the
txs that passed, bounded, and admission and block import skip those (a block that several peers
stream, a tx relayed after its block, a reorg's txs going back to the mempool). A tx this node
never checked, in a block from anyone, is always checked."""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import os
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from aitbc.errors import AitbcError
from aitbc.ledger import state
from aitbc.ledger.genesis import Genesis
from aitbc.ledger.signers import Signers, signer_id
from aitbc.ledger.tx import Tx, decode_tx

MIN_PARALLEL = 256  # below this, a process round trip costs more than it saves
MIN_PARALLEL_SIGNERS = 32  # vote signatures: fewer (a live follower's block or two) are recovered in place
VERIFIED_TXS = 1 << 17  # tx hashes a node remembers as checked (~100 bytes each)

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


def check_txs(txs: Sequence[Tx | bytes], genesis: Genesis | None = None) -> list[AitbcError | None]:
    """The refusal (or None) of each tx's stateless checks; raw txs are decoded first (a worker
    gets raw bytes: they pickle faster than Tx objects)."""
    g = genesis or _worker_genesis
    assert g is not None
    out: list[AitbcError | None] = []
    for tx in txs:
        try:
            state.check_stateless(decode_tx(tx) if isinstance(tx, bytes) else tx, g)
        except AitbcError as exc:
            out.append(exc)
            continue
        out.append(None)
    return out


def recover_signers(items: Sequence[tuple[bytes, bytes]]) -> list[bytes | None]:
    """signer_id of each (digest, signature), None where no key can be recovered."""
    out: list[bytes | None] = []
    for digest, signature in items:
        try:
            out.append(signer_id(digest, signature))
        except AitbcError:
            out.append(None)
    return out


class VerifiedTxs:
    """Hashes of txs whose stateless checks passed here, the oldest forgotten beyond `capacity`.
    Filled from a worker thread, read from the event loop: adds take a lock, lookups need none."""

    def __init__(self, capacity: int = VERIFIED_TXS) -> None:
        self.capacity = capacity
        self._hashes: dict[bytes, None] = {}
        self._lock = threading.Lock()

    def __contains__(self, tx_hash: object) -> bool:
        return tx_hash in self._hashes

    def __len__(self) -> int:
        return len(self._hashes)

    def add(self, tx_hashes: Iterable[bytes]) -> None:
        with self._lock:
            d = self._hashes
            for h in tx_hashes:
                d[h] = None
            if len(d) > self.capacity:  # forget the oldest tenth at once (dicts keep insertion order)
                for h in list(itertools.islice(d, len(d) - self.capacity * 9 // 10)):
                    del d[h]


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

    async def check(self, txs: Sequence[Tx]) -> list[AitbcError | None]:
        """check_txs of decoded txs, by this process (one thread) and the workers together."""
        pool = self._get_pool() if len(txs) >= MIN_PARALLEL else None
        if pool is None:
            return await asyncio.to_thread(check_txs, txs, self.genesis)
        loop = asyncio.get_running_loop()
        parts = self.workers + 1
        size = (len(txs) + parts - 1) // parts
        local = asyncio.to_thread(check_txs, txs[:size], self.genesis)
        remote = [loop.run_in_executor(pool, check_txs, [tx.raw for tx in txs[i:i + size]])
                  for i in range(size, len(txs), size)]
        try:
            return [err for part in await asyncio.gather(local, *remote) for err in part]
        except Exception:  # a broken worker pool must not stop sync: fall back to checking here
            self.close()
            self.workers = 0
            return await asyncio.to_thread(check_txs, txs, self.genesis)

    async def signers(self, items: Sequence[tuple[bytes, bytes]]) -> Signers:
        """The signers of (digest, signature) pairs (a StreamBlocks message's proposer and vote
        signatures, aitbc.ledger.signers), recovered by the worker processes while this process
        imports the message before; a small batch (a live follower's block) is left to the checks
        themselves (an empty answer: each is recovered where it is checked), and so is what the
        workers could not recover (the check refuses it with the reason)."""
        pool = self._get_pool() if len(items) >= MIN_PARALLEL_SIGNERS else None
        if pool is None:
            return {}
        loop = asyncio.get_running_loop()
        size = (len(items) + self.workers - 1) // self.workers
        try:
            parts = await asyncio.gather(*(loop.run_in_executor(pool, recover_signers, items[i:i + size])
                                           for i in range(0, len(items), size)))
        except Exception:  # a broken worker pool must not stop sync: the caller recovers them itself
            self.close()
            self.workers = 0
            return {}
        ids = [i for part in parts for i in part]
        return {d + s: i for (d, s), i in zip(items, ids, strict=True) if i is not None}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
