"""End to end as a user: the README's commands, real processes, the CLI, buf curl through reflection."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
BUF = ROOT / ".tools" / "node_modules" / ".bin" / "buf"


def aitbc(env: dict, *args: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "aitbc.clients.cli", *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=timeout)


def start_devnet(env: dict, cwd: Path, extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen([sys.executable, "-m", "aitbc.clients.cli", "devnet", "--coordinator-listen", "127.0.0.1:0",
                             "--miner-ops-listen", "127.0.0.1:0", "--explorer-listen", "127.0.0.1:0", *extra],
                            cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: list[str] = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            break
        lines.append(line)
        if line.startswith("Ctrl-C stops"):
            return proc, lines
    proc.kill()
    raise AssertionError("devnet did not come up:\n" + "".join(lines))


def stop_devnet(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    return out


def _services_of(data_dir: Path, *, but: int) -> list[int]:
    """Live processes whose command line names this devnet folder (its services), but `but`."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == but:
            continue
        try:
            cmd = (p / "cmdline").read_bytes().decode(errors="replace")
            state = (p / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(data_dir) in cmd and "aitbc.clients.cli" in cmd and state != "Z":
            out.append(int(p.name))
    return out


def test_demo_command_runs_a_job_and_verifies_the_receipt(tmp_path: Path) -> None:
    env = dict(os.environ, AITBC_HOME=str(tmp_path / "home"))
    held = []  # a devnet's default ports taken (as by a running `aitbc devnet`): the demo uses free ones
    for port in (18000, 18001, 26657, 18080):
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
            held.append(s)
        except OSError:  # already taken by something else: as good
            s.close()
    try:
        r = aitbc(env, "demo", "-o", str(tmp_path / "out.png"), cwd=tmp_path, timeout=300)
    finally:
        for s in held:
            s.close()
    assert r.returncode == 0, r.stdout + r.stderr
    assert "step 20/20" in r.stderr
    assert "receipt verified offline" in r.stdout
    assert "settlement: FINAL: minted" in r.stdout
    assert "balance: 0 -> " in r.stdout
    assert (tmp_path / "out.png").read_bytes().startswith(b"\x89PNG")
    assert json.loads((tmp_path / "out.receipt.json").read_text())["attestation"]["attester"].startswith("ait1")


def test_devnet_submit_status_receipts_buf_curl_and_restart(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = dict(os.environ, AITBC_HOME=str(home))
    proc, lines = start_devnet(env, tmp_path)
    try:
        banner = "".join(lines)
        endpoints = json.loads((home / "devnet" / "endpoints.json").read_text())
        assert endpoints["api_key"] in banner and endpoints["coordinator"] in banner
        r = aitbc(env, "quote", "a futuristic city skyline at night", "--steps", "20", cwd=tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
        quote = dict(line.split(":", 1) for line in r.stdout.splitlines() if ":" in line and not line.startswith(" "))
        assert quote["units"].strip() == "20 tile_steps"  # tiny-sd's native 64x64: 1 tile x 20 steps
        r = aitbc(env, "submit", "a futuristic city skyline at night", "--steps", "20", "--seed", "7", "-o", "city.png",
                  cwd=tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "step 20/20" in r.stderr
        fields = dict(line.split(":", 1) for line in r.stdout.splitlines() if ":" in line)
        assert fields["cost"].split()[0] == quote["cost"].strip()  # what the quote said is what was minted
        job_id = fields["job id"].strip()
        assert float(fields["gpu_seconds"].split()[0]) > 0 and len(fields["receipt hash"].split()[0]) == 64
        assert (tmp_path / "city.png").read_bytes().startswith(b"\x89PNG")

        r = aitbc(env, "status", job_id, "--story", cwd=tmp_path)
        assert r.returncode == 0 and "COMPLETED" in r.stdout
        story = r.stdout[r.stdout.index("story ("):].splitlines()[1:]
        assert [line.split()[1:4] for line in story] == [
            ["-", "->", "QUEUED"], ["QUEUED", "->", "ASSIGNED"], ["ASSIGNED", "->", "RUNNING"],
            ["RUNNING", "->", "COMPLETED"]], r.stdout
        assert "attempt 1: sent to miner ait1" in story[1]
        deadline = time.monotonic() + 60
        while True:  # the MINT lands within a few 1 s blocks
            r = aitbc(env, "receipts", "--job-id", job_id, "-o", "receipt.json", cwd=tmp_path)
            assert r.returncode == 0, r.stderr
            if "settlement FINAL" in r.stderr or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert "settlement FINAL: minted" in r.stderr, r.stderr
        r = aitbc(env, "receipts", "verify", "receipt.json", "--node", endpoints["ledger"], cwd=tmp_path)
        assert r.returncode == 0 and "minted once:" in r.stdout, r.stdout + r.stderr
        r = aitbc(env, "chain", "account", endpoints["miner_address"], "--node", endpoints["ledger"], cwd=tmp_path)
        assert r.returncode == 0 and int(json.loads(r.stdout)["balance"]) > 0, r.stdout + r.stderr
        # offline: no server is asked (a bogus coordinator address proves it)
        r = aitbc(dict(env, AITBC_COORDINATOR="127.0.0.1:1"), "receipts", "verify", "receipt.json", cwd=tmp_path)
        assert r.returncode == 0 and "VALID receipt" in r.stdout, r.stdout + r.stderr
        tampered = json.loads((tmp_path / "receipt.json").read_text())
        tampered["receipt"]["price_per_unit"] += 1
        (tmp_path / "bad.json").write_text(json.dumps(tampered))
        r = aitbc(env, "receipts", "verify", "bad.json", cwd=tmp_path)
        assert r.returncode == 1 and "INVALID" in r.stdout and "altered" in r.stdout

        # a text job: tokens on stdout as they come, the summary on stderr
        r = aitbc(env, "models", cwd=tmp_path)
        assert r.returncode == 0 and "tiny-llama" in r.stdout and "text" in r.stdout, r.stdout + r.stderr
        r = aitbc(env, "submit", "--model", "tiny-llama", "Explain proof of authority in one paragraph",
                  "--max-new-tokens", "24", "--seed", "3", "--temperature", "0.9", cwd=tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
        # tokens went to stdout as they came (a random-weights model may well make only whitespace)
        assert r.stdout and "tokens:" in r.stderr and "generated" in r.stderr
        text_job = [ln.split(":", 1)[1].strip() for ln in r.stderr.splitlines() if ln.startswith("job id:")][0]
        r = aitbc(env, "result", text_job, "-o", "answer.txt", cwd=tmp_path)
        assert r.returncode == 0

        # the miner operator spends what the miner earned
        r = aitbc(dict(env, AITBC_WALLET_PASSPHRASE="correct horse"), "wallet", "import", "miner", "--key-file",
                  endpoints["miner_key_file"], "--kdf-profile", "fast", cwd=tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
        r = aitbc(dict(env, AITBC_WALLET_PASSPHRASE="another one"), "wallet", "create", "friend", "--kdf-profile", "fast",
                  cwd=tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
        friend = [w for w in aitbc(env, "wallet", "list", "--json", cwd=tmp_path).stdout and
                  json.loads(aitbc(env, "wallet", "list", "--json", cwd=tmp_path).stdout) if w["name"] == "friend"][0]
        r = aitbc(dict(env, AITBC_WALLET_PASSPHRASE="correct horse"), "wallet", "send", "miner", friend["address"], "5",
                  cwd=tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
        r = aitbc(env, "wallet", "balance", "friend", "--json", cwd=tmp_path)
        assert int(json.loads(r.stdout)["balance"]) == 5, r.stdout + r.stderr

        # ... and pays for a job with it: escrow, a signed quote, charged exactly the quote
        paying = dict(env, AITBC_WALLET_PASSPHRASE="correct horse")
        r = aitbc(paying, "escrow", "deposit", "30", "--wallet", "miner", cwd=tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
        r = aitbc(env, "quote", "a paid lighthouse", "--steps", "5", "--seed", "4", "--priority-fee", "7",
                  "-o", "quote.json", cwd=tmp_path)
        assert r.returncode == 0 and "total 12 = 5 x 1 + priority fee 7" in r.stdout, r.stdout + r.stderr
        r = aitbc(env, "submit", "a paid lighthouse", "--steps", "5", "--seed", "4", "--quote", "quote.json",
                  "-o", "paid.png", cwd=tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
        paid_job = [ln.split(":", 1)[1].strip() for ln in r.stdout.splitlines() if ln.startswith("job id:")][0]
        r = aitbc(env, "submit", "a paid lighthouse", "--steps", "5", "--seed", "4", "--quote", "quote.json",
                  cwd=tmp_path)  # a quote pays for one job
        assert r.returncode != 0 and "each quote pays for one job" in r.stderr, r.stdout + r.stderr
        r = aitbc(env, "submit", "an expensive kite", "--steps", "5", "--fee", "1000", cwd=tmp_path)
        assert r.returncode != 0 and "escrow too low" in r.stderr and "aitbc escrow deposit" in r.stderr, r.stderr
        deadline = time.monotonic() + 60
        while "settlement FINAL" not in (r := aitbc(env, "receipts", "--job-id", paid_job, cwd=tmp_path)).stderr:
            assert time.monotonic() < deadline, r.stderr
            time.sleep(0.5)
        r = aitbc(env, "chain", "account", endpoints["miner_address"], "--node", endpoints["ledger"], cwd=tmp_path)
        escrows = json.loads(r.stdout)["escrows"]
        assert [int(e["available"]) for e in escrows] == [30 - 12], r.stdout  # charged exactly the quote
        r = aitbc(env, "chain", "supply", "--node", endpoints["ledger"], cwd=tmp_path)
        assert r.returncode == 0 and int(json.loads(r.stdout)["burned"]) == 0, r.stdout + r.stderr

        # the devnet's wallet daemon: a 0600 unix socket in the keystore, every call with its token
        keystore = home / "devnet" / "wallets"
        assert endpoints["wallet"] == f"unix:{keystore}/.daemon/wallet.sock", endpoints
        assert endpoints["wallet_token_file"] == str(keystore / ".daemon" / "token")
        assert stat.S_IMODE(os.stat(keystore / ".daemon" / "wallet.sock").st_mode) == 0o600
        from aitbc.v1 import wallet_pb2, wallet_pb2_grpc
        from aitbc.wallet import access

        ch = access.sync_channel(keystore)
        try:
            stub = wallet_pb2_grpc.WalletServiceStub(ch)
            made = stub.CreateWallet(wallet_pb2.CreateWalletRequest(name="app", passphrase="app pass"), timeout=30)
            listed = stub.ListWallets(wallet_pb2.ListWalletsRequest(), timeout=10)
        finally:
            ch.close()
        assert [(w.name, w.address) for w in listed.wallets] == [("app", made.wallet.address)]
        assert (keystore / "app.json").exists()

        r = aitbc(env, "submit", "x", "--steps", "999", cwd=tmp_path)
        assert r.returncode == 1 and "steps must be between 1 and 150 (got 999)" in r.stderr  # said before sending
        assert "Traceback" not in r.stderr
        r = aitbc(env, "status", "f" * 28, cwd=tmp_path)
        assert r.returncode == 1 and "NOT_FOUND" in r.stderr

        if BUF.exists():
            url = f"http://{endpoints['coordinator']}"
            base = [str(BUF), "curl", "--protocol", "grpc", "--http2-prior-knowledge", "--reflect-protocol", "grpc-v1alpha"]
            out = subprocess.run([*base, "--list-methods", url], capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            assert "aitbc.v1.CoordinatorService/SubmitJob" in out.stdout
            assert "aitbc.v1.MinerService/Register" in out.stdout
            out = subprocess.run([*base, "-d", '{"service": "aitbc.v1.CoordinatorService"}',
                                  f"{url}/grpc.health.v1.Health/Check"], capture_output=True, text=True, timeout=60)
            assert json.loads(out.stdout)["status"] == "SERVING"
            out = subprocess.run([*base, "-H", f"x-api-key: {endpoints['api_key']}", "-d", json.dumps({"job_id": job_id}),
                                  f"{url}/aitbc.v1.CoordinatorService/GetJob"], capture_output=True, text=True, timeout=60)
            assert json.loads(out.stdout)["job"]["state"] == "JOB_STATE_COMPLETED", out.stdout + out.stderr
            wallet = [*base, "--unix-socket", str(keystore / ".daemon" / "wallet.sock"), "-d", "{}",
                      "http://localhost/aitbc.v1.WalletService/ListWallets"]
            out = subprocess.run(wallet, capture_output=True, text=True, timeout=60)
            assert out.returncode == 16 * 8 and "needs its token" in out.stdout + out.stderr, out.stdout + out.stderr
            token = (keystore / ".daemon" / "token").read_text().strip()
            out = subprocess.run([*wallet[:-3], "-H", f"authorization: Bearer {token}", *wallet[-3:]],
                                 capture_output=True, text=True, timeout=60)
            assert made.wallet.address in out.stdout, out.stdout + out.stderr
        else:  # CI installs buf through `make`; a bare pytest run may not have it
            print(f"buf not installed at {BUF}: buf curl checks not run")
    finally:
        out = stop_devnet(proc)
    assert "devnet: stopped" in out
    assert not (home / "devnet" / "endpoints.json").exists()

    # data lives in one folder and survives a restart
    proc, _ = start_devnet(env, tmp_path)
    killed = False
    try:
        r = aitbc(env, "status", job_id, cwd=tmp_path)
        assert r.returncode == 0 and "COMPLETED" in r.stdout, r.stdout + r.stderr
        r = aitbc(env, "result", job_id, "-o", "again.png", cwd=tmp_path)
        assert r.returncode == 0
        assert (tmp_path / "again.png").read_bytes() == (tmp_path / "city.png").read_bytes()
        # a second devnet on the folder is refused at once, naming the supervisor that runs it
        r = aitbc(env, "devnet", cwd=tmp_path, timeout=60)
        assert r.returncode != 0 and f"a devnet is already running in {home / 'devnet'} (supervisor pid {proc.pid})" \
            in r.stdout + r.stderr, r.stdout + r.stderr
        # kill -9 of the supervisor takes its five services with it (none goes on serving, orphaned)
        services = _services_of(home / "devnet", but=proc.pid)
        assert len(services) == 5, services  # ledger, coordinator, miner, wallet daemon, explorer
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        killed = True
        deadline = time.monotonic() + 20
        while _services_of(home / "devnet", but=proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _services_of(home / "devnet", but=proc.pid), "services outlived their SIGKILLed supervisor"
    finally:
        if not killed:
            stop_devnet(proc)
    assert shutil.which("true")
