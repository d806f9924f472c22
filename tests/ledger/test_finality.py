"""Finality votes (aitbc.ledger.finality, docs/ledger.md "Finality votes"): the quorum, the vote
and certificate checks (forged, replayed, other genesis, too few or duplicate signers, unknown
blocks, non-authorities), evidence, the honest voter's lock, and a simulated network of 4
authorities + a follower with one byzantine authority that equivocates (two blocks for its slot,
votes for both sent to different nodes) under random vote delays: no two nodes ever finalize
different blocks at one height, evidence is found, and finality goes on (also with one of 4 down)."""

from __future__ import annotations

import random

import pytest

from aitbc import crypto
from aitbc.errors import AitbcError, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from aitbc.ledger.finality import (
    Checkpoint,
    Tally,
    Voter,
    check_evidence,
    conflict,
    decode_certificate,
    decode_vote,
    encode_evidence,
    make_certificate,
    make_vote,
    quorum,
    tolerated,
    verify_certificate,
    verify_vote,
)

from .helpers import AUTH, BOB, genesis

G4 = genesis(4)
GH = G4.hash()
TWIN = genesis(4, genesis_time_ms=1)  # same chain id and keys, another genesis


def h(name: str) -> bytes:
    return crypto.sha256(name.encode())


class Tree:
    """A block tree: hash -> (height, parent hash); enough for the tally's lookups."""

    def __init__(self) -> None:
        self.blocks: dict[bytes, tuple[int, bytes]] = {}

    def add(self, name: str, parent: Checkpoint) -> Checkpoint:
        cp = Checkpoint(parent.height + 1, h(name))
        self.blocks[cp.hash] = (cp.height, parent.hash)
        return cp

    def lookup(self, block_hash: bytes) -> tuple[int, bytes] | None:
        return self.blocks.get(block_hash)


GEN = Checkpoint(0, GH)


def chain_of(tree: Tree, n: int, prefix: str = "a", parent: Checkpoint = GEN) -> list[Checkpoint]:
    out = []
    for i in range(n):
        parent = tree.add(f"{prefix}{i}", parent)
        out.append(parent)
    return out


def test_quorum_is_more_than_two_thirds_and_tolerates_f():
    assert [(n, quorum(n), tolerated(n)) for n in range(1, 8)] == [
        (1, 1, 0), (2, 2, 0), (3, 3, 0), (4, 3, 1), (5, 4, 1), (6, 5, 1), (7, 5, 2)]
    for n in range(1, 50):  # two quorums share more than f authorities: at least one honest
        assert 2 * quorum(n) - n >= tolerated(n) + 1 and quorum(n) <= n - tolerated(n)


def test_vote_roundtrip_and_refusals():
    a = Checkpoint(3, h("x"))
    v = make_vote(AUTH[1], G4, GEN, a)
    assert decode_vote(v.encode()) == v
    verify_vote(v, G4)
    with pytest.raises(PermissionDenied, match="not an authority"):
        verify_vote(make_vote(BOB, G4, GEN, a), G4)
    with pytest.raises(InvalidArgument, match="^wrong genesis"):  # genesis-bound: no replay across networks
        verify_vote(make_vote(AUTH[1], TWIN, Checkpoint(0, TWIN.hash()), a), G4)
    forged = decode_vote(v.encode()[:-65] + make_vote(AUTH[1], G4, GEN, Checkpoint(3, h("y"))).signature)
    with pytest.raises(InvalidArgument, match="^bad vote signature"):
        verify_vote(forged, G4)
    impostor = decode_vote(v.body()[:-20] + make_vote(AUTH[2], G4, GEN, a).voter + v.signature)
    with pytest.raises(InvalidArgument, match="^bad vote signature: not signed by"):
        verify_vote(impostor, G4)
    with pytest.raises(PermissionDenied, match="ignored"):
        verify_vote(v, G4, ignored=[v.voter])
    with pytest.raises(InvalidArgument, match="^malformed vote"):
        decode_vote(v.encode()[:-1])
    with pytest.raises(InvalidArgument, match="^malformed vote: target height"):
        decode_vote(make_vote(AUTH[1], G4, a, GEN).encode())


def _cert(tree: Tree, signers, source: Checkpoint, target: Checkpoint):
    return make_certificate(make_vote(k, G4, source, target) for k in signers)


