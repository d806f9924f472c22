"""Deterministic keys, genesis and receipts for ledger tests, and waiting on real nodes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aitbc import crypto
from aitbc.errors import AitbcError
from aitbc.ledger import state
from aitbc.ledger.genesis import Genesis, make_genesis
from aitbc.ledger.tx import Tx, decode_tx
from aitbc.receipts import ReceiptBody, SignedReceipt, sign_receipt

CHAIN = "aitbc-test"


def key(n: int) -> crypto.PrivateKey:
    return crypto.PrivateKey(crypto.sha256(b"aitbc-ledger-test-key-%d" % n))


AUTH = [key(1), key(2), key(3), key(4)]
ATTESTER = key(10)
PROVIDER = key(11)
ALICE = key(20)
BOB = key(21)


def genesis(n_auth: int = 1, *, block_time_ms: int = 1000, chain_id: str = CHAIN, **kw) -> Genesis:
    return make_genesis(chain_id, [k.address for k in AUTH[:n_auth]], [ATTESTER.address],
                        block_time_ms=block_time_ms, max_price_per_unit=kw.pop("max_price_per_unit", 1000),
                        max_mint_per_receipt=kw.pop("max_mint_per_receipt", 10**12), **kw)


def receipt(i: int = 0, *, units: int = 100, price: int = 10, chain_id: str = CHAIN,
            provider: crypto.PrivateKey = PROVIDER, attester: crypto.PrivateKey | None = ATTESTER) -> SignedReceipt:
    body = ReceiptBody(
        job_id=f"job-{i}", provider=provider.address, client="client-1", units=units, unit_type="gpu_ms", version=1,
        price_per_unit=price, model="tiny-sd", prompt_hash="ab" * 32, started_at=1000, finished_at=2000,
        artifact_sha256="cd" * 32, nonce=f"{i:032x}", hub_id="", chain_id=chain_id)
    r = sign_receipt(body, provider)
    return r.attest(attester) if attester is not None else r


REF = genesis().ref  # (chain id, genesis hash) of the default one-authority test genesis
OTHER_REF = genesis(chain_id="other-chain").ref  # a chain id this test genesis does not have


def certify(chain, g: Genesis, height: int, *, keys: dict[bytes, crypto.PrivateKey] | None = None) -> bytes:
    """Finalize the canonical block at `height` as the node does: votes of a quorum of the
    authorities on the link (height, prepare) -> (height, commit) (a real, verified certificate,
    the commit round of ledger format 4), handed to the chain. Returns the encoded certificate.
    The genesis authorities sign; with `keys` (id -> key of every key that may be an authority),
    a quorum of the set of `height`'s epoch does, as after authority-set changes it must."""
    from aitbc.ledger import finality

    src = finality.Checkpoint(height, chain.hash_at(height), finality.PREPARE)
    tgt = src.at(finality.COMMIT)
    ids = chain.authorities_at(height) if keys is not None else None
    signers = ([keys[i] for i in ids[:finality.quorum(len(ids))]] if ids
               else AUTH[:finality.quorum(len(g.authorities))])
    cert = finality.make_certificate(finality.make_vote(k, g, src, tgt) for k in signers)
    finality.verify_certificate(cert, g, block=src, authorities=ids)
    chain.store_certificate(height, src.hash, cert.encode())
    return cert.encode()


async def until(pred: Callable[[], Any], *, timeout: float = 60.0, what: str = "condition") -> None:
    """Poll `pred` every 50 ms until it holds; fail naming `what` after `timeout` seconds."""
    for _ in range(int(timeout / 0.05)):
        if pred():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def addr(server: Any) -> str:
    """The loopback address of a node's running server."""
    return f"127.0.0.1:{server.port}"


def next_block_refusal(chain: Any, g: Genesis, tx: bytes | Tx) -> AitbcError | None:
    """What the chain's next block would refuse `tx` with (decoding, the stateless checks, then the
    transition on the head's state), or None when it applies alone."""
    try:
        tx = decode_tx(tx) if isinstance(tx, bytes) else tx
        state.check_stateless(tx, g)
        state.apply_tx(chain.store.get, tx, g, chain.head.height + 1)
    except AitbcError as exc:
        return exc
    return None
