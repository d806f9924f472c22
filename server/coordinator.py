"""gRPC servers of the coordinator: CoordinatorService (clients) and MinerService (miners).

Thin: parse, call aitbc.coordinator.Coordinator, map the result. Errors become statuses in
aitbc.rpc.handle_errors.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc

from aitbc import crypto, jobs, quotes, rpc, telemetry
from aitbc.config import CoordinatorConfig, expand, write_port_file
from aitbc.coordinator import Coordinator, fees
from aitbc.coordinator.clock import Clock
from aitbc.coordinator.settlement import Settlement, chain_mismatch
from aitbc.coordinator.store import JobStore, LmdbJobStore
from aitbc.errors import AitbcError, FailedPrecondition, InvalidArgument, ResourceExhausted
from aitbc.limits import KeyedBuckets
from aitbc.rpc import CHUNK_BYTES, RunningServer, Service, handle_errors, start_server
from aitbc.v1 import (
    coordinator_pb2,
    coordinator_pb2_grpc,
    job_pb2,
    miner_pb2,
    miner_pb2_grpc,
)

log = logging.getLogger("aitbc.server.coordinator")
S = job_pb2.JobState
COORDINATOR_SERVICE = coordinator_pb2.DESCRIPTOR.services_by_name["CoordinatorService"].full_name
# Health name of the settlement path: NOT_SERVING while the ledger node is unreachable (jobs still run
# and receipts queue up; they mint when it is back). Registered only when settlement is configured.
SETTLEMENT_HEALTH = f"{COORDINATOR_SERVICE}/settlement"
INLINE_IMAGE_LIMIT = 3 * 1024 * 1024


def _metadata(context: grpc.aio.ServicerContext, key: str) -> str | None:
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return v if isinstance(v, str) else v.decode()
    return None


class StoreErrors:
    """What a failure of the coordinator's store means to a caller (rpc.handle_errors asks): on
    PostgreSQL a lost database is Unavailable, naming it without its password (PostgresJobStore.error)."""

    core: Coordinator

    def translate_error(self, exc: Exception) -> AitbcError | None:
        error = getattr(self.core.store, "error", None)
        return error(exc) if error is not None else None


class CoordinatorServicer(StoreErrors, coordinator_pb2_grpc.CoordinatorServiceServicer):
    def __init__(self, core: Coordinator) -> None:
        self.core = core

    def _client(self, context: grpc.aio.ServicerContext) -> str:
        return self.core.authenticate(_metadata(context, "x-api-key")).id

    def _stream(self, context: grpc.aio.ServicerContext) -> tuple[str, Any]:
        """The client of a server stream, and its hold on one of its max_streams (a `with`)."""
        client = self.core.authenticate(_metadata(context, "x-api-key"))
        return client.id, self.core.auth.stream(client)

    @handle_errors
    async def SubmitJob(self, request: coordinator_pb2.SubmitJobRequest, context: Any) -> coordinator_pb2.SubmitJobResponse:
        client = self._client(context)
        quote = None
        if request.quote or request.quote_signature:
            if len(request.quote_signature) != 65:
                raise InvalidArgument("quote_signature must be the 65 bytes QuoteJob returned with the quote")
            quote = quotes.SignedQuote(quotes.QuoteBody.from_canonical(request.quote), request.quote_signature)
        job = await self.core.submit(
            client, request.model, request.params, request_id=request.request_id,
            max_price_per_unit=request.max_price_per_unit if request.HasField("max_price_per_unit") else None,
            webhook_url=request.webhook_url, quote=quote,
            priority_fee=request.priority_fee if request.HasField("priority_fee") else None,
        )
        telemetry.set_attributes(job_id=job.job_id, model=job.model, client_id=client)
        return coordinator_pb2.SubmitJobResponse(job=job)

    @handle_errors
    async def QuoteJob(self, request: coordinator_pb2.QuoteJobRequest, context: Any) -> coordinator_pb2.QuoteJobResponse:
        client = self._client(context)
        return await self.core.quote(request.model, request.params, request.max_price_per_unit
                                     if request.HasField("max_price_per_unit") else None,
                                     client_id=client, priority_fee=request.priority_fee)

    @handle_errors
    async def GetJob(self, request: coordinator_pb2.GetJobRequest, context: Any) -> coordinator_pb2.GetJobResponse:
        telemetry.set_attributes(job_id=request.job_id)
        return coordinator_pb2.GetJobResponse(job=await self.core.get(self._client(context), request.job_id))

    @handle_errors
    async def CancelJob(self, request: coordinator_pb2.CancelJobRequest, context: Any) -> coordinator_pb2.CancelJobResponse:
        telemetry.set_attributes(job_id=request.job_id)
        job = await self.core.cancel(self._client(context), request.job_id, request.reason)
        return coordinator_pb2.CancelJobResponse(job=job)

    @handle_errors
    async def WatchJob(self, request: coordinator_pb2.WatchJobRequest, context: Any) -> AsyncIterator[coordinator_pb2.WatchJobResponse]:
        telemetry.set_attributes(job_id=request.job_id)
        client, held = self._stream(context)
        with held:
            async for event in self.core.watch(client, request.job_id):
                if isinstance(event, job_pb2.Job):
                    yield coordinator_pb2.WatchJobResponse(job=event)
                elif isinstance(event, job_pb2.TextChunk):
                    yield coordinator_pb2.WatchJobResponse(text=event)
                else:
                    yield coordinator_pb2.WatchJobResponse(progress=event)

    @handle_errors
    async def GetJobResult(self, request: coordinator_pb2.GetJobResultRequest, context: Any) -> AsyncIterator[coordinator_pb2.GetJobResultResponse]:
        telemetry.set_attributes(job_id=request.job_id, index=request.index)
        client, held = self._stream(context)
        with held:
            art, f = await self.core.artifact(client, request.job_id, request.index)
            async with f:  # read a chunk at a time: a download holds one chunk in memory, not the artifact
                yield coordinator_pb2.GetJobResultResponse(artifact=art, offset=0, data=await f.read(CHUNK_BYTES))
                for offset in range(CHUNK_BYTES, art.size, CHUNK_BYTES):
                    yield coordinator_pb2.GetJobResultResponse(offset=offset, data=await f.read(CHUNK_BYTES))

    @handle_errors
    async def ListReceipts(self, request: coordinator_pb2.ListReceiptsRequest, context: Any) -> coordinator_pb2.ListReceiptsResponse:
        page, token = await self.core.list_receipts(
            self._client(context), job_id=request.job_id, page_size=request.page_size, page_token=request.page_token
        )
        return coordinator_pb2.ListReceiptsResponse(receipts=page, next_page_token=token)

    @handle_errors
    async def GetReceipt(self, request: coordinator_pb2.GetReceiptRequest, context: Any) -> coordinator_pb2.GetReceiptResponse:
        client = self._client(context)
        which = request.WhichOneof("key")
        if which is None:
            raise InvalidArgument("set receipt_hash or job_id")
        rec = await self.core.receipt(client, **{which: getattr(request, which)})
        telemetry.set_attributes(job_id=rec.body.job_id, receipt_hash=rec.receipt_hash)
        return coordinator_pb2.GetReceiptResponse(receipt=rec)

    @handle_errors
    async def ListModels(self, request: coordinator_pb2.ListModelsRequest, context: Any) -> coordinator_pb2.ListModelsResponse:
        self._client(context)
        return coordinator_pb2.ListModelsResponse(models=self.core.list_models())

    @handle_errors
    async def ListMiners(self, request: coordinator_pb2.ListMinersRequest, context: Any) -> coordinator_pb2.ListMinersResponse:
        self._client(context)
        return coordinator_pb2.ListMinersResponse(miners=self.core.list_miners())

    @handle_errors
    async def ReleaseMiner(self, request: coordinator_pb2.ReleaseMinerRequest, context: Any) -> coordinator_pb2.ReleaseMinerResponse:
        client = self.core.authenticate(_metadata(context, "x-api-key"))
        return coordinator_pb2.ReleaseMinerResponse(miner=self.core.release_miner(client, request.miner_id))

    @handle_errors
    async def GenerateImage(self, request: coordinator_pb2.GenerateImageRequest, context: Any) -> coordinator_pb2.GenerateImageResponse:
        client, held = self._stream(context)  # unary, but it waits on its job like a WatchJob does
        with held:
            return await self._generate_image(client, request)

    async def _generate_image(self, client: str, request: coordinator_pb2.GenerateImageRequest) -> coordinator_pb2.GenerateImageResponse:
        try:
            job = await self.core.submit(
                client, request.model, job_pb2.JobParams(image=request.params), request_id=request.request_id,
                max_price_per_unit=request.max_price_per_unit if request.HasField("max_price_per_unit") else None,
            )
        except InvalidArgument as exc:  # this request's params are the ImageParams themselves
            exc.field = exc.field.replace("params.image.", "params.", 1)
            raise
        telemetry.set_attributes(job_id=job.job_id, model=job.model, client_id=client)
        timeout = request.timeout_seconds or 300
        try:
            async with asyncio.timeout(timeout):
                async for event in self.core.watch(client, job.job_id):
                    if isinstance(event, job_pb2.Job):
                        job = event
        except TimeoutError:
            raise FailedPrecondition(
                f"job {job.job_id} did not finish within {timeout} s; it is still {jobs.state_name(job.state)}: "
                "use WatchJob/GetJob with this id"
            ) from None
        if job.state != S.JOB_STATE_COMPLETED:
            raise FailedPrecondition(f"job {job.job_id} ended {jobs.state_name(job.state)}: {job.error}")
        art, f = await self.core.artifact(client, job.job_id, 0)
        async with f:
            image = await f.read() if art.size <= INLINE_IMAGE_LIMIT else b""
        return coordinator_pb2.GenerateImageResponse(job=job, receipt=job.receipt, image=image)


MARKET_RATE_PER_S = 5.0  # GetMarket calls per second per calling host (public: no API key)
MARKET_BURST = 20
MARKET_HOSTS = 4096  # hosts remembered at once; full buckets are forgotten first


class MarketServicer(StoreErrors, coordinator_pb2_grpc.MarketServiceServicer):
    """The public market (no API key): bounded per calling host, like every public read."""

    def __init__(self, core: Coordinator) -> None:
        self.core = core
        self.buckets = KeyedBuckets(MARKET_RATE_PER_S, MARKET_BURST, core.clock, MARKET_HOSTS)

    @handle_errors
    async def GetMarket(self, request: coordinator_pb2.GetMarketRequest, context: Any) -> coordinator_pb2.GetMarketResponse:
        bucket = self.buckets.bucket(rpc.caller_host(context))
        wait = bucket.take()
        if wait:
            raise ResourceExhausted(f"GetMarket is limited to {MARKET_RATE_PER_S:g} calls/s per host (burst "
                                    f"{MARKET_BURST}): retry in {wait * 1000:.0f} ms", retry_after_s=wait)
        return self.core.market(request.miner_id)


class MinerGatewayServicer(StoreErrors, miner_pb2_grpc.MinerServiceServicer):
    def __init__(self, core: Coordinator) -> None:
        self.core = core

    @handle_errors
    async def GetChallenge(self, request: miner_pb2.GetChallengeRequest, context: Any) -> miner_pb2.GetChallengeResponse:
        challenge, ttl = self.core.challenge()
        return miner_pb2.GetChallengeResponse(
            challenge=challenge, expires_at_unix_ms=jobs.now_ms() + int(ttl * 1000), chain_id=self.core.config.chain_id
        )

    @handle_errors
    async def Register(self, request: miner_pb2.RegisterRequest, context: Any) -> miner_pb2.RegisterResponse:
        session = self.core.register(request.public_key, request.challenge, request.signature, request.info)
        telemetry.set_attributes(miner_id=session.miner_id)
        await self.core.check_stake(session.miner_id)  # after the signature: no ledger call for junk
        cfg = self.core.config
        return miner_pb2.RegisterResponse(
            miner_id=session.miner_id,
            session_token=session.token,
            heartbeat_interval_ms=int(cfg.heartbeat_interval_s * 1000),
            heartbeat_timeout_ms=int(cfg.heartbeat_timeout_s * 1000),
            chain_id=cfg.chain_id,
        )

    @handle_errors
    async def Work(self, request_iterator: AsyncIterator[miner_pb2.WorkRequest], context: Any) -> AsyncIterator[miner_pb2.WorkResponse]:
        conn = self.core.connect(_metadata(context, "x-miner-session") or "")
        telemetry.set_attributes(miner_id=conn.miner_id)
        ended = "stream closed by the miner"
        broken = False

        async def read() -> None:
            nonlocal ended, broken
            try:
                async for msg in request_iterator:
                    self.core.on_work(conn, msg)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # garbage bytes or a broken stream end this miner's session only
                ended, broken = f"unreadable WorkRequest ({exc.__class__.__name__})", True
            self.core.disconnect(conn, ended)

        reader = asyncio.create_task(read())
        try:
            while True:
                msg = await conn.outbox.get()
                if msg is None:
                    break
                yield msg
        finally:
            reader.cancel()
            self.core.disconnect(conn, ended)
        if conn.ended is not None:  # replaced by a newer stream of the same miner (ABORTED), here or elsewhere
            raise conn.ended
        if broken:
            raise InvalidArgument(f"Work stream closed: {ended}; reconnect and send WorkRequest messages")

    @handle_errors
    async def GetInfo(self, request: miner_pb2.GetInfoRequest, context: Any) -> miner_pb2.GetInfoResponse:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "GetInfo is served by each miner daemon on its ops port (default 127.0.0.1:18001), not by the coordinator",
        )
        raise AssertionError("unreachable")


@dataclass
class CoordinatorProcess:
    """A started coordinator: servers, core, and its background tasks."""

    running: RunningServer
    core: Coordinator
    tasks: list[asyncio.Task[None]]
    settlement: Settlement | None = None

    @property
    def port(self) -> int:
        return self.running.port

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.core.close()
        await self.running.stop(1.0)
        if self.settlement is not None:
            await self.settlement.close()
        self.core.store.close()


async def _return_freed_memory(interval_s: float = 2.0) -> None:
    """Give memory freed by the transport back to the OS. Each upload chunk passes through
    buffers of ~1 MiB allocated on gRPC's threads; glibc keeps what they free in per-thread arenas,
    so after a burst of uploads (64 streams at once: ~240 MiB at the peak) RSS stayed up to ~150
    MiB high although nothing was in use (bench/upload_memory.py). malloc_trim returns it."""
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return
    while True:
        await asyncio.sleep(interval_s)
        await asyncio.to_thread(trim, 0)  # it walks the heap: off the event loop


def open_store(config: CoordinatorConfig) -> JobStore:
    """LMDB under data_dir, or the PostgreSQL database `database_url` names (refused with a message
    naming the setting when it cannot be reached; the password is never shown)."""
    if not config.database_url:
        return LmdbJobStore(expand(config.data_dir) / "jobs")
    from aitbc.coordinator.pgstore import PostgresJobStore

    store = PostgresJobStore(config.database_url, read_pool=config.database_read_pool)
    log.info("coordinator store: PostgreSQL %s (schema version %d)", store.display_url, store.schema_version)
    return store


async def _check_ledger_chain(config: CoordinatorConfig) -> None:
    """A ledger that answers at start must serve this coordinator's chain_id (a typo in either
    setting would have every receipt refused); one that is down is checked by settlement when it
    is back, which holds the receipts meanwhile."""
    from aitbc.ledger.client import LedgerClient

    # one try, no retries: a ledger that is down must not slow the start (its port is refused at once)
    creds, options = rpc.channel_credentials(), [("grpc.enable_retries", 0)]
    ch = (grpc.aio.secure_channel(config.ledger, creds, options=options) if creds is not None
          else grpc.aio.insecure_channel(config.ledger, options=options))
    async with ch, LedgerClient(ch, timeout=5.0) as ledger:
        try:
            theirs = await ledger.chain_id()
        except Exception:  # down or not a ledger yet: settlement keeps trying
            return
    if theirs != config.chain_id:
        raise FailedPrecondition(chain_mismatch(config.ledger, theirs, config.chain_id))


async def start_coordinator(config: CoordinatorConfig, *, clock: Clock | None = None) -> CoordinatorProcess:
    """`clock`: the coordinator's time (tests drive a FakeClock); the system clock by default."""
    rpc.refuse_plaintext(config.listen)  # before anything is opened
    if config.ledger:
        await _check_ledger_chain(config)
    store = open_store(config)
    key = crypto.load_or_create_key(config.key_file)
    core = Coordinator(store, key, config, clock=clock)
    running = await start_server(config.listen, [
        Service(coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server, CoordinatorServicer(core),
                coordinator_pb2.DESCRIPTOR.services_by_name["CoordinatorService"].full_name),
        Service(miner_pb2_grpc.add_MinerServiceServicer_to_server, MinerGatewayServicer(core),
                miner_pb2.DESCRIPTOR.services_by_name["MinerService"].full_name),
        Service(coordinator_pb2_grpc.add_MarketServiceServicer_to_server, MarketServicer(core),
                coordinator_pb2.DESCRIPTOR.services_by_name["MarketService"].full_name),
    ], options=rpc.UPLOAD_SERVER_OPTIONS)
    if store.shared:  # an idle coordinator claims at once when another gives jobs back, streams the events
        # of jobs run elsewhere, drops the reputation records another coordinator changed, and ends the
        # streams of its miners that connected elsewhere
        store.listen(core.wake, core.heard_events, core.heard_reputation, core.heard_miners)  # type: ignore[attr-defined]
    proc = CoordinatorProcess(running, core, [asyncio.create_task(core.run_housekeeping()),
                                              asyncio.create_task(_return_freed_memory()),
                                              asyncio.create_task(core.webhooks.run())])
    if config.ledger:
        settlement = proc.settlement = Settlement(core.receipts, key, config.ledger, clock=core.time.monotonic,
                                                  chain_id=config.chain_id,
                                                  elect=store.settler if store.shared else None)  # type: ignore[attr-defined]
        core.receipt_listeners.append(settlement.notify)
        core.chain = fees.ChainLedger(settlement.ledger)  # paid jobs and stake checks: the same node
        proc.tasks.append(asyncio.create_task(core.watch_stakes()))
        running.names.append(SETTLEMENT_HEALTH)  # stop() reports it NOT_SERVING with the rest
        await running.set_serving(SETTLEMENT_HEALTH, False)  # until the first pass reaches the ledger
        settlement.readiness_listeners.append(
            lambda ok: proc.tasks.append(asyncio.create_task(running.set_serving(SETTLEMENT_HEALTH, ok))))
        proc.tasks.append(asyncio.create_task(settlement.run()))
    return proc


async def run_coordinator(config: CoordinatorConfig) -> None:
    """Serve until SIGINT/SIGTERM."""
    telemetry.setup("aitbc-coordinator")  # before the server starts: its interceptors are chosen then
    rpc.configure_tls(config.tls_cert_file, config.tls_key_file, config.tls_ca_file, allow_insecure=config.allow_insecure)
    proc = await start_coordinator(config)
    host = config.listen.rsplit(":", 1)[0]
    telemetry.announce(f"coordinator listening on {host}:{proc.port} (attester {proc.core.key.address}, chain {config.chain_id}, "
                       f"settlement {'to ledger ' + config.ledger if config.ledger else 'disabled'}"
                       + (f", id {proc.core.store.coordinator_id} on the shared database" if proc.core.shared else "")  # type: ignore[attr-defined]
                       + ")", logger="aitbc.coordinator")
    write_port_file(config.port_file, proc.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    telemetry.announce("coordinator stopping", logger="aitbc.coordinator")
    await proc.stop()
