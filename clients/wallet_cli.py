"""`aitbc wallet create|import|list|balance|send|export` and `aitbc wallet-daemon`.

The wallet commands work on the keystore directory directly through the same WalletCore the
daemon serves (no daemon needed); the key is decrypted in this process only for as long as a
`send` takes. Registered into the main CLI by `register(subparsers)`; also runnable as
`python -m aitbc.clients.wallet_cli ...`.

Passphrases come from `--passphrase-file`, else $AITBC_WALLET_PASSPHRASE, else the terminal
(getpass; asked twice for a new wallet). Never from a command-line argument: those show in `ps`.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import sys
from pathlib import Path
from typing import Any

from aitbc.errors import AitbcError, FailedPrecondition, InvalidArgument

DEFAULT_LEDGER = "127.0.0.1:26657"
PASSPHRASE_ENV = "AITBC_WALLET_PASSPHRASE"
KDF_ENV = "AITBC_WALLET_KDF_PROFILE"


def default_wallet_dir() -> Path:
    from aitbc.clients.sdk import aitbc_home

    return aitbc_home() / "wallets"


def resolve_ledger(explicit: str | None) -> str:
    """--ledger, else $AITBC_LEDGER, else the running devnet's ledger, else the default port."""
    if explicit:
        return explicit
    if os.environ.get("AITBC_LEDGER"):
        return os.environ["AITBC_LEDGER"]
    from aitbc.clients.sdk import devnet_endpoints

    return str(devnet_endpoints().get("ledger") or DEFAULT_LEDGER)


GENESIS_ENV = "AITBC_GENESIS_HASH"


def expected_genesis(explicit: str | None) -> tuple[str, str]:
    """(the genesis hash the ledger we talk to must run, where that comes from), or ("", "") when
    nothing is expected: $AITBC_GENESIS_HASH, else the running devnet's when its ledger is the one
    we talk to (no --node/--ledger and no $AITBC_LEDGER)."""
    if os.environ.get(GENESIS_ENV):
        return os.environ[GENESIS_ENV].strip().lower(), f"${GENESIS_ENV}"
    if explicit or os.environ.get("AITBC_LEDGER"):
        return "", ""
    from aitbc.clients.sdk import aitbc_home, devnet_endpoints

    gh = str(devnet_endpoints().get("genesis_hash") or "")
    return (gh, f"the devnet in {aitbc_home() / 'devnet'}") if gh else ("", "")


async def check_genesis(client: Any, target: str, expected: str, source: str, head: Any = None) -> None:
    """Refuse a ledger that runs another genesis than the expected one (another devnet, or any node
    that happens to listen on that address): its answers would be about another chain. `head`: the
    node's GetHead when the caller already has it."""
    if not expected:
        return
    head = head or await client.get_head()
    if head.genesis_hash != expected:
        raise FailedPrecondition(
            f"the ledger at {target} runs genesis {head.genesis_hash[:16]}... (chain {head.chain_id!r}), not "
            f"{expected[:16]}... ({source}): another ledger answers on that address; stop it, or name the "
            "right node with --node/--ledger (or $AITBC_GENESIS_HASH for the genesis you expect)")


def _core(args: argparse.Namespace, *, ledger: bool = False) -> Any:
    from aitbc.wallet.keystore import Keystore
    from aitbc.wallet.service import WalletCore, kdf_for_profile

    directory = Path(args.wallet_dir).expanduser() if args.wallet_dir else default_wallet_dir()
    profile = args.kdf_profile or os.environ.get(KDF_ENV) or "default"
    ks = Keystore(directory, kdf=kdf_for_profile(profile))
    return WalletCore(ks, resolve_ledger(args.ledger) if ledger else None)


# ---- passphrases --------------------------------------------------------------------------

