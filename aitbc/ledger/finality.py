"""Finality by votes: Casper FFG over a refined checkpoint tree (docs/ledger.md, "Finality votes").

Pure core, no I/O: the vote and certificate encodings, the voting rule an honest authority follows
(`Voter`), the tally that turns votes into justified and final checkpoints (`Tally`), certificate
verification by anyone holding the genesis, and evidence (two votes by one authority that an
honest one never signs).

Every block B is two checkpoints, (B, prepare) and (B, commit), at checkpoint height
ck = 2 height(B) + phase (prepare 0, commit 1): (B, commit) is the child of (B, prepare), and
(C, prepare) the child of (B, commit) for a child C of B. The genesis is (0, commit), ck 1,
justified and final. A vote is a link `source -> target` between two checkpoints, source an
ancestor of target. With n authorities and q = floor(2n/3) + 1:
- a link with votes from q distinct authorities *justifies* its target when its source is
  justified;
- a justified checkpoint S is *final* when a link S -> child(S) has q votes; those q votes are the
  certificate of S's block, which is final with every ancestor.
An honest authority never signs two votes with the same target ck (double vote) nor a vote whose
(source, target) ck heights strictly surround another of its own (surround vote); each such pair
is evidence. Two conflicting final blocks need f + 1 authorities to sign evidence. An authority
votes twice per block: `highest justified -> (head, prepare)`, then, once (head, prepare) is
justified, `(head, prepare) -> (head, commit)`, whose q votes make the head final in its own slot.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from aitbc import bech32, crypto
from aitbc.errors import (
    AitbcError,
    CryptoError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from aitbc.ledger.genesis import Genesis, check_chain_id
from aitbc.ledger.signers import Signers, signed_by

VOTE_VERSION = 2
VOTE_DOMAIN = b"AITBC/vote/v2"
CERT_VERSION = 2
EVIDENCE_VERSION = 2
PREPARE, COMMIT = 0, 1
PHASE_NAMES = ("prepare", "commit")
# what an old peer or data folder gets told (ledger format 3 voted on blocks, not checkpoints)
OLD_FORMAT = ("version 1 is not supported: ledger format 4 votes on two checkpoints per block (version 2, "
              "docs/ledger.md \"Finality votes\"); upgrade the node that made it")

_LINK = struct.Struct(">Q32sBQ32sB")
_U16 = struct.Struct(">H")
SIG_LEN = 65
REFRESH_JUSTIFIED = 16  # justified checkpoints whose quorums a stalled node sends again (Tally.refresh)
MAX_SPAN = 256  # most block heights one vote's link may span (a tally walks parent links to check it)


def quorum(n: int) -> int:
    """Votes a link needs: more than 2/3 of n equal-weight authorities, floor(2n/3) + 1."""
    return 2 * n // 3 + 1


def tolerated(n: int) -> int:
    """f = floor((n - 1) / 3): byzantine authorities the rule survives (0 with 1-3, 1 with 4-6)."""
    return (n - 1) // 3


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """(block, phase): a block's prepare (0) or commit (1) checkpoint."""

    height: int  # the block's height
    hash: bytes  # the block's hash
    phase: int  # PREPARE or COMMIT

    @property
    def ck(self) -> int:
        """Checkpoint height: 2 x block height + phase."""
        return 2 * self.height + self.phase

    def at(self, phase: int) -> Checkpoint:
        return Checkpoint(self.height, self.hash, phase)

    def __str__(self) -> str:
        return f"{self.height}/{PHASE_NAMES[self.phase]} {self.hash.hex()[:16]}"


def _check_link(sh: int, sp: int, th: int, tp: int, what: str) -> None:
    for p in (sp, tp):
        if p not in (PREPARE, COMMIT):
            raise InvalidArgument(f"malformed {what}: phase {p} is neither 0 (prepare) nor 1 (commit)")
    if sh == 0 and sp == PREPARE:
        raise InvalidArgument(f"malformed {what}: the genesis has only its commit checkpoint")
    if 2 * th + tp <= 2 * sh + sp:
        raise InvalidArgument(f"malformed {what}: target checkpoint {th}/{PHASE_NAMES[tp]} is not above source "
                              f"checkpoint {sh}/{PHASE_NAMES[sp]}")


