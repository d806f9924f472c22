"""grpc's own retries (aitbc.rpc.SERVICE_CONFIG on every aitbc.rpc.channel): a read whose server
answers UNAVAILABLE once is answered by the second attempt; a write is never sent twice."""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pool

from aitbc import rpc
from aitbc.v1 import (
    coordinator_pb2,
    coordinator_pb2_grpc,
    job_pb2,
    ledger_pb2,
    ledger_pb2_grpc,
    miner_pb2,
    wallet_pb2,
)

LEDGER = "aitbc.v1.LedgerService"
COORD = "aitbc.v1.CoordinatorService"


class FlakyLedger(ledger_pb2_grpc.LedgerServiceServicer):
    """Answers UNAVAILABLE to the first call of each method, then serves."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    async def _first_fails(self, method: str, context: grpc.aio.ServicerContext) -> None:
        self.calls[method] = self.calls.get(method, 0) + 1
        if self.calls[method] == 1:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "restarting, try again")

    async def GetHead(self, request, context):  # type: ignore[no-untyped-def]
        await self._first_fails("GetHead", context)
        return ledger_pb2.GetHeadResponse(chain_id="flaky")

    async def BroadcastTransaction(self, request, context):  # type: ignore[no-untyped-def]
        await self._first_fails("BroadcastTransaction", context)
        return ledger_pb2.BroadcastTransactionResponse(hash="00")


class FlakyCoordinator(coordinator_pb2_grpc.CoordinatorServiceServicer):
    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    async def _first_fails(self, method: str, context: grpc.aio.ServicerContext) -> None:
        self.calls[method] = self.calls.get(method, 0) + 1
        if self.calls[method] == 1:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "restarting, try again")

    async def GetJob(self, request, context):  # type: ignore[no-untyped-def]
        await self._first_fails("GetJob", context)
        return coordinator_pb2.GetJobResponse(job=job_pb2.Job(job_id=request.job_id))

    async def SubmitJob(self, request, context):  # type: ignore[no-untyped-def]
        await self._first_fails("SubmitJob", context)
        return coordinator_pb2.SubmitJobResponse(job=job_pb2.Job(job_id="new"))


async def test_reads_survive_one_unavailable_and_writes_are_sent_once() -> None:
    ledger, coord = FlakyLedger(), FlakyCoordinator()
    running = await rpc.start_server("127.0.0.1:0", [
        rpc.Service(ledger_pb2_grpc.add_LedgerServiceServicer_to_server, ledger, LEDGER),
        rpc.Service(coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server, coord, COORD),
    ])
    try:
        async with rpc.channel(f"127.0.0.1:{running.port}") as ch:
            lstub = ledger_pb2_grpc.LedgerServiceStub(ch)
            cstub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
            head = await lstub.GetHead(ledger_pb2.GetHeadRequest(), timeout=10)
            assert head.chain_id == "flaky" and ledger.calls["GetHead"] == 2
            job = await cstub.GetJob(coordinator_pb2.GetJobRequest(job_id="j"), timeout=10)
            assert job.job.job_id == "j" and coord.calls["GetJob"] == 2

            for call, request, calls, method in (
                (lstub.BroadcastTransaction, ledger_pb2.BroadcastTransactionRequest(raw=b"tx"), ledger.calls,
                 "BroadcastTransaction"),
                (cstub.SubmitJob, coordinator_pb2.SubmitJobRequest(model="m"), coord.calls, "SubmitJob"),
            ):
                try:
                    await call(request, timeout=10)
                except grpc.aio.AioRpcError as exc:
                    code = exc.code()
                else:
                    raise AssertionError(f"{method} was sent again")
                assert code == grpc.StatusCode.UNAVAILABLE and calls[method] == 1, method
    finally:
        await running.stop(None)


def test_the_retry_policy_names_only_reads_that_exist() -> None:
    from grpc_health.v1 import health_pb2

    assert miner_pb2 and wallet_pb2 and health_pb2  # imported: their services are in the pool

    pool = descriptor_pool.Default()
    for service, methods in rpc.RETRIED_READS.items():
        names = {m.name for m in pool.FindServiceByName(service).methods}
        assert set(methods) <= names, (service, set(methods) - names)
    never = {"SubmitJob", "CancelJob", "GenerateImage", "ReleaseMiner", "Register", "Work", "WatchJob",
             "BroadcastTransaction", "BroadcastTransactions", "SubmitVotes", "StreamBlocks", "CreateWallet",
             "ImportWallet", "ExportWallet", "UnlockWallet", "LockWallet", "Send", "SignTransaction"}
    assert not never & {m for methods in rpc.RETRIED_READS.values() for m in methods}
    (config,) = rpc.SERVICE_CONFIG["methodConfig"]
    assert config["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert 2 <= config["retryPolicy"]["maxAttempts"] <= 5
