"""Authority set changes by the authorities' own votes (docs/ledger.md, "Authority set changes").

Pure functions over a state reader, like aitbc.ledger.state (which calls them). Genesis version 3
only; a version 2 genesis keeps its list for good.

    epoch of block h (h >= 1)  = (h - 1) // epoch_blocks
    set(0) = set(1)            = the genesis list, in its order
    set(e), e >= 2             = written by the last block of epoch e - 2 (height (e - 1) * epoch_blocks):
                                 set(e - 1) with at most one change applied, the first applicable
                                 proposal of the queue (proposals that reached quorum, in that order)

State (in the state root, as every other key):
    b"v1:aset:" || u64 epoch                            -> u16 count || count x 20-byte account id
    b"v1:avot:" || u64 epoch || u8 action || subject (20) || voter (20)  -> u64 height
    b"v1:aprp:" || u64 epoch || u8 action || subject (20)              -> u32 votes
    b"v1:avtr:" || u64 epoch || voter (20)              -> u8 count || count x (u8 action || subject (20))
    b"v1:aque"                                          -> u16 count || count x (u8 action || subject (20))

Bounded (a byzantine authority must not grow every node's state for ever): a voter votes for at
most MAX_PROPOSALS_PER_VOTER distinct proposals per epoch (v1:avtr: lists them); the last block of
an epoch deletes that epoch's v1:avot:, v1:aprp: and v1:avtr: records (votes never carry over), so
the state holds the votes of one epoch only, at most n x MAX_PROPOSALS_PER_VOTER of them; the queue
holds at most MAX_QUEUE proposals (the vote that would bring one more to its quorum is refused).

Why two epochs: a block of epoch e is proposed and voted final by set(e), which a block at least one
whole epoch below it fixed; two nodes that agree on a final block agree on its ancestors, hence on
the set of its epoch and of the next one.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from typing import NamedTuple

from aitbc import bech32, crypto
from aitbc.errors import AlreadyExists, FailedPrecondition, PermissionDenied
from aitbc.ledger.finality import quorum
from aitbc.ledger.genesis import Genesis
from aitbc.ledger.tx import ACTION_ADD, ACTION_NAMES, ACTION_REMOVE, Tx

ASET = b"v1:aset:"
AVOT = b"v1:avot:"
APRP = b"v1:aprp:"
AVTR = b"v1:avtr:"
AQUE = b"v1:aque"
SET_CHAIN_DOMAIN = b"AITBC/aset/v1"
# consensus constants of ledger format 3 (docs/ledger.md "Authority set changes", "Bounds")
MAX_PROPOSALS_PER_VOTER = 4  # distinct proposals one authority may vote for in one epoch
MAX_QUEUE = 16  # proposals that reached quorum and wait for a boundary

Reader = Callable[[bytes], "bytes | None"]
_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")


def address(account_id: bytes) -> str:
    return bech32.encode(crypto.ADDRESS_HRP, account_id)


def aset_key(epoch: int) -> bytes:
    return ASET + _U64.pack(epoch)


def avot_key(epoch: int, action: int, subject: bytes, voter: bytes) -> bytes:
    return AVOT + _U64.pack(epoch) + bytes((action,)) + subject + voter


def aprp_key(epoch: int, action: int, subject: bytes) -> bytes:
    return APRP + _U64.pack(epoch) + bytes((action,)) + subject


def avtr_key(epoch: int, voter: bytes) -> bytes:
    return AVTR + _U64.pack(epoch) + voter


def encode_set(ids: tuple[bytes, ...]) -> bytes:
    return _U16.pack(len(ids)) + b"".join(ids)


@functools.lru_cache(maxsize=256)
def decode_set(value: bytes) -> tuple[bytes, ...]:
    (n,) = _U16.unpack_from(value)
    return tuple(value[2 + 20 * i:22 + 20 * i] for i in range(n))


def encode_queue(queue: list[tuple[int, bytes]]) -> bytes:
    return _U16.pack(len(queue)) + b"".join(bytes((a,)) + s for a, s in queue)


def decode_queue(value: bytes | None) -> list[tuple[int, bytes]]:
    if value is None:
        return []
    (n,) = _U16.unpack_from(value)
    return [(value[2 + 21 * i], value[3 + 21 * i:23 + 21 * i]) for i in range(n)]


def encode_voted(voted: list[tuple[int, bytes]]) -> bytes:
    """A v1:avtr: value: the proposals one voter voted for in one epoch, in vote order."""
    return bytes((len(voted),)) + b"".join(bytes((a,)) + s for a, s in voted)


def decode_voted(value: bytes | None) -> list[tuple[int, bytes]]:
    if value is None:
        return []
    return [(value[1 + 21 * i], value[2 + 21 * i:22 + 21 * i]) for i in range(value[0])]


def set_link(prev: bytes, epoch: int, ids: tuple[bytes, ...]) -> bytes:
    """One link of the set chain: the set `ids` takes over at `epoch` after the history `prev`."""
    return crypto.domain_digest(SET_CHAIN_DOMAIN, prev + _U64.pack(epoch) + encode_set(ids))


def genesis_set_chain(genesis: Genesis, genesis_hash: bytes) -> bytes:
    """The set chain of the genesis (height 0) and of every block before the first change: the
    genesis list taking over at epoch 1 after the genesis itself."""
    return set_link(genesis_hash, 1, genesis.authority_ids)


def fixed_epoch(genesis: Genesis, height: int) -> int:
    """The newest epoch whose set is fixed in the state after block `height` (0: the genesis): the
    epoch after the next block's, floor(height / epoch_blocks) + 1 (1 on a version 2 genesis)."""
    if not genesis.has_authority_votes:
        return 1
    return height // genesis.epoch_blocks + 1


