"""`aitbc node` (run a ledger node) and `aitbc chain init|head|block|tx|account`.

Registered into the main CLI by `register(subparsers)`; also runnable as
`python -m aitbc.clients.chain_cli ...` with the same subcommands."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from aitbc import crypto
from aitbc.errors import AitbcError, CryptoError, InvalidArgument

DEFAULT_NODE = "127.0.0.1:26657"


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False))


def _address_or_keyfile(text: str, *, create: bool) -> str:
    """An `ait1...` address as is; otherwise a hex key file (created when `create` and missing)."""
    if text.startswith("ait1"):
        crypto.validate_address(text)
        return text
    path = Path(text).expanduser()
    if not path.exists() and not create:
        raise InvalidArgument(f"{text} is neither an ait1... address nor an existing key file")
    try:
        return crypto.load_or_create_key(path).address
    except CryptoError as exc:
        raise InvalidArgument(f"key file {text}: {exc.message}") from None


def cmd_chain_init(args: argparse.Namespace) -> int:
    """Write a genesis. Without --chain-id the chain id gets a random suffix (unique_chain_id), so
    two networks made the same way never share an id; re-running keeps the file's id. A value
    outside the genesis bounds (docs/ledger.md, "Genesis") is refused with the bound, exit 2."""
    try:
        return _chain_init(args)
    except InvalidArgument as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2


def _chain_init(args: argparse.Namespace) -> int:
    from aitbc.ledger.genesis import Genesis, make_genesis, unique_chain_id

    out = Path(args.out)
    if not args.authority:
        print("give at least one --authority KEYFILE|ADDRESS", file=sys.stderr)
        return 2
    authorities = [_address_or_keyfile(a, create=True) for a in args.authority]
    attesters = [_address_or_keyfile(a, create=False) for a in (args.attester or [])]
    if out.exists() and not args.force:
        # re-running the same init is a no-op (devnet restarts); anything else needs --force,
        # since a new genesis makes every existing data folder unusable
        try:
            old = Genesis.load(out)
        except AitbcError:
            old = None
        wanted = make_genesis(
            args.chain_id or (old.chain_id if old else unique_chain_id()), authorities, attesters, block_time_ms=int(round(args.block_time * 1000)),
            max_price_per_unit=args.max_price_per_unit, max_mint_per_receipt=args.max_mint_per_receipt,
            max_block_txs=args.max_block_txs, **_economy_args(args),
            genesis_time_ms=old.genesis_time_ms if old and args.genesis_time_ms is None else (args.genesis_time_ms or 0))
        if old is not None and old == wanted:
            print(f"{out} already holds this genesis: chain {old.chain_id}, genesis {old.hash().hex()}")
            return 0
        print(f"{out} exists with a different genesis (use --force to overwrite)", file=sys.stderr)
        return 1
    g = make_genesis(
        args.chain_id or unique_chain_id(), authorities, attesters,
        block_time_ms=int(round(args.block_time * 1000)),
        max_price_per_unit=args.max_price_per_unit,
        max_mint_per_receipt=args.max_mint_per_receipt,
        max_block_txs=args.max_block_txs, **_economy_args(args),
        genesis_time_ms=args.genesis_time_ms if args.genesis_time_ms is not None else int(time.time() * 1000),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    g.save(out)
    print(f"wrote {out}: chain {g.chain_id}, genesis {g.hash().hex()}, {len(authorities)} authorit"
          f"{'y' if len(authorities) == 1 else 'ies'}, {len(attesters)} attester(s)")
    return 0


def _economy_args(args: argparse.Namespace) -> dict[str, int]:
    return {name: getattr(args, name) for name in ("min_stake", "unbonding_blocks", "slash_ppm", "slash_reward_ppm",
                                                   "escrow_timeout_blocks", "epoch_blocks")}


def cmd_node(args: argparse.Namespace) -> int:
    from aitbc.server.ledger import run_node

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            stream=sys.stderr)
    peers = [p.strip() for item in (args.peers or []) for p in item.split(",") if p.strip()]
    try:
        return asyncio.run(run_node(args.data_dir, args.genesis, args.key, args.listen, peers, args.port_file,
                                    tls_cert_file=args.tls_cert, tls_key_file=args.tls_key,
                                    tls_ca_file=args.node_tls_ca or getattr(args, "tls_ca", ""),
                                    allow_insecure=args.allow_insecure))
    except AitbcError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


async def _with_client(target: str, fn: Any) -> Any:
    from aitbc.ledger.client import LedgerClient

    async with LedgerClient(target) as c:
        return await fn(c)


NODE_HELP = "ledger node host:port (default: $AITBC_LEDGER, else the running devnet's, else 127.0.0.1:26657)"


def _node(args: argparse.Namespace) -> str:
    """--node, else $AITBC_LEDGER, else the running devnet's ledger (its endpoints file), else the default."""
    from aitbc.clients.wallet_cli import resolve_ledger

    return resolve_ledger(args.node)


