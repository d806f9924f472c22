"""The chain: block validation, fork choice, finality and atomic commits over a Store.

Consensus rule (docs/ledger.md, "Consensus"):
- slot = floor(timestamp_ms / block_time_ms); the proposer of slot s in a block of epoch e is
  set(e)[s % len(set(e))] (the genesis list on a version 2 genesis; aitbc.ledger.authorities); a
  block's slot is greater than its parent's and at most one slot ahead of the receiver's clock.
- fork choice: the highest block wins; at equal height the lower block hash wins; a node never
  reverts a final block.
- finality: block b is final once it (or a descendant) is certified by finality votes from more
  than 2/3 of the authorities (aitbc.ledger.finality; the node tallies the votes and hands the
  certificates to store_certificate); every ancestor of a certified block is final with it.

Only the canonical chain is stored, each block with an undo record (the previous values of every
key it wrote), so a reorg reverts and applies in ONE commit. Competing blocks wait in memory.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass

from aitbc import crypto
from aitbc.errors import AitbcError, FailedPrecondition, InvalidArgument
from aitbc.ledger import authorities, state
from aitbc.ledger.block import (
    MAX_BLOCK_BYTES,
    Block,
    Header,
    decode_block,
    decode_header,
    make_block,
    tx_root,
    verify_block_signature,
)
from aitbc.ledger.genesis import (
    FORMAT_1_REFUSED,
    FORMAT_2_REFUSED,
    FORMAT_3_REFUSED,
    FORMAT_4_REFUSED,
    Genesis,
)
from aitbc.ledger.signers import Signers
from aitbc.ledger.store import Store
from aitbc.ledger.tx import Tx

log = logging.getLogger("aitbc.ledger.chain")

META_GENESIS = b"v1:meta:genesis"
META_CHAIN = b"v1:meta:chain_id"
META_FORMAT = b"v1:meta:format"  # u32 ledger format of the folder; absent in format 1 folders
LEDGER_FORMAT = 5  # 5: headers commit to the authority sets (4: checkpoint votes, 3: block votes, 2: flat tx
# roots, 1: signatures not bound to the genesis)
HEAD = b"v1:head"
FINAL = b"v1:final"
BLK = b"v1:blk:"
HDR = b"v1:hdr:"
HGT = b"v1:hgt:"
TXI = b"v1:tx:"
UNDO = b"v1:undo:"
CERT = b"v1:cert:"  # block hash -> its finality certificate (aitbc.ledger.finality, version 2)
CERTIFIED = b"v1:certified"  # u64 height || hash of the highest certified block
VOTE_LOCK = b"v1:vote:lock"  # u64 last target ck || u64 last source ck of this node's votes
JUST = b"v1:just:"  # u64 height || block hash || u8 phase -> the votes that justified that checkpoint
MAX_SIDE_BLOCKS = 4096

_U64 = struct.Struct(">Q")
_TXI = struct.Struct(">QI")


def hkey(height: int) -> bytes:
    return HGT + _U64.pack(height)


def ukey(height: int) -> bytes:
    return UNDO + _U64.pack(height)


def encode_undo(undo: dict[bytes, bytes | None]) -> bytes:
    out = []
    for k in sorted(undo):
        v = undo[k]
        out.append(struct.pack(">H", len(k)) + k)
        out.append(b"\x00" if v is None else b"\x01" + struct.pack(">I", len(v)) + v)
    return b"".join(out)


def decode_undo(data: bytes) -> dict[bytes, bytes | None]:
    undo: dict[bytes, bytes | None] = {}
    pos = 0
    while pos < len(data):
        (klen,) = struct.unpack_from(">H", data, pos)
        k = data[pos + 2:pos + 2 + klen]
        pos += 2 + klen
        if data[pos] == 0:
            undo[k] = None
            pos += 1
        else:
            (vlen,) = struct.unpack_from(">I", data, pos + 1)
            undo[k] = data[pos + 5:pos + 5 + vlen]
            pos += 5 + vlen
    return undo


@dataclass(frozen=True, slots=True)
class BlockInfo:
    height: int
    hash: bytes
    slot: int  # -1 for genesis
    state_root: bytes
    timestamp_ms: int
    proposer: bytes
    parent: bytes = b""  # b"" for genesis
    set_chain: bytes = b""  # the header's set chain (the genesis': authorities.genesis_set_chain)


@dataclass(frozen=True, slots=True)
class AddResult:
    block: Block
    outcome: str  # "extended", "reorg", "side", "known", "orphan"


class Chain:
    def __init__(self, store: Store, genesis: Genesis) -> None:
        self.store = store
        self.genesis = genesis
        self.genesis_hash = genesis.hash()
        self.authority_ids = genesis.authority_ids
        stored = store.get(META_GENESIS)
        fmt = store.get(META_FORMAT)
        if stored is None:
            if store.get(HEAD) is not None:
                raise FailedPrecondition("data folder holds blocks but no genesis record: refusing to open it")
            store.commit({META_GENESIS: self.genesis_hash, META_CHAIN: genesis.chain_id.encode(),
                          META_FORMAT: struct.pack(">I", LEDGER_FORMAT)})
        elif fmt != struct.pack(">I", LEDGER_FORMAT):
            version = 1 if fmt is None else struct.unpack(">I", fmt)[0] if len(fmt) == 4 else "?"
            raise FailedPrecondition(
                f"data folder holds a ledger format {version} chain; this node runs format {LEDGER_FORMAT}"
                + {1: f": {FORMAT_1_REFUSED}", 2: f": {FORMAT_2_REFUSED}", 3: f": {FORMAT_3_REFUSED}",
                   4: f": {FORMAT_4_REFUSED}"}.get(
                    version if isinstance(version, int) else 0, ": use the node version that wrote it"))
        elif stored != self.genesis_hash:
            other = (store.get(META_CHAIN) or b"?").decode(errors="replace")
            raise FailedPrecondition(
                f"data folder belongs to chain {other!r} (genesis {stored.hex()}), not to chain "
                f"{genesis.chain_id!r} (genesis {self.genesis_hash.hex()}): use another --data-dir"
            )
        self.genesis_info = BlockInfo(0, self.genesis_hash, -1, state.genesis_state_root(self.genesis_hash),
                                      genesis.genesis_time_ms, b"", b"",
                                      authorities.genesis_set_chain(genesis, self.genesis_hash))
        self.side: dict[bytes, Block] = {}
        # a reorg (in a thread) checks the final height again and commits under this lock; the node
        # stores certificates from its event loop meanwhile, and a block made final while the branch
        # executed must not be reverted by it
        self._final_lock = threading.RLock()
        self._final_changes: tuple[int, list[tuple[int, tuple[bytes, ...]]]] = (1, [])  # set changes up to epoch
        self.equivocations = 0  # two blocks by one proposer for one slot (logged; not slashed in v1)
        # height of the highest justified block (finality votes) on the canonical chain, set by the
        # node: fork choice never leaves it for a longer branch (only for a higher justified block)
        self.locked_height = 0
        head_hash = store.get(HEAD)
        self.head = self.genesis_info if head_hash is None else self._info_from_store(head_hash)
        fin = store.get(FINAL)
        self.final_height = 0 if fin is None else _U64.unpack(fin)[0]

    # ---- queries -------------------------------------------------------------------------------

    def _info_from_store(self, block_hash: bytes) -> BlockInfo:
        info = self._stored_info(block_hash)
        if info is None:
            raise FailedPrecondition(f"data folder is inconsistent: block {block_hash.hex()} is missing")
        return info

    def _stored_info(self, block_hash: bytes) -> BlockInfo | None:
        header = self.store.get(HDR + block_hash)  # small: avoids reading whole blocks
        if header is not None:
            return _info(decode_header(header))
        raw = self.store.get(BLK + block_hash)
        return None if raw is None else _info(raw_header(raw))

    def info(self, block_hash: bytes) -> BlockInfo | None:
        if block_hash == self.genesis_hash:
            return self.genesis_info
        b = self.side.get(block_hash)
        if b is not None:
            return _info(b.header)
        return self._stored_info(block_hash)

    def hash_at(self, height: int) -> bytes | None:
        if height == 0:
            return self.genesis_hash
        return self.store.get(hkey(height))

    def block_raw_at(self, height: int) -> bytes | None:
        h = self.hash_at(height) if height > 0 else None
        return None if h is None else self.store.get(BLK + h)

    def block_at(self, height: int) -> Block | None:
        raw = self.block_raw_at(height)
        return None if raw is None else decode_block(raw)

    def block_by_hash(self, block_hash: bytes) -> tuple[Block, bool] | None:
        """(block, canonical) for a stored or pending block."""
        raw = self.store.get(BLK + block_hash)
        if raw is not None:
            return decode_block(raw), True
        b = self.side.get(block_hash)
        return None if b is None else (b, False)

    def is_canonical(self, block_hash: bytes, height: int) -> bool:
        return self.hash_at(height) == block_hash

    def tx_location(self, tx_hash: bytes) -> tuple[int, int] | None:
        v = self.store.get(TXI + tx_hash)
        return None if v is None else _TXI.unpack(v)

    def tx_locations(self, tx_hashes: Sequence[bytes]) -> list[tuple[int, int] | None]:
        """tx_location of each hash, read in one go."""
        return [None if v is None else _TXI.unpack(v) for v in self.store.get_many([TXI + h for h in tx_hashes])]

    def receipt_minted(self, receipt_hash: bytes) -> tuple[int, bytes, int] | None:
        v = self.store.get(state.rcpt_key(receipt_hash))
        return None if v is None else state.decode_minted(v)

    def account(self, account_id: bytes) -> tuple[int, int]:
        return state.read_account(self.store.get, account_id)

    # ---- finality certificates (aitbc.ledger.finality) ---------------------------------------------

    def parent_link(self, block_hash: bytes) -> tuple[int, bytes] | None:
        """(height, parent hash) of a known block (stored or pending), for the vote tally."""
        info = self.info(block_hash)
        return None if info is None or info.height == 0 else (info.height, info.parent)

    def header_at(self, height: int) -> bytes | None:
        """The encoded header of the canonical block at `height` (receipt proofs)."""
        h = self.hash_at(height) if height > 0 else None
        return None if h is None else self.store.get(HDR + h)

    def certificate(self, block_hash: bytes) -> bytes | None:
        return self.store.get(CERT + block_hash)

    def certified(self) -> tuple[int, bytes] | None:
        v = self.store.get(CERTIFIED)
        return None if v is None else (_U64.unpack(v[:8])[0], v[8:])

    def store_certificate(self, height: int, block_hash: bytes, cert: bytes) -> None:
        """Record a verified certificate and that its block is the highest certified one; the block
        and its ancestors are final as soon as it is on the canonical chain (now, or after the
        switch to its branch: _advance_final)."""
        self.store_certificates([(height, block_hash, cert)])

    def store_certificates(self, certs: list[tuple[int, bytes, bytes]]) -> None:
        """Verified certificates (height, block hash, encoded), lowest first, in ONE commit: a
        follower catching up gets one per block, and a commit each cost more than their checks."""
        if not certs:
            return
        with self._final_lock:
            self._store_certificates(certs)

    def _store_certificates(self, certs: list[tuple[int, bytes, bytes]]) -> None:
        writes: dict[bytes, bytes | None] = {CERT + h: c for _, h, c in certs}
        top_height, top_hash, _ = certs[-1]
        writes[CERTIFIED] = _U64.pack(top_height) + top_hash
        final = max((height for height, h, _ in certs if height > self.final_height and self.hash_at(height) == h),
                    default=None)
        if final is not None:
            writes[FINAL] = _U64.pack(final)
        for key, _ in self.store.scan(JUST):  # justifications at or below them can change nothing now
            if _U64.unpack_from(key, len(JUST))[0] > top_height:
                break
            writes[key] = None
        self.store.commit(writes)
        if final is not None:
            self._set_final(final)

    def _advance_final(self) -> None:
        """After the head moved: the highest certified block became canonical -> it is final."""
        cert = self.certified()
        if cert is not None and cert[0] > self.final_height and self.hash_at(cert[0]) == cert[1]:
            self.store.commit({FINAL: _U64.pack(cert[0])})
            self._set_final(cert[0])

    def _set_final(self, height: int) -> None:
        self.final_height = height
        for h in [h for h, b in self.side.items() if b.height <= height]:
            del self.side[h]

    def save_justification(self, height: int, block_hash: bytes, phase: int, votes: bytes) -> None:
        """The votes that justified a checkpoint (a restart must know its justified checkpoints: an
        authority whose lock names a source above its final block cannot vote again until it does)."""
        self.store.commit({JUST + _U64.pack(height) + block_hash + bytes((phase,)): votes})

    def justifications(self) -> list[bytes]:
        """The saved justifications above the highest certified block, lowest block first."""
        return [v for _, v in self.store.scan(JUST)]

    def vote_lock(self) -> tuple[int, int]:
        v = self.store.get(VOTE_LOCK)
        return (0, 0) if v is None else struct.unpack(">QQ", v)

    def save_vote_lock(self, last_target: int, last_source: int) -> None:
        self.store.commit({VOTE_LOCK: struct.pack(">QQ", last_target, last_source)})

    # ---- validation ----------------------------------------------------------------------------

    def authorities_at(self, height: int, read: state.Reader | None = None) -> tuple[bytes, ...] | None:
        """The authority set of block `height`'s epoch in the state `read` (the canonical state by
        default: it holds every set up to the epoch after the head's); None when not fixed yet."""
        return authorities.authorities_at(read or self.store.get, self.genesis, height)

    def set_changes(self, upto: int) -> list[tuple[int, tuple[bytes, ...]]]:
        """(epoch, set) of every set change up to epoch `upto` in the canonical state (receipt proofs).
        The changes fixed by final blocks never change, so they are read once (GetReceiptProof is
        open to anyone: it must not read one record per epoch of the chain's whole life each time)."""
        read, g = self.store.get, self.genesis
        done, known = self._final_changes
        safe = min(upto, authorities.fixed_epoch(g, self.final_height))
        if safe > done:
            known = known + authorities.set_changes(read, g, safe, done)
            done = safe
            self._final_changes = (done, known)
        return [c for c in known if c[0] <= upto] + authorities.set_changes(read, g, upto, max(done, 1))

    def current_authorities(self) -> tuple[bytes, ...]:
        """The set that proposes and votes the next block (the head's child)."""
        ids = self.authorities_at(self.head.height + 1)
        assert ids is not None  # the head's state always holds the set of its child's epoch
        return ids

    def proposer_for_slot(self, slot: int, height: int | None = None) -> bytes:
        """The proposer of `slot` for a block at `height` (default: the head's child), canonical state."""
        ids = self.authorities_at(self.head.height + 1 if height is None else height)
        assert ids is not None
        return ids[slot % len(ids)]

    def check_proposer(self, block: Block, read: state.Reader) -> None:
        """The proposer is in the set of the block's epoch (in the parent state `read`) and in turn."""
        h, n = block.header, block.height
        ids = authorities.authorities_at(read, self.genesis, n)
        if ids is None:  # unreachable for a parent state: the set of a block's epoch is fixed below it
            raise InvalidArgument(f"invalid block {n}: the authority set of epoch {self.genesis.epoch(n)} is not "
                                  "known on its branch")
        if h.proposer not in ids:
            raise InvalidArgument(f"invalid block {n}: proposer {h.proposer_address} is not an authority")
        if h.proposer != ids[h.slot % len(ids)]:
            raise InvalidArgument(f"invalid block {n}: proposer {h.proposer_address} is out of turn in slot {h.slot}")

    def branch_reader(self, block: Block) -> state.Reader | None:
        """A reader that holds the set of this pending block's epoch: the canonical state when the
        block's branch forks at or above the block that fixed that set, else None (the check waits
        until the branch is executed, _reorg)."""
        g = self.genesis
        e = g.epoch(block.height)
        if not g.has_authority_votes or e < 2:
            return self.store.get
        cur, height = block.parent_hash, block.height - 1
        for _ in range(MAX_SIDE_BLOCKS + 1):
            if self.is_canonical(cur, height):
                break
            b = self.side.get(cur)
            if b is None:
                return None
            cur, height = b.parent_hash, height - 1
        else:
            return None
        return self.store.get if height >= authorities.defining_height(g, e) else None

    def same_sets_as_canonical(self, block: Block) -> bool:
        """A pending block's header names the canonical sets up to its epoch's: a canonical header at
        min(its height, the head's) has its set chain and fixes that epoch's set (equal set chains
        are one list of changes, so both branches have the same set at every epoch both fix)."""
        k = min(block.height, self.head.height)
        hdr = self.header_at(k)
        return (hdr is not None and authorities.fixed_epoch(self.genesis, k) >= self.genesis.epoch(block.height)
                and decode_header(hdr).set_chain == block.header.set_chain)

    def validate_header(self, block: Block, parent: BlockInfo, now_ms: int,
                        read: state.Reader | None = None, signers: Signers | None = None) -> None:
        """Every header rule; the proposer's turn is checked against the set in `read` (the
        parent's state), or left to the branch's execution when `read` is None. `signers`:
        signatures recovered beforehand (aitbc.ledger.signers)."""
        h = block.header
        g = self.genesis
        n = h.height
        if h.chain_id != g.chain_id:
            raise InvalidArgument(f"wrong chain id: block is for {h.chain_id!r}, this chain is {g.chain_id!r}")
        if h.genesis_hash != self.genesis_hash:
            raise InvalidArgument(
                f"wrong genesis: block {n} is for genesis {h.genesis_hash.hex()}, this chain {g.chain_id!r} has "
                f"genesis {self.genesis_hash.hex()} (another network with the same chain id)")
        if h.height != parent.height + 1 or h.parent_hash != parent.hash:
            raise InvalidArgument(f"invalid block {n}: does not link to its parent")
        if h.slot <= parent.slot:
            raise InvalidArgument(f"invalid block {n}: slot {h.slot} is not after its parent's slot {parent.slot}")
        if h.timestamp_ms // g.block_time_ms != h.slot:
            raise InvalidArgument(f"invalid block {n}: timestamp is outside slot {h.slot}")
        if h.slot > now_ms // g.block_time_ms + 1:
            raise InvalidArgument(f"invalid block {n}: slot {h.slot} is in the future")
        if read is not None:
            self.check_proposer(block, read)
        if h.tx_count > g.max_block_txs:
            raise InvalidArgument(f"invalid block {n}: {h.tx_count} txs, at most {g.max_block_txs}")
        if tx_root([t.hash for t in block.txs]) != h.tx_root:
            raise InvalidArgument(f"invalid block {n}: tx root does not match its transactions")
        verify_block_signature(block, signers)

    def _execute(self, block: Block, parent: BlockInfo, read: state.Reader,
                 verified: Container[bytes]) -> dict[bytes, bytes]:
        writes = state.apply_txs(read, block.txs, self.genesis, block.height, verified=verified)
        if state.state_root(parent.state_root, block.height, writes) != block.header.state_root:
            raise InvalidArgument(f"invalid block {block.height}: state root does not match")
        expected = authorities.next_set_chain(parent.set_chain, self.genesis, block.height,
                                              state.Overlay(read, writes).get)
        if block.header.set_chain != expected:
            raise InvalidArgument(
                f"invalid block {block.height}: set chain {block.header.set_chain.hex()[:16]} does not match the "
                f"authority sets of its state ({expected.hex()[:16]}: the sets up to epoch "
                f"{authorities.fixed_epoch(self.genesis, block.height)})")
        return writes

    def _block_writes(self, block: Block, state_writes: dict[bytes, bytes],
                      read: state.Reader) -> dict[bytes, bytes | None]:
        w: dict[bytes, bytes | None] = dict(state_writes)
        w[BLK + block.hash] = block.raw
        w[HDR + block.hash] = block.header.encode()
        w[hkey(block.height)] = block.hash
        for i, tx in enumerate(block.txs):
            w[TXI + tx.hash] = _TXI.pack(block.height, i)
        undo = {k: read(k) for k in w}
        w[ukey(block.height)] = encode_undo(undo)
        return w

    # ---- adding blocks -------------------------------------------------------------------------

    def add_blocks(self, blocks: Iterable[Block], now_ms: int, verified: Container[bytes] = frozenset(),
                   signers: Signers | None = None) -> list[AddResult]:
        """Validate and add blocks in order. Consecutive blocks that extend the head are committed
        together in one write transaction. Raises on the first invalid block (after committing the
        valid ones before it). `signers`: their signatures recovered beforehand."""
        results: list[AddResult] = []
        ov = state.Overlay(self.store.get)
        pending: list[Block] = []
        tip = self.head

        def flush() -> None:
            nonlocal ov, pending
            if pending:
                self._commit(ov.writes, pending[-1])
            ov, pending = state.Overlay(self.store.get), []

        try:
            for block in blocks:
                if block.hash in self.side or block.hash == tip.hash or self.is_canonical(block.hash, block.height):
                    results.append(AddResult(block, "known"))
                    continue
                if block.parent_hash == tip.hash:
                    self.validate_header(block, tip, now_ms, ov.get, signers)
                    writes = self._execute(block, tip, ov.get, verified)
                    ov.writes.update(self._block_writes(block, writes, ov.get))
                    pending.append(block)
                    tip = _info(block.header)
                    results.append(AddResult(block, "extended"))
                    continue
                flush()
                tip = self.head
                results.append(AddResult(block, self._add_side(block, now_ms, verified, signers)))
                tip = self.head
        finally:
            flush()
        return results

    def add_block(self, block: Block, now_ms: int, verified: Container[bytes] = frozenset()) -> str:
        return self.add_blocks([block], now_ms, verified)[0].outcome

    def _add_side(self, block: Block, now_ms: int, verified: Container[bytes], signers: Signers | None = None) -> str:
        parent = self.info(block.parent_hash)
        if parent is None:
            return "orphan"
        if block.height <= self.final_height:
            raise FailedPrecondition(f"block {block.height} conflicts with the final chain (final height "
                                     f"{self.final_height})")
        self.validate_header(block, parent, now_ms, self.branch_reader(block), signers)
        rival = self.hash_at(block.height)
        if rival is not None:
            other = self.info(rival)
            if other is not None and other.slot == block.header.slot and other.proposer == block.header.proposer:
                self.equivocations += 1
                log.warning("equivocation: %s signed two blocks for slot %d (%s and %s)",
                            block.header.proposer_address, block.header.slot, rival.hex()[:16], block.hash.hex()[:16])
        self.side[block.hash] = block
        if len(self.side) > MAX_SIDE_BLOCKS:
            for h in sorted(self.side, key=lambda x: self.side[x].height)[: len(self.side) - MAX_SIDE_BLOCKS]:
                self.side.pop(h, None)
        head = self.head
        if block.height > head.height or (block.height == head.height and block.hash < head.hash):
            return "reorg" if self._reorg(block, verified) else "side"
        return "side"

    def adopt_justified(self, block_hash: bytes, verified: Container[bytes] = frozenset()) -> bool:
        """Make a pending block justified at or above the lock's height canonical, even if its
        branch is shorter (fork choice keeps the highest justified block; at the lock's height: the
        chain left it in a reorg that raced the votes that justified it); never below final."""
        block = self.side.get(block_hash)
        if block is None or block.height < self.locked_height:
            return False
        return self._reorg(block, verified, justified=True)

    def _reorg(self, tip: Block, verified: Container[bytes], *, justified: bool = False) -> bool:
        branch = [tip]
        while not self.is_canonical(branch[-1].parent_hash, branch[-1].height - 1):
            parent = self.side.get(branch[-1].parent_hash)
            if parent is None:
                return False
            branch.append(parent)
        branch.reverse()
        fork_height = branch[0].height - 1
        if self._reverts_fixed(fork_height, justified):
            return False
        ov = state.Overlay(self.store.get)
        reverted: list[Block] = []
        for h in range(self.head.height, fork_height, -1):
            raw_undo = self.store.get(ukey(h))
            blk = self.block_at(h)
            if raw_undo is None or blk is None:
                raise FailedPrecondition(f"data folder is inconsistent: undo record {h} is missing")
            ov.writes.update(decode_undo(raw_undo))
            ov.writes[ukey(h)] = None
            reverted.append(blk)
        parent = self.info(branch[0].parent_hash)
        assert parent is not None
        for blk in branch:
            try:
                self.check_proposer(blk, ov.get)  # its branch's own set (pending blocks may not have had it)
                writes = self._execute(blk, parent, ov.get, verified)
            except AitbcError as exc:
                log.warning("rejecting fork block %d %s: %s", blk.height, blk.hash.hex()[:16], exc.message)
                self._drop_side_descendants(blk.hash)
                return False
            ov.writes.update(self._block_writes(blk, writes, ov.get))
            parent = _info(blk.header)
        with self._final_lock:
            if self._reverts_fixed(fork_height, justified):
                # certificates or votes counted (on the node's event loop) while the branch executed
                # made final, or locked, a block it would revert
                return False
            self._commit(ov.writes, branch[-1])
        for b in branch:
            self.side.pop(b.hash, None)
        for b in reverted:
            self.side[b.hash] = b
        log.info("reorg: reverted %d block(s) above height %d, new head %d", len(reverted), fork_height,
                 tip.height)
        return True

    def _reverts_fixed(self, fork_height: int, justified: bool) -> bool:
        """A reorg forking at `fork_height` would revert a final block, or (unless it goes to a
        justified block) the block the lock holds."""
        return fork_height < self.final_height or (fork_height < self.locked_height and not justified)

    def _drop_side_descendants(self, block_hash: bytes) -> None:
        doomed = {block_hash}
        changed = True
        while changed:
            changed = False
            for h, b in list(self.side.items()):
                if b.parent_hash in doomed and h not in doomed:
                    doomed.add(h)
                    changed = True
        for h in doomed:
            self.side.pop(h, None)

    def _commit(self, writes: dict[bytes, bytes | None], tip: Block) -> None:
        writes[HEAD] = tip.hash
        self.store.commit(writes)
        self.head = _info(tip.header)
        self._advance_final()

    # ---- producing -----------------------------------------------------------------------------

    def build_block(self, key: crypto.PrivateKey, slot: int, now_ms: int, candidates: Iterable[Tx],
                    verified: Container[bytes] = frozenset()) -> tuple[Block, list[Tx]]:
        """Build, sign and commit a block on the head from candidate txs (those that no longer
        apply are skipped and returned, with every later tx of the same sender)."""
        g = self.genesis
        parent = self.head
        height = parent.height + 1
        if slot <= parent.slot:
            raise FailedPrecondition(f"slot {slot} is not after the head's slot {parent.slot}")
        ov = state.Overlay(self.store.get)
        included: list[Tx] = []
        dropped: list[Tx] = []
        failed: set[bytes] = set()
        size = 200
        for tx in candidates:
            if tx.sender_id in failed:
                dropped.append(tx)
                continue
            if len(included) >= g.max_block_txs or size + len(tx.raw) + 4 > MAX_BLOCK_BYTES:
                break
            try:
                if tx.hash not in verified:
                    state.check_stateless(tx, g)
                w = state.apply_tx(ov.get, tx, g, height)
            except AitbcError:
                failed.add(tx.sender_id)
                dropped.append(tx)
                continue
            ov.writes.update(w)
            included.append(tx)
            size += len(tx.raw) + 4
        ov.writes.update(state.end_block(ov.get, g, height))
        bt = g.block_time_ms
        ts = min(max(now_ms, slot * bt), (slot + 1) * bt - 1)
        header = Header(g.chain_id, self.genesis_hash, height, parent.hash, slot, ts, crypto.sha256(key.pubkey)[:20],
                        tx_root([t.hash for t in included]),
                        state.state_root(parent.state_root, height, ov.writes),  # type: ignore[arg-type]
                        authorities.next_set_chain(parent.set_chain, g, height, ov.get), len(included))
        block = make_block(header, key, included)
        writes = self._block_writes(block, ov.writes, self.store.get)  # type: ignore[arg-type]
        self._commit(writes, block)
        return block, dropped


def raw_header(raw: bytes) -> Header:
    """The header of an encoded block, without decoding its transactions."""
    if len(raw) < 4:
        raise InvalidArgument("malformed block: truncated")
    (hlen,) = struct.unpack_from(">I", raw, 0)
    return decode_header(raw[4:4 + hlen])


def _info(h: Header) -> BlockInfo:
    return BlockInfo(h.height, h.hash, h.slot, h.state_root, h.timestamp_ms, h.proposer, h.parent_hash, h.set_chain)
