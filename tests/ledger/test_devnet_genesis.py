"""The devnet writes a genesis of its own (a chain id with a random suffix) and refuses, with what
to do, a folder made by ledger format 1 (its transactions would be valid on any devnet)."""

from __future__ import annotations

import json

import pytest

from aitbc.clients.devnet import CHAIN_PREFIX, Devnet
from aitbc.errors import FailedPrecondition
from aitbc.ledger.genesis import Genesis


def _devnet(path):
    return Devnet(path, coordinator_listen="127.0.0.1:0", miner_ops_listen="127.0.0.1:0",
                  ledger_listen="127.0.0.1:0", wallet_listen="127.0.0.1:0")


def test_each_devnet_has_its_own_chain_id_kept_across_restarts(tmp_path):
    a, b = _devnet(tmp_path / "a").prepare(), _devnet(tmp_path / "b").prepare()
    assert a["chain_id"].startswith(CHAIN_PREFIX + "-") and a["chain_id"] != b["chain_id"]
    assert Genesis.load(tmp_path / "a" / "genesis.json").chain_id == a["chain_id"]
    assert f'chain_id = "{a["chain_id"]}"' in (tmp_path / "a" / "coordinator.toml").read_text()
    assert _devnet(tmp_path / "a").prepare()["chain_id"] == a["chain_id"]  # a restart reuses it


def test_a_format_1_devnet_folder_is_refused_with_what_to_do(tmp_path):
    _devnet(tmp_path).prepare()
    gfile = tmp_path / "genesis.json"
    old = json.loads(gfile.read_text())
    gfile.write_text(json.dumps({**old, "version": 1}))
    with pytest.raises(FailedPrecondition, match=f"^devnet folder {tmp_path}: genesis version 1 is not supported: "
                                                 f".* remove {gfile} and {tmp_path / 'ledger'}"):
        _devnet(tmp_path).prepare()
