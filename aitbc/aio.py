"""asyncio helpers the services share.

Wait with a timeout through these, never `asyncio.wait_for`: on Python 3.11, when the awaited
event fires in the same loop iteration as the waiting task is cancelled, `wait_for` returns the
result and drops the cancellation (CPython gh-86296, fixed in 3.12). A loop such as "wait for a
change or 0.5 s, repeat" then never stops, and whatever waits for it (node.stop(), asyncio.run's
final cancel) hangs for good. `asyncio.timeout` keeps the cancellation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait until `event` is set or `timeout` seconds pass (None: no limit); True when it is set."""
    if event.is_set():
        return True
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return event.is_set()
    return True


async def within(aw: Awaitable[T], timeout: float | None) -> T:
    """Await `aw`, raising TimeoutError after `timeout` seconds (None: no limit)."""
    async with asyncio.timeout(timeout):
        return await aw