def test_certificate_verification_refuses_every_bad_form():
    tree = Tree()
    b1, b2, b3 = chain_of(tree, 3)
    good = _cert(tree, AUTH[:3], b1, b2)
    assert decode_certificate(good.encode()) == good
    verify_certificate(good, G4, block=b1)  # anyone with the genesis can check it
    cases = [
        (_cert(tree, AUTH[:2], b1, b2), None, "too few signers: 2, needs more than 2/3 of 4 authorities \\(3\\)"),
        (type(good)(b1, b2, good.signatures[:2] + good.signatures[1:2]), None, "duplicate signers"),
        (type(good)(b1, b2, good.signatures[::-1]), None, "malformed certificate: signers must be in ascending"),
        (_cert(tree, [AUTH[0], AUTH[1], BOB], b1, b2), None, "certificate refused: vote from .* not an authority"),
        (good, b2, "certificate is for block 1 .* not for block 2 .*replayed"),
        (_cert(tree, AUTH[:3], b1, b3), None, "not to a child"),
    ]
    forged_sigs = list(good.signatures)
    forged_sigs[0] = (forged_sigs[0][0], make_vote(AUTH[0], G4, b1, b3).signature)
    cases.append((type(good)(b1, b2, tuple(forged_sigs)), None, "certificate refused: bad vote signature"))
    # a certificate names no genesis: the verifier rebuilds each vote under its own, so one made on
    # another network (same chain id and keys) fails every signature
    cases.append((good, None, "certificate refused: bad vote signature: not signed by"))
    for i, (cert, block, msg) in enumerate(cases):
        g = TWIN if i == len(cases) - 1 else G4
        with pytest.raises(InvalidArgument, match=msg):
            verify_certificate(decode_certificate(cert.encode()), g, block=block)


def test_tally_refuses_unknown_blocks_and_non_ancestor_links():
    tree = Tree()
    a = chain_of(tree, 2, "a")
    b = chain_of(tree, 2, "b")
    t = Tally(G4, tree.lookup)
    with pytest.raises(NotFound, match="^vote for an unknown block: target 5"):
        t.add(make_vote(AUTH[0], G4, GEN, Checkpoint(5, h("nowhere"))))
    with pytest.raises(InvalidArgument, match="not an ancestor"):
        t.add(make_vote(AUTH[0], G4, a[0], b[1]))
    assert t.add(make_vote(AUTH[0], G4, GEN, a[0])).outcome == "counted"
    assert t.add(make_vote(AUTH[0], G4, GEN, a[0])).outcome == "known"
    far = chain_of(tree, 300, "far")
    with pytest.raises(InvalidArgument, match="spans more than 256 heights"):
        t.add(make_vote(AUTH[0], G4, GEN, far[-1]))


def test_finality_needs_a_child_link_with_more_than_two_thirds():
    tree = Tree()
    a = chain_of(tree, 3)
    t = Tally(G4, tree.lookup)
    for k in AUTH[:3]:  # genesis -> a0 justifies a0
        t.add(make_vote(k, G4, GEN, a[0]))
    assert t.justified[a[0].hash] == 1 and t.final == GEN
    for k in AUTH[:2]:
        assert t.add(make_vote(k, G4, a[0], a[1])).finalized is None
    r = t.add(make_vote(AUTH[3], G4, a[0], a[1]))
    assert r.finalized == a[0] and t.final == a[0]
    verify_certificate(t.certificate, G4, block=a[0])
    # a follower that heard no vote learns the same finality from the certificate alone
    f = Tally(G4, tree.lookup)
    assert f.add_certificate(decode_certificate(t.certificate.encode())) == a[0]
    # a link that skips a height justifies but does not finalize its source
    t2 = Tally(G4, tree.lookup)
    for k in AUTH[:3]:
        t2.add(make_vote(k, G4, GEN, a[2]))
    assert t2.final == GEN and t2.justified[a[2].hash] == 3


