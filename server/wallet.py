"""WalletService servicer (thin over aitbc.wallet.service.WalletCore) and the `aitbc wallet-daemon`
process runner.

Handlers parse the request, call the core and map the result; AitbcError becomes its status in
aitbc.rpc.handle_errors. The KDF (create, import, unlock) runs in a worker thread so one unlock
does not stall every other call of the daemon. Who may call is decided before any handler runs:
one rpc.RequireCredential interceptor checks the daemon's token (aitbc.wallet.access) on every
method but Health and reflection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass
from typing import Any

import grpc

from aitbc import rpc, telemetry
from aitbc.config import WalletConfig, write_port_file
from aitbc.errors import InvalidArgument
from aitbc.v1 import wallet_pb2, wallet_pb2_grpc
from aitbc.wallet.access import DaemonAccess
from aitbc.wallet.service import ReceiptCheck, WalletCore, WalletView

log = logging.getLogger("aitbc.server.wallet")
SERVICE_NAME = wallet_pb2.DESCRIPTOR.services_by_name["WalletService"].full_name
# need no token: liveness probes learn only up/down, and reflection only the public schema (so that
# buf curl without the token gets the UNAUTHENTICATED message naming the token file)
OPEN_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection")
W = wallet_pb2

_MINT = {
    "": W.MINT_STATUS_UNSPECIFIED,
    "not_minted": W.MINT_STATUS_NOT_MINTED,
    "pending": W.MINT_STATUS_PENDING,
    "included": W.MINT_STATUS_INCLUDED,
    "final": W.MINT_STATUS_FINAL,
}


def _wallet(v: WalletView) -> wallet_pb2.Wallet:
    return W.Wallet(name=v.name, address=v.address, unlocked=v.unlocked)


def _check_to_proto(c: ReceiptCheck) -> wallet_pb2.VerifyReceiptResponse:
    return W.VerifyReceiptResponse(
        valid=c.valid, error=c.error, receipt_hash=c.receipt_hash, provider=c.provider, attester=c.attester,
        chain_id=c.chain_id, amount=c.amount, mint_status=_MINT[c.mint_status], mint_tx_hash=c.mint_tx_hash,
        mint_block_height=c.mint_block_height, minted_amount=c.minted_amount)


class WalletServicer(wallet_pb2_grpc.WalletServiceServicer):
    def __init__(self, core: WalletCore) -> None:
        self.core = core

    @rpc.handle_errors
    async def CreateWallet(self, request: W.CreateWalletRequest,
                           context: grpc.aio.ServicerContext) -> W.CreateWalletResponse:
        view = await asyncio.to_thread(self.core.create, request.name, request.passphrase)
        log.info("created wallet %s (%s)", view.name, view.address)
        return W.CreateWalletResponse(wallet=_wallet(view))

    @rpc.handle_errors
    async def ImportWallet(self, request: W.ImportWalletRequest,
                           context: grpc.aio.ServicerContext) -> W.ImportWalletResponse:
        which = request.WhichOneof("source")
        if which == "private_key_hex":
            if not request.name:
                raise InvalidArgument("give the new wallet a name")
            view = await asyncio.to_thread(self.core.import_key, request.name, request.private_key_hex,
                                           request.passphrase)
        elif which == "keystore_json":
            view = await asyncio.to_thread(self.core.import_keystore, request.name or None, request.keystore_json,
                                           request.passphrase or None)
        else:
            raise InvalidArgument("give private_key_hex or keystore_json to import")
        log.info("imported wallet %s (%s)", view.name, view.address)
        return W.ImportWalletResponse(wallet=_wallet(view))

    @rpc.handle_errors
    async def ListWallets(self, request: W.ListWalletsRequest,
                          context: grpc.aio.ServicerContext) -> W.ListWalletsResponse:
        return W.ListWalletsResponse(wallets=[_wallet(v) for v in self.core.list()])

    @rpc.handle_errors
    async def ExportWallet(self, request: W.ExportWalletRequest,
                           context: grpc.aio.ServicerContext) -> W.ExportWalletResponse:
        doc = self.core.export(request.name)
        return W.ExportWalletResponse(keystore_json=doc, address=self.core.info(request.name).address)

    @rpc.handle_errors
    async def GetBalance(self, request: W.GetBalanceRequest,
                         context: grpc.aio.ServicerContext) -> W.GetBalanceResponse:
        which = request.WhichOneof("account")
        if which is None:
            raise InvalidArgument("give a wallet name or an address")
        if which == "wallet":
            b = await self.core.wallet_balance(request.wallet)
        else:
            b = await self.core.address_balance(request.address)
        return W.GetBalanceResponse(address=b.address, balance=b.balance, nonce=b.nonce,
                                    pending_nonce=b.pending_nonce, wallet=b.wallet)

    @rpc.handle_errors
    async def UnlockWallet(self, request: W.UnlockWalletRequest,
                           context: grpc.aio.ServicerContext) -> W.UnlockWalletResponse:
        timeout_s = request.timeout_ms / 1000 if request.timeout_ms else None
        view = await asyncio.to_thread(self.core.unlock, request.name, request.passphrase, timeout_s)
        effective = timeout_s if timeout_s is not None else self.core.unlocked.idle_timeout_s
        log.info("unlocked wallet %s for %g s idle", view.name, effective)
        return W.UnlockWalletResponse(wallet=_wallet(view), timeout_ms=int(effective * 1000))

    @rpc.handle_errors
    async def LockWallet(self, request: W.LockWalletRequest,
                         context: grpc.aio.ServicerContext) -> W.LockWalletResponse:
        return W.LockWalletResponse(was_unlocked=self.core.lock(request.name))

    @rpc.handle_errors
    async def Send(self, request: W.SendRequest, context: grpc.aio.ServicerContext) -> W.SendResponse:
        r = await self.core.send(request.from_wallet, request.to, request.amount,
                                 wait=request.wait_for_inclusion, final=request.wait_for_final)
        log.info("sent %d from %s to %s: tx %s", r.amount, request.from_wallet, r.to, r.tx_hash)
        return W.SendResponse(tx_hash=r.tx_hash, nonce=r.nonce, included=r.included, block_height=r.block_height,
                              block_hash=r.block_hash, final=r.final, from_address=r.from_address)

    @rpc.handle_errors
    async def SignTransaction(self, request: W.SignTransactionRequest,
                              context: grpc.aio.ServicerContext) -> W.SignTransactionResponse:
        nonce = request.nonce if request.HasField("nonce") else None
        s = await self.core.sign_transfer(request.from_wallet, request.to, request.amount, nonce=nonce,
                                          chain_id=request.chain_id or None,
                                          genesis_hash=request.genesis_hash or None)
        return W.SignTransactionResponse(raw=s.raw, tx_hash=s.tx_hash, nonce=s.nonce, chain_id=s.chain_id)

    @rpc.handle_errors
    async def Stake(self, request: W.StakeRequest, context: grpc.aio.ServicerContext) -> W.StakeResponse:
        op = _STAKE_OPS.get(request.action)
        if op is None:
            raise InvalidArgument("action must be STAKE, UNSTAKE or WITHDRAW", field="action")
        r = await self.core.economy(request.wallet, op, amount=request.amount, wait=request.wait_for_inclusion,
                                    final=request.wait_for_final)
        log.info("%s %d from %s: tx %s", op, r.amount, request.wallet, r.tx_hash)
        acct = await self.core.ledger.get_account(r.from_address)
        return W.StakeResponse(tx=_economy_tx(r), staked=acct.staked, unbonding=acct.unbonding,
                               unlock_height=acct.unlock_height, balance=acct.balance)

    @rpc.handle_errors
    async def Escrow(self, request: W.EscrowRequest, context: grpc.aio.ServicerContext) -> W.EscrowResponse:
        op = _ESCROW_OPS.get(request.action)
        if op is None:
            raise InvalidArgument("action must be DEPOSIT, WITHDRAW or RECLAIM", field="action")
        attester = await self.core.default_attester(request.attester or None)
        r = await self.core.economy(request.wallet, op, amount=request.amount, attester=attester,
                                    wait=request.wait_for_inclusion, final=request.wait_for_final)
        log.info("%s %d from %s for %s: tx %s", op, r.amount, request.wallet, attester, r.tx_hash)
        esc = await self.core.ledger.get_escrow(r.from_address, attester)
        acct = await self.core.ledger.get_account(r.from_address)
        return W.EscrowResponse(tx=_economy_tx(r), attester=attester, available=esc.available,
                                unlocking=esc.unlocking, unlock_height=esc.unlock_height, balance=acct.balance)

    @rpc.handle_errors
    async def VerifyReceipt(self, request: W.VerifyReceiptRequest,
                            context: grpc.aio.ServicerContext) -> W.VerifyReceiptResponse:
        check = await self.core.verify_receipt(request.receipt_json, check_ledger=request.check_ledger,
                                               attesters=list(request.attesters),
                                               require_attestation=request.require_attestation)
        return _check_to_proto(check)


_STAKE_OPS = {W.STAKE_ACTION_STAKE: "stake", W.STAKE_ACTION_UNSTAKE: "unstake", W.STAKE_ACTION_WITHDRAW: "withdraw"}
_ESCROW_OPS = {W.ESCROW_ACTION_DEPOSIT: "escrow_deposit", W.ESCROW_ACTION_WITHDRAW: "escrow_withdraw",
               W.ESCROW_ACTION_RECLAIM: "escrow_reclaim"}


def _economy_tx(r: Any) -> W.EconomyTx:
    return W.EconomyTx(tx_hash=r.tx_hash, nonce=r.nonce, address=r.from_address, amount=r.amount,
                       included=r.included, block_height=r.block_height, block_hash=r.block_hash, final=r.final)


def wallet_service(core: WalletCore) -> rpc.Service:
    return rpc.Service(wallet_pb2_grpc.add_WalletServiceServicer_to_server, WalletServicer(core), SERVICE_NAME)


async def _sweep(core: WalletCore, every_s: float) -> None:
    """Drop idle keys from memory on time, not only when the next request looks at them."""
    while True:
        await asyncio.sleep(every_s)
        core.unlocked.sweep()


@dataclass
class WalletDaemon:
    server: rpc.RunningServer
    core: WalletCore
    access: DaemonAccess
    sweeper: asyncio.Task[None]

    @property
    def address(self) -> str:
        """What clients dial: `unix:/...` or `127.0.0.1:PORT` (also in the daemon folder's endpoint file)."""
        return self.access.published_address


async def start_wallet_daemon(conf: WalletConfig, **core_kw: Any) -> WalletDaemon:
    """Open the keystore, make this start's token, bind the server (a unix socket by default; port 0
    allowed for TCP), publish the endpoint and start the idle-lock sweeper. `core_kw` goes to
    WalletCore (tests inject a clock)."""
    core = WalletCore.from_config(conf, **core_kw)
    access = DaemonAccess.prepare(core.keystore.directory, conf.listen)
    try:
        guard = rpc.RequireCredential(access.check, open_services=OPEN_SERVICES)
        server = await rpc.start_server(access.address, [wallet_service(core)], interceptors=[guard])
    except BaseException:
        access.close()
        raise
    access.published(server.port)
    sweeper = asyncio.create_task(_sweep(core, min(1.0, max(0.05, conf.idle_lock_s / 4))))
    return WalletDaemon(server, core, access, sweeper)


async def stop_wallet_daemon(daemon: WalletDaemon) -> None:
    daemon.sweeper.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await daemon.sweeper
    daemon.access.close()
    await daemon.server.stop(1.0)
    await daemon.core.close()


async def run_wallet_daemon(conf: WalletConfig, stop: asyncio.Event | None = None) -> int:
    """Serve until SIGINT/SIGTERM (or `stop`). Returns the exit code."""
    telemetry.setup("aitbc-wallet")  # before the server starts: its interceptors are chosen then
    rpc.configure_tls(conf.tls_cert_file, conf.tls_key_file, conf.tls_ca_file, allow_insecure=conf.allow_insecure)
    daemon = await start_wallet_daemon(conf)
    telemetry.announce(f"wallet daemon listening on {daemon.address} (keystore {daemon.core.keystore.directory}, "
                       f"token {daemon.access.files.token}, ledger {conf.ledger or 'none'})", logger="aitbc.wallet")
    if conf.kdf_profile != "default":
        log.warning("kdf_profile=%s: new wallets use a KDF that is cheap to brute-force (tests only)",
                    conf.kdf_profile)
    if not rpc.is_unix(daemon.address):
        write_port_file(conf.port_file, daemon.server.port)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        telemetry.announce("wallet daemon stopping", logger="aitbc.wallet")
        await stop_wallet_daemon(daemon)
    return 0
