"""The devnet never leaves a service behind and never starts twice on one folder or port
(clients/devnet.py): a child dies with a SIGKILLed supervisor, a second supervisor on the folder is
told which pid runs it, busy ports are named before anything starts, a lost stdout is survived."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aitbc.clients.devnet import Devnet
from aitbc.errors import FailedPrecondition

ROOT = Path(__file__).resolve().parents[1]

SUPERVISOR = r"""
import sys, time
from pathlib import Path
from aitbc.clients.devnet import Child
c = Child("sleeper", [sys.executable, "-c", "import time; time.sleep(120)"], Path(sys.argv[1]) / "sleeper.log")
c.start()
print(c.proc.pid, flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie waiting for its (new) parent to reap it is gone too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux")
def test_a_service_dies_with_a_killed_supervisor(tmp_path: Path) -> None:
    sup = subprocess.Popen([sys.executable, "-c", SUPERVISOR, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                           cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        child = int(sup.stdout.readline())  # type: ignore[union-attr]
        assert _alive(child)
        sup.send_signal(signal.SIGKILL)  # no cleanup code of the supervisor runs
        sup.wait(10)
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child), "the supervised process outlived its SIGKILLed supervisor"
    finally:
        sup.kill()
        if _alive(child):
            os.kill(child, signal.SIGKILL)


def test_one_supervisor_per_data_folder(tmp_path: Path) -> None:
    first = Devnet(tmp_path / "d")
    first.lock()
    try:
        with pytest.raises(FailedPrecondition, match=rf"a devnet is already running in .* \(supervisor pid {os.getpid()}\)"):
            Devnet(tmp_path / "d").lock()
    finally:
        first.stop()
    Devnet(tmp_path / "d").lock()  # free again once the first stopped


def test_busy_ports_are_named_before_anything_starts(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = f"127.0.0.1:{s.getsockname()[1]}"
        net = Devnet(tmp_path / "d", ledger_listen=busy, coordinator_listen="127.0.0.1:0",
                     miner_ops_listen="127.0.0.1:0")
        with pytest.raises(FailedPrecondition, match=rf"already in use: {busy} \(ledger\): another devnet"):
            net.start()
        assert net.children == []  # nothing was started


def test_a_lost_stdout_does_not_stop_the_supervisor(tmp_path: Path) -> None:
    r, w = os.pipe()
    os.close(r)  # the reader (`| tee`) is gone
    out = os.fdopen(w, "w")
    net = Devnet(tmp_path, log_to=out)
    net.say("devnet: miner exited")  # BrokenPipeError inside: silenced, not raised
    net.say("devnet: again")


def test_a_miner_whose_ops_port_is_taken_says_so_before_loading_models(tmp_path: Path) -> None:
    """The README's miner.toml beside a running devnet: a one-line error at once, no traceback after
    seconds of model loading."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = f"127.0.0.1:{s.getsockname()[1]}"
        conf = tmp_path / "miner.toml"
        conf.write_text(f'coordinator = "127.0.0.1:1"\nops_listen = "{busy}"\nmodels = ["tiny-sd"]\n'
                        f'key_file = "{tmp_path / "miner.key"}"\n')
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "aitbc.clients.cli", "miner", "--config", str(conf)], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and f"ops_listen {busy} is already in use" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "loaded" not in r.stdout  # refused before any model loaded
    assert time.monotonic() - t0 < 60
