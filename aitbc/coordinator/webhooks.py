"""Webhooks (docs/coordinator.md, "Webhooks"): a signed POST to the client when one of its jobs ends.

A durable outbox: the event is written to the store (meta `webhook:<event id>`) when the job ends
and deleted once a POST got a 2xx answer, so a coordinator restart loses none; failures are tried
again with jittered exponential backoff, up to `webhook_attempts` POSTs and `webhook_max_age_s`.
Delivery is at least once: the event id (`<job id>.<state>`, one per job end) lets the receiver
drop repeats. Each POST carries `X-AITBC-Event-Id` and `X-AITBC-Signature: t=<unix ms>,v1=<hex
HMAC-SHA256(webhook_secret, "<t>." || body)>`.

Several coordinators on one database (docs/scaling.md): the outbox is the shared meta table, and
only the coordinator holding the settler lock (`elect`, PostgresJobStore.settler) delivers, so each
event is POSTed by one process; when it dies the next holder delivers what is left (an event whose
POST was in flight may be POSTed again: still at least once).

Which URLs: the client's `webhook_url` (operator config), or a job's own `webhook_url` only when it
starts with one of the client's `webhook_url_prefixes` and goes to that prefix's scheme, host and
port (no user info): a client can never make the coordinator
call an address the operator did not allow (no SSRF into the operator's network), and redirects
are not followed.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import random
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

from aitbc import aio, jobs, metrics
from aitbc.config import ClientKey, url_origin
from aitbc.coordinator.store import JobStore
from aitbc.errors import InvalidArgument, PermissionDenied
from aitbc.limits import jittered_wait
from aitbc.v1 import job_pb2

log = logging.getLogger("aitbc.coordinator.webhooks")

PREFIX = "webhook:"
EVENT_HEADER = "X-AITBC-Event-Id"
SIGNATURE_HEADER = "X-AITBC-Signature"
MAX_URL = 2048
FIRST_RETRY_S = 1.0  # ceiling of the first retry's wait; doubling, at most RETRY_CAP_S
RETRY_CAP_S = 600.0
PARALLEL = 8  # POSTs in flight at once


def sign(secret: str, timestamp_ms: int, body: bytes) -> str:
    """The X-AITBC-Signature value of a POST."""
    mac = hmac.new(secret.encode(), str(timestamp_ms).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp_ms},v1={mac}"


def verify(secret: str, header: str, body: bytes, *, now_ms: int, tolerance_ms: int = 300_000) -> bool:
    """What a receiver checks: the HMAC over the exact body, and a timestamp within tolerance_ms
    (a captured POST cannot be replayed later)."""
    try:
        fields = dict(part.split("=", 1) for part in header.split(","))
        t = int(fields["t"])
    except (ValueError, KeyError):
        return False
    return abs(now_ms - t) <= tolerance_ms and hmac.compare_digest(sign(secret, t, body), header)


@dataclass
class Event:
    event_id: str
    client_id: str
    url: str
    body: str  # the JSON sent, exactly
    ended_ms: int  # when the job ended
    attempts: int = 0
    next_ms: int = 0  # not before this


def event_body(job: job_pb2.Job, event_id: str) -> str:
    return json.dumps({
        "event_id": event_id, "type": "job.ended", "job_id": job.job_id, "client_id": job.client_id,
        "state": jobs.state_name(job.state), "model": job.model, "created_at_unix_ms": job.created_at_unix_ms,
        "finished_at_unix_ms": job.finished_at_unix_ms, "error": job.error, "receipt_hash": job.receipt_hash,
    }, sort_keys=True, separators=(",", ":"))


def _no_redirects() -> urllib.request.OpenerDirector:
    class Refuse(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:  # a 3xx is a failed delivery
            return None

    return urllib.request.build_opener(Refuse)


def http_post(url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> int:
    """POST and return the status (0 when nothing answered). Runs in a worker thread."""
    req = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with _no_redirects().open(req, timeout=timeout_s) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError, ValueError):
        return 0


class Webhooks:
    def __init__(self, store: JobStore, clients: Iterable[ClientKey], *, attempts: int, max_age_s: float,
                 timeout_s: float, now_ms: Callable[[], int],
                 post: Callable[[str, bytes, dict[str, str], float], int] = http_post,
                 rng: random.Random | None = None, elect: Callable[[], bool] | None = None) -> None:
        self.store = store
        self.elect = elect  # a shared store: is this coordinator the one that delivers? (None: always)
        self.clients = {c.id: c for c in clients}
        self.attempts, self.max_age_ms, self.timeout_s = attempts, int(max_age_s * 1000), timeout_s
        self.now_ms = now_ms
        self.post = post
        self.rng = rng or random.Random()
        self._wake = asyncio.Event()

    # ---- at submit and at a job's end (the core, on the event loop) ----------------------------

    def job_url(self, client_id: str, url: str) -> str:
        """A job's own webhook_url as SubmitJob gives it: allowed, or a clear refusal."""
        if not url:
            return ""
        if len(url) > MAX_URL or not (url.startswith("https://") or url.startswith("http://")):
            raise InvalidArgument(f"webhook_url must be an http:// or https:// URL of {MAX_URL} characters at most")
        client = self.clients.get(client_id)
        allowed = client.webhook_url_prefixes if client else []
        origin = url_origin(url)  # a prefix is text: "https://a.example" also starts "https://a.example.evil.net/"
        if origin is None or not any(url.startswith(p) and url_origin(p) == origin for p in allowed):
            raise PermissionDenied(
                f"webhook_url {url[:80]!r} is not allowed for client {client_id!r}: the operator allows "
                + (", ".join(repr(p) for p in allowed) if allowed else "no per-job webhook URLs for it")
                + " (coordinator.toml [[clients]] webhook_url_prefixes)")
        return url  # a client with prefixes has a webhook_secret (ClientKey refuses one without)

    def job_ended(self, job: job_pb2.Job) -> None:
        """Queue the POST for a client's job that ended (not a shard or a verification re-run:
        the client submitted neither)."""
        if job.parent_job_id or job.verify_of:
            return
        client = self.clients.get(job.client_id)
        url = job.webhook_url or (client.webhook_url if client else "")
        if not url or client is None:
            return
        event_id = f"{job.job_id}.{jobs.state_name(job.state)}"
        now = self.now_ms()
        ev = Event(event_id, job.client_id, url, event_body(job, event_id), job.finished_at_unix_ms or now)
        self.store.put_meta(PREFIX + event_id, json.dumps(asdict(ev)).encode())
        self._wake.set()

    def pending(self) -> list[Event]:
        return [Event(**json.loads(v)) for _, v in self.store.meta_items(PREFIX)]

    # ---- delivery (a task of the coordinator process) ------------------------------------------

    async def run(self, poll_s: float = 1.0) -> None:
        while True:
            self._wake.clear()
            await self.deliver_due()
            await aio.wait_event(self._wake, poll_s)

    async def deliver_due(self) -> int:
        """POST every event that is due (at most PARALLEL at once); returns how many were delivered.
        On a shared store only the elected coordinator delivers (the others' events too)."""
        if self.elect is not None and not self.elect():
            return 0
        now = self.now_ms()
        due = [ev for ev in self.pending() if ev.next_ms <= now]
        delivered = 0
        for start in range(0, len(due), PARALLEL):
            results = await asyncio.gather(*(self._deliver(ev) for ev in due[start:start + PARALLEL]))
            delivered += sum(results)
        return delivered

    async def _deliver(self, ev: Event) -> bool:
        client = self.clients.get(ev.client_id)
        if client is None or not client.webhook_secret:  # the operator removed it: nobody to sign for
            self._drop(ev, "its client has no webhook_secret any more")
            return False
        body = ev.body.encode()
        t = self.now_ms()
        headers = {"Content-Type": "application/json", "User-Agent": "aitbc-coordinator",
                   EVENT_HEADER: ev.event_id, SIGNATURE_HEADER: sign(client.webhook_secret, t, body)}
        status = await asyncio.to_thread(self.post, ev.url, body, headers, self.timeout_s)
        ev.attempts += 1
        if 200 <= status < 300:
            self.store.delete_meta(PREFIX + ev.event_id)
            metrics.WEBHOOK_DELIVERIES.labels(outcome="delivered").inc()
            metrics.WEBHOOK_DELAY.observe(max(0, self.now_ms() - ev.ended_ms) / 1000)
            return True
        now = self.now_ms()
        why = f"HTTP {status}" if status else "no answer"
        if ev.attempts >= self.attempts or now - ev.ended_ms >= self.max_age_ms:
            self._drop(ev, f"{why} after {ev.attempts} attempt(s)")
            return False
        ev.next_ms = now + int(1000 * jittered_wait(ev.attempts - 1, FIRST_RETRY_S, RETRY_CAP_S, self.rng))
        self.store.put_meta(PREFIX + ev.event_id, json.dumps(asdict(ev)).encode())
        metrics.WEBHOOK_DELIVERIES.labels(outcome="retry").inc()
        log.info("webhook %s to %s: %s; trying again in %.1f s", ev.event_id, ev.url, why, (ev.next_ms - now) / 1000)
        return False

    def _drop(self, ev: Event, why: str) -> None:
        self.store.delete_meta(PREFIX + ev.event_id)
        metrics.WEBHOOK_DELIVERIES.labels(outcome="dropped").inc()
        log.warning("webhook %s to %s dropped: %s", ev.event_id, ev.url, why)
