"""Receipt vectors (docs/receipts.md) and the verification rules, including tampering and high-S."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest

from aitbc import bech32, crypto, receipts
from aitbc.errors import ReceiptError

VECTORS = json.loads((Path(__file__).parent / "vectors" / "receipts.json").read_text())


def _file(case: dict) -> dict:
    return copy.deepcopy(case["receipt_file"])


@pytest.mark.parametrize("case", VECTORS["cases"], ids=lambda c: c["name"])
def test_vector_bytes_hash_and_signatures(case: dict) -> None:
    body = case["receipt_file"]["receipt"]
    # canonical JSON as the doc defines it, independently of the library
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    assert canonical == case["canonical_json"]
    rh = hashlib.sha256(canonical.encode()).digest()
    assert rh.hex() == case["receipt_hash"] == case["receipt_file"]["receipt_hash"]
    manifest = hashlib.sha256(b"".join(bytes.fromhex(d) for d in case["artifact_digests"])).hexdigest()
    assert manifest == body["artifact_sha256"]
    pdig = hashlib.sha256(b"AITBC/receipt/provider/v1\x00" + rh).digest()
    adig = hashlib.sha256(b"AITBC/receipt/attest/v1\x00" + rh).digest()
    assert pdig.hex() == case["provider_digest"] and adig.hex() == case["attest_digest"]
    psig = bytes.fromhex(case["receipt_file"]["provider_signature"])
    assert crypto.recover_pubkey(pdig, psig).hex() == VECTORS["provider_public_key"]
    asig = bytes.fromhex(case["receipt_file"]["attestation"]["signature"])
    assert crypto.recover_pubkey(adig, asig).hex() == VECTORS["attester_public_key"]
    # deterministic signatures: the library reproduces the vector from the private keys
    key = crypto.PrivateKey.from_hex(VECTORS["provider_private_key"])
    assert key.sign(pdig) == psig
    assert key.address == VECTORS["provider_address"]
    _, payload = bech32.decode(VECTORS["provider_address"])
    assert payload == hashlib.sha256(bytes.fromhex(VECTORS["provider_public_key"])).digest()[:20]
    # and the library accepts the file as a whole
    signed = receipts.SignedReceipt.from_json_dict(case["receipt_file"])
    receipts.verify_receipt(signed, attesters=frozenset({VECTORS["attester_address"]}))


@pytest.mark.parametrize("case", [c for c in VECTORS["cases"] if c["receipt_file"]["receipt"]["version"] == 2],
                         ids=lambda c: c["name"])
def test_version_2_units_follow_from_the_fields_beside_them(case: dict) -> None:
    """docs/receipts.md "Units", recomputed here without the library."""
    b = case["receipt_file"]["receipt"]
    if b["unit_type"] == "tile_steps":
        tiles = -(-b["width"] * b["height"] // 4096)
        assert b["units"] == tiles * b["steps"] * b["images"] and b["prompt_tokens"] == b["generated_tokens"] == 0
    else:
        assert b["unit_type"] == "tokens" and b["units"] == b["prompt_tokens"] + b["generated_tokens"]
        assert b["width"] == b["height"] == b["steps"] == b["images"] == 0


def _v2(unit_type: str) -> dict:
    return next(c for c in VECTORS["cases"] if c["receipt_file"]["receipt"]["version"] == 2
                and c["receipt_file"]["receipt"]["unit_type"] == unit_type)


@pytest.mark.parametrize(("unit_type", "changes", "message"), [
    ("tile_steps", {"units": 3841}, r"must be ceil\(width x height / 4096\) x steps x images = 3840"),
    ("tile_steps", {"steps": 31}, "= 3968"),  # more steps without more units is as wrong as the reverse
    ("tile_steps", {"width": 0}, "width, height, steps and images >= 1"),
    ("tile_steps", {"prompt_tokens": 5}, "no token counts"),
    ("tile_steps", {"unit_type": "gpu_ms"}, "unit_type must be one of tile_steps, tokens in version 2"),
    ("tokens", {"units": 53}, r"must be prompt_tokens \+ generated_tokens \(12 \+ 40\)"),
    ("tokens", {"steps": 1}, "no width, height, steps or images"),
    ("tokens", {"prompt_tokens": 0, "units": 40}, "prompt_tokens >= 1"),
    ("tokens", {"gpu_ms": -1}, "integer"),
])
def test_version_2_bodies_whose_units_do_not_add_up_are_refused(unit_type: str, changes: dict, message: str) -> None:
    data = _file(_v2(unit_type))
    data["receipt"].update(changes)
    with pytest.raises(ReceiptError, match=message):
        receipts.SignedReceipt.from_json_dict(data)


def test_each_version_has_exactly_its_own_fields() -> None:
    v1 = _file(VECTORS["cases"][0])
    v1["receipt"]["gpu_ms"] = 5823  # a version 1 body has no version 2 fields
    with pytest.raises(ReceiptError, match="unknown fields: gpu_ms"):
        receipts.SignedReceipt.from_json_dict(v1)
    v2 = _file(_v2("tokens"))
    del v2["receipt"]["gpu_ms"]
    with pytest.raises(ReceiptError, match="missing fields: gpu_ms"):
        receipts.SignedReceipt.from_json_dict(v2)
    v3 = _file(_v2("tokens"))
    v3["receipt"]["version"] = 3
    with pytest.raises(ReceiptError, match="version 3 is not supported"):
        receipts.SignedReceipt.from_json_dict(v3)


def test_altered_field_is_detected() -> None:
    data = _file(VECTORS["cases"][0])
    data["receipt"]["units"] += 1
    with pytest.raises(ReceiptError, match="altered"):
        receipts.SignedReceipt.from_json_dict(data)
    data["receipt_hash"] = receipts.ReceiptBody.from_dict(data["receipt"]).hash().hex()  # hash fixed up...
    signed = receipts.SignedReceipt.from_json_dict(data)
    with pytest.raises(ReceiptError, match="provider signature is by"):  # ...the signature no longer matches
        receipts.verify_receipt(signed)


def test_attester_outside_the_set_is_refused() -> None:
    signed = receipts.SignedReceipt.from_json_dict(_file(VECTORS["cases"][0]))
    with pytest.raises(ReceiptError, match="not authorized"):
        receipts.verify_receipt(signed, attesters=frozenset({VECTORS["provider_address"]}))


def test_unattested_receipt_needs_explicit_permission() -> None:
    data = _file(VECTORS["cases"][0])
    del data["attestation"]
    signed = receipts.SignedReceipt.from_json_dict(data)
    with pytest.raises(ReceiptError, match="not attested"):
        receipts.verify_receipt(signed)
    receipts.verify_receipt(signed, require_attestation=False)


def test_high_s_signature_is_rejected() -> None:
    data = _file(VECTORS["cases"][0])
    sig = bytes.fromhex(data["provider_signature"])
    s = int.from_bytes(sig[32:64], "big")
    high = sig[:32] + (crypto.SECP256K1_N - s).to_bytes(32, "big") + bytes([sig[64] ^ 1])
    # the high-S twin is mathematically valid for the same key...
    rh = bytes.fromhex(data["receipt_hash"])
    digest = crypto.domain_digest(receipts.PROVIDER_DOMAIN, rh)
    import coincurve

    assert coincurve.PublicKey.from_signature_and_message(high, digest, hasher=None).format() == bytes.fromhex(
        VECTORS["provider_public_key"]
    )
    # ...and still refused
    data["provider_signature"] = high.hex()
    with pytest.raises(ReceiptError, match="high-S"):
        receipts.verify_receipt(receipts.SignedReceipt.from_json_dict(data))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("units", 1.5, "integer"),
        ("units", -1, "integer"),
        ("units", True, "integer"),
        ("unit_type", "seconds", "unit_type"),
        ("prompt_hash", "ABC", "64 lower-case hex"),
        ("nonce", "xyz", "nonce"),
        ("provider", "ait1notanaddress", "provider"),
        ("model", "caf\u00e9", "printable ASCII"),
        ("finished_at", 1, "before started_at"),
    ],
)
def test_malformed_bodies_are_refused(field: str, value: object, message: str) -> None:
    data = _file(VECTORS["cases"][0])
    data["receipt"][field] = value
    with pytest.raises(ReceiptError, match=message):
        receipts.SignedReceipt.from_json_dict(data)


def test_unknown_or_missing_fields_are_refused() -> None:
    data = _file(VECTORS["cases"][0])
    data["receipt"]["extra"] = 1
    with pytest.raises(ReceiptError, match="unknown fields"):
        receipts.SignedReceipt.from_json_dict(data)
    del data["receipt"]["extra"]
    del data["receipt"]["nonce"]
    with pytest.raises(ReceiptError, match="missing fields: nonce"):
        receipts.SignedReceipt.from_json_dict(data)


def test_address_checksum() -> None:
    addr = VECTORS["provider_address"]
    crypto.validate_address(addr)
    broken = addr[:-1] + ("q" if addr[-1] != "q" else "p")
    with pytest.raises(crypto.CryptoError, match="checksum"):
        crypto.validate_address(broken)
    with pytest.raises(crypto.CryptoError, match="prefix"):
        crypto.validate_address(bech32.encode("btc", bytes(20)))


def test_the_smallest_text_receipt_is_well_formed() -> None:
    """prompt_tokens >= 1 is the bound, not > 1: a one-token prompt is a job like any other."""
    data = _file(_v2("tokens"))
    data["receipt"].update(prompt_tokens=1, units=1 + data["receipt"]["generated_tokens"])
    data["receipt_hash"] = receipts.ReceiptBody.from_dict(data["receipt"]).hash().hex()
    body = receipts.SignedReceipt.from_json_dict(data).body
    assert (body.prompt_tokens, body.units) == (1, 1 + body.generated_tokens)


@pytest.mark.parametrize("data", [["receipt"], "receipt", None, {"provider_signature": ""}])
def test_what_is_not_a_receipt_object_is_refused_by_name(data: object) -> None:
    with pytest.raises(ReceiptError, match="^not a receipt file: expected an object with a 'receipt' field$"):
        receipts.SignedReceipt.from_json_dict(data)
