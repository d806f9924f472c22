"""Unlocked wallets held in memory by the wallet daemon, each locking itself after idle time.

"A locked wallet signs nothing": the only way to sign is `sign(name, digest)`, which refuses a
wallet that was never unlocked, was locked explicitly, or sat idle past its timeout. Keys stay in
this object; nothing hands them out. (Python cannot wipe memory reliably: locking drops the
reference and leaves the bytes to the allocator.)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aitbc.crypto import PrivateKey
from aitbc.errors import FailedPrecondition, InvalidArgument, NotFound
from aitbc.wallet.keystore import Keystore, validate_name
from aitbc.wallet.throttle import Backoff, UnlockThrottle

DEFAULT_IDLE_TIMEOUT_S = 300.0


@dataclass
class _Entry:
    key: PrivateKey
    timeout_s: float
    last_used: float


class UnlockedWallets:
    """Unlocked keys of one Keystore. `clock` is monotonic seconds (injectable for tests)."""

    def __init__(
        self,
        keystore: Keystore,
        *,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
        backoff: Backoff | None = None,
    ) -> None:
        self.keystore = keystore
        self.throttle = UnlockThrottle(backoff, clock=clock)
        self.idle_timeout_s = _check_timeout(idle_timeout_s)
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        # names that timed out since their last use, so the next refusal can say why
        self._expired: dict[str, float] = {}
        self._lock = threading.Lock()

    def unlock(self, name: str, passphrase: Any, *, timeout_s: float | None = None) -> str:
        """Decrypt the wallet and keep it unlocked until `timeout_s` (default: the idle timeout)
        passes without a signature. Returns its address. Unlocking again resets the timer.
        Wrong passphrases are throttled per wallet (aitbc.wallet.throttle): during a backoff this
        raises ResourceExhausted without trying the passphrase."""
        timeout = self.idle_timeout_s if timeout_s is None else _check_timeout(timeout_s)
        validate_name(name)
        with self.throttle.attempt(name):
            key = self.keystore.unlock(name, passphrase)  # outside the lock: the KDF takes a while
        with self._lock:
            self._entries[name] = _Entry(key, timeout, self._clock())
            self._expired.pop(name, None)
        return key.address

    def lock(self, name: str) -> bool:
        """Lock one wallet now; True when it was unlocked."""
        with self._lock:
            self._expired.pop(name, None)
            return self._entries.pop(name, None) is not None

    def lock_all(self) -> None:
        with self._lock:
            self._entries.clear()
            self._expired.clear()

    def is_unlocked(self, name: str) -> bool:
        with self._lock:
            return self._live(name) is not None

    def unlocked(self) -> list[str]:
        """Names of the wallets unlocked right now, sorted."""
        with self._lock:
            return sorted(n for n in list(self._entries) if self._live(n) is not None)

    def address(self, name: str) -> str:
        return self.keystore.info(name).address

    def sign(self, name: str, digest: bytes) -> bytes:
        """65-byte recoverable low-S signature over a 32-byte digest; resets the idle timer."""
        with self._lock:
            entry = self._live(name)
            if entry is None:
                expired = self._expired.pop(name, None)
                if expired is None and not self.keystore.exists(validate_name(name)):
                    raise NotFound(f"wallet '{name}' does not exist")
                detail = f" (it locked itself after {expired:g} s idle)" if expired is not None else ""
                raise FailedPrecondition(f"wallet '{name}' is locked: unlock it first{detail}")
            entry.last_used = self._clock()
            return entry.key.sign(digest)

    def sweep(self) -> None:
        """Drop every expired key now (a daemon may call this from a timer)."""
        with self._lock:
            for name in list(self._entries):
                self._live(name)

    # -- internals: callers hold self._lock ---------------------------------------------------

    def _live(self, name: str) -> _Entry | None:
        entry = self._entries.get(name)
        if entry is None:
            return None
        if self._clock() - entry.last_used >= entry.timeout_s:
            del self._entries[name]
            self._expired[name] = entry.timeout_s
            return None
        return entry


def _check_timeout(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise InvalidArgument(f"unlock timeout must be a positive number of seconds, got {value!r}")
    return float(value)
