"""Registration challenges and pending sessions under a flood of fresh keys (keys are free).

Each challenge is used once and expires; what the registry keeps to enforce that, and the sessions
registrations leave, stays bounded by what is still live however many registrations come, so a
flood costs memory for its last minute only (the cost per registration is in bench/registrations.py).
"""

from __future__ import annotations

import pytest

from aitbc import crypto
from aitbc.coordinator.clock import FakeClock
from aitbc.coordinator.registry import CHALLENGE_TTL_S, SESSION_TTL_S, MinerRegistry, register_digest
from aitbc.errors import Unauthenticated
from aitbc.v1 import miner_pb2

INFO = miner_pb2.MinerInfo(models=["null"])


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def registry(clock: FakeClock) -> MinerRegistry:
    return MinerRegistry(clock.monotonic, model_grace_s=60)


def register(registry: MinerRegistry, challenge: bytes, key: crypto.PrivateKey | None = None):
    key = key or crypto.PrivateKey.generate()
    return registry.register(key.pubkey, challenge, key.sign(register_digest(challenge, key.pubkey)), INFO)


def test_a_challenge_is_taken_once_even_among_many(registry: MinerRegistry, clock: FakeClock) -> None:
    kept = [registry.challenge()[0] for _ in range(50)]
    for ch in kept[::2]:
        register(registry, ch)
        clock.advance(0.5)
    for ch in kept[::2]:
        with pytest.raises(Unauthenticated, match="already used"):
            register(registry, ch)
    for ch in kept[1::2]:  # the others, unused, are still good (they expire 60 s after they were made)
        register(registry, ch)


def test_a_challenge_expires_used_or_not(registry: MinerRegistry, clock: FakeClock) -> None:
    used, unused = registry.challenge()[0], registry.challenge()[0]
    register(registry, used)
    clock.advance(CHALLENGE_TTL_S + 0.001)
    for ch in (used, unused):  # a used one forgotten once expired is refused as expired, not taken again
        with pytest.raises(Unauthenticated, match="expired"):
            register(registry, ch)


def test_a_registration_flood_keeps_only_what_is_live(registry: MinerRegistry, clock: FakeClock) -> None:
    """3,000 registrations of fresh keys over 300 s, some of them opening their Work streams: what the
    registry keeps is at every step exactly the used challenges not yet expired, and the sessions
    neither opened nor expired."""
    made: list[tuple[float, bytes]] = []  # (expiry, challenge) of every challenge used
    sessions: list[tuple[float, str]] = []  # (expiry, token) of every session not opened
    for i in range(3000):
        ch = registry.challenge()[0]
        made.append((int.from_bytes(ch[:8], "big") / 1000, ch))  # its expiry, as the challenge says
        clock.advance(0.05)  # signed a little after it was asked for
        at = clock.t
        session = register(registry, ch)
        if i % 3 == 0:
            registry.open(session.token)
        else:
            sessions.append((at + SESSION_TTL_S, session.token))
        clock.advance(0.05)
        live = {c for exp, c in made if exp >= at}
        assert registry._used_challenges == live  # noqa: SLF001
        assert len(registry._used_by_expiry) == len(live)  # noqa: SLF001
        assert set(registry.sessions) == {t for exp, t in sessions if exp >= at}
        assert len(registry._session_order) <= len(live) + 1  # noqa: SLF001
    assert len(live) <= 601  # one minute of registrations at ten a second
    with pytest.raises(Unauthenticated, match="already used"):  # and what is kept still does its work
        register(registry, made[-1][1])
