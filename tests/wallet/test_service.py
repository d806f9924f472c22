"""WalletCore: bad input refused before the ledger is asked, locking, export/import, and sends and
receipt checks against a real single-authority ledger node (in this process, 127.0.0.1 port 0)."""

from __future__ import annotations

import json

import pytest

from aitbc import crypto, errors
from aitbc.ledger.client import LedgerClient
from aitbc.ledger.genesis import make_genesis
from aitbc.ledger.store import MemoryStore
from aitbc.ledger.tx import KIND_TRANSFER, decode_tx, verify_tx_signature
from aitbc.receipts import ReceiptBody, SignedReceipt, sign_receipt
from aitbc.server.ledger import start_node
from aitbc.wallet.keystore import INSECURE_FAST_KDF, Keystore
from aitbc.wallet.service import WalletCore, check_address, kdf_for_profile, parse_amount

pytestmark = pytest.mark.timeout(60)

CHAIN = "aitbc-wallet-test"
PASS = "correct horse battery staple"


def key(n: int) -> crypto.PrivateKey:
    return crypto.PrivateKey(crypto.sha256(b"aitbc-wallet-test-key-%d" % n))


AUTHORITY, ATTESTER, PROVIDER, BOB = key(1), key(2), key(3), key(4)
GENESIS = make_genesis(CHAIN, [AUTHORITY.address], [ATTESTER.address], block_time_ms=100,
                       max_price_per_unit=1000, max_mint_per_receipt=10**12)
GH = GENESIS.hash().hex()  # offline signing names the genesis hash with the chain id


def receipt(i: int, *, units: int = 100, price: int = 10, provider: crypto.PrivateKey = PROVIDER,
            chain_id: str = CHAIN) -> SignedReceipt:
    body = ReceiptBody(
        job_id=f"job-{i}", provider=provider.address, client="client-1", units=units, unit_type="gpu_ms", version=1,
        price_per_unit=price, model="tiny-sd", prompt_hash="ab" * 32, started_at=1000, finished_at=2000,
        artifact_sha256="cd" * 32, nonce=f"{i:032x}", hub_id="", chain_id=chain_id)
    return sign_receipt(body, provider).attest(ATTESTER)


def bad_checksum(address: str) -> str:
    last = address[-1]
    return address[:-1] + ("q" if last != "q" else "p")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def core(tmp_path, clock) -> WalletCore:
    # no ledger: everything below must be refused without one
    return WalletCore(Keystore(tmp_path / "ks", kdf=INSECURE_FAST_KDF), None, idle_lock_s=60, clock=clock)


@pytest.fixture
async def ledger():
    node, server = await start_node(MemoryStore(), GENESIS, AUTHORITY, "127.0.0.1:0")
    client = LedgerClient(f"127.0.0.1:{server.port}")
    yield client
    await client.close()
    await node.stop()
    await server.stop(0)


async def fund(ledger: LedgerClient, i: int = 1, **kw) -> SignedReceipt:
    r = receipt(i, **kw)
    await ledger.mint(ATTESTER, r)
    await ledger.wait_for_receipt(r.receipt_hash, final=True)
    return r


# ---- pure checks ----------------------------------------------------------------------------

def test_amounts_are_positive_integers_only():
    assert parse_amount("250") == 250 and parse_amount(7) == 7 and parse_amount("1_000") == 1000
    assert parse_amount(str(2**64 - 1)) == 2**64 - 1
    for bad in ("1.5", "0", "-1", "1e3", "", " ", "0x10", "ten", 0, -5, 1.5, True, None, 2**64, str(2**64)):
        with pytest.raises(errors.InvalidArgument, match="amount"):
            parse_amount(bad)


def test_bad_address_checksum_is_named():
    with pytest.raises(errors.InvalidArgument, match="checksum"):
        check_address(bad_checksum(BOB.address))
    with pytest.raises(errors.InvalidArgument, match="empty"):
        check_address("")
    assert check_address(f" {BOB.address} ") == BOB.address


def test_kdf_profiles():
    assert kdf_for_profile("fast") == INSECURE_FAST_KDF
    assert kdf_for_profile("default").memlimit == 64 * 1024 * 1024
    with pytest.raises(errors.InvalidArgument, match="kdf_profile"):
        kdf_for_profile("none")


# ---- keystore side, no ledger ---------------------------------------------------------------

async def test_bad_transfers_are_refused_before_any_ledger_call(core):
    alice = core.create("alice", PASS).address
    cases = [
        (("alice", BOB.address, 0), errors.InvalidArgument, "amount must be at least 1"),
        (("alice", BOB.address, "1.5"), errors.InvalidArgument, "whole number"),
        (("alice", bad_checksum(BOB.address), 5), errors.InvalidArgument, "checksum"),
        (("nobody", BOB.address, 5), errors.NotFound, "wallet 'nobody' does not exist"),
        (("alice", alice, 5), errors.InvalidArgument, "cannot send to the sending wallet's own address"),
        (("alice", BOB.address, 5), errors.FailedPrecondition, "wallet 'alice' is locked: unlock it first"),
    ]
    for (wallet, to, amount), cls, msg in cases:
        with pytest.raises(cls, match=msg):
            await core.send(wallet, to, amount)
        with pytest.raises(cls, match=msg):
            await core.sign_transfer(wallet, to, amount, nonce=0, chain_id=CHAIN, genesis_hash=GH)
    core.unlock("alice", PASS)
    with pytest.raises(errors.FailedPrecondition, match="no ledger node is configured"):
        await core.send("alice", BOB.address, 5)


