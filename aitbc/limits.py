"""Token buckets, the one rate limit the services share (client calls at the coordinator, invalid
votes a caller sends a ledger node), and Backoff, the one way a service waits before trying again."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any


class TokenBucket:
    """`rate` tokens per second up to `burst`. take(n) spends n tokens when at least one is there
    (the balance may go negative: a big spend is paid back before the next one)."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float]) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens = float(burst)
        self.at = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now

    def wait_s(self) -> float:
        """0 when a token is there now, else seconds until one is."""
        self._refill()
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.rate

    def take(self, n: int = 1) -> float:
        """0 when allowed (n tokens spent), else seconds until a token is available (nothing spent)."""
        wait = self.wait_s()
        if wait == 0.0:
            self.tokens -= n
        return wait

    @property
    def full(self) -> bool:
        self._refill()
        return self.tokens >= self.burst


class KeyedBuckets:
    """A token bucket per key (a calling host, ...), at most `max_keys` at once: when a new key
    comes and the map is full, the keys whose bucket has refilled are forgotten (they owe
    nothing), else the oldest one, so what the map holds is bounded whatever the callers do."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float], max_keys: int) -> None:
        self.rate, self.burst, self.clock, self.max_keys = rate, burst, clock, max_keys
        self._buckets: dict[str, TokenBucket] = {}

    def get(self, key: str) -> TokenBucket | None:
        return self._buckets.get(key)

    def bucket(self, key: str) -> TokenBucket:
        """The key's bucket, made (full) when it has none."""
        b = self._buckets.get(key)
        if b is None:
            if len(self._buckets) >= self.max_keys:
                for k in [k for k, old in self._buckets.items() if old.full] or list(self._buckets)[:1]:
                    del self._buckets[k]
            b = self._buckets[key] = TokenBucket(self.rate, self.burst, self.clock)
        return b

    def __len__(self) -> int:
        return len(self._buckets)


def jittered_wait(failures: int, base_s: float, cap_s: float, rng: random.Random | Any = random) -> float:
    """Full jitter: the wait after `failures` failures in a row (0: the first) is drawn uniformly
    from [0, min(cap_s, base_s * 2^failures)]. The one formula every retry loop uses."""
    return rng.uniform(0, min(cap_s, base_s * 2 ** min(failures, 62)))


class Backoff:
    """Exponential backoff with full jitter: the n-th wait in a row (n from 0) is drawn uniformly
    from [0, min(cap_s, base_s * 2^n)], so many processes that lost the same server (every miner of
    a restarted coordinator, every settlement loop of a restarted ledger) do not all come back at
    the same instant. reset() after a success."""

    def __init__(self, base_s: float, cap_s: float, rng: random.Random | None = None) -> None:
        if not 0 < base_s <= cap_s:
            raise ValueError(f"backoff needs 0 < base ({base_s}) <= cap ({cap_s})")
        self.base_s, self.cap_s = base_s, cap_s
        self.rng = rng or random.Random()
        self.failures = 0

    def ceiling(self) -> float:
        return min(self.cap_s, self.base_s * 2 ** min(self.failures, 62))

    def next(self) -> float:
        """The wait before the next attempt; each call counts one more failure in a row."""
        wait = jittered_wait(self.failures, self.base_s, self.cap_s, self.rng)
        self.failures += 1
        return wait

    def reset(self) -> None:
        self.failures = 0
