"""The SDK's retry policy (aitbc.clients.retry) as a pure function, and google.rpc.RetryInfo from a
real coordinator's rate limit, honoured by the SDK."""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from typing import Any

import pytest

from aitbc.clients.retry import NO_RETRY, RetryPolicy
from aitbc.config import ClientKey
from tests.conftest import API_KEY


def test_waits_are_full_jitter_under_a_doubling_ceiling_capped() -> None:
    policy = RetryPolicy(attempts=20, total_s=1e9, base_s=0.1, cap_s=2.0)
    rng = random.Random(7)
    for retry in range(12):
        ceiling = min(2.0, 0.1 * 2 ** retry)
        waits = [policy.delay(retry, rng) for _ in range(300)]
        assert all(0 <= w <= ceiling for w in waits)
        assert max(waits) > 0.8 * ceiling and min(waits) < 0.2 * ceiling  # spread over the whole range


def test_what_is_retried() -> None:
    p = RetryPolicy()
    assert p.retryable("UNAVAILABLE", idempotent=False)  # nothing reached the server, or it is safe anyway
    assert p.retryable("DEADLINE_EXCEEDED", idempotent=True)
    assert not p.retryable("DEADLINE_EXCEEDED", idempotent=False)  # CancelJob: it may have run
    for final in ("INVALID_ARGUMENT", "FAILED_PRECONDITION", "NOT_FOUND", "PERMISSION_DENIED", "UNAUTHENTICATED",
                  "RESOURCE_EXHAUSTED", "ALREADY_EXISTS", "INTERNAL"):
        assert not p.retryable(final, idempotent=True)
    assert p.retryable("RESOURCE_EXHAUSTED", idempotent=True, retry_after_s=0.3)  # the server said when


def test_attempts_and_total_time_bound_the_retries() -> None:
    p = RetryPolicy(attempts=4, total_s=10.0, base_s=1.0, cap_s=1.0)
    rng = random.Random(1)
    assert [p.next_wait(n, 0.0, "UNAVAILABLE", idempotent=True, rng=rng) is not None for n in range(5)] == \
        [True, True, True, False, False]  # 4 calls in all
    assert p.next_wait(0, 9.5, "UNAVAILABLE", idempotent=True, retry_after_s=0.6) is None  # past total_s
    assert p.next_wait(0, 9.0, "UNAVAILABLE", idempotent=True, retry_after_s=0.6) is not None
    assert p.next_wait(0, 0.0, "INVALID_ARGUMENT", idempotent=True) is None
    assert NO_RETRY.next_wait(0, 0.0, "UNAVAILABLE", idempotent=True) is None
    assert p.delay(0, rng, retry_after_s=3.0) == 3.0  # RetryInfo is a floor, above the cap too
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)


async def test_a_rate_limited_client_waits_as_retryinfo_says_and_gets_through(network_factory: Any) -> None:
    from aitbc.clients.sdk import CoordinatorClient

    slow = ClientKey("alice", hashlib.sha256(API_KEY.encode()).hexdigest(), rate_per_s=1.0, burst=1)
    net = await network_factory(clients=[slow])
    waits: list[float] = []

    def calls() -> int:
        def sleep(s: float) -> None:
            waits.append(s)
            time.sleep(s)

        with CoordinatorClient(net.address, API_KEY, timeout=5, sleep=sleep) as client:
            for _ in range(2):  # a burst of 1 at 1/s: the 2nd call is refused first, with RetryInfo ~1 s
                client.list_models()
            return client.retries

    retries = await asyncio.get_running_loop().run_in_executor(None, calls)
    assert retries >= 1 and len(waits) == retries
    # what the server asked (most of a second), not a first retry's jitter draw (at most base_s, 0.2 s)
    assert waits[0] > RetryPolicy().base_s


async def test_the_server_sends_retryinfo_and_the_client_reads_it(network_factory: Any) -> None:
    import grpc

    from aitbc import rpc
    from aitbc.v1 import coordinator_pb2, coordinator_pb2_grpc

    slow = ClientKey("alice", hashlib.sha256(API_KEY.encode()).hexdigest(), rate_per_s=1.0, burst=1)
    net = await network_factory(clients=[slow])
    s = coordinator_pb2_grpc.CoordinatorServiceStub(net.channel())
    md = (("x-api-key", API_KEY),)
    await s.ListModels(coordinator_pb2.ListModelsRequest(), metadata=md)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await s.ListModels(coordinator_pb2.ListModelsRequest(), metadata=md)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailers = dict(info.value.trailing_metadata())
    assert rpc.STATUS_DETAILS in trailers
    delay = rpc.retry_delay_s(info.value)
    assert delay is not None and 0.5 < delay <= 1.0
    assert delay == pytest.approx(int(trailers[rpc.RETRY_AFTER_MS]) / 1000)


def test_the_cli_reads_its_retry_bounds_from_the_environment() -> None:
    from aitbc.errors import InvalidArgument

    assert RetryPolicy.from_env({}) == RetryPolicy()
    assert RetryPolicy.from_env({"AITBC_RETRY_ATTEMPTS": "3", "AITBC_RETRY_TOTAL_S": "7.5"}) == \
        RetryPolicy(attempts=3, total_s=7.5)
    for env in ({"AITBC_RETRY_ATTEMPTS": "0"}, {"AITBC_RETRY_ATTEMPTS": "many"}, {"AITBC_RETRY_TOTAL_S": "-1"},
                {"AITBC_RETRY_TOTAL_S": "nan"}):
        with pytest.raises(InvalidArgument, match="AITBC_RETRY_"):
            RetryPolicy.from_env(env)
