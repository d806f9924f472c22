from __future__ import annotations

import json
import os
import stat
import threading

import pytest

from aitbc.crypto import PrivateKey, validate_address
from aitbc.errors import (
    AitbcError,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unauthenticated,
)
from aitbc.wallet import keystore as k
from aitbc.wallet.keystore import DEFAULT_KDF, INSECURE_FAST_KDF, Keystore, WalletInfo

from .conftest import PASS


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _doc(ks: Keystore, name: str) -> dict:
    return json.loads(ks.path(name).read_text())


def _write_doc(ks: Keystore, name: str, doc: dict, *, fix_checksum: bool) -> None:
    if fix_checksum:
        doc["checksum"] = k.document_checksum(doc)
    ks.path(name).write_text(json.dumps(doc, indent=2))


# -- round trips ---------------------------------------------------------------------------


def test_create_then_unlock_round_trip(ks):
    address = ks.create("alice", PASS)
    validate_address(address)
    key = ks.unlock("alice", PASS)
    assert isinstance(key, PrivateKey)
    assert key.address == address
    assert ks.list() == [WalletInfo("alice", address)]
    doc = _doc(ks, "alice")
    assert doc["name"] == "alice" and doc["address"] == address and doc["pubkey"] == key.pubkey.hex()
    assert doc["kdf"]["opslimit"] == INSECURE_FAST_KDF.opslimit  # the profile asked for, explicitly


def test_default_params_round_trip(tmp_path):
    ks = Keystore(tmp_path / "ks")  # no kdf argument: the moderate default, never lowered
    address = ks.create("main", PASS)
    doc = _doc(ks, "main")
    assert (doc["kdf"]["opslimit"], doc["kdf"]["memlimit"]) == (DEFAULT_KDF.opslimit, 64 * 1024 * 1024)
    assert ks.unlock("main", PASS).address == address


def test_created_at_comes_from_the_clock(ks, clock):
    ks.create("alice", PASS)
    assert _doc(ks, "alice")["created_at"] == k.format_created_at(clock.now)
    assert k.format_created_at(0) == "1970-01-01T00:00:00Z"


def test_each_wallet_gets_fresh_salt_nonce_and_key(ks):
    a, b = ks.create("a", PASS), ks.create("b", PASS)
    da, db = _doc(ks, "a"), _doc(ks, "b")
    assert a != b
    assert da["kdf"]["salt"] != db["kdf"]["salt"]
    assert da["cipher"]["nonce"] != db["cipher"]["nonce"]


def test_import_key_forms(ks):
    key = PrivateKey.generate()
    assert ks.import_key("hex", "0x" + key.secret.hex().upper(), PASS) == key.address
    other = PrivateKey.generate()
    assert ks.import_key("raw", other.secret, PASS) == other.address
    third = PrivateKey.generate()
    assert ks.import_key("obj", third, PASS) == third.address
    assert ks.unlock("hex", PASS).secret == key.secret
    assert ks.unlock("raw", PASS).secret == other.secret


@pytest.mark.parametrize("bad", ["", "zz" * 32, "ab" * 31, "00" * 32, "ff" * 32, 12345, None])
def test_import_key_refuses_bad_keys(ks, bad):
    with pytest.raises(InvalidArgument):
        ks.import_key("w", bad, PASS)
    assert not ks.exists("w")


def test_import_same_key_twice_is_refused(ks):
    key = PrivateKey.generate()
    ks.import_key("first", key, PASS)
    with pytest.raises(AlreadyExists, match="already in wallet 'first'"):
        ks.import_key("second", key.secret.hex(), "other pass")
    assert not ks.exists("second")


