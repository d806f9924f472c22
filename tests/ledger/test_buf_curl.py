"""Every LedgerService RPC is reachable with `buf curl` through server reflection."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from aitbc.ledger.store import MemoryStore
from aitbc.ledger.tx import make_mint
from aitbc.server.ledger import start_node

from .helpers import ALICE, AUTH, genesis, receipt

BUF = Path(__file__).resolve().parents[2] / ".tools" / "node_modules" / ".bin" / "buf"
pytestmark = [pytest.mark.skipif(not BUF.exists(), reason="buf is not installed (make install)"),
              pytest.mark.timeout(120)]


async def _curl(port: int, method: str, body: dict, timeout: str = "10s") -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        str(BUF), "curl", "--protocol", "grpc", "--http2-prior-knowledge", "--reflect-protocol", "grpc-v1alpha",
        "--timeout", timeout, f"http://127.0.0.1:{port}/aitbc.v1.LedgerService/{method}", "-d", json.dumps(body),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode()


async def test_every_rpc_through_reflection():
    import base64

    g = genesis(1, block_time_ms=100)
    node, server = await start_node(MemoryStore(), g, AUTH[0], "127.0.0.1:0")
    try:
        raw = make_mint(ALICE, g.ref, 0, receipt(1))
        rc, out = await _curl(server.port, "BroadcastTransaction", {"raw": base64.b64encode(raw).decode()})
        assert rc == 0, out
        tx_hash = json.loads(out)["hash"]
        for _ in range(100):
            if node.chain.tx_location(bytes.fromhex(tx_hash)):
                break
            await asyncio.sleep(0.05)
        calls = [
            ("GetHead", {}, 0, '"chainId": "aitbc-test"'),
            ("GetBlock", {"height": 1}, 0, '"header"'),
            ("GetTransaction", {"hash": tx_hash}, 0, "TRANSACTION_STATUS_FINAL"),
            ("GetAccount", {"address": receipt(1).body.provider}, 0, '"balance": "1000"'),
            ("GetReceiptStatus", {"receiptHash": receipt(1).receipt_hash.hex()}, 0, "TRANSACTION_STATUS_FINAL"),
            ("BroadcastTransactions", {"raws": [base64.b64encode(raw).decode()]}, 0, "already known"),
            ("BroadcastTransaction", {"raw": base64.b64encode(raw).decode()}, 6 * 8, "already known"),
            ("GetBlock", {"hash": "00" * 32}, 5 * 8, "not found"),
            ("StreamBlocks", {"fromHeight": -1}, 3 * 8, "from_height"),
        ]
        for method, body, code, needle in calls:
            rc, out = await _curl(server.port, method, body)
            assert (rc, needle in out) == (code, True), (method, rc, out)
        # a live stream: buf curl prints blocks until its timeout (exit code 4*8: DEADLINE_EXCEEDED)
        rc, out = await _curl(server.port, "StreamBlocks", {"fromHeight": 1}, timeout="1s")
        assert '"height": "1"' in out, out
    finally:
        await node.stop()
        await server.stop(0)