def test_evidence_of_double_and_surround_votes():
    tree = Tree()
    a = chain_of(tree, 4, "a")
    b = chain_of(tree, 4, "b")
    double = (make_vote(AUTH[3], G4, GEN, a[1]), make_vote(AUTH[3], G4, GEN, b[1]))
    surround = (make_vote(AUTH[3], G4, GEN, a[3]), make_vote(AUTH[3], G4, a[0], a[2]))
    assert conflict(*double) == "double vote" and conflict(*surround) == "surround vote"
    for pair in (double, surround, surround[::-1]):
        assert check_evidence(encode_evidence(*pair), G4) == pair[0].voter
    fine = (make_vote(AUTH[3], G4, GEN, a[0]), make_vote(AUTH[3], G4, a[0], a[1]))
    with pytest.raises(InvalidArgument, match="^not evidence: the two votes do not conflict"):
        check_evidence(encode_evidence(*fine), G4)
    with pytest.raises(InvalidArgument, match="^not evidence: the votes are by different authorities"):
        check_evidence(encode_evidence(double[0], make_vote(AUTH[2], G4, GEN, b[1])), G4)
    with pytest.raises(InvalidArgument, match="^not evidence: wrong genesis"):
        check_evidence(encode_evidence(*double), TWIN)
    ev = encode_evidence(*double)
    with pytest.raises(InvalidArgument, match="^not evidence: two distinct votes in ascending"):
        check_evidence(ev[:3 + 2 + len(ev) // 2] + ev[3:], G4)
    # the tally reports evidence as soon as it holds both votes; after ignore() they count no more
    t = Tally(G4, tree.lookup)
    assert t.add(double[0]).evidence == b""
    got = t.add(double[1]).evidence
    assert check_evidence(got, G4) == double[0].voter
    t.ignore(double[0].voter)
    with pytest.raises(PermissionDenied, match="ignored"):
        t.add(make_vote(AUTH[3], G4, GEN, a[2]))
    assert all(double[0].voter not in vs for vs in t.links.values())


def test_honest_voter_never_signs_evidence():
    rng = random.Random(7)
    tree = Tree()
    a = chain_of(tree, 12, "a")
    voter = Voter(AUTH[0], G4)
    signed = []
    for _ in range(200):
        s, t = sorted(rng.sample(range(12), 2))
        v = voter.vote(a[s], a[t])
        if v is not None:
            signed.append(v)
    assert len(signed) >= 2
    assert all(conflict(x, y) is None for x in signed for y in signed)
    v = Voter(AUTH[0], G4)
    assert v.vote(a[1], a[5]) is not None
    assert v.vote(a[2], a[5]) is None  # same target height, another link: a double vote
    assert v.vote(a[2], a[4]) is None  # surrounded by 1 -> 5
    assert v.vote(a[0], a[7]) is None  # surrounds 1 -> 5 (a lower source)
    assert v.vote(a[5], a[7]) is not None


# ---- a simulated network -------------------------------------------------------------------------


def _tip_key(tree: Tree, cp: Checkpoint) -> tuple[int, bytes]:
    return (-cp.height, cp.hash)


def simulate(seed: int, *, byzantine: bool, down: int | None = None, rounds: int = 40, async_rounds: int = 20):
    """4 authorities (AUTH[3] byzantine when asked, AUTH[down] silent) + a follower (node 4).
    Round r: the proposer of slot r extends its head (the byzantine one makes two blocks, shown
    first to nodes {0, 1} and {2, 4}); each honest authority votes (highest justified -> head);
    votes arrive after a random delay of 0-3 rounds during the first async_rounds, then at once;
    every node passes on each vote it counts (gossip).
    Returns the tallies and the evidence found."""
    rng = random.Random(seed)
    tree = Tree()
    nodes = [Tally(G4, tree.lookup) for _ in range(5)]
    seen: list[set[bytes]] = [{GH} for _ in range(5)]
    voters = [Voter(k, G4) for k in AUTH]
    queue: list[tuple[int, int, object]] = []
    evidence: list[bytes] = []
    finals: list[list[Checkpoint]] = [[] for _ in range(5)]

    def cp_of(x: bytes) -> Checkpoint:
        return GEN if x == GH else Checkpoint(tree.blocks[x][0], x)

    def head(i: int) -> Checkpoint:
        j = nodes[i].highest_justified()
        tips = [cp_of(x) for x in seen[i] if nodes[i].is_ancestor(j, cp_of(x))]
        return min(tips, key=lambda c: _tip_key(tree, c))

    def deliver(r: int) -> None:
        while due := [q for q in queue if q[0] <= r]:
            deliver_some(r, due)

    def deliver_some(r: int, due) -> None:
        for item in due:
            queue.remove(item)
            _, i, vote = item
            try:
                res = nodes[i].add(vote)  # type: ignore[arg-type]
            except PermissionDenied:  # the culprit, once evidence is in
                continue
            except FailedPrecondition as exc:
                if exc.message.startswith("stale vote"):  # late, below the final height: changes nothing
                    continue
                raise
            if res.outcome == "counted":  # gossip: a node passes on every vote it counted
                send(vote, [j for j in range(5) if j != i], r)
            if res.evidence:
                evidence.append(res.evidence)
                culprit = check_evidence(res.evidence, G4)
                for n in nodes:  # evidence lands on chain: every node ignores the culprit from then on
                    n.ignore(culprit)
            if res.finalized:
                finals[i].append(res.finalized)

    def send(vote, to, r: int) -> None:
        for i in to:
            delay = rng.randint(0, 3) if r < async_rounds else 0
            queue.append((r + delay, i, vote))

    for r in range(1, rounds):
        who = r % 4
        if who != down:
            if byzantine and who == 3:
                base = head(rng.choice([0, 2]))
                x, y = tree.add(f"bz{r}x", base), tree.add(f"bz{r}y", base)
                for i in (0, 1):
                    seen[i].add(x.hash)
                for i in (2, 4):
                    seen[i].add(y.hash)
                for i in range(5):  # both become known to everyone a little later
                    seen[i] |= {x.hash, y.hash}
                jx, jy = nodes[rng.choice([0, 1])].highest_justified(), nodes[rng.choice([2, 4])].highest_justified()
                send(make_vote(AUTH[3], G4, jx if nodes[0].is_ancestor(jx, x) else GEN, x), (0, 1), r)
                send(make_vote(AUTH[3], G4, jy if nodes[0].is_ancestor(jy, y) else GEN, y), (2, 4), r)
            else:
                b = tree.add(f"b{r}", head(who))
                for i in range(5):
                    seen[i].add(b.hash)
        for i in range(4):
            if i == down or (byzantine and i == 3):
                continue
            hd = head(i)
            v = voters[i].vote(nodes[i].highest_justified(), hd)
            if v is not None:
                send(v, range(5), r)
        deliver(r)
        # safety: every final block anywhere lies on one chain
        allf = sorted({c for fs in finals for c in fs} | {n.final for n in nodes}, key=lambda c: c.height)
        for lo, hi in zip(allf, allf[1:], strict=False):
            assert nodes[0].is_ancestor(lo, hi), f"seed {seed}: conflicting final blocks {lo} and {hi}"
    deliver(10**9 - 1)
    return nodes, evidence


@pytest.mark.parametrize("seed", range(6))
def test_byzantine_authority_cannot_split_finality_and_finality_goes_on(seed):
    nodes, evidence = simulate(seed, byzantine=True)
    assert evidence, "the byzantine authority's double votes were never caught"
    assert all(n.ignored == {crypto.sha256(AUTH[3].pubkey)[:20]} for n in nodes)
    heights = [n.final.height for n in nodes]
    assert min(heights) >= 15, heights  # 3 honest of 4 are a quorum: it keeps finalizing
    for n in nodes:
        verify_certificate(n.certificate, G4, block=n.final)


@pytest.mark.parametrize("down", [0, 3])
def test_one_of_four_down_finality_continues(down):
    nodes, evidence = simulate(11, byzantine=False, down=down)
    assert not evidence
    assert min(n.final.height for n in nodes) >= 15


def test_two_of_four_down_nothing_finalizes():
    tree = Tree()
    a = chain_of(tree, 10)
    t = Tally(G4, tree.lookup)
    voters = [Voter(k, G4) for k in AUTH[:2]]
    for cp in a:
        for v in voters:
            vote = v.vote(t.highest_justified(), cp)
            assert vote is not None
            t.add(vote)
    assert t.final == GEN and t.highest_justified() == GEN


def test_a_link_that_reached_q_before_its_source_was_justified_justifies_later():
    """Votes arrive in any order: a0 -> a2 reaches q while a0 is not justified here yet; once
    genesis -> a0 does, a2 is justified too (and so on up the chain of waiting links)."""
    tree = Tree()
    a = chain_of(tree, 5)
    t = Tally(G4, tree.lookup)
    for k in AUTH[:3]:
        t.add(make_vote(k, G4, a[0], a[2]))
        t.add(make_vote(k, G4, a[2], a[4]))
    assert t.highest_justified() == GEN
    for k in AUTH[:3]:
        t.add(make_vote(k, G4, GEN, a[0]))
    assert t.highest_justified() == a[4] and t.justified[a[2].hash] == 3 and t.final == GEN


def test_a_lost_vote_stalls_finality_until_the_votes_are_sent_again():
    """The stall seen between real nodes: a justifying vote never reached half of the voters (sent
    before that peer was verified). AUTH[0..1] saw genesis -> a0 justified and vote a0 -> head;
    AUTH[2..3] did not and vote genesis -> head: every link has 2 votes of the 3 needed, for good.
    Tally.refresh (what a node sends again while its finality stands still) carries the quorum that
    justified a0, after which all four vote from a0 and finality moves."""
    tree = Tree()
    a = chain_of(tree, 12)
    seen_all, missed = Tally(G4, tree.lookup), Tally(G4, tree.lookup)
    first = [make_vote(k, G4, GEN, a[0]) for k in AUTH[:3]]
    for v in first:
        seen_all.add(v)
    for v in first[:2]:  # the third one was lost on its way to this node
        missed.add(v)
    voters = [Voter(k, G4) for k in AUTH]
    views = [seen_all, seen_all, missed, missed]

    def round_(cp):
        votes = [v.vote(view.highest_justified(), cp) for v, view in zip(voters, views, strict=True)]
        for vote in filter(None, votes):
            for t in (seen_all, missed):
                t.add(vote)

    for cp in a[1:8]:
        round_(cp)
    assert seen_all.final == GEN and missed.final == GEN  # stalled: 2 + 2 votes on two links each time
    assert missed.highest_justified() == GEN
    sent = seen_all.refresh()
    assert set(first) <= set(sent)  # the quorum behind a0 ...
    assert {v.voter for v in sent if v.target == a[7]} == {crypto.sha256(k.pubkey)[:20] for k in AUTH}  # ... and
    # every voter's latest vote
    assert len(sent) <= 16 * 3 + 4
    for v in sent:
        missed.add(v)
    assert missed.highest_justified() == a[0]
    for cp in a[8:11]:
        round_(cp)
    assert seen_all.final.height >= 8 and missed.final == seen_all.final
    assert missed.refresh() != [] and Tally(G4, tree.lookup).refresh() == []


def test_more_than_f_byzantine_is_detected_not_followed():
    """With 2 of 4 byzantine (beyond f) a tally may see a certificate conflicting with its final
    block: it refuses to leave its final chain and says why."""
    tree = Tree()
    a = chain_of(tree, 2, "a")
    b = chain_of(tree, 3, "b")
    t = Tally(G4, tree.lookup)
    for k in AUTH[:3]:
        t.add(make_vote(k, G4, GEN, a[0]))
    for k in AUTH[:3]:
        t.add(make_vote(k, G4, a[0], a[1]))
    assert t.final == a[0]
    with pytest.raises(FailedPrecondition, match="^stale vote"):  # at or below the final height
        t.add(make_vote(AUTH[3], G4, GEN, b[0]))
    for k in AUTH[1:4]:
        t.add(make_vote(k, G4, GEN, b[1]))
    with pytest.raises(FailedPrecondition, match="conflicts with final block"):
        for k in AUTH[1:4]:
            t.add(make_vote(k, G4, b[1], b[2]))
    assert t.final == a[0]


def test_errors_are_aitbc_errors():
    assert issubclass(NotFound, AitbcError)


# ---- evidence on chain (EVIDENCE transactions) -------------------------------------------------


def test_evidence_transaction_records_the_culprit_once():
    from aitbc.errors import AlreadyExists
    from aitbc.ledger import state
    from aitbc.ledger.tx import KIND_EVIDENCE, decode_tx, make_evidence

    tree = Tree()
    a = chain_of(tree, 2, "a")
    b = chain_of(tree, 2, "b")
    ev = encode_evidence(make_vote(AUTH[3], G4, GEN, a[1]), make_vote(AUTH[3], G4, GEN, b[1]))
    tx = decode_tx(make_evidence(BOB, G4.ref, 0, ev))  # any account may send it, funded or not
    assert tx.kind == KIND_EVIDENCE and tx.evidence == ev and tx.kind_name == "EVIDENCE"
    state.check_stateless(tx, G4)
    writes = state.apply_tx(lambda k: None, tx, G4, 7)
    culprit = crypto.sha256(AUTH[3].pubkey)[:20]
    assert writes[state.evid_key(culprit)] == (7).to_bytes(8, "big") + tx.hash
    again = decode_tx(make_evidence(BOB, G4.ref, 1, ev))
    with pytest.raises(AlreadyExists, match="^evidence already recorded"):
        state.apply_tx({**writes}.get, again, G4, 8)
    fine = encode_evidence(make_vote(AUTH[3], G4, GEN, a[0]), make_vote(AUTH[3], G4, a[0], a[1]))
    with pytest.raises(InvalidArgument, match="^not evidence"):
        state.check_stateless(decode_tx(make_evidence(BOB, G4.ref, 0, fine)), G4)
    with pytest.raises(InvalidArgument, match="^not evidence: wrong genesis"):  # genesis-bound like the votes
        state.check_stateless(decode_tx(make_evidence(BOB, TWIN.ref, 0, ev)), TWIN)
