"""The explorer's own index (LMDB), built from StreamBlocks and kept across restarts.

What a page needs that the node cannot answer without a scan: an address's transactions (newest
first, paged), the transaction that minted a receipt, the receipt of a job id. Keys (`v1:`):

    v1:tip                                     -> u64 height indexed so far
    v1:blk: + u64 height                       -> the keys this block wrote (a reorg deletes them)
    v1:addr: + 20-byte account + u64 height + u16 index -> 32-byte tx hash
    v1:rcpt: + 32-byte receipt hash            -> 32-byte tx hash (its MINT or SETTLE)
    v1:job: + job id (ASCII)                   -> 32-byte receipt hash

A block at a height already indexed (the node resends from the fork point after a reorg) first
deletes what the old blocks from that height wrote.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import lmdb

from aitbc import crypto
from aitbc.config import private_dir
from aitbc.ledger.block import decode_block
from aitbc.ledger.tx import KIND_MINT, KIND_SETTLE, KIND_SLASH

TIP = b"v1:tip"
BLK = b"v1:blk:"
ADDR = b"v1:addr:"
RCPT = b"v1:rcpt:"
JOB = b"v1:job:"
_U64 = struct.Struct(">Q")


class ExplorerIndex:
    def __init__(self, path: str | Path, *, map_size: int = 1 << 32) -> None:
        private_dir(Path(path))
        self.env = lmdb.open(str(path), map_size=map_size, subdir=True, sync=False)

    @property
    def tip(self) -> int:
        with self.env.begin() as txn:
            raw = txn.get(TIP)
        return _U64.unpack(raw)[0] if raw else 0

    def add_blocks(self, raws: list[bytes]) -> int:
        """Index canonical blocks in order (one LMDB commit); returns the new tip."""
        with self.env.begin(write=True) as txn:
            tip = _U64.unpack(txn.get(TIP) or _U64.pack(0))[0]
            for raw in raws:
                block = decode_block(raw)
                h = block.header.height
                if h <= tip:  # a reorg: drop what the old blocks from here wrote
                    for old in range(h, tip + 1):
                        for key in json.loads(txn.get(BLK + _U64.pack(old)) or b"[]"):
                            txn.delete(bytes.fromhex(key))
                        txn.delete(BLK + _U64.pack(old))
                written = []
                for i, tx in enumerate(block.txs):
                    parties = {tx.sender_id}
                    if tx.to:
                        parties.add(tx.to)
                    if tx.attester_id:  # an escrow's coordinator sees it on its page too
                        parties.add(tx.attester_id)
                    if tx.receipt is not None:
                        parties.add(crypto.validate_address(tx.receipt.body.provider))
                    if tx.kind == KIND_SETTLE and tx.quote is not None:
                        parties.add(crypto.validate_address(tx.quote.client_address))
                    if tx.kind == KIND_SLASH:
                        parties.update(crypto.validate_address(r.body.provider) for r in tx.verdict)
                    for party in sorted(parties):
                        key = ADDR + party + _U64.pack(h) + struct.pack(">H", i)
                        txn.put(key, tx.hash)
                        written.append(key)
                    if tx.kind in (KIND_MINT, KIND_SETTLE) and tx.receipt is not None:
                        rh = tx.receipt.receipt_hash
                        for key, value in ((RCPT + rh, tx.hash), (JOB + tx.receipt.body.job_id.encode(), rh)):
                            txn.put(key, value)
                            written.append(key)
                txn.put(BLK + _U64.pack(h), json.dumps([k.hex() for k in written]).encode())
                tip = h
            txn.put(TIP, _U64.pack(tip))
        return tip

    def history(self, account_id: bytes, *, before: tuple[int, int] | None = None,
                limit: int = 25) -> tuple[list[tuple[int, str]], tuple[int, int] | None]:
        """(height, tx hash hex) newest first, at most `limit`; and where the next page starts."""
        prefix = ADDR + account_id
        out: list[tuple[int, str]] = []
        with self.env.begin() as txn:
            cur = txn.cursor()
            start = prefix + (_U64.pack(before[0]) + struct.pack(">H", before[1]) if before else b"\xff" * 10)
            if not cur.set_range(start):
                if not cur.last():
                    return [], None
            elif bytes(cur.key()) >= start:
                if not cur.prev():
                    return [], None
            while bytes(cur.key()).startswith(prefix):
                key = bytes(cur.key())
                height, idx = _U64.unpack(key[len(prefix):len(prefix) + 8])[0], struct.unpack(">H", key[-2:])[0]
                if len(out) == limit:
                    return out, (height, idx + 1)
                out.append((height, bytes(cur.value()).hex()))
                if not cur.prev():
                    break
        return out, None

    def receipt_tx(self, receipt_hash: bytes) -> str | None:
        with self.env.begin() as txn:
            raw = txn.get(RCPT + receipt_hash)
        return bytes(raw).hex() if raw else None

    def job_receipt(self, job_id: str) -> str | None:
        with self.env.begin() as txn:
            raw = txn.get(JOB + job_id.encode())
        return bytes(raw).hex() if raw else None

    def close(self) -> None:
        self.env.close()
