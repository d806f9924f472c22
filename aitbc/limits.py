"""Token buckets, the one rate limit the services share (client calls at the coordinator, invalid
votes a caller sends a ledger node)."""

from __future__ import annotations

from collections.abc import Callable


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