def test_wrong_passphrase_and_damaged_files(core, tmp_path):
    core.create("alice", PASS)
    with pytest.raises(errors.Unauthenticated, match="wrong passphrase for wallet 'alice'"):
        core.unlock("alice", "not it")
    assert not core.unlocked.is_unlocked("alice")
    path = core.keystore.path("alice")
    exported = path.read_text()
    path.write_text(exported[: len(exported) // 2])  # truncated
    with pytest.raises(errors.FailedPrecondition, match="is damaged: it is not valid JSON"):
        core.unlock("alice", PASS)
    with pytest.raises(errors.FailedPrecondition, match="damaged"):
        core.list()
    other = WalletCore(Keystore(tmp_path / "other", kdf=INSECURE_FAST_KDF))
    with pytest.raises(errors.InvalidArgument, match="damaged: it is not valid JSON"):
        other.import_keystore("copy", exported[:-40])
    flipped = exported.replace('"created_at": "', '"created_at": "1', 1)
    with pytest.raises(errors.InvalidArgument, match="checksum does not match"):
        other.import_keystore("copy", flipped)
    assert other.list() == []


def test_export_then_import_elsewhere_keeps_the_address(core, tmp_path):
    made = core.create("alice", PASS)
    doc = core.export("alice")
    assert "ciphertext" in doc and PASS not in doc
    other = WalletCore(Keystore(tmp_path / "elsewhere", kdf=INSECURE_FAST_KDF))
    with pytest.raises(errors.Unauthenticated, match="wrong passphrase"):
        other.import_keystore("restored", doc, "not it")
    assert other.list() == []
    got = other.import_keystore("restored", doc, PASS)
    assert (got.name, got.address) == ("restored", made.address)
    assert other.unlock("restored", PASS).address == made.address
    kept = WalletCore(Keystore(tmp_path / "third", kdf=INSECURE_FAST_KDF)).import_keystore(None, json.loads(doc))
    assert (kept.name, kept.address) == ("alice", made.address)


def test_import_a_miner_key(core, tmp_path):
    assert core.import_key("miner", PROVIDER.secret.hex() + "\n", PASS).address == PROVIDER.address
    with pytest.raises(errors.AlreadyExists, match="already in wallet 'miner'"):
        core.import_key("again", PROVIDER.secret.hex(), PASS)
    with pytest.raises(errors.InvalidArgument, match="private key must be 64 hex"):
        core.import_key("junk", "not a key", PASS)
    # a path where key material belongs is just wrong key material: no file is read
    keyfile = tmp_path / "other.key"
    keyfile.write_text(BOB.secret.hex())
    with pytest.raises(errors.InvalidArgument, match="private key must be 64 hex"):
        core.import_key("bob", str(keyfile), PASS)
    assert [w.name for w in core.list()] == ["miner"]


async def test_unlock_times_out_and_lock_refuses(core, clock):
    core.create("alice", PASS)
    core.unlock("alice", PASS, timeout_s=5)
    signed = await core.sign_transfer("alice", BOB.address, 42, nonce=3, chain_id=CHAIN, genesis_hash=GH)
    tx = decode_tx(signed.raw)
    verify_tx_signature(tx)
    assert (tx.kind, tx.nonce, tx.amount, tx.to_address, tx.sender, tx.chain_id) == (
        KIND_TRANSFER, 3, 42, BOB.address, core.info("alice").address, CHAIN)
    assert signed.tx_hash == crypto.sha256(signed.raw).hex()
    clock.now += 4.9  # signing reset the idle timer
    await core.sign_transfer("alice", BOB.address, 1, nonce=4, chain_id=CHAIN, genesis_hash=GH)
    clock.now += 5.0
    with pytest.raises(errors.FailedPrecondition, match="wallet 'alice' is locked: unlock it first"):
        await core.sign_transfer("alice", BOB.address, 1, nonce=5, chain_id=CHAIN, genesis_hash=GH)
    assert core.list()[0].unlocked is False
    core.unlock("alice", PASS)
    assert core.lock("alice") is True and core.lock("alice") is False
    with pytest.raises(errors.FailedPrecondition, match="locked"):
        await core.sign_transfer("alice", BOB.address, 1, nonce=5, chain_id=CHAIN, genesis_hash=GH)
    with pytest.raises(errors.NotFound):
        core.lock("nobody")


# ---- against a real ledger node -------------------------------------------------------------

async def test_send_moves_balance_and_nonce(tmp_path, ledger):
    core = WalletCore(Keystore(tmp_path / "ks", kdf=INSECURE_FAST_KDF), ledger)
    await fund(ledger)  # 100 units x 10 = 1000 to PROVIDER
    core.import_key("miner", PROVIDER.secret.hex(), PASS)
    b = await core.balance("miner")
    assert (b.wallet, b.address, b.balance, b.nonce) == ("miner", PROVIDER.address, 1000, 0)
    with pytest.raises(errors.FailedPrecondition, match="locked"):
        await core.send("miner", BOB.address, 250)
    core.unlock("miner", PASS)
    r = await core.send("miner", BOB.address, 250)  # in a block; final once votes certify it (one block on)
    assert r.included and r.block_height >= 1 and r.nonce == 0 and len(r.tx_hash) == 64
    assert (await ledger.get_transaction(r.tx_hash)).block_height == r.block_height
    b = await core.balance("miner")
    assert (b.balance, b.nonce, b.pending_nonce) == (750, 1, 1)
    assert (await core.balance(BOB.address)).balance == 250
    r2 = await core.send("miner", BOB.address, 50, final=True)
    assert r2.nonce == 1 and r2.final

    with pytest.raises(errors.FailedPrecondition, match="^insufficient balance"):
        await core.send("miner", BOB.address, 10**6)
    for bad in ((BOB.address, 0), (bad_checksum(BOB.address), 1), (PROVIDER.address, 1)):
        with pytest.raises(errors.InvalidArgument):
            await core.send("miner", *bad)
    b = await core.balance("miner")
    assert (b.balance, b.nonce) == (700, 2)
    assert (await core.balance(BOB.address)).balance == 300

    unsent = await core.sign_transfer("miner", BOB.address, 7)  # nonce, chain id and genesis from the ledger
    assert (unsent.nonce, unsent.chain_id) == (2, CHAIN)
    assert decode_tx(unsent.raw).genesis_hash.hex() == GH
    with pytest.raises(errors.InvalidArgument, match="give chain_id and genesis_hash together"):
        await core.sign_transfer("miner", BOB.address, 7, nonce=2, chain_id=CHAIN)
    assert (await core.balance("miner")).pending_nonce == 2  # not broadcast
    assert await ledger.broadcast(unsent.raw) == unsent.tx_hash
    await core.close()


async def test_verify_receipt_valid_tampered_and_minted_once(tmp_path, ledger):
    core = WalletCore(Keystore(tmp_path / "ks", kdf=INSECURE_FAST_KDF), ledger)
    r = receipt(7, units=30, price=5)
    doc = r.to_json_dict()
    check = await core.verify_receipt(json.dumps(doc), check_ledger=True, attesters=[ATTESTER.address])
    assert check.valid and check.mint_status == "not_minted" and check.amount == 150
    assert (check.provider, check.attester, check.receipt_hash) == (PROVIDER.address, ATTESTER.address,
                                                                   r.receipt_hash.hex())
    tx_hash = await ledger.mint(ATTESTER, r)
    await ledger.wait_for_receipt(r.receipt_hash, final=True)
    with pytest.raises(errors.AlreadyExists, match="receipt already minted"):
        await ledger.mint(ATTESTER, r)
    check = await core.verify_receipt(doc, check_ledger=True)
    assert (check.valid, check.mint_status, check.mint_tx_hash, check.minted_amount) == (True, "final", tx_hash, 150)
    assert check.mint_block_height >= 1

    altered = json.loads(json.dumps(doc))
    altered["receipt"]["units"] = 3000
    bad = await core.verify_receipt(altered)
    assert not bad.valid and "a field was altered" in bad.error
    altered["receipt_hash"] = ReceiptBody.from_dict(altered["receipt"]).hash().hex()
    bad = await core.verify_receipt(altered, check_ledger=True)
    assert not bad.valid and "provider signature is by" in bad.error and bad.mint_status == ""
    forged = receipt(8, provider=key(9)).to_json_dict()
    forged["receipt"]["provider"] = PROVIDER.address
    forged.pop("receipt_hash")
    assert not (await core.verify_receipt(forged)).valid
    other = key(33)
    assert "not authorized" in (await core.verify_receipt(doc, attesters=[other.address])).error
    unattested = sign_receipt(r.body, PROVIDER).to_json_dict()
    assert (await core.verify_receipt(unattested)).valid
    assert "not attested" in (await core.verify_receipt(unattested, require_attestation=True)).error
    wrong_chain = await core.verify_receipt(receipt(9, chain_id="other-chain").to_json_dict(), check_ledger=True)
    assert not wrong_chain.valid and "ledger runs 'aitbc-wallet-test'" in wrong_chain.error
    with pytest.raises(errors.InvalidArgument, match="not valid JSON"):
        await core.verify_receipt("{not json")
    twice = json.dumps(doc).replace('"units": ', '"units": 1, "units": ', 1)
    # one file, one receipt: a duplicated key is refused, not "the last one wins"
    with pytest.raises(errors.InvalidArgument, match='^receipt file has a duplicate key "units"'):
        await core.verify_receipt(twice)
    with pytest.raises(errors.InvalidArgument, match="JSON object"):
        await core.verify_receipt("[1]")
    await core.close()