def test_export_is_encrypted_and_imports_into_another_directory(ks, tmp_path):
    address = ks.create("alice", PASS)
    key = ks.unlock("alice", PASS)
    exported = ks.export("alice")
    assert key.secret.hex() not in exported.lower()
    assert json.loads(exported)["address"] == address

    other = Keystore(tmp_path / "elsewhere", kdf=INSECURE_FAST_KDF)
    # as JSON text, under a new name, verified with the passphrase before storing
    assert other.import_file("bob", exported, PASS) == address
    assert other.unlock("bob", PASS).secret == key.secret
    assert json.loads(other.export("bob"))["name"] == "bob"
    # as the bytes a caller read from its file, keeping the recorded name, without a passphrase
    path = tmp_path / "alice.export.json"
    path.write_text(exported)
    third = Keystore(tmp_path / "third", kdf=INSECURE_FAST_KDF)
    assert third.import_file(None, path.read_bytes(), label=str(path)) == address
    assert third.list() == [WalletInfo("alice", address)]
    assert third.unlock("alice", PASS).secret == key.secret
    # as a parsed object and as bytes
    fourth = Keystore(tmp_path / "fourth", kdf=INSECURE_FAST_KDF)
    fourth.import_file("x", json.loads(exported))
    fifth = Keystore(tmp_path / "fifth", kdf=INSECURE_FAST_KDF)
    fifth.import_file("y", exported.encode())


def test_import_file_with_wrong_passphrase_stores_nothing(ks, tmp_path):
    ks.create("alice", PASS)
    other = Keystore(tmp_path / "other", kdf=INSECURE_FAST_KDF)
    with pytest.raises(Unauthenticated, match="wrong passphrase for wallet 'alice'"):
        other.import_file("alice", ks.export("alice"), "wrong")
    assert other.list() == []


def test_import_never_opens_a_path(ks, tmp_path):
    """A path (str or Path) is refused as such, whether or not the file exists and is a valid
    keystore: the same words either way, and nothing is imported (a file read would import it)."""
    other = Keystore(tmp_path / "other", kdf=INSECURE_FAST_KDF)
    ks.create("alice", PASS)
    real = tmp_path / "alice.export.json"
    real.write_text(ks.export("alice"))
    messages = set()
    for source in (str(real), str(tmp_path / "missing.json"), "~/.ssh/id_rsa", "../../etc/passwd"):
        with pytest.raises(InvalidArgument, match="not a path: no file is opened") as info:
            other.import_file(None, source)
        messages.add(info.value.message)
    assert len(messages) == 1
    with pytest.raises(InvalidArgument, match="not a path"):
        other.import_file(None, real)
    assert other.list() == []


def test_import_file_errors(ks, tmp_path):
    with pytest.raises(InvalidArgument, match="is damaged: it is not valid JSON"):
        ks.import_file("w", "{not json")
    with pytest.raises(InvalidArgument):
        ks.import_file("w", 42)
    ks.create("alice", PASS)
    with pytest.raises(AlreadyExists):
        ks.import_file("alice", ks.export("alice"))
    with pytest.raises(AlreadyExists, match="already in wallet 'alice'"):
        ks.import_file("again", ks.export("alice"))


def test_change_passphrase(ks):
    address = ks.create("alice", PASS)
    created = _doc(ks, "alice")["created_at"]
    ks.change_passphrase("alice", PASS, "new one")
    with pytest.raises(Unauthenticated):
        ks.unlock("alice", PASS)
    assert ks.unlock("alice", "new one").address == address
    assert _doc(ks, "alice")["created_at"] == created


def test_delete_needs_the_passphrase(ks):
    ks.create("alice", PASS)
    with pytest.raises(Unauthenticated):
        ks.delete("alice", "wrong")
    assert ks.exists("alice")
    ks.delete("alice", PASS)
    assert ks.list() == []
    with pytest.raises(NotFound):
        ks.delete("alice", PASS)


# -- names ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "A-b_c.d", "x" * 64, "miner-1.hot_wallet", "0"])
def test_valid_names(ks, name):
    ks.create(name, PASS)
    assert [w.name for w in ks.list()] == [name]


@pytest.mark.parametrize(
    "name",
    ["", "x" * 65, "a b", "../evil", "a/b", ".hidden", ".", "..", "caf\u00e9", "a\x00", "tab\t", 7, None],
)
def test_invalid_names(ks, name):
    with pytest.raises(InvalidArgument, match="wallet name"):
        ks.create(name, PASS)
    assert os.listdir(ks.directory) == []


