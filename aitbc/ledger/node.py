"""A ledger node: chain + mempool + block production (authorities) + peer sync + tx relay.

Everything here runs on one asyncio loop; chain mutations are serialized by one lock and run in a
worker thread (signature checks and LMDB commits), so RPCs keep being served meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import grpc

from aitbc import aio, bech32, crypto, rpc
from aitbc.errors import (
    AitbcError,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from aitbc.ledger import authorities, finality, state
from aitbc.ledger.block import MAX_BLOCK_BYTES, Block, block_signature, decode_block
from aitbc.ledger.chain import Chain, raw_header
from aitbc.ledger.mempool import Mempool
from aitbc.ledger.signers import Signers
from aitbc.ledger.tx import ECONOMY_KINDS, KIND_AUTHORITY_VOTE, KIND_SETTLE, Tx, decode_tx
from aitbc.ledger.verifier import ParallelVerifier, VerifiedTxs
from aitbc.limits import Backoff, KeyedBuckets

log = logging.getLogger("aitbc.ledger.node")

STREAM_BATCH_BLOCKS = 128
STREAM_BATCH_BYTES = 4 * 1024 * 1024
READ_AHEAD = 2  # StreamBlocks messages a syncing node holds while it imports one (their signatures recovering)
RELAY_METADATA = ("x-aitbc-relay", "1")
RELAY_CHUNK = 5000
RELAY_QUEUE_BATCHES = 64
VERIFY_IN_THREAD_MIN = 16  # batches at least this big are decoded off the event loop
MAX_ANNOUNCED_PEERS = 32  # peers learned from announcements or exchange (configured ones are never counted)
MAX_PEER_CANDIDATES = 16  # announced addresses waiting for their genesis check; more are ignored
PEER_FAILED_MEMORY = 1024  # addresses that failed the check, not dialed again for a while
PEER_FAILED_TTL_S = 60.0
PEER_CHECK_TIMEOUT_S = 3.0
PEER_DEAD_AFTER_S = 10.0  # an announced peer unreachable this long is dropped
PEER_EXCHANGE_S = 5.0
PEER_HEAD_TTL_S = 5.0
MAX_PENDING_VOTES = 1024  # valid votes for blocks not imported yet, retried after each import
MAX_VOTE_BATCH = 1024
VOTE_REFRESH_MIN_S = 0.5  # shortest pause between two refreshes of the votes while finality stalls
INVALID_VOTES_PER_S = 10.0  # invalid votes a caller may send per second (after a burst), see submit_votes
INVALID_VOTES_BURST = 2 * MAX_VOTE_BATCH
MAX_VOTE_CALLERS = 4096  # callers whose invalid votes are counted at once
MULTI_AUTHORITY_TXS_PER_S = 12000  # own-block budget with several authorities (see _block_tx_budget)
ADMIT_CHUNK = 1024  # admission checks this many txs at a time, giving way to block work between chunks
ADMIT_YIELD_S = 0.5  # ... for at most this long per chunk (a long catch-up does not stop admission)


class _AnyOf:
    """Membership in any of a few collections (mempool hashes, hashes verified here)."""

    __slots__ = ("parts",)

    def __init__(self, *parts: Any) -> None:
        self.parts = parts

    def __contains__(self, item: object) -> bool:
        return any(item in p for p in self.parts)


class Node:
    def __init__(self, chain: Chain, key: crypto.PrivateKey | None = None, *, peers: Sequence[str] = (),
                 mempool: Mempool | None = None, clock: Callable[[], float] = time.time,
                 verify_workers: int | None = None) -> None:
        self.chain = chain
        self.genesis = chain.genesis
        self.clock = clock
        if key is not None and crypto.sha256(key.pubkey)[:20] not in chain.authority_ids:
            if not self.genesis.has_authority_votes:
                raise FailedPrecondition(
                    f"key {key.address} is not an authority of chain {self.genesis.chain_id!r}; omit --key to run "
                    "a follower")
            # the set changes by votes: a key outside it follows until the authorities vote it in
            log.info("key %s is not in the authority set of chain %r now: following until its epoch comes",
                     key.address, self.genesis.chain_id)
        self.key = key
        self.mempool = mempool or Mempool()
        self.verifier = ParallelVerifier(self.genesis, workers=verify_workers)
        self.verified_txs = VerifiedTxs()  # txs whose stateless checks passed here (aitbc.ledger.verifier)
        self._import_lock = asyncio.Lock()  # one receive_blocks at a time: a block several peers send is checked once
        self._blocks_idle = asyncio.Event()  # set while no block is being imported or produced
        self._blocks_idle.set()
        self._block_work = 0
        self.listen_address = ""
        self.peers: dict[str, asyncio.Task[None]] = {}  # peer -> its sync task (configured + announced)
        self._initial_peers = list(dict.fromkeys(p for p in peers if p))
        self._verified: dict[str, None] = {}  # peers that proved to serve our genesis (ordered)
        self._candidates: dict[str, None] = {}  # announced addresses waiting for the check
        self._candidate_wake = asyncio.Event()
        self._exchange_wake = asyncio.Event()
        self._failed: dict[str, float] = {}  # address -> when its check failed (monotonic)
        self.peer_dead_after_s = PEER_DEAD_AFTER_S
        self.peer_exchange_s = PEER_EXCHANGE_S
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._relay_buf: list[bytes] = []
        self._relay_wake = asyncio.Event()
        self._caught_up = asyncio.Event()
        self._peer_heads: dict[str, tuple[int, float]] = {}  # peer -> (head height it reported, when)
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = False
        self.produced = 0
        self.rejected_blocks = 0
        # called as fn(block, "produced" | "imported", seconds spent) for each block the head takes
        # (telemetry: aitbc.ledger.observe); keep them cheap, they run on the event loop
        self.block_listeners: list[Callable[[Block, str, float], None]] = []
        # finality votes (aitbc.ledger.finality): every node tallies, authorities also vote
        certified = chain.certified()
        self.tally = finality.Tally(self.genesis, chain.parent_link, chain.genesis_hash,
                                    final=None if certified is None else finality.Checkpoint(*certified,
                                                                                            finality.COMMIT),
                                    authorities=self._authorities_for)
        self.voter = None if key is None else finality.Voter(key, self.genesis, *chain.vote_lock())
        self._pending_votes: dict[bytes, finality.Vote] = {}
        self._vote_buf: list[bytes] = []
        self._vote_wake = asyncio.Event()
        # caller host -> budget for invalid votes
        self._vote_strikes = KeyedBuckets(INVALID_VOTES_PER_S, INVALID_VOTES_BURST, time.monotonic, MAX_VOTE_CALLERS)
        self.evidence: list[bytes] = []  # evidence this node found (encoded)
        self._evidence_sent: set[bytes] = set()  # authorities this node sent an EVIDENCE tx against
        self._switching = False  # a switch to a justified branch is under way
        self._final_sets: dict[int, tuple[bytes, ...]] = {}  # epoch -> its set, once final blocks fixed it
        self._apply_recorded_evidence()
        self._saved_justified: set[finality.Checkpoint] = set()
        self._restore_justified()

    @property
    def is_authority(self) -> bool:
        return self.key is not None

    @property
    def my_id(self) -> bytes | None:
        return None if self.key is None else crypto.sha256(self.key.pubkey)[:20]

    def in_authority_set(self) -> bool:
        """This node's key proposes and votes the head's child (the set of that epoch)."""
        return self.key is not None and self.my_id in self.chain.current_authorities()

    def authorities_info(self, height: int | None = None) -> Any:
        """GetAuthorities: the set of `height`'s epoch (default: the head's child) and its proposals."""
        h = self.chain.head.height + 1 if height is None else height
        return authorities.describe(self.chain.store.get, self.chain.store.scan, self.genesis, h)

    def _authorities_for(self, target: finality.Checkpoint) -> tuple[bytes, ...] | None:
        """The set whose votes count for a link to `target` (the set of its epoch, on its branch);
        for a block not imported yet, the canonical set of that epoch (checked again on arrival)."""
        chain, g = self.chain, self.genesis
        if not g.has_authority_votes or g.epoch(target.height) < 2:
            return chain.authority_ids
        side = chain.side.get(target.hash)
        if side is not None and side.height == target.height:
            read = chain.branch_reader(side)
            if read is not None:
                return chain.authorities_at(target.height, read)
            # its branch forks below the block that fixed its set: its header's set chain names the
            # sets of its branch (ledger format 5), so when it equals a canonical header's the set is
            # the canonical one (a quorum holds an honest voter, who executed the block and checked it)
            return chain.authorities_at(target.height) if chain.same_sets_as_canonical(side) else None
        epoch = g.epoch(target.height)
        if (ids := self._final_sets.get(epoch)) is not None:
            return ids
        ids = chain.authorities_at(target.height)
        if ids is not None and epoch <= authorities.fixed_epoch(g, chain.final_height):
            # fixed by a final block: every branch a vote can count on shares it (a catch-up asks once per epoch)
            if len(self._final_sets) >= 64:
                self._final_sets.clear()
            self._final_sets[epoch] = ids
        return ids

    @property
    def has_peers(self) -> bool:
        return bool(self._initial_peers)

    @property
    def caught_up(self) -> bool:
        """A peer's stream has brought this node up to that peer's head at least once."""
        return self._caught_up.is_set()

    def sync_lag(self) -> int:
        """Best head a configured peer reported recently minus our head (0 when none is ahead)."""
        now = time.monotonic()
        best = max((h for h, t in self._peer_heads.values() if now - t < PEER_HEAD_TTL_S), default=0)
        return max(0, best - self.chain.head.height)

    def adopt(self, task: asyncio.Task[None]) -> None:
        """A task that lives as long as the node: stop() cancels it."""
        self._tasks.append(task)

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    # ---- lifecycle -------------------------------------------------------------------------------

    async def start(self, listen_address: str = "") -> None:
        self.listen_address = listen_address
        if self.key is not None:
            self._tasks.append(asyncio.create_task(self._produce_loop(), name="ledger-producer"))
        self._tasks.append(asyncio.create_task(self._relay_loop(), name="ledger-relay"))
        self._tasks.append(asyncio.create_task(self._vote_loop(), name="ledger-votes"))
        self._tasks.append(asyncio.create_task(self._vote_refresh_loop(), name="ledger-vote-refresh"))
        self._tasks.append(asyncio.create_task(self._candidate_loop(), name="ledger-peer-check"))
        self._tasks.append(asyncio.create_task(self._exchange_loop(), name="ledger-peer-exchange"))
        for p in self._initial_peers:
            if p != self.listen_address:
                self._start_sync(p)

    async def stop(self) -> None:
        self._stopped = True
        tasks = self._tasks + list(self.peers.values())
        for t in tasks:
            t.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=5)
            if pending:
                log.warning("%d node task(s) did not stop within 5 s: %s", len(pending),
                            ", ".join(t.get_name() for t in pending))
        for ch in self._channels.values():
            try:
                await aio.within(ch.close(), 2)
            except TimeoutError:
                log.warning("a peer channel did not close within 2 s")
        self.verifier.close()
        self._changed.set()

    # ---- peers -----------------------------------------------------------------------------------
    # Configured peers (--peers) are kept for good. Any other address (a StreamBlocks caller's
    # peer_address, or one a peer lists in ListPeers) is only a candidate: it becomes a peer once
    # GetGenesis on it returns our genesis hash, at most MAX_ANNOUNCED_PEERS of them, and it is
    # dropped again when it serves another genesis or stays unreachable for peer_dead_after_s.

    def announce(self, target: str) -> None:
        """An address someone said is a node of this chain: check it before syncing from it."""
        if (not target or len(target) > 255 or target == self.listen_address or target in self.peers
                or target in self._candidates or self._stopped):
            return
        failed = self._failed.get(target)
        if failed is not None and time.monotonic() - failed < PEER_FAILED_TTL_S:
            return
        if len(self._candidates) >= MAX_PEER_CANDIDATES or self._announced_count() >= MAX_ANNOUNCED_PEERS:
            return
        self._candidates[target] = None
        self._candidate_wake.set()

    def verified_peers(self) -> list[str]:
        """Peers that served our genesis, configured ones first (what ListPeers returns)."""
        conf = [p for p in self._initial_peers if p in self._verified]
        return conf + [p for p in self._verified if p not in self._initial_peers]

    def _announced_count(self) -> int:
        return sum(1 for p in self.peers if p not in self._initial_peers)

    def _start_sync(self, target: str) -> None:
        log.info("syncing from peer %s", target)
        self.peers[target] = asyncio.create_task(self._sync_loop(target), name=f"ledger-sync-{target}")

    def _drop_peer(self, target: str, why: str, *, remember: bool) -> None:
        """Forget an announced peer; `remember`: refuse its announcements for PEER_FAILED_TTL_S
        (a peer of another genesis; a dead one may announce itself again when it is back)."""
        log.info("dropping peer %s: %s", target, why)
        self.peers.pop(target, None)
        self._verified.pop(target, None)
        self._peer_heads.pop(target, None)
        if remember:
            self._remember_failed(target)
        ch = self._channels.pop(target, None)
        if ch is not None:
            self.adopt(asyncio.create_task(ch.close(), name=f"ledger-close-{target}"))

    def _remember_failed(self, target: str) -> None:
        self._failed[target] = time.monotonic()
        if len(self._failed) > PEER_FAILED_MEMORY:
            for old in sorted(self._failed, key=self._failed.__getitem__)[:len(self._failed) - PEER_FAILED_MEMORY]:
                del self._failed[old]

    async def _peer_genesis(self, stub: Any) -> tuple[bool, str]:
        """(serves our genesis, what it serves) by GetGenesis; raises AioRpcError when unreachable."""
        from aitbc.v1 import ledger_pb2

        try:
            resp = await stub.GetGenesis(ledger_pb2.GetGenesisRequest(), timeout=PEER_CHECK_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                return False, "no GetGenesis (a ledger format 1 node)"
            raise
        ours = self.chain.genesis_hash.hex()
        return resp.genesis_hash == ours, f"genesis {resp.genesis_hash[:16]} of chain {resp.chain_id!r}"

    async def _candidate_loop(self) -> None:
        """Check announced addresses one at a time (bounded dialing: one check in flight)."""
        from aitbc.v1 import ledger_pb2_grpc

        while True:
            await self._candidate_wake.wait()
            self._candidate_wake.clear()
            while self._candidates:
                target = next(iter(self._candidates))
                if target in self.peers or self._announced_count() >= MAX_ANNOUNCED_PEERS:
                    del self._candidates[target]
                    continue
                ch = rpc.channel(target)
                try:
                    ok, what = await self._peer_genesis(ledger_pb2_grpc.LedgerServiceStub(ch))
                except grpc.aio.AioRpcError as exc:
                    ok, what = False, f"unreachable ({exc.code().name})"
                finally:
                    await ch.close()
                    self._candidates.pop(target, None)
                if not ok:
                    log.info("not adding announced peer %s: %s", target, what)
                    self._remember_failed(target)
                elif target not in self.peers and not self._stopped:
                    self._verified[target] = None
                    self._start_sync(target)
                    self._exchange_wake.set()

    async def _exchange_loop(self) -> None:
        """Peer exchange: ask every verified peer for its peers and check the new ones, so nodes
        started with one --peers entry each form a full mesh."""
        from aitbc.v1 import ledger_pb2, ledger_pb2_grpc

        while True:
            await aio.wait_event(self._exchange_wake, self.peer_exchange_s)
            self._exchange_wake.clear()
            for target in list(self._verified):
                stub = ledger_pb2_grpc.LedgerServiceStub(self._channel(target))
                try:
                    resp = await stub.ListPeers(ledger_pb2.ListPeersRequest(), timeout=PEER_CHECK_TIMEOUT_S)
                except grpc.aio.AioRpcError:
                    continue
                for p in resp.peers[:MAX_ANNOUNCED_PEERS]:
                    self.announce(p)

    def _channel(self, target: str) -> grpc.aio.Channel:
        ch = self._channels.get(target)
        if ch is None:
            ch = self._channels[target] = rpc.channel(target)
        return ch

    def _notify(self) -> None:
        ev, self._changed = self._changed, asyncio.Event()
        ev.set()

    async def wait_changed(self, timeout: float | None = None) -> None:
        await aio.wait_event(self._changed, timeout)

    # ---- transactions ----------------------------------------------------------------------------

    def _screen(self, raws: Sequence[bytes]) -> list[tuple[bytes, Tx | None, AitbcError | None]]:
        """Decode and de-duplicate (what stays, a Tx, still needs its stateless checks unless
        verified_txs holds it)."""
        out: list[tuple[bytes, Tx | None, AitbcError | None]] = []
        txs: list[Tx | AitbcError] = []
        for raw in raws:
            try:
                txs.append(decode_tx(raw))
            except AitbcError as exc:
                txs.append(exc)
        locs = iter(self.chain.tx_locations([tx.hash for tx in txs if isinstance(tx, Tx)]))
        for raw, tx in zip(raws, txs, strict=True):
            if not isinstance(tx, Tx):
                out.append((crypto.sha256(bytes(raw)), None, tx))
                continue
            loc = next(locs)
            if tx.hash in self.mempool:
                out.append((tx.hash, None, AlreadyExists(f"already known: tx {tx.hash.hex()} is pending")))
            elif tx.evidence and (err := self._evidence_recorded(tx.evidence)) is not None:
                out.append((tx.hash, None, err))
            elif loc is not None:
                out.append((tx.hash, None, AlreadyExists(f"already known: tx {tx.hash.hex()} is in block {loc[0]}")))
            else:
                out.append((tx.hash, tx, None))
        return out

    @contextlib.contextmanager
    def _block_busy(self) -> Iterator[None]:
        """Block import or production under way: admission checks give way (_check_new)."""
        self._block_work += 1
        self._blocks_idle.clear()
        try:
            yield
        finally:
            self._block_work -= 1
            if not self._block_work:
                self._blocks_idle.set()

    async def _check_new(self, txs: Sequence[Tx], *, admission: bool = False) -> dict[bytes, AitbcError]:
        """Run the stateless checks of the txs verified_txs does not hold (big batches spread over
        the verifier's worker processes); remember those that pass; return the refusals by hash.
        `admission`: check ADMIT_CHUNK txs at a time, each once no block is being imported or built
        (or after ADMIT_YIELD_S): signature checks share the GIL and the CPUs with block import, and
        a block imported late makes the next proposer fork next to it."""
        todo = [tx for tx in txs if tx.hash not in self.verified_txs]
        if not todo:
            return {}
        if len(todo) >= VERIFY_IN_THREAD_MIN:
            errors = []
            step = ADMIT_CHUNK if admission else len(todo)
            for i in range(0, len(todo), step):
                if admission:
                    await aio.wait_event(self._blocks_idle, ADMIT_YIELD_S)
                errors += await self.verifier.check(todo[i:i + step])
        else:
            errors = [None] * len(todo)
            for i, tx in enumerate(todo):
                try:
                    state.check_stateless(tx, self.genesis)
                except AitbcError as exc:
                    errors[i] = exc
        self.verified_txs.add(tx.hash for tx, err in zip(todo, errors, strict=True) if err is None)
        return {tx.hash: err for tx, err in zip(todo, errors, strict=True) if err is not None}

    async def submit(self, raws: Sequence[bytes], *, relay: bool = True) -> list[tuple[bytes, AitbcError | None]]:
        """Admit signed txs; one (hash, error or None) per input, in order. Decoding and signature
        checks of batches run off the event loop; only the mempool insert runs on the loop."""
        if len(raws) >= VERIFY_IN_THREAD_MIN:
            screened = await asyncio.to_thread(self._screen, raws)
        else:
            screened = self._screen(raws)
        refused = await self._check_new([tx for _, tx, _ in screened if tx is not None], admission=True)
        prepared = [(h, None, refused[h]) if tx is not None and h in refused else (h, tx, err)
                    for h, tx, err in screened]
        results: list[tuple[bytes, AitbcError | None]] = []
        accepted: list[bytes] = []
        accounts: dict[bytes, tuple[int, int]] = {}  # read once per sender and recipient between two yields

        def account(account_id: bytes) -> tuple[int, int]:
            got = accounts.get(account_id)
            if got is None:
                got = accounts[account_id] = self.chain.account(account_id)
            return got

        for n, (h, tx, err) in enumerate(prepared):
            if tx is not None:
                try:
                    if tx.kind in ECONOMY_KINDS or tx.kind == KIND_AUTHORITY_VOTE:
                        self._admit_economy(tx)
                    self.mempool.add(tx, account, self._minted, credit=self._mint_credit(tx),
                                     height=self.chain.head.height)
                    accepted.append(tx.raw)
                except AitbcError as exc:
                    err = exc
            results.append((h, err))
            if n % 2000 == 1999:
                await asyncio.sleep(0)  # let other RPCs in during big batches (a block may land meanwhile)
                accounts.clear()
        if accepted and relay and self._verified:
            self._relay_buf.extend(accepted)
            self._relay_wake.set()
        return results

    async def submit_one(self, raw: bytes) -> bytes:
        [(h, err)] = await self.submit([raw])
        if err is not None:
            raise err
        return h

    async def _relay_loop(self) -> None:
        await self._fanout(self._relay_wake, self._take_relay, self._send_txs, RELAY_CHUNK, 0.01)

    async def _vote_loop(self) -> None:
        await self._fanout(self._vote_wake, self._take_votes, self._send_votes, MAX_VOTE_BATCH, 0.0)

    async def _vote_refresh_loop(self) -> None:
        """Votes get lost (sent before a peer was verified, dropped from a full queue, a peer down
        for a while): when the certified height has not moved for two block times (at least
        VOTE_REFRESH_MIN_S), send again the quorums behind the highest justified blocks and every
        voter's latest vote (finality.Tally.refresh). A peer answers those it has with "known"."""
        period = max(VOTE_REFRESH_MIN_S, 2 * self.genesis.block_time_ms / 1000)
        last = self.certified.height
        while True:
            await asyncio.sleep(period)
            now = self.certified.height
            if now == last and (votes := self.tally.refresh()):
                log.debug("finality has not moved from %d: sending %d votes again", now, len(votes))
                self._vote_buf.extend(v.encode() for v in votes)
                self._vote_wake.set()
            last = now

    def _take_relay(self) -> list[bytes]:
        batch, self._relay_buf = self._relay_buf, []
        return batch

    def _take_votes(self) -> list[bytes]:
        batch, self._vote_buf = self._vote_buf, []
        return batch

    @staticmethod
    async def _send_txs(stub: Any, raws: list[bytes]) -> None:
        from aitbc.v1 import ledger_pb2

        await stub.BroadcastTransactions(ledger_pb2.BroadcastTransactionsRequest(raws=raws), timeout=5,
                                         metadata=(RELAY_METADATA,))

    @staticmethod
    async def _send_votes(stub: Any, raws: list[bytes]) -> None:
        from aitbc.v1 import ledger_pb2

        await stub.SubmitVotes(ledger_pb2.SubmitVotesRequest(votes=raws), timeout=5)

    async def _fanout(self, wake: asyncio.Event, take: Callable[[], list[bytes]],
                      send: Callable[[Any, list[bytes]], Any], chunk: int, gather_s: float) -> None:
        """Fan items (accepted txs, votes) out to every verified peer; each peer has its own bounded
        queue and sender, so a slow or paused peer delays nobody else."""
        queues: dict[str, asyncio.Queue[list[bytes]]] = {}
        senders: dict[str, asyncio.Task[None]] = {}
        try:
            while True:
                await wake.wait()
                if gather_s:
                    await asyncio.sleep(gather_s)  # gather a batch
                wake.clear()
                batch = take()
                if not batch:
                    continue
                for gone in [t for t in queues if t not in self._verified]:
                    queues.pop(gone)
                    senders.pop(gone).cancel()
                for target in list(self._verified):  # only peers that proved to serve our genesis
                    q = queues.get(target)
                    if q is None:
                        q = queues[target] = asyncio.Queue(maxsize=RELAY_QUEUE_BATCHES)
                        senders[target] = asyncio.create_task(self._send_to(target, q, send, chunk))
                    if q.full():
                        q.get_nowait()  # drop the oldest batch: the peer will get those txs in blocks
                    q.put_nowait(batch)
        finally:
            for t in senders.values():
                t.cancel()

    async def _send_to(self, target: str, q: asyncio.Queue[list[bytes]], send: Callable[[Any, list[bytes]], Any],
                       chunk: int) -> None:
        from aitbc.v1 import ledger_pb2_grpc

        stub = ledger_pb2_grpc.LedgerServiceStub(self._channel(target))
        while True:
            raws = await q.get()
            while not q.empty() and len(raws) < chunk:
                raws = raws + q.get_nowait()
            for start in range(0, len(raws), chunk):
                try:
                    await send(stub, raws[start:start + chunk])
                except grpc.aio.AioRpcError as exc:
                    log.debug("relay to %s failed: %s", target, exc.code())

    # ---- blocks ----------------------------------------------------------------------------------

    def _decode_new(self, raws: Sequence[bytes]) -> list[Block | None]:
        """Decode blocks, except those the chain holds already (None: known; only their header is
        read, so a block that every peer streams costs one full decode)."""
        out: list[Block | None] = []
        for raw in raws:
            h = raw_header(raw)
            known = h.hash in self.chain.side or self.chain.is_canonical(h.hash, h.height)
            out.append(None if known else decode_block(raw))
        return out

    async def receive_blocks(self, raws: Sequence[bytes], signers: Signers | None = None) -> list[str]:
        """Decode, fully verify and add blocks (from a peer or a test); bad ones raise. Each tx is
        checked unless this node has checked it already (its mempool, verified_txs). `signers`:
        their signatures recovered beforehand (recover_signers)."""
        started = time.perf_counter()
        async with self._import_lock:
            with self._block_busy():
                decoded = await asyncio.to_thread(self._decode_new, raws)
                blocks = [b for b in decoded if b is not None]
                if not blocks:  # every one is held already (another peer sent it first): nothing was added
                    async with self._lock:
                        self._after_change([])  # as add_blocks's "known" outcomes did (votes retried, streams woken)
                    return ["known"] * len(decoded)
                refused = await self._check_new([tx for b in blocks for tx in b.txs if tx.hash not in self.mempool.by_hash])
                # every other tx of these blocks was checked now or before (mempool, verified_txs): kept
                # in a set, as verified_txs may forget some before add_blocks reads it (a big catch-up
                # batch); add_blocks checks the refused ones again, and raises with the refusal. A reorg
                # also executes pending blocks of earlier calls: their txs are in verified_txs
                checked = _AnyOf({tx.hash for b in blocks for tx in b.txs}.difference(refused), self.mempool.by_hash,
                                 self.verified_txs)
                results = []
                async with self._lock:
                    try:
                        results = await asyncio.to_thread(self.chain.add_blocks, blocks, self.now_ms(), checked,
                                                          signers)
                    finally:
                        # add_blocks commits the valid prefix even when a later block is bad
                        self._after_change(None if any(r.outcome == "reorg" for r in results) or not results else
                                           [tx for r in results if r.outcome == "extended" for tx in r.block.txs])
        added = iter(r.outcome for r in results)
        outcomes = ["known" if b is None else next(added) for b in decoded]
        if self.block_listeners:
            spent = (time.perf_counter() - started) / max(1, len(results))
            for r in results:
                if r.outcome in ("extended", "reorg"):
                    for fn in self.block_listeners:
                        fn(r.block, "imported", spent)
        if "reorg" in outcomes:
            await self._readmit_side_txs()
        return outcomes

    async def _readmit_side_txs(self) -> None:
        txs = [tx for b in list(self.chain.side.values()) for tx in b.txs]
        raws = [tx.raw for tx, loc in zip(txs, self.chain.tx_locations([tx.hash for tx in txs]), strict=True)
                if loc is None]
        if raws:
            await self.submit(raws, relay=False)

    def _after_change(self, included: list[Tx] | None) -> None:
        """After the head moved: drop included txs and whatever no longer applies, wake streams.
        `included` None means "unknown" (a reorg or a failure): check the whole mempool."""
        mp = self.mempool
        if len(mp):
            if included is None:
                pending = list(mp.by_hash.values())
                included = [tx for tx, loc in zip(pending, self.chain.tx_locations([tx.hash for tx in pending]),
                                                   strict=True) if loc is not None]
                mp.remove(included)
                mp.recheck(self.chain.account, self._minted)
            else:
                mp.remove(included)
                mp.recheck(self.chain.account, self._minted, {tx.sender_id for tx in included})
            self._expire()
        self._apply_recorded_evidence()
        self._follow_justified()
        self._vote_on_head()
        self._retry_pending_votes()
        self._notify()

    def _expire(self) -> None:
        n = self.mempool.expire(self.chain.head.height, self.chain.account)
        if n:
            log.info("mempool: %d tx(s) expired after %d blocks without inclusion", n, self.mempool.expiry_blocks)

    def _evidence_recorded(self, evidence: bytes) -> AitbcError | None:
        try:
            voter = finality.evidence_voter(evidence)
        except AitbcError as exc:
            return exc
        seen = state.evidence_height(self.chain.store.get, voter)
        return None if seen is None else AlreadyExists(f"evidence already recorded: in block {seen}")

    def _mint_credit(self, tx: Tx) -> int | None:
        """What a MINT (or a SETTLE: mint + fee) adds to its provider's balance (the mempool refuses
        an overflow at admission)."""
        if tx.receipt is None:
            return None
        fee = tx.quote.total if tx.kind == KIND_SETTLE and tx.quote is not None else 0
        return state.mint_amount(tx.receipt.body.units, tx.receipt.body.price_per_unit, self.genesis) + fee

    def _admit_economy(self, tx: Tx) -> None:
        """STAKE .. SLASH at admission: a quote or verdict used on chain is refused; a tx that is its
        sender's next one runs its transition on the head state, so what would fail in the next
        block (too little balance, stake or escrow, before an unlock height) is refused now with
        its message instead of waiting in the pool."""
        read = self.chain.store.get
        state.check_once(read, tx)
        if tx.nonce == self.chain.account(tx.sender_id)[1] and tx.nonce not in self.mempool.by_sender.get(
                tx.sender_id, {}):
            state.apply_tx(read, tx, self.genesis, self.chain.head.height + 1)

    def _minted(self, receipt_hash: bytes) -> bool:
        return self.chain.receipt_minted(receipt_hash) is not None

    async def _produce_loop(self) -> None:
        assert self.key is not None
        bt = self.genesis.block_time_ms
        my_id = crypto.sha256(self.key.pubkey)[:20]
        if self._initial_peers:
            # a restarted authority first catches up with a peer (bounded wait: peers may be down),
            # rather than producing a stale block that would only be reverted
            if not await aio.wait_event(self._caught_up, max(2.0, 3 * bt / 1000)):
                log.info("no peer answered yet; producing on the local head")
        while True:
            now = self.now_ms()
            slot = now // bt
            if self.chain.proposer_for_slot(slot) == my_id and slot > self.chain.head.slot:
                await self._grace_for_previous_slot(slot)
            if self.chain.proposer_for_slot(slot) == my_id and slot > self.chain.head.slot and not self._behind():
                try:
                    await self.produce(slot)
                except AitbcError as exc:
                    log.warning("could not produce a block in slot %d: %s", slot, exc.message)
                except Exception:
                    log.exception("block production failed in slot %d", slot)
            delay = ((slot + 1) * bt - self.now_ms()) / 1000
            await asyncio.sleep(max(0.001, delay))

    def _behind(self) -> bool:
        """A peer recently reported a higher head than ours: a block built now could only be
        orphaned (or churn the others with a tie), so this slot is better left to the next one."""
        now = time.monotonic()
        best = max((h for h, t in self._peer_heads.values() if now - t < PEER_HEAD_TTL_S), default=0)
        if best > self.chain.head.height:
            log.info("behind peers (head %d < %d): skipping this slot", self.chain.head.height, best)
            return True
        return False

    async def _grace_for_previous_slot(self, slot: int) -> None:
        """With several authorities, wait up to a third of the slot for the previous slot's block
        when it is late (slow propagation under load) instead of forking next to it at once."""
        if len(self.chain.current_authorities()) < 2 or self.chain.head.slot >= slot - 1:
            return
        bt = self.genesis.block_time_ms
        deadline_ms = slot * bt + bt // 3
        while self.chain.head.slot < slot - 1 and (left := deadline_ms - self.now_ms()) > 0:
            await self.wait_changed(left / 1000)

    def _block_tx_budget(self) -> int:
        """Most txs this node puts in its own block. With several authorities a block must also be
        imported (and its unrelayed txs verified) by the others within the next slot, or they fork
        next to it; so blocks stay small enough for a busy peer (a local policy, not a validity
        rule: any block up to max_block_txs is valid)."""
        cap = self.genesis.max_block_txs
        if len(self.chain.current_authorities()) > 1:
            cap = min(cap, max(1, MULTI_AUTHORITY_TXS_PER_S * self.genesis.block_time_ms // 1000))
        return cap

    async def produce(self, slot: int) -> Block | None:
        assert self.key is not None
        started = time.perf_counter()
        with self._block_busy():
            return await self._produce(slot, started)

    async def _produce(self, slot: int, started: float) -> Block | None:
        async with self._lock:
            if slot <= self.chain.head.slot:
                return None
            if len(self.chain.current_authorities()) > 1 and self.now_ms() // self.genesis.block_time_ms > slot:
                # the lock came too late (a long import): the next authority already built in its
                # slot, so a block for ours now could only fork next to it
                log.info("slot %d passed while importing; not producing", slot)
                return None
            candidates = self.mempool.ready(self.chain.account, self._block_tx_budget())
            block, dropped = await asyncio.to_thread(
                self.chain.build_block, self.key, slot, self.now_ms(), candidates, self.mempool.by_hash)
            self.mempool.remove(block.txs)
            self.mempool.remove(dropped)
            if dropped:
                log.info("block %d: dropped %d pending tx(s) that no longer apply (first %s)", block.height,
                         len(dropped), dropped[0].hash.hex())
            senders = {tx.sender_id for tx in block.txs} | {tx.sender_id for tx in dropped}
            self.mempool.recheck(self.chain.account, self._minted, senders)
            self._expire()
            self.produced += 1
            self._apply_recorded_evidence()
            self._vote_on_head()
            self._notify()
        for fn in self.block_listeners:
            fn(block, "produced", time.perf_counter() - started)
        if block.txs or block.height % 100 == 0:
            log.info("produced block %d with %d txs (final %d)", block.height, len(block.txs),
                     self.chain.final_height)
        return block

    # ---- finality votes (docs/ledger.md "Finality votes") --------------------------------------------

    def _vote_on_head(self) -> None:
        """An authority votes, as its lock allows (finality.next_vote): highest justified
        checkpoint on its canonical chain -> (head, prepare) (at most MAX_SPAN heights above it)
        once per head, and (head, prepare) -> (head, commit) as soon as (head, prepare) is
        justified here (called again after every vote that justified something). The lock is on
        disk before the vote leaves."""
        voter, chain = self.voter, self.chain
        if voter is None or chain.head.height == 0:
            return
        head = chain.head.height
        for source in sorted(self.tally.justified, key=lambda c: -c.ck):
            if source.height <= head and chain.hash_at(source.height) == source.hash:
                break
        else:
            return
        link = finality.next_vote(source, finality.Checkpoint(head, chain.head.hash, finality.PREPARE), chain.hash_at)
        if link is None or not voter.allows(*link):
            return
        if self.my_id not in (chain.authorities_at(link[1].height) or ()):
            return  # not in the set of the target's epoch (voted out, or not voted in yet): no vote
        chain.save_vote_lock(link[1].ck, link[0].ck)
        vote = voter.vote(*link)
        if vote is not None:
            self._count_votes([vote])

    def submit_votes(self, raws: Sequence[bytes], caller: str = "") -> list[AitbcError | None]:
        """Votes from a peer (SubmitVotes): one error or None per vote, in order. `caller` (the
        calling host) pays for the invalid votes it sends: each malformed, foreign, non-authority
        or badly signed vote costs a token of its bucket (INVALID_VOTES_PER_S, burst
        INVALID_VOTES_BURST), and a caller whose bucket is empty is refused RESOURCE_EXHAUSTED
        before any vote is checked, so junk cannot keep a node busy verifying signatures. Honest
        peers send none of these (stale and not-yet-known votes are free)."""
        bucket = self._vote_strikes.get(caller) if caller else None
        if bucket is not None and (wait := bucket.wait_s()) > 0:
            raise ResourceExhausted(f"too many invalid votes from {caller}: retry in {wait:.1f} s", wait)
        votes: list[finality.Vote] = []
        errors: list[AitbcError | None] = []
        for raw in raws:
            try:
                votes.append(finality.decode_vote(raw))
                errors.append(None)
            except AitbcError as exc:
                errors.append(exc)
        counted = iter(self._count_votes(votes))
        out = [err if err is not None else next(counted) for err in errors]
        bad = sum(1 for e in out if e is not None and e.code in ("INVALID_ARGUMENT", "PERMISSION_DENIED"))
        if bad and caller:
            self._vote_strikes.bucket(caller).take(bad)
        return out

    def _count_votes(self, votes: Sequence[finality.Vote]) -> list[AitbcError | None]:
        out: list[AitbcError | None] = []
        justified = False
        for vote in votes:
            try:
                res = self.tally.add(vote)
            except NotFound as exc:  # its block is not imported yet (votes race blocks): keep it a while
                if len(self._pending_votes) < MAX_PENDING_VOTES:
                    self._pending_votes[vote.encode()] = vote
                    exc = NotFound(exc.message + " (kept until it arrives)")
                out.append(exc)
                continue
            except AitbcError as exc:
                out.append(exc)
                continue
            out.append(None)
            if res.outcome != "counted":
                continue
            self._vote_buf.append(vote.encode())  # pass it on: every node gossips the votes it counted
            self._vote_wake.set()
            if res.evidence:
                self.evidence.append(res.evidence)
                log.warning("evidence: authority %s signed two conflicting votes", vote.voter_address)
                if self.key is not None and vote.voter not in self._evidence_sent and not self._stopped:
                    self._evidence_sent.add(vote.voter)
                    self.adopt(asyncio.create_task(self._send_evidence(res.evidence), name="ledger-evidence"))
            if res.finalized is not None:
                self._certified(res.finalized)
            justified = justified or res.justified
            self._follow_justified()
        self._save_justified()
        if justified:
            self._vote_on_head()  # (head, prepare) may be justified now: the commit vote
        return out

    def _restore_justified(self) -> None:
        """After a restart: count again the votes that justified blocks above the final one (saved
        by _save_justified), so the tally knows what it knew and the authority can vote from the
        source its lock names (without them a lone authority never votes again)."""
        for raw in self.chain.justifications():
            try:
                saved = finality.decode_certificate(raw)
                for vote in saved.votes(self.genesis, self.chain.genesis_hash):
                    res = self.tally.add(vote)
                    if res.finalized is not None:
                        self._certified(res.finalized)
                self._saved_justified.add(saved.target)
            except AitbcError as exc:
                log.warning("a saved justification does not count any more: %s", exc.message)

    def _save_justified(self) -> None:
        for target, link in self.tally.justified_by.items():
            if target not in self._saved_justified and (votes := self.tally.links.get(link)):
                self._saved_justified.add(target)
                self.chain.save_justification(target.height, target.hash, target.phase,
                                              finality.make_certificate(votes.values()).encode())

    def _follow_justified(self) -> None:
        """Fork choice keeps the highest justified block: lock the canonical chain on it, or switch
        to its branch when it is a pending block (votes justified a branch this node left)."""
        best, chain = self.tally.highest_justified(), self.chain
        if chain.hash_at(best.height) == best.hash:
            chain.locked_height = max(chain.locked_height, best.height)
        # not canonical: switch even when the lock is as high (a reorg that passed the lock check in
        # its thread while votes justified the block it left commits after them, and a certificate
        # can make a block final that the chain is not on: either way the chain left the highest
        # justified block, and staying there would stall finality for good)
        elif best.hash in chain.side and not self._stopped and not self._switching:
            self._switching = True
            self.adopt(asyncio.create_task(self._switch_to_justified(best), name="ledger-justified"))

    async def _switch_to_justified(self, best: finality.Checkpoint) -> None:
        switched = False
        try:
            async with self._lock:
                if self.chain.hash_at(best.height) != best.hash:
                    switched = await asyncio.to_thread(self.chain.adopt_justified, best.hash,
                                                       _AnyOf(self.mempool.by_hash, self.verified_txs))
                if switched:
                    log.info("switched to the branch of justified block %d %s", best.height, best.hash.hex()[:16])
                    self.chain.locked_height = best.height
                    self._after_change(None)
        finally:
            self._switching = False
        if switched:
            await self._readmit_side_txs()

    def _certified(self, cp: finality.Checkpoint) -> None:
        cert = self.tally.certificate
        assert cert is not None
        self._store_certified([(cp.height, cp.hash, cert.encode())])

    def _store_certified(self, formed: list[tuple[int, bytes, bytes]]) -> None:
        self.chain.store_certificates(formed)
        height, block_hash, _ = formed[-1]
        self._notify()  # StreamBlocks callers hear of the new final height at once
        self.tally.prune()
        self._saved_justified = {c for c in self._saved_justified if c in self.tally.justified_by}
        log.debug("block %d %s certified final by votes", height, block_hash.hex()[:16])

    def _apply_recorded_evidence(self) -> None:
        """Evidence on the canonical chain (state v1:evid:): that authority's votes count no more.
        Ignoring stays even if a reorg drops the block: the evidence is valid on any branch."""
        for key, value in self.chain.store.scan(state.EVID):  # few: one per convicted authority, ever
            aid = key[len(state.EVID):]
            if aid not in self.tally.ignored:
                at = int.from_bytes(value[:8], "big")  # u64 height of the block that recorded it || tx hash
                log.warning("evidence against authority %s is on chain (block %d): ignoring its votes for that "
                            "block and above", bech32.encode(crypto.ADDRESS_HRP, aid), at)
                self.tally.ignore(aid, at)

    async def _send_evidence(self, evidence: bytes) -> None:
        """An authority that found evidence puts it on chain (an EVIDENCE tx from its own account)."""
        from aitbc.ledger.tx import make_evidence

        assert self.key is not None
        _, _, nonce = self.pending_nonce(crypto.sha256(self.key.pubkey)[:20])
        [(h, err)] = await self.submit([make_evidence(self.key, self.genesis.ref, nonce, evidence)])
        if err is not None:
            log.info("evidence tx not admitted: %s", err.message)
        else:
            log.info("sent evidence tx %s", h.hex())

    def _retry_pending_votes(self) -> None:
        if not self._pending_votes:
            return
        pending, self._pending_votes = self._pending_votes, {}
        self._count_votes(list(pending.values()))

    def receive_certificate(self, raw: bytes) -> None:
        """A block's certificate from a peer (catch-up, restart): verified before it counts."""
        for err in self.receive_certificates([raw]):
            raise err

    def receive_certificates(self, raws: Sequence[bytes], signers: Signers | None = None) -> list[AitbcError]:
        """The certificates that came with a batch of blocks, each verified before it counts; those
        that finalize are stored in one commit. `signers`: their signatures recovered beforehand
        (recover_signers). Returns the refusals."""
        formed: list[tuple[int, bytes, bytes]] = []
        errors: list[AitbcError] = []
        with self.tally.batch():
            for raw in raws:
                try:
                    done = self.tally.add_certificate(finality.decode_certificate(raw), signers)
                except AitbcError as exc:
                    errors.append(exc)
                    continue
                if done is not None:
                    assert self.tally.certificate is not None
                    formed.append((done.height, done.hash, self.tally.certificate.encode()))
        if formed:
            self._store_certified(formed)
        return errors

    async def recover_signers(self, blocks: Sequence[bytes], certificates: Sequence[bytes]) -> Signers:
        """The signers of blocks' proposer signatures and of certificates' votes, recovered by the
        verifier's worker processes (catch-up: while this process imports the message before, so
        both cores work); receive_blocks and receive_certificates still check every signature with
        them (aitbc.ledger.signers)."""
        items = [sig for raw in blocks if (sig := block_signature(raw)) is not None]
        items += finality.certificate_signatures(certificates, self.genesis, self.chain.genesis_hash)
        return await self.verifier.signers(items)

    async def _recovering_ahead(self, stream: Any) -> AsyncIterator[tuple[Any, asyncio.Future[Signers]]]:
        """A StreamBlocks stream's messages, each with the recovery of its signatures started as
        soon as it arrives (recover_signers): while this process imports one message, the workers
        recover the next ones' (at most READ_AHEAD messages held unprocessed)."""
        q: asyncio.Queue[tuple[Any, asyncio.Future[Signers]] | Exception | None] = asyncio.Queue(READ_AHEAD)

        async def read() -> None:
            try:
                async for resp in stream:
                    recovering = asyncio.ensure_future(self.recover_signers(
                        [b.raw for b in resp.blocks], [b.certificate for b in resp.blocks if b.certificate]))
                    await q.put((resp, recovering))
            except Exception as exc:  # the stream broke: the sync loop handles it as before
                await q.put(exc)
            else:
                await q.put(None)

        reader = asyncio.ensure_future(read())
        try:
            while (item := await q.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            reader.cancel()
            stream.cancel()

    @property
    def certified(self) -> finality.Checkpoint:
        assert self.tally.final is not None
        return self.tally.final

    async def _sync_loop(self, target: str) -> None:
        """Sync from one peer for as long as it stays a peer. Each (re)connection first checks that
        the peer serves our genesis; an announced peer that does not, or that stays unreachable for
        peer_dead_after_s, is dropped (a configured one is retried: the operator named it)."""
        from aitbc.v1 import ledger_pb2, ledger_pb2_grpc

        configured = target in self._initial_peers
        retry, wrong = Backoff(0.1, 2.0), Backoff(0.2, 30.0)  # full jitter: peers do not reconnect in lockstep
        last_ok = time.monotonic()
        warned = ""
        while not self._stopped:
            try:
                stub = ledger_pb2_grpc.LedgerServiceStub(self._channel(target))
                ok, what = await self._peer_genesis(stub)
                last_ok = time.monotonic()
                if not ok:
                    self._verified.pop(target, None)
                    if not configured:
                        self._drop_peer(target, f"it serves {what}, not ours", remember=True)
                        return
                    if what != warned:
                        log.warning("configured peer %s serves %s, not genesis %s: not syncing from it", target,
                                    what, self.chain.genesis_hash.hex()[:16])
                        warned = what
                    await asyncio.sleep(wrong.next())
                    continue
                warned = ""
                wrong.reset()
                if target not in self._verified:
                    self._verified[target] = None
                    self._exchange_wake.set()
                req = ledger_pb2.StreamBlocksRequest(from_height=self.chain.final_height + 1,
                                                     peer_address=self.listen_address, raw_only=True)
                messages = self._recovering_ahead(stub.StreamBlocks(req))
                async with contextlib.aclosing(messages):
                    async for resp, recovering in messages:
                        retry.reset()
                        last_ok = time.monotonic()
                        certs = [b.certificate for b in resp.blocks if b.certificate]
                        try:
                            signers = await recovering
                            if resp.blocks:  # none: only the final height moved
                                await self.receive_blocks([b.raw for b in resp.blocks], signers)
                            for exc in self.receive_certificates(certs, signers):
                                log.warning("rejected a certificate from %s: %s", target, exc.message)
                        except AitbcError as exc:
                            self.rejected_blocks += 1
                            self._peer_heads.pop(target, None)  # a peer whose blocks fail is no guide
                            log.warning("rejected a block from %s: %s", target, exc.message)
                        else:
                            if configured:  # configured peers only: an announced one could lie
                                self._peer_heads[target] = (resp.head_height, time.monotonic())
                        if self.chain.head.height >= resp.head_height:
                            self._caught_up.set()
                last_ok = time.monotonic()
            except grpc.aio.AioRpcError as exc:
                log.debug("sync from %s interrupted: %s", target, exc.code())
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("sync from %s failed", target)
            if not configured and time.monotonic() - last_ok > self.peer_dead_after_s:
                self._drop_peer(target, f"unreachable for {self.peer_dead_after_s:g} s", remember=False)
                return
            await asyncio.sleep(retry.next())

    async def stream_blocks(self, from_height: int) -> AsyncIterator[list[tuple[bytes, int]]]:
        """Canonical blocks (raw, height) from a height, batched, live thereafter; after a reorg
        resends from the fork point. An empty batch when only the final height moved (a block is
        final within its own slot, after it was streamed: the caller learns it at once, not with
        the next block)."""
        if from_height < 0:
            raise InvalidArgument("from_height must be >= 0")
        nxt = max(1, from_height)
        sent: dict[int, bytes] = {}  # recent height -> hash sent, to notice reorgs
        told_final = self.chain.final_height
        while not self._stopped:
            changed = self._changed
            # rewind to the fork point when the chain under what we sent changed
            while nxt - 1 in sent and self.chain.hash_at(nxt - 1) != sent[nxt - 1]:
                del sent[nxt - 1]
                nxt -= 1
            head = self.chain.head.height
            if nxt <= head:
                batch: list[tuple[bytes, int]] = []
                size = 0
                while nxt <= head and len(batch) < STREAM_BATCH_BLOCKS and size < STREAM_BATCH_BYTES:
                    h = self.chain.hash_at(nxt)
                    raw = self.chain.store.get(b"v1:blk:" + h) if h is not None else None
                    if raw is None:
                        break  # a reorg is in flight; look again
                    if batch and size + len(raw) > min(STREAM_BATCH_BYTES, MAX_BLOCK_BYTES):
                        break
                    batch.append((raw, nxt))
                    sent[nxt] = h  # type: ignore[assignment]
                    size += len(raw)
                    nxt += 1
                if len(sent) > 4096:
                    for k in sorted(sent)[:-2048]:
                        del sent[k]
                if batch:
                    told_final = self.chain.final_height
                    yield batch
                    continue
            if self.chain.final_height != told_final:
                told_final = self.chain.final_height
                yield []
                continue
            await changed.wait()

    # ---- queries ---------------------------------------------------------------------------------

    def pending_nonce(self, account_id: bytes) -> tuple[int, int, int]:
        balance, nonce = self.chain.account(account_id)
        return balance, nonce, self.mempool.pending_nonce(account_id, nonce)
