"""Property tests: arbitrary or mutated bytes never crash the decoders or the chain; they are
rejected with InvalidArgument (or, for a still-valid mutation, accepted consistently)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from aitbc.errors import AitbcError, InvalidArgument
from aitbc.ledger.block import decode_block
from aitbc.ledger.chain import Chain
from aitbc.ledger.store import MemoryStore
from aitbc.ledger.tx import decode_tx, make_mint, make_transfer

from .helpers import ALICE, AUTH, BOB, REF, genesis, receipt

TRANSFER = make_transfer(ALICE, REF, 3, BOB.address, 77)
MINT = make_mint(ALICE, REF, 0, receipt(1))


def _block_raw() -> bytes:
    g = genesis(1)
    c = Chain(MemoryStore(), g)
    block, _ = c.build_block(AUTH[0], 5, 5 * g.block_time_ms, [decode_tx(MINT)])
    return block.raw


BLOCK = _block_raw()


@given(st.binary(max_size=400))
@settings(max_examples=300, deadline=None)
def test_random_bytes_never_crash_decoders(data):
    for decode in (decode_tx, decode_block):
        try:
            decode(data)
        except InvalidArgument:
            pass


@given(st.sampled_from([TRANSFER, MINT, BLOCK]), st.integers(0, 10**6), st.integers(0, 255))
@settings(max_examples=300, deadline=None)
def test_single_byte_mutations_are_rejected_or_decode_cleanly(raw, pos, value):
    mutated = bytearray(raw)
    mutated[pos % len(raw)] = value
    decode = decode_block if raw is BLOCK else decode_tx
    try:
        decode(bytes(mutated))
    except InvalidArgument:
        return
    if raw is BLOCK and bytes(mutated) != raw:
        # a block that still parses must fail full validation (signature, roots or receipt)
        c = Chain(MemoryStore(), genesis(1))
        try:
            outcome = c.add_block(decode_block(bytes(mutated)), now_ms=10**15)
        except AitbcError:
            return
        assert outcome == "orphan" and c.head.height == 0  # parent hash changed: nothing accepted
