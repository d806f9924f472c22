"""What a ledger node exports about itself: block metrics, a "ledger.block" span per block, readiness.

Kept apart from the node so the consensus code only calls `Node.block_listeners`; everything here is
read-only on the chain. Gauges (height, finality lag, mempool, sync lag) are read at scrape time.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aitbc import metrics, telemetry
from aitbc.ledger.block import Block
from aitbc.ledger.tx import KIND_NAMES

log = logging.getLogger("aitbc.ledger.node")

TRACE_MEMORY = 4096  # tx hash -> traceparent of the call that broadcast it, for block span links
SYNC_READY_LAG = 2  # blocks behind the best peer a node may be and still report SERVING

_tx_traces: collections.OrderedDict[bytes, str] = collections.OrderedDict()
_tx_counters = {kind: metrics.TXS_TOTAL.labels(type=name) for kind, name in KIND_NAMES.items()}


def remember_tx_trace(tx_hash: bytes) -> None:
    """Inside a traced BroadcastTransaction: keep its traceparent so the block that includes the tx
    links back to the caller's trace (a bounded memory; only while tracing is on)."""
    tp = telemetry.current_traceparent()
    if tp:
        _tx_traces[tx_hash] = tp
        if len(_tx_traces) > TRACE_MEMORY:
            _tx_traces.popitem(last=False)


class BlockObserver:
    """A Node block listener: aitbc_block_interval_seconds, aitbc_txs_total{type}, and a span per
    produced or imported block linked to the traces of the transactions it includes."""

    def __init__(self) -> None:
        self.last: tuple[int, int] | None = None  # (height, timestamp_ms) of the last block seen

    def __call__(self, block: Block, source: str, duration_s: float) -> None:
        header = block.header
        if self.last is not None and self.last[0] == block.height - 1:
            metrics.BLOCK_INTERVAL.observe(max(0, header.timestamp_ms - self.last[1]) / 1000)
        self.last = (block.height, header.timestamp_ms)
        if block.txs:
            counts = collections.Counter(tx.kind for tx in block.txs)
            for kind, n in counts.items():
                child = _tx_counters.get(kind)
                if child is not None:
                    child.inc(n)
        if telemetry.enabled():
            links = [tp for tx in block.txs if (tp := _tx_traces.get(tx.hash))] if _tx_traces else []
            with telemetry.span("ledger.block", links=links, height=block.height, hash=block.hash.hex(),
                                txs=len(block.txs), source=source, slot=header.slot,
                                duration_ms=round(duration_s * 1000, 3)):
                pass


_GAUGES = (metrics.BLOCK_HEIGHT, metrics.FINALITY_LAG, metrics.MEMPOOL_SIZE, metrics.SYNC_LAG)
_gauge_owner: Any = None


def export_gauges(node: Any) -> None:
    """Point the node gauges at `node`, read at scrape time (one node per process; where a test runs
    several, the last started wins until it stops)."""
    global _gauge_owner
    chain = node.chain
    metrics.BLOCK_HEIGHT.set_function(lambda: chain.head.height)
    metrics.FINALITY_LAG.set_function(lambda: max(0, chain.head.height - chain.final_height))
    metrics.MEMPOOL_SIZE.set_function(lambda: len(node.mempool))
    metrics.SYNC_LAG.set_function(node.sync_lag)
    _gauge_owner = node


def release_gauges(node: Any) -> None:
    """A stopped node stops feeding the gauges (they keep their last set() value, if any)."""
    global _gauge_owner
    if _gauge_owner is node:
        for gauge in _GAUGES:
            gauge.set_function(None)
        _gauge_owner = None


def is_ready(node: Any) -> bool:
    """SERVING when the node is not behind: a node without peers is its own truth; one with peers
    must have caught up with them once (an authority that produced since then counts, its peers
    may all be down) and be at most SYNC_READY_LAG blocks behind the best peer it heard from."""
    if not node.has_peers:
        return True
    if not (node.caught_up or node.produced):
        return False
    return node.sync_lag() <= SYNC_READY_LAG


async def track_readiness(node: Any, set_serving: Callable[[bool], Awaitable[None]],
                          poll_s: float = 0.5) -> None:
    """For the node's lifetime (a task the node adopts): export its gauges and report
    `is_ready(node)` through `set_serving` whenever it changes."""
    export_gauges(node)
    ready: bool | None = None
    try:
        while True:
            now = is_ready(node)
            if now != ready:
                if ready is not None or not now:
                    log.info("node %s: %s (head %d, sync lag %d)", node.listen_address or "",
                             "caught up: SERVING" if now else "behind its peers: NOT_SERVING",
                             node.chain.head.height, node.sync_lag())
                await set_serving(now)
                ready = now
            await node.wait_changed(poll_s)
    finally:
        release_gauges(node)
