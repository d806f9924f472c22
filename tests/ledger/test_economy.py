"""The economy's pure transitions (docs/ledger.md steps 8-15, docs/economy.md): every kind, every
refusal, the supply invariant after each block; genesis version 3 and what a version 2 chain keeps."""

from __future__ import annotations

import dataclasses

import pytest

from aitbc import crypto
from aitbc.errors import AitbcError, FailedPrecondition, InvalidArgument
from aitbc.ledger import state
from aitbc.ledger.genesis import Genesis, make_genesis
from aitbc.ledger.tx import (
    KIND_SETTLE,
    KIND_SLASH,
    decode_tx,
    make_escrow_deposit,
    make_escrow_reclaim,
    make_escrow_withdraw,
    make_mint,
    make_settle,
    make_slash,
    make_stake,
    make_transfer,
    make_unstake,
    make_withdraw,
)

from .economy_helpers import CHEATER, CLIENT, HONEST, Runner, quote_for, text_receipt
from .helpers import ALICE, ATTESTER, AUTH, BOB, PROVIDER, genesis, key

G = genesis(unbonding_blocks=3, escrow_timeout_blocks=2, slash_ppm=500_000, slash_reward_ppm=500_000)


def funded(g: Genesis = G, amount: int = 5000, who: crypto.PrivateKey = PROVIDER) -> Runner:
    """A chain where `who` holds `amount` (one MINT of a tokens receipt at price 100: 50 units)."""
    run = Runner(g, AUTH[0])
    run.block(make_mint(ALICE, g.ref, run.nonce(ALICE), text_receipt(900 + amount, provider=who, price=amount // 50)))
    assert run.balance(who) == amount
    return run


def refuse(run: Runner, raw: bytes, exc: type[AitbcError], message: str) -> None:
    err = run.refused(raw)
    assert isinstance(err, exc) and err.message.startswith(message), err.message


# ---- genesis version 3 ------------------------------------------------------------------------------

def test_genesis_v3_has_the_five_parameters_with_their_defaults():
    g = make_genesis("econ", [AUTH[0].address], [ATTESTER.address])
    d = g.to_dict()
    assert d["version"] == 3 and g.has_economy
    assert {k: d[k] for k in ("min_stake", "unbonding_blocks", "slash_ppm", "slash_reward_ppm",
                              "escrow_timeout_blocks")} == {"min_stake": 0, "unbonding_blocks": 100,
                                                            "slash_ppm": 500_000, "slash_reward_ppm": 500_000,
                                                            "escrow_timeout_blocks": 600}
    assert Genesis.from_dict(d) == g and Genesis.from_dict(d).hash() == g.hash()


@pytest.mark.parametrize("name,bad", [("min_stake", -1), ("min_stake", 2**53), ("unbonding_blocks", 0),
                                      ("unbonding_blocks", 2**32), ("slash_ppm", 1_000_001),
                                      ("slash_reward_ppm", -1), ("escrow_timeout_blocks", 0),
                                      ("slash_ppm", True), ("min_stake", 1.0)])
def test_economy_parameters_out_of_bounds_are_refused(name, bad):
    d = dict(G.to_dict(), **{name: bad})
    with pytest.raises(InvalidArgument, match=f"^genesis {name} must be an integer in"):
        Genesis.from_dict(d)


def test_version_2_genesis_keeps_its_bytes_and_refuses_economy_fields():
    g2 = genesis(version=2)
    d = g2.to_dict()
    assert d["version"] == 2 and "min_stake" not in d and not g2.has_economy
    assert Genesis.from_dict(d).canonical_bytes() == g2.canonical_bytes()
    with pytest.raises(InvalidArgument, match=r"^genesis fields: missing \[\], unknown \['min_stake'\]"):
        Genesis.from_dict(dict(d, min_stake=0))
    with pytest.raises(InvalidArgument, match="^genesis fields: missing"):
        Genesis.from_dict({k: v for k, v in G.to_dict().items() if k != "slash_ppm"})
    with pytest.raises(InvalidArgument, match="^genesis version 2 has no min_stake"):
        dataclasses.replace(g2, min_stake=5).validate()


def test_version_2_chain_refuses_every_economy_kind_and_keeps_its_mint_writes():
    g2 = genesis(version=2)
    run = funded(g2)
    assert run.chain.store.get(state.SUPPLY) is None  # MINT writes exactly what it wrote before
    r = text_receipt(5)
    for raw in (make_stake(PROVIDER, g2.ref, 0, 1), make_unstake(PROVIDER, g2.ref, 0, 1),
                make_withdraw(PROVIDER, g2.ref, 0), make_escrow_deposit(PROVIDER, g2.ref, 0, ATTESTER.address, 1),
                make_escrow_withdraw(PROVIDER, g2.ref, 0, ATTESTER.address, 1),
                make_escrow_reclaim(PROVIDER, g2.ref, 0, ATTESTER.address),
                make_settle(ATTESTER, g2.ref, 0, r, quote_for(g2, r)),
                make_slash(ATTESTER, g2.ref, 0, r, [text_receipt(6, provider=BOB, artifact="ee" * 32)])):
        refuse(run, raw, FailedPrecondition, "economy disabled: this chain's genesis is version 2")


# ---- stake --------------------------------------------------------------------------------------------

def test_stake_unstake_withdraw_after_unbonding():
    run = funded()
    run.block(make_stake(PROVIDER, G.ref, 0, 3000))
    assert run.balance(PROVIDER) == 2000 and run.stake(PROVIDER) == (3000, 0, 0)
    run.check_invariant()
    run.block(make_unstake(PROVIDER, G.ref, 1, 1000))
    h = run.height
    assert run.stake(PROVIDER) == (2000, 1000, h + 3)
    refuse(run, make_withdraw(PROVIDER, G.ref, 2), FailedPrecondition,
           f"still unbonding: 1000 unlock at height {h + 3} (this block is {h + 1})")
    run.block()
    run.block(make_unstake(PROVIDER, G.ref, 2, 500))  # one pool: the unlock height moves with it
    assert run.stake(PROVIDER) == (1500, 1500, run.height + 3)
    run.block()
    refuse(run, make_withdraw(PROVIDER, G.ref, 3), FailedPrecondition, "still unbonding: 1500")
    run.block()
    run.block(make_withdraw(PROVIDER, G.ref, 3))  # exactly at the unlock height
    assert run.stake(PROVIDER) == (1500, 0, 0) and run.balance(PROVIDER) == 3500
    assert run.supply() == state.Supply(minted=5000, staked=1500)
    run.check_invariant()
    refuse(run, make_withdraw(PROVIDER, G.ref, 4), FailedPrecondition, "nothing to withdraw: no tokens are unbonding")


def test_stake_refusals():
    run = funded()
    refuse(run, make_stake(PROVIDER, G.ref, 0, 5001), FailedPrecondition, "insufficient balance: have 5000, need 5001")
    run.block(make_stake(PROVIDER, G.ref, 0, 5000))  # all of it
    refuse(run, make_unstake(PROVIDER, G.ref, 1, 5001), FailedPrecondition, "unstake too large: staked 5000, asked 5001")
    refuse(run, make_unstake(BOB, G.ref, 0, 1), FailedPrecondition, "unstake too large: staked 0, asked 1")
    with pytest.raises(InvalidArgument, match="^malformed transaction: amount must be positive"):
        decode_tx(decode_tx(make_stake(PROVIDER, G.ref, 1, 1)).body[:-8] + bytes(8) + bytes(64))


# ---- escrow -------------------------------------------------------------------------------------------

def test_escrow_deposit_withdraw_reclaim():
    run = funded(who=CLIENT)
    run.block(make_escrow_deposit(CLIENT, G.ref, 0, ATTESTER.address, 1000))
    assert run.escrow(CLIENT, ATTESTER) == (1000, 0, 0) and run.balance(CLIENT) == 4000
    run.block(make_escrow_withdraw(CLIENT, G.ref, 1, ATTESTER.address, 400))
    h = run.height
    assert run.escrow(CLIENT, ATTESTER) == (600, 400, h + 2)
    refuse(run, make_escrow_reclaim(CLIENT, G.ref, 2, ATTESTER.address), FailedPrecondition,
           f"escrow still locked: 400 unlock at height {h + 2} (this block is {h + 1})")
    refuse(run, make_escrow_withdraw(CLIENT, G.ref, 2, ATTESTER.address, 601), FailedPrecondition,
           "escrow withdraw too large: available 600, asked 601")
    run.block()
    run.block(make_escrow_reclaim(CLIENT, G.ref, 2, ATTESTER.address))
    assert run.escrow(CLIENT, ATTESTER) == (600, 0, 0) and run.balance(CLIENT) == 4400
    assert run.supply() == state.Supply(minted=5000, escrowed=600)
    run.check_invariant()
    refuse(run, make_escrow_reclaim(CLIENT, G.ref, 3, ATTESTER.address), FailedPrecondition,
           f"nothing to reclaim: no escrow for {ATTESTER.address} is unlocking")
    refuse(run, make_escrow_deposit(CLIENT, G.ref, 3, ATTESTER.address, 4401), FailedPrecondition,
           "insufficient balance: have 4400, need 4401")
    stranger = key(77)
    refuse(run, make_escrow_deposit(CLIENT, G.ref, 3, stranger.address, 1), AitbcError,
           f"attester not authorized: {stranger.address} is not in the genesis attester set")


# ---- settle -------------------------------------------------------------------------------------------

def _escrowed(amount: int = 1000) -> Runner:
    run = funded(who=CLIENT)
    run.block(make_escrow_deposit(CLIENT, G.ref, 0, ATTESTER.address, amount))
    return run


def test_settle_mints_and_moves_exactly_the_quote_total():
    run = _escrowed()
    r = text_receipt(1, price=10)  # mints 50 x 10
    q = quote_for(G, r, price=6, fee=20)  # 50 x 6 + 20
    [tx] = run.block(make_settle(ATTESTER, G.ref, 0, r, q))
    assert tx.kind == KIND_SETTLE and tx.quote == q
    assert run.balance(PROVIDER) == 500 + 320
    assert run.escrow(CLIENT, ATTESTER) == (680, 0, 0)
    assert run.chain.receipt_minted(r.receipt_hash)[2] == 500
    assert state.decode_once(run.chain.store.get(state.quote_key(q.hash()))) == (run.height, tx.hash)
    assert run.supply() == state.Supply(minted=5500, escrowed=680)
    run.check_invariant()
    refuse(run, make_settle(ATTESTER, G.ref, 1, text_receipt(2), q), AitbcError,
           f"quote already settled: {q.hash().hex()} in block {run.height}")
    refuse(run, make_settle(ATTESTER, G.ref, 1, r, quote_for(G, r, qid=2)), AitbcError,
           f"receipt already minted: {r.receipt_hash.hex()}")
    refuse(run, make_mint(ALICE, G.ref, 1, r), AitbcError, "receipt already minted")


def test_settle_takes_available_first_then_unlocking_until_its_unlock_height():
    run = _escrowed(1000)
    run.block(make_escrow_withdraw(CLIENT, G.ref, 1, ATTESTER.address, 900))  # 100 available, 900 unlocking
    unlock = run.height + 2
    r = text_receipt(1)
    run.block(make_settle(ATTESTER, G.ref, 0, r, quote_for(G, r, price=5)))  # 250: 100 + 150 of the unlocking
    assert run.escrow(CLIENT, ATTESTER) == (0, 750, unlock)
    run.check_invariant()
    run.block()  # now the unlock height: the client may reclaim, the attester may no longer settle from it
    r2 = text_receipt(2)
    refuse(run, make_settle(ATTESTER, G.ref, 1, r2, quote_for(G, r2, qid=2, price=1)), FailedPrecondition,
           f"escrow too low: {CLIENT.address} has 0 available and 0 still locked for {ATTESTER.address}, the quote "
           "needs 50 (aitbc escrow deposit 50)")
    run.block(make_escrow_reclaim(CLIENT, G.ref, 2, ATTESTER.address))
    assert run.escrow(CLIENT, ATTESTER) == (0, 0, 0) and run.balance(CLIENT) == 4000 + 750
    run.check_invariant()


def test_settle_refusals():
    run = _escrowed(100)
    r = text_receipt(1)

    def settle(q, *, sender=ATTESTER, receipt=r):  # type: ignore[no-untyped-def]
        return make_settle(sender, G.ref, run.nonce(sender), receipt, q)

    refuse(run, settle(quote_for(G, r), sender=ALICE), AitbcError,
           f"settle not by the attester: sender {ALICE.address} is not the receipt's attester {ATTESTER.address}")
    refuse(run, settle(quote_for(G, r, chain_id="other")), InvalidArgument, "wrong chain id: quote is for 'other'")
    refuse(run, settle(quote_for(G, r, genesis_hash="11" * 32)), InvalidArgument,
           f"wrong genesis: quote is for genesis {'11' * 32}")
    refuse(run, settle(quote_for(G, r, attester=BOB.address)), InvalidArgument,
           f"quote mismatch: attester is '{BOB.address}' in the quote, '{ATTESTER.address}' in the receipt")
    for name, value in (("client", "client-2"), ("model", "other"), ("prompt_hash", "ef" * 32),
                        ("unit_type", "tile_steps")):
        refuse(run, settle(quote_for(G, r, **{name: value})), InvalidArgument,
               f"quote mismatch: {name} is {value!r} in the quote")
    refuse(run, settle(quote_for(G, r, units=49, price=1)), InvalidArgument,
           "quote mismatch: the receipt has 50 units, the quote covers 49")
    refuse(run, settle(quote_for(G, r, price=2, fee=1)), FailedPrecondition,
           f"escrow too low: {CLIENT.address} has 100 available and 0 still locked")
    refuse(run, settle(quote_for(G, r, client_address=BOB.address)), FailedPrecondition,
           f"escrow too low: {BOB.address} has 0 available")
    run.block(settle(quote_for(G, r, units=60, price=1)))  # fewer units than quoted: the quote's total
    assert run.escrow(CLIENT, ATTESTER).available == 40
    raw = make_settle(ATTESTER, G.ref, 1, text_receipt(2), quote_for(G, text_receipt(2), qid=3))
    body = decode_tx(raw).body
    qlen = int.from_bytes(body[-len(quote_for(G, text_receipt(2), qid=3).canonical_bytes()) - 4:][:4], "big")
    with pytest.raises(InvalidArgument, match="^bad quote: "):
        decode_tx(body[:-qlen] + body[-qlen:].replace(b'"total":100', b'"total":101') + bytes(64))


# ---- slash --------------------------------------------------------------------------------------------

def _staked(stake: int = 4000, unbond: int = 1000) -> Runner:
    run = funded(who=CHEATER)
    run.block(make_stake(CHEATER, G.ref, 0, stake))
    if unbond:
        run.block(make_unstake(CHEATER, G.ref, 1, unbond))
    return run


def verdict(n_honest: int, *, artifact: str = "ee" * 32) -> tuple:
    cheater = text_receipt(500, provider=CHEATER)
    honest = [text_receipt(501 + i, provider=HONEST[i], artifact=artifact) for i in range(n_honest)]
    return cheater, honest


def test_slash_cuts_staked_then_unbonding_pays_the_honest_and_burns_the_rest():
    run = _staked(4000, 3500)  # staked 500, unbonding 3500: the cut (2000) takes 500, then 1500
    cheater, honest = verdict(3)
    [tx] = run.block(make_slash(ATTESTER, G.ref, 0, cheater, honest))
    assert tx.kind == KIND_SLASH
    cut, each, burned = 2000, 1000 // 3, 2000 - 3 * (1000 // 3)
    assert state.slash_split(state.Stake(500, 3500, 0), G, 3) == (cut, each, burned)
    assert run.stake(CHEATER).staked == 0 and run.stake(CHEATER).unbonding == 2000
    assert [run.balance(h) for h in HONEST[:3]] == [each] * 3
    assert run.supply() == state.Supply(minted=5000, burned=burned + 0, staked=0, unbonding=2000)
    assert state.decode_slashed(run.chain.store.get(state.slash_key(cheater.receipt_hash))) == (run.height, tx.hash,
                                                                                                 cut)
    run.check_invariant()
    refuse(run, make_slash(ATTESTER, G.ref, 1, cheater, honest[:1]), AitbcError,
           f"verdict already recorded: the receipt {cheater.receipt_hash.hex()} was slashed in block {run.height}")


def test_slash_of_a_miner_without_stake_still_records_the_verdict():
    run = funded()
    cheater, honest = verdict(1)
    run.block(make_slash(ATTESTER, G.ref, 0, cheater, honest))
    assert run.chain.store.get(state.slash_key(cheater.receipt_hash)) is not None
    assert run.supply() == state.Supply(minted=5000) and run.balance(HONEST[0]) == 0
    run.check_invariant()


def test_slash_parameters_decide_the_split():
    g = genesis(slash_ppm=1_000_000, slash_reward_ppm=0)
    assert state.slash_split(state.Stake(10, 5, 0), g, 2) == (15, 0, 15)
    g = genesis(slash_ppm=0)
    assert state.slash_split(state.Stake(10, 5, 0), g, 2) == (0, 0, 0)
    g = genesis(slash_ppm=1_000_000, slash_reward_ppm=1_000_000)
    assert state.slash_split(state.Stake(2**63, 2**63 - 1, 0), g, 15) == (2**64 - 1, (2**64 - 1) // 15, 0)


def test_slash_refusals():
    run = _staked()
    cheater, honest = verdict(2)
    refuse(run, make_slash(ALICE, G.ref, 0, cheater, honest), AitbcError,
           f"slash not by an attester: {ALICE.address} is not in the genesis attester set")
    refuse(run, make_slash(ATTESTER, G.ref, 0, cheater, [honest[0], honest[0]]), InvalidArgument,
           f"bad verdict: receipt 2 is by {HONEST[0].address}, already in the verdict")
    refuse(run, make_slash(ATTESTER, G.ref, 0, cheater, [text_receipt(9, provider=CHEATER, artifact="ee" * 32)]),
           InvalidArgument, f"bad verdict: receipt 1 is by {CHEATER.address}")
    refuse(run, make_slash(ATTESTER, G.ref, 0, cheater, verdict(1, artifact="cd" * 32)[1]), InvalidArgument,
           "bad verdict: receipt 1 has the cheater's artifact_sha256 and units (it agrees with it)")
    for name, change in (("model", {"model": "other"}), ("prompt_hash", {"prompt_hash": "ef" * 32})):
        other = text_receipt(9, provider=HONEST[5], artifact="ee" * 32, **change)
        refuse(run, make_slash(ATTESTER, G.ref, 0, cheater, [other]), InvalidArgument,
               f"bad verdict: receipt 1 has another {name} than the cheater's receipt")
    outsider = text_receipt(9, provider=HONEST[5], artifact="ee" * 32, attester=key(78))
    refuse(run, make_slash(ATTESTER, G.ref, 0, cheater, [outsider]), AitbcError,
           f"attester not authorized: {key(78).address} is not in the genesis attester set")
    refuse(run, make_slash(ATTESTER, G.ref, 0, cheater, [text_receipt(9, provider=HONEST[5], artifact="ee" * 32,
                                                                      chain_id="other")]),
           InvalidArgument, "wrong chain id: receipt is for 'other'")
    forged = dataclasses.replace(honest[0], provider_signature=honest[1].provider_signature)
    refuse(run, make_slash(ATTESTER, G.ref, 0, cheater, [forged]), InvalidArgument, "bad receipt: ")
    with pytest.raises(InvalidArgument, match="^a SLASH carries the cheater's receipt and 1-15 honest ones"):
        make_slash(ATTESTER, G.ref, 0, cheater, [])
    assert decode_tx(make_slash(ATTESTER, G.ref, 0, *verdict(15))).verdict[15].body.provider == HONEST[14].address


# ---- supply -------------------------------------------------------------------------------------------

def test_supply_counts_transfers_as_nothing_and_overflow_is_refused():
    run = funded()
    run.block(make_transfer(PROVIDER, G.ref, 0, BOB.address, 10))
    assert run.supply() == state.Supply(minted=5000)
    g = genesis(max_price_per_unit=2**53 - 1, max_mint_per_receipt=2**64 - 1)
    big = Runner(g, AUTH[0])
    from .helpers import receipt

    big.block(make_mint(ALICE, g.ref, 0, receipt(1, units=2**32, price=2**32)))
    assert big.supply().minted == 2**64 - 1
    refuse(big, make_mint(ALICE, g.ref, 1, receipt(2, units=1, price=1, provider=BOB)), FailedPrecondition,
           f"supply overflow: {2**64 - 1} minted cannot grow by 1 (2^64-1 at most)")


def test_a_free_receipt_settles_its_priority_fee_and_mints_nothing():
    """A job at price 0 with a priority fee: the SETTLE mints 0 (a MINT of it would be refused) and
    still moves the quote's total to the provider."""
    run = _escrowed()
    r = text_receipt(1, price=0)
    q = quote_for(G, r, price=0, fee=30)
    refuse(run, make_mint(ATTESTER, G.ref, 0, r), InvalidArgument, "bad receipt: it mints nothing")
    [tx] = run.block(make_settle(ATTESTER, G.ref, 0, r, q))
    assert tx.kind == KIND_SETTLE and run.balance(PROVIDER) == 30
    assert run.chain.receipt_minted(r.receipt_hash)[2] == 0  # settled once: no MINT of it can follow
    run.check_invariant()


def test_the_same_outputs_with_more_units_are_a_verdict():
    """A miner that returned the right outputs but counted more tokens than it ran is convicted by
    runs with those outputs and the true count."""
    run = _staked()
    cheater = text_receipt(500, provider=CHEATER, generated=400, artifact="ee" * 32)  # 410 units claimed
    honest = [text_receipt(501 + i, provider=HONEST[i], artifact="ee" * 32) for i in range(2)]  # 50 units each
    [tx] = run.block(make_slash(ATTESTER, G.ref, 0, cheater, honest))
    assert tx.kind == KIND_SLASH
    run.check_invariant()
