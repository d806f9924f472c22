"""The coordinator: client-facing job API, miner gateway, verification and settlement.

A package of small units around a sans-IO job state machine (aitbc.coordinator.machine); the
`Coordinator` runtime in aitbc.coordinator.core composes them. See docs/coordinator.md.
"""

from aitbc.coordinator.core import Coordinator
from aitbc.coordinator.registry import (
    CHALLENGE_TTL_S,
    REGISTER_DOMAIN,
    SESSION_TTL_S,
    MinerConn,
    MinerSession,
    register_digest,
)
from aitbc.coordinator.streams import MAX_STREAMED_CHARS, WATCH_QUEUE
from aitbc.coordinator.verification import VERIFY_CLIENT

__all__ = [
    "CHALLENGE_TTL_S", "MAX_STREAMED_CHARS", "REGISTER_DOMAIN", "SESSION_TTL_S", "VERIFY_CLIENT", "WATCH_QUEUE",
    "Coordinator", "MinerConn", "MinerSession", "register_digest",
]
