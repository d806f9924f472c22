"""Client authentication, per-client rate limits (token buckets) and open streams."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from aitbc.config import ClientKey
from aitbc.errors import ResourceExhausted, Unauthenticated
from aitbc.limits import TokenBucket


class ClientAuth:
    """API keys (stored as sha256) -> clients; one token bucket per client."""

    def __init__(self, clients: list[ClientKey], clock: Callable[[], float]) -> None:
        self.clients: dict[str, ClientKey] = {c.api_key_sha256: c for c in clients}
        self.by_id: dict[str, ClientKey] = {c.id: c for c in clients}
        self.clock = clock
        self._buckets: dict[str, TokenBucket] = {}
        self._streams: dict[str, int] = {}  # client id -> server streams open now (none: no entry)

    def authenticate(self, api_key: str | None) -> ClientKey:
        if not api_key:
            raise Unauthenticated(
                "missing API key: send it in the x-api-key metadata (`aitbc devnet` prints the devnet key)"
            )
        client = self.clients.get(hashlib.sha256(api_key.encode()).hexdigest())
        if client is None:
            raise Unauthenticated("unknown API key: check the key (a devnet prints its key at start-up)")
        bucket = self._buckets.get(client.id)
        if bucket is None or (bucket.rate, bucket.burst) != (client.rate_per_s, client.burst):
            bucket = self._buckets[client.id] = TokenBucket(client.rate_per_s, client.burst, self.clock)
        wait = bucket.take()
        if wait:
            raise ResourceExhausted(
                f"rate limit of {client.rate_per_s:g} requests/s (burst {client.burst}) exceeded for client "
                f"'{client.id}': retry in {wait * 1000:.0f} ms",
                retry_after_s=wait,
            )
        return client

    def streams(self, client_id: str) -> int:
        return self._streams.get(client_id, 0)

    @contextmanager
    def stream(self, client: ClientKey) -> Iterator[None]:
        """Hold one of the client's `max_streams` for a server stream's life (WatchJob, GetJobResult, and
        GenerateImage, which waits on its job):
        a rate limit alone lets one key pile up long-lived streams (THREAT-MODEL.md, "client")."""
        held = self._streams.get(client.id, 0)
        if held >= client.max_streams:
            raise ResourceExhausted(
                f"client '{client.id}' already has {held} streams open (WatchJob, GetJobResult, GenerateImage; max_streams "
                f"{client.max_streams}): close one, or let a watched job end, before opening another")
        self._streams[client.id] = held + 1
        try:
            yield
        finally:
            self._streams[client.id] -= 1
            if not self._streams[client.id]:
                del self._streams[client.id]