def next_set_chain(parent_chain: bytes, genesis: Genesis, height: int, read_after: Reader) -> bytes:
    """The `set_chain` of block `height` (ledger format 5) from its parent's and the state after the
    block: it moves only at the last block of an epoch whose new set (of the epoch after next)
    differs from the set before it; every other block repeats its parent's."""
    if not genesis.has_authority_votes or height % genesis.epoch_blocks:
        return parent_chain
    e = fixed_epoch(genesis, height)
    new, old = authority_set(read_after, genesis, e), authority_set(read_after, genesis, e - 1)
    assert new is not None and old is not None  # the last block of an epoch writes set(e); set(e - 1) is older
    return parent_chain if new == old else set_link(parent_chain, e, new)


def set_changes(read: Reader, genesis: Genesis, upto: int, since: int = 1) -> list[tuple[int, tuple[bytes, ...]]]:
    """(epoch, set) of every epoch since + 1..upto whose set differs from the epoch before's, in the
    state `read` (which must hold set(upto)): the links of the set chain, what a receipt proof carries."""
    if not genesis.has_authority_votes or upto <= since:
        return []
    out: list[tuple[int, tuple[bytes, ...]]] = []
    prev = authority_set(read, genesis, since)
    for e in range(max(2, since + 1), upto + 1):
        cur = authority_set(read, genesis, e)
        assert cur is not None
        if cur != prev:
            out.append((e, cur))
        prev = cur
    return out


def defining_height(genesis: Genesis, epoch: int) -> int:
    """The block whose state writes set(epoch) (epoch >= 2): the last block of epoch - 2."""
    return (epoch - 1) * genesis.epoch_blocks


def authority_set(read: Reader, genesis: Genesis, epoch: int) -> tuple[bytes, ...] | None:
    """set(epoch) in the state `read` (None: not fixed yet, its defining block is above that state)."""
    if not genesis.has_authority_votes or epoch < 2:
        return genesis.authority_ids
    v = read(aset_key(epoch))
    return None if v is None else decode_set(v)


def authorities_at(read: Reader, genesis: Genesis, height: int) -> tuple[bytes, ...] | None:
    return authority_set(read, genesis, genesis.epoch(height))


def pending(read: Reader, scan: Callable[[bytes], object], epoch: int) -> list[tuple[int, bytes, int, list[bytes]]]:
    """(action, subject, votes, voters) of every proposal voted in `epoch` (a prefix scan)."""
    props: dict[tuple[int, bytes], list[bytes]] = {}
    prefix = AVOT + _U64.pack(epoch)
    for k, _ in scan(prefix):  # type: ignore[attr-defined]
        rest = k[len(prefix):]
        props.setdefault((rest[0], rest[1:21]), []).append(rest[21:41])
    out = []
    for (action, subject), voters in props.items():
        v = read(aprp_key(epoch, action, subject))
        out.append((action, subject, 0 if v is None else _U32.unpack(v)[0], voters))
    return out


def apply_vote(read: Reader, tx: Tx, genesis: Genesis, height: int, evidence_at: int | None) -> dict[bytes, bytes]:
    """The writes of an AUTHORITY_VOTE in block `height` (nonce and balance are the caller's);
    `evidence_at`: the height of the evidence against the sender, if any."""
    e = genesis.epoch(height)
    ids = authority_set(read, genesis, e)
    assert ids is not None  # the parent state of a block always holds the set of its epoch
    sender, subject = tx.sender_id, tx.subject
    who, whom, what = address(sender), address(subject), ACTION_NAMES[tx.action]
    if sender not in ids:
        raise PermissionDenied(f"not an authority: {who} is not in the authority set of epoch {e} (block {height})")
    if evidence_at is not None:
        raise PermissionDenied(f"votes ignored: {who} has evidence on chain (block {evidence_at}); its authority "
                               "votes no longer count")
    if tx.action == ACTION_ADD and subject in ids:
        raise FailedPrecondition(f"authority vote refused: {whom} is already an authority of epoch {e}")
    if tx.action == ACTION_REMOVE:
        if subject not in ids:
            raise FailedPrecondition(f"authority vote refused: {whom} is not an authority of epoch {e}")
        if len(ids) == 1:
            raise FailedPrecondition(f"authority vote refused: removing {whom} would leave no authority (a set "
                                     "keeps at least one)")
    vk = avot_key(e, tx.action, subject, sender)
    if (seen := read(vk)) is not None:
        raise AlreadyExists(f"already voted: {who} voted to {what} {whom} in epoch {e} (block "
                            f"{_U64.unpack(seen)[0]})")
    rk = avtr_key(e, sender)
    voted = decode_voted(read(rk))
    if len(voted) >= MAX_PROPOSALS_PER_VOTER:
        raise FailedPrecondition(
            f"too many proposals: {who} already voted for {len(voted)} proposals in epoch {e} (at most "
            f"{MAX_PROPOSALS_PER_VOTER} per authority per epoch); vote again from epoch {e + 1} (block "
            f"{(e + 1) * genesis.epoch_blocks + 1})")
    pk = aprp_key(e, tx.action, subject)
    old = read(pk)
    votes = (0 if old is None else _U32.unpack(old)[0]) + 1
    writes = {vk: _U64.pack(height), pk: _U32.pack(votes), rk: encode_voted([*voted, (tx.action, subject)])}
    if votes == quorum(len(ids)):  # reached now (once: a voter counts once per proposal per epoch)
        queue = decode_queue(read(AQUE))
        if (tx.action, subject) not in queue:
            if len(queue) >= MAX_QUEUE:
                raise FailedPrecondition(
                    f"authority queue full: {len(queue)} changes wait for epoch boundaries (one applies per "
                    f"epoch, at most {MAX_QUEUE} wait); this vote would bring '{what} {whom}' to its quorum: vote "
                    "again in a later epoch, once the queue has room")
            writes[AQUE] = encode_queue([*queue, (tx.action, subject)])
    return writes


