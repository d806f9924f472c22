"""Encrypted wallet keystore: one JSON file per wallet, Argon2id + XChaCha20-Poly1305.

The byte-exact file format (version 1) is docs/wallet.md; tests/vectors/wallet_keystore.json holds
its vectors. Two layers protect a file:

- a sha256 `checksum` over the whole document catches accidental damage (a flipped bit, a bad
  copy, an editor) without the passphrase, so a damaged file is reported as damaged and not as a
  wrong passphrase;
- the AEAD tag, whose associated data binds the format version, address, public key and KDF
  parameters, catches deliberate tampering (someone who also recomputed the checksum): that can
  only be told apart from a wrong passphrase by whoever knows the passphrase.

Nothing here knows about gRPC; errors are AitbcError subclasses that aitbc.rpc maps to statuses.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import errno
import hashlib
import json
import os
import re
import secrets
import stat
import threading
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import coincurve
import nacl.bindings
import nacl.exceptions
import nacl.pwhash.argon2id as argon2id

from aitbc.crypto import PrivateKey, address_from_pubkey, validate_address
from aitbc.errors import (
    AitbcError,
    AlreadyExists,
    CryptoError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unauthenticated,
)

FORMAT_VERSION = 1
KDF_NAME = "argon2id"
CIPHER_NAME = "xchacha20poly1305-ietf"
SALT_BYTES = argon2id.SALTBYTES  # 16
NONCE_BYTES = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES  # 24
KEY_BYTES = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_KEYBYTES  # 32
SECRET_BYTES = 32
TAG_BYTES = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_ABYTES  # 16

# Bounds a file may ask for. The upper ones stop a hostile imported file from making unlock burn
# minutes of CPU or gigabytes of memory; the lower ones are libsodium's own minimums.
OPSLIMIT_MIN = argon2id.OPSLIMIT_MIN  # 1
OPSLIMIT_MAX = 16
MEMLIMIT_MIN = argon2id.MEMLIMIT_MIN  # 8 KiB
MEMLIMIT_MAX = 1024 * 1024 * 1024  # 1 GiB

MAX_FILE_BYTES = 64 * 1024  # a v1 file is under 1 KiB; anything this large is not a keystore
FILE_SUFFIX = ".json"
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_HEX_RE = re.compile(r"[0-9a-f]*")
_CREATED_AT_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")
_FIELDS = ("version", "name", "address", "pubkey", "created_at", "kdf", "cipher", "checksum")
_KDF_FIELDS = ("name", "opslimit", "memlimit", "salt")
_CIPHER_FIELDS = ("name", "nonce", "ciphertext")


@dataclass(frozen=True)
class KdfParams:
    """Argon2id cost: `opslimit` passes over `memlimit` bytes of memory."""

    opslimit: int
    memlimit: int

    def __post_init__(self) -> None:
        problem = _kdf_problem(self.opslimit, self.memlimit)
        if problem:
            raise InvalidArgument(f"bad KDF parameters: {problem}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kdf_problem(opslimit: Any, memlimit: Any) -> str | None:
    if not _is_int(opslimit) or not OPSLIMIT_MIN <= opslimit <= OPSLIMIT_MAX:
        return f"opslimit must be an integer in [{OPSLIMIT_MIN}, {OPSLIMIT_MAX}], got {opslimit!r}"
    if not _is_int(memlimit) or not MEMLIMIT_MIN <= memlimit <= MEMLIMIT_MAX:
        return f"memlimit must be an integer in [{MEMLIMIT_MIN}, {MEMLIMIT_MAX}] bytes, got {memlimit!r}"
    if memlimit % 1024:
        return f"memlimit must be a whole number of KiB (a multiple of 1024), got {memlimit}"
    return None


# The default for every wallet: about 0.2 s and 64 MiB per unlock on a current x86 core.
DEFAULT_KDF = KdfParams(opslimit=3, memlimit=64 * 1024 * 1024)
# libsodium's minimum cost. For tests and throwaway devnet wallets only, and only when asked for
# by name: a passphrase behind it falls to a cheap guessing attack.
INSECURE_FAST_KDF = KdfParams(opslimit=OPSLIMIT_MIN, memlimit=MEMLIMIT_MIN)


class WalletInfo(NamedTuple):
    name: str
    address: str


@dataclass(frozen=True)
class KeystoreFile:
    """A parsed, structurally valid v1 keystore document (not yet decrypted)."""

    name: str
    address: str
    pubkey: bytes
    created_at: str
    kdf: KdfParams
    salt: bytes
    nonce: bytes
    ciphertext: bytes

    def to_document(self) -> dict[str, Any]:
        return _document(
            name=self.name,
            address=self.address,
            pubkey=self.pubkey,
            created_at=self.created_at,
            kdf=self.kdf,
            salt=self.salt,
            nonce=self.nonce,
            ciphertext=self.ciphertext,
        )


# --------------------------------------------------------------------------------------------
# pure format functions


def validate_name(name: Any) -> str:
    """Wallet names double as file names: 1-64 of [A-Za-z0-9_.-], not starting with a dot."""
    if not isinstance(name, str):
        raise InvalidArgument(f"wallet name must be a string, got {type(name).__name__}")
    if not _NAME_RE.fullmatch(name):
        raise InvalidArgument(f"invalid wallet name {name!r}: use 1 to 64 characters from A-Z a-z 0-9 _ . -")
    if name.startswith("."):
        raise InvalidArgument(f"invalid wallet name {name!r}: it must not start with '.'")
    return name


def passphrase_bytes(passphrase: Any) -> bytes:
    """UTF-8 of the NFC-normalized passphrase (so the same typed text opens the file on any OS)."""
    if isinstance(passphrase, str):
        raw = unicodedata.normalize("NFC", passphrase).encode("utf-8")
    elif isinstance(passphrase, bytes | bytearray):
        raw = bytes(passphrase)
    else:
        raise InvalidArgument("passphrase must be a string")
    if not raw:
        raise InvalidArgument("passphrase must not be empty")
    return raw


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def associated_data(address: str, pubkey: bytes, kdf: KdfParams, salt: bytes) -> bytes:
    """AEAD associated data: canonical JSON binding version, address, public key and KDF params."""
    return canonical_json(
        {
            "address": address,
            "cipher": CIPHER_NAME,
            "kdf": {
                "memlimit": kdf.memlimit,
                "name": KDF_NAME,
                "opslimit": kdf.opslimit,
                "salt": salt.hex(),
            },
            "pubkey": pubkey.hex(),
            "version": FORMAT_VERSION,
        }
    )


def document_checksum(document: dict[str, Any]) -> str:
    """sha256 hex of the canonical JSON of every field except `checksum` itself."""
    return hashlib.sha256(canonical_json({k: v for k, v in document.items() if k != "checksum"})).hexdigest()


def derive_key(passphrase: Any, salt: bytes, kdf: KdfParams) -> bytes:
    return argon2id.kdf(
        KEY_BYTES, passphrase_bytes(passphrase), salt, opslimit=kdf.opslimit, memlimit=kdf.memlimit
    )


def format_created_at(unix_seconds: float) -> str:
    return _dt.datetime.fromtimestamp(int(unix_seconds), _dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _document(
    *,
    name: str,
    address: str,
    pubkey: bytes,
    created_at: str,
    kdf: KdfParams,
    salt: bytes,
    nonce: bytes,
    ciphertext: bytes,
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "version": FORMAT_VERSION,
        "name": name,
        "address": address,
        "pubkey": pubkey.hex(),
        "created_at": created_at,
        "kdf": {"name": KDF_NAME, "opslimit": kdf.opslimit, "memlimit": kdf.memlimit, "salt": salt.hex()},
        "cipher": {"name": CIPHER_NAME, "nonce": nonce.hex(), "ciphertext": ciphertext.hex()},
    }
    doc["checksum"] = document_checksum(doc)
    return doc


def encrypt_key(
    key: PrivateKey,
    passphrase: Any,
    *,
    name: str,
    kdf: KdfParams = DEFAULT_KDF,
    created_at: str | None = None,
    salt: bytes | None = None,
    nonce: bytes | None = None,
) -> dict[str, Any]:
    """The v1 keystore document for `key`. Salt and nonce are fresh random unless given (vectors)."""
    validate_name(name)
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    nonce = secrets.token_bytes(NONCE_BYTES) if nonce is None else nonce
    if len(salt) != SALT_BYTES or len(nonce) != NONCE_BYTES:
        raise InvalidArgument(f"salt must be {SALT_BYTES} bytes and nonce {NONCE_BYTES} bytes")
    if created_at is None:
        created_at = format_created_at(time.time())
    elif not _valid_created_at(created_at):
        raise InvalidArgument(f"created_at must look like 2026-11-25T12:00:00Z, got {created_at!r}")
    aead_key = derive_key(passphrase, salt, kdf)
    ad = associated_data(key.address, key.pubkey, kdf, salt)
    ciphertext = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(key.secret, ad, nonce, aead_key)
    return _document(
        name=name,
        address=key.address,
        pubkey=key.pubkey,
        created_at=created_at,
        kdf=kdf,
        salt=salt,
        nonce=nonce,
        ciphertext=ciphertext,
    )


def document_bytes(document: dict[str, Any]) -> bytes:
    """The exact bytes a writer puts on disk: 2-space indented JSON in field order, then LF."""
    return (json.dumps(document, indent=2, ensure_ascii=True) + "\n").encode()


def parse_keystore(
    data: bytes | str | dict[str, Any],
    *,
    source: str,
    error: type[AitbcError] = FailedPrecondition,
) -> KeystoreFile:
    """Check a keystore document's structure and checksum (no passphrase needed).

    Damage raises `error` (FailedPrecondition for a stored wallet, InvalidArgument for input a
    caller handed in) with a message that names `source` and says what is wrong; a newer format
    version raises FailedPrecondition saying so.
    """

    def damaged(detail: str) -> AitbcError:
        return error(
            f"keystore file {source} is damaged: {detail}; restore it from a backup or an exported copy"
        )

    if isinstance(data, dict):
        doc: Any = data
    else:
        if len(data) > MAX_FILE_BYTES:
            raise damaged(f"it is {len(data)} bytes, far larger than any keystore file")
        if isinstance(data, bytes):
            try:
                data = data.decode("utf-8")
            except UnicodeDecodeError:
                raise damaged("it is not UTF-8 text") from None
        if not data.strip():
            raise damaged("it is empty")
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError):
            raise damaged("it is not valid JSON (truncated or corrupted)") from None
    if not isinstance(doc, dict):
        raise damaged("it is not a JSON object")

    version = doc.get("version")
    if "version" not in doc:
        raise damaged("the 'version' field is missing")
    if not _is_int(version):
        raise damaged(f"'version' must be an integer, got {version!r}")
    if version != FORMAT_VERSION:
        raise FailedPrecondition(
            f"keystore file {source} has format version {version}, but this aitbc reads version "
            f"{FORMAT_VERSION} only: open it with the aitbc release that wrote it, or upgrade"
        )
    _exact_fields(doc, _FIELDS, "", damaged)

    checksum = doc["checksum"]
    if not isinstance(checksum, str) or not _HEX_RE.fullmatch(checksum) or len(checksum) != 64:
        raise damaged("'checksum' must be 64 lowercase hex characters")
    try:
        actual = document_checksum(doc)
    except (TypeError, ValueError):  # a caller-built dict holding values JSON cannot carry
        raise damaged("it holds values that are not JSON") from None
    if actual != checksum:
        raise damaged("its checksum does not match its contents (the file was modified or corrupted)")

    name = doc["name"]
    try:
        validate_name(name)
    except InvalidArgument as exc:
        raise damaged(f"'name': {exc}") from None
    address = doc["address"]
    try:
        validate_address(address)
    except CryptoError as exc:
        raise damaged(f"'address': {exc}") from None
    pubkey = _hex_field(doc["pubkey"], 33, "pubkey", damaged)
    try:
        if pubkey[0] not in (2, 3):
            raise ValueError("not a compressed key")
        coincurve.PublicKey(pubkey)
    except ValueError:
        raise damaged("'pubkey' is not a valid compressed secp256k1 public key") from None
    if address_from_pubkey(pubkey) != address:
        raise damaged(f"'address' {address} does not belong to the public key in the file")
    created_at = doc["created_at"]
    if not _valid_created_at(created_at):
        raise damaged(f"'created_at' must look like 2026-11-25T12:00:00Z, got {created_at!r}")

    kdf_doc = doc["kdf"]
    if not isinstance(kdf_doc, dict):
        raise damaged("'kdf' must be an object")
    _exact_fields(kdf_doc, _KDF_FIELDS, "kdf.", damaged)
    if kdf_doc["name"] != KDF_NAME:
        raise damaged(f"kdf.name must be {KDF_NAME!r}, got {kdf_doc['name']!r}")
    problem = _kdf_problem(kdf_doc["opslimit"], kdf_doc["memlimit"])
    if problem:
        raise damaged(f"kdf: {problem}")
    salt = _hex_field(kdf_doc["salt"], SALT_BYTES, "kdf.salt", damaged)

    cipher_doc = doc["cipher"]
    if not isinstance(cipher_doc, dict):
        raise damaged("'cipher' must be an object")
    _exact_fields(cipher_doc, _CIPHER_FIELDS, "cipher.", damaged)
    if cipher_doc["name"] != CIPHER_NAME:
        raise damaged(f"cipher.name must be {CIPHER_NAME!r}, got {cipher_doc['name']!r}")
    nonce = _hex_field(cipher_doc["nonce"], NONCE_BYTES, "cipher.nonce", damaged)
    ciphertext = _hex_field(cipher_doc["ciphertext"], SECRET_BYTES + TAG_BYTES, "cipher.ciphertext", damaged)

    return KeystoreFile(
        name=name,
        address=address,
        pubkey=pubkey,
        created_at=created_at,
        kdf=KdfParams(kdf_doc["opslimit"], kdf_doc["memlimit"]),
        salt=salt,
        nonce=nonce,
        ciphertext=ciphertext,
    )


def decrypt_key(
    parsed: KeystoreFile,
    passphrase: Any,
    *,
    wallet: str,
    source: str,
    error: type[AitbcError] = FailedPrecondition,
) -> PrivateKey:
    """The private key inside a parsed file. Wrong passphrase -> Unauthenticated."""
    aead_key = derive_key(passphrase, parsed.salt, parsed.kdf)
    ad = associated_data(parsed.address, parsed.pubkey, parsed.kdf, parsed.salt)
    try:
        secret = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
            parsed.ciphertext, ad, parsed.nonce, aead_key
        )
    except nacl.exceptions.CryptoError:
        # The checksum already matched, so this is a wrong passphrase, or a file altered by
        # someone who recomputed the checksum; without the passphrase nobody can tell which.
        raise Unauthenticated(
            f"wrong passphrase for wallet '{wallet}' (if the passphrase is right, the file was altered)"
        ) from None
    try:
        key = PrivateKey(secret)
    except CryptoError:
        raise error(f"keystore file {source} is damaged: the decrypted secret is not a valid key") from None
    if key.address != parsed.address or key.pubkey != parsed.pubkey:
        raise error(
            f"keystore file {source} is damaged: it decrypts to the key of {key.address}, "
            f"but says it holds {parsed.address}"
        )
    return key


def _valid_created_at(value: Any) -> bool:
    if not isinstance(value, str) or not _CREATED_AT_RE.fullmatch(value):
        return False
    try:
        _dt.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return False
    return True


def _exact_fields(
    obj: dict[str, Any], expected: tuple[str, ...], prefix: str, damaged: Callable[[str], AitbcError]
) -> None:
    for field in expected:
        if field not in obj:
            raise damaged(f"the '{prefix}{field}' field is missing")
    for field in obj:
        if field not in expected:
            raise damaged(f"unexpected field '{prefix}{field}'")


def _hex_field(value: Any, nbytes: int, field: str, damaged: Callable[[str], AitbcError]) -> bytes:
    if not isinstance(value, str) or len(value) != 2 * nbytes or not _HEX_RE.fullmatch(value):
        raise damaged(f"'{field}' must be {2 * nbytes} lowercase hex characters ({nbytes} bytes)")
    return bytes.fromhex(value)


# --------------------------------------------------------------------------------------------
# the keystore directory


class Keystore:
    """A directory of wallet files `<name>.json` (mode 0600) in a directory of mode 0700.

    Every write goes to a temporary file that is fsynced, then linked or renamed into place, then
    the directory is fsynced: a crash leaves either the old file or the new one, never half of one.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        kdf: KdfParams = DEFAULT_KDF,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(kdf, KdfParams):
            raise InvalidArgument("kdf must be a KdfParams")
        self.directory = Path(directory).expanduser()
        self.kdf = kdf
        self._clock = clock
        self._lock = threading.Lock()
        self._prepare_directory()

    # -- queries ------------------------------------------------------------------------------

    def path(self, name: str) -> Path:
        return self.directory / (validate_name(name) + FILE_SUFFIX)

    def exists(self, name: str) -> bool:
        return self.path(name).is_file()

    def list(self) -> list[WalletInfo]:
        """(name, address) of every wallet, sorted by name, without decrypting anything.

        A damaged file is not skipped silently: the call fails and names it.
        """
        out: list[WalletInfo] = []
        problems: list[str] = []
        for name in self._names():
            try:
                out.append(WalletInfo(name, self._load(name).address))
            except NotFound:
                continue  # deleted while listing
            except AitbcError as exc:
                problems.append(exc.message)
        if problems:
            raise FailedPrecondition(
                "; ".join(problems) + f" (or move the file out of {self.directory} to list the others)"
            )
        return out

    def info(self, name: str) -> WalletInfo:
        return WalletInfo(name, self._load(name).address)

    def file(self, name: str) -> KeystoreFile:
        """The parsed, still encrypted file (address, public key, KDF parameters)."""
        return self._load(name)

    def export(self, name: str) -> str:
        """The wallet's encrypted keystore JSON, as stored (the plain key never leaves)."""
        raw = self._read(name)
        parse_keystore(raw, source=str(self.path(name)))
        return raw.decode("utf-8")

    def unlock(self, name: str, passphrase: Any) -> PrivateKey:
        parsed = self._load(name)
        return decrypt_key(parsed, passphrase, wallet=name, source=str(self.path(name)))

    # -- changes ------------------------------------------------------------------------------

    def create(self, name: str, passphrase: Any) -> str:
        """A new wallet with a fresh random key; returns its address."""
        return self._store_key(name, PrivateKey.generate(), passphrase, check_duplicate_key=False)

    def import_key(self, name: str, key: str | bytes | PrivateKey, passphrase: Any) -> str:
        """A wallet for an existing private key (64 hex characters, 32 bytes or a PrivateKey)."""
        if isinstance(key, PrivateKey):
            private = key
        elif isinstance(key, str):
            private = PrivateKey.from_hex(key)
        elif isinstance(key, bytes | bytearray):
            private = PrivateKey(bytes(key))
        else:
            raise InvalidArgument("private key must be 64 hex characters")
        return self._store_key(name, private, passphrase, check_duplicate_key=True)

    def import_file(
        self,
        name: str | None,
        source: str | bytes | dict[str, Any],
        passphrase: Any = None,
        *,
        label: str | None = None,
    ) -> str:
        """Add an exported keystore document: its JSON text or bytes, or the parsed object. Never a
        path: text that is not a JSON object is refused before any filesystem lookup (a caller that
        has a file reads it and passes the content; `label`, e.g. its path, names it in messages).

        `name` None keeps the name recorded in the file. With a passphrase the file is decrypted
        first, so a wrong passphrase or an altered file is refused before anything is stored;
        without one only its structure and checksum are checked (it is stored still encrypted
        under its original passphrase and KDF parameters).
        """
        data, label = _read_source(source, label)
        parsed = parse_keystore(data, source=label, error=InvalidArgument)
        name = parsed.name if name is None else validate_name(name)
        if passphrase is not None:
            decrypt_key(parsed, passphrase, wallet=name, source=label, error=InvalidArgument)
        renamed = dataclasses.replace(parsed, name=name)
        with self._lock:
            self._check_free(name, parsed.address)
            self._write(name, document_bytes(renamed.to_document()), replace=False)
        return parsed.address

    def change_passphrase(self, name: str, old: Any, new: Any, *, kdf: KdfParams | None = None) -> None:
        key = self.unlock(name, old)
        parsed = self._load(name)
        doc = encrypt_key(key, new, name=name, kdf=kdf or self.kdf, created_at=parsed.created_at)
        with self._lock:
            self._write(name, document_bytes(doc), replace=True)

    def delete(self, name: str, passphrase: Any) -> None:
        """Remove a wallet. The passphrase is required: deleting a key can destroy funds."""
        self.unlock(name, passphrase)
        with self._lock:
            try:
                os.unlink(self.path(name))
            except FileNotFoundError:
                raise NotFound(f"wallet '{name}' does not exist") from None
            self._fsync_directory()

    # -- internals ----------------------------------------------------------------------------

    def _store_key(self, name: str, key: PrivateKey, passphrase: Any, *, check_duplicate_key: bool) -> str:
        validate_name(name)
        passphrase_bytes(passphrase)  # refuse an empty one before spending the KDF time
        with self._lock:
            self._check_free(name, key.address if check_duplicate_key else None)
        doc = encrypt_key(
            key, passphrase, name=name, kdf=self.kdf, created_at=format_created_at(self._clock())
        )
        with self._lock:
            self._check_free(name, key.address if check_duplicate_key else None)
            self._write(name, document_bytes(doc), replace=False)
        return key.address

    def _check_free(self, name: str, address: str | None) -> None:
        lowered = name.lower()
        for existing in self._names():
            if existing.lower() == lowered:
                if existing == name:
                    raise AlreadyExists(f"wallet '{name}' already exists")
                raise AlreadyExists(
                    f"wallet '{existing}' already exists and names are compared case-insensitively; "
                    f"pick another name than '{name}'"
                )
        if address is not None:
            for existing in self._names():
                try:
                    if self._load(existing).address == address:
                        raise AlreadyExists(f"this key ({address}) is already in wallet '{existing}'")
                except (NotFound, FailedPrecondition):
                    continue

    def _prepare_directory(self) -> None:
        d = self.directory
        if d.exists() and not d.is_dir():
            raise FailedPrecondition(f"keystore path {d} exists but is not a directory")
        if not d.exists():
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(d, 0o700)
        mode = stat.S_IMODE(d.stat().st_mode)
        if os.name == "posix" and mode & 0o077:
            raise FailedPrecondition(
                f"keystore directory {d} is open to other users (mode {mode:04o}); run: chmod 700 {d}"
            )

    def _names(self) -> list[str]:
        names = []
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            raise FailedPrecondition(f"keystore directory {self.directory} was removed") from None
        for entry in entries:
            if not entry.name.endswith(FILE_SUFFIX) or not entry.is_file():
                continue
            stem = entry.name[: -len(FILE_SUFFIX)]
            if _NAME_RE.fullmatch(stem) and not stem.startswith("."):
                names.append(stem)
        return sorted(names)

    def _read(self, name: str) -> bytes:
        path = self.path(name)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            raise NotFound(f"wallet '{name}' does not exist (looked for {path})") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise FailedPrecondition(
                    f"keystore file {path} is a symbolic link; refusing to follow it"
                ) from None
            raise FailedPrecondition(f"cannot read keystore file {path}: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as fh:
            return fh.read(MAX_FILE_BYTES + 1)

    def _load(self, name: str) -> KeystoreFile:
        return parse_keystore(self._read(name), source=str(self.path(name)))

    def _write(self, name: str, data: bytes, *, replace: bool) -> None:
        final = self.path(name)
        tmp = self.directory / f".{name}.{secrets.token_hex(8)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            try:
                os.fchmod(fd, 0o600)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            if replace:
                os.replace(tmp, final)
            else:
                # link() never overwrites, so two creators of one name cannot both win
                try:
                    os.link(tmp, final)
                except FileExistsError:
                    raise AlreadyExists(f"wallet '{name}' already exists") from None
                except OSError:  # a filesystem without hard links
                    if final.exists():
                        raise AlreadyExists(f"wallet '{name}' already exists") from None
                    os.replace(tmp, final)
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        self._fsync_directory()

    def _fsync_directory(self) -> None:
        if os.name != "posix":
            return
        dfd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _read_source(source: str | bytes | dict[str, Any], label: str | None) -> tuple[bytes | dict[str, Any], str]:
    """(data, label for messages) of an import source. A path is never opened: a str is the
    document's text, and one that does not start with '{' is refused (the daemon must not become an
    oracle for which of its paths exist)."""
    if isinstance(source, dict):
        return source, label or "(given as an object)"
    if isinstance(source, bytes | bytearray):
        return bytes(source), label or "(given as bytes)"
    if isinstance(source, str):
        if source.lstrip().startswith("{"):
            return source.encode("utf-8"), label or "(given as JSON text)"
        raise InvalidArgument(
            "a keystore to import must be the exported JSON document itself (text starting with '{'), "
            "not a path: no file is opened for it; read the file where it is and send its content "
            "(`aitbc wallet import --keystore FILE` does)")
    raise InvalidArgument("a keystore to import must be its JSON text, bytes or a dict (not a path)")
