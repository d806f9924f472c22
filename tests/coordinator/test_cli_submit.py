"""`aitbc submit` as a user runs it (a real process against a real coordinator): while queued it
says where the job stands; Ctrl-C leaves the job running and says how to follow it."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Any

from aitbc.v1 import job_pb2
from tests.conftest import API_KEY
from tests.coordinator.test_jobs_api import image_job, stub, wait_done
from tests.coordinator.test_queue_eta import GatedBackend

S = job_pb2.JobState


async def read_until(stream: asyncio.StreamReader, needle: str, seen: list[str]) -> None:
    while True:
        line = (await asyncio.wait_for(stream.readline(), 30)).decode()
        if not line:
            raise AssertionError(f"stream ended before {needle!r}: {''.join(seen)}")
        seen.append(line)
        if needle in line:
            return


async def test_ctrl_c_on_submit_says_the_job_goes_on_and_how_to_follow_it(net: Any, tmp_path: Any) -> None:
    from tests.coordinator.test_jobs_api import MD

    backend = GatedBackend()
    await net.add_miner({"null": backend})
    s = stub(net)
    blocker = (await s.SubmitJob(image_job(model="null", seed=1, steps=1), metadata=MD)).job.job_id
    env = dict(os.environ, AITBC_COORDINATOR=net.address, AITBC_API_KEY=API_KEY)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aitbc.clients.cli", "submit", "a green boat", "--model", "null", "--steps", "1",
        "--width", "64", "--height", "64", "-o", str(tmp_path / "boat.png"), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    seen: list[str] = []
    try:
        await read_until(proc.stderr, "queued: position 1, 1 miner slot", seen)  # behind the blocker
        job_id = next(line.split()[1].rstrip(":") for line in seen if line.startswith("job "))
        proc.send_signal(signal.SIGINT)
        rest = (await asyncio.wait_for(proc.stderr.read(), 30)).decode()
        assert await proc.wait() == 130
    finally:
        if proc.returncode is None:
            proc.kill()
    assert f"interrupted: job {job_id} keeps running" in rest and f"aitbc status {job_id}" in rest, rest
    assert "Traceback" not in rest
    backend.gate.release()
    backend.gate.release()
    await wait_done(s, blocker)
    done = await wait_done(s, job_id)  # the interrupted client's job was not lost
    assert done.state == S.JOB_STATE_COMPLETED


def _submit(*argv: str, env: dict[str, str] | None = None) -> Any:
    import subprocess

    # nothing listens (and nothing is retried): what is checked here is checked before anything is sent
    base = dict(os.environ, AITBC_COORDINATOR="127.0.0.1:1", AITBC_API_KEY="k", AITBC_RETRY_ATTEMPTS="1")
    return subprocess.run([sys.executable, "-m", "aitbc.clients.cli", "submit", *argv], env=env or base,
                          capture_output=True, text=True, timeout=60)


import pytest  # noqa: E402


@pytest.mark.parametrize(("argv", "needle"), [
    (("x", "--seed", "-1"), "seed must be between 0 and 9223372036854775807 (got -1)"),
    (("x", "--seed", "99999999999999999999"), "seed must be between 0 and 9223372036854775807"),
    (("x", "--steps", "0"), "--steps must be at least 1 (leave it out for the default)"),
    (("x", "--steps", "999"), "steps must be between 1 and 150 (got 999)"),
    (("x", "--width", "65"), "width must be 0 (the model's native size) or a multiple of 8"),
    (("x", "--images", "9"), "images must be between 1 and 8 (got 9)"),
    (("   ",), "prompt is empty"),
])
def test_bad_submit_input_is_refused_before_anything_is_sent(argv: tuple[str, ...], needle: str) -> None:
    r = _submit(*argv)
    assert r.returncode == 1 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert "UNAVAILABLE" not in r.stderr  # refused here, not by a coordinator (none is listening)


async def test_options_of_the_other_job_kind_are_refused(net: Any, null_text: Any, null_backend: Any) -> None:
    await net.add_miner({"null-text": null_text, "null": null_backend})
    env = dict(os.environ, AITBC_COORDINATOR=net.address, AITBC_API_KEY=API_KEY)
    r = await asyncio.to_thread(_submit, "hello", "--model", "null-text", "--steps", "4", "--width", "128", env=env)
    assert r.returncode == 1 and "--steps, --width do not apply: 'null-text' is a text model" in r.stderr, r.stderr
    r = await asyncio.to_thread(_submit, "a boat", "--model", "null", "--max-new-tokens", "9", env=env)
    assert r.returncode == 1 and "--max-new-tokens does not apply: 'null' is a image model" in r.stderr, r.stderr


def test_model_text_cannot_drive_the_terminal_and_a_closed_pipe_is_no_traceback() -> None:
    from aitbc.clients.cli import printable

    assert printable("ok\tline\nbell\a carriage\r esc\x1b[2J del\x7f") == \
        "ok\tline\nbell\\x07 carriage\\x0d esc\\x1b[2J del\\x7f"
    # `aitbc ... | head -1`: the reader goes away after one line of a long output
    import subprocess

    script = ("import sys\nfrom aitbc.clients import cli\n"
              "cli.cmd_models = lambda args: [print('row ' * 20) for _ in range(200000)] and 0\n"
              "sys.exit(cli.main(['models']))\n")
    r = subprocess.run(["bash", "-c", f"{sys.executable} -c \"$0\" | head -1; exit ${{PIPESTATUS[0]}}", script],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 141 and r.stdout.startswith("row ") and "Traceback" not in r.stderr, r.stderr


async def test_receipts_are_a_table_json_on_request_and_files_with_o(net: Any, null_backend: Any, tmp_path: Any,
                                                                   capsys: Any) -> None:
    import json

    from aitbc.clients.cli import main
    from tests.coordinator.test_jobs_api import MD

    for _ in range(2):
        await net.add_miner({"null": null_backend}, price=2)
    s = stub(net)
    job = await wait_done(s, (await s.SubmitJob(image_job(model="null", seed=3, steps=2, images=2, width=64,
                                                          height=64), metadata=MD)).job.job_id)
    await net.until(lambda: len(net.core.store.get_job(job.job_id).shard_job_ids) == 2)
    base = ["--coordinator", net.address, "--api-key", API_KEY]
    run = asyncio.get_running_loop().run_in_executor
    assert await run(None, main, ["receipts", "--job-id", job.job_id, *base]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["JOB", "RECEIPT", "UNITS", "PRICE", "AMOUNT", "PROVIDER", "SETTLEMENT"]
    assert len(table) == 3 and all("2 tile_steps" in row and "DISABLED" in row for row in table[1:])
    out = tmp_path / "r.json"
    assert await run(None, main, ["receipts", "--job-id", job.job_id, "-o", str(out), *base]) == 0
    written = sorted(tmp_path.glob("r-*.json"))
    assert [p.name for p in written] == ["r-1.json", "r-2.json"] and capsys.readouterr().out == ""
    assert {json.loads(p.read_text())["receipt"]["job_id"] for p in written} == set(job.shard_job_ids)
    assert await run(None, main, ["receipts", "verify", str(written[0])]) == 0


async def test_a_text_job_prints_and_saves_its_final_text_and_writes_its_receipt(net: Any, null_text: Any,
                                                                               tmp_path: Any, capsys: Any) -> None:
    import json

    from aitbc.clients.cli import main
    from tests.coordinator.test_jobs_api import MD, fetch

    await net.add_miner({"null-text": null_text})
    base = ["--coordinator", net.address, "--api-key", API_KEY]
    run = asyncio.get_running_loop().run_in_executor
    out = tmp_path / "story.txt"
    argv = ["submit", "tell me a story", "--model", "null-text", "--max-new-tokens", "24", "--seed", "5",
            "--request-id", "story-1", "-o", str(out), *base]
    assert await run(None, main, argv) == 0
    first = capsys.readouterr()
    job_id = next(line.split()[-1] for line in first.err.splitlines() if line.startswith("job id:"))
    _, data = await fetch(stub(net), job_id, md=MD)
    final = data.decode()
    assert final and first.out == final + "\n" and out.read_text() == final
    receipt_file = tmp_path / "story.receipt.json"
    assert f"receipt file: {receipt_file}" in first.err
    assert json.loads(receipt_file.read_text())["receipt"]["job_id"] == job_id
    assert json.loads(receipt_file.read_text())["receipt"]["unit_type"] == "tokens"
    assert await run(None, main, ["receipts", "verify", str(receipt_file)]) == 0
    capsys.readouterr()
    # the race of issue 20: the job finished before the watch saw any of its text (here: resubmitted
    # under its request id once done, so the watch gets only the finished job); stdout and -o still
    # get the whole final text, not nothing
    out.unlink()
    receipt_file.unlink()
    assert await run(None, main, argv) == 0
    again = capsys.readouterr()
    assert again.out == final + "\n" and out.read_text() == final and receipt_file.exists()
