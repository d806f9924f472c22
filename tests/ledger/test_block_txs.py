"""A follower re-verifies every transaction inside a block it imports, not only the header: a block
signed by a real authority in its slot, with a correct state root, but carrying a transaction no
node would accept from a client, is refused and changes nothing (issue 21)."""

from __future__ import annotations

import pytest

from aitbc import crypto
from aitbc.errors import InvalidArgument
from aitbc.ledger import state
from aitbc.ledger.block import Block
from aitbc.ledger.chain import Chain
from aitbc.ledger.store import MemoryStore
from aitbc.ledger.tx import Tx, decode_tx, encode_mint_body, make_mint, make_transfer, sign_body
from aitbc.receipts import ATTEST_DOMAIN, PROVIDER_DOMAIN, SignedReceipt

from .helpers import ALICE, ATTESTER, AUTH, BOB, OTHER_REF, PROVIDER, REF, genesis, key, receipt


def _signed_by_someone_else() -> bytes:
    """A MINT naming ALICE as its sender, signed by BOB."""
    return sign_body(encode_mint_body(REF, ALICE.pubkey, 0, receipt(8)), BOB)


def _receipt_signed_by_the_wrong_provider() -> bytes:
    body = receipt(5).body  # names PROVIDER; BOB signs it, and the attester signs what it was given
    h = body.hash()
    forged = SignedReceipt(body, BOB.sign(crypto.domain_digest(PROVIDER_DOMAIN, h)), ATTESTER.address,
                           ATTESTER.sign(crypto.domain_digest(ATTEST_DOMAIN, h)))
    return make_mint(ALICE, REF, 0, forged)


BAD = {
    "a MINT attested by a key outside the genesis attester set":
        (lambda: make_mint(ALICE, REF, 0, receipt(1, attester=key(99))), "attester not authorized"),
    "a MINT whose receipt is for another chain":
        (lambda: make_mint(ALICE, REF, 0, receipt(2, chain_id="another-chain")), "receipt is for 'another-chain'"),
    "a transaction signed for another chain":
        (lambda: make_mint(ALICE, OTHER_REF, 0, receipt(3)), "tx is for 'other-chain'"),
    "a transaction signed for another genesis with the same chain id":
        (lambda: make_mint(ALICE, genesis(1, genesis_time_ms=1).ref, 0, receipt(9)), "wrong genesis"),
    "a MINT that mints nothing":
        (lambda: make_mint(ALICE, REF, 0, receipt(4, units=0)), "it mints nothing"),
    "a MINT whose receipt was not signed by its provider":
        (_receipt_signed_by_the_wrong_provider, "bad receipt"),
    "a transaction whose signature is not its sender's": (_signed_by_someone_else, ""),
}


@pytest.mark.parametrize("bad", list(BAD), ids=list(BAD))
def test_a_follower_refuses_a_block_with_a_bad_transaction_inside(bad: str) -> None:
    make, needle = BAD[bad]
    g = genesis(1)
    proposer, follower = Chain(MemoryStore(), g), Chain(MemoryStore(), g)
    tx = decode_tx(make())  # well formed: only the checks of its content can refuse it
    # a careless (or byzantine) proposer that skipped the checks: the block is well formed and signed
    block, dropped = proposer.build_block(AUTH[0], 1, g.block_time_ms + 1, [tx], verified={tx.hash})
    assert not dropped and block.header.tx_count == 1
    with pytest.raises(InvalidArgument, match=f"invalid block 1: tx 0 .*{needle}"):
        follower.add_block(block, g.block_time_ms + 1)
    assert follower.head.height == 0


def test_the_same_block_with_good_transactions_is_accepted() -> None:
    g = genesis(1)
    proposer, follower = Chain(MemoryStore(), g), Chain(MemoryStore(), g)
    tx = decode_tx(make_mint(ALICE, REF, 0, receipt(7)))
    block, _ = proposer.build_block(AUTH[0], 1, g.block_time_ms + 1, [tx])
    follower.add_block(block, g.block_time_ms + 1)
    assert follower.head.height == 1 and follower.head.hash == proposer.head.hash
    assert ATTESTER.address in g.attesters


def _forged_on_a_lying_state(proposer: Chain, sender: crypto.PrivateKey, nonce: int, tx: Tx) -> Block:
    """A byzantine proposer whose own state says `sender` is at `nonce`: it executes and signs a block
    carrying `tx` (in its slot, with the state root of its own execution)."""
    acct = state.acct_key(crypto.validate_address(sender.address))
    balance, _ = state.read_account(proposer.store.get, crypto.validate_address(sender.address))
    proposer.store.commit({acct: state.encode_account(balance, nonce)})
    slot = proposer.head.slot + 1
    block, dropped = proposer.build_block(AUTH[0], slot, slot * proposer.genesis.block_time_ms + 1, [tx])
    assert not dropped and block.header.tx_count == 1
    return block


@pytest.mark.parametrize("case", ["a transfer reusing a spent nonce (a replay)", "a transfer behind a nonce gap"])
def test_a_follower_refuses_a_block_with_a_transfer_out_of_nonce_order(case: str) -> None:
    g = genesis(1)
    proposer, follower = Chain(MemoryStore(), g), Chain(MemoryStore(), g)
    funded, _ = proposer.build_block(AUTH[0], 1, g.block_time_ms + 1,
                                     [decode_tx(make_mint(ALICE, REF, 0, receipt(11, units=100, price=10)))])
    spent, _ = proposer.build_block(AUTH[0], 2, 2 * g.block_time_ms + 1,
                                    [decode_tx(make_transfer(PROVIDER, REF, 0, BOB.address, 100))])
    for b in (funded, spent):
        follower.add_block(b, b.header.timestamp_ms)
    assert follower.account(crypto.validate_address(PROVIDER.address)) == (900, 1)
    if case.startswith("a transfer reusing"):  # signed by PROVIDER with nonce 0 again, to take more
        block = _forged_on_a_lying_state(proposer, PROVIDER, 0, decode_tx(make_transfer(PROVIDER, REF, 0, BOB.address,
                                                                                        500)))
        needle = "nonce too low: account nonce is 1, tx nonce 0"
    else:  # nonce 2 with 1 never used: it must wait for nonce 1, not execute ahead of it
        block = _forged_on_a_lying_state(proposer, PROVIDER, 2, decode_tx(make_transfer(PROVIDER, REF, 2, BOB.address,
                                                                                        500)))
        needle = "nonce gap: account nonce is 1, tx nonce 2"
    with pytest.raises(InvalidArgument, match=f"^invalid block 3: tx 0 .*: {needle}$"):
        follower.add_block(block, block.header.timestamp_ms)
    assert follower.head.height == 2
    assert follower.account(crypto.validate_address(PROVIDER.address)) == (900, 1)
    assert follower.account(crypto.validate_address(BOB.address)) == (100, 0)