def _run(args: argparse.Namespace, fn: Any) -> int:
    from google.protobuf import json_format

    from aitbc.clients.wallet_cli import check_genesis, expected_genesis

    target = _node(args)
    expected, source = expected_genesis(args.node)

    async def checked(c: Any) -> Any:
        await check_genesis(c, target, expected, source)
        return await fn(c)

    try:
        msg = asyncio.run(_with_client(target, checked))
    except AitbcError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    _print(json_format.MessageToDict(msg, preserving_proto_field_name=True) if hasattr(msg, "DESCRIPTOR") else msg)
    return 0


def cmd_head(args: argparse.Namespace) -> int:
    from aitbc.v1 import ledger_pb2

    return _run(args, lambda c: _call(c.stub.GetHead, ledger_pb2.GetHeadRequest()))


def cmd_block(args: argparse.Namespace) -> int:
    from aitbc.v1 import ledger_pb2

    which = args.which
    req = ledger_pb2.GetBlockRequest(include_transactions=args.txs)
    if which.isdigit():
        req.height = int(which)
    else:
        req.hash = which
    return _run(args, lambda c: _call(c.stub.GetBlock, req))


def cmd_tx(args: argparse.Namespace) -> int:
    from aitbc.v1 import ledger_pb2

    return _run(args, lambda c: _call(c.stub.GetTransaction, ledger_pb2.GetTransactionRequest(hash=args.hash)))


def cmd_account(args: argparse.Namespace) -> int:
    """Balance, nonce, stake (staked, unbonding, unlock height) and escrows, zeros included (as the
    proto JSON mapping writes them: a uint64 is a string)."""
    from google.protobuf import json_format

    from aitbc.v1 import ledger_pb2

    async def get(c: Any) -> dict[str, Any]:
        r = await _call(c.stub.GetAccount, ledger_pb2.GetAccountRequest(address=args.address))
        out = json_format.MessageToDict(r, preserving_proto_field_name=True)
        for name in ("balance", "nonce", "pending_nonce", "height", "staked", "unbonding", "unlock_height"):
            out[name] = str(getattr(r, name))
        out["escrows"] = [{"attester": e.attester, "available": str(e.available), "unlocking": str(e.unlocking),
                           "unlock_height": str(e.unlock_height)} for e in r.escrows]
        return out

    return _run(args, get)


def cmd_supply(args: argparse.Namespace) -> int:
    """GetSupply: minted - burned and where it is (every figure, zeros included; uint64 as strings,
    as the proto JSON mapping writes them)."""
    from aitbc.v1 import ledger_pb2

    async def get(c: Any) -> dict[str, Any]:
        r = await _call(c.stub.GetSupply, ledger_pb2.GetSupplyRequest())
        return {name: str(getattr(r, name)) for name in ("minted", "burned", "supply", "staked", "unbonding", "escrowed",
                                                    "height")}

    return _run(args, get)


def cmd_genesis(args: argparse.Namespace) -> int:
    """The node's genesis document and its hash (checked here: sha256 of the document)."""
    from aitbc.v1 import ledger_pb2

    async def get(c: Any) -> dict[str, Any]:
        r = await _call(c.stub.GetGenesis, ledger_pb2.GetGenesisRequest())
        if crypto.sha256(r.genesis_json.encode()).hex() != r.genesis_hash:
            raise InvalidArgument("the node's genesis_hash is not the sha256 of its genesis_json")
        return {"genesis_hash": r.genesis_hash, "chain_id": r.chain_id, "genesis": json.loads(r.genesis_json)}

    return _run(args, get)


def cmd_authorities(args: argparse.Namespace) -> int:
    """GetAuthorities: the set of a height's epoch (default: the next block's), its epoch and the
    proposals voted in it (uint64 as strings, as the proto JSON mapping writes them)."""

    async def get(c: Any) -> dict[str, Any]:
        r = await c.get_authorities(args.height or 0)

        def prop(p: Any) -> dict[str, Any]:
            return {"action": p.action, "subject": p.subject, "votes": p.votes, "quorum": p.quorum,
                    "voters": list(p.voters)}

        return {"height": str(r.height), "epoch": str(r.epoch), "epoch_blocks": str(r.epoch_blocks),
                "authorities": list(r.authorities), "proposals": [prop(p) for p in r.proposals],
                "queued": [{"action": p.action, "subject": p.subject} for p in r.queued]}

    return _run(args, get)


