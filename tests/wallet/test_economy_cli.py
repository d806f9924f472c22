"""`aitbc stake|unstake|withdraw`, `aitbc escrow deposit|withdraw|reclaim`, `aitbc chain account`
and `aitbc chain supply` through the real command against a real node process."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from aitbc.ledger.client import LedgerClient

from .test_cli import aitbc, start, stop
from .test_service import ATTESTER, PASS, PROVIDER, receipt


def _ints(doc: dict) -> dict:
    """The proto JSON mapping writes uint64 as strings."""
    out = {k: int(v) if isinstance(v, str) and v.isdigit() else v for k, v in doc.items()}
    out["escrows"] = [_ints(e) for e in doc.get("escrows", [])] if "escrows" in doc else []
    return out


@pytest.mark.slow
def test_economy_commands_end_to_end(tmp_path):
    env = dict(os.environ, AITBC_HOME=str(tmp_path / "home"), AITBC_WALLET_KDF_PROFILE="fast",
               AITBC_WALLET_PASSPHRASE=PASS)
    env.pop("AITBC_LEDGER", None)
    (tmp_path / "attester.key").write_text(ATTESTER.secret.hex())
    (tmp_path / "miner.key").write_text(PROVIDER.secret.hex() + "\n")
    aitbc("chain", "init", "--chain-id", "aitbc-wallet-test", "--authority", str(tmp_path / "authority.key"),
          "--attester", str(tmp_path / "attester.key"), "--block-time", "0.2", "--unbonding-blocks", "2",
          "--escrow-timeout-blocks", "2", "--out", str(tmp_path / "genesis.json"), env=env)
    assert json.loads((tmp_path / "genesis.json").read_text())["version"] == 3
    node, port = start(["node", "--data-dir", str(tmp_path / "node"), "--genesis", str(tmp_path / "genesis.json"),
                        "--key", str(tmp_path / "authority.key"), "--listen", "127.0.0.1:0",
                        "--port-file", str(tmp_path / "node.port")], env, tmp_path / "node.log", tmp_path / "node.port")
    try:
        ledger = env["AITBC_LEDGER"] = f"127.0.0.1:{port}"

        async def mint() -> None:  # 100 x 10 to the miner
            async with LedgerClient(ledger) as c:
                r = receipt(1)
                await c.mint(ATTESTER, r)
                await c.wait_for_receipt(r.receipt_hash)

        asyncio.run(mint())
        aitbc("wallet", "import", "miner", "--key-file", str(tmp_path / "miner.key"), env=env)
        cp = aitbc("stake", "1001", "--wallet", "miner", env=env, check=False)
        assert cp.returncode == 1 and "balance 1000 is less than 1001: receive 1 more first" in cp.stderr, cp.stderr
        out = aitbc("stake", "600", "--wallet", "miner", env=env).stdout
        assert "balance 400, staked 600, unbonding 0" in out, out
        out = aitbc("unstake", "100", "--wallet", "miner", env=env).stdout
        assert "staked 500, unbonding 100 (unlocks at height" in out, out
        acct = _ints(json.loads(aitbc("chain", "account", PROVIDER.address, env=env).stdout))
        assert (acct["staked"], acct["unbonding"]) == (500, 100) and acct["unlock_height"] > 0
        while int(json.loads(aitbc("chain", "account", PROVIDER.address, env=env).stdout)["height"]) + 1 \
                < acct["unlock_height"]:
            cp = aitbc("withdraw", "--wallet", "miner", env=env, check=False)
            if cp.returncode == 0:  # the unlock height came between the two commands
                break
            assert "100 still unbonding: it unlocks at height" in cp.stderr, cp.stderr
        else:
            cp = aitbc("withdraw", "--wallet", "miner", env=env)
        assert "balance 500, staked 500, unbonding 0" in cp.stdout, cp.stdout
        out = aitbc("escrow", "deposit", "200", "--wallet", "miner", env=env).stdout  # the only attester
        assert f"escrow for {ATTESTER.address}: 200 available, 0 unlocking" in out, out
        out = aitbc("escrow", "withdraw", "50", "--wallet", "miner", "--attester", ATTESTER.address, env=env).stdout
        assert "150 available, 50 unlocking (reclaimable from height" in out, out
        cp = aitbc("escrow", "reclaim", "--wallet", "miner", env=env, check=False)
        if cp.returncode:  # still locked at the next block: the node's message says until when
            assert "escrow still locked: 50 unlock at height" in cp.stderr, cp.stderr
        sup = _ints(json.loads(aitbc("chain", "supply", env=env).stdout))
        assert sup["minted"] == sup["supply"] == 1000 and sup["staked"] == 500 and sup["burned"] == 0
        acct = _ints(json.loads(aitbc("chain", "account", PROVIDER.address, env=env).stdout))
        held = acct["balance"] + acct["staked"] + acct["unbonding"] + sum(e["available"] + e["unlocking"]
                                                                          for e in acct["escrows"])
        assert held == 1000 and sup["escrowed"] == sum(e["available"] + e["unlocking"] for e in acct["escrows"])
    finally:
        stop(node)