def _pack_link(source: Checkpoint, target: Checkpoint) -> bytes:
    return _LINK.pack(source.height, source.hash, source.phase, target.height, target.hash, target.phase)


def _unpack_link(raw: bytes, pos: int) -> tuple[Checkpoint, Checkpoint]:
    sh, shash, sp, th, thash, tp = _LINK.unpack_from(raw, pos)
    return Checkpoint(sh, shash, sp), Checkpoint(th, thash, tp)


@dataclass(frozen=True, slots=True)
class Vote:
    chain_id: str
    genesis_hash: bytes
    source: Checkpoint
    target: Checkpoint
    voter: bytes  # 20-byte account id
    signature: bytes = b""  # 65 bytes r || s || v over digest()

    def body(self) -> bytes:
        cid = self.chain_id.encode()
        return (bytes((VOTE_VERSION, len(cid))) + cid + self.genesis_hash + _pack_link(self.source, self.target)
                + self.voter)

    def digest(self) -> bytes:
        return crypto.domain_digest(VOTE_DOMAIN, self.body())

    def encode(self) -> bytes:
        return self.body() + self.signature

    @property
    def link(self) -> tuple[Checkpoint, Checkpoint]:
        return self.source, self.target

    @property
    def voter_address(self) -> str:
        return bech32.encode(crypto.ADDRESS_HRP, self.voter)


def make_vote(key: crypto.PrivateKey, genesis: Genesis, source: Checkpoint, target: Checkpoint) -> Vote:
    v = Vote(genesis.chain_id, genesis.hash(), source, target, crypto.sha256(key.pubkey)[:20])
    return Vote(v.chain_id, v.genesis_hash, source, target, v.voter, key.sign(v.digest()))


def decode_vote(raw: bytes) -> Vote:
    raw = bytes(raw)
    try:
        version, clen = raw[0], raw[1]
        if version != VOTE_VERSION:
            raise InvalidArgument(f"malformed vote: {OLD_FORMAT}" if version == 1 else
                                  f"malformed vote: version {version} is not supported")
        cid = raw[2:2 + clen].decode("ascii")
        pos = 2 + clen
        if len(raw) != pos + 32 + _LINK.size + 20 + SIG_LEN:
            raise InvalidArgument("malformed vote: wrong length")
        gh = raw[pos:pos + 32]
        sh, shash, sp, th, thash, tp = _LINK.unpack_from(raw, pos + 32)
        pos += 32 + _LINK.size
        voter, sig = raw[pos:pos + 20], raw[pos + 20:]
    except (IndexError, UnicodeDecodeError, struct.error):
        raise InvalidArgument("malformed vote: truncated") from None
    try:
        check_chain_id(cid)
    except AitbcError:
        raise InvalidArgument("malformed vote: bad chain id") from None
    _check_link(sh, sp, th, tp, "vote")
    return Vote(cid, gh, Checkpoint(sh, shash, sp), Checkpoint(th, thash, tp), voter, sig)