def end_block(read: Reader, genesis: Genesis, height: int) -> dict[bytes, bytes | None]:
    """After a block's transactions: the last block of epoch e writes set(e + 2), set(e + 1) with the
    first applicable queued change (FIFO; at most one per epoch; inapplicable ones are dropped), and
    deletes the votes of epoch e (None: a deleted key; they never count again)."""
    if not genesis.has_authority_votes or height % genesis.epoch_blocks:
        return {}
    e = genesis.epoch(height)
    writes: dict[bytes, bytes | None] = prune_votes(read, genesis, e)
    base = authority_set(read, genesis, e + 1)
    assert base is not None
    raw_queue = read(AQUE)
    queue = decode_queue(raw_queue)
    new = base
    while queue:
        action, subject = queue.pop(0)
        if action == ACTION_ADD and subject not in base:
            new = (*base, subject)
            break
        if action == ACTION_REMOVE and subject in base and len(base) > 1:
            new = tuple(a for a in base if a != subject)
            break
    writes[aset_key(e + 2)] = encode_set(new)
    if raw_queue is not None and encode_queue(queue) != raw_queue:
        writes[AQUE] = encode_queue(queue)
    return writes


def prune_votes(read: Reader, genesis: Genesis, epoch: int) -> dict[bytes, bytes | None]:
    """The deletions of every vote record of `epoch` (v1:avot:, v1:aprp:, v1:avtr:), found without a
    scan: only members of set(epoch) vote in it, and each one's v1:avtr: lists what it voted for."""
    ids = authority_set(read, genesis, epoch)
    assert ids is not None  # the last block of an epoch knows that epoch's set
    gone: dict[bytes, bytes | None] = {}
    for voter in ids:
        rk = avtr_key(epoch, voter)
        if (voted := read(rk)) is None:
            continue
        gone[rk] = None
        for action, subject in decode_voted(voted):
            gone[avot_key(epoch, action, subject, voter)] = None
            gone[aprp_key(epoch, action, subject)] = None
    return gone


class Proposal(NamedTuple):
    action: str  # "add" or "remove"
    subject: str  # address
    votes: int
    quorum: int
    voters: tuple[str, ...]


class AuthoritySet(NamedTuple):
    """What GetAuthorities answers: the set of a height's epoch and the proposals voted in it."""

    height: int
    epoch: int
    authorities: tuple[str, ...]
    epoch_blocks: int  # 0 on a version 2 genesis (the set never changes)
    proposals: tuple[Proposal, ...]
    queued: tuple[Proposal, ...]  # reached quorum, applied one per epoch boundary in this order


def describe(read: Reader, scan: Callable[[bytes], object], genesis: Genesis, height: int) -> AuthoritySet:
    """The set of `height`'s epoch in the state `read` (the canonical one), its proposals and the
    queue; NotFound when that epoch's set is not fixed yet."""
    from aitbc.errors import NotFound

    e = genesis.epoch(height)
    ids = authority_set(read, genesis, e)
    if ids is None:
        raise NotFound(f"the authority set of epoch {e} (height {height}) is not fixed yet: block "
                       f"{defining_height(genesis, e)} fixes it")
    q = quorum(len(ids))
    props = tuple(Proposal(ACTION_NAMES[a], address(s), n, q, tuple(address(v) for v in vs))
                  for a, s, n, vs in sorted(pending(read, scan, e)))
    queued = tuple(Proposal(ACTION_NAMES[a], address(s), 0, 0, ()) for a, s in decode_queue(read(AQUE)))
    return AuthoritySet(height, e, tuple(address(a) for a in ids),
                        genesis.epoch_blocks if genesis.has_authority_votes else 0, props, queued)