def _passphrase(args: argparse.Namespace, prompt: str, *, confirm: bool = False, optional: bool = False) -> str | None:
    if getattr(args, "passphrase_file", None):
        path = Path(args.passphrase_file).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise InvalidArgument(f"cannot read passphrase file {path}: {exc.strerror}") from None
        return text.rstrip("\r\n")
    env = os.environ.get(PASSPHRASE_ENV)
    if env is not None:
        return env
    if not sys.stdin.isatty():
        if optional:
            return None
        raise InvalidArgument(f"no passphrase: no terminal to ask on; use --passphrase-file FILE or set {PASSPHRASE_ENV}")
    first = getpass.getpass(prompt)
    if confirm:
        if getpass.getpass("Repeat the passphrase: ") != first:
            raise InvalidArgument("the passphrases do not match; nothing was written")
    return first


# ---- commands -----------------------------------------------------------------------------

def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


def cmd_create(args: argparse.Namespace) -> int:
    core = _core(args)
    from aitbc.wallet.keystore import validate_name

    validate_name(args.name)
    if core.keystore.exists(args.name):
        raise InvalidArgument(f"wallet '{args.name}' already exists")
    phrase = _passphrase(args, f"Passphrase for new wallet '{args.name}': ", confirm=True)
    view = core.create(args.name, phrase)
    print(f"created wallet {view.name}: {view.address}")
    print(f"keystore file: {core.keystore.path(view.name)} (back it up: `aitbc wallet export {view.name}`)")
    return 0