def verify_vote(vote: Vote, genesis: Genesis, genesis_hash: bytes | None = None,
                ignored: Iterable[bytes] = (), authorities: Iterable[bytes] | None = None,
                signers: Signers | None = None) -> None:
    """Raise unless `vote` is signed by an authority (of `authorities`, the set of the target
    block's epoch; the genesis list by default) and not one with evidence against it. Stateless:
    whether the blocks exist is the tally's business. `signers`: signatures recovered beforehand
    (aitbc.ledger.signers; the digest is computed here from the vote's own fields)."""
    gh = genesis_hash if genesis_hash is not None else genesis.hash()
    if vote.chain_id != genesis.chain_id:
        raise InvalidArgument(f"wrong chain id: vote is for {vote.chain_id!r}, this chain is {genesis.chain_id!r}")
    if vote.genesis_hash != gh:
        raise InvalidArgument(f"wrong genesis: vote is for genesis {vote.genesis_hash.hex()}, this chain has "
                              f"{gh.hex()} (another network, or a replayed vote)")
    if vote.voter not in (genesis.authority_ids if authorities is None else authorities):
        raise PermissionDenied(f"vote from {vote.voter_address}, which is not an authority")
    if vote.voter in set(ignored):
        raise PermissionDenied(f"vote from {vote.voter_address}, whose votes are ignored (evidence on chain)")
    try:
        signed = signed_by(vote.voter, vote.digest(), vote.signature, signers)
    except CryptoError as exc:
        raise InvalidArgument(f"bad vote signature: {exc.message}") from None
    if not signed:
        raise InvalidArgument(f"bad vote signature: not signed by {vote.voter_address}")


def is_child_link(source: Checkpoint, target: Checkpoint) -> bool:
    """target is source's child in the checkpoint tree, as far as the link itself tells:
    (B, prepare) -> (B, commit), or (B, commit) -> (C, prepare) with C one height above B (that
    C's parent is B takes the blocks, or the tally's ancestor check)."""
    if target.ck != source.ck + 1:
        return False
    return source.phase == COMMIT or target.hash == source.hash


# ---- certificates ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Certificate:
    """q votes on one link source -> target, target the checkpoint child of source: source's
    block is final."""

    source: Checkpoint
    target: Checkpoint
    signatures: tuple[tuple[bytes, bytes], ...]  # (voter id, 65-byte signature), voter ids ascending

    def encode(self) -> bytes:
        out = [bytes((CERT_VERSION,)), _pack_link(self.source, self.target), _U16.pack(len(self.signatures))]
        for voter, sig in self.signatures:
            out.append(voter + sig)
        return b"".join(out)

    def votes(self, genesis: Genesis, genesis_hash: bytes | None = None) -> list[Vote]:
        gh = genesis_hash if genesis_hash is not None else genesis.hash()
        return [Vote(genesis.chain_id, gh, self.source, self.target, v, s) for v, s in self.signatures]


def make_certificate(votes: Iterable[Vote]) -> Certificate:
    vs = sorted({v.voter: v for v in votes}.values(), key=lambda v: v.voter)
    if not vs or len({v.link for v in vs}) != 1:
        raise InvalidArgument("a certificate holds votes on exactly one link")
    return Certificate(vs[0].source, vs[0].target, tuple((v.voter, v.signature) for v in vs))


def decode_certificate(raw: bytes) -> Certificate:
    raw = bytes(raw)
    try:
        if raw[0] != CERT_VERSION:
            raise InvalidArgument(f"malformed certificate: {OLD_FORMAT}" if raw[0] == 1 else
                                  f"malformed certificate: version {raw[0]} is not supported")
        sh, shash, sp, th, thash, tp = _LINK.unpack_from(raw, 1)
        (count,) = _U16.unpack_from(raw, 1 + _LINK.size)
    except (IndexError, struct.error):
        raise InvalidArgument("malformed certificate: truncated") from None
    pos = 1 + _LINK.size + 2
    if len(raw) != pos + count * (20 + SIG_LEN):
        raise InvalidArgument("malformed certificate: wrong length")
    _check_link(sh, sp, th, tp, "certificate")
    sigs = tuple((raw[p:p + 20], raw[p + 20:p + 20 + SIG_LEN]) for p in range(pos, len(raw), 20 + SIG_LEN))
    return Certificate(Checkpoint(sh, shash, sp), Checkpoint(th, thash, tp), sigs)


def certificate_signatures(raws: Iterable[bytes], genesis: Genesis, genesis_hash: bytes | None = None
                           ) -> list[tuple[bytes, bytes]]:
    """(digest, signature) of every vote of these certificates (those that do not decode are
    skipped: verifying them refuses them with the reason), to recover ahead (aitbc.ledger.signers)."""
    gh = genesis_hash if genesis_hash is not None else genesis.hash()
    out: list[tuple[bytes, bytes]] = []
    for raw in raws:
        try:
            cert = decode_certificate(raw)
        except AitbcError:
            continue
        out.extend((v.digest(), v.signature) for v in cert.votes(genesis, gh))
    return out


