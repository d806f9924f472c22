"""The devnet writes a genesis of its own (a chain id with a random suffix); ledger format 1 data
(a devnet folder, a node's data folder) is refused naming the folder and what to do."""

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


async def test_a_node_refuses_a_format_1_data_folder_naming_it(tmp_path):
    from aitbc.ledger.chain import HEAD, META_CHAIN, META_GENESIS
    from aitbc.ledger.store import LmdbStore
    from aitbc.server.ledger import run_node

    from .helpers import genesis

    g = genesis(1)
    g.save(tmp_path / "genesis.json")
    store = LmdbStore(tmp_path / "old" / "ledger")  # what a format-1 node left behind
    store.commit({META_GENESIS: g.hash(), META_CHAIN: g.chain_id.encode(), HEAD: b"\x00" * 32})
    store.close()
    with pytest.raises(FailedPrecondition, match=f"^{tmp_path / 'old'}: data folder holds a ledger format 1 chain; "
                                                 "this node runs format 5: .* start the nodes on new data folders"):
        await run_node(tmp_path / "old", tmp_path / "genesis.json", listen="127.0.0.1:0")
