"""The miner registry: registration challenges, sessions, live Work streams, what models are served.

A miner proves its key by signing a stateless challenge (Register), gets a single-use session
token, and opens its Work stream with it. The registry owns the connections (their outboxes and
heartbeats); which jobs a miner holds is the job machine's, and their uploads are in
aitbc.coordinator.uploads.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import heapq
import hmac
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from aitbc import crypto, jobs
from aitbc.coordinator.models import declared
from aitbc.errors import AitbcError, InvalidArgument, Unauthenticated
from aitbc.v1 import coordinator_pb2, job_pb2, miner_pb2

log = logging.getLogger("aitbc.coordinator")

REGISTER_DOMAIN = b"AITBC/miner-register/v1"
CHALLENGE_TTL_S = 60.0
SESSION_TTL_S = 60.0  # a registration must open its Work stream within this; tokens are single-use
MAX_PENDING_SESSIONS = 10_000
MAX_INFO_TEXT = 128
MAX_MODELS = 64


def register_digest(challenge: bytes, pubkey: bytes) -> bytes:
    return crypto.domain_digest(REGISTER_DOMAIN, challenge + pubkey)


def device_class(device: str) -> str:
    return "cuda" if device.startswith("cuda") else ("cpu" if device == "cpu" else "")


def check_miner_info(info: miner_pb2.MinerInfo) -> None:
    """What a miner declares is bounded: Register is open to any key, so its size must be too."""
    if not info.models:
        raise InvalidArgument("a miner must declare at least one model")
    if len(info.models) > MAX_MODELS or len(info.model_specs) > MAX_MODELS:
        raise InvalidArgument(f"a miner may declare at most {MAX_MODELS} models")
    for m in [*info.models, *(spec.name for spec in info.model_specs)]:
        jobs.validate_model(m)
    for name in ("gpu_name", "device", "version"):
        if len(getattr(info, name)) > MAX_INFO_TEXT:
            raise InvalidArgument(f"{name} must be at most {MAX_INFO_TEXT} characters")
    if not 1 <= (info.max_concurrency or 1) <= 64:
        raise InvalidArgument("max_concurrency must be between 1 and 64")
    if info.text_batching not in job_pb2.TextBatching.values():
        raise InvalidArgument(f"text_batching {info.text_batching} is not a TextBatching value (0 unspecified, "
                              "1 exact, 2 stacked)")


@dataclass
class MinerSession:
    miner_id: str
    pubkey: bytes
    info: miner_pb2.MinerInfo
    token: str


@dataclass(eq=False)
class MinerConn:
    """One live Work stream. `outbox` feeds the stream; None ends it, with the status `ended` when set."""

    session: MinerSession
    outbox: asyncio.Queue[miner_pb2.WorkResponse | None]
    last_seen: float
    closed: bool = False
    ended: AitbcError | None = None  # why the coordinator ended it (replaced: Aborted), sent as the stream's status

    @property
    def miner_id(self) -> str:
        return self.session.miner_id

    @property
    def info(self) -> miner_pb2.MinerInfo:
        return self.session.info

    def send(self, msg: miner_pb2.WorkResponse) -> None:
        if not self.closed:
            self.outbox.put_nowait(msg)


class MinerRegistry:
    def __init__(self, clock: Callable[[], float], *, model_grace_s: float) -> None:
        self.clock = clock
        self.model_grace_s = model_grace_s
        self._challenge_key = secrets.token_bytes(32)  # challenges are MACs: nothing is kept per GetChallenge
        # each challenge is used once: the used ones not yet expired, and the same ones ordered by expiry
        # so that taking a challenge prunes only what has expired since (O(log n), not a scan of all)
        self._used_challenges: set[bytes] = set()
        self._used_by_expiry: list[tuple[float, bytes]] = []
        self.sessions: dict[str, tuple[MinerSession, float]] = {}  # token -> (session, expiry); used once
        # (expiry, token) in the order made, which is expiry order; tokens already used are skipped
        self._session_order: collections.deque[tuple[float, str]] = collections.deque()
        self.miners: dict[str, MinerConn] = {}
        # model -> (last seen, kind, largest context length declared): what SubmitJob consults when no
        # miner is connected (within model_grace_s); kept across restarts (served_record / recall)
        self._model_seen: dict[str, tuple[float, int, int]] = {}

    # ---- registration -----------------------------------------------------------------------------

    def challenge(self) -> tuple[bytes, float]:
        """32 bytes: expiry (ms, 8) || random (8) || HMAC-SHA256 of both (16). Stateless, so a flood
        of GetChallenge calls costs the coordinator no memory and locks nobody out."""
        body = int((self.clock() + CHALLENGE_TTL_S) * 1000).to_bytes(8, "big") + secrets.token_bytes(8)
        return body + hmac.new(self._challenge_key, body, hashlib.sha256).digest()[:16], CHALLENGE_TTL_S

    def _take_challenge(self, challenge: bytes) -> None:
        now = self.clock()
        body, tag = challenge[:16], challenge[16:]
        if len(challenge) != 32 or not hmac.compare_digest(
                tag, hmac.new(self._challenge_key, body, hashlib.sha256).digest()[:16]):
            raise Unauthenticated("unknown challenge: call GetChallenge on this coordinator and sign it")
        expiry = int.from_bytes(body[:8], "big") / 1000
        while self._used_by_expiry and self._used_by_expiry[0][0] < now:
            self._used_challenges.discard(heapq.heappop(self._used_by_expiry)[1])
        if expiry < now or challenge in self._used_challenges:
            raise Unauthenticated("expired or already used challenge: call GetChallenge again and sign within 60 s")
        self._used_challenges.add(challenge)
        heapq.heappush(self._used_by_expiry, (expiry, challenge))

    def register(self, pubkey: bytes, challenge: bytes, signature: bytes, info: miner_pb2.MinerInfo,
                 admit: Callable[[str, miner_pb2.MinerInfo], None] = lambda miner_id, info: None) -> MinerSession:
        """A session for a miner that proved its key. `admit` may refuse what it declares (models, price)."""
        self._take_challenge(challenge)
        if len(pubkey) != 33:
            raise InvalidArgument("public_key must be a 33-byte compressed secp256k1 key")
        try:
            signer = crypto.recover_pubkey(register_digest(challenge, pubkey), signature)
        except AitbcError as exc:
            raise Unauthenticated(f"registration signature rejected: {exc.message}") from None
        if signer != pubkey:
            raise Unauthenticated("registration signature was not made by public_key")
        check_miner_info(info)
        miner_id = crypto.address_from_pubkey(pubkey)
        admit(miner_id, info)
        now = self.clock()
        order = self._session_order
        while order and (order[0][0] < now or order[0][1] not in self.sessions):  # expired or already used
            self.sessions.pop(order.popleft()[1], None)
        if len(self.sessions) >= MAX_PENDING_SESSIONS:
            # evict the oldest unused registration rather than refuse: an honest miner opens its Work
            # stream right after Register, so a flood of registrations cannot lock it out
            del self.sessions[order.popleft()[1]]
        session = MinerSession(miner_id, pubkey, info, secrets.token_hex(24))
        self.sessions[session.token] = (session, now + SESSION_TTL_S)
        order.append((now + SESSION_TTL_S, session.token))
        log.info("miner %s registered: models=%s device=%s price=%d", session.miner_id, list(info.models),
                 info.device, info.price_per_unit)
        return session

    def open(self, token: str) -> tuple[MinerConn, MinerConn | None]:
        """A Work stream for a session token. Returns it and the stream it replaces (if any)."""
        session, expiry = self.sessions.pop(token or "", (None, 0.0))
        if session is None or expiry < self.clock():
            raise Unauthenticated("unknown or expired miner session: Register again and open the Work stream "
                                  f"within {SESSION_TTL_S:g} s with the token in x-miner-session")
        old = self.miners.get(session.miner_id)
        conn = MinerConn(session, asyncio.Queue(), self.clock())
        self.miners[session.miner_id] = conn
        self._seen(session.info)
        return conn, old

    def close(self, conn: MinerConn, ended: AitbcError | None = None) -> bool:
        """End a stream (with the status `ended`, if given). True when it was the miner's current one
        (its jobs must go back)."""
        if conn.closed:
            return False
        conn.closed = True
        conn.ended = ended
        conn.outbox.put_nowait(None)
        self._seen(conn.info)
        if self.miners.get(conn.miner_id) is conn:
            del self.miners[conn.miner_id]
        return True

    def silent(self, timeout_s: float) -> list[tuple[MinerConn, float]]:
        """Connections with no message for longer than timeout_s, and how long they were silent."""
        now = self.clock()
        return [(c, now - c.last_seen) for c in self.miners.values() if now - c.last_seen > timeout_s]

    # ---- models -------------------------------------------------------------------------------------

    def _seen(self, info: miner_pb2.MinerInfo) -> None:
        now = self.clock()
        for m in info.models:
            context = max((s.context_length for s in info.model_specs if s.name == m), default=0)
            self._model_seen[m] = (now, declared(info, m)[0], context)

    def served_models(self) -> dict[str, int]:
        """Models served now (or within model_grace_s) and their kind."""
        now = self.clock()
        served = {m: kind for m, (t, kind, _) in self._model_seen.items() if now - t < self.model_grace_s}
        for c in self.miners.values():
            for m in c.info.models:
                served[m] = declared(c.info, m)[0]
        return served

    def context_lengths(self, model: str) -> list[int]:
        """The context lengths the connected miners declare for `model`; with none connected, the
        one remembered from the last miner that served it (within model_grace_s)."""
        live = [spec.context_length for c in self.miners.values() for spec in c.info.model_specs
                if spec.name == model and spec.context_length]
        if live or any(model in c.info.models for c in self.miners.values()):
            return live
        t, _, context = self._model_seen.get(model, (0.0, 0, 0))
        return [context] if context and self.clock() - t < self.model_grace_s else []

    def served_record(self, now_ms: int) -> dict[str, dict[str, int]]:
        """What a restart must not forget for clients: each model served now or within
        model_grace_s, with its kind, when it was last served (Unix ms) and its context length."""
        for c in self.miners.values():
            self._seen(c.info)
        now = self.clock()
        return {m: {"kind": kind, "seen_at_unix_ms": now_ms - int((now - t) * 1000), "context_length": context}
                for m, (t, kind, context) in sorted(self._model_seen.items()) if now - t < self.model_grace_s}

    def recall(self, record: dict[str, dict[str, int]], now_ms: int) -> int:
        """At start-up: models a previous run served (served_record) count as served until their
        grace runs out, so a client's job is accepted before the miners re-register. Returns how
        many are still within the grace."""
        now = self.clock()
        for m, rec in record.items():
            age_s = max(0.0, (now_ms - int(rec["seen_at_unix_ms"])) / 1000)  # a clock set back: seen now
            seen = self._model_seen.get(m)
            if age_s < self.model_grace_s and (seen is None or seen[0] < now - age_s):  # the newest sighting counts
                self._model_seen[m] = (now - age_s, int(rec["kind"]), int(rec.get("context_length", 0)))
        return sum(1 for t, _, _ in self._model_seen.values() if now - t < self.model_grace_s)

    def list_models(self) -> list[coordinator_pb2.ServedModel]:
        out: dict[str, coordinator_pb2.ServedModel] = {}
        for c in self.miners.values():
            info = c.info
            for m in info.models:
                sm = out.setdefault(m, coordinator_pb2.ServedModel(name=m, kind=declared(info, m)[0],
                                                                   min_price_per_unit=info.price_per_unit))
                sm.miners += 1
                sm.min_price_per_unit = min(sm.min_price_per_unit, info.price_per_unit)
                for spec in info.model_specs:
                    if spec.name == m:
                        sm.context_length = max(sm.context_length, spec.context_length)
        return [out[m] for m in sorted(out)]

    def close_all(self) -> None:
        for conn in list(self.miners.values()):
            conn.closed = True
            conn.outbox.put_nowait(None)
        self.miners.clear()
