"""`aitbc wallet ...` and `aitbc wallet-daemon`: argument handling in process, then one end-to-end
run with real processes (a ledger node, the CLI, the daemon)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aitbc import crypto
from aitbc.clients import wallet_cli
from aitbc.ledger.client import LedgerClient

from .test_service import ATTESTER, BOB, PASS, PROVIDER, bad_checksum, receipt

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[2]


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("AITBC_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("AITBC_WALLET_KDF_PROFILE", "fast")
    monkeypatch.delenv("AITBC_WALLET_PASSPHRASE", raising=False)
    monkeypatch.delenv("AITBC_LEDGER", raising=False)
    return tmp_path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = wallet_cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_create_asks_twice_and_refuses_a_mismatch(home, capsys, monkeypatch):
    answers = iter(["one", "two", PASS, PASS])
    monkeypatch.setattr(wallet_cli.getpass, "getpass", lambda prompt="": next(answers))
    monkeypatch.setattr(sys, "stdin", Tty())
    code, out, err = run(capsys, "wallet", "create", "alice")
    assert code == 1 and "passphrases do not match" in err
    code, out, err = run(capsys, "wallet", "create", "alice")
    assert code == 0 and re.search(r"created wallet alice: ait1\w+", out)
    assert (home / "home" / "wallets" / "alice.json").exists()  # $AITBC_HOME/wallets
    monkeypatch.setattr(sys, "stdin", io.StringIO())  # no terminal, no file, no env: refuse
    code, out, err = run(capsys, "wallet", "create", "bob")
    assert code == 1 and "--passphrase-file" in err


def test_import_list_export_and_bad_input(home, capsys, monkeypatch):
    d = str(home / "w")
    pf = home / "pass.txt"
    pf.write_text(PASS + "\n")
    keyfile = home / "miner.key"
    keyfile.write_text(PROVIDER.secret.hex() + "\n")
    ok = ["--wallet-dir", d, "--passphrase-file", str(pf)]
    assert run(capsys, "wallet", "import", "miner", "--key-file", str(keyfile), *ok)[:2] == (
        0, f"imported wallet miner: {PROVIDER.address}\n")
    code, _, err = run(capsys, "wallet", "import", "bobs", "--key-hex", "12" * 31, *ok)
    assert code == 1 and "private key must be 64 hex" in err
    (home / "junk.key").write_text("not a key")
    code, _, err = run(capsys, "wallet", "import", "junk", "--key-file", str(home / "junk.key"), *ok)
    assert code == 1 and "junk.key: private key must be 64 hex" in err
    code, _, err = run(capsys, "wallet", "import", "none", "--key-file", str(home / "missing.key"), *ok)
    assert code == 1 and "key file" in err and "missing.key does not exist" in err
    code, out, _ = run(capsys, "wallet", "list", "--wallet-dir", d, "--json")
    assert json.loads(out) == [{"name": "miner", "address": PROVIDER.address}]

    code, doc, _ = run(capsys, "wallet", "export", "miner", "--wallet-dir", d)
    assert code == 0 and json.loads(doc)["address"] == PROVIDER.address and PROVIDER.secret.hex() not in doc
    exported = home / "miner.json"
    exported.write_text(doc)
    other = str(home / "other")
    monkeypatch.setenv("AITBC_WALLET_PASSPHRASE", "wrong")
    code, _, err = run(capsys, "wallet", "import", "--keystore", str(exported), "--wallet-dir", other)
    assert code == 1 and "wrong passphrase" in err
    monkeypatch.setenv("AITBC_WALLET_PASSPHRASE", PASS)
    code, out, _ = run(capsys, "wallet", "import", "--keystore", str(exported), "--wallet-dir", other)
    assert (code, out) == (0, f"imported wallet miner: {PROVIDER.address}\n")
    exported.write_text(doc[:-50])
    code, _, err = run(capsys, "wallet", "import", "cut", "--keystore", str(exported), "--wallet-dir", other)
    assert code == 1 and "damaged" in err

    # sends refused before any ledger is contacted (the ledger address is unreachable)
    base = ["--wallet-dir", d, "--ledger", "127.0.0.1:1"]
    cases = [
        (("miner", BOB.address, "1.5"), "whole number"),
        (("miner", BOB.address, "0"), "at least 1"),
        (("miner", bad_checksum(BOB.address), "5"), "checksum"),
        (("ghost", BOB.address, "5"), "wallet 'ghost' does not exist"),
        (("miner", PROVIDER.address, "5"), "cannot send to the sending wallet's own address"),
    ]
    for (name, to, amount), text in cases:
        code, _, err = run(capsys, "wallet", "send", name, to, amount, *base)
        assert code == 1 and text in err, err
    monkeypatch.setenv("AITBC_WALLET_PASSPHRASE", "wrong")
    code, _, err = run(capsys, "wallet", "send", "miner", BOB.address, "5", *base)
    assert code == 1 and "wrong passphrase for wallet 'miner'" in err
    monkeypatch.setenv("AITBC_WALLET_PASSPHRASE", PASS)
    code, _, err = run(capsys, "wallet", "balance", "miner", *base)
    assert code == 1 and "cannot reach the ledger node at 127.0.0.1:1" in err
    code, _, err = run(capsys, "wallet", "balance", "nobody", *base)
    assert code == 1 and "wallet 'nobody' does not exist" in err


def test_ledger_address_resolution(home, monkeypatch):
    assert wallet_cli.resolve_ledger(None) == "127.0.0.1:26657"
    devnet = home / "home" / "devnet"
    devnet.mkdir(parents=True)
    (devnet / "endpoints.json").write_text(json.dumps({"ledger": "127.0.0.1:3456"}))
    assert wallet_cli.resolve_ledger(None) == "127.0.0.1:3456"
    monkeypatch.setenv("AITBC_LEDGER", "10.0.0.1:1")
    assert wallet_cli.resolve_ledger(None) == "10.0.0.1:1"
    assert wallet_cli.resolve_ledger("h:2") == "h:2"


# ---- end to end with real processes ----------------------------------------------------------

def aitbc(*argv: str, env: dict[str, str], check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    cp = subprocess.run([sys.executable, "-m", "aitbc.clients.cli", *argv], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)
    if check and cp.returncode != 0:
        raise AssertionError(f"aitbc {' '.join(argv)} -> {cp.returncode}\n{cp.stdout}\n{cp.stderr}")
    return cp


def start(argv: list[str], env: dict[str, str], log: Path, port_file: Path) -> tuple[subprocess.Popen[bytes], int]:
    proc = start_until(argv, env, log, port_file)
    return proc, int(port_file.read_text())


def start_until(argv: list[str], env: dict[str, str], log: Path, port_file: Path) -> subprocess.Popen[bytes]:
    """Start `aitbc ARGV` and wait until it writes `port_file` (a port, or the wallet daemon's endpoint)."""
    fh = open(log, "wb")  # noqa: SIM115 - the child writes it until the test ends
    proc = subprocess.Popen([sys.executable, "-m", "aitbc.clients.cli", *argv], env=env, cwd=ROOT,
                            stdout=fh, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{argv[0]} did not start: {log.read_text()}")
        time.sleep(0.05)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
    try:
        return proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(5)


@pytest.mark.slow
def test_cli_end_to_end(tmp_path):
    env = dict(os.environ, AITBC_HOME=str(tmp_path / "home"), AITBC_WALLET_KDF_PROFILE="fast",
               AITBC_WALLET_PASSPHRASE=PASS)
    env.pop("AITBC_LEDGER", None)
    (tmp_path / "attester.key").write_text(ATTESTER.secret.hex())
    (tmp_path / "miner.key").write_text(PROVIDER.secret.hex() + "\n")
    chain = "aitbc-wallet-test"
    aitbc("chain", "init", "--chain-id", chain, "--authority", str(tmp_path / "authority.key"),
          "--attester", str(tmp_path / "attester.key"), "--block-time", "0.2", "--out", str(tmp_path / "genesis.json"),
          env=env)
    procs = []
    try:
        node, port = start(["node", "--data-dir", str(tmp_path / "node"), "--genesis", str(tmp_path / "genesis.json"),
                            "--key", str(tmp_path / "authority.key"), "--listen", "127.0.0.1:0",
                            "--port-file", str(tmp_path / "node.port")], env, tmp_path / "node.log",
                           tmp_path / "node.port")
        procs.append(node)
        ledger = f"127.0.0.1:{port}"
        env["AITBC_LEDGER"] = ledger

        async def mint() -> None:  # what settlement does for a served job: 100 x 10 to the miner
            async with LedgerClient(ledger) as c:
                r = receipt(1)
                await c.mint(ATTESTER, r)
                await c.wait_for_receipt(r.receipt_hash, final=True)

        asyncio.run(mint())

        out = aitbc("wallet", "import", "miner", "--key-file", str(tmp_path / "miner.key"), env=env).stdout
        assert PROVIDER.address in out
        bob = aitbc("wallet", "create", "bob", env=env).stdout.split(": ")[1].split()[0]
        crypto.validate_address(bob)
        listed = aitbc("wallet", "list", env=env).stdout
        assert "miner" in listed and bob in listed
        assert aitbc("wallet", "balance", "miner", env=env).stdout.startswith(f"miner ({PROVIDER.address}): 1000\n")

        sent = aitbc("wallet", "send", "miner", bob, "250", "--final", env=env).stdout
        m = re.search(r"tx     ([0-9a-f]{64}) \(nonce 0\)\nblock  (\d+) [0-9a-f]{64} \(final\)", sent)
        assert m, sent
        assert json.loads(aitbc("wallet", "balance", "bob", "--json", env=env).stdout)["balance"] == 250
        acct = json.loads(aitbc("wallet", "balance", PROVIDER.address, "--json", env=env).stdout)
        assert (acct["balance"], acct["nonce"]) == (750, 1)

        for argv, text in ((("miner", bob, "1.5"), "whole number"), (("miner", bob, "5000"), "insufficient balance"),
                           (("miner", PROVIDER.address, "1"), "own address")):
            cp = aitbc("wallet", "send", *argv, env=env, check=False)
            assert cp.returncode == 1 and cp.stderr.startswith("error: ") and text in cp.stderr, cp.stderr
        bad = dict(env, AITBC_WALLET_PASSPHRASE="wrong")
        cp = aitbc("wallet", "send", "miner", bob, "1", env=bad, check=False)
        assert cp.returncode == 1 and "wrong passphrase" in cp.stderr
        assert json.loads(aitbc("wallet", "balance", "miner", "--json", env=env).stdout)["balance"] == 750

        exported = tmp_path / "bob.export.json"
        exported.write_text(aitbc("wallet", "export", "bob", env=env).stdout)
        again = aitbc("wallet", "import", "--keystore", str(exported), "--wallet-dir", str(tmp_path / "other"),
                      env=env).stdout
        assert bob in again

        # the daemon on its default unix socket in the keystore's .daemon folder; clients need only
        # the keystore folder to find it and its token (docs/wallet.md, Access)
        keystore = tmp_path / "home" / "wallets"
        daemon = start_until(["wallet-daemon", "--keystore-dir", str(keystore), "--ledger", ledger,
                              "--kdf-profile", "fast"], env, tmp_path / "wallet.log", keystore / ".daemon" / "endpoint")
        procs.append(daemon)
        sock = keystore / ".daemon" / "wallet.sock"
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(keystore / ".daemon" / "token").st_mode) == 0o600

        async def use_daemon() -> tuple[list[str], int, str]:
            import grpc

            from aitbc import rpc
            from aitbc.v1 import wallet_pb2, wallet_pb2_grpc
            from aitbc.wallet import access

            async with rpc.channel(f"unix:{sock}") as bare:
                try:
                    await wallet_pb2_grpc.WalletServiceStub(bare).ListWallets(wallet_pb2.ListWalletsRequest())
                    refused = "OK"
                except grpc.aio.AioRpcError as exc:
                    refused = exc.code().name
            async with access.channel(keystore) as ch:
                stub = wallet_pb2_grpc.WalletServiceStub(ch)
                names = [w.name for w in (await stub.ListWallets(wallet_pb2.ListWalletsRequest())).wallets]
                b = await stub.GetBalance(wallet_pb2.GetBalanceRequest(wallet="bob"))
            return names, b.balance, refused

        assert asyncio.run(use_daemon()) == (["bob", "miner"], 250, "UNAUTHENTICATED")
        assert stop(daemon) == 0
        assert f"wallet daemon listening on unix:{sock} " in (tmp_path / "wallet.log").read_text()
        assert not (keystore / ".daemon" / "token").exists() and not sock.exists()
    finally:
        for p in procs:
            stop(p)
