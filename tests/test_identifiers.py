"""Identifiers a client or miner sends are checked whole: a trailing newline (which a regex's "$"
lets through) or any other stray character is refused, so one name cannot be spelled two ways."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from aitbc import jobs
from aitbc.coordinator.models import declared
from aitbc.errors import InvalidArgument


@pytest.mark.parametrize("check,good", [
    (jobs.validate_model, "tiny-sd"),
    (jobs.validate_request_id, "req-1"),
    (jobs.validate_job_id, "0" * 28),
])
def test_a_trailing_newline_is_refused(check, good):
    assert check(good) == good
    for bad in (good + "\n", good + "\n\n", good + " ", "\n" + good):
        with pytest.raises(InvalidArgument):
            check(bad)


def test_a_weights_hash_with_a_trailing_newline_is_refused():
    def info(weights: str) -> SimpleNamespace:
        return SimpleNamespace(model_specs=[SimpleNamespace(name="m", kind=jobs.IMAGE, native_size=512,
                                                            weights_sha256=weights)])

    assert declared(info("ab" * 32), "m")[1]["weights_sha256"] == "ab" * 32
    with pytest.raises(InvalidArgument, match="weights_sha256 must be 64 lower-case hex"):
        declared(info("ab" * 32 + "\n"), "m")
