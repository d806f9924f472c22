"""Passphrase guessing, throttled per wallet (docs/wallet.md, "Unlock throttle").

After `free_attempts` wrong passphrases in a row a wallet refuses unlocks for a backoff that doubles
with each further wrong one, from `base_s` up to `max_s`, never more: a guesser gets about one try
per `max_s` and the owner waits at most `max_s` for the next try. An attempt during the backoff is
refused before the passphrase is even tried (and does not lengthen it); one attempt per wallet runs
at a time (so parallel calls cannot each get a guess in); a right passphrase clears the count, and
so does `forget_after_s` without a wrong one. State exists only for wallets that got a wrong
passphrase, so it is bounded by the keystore's size.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from aitbc.errors import InvalidArgument, ResourceExhausted, Unauthenticated

IN_FLIGHT_RETRY_S = 1.0


@dataclass(frozen=True)
class Backoff:
    free_attempts: int = 3
    base_s: float = 1.0
    max_s: float = 60.0
    forget_after_s: float = 900.0

    def __post_init__(self) -> None:
        if not (isinstance(self.free_attempts, int) and self.free_attempts >= 1):
            raise InvalidArgument(f"unlock free_attempts must be an integer >= 1, got {self.free_attempts!r}")
        if not 0 < self.base_s <= self.max_s:
            raise InvalidArgument(
                f"unlock backoff must have 0 < base ({self.base_s!r} s) <= max ({self.max_s!r} s)")
        if not self.forget_after_s >= self.max_s:
            raise InvalidArgument(f"unlock forget_after_s must be at least the max backoff ({self.max_s!r} s)")

    def delay(self, failures: int) -> float:
        """Seconds a wallet refuses unlocks after `failures` wrong passphrases in a row."""
        if failures < self.free_attempts:
            return 0.0
        exponent = failures - self.free_attempts
        if exponent >= math.log2(self.max_s / self.base_s) + 1:
            return self.max_s
        return min(self.max_s, self.base_s * 2**exponent)


@dataclass
class _State:
    failures: int = 0
    last_failure: float = 0.0
    until: float = 0.0  # refuses unlocks before this clock reading
    in_flight: bool = False


class UnlockThrottle:
    """Per-wallet guessing limit; `clock` is monotonic seconds (injectable for tests)."""

    def __init__(self, policy: Backoff | None = None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy or Backoff()
        self._clock = clock
        self._states: dict[str, _State] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def attempt(self, name: str) -> Iterator[None]:
        """Wrap one passphrase check of wallet `name`: raises ResourceExhausted (with the wait in
        `retry_after_s` and the message) instead of entering when the wallet is in its backoff or
        another attempt on it is running; counts an Unauthenticated (wrong passphrase) raised
        inside, and clears the count when the block ends without one."""
        key = name.lower()
        with self._lock:
            now = self._clock()
            st = self._states.get(key)
            if st is not None and not st.in_flight and now - st.last_failure >= self.policy.forget_after_s:
                del self._states[key]
                st = None
            if st is not None:
                if st.in_flight:
                    raise ResourceExhausted(
                        f"another unlock of wallet '{name}' is being checked: retry in {IN_FLIGHT_RETRY_S:g} s",
                        retry_after_s=IN_FLIGHT_RETRY_S)
                if now < st.until:
                    wait = st.until - now
                    raise ResourceExhausted(
                        f"wallet '{name}' refuses unlocks after {st.failures} wrong passphrases in a row "
                        f"(this one was not tried): retry in {_seconds(wait)}",
                        retry_after_s=wait)
            else:
                st = self._states[key] = _State()
            st.in_flight = True
        succeeded = False
        try:
            yield
            succeeded = True
        except Unauthenticated as exc:
            count, wait = self._failed(key)
            if wait:
                exc.message += f"; {count} wrong in a row: unlocks of '{name}' are refused for {_seconds(wait)}"
                exc.args = (exc.message,)
            raise
        finally:
            with self._lock:
                st = self._states[key]
                st.in_flight = False
                if succeeded or st.failures == 0:
                    del self._states[key]  # a right passphrase clears the count

    def _failed(self, key: str) -> tuple[int, float]:
        with self._lock:
            st = self._states[key]
            now = self._clock()
            st.failures += 1
            st.last_failure = now
            wait = self.policy.delay(st.failures)
            st.until = now + wait
            return st.failures, wait

    def failures(self, name: str) -> int:
        with self._lock:
            st = self._states.get(name.lower())
            return st.failures if st is not None else 0

    def tracked(self) -> int:
        """How many wallets have throttle state (bounded by the keystore's size)."""
        with self._lock:
            return len(self._states)


def _seconds(value: float) -> str:
    return f"{math.ceil(value * 10) / 10:g} s"
