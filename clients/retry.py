"""When the SDK calls again after a failure, and how long it waits: a pure policy, no I/O.

A transient failure is one the same call can succeed after: UNAVAILABLE (the coordinator is
restarting, or the connection dropped), DEADLINE_EXCEEDED on a call that is safe to repeat, and any
status that carries a google.rpc.RetryInfo detail (the server says when to come back: a rate limit).
Each wait is drawn with full jitter, uniform(0, min(cap_s, base_s * 2**n)), so clients that lost
the same coordinator do not all come back at the same instant; a RetryInfo delay is a floor. The
calls are bounded twice: `attempts` calls in all (the first included) and no new attempt once
`total_s` has passed since the first. README.md, "Retries", gives the defaults; the CLI reads
AITBC_RETRY_ATTEMPTS and AITBC_RETRY_TOTAL_S.

A retried SubmitJob always carries the request id of its first attempt (the SDK makes one when the
caller gave none): the coordinator answers a repeated request id with the job it already queued, so
a retry after a lost answer never queues, or bills, a second job.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from dataclasses import dataclass

from aitbc.errors import InvalidArgument
from aitbc.limits import jittered_wait

TRANSIENT = frozenset({"UNAVAILABLE"})  # retried whatever the call: nothing happened, or it is safe to ask again
TRANSIENT_IF_IDEMPOTENT = frozenset({"DEADLINE_EXCEEDED"})  # the call may have run: only calls safe to repeat


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = 10  # calls in all, the first included; 1 turns retries off
    total_s: float = 60.0  # no new attempt starts this long after the first
    base_s: float = 0.2  # the first retry waits up to this; each next one up to twice as long
    cap_s: float = 5.0  # no single wait is longer (a RetryInfo delay may be)

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1 (got {self.attempts})")
        if self.total_s < 0 or self.base_s < 0 or self.cap_s < 0:
            raise ValueError("total_s, base_s and cap_s must not be negative")

    def retryable(self, code: str, *, idempotent: bool, retry_after_s: float | None = None) -> bool:
        """Is a call that failed with status `code` worth making again?"""
        return code in TRANSIENT or (idempotent and code in TRANSIENT_IF_IDEMPOTENT) or retry_after_s is not None

    def delay(self, retry: int, rng: random.Random | None = None, *, retry_after_s: float | None = None) -> float:
        """The wait before retry number `retry` (0 for the first retry)."""
        wait = jittered_wait(retry, self.base_s, self.cap_s, rng or random)
        return max(wait, retry_after_s) if retry_after_s is not None else wait

    def next_wait(self, retry: int, elapsed_s: float, code: str, *, idempotent: bool,
                  retry_after_s: float | None = None, rng: random.Random | None = None) -> float | None:
        """How long to wait before calling again after the `retry`-th failure in a row (0: the
        first), `elapsed_s` after the first attempt; None: give up and raise the failure."""
        if retry + 1 >= self.attempts or not self.retryable(code, idempotent=idempotent, retry_after_s=retry_after_s):
            return None
        wait = self.delay(retry, rng, retry_after_s=retry_after_s)
        if elapsed_s + wait > self.total_s:
            return None
        return wait


    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RetryPolicy:
        """The defaults, changed by AITBC_RETRY_ATTEMPTS (1: no retries) and AITBC_RETRY_TOTAL_S."""
        env = os.environ if environ is None else environ
        values: dict[str, float | int] = {}
        for var, name, kind, least, say in (
                ("AITBC_RETRY_ATTEMPTS", "attempts", int, 1, "an integer of at least 1 (1: no retries)"),
                ("AITBC_RETRY_TOTAL_S", "total_s", float, 0, "a number of seconds, 0 or more")):
            raw = env.get(var, "").strip()
            if not raw:
                continue
            try:
                value = kind(raw)
            except ValueError:
                value = None
            if value is None or not value >= least:  # (not >=: NaN too)
                raise InvalidArgument(f"{var} must be {say} (got {raw!r})")
            values[name] = value
        return cls(**values)  # type: ignore[arg-type]


NO_RETRY = RetryPolicy(attempts=1)
