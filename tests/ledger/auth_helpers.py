"""A multi-authority chain on memory whose blocks are built by whoever the set of the block's epoch
says is in turn (authority set changes, docs/ledger.md "Authority set changes")."""

from __future__ import annotations

from aitbc import crypto
from aitbc.errors import AitbcError
from aitbc.ledger.block import Block
from aitbc.ledger.chain import Chain
from aitbc.ledger.genesis import Genesis
from aitbc.ledger.store import MemoryStore
from aitbc.ledger.tx import ACTION_ADD, ACTION_REMOVE, decode_tx, make_authority_vote

from .helpers import AUTH, key, next_block_refusal

NEW = key(5)  # not a genesis authority: voted in by the tests
OTHER = key(6)


def aid(k: crypto.PrivateKey) -> bytes:
    return crypto.sha256(k.pubkey)[:20]


class SetRunner:
    """`block(*raws)` builds the next block with the key in turn under the set of its epoch."""

    def __init__(self, g: Genesis, keys: list[crypto.PrivateKey] | None = None) -> None:
        self.g = g
        self.keys = {aid(k): k for k in (keys if keys is not None else [*AUTH, NEW, OTHER])}
        self.chain = Chain(MemoryStore(), g)
        self.slot = g.genesis_time_ms // g.block_time_ms
        self.blocks: list[Block] = []

    @property
    def height(self) -> int:
        return self.chain.head.height

    def nonce(self, k: crypto.PrivateKey) -> int:
        return self.chain.account(aid(k))[1]

    def set_at(self, height: int) -> tuple[bytes, ...] | None:
        return self.chain.authorities_at(height)

    def block(self, *raws: bytes) -> Block:
        ids = self.chain.authorities_at(self.height + 1)
        assert ids is not None
        self.slot += 1
        while ids[self.slot % len(ids)] not in self.keys:
            self.slot += 1
        txs = [decode_tx(r) for r in raws]
        block, dropped = self.chain.build_block(self.keys[ids[self.slot % len(ids)]], self.slot,
                                                self.slot * self.g.block_time_ms, txs)
        assert not dropped, [self.why(t.raw) for t in dropped]
        self.blocks.append(block)
        return block

    def until_height(self, height: int) -> None:
        while self.height < height:
            self.block()

    def vote(self, voter: crypto.PrivateKey, action: int, subject: crypto.PrivateKey) -> bytes:
        return make_authority_vote(voter, self.g.ref, self.nonce(voter), action, subject.address)

    def add(self, voter: crypto.PrivateKey, subject: crypto.PrivateKey) -> bytes:
        return self.vote(voter, ACTION_ADD, subject)

    def remove(self, voter: crypto.PrivateKey, subject: crypto.PrivateKey) -> bytes:
        return self.vote(voter, ACTION_REMOVE, subject)

    def why(self, raw: bytes) -> str:
        err = next_block_refusal(self.chain, self.g, raw)
        return err.message if err is not None else "applies"

    def refused(self, raw: bytes) -> AitbcError:
        err = next_block_refusal(self.chain, self.g, raw)
        if err is None:
            raise AssertionError("the tx applies")
        return err
