"""A typed Python SDK over the generated stubs (synchronous; for scripts, the CLI and apps)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from aitbc import jobs, rpc, telemetry
from aitbc.clients.retry import NO_RETRY, RetryPolicy
from aitbc.config import coordinator_addresses
from aitbc.errors import AitbcError, DataLoss, InvalidArgument
from aitbc.quotes import QuoteBody, SignedQuote
from aitbc.rpc import open_sync_channel
from aitbc.v1 import coordinator_pb2, coordinator_pb2_grpc, job_pb2, receipt_pb2
from aitbc.wire import receipt_from_proto


class ClientError(AitbcError):
    """A failed call: `code` is the gRPC status name, `message` what the server said.

    What the SDK raises is both a ClientError and the AitbcError subclass of its status
    (aitbc.rpc.error_from_rpc): `except ClientError` catches every failed call, `except NotFound`
    (or ResourceExhausted, with its retry_after_s) just that status."""

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


# the ClientError flavour of each status class: _CLIENT_ERRORS[NotFound] is a NotFound and a ClientError
_CLIENT_ERRORS: dict[type[AitbcError], type[ClientError]] = {
    cls: type(cls.__name__, (cls, ClientError), {"__module__": __name__, "__qualname__": cls.__name__})
    for cls in rpc.STATUS_ERRORS.values()
}



def signed_quote(response: coordinator_pb2.QuoteJobResponse) -> SignedQuote | None:
    """The signed quote in a QuoteJob answer (None when there is none: see no_quote_reason)."""
    if not response.quote:
        return None
    return SignedQuote(QuoteBody.from_canonical(response.quote), response.quote_signature)

def client_error(err: AitbcError) -> ClientError:
    """`err` (one of aitbc.rpc.STATUS_ERRORS' classes) as the ClientError of its status."""
    out = _CLIENT_ERRORS[type(err)](err.message)
    vars(out).update(vars(err))  # e.g. ResourceExhausted.retry_after_s
    return out


def aitbc_home() -> Path:
    return Path(os.environ.get("AITBC_HOME", "~/.aitbc")).expanduser()


def devnet_endpoints(data_dir: str | Path | None = None) -> dict[str, Any]:
    """The endpoints file a running devnet writes ({} when none is running)."""
    path = Path(data_dir).expanduser() if data_dir else aitbc_home() / "devnet"
    try:
        return json.loads((path / "endpoints.json").read_text())
    except (OSError, ValueError):
        return {}


def new_request_id() -> str:
    """A request id for a submission the caller gave none: its retries reuse it (aitbc.clients.retry)."""
    return "sdk-" + secrets.token_hex(16)


JOB_HOME = ("until coordinators share a database (docs/scaling.md), a job and its receipt live only on the "
            "coordinator that accepted the job: ask that one when it is back")


class CoordinatorClient:
    """`target`: one coordinator address, or several (a list, or a comma-separated string) to
    fail over between. Calls go to the current one; a call that is safe to send again (reads,
    WatchJob, SubmitJob with its request id) moves to the next when the current one is
    unavailable (UNAVAILABLE, or DEADLINE_EXCEEDED where the call is idempotent), at once within
    a round and after the policy's wait once every coordinator failed; a call that is not
    (CancelJob, ReleaseMiner, SubmitJob without a request id) is never sent to another, and its
    failure names them all. A job read that one coordinator answers NOT_FOUND asks the others:
    until they share a database a job lives on the coordinator that accepted it.

    `retry` says how transient failures (a coordinator restart, a dropped connection, a rate
    limit's RetryInfo) are retried: RetryPolicy() by default, aitbc.clients.retry.NO_RETRY for none.
    `timeout` bounds each attempt; the policy bounds the attempts (over all coordinators) and
    their total time."""

    def __init__(self, target: str | Sequence[str], api_key: str, *, timeout: float = 30.0,
                 retry: RetryPolicy | None = None, sleep: Callable[[float], None] = time.sleep,
                 on_retry: Callable[[ClientError, float], None] | None = None,
                 on_failover: Callable[[str, ClientError, str], None] | None = None) -> None:
        self.targets = coordinator_addresses("coordinator", target)
        self.timeout = timeout
        self.retry = retry if retry is not None else RetryPolicy()
        self.retries = 0  # calls made again after a transient failure, since this client was made
        self._sleep = sleep
        self._on_retry = on_retry  # told of each failure about to be retried, and the wait (the CLI says so)
        self._on_failover = on_failover  # told (from, failure, to) when a call moves to another coordinator
        self._rng = random.Random()
        self._current = 0  # the coordinator calls go to: the last one that answered
        # sends the trace context when tracing is on (telemetry.setup / configure before this)
        self._channels = [telemetry.intercept_channel(open_sync_channel(t)) for t in self.targets]
        self._stubs = [coordinator_pb2_grpc.CoordinatorServiceStub(ch) for ch in self._channels]
        self._md = (("x-api-key", api_key),)

    @property
    def target(self) -> str:
        """The coordinator the next call goes to."""
        return self.targets[self._current]

    def close(self) -> None:
        for ch in self._channels:
            ch.close()

    def __enter__(self) -> CoordinatorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _attempts(self, call: str, *, idempotent: bool, failover: bool = True, job_id: str = "",
                  unsafe: str = "", retry: RetryPolicy | None = None) -> Iterator[tuple[Any, Callable[[grpc.RpcError], None]]]:
        """Yields once per attempt the stub to call (the current coordinator's) and a function to
        call with the attempt's failure: it moves to the next coordinator (`failover`: the call is
        safe to send to another), waits before the next attempt, or raises the failure (as a
        ClientError) when it is not worth retrying or the policy's attempts or time are spent.
        `job_id`: a NOT_FOUND asks the other coordinators (nothing happened: safe for any call).
        `unsafe`: why the call is not sent to another coordinator, for its error."""
        policy = retry or self.retry
        started = time.monotonic()
        n = len(self.targets)
        said: dict[str, AitbcError] = {}  # each coordinator's last failure in this call
        in_round = waits = 0
        for attempt in range(policy.attempts):
            here = self._current
            failed: list[grpc.RpcError] = []
            yield self._stubs[here], failed.append
            if not failed:
                return
            err = rpc.error_from_rpc(failed[0])
            after = rpc.retry_delay_s(failed[0])
            said[self.targets[here]] = err
            transient = policy.retryable(err.code, idempotent=idempotent, retry_after_s=after)
            elsewhere = bool(job_id) and n > 1 and err.code == "NOT_FOUND"
            if elsewhere and len(said) == n and all(e.code == "NOT_FOUND" for e in said.values()):
                raise self._failure(call, err, said, unsafe) from None  # no coordinator knows the job
            if not (transient or elsewhere):
                raise client_error(err) from None  # an answer (INVALID_ARGUMENT, ...): the call's own
            in_round += 1
            moves = n > 1 and (elsewhere or failover)
            if moves:
                self._current = (here + 1) % n
            if attempt + 1 >= policy.attempts:
                break
            if moves and in_round < n:  # another coordinator of this round: at once
                if time.monotonic() - started > policy.total_s:
                    break
                self.retries += 1
                if self._on_failover is not None:
                    self._on_failover(self.targets[here], client_error(err), self.target)
                continue
            in_round = 0
            wait = policy.delay(waits, self._rng, retry_after_s=after)
            waits += 1
            if time.monotonic() - started + wait > policy.total_s:
                break
            self.retries += 1
            if self._on_retry is not None:
                self._on_retry(client_error(err), wait)
            self._sleep(wait)
        raise self._failure(call, err, said, unsafe) from None

    def _failure(self, call: str, err: AitbcError, said: dict[str, AitbcError], unsafe: str) -> ClientError:
        """The error of a call whose coordinators were all down, did not know its job, or were not
        asked: with one coordinator its own failure, else naming every coordinator listed and what
        each said (or why it was not asked). UNAVAILABLE while one could not answer (the job may
        live there: the call may succeed later), else NOT_FOUND."""
        if len(self.targets) == 1:
            return client_error(err)
        parts = [f"{t}: {e.code}: {e.message}" for t, e in said.items()]
        others = [t for t in self.targets if t not in said]
        if others:
            parts.append(f"not sent to {', '.join(others)}: it is not safe to send twice ({unsafe or call})")
        down = [e for e in said.values() if e.code != "NOT_FOUND"]
        worst = down[-1] if down else err
        message = f"{call} failed on {'the coordinator it went to' if others else 'every coordinator'}: " + "; ".join(parts)
        if any(e.code == "NOT_FOUND" for e in said.values()):
            message += f" ({JOB_HOME})"
        return client_error(rpc.error_from_code(worst.code, message, retry_after_s=getattr(worst, "retry_after_s", None)))

    def _unary(self, method: str, req: Any, *, idempotent: bool = True, failover: bool = True, job_id: str = "",
               unsafe: str = "", retry: RetryPolicy | None = None, timeout: float | None = None) -> Any:
        for stub, fail in self._attempts(method, idempotent=idempotent, failover=failover, job_id=job_id,
                                         unsafe=unsafe, retry=retry):
            try:
                return getattr(stub, method)(req, metadata=self._md, timeout=timeout or self.timeout)
            except grpc.RpcError as exc:
                fail(exc)
        raise AssertionError("unreachable: the last failed attempt raises")  # pragma: no cover

    def submit_image(self, prompt: str, *, model: str = "tiny-sd", request_id: str | None = "",
                     max_price_per_unit: int | None = None, webhook_url: str = "", **params: Any) -> job_pb2.Job:
        """Queue an image job; `params` are image_params()'s (steps, width, height, images, seed, ...)."""
        return self._submit(model, image_params(prompt, **params), request_id, max_price_per_unit, webhook_url)

    def submit_text(self, prompt: str, *, model: str, request_id: str | None = "", max_price_per_unit: int | None = None,
                    webhook_url: str = "", **params: Any) -> job_pb2.Job:
        """Queue a text job; `params` are text_params()'s (max_new_tokens, temperature, stop, ...)."""
        return self._submit(model, text_params(prompt, **params), request_id, max_price_per_unit, webhook_url)

    def submit(self, model: str, params: job_pb2.JobParams, *, request_id: str | None = "",
               max_price_per_unit: int | None = None, webhook_url: str = "", quote: SignedQuote | None = None,
               priority_fee: int | None = None) -> job_pb2.Job:
        """Queue a job from its parameters (image_params() or text_params()). Without a
        `request_id` ("") the SDK makes one, so that a retry after a lost answer returns the job
        already queued instead of queueing a second one, and the call may fail over to the next
        coordinator; `request_id=None` sends none: the call goes once, to one coordinator, and is
        never retried (its error names every coordinator). `webhook_url`: where the job's end is
        POSTed (docs/coordinator.md, "Webhooks"; the operator must allow it). A paid job
        (docs/economy.md): `quote` (from quote().signed) is charged exactly, or `priority_fee`
        makes the coordinator quote the job at submit; either is paid from the client's escrow."""
        return self._submit(model, params, request_id, max_price_per_unit, webhook_url, quote=quote,
                            priority_fee=priority_fee)

    def quote(self, model: str, params: job_pb2.JobParams, *, max_price_per_unit: int | None = None,
              priority_fee: int | None = None) -> coordinator_pb2.QuoteJobResponse:
        """What the job would cost (units, price, cost, qualifying miners), without queueing it; with
        a signed quote (`signed_quote(response)`) when this API key can pay from escrow."""
        req = coordinator_pb2.QuoteJobRequest(model=model, params=params)
        if max_price_per_unit is not None:
            req.max_price_per_unit = max_price_per_unit
        if priority_fee is not None:
            req.priority_fee = priority_fee
        return self._unary("QuoteJob", req)

    def _submit(self, model: str, params: job_pb2.JobParams, request_id: str | None, max_price_per_unit: int | None,
                webhook_url: str = "", *, quote: SignedQuote | None = None,
                priority_fee: int | None = None) -> job_pb2.Job:
        # one request id for every attempt: what makes a retried SubmitJob safe (aitbc.clients.retry);
        # None sends none, and then the call is sent once, to one coordinator, and never again
        rid = new_request_id() if request_id == "" else request_id or ""
        req = coordinator_pb2.SubmitJobRequest(model=model, params=params, request_id=rid, webhook_url=webhook_url)
        if max_price_per_unit is not None:
            req.max_price_per_unit = max_price_per_unit
        if quote is not None:
            req.quote, req.quote_signature = quote.body.canonical_bytes(), quote.signature
        if priority_fee is not None:
            req.priority_fee = priority_fee
        if not rid:
            return self._unary("SubmitJob", req, idempotent=False, failover=False, retry=NO_RETRY,
                               unsafe="a SubmitJob without a request_id queues a new job each time it is sent; "
                                      "give one to let the SDK retry it and fail over").job
        return self._unary("SubmitJob", req).job

    def list_models(self) -> list[Any]:
        return list(self._unary("ListModels", coordinator_pb2.ListModelsRequest()).models)

    def list_miners(self) -> list[Any]:
        return list(self._unary("ListMiners", coordinator_pb2.ListMinersRequest()).miners)

    def release_miner(self, miner_id: str) -> Any:
        req = coordinator_pb2.ReleaseMinerRequest(miner_id=miner_id)
        return self._unary("ReleaseMiner", req, idempotent=False, failover=False,
                           unsafe="it acts on the coordinator the miner is connected to").miner

    def get_job(self, job_id: str) -> job_pb2.Job:
        return self._unary("GetJob", coordinator_pb2.GetJobRequest(job_id=job_id), job_id=job_id).job

    def cancel(self, job_id: str, reason: str = "") -> job_pb2.Job:
        # a second CancelJob of a job the first one cancelled is refused: not retried on a timeout,
        # nor sent to another coordinator on a failure (a NOT_FOUND, where nothing happened, asks the others)
        return self._unary("CancelJob", coordinator_pb2.CancelJobRequest(job_id=job_id, reason=reason),
                           idempotent=False, failover=False, job_id=job_id,
                           unsafe="a repeated CancelJob is refused once the first one cancelled the job").job

    def watch(self, job_id: str, *, timeout: float | None = None) -> Iterator[job_pb2.Job | job_pb2.JobProgress | job_pb2.TextChunk]:
        """Yield Job snapshots, JobProgress and TextChunk events until the job finishes. A stream
        lost to a transient failure (a coordinator restart) is opened again under the retry
        policy, on the next coordinator when there are several; it starts again with a Job
        snapshot (and a text job's text from offset 0)."""
        # DEADLINE_EXCEEDED here is the caller's own `timeout` running out: not retried
        while True:
            got = False
            for stub, fail in self._attempts("WatchJob", idempotent=False, job_id=job_id):
                try:
                    for ev in stub.WatchJob(coordinator_pb2.WatchJobRequest(job_id=job_id), metadata=self._md,
                                            timeout=timeout):
                        got = True
                        yield getattr(ev, ev.WhichOneof("event"))
                    return
                except grpc.RpcError as exc:
                    err = rpc.error_from_rpc(exc)
                    if got and self.retry.retryable(err.code, idempotent=False, retry_after_s=rpc.retry_delay_s(exc)):
                        if len(self.targets) > 1:  # this coordinator went away: the next one first
                            self._current = (self._current + 1) % len(self.targets)
                        break  # it was back and streaming: a new outage gets the whole policy again
                    if got:
                        raise client_error(err) from None
                    fail(exc)
            else:  # pragma: no cover (the last failed attempt raises)
                return

    def result(self, job_id: str, index: int = 0) -> tuple[job_pb2.Artifact, bytes]:
        """Fetch one artifact (chunked) and check it against its sha256."""
        art = None
        parts: list[bytes] = []
        for stub, fail in self._attempts("GetJobResult", idempotent=True, job_id=job_id):
            art, parts = None, []
            try:
                for chunk in stub.GetJobResult(coordinator_pb2.GetJobResultRequest(job_id=job_id, index=index),
                                               metadata=self._md, timeout=max(self.timeout, 120)):
                    if chunk.HasField("artifact"):
                        art = chunk.artifact
                    parts.append(chunk.data)
                break
            except grpc.RpcError as exc:
                fail(exc)
        data = b"".join(parts)
        if art is None or hashlib.sha256(data).hexdigest() != art.sha256:
            raise client_error(DataLoss(f"artifact {index} of job {job_id} does not match its sha256"))
        return art, data

    def receipt(self, *, job_id: str = "", receipt_hash: str = "") -> receipt_pb2.Receipt:
        req = (coordinator_pb2.GetReceiptRequest(job_id=job_id) if job_id
               else coordinator_pb2.GetReceiptRequest(receipt_hash=receipt_hash))
        return self._unary("GetReceipt", req, job_id=job_id or receipt_hash).receipt

    def receipts(self, *, job_id: str = "", page_size: int = 20, page_token: str = "") -> tuple[list[receipt_pb2.Receipt], str]:
        resp = self._unary("ListReceipts", coordinator_pb2.ListReceiptsRequest(
            job_id=job_id, page_size=page_size, page_token=page_token))
        return list(resp.receipts), resp.next_page_token


def image_params(prompt: str, *, negative_prompt: str = "", steps: int = 0, guidance_scale: float | None = None,
                 width: int = 0, height: int = 0, images: int = 1, seed: int | None = None) -> job_pb2.JobParams:
    """An image job's parameters; 0 / None leave a default to the coordinator (README "Job limits")."""
    for name, value in (("steps", steps), ("width", width), ("height", height), ("images", images)):
        if not 0 <= value < 1 << 32:
            raise InvalidArgument(f"{name} must be a non-negative integer (got {value})")
    p = job_pb2.ImageParams(prompt=prompt, negative_prompt=negative_prompt, steps=steps, width=width, height=height,
                            images=images)
    if guidance_scale is not None:
        p.guidance_scale = guidance_scale
    if seed is not None:
        p.seed = _seed(seed)
    return job_pb2.JobParams(image=p)


def _seed(seed: int) -> int:
    if not 0 <= seed <= jobs.MAX_SEED:
        raise InvalidArgument(f"seed must be between 0 and {jobs.MAX_SEED} (got {seed})")
    return seed


def text_params(prompt: str, *, max_new_tokens: int = 0, temperature: float | None = None, top_p: float | None = None,
                top_k: int = 0, seed: int | None = None, stop: list[str] | None = None) -> job_pb2.JobParams:
    """A text job's parameters; 0 / None leave a default to the coordinator (README "Job limits")."""
    for name, value in (("max_new_tokens", max_new_tokens), ("top_k", top_k)):
        if not 0 <= value < 1 << 32:
            raise InvalidArgument(f"{name} must be a non-negative integer (got {value})")
    p = job_pb2.TextParams(prompt=prompt, max_new_tokens=max_new_tokens, top_k=top_k, stop=stop or [])
    if temperature is not None:
        p.temperature = temperature
    if top_p is not None:
        p.top_p = top_p
    if seed is not None:
        p.seed = _seed(seed)
    return job_pb2.JobParams(text=p)


def receipt_json(rec: receipt_pb2.Receipt) -> dict[str, Any]:
    """The receipt file format (docs/receipts.md) plus its settlement status, if any."""
    out = receipt_from_proto(rec).to_json_dict()
    if rec.HasField("settlement"):
        s = rec.settlement
        out["settlement"] = {
            "state": receipt_pb2.SettlementState.Name(s.state).removeprefix("SETTLEMENT_STATE_"),
            "tx_hash": s.tx_hash, "block_height": s.block_height, "amount": s.amount, "error": s.error,
        }
    return out
