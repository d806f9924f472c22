from __future__ import annotations

import hashlib

import pytest

from aitbc.crypto import CryptoError, recover_address
from aitbc.errors import FailedPrecondition, InvalidArgument, NotFound, Unauthenticated
from aitbc.wallet.unlocked import UnlockedWallets

from .conftest import PASS, FakeClock

DIGEST = hashlib.sha256(b"a transaction").digest()


@pytest.fixture
def wallets(ks, clock) -> UnlockedWallets:
    ks.create("alice", PASS)
    ks.create("bob", PASS)
    return UnlockedWallets(ks, idle_timeout_s=60, clock=clock)


def test_a_locked_wallet_signs_nothing(wallets):
    assert not wallets.is_unlocked("alice")
    with pytest.raises(FailedPrecondition, match="^wallet 'alice' is locked: unlock it first$"):
        wallets.sign("alice", DIGEST)


def test_unlock_sign_lock(wallets):
    address = wallets.unlock("alice", PASS)
    assert address == wallets.address("alice")
    sig = wallets.sign("alice", DIGEST)
    assert len(sig) == 65 and recover_address(DIGEST, sig) == address
    assert wallets.unlocked() == ["alice"]
    assert wallets.lock("alice") is True
    assert wallets.lock("alice") is False
    with pytest.raises(FailedPrecondition, match="is locked: unlock it first"):
        wallets.sign("alice", DIGEST)


def test_idle_timeout_locks_and_use_keeps_it_open(wallets, clock: FakeClock):
    wallets.unlock("alice", PASS)
    clock.advance(59)
    wallets.sign("alice", DIGEST)  # resets the idle timer
    clock.advance(59)
    assert wallets.is_unlocked("alice")
    wallets.sign("alice", DIGEST)
    clock.advance(60)
    with pytest.raises(
        FailedPrecondition, match="is locked: unlock it first \\(it locked itself after 60 s idle\\)"
    ):
        wallets.sign("alice", DIGEST)
    assert not wallets.is_unlocked("alice")
    wallets.unlock("alice", PASS)
    assert wallets.sign("alice", DIGEST)


def test_is_unlocked_and_sweep_expire_too(wallets, clock: FakeClock):
    wallets.unlock("alice", PASS)
    wallets.unlock("bob", PASS, timeout_s=600)
    clock.advance(61)
    wallets.sweep()
    assert wallets.unlocked() == ["bob"]
    assert not wallets.is_unlocked("alice")


def test_per_unlock_timeout(wallets, clock: FakeClock):
    wallets.unlock("alice", PASS, timeout_s=5)
    clock.advance(5)
    with pytest.raises(FailedPrecondition):
        wallets.sign("alice", DIGEST)


def test_lock_all(wallets):
    wallets.unlock("alice", PASS)
    wallets.unlock("bob", PASS)
    wallets.lock_all()
    assert wallets.unlocked() == []
    with pytest.raises(FailedPrecondition):
        wallets.sign("bob", DIGEST)


def test_wrong_passphrase_leaves_it_locked(wallets):
    with pytest.raises(Unauthenticated, match="wrong passphrase for wallet 'alice'"):
        wallets.unlock("alice", "nope")
    assert not wallets.is_unlocked("alice")


def test_unknown_wallet(wallets):
    with pytest.raises(NotFound, match="wallet 'carol' does not exist"):
        wallets.unlock("carol", PASS)
    with pytest.raises(NotFound, match="wallet 'carol' does not exist"):
        wallets.sign("carol", DIGEST)


def test_bad_digest_and_timeouts(wallets):
    wallets.unlock("alice", PASS)
    with pytest.raises(CryptoError, match="digest must be 32 bytes"):
        wallets.sign("alice", b"short")
    for bad in (0, -1, float("nan"), True, "60"):
        with pytest.raises(InvalidArgument, match="unlock timeout"):
            wallets.unlock("alice", PASS, timeout_s=bad)
        with pytest.raises(InvalidArgument, match="unlock timeout"):
            UnlockedWallets(wallets.keystore, idle_timeout_s=bad)


def test_keys_are_not_handed_out(wallets):
    wallets.unlock("alice", PASS)
    public = [n for n in dir(wallets) if not n.startswith("_")]
    assert sorted(public) == [
        "address",
        "idle_timeout_s",
        "is_unlocked",
        "keystore",
        "lock",
        "lock_all",
        "sign",
        "sweep",
        "throttle",
        "unlock",
        "unlocked",
    ]
