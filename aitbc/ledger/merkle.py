"""The block's transaction root: a binary Merkle tree over its tx hashes (docs/ledger.md, "Tx root").

    leaf(tx_hash)  = sha256("AITBC/merkle/leaf/v1" || 0x00 || tx_hash)
    node(l, r)     = sha256("AITBC/merkle/node/v1" || 0x00 || l || r)
    root([])       = sha256("AITBC/txroot/v3" || 0x00)            (the empty block)

Leaves and inner nodes hash under different domains, so a leaf can never pass for an inner node
(nor the reverse). Levels pair from the left; an odd last node is carried up unchanged, never
paired with a copy of itself: Bitcoin's duplicate-last-leaf rule gives [a, b, c] and [a, b, c, c]
one root (CVE-2012-2459), this rule gives every list of tx hashes its own root. (The tree has the
shape of RFC 6962's Merkle tree hash: the left subtree holds the largest power of two of leaves.)
The path of a leaf is its siblings from the bottom up; which side each one is on, and how many
there are, follow from the leaf's index and the tx count alone, so a path cannot be re-read as
the path of another position or of a shorter tree.
"""

from __future__ import annotations

from collections.abc import Sequence

from aitbc import crypto
from aitbc.errors import InvalidArgument

LEAF_DOMAIN = b"AITBC/merkle/leaf/v1"
NODE_DOMAIN = b"AITBC/merkle/node/v1"
EMPTY_DOMAIN = b"AITBC/txroot/v3"
MAX_PATH = 32  # siblings: a tree of at most 2^32 leaves (a tx index is a u32)


def leaf_hash(tx_hash: bytes) -> bytes:
    return crypto.domain_digest(LEAF_DOMAIN, tx_hash)


def node_hash(left: bytes, right: bytes) -> bytes:
    return crypto.domain_digest(NODE_DOMAIN, left + right)


EMPTY_ROOT = crypto.domain_digest(EMPTY_DOMAIN, b"")


def _levels(tx_hashes: Sequence[bytes]) -> list[list[bytes]]:
    level = [leaf_hash(h) for h in tx_hashes]
    levels = [level]
    while len(level) > 1:
        nxt = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])  # carried up unchanged, never paired with itself
        level = nxt
        levels.append(level)
    return levels


def merkle_root(tx_hashes: Sequence[bytes]) -> bytes:
    """The tx root of a block with these tx hashes (in block order)."""
    if not tx_hashes:
        return EMPTY_ROOT
    return _levels(tx_hashes)[-1][0]


def _shape(index: int, count: int) -> list[bool]:
    """For each level from the bottom: True when the node at `index` has a sibling there."""
    if not 0 <= index < count:
        raise InvalidArgument(f"merkle path: index {index} is outside a block of {count} transactions")
    shape = []
    while count > 1:
        shape.append(not (index % 2 == 0 and index == count - 1))
        index //= 2
        count = (count + 1) // 2
    return shape


def merkle_path(tx_hashes: Sequence[bytes], index: int) -> list[bytes]:
    """The siblings from the leaf at `index` up to the root (bottom first)."""
    has = _shape(index, len(tx_hashes))
    path = []
    for level, sibling in zip(_levels(tx_hashes), has, strict=False):
        if sibling:
            path.append(level[index ^ 1])
        index //= 2
    return path


def root_from_path(tx_hash: bytes, index: int, count: int, path: Sequence[bytes]) -> bytes:
    """The root that `path` leads to from the tx at `index` of `count`; raises when the path has
    not exactly the siblings that position needs (the shape follows from index and count)."""
    has = _shape(index, count)
    need = sum(has)
    if len(path) != need:
        raise InvalidArgument(f"merkle path has {len(path)} siblings; tx {index} of {count} needs {need}")
    cur = leaf_hash(tx_hash)
    it = iter(path)
    for sibling in has:
        if sibling:
            s = next(it)
            if len(s) != 32:
                raise InvalidArgument("merkle path: a sibling is not 32 bytes")
            cur = node_hash(s, cur) if index % 2 else node_hash(cur, s)
        index //= 2
    return cur


def verify_path(tx_hash: bytes, index: int, count: int, path: Sequence[bytes], root: bytes) -> None:
    """Raise InvalidArgument unless `path` proves tx `index` of `count` is `tx_hash` under `root`."""
    if root_from_path(tx_hash, index, count, path) != root:
        raise InvalidArgument(f"merkle path does not lead to the tx root (tx {index} of {count})")
