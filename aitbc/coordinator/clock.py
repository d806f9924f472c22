"""The coordinator's one clock: monotonic seconds for timeouts, wall milliseconds for records.

Every unit takes the clock it is given, so a test drives time by hand (FakeClock) and nothing in
the core reads time.time() or time.monotonic() by itself.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (timeouts, rate limits)."""
        ...

    def now_ms(self) -> int:
        """Unix milliseconds (what records show a person)."""
        ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def now_ms(self) -> int:
        return int(time.time() * 1000)


class FakeClock:
    """Time that moves only when told to: `advance(seconds)`. Wall time moves with it."""

    def __init__(self, start_ms: int = 1_700_000_000_000) -> None:
        self.t = 0.0
        self.start_ms = start_ms

    def monotonic(self) -> float:
        return self.t

    def now_ms(self) -> int:
        return self.start_ms + int(self.t * 1000)

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self.t += seconds
