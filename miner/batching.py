"""Image batching in the miner daemon: jobs that arrive together and share a `batch_key` run in one
pipeline call (docs/operations.md, "Image batching").

Runs on the daemon's event loop; the pipeline call itself runs in a worker thread. A batch opens
when a job finds no open batch for its key, collects jobs for `wait_s` (or until it holds
`max_images` images), then starts; jobs that come later open the next batch, which may run at
the same time as the first (each job still holds one of the daemon's max_concurrency slots, so
no more jobs run at once than without batching). Import-light: no torch here.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aitbc import telemetry
from aitbc.miner.backend import BatchItem, ImageOutput, ImageRequest, batch_key


@dataclass
class _Batch:
    items: list[BatchItem] = field(default_factory=list)
    futures: list[asyncio.Future[ImageOutput]] = field(default_factory=list)
    images: int = 0
    started: bool = False


class ImageBatcher:
    """Groups one backend's image jobs into `generate_batch` calls of at most `max_images` images."""

    def __init__(
        self, backend: Any, max_images: int, wait_s: float,
        in_thread: Callable[..., Awaitable[Any]] = telemetry.run_in_thread,
    ) -> None:
        if max_images < 1:
            raise ValueError("max_images must be at least 1")
        self.backend = backend
        self.max_images = max_images
        self.wait_s = max(0.0, wait_s)
        self._in_thread = in_thread  # runs the pipeline call on a worker thread (the daemon's pool)
        self._open: dict[tuple[Any, ...], _Batch] = {}
        self.calls = 0  # pipeline calls made (tests, benchmarks)

    async def generate(
        self, req: ImageRequest, on_step: Callable[[int, int], None], cancel: threading.Event
    ) -> ImageOutput:
        key = batch_key(req, self.backend.native_size)  # an invalid request fails here, alone
        loop = asyncio.get_running_loop()
        batch = self._open.get(key)
        if batch is not None and batch.images + req.images > self.max_images:
            self._start(key, batch)  # full: it goes now, this job opens the next one
            batch = None
        if batch is None:
            batch = self._open[key] = _Batch()
            loop.call_later(self.wait_s, self._start, key, batch)
        future: asyncio.Future[ImageOutput] = loop.create_future()
        batch.items.append(BatchItem(req, on_step, cancel))
        batch.futures.append(future)
        batch.images += req.images
        if batch.images >= self.max_images:
            self._start(key, batch)
        return await future

    def _start(self, key: tuple[Any, ...], batch: _Batch) -> None:
        if batch.started:
            return
        batch.started = True
        if self._open.get(key) is batch:
            del self._open[key]
        asyncio.get_running_loop().create_task(self._run(batch))

    async def _run(self, batch: _Batch) -> None:
        self.calls += 1
        try:
            # the call's phase spans (miner.encode_prompt carries jobs=) land under the miner.generate of
            # the job that opened the batch: this task runs in that job's context
            outcomes: list[Any] = await self._in_thread(self.backend.generate_batch, batch.items)
        except Exception as exc:  # the call itself failed (out of memory...): every job of it fails
            outcomes = [exc] * len(batch.items)
        for future, outcome in zip(batch.futures, outcomes, strict=True):
            if future.done():
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