def verify_certificate(cert: Certificate, genesis: Genesis, *, block: Checkpoint | None = None,
                       genesis_hash: bytes | None = None, ignored: Iterable[bytes] = (),
                       authorities: tuple[bytes, ...] | None = None, signers: Signers | None = None) -> None:
    """Raise unless `cert` proves its source's block final under this genesis: a link to the
    source's checkpoint child, more than 2/3 of the authorities, each once, each signature valid.
    `block`: the block it is claimed for (its phase is not compared: a certificate from either
    checkpoint of a block certifies the block). `authorities`: the set of the epoch of the
    certificate's target block (its votes are that link's votes); the genesis list by default.
    `signers`: signatures recovered in parallel beforehand (verify_vote)."""
    ids = genesis.authority_ids if authorities is None else authorities
    n = len(ids)
    q = quorum(n)
    if block is not None and (cert.source.height, cert.source.hash) != (block.height, block.hash):
        raise InvalidArgument(f"certificate is for block {cert.source.height} {cert.source.hash.hex()[:16]}, not "
                              f"for block {block.height} {block.hash.hex()[:16]} (a replayed certificate)")
    if not is_child_link(cert.source, cert.target):
        raise InvalidArgument(f"certificate link {cert.source} -> {cert.target} is not to a child checkpoint")
    voters = [v for v, _ in cert.signatures]
    if len(set(voters)) != len(voters):
        raise InvalidArgument("certificate has duplicate signers")
    if voters != sorted(voters):
        raise InvalidArgument("malformed certificate: signers must be in ascending order")
    if len(voters) < q:
        raise InvalidArgument(f"certificate has too few signers: {len(voters)}, needs more than 2/3 of {n} "
                              f"authorities ({q})")
    gh = genesis_hash if genesis_hash is not None else genesis.hash()
    ign = frozenset(ignored)
    for vote in cert.votes(genesis, gh):
        try:
            verify_vote(vote, genesis, gh, ign, ids, signers)
        except AitbcError as exc:
            raise InvalidArgument(f"certificate refused: {exc.message}") from None


# ---- evidence ----------------------------------------------------------------------------------


def conflict(a: Vote, b: Vote) -> str | None:
    """Why two votes of one voter prove it byzantine ("double vote", "surround vote"), or None;
    both rules over checkpoint heights."""
    if a.voter != b.voter or a.link == b.link:
        return None
    if a.target.ck == b.target.ck:
        return "double vote"
    s1, t1, s2, t2 = a.source.ck, a.target.ck, b.source.ck, b.target.ck
    if (s1 < s2 and t2 < t1) or (s2 < s1 and t1 < t2):
        return "surround vote"
    return None


def encode_evidence(a: Vote, b: Vote) -> bytes:
    """Canonical evidence: u8 version || u16 len || vote || u16 len || vote, lower vote bytes first."""
    x, y = sorted((a.encode(), b.encode()))
    return bytes((EVIDENCE_VERSION,)) + _U16.pack(len(x)) + x + _U16.pack(len(y)) + y


def _split_evidence(raw: bytes) -> tuple[bytes, bytes]:
    try:
        if raw[0] == 1:  # ledger format 3 evidence (block votes)
            raise InvalidArgument("not evidence: " + OLD_FORMAT)
        if raw[0] != EVIDENCE_VERSION:
            raise InvalidArgument(f"not evidence: version {raw[0]} is not supported")
        (la,) = _U16.unpack_from(raw, 1)
        xa = raw[3:3 + la]
        (lb,) = _U16.unpack_from(raw, 3 + la)
        xb = raw[5 + la:5 + la + lb]
    except (IndexError, struct.error):
        raise InvalidArgument("not evidence: truncated") from None
    if len(raw) != 5 + la + lb or not xa < xb:
        raise InvalidArgument("not evidence: two distinct votes in ascending byte order expected")
    return xa, xb


