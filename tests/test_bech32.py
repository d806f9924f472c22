"""Bech32 (BIP-173), which every `ait1...` address goes through: the BIP's own test vectors, and
the edges a general mutation run (mutmut over aitbc/bech32.py) found no test for: where the
separator is, the printable range, the length bounds, mixed case and the padding bits."""

from __future__ import annotations

import pytest

from aitbc import bech32

# BIP-173, "Test vectors": valid Bech32 strings
VALID = [
    "A12UEL5L",
    "a12uel5l",
    "an83characterlonghumanreadablepartthatcontainsthenumber1andtheexcludedcharactersbio1tt5tgs",
    "abcdef1qpzry9x8gf2tvdw0s3jn54khce6mua7lmqqqxw",
    "11" + "q" * 82 + "c8247j",  # 90 characters: the longest there is
    "split1checkupstagehandshakeupstreamerranterredcaperred2y9e3w",
    "?1ezyfcl",
]
# and invalid ones, with the reason this implementation gives
INVALID = [
    ("\x201nwldj5", "invalid characters"),  # HRP character out of range
    ("\x7f1axkwrx", "invalid characters"),
    ("\x801eym55h", "invalid characters"),
    ("an84characterslonghumanreadablepartthatcontainsthenumber1andtheexcludedcharactersbio1569pvx",
     "bad length"),  # 91 characters
    ("pzry9x0s0muk", "missing separator"),
    ("1pzry9x0s0muk", "missing separator"),  # empty HRP
    ("x1b4n0q5v", "invalid characters"),  # b is no data character
    ("li1dgmt3", "bad length"),  # checksum too short
    ("de1lg7wt\xff", "invalid characters"),
    ("A1G7SGD8", "bad checksum"),  # checksum computed over the upper-case HRP
    ("10a06t8", "missing separator"),
    ("1qzzfhee", "missing separator"),
    ("A12uEL5L", "mixed case"),
]


def _with_checksum(hrp: str, data: list[int]) -> str:
    """BIP-173's reference create_checksum, written out here rather than taken from the module."""
    gen = [0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3]
    chk = 1
    for v in [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp] + data + [0] * 6:
        top = chk >> 25
        chk = (chk & 0x1FFFFFF) << 5 ^ v
        for i in range(5):
            chk ^= gen[i] if (top >> i) & 1 else 0
    mod = chk ^ 1
    charset = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
    return hrp + "1" + "".join(charset[d] for d in data + [(mod >> 5 * (5 - i)) & 31 for i in range(6)])


@pytest.mark.parametrize("text", VALID)
def test_the_bip_173_valid_strings_decode(text: str) -> None:
    hrp, payload = bech32.decode(text)
    assert hrp == text.lower()[: text.lower().rfind("1")]
    assert bech32.encode(hrp, payload) == text.lower()


@pytest.mark.parametrize(("text", "reason"), INVALID)
def test_the_bip_173_invalid_strings_are_refused_with_the_reason(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        bech32.decode(text)


@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 5, 20, 32, 33])
def test_any_payload_round_trips(size: int) -> None:
    payload = bytes(range(7, 7 + size))
    text = bech32.encode("ait", payload)
    assert bech32.decode(text) == ("ait", payload)
    assert bech32.decode(text.upper()) == ("ait", payload)


def test_the_printable_range_is_inclusive() -> None:
    text = _with_checksum("!~", [])
    assert bech32.decode(text) == ("!~", b"")


@pytest.mark.parametrize(("data", "why"), [
    ([0, 1], "non-zero padding bits"),  # 10 bits for one byte: the 2 left over must be 0
    ([0], "a whole 5-bit group of padding"),
    ([0, 0, 0], "15 bits: one byte and 7 bits of padding"),
])
def test_a_string_whose_padding_is_not_canonical_is_refused(data: list[int], why: str) -> None:
    with pytest.raises(ValueError, match="invalid padding"):
        bech32.decode(_with_checksum("ait", data))


def test_one_byte_with_zero_padding_decodes() -> None:
    assert bech32.decode(_with_checksum("ait", [0, 0])) == ("ait", b"\x00")
