"""Client authentication and per-client rate limits (token buckets)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

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
