"""Reputation: per-miner counters and a score in [0, 1], kept in LMDB so they survive restarts.

Update rule (docs/hub.md, "Reputation"): a new miner starts at 0.5; a served job moves the score
2% of the way to 1, a passed verification 5% of the way; a failure (the job failed on the miner:
it lied about VRAM or models, or returned a rejected result) or a stall (accepted, then silent)
takes 10% of it away; a failed verification halves it and puts the miner on probation (every
one of its next results is verified until it passes P checks, default 10). K failed verifications
(default 2) within a window (default 7 days) quarantine the miner until an operator releases it.
`draws` counts the miner's sampling draws (one per original result), so which of its results are
sampled is a keyed function of (miner, n): see aitbc.hub.verification.sample_key.

Every change is `ReputationStore.update`: the store applies the rule to the record as it stands
in one atomic step (LMDB: one write transaction; PostgreSQL: the row locked `FOR UPDATE`, then
written, in one transaction), so a store shared by several coordinators never loses an update.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol

import lmdb

KEY_PREFIX = b"v1:rep:"
DB_NAME = b"v1:reputation"
FailureKind = Literal["failure", "stall"]


@dataclass(frozen=True, slots=True)
class ReputationPolicy:
    initial: float = 0.5
    success_gain: float = 0.02  # fraction of the distance to 1 gained per served job
    verified_gain: float = 0.05  # ... per passed verification
    failure_loss: float = 0.10  # fraction of the score lost per failure or stall
    mismatch_factor: float = 0.5  # the score is multiplied by this on a failed verification
    quarantine_after: int = 2  # failed verifications within the window that quarantine a miner
    probation_checks: int = 10  # after a failed verification, this many passed ones end the probation
    window_s: float = 7 * 24 * 3600.0


class MinerRecord(NamedTuple):
    miner_id: str
    jobs_served: int = 0
    verifications_passed: int = 0
    verifications_failed: int = 0
    failures: int = 0
    stalls: int = 0
    reputation: float = 0.5
    quarantined: bool = False
    quarantined_at: float = 0.0  # unix seconds; 0 when not quarantined
    recent_mismatches: tuple[float, ...] = ()  # unix seconds of failed verifications inside the window
    draws: int = 0  # original results seen (sampling draws made); the next draw is number `draws`
    failure_streak: int = 0  # failures and stalls since its last accepted result
    probation_left: int = 0  # > 0: every result is verified until this many more checks pass

    def to_bytes(self) -> bytes:
        body = self._asdict()
        body["recent_mismatches"] = list(self.recent_mismatches)
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> MinerRecord:
        body = json.loads(raw)
        body["recent_mismatches"] = tuple(body.get("recent_mismatches", ()))
        return cls(**body)


Change = Callable[[MinerRecord | None], MinerRecord]  # the record as stored (None: none yet) -> the new one


class ReputationStore(Protocol):
    """`shared`: other processes write the same records (PostgreSQL): a reader caches nothing it
    cannot drop (ReputationBook.invalidate, on the store's notification)."""

    shared: bool

    def get(self, miner_id: str) -> MinerRecord | None: ...
    def put(self, record: MinerRecord) -> None: ...
    def all(self) -> list[MinerRecord]: ...

    def update(self, miner_id: str, change: Change) -> MinerRecord:
        """Apply `change` to the miner's record as stored, atomically (no other update of the
        miner in between), store the result and return it."""
        ...

    def records(self, miner_ids: list[str]) -> dict[str, MinerRecord]:
        """The stored records of these miners (those that have one)."""
        ...


class MemoryReputationStore:
    shared = False

    def __init__(self) -> None:
        self._records: dict[str, bytes] = {}  # serialised, so both stores round-trip the same way

    def get(self, miner_id: str) -> MinerRecord | None:
        raw = self._records.get(miner_id)
        return MinerRecord.from_bytes(raw) if raw is not None else None

    def put(self, record: MinerRecord) -> None:
        self._records[record.miner_id] = record.to_bytes()

    def all(self) -> list[MinerRecord]:
        return [MinerRecord.from_bytes(self._records[k]) for k in sorted(self._records)]

    def update(self, miner_id: str, change: Change) -> MinerRecord:
        record = change(self.get(miner_id))  # one thread: nothing runs in between
        self.put(record)
        return record

    def records(self, miner_ids: list[str]) -> dict[str, MinerRecord]:
        return {m: r for m in miner_ids if (r := self.get(m)) is not None}


class LmdbReputationStore:
    """Records under b"v1:rep:<miner_id>" in a named database of an existing environment (the
    coordinator's JobStore.env), so reputation lives in the coordinator's one LMDB file. The
    environment must allow one more named database than its owner opens (max_dbs)."""

    shared = False

    def __init__(self, env: lmdb.Environment, db_name: bytes = DB_NAME) -> None:
        self.env = env
        try:
            self._db = env.open_db(db_name)
        except lmdb.DbsFullError:
            raise RuntimeError(f"LMDB environment has no room for the {db_name.decode()!r} database: "
                               "open it with a larger max_dbs") from None

    def get(self, miner_id: str) -> MinerRecord | None:
        with self.env.begin(db=self._db) as txn:
            raw = txn.get(KEY_PREFIX + miner_id.encode())
        return MinerRecord.from_bytes(raw) if raw is not None else None

    def put(self, record: MinerRecord) -> None:
        with self.env.begin(write=True, db=self._db) as txn:
            txn.put(KEY_PREFIX + record.miner_id.encode(), record.to_bytes())

    def update(self, miner_id: str, change: Change) -> MinerRecord:
        key = KEY_PREFIX + miner_id.encode()
        with self.env.begin(write=True, db=self._db) as txn:  # LMDB has one writer at a time
            raw = txn.get(key)
            record = change(MinerRecord.from_bytes(raw) if raw is not None else None)
            txn.put(key, record.to_bytes())
        return record

    def records(self, miner_ids: list[str]) -> dict[str, MinerRecord]:
        return {m: r for m in miner_ids if (r := self.get(m)) is not None}

    def all(self) -> list[MinerRecord]:
        out = []
        with self.env.begin(db=self._db) as txn:
            cur = txn.cursor()
            if cur.set_range(KEY_PREFIX):
                for key, raw in cur:
                    if not key.startswith(KEY_PREFIX):
                        break
                    out.append(MinerRecord.from_bytes(raw))
        return sorted(out, key=lambda r: r.miner_id)


class ReputationBook:
    """The rule over a store. Every method writes through and returns the updated record.

    A store of one owner (memory, LMDB): the book is its only writer, so it keeps every record in
    memory (loaded once) and reads (`get`, `snapshot`, matching on every dispatch) never touch the
    store. A shared store (PostgreSQL, several coordinators): the rows are the truth; every change
    is applied to the row (`ReputationStore.update`), and the book caches the records it read
    until `invalidate` drops one (another coordinator changed it: its notification) or `refresh`
    reads them again (the poll behind the notifications)."""

    def __init__(self, store: ReputationStore | None = None, *, policy: ReputationPolicy | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.store: ReputationStore = store if store is not None else MemoryReputationStore()
        self.policy = policy or ReputationPolicy()
        self.clock = clock  # wall clock: quarantine windows must survive a restart
        self.shared = bool(getattr(self.store, "shared", False))
        # one owner: every record; shared: a cache of the rows read (None: the miner has no row)
        self._records: dict[str, MinerRecord | None] = {} if self.shared else {
            r.miner_id: r for r in self.store.all()}

    def get(self, miner_id: str) -> MinerRecord | None:
        """The miner's record, or None for a miner the book has never recorded."""
        if self.shared and miner_id not in self._records:
            self._records[miner_id] = self.store.get(miner_id)
        return self._records.get(miner_id)

    def snapshot(self, miner_id: str) -> MinerRecord:
        rec = self.get(miner_id)
        return rec if rec is not None else MinerRecord(miner_id, reputation=self.policy.initial)

    def all(self) -> list[MinerRecord]:
        if self.shared:
            return self.store.all()  # every coordinator's miners, as the rows say now
        return [r for m in sorted(self._records) if (r := self._records[m]) is not None]

    def invalidate(self, miner_id: str) -> None:
        """Another writer changed the miner's record: read it again when it is next needed."""
        self._records.pop(miner_id, None)

    def refresh(self, miner_ids: list[str]) -> list[str]:
        """Read these miners' records again (a shared store); returns those that changed."""
        if not self.shared or not miner_ids:
            return []
        fresh = self.store.records(sorted(set(miner_ids)))
        changed = []
        for m in sorted(set(miner_ids)):
            if m not in self._records or self._records[m] != fresh.get(m):
                changed.append(m)
            self._records[m] = fresh.get(m)
        return changed

    def record_success(self, miner_id: str, *, draw: bool = False) -> MinerRecord:
        """An accepted result. `draw`: it is an original (not a verification re-run), so it used
        sampling draw number `draws` of the record before this call."""
        def change(r: MinerRecord) -> MinerRecord:
            return r._replace(jobs_served=r.jobs_served + 1, draws=r.draws + draw, failure_streak=0,
                              reputation=_toward_one(r.reputation, self.policy.success_gain))
        return self._update(miner_id, change)

    def record_failure(self, miner_id: str, kind: FailureKind = "failure") -> MinerRecord:
        if kind not in ("failure", "stall"):
            raise ValueError(f"kind must be 'failure' or 'stall' (got {kind!r})")

        def change(r: MinerRecord) -> MinerRecord:
            rep = _clamp(r.reputation * (1.0 - self.policy.failure_loss))
            streak = r.failure_streak + 1
            if kind == "stall":
                return r._replace(stalls=r.stalls + 1, reputation=rep, failure_streak=streak)
            return r._replace(failures=r.failures + 1, reputation=rep, failure_streak=streak)
        return self._update(miner_id, change)

    def record_verification(self, miner_id: str, passed: bool) -> MinerRecord:
        p = self.policy
        if passed:
            def change(r: MinerRecord) -> MinerRecord:
                return r._replace(verifications_passed=r.verifications_passed + 1,
                                  probation_left=max(0, r.probation_left - 1),
                                  reputation=_toward_one(r.reputation, p.verified_gain))
            return self._update(miner_id, change)
        now = self.clock()

        def failed(r: MinerRecord) -> MinerRecord:
            recent = tuple(t for t in r.recent_mismatches if now - t < p.window_s) + (now,)
            recent = recent[-p.quarantine_after:]  # only the last K matter
            quarantine = r.quarantined or len(recent) >= p.quarantine_after
            return r._replace(
                verifications_failed=r.verifications_failed + 1,
                reputation=_clamp(r.reputation * p.mismatch_factor),
                recent_mismatches=recent,
                probation_left=p.probation_checks,
                quarantined=quarantine,
                quarantined_at=r.quarantined_at if r.quarantined else (now if quarantine else 0.0),
            )
        return self._update(miner_id, failed)

    def release(self, miner_id: str) -> MinerRecord:
        """An operator lifts a quarantine; the score is kept, the mismatch window starts afresh and
        the miner is on probation (its next results are all verified)."""
        def change(r: MinerRecord) -> MinerRecord:
            return r._replace(quarantined=False, quarantined_at=0.0, recent_mismatches=(),
                              probation_left=self.policy.probation_checks)
        return self._update(miner_id, change)

    def _update(self, miner_id: str, change: Callable[[MinerRecord], MinerRecord]) -> MinerRecord:
        """The change applied to the record as the store holds it (atomically: no update of
        another writer is lost), then cached."""
        initial = MinerRecord(miner_id, reputation=self.policy.initial)
        record = self.store.update(miner_id, lambda stored: change(stored if stored is not None else initial))
        self._records[miner_id] = record
        return record


def _clamp(x: float) -> float:
    return 0.0 if x < 0.0 else 1.0 if x > 1.0 else x


def _toward_one(x: float, gain: float) -> float:
    return _clamp(x + gain * (1.0 - x))