def _read_local(path_text: str, what: str, limit: int) -> tuple[Path, bytes]:
    """This process reads the file and sends its content: the core (and the daemon) never opens
    a path it is given."""
    from aitbc.errors import NotFound

    path = Path(path_text).expanduser()
    try:
        with open(path, "rb") as fh:
            return path, fh.read(limit + 1)
    except FileNotFoundError:
        raise NotFound(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise InvalidArgument(f"{path} is a directory, not a {what}") from None
    except OSError as exc:
        raise InvalidArgument(f"cannot read {what} {path}: {exc.strerror}") from None


def read_key_file(path_text: str) -> tuple[Path, str]:
    """The hex private key in a file such as a miner's `key_file` (64 hex characters)."""
    path, data = _read_local(path_text, "key file", 1024)
    try:
        return path, data.decode("ascii")
    except UnicodeDecodeError:
        raise InvalidArgument(f"key file {path}: private key must be 64 hex characters (32 bytes), "
                              "got other characters") from None


def cmd_import(args: argparse.Namespace) -> int:
    core = _core(args)
    if args.keystore:
        from aitbc.wallet.keystore import MAX_FILE_BYTES

        path, data = _read_local(args.keystore, "keystore file", MAX_FILE_BYTES)
        phrase = _passphrase(args, "Passphrase of the exported wallet (checked, not changed): ", optional=True)
        view = core.import_keystore(args.name, data, phrase, label=str(path))
    else:
        if not args.name:
            raise InvalidArgument("give the new wallet a NAME")
        from aitbc.wallet.keystore import validate_name

        validate_name(args.name)
        phrase = _passphrase(args, f"Passphrase to encrypt wallet '{args.name}': ", confirm=True)
        if args.key_file:
            path, text = read_key_file(args.key_file)
            try:
                view = core.import_key(args.name, text, phrase)
            except InvalidArgument as exc:
                if "private key" in exc.message:
                    raise InvalidArgument(f"key file {path}: {exc.message}") from None
                raise
        else:
            view = core.import_key(args.name, args.key_hex, phrase)
    print(f"imported wallet {view.name}: {view.address}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    wallets = _core(args).list()
    if args.json:
        _print_json([{"name": w.name, "address": w.address} for w in wallets])
    elif not wallets:
        print("no wallets (create one: aitbc wallet create NAME)")
    else:
        width = max(len(w.name) for w in wallets)
        for w in wallets:
            print(f"{w.name:<{width}}  {w.address}")
    return 0


async def _with_core(args: argparse.Namespace, fn: Any) -> Any:
    core = _core(args, ledger=True)
    try:  # on the core's own ledger connection
        await check_genesis(core.ledger, resolve_ledger(args.ledger), *expected_genesis(args.ledger))
        return await fn(core)
    finally:
        await core.close()


def cmd_balance(args: argparse.Namespace) -> int:
    b = asyncio.run(_with_core(args, lambda core: core.balance(args.wallet)))
    if args.json:
        _print_json({"wallet": b.wallet, "address": b.address, "balance": b.balance, "nonce": b.nonce,
                     "pending_nonce": b.pending_nonce})
    else:
        label = f"{b.wallet} ({b.address})" if b.wallet else b.address
        print(f"{label}: {b.balance}")
        print(f"nonce {b.nonce}" + (f" ({b.pending_nonce - b.nonce} pending)" if b.pending_nonce > b.nonce else ""))
    return 0


def cmd_send(args: argparse.Namespace) -> int:
    from aitbc.wallet.service import check_address, parse_amount

    amount = parse_amount(args.amount)  # refuse bad input before asking for a passphrase
    to = check_address(args.to)

    async def go(core: Any) -> Any:
        sender = core.keystore.file(args.name)
        if sender.address == to:
            raise InvalidArgument("cannot send to the sending wallet's own address")
        phrase = _passphrase(args, f"Passphrase for wallet '{args.name}': ")
        await asyncio.to_thread(core.unlock, args.name, phrase)
        try:
            return await core.send(args.name, to, amount, wait=not args.no_wait, final=args.final,
                                   timeout_s=args.timeout)
        finally:
            core.lock(args.name)

    r = asyncio.run(_with_core(args, go))
    if args.json:
        _print_json({"tx_hash": r.tx_hash, "from": r.from_address, "to": r.to, "amount": r.amount,
                     "nonce": r.nonce, "included": r.included, "block_height": r.block_height,
                     "block_hash": r.block_hash, "final": r.final})
        return 0
    print(f"sent {r.amount} from {args.name} ({r.from_address}) to {r.to}")
    print(f"tx     {r.tx_hash} (nonce {r.nonce})")
    if r.included:
        print(f"block  {r.block_height} {r.block_hash} ({'final' if r.final else 'not final yet'})")
    else:
        print("block  not waited for (check with: aitbc chain tx HASH)")
    return 0


def cmd_economy(args: argparse.Namespace) -> int:
    """`aitbc stake|unstake|withdraw` and `aitbc escrow deposit|withdraw|reclaim` (docs/economy.md)."""
    from aitbc.wallet.service import parse_amount

    op = args.economy_op if args.economy_op else f"escrow_{args.escrow_cmd}"
    amount = parse_amount(args.amount) if getattr(args, "amount", None) is not None else 0

    async def go(core: Any) -> Any:
        attester = await core.default_attester(args.attester) if op.startswith("escrow") else ""
        phrase = _passphrase(args, f"Passphrase for wallet '{args.wallet}': ")
        await asyncio.to_thread(core.unlock, args.wallet, phrase)
        try:
            r = await core.economy(args.wallet, op, amount=amount, attester=attester, wait=not args.no_wait)
        finally:
            core.lock(args.wallet)
        return r, await core.ledger.get_account(r.from_address)

    r, acct = asyncio.run(_with_core(args, go))
    out = {"tx_hash": r.tx_hash, "op": op, "amount": r.amount, "attester": r.to, "included": r.included,
           "block_height": r.block_height, "balance": acct.balance, "staked": acct.staked,
           "unbonding": acct.unbonding, "unlock_height": acct.unlock_height,
           "escrows": [{"attester": e.attester, "available": e.available, "unlocking": e.unlocking,
                        "unlock_height": e.unlock_height} for e in acct.escrows]}
    if args.json:
        _print_json(out)
        return 0
    print(f"{op.replace('_', ' ')} {r.amount or ''} from {args.wallet} ({r.from_address}): tx {r.tx_hash}"
          + (f", block {r.block_height}" if r.included else " (not waited for)"))
    print(f"balance {acct.balance}, staked {acct.staked}, unbonding {acct.unbonding}"
          + (f" (unlocks at height {acct.unlock_height})" if acct.unbonding else ""))
    for e in acct.escrows:
        print(f"escrow for {e.attester}: {e.available} available, {e.unlocking} unlocking"
              + (f" (reclaimable from height {e.unlock_height})" if e.unlocking else ""))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    doc = _core(args).export(args.name)
    if args.out:
        out = Path(args.out).expanduser()
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(doc)
        print(f"wrote {out} (encrypted under the wallet's passphrase)", file=sys.stderr)
    else:
        sys.stdout.write(doc)
    return 0


def cmd_wallet_daemon(args: argparse.Namespace) -> int:
    from aitbc import config as cfg
    from aitbc.server.wallet import run_wallet_daemon

    conf = cfg.load(cfg.WalletConfig, args.config, "WALLET", listen=args.listen, keystore_dir=args.keystore_dir,
                    ledger=args.ledger, idle_lock_s=args.idle_lock_s, kdf_profile=args.kdf_profile,
                    unlock_backoff_base_s=args.unlock_backoff_base_s, unlock_backoff_max_s=args.unlock_backoff_max_s,
                    port_file=args.port_file)
    return asyncio.run(run_wallet_daemon(conf))


# ---- parser -------------------------------------------------------------------------------

def _common(ledger: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--wallet-dir", help="keystore directory (default: $AITBC_HOME/wallets, i.e. ~/.aitbc/wallets)")
    p.add_argument("--kdf-profile", choices=["default", "fast"],
                   help=f"Argon2id cost for new files (default: ${KDF_ENV} or 'default'; 'fast' is for tests only)")
    if ledger:
        p.add_argument("--ledger", help="ledger node host:port (default: $AITBC_LEDGER, else the running "
                       f"devnet's, else {DEFAULT_LEDGER})")
    return p


def _passphrase_opt(p: argparse.ArgumentParser) -> None:
    p.add_argument("--passphrase-file", help=f"read the passphrase from this file (else ${PASSPHRASE_ENV}, else ask)")


def register(subparsers: Any) -> None:
    w = subparsers.add_parser("wallet", help="encrypted wallets: create, import, list, balance, send, export")
    wsub = w.add_subparsers(dest="wallet_cmd", required=True, metavar="{create,import,list,balance,send,export}")
    common, with_ledger = _common(), _common(ledger=True)

    p = wsub.add_parser("create", parents=[common], help="a new wallet with a fresh key (asks for a passphrase)")
    p.add_argument("name")
    _passphrase_opt(p)
    p.set_defaults(func=cmd_create)

    p = wsub.add_parser("import", parents=[common], help="a wallet from a private key or an exported keystore file")
    p.add_argument("name", nargs="?", help="wallet name (with --keystore: default the name in the file)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--key-hex", help="private key, 64 hex characters (visible in `ps`: prefer --key-file)")
    src.add_argument("--key-file", help="file holding a hex private key, e.g. a miner's key_file")
    src.add_argument("--keystore", help="keystore JSON written by `aitbc wallet export`")
    _passphrase_opt(p)
    p.set_defaults(func=cmd_import)

    p = wsub.add_parser("list", parents=[common], help="wallet names and addresses")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = wsub.add_parser("balance", parents=[with_ledger], help="balance of a wallet or an address")
    p.add_argument("wallet", metavar="NAME_OR_ADDRESS")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_balance)

    def economy_parser(parent: Any, name: str, helptext: str, *, amount: bool, attester: bool) -> Any:
        q = parent.add_parser(name, parents=[with_ledger], help=helptext)
        if amount:
            q.add_argument("amount", help="tokens (smallest unit)")
        q.add_argument("--wallet", required=True, help="the wallet that signs")
        if attester:
            q.add_argument("--attester", help="the coordinator's attester address (default: the genesis's only one)")
        q.add_argument("--no-wait", action="store_true", help="return once the node accepted it")
        q.add_argument("--json", action="store_true")
        _passphrase_opt(q)
        q.set_defaults(func=cmd_economy, economy_op=None if parent is not subparsers else name)
        return q

    economy_parser(subparsers, "stake", "stake tokens (balance -> staked; a miner needs the genesis min_stake)",
                   amount=True, attester=False)
    economy_parser(subparsers, "unstake", "start unbonding staked tokens (withdraw them after unbonding_blocks)",
                   amount=True, attester=False)
    economy_parser(subparsers, "withdraw", "unbonded tokens back to the balance (after the unlock height)",
                   amount=False, attester=False)
    esc = subparsers.add_parser("escrow", help="client escrow for a coordinator: deposit, withdraw, reclaim")
    esub = esc.add_subparsers(dest="escrow_cmd", required=True)
    economy_parser(esub, "deposit", "balance -> escrow the coordinator settles fees from", amount=True, attester=True)
    economy_parser(esub, "withdraw", "escrow -> unlocking (reclaimable after escrow_timeout_blocks)", amount=True,
                   attester=True)
    economy_parser(esub, "reclaim", "unlocked escrow back to the balance", amount=False, attester=True)

    p = wsub.add_parser("send", parents=[with_ledger], help="sign, broadcast and wait for the block")
    p.add_argument("name", help="sending wallet")
    p.add_argument("to", help="recipient ait1... address")
    p.add_argument("amount", help="whole token units, decimal digits (no fractions)")
    p.add_argument("--no-wait", action="store_true", help="return after the node accepts it")
    p.add_argument("--final", action="store_true", help="wait until the block is final")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the block (default 30)")
    p.add_argument("--json", action="store_true")
    _passphrase_opt(p)
    p.set_defaults(func=cmd_send)

    p = wsub.add_parser("export", parents=[common], help="print the encrypted keystore JSON (a backup)")
    p.add_argument("name")
    p.add_argument("-o", "--out", help="write it to this new file (mode 0600) instead of stdout")
    p.set_defaults(func=cmd_export)

    d = subparsers.add_parser("wallet-daemon", help="run the wallet daemon (WalletService)")
    d.add_argument("--config", help="TOML file (listen, keystore_dir, ledger, idle_lock_s, kdf_profile, "
                   "unlock_backoff_base_s, unlock_backoff_max_s, port_file); AITBC_WALLET_* env overrides")
    d.add_argument("--listen", help="'unix' (default: a 0600 socket in KEYSTORE_DIR/.daemon), unix:/PATH, or "
                   "loopback 127.0.0.1:PORT (port 0 picks one); every call needs the token in KEYSTORE_DIR/.daemon")
    d.add_argument("--keystore-dir", help="keystore directory (default ~/.aitbc/wallets)")
    d.add_argument("--ledger", help="ledger node host:port (default 127.0.0.1:26657)")
    d.add_argument("--idle-lock-s", type=float, help="seconds an unlocked wallet may sit idle (default 300)")
    d.add_argument("--kdf-profile", choices=["default", "fast"], help="'fast' is for tests only")
    d.add_argument("--unlock-backoff-base-s", type=float,
                   help="first wait after 3 wrong passphrases in a row for a wallet (default 1; doubles)")
    d.add_argument("--unlock-backoff-max-s", type=float, help="longest such wait (default 60)")
    d.add_argument("--port-file", help="with TCP: write the bound port here once serving")
    d.set_defaults(func=cmd_wallet_daemon)


def main(argv: list[str] | None = None) -> int:
    from aitbc import rpc

    parser = argparse.ArgumentParser(prog="python -m aitbc.clients.wallet_cli")
    register(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(argv)
    try:
        rpc.configure_tls(ca_file=os.environ.get("AITBC_TLS_CA", ""))  # what the client commands dial
        return int(args.func(args) or 0)
    except AitbcError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
