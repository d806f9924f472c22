"""The explorer's index keeps what the chain paid each provider (MINT, SETTLE fees, SLASH cuts and
rewards) and bounded time series, on real blocks built and validated by the ledger's own code
(real signatures, a version 3 genesis) in a real LMDB index. The amounts are checked against the
chain's state (what the ledger itself recorded), not against the index's formulas; a reorg leaves
the index byte for byte as if it had only seen the new branch; a reopened index keeps everything."""

from __future__ import annotations

from pathlib import Path

import pytest

from aitbc import crypto
from aitbc.explorer.index import HOUR, MINUTE, ExplorerIndex, IndexReset
from aitbc.ledger import state
from aitbc.ledger.tx import (
    make_escrow_deposit,
    make_mint,
    make_settle,
    make_slash,
    make_stake,
    make_transfer,
    make_unstake,
)
from tests.ledger.economy_helpers import CHEATER, CLIENT, HONEST, Runner, quote_for, text_receipt
from tests.ledger.helpers import ALICE, ATTESTER, AUTH, BOB, PROVIDER, genesis

G = genesis(unbonding_blocks=3, escrow_timeout_blocks=2, slash_ppm=500_000, slash_reward_ppm=500_000,
            genesis_time_ms=1_700_000_000_000)


def aid(k: crypto.PrivateKey) -> bytes:
    return crypto.validate_address(k.address)


def blocks_of(run: Runner, start: int = 1) -> list[bytes]:
    return [run.chain.block_raw_at(h) for h in range(start, run.height + 1)]  # type: ignore[misc]


def paid_by_chain(run: Runner, provider: crypto.PrivateKey) -> tuple[int, int, int]:
    """(receipts, minted, fees) for `provider` as the ledger recorded them: the amount in each
    v1:rcpt: record of a receipt it provided, and the fee of each SETTLE in its blocks."""
    receipts = minted = fees = 0
    for h in range(1, run.height + 1):
        block = run.chain.block_at(h)
        assert block is not None
        for tx in block.txs:
            if tx.receipt is not None and tx.receipt.body.provider == provider.address:
                receipts += 1
                minted += state.decode_minted(run.chain.store.get(state.rcpt_key(tx.receipt.receipt_hash)))[2]
                fees += tx.quote.total if tx.quote is not None else 0
    return receipts, minted, fees


def dump(index: ExplorerIndex) -> dict[bytes, bytes]:
    with index.env.begin() as txn:
        return {bytes(k): bytes(v) for k, v in txn.cursor()}


def economy_chain() -> tuple[Runner, int]:
    """Mints, a paid job (SETTLE), stake, unstake and a SLASH with two honest runs; returns the
    runner and the height a fork will replace from."""
    run = Runner(G, AUTH[0])
    run.block(make_mint(ALICE, G.ref, 0, text_receipt(1, provider=PROVIDER, price=7)),
              make_mint(ALICE, G.ref, 1, text_receipt(2, provider=CLIENT, price=100)),
              make_mint(ALICE, G.ref, 2, text_receipt(3, provider=CHEATER, price=100)))
    run.block(make_escrow_deposit(CLIENT, G.ref, 0, ATTESTER.address, 3000),
              make_stake(CHEATER, G.ref, 0, 4000))
    fork_at = run.height + 1
    paid = text_receipt(4, provider=PROVIDER, price=9)
    run.block(make_settle(ATTESTER, G.ref, 0, paid, quote_for(G, paid, price=5, fee=11)),
              make_unstake(CHEATER, G.ref, 1, 1000), make_transfer(PROVIDER, G.ref, 0, BOB.address, 5))
    cheater = text_receipt(500, provider=CHEATER)
    honest = [text_receipt(501 + i, provider=HONEST[i], artifact="ee" * 32) for i in range(2)]
    run.block(make_slash(ATTESTER, G.ref, 1, cheater, honest))
    return run, fork_at