def test_duplicate_and_unknown_names(ks):
    ks.create("alice", PASS)
    with pytest.raises(AlreadyExists, match="wallet 'alice' already exists"):
        ks.create("alice", PASS)
    with pytest.raises(AlreadyExists, match="case-insensitively"):
        ks.create("ALICE", PASS)
    for call in (lambda: ks.unlock("bob", PASS), lambda: ks.export("bob"), lambda: ks.info("bob")):
        with pytest.raises(NotFound, match="wallet 'bob' does not exist"):
            call()


def test_concurrent_creates_of_one_name_have_one_winner(ks):
    results: list[object] = []

    def create() -> None:
        try:
            results.append(ks.create("race", PASS))
        except AlreadyExists as exc:
            results.append(exc)

    threads = [threading.Thread(target=create) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if isinstance(r, str)]
    assert len(winners) == 1
    assert ks.list() == [WalletInfo("race", winners[0])]


def test_empty_passphrase_is_refused(ks):
    with pytest.raises(InvalidArgument, match="passphrase must not be empty"):
        ks.create("alice", "")
    with pytest.raises(InvalidArgument, match="passphrase must be a string"):
        ks.create("alice", None)
    assert not ks.exists("alice")


# -- files and permissions -----------------------------------------------------------------


def test_file_and_directory_permissions(ks):
    ks.create("alice", PASS)
    assert _mode(ks.directory) == 0o700
    assert _mode(ks.path("alice")) == 0o600
    assert sorted(os.listdir(ks.directory)) == ["alice.json"]  # no temp files left behind


def test_permissions_do_not_depend_on_umask(tmp_path):
    old = os.umask(0)
    try:
        ks = Keystore(tmp_path / "a" / "b", kdf=INSECURE_FAST_KDF)
        ks.create("w", PASS)
    finally:
        os.umask(old)
    assert _mode(ks.directory) == 0o700
    assert _mode(ks.path("w")) == 0o600


def test_directory_open_to_others_is_refused(tmp_path):
    d = tmp_path / "loose"
    d.mkdir()
    os.chmod(d, 0o755)
    with pytest.raises(FailedPrecondition, match="chmod 700"):
        Keystore(d, kdf=INSECURE_FAST_KDF)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(FailedPrecondition, match="not a directory"):
        Keystore(f)


def test_list_ignores_other_files_but_reports_damaged_wallets(ks):
    a = ks.create("a", PASS)
    (ks.directory / "notes.txt").write_text("hello")
    (ks.directory / ".a.123.tmp").write_text("{")
    (ks.directory / "sub.json").mkdir()
    assert ks.list() == [WalletInfo("a", a)]
    ks.path("b").write_text('{"version": 1, "name": "b"')
    with pytest.raises(FailedPrecondition) as err:
        ks.list()
    assert "b.json is damaged" in err.value.message and "move the file out" in err.value.message


def test_symlinked_wallet_file_is_refused(ks, tmp_path):
    ks.create("a", PASS)
    os.symlink(ks.path("a"), ks.path("link"))
    with pytest.raises(FailedPrecondition, match="symbolic link"):
        ks.unlock("link", PASS)


# -- wrong passphrase, damage and tampering -------------------------------------------------


def test_wrong_passphrase(ks):
    ks.create("alice", PASS)
    with pytest.raises(Unauthenticated) as err:
        ks.unlock("alice", PASS + " ")
    assert err.value.message.startswith("wrong passphrase for wallet 'alice'")


def _flip_hex(value: str, index: int = 0) -> str:
    index %= len(value)
    c = value[index]
    return value[:index] + ("1" if c != "1" else "2") + value[index + 1 :]


