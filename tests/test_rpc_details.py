"""Error details echo user input, and travel as percent-encoded gRPC metadata (8 KiB soft limit):
aitbc.rpc.details keeps the encoded size bounded whatever the characters (Hypothesis found a
1,000-character Thai address that encoded to 9 KB and turned INVALID_ARGUMENT into a transport error)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from aitbc.rpc import MAX_DETAILS_BYTES, details


def wire_len(text: str) -> int:
    """Bytes of grpc-message on the wire: printable ASCII except '%' as is, other bytes as %XX."""
    return sum(1 if 0x20 <= b <= 0x7E and b != 0x25 else 3 for b in text.encode("utf-8", "replace"))


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=0, max_size=5000), st.integers(1, 4))
def test_details_stay_within_the_metadata_budget(text: str, repeat: int) -> None:
    message = f"address {text * repeat} is not a valid address"
    out = details(message)
    assert wire_len(out) <= MAX_DETAILS_BYTES
    if out != message:  # cut: a prefix of the message, and it says so
        assert out.endswith("... (truncated)") and message.startswith(out[: -len("... (truncated)")])


def test_the_cases_that_matter() -> None:
    short = "steps must be between 1 and 500, got 900"
    assert details(short) == short
    thai = "invalid address " + "กา" * 908  # what the ledger fuzz test sent to GetAccount
    assert wire_len(details(thai)) <= MAX_DETAILS_BYTES < wire_len(thai)
    ascii_long = "x" * 100_000
    out = details(ascii_long)
    assert out.startswith("x" * 1900) and wire_len(out) <= MAX_DETAILS_BYTES
