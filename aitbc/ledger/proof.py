"""Receipt proofs for light clients (docs/ledger.md, "Receipt proofs"): that a receipt was minted
in a final block, checkable offline by anyone holding only the genesis (its authority set).

    proof = "AITBC-RP" (8 bytes) || u8 version (=1)
            || u32 len(tx) || tx                      the signed MINT
            || u32 tx_index || u8 len(path) || sibling (32) * len(path)     its Merkle path
            || u16 count || (u16 len(header) || header) * count
                 header 1 is the MINT's block, each next one the child of the one before
            || u32 len(certificate) || certificate    certifies the last header's block final

A certificate makes one block final and every ancestor of it final with it, so the headers only
climb from the MINT's block to the nearest certified block (at most MAX_HEADERS of them). The
verifier is pure: no network, no store; every failure is an InvalidArgument with its reason.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Protocol

from aitbc import crypto
from aitbc.errors import AitbcError, FailedPrecondition, InvalidArgument, NotFound
from aitbc.ledger import finality, merkle, state
from aitbc.ledger.block import Header, decode_header, split_txs
from aitbc.ledger.genesis import Genesis
from aitbc.ledger.tx import KIND_MINT, KIND_NAMES, MAX_TX_BYTES, decode_tx

SET_CHANGED = ("this block's authority set differs from the genesis: a proof across a set change is not supported "
               "yet")
MAGIC = b"AITBC-RP"
PROOF_VERSION = 1
MAX_HEADERS = 256  # headers from the MINT's block up to its certified block, both included
MAX_PROOF_BYTES = len(MAGIC) + 1 + 4 + MAX_TX_BYTES + 5 + 32 * merkle.MAX_PATH + 2 + MAX_HEADERS * 257 \
    + 4 + 0x10000 * 85

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


@dataclass(frozen=True, slots=True)
class ReceiptProof:
    tx: bytes  # the signed MINT
    tx_index: int
    path: tuple[bytes, ...]  # Merkle siblings, bottom first
    headers: tuple[bytes, ...]  # encoded headers: the MINT's block first, the certified block last
    certificate: bytes  # encoded finality certificate of the last header's block

    def encode(self) -> bytes:
        out = [MAGIC, bytes((PROOF_VERSION,)), _U32.pack(len(self.tx)), self.tx, _U32.pack(self.tx_index),
               bytes((len(self.path),)), *self.path, _U16.pack(len(self.headers))]
        for h in self.headers:
            out += [_U16.pack(len(h)), h]
        out += [_U32.pack(len(self.certificate)), self.certificate]
        return b"".join(out)


@dataclass(frozen=True, slots=True)
class ProofResult:
    """What a verified proof establishes, under the genesis it was checked against."""

    receipt_hash: bytes
    tx_hash: bytes
    block_height: int
    block_hash: bytes
    certified_height: int
    certified_hash: bytes
    provider: str
    amount: int  # what the MINT minted to the provider (the genesis caps applied)


def _malformed(why: str) -> InvalidArgument:
    return InvalidArgument(f"malformed proof: {why}")


def decode_proof(raw: bytes) -> ReceiptProof:
    raw = bytes(raw)
    if not raw.startswith(MAGIC):
        raise _malformed("not a receipt proof (it does not start with \"AITBC-RP\")")
    if len(raw) > MAX_PROOF_BYTES:
        raise _malformed(f"{len(raw)} bytes, at most {MAX_PROOF_BYTES}")
    try:
        pos = len(MAGIC)
        if raw[pos] != PROOF_VERSION:
            raise _malformed(f"version {raw[pos]} is not supported")
        (tlen,) = _U32.unpack_from(raw, pos + 1)
        pos += 5
        if tlen > MAX_TX_BYTES:
            raise _malformed(f"transaction of {tlen} bytes, at most {MAX_TX_BYTES}")
        tx = raw[pos:pos + tlen]
        pos += tlen
        (index,) = _U32.unpack_from(raw, pos)
        plen = raw[pos + 4]
        pos += 5
        if plen > merkle.MAX_PATH:
            raise _malformed(f"merkle path of {plen} siblings, at most {merkle.MAX_PATH}")
        path = tuple(raw[pos + 32 * i:pos + 32 * (i + 1)] for i in range(plen))
        pos += 32 * plen
        (count,) = _U16.unpack_from(raw, pos)
        pos += 2
        if not 1 <= count <= MAX_HEADERS:
            raise _malformed(f"{count} headers, needs 1 to {MAX_HEADERS}")
        headers = []
        for _ in range(count):
            (hlen,) = _U16.unpack_from(raw, pos)
            headers.append(raw[pos + 2:pos + 2 + hlen])
            pos += 2 + hlen
        (clen,) = _U32.unpack_from(raw, pos)
        cert = raw[pos + 4:pos + 4 + clen]
        pos += 4 + clen
    except (IndexError, struct.error):
        raise _malformed("truncated") from None
    if pos != len(raw) or len(tx) != tlen or len(cert) != clen or any(len(p) != 32 for p in path):
        raise _malformed("truncated or trailing bytes")
    return ReceiptProof(tx, index, path, tuple(headers), cert)


def verify_proof(proof: ReceiptProof | bytes, genesis: Genesis, receipt_hash: bytes,
                 genesis_hash: bytes | None = None) -> ProofResult:
    """Check every link of a receipt proof against the genesis alone, in the documented order:
    the MINT, the Merkle path to its block's tx root, the header chain, the certificate."""
    p = decode_proof(proof) if isinstance(proof, bytes | bytearray | memoryview) else proof
    gh = genesis_hash if genesis_hash is not None else genesis.hash()
    # 1. the transaction: a MINT of exactly this receipt, valid under this genesis
    try:
        tx = decode_tx(p.tx)
    except AitbcError as exc:
        raise InvalidArgument(f"proof transaction: {exc.message}") from None
    if tx.kind != KIND_MINT or tx.receipt is None:
        raise InvalidArgument(f"proof transaction is a {KIND_NAMES[tx.kind]}, not a MINT")
    if tx.receipt.receipt_hash != receipt_hash:
        raise InvalidArgument(f"proof is for receipt {tx.receipt.receipt_hash.hex()}, not for receipt "
                              f"{receipt_hash.hex()}")
    try:
        state.check_stateless(tx, genesis)
    except AitbcError as exc:
        raise InvalidArgument(f"proof transaction: {exc.message}") from None
    # 2. the headers decode and belong to this chain
    headers: list[Header] = []
    for raw in p.headers:
        try:
            h = decode_header(raw)
        except AitbcError as exc:
            raise InvalidArgument(f"proof header {len(headers) + 1}: {exc.message}") from None
        if h.chain_id != genesis.chain_id or h.genesis_hash != gh:
            raise InvalidArgument(f"proof header {len(headers) + 1} (block {h.height}) is for another chain: "
                                  f"{h.chain_id!r}, genesis {h.genesis_hash.hex()}")
        headers.append(h)
    block = headers[0]
    # 3. the Merkle path from the MINT to its block's tx root (its shape fixed by index and tx count)
    if merkle.root_from_path(tx.hash, p.tx_index, block.tx_count, p.path) != block.tx_root:
        raise InvalidArgument(f"merkle path does not lead to block {block.height}'s tx root "
                              f"(tx {p.tx_index} of {block.tx_count})")
    # 4. each next header is the child of the one before
    for lower, upper in zip(headers, headers[1:], strict=False):
        if upper.height != lower.height + 1 or upper.parent_hash != lower.hash:
            raise InvalidArgument(f"header chain is broken above block {lower.height}: the next header (block "
                                  f"{upper.height}) is not its child")
    top = headers[-1]
    # 5. the certificate: more than 2/3 of the genesis authorities made the top block final
    try:
        cert = finality.decode_certificate(p.certificate)
        if genesis.has_authority_votes and any(v not in genesis.authority_ids for v, _ in cert.signatures):
            # signed by a set the authorities voted since the genesis: a light client holding only
            # the genesis cannot check it (docs/ledger.md "Receipt proofs")
            raise InvalidArgument(SET_CHANGED)
        # either checkpoint of the top block may carry its certificate (the phase is not compared)
        finality.verify_certificate(cert, genesis, block=finality.Checkpoint(top.height, top.hash, finality.COMMIT),
                                    genesis_hash=gh)
    except AitbcError as exc:
        raise InvalidArgument(f"proof certificate: {exc.message}") from None
    body = tx.receipt.body
    return ProofResult(receipt_hash, tx.hash, block.height, block.hash, top.height, top.hash, body.provider,
                       state.mint_amount(body.units, body.price_per_unit, genesis))


