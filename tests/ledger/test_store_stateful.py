"""Hypothesis stateful tests: the LMDB store and its in-memory twin agree, at the store level
and at the chain level (random mints, transfers, bad txs, reorgs)."""

from __future__ import annotations

import shutil
import tempfile

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from aitbc import crypto
from aitbc.errors import FailedPrecondition
from aitbc.ledger import authorities, finality, proof, state
from aitbc.ledger import tx as txmod
from aitbc.ledger.block import decode_block
from aitbc.ledger.chain import Chain
from aitbc.ledger.store import LmdbStore, MemoryStore
from aitbc.ledger.tx import decode_tx, make_evidence, make_mint, make_transfer

from .economy_helpers import assert_supply_invariant, quote_for, text_receipt
from .helpers import ATTESTER, AUTH, certify, genesis, key, receipt

KEYS = st.binary(min_size=1, max_size=6).map(lambda b: b"v1:t:" + b)
VALUES = st.one_of(st.none(), st.binary(max_size=20))


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="aitbc-lmdb-")
        self.lmdb = LmdbStore(self.dir, map_size=1 << 24)
        self.mem = MemoryStore()

    @rule(writes=st.dictionaries(KEYS, VALUES, max_size=8))
    def commit(self, writes):
        self.lmdb.commit(writes)
        self.mem.commit(writes)

    @rule(k=KEYS)
    def get(self, k):
        assert self.lmdb.get(k) == self.mem.get(k)

    @rule(ks=st.lists(KEYS, max_size=6))
    def get_many(self, ks):
        assert self.lmdb.get_many(ks) == self.mem.get_many(ks) == [self.mem.get(k) for k in ks]

    @rule(prefix=st.binary(max_size=2).map(lambda b: b"v1:t:" + b))
    def scan(self, prefix):
        assert list(self.lmdb.scan(prefix)) == list(self.mem.scan(prefix))

    @rule()
    def reopen(self):
        self.lmdb.close()
        self.lmdb = LmdbStore(self.dir, map_size=1 << 24)

    def teardown(self):
        self.lmdb.close()
        shutil.rmtree(self.dir, ignore_errors=True)


TestStoreMachine = StoreMachine.TestCase
TestStoreMachine.settings = settings(max_examples=30, stateful_step_count=30, deadline=None)

USERS = [key(100 + i) for i in range(4)]
G = genesis(2, block_time_ms=1000, unbonding_blocks=2, escrow_timeout_blocks=2, epoch_blocks=3)
# every key that may come to propose (the authorities vote AUTH[2] or users in and out)
KEYS = {crypto.sha256(k.pubkey)[:20]: k for k in (*AUTH[:3], *USERS)}


