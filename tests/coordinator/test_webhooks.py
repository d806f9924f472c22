"""Webhooks (docs/coordinator.md, "Webhooks"): a signed POST to a real HTTP server in the test when
a client's job ends, retried until delivered, kept across a restart, only to URLs the operator
allowed; a receiver's check of the signature, with a vector."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest

from aitbc.config import ClientKey
from aitbc.coordinator.store import LmdbJobStore
from aitbc.coordinator.webhooks import EVENT_HEADER, PREFIX, SIGNATURE_HEADER, Webhooks, sign, verify
from aitbc.v1 import coordinator_pb2_grpc, job_pb2
from tests.conftest import API_KEY, OTHER_KEY
from tests.coordinator.test_jobs_api import MD, image_job, wait_done

SECRET = "whsec-test-0123456789"
EVENT, SIGNATURE = EVENT_HEADER.lower(), SIGNATURE_HEADER.lower()


class Receiver:
    """A real HTTP server on loopback: records every POST, answers with the next status given."""

    def __init__(self, statuses: list[int] | None = None, delay_s: float = 0.0) -> None:
        self.posts: list[tuple[str, dict[str, str], bytes]] = []
        self.statuses = list(statuses or [])
        self.delay_s = delay_s  # a slow receiver: each answer waits this long
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                outer.posts.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))  # names: any case
                code = outer.statuses.pop(0) if outer.statuses else 200
                time.sleep(outer.delay_s)
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self) -> None:  # noqa: N802 - a followed redirect would arrive as one
                outer.gets.append(self.path)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.gets: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def clients(url: str = "", prefixes: list[str] | None = None) -> list[ClientKey]:
    return [ClientKey("alice", hashlib.sha256(API_KEY.encode()).hexdigest(), webhook_url=url,
                      webhook_url_prefixes=prefixes or [], webhook_secret=SECRET),
            ClientKey("bob", hashlib.sha256(OTHER_KEY.encode()).hexdigest())]


def test_signature_vector_and_what_a_receiver_checks():
    body = b'{"event_id":"x"}'
    header = sign(SECRET, 1_700_000_000_000, body)
    # HMAC-SHA256(key, "<t>." || body), hex; checked with `openssl dgst -sha256 -hmac` (docs)
    assert header == "t=1700000000000,v1=963c3073114fe41999cc23f894154f07db1865c8051a1bcb27878452b7e56594"
    assert verify(SECRET, header, body, now_ms=1_700_000_060_000)
    assert not verify(SECRET, header, body + b" ", now_ms=1_700_000_060_000)  # another body
    assert not verify("another-secret-123456", header, body, now_ms=1_700_000_060_000)
    assert not verify(SECRET, header, body, now_ms=1_700_000_000_000 + 301_000)  # replayed 5 min later
    assert not verify(SECRET, "v1=abc", body, now_ms=0) and not verify(SECRET, "junk", body, now_ms=0)


async def test_a_jobs_end_is_posted_signed_and_retried_until_delivered(network_factory, null_backend, receiver):
    receiver.statuses = [500]  # the receiver fails once
    net = await network_factory(clients=clients(receiver.url + "/hook"))
    await net.add_miner({"tiny-sd": null_backend})
    s = coordinator_pb2_grpc.CoordinatorServiceStub(net.channel())
    job = (await s.SubmitJob(image_job(steps=2), metadata=MD)).job
    done = await wait_done(s, job.job_id)
    assert done.state == job_pb2.JOB_STATE_COMPLETED
    await net.until(lambda: len(receiver.posts) >= 2, timeout=20)
    (p1, h1, b1), (p2, h2, b2) = receiver.posts[:2]
    assert p1 == p2 == "/hook" and b1 == b2 and h1[EVENT] == h2[EVENT] == f"{job.job_id}.COMPLETED"
    event = json.loads(b2)
    assert (event["job_id"], event["state"], event["client_id"], event["type"]) == (
        job.job_id, "COMPLETED", "alice", "job.ended")
    assert event["receipt_hash"] == done.receipt_hash and event["event_id"] == h2[EVENT]
    assert verify(SECRET, h2[SIGNATURE], b2, now_ms=int(time.time() * 1000))
    await net.until(lambda: not net.core.webhooks.pending())  # delivered: the outbox is empty
    await asyncio.sleep(1.5)
    assert len(receiver.posts) == 2  # and nothing more is sent


async def test_a_jobs_own_url_only_where_the_operator_allows(network_factory, null_backend, receiver):
    net = await network_factory(clients=clients(prefixes=[receiver.url + "/jobs/"]))
    await net.add_miner({"tiny-sd": null_backend})
    s = coordinator_pb2_grpc.CoordinatorServiceStub(net.channel())
    for url, who, md, want in [
        ("http://169.254.169.254/latest/meta-data", "alice", MD, "is not allowed for client 'alice': the operator allows"),
        (receiver.url + "/elsewhere", "alice", MD, "is not allowed for client 'alice'"),
        (receiver.url + "/jobs/1", "bob", (("x-api-key", OTHER_KEY),), "no per-job webhook URLs for it"),
    ]:
        req = image_job(steps=2)
        req.webhook_url = url
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.SubmitJob(req, metadata=md)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and want in err.value.details(), who
    bad = image_job(steps=2)
    bad.webhook_url = "file:///etc/passwd"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.SubmitJob(bad, metadata=MD)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    ok = image_job(steps=2)
    ok.webhook_url = receiver.url + "/jobs/42"
    job = (await s.SubmitJob(ok, metadata=MD)).job
    assert job.webhook_url == ok.webhook_url
    await wait_done(s, job.job_id)
    await net.until(lambda: len(receiver.posts) >= 1, timeout=20)
    assert receiver.posts[0][0] == "/jobs/42"


async def test_the_outbox_survives_a_restart_and_a_dead_receiver_is_given_up_on(tmp_path: Path, receiver):
    now = [1_000_000]
    store = LmdbJobStore(tmp_path / "db")
    job = job_pb2.Job(job_id="a" * 28, client_id="alice", state=job_pb2.JOB_STATE_FAILED, model="tiny-sd",
                      finished_at_unix_ms=now[0], error="no miner")
    hooks = Webhooks(store, clients(receiver.url + "/dead-then-alive"), attempts=3, max_age_s=3600, timeout_s=2,
                     now_ms=lambda: now[0])
    receiver.statuses = [503]
    hooks.job_ended(job)
    hooks.job_ended(job_pb2.Job(job_id="b" * 28, client_id="alice", state=job_pb2.JOB_STATE_COMPLETED,
                                parent_job_id="a" * 28))  # a shard: the client did not submit it
    assert await hooks.deliver_due() == 0 and len(receiver.posts) == 1
    store.close()
    store = LmdbJobStore(tmp_path / "db")  # the coordinator restarts: the event is still owed
    hooks = Webhooks(store, clients(receiver.url + "/dead-then-alive"), attempts=3, max_age_s=3600, timeout_s=2,
                     now_ms=lambda: now[0])
    [ev] = hooks.pending()
    assert ev.event_id == "a" * 28 + ".FAILED" and ev.attempts == 1
    now[0] += 10 * 60_000  # past its retry time
    assert await hooks.deliver_due() == 1 and hooks.pending() == []
    assert json.loads(receiver.posts[1][2])["error"] == "no miner"
    # a receiver that never answers well: dropped after `attempts`, not retried for ever
    receiver.statuses = [500] * 10
    hooks.job_ended(job_pb2.Job(job_id="c" * 28, client_id="alice", state=job_pb2.JOB_STATE_CANCELLED))
    for _ in range(3):
        now[0] += 10 * 60_000
        await hooks.deliver_due()
    assert hooks.pending() == [] and len(receiver.posts) == 5
    assert store.meta_items(PREFIX) == []
    store.close()


def test_a_redirect_is_not_followed():
    """A receiver (or whoever took its address) answering 302 to an internal address gets a failed
    delivery, never a request to where it points (urllib alone would follow it as a GET)."""
    from aitbc.coordinator.webhooks import http_post

    target = Receiver()
    try:
        import http.server

        class H(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                self.send_response(302)  # urllib's default would follow it, as a GET
                self.send_header("Location", target.url + "/internal")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        try:
            status = http_post(f"http://127.0.0.1:{srv.server_address[1]}/hook", b"{}", {}, 2.0)
        finally:
            srv.shutdown()
            srv.server_close()
        assert status == 302 and target.posts == [] and target.gets == []
    finally:
        target.close()


def test_config_refuses_webhooks_that_could_not_be_signed_or_are_not_http():
    from aitbc.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="webhooks need a webhook_secret of 16 characters"):
        ClientKey("a", "0" * 64, webhook_url="https://x.example/h", webhook_secret="short")
    with pytest.raises(InvalidArgument, match="must be http:// or https://"):
        ClientKey("a", "0" * 64, webhook_url_prefixes=["ftp://x"], webhook_secret=SECRET)
