"""Paid jobs without the network: quotes (signature, expiry, binding to one job), escrow
reservations (never more than the escrow holds) and the fee-ordered queue with its free tier."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aitbc import crypto, quotes
from aitbc.coordinator import fees
from aitbc.coordinator import machine as m
from aitbc.coordinator.clock import FakeClock
from aitbc.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from tests.coordinator.test_machine import LIMITS, image_job, view

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "quotes.json"
COORD = crypto.PrivateKey(bytes.fromhex("11" * 32))
CLIENT = crypto.PrivateKey(bytes.fromhex("22" * 32))
GENESIS = bytes.fromhex("ab" * 32)


def a_quote(*, units: int = 4, price: int = 3, fee: int = 5, expires_at: int = 2_000_000_000_000,
            key: crypto.PrivateKey = COORD, prompt_hash: str = "ab" * 32) -> quotes.SignedQuote:
    return fees.new_quote(key, chain_id="aitbc-devnet", genesis_hash=GENESIS, client_id="alice",
                          client_address=CLIENT.address, model="tiny-sd", prompt_hash=prompt_hash,
                          unit_type="tile_steps", units=units, price_per_unit=price, priority_fee=fee,
                          expires_at=expires_at)


def check(q: quotes.SignedQuote, **over: object) -> None:
    args: dict[str, object] = dict(attester=COORD.address, chain_id="aitbc-devnet", genesis_hash=GENESIS,
                                   client_id="alice", client_address=CLIENT.address, model="tiny-sd",
                                   prompt_hash="ab" * 32, unit_type="tile_steps", units=4, now_ms=1_000)
    args.update(over)
    fees.check_quote(q, **args)  # type: ignore[arg-type]


# ---- quotes ------------------------------------------------------------------------------------------

def test_a_quote_round_trips_through_its_file_and_verifies() -> None:
    q = a_quote()
    assert q.body.total == 4 * 3 + 5
    back = quotes.SignedQuote.loads(q.dumps())
    assert back == q and back.quote_hash == q.quote_hash
    check(back)


def test_an_altered_quote_is_refused() -> None:
    q = a_quote()
    doc = json.loads(q.dumps())
    doc["quote"]["priority_fee"], doc["quote"]["total"] = 0, 12  # still self-consistent: only the signature knows
    doc["quote_hash"] = quotes.QuoteBody.from_dict(doc["quote"]).hash().hex()
    forged = quotes.SignedQuote.from_json_dict(doc)
    with pytest.raises(InvalidArgument, match="not by its attester"):
        check(forged)


def test_a_quote_from_another_coordinator_or_for_another_client_is_refused() -> None:
    other = crypto.PrivateKey(bytes.fromhex("33" * 32))
    with pytest.raises(InvalidArgument, match="not by this coordinator"):
        check(a_quote(key=other))
    with pytest.raises(PermissionDenied, match="not for this API key"):
        check(a_quote(), client_id="bob")


def test_an_expired_quote_is_refused_with_what_to_do() -> None:
    with pytest.raises(FailedPrecondition, match="expired .* ask for a new one"):
        check(a_quote(expires_at=999))


@pytest.mark.parametrize(("field", "value"), [("units", 5), ("model", "other"), ("prompt_hash", "cd" * 32)])
def test_a_quote_for_another_job_is_refused(field: str, value: object) -> None:
    with pytest.raises(InvalidArgument, match=f"another job: its {field}"):
        check(a_quote(), **{field: value})


@pytest.mark.parametrize(("change", "why"), [
    ({"total": 18}, "total 18 must be units x price_per_unit \\+ priority_fee = 17"),
    ({"units": 0, "total": 5}, "units must be at least 1"),
    ({"price_per_unit": 0, "priority_fee": 0, "total": 0}, "at least 1"),
    ({"quote_id": "AB" * 16}, "quote_id must be 32 lower-case hex"),
    ({"unit_type": "gpu_ms"}, "unit_type must be one of"),
    ({"expires_at": 2**53}, "expires_at must be an integer in"),
    ({"client_address": "ait1nope"}, "client_address"),
])
def test_a_malformed_quote_names_its_rule(change: dict[str, object], why: str) -> None:
    doc = a_quote().body.to_dict()
    doc.update(change)
    with pytest.raises(InvalidArgument, match=why):
        quotes.QuoteBody.from_dict(doc)


def test_the_quote_bytes_a_settle_carries_must_be_canonical() -> None:
    raw = a_quote().body.canonical_bytes()
    assert quotes.QuoteBody.from_canonical(raw).canonical_bytes() == raw
    with pytest.raises(InvalidArgument, match="not canonical"):
        quotes.QuoteBody.from_canonical(json.dumps(json.loads(raw), indent=1).encode())
    with pytest.raises(InvalidArgument, match="duplicate"):
        quotes.QuoteBody.from_canonical(raw[:-1] + b',"units":4}')


def test_quote_vectors() -> None:
    """tests/vectors/quotes.json: docs/economy.md's quote encoding, hash, digest and signature."""
    for v in json.loads(VECTORS.read_text())["quotes"]:
        body = quotes.QuoteBody.from_dict(v["quote"])
        assert body.canonical_bytes().decode() == v["canonical"]
        assert body.hash().hex() == v["quote_hash"]
        assert body.digest().hex() == v["signing_digest"]
        key = crypto.PrivateKey(bytes.fromhex(v["attester_private_key"]))
        assert quotes.sign_quote(body, key).signature.hex() == v["signature"]
        quotes.verify_quote(quotes.SignedQuote(body, bytes.fromhex(v["signature"])))


