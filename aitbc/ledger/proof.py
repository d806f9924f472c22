"""Receipt proofs for light clients (docs/ledger.md, "Receipt proofs"): that a receipt was minted
in a final block, checkable offline by anyone holding only the genesis (its authority set), also
after the authorities changed their set (ledger format 5).

    proof = "AITBC-RP" (8 bytes) || u8 version (=2)
            || u32 len(tx) || tx                      the signed MINT
            || u32 tx_index || u8 len(path) || sibling (32) * len(path)     its Merkle path
            || u16 count || (u16 len(header) || header) * count
                 header 1 is the MINT's block, each next one the child of the one before
            || u32 len(certificate) || certificate    certifies the last header's block final
            || u16 changes || change * changes        every set change up to the last header's set chain
    change = u64 epoch || u16 n || account id (20) * n            the set that takes over at that epoch
             || u16 len(header) || header || u32 len(certificate) || certificate
                 a certified block that fixed it (its set chain ends with this change), certified by
                 the set before it

A certificate makes one block final and every ancestor of it final with it, so the headers only
climb from the MINT's block to the nearest certified block (at most MAX_HEADERS of them). Every
header commits to the hash chain of the sets (aitbc.ledger.authorities.next_set_chain): the changes
rebuild that chain from the genesis list, each one certified by the set before it, and the certified
block's own set chain must be their end, so a proof that leaves a change out fails. The verifier is
pure: no network, no store; every failure is an InvalidArgument with its reason.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Protocol

from aitbc import bech32, crypto
from aitbc.errors import AitbcError, FailedPrecondition, InvalidArgument, NotFound
from aitbc.ledger import authorities, finality, merkle, state
from aitbc.ledger.block import Header, decode_header, split_txs
from aitbc.ledger.genesis import Genesis
from aitbc.ledger.tx import KIND_NAMES, MAX_TX_BYTES, SETTLEMENT_KINDS, decode_tx

MAGIC = b"AITBC-RP"
PROOF_VERSION = 2  # 2: ledger format 5, with the set changes (1: format 4 headers, genesis set only)
MAX_HEADERS = 256  # headers from the MINT's block up to its certified block, both included
MAX_PROOF_BYTES = 16 * 1024 * 1024  # twice the gRPC message limit: a bound for the decoder, never reached

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


@dataclass(frozen=True, slots=True)
class SetChange:
    """The set of `epoch` (differs from the epoch before's) and a certified block that fixed it."""

    epoch: int
    members: tuple[bytes, ...]  # account ids, in the set's round-robin order
    header: bytes  # encoded header of a block with fixed epoch `epoch` (its set chain ends here)
    certificate: bytes  # its certificate, by the set of its target's epoch (before `epoch`)

    def encode(self) -> bytes:
        return b"".join([_U64.pack(self.epoch), authorities.encode_set(self.members), _U16.pack(len(self.header)),
                         self.header, _U32.pack(len(self.certificate)), self.certificate])


@dataclass(frozen=True, slots=True)
class ReceiptProof:
    tx: bytes  # the signed MINT
    tx_index: int
    path: tuple[bytes, ...]  # Merkle siblings, bottom first
    headers: tuple[bytes, ...]  # encoded headers: the MINT's block first, the certified block last
    certificate: bytes  # encoded finality certificate of the last header's block
    changes: tuple[SetChange, ...] = ()  # every set change up to the certified block's set chain, oldest first

    def encode(self) -> bytes:
        out = [MAGIC, bytes((PROOF_VERSION,)), _U32.pack(len(self.tx)), self.tx, _U32.pack(self.tx_index),
               bytes((len(self.path),)), *self.path, _U16.pack(len(self.headers))]
        for h in self.headers:
            out += [_U16.pack(len(h)), h]
        out += [_U32.pack(len(self.certificate)), self.certificate, _U16.pack(len(self.changes))]
        out += [c.encode() for c in self.changes]
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
    authorities: tuple[bytes, ...] = ()  # the set whose certificate made the block final
    set_changes: int = 0  # set changes since the genesis the proof carried (each certified by the set before)


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
            if raw[pos] == 1:
                raise _malformed("version 1 is not supported (a ledger format 4 proof, whose headers do not commit "
                                 "to the authority sets); fetch the proof again from a format 5 node")
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
        ok = len(tx) == tlen and len(cert) == clen and all(len(p) == 32 for p in path)
        (nchanges,) = _U16.unpack_from(raw, pos)
        pos += 2
        changes = []
        for _ in range(nchanges):
            (epoch,) = _U64.unpack_from(raw, pos)
            (n,) = _U16.unpack_from(raw, pos + 8)
            members = tuple(raw[pos + 10 + 20 * i:pos + 30 + 20 * i] for i in range(n))
            pos += 10 + 20 * n
            (hlen,) = _U16.unpack_from(raw, pos)
            header = raw[pos + 2:pos + 2 + hlen]
            pos += 2 + hlen
            (clen,) = _U32.unpack_from(raw, pos)
            ccert = raw[pos + 4:pos + 4 + clen]
            pos += 4 + clen
            ok = ok and len(header) == hlen and len(ccert) == clen and all(len(m) == 20 for m in members)
            changes.append(SetChange(epoch, members, header, ccert))
    except (IndexError, struct.error):
        raise _malformed("truncated") from None
    if pos != len(raw) or not ok:
        raise _malformed("truncated or trailing bytes")
    return ReceiptProof(tx, index, path, tuple(headers), cert, tuple(changes))


def _chain_header(raw: bytes, genesis: Genesis, gh: bytes, what: str) -> Header:
    """A proof header that decodes and belongs to this chain (`what` names it in the messages)."""
    try:
        h = decode_header(raw)
    except AitbcError as exc:
        raise InvalidArgument(f"{what}: {exc.message}") from None
    if h.chain_id != genesis.chain_id or h.genesis_hash != gh:
        raise InvalidArgument(f"{what} (block {h.height}) is for another chain: {h.chain_id!r}, genesis "
                              f"{h.genesis_hash.hex()}")
    return h


def _certify(raw: bytes, h: Header, genesis: Genesis, gh: bytes, sets: list[tuple[int, tuple[bytes, ...]]],
             what: str) -> tuple[bytes, ...]:
    """Check the certificate `raw` of header `h` with the set of its target's epoch, as `sets` (the
    genesis list, then each verified change) gives it; returns that set."""
    try:
        cert = finality.decode_certificate(raw)
        e = genesis.epoch(cert.target.height)
        ids = next(members for start, members in reversed(sets) if start <= e)
        # either checkpoint of the block may carry its certificate (the phase is not compared)
        finality.verify_certificate(cert, genesis, block=finality.Checkpoint(h.height, h.hash, finality.COMMIT),
                                    genesis_hash=gh, authorities=ids)
    except AitbcError as exc:
        raise InvalidArgument(f"{what}: {exc.message}") from None
    return ids


def verify_proof(proof: ReceiptProof | bytes, genesis: Genesis, receipt_hash: bytes,
                 genesis_hash: bytes | None = None) -> ProofResult:
    """Check every link of a receipt proof against the genesis alone, in the order of docs/ledger.md
    "Receipt proofs" (its step numbers below): the MINT, the headers, the Merkle path to the MINT's
    block's tx root, the header chain, the set changes, the certified block's set chain, its certificate."""
    p = decode_proof(proof) if isinstance(proof, bytes | bytearray | memoryview) else proof
    gh = genesis_hash if genesis_hash is not None else genesis.hash()
    # 2. the transaction: a MINT (or SETTLE) of exactly this receipt, valid under this genesis
    try:
        tx = decode_tx(p.tx)
    except AitbcError as exc:
        raise InvalidArgument(f"proof transaction: {exc.message}") from None
    if tx.kind not in SETTLEMENT_KINDS or tx.receipt is None:  # a SETTLE mints as a MINT does, and pays a fee
        raise InvalidArgument(f"proof transaction is a {KIND_NAMES[tx.kind]}, not a MINT or SETTLE")
    if tx.receipt.receipt_hash != receipt_hash:
        raise InvalidArgument(f"proof is for receipt {tx.receipt.receipt_hash.hex()}, not for receipt "
                              f"{receipt_hash.hex()}")
    try:
        state.check_stateless(tx, genesis)
    except AitbcError as exc:
        raise InvalidArgument(f"proof transaction: {exc.message}") from None
    # 3. the headers decode and belong to this chain
    headers = [_chain_header(raw, genesis, gh, f"proof header {k}") for k, raw in enumerate(p.headers, 1)]
    block = headers[0]
    # 4. the Merkle path from the MINT to its block's tx root (its shape fixed by index and tx count)
    if merkle.root_from_path(tx.hash, p.tx_index, block.tx_count, p.path) != block.tx_root:
        raise InvalidArgument(f"merkle path does not lead to block {block.height}'s tx root "
                              f"(tx {p.tx_index} of {block.tx_count})")
    # 5. each next header is the child of the one before
    for lower, upper in zip(headers, headers[1:], strict=False):
        if upper.height != lower.height + 1 or upper.parent_hash != lower.hash:
            raise InvalidArgument(f"header chain is broken above block {lower.height}: the next header (block "
                                  f"{upper.height}) is not its child")
    top = headers[-1]
    # 6. the set changes, oldest first: each one a link of the set chain, certified by the set before it
    sets: list[tuple[int, tuple[bytes, ...]]] = [(0, genesis.authority_ids)]
    chain = authorities.genesis_set_chain(genesis, gh)
    eb = genesis.epoch_blocks
    for k, c in enumerate(p.changes, 1):
        what = f"set change {k} (epoch {c.epoch})"
        if not genesis.has_authority_votes:
            raise InvalidArgument(f"{what}: this chain's genesis is version 2, whose authority set never changes")
        if c.epoch <= max(1, sets[-1][0]):
            raise InvalidArgument(f"{what} is not after the change before it (epoch {max(1, sets[-1][0])}): "
                                  "changes are listed once each, oldest first, from epoch 2")
        if not c.members or len(set(c.members)) != len(c.members):
            raise InvalidArgument(f"{what}: the member list must name at least one authority, each once")
        if c.members == sets[-1][1]:
            raise InvalidArgument(f"{what} does not change the set (the same members, in the same order)")
        h = _chain_header(c.header, genesis, gh, f"{what} header")
        if authorities.fixed_epoch(genesis, h.height) != c.epoch:
            raise InvalidArgument(f"{what}: block {h.height} is not one that fixed the set of epoch {c.epoch} (blocks "
                                  f"{(c.epoch - 1) * eb} to {c.epoch * eb - 1})")
        chain = authorities.set_link(chain, c.epoch, c.members)
        if h.set_chain != chain:
            raise InvalidArgument(f"{what}: block {h.height}'s set chain does not match the listed sets (a set change "
                                  "before it is missing from the proof, or a member list is wrong)")
        _certify(c.certificate, h, genesis, gh, sets, f"{what} certificate")
        sets.append((c.epoch, c.members))
    # 7. no change left out: the certified block commits to exactly the sets listed
    if top.set_chain != chain:
        raise InvalidArgument(f"block {top.height}'s set chain does not match the proof's {len(p.changes)} set "
                              "change(s): a set change is missing from the proof (or a member list is wrong)")
    # 8. the certificate: more than 2/3 of its target epoch's set made the top block final
    ids = _certify(p.certificate, top, genesis, gh, sets, "proof certificate")
    body = tx.receipt.body
    return ProofResult(receipt_hash, tx.hash, block.height, block.hash, top.height, top.hash, body.provider,
                       state.mint_amount(body.units, body.price_per_unit, genesis), ids, len(p.changes))


# ---- building a proof on a node ----------------------------------------------------------------


class ChainReader(Protocol):
    """What building a proof reads from a chain (aitbc.ledger.chain.Chain)."""

    genesis: Genesis

    def receipt_minted(self, receipt_hash: bytes) -> tuple[int, bytes, int] | None: ...
    def tx_location(self, tx_hash: bytes) -> tuple[int, int] | None: ...
    def block_raw_at(self, height: int) -> bytes | None: ...
    def header_at(self, height: int) -> bytes | None: ...
    def hash_at(self, height: int) -> bytes | None: ...
    def certificate(self, block_hash: bytes) -> bytes | None: ...
    def certified(self) -> tuple[int, bytes] | None: ...
    def set_changes(self, upto: int) -> list[tuple[int, tuple[bytes, ...]]]: ...


def _nearest_certified(chain: ChainReader, lo: int, hi: int) -> tuple[bytes, bytes, int] | None:
    """(header, certificate, height) of the lowest block in lo..hi the node holds a certificate of."""
    for h in range(lo, hi + 1):
        bh = chain.hash_at(h)
        if bh is None:
            return None
        cert = chain.certificate(bh)
        if cert is not None:
            hdr = chain.header_at(h)
            return None if hdr is None else (hdr, cert, h)
    return None


def build_proof(chain: ChainReader, receipt_hash: bytes, max_headers: int = MAX_HEADERS) -> ReceiptProof:
    """The proof of a minted receipt, from a node's canonical chain; NotFound when it was never
    minted, FailedPrecondition when no certified block at or above its block is known (yet), or
    when the node holds no certificate for the blocks that fixed a set change."""
    g = chain.genesis
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
            changes = []
            for epoch, members in chain.set_changes(authorities.fixed_epoch(g, h)):
                lo = (epoch - 1) * g.epoch_blocks
                found = _nearest_certified(chain, lo, epoch * g.epoch_blocks - 1)
                if found is None:
                    raise FailedPrecondition(
                        f"receipt {receipt_hash.hex()} is in block {height}: this node holds no certificate for "
                        f"blocks {lo} to {epoch * g.epoch_blocks - 1}, which fixed the authority set of epoch "
                        f"{epoch} (a set change the proof must carry); ask a node that certified them")
                changes.append(SetChange(epoch, members, found[0], found[1]))
            path = merkle.merkle_path([crypto.sha256(t) for t in txs], index)
            return ReceiptProof(txs[index], index, tuple(path), tuple(headers), cert, tuple(changes))
    raise FailedPrecondition(f"no certificate within {max_headers} headers of block {height} (receipt "
                             f"{receipt_hash.hex()}): this node holds no certificate for blocks {height} to "
                             f"{height + len(headers) - 1}; ask a node that certified them")


def describe_set(ids: tuple[bytes, ...]) -> str:
    return ", ".join(bech32.encode(crypto.ADDRESS_HRP, a) for a in ids)