TAMPERS = {
    "ciphertext": lambda d: d["cipher"].__setitem__("ciphertext", _flip_hex(d["cipher"]["ciphertext"], 5)),
    "tag": lambda d: d["cipher"].__setitem__("ciphertext", _flip_hex(d["cipher"]["ciphertext"], -1)),
    "salt": lambda d: d["kdf"].__setitem__("salt", _flip_hex(d["kdf"]["salt"])),
    "nonce": lambda d: d["cipher"].__setitem__("nonce", _flip_hex(d["cipher"]["nonce"])),
    "opslimit": lambda d: d["kdf"].__setitem__("opslimit", d["kdf"]["opslimit"] + 1),
    "memlimit": lambda d: d["kdf"].__setitem__("memlimit", d["kdf"]["memlimit"] + 1024),
}


@pytest.mark.parametrize("field", sorted(TAMPERS))
def test_accidental_change_is_reported_as_damage(ks, field):
    ks.create("alice", PASS)
    doc = _doc(ks, "alice")
    TAMPERS[field](doc)
    _write_doc(ks, "alice", doc, fix_checksum=False)
    with pytest.raises(FailedPrecondition, match="alice.json is damaged: its checksum does not match"):
        ks.unlock("alice", PASS)


@pytest.mark.parametrize("field", sorted(TAMPERS))
def test_deliberate_tamper_with_fixed_checksum_never_unlocks(ks, field):
    ks.create("alice", PASS)
    doc = _doc(ks, "alice")
    TAMPERS[field](doc)
    _write_doc(ks, "alice", doc, fix_checksum=True)
    # the AEAD tag (over the bound params) refuses it; only the passphrase holder can tell the cause
    with pytest.raises(Unauthenticated, match="the file was altered"):
        ks.unlock("alice", PASS)


def test_address_tamper_is_detected(ks):
    ks.create("alice", PASS)
    doc = _doc(ks, "alice")
    doc["address"] = PrivateKey.generate().address
    _write_doc(ks, "alice", doc, fix_checksum=False)
    with pytest.raises(FailedPrecondition, match="checksum"):
        ks.unlock("alice", PASS)
    _write_doc(ks, "alice", doc, fix_checksum=True)
    with pytest.raises(FailedPrecondition, match="does not belong to the public key"):
        ks.unlock("alice", PASS)
    with pytest.raises(FailedPrecondition, match="does not belong to the public key"):
        ks.list()  # list checks it too, without the passphrase


def test_swapping_in_another_consistent_identity_is_detected(ks):
    ks.create("alice", PASS)
    doc = _doc(ks, "alice")
    other = PrivateKey.generate()
    doc["address"], doc["pubkey"] = other.address, other.pubkey.hex()
    _write_doc(ks, "alice", doc, fix_checksum=True)
    with pytest.raises(Unauthenticated):  # address and pubkey are in the AEAD associated data
        ks.unlock("alice", PASS)


def test_file_whose_key_does_not_match_its_address_is_detected(ks):
    """A writer that encrypted the wrong secret under a valid tag (buggy or malicious software)."""
    ks.create("alice", PASS)
    parsed = k.parse_keystore(ks.path("alice").read_bytes(), source="x")
    wrong = PrivateKey.generate()
    import nacl.bindings

    aead_key = k.derive_key(PASS, parsed.salt, parsed.kdf)
    ad = k.associated_data(parsed.address, parsed.pubkey, parsed.kdf, parsed.salt)
    ct = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(wrong.secret, ad, parsed.nonce, aead_key)
    doc = _doc(ks, "alice")
    doc["cipher"]["ciphertext"] = ct.hex()
    _write_doc(ks, "alice", doc, fix_checksum=True)
    with pytest.raises(FailedPrecondition, match=f"decrypts to the key of {wrong.address}"):
        ks.unlock("alice", PASS)


