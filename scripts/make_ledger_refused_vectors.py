#!/usr/bin/env python3
"""Write tests/vectors/ledger_refused.json: transaction encodings a node must refuse, one per rule of
docs/ledger.md ("Transactions", "Transition of one transaction", "Rejection messages"), each with the
start of the message and the gRPC status. Fixed keys and RFC 6979 signatures: a re-run writes the
same bytes. tests/ledger/test_refused_vectors.py checks them against the state machine and a node.

The file holds its own genesis and keys, and `accepted`: transactions a node takes first (a block
of them), so that the state-dependent refusals (nonce, balance, a receipt minted once) have a state.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from aitbc import crypto, receipts
from aitbc.ledger import tx as txmod
from aitbc.ledger.genesis import ChainRef, make_genesis

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
    g = make_genesis("aitbc-refused", [authority.address], [attester.address], block_time_ms=100,
                     max_price_per_unit=1000, max_mint_per_receipt=10**12, genesis_time_ms=1_795_000_000_000)
    ref = g.ref
    other = ChainRef("other-chain", ref.genesis_hash)
    minted = _receipt(provider, attester, g.chain_id, 1)  # 100 units x 10 = 1000 to the provider
    accepted = [
        ("alice mints receipt 1 for the provider (1000)", txmod.make_mint(alice, ref, 0, minted)),
        ("the provider sends 400 to bob", txmod.make_transfer(provider, ref, 0, bob.address, 400)),
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
    refuse("unknown kind 9", _sign(t_body[:1] + bytes((9,)) + t_body[2:], bob), "malformed transaction: unknown kind 9")
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
    refuse("bob sends more than his 400", txmod.make_transfer(bob, ref, 0, alice.address, 401),
           "insufficient balance: have 400", "FAILED_PRECONDITION")
    refuse("receipt 1 minted again, by another sender", txmod.make_mint(bob, ref, 0, minted),
           f"receipt already minted: {minted.receipt_hash.hex()}", "ALREADY_EXISTS")

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
