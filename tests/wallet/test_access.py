"""Who may call the wallet daemon (issue 13, attack 7): a real WalletService on its default unix
socket in tmp_path. Calls without the token (or with a wrong one) are refused for every method of the
service descriptor, the socket and the token are 0600 in a 0700 folder, loopback TCP works only with
the token and nothing else binds, passphrase guessing is throttled (an injected clock, no sleeps),
and ImportWallet never opens a path it is sent."""

from __future__ import annotations

import asyncio
import os
import stat

import grpc
import pytest
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from aitbc import errors, rpc
from aitbc.config import WalletConfig
from aitbc.server.wallet import SERVICE_NAME, start_wallet_daemon, stop_wallet_daemon
from aitbc.v1 import wallet_pb2 as W
from aitbc.v1 import wallet_pb2_grpc
from aitbc.wallet import access
from aitbc.wallet.throttle import Backoff, UnlockThrottle

from .conftest import FakeClock
from .test_service import BOB, PASS, PROVIDER

pytestmark = pytest.mark.timeout(60)
SERVICE = W.DESCRIPTOR.services_by_name["WalletService"]


def conf_for(tmp_path, **kw) -> WalletConfig:
    return WalletConfig(keystore_dir=str(tmp_path / "wallets"), ledger="", kdf_profile="fast", **kw)


@pytest.fixture
async def daemon(tmp_path):
    clock = FakeClock()
    d = await start_wallet_daemon(conf_for(tmp_path), clock=clock)
    d.clock = clock  # type: ignore[attr-defined]
    yield d
    await stop_wallet_daemon(d)


def raw_call(ch: grpc.aio.Channel, method, request, metadata=()):
    """Call any method of the descriptor with the right kind of multi-callable."""
    path = f"/{SERVICE.full_name}/{method.name}"
    resp = message_factory.GetMessageClass(method.output_type)
    kind = {(False, False): ch.unary_unary, (False, True): ch.unary_stream,
            (True, False): ch.stream_unary, (True, True): ch.stream_stream}[
        (method.client_streaming, method.server_streaming)]
    call = kind(path, request_serializer=lambda m: m.SerializeToString(), response_deserializer=resp.FromString)
    arg = iter([request]) if method.client_streaming else request
    return call(arg, metadata=metadata, timeout=10)


async def outcome(call) -> tuple[grpc.StatusCode, str]:
    try:
        if hasattr(call, "__aiter__") and not hasattr(call, "__await__"):
            async for _ in call:
                pass
        else:
            await call
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def methods():
    return [pytest.param(m, id=m.name) for m in SERVICE.methods]


def test_every_wallet_rpc_is_in_the_parametrization():
    assert {m.name for m in SERVICE.methods} >= {"CreateWallet", "ImportWallet", "ListWallets", "ExportWallet",
                                                 "UnlockWallet", "Send", "SignTransaction", "VerifyReceipt"}


@pytest.mark.parametrize("method", methods())
async def test_calls_without_the_token_are_refused(daemon, tmp_path, method):
    request = message_factory.GetMessageClass(method.input_type)()
    token_file = str(daemon.access.files.token)
    async with rpc.channel(daemon.address) as ch:
        code, msg = await outcome(raw_call(ch, method, request))
        assert code == grpc.StatusCode.UNAUTHENTICATED and token_file in msg, (code, msg)
        wrong = access.credential("x" * 43)
        code, msg = await outcome(raw_call(ch, method, request, wrong))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "wrong wallet daemon token" in msg
        code, msg = await outcome(raw_call(ch, method, request, (("authorization", "Basic abc"),)))
        assert code == grpc.StatusCode.UNAUTHENTICATED
    async with access.channel(tmp_path / "wallets") as ch:  # the handler is reached with the token
        code, msg = await outcome(raw_call(ch, method, request))
        assert code != grpc.StatusCode.UNAUTHENTICATED or "passphrase" in msg, (code, msg)


