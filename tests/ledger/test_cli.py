"""`aitbc chain init` + `aitbc node` + `aitbc chain head|block|tx|account|receipt`, as devnet runs them."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aitbc import crypto
from aitbc.clients import chain_cli
from aitbc.ledger.client import LedgerClient

from .helpers import ALICE, ATTESTER, receipt

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]
ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "aitbc.clients.chain_cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=60, env=env)


def test_register_adds_subcommands():
    parser = argparse.ArgumentParser()
    chain_cli.register(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["node", "--data-dir", "d", "--genesis", "g.json", "--listen", "127.0.0.1:0"])
    assert args.func is chain_cli.cmd_node and args.key is None
    args = parser.parse_args(["chain", "init", "--chain-id", "x", "--authority", "k"])
    assert args.func is chain_cli.cmd_chain_init
    for sub in (["head"], ["block", "1"], ["tx", "ab"], ["account", "ait1x"], ["receipt", "ab"]):
        assert callable(parser.parse_args(["chain", *sub]).func)


async def test_devnet_style_single_authority(tmp_path):
    keyfile = tmp_path / "authority.key"
    gpath = tmp_path / "genesis.json"
    r = _cli("chain", "init", "--chain-id", "aitbc-test", "--authority", str(keyfile), "--attester",
             ATTESTER.address, "--block-time", "0.2", "--max-price-per-unit", "1000", "--out", str(gpath))
    assert r.returncode == 0, r.stderr
    assert keyfile.exists() and json.loads(gpath.read_text())["authorities"] == [
        crypto.load_or_create_key(keyfile).address]
    assert _cli("chain", "init", "--chain-id", "aitbc-test", "--authority", str(keyfile), "--out",
                str(gpath)).returncode == 1  # refuses to overwrite with another genesis
    before = gpath.read_text()
    again = _cli("chain", "init", "--chain-id", "aitbc-test", "--authority", str(keyfile), "--attester",
                 ATTESTER.address, "--block-time", "0.2", "--max-price-per-unit", "1000", "--out", str(gpath))
    assert again.returncode == 0 and "already holds this genesis" in again.stdout  # devnet restarts
    assert gpath.read_text() == before
    port_file = tmp_path / "port"
    proc = subprocess.Popen([sys.executable, "-m", "aitbc.clients.chain_cli", "node", "--data-dir",
                             str(tmp_path / "data"), "--genesis", str(gpath), "--key", str(keyfile), "--listen",
                             "127.0.0.1:0", "--port-file", str(port_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        for _ in range(200):
            if "ledger node listening on" in line:
                break
            line = proc.stdout.readline() if proc.stdout else ""
        for _ in range(100):
            if port_file.exists():
                break
            time.sleep(0.05)
        port = int(port_file.read_text())
        assert f"ledger node listening on 127.0.0.1:{port}" in line
        target = f"127.0.0.1:{port}"
        rc = receipt(1)
        async with LedgerClient(target) as c:
            tx_hash = await c.mint(ALICE, rc)
            await c.wait_for_tx(tx_hash, final=True)
        head = json.loads(_cli("chain", "head", "--node", target).stdout)
        assert head["chain_id"] == "aitbc-test" and int(head["finalized_height"]) >= 1
        # without --node: the running devnet's ledger (its endpoints file), not whatever is on :26657
        home = tmp_path / "home"
        (home / "devnet").mkdir(parents=True)
        (home / "devnet" / "endpoints.json").write_text(json.dumps({"ledger": target}))
        env = {k: v for k, v in os.environ.items() if k != "AITBC_LEDGER"} | {"AITBC_HOME": str(home)}
        via = _cli("chain", "head", env=env)
        assert via.returncode == 0 and json.loads(via.stdout)["chain_id"] == "aitbc-test", via.stderr
        # ... and it must run that devnet's genesis: another ledger on that address is refused
        gh = json.loads(via.stdout)["genesis_hash"]
        (home / "devnet" / "endpoints.json").write_text(json.dumps({"ledger": target, "genesis_hash": gh}))
        assert _cli("chain", "head", env=env).returncode == 0
        (home / "devnet" / "endpoints.json").write_text(json.dumps({"ledger": target, "genesis_hash": "ab" * 32}))
        foreign = _cli("chain", "account", rc.body.provider, env=env)
        assert foreign.returncode == 1 and f"the ledger at {target} runs genesis {gh[:16]}... (chain 'aitbc-test'), " \
            f"not {'ab' * 8}... (the devnet in {home / 'devnet'}): another ledger answers" in foreign.stderr, foreign.stderr
        # an explicit --node is not held to the devnet's genesis, but $AITBC_GENESIS_HASH holds anything
        assert _cli("chain", "head", "--node", target, env=env).returncode == 0
        pinned = _cli("chain", "head", "--node", target, env=env | {"AITBC_GENESIS_HASH": "cd" * 32})
        assert pinned.returncode == 1 and "($AITBC_GENESIS_HASH)" in pinned.stderr
        tx = json.loads(_cli("chain", "tx", tx_hash, "--node", target).stdout)
        assert tx["status"] == "TRANSACTION_STATUS_FINAL"
        block = json.loads(_cli("chain", "block", tx["block_height"], "--txs", "--node", target).stdout)
        assert block["transactions"][0]["hash"] == tx_hash
        acct = json.loads(_cli("chain", "account", rc.body.provider, "--node", target).stdout)
        assert acct["balance"] == "1000"
        st = json.loads(_cli("chain", "receipt", rc.receipt_hash.hex(), "--node", target).stdout)
        assert st["tx_hash"] == tx_hash
        ver = _cli("chain", "verify", "--genesis", str(gpath), "--node", target)
        assert ver.returncode == 0, ver.stderr
        report = json.loads(ver.stdout)
        assert report["ok"] and report["transactions"] >= 1 and report["height"] >= int(tx["block_height"])
        other = tmp_path / "other.json"
        _cli("chain", "init", "--chain-id", "other-chain", "--authority", str(keyfile), "--out", str(other))
        wrong = _cli("chain", "verify", "--genesis", str(other), "--node", target)
        assert wrong.returncode == 1 and "runs genesis" in wrong.stderr
        # a receipt of another chain is not checked against this node (its answer would mean nothing)
        theirs = tmp_path / "theirs.receipt.json"
        theirs.write_text(json.dumps(receipt(2, chain_id="other-chain").to_json_dict()))
        r = subprocess.run([sys.executable, "-m", "aitbc.clients.cli", "receipts", "verify", str(theirs), "--node",
                            target], capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert r.returncode == 1 and f"NOT CHECKED on {target}: the ledger at {target} runs chain 'aitbc-test'; " \
            "the receipt is for chain 'other-chain'" in r.stdout, r.stdout + r.stderr
        bad = _cli("chain", "tx", "00" * 32, "--node", target)
        assert bad.returncode == 1 and "not found" in bad.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


def test_chain_init_without_a_chain_id_gets_a_unique_one_and_reruns_keep_it(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    chain_cli.register(parser.add_subparsers(dest="cmd"))
    keyfile = tmp_path / "a.key"

    def init(out: Path, *extra: str) -> int:
        args = parser.parse_args(["chain", "init", "--authority", str(keyfile), "--attester", ATTESTER.address,
                                  "--out", str(out), *extra])
        return args.func(args)

    assert init(tmp_path / "one.json") == 0 and init(tmp_path / "two.json") == 0
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert one["chain_id"].startswith("aitbc-") and one["chain_id"] != two["chain_id"]  # same keys, two networks
    before = (tmp_path / "one.json").read_text()
    capsys.readouterr()
    assert init(tmp_path / "one.json") == 0 and "already holds this genesis" in capsys.readouterr().out
    assert (tmp_path / "one.json").read_text() == before  # a re-run keeps the file's chain id
    assert init(tmp_path / "named.json", "--chain-id", "mynet") == 0
    assert json.loads((tmp_path / "named.json").read_text())["chain_id"] == "mynet"
