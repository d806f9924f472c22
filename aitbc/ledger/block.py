"""Blocks: fixed-layout header, proposer signature, tx root, and the block's wire/storage bytes.

    header = u8 version(=4) | u8 len(chain_id) | chain_id | 32 genesis hash | u64 height | 32 parent hash
             | u64 slot | u64 timestamp_ms | 20 proposer account id | 32 tx root | 32 state root
             | 32 set chain | u32 tx count
    set chain  = the hash chain of the authority sets up to the newest one fixed after the block
                 (aitbc.ledger.authorities.next_set_chain; ledger format 5: receipt proofs across set changes)
    block hash = sha256("AITBC/block/v2" || 0x00 || header)   (what the proposer signs, 65-byte r||s||v)
    tx root    = Merkle root of the tx hashes (aitbc.ledger.merkle; version 2 hashed them flat)
    block      = u32 len(header) | header | 65 signature | (u32 len(tx) | signed tx) * tx count
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from aitbc import bech32, crypto
from aitbc.errors import CryptoError, InvalidArgument
from aitbc.ledger.genesis import check_chain_id
from aitbc.ledger.merkle import merkle_root
from aitbc.ledger.signers import Signers, signed_by
from aitbc.ledger.tx import Tx, decode_tx

BLOCK_VERSION = 4  # ledger format 5: the header commits to the authority sets (3: format 3 and 4, no set chain)
BLOCK_DOMAIN = b"AITBC/block/v2"
MAX_BLOCK_BYTES = 6 * 1024 * 1024  # under the 8 MiB gRPC message limit

_U32 = struct.Struct(">I")
_TAIL = struct.Struct(">Q32sQQ20s32s32s32sI")


@dataclass(frozen=True, slots=True)
class Header:
    chain_id: str
    genesis_hash: bytes
    height: int
    parent_hash: bytes
    slot: int
    timestamp_ms: int
    proposer: bytes  # 20-byte account id
    tx_root: bytes
    state_root: bytes
    set_chain: bytes  # 32 bytes: commits to every authority set up to the one of the epoch after the next block's
    tx_count: int
    version: int = BLOCK_VERSION

    def encode(self) -> bytes:
        cid = self.chain_id.encode()
        return bytes((self.version, len(cid))) + cid + self.genesis_hash + _TAIL.pack(
            self.height, self.parent_hash, self.slot, self.timestamp_ms, self.proposer,
            self.tx_root, self.state_root, self.set_chain, self.tx_count)

    @property
    def hash(self) -> bytes:
        return crypto.domain_digest(BLOCK_DOMAIN, self.encode())

    @property
    def proposer_address(self) -> str:
        return bech32.encode(crypto.ADDRESS_HRP, self.proposer)


def decode_header(data: bytes) -> Header:
    try:
        version, clen = data[0], data[1]
        if version != BLOCK_VERSION:
            if version == 1:
                raise InvalidArgument("malformed block: header version 1 is not supported (a ledger format 1 "
                                      "block, not bound to the genesis hash; this node runs format 5)")
            if version == 2:
                raise InvalidArgument("malformed block: header version 2 is not supported (a ledger format 2 "
                                      "block, whose tx root is a flat hash with no Merkle proofs; this node runs "
                                      "format 5)")
            if version == 3:
                raise InvalidArgument("malformed block: header version 3 is not supported (a ledger format 3 or 4 "
                                      "block, whose header does not commit to the authority sets; this node runs "
                                      "format 5)")
            raise InvalidArgument(f"malformed block: header version {version} is not supported")
        cid = data[2:2 + clen].decode("ascii")
        check_chain_id(cid)
        if len(data) != 2 + clen + 32 + _TAIL.size:
            raise InvalidArgument("malformed block: header has the wrong length")
        genesis_hash = data[2 + clen:2 + clen + 32]
        fields = _TAIL.unpack_from(data, 2 + clen + 32)
    except (IndexError, UnicodeDecodeError, struct.error):
        raise InvalidArgument("malformed block: bad header") from None
    except InvalidArgument as exc:
        if exc.message.startswith("malformed"):
            raise
        raise InvalidArgument("malformed block: bad chain id") from None
    return Header(cid, genesis_hash, *fields, version=version)


def tx_root(tx_hashes: list[bytes] | tuple[bytes, ...]) -> bytes:
    return merkle_root(tx_hashes)


@dataclass(frozen=True, slots=True, eq=False)
class Block:
    header: Header
    signature: bytes
    txs: tuple[Tx, ...]
    raw: bytes
    hash: bytes

    @property
    def height(self) -> int:
        return self.header.height

    @property
    def parent_hash(self) -> bytes:
        return self.header.parent_hash


def encode_block(header: Header, signature: bytes, tx_raws: list[bytes] | tuple[bytes, ...]) -> bytes:
    hb = header.encode()
    parts = [_U32.pack(len(hb)), hb, signature]
    for raw in tx_raws:
        parts.append(_U32.pack(len(raw)))
        parts.append(raw)
    return b"".join(parts)


def make_block(header: Header, key: crypto.PrivateKey, txs: list[Tx] | tuple[Tx, ...]) -> Block:
    h = header.hash
    sig = key.sign(h)
    raw = encode_block(header, sig, [t.raw for t in txs])
    return Block(header, sig, tuple(txs), raw, h)


def decode_block(raw: bytes) -> Block:
    """Parse a block's bytes (structure only: signatures, links and state are checked by the chain)."""
    raw = bytes(raw)
    if len(raw) > MAX_BLOCK_BYTES:
        raise InvalidArgument(f"block too large: {len(raw)} bytes")
    try:
        (hlen,) = _U32.unpack_from(raw, 0)
        header = decode_header(raw[4:4 + hlen])
        pos = 4 + hlen
        sig = raw[pos:pos + 65]
        pos += 65
        if len(sig) != 65:
            raise InvalidArgument("malformed block: truncated signature")
        txs = []
        for _ in range(header.tx_count):
            (tlen,) = _U32.unpack_from(raw, pos)
            pos += 4
            txs.append(decode_tx(raw[pos:pos + tlen]))
            if pos + tlen > len(raw):
                raise InvalidArgument("malformed block: truncated transaction")
            pos += tlen
    except struct.error:
        raise InvalidArgument("malformed block: truncated") from None
    if pos != len(raw):
        raise InvalidArgument("malformed block: trailing bytes")
    return Block(header, sig, tuple(txs), raw, header.hash)