def evidence_voter(raw: bytes) -> bytes:
    """The voter named by (already checked) evidence, without checking signatures again."""
    return decode_vote(_split_evidence(bytes(raw))[0]).voter


def check_evidence(raw: bytes, genesis: Genesis, genesis_hash: bytes | None = None) -> bytes:
    """The voter id that `raw` convicts; raises "not evidence: ..." unless it holds two validly
    signed votes of one authority of this genesis that an honest authority never both signs."""
    xa, xb = _split_evidence(bytes(raw))
    try:
        a, b = decode_vote(xa), decode_vote(xb)
    except AitbcError as exc:
        raise InvalidArgument(f"not evidence: {exc.message}") from None
    for v in (a, b):
        try:
            verify_vote(v, genesis, genesis_hash)
        except AitbcError as exc:
            raise InvalidArgument(f"not evidence: {exc.message}") from None
    if a.voter != b.voter:
        raise InvalidArgument("not evidence: the votes are by different authorities")
    if conflict(a, b) is None:
        raise InvalidArgument("not evidence: the two votes do not conflict (neither the same target checkpoint "
                              "height nor one surrounding the other)")
    return a.voter


# ---- the honest voter ----------------------------------------------------------------------------


@dataclass(slots=True)
class Voter:
    """What one honest authority may still sign. Its lock is (last target ck, last source ck):
    targets strictly rise and sources never fall, so it never signs a double or surround vote.
    Persist both before sending a vote (a restart must not forget them)."""

    key: crypto.PrivateKey
    genesis: Genesis
    last_target: int = 0
    last_source: int = 0

    def allows(self, source: Checkpoint, target: Checkpoint) -> bool:
        return target.ck > self.last_target and source.ck >= self.last_source and target.ck > source.ck

    def vote(self, source: Checkpoint, target: Checkpoint) -> Vote | None:
        """Sign source -> target if the lock allows it. The caller passes its highest justified
        checkpoint as source and the head's prepare checkpoint (a descendant of source) as target,
        or, once (head, prepare) is justified, (head, prepare) -> (head, commit)."""
        if not self.allows(source, target):
            return None
        self.last_target, self.last_source = target.ck, source.ck
        return make_vote(self.key, self.genesis, source, target)


def next_vote(justified_on_chain: Checkpoint, head: Checkpoint, at_height: Callable[[int], bytes | None]
              ) -> tuple[Checkpoint, Checkpoint] | None:
    """The link an honest authority votes now: `justified_on_chain` is the highest justified
    checkpoint on its canonical chain, `head` its head block (any phase), `at_height` the
    canonical block hash at a height. (head, prepare) justified: the commit vote; else highest
    justified -> (head, prepare), capped at MAX_SPAN heights above the source; None when
    (head, commit) is justified already (nothing to vote until the next block)."""
    src = justified_on_chain
    if src.height == head.height:
        return None if src.phase == COMMIT else (src, head.at(COMMIT))
    th = min(head.height, src.height + MAX_SPAN)
    th_hash = head.hash if th == head.height else at_height(th)
    return None if th_hash is None else (src, Checkpoint(th, th_hash, PREPARE))


# ---- the tally -----------------------------------------------------------------------------------

BlockLookup = Callable[[bytes], "tuple[int, bytes] | None"]  # hash -> (height, parent hash)
# the authority set a vote for this target block must come from (the set of its epoch), or None
# when this node cannot tell yet (a block far ahead, or on a branch forked below that set's block)
AuthorityLookup = Callable[[Checkpoint], "tuple[bytes, ...] | None"]
Link = tuple[Checkpoint, Checkpoint]


@dataclass(frozen=True, slots=True)
class VoteResult:
    outcome: str  # "counted", "known"
    evidence: bytes = b""  # encoded evidence when this vote conflicts with an earlier one of its voter
    finalized: Checkpoint | None = None  # (block, commit) of the new final block when this vote completed a certificate
    justified: bool = False  # this vote justified at least one checkpoint


