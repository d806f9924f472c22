"""TLS is a config switch: with a certificate the coordinator, ledger nodes and miners' peers talk
TLS; clients that trust the CA get through, plaintext clients and clients trusting another CA do
not; bad TLS configuration is refused at start with the file and the reason.

The test PKI lives in tests/fixtures/tls (scripts/make_test_certs.sh wrote it): a CA, a server
certificate for localhost / 127.0.0.1 / ::1 signed by it, and an unrelated CA."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aitbc import rpc
from aitbc.errors import FailedPrecondition, InvalidArgument, Unavailable
from aitbc.ledger.client import LedgerClient
from aitbc.ledger.store import MemoryStore
from aitbc.server.ledger import start_node
from aitbc.v1 import coordinator_pb2, coordinator_pb2_grpc, job_pb2
from tests.conftest import API_KEY
from tests.coordinator.test_jobs_api import MD, fetch, image_job, stub, wait_done
from tests.ledger.helpers import AUTH, genesis

PKI = Path(__file__).resolve().parents[1] / "fixtures" / "tls"
CA, CERT, KEY, OTHER_CA = (str(PKI / n) for n in ("ca.pem", "server.pem", "server.key", "other-ca.pem"))
ROOT = Path(__file__).resolve().parents[2]
BUF = ROOT / ".tools" / "node_modules" / ".bin" / "buf"


@pytest.fixture
def tls_on() -> Iterator[None]:
    """This process serves with the test certificate and dials trusting the test CA."""
    rpc.configure_tls(CERT, KEY, CA)
    try:
        yield
    finally:
        rpc.configure_tls()


async def test_a_tls_network_runs_a_job_end_to_end(tls_on, network_factory, null_backend) -> None:
    net = await network_factory()
    miner = await net.add_miner({"null": null_backend})  # registers and works over TLS
    s = stub(net)
    done = await wait_done(s, (await s.SubmitJob(image_job(model="null", seed=4, width=64, height=64),
                                                 metadata=MD)).job.job_id)
    assert done.state == job_pb2.JobState.JOB_STATE_COMPLETED and done.miner_id == miner.key.address
    _, data = await fetch(s, done.job_id)
    assert data.startswith(b"\x89PNG")

    # a plaintext client, and a client that trusts another CA, get nothing from it
    for ch in (grpc.aio.insecure_channel(net.address),
               grpc.aio.secure_channel(net.address, grpc.ssl_channel_credentials(Path(OTHER_CA).read_bytes()))):
        async with ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await coordinator_pb2_grpc.CoordinatorServiceStub(ch).ListModels(
                    coordinator_pb2.ListModelsRequest(), metadata=MD, timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE

    # the CLI dials it with --tls-ca (a separate process: its own TLS settings)
    base = [sys.executable, "-m", "aitbc.clients.cli"]
    conn = ["models", "--coordinator", net.address, "--api-key", API_KEY]
    ok = await asyncio.to_thread(subprocess.run, [*base, "--tls-ca", CA, *conn], capture_output=True, text=True,
                                 timeout=60)
    assert ok.returncode == 0 and "null" in ok.stdout, ok.stderr
    plain = await asyncio.to_thread(subprocess.run, [*base, *conn], capture_output=True, text=True, timeout=60,
                                    env=dict(os.environ, AITBC_RETRY_ATTEMPTS="1"))  # refused: not worth retrying
    assert plain.returncode != 0 and "UNAVAILABLE" in plain.stderr, plain.stderr


async def test_ledger_nodes_sync_over_tls(tls_on) -> None:
    g = genesis(1, block_time_ms=100)
    a, server_a = await start_node(MemoryStore(), g, AUTH[0], "127.0.0.1:0")
    b, server_b = await start_node(MemoryStore(), g, None, "127.0.0.1:0", peers=[f"127.0.0.1:{server_a.port}"])
    try:
        async with LedgerClient(f"127.0.0.1:{server_b.port}") as c:
            for _ in range(100):  # the follower catches up from the authority over TLS
                head = await c.get_head()
                if head.height >= 3:
                    break
                await asyncio.sleep(0.1)
        assert head.height >= 3 and b.chain.hash_at(3) == a.chain.hash_at(3)
    finally:
        for node, server in ((b, server_b), (a, server_a)):
            await node.stop()
            await server.stop(0)


async def test_a_client_with_a_ca_dials_only_tls_to_a_server_that_ca_signed() -> None:
    """What the client side of the switch promises (aitbc.rpc.channel, which every SDK, node and miner
    dials through): with a CA configured it never falls back to plaintext (a man in the middle that
    answers in clear text gets nothing), and it checks the server's certificate against that CA, not
    the system's roots (a certificate some other CA signed is refused)."""
    g = genesis(1)
    rpc.configure_tls(CERT, KEY)  # serves TLS
    tls_node, tls_server = await start_node(MemoryStore(), g, None, "127.0.0.1:0")
    rpc.configure_tls()  # serves plaintext (loopback)
    plain_node, plain_server = await start_node(MemoryStore(), g, None, "127.0.0.1:0")
    try:
        rpc.configure_tls(ca_file=CA)
        async with LedgerClient(f"127.0.0.1:{tls_server.port}", timeout=10) as c:
            assert (await c.get_head()).genesis_hash == g.hash().hex()
        async with LedgerClient(f"127.0.0.1:{plain_server.port}", timeout=10) as c:
            with pytest.raises(Unavailable):
                await c.get_head()
        with rpc.open_sync_channel(f"127.0.0.1:{plain_server.port}") as ch:  # the blocking SDK's channel too
            with pytest.raises(grpc.RpcError) as err:
                health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        rpc.configure_tls(ca_file=OTHER_CA)
        async with LedgerClient(f"127.0.0.1:{tls_server.port}", timeout=10) as c:
            with pytest.raises(Unavailable):
                await c.get_head()
    finally:
        rpc.configure_tls()
        for node, server in ((tls_node, tls_server), (plain_node, plain_server)):
            await node.stop()
            await server.stop(0)


