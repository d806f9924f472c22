"""The devnet supervisor's restart backoff (clients/devnet.py): a pure policy, and the log lines
of a real supervised process that keeps dying."""

from __future__ import annotations

import io
import sys
from pathlib import Path

from aitbc.clients.devnet import BACKOFF_CAP_S, STABLE_S, Child, Devnet, RestartBackoff


def test_quick_exits_double_the_wait_up_to_the_cap() -> None:
    b = RestartBackoff()
    waits = [b.died(0.5)[0] for _ in range(8)]
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0] and BACKOFF_CAP_S == 30.0


def test_a_stable_run_resets_the_backoff() -> None:
    b = RestartBackoff()
    for _ in range(7):
        b.died(2.0)
    wait, why = b.died(STABLE_S)  # the miner: restarted often, then it ran stably
    assert wait == 0.0 and "backoff is reset" in why and b.quick_exits == 0
    assert b.died(1.0)[0] == 1.0  # a new quick exit starts again from the base
    wait, why = b.died(STABLE_S - 1)  # short of stable: still a quick exit
    assert wait == 2.0 and "quick exit #2 in a row" in why and f"resets once it runs {STABLE_S:g} s" in why


def test_the_supervisor_says_why_and_how_long_it_waits(tmp_path: Path) -> None:
    out = io.StringIO()
    child = Child("flaky", [sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "flaky.log")
    net = Devnet(tmp_path, log_to=out, children=[child])
    child.start()
    child.proc.wait(30)  # type: ignore[union-attr]
    t0 = child.started_at
    net.supervise_once(now=t0 + 0.5)
    assert "devnet: flaky exited (3) after 0.5 s; restarting in 1.0 s: it ran only 0.5 s, quick exit #1" \
        in out.getvalue()
    net.supervise_once(now=t0 + 1.0)  # still within the wait: not restarted yet
    assert child.restarts == 0
    net.supervise_once(now=t0 + 1.6)
    assert child.restarts == 1 and "devnet: flaky: restarting (restart #1)" in out.getvalue()
    child.proc.wait(30)  # type: ignore[union-attr]
    net.supervise_once(now=child.started_at + 100)  # it ran 100 s before this exit
    assert "after 100.0 s; restarting in 0.0 s: it had run stably" in out.getvalue() and child.restarts == 2
    child.proc.wait(30)  # type: ignore[union-attr]