async def test_a_refused_call_does_nothing_and_health_and_reflection_stay_open(daemon, tmp_path):
    async with rpc.channel(daemon.address) as ch:
        stub = wallet_pb2_grpc.WalletServiceStub(ch)
        code, _ = await outcome(stub.CreateWallet(W.CreateWalletRequest(name="mine", passphrase=PASS)))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert not (tmp_path / "wallets" / "mine.json").exists()
        ok = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        assert ok.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)  # the public schema, so buf curl finds the method
        async for answer in refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
                list_services="")])):
            assert SERVICE_NAME in [s.name for s in answer.list_services_response.service]
    async with access.channel(tmp_path / "wallets") as ch:
        stub = wallet_pb2_grpc.WalletServiceStub(ch)
        assert (await stub.CreateWallet(W.CreateWalletRequest(name="mine", passphrase=PASS))).wallet.name == "mine"


async def test_socket_token_and_folder_modes(daemon, tmp_path):
    files = daemon.access.files
    assert files.run_dir == tmp_path / "wallets" / ".daemon"
    assert daemon.address == f"unix:{files.socket}"
    assert stat.S_ISSOCK(os.stat(files.socket).st_mode)
    assert stat.S_IMODE(os.stat(files.socket).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(files.run_dir).st_mode) == 0o700
    for f in (files.token, files.endpoint):
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o600, f
    assert files.endpoint.read_text().strip() == daemon.address
    assert len(files.token.read_text().strip()) >= 43


async def test_token_changes_per_start_and_files_go_at_stop(tmp_path):
    first = await start_wallet_daemon(conf_for(tmp_path))
    token = first.access.files.token.read_text()
    with pytest.raises(errors.FailedPrecondition, match="another wallet daemon is serving on"):
        await start_wallet_daemon(conf_for(tmp_path))
    await stop_wallet_daemon(first)
    assert not first.access.files.token.exists() and not first.access.files.endpoint.exists()
    with pytest.raises(errors.Unavailable, match="no wallet daemon is running for keystore"):
        access.read_connection(tmp_path / "wallets")
    second = await start_wallet_daemon(conf_for(tmp_path))
    try:
        assert second.access.files.token.read_text() != token
    finally:
        await stop_wallet_daemon(second)


async def test_loopback_tcp_needs_the_token_too(tmp_path):
    d = await start_wallet_daemon(conf_for(tmp_path, listen="127.0.0.1:0"))
    try:
        assert d.address == f"127.0.0.1:{d.server.port}"
        assert stat.S_IMODE(os.stat(d.access.files.token).st_mode) == 0o600
        async with rpc.channel(d.address) as ch:
            code, msg = await outcome(wallet_pb2_grpc.WalletServiceStub(ch).ListWallets(W.ListWalletsRequest()))
            assert code == grpc.StatusCode.UNAUTHENTICATED and str(d.access.files.token) in msg
        async with access.channel(tmp_path / "wallets") as ch:
            assert list((await wallet_pb2_grpc.WalletServiceStub(ch).ListWallets(W.ListWalletsRequest())).wallets) == []
    finally:
        await stop_wallet_daemon(d)


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "192.0.2.1:18002", "[::]:0", "example.org:18002", "18002"])
async def test_a_listener_beyond_loopback_is_refused(tmp_path, listen):
    with pytest.raises(errors.FailedPrecondition, match="refusing to listen on .*unix socket.*loopback"):
        await start_wallet_daemon(conf_for(tmp_path, listen=listen, allow_insecure=True))