@pytest.mark.skipif(not BUF.exists(), reason="buf is not installed (make install)")
async def test_buf_curl_with_the_ca(tls_on, net) -> None:
    """What an operator types against a TLS coordinator (docs/operations.md)."""
    args = [str(BUF), "curl", "--protocol", "grpc", "--reflect-protocol", "grpc-v1alpha", "--cacert", CA,
            "-H", f"x-api-key: {API_KEY}", f"https://{net.address}/aitbc.v1.CoordinatorService/ListModels"]
    proc = await asyncio.to_thread(subprocess.run, args, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout or "{}") == {}  # no miner yet: no models


def test_bad_tls_configuration_is_refused_with_the_reason(tmp_path: Path) -> None:
    try:
        with pytest.raises(InvalidArgument, match="set both tls_cert_file and tls_key_file"):
            rpc.configure_tls(cert_file=CERT)
        with pytest.raises(FailedPrecondition, match=r"tls_ca_file .*nowhere\.pem: cannot read it"):
            rpc.configure_tls(ca_file=str(tmp_path / "nowhere.pem"))
        with pytest.raises(InvalidArgument, match="tls_cert_file .* is not a PEM certificate"):
            rpc.configure_tls(cert_file=KEY, key_file=KEY)
        with pytest.raises(InvalidArgument, match="tls_key_file .* is not a PEM private key"):
            rpc.configure_tls(cert_file=CERT, key_file=CERT)
        assert not rpc.tls().serves and not rpc.tls().dials  # a refused setting changes nothing
        with pytest.raises(FailedPrecondition, match=r"^--tls-ca .*nowhere\.pem: cannot read it"):
            rpc.configure_tls(ca_file=str(tmp_path / "nowhere.pem"), names=rpc.FLAG_NAMES)  # the CLI's wording
    finally:
        rpc.configure_tls()


def test_the_coordinator_process_refuses_a_half_tls_config(tmp_path: Path) -> None:
    conf = tmp_path / "coordinator.toml"
    conf.write_text(f'listen = "127.0.0.1:0"\ndata_dir = "{tmp_path / "data"}"\nkey_file = "{tmp_path / "k"}"\n'
                    f'tls_cert_file = "{CERT}"\n')
    proc = subprocess.run([sys.executable, "-m", "aitbc.clients.cli", "coordinator", "--config", str(conf)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "set both tls_cert_file and tls_key_file" in proc.stderr, proc.stderr
