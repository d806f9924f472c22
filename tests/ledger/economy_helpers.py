"""Deterministic receipts, quotes and a block runner for the economy tests (genesis version 3)."""

from __future__ import annotations

from aitbc import crypto
from aitbc.errors import AitbcError
from aitbc.ledger import state
from aitbc.ledger.chain import Chain
from aitbc.ledger.genesis import Genesis
from aitbc.ledger.store import MemoryStore
from aitbc.ledger.tx import Tx, decode_tx
from aitbc.quotes import QuoteBody
from aitbc.receipts import ReceiptBody, SignedReceipt, sign_receipt

from .helpers import ATTESTER, CHAIN, PROVIDER, key, next_block_refusal

CLIENT = key(30)  # pays fees from its escrow
HONEST = [key(40 + i) for i in range(15)]  # providers that outvote a cheater
CHEATER = key(39)
PROMPT = "ab" * 32


def text_receipt(i: int, *, provider: crypto.PrivateKey = PROVIDER, prompt_tokens: int = 10,
                 generated: int = 40, price: int = 10, artifact: str = "cd" * 32, model: str = "tiny-gpt",
                 client: str = "client-1", chain_id: str = CHAIN, prompt_hash: str = PROMPT,
                 attester: crypto.PrivateKey = ATTESTER) -> SignedReceipt:
    """A version 2 `tokens` receipt (the unit type a quote can name)."""
    body = ReceiptBody(
        job_id=f"job-{i}", provider=provider.address, client=client, units=prompt_tokens + generated,
        unit_type="tokens", price_per_unit=price, model=model, prompt_hash=prompt_hash, started_at=1000,
        finished_at=2000, artifact_sha256=artifact, nonce=f"{i:032x}", hub_id="", chain_id=chain_id,
        prompt_tokens=prompt_tokens, generated_tokens=generated, gpu_ms=5)
    return sign_receipt(body, provider).attest(attester)


def quote_for(g: Genesis, r: SignedReceipt, *, qid: int = 1, units: int | None = None, price: int = 2,
              fee: int = 0, client_address: str | None = None, **changes: object) -> QuoteBody:
    b = r.body
    units = b.units if units is None else units
    fields = dict(quote_id=f"{qid:032x}", chain_id=g.chain_id, genesis_hash=g.hash().hex(), attester=r.attester,
                  client=b.client, client_address=client_address or CLIENT.address, model=b.model,
                  prompt_hash=b.prompt_hash, unit_type=b.unit_type, units=units, price_per_unit=price,
                  priority_fee=fee, total=units * price + fee, expires_at=10**13)
    fields.update(changes)
    return QuoteBody(**fields)  # type: ignore[arg-type]


class Runner:
    """A one-authority chain on memory: `block(*raws)` builds the next block (every tx must apply)."""

    def __init__(self, g: Genesis, authority: crypto.PrivateKey) -> None:
        self.g, self.key = g, authority
        self.chain = Chain(MemoryStore(), g)
        self.slot = g.genesis_time_ms // g.block_time_ms

    @property
    def height(self) -> int:
        return self.chain.head.height

    def block(self, *raws: bytes) -> list[Tx]:
        self.slot += 1
        txs = [decode_tx(r) for r in raws]
        block, dropped = self.chain.build_block(self.key, self.slot, self.slot * self.g.block_time_ms, txs)
        assert not dropped, [self.why(t) for t in dropped]
        return list(block.txs)

    def why(self, tx: Tx) -> str:
        err = next_block_refusal(self.chain, self.g, tx)
        return err.message if err is not None else "applies alone"

    def refused(self, raw: bytes) -> AitbcError:
        """The error the next block would refuse `raw` with (stateless checks, then the transition)."""
        err = next_block_refusal(self.chain, self.g, raw)
        if err is None:
            raise AssertionError("the tx applies")
        return err

    def nonce(self, k: crypto.PrivateKey) -> int:
        return self.chain.account(crypto.sha256(k.pubkey)[:20])[1]

    def balance(self, k: crypto.PrivateKey | str) -> int:
        aid = crypto.validate_address(k if isinstance(k, str) else k.address)
        return self.chain.account(aid)[0]

    def stake(self, k: crypto.PrivateKey) -> state.Stake:
        return state.read_stake(self.chain.store.get, crypto.sha256(k.pubkey)[:20])

    def escrow(self, client: crypto.PrivateKey, attester: crypto.PrivateKey) -> state.Escrow:
        return state.read_escrow(self.chain.store.get, crypto.sha256(client.pubkey)[:20],
                                 crypto.sha256(attester.pubkey)[:20])

    def supply(self) -> state.Supply:
        return state.read_supply(self.chain.store.get)

    def check_invariant(self) -> None:
        assert_supply_invariant(self.chain.store)


def assert_supply_invariant(store) -> None:  # type: ignore[no-untyped-def]
    """sum of balances + staked + unbonding + escrowed == minted - burned, and the totals match."""
    balances = sum(state.decode_account(v)[0] for _, v in store.scan(state.ACCT))
    stakes = [state.Stake(*state._TRIPLE.unpack(v)) for _, v in store.scan(state.STAK)]
    escrows = [state.Escrow(*state._TRIPLE.unpack(v)) for _, v in store.scan(state.ESCR)]
    sup = state.read_supply(store.get)
    staked, unbonding = sum(s.staked for s in stakes), sum(s.unbonding for s in stakes)
    escrowed = sum(e.available + e.unlocking for e in escrows)
    assert (sup.staked, sup.unbonding, sup.escrowed) == (staked, unbonding, escrowed)
    assert balances + staked + unbonding + escrowed == sup.minted - sup.burned