# ---- reservations ------------------------------------------------------------------------------------

def test_two_jobs_that_together_exceed_the_escrow_one_is_accepted() -> None:
    book = fees.Reservations()
    book.reserve(fees.Charge("j1", CLIENT.address, 60, "q1"), escrow_available=100)
    with pytest.raises(FailedPrecondition, match="escrow too low: 40 .* less than the quote 55: aitbc escrow deposit 15"):
        book.reserve(fees.Charge("j2", CLIENT.address, 55, "q2"), escrow_available=100)
    assert book.reserved(CLIENT.address) == 60 and not book.holds("j2")
    book.release("j1")  # j1 ended without a charge, or its SETTLE is final
    book.reserve(fees.Charge("j2", CLIENT.address, 55, "q2"), escrow_available=100)
    assert book.reserved(CLIENT.address) == 55


def test_reservations_are_per_client_and_idempotent() -> None:
    book = fees.Reservations()
    book.reserve(fees.Charge("j1", "a", 10, "q1"), escrow_available=10)
    book.reserve(fees.Charge("j1", "a", 10, "q1"), escrow_available=10)  # the same job again: no second hold
    book.reserve(fees.Charge("j2", "b", 10, "q2"), escrow_available=10)
    assert (book.reserved("a"), book.reserved("b"), len(book)) == (10, 10, 2)
    assert book.release("nope") is None and book.release("j1") is not None and book.reserved("a") == 0


# ---- the fee-ordered queue ---------------------------------------------------------------------------

def paid(job_id: str, *, units: int, fee: int) -> object:
    job = image_job(job_id)
    q = a_quote(units=units, price=0, fee=fee)
    job.quote, job.quote_signature, job.fee = q.body.canonical_bytes(), q.signature, q.body.total
    return job


def dispatched(sm: m.JobMachine) -> list[str]:
    return [i.job.job_id for i in sm.handle(m.Dispatch()) if isinstance(i, m.Assign)]


def test_paid_jobs_run_first_by_fee_per_unit_and_free_jobs_when_capacity_allows() -> None:
    sm = m.JobMachine(FakeClock(), LIMITS)
    for ev in (m.Submit(image_job("free1")), m.Submit(paid("low", units=10, fee=10)), m.Submit(image_job("free2")),
               m.Submit(paid("high", units=2, fee=10)), m.Submit(paid("low2", units=10, fee=10))):
        sm.handle(ev)
    assert list(sm.queue) == ["high", "low", "low2", "free1", "free2"]  # 5/unit, then 1/unit first come, then free
    sm.handle(m.MinerJoined(view("m1", slots=2)))
    assert dispatched(sm) == ["high", "low"]
    sm.handle(m.MinerJoined(view("m2", slots=3)))
    assert dispatched(sm) == ["low2", "free1", "free2"]  # no paid job waits: the free tier is served


def test_a_requeued_paid_job_goes_back_to_the_front_of_the_paid_lane() -> None:
    sm = m.JobMachine(FakeClock(), LIMITS)
    sm.handle(m.MinerJoined(view("m1")))
    sm.handle(m.Submit(paid("p1", units=10, fee=10)))
    assert dispatched(sm) == ["p1"]
    sm.handle(m.Submit(paid("p2", units=10, fee=10)))
    sm.handle(m.Submit(image_job("f1")))
    sm.handle(m.MinerLeft("m1", "stream closed"))
    assert list(sm.queue) == ["p1", "p2", "f1"]


def test_paid_jobs_no_miner_can_take_do_not_block_the_free_tier() -> None:
    sm = m.JobMachine(FakeClock(), LIMITS)
    job = paid("big", units=10, fee=100)
    job.max_price_per_unit = 0  # only miners at or below its price: none here
    sm.handle(m.Submit(job))
    sm.handle(m.Submit(image_job("free")))
    sm.handle(m.MinerJoined(view("m1", price=1)))
    assert dispatched(sm) == ["free"]
    assert list(sm.queue) == ["big"]