async def test_a_daemon_folder_open_to_others_or_a_long_socket_path_is_refused(tmp_path):
    run_dir = tmp_path / "wallets" / ".daemon"
    run_dir.mkdir(parents=True, mode=0o700)
    os.chmod(tmp_path / "wallets", 0o700)
    os.chmod(run_dir, 0o755)
    with pytest.raises(errors.FailedPrecondition, match="open to other users .*chmod 700"):
        await start_wallet_daemon(conf_for(tmp_path))
    os.chmod(run_dir, 0o700)
    (run_dir / "wallet.sock").write_text("not a socket")
    with pytest.raises(errors.FailedPrecondition, match="exists and is not a socket"):
        await start_wallet_daemon(conf_for(tmp_path))
    assert (run_dir / "wallet.sock").read_text() == "not a socket"  # left alone
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    with pytest.raises(errors.FailedPrecondition, match="the limit is 107"):
        await start_wallet_daemon(WalletConfig(keystore_dir=str(deep), ledger="", kdf_profile="fast"))


# ---- passphrase guessing ------------------------------------------------------------------------

async def test_passphrase_guessing_is_throttled_per_wallet(daemon, tmp_path):
    clock = daemon.clock
    async with access.channel(tmp_path / "wallets") as ch:
        stub = wallet_pb2_grpc.WalletServiceStub(ch)
        for name in ("alice", "bob"):
            await stub.CreateWallet(W.CreateWalletRequest(name=name, passphrase=PASS))

        def unlock(name="alice", phrase="guess"):
            return stub.UnlockWallet(W.UnlockWalletRequest(name=name, passphrase=phrase))

        for _ in range(2):  # free attempts
            assert (await outcome(unlock()))[0] == grpc.StatusCode.UNAUTHENTICATED
        code, msg = await outcome(unlock())
        assert code == grpc.StatusCode.UNAUTHENTICATED and "3 wrong in a row" in msg and "refused for 1 s" in msg
        # in the backoff even the right passphrase is not tried; the answer says when to retry
        try:
            await unlock(phrase=PASS)
            raise AssertionError("unlock during the backoff succeeded")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "retry in 1 s" in exc.details() and "not tried" in exc.details()
            assert dict(exc.trailing_metadata())[rpc.RETRY_AFTER_MS] == "1000"
        # another wallet is not affected
        assert (await unlock("bob", PASS)).wallet.unlocked
        clock.advance(1.0)
        code, msg = await outcome(unlock())  # 4th wrong one: the backoff doubles
        assert code == grpc.StatusCode.UNAUTHENTICATED and "refused for 2 s" in msg
        clock.advance(1.9)
        assert (await outcome(unlock(phrase=PASS)))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
        clock.advance(0.1)
        assert (await unlock(phrase=PASS)).wallet.unlocked  # after the backoff the right one works
        assert daemon.core.unlocked.throttle.failures("alice") == 0  # and clears the count
        assert (await outcome(unlock()))[0] == grpc.StatusCode.UNAUTHENTICATED
        assert (await outcome(unlock()))[0] == grpc.StatusCode.UNAUTHENTICATED  # free again


async def test_backoff_is_bounded_so_the_owner_always_gets_back_in(daemon, tmp_path):
    clock = daemon.clock
    async with access.channel(tmp_path / "wallets") as ch:
        stub = wallet_pb2_grpc.WalletServiceStub(ch)
        await stub.CreateWallet(W.CreateWalletRequest(name="alice", passphrase=PASS))
        waits = []
        for _ in range(40):  # a guesser that always retries exactly when allowed
            try:
                await stub.UnlockWallet(W.UnlockWalletRequest(name="alice", passphrase="guess"))
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
            st = daemon.core.unlocked.throttle._states["alice"]
            waits.append(st.until - clock())
            clock.advance(waits[-1])
        assert waits[:9] == [0, 0, 1, 2, 4, 8, 16, 32, 60] and max(waits) == 60.0
        assert (await stub.UnlockWallet(W.UnlockWalletRequest(name="alice", passphrase=PASS))).wallet.unlocked