def split_txs(raw: bytes) -> list[bytes]:
    """The signed txs of a stored (already validated) block, without decoding them: what a receipt
    proof needs (their hashes), at a fraction of decode_block's cost on a large block."""
    (hlen,) = _U32.unpack_from(raw, 0)
    (count,) = _U32.unpack_from(raw, 4 + hlen - 4)  # tx_count ends the header
    pos, out = 4 + hlen + 65, []
    for _ in range(count):
        (tlen,) = _U32.unpack_from(raw, pos)
        out.append(raw[pos + 4:pos + 4 + tlen])
        pos += 4 + tlen
    return out


def block_signature(raw: bytes) -> tuple[bytes, bytes] | None:
    """(hash, signature) of an encoded block as received, to recover its signer ahead
    (aitbc.ledger.signers); None when it is too short to hold them (decoding refuses it)."""
    if len(raw) < 4:
        return None
    (hlen,) = _U32.unpack_from(raw, 0)
    sig = raw[4 + hlen:4 + hlen + 65]
    return None if len(sig) != 65 else (crypto.domain_digest(BLOCK_DOMAIN, raw[4:4 + hlen]), sig)


def verify_block_signature(block: Block, signers: Signers | None = None) -> None:
    """Raise unless the 65-byte low-S signature over the block hash is by the header's proposer.
    `signers`: signatures recovered beforehand (aitbc.ledger.signers)."""
    try:
        signed = signed_by(block.header.proposer, block.hash, block.signature, signers)
    except CryptoError as exc:
        raise InvalidArgument(f"invalid block {block.height}: proposer {exc.message}") from None
    if not signed:
        raise InvalidArgument(f"invalid block {block.height}: not signed by its proposer")