def test_name_and_created_at_are_labels_not_secrets(ks):
    """They are covered by the checksum but not by the AEAD: import renames without re-encrypting."""
    ks.create("alice", PASS)
    doc = _doc(ks, "alice")
    doc["created_at"] = "2020-01-01T00:00:00Z"
    _write_doc(ks, "alice", doc, fix_checksum=False)
    with pytest.raises(FailedPrecondition, match="checksum"):
        ks.unlock("alice", PASS)
    _write_doc(ks, "alice", doc, fix_checksum=True)
    assert ks.unlock("alice", PASS)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.__setitem__("version", 2), "format version 2, but this aitbc reads version 1 only"),
        (lambda d: d.__setitem__("version", "1"), "'version' must be an integer"),
        (lambda d: d.pop("version"), "'version' field is missing"),
        (lambda d: d.pop("pubkey"), "'pubkey' field is missing"),
        (lambda d: d.__setitem__("extra", 1), "unexpected field 'extra'"),
        (lambda d: d["kdf"].__setitem__("name", "scrypt"), "kdf.name must be 'argon2id'"),
        (lambda d: d["cipher"].__setitem__("name", "aes"), "cipher.name must be"),
        (lambda d: d["kdf"].__setitem__("opslimit", 0), "opslimit must be an integer"),
        (lambda d: d["kdf"].__setitem__("salt", "00"), "'kdf.salt' must be 32 lowercase hex"),
        (lambda d: d["cipher"].__setitem__("ciphertext", "ab" * 47), "'cipher.ciphertext' must be 96"),
        (lambda d: d["cipher"].__setitem__("nonce", "XY" * 24), "'cipher.nonce' must be 48"),
        (lambda d: d.__setitem__("pubkey", "04" + "00" * 32), "'pubkey' is not a valid"),
        (lambda d: d.__setitem__("address", "ait1bad"), "'address'"),
        (lambda d: d.__setitem__("created_at", "yesterday"), "'created_at' must look like"),
        (lambda d: d.__setitem__("created_at", "2026-13-40T25:00:00Z"), "'created_at' must look like"),
        (lambda d: d.__setitem__("name", "../x"), "'name'"),
        (lambda d: d.__setitem__("kdf", []), "'kdf' must be an object"),
    ],
)
def test_structural_damage_has_a_clear_message(ks, mutate, message):
    ks.create("alice", PASS)
    doc = _doc(ks, "alice")
    mutate(doc)
    _write_doc(ks, "alice", doc, fix_checksum="checksum" in doc)
    with pytest.raises(FailedPrecondition) as err:
        ks.unlock("alice", PASS)
    assert message in err.value.message
    if "version 2" not in message:
        assert "is damaged" in err.value.message


def test_every_single_bit_flip_is_refused(ks):
    ks.create("alice", PASS)
    original = ks.path("alice").read_bytes()
    for i in range(len(original)):
        for bit in (0x01, 0x20):
            damaged = bytearray(original)
            damaged[i] ^= bit
            ks.path("alice").write_bytes(bytes(damaged))
            try:
                ks.unlock("alice", PASS)
            except AitbcError:
                continue
            raise AssertionError(f"flipping bit {bit:#x} of byte {i} went unnoticed")
    ks.path("alice").write_bytes(original)
    assert ks.unlock("alice", PASS)


def test_every_truncation_is_refused_as_damage(ks):
    ks.create("alice", PASS)
    original = ks.path("alice").read_bytes()
    # the trailing newline is optional JSON whitespace; everything shorter is damage
    for n in range(len(original.rstrip())):
        ks.path("alice").write_bytes(original[:n])
        with pytest.raises(FailedPrecondition, match="alice.json is damaged"):
            ks.unlock("alice", PASS)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "it is empty"),
        (b"\xff\xfe", "not UTF-8"),
        (b"[1, 2]", "not a JSON object"),
        (b"null", "not a JSON object"),
        (b"{" * 100_000, "far larger"),
        (b"[" * 5000 + b"]" * 5000, "not valid JSON"),
    ],
)
def test_garbage_files(ks, data, message):
    ks.create("alice", PASS)
    ks.path("alice").write_bytes(data)
    with pytest.raises(FailedPrecondition, match=message):
        ks.unlock("alice", PASS)
    with pytest.raises(FailedPrecondition):
        ks.export("alice")


def test_import_of_a_dict_with_non_json_values_is_refused(ks):
    ks.create("alice", PASS)
    doc = _doc(ks, "alice")
    doc["name"] = b"bytes"
    with pytest.raises(InvalidArgument, match="not JSON"):
        ks.import_file("copy", doc)
