"""The v1 file format against its vectors, re-derived from docs/wallet.md without aitbc.wallet."""

from __future__ import annotations

import hashlib
import json
import unicodedata
from pathlib import Path

import nacl.bindings
import nacl.pwhash.argon2id
import pytest

from aitbc.crypto import PrivateKey
from aitbc.errors import FailedPrecondition, InvalidArgument, Unauthenticated
from aitbc.wallet import keystore as k

VECTORS = json.loads((Path(__file__).parents[1] / "vectors" / "wallet_keystore.json").read_text("utf-8"))
CASES = VECTORS["vectors"]


def _canonical(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def test_vectors_cover_the_default_and_the_fast_profile():
    params = {(v["kdf"]["opslimit"], v["kdf"]["memlimit"]) for v in CASES}
    assert (3, 64 * 1024 * 1024) in params
    assert (k.INSECURE_FAST_KDF.opslimit, k.INSECURE_FAST_KDF.memlimit) in params


@pytest.mark.parametrize("v", CASES, ids=[v["name"] for v in CASES])
def test_vector_decrypts_by_the_spec_alone(v):
    """A third party following docs/wallet.md, with only libsodium, json and sha256."""
    doc = json.loads(v["file"])
    assert doc["version"] == 1
    body = {key: val for key, val in doc.items() if key != "checksum"}
    assert hashlib.sha256(_canonical(body)).hexdigest() == doc["checksum"] == v["checksum"]

    pw = unicodedata.normalize("NFC", v["passphrase"]).encode("utf-8")
    assert pw.hex() == v["passphrase_utf8_hex"]
    salt = bytes.fromhex(doc["kdf"]["salt"])
    key = nacl.pwhash.argon2id.kdf(
        32, pw, salt, opslimit=doc["kdf"]["opslimit"], memlimit=doc["kdf"]["memlimit"]
    )
    assert key.hex() == v["derived_key"]

    ad = _canonical(
        {
            "version": doc["version"],
            "address": doc["address"],
            "pubkey": doc["pubkey"],
            "kdf": {k_: doc["kdf"][k_] for k_ in ("name", "opslimit", "memlimit", "salt")},
            "cipher": doc["cipher"]["name"],
        }
    )
    assert ad.decode() == v["associated_data"]
    secret = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
        bytes.fromhex(doc["cipher"]["ciphertext"]), ad, bytes.fromhex(doc["cipher"]["nonce"]), key
    )
    assert secret.hex() == v["secret"]
    priv = PrivateKey(secret)
    assert priv.address == doc["address"] == v["address"]
    assert priv.pubkey.hex() == doc["pubkey"] == v["pubkey"]


@pytest.mark.parametrize("v", CASES, ids=[v["name"] for v in CASES])
def test_writer_produces_the_vector_bytes(v):
    doc = k.encrypt_key(
        PrivateKey(bytes.fromhex(v["secret"])),
        v["passphrase"],
        name=v["name"],
        kdf=k.KdfParams(v["kdf"]["opslimit"], v["kdf"]["memlimit"]),
        created_at=v["created_at"],
        salt=bytes.fromhex(v["salt"]),
        nonce=bytes.fromhex(v["nonce"]),
    )
    assert k.document_bytes(doc) == v["file"].encode("utf-8")


@pytest.mark.parametrize("v", CASES, ids=[v["name"] for v in CASES])
def test_reader_opens_the_vector(v, tmp_path):
    ks = k.Keystore(tmp_path / "ks", kdf=k.INSECURE_FAST_KDF)
    assert ks.import_file(None, v["file"], v["passphrase"]) == v["address"]
    assert ks.unlock(v["name"], v["passphrase"]).secret.hex() == v["secret"]
    # the stored file is byte-identical to the vector: import keeps the writer's layout
    assert ks.export(v["name"]) == v["file"]


def test_passphrase_is_nfc_normalized():
    v = CASES[1]
    nfd = unicodedata.normalize("NFD", v["passphrase"])
    assert nfd != v["passphrase"]
    parsed = k.parse_keystore(v["file"], source="vector")
    assert k.decrypt_key(parsed, nfd, wallet="w", source="vector").secret.hex() == v["secret"]


def test_reader_accepts_any_json_layout():
    v = CASES[1]
    doc = json.loads(v["file"])
    compact = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    parsed = k.parse_keystore(compact, source="compact")
    assert k.decrypt_key(parsed, v["passphrase"], wallet="w", source="x").secret.hex() == v["secret"]


def test_wrong_passphrase_on_the_vector():
    v = CASES[1]
    parsed = k.parse_keystore(v["file"], source="vector")
    with pytest.raises(Unauthenticated, match="wrong passphrase for wallet 'w'"):
        k.decrypt_key(parsed, "not it", wallet="w", source="vector")


def test_kdf_params_refuse_out_of_range_values():
    for ops, mem in [
        (0, 8192),
        (17, 8192),
        (1, 4096),
        (1, 2 * 1024**3),
        (1, 8193),
        (True, 8192),
        (1.0, 8192),
    ]:
        with pytest.raises(InvalidArgument):
            k.KdfParams(ops, mem)


def test_default_profile_is_moderate():
    assert k.DEFAULT_KDF == k.KdfParams(3, 64 * 1024 * 1024)
    assert k.Keystore.__init__.__kwdefaults__["kdf"] is k.DEFAULT_KDF


def test_hostile_kdf_params_are_refused_before_any_work():
    v = CASES[1]
    doc = json.loads(v["file"])
    doc["kdf"]["memlimit"] = 64 * 1024**3  # would ask for 64 GiB
    doc["checksum"] = k.document_checksum(doc)
    with pytest.raises(FailedPrecondition, match="memlimit must be an integer in"):
        k.parse_keystore(doc, source="hostile")


def test_docs_show_vector_1_verbatim():
    docs = (Path(__file__).parents[2] / "docs" / "wallet.md").read_text("utf-8")
    v = CASES[0]
    assert "```json\n" + v["file"] + "```" in docs
    assert v["associated_data"] in docs
    for field in ("secret", "salt", "nonce", "derived_key"):
        assert v[field] in docs