# ---- building a proof on a node ----------------------------------------------------------------


class ChainReader(Protocol):
    """What building a proof reads from a chain (aitbc.ledger.chain.Chain)."""

    def receipt_minted(self, receipt_hash: bytes) -> tuple[int, bytes, int] | None: ...
    def tx_location(self, tx_hash: bytes) -> tuple[int, int] | None: ...
    def block_raw_at(self, height: int) -> bytes | None: ...
    def header_at(self, height: int) -> bytes | None: ...
    def hash_at(self, height: int) -> bytes | None: ...
    def certificate(self, block_hash: bytes) -> bytes | None: ...
    def certified(self) -> tuple[int, bytes] | None: ...
    def authorities_at(self, height: int) -> tuple[bytes, ...] | None: ...


def build_proof(chain: ChainReader, receipt_hash: bytes, max_headers: int = MAX_HEADERS,
                genesis_ids: tuple[bytes, ...] | None = None) -> ReceiptProof:
    """The proof of a minted receipt, from a node's canonical chain; NotFound when it was never
    minted, FailedPrecondition when no certified block at or above its block is known (yet), or
    when the certificate's set is not the genesis list (`genesis_ids`: a light client could not
    check it)."""
    if genesis_ids is None:
        genesis_ids = chain.authorities_at(1) or ()
    minted = chain.receipt_minted(receipt_hash)
    if minted is None:
        raise NotFound(f"receipt {receipt_hash.hex()} was never minted on this chain")
    height, tx_hash, _ = minted
    loc = chain.tx_location(tx_hash)
    raw = chain.block_raw_at(height)
    if loc is None or raw is None:
        raise FailedPrecondition(f"receipt {receipt_hash.hex()}: its block {height} is being reorganized; retry")
    txs = split_txs(raw)
    index = loc[1]
    certified = chain.certified()
    ch = 0 if certified is None else certified[0]
    if ch < height:
        raise FailedPrecondition(f"not final yet: receipt {receipt_hash.hex()} is in block {height}, above the "
                                 f"certified height {ch}; retry after height {height} is certified")
    headers: list[bytes] = []
    for h in range(height, min(height + max_headers, ch + 1)):
        hdr, bh = chain.header_at(h), chain.hash_at(h)
        if hdr is None or bh is None:
            break
        headers.append(hdr)
        cert = chain.certificate(bh)
        if cert is not None:
            target = finality.decode_certificate(cert).target.height  # h (from prepare) or h + 1 (from commit)
            if chain.authorities_at(target) != genesis_ids:  # the certificate is checked with its target's set
                raise FailedPrecondition(f"receipt {receipt_hash.hex()} is in block {height}: {SET_CHANGED}")
            path = merkle.merkle_path([crypto.sha256(t) for t in txs], index)
            return ReceiptProof(txs[index], index, tuple(path), tuple(headers), cert)
    raise FailedPrecondition(f"no certificate within {max_headers} headers of block {height} (receipt "
                             f"{receipt_hash.hex()}): this node holds no certificate for blocks {height} to "
                             f"{height + len(headers) - 1}; ask a node that certified them")
