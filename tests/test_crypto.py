"""aitbc.crypto.verify, the public check of a compact or recoverable signature against a public key
(the SDK's and the ledger's fallback path): it answers True only for the one low-S signature of
the right length over a 32-byte digest (gaps a mutmut run over aitbc/crypto.py found)."""

from __future__ import annotations

from aitbc import crypto

KEY = crypto.PrivateKey(crypto.sha256(b"aitbc-crypto-test-key"))
DIGEST = crypto.sha256(b"a message")


def test_verify_takes_the_64_and_65_byte_forms_of_a_good_signature() -> None:
    sig = KEY.sign(DIGEST)
    assert len(sig) == 65
    assert crypto.verify(DIGEST, sig, KEY.pubkey) is True
    assert crypto.verify(DIGEST, sig[:64], KEY.pubkey) is True


def test_verify_refuses_every_other_length_digest_key_and_high_s() -> None:
    sig = KEY.sign(DIGEST)
    for wrong in (sig[:63], sig + b"\x00", sig[:64] + b"\x00\x00", b""):
        assert crypto.verify(DIGEST, wrong, KEY.pubkey) is False, len(wrong)
    assert crypto.verify(DIGEST[:31], sig, KEY.pubkey) is False
    assert crypto.verify(DIGEST + b"\x00", sig, KEY.pubkey) is False
    assert crypto.verify(crypto.sha256(b"another message"), sig, KEY.pubkey) is False
    other = crypto.PrivateKey(crypto.sha256(b"another key"))
    assert crypto.verify(DIGEST, sig, other.pubkey) is False
    s = int.from_bytes(sig[32:64], "big")
    high = sig[:32] + (crypto.SECP256K1_N - s).to_bytes(32, "big")
    assert crypto.verify(DIGEST, high, KEY.pubkey) is False  # the same signature, high-S: not a second form
    zero_r = bytes(32) + sig[32:64]
    assert crypto.verify(DIGEST, zero_r, KEY.pubkey) is False
