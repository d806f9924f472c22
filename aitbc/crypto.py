"""secp256k1 keys, checksummed addresses and low-S signatures (coincurve).

Signatures are 65 bytes `r || s || v` (recoverable, v in {0, 1}) or 64 bytes `r || s` (compact,
verified against a known public key). Only low-S signatures are accepted: libsecp256k1's recover
does not enforce that by itself, so it is checked here before any recovery.
"""

from __future__ import annotations

import functools
import hashlib
import os
import stat
from pathlib import Path

import coincurve

from aitbc import bech32
from aitbc.errors import CryptoError

ADDRESS_HRP = "ait"
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
HALF_N = SECP256K1_N // 2


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def domain_digest(domain: bytes, payload: bytes) -> bytes:
    """The 32 bytes that get signed: sha256(domain || 0x00 || payload). Domains never collide."""
    return sha256(domain + b"\x00" + payload)


@functools.lru_cache(maxsize=4096)
def address_from_pubkey(pubkey: bytes) -> str:
    """`ait1...`: bech32 of the first 20 bytes of sha256(compressed public key)."""
    if len(pubkey) != 33:
        pubkey = coincurve.PublicKey(pubkey).format(compressed=True)
    return bech32.encode(ADDRESS_HRP, sha256(pubkey)[:20])


def validate_address(address: str) -> bytes:
    """Return the 20-byte account id of a checksummed address, or raise CryptoError saying why."""
    if not isinstance(address, str) or not address:
        raise CryptoError("address is empty")
    return _validate_address(address)


@functools.lru_cache(maxsize=4096)  # addresses repeat (miners, attesters): decode each once
def _validate_address(address: str) -> bytes:
    try:
        hrp, payload = bech32.decode(address)
    except ValueError as exc:
        raise CryptoError(f"invalid address {address!r}: {exc}") from None
    if hrp != ADDRESS_HRP:
        raise CryptoError(f"invalid address {address!r}: prefix must be '{ADDRESS_HRP}', not '{hrp}'")
    if len(payload) != 20:
        raise CryptoError(f"invalid address {address!r}: payload must be 20 bytes")
    if address != address.lower():
        raise CryptoError(f"invalid address {address!r}: use lower case")
    return payload


class PrivateKey:
    """A secp256k1 signing key. Signatures produced here are always low-S (libsecp256k1 normalizes)."""

    __slots__ = ("_key", "pubkey", "address")

    def __init__(self, secret: bytes) -> None:
        if len(secret) != 32:
            raise CryptoError("private key must be 32 bytes")
        try:
            self._key = coincurve.PrivateKey(secret)
        except ValueError as exc:
            raise CryptoError(f"invalid private key: {exc}") from None
        self.pubkey: bytes = self._key.public_key.format(compressed=True)
        self.address: str = address_from_pubkey(self.pubkey)

    @classmethod
    def generate(cls) -> PrivateKey:
        return cls(coincurve.PrivateKey().secret)

    @classmethod
    def from_hex(cls, text: str) -> PrivateKey:
        text = text.strip().removeprefix("0x")
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raise CryptoError("private key must be 64 hex characters") from None
        return cls(raw)

    @property
    def secret(self) -> bytes:
        return self._key.secret

    def sign(self, digest: bytes) -> bytes:
        """65-byte recoverable signature `r || s || v` over a 32-byte digest."""
        if len(digest) != 32:
            raise CryptoError("digest must be 32 bytes")
        return self._key.sign_recoverable(digest, hasher=None)

    def sign_compact(self, digest: bytes) -> bytes:
        return self.sign(digest)[:64]

    def __repr__(self) -> str:  # never print the secret
        return f"PrivateKey({self.address})"


def _check_rs(sig: bytes) -> None:
    r = int.from_bytes(sig[:32], "big")
    s = int.from_bytes(sig[32:64], "big")
    if not (0 < r < SECP256K1_N) or not (0 < s < SECP256K1_N):
        raise CryptoError("bad signature: r or s out of range")
    if s > HALF_N:
        raise CryptoError("bad signature: high-S signatures are not accepted")


def recover_pubkey(digest: bytes, signature: bytes) -> bytes:
    """Compressed public key that made a 65-byte low-S signature over `digest`."""
    if len(digest) != 32:
        raise CryptoError("digest must be 32 bytes")
    if len(signature) != 65:
        raise CryptoError(f"bad signature: expected 65 bytes (r||s||v), got {len(signature)}")
    _check_rs(signature)
    if signature[64] not in (0, 1):
        raise CryptoError("bad signature: recovery id must be 0 or 1")
    try:
        pub = coincurve.PublicKey.from_signature_and_message(signature, digest, hasher=None)
    except Exception:
        raise CryptoError("bad signature: public key cannot be recovered") from None
    return pub.format(compressed=True)


def recover_address(digest: bytes, signature: bytes) -> str:
    return address_from_pubkey(recover_pubkey(digest, signature))


def verify(digest: bytes, signature: bytes, pubkey: bytes) -> bool:
    """Verify a 64-byte compact or 65-byte recoverable low-S signature against a public key."""
    if len(signature) == 65:
        signature = signature[:64]
    if len(signature) != 64 or len(digest) != 32:
        return False
    try:
        _check_rs(signature)
        der = coincurve.ecdsa.cdata_to_der(coincurve.ecdsa.deserialize_compact(signature))
        return coincurve.PublicKey(pubkey).verify(der, digest, hasher=None)
    except (CryptoError, ValueError, TypeError):
        return False


def load_or_create_key(path: str | Path) -> PrivateKey:
    """Read a hex private key file; create one (mode 0600) when it does not exist."""
    path = Path(path).expanduser()
    if path.exists():
        return PrivateKey.from_hex(path.read_text())
    from aitbc.config import private_dir

    private_dir(path.parent)
    key = PrivateKey.generate()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IRUSR | stat.S_IWUSR)
    with os.fdopen(fd, "w") as fh:
        fh.write(key.secret.hex() + "\n")
    return key