class ChainMachine(RuleBasedStateMachine):
    """An authority chain on LMDB; a follower on memory re-verifies each block; a rival branch
    built on memory sometimes overtakes (reorg) unless votes certified a block above its fork;
    evidence transactions and certificates land in both. Both stores must hold the same state."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="aitbc-chain-")
        self.store = LmdbStore(self.dir, map_size=1 << 26)
        self.main = Chain(self.store, G)
        self.follower = Chain(MemoryStore(), G)
        self.slot = 10
        self.receipts = 0
        self.flooded = 0  # fresh subjects a flooding authority voted for
        self.pending: list = []

    @initialize()
    def fund(self):
        """Every user starts with 1500: 400 of it in escrow for the attester, 300 staked (so the
        economy's kinds, SETTLE, UNSTAKE and SLASH included, have something to move from the first step)."""
        for u in USERS:
            self.receipts += 1
            r = receipt(self.receipts, units=500, price=3, provider=u)
            self.pending.append((USERS[0], lambda n, r=r: make_mint(USERS[0], G.ref, n, r)))
        self.produce(0)
        for u in USERS:
            self.pending.append((u, lambda n, u=u: txmod.make_escrow_deposit(u, G.ref, n, ATTESTER.address, 400)))
            self.pending.append((u, lambda n, u=u: txmod.make_stake(u, G.ref, n, 300)))
        self.produce(0)
        assert all(state.read_escrow(self.main.store.get, crypto.sha256(u.pubkey)[:20],
                                     crypto.sha256(ATTESTER.pubkey)[:20]).available == 400 for u in USERS)

    @rule(who=st.integers(0, 3), units=st.integers(1, 500), dup=st.booleans())
    def mint(self, who, units, dup):
        if not dup or self.receipts == 0:
            self.receipts += 1
        r = receipt(self.receipts, units=units, price=3, provider=USERS[(who + 1) % 4])
        self.pending.append((USERS[who], lambda n, r=r: make_mint(USERS[who], G.ref, n, r)))

    @rule(frm=st.integers(0, 3), to=st.integers(0, 3), amount=st.integers(1, 3000))
    def transfer(self, frm, to, amount):
        self.pending.append((USERS[frm], lambda n: make_transfer(USERS[frm], G.ref, n, USERS[to].address, amount)))

    def _economy(self, who: int, kind: str, amount: int = 0) -> None:
        """A client-signed kind (4-9) from a random user (many fail and are left out of the block)."""
        k, a = USERS[who], ATTESTER.address
        make = {"stake": lambda n: txmod.make_stake(k, G.ref, n, amount),
                "unstake": lambda n: txmod.make_unstake(k, G.ref, n, amount),
                "withdraw": lambda n: txmod.make_withdraw(k, G.ref, n),
                "deposit": lambda n: txmod.make_escrow_deposit(k, G.ref, n, a, amount),
                "escrow_withdraw": lambda n: txmod.make_escrow_withdraw(k, G.ref, n, a, amount),
                "reclaim": lambda n: txmod.make_escrow_reclaim(k, G.ref, n, a)}[kind]
        self.pending.append((k, make))

    # one rule per kind: each is drawn as often as a MINT or a TRANSFER
    @rule(who=st.integers(0, 3), amount=st.integers(1, 300), kind=st.sampled_from(["stake", "deposit"]))
    def put_in(self, who, amount, kind):
        self._economy(who, kind, amount)

    @rule(who=st.integers(0, 3), amount=st.integers(1, 300), kind=st.sampled_from(["unstake", "escrow_withdraw"]))
    def take_out(self, who, amount, kind):
        self._economy(who, kind, amount)

    @rule(who=st.integers(0, 3), kind=st.sampled_from(["withdraw", "reclaim"]), wait=st.booleans())
    def collect(self, who, kind, wait):
        if wait:  # let the unbonding and escrow timeouts (2 blocks) pass first
            self.produce(0)
            self.produce(0)
        ids = [crypto.sha256(u.pubkey)[:20] for u in USERS]
        att = crypto.sha256(ATTESTER.pubkey)[:20]
        owed = [i for i, a in enumerate(ids) if (state.read_stake(self.main.store.get, a).unbonding if kind == "withdraw"
                                                 else state.read_escrow(self.main.store.get, a, att).unlocking)]
        self._economy(owed[who % len(owed)] if owed else who, kind)  # someone with tokens to collect, if any

    @rule(provider=st.integers(0, 3), client=st.integers(0, 3), price=st.integers(0, 2), fee=st.integers(1, 30))
    def settle(self, provider, client, price, fee):
        """The attester settles a job: a mint, plus the quote's total from the client's escrow."""
        self.receipts += 1
        r = text_receipt(self.receipts, provider=USERS[provider], price=3)
        q = quote_for(G, r, qid=self.receipts, price=price, fee=fee, client_address=USERS[client].address)
        self.pending.append((ATTESTER, lambda n: txmod.make_settle(ATTESTER, G.ref, n, r, q)))

    @rule(cheater=st.integers(0, 3), n_honest=st.integers(1, 3), dup=st.booleans())
    def slash(self, cheater, n_honest, dup):
        """A verdict against a user's receipt, outvoted by the other users (once per cheater receipt)."""
        if not dup or self.receipts == 0:
            self.receipts += 1
        c = text_receipt(10_000 + self.receipts, provider=USERS[cheater])
        others = [u for i, u in enumerate(USERS) if i != cheater][:n_honest]
        honest = [text_receipt(20_000 + i, provider=u, artifact="ee" * 32) for i, u in enumerate(others)]
        self.pending.append((ATTESTER, lambda n: txmod.make_slash(ATTESTER, G.ref, n, c, honest)))

    @rule(who=st.integers(0, 3), culprit=st.integers(0, 1), height=st.integers(1, 50))
    def evidence(self, who, culprit, height):
        """Anyone may put two conflicting votes of an authority on chain (once per authority)."""
        src = finality.Checkpoint(0, G.hash(), finality.COMMIT)
        a = finality.make_vote(AUTH[culprit], G, src, finality.Checkpoint(height, crypto.sha256(b"a%d" % height), 0))
        b = finality.make_vote(AUTH[culprit], G, src, finality.Checkpoint(height, crypto.sha256(b"b%d" % height), 0))
        ev = finality.encode_evidence(a, b)
        self.pending.append((USERS[who], lambda n: make_evidence(USERS[who], G.ref, n, ev)))

    @rule(voter=st.sampled_from([AUTH[0], AUTH[1], USERS[0]]), remove=st.booleans(),
          subject=st.sampled_from([AUTH[1], AUTH[2], USERS[1]]), both=st.booleans())
    def authority_vote(self, voter, remove, subject, both):
        """AUTHORITY_VOTE (kind 12): one vote, or both genesis authorities at once (a quorum of 2);
        many are refused (not an authority, already one, already voted) and left out."""
        action = txmod.ACTION_REMOVE if remove else txmod.ACTION_ADD
        for k in ([AUTH[0], AUTH[1]] if both else [voter]):
            self.pending.append((k, lambda n, k=k: txmod.make_authority_vote(k, G.ref, n, action, subject.address)))
        if both:  # a quorum of the genesis pair: let two epochs pass so that the change applies
            for _ in range(2 * G.epoch_blocks + 1):
                self.produce(0)

    @rule(voter=st.sampled_from([AUTH[0], AUTH[1]]), n=st.integers(1, authorities.MAX_PROPOSALS_PER_VOTER + 2),
          remove=st.booleans())
    def vote_flood(self, voter, n, remove):
        """A byzantine authority votes for n distinct proposals at once (beyond K per epoch they are
        refused and left out); a removal of a set member mixed in counts against the cap too. The
        subjects are keys of KEYS (a lone authority's votes reach quorum: its adds do apply)."""
        pool = [AUTH[2], *USERS]
        for i in range(n):
            self.flooded += 1
            subject = pool[self.flooded % len(pool)].address
            action = txmod.ACTION_ADD
            if remove and i == n - 1:
                action, subject = txmod.ACTION_REMOVE, AUTH[1].address
            self.pending.append((voter, lambda nonce, s=subject, a=action: txmod.make_authority_vote(
                voter, G.ref, nonce, a, s)))

    @precondition(lambda self: self.main.head.height >= 2 + self.main.final_height)
    @rule(data=st.data())
    def certify(self, data):
        """Votes certify a canonical block: both chains store the same certificate."""
        h = data.draw(st.integers(self.main.final_height + 1, self.main.head.height - 1))
        cert = certify(self.main, G, h, keys=KEYS)  # by the set of h's epoch (votes may have changed it)
        self.follower.store_certificate(h, self.main.hash_at(h), cert)
        assert self.main.final_height == self.follower.final_height == h

    @rule(skip=st.integers(0, 2))
    def produce(self, skip):
        self.slot += 1 + skip
        self.slot = _next_slot(self.main, self.slot)
        author = KEYS[self.main.proposer_for_slot(self.slot)]
        nonces: dict = {}
        txs = []
        for k, make in self.pending:
            n = nonces.get(k.address)
            if n is None:
                n = self.main.account(crypto.sha256(k.pubkey)[:20])[1]
            txs.append(decode_tx(make(n)))
            nonces[k.address] = n + 1
        self.pending = []
        block, _dropped = self.main.build_block(author, self.slot, self.slot * 1000, txs)
        assert self.follower.add_block(decode_block(block.raw), now_ms=10**15) == "extended"
        for t in decode_block(block.raw).txs:  # --hypothesis-show-statistics: what the runs exercised
            event(f"landed {txmod.KIND_NAMES[t.kind]}")
        if self.main.current_authorities() != G.authority_ids:
            event("the authority set changed")
        if any(len(authorities.decode_voted(v)) == authorities.MAX_PROPOSALS_PER_VOTER
               for _, v in self.main.store.scan(authorities.AVTR)):
            event("an authority voted for its K proposals of an epoch")
        if block.height % G.epoch_blocks == 0 and any(
                t.kind == txmod.KIND_AUTHORITY_VOTE for h in range(block.height - G.epoch_blocks + 1, block.height + 1)
                for t in self.main.block_at(h).txs):
            event("an epoch boundary deleted its epoch's votes")

    @precondition(lambda self: self.main.head.height >= 1)
    @rule()
    def rival_branch_overtakes(self):
        """Build two empty blocks on the parent of the head in memory, then feed them to both chains."""
        h = self.main.head.height
        rival = Chain(MemoryStore(), G)
        rival.add_blocks([decode_block(self.main.block_raw_at(i)) for i in range(1, h)], now_ms=10**15)
        s1 = _next_slot(rival, self.slot + 1)
        b1, _ = rival.build_block(KEYS[rival.proposer_for_slot(s1)], s1, s1 * 1000, [])
        s2 = _next_slot(rival, s1 + 1)
        self.slot = s2
        b2, _ = rival.build_block(KEYS[rival.proposer_for_slot(s2)], s2, s2 * 1000, [])
        for c in (self.main, self.follower):
            outcomes = [c.add_block(decode_block(b.raw), now_ms=10**15) for b in (b1, b2)]
            assert "reorg" in outcomes or h - 1 < c.final_height, outcomes
        assert self.main.head == self.follower.head

    @rule()
    def reopen(self):
        self.store.close()
        self.store = LmdbStore(self.dir, map_size=1 << 26)
        self.main = Chain(self.store, G)

    @invariant()
    def same_state(self):
        for prefix in (b"v1:acct:", b"v1:rcpt:", b"v1:hgt:", b"v1:tx:", b"v1:evid:", b"v1:cert", b"v1:final",
                       b"v1:stak:", b"v1:escr:", b"v1:quot:", b"v1:slsh:", b"v1:supply", b"v1:aset:",
                       b"v1:avot:", b"v1:aprp:", b"v1:avtr:", b"v1:aque"):
            assert list(self.main.store.scan(prefix)) == list(self.follower.store.scan(prefix))
        assert self.main.head == self.follower.head
        assert self.main.current_authorities() == self.follower.current_authorities()

    @invariant()
    def votes_of_one_epoch_only(self):
        """The state holds the votes of the head's child's epoch only (each boundary deleted its
        epoch's), at most K proposals per voter, a tally per proposal voted, the queue within its cap."""
        now = G.epoch(self.main.head.height + 1)
        ids = self.main.current_authorities()
        voted = {k[16:]: authorities.decode_voted(v) for k, v in self.main.store.scan(authorities.AVTR)}
        avot = [k for k, _ in self.main.store.scan(authorities.AVOT)]
        aprp = [k for k, _ in self.main.store.scan(authorities.APRP)]
        for k in (*avot, *aprp, *(authorities.avtr_key(now, v) for v in voted)):
            assert int.from_bytes(k[8:16], "big") == now, "a vote record of a past epoch is left"
        assert set(voted) <= set(ids) and all(0 < len(p) <= authorities.MAX_PROPOSALS_PER_VOTER
                                              for p in voted.values())
        assert sorted(avot) == sorted(authorities.avot_key(now, a, s, v) for v, ps in voted.items() for a, s in ps)
        assert sorted(aprp) == sorted({authorities.aprp_key(now, a, s) for ps in voted.values() for a, s in ps})
        assert len(authorities.decode_queue(self.main.store.get(authorities.AQUE))) <= authorities.MAX_QUEUE

    @invariant()
    def set_chain_names_every_change_and_final_receipts_prove_from_the_genesis(self):
        """Ledger format 5: the head's set chain is the fold of the state's set changes, and the
        newest receipt minted in a final block has a proof (when the node certified a block of each
        change's window) that verifies from the genesis alone, across every change."""
        head = self.main.head
        want = authorities.genesis_set_chain(G, G.hash())
        changes = self.main.set_changes(authorities.fixed_epoch(G, head.height))
        for e, ids in changes:
            want = authorities.set_link(want, e, ids)
        assert head.set_chain == want == self.follower.head.set_chain
        final = [(state.decode_minted(v)[0], k[8:]) for k, v in self.main.store.scan(b"v1:rcpt:")
                 if state.decode_minted(v)[0] <= self.main.final_height]  # minted by a MINT or a SETTLE
        if not final:
            return
        rh = max(final)[1]
        try:
            p = proof.build_proof(self.main, rh)
        except FailedPrecondition:
            event("no certificate in a set change's window: no proof")
            return
        res = proof.verify_proof(p.encode(), G, rh)
        assert res.set_changes == len(p.changes) and res.amount == state.decode_minted(
            self.main.store.get(state.rcpt_key(rh)))[2]
        event(f"a final receipt of a {txmod.KIND_NAMES[decode_tx(p.tx).kind]} proved")
        if p.changes:
            event("a final receipt proved across a set change")

    @invariant()
    def supply_invariant(self):
        """balances + staked + unbonding + escrowed == minted - burned; minted is what receipts minted."""
        assert_supply_invariant(self.main.store)
        minted = sum(state.decode_minted(v)[2] for _, v in self.main.store.scan(b"v1:rcpt:"))
        assert state.read_supply(self.main.store.get).minted == minted

    def teardown(self):
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _next_slot(chain: Chain, slot: int) -> int:
    """The first slot from `slot` on (any authority of the next block's epoch is one of KEYS)."""
    ids = chain.current_authorities()
    assert all(a in KEYS for a in ids)
    return slot


TestChainMachine = ChainMachine.TestCase
TestChainMachine.settings = settings(max_examples=25, stateful_step_count=40, deadline=None,
                                     suppress_health_check=[HealthCheck.too_slow])
