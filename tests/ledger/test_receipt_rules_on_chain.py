"""The receipt vectors of tests/vectors/receipt_rules.json, carried in MINT transactions: a ledger
applies the same body and signature rules as the offline verifier and refuses each invalid receipt
with `bad receipt: <the verifier's reason>` (docs/ledger.md "Rejection messages"), checked against
the state machine and a real node. The MINTs are built here from the vector files with plain json
and struct (docs/ledger.md "Transactions"), so the vectors stay the one, language-neutral source."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from aitbc import crypto
from aitbc.errors import AitbcError
from aitbc.ledger import state
from aitbc.ledger.client import LedgerClient
from aitbc.ledger.genesis import make_genesis
from aitbc.ledger.store import MemoryStore
from aitbc.ledger.tx import decode_tx, signing_digest
from aitbc.server.ledger import start_node

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
RULES = json.loads((VECTORS / "receipt_rules.json").read_text())
KEYS = json.loads((VECTORS / "receipts.json").read_text())
# rules a ledger applies to a MINT's receipt (the file-level rules have no counterpart: a MINT carries
# the canonical body bytes and raw signatures, not a file)
ON_CHAIN = {"body-fields", "version", "unit-type", "integers", "strings", "hex", "non-empty", "chain-id", "times",
            "provider", "units", "low-s", "r-s-range", "recovery-id", "provider-signature", "attester-signature"}
CASES = [c for c in RULES["cases"] if c["verdict"] == "invalid" and c["rule"] in ON_CHAIN]
AUTHORITY = crypto.PrivateKey(crypto.sha256(b"aitbc receipt-rules chain authority"))
SENDER = crypto.PrivateKey(crypto.sha256(b"aitbc receipt-rules chain sender"))
GENESIS = make_genesis("aitbc-devnet", [AUTHORITY.address], [KEYS["attester_address"]], block_time_ms=100)


def _mint(case: dict) -> bytes:
    """MINT (kind 2, nonce 0) of the vector's body, canonical JSON, with the file's signatures."""
    doc = json.loads(case["input"]["text"])
    rjson = json.dumps(doc["receipt"], sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    att = doc["attestation"]["attester"].encode()
    cid = GENESIS.chain_id.encode()
    body = (bytes((2, 2, len(cid))) + cid + GENESIS.hash() + SENDER.pubkey + struct.pack(">Q", 0)
            + struct.pack(">I", len(rjson)) + rjson + bytes.fromhex(doc["provider_signature"])
            + bytes((len(att),)) + att + bytes.fromhex(doc["attestation"]["signature"]))
    return body + SENDER.sign(signing_digest(body))[:64]


def test_every_body_and_signature_rule_is_carried() -> None:
    assert {c["rule"] for c in CASES} == ON_CHAIN and len(CASES) >= 40


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["name"])
def test_the_state_machine_refuses_each_invalid_receipt_with_the_verifiers_reason(case: dict) -> None:
    with pytest.raises(AitbcError) as ei:
        state.check_stateless(decode_tx(_mint(case)), GENESIS)
    assert ei.value.message.startswith("bad receipt: " + case["reason"]), (ei.value.message, case["reason"])
    assert ei.value.code == "INVALID_ARGUMENT"


async def test_a_node_refuses_them_too() -> None:
    node, server = await start_node(MemoryStore(), GENESIS, AUTHORITY, "127.0.0.1:0")
    try:
        async with LedgerClient(f"127.0.0.1:{server.port}") as c:
            outcomes = await c.broadcast_many([_mint(case) for case in CASES])
        for case, out in zip(CASES, outcomes, strict=True):
            assert not out.accepted and out.error is not None, case["name"]
            assert out.error.code == "INVALID_ARGUMENT", case["name"]
            assert out.error.message.startswith("bad receipt: " + case["reason"]), (case["name"], out.error.message)
    finally:
        await node.stop()
        await server.stop(0)