@dataclass
class Tally:
    """One node's view of the votes: justified checkpoints, the final block and its certificate.
    `final` is always the commit checkpoint of the final block: a certificate from either of its
    checkpoints justifies (B, commit), and nothing at or below that checkpoint height can change."""

    genesis: Genesis
    lookup: BlockLookup
    genesis_hash: bytes = b""
    justified: set[Checkpoint] = field(default_factory=set)
    links: dict[Link, dict[bytes, Vote]] = field(default_factory=dict)
    by_voter: dict[bytes, list[Vote]] = field(default_factory=dict)
    # convicted voter -> the block height from which its votes are ignored (the block that recorded
    # the evidence; 0: all of them). Its votes for lower blocks still count: one may be in a quorum
    # that justified a checkpoint other nodes are locked on, and a node that missed it must be able
    # to count that quorum when it is sent again (Tally.refresh), or finality stalls for good.
    ignored: dict[bytes, int] = field(default_factory=dict)
    justified_by: dict[Checkpoint, Link] = field(default_factory=dict)  # target -> the link that justified it
    final: Checkpoint | None = None
    certificate: Certificate | None = None
    authorities: AuthorityLookup | None = None  # None: the genesis list for every block

    def authority_set(self, target: Checkpoint) -> tuple[bytes, ...]:
        """The set whose votes count for links to `target` (the set of its block's epoch)."""
        if self.authorities is None:
            return self.genesis.authority_ids
        memo = self._memo
        ids = memo.get(target) if memo is not None else None
        if ids is None:
            ids = self.authorities(target)
            if memo is not None and ids is not None:
                memo[target] = ids
        if ids is None:
            raise FailedPrecondition(f"vote for block {target.height}, whose authority set this node does not know "
                                     "yet")
        return ids

    def quorum_for(self, target: Checkpoint) -> int:
        return quorum(len(self.authority_set(target)))

    def __post_init__(self) -> None:
        self.genesis_hash = self.genesis_hash or self.genesis.hash()
        self.justified.add(Checkpoint(0, self.genesis_hash, COMMIT))
        self.final = (self.final or Checkpoint(0, self.genesis_hash, COMMIT)).at(COMMIT)
        self.justified.add(self.final)  # a final block's commit checkpoint is justified
        self.q = quorum(len(self.genesis.authorities))
        self._newly_justified = False
        self._memo: dict[object, Any] | None = None

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Within: what the block and set lookups found is remembered (a batch of certificates
        caught up with: each certificate's block, its parent and its set are asked about several
        times). Only what was found: a block not known yet is looked up again."""
        self._memo = {}
        try:
            yield
        finally:
            self._memo = None

    def _lookup(self, h: bytes) -> tuple[int, bytes] | None:
        memo = self._memo
        if memo is None:
            return self.lookup(h)
        got = memo.get(h)
        if got is None:
            got = self.lookup(h)
            if got is not None:
                memo[h] = got
        return got

    def _height(self, h: bytes) -> int | None:
        if h == self.genesis_hash:
            return 0
        got = self._lookup(h)
        return None if got is None else got[0]

    def block_is_ancestor(self, a_height: int, a_hash: bytes, b_height: int, b_hash: bytes) -> bool:
        """Block a is block b or an ancestor of it (by parent links)."""
        cur, height = b_hash, b_height
        while height > a_height:
            if cur == self.genesis_hash:
                return False
            got = self._lookup(cur)
            if got is None:
                return False
            cur, height = got[1], got[0] - 1
        return height == a_height and cur == a_hash

    def is_ancestor(self, a: Checkpoint, b: Checkpoint) -> bool:
        """Checkpoint a is b or an ancestor of b in the checkpoint tree."""
        return a.ck <= b.ck and self.block_is_ancestor(a.height, a.hash, b.height, b.hash)

    def highest_justified(self) -> Checkpoint:
        return max(self.justified, key=lambda c: (c.ck, c.hash))

    def add(self, vote: Vote, *, signature_checked: bool = False) -> VoteResult:
        """Count a vote; raises with a clear message when it cannot count. `signature_checked`:
        verify_vote already passed (a vote of a certificate that verify_certificate checked)."""
        ignored = self.ignored_for(vote.target)
        if vote.voter not in ignored and self.links.get(vote.link, {}).get(vote.voter) == vote:
            return VoteResult("known")  # the very vote counted before (a refresh): no signature check again
        if not signature_checked:
            verify_vote(vote, self.genesis, self.genesis_hash, ignored, self.authority_set(vote.target))
        elif vote.voter in ignored:
            raise PermissionDenied(f"vote from {vote.voter_address}, whose votes are ignored (evidence on chain)")
        assert self.final is not None
        if vote.target.ck <= self.final.ck:
            raise FailedPrecondition(f"stale vote: target {vote.target} is not above the final checkpoint "
                                     f"{self.final} (block {self.final.height})")
        link = vote.link
        if link not in self.links:  # a link's shape and blocks are checked once (a block hash's height
            # and parent never change, so what held for the first vote on it holds for the others)
            if vote.target.height - vote.source.height > MAX_SPAN:
                raise InvalidArgument(f"vote link spans more than {MAX_SPAN} heights")
            for cp, what in ((vote.target, "target"), (vote.source, "source")):
                if self._height(cp.hash) != cp.height:
                    raise NotFound(f"vote for an unknown block: {what} {cp.height} {cp.hash.hex()[:16]} is not "
                                   "known here")
            if not self.is_ancestor(vote.source, vote.target):
                raise InvalidArgument("vote links a source that is not an ancestor of its target")
        voters = self.links.setdefault(link, {})
        if vote.voter in voters:
            return VoteResult("known")
        evidence = b""
        for earlier in self.by_voter.get(vote.voter, ()):
            if conflict(earlier, vote) is not None:
                evidence = encode_evidence(earlier, vote)
                break
        voters[vote.voter] = vote
        self.by_voter.setdefault(vote.voter, []).append(vote)
        self._newly_justified = False
        finalized = self._settle(link)
        return VoteResult("counted", evidence, finalized, self._newly_justified)

    def prune(self) -> None:
        """Forget votes that can no longer change anything (targets at or below the final checkpoint),
        and justified checkpoints more than MAX_SPAN heights below the final block."""
        assert self.final is not None
        fk = self.final.ck
        self.links = {k: v for k, v in self.links.items() if k[1].ck > fk}
        self.by_voter = {k: kept for k, vs in self.by_voter.items() if (kept := [v for v in vs if v.target.ck > fk])}
        # justified checkpoints stay while a link from them could still justify something above
        # the final one (a voter that missed a justification votes from a lower source, even from
        # below the final checkpoint: (B, prepare) -> (C, prepare) after B was final by its commit)
        if len(self.justified) > 4 * MAX_SPAN:  # now and then: rebuilding the set on each final block costs
            self.justified = {c for c in self.justified if c.height + MAX_SPAN >= self.final.height}
        self.justified_by = {c: link for c, link in self.justified_by.items() if c.ck > fk}

    def refresh(self, limit: int = REFRESH_JUSTIFIED) -> list[Vote]:
        """The votes worth sending again while finality stalls (a vote can be lost: sent before a
        peer was verified, dropped from a full queue, a node restarted): the quorum behind each of
        the `limit` highest justified checkpoints above the final one, then each voter's latest
        vote. Without it, two groups of voters that disagree on the highest justified checkpoint
        vote on two different links for good, neither reaching q."""
        out: dict[tuple[Link, bytes], Vote] = {}
        for _, link in sorted(self.justified_by.items(), key=lambda kv: -kv[0].ck)[:limit]:
            for voter, vote in self.links.get(link, {}).items():
                out[(link, voter)] = vote
        for voter, votes in self.by_voter.items():
            if voter not in self.ignored and votes:
                latest = max(votes, key=lambda v: v.target.ck)
                out[(latest.link, voter)] = latest
        return list(out.values())

    def ignored_for(self, target: Checkpoint) -> frozenset[bytes]:
        """The convicted voters whose votes for `target`'s block no longer count."""
        return frozenset(v for v, h in self.ignored.items() if target.height >= h)

    def ignore(self, voter: bytes, from_height: int = 0) -> None:
        """Evidence against `voter` is on chain (recorded in block `from_height`): its votes for that
        block and above count no more, and those already counted are dropped from their links."""
        self.ignored[voter] = min(self.ignored.get(voter, from_height), from_height)
        for (_, target), voters in self.links.items():
            if target.height >= self.ignored[voter]:
                voters.pop(voter, None)

    def _quorate(self, link: Link) -> bool:
        """The link has votes from more than 2/3 of the set of its target block's epoch."""
        voters = self.links.get(link, {})
        try:
            return len(voters) >= self.quorum_for(link[1])
        except AitbcError:
            return False

    def _justify(self, new: list[tuple[Checkpoint, Link | None]]) -> None:
        """Mark checkpoints justified (each with the link that did it, when there is one), then
        every link that reached q earlier but waited for its source to be justified here (votes
        arrive in any order), and so on up."""
        while new:
            cp, by = new.pop()
            if cp in self.justified:
                continue
            self.justified.add(cp)
            self._newly_justified = True
            if by is not None:
                self.justified_by[cp] = by
            new.extend((k[1], k) for k in self.links if k[0] == cp and k[1] not in self.justified and self._quorate(k))

    def _settle(self, link: Link) -> Checkpoint | None:
        if not self._quorate(link):
            return None
        source, target = link
        if source in self.justified:
            self._justify([(target, link)])
        if target.ck != source.ck + 1:  # the tally checked that source is an ancestor of target
            return None
        assert self.final is not None
        if self.is_ancestor(source, self.final):
            return None  # already final
        if not self.is_ancestor(self.final, source):
            # only possible with more than f byzantine authorities: never leave the final chain
            raise FailedPrecondition(f"certificate for block {source.height} conflicts with final block "
                                     f"{self.final.height}: more than f authorities signed evidence")
        # a certificate proves its source justified (its honest voters vote from justified sources)
        self._justify([(source, None), (source.at(COMMIT), None), (target, link)])
        self.final = source.at(COMMIT)
        self.certificate = make_certificate(self.links[link].values())
        self.prune()  # at once: a follower counts a batch of certificates, each vote compared with its voter's others
        return self.final

    def add_certificate(self, cert: Certificate, signers: Signers | None = None) -> Checkpoint | None:
        """A certificate from a peer (catch-up, restart): verified, then its votes are counted.
        `signers`: its signatures recovered beforehand (verify_vote)."""
        verify_certificate(cert, self.genesis, genesis_hash=self.genesis_hash, ignored=self.ignored_for(cert.target),
                           authorities=self.authority_set(cert.target), signers=signers)
        assert self.final is not None
        source_known = self._height(cert.source.hash) == cert.source.height
        if source_known and self.is_ancestor(cert.source, self.final):
            return None  # already final here
        target = None if cert.target.hash == self.genesis_hash else self._lookup(cert.target.hash)
        if not source_known or target is None or target[0] != cert.target.height:
            raise NotFound(f"certificate for an unknown block {cert.source.height} {cert.source.hash.hex()[:16]}")
        if cert.source.phase == COMMIT and target[1] != cert.source.hash:
            raise InvalidArgument("certificate link is not from a block to its child")
        for vote in cert.votes(self.genesis, self.genesis_hash):
            r = self.add(vote, signature_checked=True)  # verify_certificate above checked every one
            if r.finalized is not None:
                # q of its votes made the block final: any more (a certificate may hold every
                # authority's vote) are stale now, and counting them would refuse a certificate whose
                # block this tally has just made final, which the node would then never store
                return r.finalized
        return None