def test_backoff_policy_and_one_attempt_at_a_time():
    b = Backoff(base_s=0.5, max_s=10.0)
    assert [b.delay(n) for n in range(1, 9)] == [0, 0, 0.5, 1, 2, 4, 8, 10]
    assert b.delay(10_000) == 10.0
    with pytest.raises(errors.InvalidArgument):
        Backoff(base_s=5, max_s=1)
    clock = FakeClock()
    t = UnlockThrottle(b, clock=clock)
    with t.attempt("alice"):  # a check still running: a parallel guess is refused, not queued
        with pytest.raises(errors.ResourceExhausted, match="another unlock of wallet 'alice'"):
            with t.attempt("alice"):
                pass
    for _ in range(3):
        with pytest.raises(errors.Unauthenticated), t.attempt("alice"):
            raise errors.Unauthenticated("wrong passphrase")
    with pytest.raises(errors.ResourceExhausted) as info:
        with t.attempt("ALICE"):  # names are unique case-insensitively: so is the throttle
            raise AssertionError("entered during the backoff")
    assert info.value.retry_after_s == 0.5
    clock.advance(b.forget_after_s)  # a quiet quarter-hour forgets the streak
    with t.attempt("alice"):
        pass
    assert t.tracked() == 0
    with pytest.raises(errors.NotFound), t.attempt("ghost"):  # unknown wallets leave no state
        raise errors.NotFound("no such wallet")
    assert t.tracked() == 0


# ---- import takes key material only --------------------------------------------------------------

async def test_import_with_a_path_is_refused_without_reading_it(daemon, tmp_path):
    async with access.channel(tmp_path / "wallets") as ch:
        stub = wallet_pb2_grpc.WalletServiceStub(ch)
        await stub.CreateWallet(W.CreateWalletRequest(name="alice", passphrase=PASS))
        doc = (await stub.ExportWallet(W.ExportWalletRequest(name="alice"))).keystore_json
        # a valid keystore of a key this daemon does not hold yet, at a path it could read
        other = tmp_path / "bob.json"
        from aitbc.wallet.keystore import INSECURE_FAST_KDF, Keystore

        ks = Keystore(tmp_path / "elsewhere", kdf=INSECURE_FAST_KDF)
        ks.import_key("bob", BOB.secret, PASS)
        other.write_text(ks.export("bob"))
        answers = set()
        for path in (str(other), str(tmp_path / "missing.json"), "/etc/passwd", "wallets/alice.json"):
            code, msg = await outcome(stub.ImportWallet(W.ImportWalletRequest(name="x", keystore_json=path)))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a path" in msg
            answers.add(msg)
        assert len(answers) == 1  # nothing tells an existing path from a missing one
        for path in (str(other), str(tmp_path / "miner.key")):
            code, msg = await outcome(stub.ImportWallet(W.ImportWalletRequest(
                name="x", passphrase=PASS, private_key_hex=path)))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "64 hex" in msg and path not in msg
        assert [w.name for w in (await stub.ListWallets(W.ListWalletsRequest())).wallets] == ["alice"]
        # the content itself imports
        made = await stub.ImportWallet(W.ImportWalletRequest(keystore_json=other.read_text(), passphrase=PASS))
        assert (made.wallet.name, made.wallet.address) == ("bob", BOB.address)
        key = await stub.ImportWallet(W.ImportWalletRequest(name="p", passphrase=PASS,
                                                            private_key_hex=PROVIDER.secret.hex()))
        assert key.wallet.address == PROVIDER.address
        assert doc  # exported content stays importable elsewhere (test_daemon)


async def test_many_parallel_guesses_get_at_most_one_try_each_turn(daemon, tmp_path):
    async with access.channel(tmp_path / "wallets") as ch:
        stub = wallet_pb2_grpc.WalletServiceStub(ch)
        await stub.CreateWallet(W.CreateWalletRequest(name="alice", passphrase=PASS))
        for _ in range(3):
            await outcome(stub.UnlockWallet(W.UnlockWalletRequest(name="alice", passphrase="guess")))
        codes = await asyncio.gather(*(outcome(stub.UnlockWallet(W.UnlockWalletRequest(
            name="alice", passphrase="guess"))) for _ in range(20)))
        assert {c for c, _ in codes} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert daemon.core.unlocked.throttle.failures("alice") == 3
