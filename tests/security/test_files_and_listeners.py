"""What a local process or a network peer could read: data folders 0700, files 0600, and no
plaintext listener beyond loopback unless the operator says so (THREAT-MODEL.md)."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest

from aitbc import rpc
from aitbc.config import private_dir
from aitbc.errors import FailedPrecondition
from aitbc.ledger.store import LmdbStore


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


async def test_the_coordinators_data_folder_and_files_are_its_owners_only(network_factory: Any, tmp_path: Path) -> None:
    net = await network_factory(event_log=str(tmp_path / "logs" / "events.jsonl"))
    data = net.tmp / "coordinator"
    assert mode(data) == 0o700 and mode(data / "jobs") == 0o700
    files = sorted((data / "jobs").iterdir())
    assert files and all(mode(f) == 0o600 for f in files), [(f.name, oct(mode(f))) for f in files]
    assert mode(tmp_path / "logs") == 0o700 and mode(tmp_path / "logs" / "events.jsonl") == 0o600
    assert mode(net.tmp / "coordinator.key") == 0o600
    await net.stop_coordinator()


def test_the_ledgers_lmdb_is_its_owners_only(tmp_path: Path) -> None:
    store = LmdbStore(tmp_path / "node" / "ledger")
    store.commit({b"k": b"v"})
    assert mode(tmp_path / "node") == 0o700 and mode(tmp_path / "node" / "ledger") == 0o700
    assert all(mode(f) == 0o600 for f in (tmp_path / "node" / "ledger").iterdir())


def test_private_dir_leaves_an_existing_folder_alone(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    assert mode(private_dir(shared)) == 0o755  # the operator's own folder: not ours to change
    assert mode(private_dir(shared / "a" / "b")) == 0o700 and mode(shared / "a") == 0o700


@pytest.mark.parametrize(("listen", "loopback"), [
    ("127.0.0.1:0", True), ("127.5.5.5:18000", True), ("[::1]:0", True), ("localhost:18000", True),
    ("0.0.0.0:18000", False), ("[::]:0", False), (":18000", False), ("10.0.0.5:18000", False),
    ("coordinator.example.org:18000", False), ("unix:/run/aitbc/wallet.sock", True),
])
def test_loopback_is_recognised(listen: str, loopback: bool) -> None:
    assert rpc.is_loopback(listen) is loopback


async def test_a_plaintext_listener_beyond_loopback_is_refused_unless_allowed() -> None:
    try:
        rpc.configure_tls()
        with pytest.raises(FailedPrecondition, match="refusing to serve plaintext on 0.0.0.0:0.*allow_insecure"):
            await rpc.start_server("0.0.0.0:0", [])
        rpc.configure_tls(allow_insecure=True)
        running = await rpc.start_server("0.0.0.0:0", [])
        assert running.port > 0
        await running.stop(0)
    finally:
        rpc.configure_tls()


async def test_a_coordinator_on_all_interfaces_without_tls_does_not_start(tmp_path: Path) -> None:
    from aitbc.config import CoordinatorConfig
    from aitbc.server.coordinator import start_coordinator

    conf = CoordinatorConfig(listen="0.0.0.0:0", data_dir=str(tmp_path / "c"), key_file=str(tmp_path / "c.key"))
    with pytest.raises(FailedPrecondition, match="allow_insecure"):
        await start_coordinator(conf)
    assert not (tmp_path / "c").exists()  # refused before anything was created
