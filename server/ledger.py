"""LedgerService servicer (thin over aitbc.ledger.node) and the `aitbc node` process runner."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from aitbc import bech32, crypto, rpc, telemetry
from aitbc.errors import FailedPrecondition, InvalidArgument, NotFound
from aitbc.ledger import observe, proof, state
from aitbc.ledger.block import decode_header
from aitbc.ledger.chain import Chain
from aitbc.ledger.genesis import Genesis
from aitbc.ledger.node import MAX_VOTE_BATCH, RELAY_METADATA, Node
from aitbc.ledger.store import LmdbStore, Store
from aitbc.ledger.wire import block_to_proto, header_to_proto, parse_hash, tx_to_proto
from aitbc.v1 import ledger_pb2, ledger_pb2_grpc

log = logging.getLogger("aitbc.server.ledger")
SERVICE_NAME = ledger_pb2.DESCRIPTOR.services_by_name["LedgerService"].full_name
MAX_BATCH = 20_000

S = ledger_pb2


def _address(text: str, field: str = "address") -> bytes:
    try:
        return crypto.validate_address(text)
    except InvalidArgument as exc:
        raise exc.within(field) from None


class LedgerServicer(ledger_pb2_grpc.LedgerServiceServicer):
    def __init__(self, node: Node) -> None:
        self.node = node
        self.chain = node.chain

    @rpc.handle_errors
    async def GetHead(self, request: S.GetHeadRequest, context: grpc.aio.ServicerContext) -> S.GetHeadResponse:
        chain, g = self.chain, self.node.genesis
        resp = S.GetHeadResponse(finalized_height=chain.final_height, chain_id=g.chain_id,
                                 genesis_hash=chain.genesis_hash.hex(), authorities=list(g.authorities),
                                 block_time_ms=g.block_time_ms, mempool_size=len(self.node.mempool),
                                 is_authority=self.node.is_authority)
        certified = self.node.certified
        if certified.height > 0:
            resp.certified_height, resp.certified_hash = certified.height, certified.hash.hex()
        head = chain.head
        if head.height > 0:
            raw = chain.header_at(head.height)  # the header alone: decoding the block costs ~5 us a tx
            if raw is not None:
                resp.head.CopyFrom(header_to_proto(decode_header(raw)))
        else:
            resp.head.CopyFrom(S.BlockHeader(chain_id=g.chain_id, height=0, hash=chain.genesis_hash.hex(),
                                             timestamp_ms=g.genesis_time_ms))
        return resp

    @rpc.handle_errors
    async def GetBlock(self, request: S.GetBlockRequest, context: grpc.aio.ServicerContext) -> S.GetBlockResponse:
        chain = self.chain
        which = request.WhichOneof("selector")
        if which == "hash":
            found = chain.block_by_hash(parse_hash(request.hash, "block hash"))
            if found is None:
                raise NotFound(f"block {request.hash} not found")
            block, canonical = found
        elif which == "height":
            got = chain.block_at(request.height) if request.height > 0 else None
            if got is None:
                raise NotFound(f"no block at height {request.height} (head is {chain.head.height})")
            block, canonical = got, True
        else:
            raise InvalidArgument("give a block height or hash")
        resp = S.GetBlockResponse(block=block_to_proto(
            block, final=canonical and block.height <= chain.final_height, canonical=canonical,
            certificate=chain.certificate(block.hash)))
        if request.include_transactions:
            resp.transactions.extend(tx_to_proto(tx, self.node.genesis) for tx in block.txs)
        return resp

    @rpc.handle_errors
    async def GetTransaction(self, request: S.GetTransactionRequest,
                             context: grpc.aio.ServicerContext) -> S.GetTransactionResponse:
        h = parse_hash(request.hash, "transaction hash")
        pending = self.node.mempool.by_hash.get(h)
        if pending is not None:
            return S.GetTransactionResponse(transaction=tx_to_proto(pending, self.node.genesis),
                                            status=S.TRANSACTION_STATUS_PENDING)
        loc = self.chain.tx_location(h)
        block = self.chain.block_at(loc[0]) if loc is not None else None
        if loc is None or block is None:
            raise NotFound(f"transaction {request.hash} not found")
        height, index = loc
        status = S.TRANSACTION_STATUS_FINAL if height <= self.chain.final_height else S.TRANSACTION_STATUS_INCLUDED
        return S.GetTransactionResponse(transaction=tx_to_proto(block.txs[index], self.node.genesis), status=status,
                                        block_height=height, block_hash=block.hash.hex(), index=index)

    def _is_relay(self, context: grpc.aio.ServicerContext) -> bool:
        return any((m.key, m.value) == RELAY_METADATA for m in (context.invocation_metadata() or ()))

    @rpc.handle_errors
    async def BroadcastTransaction(self, request: S.BroadcastTransactionRequest,
                                   context: grpc.aio.ServicerContext) -> S.BroadcastTransactionResponse:
        [(h, err)] = await self.node.submit([request.raw], relay=not self._is_relay(context))
        if err is not None:
            if isinstance(err, InvalidArgument) and not err.field:  # malformed, wrong chain or genesis
                err.within("raw")
            raise err
        if telemetry.enabled():  # the block that includes it links back to this call's trace
            observe.remember_tx_trace(h)
        return S.BroadcastTransactionResponse(hash=h.hex())

    @rpc.handle_errors
    async def BroadcastTransactions(self, request: S.BroadcastTransactionsRequest,
                                    context: grpc.aio.ServicerContext) -> S.BroadcastTransactionsResponse:
        if len(request.raws) > MAX_BATCH:
            raise InvalidArgument(f"at most {MAX_BATCH} transactions per batch")
        results = await self.node.submit(list(request.raws), relay=not self._is_relay(context))
        return S.BroadcastTransactionsResponse(results=[
            S.BroadcastResult(hash=h.hex(), accepted=err is None, code="" if err is None else err.code,
                              error="" if err is None else err.message)
            for h, err in results])

    @rpc.handle_errors
    async def GetAccount(self, request: S.GetAccountRequest, context: grpc.aio.ServicerContext) -> S.GetAccountResponse:
        account_id = _address(request.address)
        balance, nonce, pending = self.node.pending_nonce(account_id)
        resp = S.GetAccountResponse(address=request.address, balance=balance, nonce=nonce, pending_nonce=pending,
                                    height=self.chain.head.height)
        evidence = self.chain.store.get(state.evid_key(account_id))
        if evidence is not None:
            resp.evidence_height, resp.evidence_tx = int.from_bytes(evidence[:8], "big"), evidence[8:40].hex()
        stake = state.read_stake(self.chain.store.get, account_id)
        resp.staked, resp.unbonding, resp.unlock_height = stake
        for attester_id, esc in state.list_escrows(self.chain.store.scan, account_id):
            resp.escrows.add(attester=bech32.encode(crypto.ADDRESS_HRP, attester_id), available=esc.available,
                             unlocking=esc.unlocking, unlock_height=esc.unlock_height)
        return resp

    @rpc.handle_errors
    async def GetSupply(self, request: S.GetSupplyRequest, context: grpc.aio.ServicerContext) -> S.GetSupplyResponse:
        if not self.node.genesis.has_economy:
            raise FailedPrecondition("no supply record: this chain's genesis is version 2 (no economy); its supply "
                                     "is the sum of the minted receipts")
        sup = state.read_supply(self.chain.store.get)
        return S.GetSupplyResponse(minted=sup.minted, burned=sup.burned, supply=sup.supply, staked=sup.staked,
                                   unbonding=sup.unbonding, escrowed=sup.escrowed, height=self.chain.head.height)

    @rpc.handle_errors
    async def GetEscrow(self, request: S.GetEscrowRequest, context: grpc.aio.ServicerContext) -> S.GetEscrowResponse:
        esc = state.read_escrow(self.chain.store.get, _address(request.client), _address(request.attester))
        return S.GetEscrowResponse(available=esc.available, unlocking=esc.unlocking, unlock_height=esc.unlock_height,
                                   height=self.chain.head.height)

    @rpc.handle_errors
    async def StreamBlocks(self, request: S.StreamBlocksRequest,
                           context: grpc.aio.ServicerContext) -> AsyncIterator[S.StreamBlocksResponse]:
        if request.from_height < 0:
            raise InvalidArgument("from_height must be >= 0")
        if request.peer_address:  # a candidate only: the node checks its genesis before syncing from it
            self.node.announce(request.peer_address)
        async for batch in self.node.stream_blocks(request.from_height):
            final = self.chain.final_height
            blocks = []
            for raw, h in batch:
                header = decode_header(raw[4:4 + int.from_bytes(raw[:4], "big")])
                blk = S.Block(raw=raw, final=h <= final, canonical=True,
                              certificate=self.chain.certificate(header.hash) or b"")
                if not request.raw_only:
                    blk.header.CopyFrom(header_to_proto(header))
                blocks.append(blk)
            yield S.StreamBlocksResponse(blocks=blocks, finalized_height=final, head_height=self.chain.head.height)

    @rpc.handle_errors
    async def GetReceiptStatus(self, request: S.GetReceiptStatusRequest,
                               context: grpc.aio.ServicerContext) -> S.GetReceiptStatusResponse:
        rh = parse_hash(request.receipt_hash, "receipt hash")
        resp = S.GetReceiptStatusResponse(receipt_hash=rh.hex(), status=S.TRANSACTION_STATUS_UNKNOWN)
        minted = self.chain.receipt_minted(rh)
        if minted is not None:
            height, tx_hash, amount = minted
            resp.status = S.TRANSACTION_STATUS_FINAL if height <= self.chain.final_height \
                else S.TRANSACTION_STATUS_INCLUDED
            resp.tx_hash, resp.block_height, resp.amount = tx_hash.hex(), height, amount
            resp.block_hash = (self.chain.hash_at(height) or b"").hex()
        elif (th := self.node.mempool.receipts.get(rh)) is not None:
            resp.status, resp.tx_hash = S.TRANSACTION_STATUS_PENDING, th.hex()
        return resp


    @rpc.handle_errors
    async def GetReceiptProof(self, request: S.GetReceiptProofRequest,
                              context: grpc.aio.ServicerContext) -> S.GetReceiptProofResponse:
        p = proof.build_proof(self.chain, parse_hash(request.receipt_hash, "receipt hash"))
        first, top = decode_header(p.headers[0]), decode_header(p.headers[-1])
        return S.GetReceiptProofResponse(proof=p.encode(), tx_hash=crypto.sha256(p.tx).hex(),
                                         block_height=first.height, block_hash=first.hash.hex(),
                                         certified_height=top.height, certified_hash=top.hash.hex(),
                                         set_changes=len(p.changes))

    @rpc.handle_errors
    async def GetGenesis(self, request: S.GetGenesisRequest,
                         context: grpc.aio.ServicerContext) -> S.GetGenesisResponse:
        g = self.node.genesis
        return S.GetGenesisResponse(genesis_json=g.canonical_bytes().decode(), genesis_hash=self.chain.genesis_hash.hex(),
                                    chain_id=g.chain_id)

    @rpc.handle_errors
    async def SubmitVotes(self, request: S.SubmitVotesRequest,
                          context: grpc.aio.ServicerContext) -> S.SubmitVotesResponse:
        if len(request.votes) > MAX_VOTE_BATCH:
            raise InvalidArgument(f"at most {MAX_VOTE_BATCH} votes per call")
        return S.SubmitVotesResponse(results=[
            S.VoteResult(accepted=err is None, code="" if err is None else err.code,
                         error="" if err is None else err.message)
            for err in self.node.submit_votes(list(request.votes), caller=rpc.caller_host(context))])

    @rpc.handle_errors
    async def GetAuthorities(self, request: S.GetAuthoritiesRequest,
                             context: grpc.aio.ServicerContext) -> S.GetAuthoritiesResponse:
        info = self.node.authorities_info(request.height or None)
        resp = S.GetAuthoritiesResponse(height=info.height, epoch=info.epoch, authorities=list(info.authorities),
                                        epoch_blocks=info.epoch_blocks)
        for field, props in ((resp.proposals, info.proposals), (resp.queued, info.queued)):
            for p in props:
                field.add(action=p.action, subject=p.subject, votes=p.votes, quorum=p.quorum, voters=list(p.voters))
        return resp

    @rpc.handle_errors
    async def ListPeers(self, request: S.ListPeersRequest, context: grpc.aio.ServicerContext) -> S.ListPeersResponse:
        return S.ListPeersResponse(peers=self.node.verified_peers())


def ledger_service(node: Node) -> rpc.Service:
    # aitbc.rpc.start_server mounts it from the descriptor (malformed requests -> INVALID_ARGUMENT)
    return rpc.Service(ledger_pb2_grpc.add_LedgerServiceServicer_to_server, LedgerServicer(node), SERVICE_NAME)


async def start_node(store: Store, genesis: Genesis, key: crypto.PrivateKey | None, listen: str,
                     peers: Sequence[str] = ()) -> tuple[Node, rpc.RunningServer]:
    """Open the chain, bind the server (port 0 allowed) and start producing/syncing."""
    node = Node(Chain(store, genesis), key, peers=peers)
    try:
        server = await rpc.start_server(listen, [ledger_service(node)])
    except (RuntimeError, OSError):  # grpcio reports a failed bind as RuntimeError
        raise FailedPrecondition(f"cannot listen on {listen}: address in use or invalid") from None
    node.block_listeners.append(observe.BlockObserver())
    await node.start(f"{rpc.host_of(listen)}:{server.port}")

    async def set_serving(ok: bool) -> None:  # a node behind its peers is NOT_SERVING until caught up
        await server.set_serving(SERVICE_NAME, ok)

    if node.has_peers:
        await set_serving(False)
    node.adopt(asyncio.create_task(observe.track_readiness(node, set_serving), name="ledger-readiness"))
    return node, server


async def run_node(data_dir: str | Path, genesis_path: str | Path, key_path: str | Path | None = None,
                   listen: str = "127.0.0.1:26657", peers: Sequence[str] = (),
                   port_file: str | Path | None = None, stop: asyncio.Event | None = None, *,
                   tls_cert_file: str = "", tls_key_file: str = "", tls_ca_file: str = "",
                   allow_insecure: bool = False) -> int:
    """Run a node until SIGINT/SIGTERM (or `stop` is set). Returns the process exit code.
    TLS: serve with the certificate + key, dial peers checking them against the CA (aitbc.rpc)."""
    telemetry.setup("aitbc-node")  # before the server starts: its interceptors are chosen then
    rpc.configure_tls(tls_cert_file, tls_key_file, tls_ca_file, allow_insecure=allow_insecure, names=rpc.FLAG_NAMES)  # `aitbc node --tls-*`
    genesis = Genesis.load(genesis_path)
    try:
        key = crypto.PrivateKey.from_hex(Path(key_path).read_text()) if key_path else None
    except OSError as exc:
        raise FailedPrecondition(f"cannot read key file {key_path}: {exc.strerror}") from None
    lock = _lock_data_dir(Path(data_dir) / "ledger")
    store = LmdbStore(Path(data_dir) / "ledger")
    try:
        node, server = await start_node(store, genesis, key, listen, peers)
    except FailedPrecondition as exc:
        store.close()
        lock.close()
        if exc.message.startswith("data folder"):  # name the folder the operator has to move
            raise FailedPrecondition(f"{data_dir}: {exc.message}") from None
        raise
    except BaseException:
        store.close()
        lock.close()
        raise
    role = f"authority {key.address}" if key else "follower"
    telemetry.announce(f"ledger node listening on {rpc.host_of(listen)}:{server.port} (chain {genesis.chain_id}, {role}, "
                       f"head {node.chain.head.height})", logger="aitbc.ledger")
    if port_file:
        tmp = Path(f"{port_file}.tmp")
        tmp.write_text(f"{server.port}\n")
        os.replace(tmp, port_file)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    try:
        await stop.wait()
    finally:
        await node.stop()
        await server.stop(1.0)
        store.close()
        lock.close()
    return 0


def _lock_data_dir(path: Path) -> Any:
    """One node per data folder: LMDB itself would let two processes write the same chain."""
    import fcntl

    from aitbc.config import private_dir

    private_dir(path)
    fh = open(path / "node.lock", "a+")  # noqa: SIM115 (held for the node's lifetime)
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise FailedPrecondition(f"data folder {path.parent} is in use by another running node") from None
    return fh
