"""Finality votes (aitbc.ledger.finality, docs/ledger.md "Finality votes", ledger format 4): FFG
over the checkpoint tree, two checkpoints per block ((B, prepare) at ck 2h, (B, commit) at ck
2h + 1). The quorum, the vote and certificate checks (forged, replayed, other genesis, too few or
duplicate signers, unknown blocks, non-authorities, version 1 encodings, links that are not to a
checkpoint child), every transition of the tally (a prepare quorum justifies, a commit quorum
finalizes the block in its own round, a missed commit recovers through the next block's prepare,
a (B, commit) -> (C, prepare) link finalizes B), evidence over checkpoint heights, the honest
voter's lock and its two votes per block, and a simulated network of 4 authorities + a follower
with one byzantine authority that equivocates (two blocks for its slot, prepare and commit votes
for both sent to different nodes) under random vote delays: no two nodes ever finalize different
blocks at one height, evidence is found, and finality goes on (also with one of 4 down)."""

from __future__ import annotations

import random

import pytest

from aitbc import crypto
from aitbc.errors import AitbcError, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from aitbc.ledger.finality import (
    COMMIT,
    MAX_SPAN,
    PREPARE,
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
    next_vote,
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


def C(cp: Checkpoint) -> Checkpoint:
    """The commit checkpoint of cp's block."""
    return cp.at(COMMIT)


class Tree:
    """A block tree: hash -> (height, parent hash); enough for the tally's lookups. Blocks are
    returned as their prepare checkpoint (C(b) is the commit one)."""

    def __init__(self) -> None:
        self.blocks: dict[bytes, tuple[int, bytes]] = {}

    def add(self, name: str, parent: Checkpoint) -> Checkpoint:
        cp = Checkpoint(parent.height + 1, h(name), PREPARE)
        self.blocks[cp.hash] = (cp.height, parent.hash)
        return cp

    def lookup(self, block_hash: bytes) -> tuple[int, bytes] | None:
        return self.blocks.get(block_hash)


GEN = Checkpoint(0, GH, COMMIT)


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


def test_checkpoint_heights_double_the_block_heights():
    a = Checkpoint(5, h("x"), PREPARE)
    assert (a.ck, C(a).ck, GEN.ck) == (10, 11, 1)
    assert Checkpoint(1, h("y"), PREPARE).ck == GEN.ck + 1  # block 1's prepare is the genesis' child


def test_vote_roundtrip_and_refusals():
    a = Checkpoint(3, h("x"), PREPARE)
    v = make_vote(AUTH[1], G4, GEN, a)
    assert decode_vote(v.encode()) == v and v.encode()[0] == 2
    verify_vote(v, G4)
    with pytest.raises(PermissionDenied, match="not an authority"):
        verify_vote(make_vote(BOB, G4, GEN, a), G4)
    with pytest.raises(InvalidArgument, match="^wrong genesis"):  # genesis-bound: no replay across networks
        verify_vote(make_vote(AUTH[1], TWIN, Checkpoint(0, TWIN.hash(), COMMIT), a), G4)
    forged = decode_vote(v.encode()[:-65] + make_vote(AUTH[1], G4, GEN, Checkpoint(3, h("y"), PREPARE)).signature)
    with pytest.raises(InvalidArgument, match="^bad vote signature"):
        verify_vote(forged, G4)
    # the phase is signed: the same link with the target's phase flipped is another vote
    flipped = decode_vote(make_vote(AUTH[1], G4, GEN, C(a)).body() + v.signature)
    with pytest.raises(InvalidArgument, match="^bad vote signature"):
        verify_vote(flipped, G4)
    impostor = decode_vote(v.body()[:-20] + make_vote(AUTH[2], G4, GEN, a).voter + v.signature)
    with pytest.raises(InvalidArgument, match="^bad vote signature: not signed by"):
        verify_vote(impostor, G4)
    with pytest.raises(PermissionDenied, match="ignored"):
        verify_vote(v, G4, ignored=[v.voter])
    with pytest.raises(InvalidArgument, match="^malformed vote"):
        decode_vote(v.encode()[:-1])
    with pytest.raises(InvalidArgument, match="^malformed vote: target checkpoint 0/commit is not above source"):
        decode_vote(make_vote(AUTH[1], G4, a, GEN).encode())
    with pytest.raises(InvalidArgument, match="^malformed vote: target checkpoint 3/prepare is not above source "
                                              "checkpoint 3/commit"):
        decode_vote(make_vote(AUTH[1], G4, C(a), a).encode())
    with pytest.raises(InvalidArgument, match="^malformed vote: the genesis has only its commit checkpoint"):
        decode_vote(make_vote(AUTH[1], G4, GEN.at(PREPARE), a).encode())
    raw = bytearray(v.encode())
    raw[-65 - 20 - 1] = 2  # the target's phase byte
    with pytest.raises(InvalidArgument, match="^malformed vote: phase 2 is neither 0 \\(prepare\\) nor 1"):
        decode_vote(bytes(raw))
    # a ledger format 3 vote (version 1: no phases, domain AITBC/vote/v1) is refused, saying why
    with pytest.raises(InvalidArgument, match="^malformed vote: version 1 is not supported: ledger format 4"):
        decode_vote(b"\x01" + v.encode()[1:])


def _cert(tree: Tree, signers, source: Checkpoint, target: Checkpoint):
    return make_certificate(make_vote(k, G4, source, target) for k in signers)


def test_certificate_verification_refuses_every_bad_form():
    tree = Tree()
    b1, b2, b3 = chain_of(tree, 3)
    good = _cert(tree, AUTH[:3], b1, C(b1))  # the commit round of b1: b1 final in its own slot
    assert decode_certificate(good.encode()) == good and good.encode()[0] == 2
    verify_certificate(good, G4, block=b1)  # anyone with the genesis can check it
    verify_certificate(good, G4, block=C(b1))  # either checkpoint names the block
    # a commit -> next prepare link certifies too (a missed commit round, recovered by the next block)
    verify_certificate(_cert(tree, AUTH[:3], C(b1), b2), G4, block=b1)
    cases = [
        (_cert(tree, AUTH[:2], b1, C(b1)), None, "too few signers: 2, needs more than 2/3 of 4 authorities \\(3\\)"),
        (type(good)(b1, C(b1), good.signatures[:2] + good.signatures[1:2]), None, "duplicate signers"),
        (type(good)(b1, C(b1), good.signatures[::-1]), None, "malformed certificate: signers must be in ascending"),
        (_cert(tree, [AUTH[0], AUTH[1], BOB], b1, C(b1)), None, "certificate refused: vote from .* not an authority"),
        (good, b2, "certificate is for block 1 .* not for block 2 .*replayed"),
        (_cert(tree, AUTH[:3], b1, b3), None, "not to a child"),
        (_cert(tree, AUTH[:3], b1, b2), None, "not to a child"),  # prepare -> next prepare skips b1's commit
        (_cert(tree, AUTH[:3], C(b1), b3), None, "not to a child"),  # commit -> a grandchild's prepare
        # prepare -> commit of another block at the same height: one checkpoint up, but not b1's child
        (_cert(tree, AUTH[:3], b1, Checkpoint(1, h("other"), COMMIT)), None, "not to a child checkpoint"),
    ]
    forged_sigs = list(good.signatures)
    forged_sigs[0] = (forged_sigs[0][0], make_vote(AUTH[0], G4, b1, b3).signature)
    cases.append((type(good)(b1, C(b1), tuple(forged_sigs)), None, "certificate refused: bad vote signature"))
    # a certificate names no genesis: the verifier rebuilds each vote under its own, so one made on
    # another network (same chain id and keys) fails every signature
    cases.append((good, None, "certificate refused: bad vote signature: not signed by"))
    for i, (cert, block, msg) in enumerate(cases):
        g = TWIN if i == len(cases) - 1 else G4
        with pytest.raises(InvalidArgument, match=msg):
            verify_certificate(decode_certificate(cert.encode()), g, block=block)
    with pytest.raises(InvalidArgument, match="^malformed certificate: version 1 is not supported: ledger format 4"):
        decode_certificate(b"\x01" + good.encode()[1:])


def test_tally_refuses_unknown_blocks_and_non_ancestor_links():
    tree = Tree()
    a = chain_of(tree, 2, "a")
    b = chain_of(tree, 2, "b")
    t = Tally(G4, tree.lookup)
    with pytest.raises(NotFound, match="^vote for an unknown block: target 5"):
        t.add(make_vote(AUTH[0], G4, GEN, Checkpoint(5, h("nowhere"), PREPARE)))
    with pytest.raises(InvalidArgument, match="not an ancestor"):
        t.add(make_vote(AUTH[0], G4, a[0], b[1]))
    with pytest.raises(InvalidArgument, match="not an ancestor"):  # prepare -> commit of another block, one height
        t.add(make_vote(AUTH[0], G4, a[1], C(b[1])))
    assert t.add(make_vote(AUTH[0], G4, GEN, a[0])).outcome == "counted"
    assert t.add(make_vote(AUTH[0], G4, GEN, a[0])).outcome == "known"
    far = chain_of(tree, 300, "far")
    with pytest.raises(InvalidArgument, match="spans more than 256 heights"):
        t.add(make_vote(AUTH[0], G4, GEN, far[-1]))


def test_a_prepare_quorum_justifies_and_a_commit_quorum_finalizes_the_block_in_its_slot():
    tree = Tree()
    a = chain_of(tree, 3)
    t = Tally(G4, tree.lookup)
    for k in AUTH[:2]:
        assert not t.add(make_vote(k, G4, GEN, a[0])).justified
    r = t.add(make_vote(AUTH[2], G4, GEN, a[0]))  # genesis -> (a0, prepare) justifies (a0, prepare)
    assert r.justified and r.finalized is None and a[0] in t.justified and t.final == GEN
    for k in AUTH[:2]:
        assert t.add(make_vote(k, G4, a[0], C(a[0]))).finalized is None
    r = t.add(make_vote(AUTH[3], G4, a[0], C(a[0])))  # (a0, prepare) -> (a0, commit): a0 final, no child needed
    assert r.finalized == C(a[0]) and t.final == C(a[0])
    assert (t.certificate.source, t.certificate.target) == (a[0], C(a[0]))
    verify_certificate(t.certificate, G4, block=a[0])
    # a follower that heard no vote learns the same finality from the certificate alone
    f = Tally(G4, tree.lookup)
    assert f.add_certificate(decode_certificate(t.certificate.encode())) == C(a[0]) and f.final == C(a[0])
    # a link that skips a checkpoint justifies but does not finalize its source
    t2 = Tally(G4, tree.lookup)
    for k in AUTH[:3]:
        t2.add(make_vote(k, G4, GEN, a[2]))
    assert t2.final == GEN and t2.highest_justified() == a[2]


def test_a_missed_commit_round_recovers_through_the_next_block():
    """(a0, prepare) is justified but its commit votes were lost (or the head moved on first): the
    next block's prepare votes from (a0, prepare) justify (a1, prepare), and a1's commit round
    makes a1 and a0 final. A (B, commit) -> (C, prepare) link finalizes B as well."""
    tree = Tree()
    a = chain_of(tree, 3)
    t = Tally(G4, tree.lookup)
    for k in AUTH[:3]:
        t.add(make_vote(k, G4, GEN, a[0]))
    for k in AUTH[:2]:  # one commit vote short
        t.add(make_vote(k, G4, a[0], C(a[0])))
    for k in AUTH[:3]:  # (a0, prepare) -> (a1, prepare): not a child link, finalizes nothing
        assert t.add(make_vote(k, G4, a[0], a[1])).finalized is None
    assert t.final == GEN and t.highest_justified() == a[1]
    for k in AUTH[1:4]:
        r = t.add(make_vote(k, G4, a[1], C(a[1])))
    assert r.finalized == C(a[1]) and t.is_ancestor(C(a[0]), t.final)
    # commit -> next prepare: (a0, commit) justified by a skipping link, then (a0, commit) -> (a1, prepare)
    t2 = Tally(G4, tree.lookup)
    for k in AUTH[:3]:
        t2.add(make_vote(k, G4, GEN, C(a[0])))
    assert t2.final == GEN
    for k in AUTH[:3]:
        r = t2.add(make_vote(k, G4, C(a[0]), a[1]))
    assert r.finalized == C(a[0]) and a[1] in t2.justified
    # voters that did not see a0's commit round complete vote (a0, prepare) -> (a1, prepare): once a0
    # is final here, (a0, prepare) still counts as a justified source (its quorum is long pruned away)
    t3 = Tally(G4, tree.lookup)
    for k in AUTH[:3]:
        t3.add(make_vote(k, G4, GEN, a[0]))
    for k in AUTH[:3]:
        t3.add(make_vote(k, G4, a[0], C(a[0])))
    assert t3.final == C(a[0]) and t3.links == {}
    for k in AUTH[1:]:
        t3.add(make_vote(k, G4, a[0], a[1]))
    assert t3.highest_justified() == a[1]


def test_evidence_of_double_and_surround_votes():
    tree = Tree()
    a = chain_of(tree, 4, "a")
    b = chain_of(tree, 4, "b")
    double = (make_vote(AUTH[3], G4, GEN, a[1]), make_vote(AUTH[3], G4, GEN, b[1]))
    # ck heights 1 -> 8 surround 3 -> 6
    surround = (make_vote(AUTH[3], G4, GEN, a[3]), make_vote(AUTH[3], G4, C(a[0]), a[2]))
    # two commit votes at ck 3 (two blocks at height 1): a double vote in the commit phase
    double_commit = (make_vote(AUTH[3], G4, a[0], C(a[0])), make_vote(AUTH[3], G4, b[0], C(b[0])))
    # ck 1 -> 4 surrounds 2 -> 3: a prepare of the next block from below a commit vote already signed
    surround_commit = (make_vote(AUTH[3], G4, GEN, a[1]), make_vote(AUTH[3], G4, a[0], C(a[0])))
    assert conflict(*double) == "double vote" and conflict(*surround) == "surround vote"
    assert conflict(*double_commit) == "double vote" and conflict(*surround_commit) == "surround vote"
    for pair in (double, surround, surround[::-1], double_commit, surround_commit):
        assert check_evidence(encode_evidence(*pair), G4) == pair[0].voter
    # what an honest voter signs for two blocks: prepare, commit, next prepare from either checkpoint
    for fine in ((make_vote(AUTH[3], G4, GEN, a[0]), make_vote(AUTH[3], G4, a[0], C(a[0]))),
                 (make_vote(AUTH[3], G4, a[0], C(a[0])), make_vote(AUTH[3], G4, C(a[0]), a[1])),
                 (make_vote(AUTH[3], G4, a[0], C(a[0])), make_vote(AUTH[3], G4, a[0], a[1]))):
        with pytest.raises(InvalidArgument, match="^not evidence: the two votes do not conflict"):
            check_evidence(encode_evidence(*fine), G4)
    with pytest.raises(InvalidArgument, match="^not evidence: the votes are by different authorities"):
        check_evidence(encode_evidence(double[0], make_vote(AUTH[2], G4, GEN, b[1])), G4)
    with pytest.raises(InvalidArgument, match="^not evidence: wrong genesis"):
        check_evidence(encode_evidence(*double), TWIN)
    ev = encode_evidence(*double)
    with pytest.raises(InvalidArgument, match="^not evidence: two distinct votes in ascending"):
        check_evidence(ev[:3 + 2 + len(ev) // 2] + ev[3:], G4)
    with pytest.raises(InvalidArgument, match="^not evidence: version 1 is not supported: ledger format 4"):
        check_evidence(b"\x01" + ev[1:], G4)
    # the tally reports evidence as soon as it holds both votes; after ignore() they count no more
    t = Tally(G4, tree.lookup)
    assert t.add(double[0]).evidence == b""
    got = t.add(double[1]).evidence
    assert check_evidence(got, G4) == double[0].voter
    t.ignore(double[0].voter)
    with pytest.raises(PermissionDenied, match="ignored"):
        t.add(make_vote(AUTH[3], G4, GEN, a[2]))
    assert all(double[0].voter not in vs for vs in t.links.values())


def test_a_convicted_voters_earlier_votes_still_count_so_a_justification_it_completed_can_be_rebuilt():
    """The byzantine authority's vote was the third on genesis -> (a2, prepare) at node A, which
    justified it there (and A's voters are locked on it); node B heard only the two honest votes.
    Evidence against it lands in block 5: its votes for block 5 and above are ignored everywhere,
    but those for lower blocks still count, so A's refresh rebuilds the justification at B (were it
    dropped, B could never justify (a2, prepare) and finality would stall for good)."""
    tree = Tree()
    a = chain_of(tree, 6)
    bz = crypto.sha256(AUTH[3].pubkey)[:20]
    at_a, at_b = Tally(G4, tree.lookup), Tally(G4, tree.lookup)
    for k in (AUTH[0], AUTH[1], AUTH[3]):
        at_a.add(make_vote(k, G4, GEN, a[2]))
    for k in (AUTH[0], AUTH[1]):
        at_b.add(make_vote(k, G4, GEN, a[2]))
    assert a[2] in at_a.justified and a[2] not in at_b.justified
    for t in (at_a, at_b):
        t.ignore(bz, 5)
    assert len(at_a.links[(GEN, a[2])]) == 3  # kept: below the evidence block
    for v in at_a.refresh():
        at_b.add(v)
    assert a[2] in at_b.justified
    with pytest.raises(PermissionDenied, match="whose votes are ignored"):  # block 5 and above: ignored
        at_b.add(make_vote(AUTH[3], G4, a[2], a[4]))
    with pytest.raises(InvalidArgument, match="^certificate refused: .*whose votes are ignored"):  # in a certificate too
        at_b.add_certificate(make_certificate(make_vote(k, G4, a[4], C(a[4])) for k in AUTH[1:]))
    # ignore() from height 0 (everything) drops every vote it counted
    at_b.ignore(bz)
    assert all(bz not in vs for vs in at_b.links.values())


def test_honest_voter_never_signs_evidence():
    rng = random.Random(7)
    tree = Tree()
    a = chain_of(tree, 12, "a")
    cps = sorted([GEN] + a + [C(x) for x in a], key=lambda c: c.ck)
    voter = Voter(AUTH[0], G4)
    signed = []
    for _ in range(400):
        s, t = sorted(rng.sample(range(len(cps)), 2))
        v = voter.vote(cps[s], cps[t])
        if v is not None:
            signed.append(v)
    assert len(signed) >= 2
    assert all(conflict(x, y) is None for x in signed for y in signed)
    v = Voter(AUTH[0], G4)
    assert v.vote(a[1], a[5]) is not None  # ck 4 -> 12
    assert (v.last_target, v.last_source) == (12, 4)
    assert v.vote(C(a[1]), a[5]) is None  # same target ck, another link: a double vote
    assert v.vote(C(a[1]), C(a[4])) is None  # 5 -> 11 is surrounded by 4 -> 12
    assert v.vote(GEN, C(a[6])) is None  # surrounds 4 -> 12 (a lower source)
    assert v.vote(a[5], C(a[5])) is not None  # the commit vote of the block it prepared
    assert v.vote(a[5], a[6]) is not None  # the next prepare may keep the prepare source (commit missed)


def test_the_voter_commits_only_once_its_prepare_is_justified():
    """next_vote: highest justified -> (head, prepare) until (head, prepare) is justified, then
    (head, prepare) -> (head, commit), then nothing until the next block."""
    tree = Tree()
    a = chain_of(tree, 300)
    at = {x.height: x.hash for x in a}.get
    assert next_vote(GEN, a[3], at) == (GEN, a[3])
    assert next_vote(C(a[1]), a[3], at) == (C(a[1]), a[3])
    assert next_vote(a[1], C(a[3]), at) == (a[1], a[3])  # the head's phase does not matter
    assert next_vote(a[3], a[3], at) == (a[3], C(a[3]))  # prepared: commit
    assert next_vote(C(a[3]), a[3], at) is None  # committed: wait for the next block
    assert next_vote(GEN, a[-1], at) == (GEN, a[MAX_SPAN - 1])  # at most MAX_SPAN heights


# ---- a simulated network -------------------------------------------------------------------------


def _tip_key(tree: Tree, cp: Checkpoint) -> tuple[int, bytes]:
    return (-cp.height, cp.hash)


def simulate(seed: int, *, byzantine: bool, down: int | None = None, rounds: int = 40, async_rounds: int = 20):
    """4 authorities (AUTH[3] byzantine when asked, AUTH[down] silent) + a follower (node 4).
    Round r: the proposer of slot r extends its head (the byzantine one makes two blocks, shown
    first to nodes {0, 1} and {2, 4}, and signs prepare and commit votes for both); each honest
    authority votes what next_vote says (highest justified -> (head, prepare), then, once that is
    justified in its own tally, the commit vote), votes arrive after a random delay of 0-3 rounds
    during the first async_rounds, then at once; every node passes on each vote it counts (gossip).
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
        return GEN if x == GH else Checkpoint(tree.blocks[x][0], x, PREPARE)

    def head(i: int) -> Checkpoint:
        j = nodes[i].highest_justified()
        tips = [cp_of(x) for x in seen[i] if nodes[i].block_is_ancestor(j.height, j.hash, cp_of(x).height, x)]
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
                if exc.message.startswith("stale vote"):  # late, below the final checkpoint: changes nothing
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

    def honest_votes(r: int) -> None:
        for i in range(4):
            if i == down or (byzantine and i == 3):
                continue
            hd = head(i)
            link = next_vote(nodes[i].highest_justified(), hd, lambda _h: None)
            if link is not None and (v := voters[i].vote(*link)) is not None:
                send(v, range(5), r)

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
                jx = jx if nodes[0].is_ancestor(jx, x) else GEN
                jy = jy if nodes[0].is_ancestor(jy, y) else GEN
                send(make_vote(AUTH[3], G4, jx, x), (0, 1), r)
                send(make_vote(AUTH[3], G4, jy, y), (2, 4), r)
                send(make_vote(AUTH[3], G4, x, C(x)), (0, 1), r)  # and commits both ways
                send(make_vote(AUTH[3], G4, y, C(y)), (2, 4), r)
            else:
                b = tree.add(f"b{r}", head(who))
                for i in range(5):
                    seen[i].add(b.hash)
        honest_votes(r)  # prepare votes
        deliver(r)
        honest_votes(r)  # commit votes, where the prepare quorum arrived in time
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
    assert all(set(n.ignored) == {crypto.sha256(AUTH[3].pubkey)[:20]} for n in nodes)
    heights = [n.final.height for n in nodes]
    assert min(heights) >= 15, heights  # 3 honest of 4 are a quorum: it keeps finalizing
    for n in nodes:
        verify_certificate(n.certificate, G4, block=n.final)


@pytest.mark.parametrize("down", [0, 3])
def test_one_of_four_down_finality_continues(down):
    nodes, evidence = simulate(11, byzantine=False, down=down)
    assert not evidence
    assert min(n.final.height for n in nodes) >= 15


def test_with_every_vote_on_time_each_block_is_final_in_its_own_round():
    nodes, _ = simulate(3, byzantine=False, rounds=12, async_rounds=0)
    assert all(n.final.height == 11 for n in nodes)  # the head of the last round, not its parent


def test_two_of_four_down_nothing_finalizes():
    tree = Tree()
    a = chain_of(tree, 10)
    t = Tally(G4, tree.lookup)
    voters = [Voter(k, G4) for k in AUTH[:2]]
    for cp in a:
        for _ in range(2):  # a prepare and, were it justified, a commit
            for v in voters:
                link = next_vote(t.highest_justified(), cp, lambda _h: None)
                if link is not None and (vote := v.vote(*link)) is not None:
                    t.add(vote)
    assert t.final == GEN and t.highest_justified() == GEN


def test_a_link_that_reached_q_before_its_source_was_justified_justifies_later():
    """Votes arrive in any order: (a0, prepare) -> (a2, prepare) reaches q while (a0, prepare) is
    not justified here yet; once genesis -> (a0, prepare) does, (a2, prepare) is justified too
    (and so on up the chain of waiting links)."""
    tree = Tree()
    a = chain_of(tree, 5)
    t = Tally(G4, tree.lookup)
    for k in AUTH[:3]:
        t.add(make_vote(k, G4, a[0], a[2]))
        t.add(make_vote(k, G4, a[2], a[4]))
    assert t.highest_justified() == GEN
    for k in AUTH[:3]:
        t.add(make_vote(k, G4, GEN, a[0]))
    assert t.highest_justified() == a[4] and a[2] in t.justified and t.final == GEN


def test_a_lost_vote_stalls_finality_until_the_votes_are_sent_again():
    """The stall seen between real nodes: a justifying vote never reached half of the voters (sent
    before that peer was verified). AUTH[0..1] saw genesis -> (a0, prepare) justified and vote from
    it; AUTH[2..3] did not and vote from genesis: every link has 2 votes of the 3 needed, for good.
    Tally.refresh (what a node sends again while its finality stands still) carries the quorum that
    justified (a0, prepare), after which all four vote from it and finality moves."""
    tree = Tree()
    a = chain_of(tree, 12)
    seen_all, missed = Tally(G4, tree.lookup), Tally(G4, tree.lookup)
    first = [make_vote(k, G4, GEN, a[0]) for k in AUTH[:3]]
    for v in first:
        seen_all.add(v)
    for v in first[:2]:  # the third one was lost on its way to this node
        missed.add(v)
    voters = [Voter(k, G4) for k in AUTH]
    voters[0].vote(GEN, a[0])  # the three that signed it are locked at it
    voters[1].vote(GEN, a[0])
    voters[2].vote(GEN, a[0])
    views = [seen_all, seen_all, missed, missed]

    def round_(cp):
        for _ in range(2):  # prepare, then commit where the prepare was justified
            votes = []
            for v, view in zip(voters, views, strict=True):
                link = next_vote(view.highest_justified(), cp, lambda _h: None)
                votes.append(None if link is None else v.vote(*link))
            for vote in filter(None, votes):
                for t in (seen_all, missed):
                    try:
                        t.add(vote)
                    except FailedPrecondition:  # a commit vote after the block was final already: stale
                        pass

    for cp in a[1:8]:
        round_(cp)
    assert seen_all.final == GEN and missed.final == GEN  # stalled: 2 + 2 votes on two links each time
    assert missed.highest_justified() == GEN
    sent = seen_all.refresh()
    assert set(first) <= set(sent)  # the quorum behind (a0, prepare) ...
    assert {v.voter for v in sent if v.target == a[7]} == {crypto.sha256(k.pubkey)[:20] for k in AUTH}  # ... and
    # every voter's latest vote
    assert len(sent) <= 16 * 3 + 4
    for v in sent:
        missed.add(v)
    assert missed.highest_justified() == a[0]
    for cp in a[8:11]:
        round_(cp)
    assert seen_all.final == C(a[10]) and missed.final == seen_all.final  # each block final in its own round
    assert Tally(G4, tree.lookup).refresh() == []  # nothing heard, nothing to send again


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
        t.add(make_vote(k, G4, a[0], C(a[0])))
    assert t.final == C(a[0])
    with pytest.raises(FailedPrecondition, match="^stale vote"):  # at or below the final checkpoint height
        t.add(make_vote(AUTH[3], G4, GEN, C(b[0])))
    for k in AUTH[1:4]:
        t.add(make_vote(k, G4, GEN, b[1]))
    with pytest.raises(FailedPrecondition, match="conflicts with final block"):
        for k in AUTH[1:4]:
            t.add(make_vote(k, G4, b[1], C(b[1])))
    assert t.final == C(a[0])


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
    fine = encode_evidence(make_vote(AUTH[3], G4, GEN, a[0]), make_vote(AUTH[3], G4, a[0], C(a[0])))
    with pytest.raises(InvalidArgument, match="^not evidence"):
        state.check_stateless(decode_tx(make_evidence(BOB, G4.ref, 0, fine)), G4)
    with pytest.raises(InvalidArgument, match="^not evidence: wrong genesis"):  # genesis-bound like the votes
        state.check_stateless(decode_tx(make_evidence(BOB, TWIN.ref, 0, ev)), TWIN)
