#!/usr/bin/env python3
"""Write tests/vectors/ledger_refused.json: transaction encodings a node must refuse, one per rule of
docs/ledger.md ("Transactions", "Transition of one transaction", "Rejection messages"), each with the
start of the message and the gRPC status. Fixed keys and RFC 6979 signatures: a re-run writes the
same bytes. tests/ledger/test_refused_vectors.py checks them against the state machine and a node.

The file holds its own genesis and keys, and `accepted`: transactions a node takes first (a block
of them), so that the state-dependent refusals (nonce, balance, a receipt minted once) have a state.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

from aitbc import crypto, receipts
from aitbc.ledger import tx as txmod
from aitbc.ledger.genesis import ChainRef, make_genesis
from aitbc.quotes import QuoteBody

ROOT = Path(__file__).resolve().parent.parent


def _key(name: str) -> crypto.PrivateKey:
    return crypto.PrivateKey(crypto.sha256(b"aitbc refused-tx vector key " + name.encode()))


def _receipt(provider: crypto.PrivateKey, attester: crypto.PrivateKey, chain_id: str, i: int, *, price: int = 10,
             units: int = 100) -> receipts.SignedReceipt:
    body = receipts.ReceiptBody(
        job_id=f"{i:028x}", provider=provider.address, client="vector-client", units=units, unit_type="gpu_ms",
        version=1, price_per_unit=price, model="tiny-sd", prompt_hash="ab" * 32, started_at=1000, finished_at=2000,
        artifact_sha256="cd" * 32, nonce=f"{i:032x}", hub_id="", chain_id=chain_id)
    return receipts.sign_receipt(body, provider).attest(attester)


def _text_receipt(provider: crypto.PrivateKey, attester: crypto.PrivateKey, chain_id: str, i: int, *,
                  artifact: str = "cd" * 32, model: str = "tiny-gpt", units: int = 50) -> receipts.SignedReceipt:
    """A version 2 `tokens` receipt (what a quote can name), 10 x its units minted."""
    body = receipts.ReceiptBody(
        job_id=f"{i:028x}", provider=provider.address, client="vector-client", units=units, unit_type="tokens",
        price_per_unit=10, model=model, prompt_hash="ab" * 32, started_at=1000, finished_at=2000,
        artifact_sha256=artifact, nonce=f"{i:032x}", hub_id="", chain_id=chain_id, prompt_tokens=10,
        generated_tokens=units - 10)
    return receipts.sign_receipt(body, provider).attest(attester)


def _quote(g, r: receipts.SignedReceipt, client: crypto.PrivateKey, qid: int, total: int, **changes) -> QuoteBody:  # type: ignore[no-untyped-def]
    b = r.body
    fields = dict(quote_id=f"{qid:032x}", chain_id=g.chain_id, genesis_hash=g.hash().hex(), attester=r.attester,
                  client=b.client, client_address=client.address, model=b.model, prompt_hash=b.prompt_hash,
                  unit_type=b.unit_type, units=b.units, price_per_unit=0, priority_fee=total, total=total,
                  expires_at=1_900_000_000_000)
    fields.update(changes)
    return QuoteBody(**fields)


def _header(version: int, kind: int, chain: ChainRef, pubkey: bytes, nonce: int, chain_id: bytes | None = None) -> bytes:
    cid = chain.chain_id.encode() if chain_id is None else chain_id
    return bytes((version, kind, len(cid))) + cid + chain.genesis_hash + pubkey + struct.pack(">Q", nonce)


def _mint_body(chain: ChainRef, key: crypto.PrivateKey, nonce: int, rjson: bytes, psig: bytes, attester: str,
               asig: bytes) -> bytes:
    att = attester.encode()
    return (_header(2, txmod.KIND_MINT, chain, key.pubkey, nonce) + struct.pack(">I", len(rjson)) + rjson + psig
            + bytes((len(att),)) + att + asig)


def _sign(body: bytes, key: crypto.PrivateKey) -> bytes:
    return body + key.sign(txmod.signing_digest(body))[:64]


def main() -> None:
    authority, attester, provider = _key("authority"), _key("attester"), _key("provider")
    alice, bob, stranger = _key("alice"), _key("bob"), _key("stranger")
    carol, dave, erin, frank = _key("carol"), _key("dave"), _key("erin"), _key("frank")
    g = make_genesis("aitbc-refused", [authority.address], [attester.address], block_time_ms=100,
                     max_price_per_unit=1000, max_mint_per_receipt=10**12, genesis_time_ms=1_795_000_000_000)
    ref = g.ref
    other = ChainRef("other-chain", ref.genesis_hash)
    minted = _receipt(provider, attester, g.chain_id, 1)  # 100 units x 10 = 1000 to the provider
    settled = _text_receipt(alice, attester, g.chain_id, 50)
    settled_quote = _quote(g, settled, bob, 1, 20)
    cheat = _text_receipt(stranger, attester, g.chain_id, 60)
    outvoted = [_text_receipt(alice, attester, g.chain_id, 61, artifact="ee" * 32)]
    accepted = [
        ("alice mints receipt 1 for the provider (1000)", txmod.make_mint(alice, ref, 0, minted)),
        ("the provider sends 400 to bob", txmod.make_transfer(provider, ref, 0, bob.address, 400)),
        ("the provider stakes 300", txmod.make_stake(provider, ref, 1, 300)),
        ("the provider unstakes 100 (unbonding 100 blocks)", txmod.make_unstake(provider, ref, 2, 100)),
        ("bob deposits 100 into escrow for the attester", txmod.make_escrow_deposit(bob, ref, 0, attester.address,
                                                                                     100)),
        ("bob withdraws 50 of it (unlocking 600 blocks)", txmod.make_escrow_withdraw(bob, ref, 1, attester.address,
                                                                                      50)),
        ("the attester settles a job of bob's for 20 (quote 1)",
         txmod.make_settle(attester, ref, 0, settled, settled_quote)),
        ("the attester slashes the stranger (alice outvoted it)", txmod.make_slash(attester, ref, 1, cheat, outvoted)),
        ("the authority votes bob in (1 of 1: quorum, applied at epoch 2)",
         txmod.make_authority_vote(authority, ref, 0, txmod.ACTION_ADD, bob.address)),
        *((f"the authority votes {name} in (its proposal {i} of at most 4 in epoch 0)",
           txmod.make_authority_vote(authority, ref, i - 1, txmod.ACTION_ADD, k.address))
          for i, (name, k) in enumerate((("carol", carol), ("dave", dave), ("erin", erin)), 2)),
    ]
    cases: list[tuple[str, bytes, str, str]] = []

    def refuse(name: str, raw: bytes, error: str, status: str = "INVALID_ARGUMENT") -> None:
        cases.append((name, raw, error, status))

    transfer = txmod.make_transfer(bob, ref, 0, alice.address, 1)
    t_body = txmod.decode_tx(transfer).body
    # -- encoding
    refuse("over 16384 bytes", transfer + bytes(16385 - len(transfer)), "tx too large: 16385 bytes, at most 16384")
    refuse("cut inside the genesis hash", transfer[:40], "malformed transaction: truncated")
    refuse("cut inside the sender key", transfer[:50],
           "malformed transaction: sender public key must be 33 bytes (compressed)")
    refuse("version byte 3", _sign(bytes((3,)) + t_body[1:], bob), "malformed transaction: version 3 is not supported")
    refuse("version byte 1", _sign(bytes((1,)) + t_body[1:], bob), "malformed transaction: version 1 is not supported")
    refuse("chain id bytes not in chain id form (upper case)",
           _sign(_header(2, 1, ref, bob.pubkey, 0, b"AITBC-REFUSED") + t_body[-28:], bob),
           "malformed transaction: bad chain id")
    refuse("sender key not compressed (prefix 04)",
           _sign(_header(2, 1, ref, b"\x04" + bob.pubkey[1:], 0) + t_body[-28:], bob),
           "malformed transaction: sender public key must be 33 bytes (compressed)")
    refuse("TRANSFER of 0", _sign(t_body[:-8] + bytes(8), bob), "malformed transaction: amount must be positive")
    refuse("unknown kind 13", _sign(t_body[:1] + bytes((13,)) + t_body[2:], bob),
           "malformed transaction: unknown kind 13")
    refuse("signature of 63 bytes", transfer[:-1], "malformed transaction: signature must be exactly 64 bytes")
    refuse("no signature", t_body, "malformed transaction: signature must be exactly 64 bytes")
    r2 = _receipt(provider, attester, g.chain_id, 2)
    canon = r2.body.canonical_bytes()
    body_dict = r2.body.to_dict()

    def mint_with(rjson: bytes) -> bytes:
        return _sign(_mint_body(ref, alice, 1, rjson, r2.provider_signature, r2.attester, r2.attester_signature), alice)

    refuse("MINT whose receipt JSON has whitespace", mint_with(json.dumps(body_dict, sort_keys=True).encode()),
           "malformed transaction: receipt JSON is not canonical")
    refuse("MINT whose receipt JSON has its keys unsorted",
           mint_with(json.dumps(dict(reversed(list(body_dict.items()))), separators=(",", ":")).encode()),
           "malformed transaction: receipt JSON is not canonical")
    refuse("MINT whose receipt JSON has a duplicate key",
           mint_with(canon.replace(b'"units":100', b'"units":100,"units":100')),
           'malformed transaction: receipt has a duplicate key "units"')
    refuse("MINT whose receipt JSON has a float", mint_with(canon.replace(b'"units":100', b'"units":100.0')),
           "malformed transaction: receipt has a number that is not an integer: 100.0")
    refuse("MINT whose receipt JSON starts with a BOM", mint_with(b"\xef\xbb\xbf" + canon),
           "malformed transaction: receipt starts with a UTF-8 byte order mark")
    refuse("MINT whose receipt JSON is not UTF-8", mint_with(canon.replace(b'"vector-client"', b'"vector-cli\xe9nt"')),
           "malformed transaction: receipt is not UTF-8")
    bad_units = dict(body_dict, unit_type="images", chain_id="Aitbc")
    refuse("MINT of a canonical but invalid receipt body (chain_id not in chain id form)",
           mint_with(json.dumps(bad_units, sort_keys=True, separators=(",", ":")).encode()),
           "bad receipt: receipt chain_id 'Aitbc' is not a chain id")
    refuse("MINT with a 64-byte provider signature (the attester length is then read from its first letter)",
           _sign(_mint_body(ref, alice, 1, canon, r2.provider_signature[:64], r2.attester, r2.attester_signature), alice),
           "malformed transaction: attester address is not ASCII")
    whole = _mint_body(ref, alice, 1, canon, r2.provider_signature, r2.attester, r2.attester_signature)
    at = len(_header(2, txmod.KIND_MINT, ref, alice.pubkey, 1))
    refuse("MINT whose receipt length runs past the end",
           _sign(whole[:at] + struct.pack(">I", len(canon) + 1000) + whole[at + 4:], alice),
           "malformed transaction: truncated")
    refuse("EVIDENCE of length 0", _sign(_header(2, txmod.KIND_EVIDENCE, ref, bob.pubkey, 0) + bytes(2), bob),
           "malformed transaction: truncated evidence")
    # -- stateless checks
    refuse("signed for another chain id", txmod.make_transfer(bob, other, 0, alice.address, 1),
           "wrong chain id: tx is for 'other-chain', this chain is 'aitbc-refused'")
    sig = bytes.fromhex(transfer[-64:].hex())
    s = int.from_bytes(sig[32:], "big")
    refuse("high-S twin of a valid signature", t_body + sig[:32] + (crypto.SECP256K1_N - s).to_bytes(32, "big"),
           "bad signature: does not verify against the sender's key (or is high-S)")
    refuse("signed by another key than the sender's", t_body + alice.sign(txmod.signing_digest(t_body))[:64],
           "bad signature: does not verify against the sender's key (or is high-S)")
    refuse("signature with r = 0", t_body + bytes(32) + sig[32:],
           "bad signature: does not verify against the sender's key (or is high-S)")
    refuse("MINT of a receipt for another chain", txmod.make_mint(alice, ref, 1, _receipt(provider, attester,
                                                                                            "other-chain", 3)),
           "wrong chain id: receipt is for 'other-chain', this chain is 'aitbc-refused'")
    refuse("MINT attested by a key outside the genesis attesters",
           txmod.make_mint(alice, ref, 1, _receipt(provider, stranger, g.chain_id, 4)),
           f"attester not authorized: {stranger.address} is not in the genesis attester set", "PERMISSION_DENIED")
    high = r2.provider_signature
    hs = int.from_bytes(high[32:64], "big")
    high = high[:32] + (crypto.SECP256K1_N - hs).to_bytes(32, "big") + bytes((high[64] ^ 1,))
    refuse("MINT whose receipt's provider signature is high-S",
           _sign(_mint_body(ref, alice, 1, canon, high, r2.attester, r2.attester_signature), alice),
           "bad receipt: provider signature: bad signature: high-S signatures are not accepted")
    refuse("MINT whose attestation is by another key than the named attester",
           _sign(_mint_body(ref, alice, 1, canon, r2.provider_signature, r2.attester,
                            stranger.sign(crypto.domain_digest(receipts.ATTEST_DOMAIN, r2.receipt_hash))), alice),
           "bad receipt: attester signature is by ")
    refuse("MINT of a receipt at price 0 (mints nothing)",
           txmod.make_mint(alice, ref, 1, _receipt(provider, attester, g.chain_id, 5, price=0)),
           "bad receipt: it mints nothing (units or price is 0)")
    refuse("EVIDENCE that is not two votes",
           txmod.make_evidence(bob, ref, 0, b"\x01" + bytes(40)), "not evidence: ")
    # -- against the state the accepted block leaves
    refuse("nonce 0 again from alice (her nonce is 1)", txmod.make_mint(alice, ref, 0, r2),
           "nonce too low: account nonce is 1, tx nonce 0", "FAILED_PRECONDITION")
    refuse("bob sends more than the 300 he kept out of escrow", txmod.make_transfer(bob, ref, 2, alice.address, 301),
           "insufficient balance: have 300", "FAILED_PRECONDITION")
    refuse("receipt 1 minted again, by another sender", txmod.make_mint(bob, ref, 2, minted),
           f"receipt already minted: {minted.receipt_hash.hex()}", "ALREADY_EXISTS")
    # -- the economy (genesis version 3): each from its sender's next nonce (a node runs those on its head)
    stake = txmod.make_stake(provider, ref, 3, 1)
    refuse("STAKE of 0", _sign(txmod.decode_tx(stake).body[:-8] + bytes(8), provider),
           "malformed transaction: amount must be positive")
    refuse("STAKE more than the balance (300)", txmod.make_stake(provider, ref, 3, 301),
           "insufficient balance: have 300, need 301", "FAILED_PRECONDITION")
    refuse("UNSTAKE more than staked (200)", txmod.make_unstake(provider, ref, 3, 201),
           "unstake too large: staked 200, asked 201", "FAILED_PRECONDITION")
    refuse("WITHDRAW before the unlock height", txmod.make_withdraw(provider, ref, 3),
           "still unbonding: 100 unlock at height ", "FAILED_PRECONDITION")
    refuse("WITHDRAW with nothing unbonding", txmod.make_withdraw(bob, ref, 2),
           "nothing to withdraw: no tokens are unbonding", "FAILED_PRECONDITION")
    refuse("ESCROW_DEPOSIT for a key outside the genesis attesters",
           txmod.make_escrow_deposit(bob, ref, 2, stranger.address, 1),
           f"attester not authorized: {stranger.address} is not in the genesis attester set", "PERMISSION_DENIED")
    refuse("ESCROW_WITHDRAW more than available (30)", txmod.make_escrow_withdraw(bob, ref, 2, attester.address, 31),
           "escrow withdraw too large: available 30, asked 31", "FAILED_PRECONDITION")
    refuse("ESCROW_RECLAIM before the timeout", txmod.make_escrow_reclaim(bob, ref, 2, attester.address),
           "escrow still locked: 50 unlock at height ", "FAILED_PRECONDITION")
    refuse("ESCROW_RECLAIM with nothing unlocking", txmod.make_escrow_reclaim(alice, ref, 1, attester.address),
           "nothing to reclaim: no escrow for ", "FAILED_PRECONDITION")
    fresh = _text_receipt(provider, attester, g.chain_id, 51)
    refuse("SETTLE sent by another key than the receipt's attester",
           txmod.make_settle(alice, ref, 1, fresh, _quote(g, fresh, bob, 2, 5)),
           f"settle not by the attester: sender {alice.address} is not the receipt's attester", "PERMISSION_DENIED")
    refuse("SETTLE of a quote for another chain id",
           txmod.make_settle(attester, ref, 2, fresh, _quote(g, fresh, bob, 2, 5, chain_id="other-chain")),
           "wrong chain id: quote is for 'other-chain', this chain is 'aitbc-refused'")
    refuse("SETTLE of a quote for another genesis",
           txmod.make_settle(attester, ref, 2, fresh, _quote(g, fresh, bob, 2, 5, genesis_hash="00" * 32)),
           f"wrong genesis: quote is for genesis {'00' * 32}")
    refuse("SETTLE of a quote for another model",
           txmod.make_settle(attester, ref, 2, fresh, _quote(g, fresh, bob, 2, 5, model="other-model")),
           "quote mismatch: model is 'other-model' in the quote, 'tiny-gpt' in the receipt")
    refuse("SETTLE of a receipt with more units than its quote",
           txmod.make_settle(attester, ref, 2, fresh, _quote(g, fresh, bob, 2, 5, units=49)),
           "quote mismatch: the receipt has 50 units, the quote covers 49")
    refuse("SETTLE above the client's escrow (30 available, 50 locked)",
           txmod.make_settle(attester, ref, 2, fresh, _quote(g, fresh, bob, 2, 81)),
           f"escrow too low: {bob.address} has 30 available and 50 still locked", "FAILED_PRECONDITION")
    refuse("SETTLE of quote 1 again (another receipt)",
           txmod.make_settle(attester, ref, 2, fresh, dataclasses.replace(settled_quote)),
           f"quote already settled: {settled_quote.hash().hex()}", "ALREADY_EXISTS")
    refuse("SETTLE of a receipt minted already (another quote)",
           txmod.make_settle(attester, ref, 2, settled, _quote(g, settled, bob, 3, 5)),
           f"receipt already minted: {settled.receipt_hash.hex()}", "ALREADY_EXISTS")
    s_body = txmod.decode_tx(txmod.make_settle(attester, ref, 2, fresh, _quote(g, fresh, bob, 2, 5))).body
    qjson = _quote(g, fresh, bob, 2, 5).canonical_bytes()
    spaced = json.dumps(json.loads(qjson), sort_keys=True).encode()
    refuse("SETTLE whose quote JSON is not canonical",
           _sign(s_body[:-len(qjson) - 4] + struct.pack(">I", len(spaced)) + spaced, attester),
           "bad quote: quote JSON is not canonical")
    c2 = _text_receipt(provider, attester, g.chain_id, 70)
    h2 = _text_receipt(bob, attester, g.chain_id, 71, artifact="ee" * 32)
    refuse("SLASH sent by a key outside the genesis attesters", txmod.make_slash(alice, ref, 1, c2, [h2]),
           f"slash not by an attester: {alice.address} is not in the genesis attester set", "PERMISSION_DENIED")
    one = txmod.decode_tx(txmod.make_slash(attester, ref, 2, c2, [h2])).body
    n_at = len(_header(2, txmod.KIND_SLASH, ref, attester.pubkey, 2))
    refuse("SLASH of one receipt (no honest run outvotes it)",
           _sign(one[:n_at] + bytes((1,)) + one[n_at + 1:n_at + 1 + len(txmod._receipt_part(c2))], attester),
           "malformed transaction: a SLASH carries 2-16 receipts")
    refuse("SLASH whose honest receipt has the cheater's artifact",
           txmod.make_slash(attester, ref, 2, c2, [_text_receipt(bob, attester, g.chain_id, 72)]),
           "bad verdict: receipt 1 has the cheater's artifact_sha256")
    refuse("SLASH whose honest receipt is by the cheater",
           txmod.make_slash(attester, ref, 2, c2, [_text_receipt(provider, attester, g.chain_id, 73, artifact="ee" * 32)]),
           f"bad verdict: receipt 1 is by {provider.address}, already in the verdict")
    refuse("SLASH whose honest receipt ran another model",
           txmod.make_slash(attester, ref, 2, c2, [_text_receipt(bob, attester, g.chain_id, 74, artifact="ee" * 32,
                                                                 model="other-model")]),
           "bad verdict: receipt 1 has another model than the cheater's receipt")
    refuse("SLASH whose honest receipt is for another chain",
           txmod.make_slash(attester, ref, 2, c2, [_text_receipt(bob, attester, "other-chain", 75, artifact="ee" * 32)]),
           "wrong chain id: receipt is for 'other-chain', this chain is 'aitbc-refused'")
    refuse("SLASH of the same cheater receipt again",
           txmod.make_slash(attester, ref, 2, cheat, [_text_receipt(bob, attester, g.chain_id, 76, artifact="ee" * 32)]),
           f"verdict already recorded: the receipt {cheat.receipt_hash.hex()} was slashed in block ", "ALREADY_EXISTS")

    # -- AUTHORITY_VOTE (kind 12)
    vote = txmod.encode_authority_vote_body(ref, authority.pubkey, 4, txmod.ACTION_ADD, alice.address)
    refuse("AUTHORITY_VOTE with action 3", _sign(vote[:-21] + bytes((3,)) + vote[-20:], authority),
           "malformed transaction: authority vote action must be 1 (add) or 2 (remove), got 3")
    refuse("AUTHORITY_VOTE by a key outside the authority set",
           txmod.make_authority_vote(stranger, ref, 0, txmod.ACTION_ADD, alice.address),
           f"not an authority: {stranger.address} is not in the authority set of epoch 0", "PERMISSION_DENIED")
    refuse("AUTHORITY_VOTE to add an authority", txmod.make_authority_vote(authority, ref, 4, txmod.ACTION_ADD,
                                                                          authority.address),
           f"authority vote refused: {authority.address} is already an authority of epoch 0", "FAILED_PRECONDITION")
    refuse("AUTHORITY_VOTE to remove a key outside the set",
           txmod.make_authority_vote(authority, ref, 4, txmod.ACTION_REMOVE, alice.address),
           f"authority vote refused: {alice.address} is not an authority of epoch 0", "FAILED_PRECONDITION")
    refuse("AUTHORITY_VOTE to remove the last authority",
           txmod.make_authority_vote(authority, ref, 4, txmod.ACTION_REMOVE, authority.address),
           f"authority vote refused: removing {authority.address} would leave no authority", "FAILED_PRECONDITION")
    refuse("AUTHORITY_VOTE for bob again in the same epoch",
           txmod.make_authority_vote(authority, ref, 4, txmod.ACTION_ADD, bob.address),
           f"already voted: {authority.address} voted to add {bob.address} in epoch 0", "ALREADY_EXISTS")
    refuse("AUTHORITY_VOTE for a 5th proposal in one epoch (bob, carol, dave, erin voted)",
           txmod.make_authority_vote(authority, ref, 4, txmod.ACTION_ADD, frank.address),
           f"too many proposals: {authority.address} already voted for 4 proposals in epoch 0 (at most 4 per "
           "authority per epoch); vote again from epoch 1", "FAILED_PRECONDITION")
    out = {
        "about": "Transactions a node must refuse (docs/ledger.md 'Rejection messages'): apply `accepted` in order "
                 "on the genesis (one block, or one block each), then each refused tx, alone, must be refused with a message starting with "
                 "`error` and the gRPC `status`. `raw` is the signed tx in hex.",
        "keys": {name: k.secret.hex() for name, k in (("authority", authority), ("attester", attester),
                                                    ("provider", provider), ("alice", alice), ("bob", bob),
                                                    ("stranger", stranger))},
        "genesis": g.to_dict(),
        "genesis_hash": g.hash().hex(),
        "accepted": [{"name": n, "raw": raw.hex()} for n, raw in accepted],
        "refused": [{"name": n, "raw": raw.hex(), "error": e, "status": st} for n, raw, e, st in cases],
    }
    (ROOT / "tests" / "vectors" / "ledger_refused.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