def cmd_vote_authority(args: argparse.Namespace) -> int:
    """Sign an AUTHORITY_VOTE with an authority's key file and broadcast it; prints its tx hash."""
    try:
        crypto.validate_address(args.address)
        key = crypto.PrivateKey.from_hex(Path(args.key).expanduser().read_text())
    except (AitbcError, OSError, ValueError) as exc:
        print(f"error: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 2

    async def send(c: Any) -> dict[str, Any]:
        h = await c.vote_authority(key, args.action, args.address)
        return {"tx_hash": h, "voter": key.address, "action": args.action, "subject": args.address}

    return _run(args, send)


def cmd_receipt(args: argparse.Namespace) -> int:
    from aitbc.v1 import ledger_pb2

    return _run(args, lambda c: _call(c.stub.GetReceiptStatus,
                                      ledger_pb2.GetReceiptStatusRequest(receipt_hash=args.receipt_hash)))


async def verify_remote(target: str, genesis_path: str, upto: int | None = None) -> dict[str, Any]:
    """Re-verify a node's chain from its genesis: stream every block, check every signature, link,
    turn and state transition locally (in memory), and compare with the node's own head."""
    import grpc

    from aitbc import rpc
    from aitbc.ledger.block import decode_block
    from aitbc.ledger.chain import Chain
    from aitbc.ledger.client import LedgerClient
    from aitbc.ledger.genesis import Genesis
    from aitbc.ledger.store import MemoryStore
    from aitbc.v1 import ledger_pb2

    g = Genesis.load(genesis_path)
    chain = Chain(MemoryStore(), g)
    async with LedgerClient(target) as c:
        head = await c.get_head()
        if head.genesis_hash != chain.genesis_hash.hex():
            raise InvalidArgument(f"node {target} runs genesis {head.genesis_hash}, not {chain.genesis_hash.hex()}")
        stop = head.height if upto is None else min(upto, head.height)
        txs = 0
        try:
            async for resp in c.stub.StreamBlocks(ledger_pb2.StreamBlocksRequest(from_height=1, raw_only=True)):
                blocks = [decode_block(b.raw) for b in resp.blocks]
                blocks = [b for b in blocks if b.height <= stop]
                await asyncio.to_thread(chain.add_blocks, blocks, int(time.time() * 1000))
                txs += sum(len(b.txs) for b in blocks)
                if chain.head.height >= stop:
                    break
        except grpc.aio.AioRpcError as exc:
            raise rpc.error_from_rpc(exc) from None
        theirs = (await c.stub.GetBlock(ledger_pb2.GetBlockRequest(height=stop))).block.header if stop else None
    ok = stop == 0 or (theirs is not None and theirs.hash == chain.head.hash.hex())
    return {"ok": ok, "height": chain.head.height, "hash": chain.head.hash.hex(),
            "state_root": chain.head.state_root.hex(), "transactions": txs}


def cmd_verify(args: argparse.Namespace) -> int:
    try:
        out = asyncio.run(verify_remote(_node(args), args.genesis, args.height))
    except AitbcError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    _print(out)
    return 0 if out["ok"] else 1


async def _call(method: Any, request: Any) -> Any:
    import grpc

    from aitbc import rpc

    try:
        return await method(request, timeout=10)
    except grpc.aio.AioRpcError as exc:
        raise rpc.error_from_rpc(exc) from None


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("node", help="run a ledger node (authority with --key, else follower)")
    p.add_argument("--data-dir", required=True, help="folder for the LMDB database")
    p.add_argument("--genesis", required=True, help="genesis JSON written by `aitbc chain init`")
    p.add_argument("--key", help="authority key file (hex); omit to run a follower")
    p.add_argument("--listen", default=DEFAULT_NODE, help=f"host:port to serve on (default {DEFAULT_NODE}; port 0 ok)")
    p.add_argument("--peers", action="append", help="peer nodes host:port, comma separated or repeated")
    p.add_argument("--port-file", help="write the bound port here once serving")
    for flag, dest, env, what in (
            ("--tls-cert", "tls_cert", "AITBC_NODE_TLS_CERT_FILE", "serve TLS with this certificate chain (PEM)"),
            ("--tls-key", "tls_key", "AITBC_NODE_TLS_KEY_FILE", "... and this private key (PEM)"),
            ("--tls-ca", "node_tls_ca", "AITBC_NODE_TLS_CA_FILE", "dial peers with TLS, trusting this CA (PEM)")):
        p.add_argument(flag, dest=dest, default=os.environ.get(env, ""), help=f"{what}; default ${env}")
    p.add_argument("--allow-insecure", action="store_true",
                   default=os.environ.get("AITBC_NODE_ALLOW_INSECURE", "").lower() in ("1", "true"),
                   help="serve plaintext on a non-loopback --listen (refused otherwise); default $AITBC_NODE_ALLOW_INSECURE")
    p.set_defaults(func=cmd_node)

    chain = subparsers.add_parser("chain", help="ledger: write a genesis, read blocks, txs and accounts")
    csub = chain.add_subparsers(dest="chain_cmd", required=True)
    i = csub.add_parser("init", help="write a genesis file (no balances)")
    i.add_argument("--chain-id", help="default: aitbc-<random hex>, unique per genesis (re-runs keep the file's)")
    i.add_argument("--authority", action="append", help="authority key file (created when missing) or address; "
                   "repeat in round-robin order")
    i.add_argument("--attester", action="append", help="receipt attester address or key file (repeatable)")
    i.add_argument("--block-time", type=float, default=1.0, help="seconds per slot (default 1)")
    i.add_argument("--max-price-per-unit", type=int, default=10**12,
                   help="MINT price per unit is capped at this (smallest token unit)")
    i.add_argument("--max-mint-per-receipt", type=int, default=10**18, help="cap on the amount one receipt mints")
    i.add_argument("--max-block-txs", type=int, default=20_000)
    from aitbc.ledger.genesis import ECONOMY_DEFAULTS

    for flag, what in (("--min-stake", "stake a miner needs to be given work"),
                       ("--unbonding-blocks", "blocks from UNSTAKE to WITHDRAW"),
                       ("--slash-ppm", "parts per million of a convicted miner's stake cut"),
                       ("--slash-reward-ppm", "parts per million of the cut paid to honest miners"),
                       ("--escrow-timeout-blocks", "blocks from ESCROW_WITHDRAW to ESCROW_RECLAIM"),
                       ("--epoch-blocks", "blocks per epoch: the authority set changes by the authorities' votes at "
                                          "most once per epoch")):
        default = ECONOMY_DEFAULTS[flag[2:].replace("-", "_")]
        i.add_argument(flag, type=int, default=default, help=f"{what} (default {default})")
    i.add_argument("--genesis-time-ms", type=int, help="default: now")
    i.add_argument("--out", default="genesis.json")
    i.add_argument("--force", action="store_true", help="overwrite --out")
    i.set_defaults(func=cmd_chain_init)
    for name, fn, helptext in (("head", cmd_head, "the head, finalized height and chain identity"),):
        q = csub.add_parser(name, help=helptext)
        q.add_argument("--node", help=NODE_HELP)
        q.set_defaults(func=fn)
    q = csub.add_parser("block", help="a block by height or hash")
    q.add_argument("which", help="height or hex hash")
    q.add_argument("--txs", action="store_true", help="include decoded transactions")
    q.add_argument("--node", help=NODE_HELP)
    q.set_defaults(func=cmd_block)
    q = csub.add_parser("tx", help="a transaction and its status")
    q.add_argument("hash")
    q.add_argument("--node", help=NODE_HELP)
    q.set_defaults(func=cmd_tx)
    q = csub.add_parser("account", help="balance, nonce, stake and escrows of an address")
    q.add_argument("address")
    q.add_argument("--node", help=NODE_HELP)
    q.set_defaults(func=cmd_account)
    q = csub.add_parser("supply", help="minted, burned, supply and the staked, unbonding and escrowed totals")
    q.add_argument("--node", help=NODE_HELP)
    q.set_defaults(func=cmd_supply)
    q = csub.add_parser("verify", help="re-verify a node's whole chain locally from the genesis file")
    q.add_argument("--genesis", required=True)
    q.add_argument("--height", type=int, help="stop at this height (default: the node's head)")
    q.add_argument("--node", help=NODE_HELP)
    q.set_defaults(func=cmd_verify)
    q = csub.add_parser("receipt", help="is a receipt hash minted, and where")
    q.add_argument("receipt_hash")
    q.add_argument("--node", help=NODE_HELP)
    q.set_defaults(func=cmd_receipt)
    q = csub.add_parser("genesis", help="the node's genesis document and its hash")
    q.add_argument("--node", help=NODE_HELP)
    q.set_defaults(func=cmd_genesis)

    q = csub.add_parser("authorities", help="the authority set of a height's epoch and the proposals voted in it")
    q.add_argument("--height", type=int, help="a block height (default: the next block's)")
    q.add_argument("--node", help=NODE_HELP)
    q.set_defaults(func=cmd_authorities)

    q = csub.add_parser("vote-authority", help="an authority's vote to add or remove an authority (AUTHORITY_VOTE)")
    q.add_argument("action", choices=("add", "remove"))
    q.add_argument("address", help="the ait1... address to add or remove")
    q.add_argument("--key", required=True, help="the voting authority's key file (hex)")
    q.add_argument("--node", help=NODE_HELP)
    q.set_defaults(func=cmd_vote_authority)


def main(argv: list[str] | None = None) -> int:
    from aitbc import rpc

    parser = argparse.ArgumentParser(prog="python -m aitbc.clients.chain_cli")
    register(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(argv)
    rpc.configure_tls(ca_file=os.environ.get("AITBC_TLS_CA", ""))  # what the client commands dial
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
