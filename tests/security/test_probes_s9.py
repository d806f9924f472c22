"""Attack probes written from THREAT-MODEL.md (round 9), against real servers on loopback: each plays
one actor and tries what its "must not" column forbids, where round 8 (test_probes_s8.py) and the
other security tests did not look. Each marked (hole) succeeded before the fix its test names:

- client (hole): GenerateImage waits on its job like a WatchJob but held none of max_streams:
  resubmitting one request id held any number of calls; it holds one now;
- client (hole): a job's webhook_url was matched against webhook_url_prefixes as text, so
  "https://alice.example" allowed "https://alice.example.evil.net/" and "http://10.0.0.5:80" port
  8080; the URL must go to the prefix's scheme, host and port, and a prefix must name a host;
- operator mistake (hole): a price ceiling without an upper bound overflowed QuoteJob's max_cost
  (UNKNOWN "Value out of range"); ceilings are at most MAX_PRICE_PER_UNIT;
- anyone (hole): explorer heights and account cursors that str.isdigit()/int() took but the field or
  the index key could not hold were a 500; a 404 page, or the newest page;
- client: a forged ListReceipts page token lists no other client's receipts (held; the store's
  prefix check had no test);
- malicious coordinator (holes): the miner daemon queued any number of assignments beyond
  max_concurrency, signed receipts at whatever price and chain the assignment named, and ran
  images beyond MAX_PIXELS and prompts beyond the prompt limits; it refuses each before running.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from typing import Any

import grpc
import pytest

from aitbc.config import ClientKey
from aitbc.miner.backend import NullImageBackend
from aitbc.v1 import coordinator_pb2, coordinator_pb2_grpc, job_pb2, miner_pb2, miner_pb2_grpc
from tests.conftest import API_KEY, OTHER_KEY
from tests.explorer import test_explorer_pages as pages
from tests.explorer.test_explorer_pages import Site
from tests.security.test_security import RawMiner, image_job

pytestmark = pytest.mark.timeout(120)
chain = pages.chain  # the explorer tests' fixture: a ledger node with a few blocks and receipts

S = job_pb2.JobState
MD = (("x-api-key", API_KEY),)
BOB_MD = (("x-api-key", OTHER_KEY),)


def limited(**kw: Any) -> list[ClientKey]:
    return [ClientKey("alice", hashlib.sha256(API_KEY.encode()).hexdigest(), **kw),
            ClientKey("bob", hashlib.sha256(OTHER_KEY.encode()).hexdigest(), **kw)]


# ---- client: streams that do not look like streams --------------------------------------------------


async def test_generate_image_holds_one_of_the_clients_max_streams_while_it_waits(network_factory: Any) -> None:
    """GenerateImage is unary but waits for its job like a WatchJob (up to timeout_seconds, which the
    client picks): resubmitting one request id, a client held any number of them on one job a miner
    never finishes, past max_streams, without a new unfinished job (max_active_jobs). Each waiting
    call now holds one of the client's streams; the next is RESOURCE_EXHAUSTED naming the setting,
    and a call that ends frees its place."""
    net = await network_factory(clients=limited(max_streams=2))
    m = RawMiner(net)
    await m.connect()
    s = coordinator_pb2_grpc.CoordinatorServiceStub(net.channel())
    req = coordinator_pb2.GenerateImageRequest(model="null", request_id="held-1", timeout_seconds=3600,
                                               params=job_pb2.ImageParams(prompt="a red bicycle", seed=1, width=64,
                                                                          height=64))
    calls = [s.GenerateImage(req, metadata=MD, timeout=60) for _ in range(2)]
    await net.until(lambda: net.core.auth.streams("alice") == 2)
    assert (await m.read()).WhichOneof("msg") == "assignment"  # one job for both: the request id is the same
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.GenerateImage(req, metadata=MD, timeout=60)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "already has 2 streams open" in err.value.details() and "max_streams 2" in err.value.details()
    calls[0].cancel()
    await net.until(lambda: net.core.auth.streams("alice") == 1)
    calls[1].cancel()
    await net.until(lambda: net.core.auth.streams("alice") == 0)
    await asyncio.gather(*(asyncio.sleep(0) for _ in calls))


# ---- client: the coordinator calling addresses the operator did not allow ---------------------------


@pytest.mark.parametrize(("prefix", "url"), [
    ("https://alice.example", "https://alice.example.evil.net/hook"),  # another host that starts the same
    ("https://alice.example", "https://alice.example@10.0.0.1/hook"),  # user info: the host is 10.0.0.1
    ("http://10.0.0.5:80", "http://10.0.0.5:8080/admin"),  # another port that starts the same
])
async def test_a_jobs_webhook_url_must_be_on_the_host_and_port_the_operator_allowed(
        network_factory: Any, prefix: str, url: str) -> None:
    """A job's own webhook_url was allowed when it started with one of the client's
    webhook_url_prefixes, as text: an operator who wrote a prefix without a path (or with a port)
    let a client make the coordinator POST to any host whose name starts the same, or to any port
    whose number does, inside the operator's network (docs/coordinator.md: "no requests into the
    operator's own network"). The URL's scheme, host and port must be the prefix's now; a URL on
    the allowed host and port is still accepted."""
    net = await network_factory(clients=limited(webhook_url_prefixes=[prefix], webhook_secret="s" * 16))
    await RawMiner(net).connect()  # serves the model: the URL is all a submission could be refused for
    s = coordinator_pb2_grpc.CoordinatorServiceStub(net.channel())
    bad = image_job(seed=1, width=64, height=64)
    bad.webhook_url = url
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.SubmitJob(bad, metadata=MD)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, err.value.details()
    assert f"webhook_url {url[:80]!r} is not allowed for client 'alice'" in err.value.details()
    ok = image_job(seed=2, width=64, height=64)
    ok.webhook_url = prefix + ("" if prefix.endswith("/") else "/") + "job-2"
    assert (await s.SubmitJob(ok, metadata=MD)).job.webhook_url == ok.webhook_url


@pytest.mark.parametrize("prefix", ["https://", "https://ops@alice.example/", "http://alice.example:http/"])
def test_a_webhook_prefix_that_names_no_host_is_refused_naming_it(prefix: str) -> None:
    """Operator mistake: a prefix a job's URL could not be matched against by host and port (none, a
    user name before it, a port that is not a number) would refuse every job's URL, or, read as text,
    allow every host; the coordinator does not start, and says which prefix."""
    from aitbc.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="webhook URL prefix .* must name a host"):
        ClientKey("alice", "0" * 64, webhook_url_prefixes=[prefix], webhook_secret="s" * 16)


# ---- operator mistake: a price ceiling no job's cost fits under ------------------------------------------


@pytest.mark.parametrize("ceiling", ["default", "model"])
async def test_a_price_ceiling_whose_largest_job_overflows_is_refused_and_the_highest_allowed_quotes(
        network_factory: Any, tmp_path: Any, ceiling: str) -> None:
    """default_max_price_per_unit (or a model's max_price_per_unit) had no upper bound: at 2^64-1 the
    largest job's max_cost (units x the cap) overflowed its uint64 field and QuoteJob answered
    UNKNOWN "Value out of range"; above 2^53-1 / units, quotes and receipts cannot carry the cost. A
    ceiling above MAX_PRICE_PER_UNIT is refused naming the key; at that ceiling, the largest image
    job (and the largest text job's units) is quoted and its cost fits, and the job queues."""
    from aitbc import quotes, receipts
    from aitbc.config import MAX_PRICE_PER_UNIT, CoordinatorConfig, ModelConfig
    from aitbc.coordinator.checks import token_bounds
    from aitbc.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="default_max_price_per_unit' must be between 0 and"):
        CoordinatorConfig(data_dir=str(tmp_path), default_max_price_per_unit=2**64 - 1)
    with pytest.raises(InvalidArgument, match="models.m: max_price_per_unit must be an integer between 0 and"):
        ModelConfig("m", max_price_per_unit=MAX_PRICE_PER_UNIT + 1)
    # every job a client may submit costs at most MAX_UINT at that price (the shapes with most tiles)
    shapes = [(2048, 2048, 2), (1448, 1448, 4), (1024, 1024, 8), (2048, 1024, 4), (72, 2048, 8)]
    assert all(receipts.tile_steps(w, h, 150, n) * MAX_PRICE_PER_UNIT <= quotes.MAX_UINT for w, h, n in shapes)
    longest = job_pb2.TextParams(prompt="\U0001f600" * 32_000, max_new_tokens=4096)
    assert (token_bounds(longest, "")[0] + 4096) * MAX_PRICE_PER_UNIT <= quotes.MAX_UINT
    if ceiling == "default":
        net = await network_factory(default_max_price_per_unit=MAX_PRICE_PER_UNIT)
    else:
        net = await network_factory(models=[ModelConfig("null", max_price_per_unit=MAX_PRICE_PER_UNIT)])
    await RawMiner(net).connect()
    s = coordinator_pb2_grpc.CoordinatorServiceStub(net.channel())
    params = job_pb2.JobParams(image=job_pb2.ImageParams(prompt="a kite", steps=150, width=1448, height=1448, images=4))
    q = await s.QuoteJob(coordinator_pb2.QuoteJobRequest(model="null", params=params, max_price_per_unit=2**64 - 1),
                         metadata=MD)
    assert q.max_price_per_unit == MAX_PRICE_PER_UNIT and q.max_cost == q.units * MAX_PRICE_PER_UNIT <= quotes.MAX_UINT
    job = (await s.SubmitJob(coordinator_pb2.SubmitJobRequest(model="null", params=params, max_price_per_unit=2**64 - 1),
                             metadata=MD)).job
    assert job.state in (S.JOB_STATE_QUEUED, S.JOB_STATE_ASSIGNED) and job.max_price_per_unit == MAX_PRICE_PER_UNIT


# ---- anyone: the explorer's public pages --------------------------------------------------------------


@pytest.mark.parametrize("path", ["/block/\u00b2", "/block/99999999999999999999999", "/search?q=\u00b2",
                                  "/search?q=" + "9" * 5000, "/block/\u0663"])
async def test_a_height_that_is_no_number_the_ledger_takes_is_a_not_found_page(chain: dict[str, Any],
                                                                                tmp_path: Any, path: str) -> None:
    """Anyone on the web: a "height" str.isdigit() accepts but int() or the uint64 field does not
    (a superscript two, more digits than a uint64 holds, 5,000 digits) made the public page a 500
    with a stack trace in the log. It is a 404 page that says what was wrong; a real height works."""
    site = Site(chain["ledger"], tmp_path / "index")
    await site.start()
    try:
        page = await site.get(path, status=404)
        assert "Not found" in page and "block height" in page or "nothing on this chain matches" in page, page[-400:]
        assert "Block 1" in await site.get("/block/1")
    finally:
        await site.stop()


@pytest.mark.parametrize("before", ["1.70000", "-1.0", "99999999999999999999999.0", "1.-1", "\u00b2.0"])
async def test_an_account_pages_cursor_out_of_range_shows_the_newest_page(chain: dict[str, Any], tmp_path: Any,
                                                                          before: str) -> None:
    """The account page's `before=<height>.<index>` cursor was parsed with int() and packed into the
    index's 8- and 2-byte keys: a negative or too large part raised struct.error, a 500 for anyone.
    A cursor that names no place in the index is ignored, as a malformed one already was: the page
    shows the newest history."""
    from tests.ledger.helpers import PROVIDER

    site = Site(chain["ledger"], tmp_path / "index")
    await site.start()
    try:
        head = (await chain["client"].get_head()).height
        await pages.until(lambda: site.explorer.index.tip >= head)
        newest = await site.get(f"/account/{PROVIDER.address}")
        assert "/tx/" in newest  # it has history: the cursor is what is probed
        assert await site.get(f"/account/{PROVIDER.address}?before={before}") == newest
    finally:
        await site.stop()


# ---- client: another client's receipts through paging ---------------------------------------------------


@pytest.mark.parametrize("token", ["ab" * 600, "00", "ff" * 40])
async def test_a_forged_page_token_lists_no_other_clients_receipts_and_a_bad_one_is_invalid_argument(
        net: Any, null_backend: Any, token: str) -> None:
    """The page token is the store key to continue before, as hex: a client can send any bytes. Keys
    below its own (another client's range), above every key, and longer than LMDB keys may be:
    each answers only this client's receipts (here none: bob's are bob's), or INVALID_ARGUMENT."""
    await net.add_miner({"null": null_backend})
    s = coordinator_pb2_grpc.CoordinatorServiceStub(net.channel())
    job = (await s.SubmitJob(image_job(seed=5, width=64, height=64), metadata=BOB_MD)).job
    async for _ in s.WatchJob(coordinator_pb2.WatchJobRequest(job_id=job.job_id), metadata=BOB_MD, timeout=60):
        pass
    assert len((await s.ListReceipts(coordinator_pb2.ListReceiptsRequest(), metadata=BOB_MD)).receipts) == 1
    try:
        page = await s.ListReceipts(coordinator_pb2.ListReceiptsRequest(page_token=token), metadata=MD)
    except grpc.aio.AioRpcError as err:
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
        assert "page_token" in err.details()
    else:
        assert list(page.receipts) == [] and page.next_page_token == ""


# ---- a malicious coordinator: the miner daemon as the victim ------------------------------------------


class Blocking(NullImageBackend):
    """The null backend, held until `release` is set: jobs that stay running."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def generate(self, req: Any, on_step: Any, cancel: threading.Event) -> Any:
        self.release.wait(30)
        return super().generate(req, on_step, cancel)


class FloodingCoordinator(miner_pb2_grpc.MinerServiceServicer):
    """A coordinator that registers anyone and then sends `n` assignments at once (at `price`, for
    `chain`)."""

    def __init__(self, n: int, *, price: int = 0, chain: str = "aitbc-devnet", model: str = "null",
                 image: job_pb2.ImageParams | None = None, text: job_pb2.TextParams | None = None) -> None:
        self.n, self.price, self.chain, self.model = n, price, chain, model
        image = image or job_pb2.ImageParams(prompt="p" * 2000, steps=1, width=64, height=64, images=1)
        self.params = job_pb2.JobParams(text=text) if text is not None else job_pb2.JobParams(image=image)
        self.heard: asyncio.Queue[miner_pb2.WorkRequest] = asyncio.Queue()

    async def GetChallenge(self, request: Any, context: Any) -> miner_pb2.GetChallengeResponse:
        return miner_pb2.GetChallengeResponse(challenge=b"c" * 32, chain_id="aitbc-devnet")

    async def Register(self, request: Any, context: Any) -> miner_pb2.RegisterResponse:
        return miner_pb2.RegisterResponse(miner_id="x", session_token="t", heartbeat_interval_ms=60_000,
                                          chain_id="aitbc-devnet")

    async def Work(self, request_iterator: Any, context: Any) -> Any:
        async def listen() -> None:
            async for msg in request_iterator:
                self.heard.put_nowait(msg)

        reading = asyncio.create_task(listen())
        for i in range(self.n):
            params = job_pb2.JobParams()
            params.CopyFrom(self.params)
            getattr(params, params.WhichOneof("kind")).seed = i
            task = miner_pb2.Task(job_id=f"{i:028x}", model=self.model, client_id="alice", price_per_unit=self.price,
                                  params=params)
            yield miner_pb2.WorkResponse(assignment=miner_pb2.Assignment(task=task, hub_id="h", chain_id=self.chain))
        await reading


async def test_a_coordinator_cannot_queue_more_jobs_on_a_miner_than_its_max_concurrency() -> None:
    """A malicious (or broken) coordinator sending assignments without end: each became a task and a
    RunningJob waiting for a slot, held in memory for as long as the coordinator liked
    (200 with 2 kB prompts here; nothing bounded it). The miner runs max_concurrency at once and answers
    each job beyond that JobFailed (not permanent, so an honest coordinator gives it to another
    miner), naming the setting."""
    from aitbc import crypto
    from aitbc.config import MinerConfig
    from aitbc.miner.daemon import MinerDaemon

    fake = FloodingCoordinator(200)
    server = grpc.aio.server()
    miner_pb2_grpc.add_MinerServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    backend = Blocking()
    daemon = MinerDaemon(MinerConfig(coordinator=f"127.0.0.1:{port}", models=["null"], max_concurrency=2),
                         crypto.PrivateKey.generate(), {"null": backend})
    run = asyncio.create_task(daemon.run())
    try:
        failed: list[miner_pb2.JobFailed] = []
        async with asyncio.timeout(60):
            while len(failed) < 198:
                msg = await fake.heard.get()
                if msg.WhichOneof("msg") == "failed":
                    failed.append(msg.failed)
        assert len(daemon.running) == 2  # the two it runs; nothing waits behind them
        assert all(not f.permanent and "max_concurrency 2" in f.reason for f in failed), failed[0]
        assert {f.job_id for f in failed} == {f"{i:028x}" for i in range(2, 200)}
    finally:
        backend.release.set()
        daemon.stop()
        await asyncio.wait_for(run, 30)
        await server.stop(0)


async def first_word(fake: FloodingCoordinator, backends: dict[str, Any] | None = None,
                     **config: Any) -> tuple[miner_pb2.WorkRequest, Any]:
    """Serve `fake` to a miner daemon (`backends`, else the null image backend; `config`) until the
    miner's first message about a job; returns it and the daemon (stopped)."""
    from aitbc import crypto
    from aitbc.config import MinerConfig
    from aitbc.miner.daemon import MinerDaemon

    server = grpc.aio.server()
    miner_pb2_grpc.add_MinerServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    if backends is None:
        backends = {"null": Blocking()}
        backends["null"].release.set()
    daemon = MinerDaemon(MinerConfig(coordinator=f"127.0.0.1:{port}", models=list(backends), **config),
                         crypto.PrivateKey.generate(), backends)
    run = asyncio.create_task(daemon.run())
    try:
        async with asyncio.timeout(60):
            while (msg := await fake.heard.get()).WhichOneof("msg") == "heartbeat":
                pass
        return msg, daemon
    finally:
        daemon.stop()
        await asyncio.wait_for(run, 30)
        await server.stop(0)


async def test_a_miner_runs_no_image_job_beyond_the_pixel_limit_a_coordinator_applies() -> None:
    """jobs.MAX_PIXELS (width x height x images) bounded what a client may submit, but the miner's
    own check took any side up to 2,048 and up to 8 images: a coordinator could have it render 8
    images of 2048x2048, four times what any job may be (memory, device time). The miner refuses
    it before it runs, permanently (no miner would run it), naming the limit; the largest job a
    client may submit still runs."""
    too_big = job_pb2.ImageParams(prompt="a kite", steps=1, width=2048, height=2048, images=8)
    msg, _ = await first_word(FloodingCoordinator(1, image=too_big))
    assert msg.WhichOneof("msg") == "failed" and msg.failed.permanent, msg
    assert "width x height x images is 33554432 pixels; the limit is 8388608" in msg.failed.reason
    largest = job_pb2.ImageParams(prompt="a kite", steps=1, width=2048, height=2048, images=2)
    msg, daemon = await first_word(FloodingCoordinator(1, image=largest))
    assert msg.WhichOneof("msg") != "failed", msg  # (its first word: accepted, progress, a chunk or the result)


@pytest.mark.parametrize("kind", ["image", "negative", "text"])
async def test_a_miner_runs_no_prompt_longer_than_a_client_may_submit(null_text: Any, kind: str) -> None:
    """The miner's checks "take exactly what the coordinator can send" but for the prompt: a
    coordinator could hand it megabytes of prompt to tokenize (and, for text, to find too long for
    the context only after that). A prompt over jobs.MAX_PROMPT_CHARS (image, and its negative
    prompt) or MAX_TEXT_PROMPT_CHARS (text) is refused permanently before it runs, naming the limit."""
    from aitbc import jobs

    if kind == "text":
        fake = FloodingCoordinator(1, model="null-text", text=job_pb2.TextParams(
            prompt="w" * (jobs.MAX_TEXT_PROMPT_CHARS + 1), max_new_tokens=4))
        msg, _ = await first_word(fake, {"null-text": null_text})
        needle = f"prompt is {jobs.MAX_TEXT_PROMPT_CHARS + 1} characters; the limit is {jobs.MAX_TEXT_PROMPT_CHARS}"
    else:
        long = "w" * (jobs.MAX_PROMPT_CHARS + 1)
        image = job_pb2.ImageParams(prompt="a kite" if kind == "negative" else long, steps=1, width=64, height=64,
                                    images=1, negative_prompt=long if kind == "negative" else "")
        msg, _ = await first_word(FloodingCoordinator(1, image=image))
        needle = f"is {jobs.MAX_PROMPT_CHARS + 1} characters; the limit is {jobs.MAX_PROMPT_CHARS}"
    assert msg.WhichOneof("msg") == "failed" and msg.failed.permanent, msg
    assert needle in msg.failed.reason, msg.failed.reason


@pytest.mark.parametrize(("price", "chain_id", "needle"), [
    (3, "aitbc-devnet", "price 3 per unit, below this miner's price_per_unit 10"),
    (10, "other-chain", "for chain 'other-chain', but this miner registered on chain 'aitbc-devnet'"),
])
async def test_a_miner_signs_no_receipt_below_its_price_or_for_another_chain(price: int, chain_id: str,
                                                                              needle: str) -> None:
    """The receipt's price and chain came from the assignment alone: a coordinator (or a hub in
    front of it) that handed a miner advertising 10 per unit a job at 3, or one for another chain
    than the one it registered on, got the work done and a provider signature on that receipt. The
    miner runs neither: it answers JobFailed (not permanent: an honest coordinator that had a stale
    price gives the job to another miner) saying why, and signs nothing."""
    msg, daemon = await first_word(FloodingCoordinator(1, price=price, chain=chain_id), price_per_unit=10)
    assert msg.WhichOneof("msg") == "failed", msg  # no result, no receipt
    assert msg.failed.job_id == f"{0:028x}" and not msg.failed.permanent and needle in msg.failed.reason, msg
    assert daemon.completed == 0 and not daemon.running
