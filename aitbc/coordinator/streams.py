"""Watchers of jobs and the text streamed by text jobs.

Each WatchJob call gets a bounded queue: a slow watcher misses progress (never a state change),
and the text it fell behind on is coalesced into one chunk at the next event. Text is buffered per
job for the current attempt (a requeued job starts again at offset 0) and dropped when the job
has ended and nobody watches it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

from aitbc import jobs
from aitbc.errors import InvalidArgument
from aitbc.v1 import job_pb2

S = job_pb2.JobState
WATCH_QUEUE = 256
MAX_STREAMED_CHARS = 1 << 20
# a delta counts as at least this many characters: each is a str object of ~50 bytes plus its list slot,
# so 2-character deltas would otherwise hold ~30x the cap's memory (4,096 tokens, one delta each: 262,144)
DELTA_CHARS = 64
Event = job_pb2.Job | job_pb2.JobProgress | job_pb2.TextChunk
EVENT_PROGRESS, EVENT_TEXT = 1, 2  # job_events.kind (several coordinators: docs/scaling.md)


class JobStreams:
    def __init__(self) -> None:
        self._watchers: dict[str, set[asyncio.Queue[Event]]] = {}
        self._text: dict[str, list[str]] = {}  # text job -> deltas streamed in the current attempt
        self._chars: dict[str, int] = {}  # characters streamed (the offset of the next delta)
        self._cost: dict[str, int] = {}  # what they count against MAX_STREAMED_CHARS (DELTA_CHARS at least each)
        self._attempt: dict[str, int] = {}  # watched job -> text resets so far: a watcher seeing it change starts at 0

    def watched(self, job_id: str) -> bool:
        return job_id in self._watchers

    def watched_ids(self) -> list[str]:
        return list(self._watchers)

    def watchers(self, job_id: str) -> int:
        return len(self._watchers.get(job_id, ()))

    def watching(self) -> int:
        """Jobs watched now."""
        return len(self._watchers)

    def queue_sizes(self, job_id: str) -> list[int]:
        """Events waiting in each watcher's queue (each bounded by WATCH_QUEUE)."""
        return [q.qsize() for q in self._watchers.get(job_id, ())]

    def publish(self, job_id: str, event: Event) -> None:
        for queue in self._watchers.get(job_id, ()):
            if queue.full():
                if not isinstance(event, job_pb2.Job):
                    continue  # a slow watcher misses progress; text it catches up on at the next event
                while not queue.empty():
                    queue.get_nowait()
            queue.put_nowait(event)

    # ---- text ---------------------------------------------------------------------------------------

    def append_text(self, job_id: str, text: str) -> None:
        """Buffer a delta of the current attempt; InvalidArgument past MAX_STREAMED_CHARS (a delta
        counting as at least DELTA_CHARS)."""
        cost = self._cost.get(job_id, 0) + max(len(text), DELTA_CHARS)
        if cost > MAX_STREAMED_CHARS:
            raise InvalidArgument(f"streamed text exceeds {MAX_STREAMED_CHARS} characters (each TextChunk counting as "
                                  f"at least {DELTA_CHARS}: send a token's text, not a character at a time)")
        self._cost[job_id] = cost
        self._chars[job_id] = self._chars.get(job_id, 0) + len(text)
        self._text.setdefault(job_id, []).append(text)
        self.publish(job_id, job_pb2.TextChunk(job_id=job_id))

    def chars(self, job_id: str) -> int:
        """Characters streamed in the current attempt (the real count: offsets are made from it)."""
        return self._chars.get(job_id, 0)

    def text(self, job_id: str) -> str:
        return "".join(self._text.get(job_id, ()))

    def reset_text(self, job_id: str) -> None:
        self._text.pop(job_id, None)
        self._chars.pop(job_id, None)
        self._cost.pop(job_id, None)
        if job_id in self._watchers:
            self._attempt[job_id] = self._attempt.get(job_id, 0) + 1
        else:
            self._attempt.pop(job_id, None)

    def ended(self, job_id: str) -> None:
        """The job ended: its text is kept only while someone still watches (to flush it)."""
        if job_id not in self._watchers:
            self.reset_text(job_id)

    # ---- watching -----------------------------------------------------------------------------------

    async def watch(self, job_id: str, snapshot: Callable[[], Awaitable[job_pb2.Job]],
                    active: Callable[[str], bool]) -> AsyncIterator[Event]:
        """First a snapshot (an awaited read), then progress, text and every state change, until
        the job finishes."""
        job = await snapshot()
        if job.state in jobs.TERMINAL:
            yield job
            return
        # subscribe before the snapshot is handed out: nothing between the two is missed
        queue: asyncio.Queue[Event] = asyncio.Queue(WATCH_QUEUE)
        self._watchers.setdefault(job_id, set()).add(queue)
        streamed, offset = 0, 0  # deltas and characters of the current attempt sent to this watcher
        attempt = self._attempt.get(job_id, 0)
        try:
            yield job
            while True:
                event = await queue.get()
                if self._attempt.get(job_id, 0) != attempt:  # the text was reset (a new attempt): from offset 0
                    attempt, streamed, offset = self._attempt.get(job_id, 0), 0, 0
                if isinstance(event, job_pb2.TextChunk) or (isinstance(event, job_pb2.Job) and event.state in jobs.TERMINAL):
                    deltas = self._text.get(job_id, [])
                    if len(deltas) > streamed:  # coalesce whatever this watcher has not seen yet
                        text = "".join(deltas[streamed:])
                        chunk = job_pb2.TextChunk(job_id=job_id, offset=offset, text=text)
                        streamed, offset = len(deltas), offset + len(text)  # before yielding: more may arrive
                        yield chunk
                    if isinstance(event, job_pb2.TextChunk):
                        continue
                elif isinstance(event, job_pb2.Job) and event.state == S.JOB_STATE_QUEUED:
                    streamed = offset = 0  # requeued: the next attempt's text starts again at offset 0
                yield event
                if isinstance(event, job_pb2.Job) and event.state in jobs.TERMINAL:
                    return
        finally:
            watchers = self._watchers.get(job_id)
            if watchers is not None:
                watchers.discard(queue)
                if not watchers:
                    del self._watchers[job_id]
                    self._attempt.pop(job_id, None)
                    if not active(job_id):
                        self.reset_text(job_id)
