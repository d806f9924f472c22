"""The wallet daemon: a real WalletService on its default unix socket (in tmp_path) in front of a
real single-authority ledger node (both in this process), called through the generated stubs over a
channel that carries the daemon's token (aitbc.wallet.access.channel). Who may call: test_access.py."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from aitbc import errors
from aitbc.config import WalletConfig
from aitbc.ledger.client import LedgerClient
from aitbc.ledger.store import MemoryStore
from aitbc.ledger.tx import decode_tx, verify_tx_signature
from aitbc.server.ledger import start_node
from aitbc.server.wallet import SERVICE_NAME, start_wallet_daemon, stop_wallet_daemon
from aitbc.v1 import wallet_pb2 as W
from aitbc.v1 import wallet_pb2_grpc
from aitbc.wallet import access
from aitbc.wallet.keystore import INSECURE_FAST_KDF, Keystore
from aitbc.wallet.service import WalletCore

from .test_service import (
    ATTESTER,
    AUTHORITY,
    BOB,
    CHAIN,
    GENESIS,
    GH,
    PASS,
    PROVIDER,
    bad_checksum,
    fund,
    receipt,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def env(tmp_path):
    node, node_server = await start_node(MemoryStore(), GENESIS, AUTHORITY, "127.0.0.1:0")
    ledger = LedgerClient(f"127.0.0.1:{node_server.port}")
    conf = WalletConfig(keystore_dir=str(tmp_path / "wallets"), ledger=ledger_target(node_server),
                        idle_lock_s=30, kdf_profile="fast")
    daemon = await start_wallet_daemon(conf)
    ch = access.channel(tmp_path / "wallets")
    yield wallet_pb2_grpc.WalletServiceStub(ch), ledger, ch, tmp_path
    await ch.close()
    await stop_wallet_daemon(daemon)
    await ledger.close()
    await node.stop()
    await node_server.stop(0)


def ledger_target(server) -> str:
    return f"127.0.0.1:{server.port}"


async def status_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code(), info.value.details()


async def balances(ledger: LedgerClient) -> tuple[int, int, int]:
    p, b = await ledger.get_account(PROVIDER.address), await ledger.get_account(BOB.address)
    return p.balance, p.nonce, b.balance


async def test_health_reflection_and_wallet_lifecycle(env):
    stub, ledger, ch, tmp = env
    health = health_pb2_grpc.HealthStub(ch)
    resp = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(ch)
    async for answer in refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])):
        assert SERVICE_NAME in [s.name for s in answer.list_services_response.service]

    made = (await stub.CreateWallet(W.CreateWalletRequest(name="alice", passphrase=PASS))).wallet
    assert made.name == "alice" and made.address.startswith("ait1") and not made.unlocked
    code, msg = await status_of(stub.CreateWallet(W.CreateWalletRequest(name="alice", passphrase=PASS)))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    code, msg = await status_of(stub.CreateWallet(W.CreateWalletRequest(name="bob", passphrase="")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "passphrase" in msg
    imported = (await stub.ImportWallet(W.ImportWalletRequest(name="miner", passphrase=PASS,
                                                              private_key_hex=PROVIDER.secret.hex()))).wallet
    assert imported.address == PROVIDER.address
    code, msg = await status_of(stub.ImportWallet(W.ImportWalletRequest(name="x", passphrase=PASS,
                                                                        private_key_hex="zz")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "64 hex" in msg
    listed = (await stub.ListWallets(W.ListWalletsRequest())).wallets
    assert [(w.name, w.address) for w in listed] == [("alice", made.address), ("miner", PROVIDER.address)]

    # wrong passphrase, then unlock, then lock
    code, msg = await status_of(stub.UnlockWallet(W.UnlockWalletRequest(name="alice", passphrase="nope")))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "wrong passphrase for wallet 'alice'" in msg
    code, _ = await status_of(stub.UnlockWallet(W.UnlockWalletRequest(name="ghost", passphrase=PASS)))
    assert code == grpc.StatusCode.NOT_FOUND
    u = await stub.UnlockWallet(W.UnlockWalletRequest(name="alice", passphrase=PASS))
    assert u.wallet.unlocked and u.timeout_ms == 30_000
    assert [w.unlocked for w in (await stub.ListWallets(W.ListWalletsRequest())).wallets] == [True, False]
    assert (await stub.LockWallet(W.LockWalletRequest(name="alice"))).was_unlocked
    assert not (await stub.LockWallet(W.LockWalletRequest(name="alice"))).was_unlocked

    # export -> import into another keystore -> same address, same passphrase
    exp = await stub.ExportWallet(W.ExportWalletRequest(name="alice"))
    assert exp.address == made.address and PASS not in exp.keystore_json
    elsewhere = WalletCore(Keystore(tmp / "elsewhere", kdf=INSECURE_FAST_KDF))
    assert elsewhere.import_keystore("alice2", exp.keystore_json, PASS).address == made.address
    assert elsewhere.unlock("alice2", PASS).address == made.address
    code, msg = await status_of(stub.ImportWallet(W.ImportWalletRequest(name="again",
                                                                        keystore_json=exp.keystore_json)))
    assert code == grpc.StatusCode.ALREADY_EXISTS and "already in wallet 'alice'" in msg
    code, msg = await status_of(stub.ImportWallet(W.ImportWalletRequest(
        name="cut", keystore_json=exp.keystore_json[:100])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "damaged" in msg

    # a corrupted file on disk is named, not skipped
    (tmp / "wallets" / "alice.json").write_text(exp.keystore_json[:-30])
    code, msg = await status_of(stub.UnlockWallet(W.UnlockWalletRequest(name="alice", passphrase=PASS)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "alice.json is damaged" in msg


async def test_send_and_every_bad_input(env):
    stub, ledger, ch, tmp = env
    await fund(ledger)  # 1000 to PROVIDER
    await stub.ImportWallet(W.ImportWalletRequest(name="miner", passphrase=PASS, private_key_hex=PROVIDER.secret.hex()))
    bal = await stub.GetBalance(W.GetBalanceRequest(wallet="miner"))
    assert (bal.address, bal.balance, bal.nonce, bal.wallet) == (PROVIDER.address, 1000, 0, "miner")
    assert (await stub.GetBalance(W.GetBalanceRequest(address=BOB.address))).balance == 0
    code, msg = await status_of(stub.GetBalance(W.GetBalanceRequest(address=bad_checksum(BOB.address))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "checksum" in msg
    code, _ = await status_of(stub.GetBalance(W.GetBalanceRequest(wallet="ghost")))
    assert code == grpc.StatusCode.NOT_FOUND

    def send(frm="miner", to=BOB.address, amount=100, **kw):
        return stub.Send(W.SendRequest(from_wallet=frm, to=to, amount=amount, wait_for_inclusion=True, **kw))

    code, msg = await status_of(send())
    assert (code, msg) == (grpc.StatusCode.FAILED_PRECONDITION, "wallet 'miner' is locked: unlock it first")
    code, msg = await status_of(stub.SignTransaction(W.SignTransactionRequest(
        from_wallet="miner", to=BOB.address, amount=1)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "locked" in msg
    await stub.UnlockWallet(W.UnlockWalletRequest(name="miner", passphrase=PASS))

    bad = [
        (send(amount=0), grpc.StatusCode.INVALID_ARGUMENT, "amount must be at least 1"),
        (send(to=bad_checksum(BOB.address)), grpc.StatusCode.INVALID_ARGUMENT, "checksum"),
        (send(to="bob"), grpc.StatusCode.INVALID_ARGUMENT, "recipient address 'bob' is not valid"),
        (send(frm="ghost"), grpc.StatusCode.NOT_FOUND, "wallet 'ghost' does not exist"),
        (send(to=PROVIDER.address), grpc.StatusCode.INVALID_ARGUMENT,
         "cannot send to the sending wallet's own address"),
        (send(amount=10**6), grpc.StatusCode.FAILED_PRECONDITION, "insufficient balance"),
        (send(amount=2**64 - 1), grpc.StatusCode.FAILED_PRECONDITION, "insufficient balance"),
    ]
    for call, want, text in bad:
        code, msg = await status_of(call)
        assert code == want and text in msg, (code, msg)
    assert await balances(ledger) == (1000, 0, 0)

    r = await send(amount=250, wait_for_final=True)
    assert r.included and r.final and r.block_height >= 1 and r.nonce == 0 and r.from_address == PROVIDER.address
    st = await ledger.get_transaction(r.tx_hash)
    assert (st.status, st.block_height, st.block_hash) == ("final", r.block_height, r.block_hash)
    assert await balances(ledger) == (750, 1, 250)

    # concurrent sends from one wallet get consecutive nonces
    rs = await asyncio.gather(*(send(amount=10 + i) for i in range(3)))
    assert sorted(x.nonce for x in rs) == [1, 2, 3]
    assert await balances(ledger) == (750 - 33, 4, 250 + 33)

    nowait = await stub.Send(W.SendRequest(from_wallet="miner", to=BOB.address, amount=1))
    assert not nowait.included and nowait.block_height == 0
    await ledger.wait_for_tx(nowait.tx_hash)

    signed = await stub.SignTransaction(W.SignTransactionRequest(from_wallet="miner", to=BOB.address, amount=5))
    tx = decode_tx(signed.raw)
    verify_tx_signature(tx)
    assert (signed.nonce, signed.chain_id, tx.amount, tx.sender) == (5, CHAIN, 5, PROVIDER.address)
    assert (await ledger.get_account(PROVIDER.address)).pending_nonce == 5  # not broadcast
    offline = await stub.SignTransaction(W.SignTransactionRequest(from_wallet="miner", to=BOB.address, amount=5,
                                                                  nonce=0, chain_id="some-other-chain",
                                                                  genesis_hash="ab" * 32))
    assert decode_tx(offline.raw).chain_id == "some-other-chain" and offline.nonce == 0
    assert decode_tx(offline.raw).genesis_hash == bytes.fromhex("ab" * 32)
    code, msg = await status_of(stub.SignTransaction(W.SignTransactionRequest(
        from_wallet="miner", to=BOB.address, amount=5, nonce=0, chain_id="some-other-chain")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "give chain_id and genesis_hash together" in msg
    assert await ledger.broadcast(signed.raw) == signed.tx_hash
    await ledger.wait_for_tx(signed.tx_hash)
    assert await balances(ledger) == (750 - 33 - 1 - 5, 6, 250 + 33 + 1 + 5)

    await stub.LockWallet(W.LockWalletRequest(name="miner"))
    code, _ = await status_of(send())
    assert code == grpc.StatusCode.FAILED_PRECONDITION


async def test_unlock_timeout_locks_the_wallet(env):
    stub, ledger, ch, tmp = env
    await stub.ImportWallet(W.ImportWalletRequest(name="miner", passphrase=PASS, private_key_hex=PROVIDER.secret.hex()))
    u = await stub.UnlockWallet(W.UnlockWalletRequest(name="miner", passphrase=PASS, timeout_ms=300))
    assert u.timeout_ms == 300
    req = W.SignTransactionRequest(from_wallet="miner", to=BOB.address, amount=1, nonce=0, chain_id=CHAIN,
                                   genesis_hash=GH)
    assert (await stub.SignTransaction(req)).raw
    await asyncio.sleep(0.6)
    assert [w.unlocked for w in (await stub.ListWallets(W.ListWalletsRequest())).wallets] == [False]
    code, msg = await status_of(stub.SignTransaction(req))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "wallet 'miner' is locked: unlock it first" in msg


async def test_verify_receipt(env):
    stub, ledger, ch, tmp = env
    r = receipt(5, units=20, price=3)
    doc = json.dumps(r.to_json_dict())
    v = await stub.VerifyReceipt(W.VerifyReceiptRequest(receipt_json=doc, check_ledger=True,
                                                        attesters=[ATTESTER.address], require_attestation=True))
    assert v.valid and v.mint_status == W.MINT_STATUS_NOT_MINTED and v.amount == 60
    assert v.receipt_hash == r.receipt_hash.hex() and v.provider == PROVIDER.address
    offline = await stub.VerifyReceipt(W.VerifyReceiptRequest(receipt_json=doc))
    assert offline.valid and offline.mint_status == W.MINT_STATUS_UNSPECIFIED
    tx_hash = await ledger.mint(ATTESTER, r)
    await ledger.wait_for_receipt(r.receipt_hash, final=True)
    v = await stub.VerifyReceipt(W.VerifyReceiptRequest(receipt_json=doc, check_ledger=True))
    assert (v.valid, v.mint_status, v.mint_tx_hash, v.minted_amount) == (True, W.MINT_STATUS_FINAL, tx_hash, 60)
    assert (await ledger.get_account(PROVIDER.address)).balance == 60
    # a second MINT of the same receipt is refused; the verdict still names the one mint
    with pytest.raises(errors.AlreadyExists, match="receipt already minted"):
        await ledger.mint(ATTESTER, r)
    v = await stub.VerifyReceipt(W.VerifyReceiptRequest(receipt_json=doc, check_ledger=True))
    assert (v.mint_status, v.mint_tx_hash) == (W.MINT_STATUS_FINAL, tx_hash)
    assert (await ledger.get_account(PROVIDER.address)).balance == 60

    tampered = json.loads(doc)
    tampered["receipt"]["price_per_unit"] = 300
    v = await stub.VerifyReceipt(W.VerifyReceiptRequest(receipt_json=json.dumps(tampered), check_ledger=True))
    assert not v.valid and "altered" in v.error
    code, msg = await status_of(stub.VerifyReceipt(W.VerifyReceiptRequest(receipt_json="not json")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not valid JSON" in msg
    code, msg = await status_of(stub.VerifyReceipt(W.VerifyReceiptRequest(receipt_json=doc, attesters=["ait1bad"])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "attester address" in msg


async def test_stake_and_escrow_through_the_daemon(env):
    """WalletService.Stake and .Escrow sign STAKE/UNSTAKE/WITHDRAW and the escrow transactions with
    an unlocked wallet; what the wallet can check is refused with the next step, the rest with the
    node's message; nothing moves on a refusal."""
    stub, ledger, ch, tmp = env
    await fund(ledger)  # 1000 to PROVIDER
    await stub.ImportWallet(W.ImportWalletRequest(name="miner", passphrase=PASS, private_key_hex=PROVIDER.secret.hex()))
    code, msg = await status_of(stub.Stake(W.StakeRequest(wallet="miner", action=W.STAKE_ACTION_STAKE, amount=1)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "locked: unlock it first" in msg
    await stub.UnlockWallet(W.UnlockWalletRequest(name="miner", passphrase=PASS))

    def stake(action, amount=0):
        return stub.Stake(W.StakeRequest(wallet="miner", action=action, amount=amount, wait_for_inclusion=True))

    code, msg = await status_of(stake(W.STAKE_ACTION_UNSPECIFIED, 5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "action must be" in msg
    code, msg = await status_of(stake(W.STAKE_ACTION_STAKE, 1001))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "balance 1000 is less than 1001: receive 1 more first" in msg
    r = await stake(W.STAKE_ACTION_STAKE, 300)
    assert r.tx.included and (r.staked, r.balance) == (300, 700) and r.tx.address == PROVIDER.address
    code, msg = await status_of(stake(W.STAKE_ACTION_UNSTAKE, 400))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "staked 300 is less than 400: unstake at most 300" in msg
    code, msg = await status_of(stake(W.STAKE_ACTION_WITHDRAW))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "nothing to withdraw" in msg
    r = await stake(W.STAKE_ACTION_UNSTAKE, 100)
    assert (r.staked, r.unbonding) == (200, 100) and r.unlock_height > r.tx.block_height
    code, msg = await status_of(stake(W.STAKE_ACTION_WITHDRAW))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "still unbonding" in msg

    def escrow(action, amount=0, **kw):
        return stub.Escrow(W.EscrowRequest(wallet="miner", action=action, amount=amount, wait_for_inclusion=True, **kw))

    r = await escrow(W.ESCROW_ACTION_DEPOSIT, 250)  # the genesis's only attester by default
    assert (r.attester, r.available, r.balance) == (ATTESTER.address, 250, 450)
    r = await escrow(W.ESCROW_ACTION_WITHDRAW, 50)
    assert (r.available, r.unlocking) == (200, 50) and r.unlock_height > r.tx.block_height
    code, msg = await status_of(escrow(W.ESCROW_ACTION_RECLAIM))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "escrow still locked" in msg
    code, msg = await status_of(escrow(W.ESCROW_ACTION_DEPOSIT, 5, attester=BOB.address))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "attester not authorized" in msg
    acct = await ledger.get_account(PROVIDER.address)
    assert (acct.balance, acct.staked, acct.unbonding) == (450, 200, 100)  # the refusals moved nothing
