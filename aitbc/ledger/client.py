"""LedgerClient: a small async helper over LedgerService for settlement, wallets and the CLI.

gRPC errors come back as the matching AitbcError subclass (aitbc.rpc.error_from_rpc, same message),
so callers can tell "already known" / "receipt already minted" (AlreadyExists) from transient
failures (Unavailable, and DeadlineExceeded, a subclass of it)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from aitbc import crypto, errors, rpc
from aitbc.ledger import tx as txmod
from aitbc.ledger.genesis import ChainRef, Genesis
from aitbc.quotes import QuoteBody
from aitbc.receipts import SignedReceipt
from aitbc.v1 import ledger_pb2, ledger_pb2_grpc

_STATUS_NAMES = {
    ledger_pb2.TRANSACTION_STATUS_UNKNOWN: "unknown",
    ledger_pb2.TRANSACTION_STATUS_PENDING: "pending",
    ledger_pb2.TRANSACTION_STATUS_INCLUDED: "included",
    ledger_pb2.TRANSACTION_STATUS_FINAL: "final",
}


@dataclass(frozen=True)
class Head:
    height: int
    hash: str
    finalized_height: int
    chain_id: str
    genesis_hash: str
    block_time_ms: int


@dataclass(frozen=True)
class Escrow:
    """One client's escrow for one attester (GetEscrow, GetAccount's escrows)."""

    attester: str
    available: int
    unlocking: int
    unlock_height: int
    height: int = 0  # the head height it was read at (GetEscrow)


@dataclass(frozen=True)
class Account:
    address: str
    balance: int
    nonce: int
    pending_nonce: int
    staked: int = 0
    unbonding: int = 0
    unlock_height: int = 0  # from this height `unbonding` can be withdrawn (0: nothing unbonding)
    escrows: tuple[Escrow, ...] = ()  # as a client, at most 64
    height: int = 0


@dataclass(frozen=True)
class Supply:
    minted: int
    burned: int
    supply: int  # minted - burned
    staked: int
    unbonding: int
    escrowed: int
    height: int


@dataclass(frozen=True)
class TxStatus:
    hash: str
    status: str  # "unknown", "pending", "included", "final"
    block_height: int = 0
    block_hash: str = ""

    @property
    def included(self) -> bool:
        return self.status in ("included", "final")


@dataclass(frozen=True)
class ReceiptStatus:
    receipt_hash: str
    status: str  # "unknown", "pending", "included", "final"
    tx_hash: str = ""
    block_height: int = 0
    block_hash: str = ""
    amount: int = 0


@dataclass(frozen=True)
class BroadcastOutcome:
    hash: str
    accepted: bool
    error: errors.AitbcError | None = None


class LedgerClient:
    def __init__(self, target: str | grpc.aio.Channel, *, timeout: float = 10.0) -> None:
        self._own = isinstance(target, str)
        self.channel = rpc.channel(target) if isinstance(target, str) else target
        self.stub = ledger_pb2_grpc.LedgerServiceStub(self.channel)
        self.timeout = timeout
        self._chain: ChainRef | None = None
        self._nonce_lock = asyncio.Lock()
        self._next_nonce: dict[str, int] = {}

    async def close(self) -> None:
        if self._own:
            await self.channel.close()

    async def __aenter__(self) -> LedgerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def get_head(self) -> Head:
        try:
            r = await self.stub.GetHead(ledger_pb2.GetHeadRequest(), timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise rpc.error_from_rpc(exc) from None
        self._chain = ChainRef(r.chain_id, bytes.fromhex(r.genesis_hash))
        return Head(r.head.height, r.head.hash, r.finalized_height, r.chain_id, r.genesis_hash, r.block_time_ms)

    async def chain_ref(self) -> ChainRef:
        """(chain id, genesis hash) of the node's chain: what every transaction signature binds."""
        if self._chain is None:
            await self.get_head()
        assert self._chain is not None
        return self._chain

    async def chain_id(self) -> str:
        return (await self.chain_ref()).chain_id

    async def get_account(self, address: str) -> Account:
        try:
            r = await self.stub.GetAccount(ledger_pb2.GetAccountRequest(address=address), timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise rpc.error_from_rpc(exc) from None
        return Account(r.address, r.balance, r.nonce, r.pending_nonce, r.staked, r.unbonding, r.unlock_height,
                       tuple(Escrow(e.attester, e.available, e.unlocking, e.unlock_height, r.height)
                             for e in r.escrows), r.height)

    async def get_supply(self) -> Supply:
        """minted, burned and where the supply is (FailedPrecondition on a version 2 genesis)."""
        try:
            r = await self.stub.GetSupply(ledger_pb2.GetSupplyRequest(), timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise rpc.error_from_rpc(exc) from None
        return Supply(r.minted, r.burned, r.supply, r.staked, r.unbonding, r.escrowed, r.height)

    async def get_genesis(self) -> Genesis:
        """The genesis the node runs (GetGenesis), parsed and checked as a genesis file is."""
        try:
            r = await self.stub.GetGenesis(ledger_pb2.GetGenesisRequest(), timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise rpc.error_from_rpc(exc) from None
        return Genesis.from_dict(json.loads(r.genesis_json))

    async def get_escrow(self, client: str, attester: str) -> Escrow:
        try:
            r = await self.stub.GetEscrow(ledger_pb2.GetEscrowRequest(client=client, attester=attester),
                                          timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise rpc.error_from_rpc(exc) from None
        return Escrow(attester, r.available, r.unlocking, r.unlock_height, r.height)

    async def broadcast(self, raw: bytes) -> str:
        """Admit one signed tx; returns its hex hash or raises the node's AitbcError."""
        try:
            r = await self.stub.BroadcastTransaction(ledger_pb2.BroadcastTransactionRequest(raw=raw),
                                                     timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise rpc.error_from_rpc(exc) from None
        return r.hash

    async def broadcast_many(self, raws: list[bytes]) -> list[BroadcastOutcome]:
        try:
            r = await self.stub.BroadcastTransactions(ledger_pb2.BroadcastTransactionsRequest(raws=raws),
                                                      timeout=max(self.timeout, 60.0))
        except grpc.aio.AioRpcError as exc:
            raise rpc.error_from_rpc(exc) from None
        return [BroadcastOutcome(x.hash, x.accepted, None if x.accepted else rpc.error_from_code(x.code, x.error))
                for x in r.results]

    async def get_transaction(self, tx_hash: str) -> TxStatus:
        """Where a tx stands; status "unknown" when this node has never seen it."""
        try:
            r = await self.stub.GetTransaction(ledger_pb2.GetTransactionRequest(hash=tx_hash), timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return TxStatus(tx_hash, "unknown")
            raise rpc.error_from_rpc(exc) from None
        return TxStatus(tx_hash, _STATUS_NAMES.get(r.status, "unknown"), r.block_height, r.block_hash)

    async def get_receipt_status(self, receipt_hash: str | bytes) -> ReceiptStatus:
        rh = receipt_hash.hex() if isinstance(receipt_hash, bytes) else receipt_hash
        try:
            r = await self.stub.GetReceiptStatus(ledger_pb2.GetReceiptStatusRequest(receipt_hash=rh),
                                                 timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise rpc.error_from_rpc(exc) from None
        return ReceiptStatus(r.receipt_hash, _STATUS_NAMES.get(r.status, "unknown"), r.tx_hash, r.block_height,
                             r.block_hash, r.amount)

    async def get_receipt_proof(self, receipt_hash: str | bytes) -> bytes:
        """The receipt's proof (docs/ledger.md "Receipt proofs"), to check with
        `aitbc.ledger.proof.verify_proof` against a genesis you hold: the node is not trusted."""
        rh = receipt_hash.hex() if isinstance(receipt_hash, bytes) else receipt_hash
        try:
            r = await self.stub.GetReceiptProof(ledger_pb2.GetReceiptProofRequest(receipt_hash=rh), timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise rpc.error_from_rpc(exc) from None
        return r.proof

    async def wait_for_tx(self, tx_hash: str, *, final: bool = False, timeout: float = 30.0,
                          poll_s: float = 0.1) -> TxStatus:
        """Poll until the tx is included (or final); raises Unavailable on timeout."""
        deadline = time.monotonic() + timeout
        want = ("final",) if final else ("included", "final")
        while True:
            st = await self.get_transaction(tx_hash)
            if st.status in want:
                return st
            if time.monotonic() >= deadline:
                raise errors.Unavailable(f"tx {tx_hash} is still {st.status} after {timeout:.0f}s")
            await asyncio.sleep(poll_s)

    async def wait_for_receipt(self, receipt_hash: str | bytes, *, final: bool = False, timeout: float = 30.0,
                               poll_s: float = 0.1) -> ReceiptStatus:
        deadline = time.monotonic() + timeout
        want = ("final",) if final else ("included", "final")
        while True:
            st = await self.get_receipt_status(receipt_hash)
            if st.status in want:
                return st
            if time.monotonic() >= deadline:
                raise errors.Unavailable(f"receipt {st.receipt_hash} is still {st.status} after {timeout:.0f}s")
            await asyncio.sleep(poll_s)

    async def next_nonce(self, address: str) -> int:
        return (await self.get_account(address)).pending_nonce

    async def transfer(self, key: crypto.PrivateKey, to: str, amount: int, *, nonce: int | None = None) -> str:
        """Sign and broadcast a TRANSFER. Without `nonce`, a local per-sender counter (seeded from
        the node's pending nonce, re-synced after any rejection) lets concurrent sends use one key."""
        chain = await self.chain_ref()
        if nonce is not None:
            return await self.broadcast(txmod.make_transfer(key, chain, nonce, to, amount))
        n = await self._allocate_nonce(key.address)
        try:
            return await self.broadcast(txmod.make_transfer(key, chain, n, to, amount))
        except errors.AitbcError:
            self.resync_nonce(key.address)
            raise

    async def send(self, key: crypto.PrivateKey, build: Callable[[ChainRef, int], bytes]) -> str:
        """Sign (build(chain, nonce) -> signed tx) and broadcast with the local nonce counter, as
        `transfer` does; the node's refusal comes back as its AitbcError."""
        chain = await self.chain_ref()
        n = await self._allocate_nonce(key.address)
        try:
            return await self.broadcast(build(chain, n))
        except errors.AitbcError:
            self.resync_nonce(key.address)
            raise

    async def get_authorities(self, height: int = 0) -> ledger_pb2.GetAuthoritiesResponse:
        """The authority set of `height`'s epoch (0: the head's child), its proposals and the queue."""
        try:
            return await self.stub.GetAuthorities(ledger_pb2.GetAuthoritiesRequest(height=height), timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise rpc.error_from_rpc(exc) from None

    async def vote_authority(self, key: crypto.PrivateKey, action: str, subject: str) -> str:
        """An AUTHORITY_VOTE (`action` "add" or "remove") signed by an authority's key; hex tx hash."""
        code = {"add": txmod.ACTION_ADD, "remove": txmod.ACTION_REMOVE}[action]
        return await self.send(key, lambda c, n: txmod.make_authority_vote(key, c, n, code, subject))

    async def stake(self, key: crypto.PrivateKey, amount: int) -> str:
        return await self.send(key, lambda c, n: txmod.make_stake(key, c, n, amount))

    async def unstake(self, key: crypto.PrivateKey, amount: int) -> str:
        return await self.send(key, lambda c, n: txmod.make_unstake(key, c, n, amount))

    async def withdraw(self, key: crypto.PrivateKey) -> str:
        return await self.send(key, lambda c, n: txmod.make_withdraw(key, c, n))

    async def escrow_deposit(self, key: crypto.PrivateKey, attester: str, amount: int) -> str:
        return await self.send(key, lambda c, n: txmod.make_escrow_deposit(key, c, n, attester, amount))

    async def escrow_withdraw(self, key: crypto.PrivateKey, attester: str, amount: int) -> str:
        return await self.send(key, lambda c, n: txmod.make_escrow_withdraw(key, c, n, attester, amount))

    async def escrow_reclaim(self, key: crypto.PrivateKey, attester: str) -> str:
        return await self.send(key, lambda c, n: txmod.make_escrow_reclaim(key, c, n, attester))

    async def slash(self, key: crypto.PrivateKey, cheater: SignedReceipt, honest: list[SignedReceipt]) -> str:
        """Put a verdict on chain (key: a genesis attester); AlreadyExists when it is recorded or pending."""
        return await self.send(key, lambda c, n: txmod.make_slash(key, c, n, cheater, honest))

    async def mint(self, key: crypto.PrivateKey, receipt: SignedReceipt, *, nonce: int | None = None) -> str:
        """Sign and broadcast a MINT of an attested receipt. Raises AlreadyExists('receipt already
        minted: ...') or AlreadyExists('already known: ...') when it is minted or pending."""
        n = await self.next_nonce(key.address) if nonce is None else nonce
        return await self.broadcast(txmod.make_mint(key, await self.chain_ref(), n, receipt))

    # ---- settlement ----------------------------------------------------------------------------

    async def _allocate_nonce(self, address: str) -> int:
        """Local nonce counter per sender, so concurrent sends with one key do not collide; seeded
        from (and re-synced with) the node's pending nonce."""
        async with self._nonce_lock:
            n = self._next_nonce.get(address)
            if n is None:
                n = await self.next_nonce(address)
            self._next_nonce[address] = n + 1
            return n

    def resync_nonce(self, address: str) -> None:
        """Take the next nonce from the node again. A sender whose earlier txs were lost (a node
        killed before relaying them) must not keep counting past them: its next txs would wait
        behind the gap forever. Re-syncing lets new txs fill the gap."""
        self._next_nonce.pop(address, None)

    async def settle_receipt(self, key: crypto.PrivateKey, receipt: SignedReceipt, *, wait: str | None = "included",
                             timeout: float = 30.0, attempts: int = 5, quote: QuoteBody | None = None) -> ReceiptStatus:
        """Mint an attested receipt exactly once, idempotently, and (optionally) wait for it. With
        `quote` it sends a SETTLE instead (mint + the quote's fee from the client's escrow; `key`
        must be the receipt's attester): a receipt settles once, with or without a fee.

        Safe to call again for the same receipt (after a crash, a timeout, from two coordinators):
        if the receipt is already pending or minted, no second MINT is sent and its status comes
        back. `wait`: None (return once the node accepted it: status "pending"), "included" or
        "final". Raises InvalidArgument / PermissionDenied for receipts the chain will never accept
        (bad signature, wrong chain id, attester not authorized), Unavailable on timeout or when
        the node is unreachable, ResourceExhausted when the mempool is full."""
        st = await self.get_receipt_status(receipt.receipt_hash)
        if st.status == "unknown":
            chain = await self.chain_ref()
            for attempt in range(attempts):
                nonce = await self._allocate_nonce(key.address)
                try:
                    await self.broadcast(txmod.make_mint(key, chain, nonce, receipt) if quote is None else
                                         txmod.make_settle(key, chain, nonce, receipt, quote))
                    break
                except errors.AlreadyExists:
                    # the receipt is pending/minted (done), or our nonce was taken (re-sync, retry)
                    self.resync_nonce(key.address)
                    st = await self.get_receipt_status(receipt.receipt_hash)
                    if st.status != "unknown":
                        break
                except errors.FailedPrecondition as exc:
                    self.resync_nonce(key.address)
                    if not exc.message.startswith(("nonce too low", "nonce too far ahead")):
                        raise  # e.g. "balance overflow": another nonce would not help
                    # another writer used this key, or the local counter ran past the node's window
                except errors.AitbcError:
                    self.resync_nonce(key.address)
                    raise
                if attempt == attempts - 1:
                    raise errors.Aborted(f"could not find a free nonce for {key.address} in {attempts} attempts")
        if wait is None:
            return await self.get_receipt_status(receipt.receipt_hash)
        return await self.wait_for_receipt(receipt.receipt_hash, final=(wait == "final"), timeout=timeout)
