"""Queue position and start-time estimate of a queued job, as a pure function of the machine's state.

docs/coordinator.md, "Queue position and ETA": a job's position counts the queued jobs ahead of it
that compete for the same miners (same model and kind, in queue order); `slots` are the job slots
of the connected miners that could run it; the estimate is how many rounds of the measured service
time (assignment to result, per model, over the last SERVICE_SAMPLES jobs) must pass before a slot
is free for it. bench/eta.py measures how often it is right.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable
from dataclasses import dataclass

from aitbc.v1 import job_pb2

SERVICE_SAMPLES = 64  # per model: the most recent service times kept


@dataclass(frozen=True, slots=True)
class Capacity:
    """The miners that could run a job: their slots and how many are free now."""

    slots: int
    free: int


class ServiceTimes:
    """Recent service times (seconds from assignment to an accepted result) per model."""

    def __init__(self, keep: int = SERVICE_SAMPLES) -> None:
        self._keep = keep
        self._by_model: dict[str, collections.deque[float]] = {}

    def add(self, model: str, seconds: float) -> None:
        self._by_model.setdefault(model, collections.deque(maxlen=self._keep)).append(max(0.0, seconds))

    def quantiles(self, model: str) -> tuple[float, float, int] | None:
        """(p50, p90, samples) of the model's service time, None before its first completed job."""
        samples = sorted(self._by_model.get(model, ()))
        if not samples:
            return None
        return _quantile(samples, 0.5), _quantile(samples, 0.9), len(samples)


def _quantile(ordered: list[float], q: float) -> float:
    """Nearest rank: the smallest sample with at least q of the samples at or below it."""
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def positions(queue: Iterable[job_pb2.Job]) -> dict[str, int]:
    """1-based position of each job among the queued jobs of its model and kind, in queue order."""
    seen: dict[tuple[str, str | None], int] = {}
    out = {}
    for job in queue:
        key = (job.model, job.params.WhichOneof("kind"))
        seen[key] = seen.get(key, 0) + 1
        out[job.job_id] = seen[key]
    return out


def queue_info(position: int, capacity: Capacity, service: tuple[float, float, int] | None) -> job_pb2.QueueInfo:
    """What a client is told about a queued job (docs/coordinator.md, "Queue position and ETA")."""
    info = job_pb2.QueueInfo(position=position, slots=capacity.slots, can_run=capacity.slots > 0)
    if not capacity.slots or service is None:
        return info
    p50, p90, samples = service
    waiting = position - capacity.free  # jobs (this one included) that wait for a slot to free up
    rounds = 0 if waiting <= 0 else math.ceil(waiting / capacity.slots)
    info.eta_known, info.service_samples = True, samples
    info.eta_p50_ms, info.eta_p90_ms = round(rounds * p50 * 1000), round(rounds * p90 * 1000)
    return info
