"""Telemetry reset around every test here, so no test (here or elsewhere) inherits tracing or metrics."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from aitbc import telemetry


@pytest.fixture(autouse=True)
def _telemetry_reset() -> Iterator[None]:
    telemetry.reset_for_tests()
    yield
    telemetry.reset_for_tests()