def test_earnings_are_what_the_chain_paid(tmp_path: Path) -> None:
    run, _ = economy_chain()
    index = ExplorerIndex(tmp_path / "index")
    assert index.add_blocks(blocks_of(run), G) == run.height
    e = index.earnings(aid(PROVIDER))
    assert e is not None
    assert (e.receipts, e.minted, e.fees) == paid_by_chain(run, PROVIDER) == (2, 50 * 7 + 50 * 9, 50 * 5 + 11)
    assert e.units == 100 and e.first_height == 1 and e.last_height == 3 and e.earned == e.minted + e.fees
    # SLASH: the cut the ledger recorded, from the stake the ledger holds; the honest got what it paid them
    c = index.earnings(aid(CHEATER))
    assert c is not None
    cheater_receipt = run.chain.block_at(run.height).txs[0].verdict[0]  # type: ignore[union-attr]
    cut = state.decode_slashed(run.chain.store.get(state.slash_key(cheater_receipt.receipt_hash)))[2]
    assert c.slashed == cut == 2000 and (c.staked, c.unbonding) == run.stake(CHEATER)[:2] == (1000, 1000)
    for k in HONEST[:2]:
        h = index.earnings(aid(k))
        assert h is not None and h.slash_rewards == run.balance(k) == 500 and h.receipts == 0
    # ranked by earned (minted + fees + slash rewards), most first
    top = index.top_earners(10)
    earned = {a: x.earned for a, x in top}
    assert [x.earned for _, x in top] == sorted(earned.values(), reverse=True)
    assert earned[aid(CHEATER)] == 5000 and earned[aid(PROVIDER)] == 50 * 7 + 50 * 9 + 50 * 5 + 11
    assert aid(BOB) not in earned  # a transfer is not an earning
    # the series: every block, transaction, receipt and fee lands in one minute and one hour bucket
    for res in (MINUTE, HOUR):
        buckets = [b for _, b in index.series(res, 0, 2**62)]
        assert sum(b.blocks for b in buckets) == run.height and sum(b.txs for b in buckets) == 9
        assert sum(b.receipts for b in buckets) == 4 and sum(b.fees for b in buckets) == 50 * 5 + 11
        assert sum(b.gaps for b in buckets) == run.height - 1
        assert sum(b.gap_ms for b in buckets) == (run.height - 1) * G.block_time_ms
    ps = list(index.provider_series(aid(PROVIDER), 0, 2**62))
    assert sum(b.receipts for _, b in ps) == 2 and sum(b.minted + b.fees for _, b in ps) == e.earned
    index.close()
    again = ExplorerIndex(tmp_path / "index")  # a restart keeps all of it
    assert again.earnings(aid(PROVIDER)) == e and again.tip == run.height
    again.close()


def test_a_reorg_undoes_earnings_exactly(tmp_path: Path) -> None:
    run, fork_at = economy_chain()
    index = ExplorerIndex(tmp_path / "index")
    index.add_blocks(blocks_of(run), G)
    # another branch from fork_at: no SETTLE, no SLASH, a MINT to another provider; longer
    fork = Runner(G, AUTH[0])
    fork.chain.add_blocks([run.chain.block_at(h) for h in range(1, fork_at)], now_ms=10**15)  # type: ignore[misc]
    fork.slot = run.slot - (run.height - fork_at + 1)
    fork.slot += 1  # a later slot than the replaced block's: another block at the same height
    fork.block(make_mint(ALICE, G.ref, 3, text_receipt(9, provider=BOB, price=3)))
    fork.block()
    fork.block(make_mint(ALICE, G.ref, 4, text_receipt(10, provider=PROVIDER, price=2)))
    assert fork.height > run.height and fork.chain.hash_at(fork_at) != run.chain.hash_at(fork_at)
    # the node resends from the fork point
    assert index.add_blocks(blocks_of(fork, fork_at), G) == fork.height
    e = index.earnings(aid(PROVIDER))
    assert e is not None and (e.receipts, e.minted, e.fees) == paid_by_chain(fork, PROVIDER) == (2, 50 * 7 + 50 * 2, 0)
    c = index.earnings(aid(CHEATER))
    assert c is not None and (c.slashed, c.staked, c.unbonding) == (0, 4000, 0) == (0, *fork.stake(CHEATER)[:2])
    assert index.earnings(aid(HONEST[0])) is None  # the SLASH that paid it is gone
    assert index.job_receipt("job-4") is None and index.job_receipt("job-10") is not None
    # the same bytes as an index that only ever saw the new branch (series, ranks, history, all)
    fresh = ExplorerIndex(tmp_path / "fresh")
    fresh.add_blocks(blocks_of(fork), G)
    assert dump(index) == dump(fresh)
    index.close()
    fresh.close()


