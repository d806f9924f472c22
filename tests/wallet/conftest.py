from __future__ import annotations

import pytest

from aitbc.wallet.keystore import INSECURE_FAST_KDF, Keystore

PASS = "correct horse battery staple"


class FakeClock:
    def __init__(self, start: float = 1_795_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def ks(tmp_path, clock) -> Keystore:
    # the explicit fast profile keeps every test well under a millisecond of KDF time
    return Keystore(tmp_path / "keystore", kdf=INSECURE_FAST_KDF, clock=clock)
