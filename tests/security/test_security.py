"""Security cases against real servers on 127.0.0.1 port 0 (all in this process):

- forged MINTs straight to a ledger node (wrong provider key, altered field, high-S signatures,
  cross-chain, replayed receipt hash, unauthorized attester) are refused with their stable reason and
  move no balance;
- a miner cannot impersonate another (report on a job it does not hold, register with someone
  else's public key);
- API keys (missing, wrong), per-key rate limits with retry advice, and job/result/receipt ownership;
- oversized messages (over the 8 MiB server limit) and artifacts over max_artifact_bytes;
- slowloris-style idle connections and streams: a silent Work stream is dropped after
  heartbeat_timeout_s and its job requeued, unread WatchJob streams block nobody, hundreds of idle
  channels and half-open TCP connections do not stop a valid call;
- the wallet daemon: a wrong passphrase unlocks nothing and a locked wallet signs nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import socket
import time
from typing import Any

import grpc
import pytest

from aitbc import crypto, errors, jobs, receipts, rpc
from aitbc.config import ClientKey, WalletConfig
from aitbc.coordinator import register_digest
from aitbc.ledger.client import LedgerClient
from aitbc.ledger.genesis import make_genesis
from aitbc.ledger.store import MemoryStore
from aitbc.ledger.tx import make_mint, make_transfer
from aitbc.receipts import ReceiptBody, SignedReceipt, sign_receipt
from aitbc.server.ledger import start_node
from aitbc.v1 import (
    coordinator_pb2,
    coordinator_pb2_grpc,
    job_pb2,
    ledger_pb2,
    ledger_pb2_grpc,
    miner_pb2,
    miner_pb2_grpc,
    wallet_pb2,
    wallet_pb2_grpc,
)
from tests.conftest import API_KEY, OTHER_KEY
from tests.coordinator.test_miner_gateway import RawMiner as GatewayMiner

pytestmark = pytest.mark.timeout(90)

C = grpc.StatusCode
S = job_pb2.JobState
MD = (("x-api-key", API_KEY),)
BOB_MD = (("x-api-key", OTHER_KEY),)
CHAIN = "aitbc-sec"
N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
BIG = 9 * 1024 * 1024  # over the 8 MiB server receive limit (aitbc.rpc.MAX_MESSAGE_BYTES)


def key(n: int) -> crypto.PrivateKey:
    return crypto.PrivateKey(crypto.sha256(b"aitbc-security-key-%d" % n))


AUTHORITY, ATTESTER, PROVIDER, SENDER, MALLORY, BOB = (key(i) for i in range(1, 7))


async def status_of(awaitable: Any) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await awaitable
    err = info.value
    return err.code(), err.details() or "", dict(err.trailing_metadata() or ())


def high_s(sig65: bytes) -> bytes:
    """The malleated twin of a low-S signature: s -> n - s, recovery id flipped (verifies in lax ECDSA)."""
    s = int.from_bytes(sig65[32:64], "big")
    return sig65[:32] + (N - s).to_bytes(32, "big") + bytes([sig65[64] ^ 1])


def big_channel(target: str) -> grpc.aio.Channel:
    """A client that will send more than the server accepts (the project's channels cap at 8 MiB too)."""
    return grpc.aio.insecure_channel(target, options=[("grpc.max_send_message_length", -1),
                                                      ("grpc.max_receive_message_length", -1)])


# ---- ledger: forged receipts and signatures ---------------------------------------------------------------


def body(i: int, **changes: Any) -> ReceiptBody:
    fields = dict(job_id=f"sec-job-{i}", provider=PROVIDER.address, client="alice", units=100, unit_type="gpu_ms", version=1,
                  price_per_unit=10, model="tiny-sd", prompt_hash="ab" * 32, started_at=1000, finished_at=2000,
                  artifact_sha256="cd" * 32, nonce=f"{i:032x}", hub_id="", chain_id=CHAIN)
    fields.update(changes)
    return ReceiptBody(**fields)


def attest_raw(b: ReceiptBody, provider_sig: bytes, attester: crypto.PrivateKey = ATTESTER) -> SignedReceipt:
    """Attest without checking the provider signature (SignedReceipt.attest would refuse a forgery)."""
    sig = attester.sign(crypto.domain_digest(receipts.ATTEST_DOMAIN, b.hash()))
    return SignedReceipt(b, provider_sig, attester.address, sig)


def provider_sig(b: ReceiptBody, signer: crypto.PrivateKey = PROVIDER) -> bytes:
    return signer.sign(crypto.domain_digest(receipts.PROVIDER_DOMAIN, b.hash()))


def _genesis(chain_id: str = CHAIN, **kw: Any) -> Any:
    return make_genesis(chain_id, [AUTHORITY.address], [ATTESTER.address], block_time_ms=100,
                        max_price_per_unit=1000, max_mint_per_receipt=10**12, **kw)


GENESIS = _genesis()
REF = GENESIS.ref
OTHER_REF = _genesis("aitbc-other").ref
TWIN_REF = _genesis(genesis_time_ms=1).ref  # same chain id, same keys, another network


@pytest.fixture
async def ledger():
    node, server = await start_node(MemoryStore(), GENESIS, AUTHORITY, "127.0.0.1:0")
    client = LedgerClient(f"127.0.0.1:{server.port}")
    client.target = f"127.0.0.1:{server.port}"  # type: ignore[attr-defined]
    client.node = node  # type: ignore[attr-defined]
    yield client
    await client.close()
    await node.stop()
    await server.stop(0)


async def balances(c: LedgerClient) -> dict[str, tuple[int, int]]:
    out = {}
    for k in (PROVIDER, SENDER, MALLORY, BOB):
        a = await c.get_account(k.address)
        out[k.address] = (a.balance, a.nonce)
    return out


def _forgeries() -> dict[str, tuple[Any, type[errors.AitbcError], str]]:
    """name -> (builder(valid_receipt) -> raw tx, error class, message prefix)."""

    def wrong_provider_key(r: SignedReceipt) -> bytes:
        b = body(20)  # names PROVIDER, signed by MALLORY
        return make_mint(SENDER, REF, 0, attest_raw(b, provider_sig(b, MALLORY)))

    def provider_steals(r: SignedReceipt) -> bytes:
        # MALLORY swaps in her own address as provider, keeps PROVIDER's signature and re-attests
        b = dataclasses.replace(r.body, provider=MALLORY.address)
        return make_mint(SENDER, REF, 0, attest_raw(b, r.provider_signature))

    def altered_units(r: SignedReceipt) -> bytes:
        b = dataclasses.replace(r.body, units=r.body.units * 1000)  # signatures of the original kept
        return make_mint(SENDER, REF, 0, SignedReceipt(b, r.provider_signature, r.attester, r.attester_signature))

    def altered_price_reattested(r: SignedReceipt) -> bytes:
        b = dataclasses.replace(r.body, price_per_unit=999)  # attester re-signs, provider did not
        return make_mint(SENDER, REF, 0, attest_raw(b, r.provider_signature))

    def high_s_provider(r: SignedReceipt) -> bytes:
        return make_mint(SENDER, REF, 0, dataclasses.replace(r, provider_signature=high_s(r.provider_signature)))

    def high_s_attester(r: SignedReceipt) -> bytes:
        return make_mint(SENDER, REF, 0, dataclasses.replace(r, attester_signature=high_s(r.attester_signature)))

    def high_s_tx(r: SignedReceipt) -> bytes:
        raw = make_mint(SENDER, REF, 0, r)
        s = int.from_bytes(raw[-32:], "big")
        return raw[:-32] + (N - s).to_bytes(32, "big")

    def recoverable_tx_signature(r: SignedReceipt) -> bytes:  # a second encoding of a valid tx
        raw = make_mint(SENDER, REF, 0, r)
        return raw + bytes([0])

    def same_chain_id_other_genesis(r: SignedReceipt) -> bytes:
        return make_mint(SENDER, TWIN_REF, 0, r)

    def cross_chain_receipt(r: SignedReceipt) -> bytes:
        b = body(21, chain_id="aitbc-other")
        return make_mint(SENDER, REF, 0, attest_raw(b, provider_sig(b)))

    def cross_chain_tx(r: SignedReceipt) -> bytes:
        return make_mint(SENDER, OTHER_REF, 0, r)

    def unknown_attester(r: SignedReceipt) -> bytes:
        return make_mint(SENDER, REF, 0, attest_raw(r.body, r.provider_signature, MALLORY))

    def attester_name_swapped(r: SignedReceipt) -> bytes:
        # MALLORY's attestation signature under the authorized attester's name
        sig = MALLORY.sign(crypto.domain_digest(receipts.ATTEST_DOMAIN, r.receipt_hash))
        return make_mint(SENDER, REF, 0, SignedReceipt(r.body, r.provider_signature, ATTESTER.address, sig))

    def tx_signed_by_other(r: SignedReceipt) -> bytes:
        raw = make_mint(SENDER, REF, 0, r)
        other = make_mint(MALLORY, REF, 0, r)
        return raw[:-64] + other[-64:]

    def transfer_unfunded(r: SignedReceipt) -> bytes:
        return make_transfer(MALLORY, REF, 0, BOB.address, 1)

    IA, PD, FP = errors.InvalidArgument, errors.PermissionDenied, errors.FailedPrecondition
    return {
        "wrong_provider_key": (wrong_provider_key, IA, "bad receipt: provider signature is by"),
        "provider_field_swapped": (provider_steals, IA, "bad receipt: provider signature is by"),
        "altered_units": (altered_units, IA, "bad receipt: provider signature is by"),
        "altered_price_reattested": (altered_price_reattested, IA, "bad receipt: provider signature is by"),
        "high_s_provider_signature": (high_s_provider, IA, "bad receipt: provider signature: bad signature: high-S"),
        "high_s_attester_signature": (high_s_attester, IA, "bad receipt: attester signature: bad signature: high-S"),
        "high_s_tx_signature": (high_s_tx, IA, "bad signature"),
        "recoverable_tx_signature": (recoverable_tx_signature, IA,
                                     "malformed transaction: signature must be exactly 64 bytes"),
        "same_chain_id_other_genesis": (same_chain_id_other_genesis, IA, "wrong genesis: tx is signed for genesis"),
        "cross_chain_receipt": (cross_chain_receipt, IA, "wrong chain id: receipt is for 'aitbc-other'"),
        "cross_chain_tx": (cross_chain_tx, IA, "wrong chain id: tx is for 'aitbc-other'"),
        "unknown_attester": (unknown_attester, PD, "attester not authorized"),
        "attester_name_swapped": (attester_name_swapped, IA, "bad receipt: attester signature is by"),
        "tx_signature_from_another_key": (tx_signed_by_other, IA, "bad signature"),
        "transfer_without_funds": (transfer_unfunded, FP, "insufficient balance"),
    }


FORGERIES = _forgeries()


async def test_forged_mints_and_transfers_are_refused_with_reasons_and_move_nothing(ledger: LedgerClient) -> None:
    honest = sign_receipt(body(1), PROVIDER).attest(ATTESTER)
    before = await balances(ledger)
    refused = {}
    for name, (build, cls, prefix) in FORGERIES.items():
        with pytest.raises(errors.AitbcError) as info:
            await ledger.broadcast(build(honest))
        refused[name] = (type(info.value).__name__, info.value.message)
        assert isinstance(info.value, cls), (name, refused[name])
        assert info.value.message.startswith(prefix), (name, refused[name])
    await asyncio.sleep(0.3)  # a few blocks: nothing was pending, nothing changes
    assert await balances(ledger) == before
    assert (await ledger.get_head()).height >= 1
    # the honest receipt still mints, exactly once
    tx_hash = await ledger.mint(SENDER, honest)
    st = await ledger.wait_for_receipt(honest.receipt_hash, final=True)
    assert st.tx_hash == tx_hash and st.amount == 1000
    assert (await ledger.get_account(PROVIDER.address)).balance == 1000


async def test_replayed_receipt_is_refused_forever_and_mints_once(ledger: LedgerClient) -> None:
    r = sign_receipt(body(2), PROVIDER).attest(ATTESTER)
    await ledger.mint(SENDER, r)
    # while pending: the same receipt from another sender is "already known"
    with pytest.raises(errors.AlreadyExists, match=r"^(already known|receipt already minted)"):
        await ledger.broadcast(make_mint(MALLORY, REF, 0, r))
    await ledger.wait_for_receipt(r.receipt_hash, final=True)
    after_first = await balances(ledger)
    assert after_first[PROVIDER.address][0] == 1000
    # after inclusion: any sender, any nonce, compact or not, re-attested or not -> refused
    replays = [make_mint(SENDER, REF, 1, r), make_mint(MALLORY, REF, 0, r),
               make_mint(BOB, REF, 0, attest_raw(r.body, r.provider_signature))]
    for raw in replays:
        with pytest.raises(errors.AlreadyExists, match="^receipt already minted"):
            await ledger.broadcast(raw)
    outcomes = await ledger.broadcast_many(replays)
    assert [o.accepted for o in outcomes] == [False] * 3
    assert all(isinstance(o.error, errors.AlreadyExists) for o in outcomes)
    await asyncio.sleep(0.3)
    assert await balances(ledger) == after_first
    st = await ledger.get_receipt_status(r.receipt_hash)
    assert st.status == "final" and st.amount == 1000


async def test_replayed_transfer_is_refused(ledger: LedgerClient) -> None:
    r = sign_receipt(body(3), PROVIDER).attest(ATTESTER)
    await ledger.mint(SENDER, r)
    await ledger.wait_for_receipt(r.receipt_hash, final=True)
    raw = make_transfer(PROVIDER, REF, 0, BOB.address, 10)
    await ledger.wait_for_tx(await ledger.broadcast(raw))
    before = await balances(ledger)
    with pytest.raises(errors.AitbcError) as info:
        await ledger.broadcast(raw)  # the same signed bytes again
    assert isinstance(info.value, (errors.FailedPrecondition, errors.AlreadyExists))
    assert "nonce too low" in info.value.message or "already" in info.value.message
    with pytest.raises(errors.InvalidArgument, match="^wrong chain id"):
        await ledger.broadcast(make_transfer(PROVIDER, OTHER_REF, 1, BOB.address, 10))
    await asyncio.sleep(0.3)
    assert await balances(ledger) == before


async def test_strangers_announcing_peers_cannot_grow_the_nodes_peer_set(ledger: LedgerClient) -> None:
    """StreamBlocks' peer_address makes the node dial back; strangers must not make it dial without bound."""
    node = ledger.node  # type: ignore[attr-defined]
    stub = ledger_pb2_grpc.LedgerServiceStub(ledger.channel)
    for port in range(1, 201):  # closed loopback ports: nothing answers
        call = stub.StreamBlocks(ledger_pb2.StreamBlocksRequest(from_height=1, peer_address=f"127.0.0.1:{port}"))
        await asyncio.wait_for(call.read(), 5)
        call.cancel()
    assert len(node.peers) <= 64, len(node.peers)
    head = await ledger.get_head()
    assert head.chain_id == CHAIN


# ---- coordinator helpers ------------------------------------------------------------------------------------


def cstub(net: Any) -> coordinator_pb2_grpc.CoordinatorServiceStub:
    return coordinator_pb2_grpc.CoordinatorServiceStub(net.channel())


def image_job(model: str = "null", prompt: str = "a red bicycle", **kw: Any) -> coordinator_pb2.SubmitJobRequest:
    return coordinator_pb2.SubmitJobRequest(model=model, params=job_pb2.JobParams(
        image=job_pb2.ImageParams(prompt=prompt, **kw)))


async def wait_done(s: Any, job_id: str, md: Any = MD, timeout: float = 60) -> job_pb2.Job:
    job = None
    async for ev in s.WatchJob(coordinator_pb2.WatchJobRequest(job_id=job_id), metadata=md, timeout=timeout):
        if ev.WhichOneof("event") == "job":
            job = ev.job
    assert job is not None and job.state in jobs.TERMINAL
    return job


async def fetch(s: Any, job_id: str, md: Any = MD) -> bytes:
    return b"".join([c.data async for c in s.GetJobResult(coordinator_pb2.GetJobResultRequest(job_id=job_id),
                                                           metadata=md)])


class RawMiner(GatewayMiner):
    """The hand-driven miner of the gateway tests; `connect` also waits until the coordinator
    lists it."""

    async def connect(self, models: tuple[str, ...] = ("null",), **info: Any) -> None:
        await super().connect(models, **info)
        await self.net.until(lambda: self.key.address in self.net.core.miners)


async def assigned(net: Any, miner: RawMiner, md: Any = MD) -> job_pb2.Job:
    await cstub(net).SubmitJob(image_job(seed=1, width=64, height=64), metadata=md)
    msg = await miner.read()
    assert msg.WhichOneof("msg") == "assignment"
    miner.send(accepted=miner_pb2.JobAccepted(job_id=msg.assignment.task.job_id))
    await net.until(lambda: net.core.machine.job(msg.assignment.task.job_id).state == S.JOB_STATE_RUNNING)
    return msg.assignment.task


# ---- miner impersonation ----------------------------------------------------------------------------------


async def test_a_miner_cannot_report_on_another_miners_job(net: Any) -> None:
    from aitbc.miner.backend import null_png

    victim, mallory = RawMiner(net), RawMiner(net)
    await victim.connect()
    job = await assigned(net, victim)
    await mallory.connect()
    png = null_png("a red bicycle", 1, 64, 64)
    forged = [
        dict(accepted=miner_pb2.JobAccepted(job_id=job.job_id)),
        dict(progress=job_pb2.JobProgress(job_id=job.job_id, step=1, total_steps=2)),
        dict(chunk=miner_pb2.ArtifactChunk(job_id=job.job_id, index=0, data=png)),
        dict(result=mallory.result_for(job, png)),                      # her own receipt for his job
        dict(result=mallory.result_for(job, png, provider=victim.key.address, key=mallory.key)),  # in his name
        dict(failed=miner_pb2.JobFailed(job_id=job.job_id, reason="sabotage", permanent=True)),
        dict(text=job_pb2.TextChunk(job_id=job.job_id, text="injected")),
    ]
    for msg in forged:
        mallory.send(**msg)
        reply = await mallory.read()
        assert reply.WhichOneof("msg") == "rejected", msg
        assert "not assigned to miner" in reply.rejected.reason
    current = net.core.machine.job(job.job_id)
    assert current.state == S.JOB_STATE_RUNNING and current.miner_id == victim.key.address
    # the rightful miner still completes it, with his own receipt
    victim.send(chunk=miner_pb2.ArtifactChunk(job_id=job.job_id, index=0, data=png))
    victim.send(result=victim.result_for(job, png))
    reply = await victim.read()
    assert reply.WhichOneof("msg") == "accepted"
    done = await wait_done(cstub(net), job.job_id)
    assert done.state == S.JOB_STATE_COMPLETED and done.receipt.body.provider == victim.key.address


async def test_register_with_someone_elses_public_key_is_refused(net: Any) -> None:
    victim, mallory = key(40), key(41)
    ms = miner_pb2_grpc.MinerServiceStub(net.channel())
    info = miner_pb2.MinerInfo(models=["null"])
    cases = {
        "victim_key_own_signature": lambda ch: mallory.sign(register_digest(ch, victim.pubkey)),
        "victim_key_sig_over_own_key": lambda ch: mallory.sign(register_digest(ch, mallory.pubkey)),
        "high_s_victim_signature": lambda ch: high_s(victim.sign(register_digest(ch, victim.pubkey))),
        "victim_signature_on_an_old_challenge": lambda ch: victim.sign(register_digest(b"\x00" * 32, victim.pubkey)),
    }
    for name, sign in cases.items():
        ch = (await ms.GetChallenge(miner_pb2.GetChallengeRequest())).challenge
        code, details, _ = await status_of(ms.Register(miner_pb2.RegisterRequest(
            public_key=victim.pubkey, challenge=ch, signature=sign(ch), info=info)))
        assert code == C.UNAUTHENTICATED, (name, code, details)
        assert "signature" in details, (name, details)
    assert victim.address not in net.core.miners
    # a challenge is single-use: a signature captured for one registration cannot be replayed
    ch = (await ms.GetChallenge(miner_pb2.GetChallengeRequest())).challenge
    req = miner_pb2.RegisterRequest(public_key=victim.pubkey, challenge=ch,
                                    signature=victim.sign(register_digest(ch, victim.pubkey)), info=info)
    await ms.Register(req)
    code, details, _ = await status_of(ms.Register(req))
    assert code == C.UNAUTHENTICATED and "challenge" in details
    # and a forged session token opens no Work stream
    code, _, _ = await status_of(ms.Work(iter(()), metadata=(("x-miner-session", "0" * 48),)).read())
    assert code == C.UNAUTHENTICATED


# ---- API keys, rate limits, ownership ---------------------------------------------------------------------


async def test_every_client_rpc_needs_a_known_api_key(net: Any) -> None:
    s = cstub(net)
    jid = "0" * 28
    calls = {
        "SubmitJob": lambda md: s.SubmitJob(image_job(), metadata=md),
        "QuoteJob": lambda md: s.QuoteJob(coordinator_pb2.QuoteJobRequest(
            model="null", params=job_pb2.JobParams(image=job_pb2.ImageParams(prompt="x"))), metadata=md),
        "GetJob": lambda md: s.GetJob(coordinator_pb2.GetJobRequest(job_id=jid), metadata=md),
        "CancelJob": lambda md: s.CancelJob(coordinator_pb2.CancelJobRequest(job_id=jid), metadata=md),
        "WatchJob": lambda md: s.WatchJob(coordinator_pb2.WatchJobRequest(job_id=jid), metadata=md).read(),
        "GetJobResult": lambda md: s.GetJobResult(coordinator_pb2.GetJobResultRequest(job_id=jid), metadata=md).read(),
        "ListReceipts": lambda md: s.ListReceipts(coordinator_pb2.ListReceiptsRequest(), metadata=md),
        "GetReceipt": lambda md: s.GetReceipt(coordinator_pb2.GetReceiptRequest(job_id=jid), metadata=md),
        "GenerateImage": lambda md: s.GenerateImage(coordinator_pb2.GenerateImageRequest(
            model="null", params=job_pb2.ImageParams(prompt="x")), metadata=md),
        "ListModels": lambda md: s.ListModels(coordinator_pb2.ListModelsRequest(), metadata=md),
        "ListMiners": lambda md: s.ListMiners(coordinator_pb2.ListMinersRequest(), metadata=md),
        "ReleaseMiner": lambda md: s.ReleaseMiner(coordinator_pb2.ReleaseMinerRequest(miner_id="ait1x"), metadata=md),
    }
    assert set(calls) == {m.name for m in coordinator_pb2.DESCRIPTOR.services_by_name["CoordinatorService"].methods}
    bad_keys = {"missing": (), "empty": (("x-api-key", ""),), "wrong": (("x-api-key", "not-a-key"),),
                "hash_of_the_key": (("x-api-key", hashlib.sha256(API_KEY.encode()).hexdigest()),),
                "key_with_suffix": (("x-api-key", API_KEY + " "),), "other_header": (("authorization", API_KEY),)}
    for method, call in calls.items():
        for label, md in bad_keys.items():
            code, details, _ = await status_of(call(md))
            assert code == C.UNAUTHENTICATED, (method, label, code, details)
            assert "API key" in details
    assert not net.core.machine.records


async def test_rate_limit_answers_resource_exhausted_with_retry_advice_per_key(network_factory: Any) -> None:
    net = await network_factory(clients=[
        ClientKey("alice", hashlib.sha256(API_KEY.encode()).hexdigest(), rate_per_s=2, burst=3),
        ClientKey("bob", hashlib.sha256(OTHER_KEY.encode()).hexdigest(), rate_per_s=100, burst=100)])
    s = cstub(net)
    req = coordinator_pb2.ListModelsRequest()
    for _ in range(3):
        await s.ListModels(req, metadata=MD)
    code, details, trailers = await status_of(s.ListModels(req, metadata=MD))
    assert code == C.RESOURCE_EXHAUSTED
    assert "rate limit" in details and "retry in" in details
    retry_ms = int(trailers["retry-after-ms"])
    assert 0 < retry_ms <= 1000
    # a flood from alice does not starve bob
    flood = await asyncio.gather(*(status_of(s.ListModels(req, metadata=MD)) for _ in range(20)))
    assert {c for c, _, _ in flood} == {C.RESOURCE_EXHAUSTED}
    for _ in range(20):
        await s.ListModels(req, metadata=BOB_MD)
    # honouring the advice works
    await asyncio.sleep(retry_ms / 1000 + 0.05)
    await s.ListModels(req, metadata=MD)


async def test_a_client_cannot_read_or_cancel_another_clients_job_result_or_receipt(net: Any, null_backend: Any) -> None:
    await net.add_miner({"null": null_backend})
    s = cstub(net)
    done = await wait_done(s, (await s.SubmitJob(image_job(seed=3), metadata=MD)).job.job_id)
    assert done.state == S.JOB_STATE_COMPLETED
    slow = (await s.SubmitJob(image_job(steps=150, seed=4), metadata=MD)).job
    jid, rh = done.job_id, done.receipt_hash
    denied = {
        "GetJob": s.GetJob(coordinator_pb2.GetJobRequest(job_id=jid), metadata=BOB_MD),
        "WatchJob": s.WatchJob(coordinator_pb2.WatchJobRequest(job_id=jid), metadata=BOB_MD).read(),
        "GetJobResult": s.GetJobResult(coordinator_pb2.GetJobResultRequest(job_id=jid), metadata=BOB_MD).read(),
        "GetReceipt(job_id)": s.GetReceipt(coordinator_pb2.GetReceiptRequest(job_id=jid), metadata=BOB_MD),
        "GetReceipt(receipt_hash)": s.GetReceipt(coordinator_pb2.GetReceiptRequest(receipt_hash=rh), metadata=BOB_MD),
        "ListReceipts(job_id)": s.ListReceipts(coordinator_pb2.ListReceiptsRequest(job_id=jid), metadata=BOB_MD),
        "CancelJob(finished)": s.CancelJob(coordinator_pb2.CancelJobRequest(job_id=jid), metadata=BOB_MD),
        "CancelJob(active)": s.CancelJob(coordinator_pb2.CancelJobRequest(job_id=slow.job_id), metadata=BOB_MD),
        "WatchJob(active)": s.WatchJob(coordinator_pb2.WatchJobRequest(job_id=slow.job_id), metadata=BOB_MD).read(),
    }
    for name, call in denied.items():
        code, details, _ = await status_of(call)
        assert code == C.PERMISSION_DENIED, (name, code, details)
        assert "another client" in details
    assert not (await s.ListReceipts(coordinator_pb2.ListReceiptsRequest(), metadata=BOB_MD)).receipts
    # nothing bob did changed alice's jobs
    assert (await s.GetJob(coordinator_pb2.GetJobRequest(job_id=jid), metadata=MD)).job.state == S.JOB_STATE_COMPLETED
    assert (await wait_done(s, slow.job_id)).state == S.JOB_STATE_COMPLETED
    # the same request_id from two clients names two different jobs
    a = (await s.SubmitJob(coordinator_pb2.SubmitJobRequest(model="null", request_id="shared-id", params=job_pb2.JobParams(
        image=job_pb2.ImageParams(prompt="mine"))), metadata=MD)).job
    b = (await s.SubmitJob(coordinator_pb2.SubmitJobRequest(model="null", request_id="shared-id", params=job_pb2.JobParams(
        image=job_pb2.ImageParams(prompt="theirs"))), metadata=BOB_MD)).job
    assert a.job_id != b.job_id and b.client_id == "bob" and b.params.image.prompt == "theirs"


# ---- oversized messages and artifacts ------------------------------------------------------------------------


async def test_oversized_messages_are_refused_and_every_server_keeps_serving(net: Any, ledger: LedgerClient,
                                                                            tmp_path: Any) -> None:
    from aitbc.server.wallet import start_wallet_daemon, stop_wallet_daemon

    ledger_target = _target_of(ledger)
    from aitbc.wallet import access

    conf = WalletConfig(keystore_dir=str(tmp_path / "w"), ledger=ledger_target, kdf_profile="fast", idle_lock_s=30)
    wallet_daemon = await start_wallet_daemon(conf)
    coord = big_channel(net.address)
    wallet_token = access.credential(access.read_connection(tmp_path / "w")[1])
    wallet = grpc.aio.insecure_channel(wallet_daemon.address, options=[
        ("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)],
        interceptors=rpc.metadata_interceptors(wallet_token))
    led = big_channel(ledger_target)
    session = await RawMiner(net).register()
    try:
        huge = "x" * BIG
        cases = {
            "SubmitJob": coordinator_pb2_grpc.CoordinatorServiceStub(coord).SubmitJob(image_job(prompt=huge), metadata=MD),
            "Register": miner_pb2_grpc.MinerServiceStub(coord).Register(miner_pb2.RegisterRequest(
                public_key=b"\x02" * BIG)),
            "Work": miner_pb2_grpc.MinerServiceStub(coord).Work(iter([miner_pb2.WorkRequest(
                chunk=miner_pb2.ArtifactChunk(job_id="x", data=b"\x00" * BIG))]),
                metadata=(("x-miner-session", session.session_token),)).read(),
            "BroadcastTransaction": ledger_pb2_grpc.LedgerServiceStub(led).BroadcastTransaction(
                ledger_pb2.BroadcastTransactionRequest(raw=b"\x01" * BIG)),
            "CreateWallet": wallet_pb2_grpc.WalletServiceStub(wallet).CreateWallet(
                wallet_pb2.CreateWalletRequest(name="w", passphrase=huge)),
        }
        for name, call in cases.items():
            code, details, _ = await status_of(call)
            assert code == C.RESOURCE_EXHAUSTED, (name, code, details)
        # every server still serves a valid call
        s = cstub(net)
        await s.ListModels(coordinator_pb2.ListModelsRequest(), metadata=MD)
        await miner_pb2_grpc.MinerServiceStub(coord).GetChallenge(miner_pb2.GetChallengeRequest())
        assert (await ledger.get_head()).chain_id == CHAIN
        made = await wallet_pb2_grpc.WalletServiceStub(wallet).CreateWallet(
            wallet_pb2.CreateWalletRequest(name="ok", passphrase="pw"))
        assert made.wallet.address.startswith("ait1")
    finally:
        await coord.close()
        await wallet.close()
        await led.close()
        await stop_wallet_daemon(wallet_daemon)


async def test_artifacts_beyond_max_artifact_bytes_are_rejected_and_the_job_requeued(network_factory: Any) -> None:
    from aitbc.miner.backend import null_png

    net = await network_factory(max_artifact_bytes=4096)
    m = RawMiner(net)
    await m.connect()
    job = await assigned(net, m)
    png = null_png("a red bicycle", 1, 64, 64)
    m.send(chunk=miner_pb2.ArtifactChunk(job_id=job.job_id, index=0, data=png))
    for _ in range(3):  # 3 x 2 KiB more: over 4 KiB in total
        m.send(chunk=miner_pb2.ArtifactChunk(job_id=job.job_id, index=0, data=b"\x00" * 2048))
    reply = await m.read()
    assert reply.WhichOneof("msg") == "rejected" and "artifacts exceed 4096 bytes" in reply.rejected.reason
    current = net.core.machine.job(job.job_id)
    assert current.state == S.JOB_STATE_QUEUED and "artifacts exceed" in current.wait_reason
    assert not net.core.uploads.files(job.job_id) and net.core.uploads.total == 0  # the upload was deleted
    assert not list((net.tmp / "coordinator" / "uploads").iterdir())
    # a result for the rejected upload is refused too (the job is no longer this miner's)
    m.send(result=m.result_for(job, png))
    reply = await m.read()
    assert reply.WhichOneof("msg") == "rejected"
    assert not net.core.store.get_job(job.job_id).receipt_hash


# ---- slowloris: idle streams and connections --------------------------------------------------------------


@pytest.mark.slow
async def test_silent_work_stream_is_dropped_after_the_heartbeat_timeout_and_its_job_requeued(
        network_factory: Any, null_backend: Any) -> None:
    net = await network_factory(heartbeat_timeout_s=1.0, heartbeat_interval_s=0.25)
    silent = RawMiner(net)
    await silent.connect()  # registers, opens Work, then never sends a byte (no heartbeat, no accept)
    s = cstub(net)
    job = (await s.SubmitJob(image_job(seed=5), metadata=MD)).job
    first = await silent.read()
    assert first.assignment.task.job_id == job.job_id
    started = time.monotonic()
    # the coordinator ends the stream by itself (the server closes it, not us)
    async with asyncio.timeout(8):
        while True:
            msg = await silent.call.read()
            if msg is grpc.aio.EOF:
                break
    dropped_after = time.monotonic() - started
    assert 0.8 <= dropped_after <= 5.0, dropped_after
    assert silent.key.address not in net.core.miners
    requeued = (await s.GetJob(coordinator_pb2.GetJobRequest(job_id=job.job_id), metadata=MD)).job
    assert requeued.state == S.JOB_STATE_QUEUED and "no heartbeat" in requeued.wait_reason
    assert "no heartbeat" in requeued.story[-1].cause and requeued.story[-1].from_state == S.JOB_STATE_ASSIGNED
    honest = await net.add_miner({"null": null_backend})
    done = await wait_done(s, job.job_id)
    assert done.state == S.JOB_STATE_COMPLETED and done.miner_id == honest.key.address and done.attempts == 2


async def bob_round_trips(s: Any, seed: int) -> float:
    """Seconds for 5 of bob's jobs, one after the other, submit to completion."""
    started = time.monotonic()
    for i in range(5):
        other = (await s.SubmitJob(image_job(seed=seed + i, steps=2), metadata=BOB_MD, timeout=30)).job
        assert (await wait_done(s, other.job_id, BOB_MD, timeout=30)).state == S.JOB_STATE_COMPLETED
    return time.monotonic() - started


@pytest.mark.slow
async def test_unread_watch_streams_block_no_one(net: Any, null_backend: Any) -> None:
    from aitbc.coordinator import WATCH_QUEUE

    busy = RawMiner(net)
    await busy.connect()
    job = await assigned(net, busy)  # alice's job, held by a miner that will flood progress
    await net.add_miner({"null": null_backend})
    s = cstub(net)
    baseline = await bob_round_trips(s, 90)
    lazy = coordinator_pb2_grpc.CoordinatorServiceStub(net.channel())
    # 50 watchers that open the stream and never read a message
    watchers = [lazy.WatchJob(coordinator_pb2.WatchJobRequest(job_id=job.job_id), metadata=MD) for _ in range(50)]
    await net.until(lambda: net.core.streams.watchers(job.job_id) == 50, timeout=10)
    # ~150 KB of progress events per watcher: far past HTTP/2's 64 KiB window of an unread stream
    for i in range(3000):
        busy.send(progress=job_pb2.JobProgress(job_id=job.job_id, step=i % 100 + 1, total_steps=100))
    await net.until(lambda: busy.outbox.empty(), timeout=90)  # the condition itself; a loaded box is slow
    # meanwhile other clients' work flows at about normal speed (bounds generous: CI boxes are shared)
    flooded = await bob_round_trips(s, 100)
    assert flooded < 10 * baseline + 5, (flooded, baseline)
    assert max(net.core.streams.queue_sizes(job.job_id), default=0) <= WATCH_QUEUE
    # the flooded job still finishes normally, and a reading watcher sees the end
    busy.send(failed=miner_pb2.JobFailed(job_id=job.job_id, reason="done flooding", permanent=True))
    done = await wait_done(s, job.job_id, timeout=10)
    # a "permanent" failure is checked on the other miner, which runs the job
    assert done.state == S.JOB_STATE_COMPLETED and done.attempts == 2
    assert any("done flooding" in t.cause and t.to_state == S.JOB_STATE_QUEUED for t in done.story)
    for w in watchers:
        w.cancel()
    await net.until(lambda: not net.core.streams.watched(job.job_id), timeout=10)


async def test_hundreds_of_idle_channels_and_half_open_connections_do_not_stop_a_valid_call(
        net: Any, null_backend: Any) -> None:
    await net.add_miner({"null": null_backend})
    host, port = net.address.rsplit(":", 1)
    # 200 gRPC channels that connect and then do nothing
    idle = [rpc.channel(net.address) for _ in range(200)]
    await asyncio.gather(*(asyncio.wait_for(ch.channel_ready(), 10) for ch in idle))
    # 100 raw TCP connections that send half an HTTP/2 preface and stall (slowloris)
    socks = []
    for _ in range(100):
        sock = socket.create_connection((host, int(port)), timeout=5)
        sock.sendall(b"PRI * HTTP/2.0\r\n")
        socks.append(sock)
    try:
        s = cstub(net)
        started = time.monotonic()
        job = (await s.SubmitJob(image_job(seed=8), metadata=MD, timeout=5)).job
        assert (await wait_done(s, job.job_id, timeout=20)).state == S.JOB_STATE_COMPLETED
        assert time.monotonic() - started < 5
        # one of the idle channels wakes up and works too
        got = await coordinator_pb2_grpc.CoordinatorServiceStub(idle[-1]).GetJob(
            coordinator_pb2.GetJobRequest(job_id=job.job_id), metadata=MD, timeout=5)
        assert got.job.state == S.JOB_STATE_COMPLETED
    finally:
        for sock in socks:
            sock.close()
        await asyncio.gather(*(ch.close() for ch in idle))


async def test_registrations_that_never_connect_do_not_pin_memory(net: Any) -> None:
    """Register is open to any fresh key, so what it keeps must be bounded: oversized MinerInfo is
    refused, and a session that never opens its Work stream expires (tokens are single-use)."""
    from aitbc.coordinator import SESSION_TTL_S

    channel = big_channel(net.address)
    ms = miner_pb2_grpc.MinerServiceStub(channel)

    async def register(info: Any) -> Any:
        k = crypto.PrivateKey.generate()
        ch = (await ms.GetChallenge(miner_pb2.GetChallengeRequest())).challenge
        return await ms.Register(miner_pb2.RegisterRequest(
            public_key=k.pubkey, challenge=ch, signature=k.sign(register_digest(ch, k.pubkey)), info=info))

    try:
        for i in range(5):  # 2 MiB of gpu_name each
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await register(miner_pb2.MinerInfo(models=["null"], gpu_name="g" * (2 * 1024 * 1024), device=f"cuda:{i}"))
            assert err.value.code() == C.INVALID_ARGUMENT and "gpu_name" in err.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await register(miner_pb2.MinerInfo(models=[f"m{i}" for i in range(100)]))
        assert err.value.code() == C.INVALID_ARGUMENT
        assert not net.core.registry.sessions
        reg = await register(miner_pb2.MinerInfo(models=["null"]))
        assert len(net.core.registry.sessions) == 1
        real_clock = net.core.clock
        net.core.clock = lambda: real_clock() + SESSION_TTL_S + 1  # the token was never used in time
        with pytest.raises(grpc.aio.AioRpcError) as err:
            call = ms.Work(iter(()), metadata=(("x-miner-session", reg.session_token),))
            await call.read()
        assert err.value.code() == C.UNAUTHENTICATED and "expired" in err.value.details()
        assert not net.core.registry.sessions
        net.core.clock = real_clock
    finally:
        await channel.close()


@pytest.mark.slow
async def test_a_challenge_flood_does_not_lock_honest_miners_out(net: Any, null_backend: Any) -> None:
    for _ in range(10_001):  # what a flood of GetChallenge calls leaves behind (taken in-process: fast)
        net.core.challenge()
    honest = RawMiner(net)
    code = await status_of_or_ok(honest.register())
    assert code == C.OK, code


async def status_of_or_ok(awaitable: Any) -> grpc.StatusCode:
    try:
        await awaitable
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return C.OK


# ---- wallet daemon -------------------------------------------------------------------------------------------


@pytest.fixture
async def wallet_env(ledger: LedgerClient, tmp_path: Any):
    from aitbc.server.wallet import start_wallet_daemon, stop_wallet_daemon

    head = await ledger.get_head()
    target = _target_of(ledger)  # the node the fixture started
    from aitbc.wallet import access

    # a 1 ms unlock backoff: the guessing throttle has its own tests (tests/wallet/test_access.py)
    conf = WalletConfig(keystore_dir=str(tmp_path / "wallets"), ledger=target, idle_lock_s=30, kdf_profile="fast",
                        unlock_backoff_base_s=0.001, unlock_backoff_max_s=0.001)
    daemon = await start_wallet_daemon(conf)
    ch = access.channel(tmp_path / "wallets")
    yield wallet_pb2_grpc.WalletServiceStub(ch), ledger, head
    await ch.close()
    await stop_wallet_daemon(daemon)


def _target_of(ledger: LedgerClient) -> str:
    return ledger.target  # type: ignore[attr-defined]


async def test_wrong_passphrase_unlocks_nothing_and_a_locked_wallet_signs_nothing(wallet_env: Any) -> None:
    w, ledger, _ = wallet_env
    PASS = "correct horse battery staple"
    await w.ImportWallet(wallet_pb2.ImportWalletRequest(name="provider", passphrase=PASS,
                                                        private_key_hex=PROVIDER.secret.hex()))
    r = sign_receipt(body(30), PROVIDER).attest(ATTESTER)
    await ledger.mint(SENDER, r)
    await ledger.wait_for_receipt(r.receipt_hash, final=True)
    before = await balances(ledger)
    send = wallet_pb2.SendRequest(from_wallet="provider", to=BOB.address, amount=5)
    sign = wallet_pb2.SignTransactionRequest(from_wallet="provider", to=BOB.address, amount=5, nonce=0, chain_id=CHAIN,
                                             genesis_hash=REF.genesis_hash.hex())
    # locked from the start: nothing signs
    for call in (w.Send(send), w.SignTransaction(sign)):
        code, details, _ = await status_of(call)
        assert code == C.FAILED_PRECONDITION and "locked" in details
    # wrong passphrases (including near misses) unlock nothing
    for wrong in ("", "correct horse battery stapl", PASS.upper(), PASS + " ", "x" * 10_000):
        code, details, _ = await status_of(w.UnlockWallet(wallet_pb2.UnlockWalletRequest(name="provider",
                                                                                          passphrase=wrong)))
        assert code in (C.PERMISSION_DENIED, C.UNAUTHENTICATED, C.INVALID_ARGUMENT, C.RESOURCE_EXHAUSTED), (
            wrong[:20], code, details)
        assert PASS not in details and PROVIDER.secret.hex() not in details
        listed = (await w.ListWallets(wallet_pb2.ListWalletsRequest())).wallets
        assert [x.unlocked for x in listed if x.name == "provider"] == [False]
        code, _, _ = await status_of(w.SignTransaction(sign))
        assert code == C.FAILED_PRECONDITION
    # the export stays encrypted: no private key in it
    exported = (await w.ExportWallet(wallet_pb2.ExportWalletRequest(name="provider"))).keystore_json
    assert PROVIDER.secret.hex() not in exported and PASS not in exported
    json.loads(exported)
    # unlock, sign once, lock: signing stops at once
    await w.UnlockWallet(wallet_pb2.UnlockWalletRequest(name="provider", passphrase=PASS))
    signed = await w.SignTransaction(sign)
    assert signed.raw and signed.chain_id == CHAIN
    assert (await w.LockWallet(wallet_pb2.LockWalletRequest(name="provider"))).was_unlocked
    for call in (w.Send(send), w.SignTransaction(sign)):
        code, details, _ = await status_of(call)
        assert code == C.FAILED_PRECONDITION and "locked" in details
    # an idle timeout locks it by itself
    await w.UnlockWallet(wallet_pb2.UnlockWalletRequest(name="provider", passphrase=PASS, timeout_ms=200))
    await asyncio.sleep(0.6)
    code, details, _ = await status_of(w.SignTransaction(sign))
    assert code == C.FAILED_PRECONDITION and "locked" in details
    await asyncio.sleep(0.3)
    assert await balances(ledger) == before  # nothing was ever broadcast