def test_series_are_bounded_and_pruning_is_undone_by_a_reorg(tmp_path: Path) -> None:
    """Minute buckets older than a day and hour buckets older than 30 days (by the newest block's
    time) are deleted, and a reorg below that block brings them back."""
    g = genesis(block_time_ms=3_600_000, genesis_time_ms=1_700_000_000_000)  # an hour per slot
    run = Runner(g, AUTH[0])
    run.block(make_mint(ALICE, g.ref, 0, text_receipt(1, provider=PROVIDER)))
    run.slot += 24 * 40  # the next block 40 days later
    run.block(make_mint(ALICE, g.ref, 1, text_receipt(2, provider=PROVIDER)))
    index = ExplorerIndex(tmp_path / "index")
    index.add_blocks(blocks_of(run)[:1], g)
    before = dump(index)
    index.add_blocks(blocks_of(run, 2), g)
    assert [b.blocks for _, b in index.series(MINUTE, 0, 2**62)] == [1]  # only the newest block's minute
    assert [b.blocks for _, b in index.series(HOUR, 0, 2**62)] == [1]
    assert [b.receipts for _, b in index.provider_series(aid(PROVIDER), 0, 2**62)] == [1]
    e = index.earnings(aid(PROVIDER))
    assert e is not None and e.receipts == 2  # totals are kept for ever; only the series are bounded
    # a reorg replacing block 2 puts the pruned buckets back
    fork = Runner(g, AUTH[0])
    fork.chain.add_blocks([run.chain.block_at(1)], now_ms=10**15)  # type: ignore[list-item]
    fork.slot = run.slot - 24 * 40 + 1
    fork.block()
    index.add_blocks(blocks_of(fork, 2), g)
    fresh = ExplorerIndex(tmp_path / "fresh")
    fresh.add_blocks(blocks_of(fork), g)
    assert dump(index) == dump(fresh)
    assert [b.receipts for _, b in index.provider_series(aid(PROVIDER), 0, 2**62)] == [1]  # block 1's, back
    assert [b.blocks for _, b in index.series(MINUTE, 0, 2**62)] == [1, 1]
    assert {k: v for k, v in before.items() if k.startswith(b"v1:pser:")}.items() <= dump(index).items()
    index.close()
    fresh.close()


def test_an_index_of_the_old_layout_is_rebuilt(tmp_path: Path) -> None:
    """An index written before earnings existed cannot be patched (its blocks were indexed without
    them): it is emptied and rebuilt from block 1."""
    import lmdb

    env = lmdb.open(str(tmp_path / "index"), subdir=True)
    with env.begin(write=True) as txn:
        txn.put(b"v1:tip", (500).to_bytes(8, "big"))
        txn.put(b"v1:blk:" + (500).to_bytes(8, "big"), b"[]")
    env.close()
    index = ExplorerIndex(tmp_path / "index")
    assert index.tip == 0 and set(dump(index)) == {b"v1:layout"}
    index.close()



def _fork(run: Runner, fork_at: int) -> Runner:
    """Another branch from fork_at, longer than run's (a MINT to another provider in its first block)."""
    fork = Runner(G, AUTH[0])
    fork.chain.add_blocks([run.chain.block_at(h) for h in range(1, fork_at)], now_ms=10**15)  # type: ignore[misc]
    fork.slot = run.slot - (run.height - fork_at + 1) + 1
    fork.block(make_mint(ALICE, G.ref, 3, text_receipt(9, provider=BOB, price=3)))
    fork.block()
    fork.block()
    assert fork.height > run.height and fork.chain.hash_at(fork_at) != run.chain.hash_at(fork_at)
    return fork


def test_final_blocks_drop_their_undo_and_a_reorg_above_them_still_works(tmp_path: Path) -> None:
    """The undo of a block is needed only while a reorg can replace it: once the node says it is
    final it is dropped (an index does not grow by an undo per block for ever)."""
    run, fork_at = economy_chain()
    index = ExplorerIndex(tmp_path / "index")
    index.add_blocks(blocks_of(run), G, final=fork_at - 1)
    with index.env.begin() as txn:
        sizes = {h: len(txn.get(b"v1:blk:" + h.to_bytes(8, "big"))) for h in range(1, run.height + 1)}
    assert all(sizes[h] == 8 for h in range(1, fork_at)), sizes  # the timestamp only
    assert all(sizes[h] > 8 for h in range(fork_at, run.height + 1)), sizes
    fork = _fork(run, fork_at)
    assert index.add_blocks(blocks_of(fork, fork_at), G, final=fork_at - 1) == fork.height
    fresh = ExplorerIndex(tmp_path / "fresh")
    fresh.add_blocks(blocks_of(fork), G, final=fork_at - 1)
    assert dump(index) == dump(fresh)  # the reorg above the final height undid exactly as before
    index.close()
    fresh.close()


def test_a_reorg_below_the_final_height_rebuilds_the_index(tmp_path: Path) -> None:
    """A node that reverted a final block (it never should): the undo is gone, so the index cannot
    put the old values back; it says so and empties itself, to be built again from block 1."""
    run, fork_at = economy_chain()
    index = ExplorerIndex(tmp_path / "index")
    index.add_blocks(blocks_of(run), G, final=run.height)
    fork = _fork(run, fork_at)
    with pytest.raises(IndexReset, match=f"block {fork_at} replaces a block at or below the final height {run.height}"):
        index.add_blocks(blocks_of(fork, fork_at), G)
    assert index.tip == 0 and index.earnings(aid(PROVIDER)) is None
    assert index.add_blocks(blocks_of(fork), G) == fork.height  # followed again from block 1
    fresh = ExplorerIndex(tmp_path / "fresh")
    fresh.add_blocks(blocks_of(fork), G)
    assert dump(index) == dump(fresh)
    index.close()
    fresh.close()
