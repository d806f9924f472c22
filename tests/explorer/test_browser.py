"""The explorer in a real browser: Debian's chromium, headless, driven through chromium-driver
(`make test` installs both; without them these tests fail, unless AITBC_SKIP_BROWSER=1 is set, which
skips them with the reason printed). Against a real devnet: new blocks appear without a reload,
search finds every kind of key, a real receipt dropped on /verify is VALID and a one-character edit
is INVALID with the reason `aitbc receipts verify` gives, the market lists the devnet's miner.
Every case of tests/vectors/receipt_rules.json is checked by the page's own verifier. Screenshots of
each page are saved and checked (AITBC_EXPLORER_SCREENSHOTS=DIR keeps them there: docs/explorer/)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_devnet_cli import aitbc, start_devnet, stop_devnet

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "tests" / "vectors" / "receipt_rules.json"


def browser() -> Any:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        if os.environ.get("AITBC_SKIP_BROWSER") == "1":
            pytest.skip("no chromium / chromedriver (AITBC_SKIP_BROWSER=1): `make test` installs Debian's chromium "
                        "and chromium-driver")
        pytest.fail("browser tests need Debian's chromium and chromium-driver: run `make test` (it installs them), "
                    "or apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,900"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=opts)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def laid_out(data: bytes) -> bool:
    """A screenshot with content: not one flat colour (decode the PNG's first rows)."""
    pos, idat = 8, b""
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + n]
        pos += 12 + n
    raw = zlib.decompress(idat)
    return len(set(raw[: 200_000])) > 8


def shoot(drv: Any, name: str, out: Path) -> None:
    data = drv.get_screenshot_as_png()
    w, h = png_size(data)
    assert w >= 600 and h >= 400 and laid_out(data), name
    (out / f"{name}.png").write_bytes(data)


def stale(element: Any) -> bool:
    """The element's page was replaced. While Chromium swaps the page, asking about an element of
    the old one can also answer "unhandled inspector error" instead of a stale reference: the
    same thing (the caller then waits for the new page's content)."""
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException

    try:
        element.tag_name  # noqa: B018
    except StaleElementReferenceException:
        return True
    except WebDriverException as exc:
        if "inspector error" in str(exc):
            return True
        raise
    return False


def wait_for(drv: Any, predicate: Any, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = predicate(drv)
        if got:
            return got
        assert time.monotonic() < deadline, drv.page_source[:2000]
        time.sleep(0.05)


def pay_for_a_job(env: dict[str, str], ep: dict[str, str], cwd: Path) -> int:
    """The miner's operator pays for a job with what the miner earned (escrow, a quote, a SETTLE):
    returns the fee the quote charges, once its settlement is final."""
    paying = dict(env, AITBC_WALLET_PASSPHRASE="correct horse")
    r = aitbc(paying, "wallet", "import", "miner", "--key-file", ep["miner_key_file"], "--kdf-profile", "fast", cwd=cwd)
    assert r.returncode == 0, r.stdout + r.stderr
    r = aitbc(env, "quote", "a paid lighthouse", "--steps", "2", "--seed", "4", "--priority-fee", "1",
              "-o", "quote.json", cwd=cwd)
    assert r.returncode == 0, r.stdout + r.stderr
    total = int(r.stdout.split(": total ", 1)[1].split()[0])  # "quote: ID: total 3 = 2 x 1 + priority fee 1"
    r = aitbc(paying, "escrow", "deposit", str(total), "--wallet", "miner", cwd=cwd)
    assert r.returncode == 0, r.stdout + r.stderr
    r = aitbc(env, "submit", "a paid lighthouse", "--steps", "2", "--seed", "4", "--quote", "quote.json",
              "-o", "paid.png", cwd=cwd)
    assert r.returncode == 0, r.stdout + r.stderr
    job = [ln.split(":", 1)[1].strip() for ln in r.stdout.splitlines() if ln.startswith("job id:")][0]
    deadline = time.monotonic() + 60
    while "settlement FINAL" not in (r := aitbc(env, "receipts", "--job-id", job, cwd=cwd)).stderr:
        assert time.monotonic() < deadline, r.stderr
        time.sleep(0.5)
    return total


def chain_paid(ledger: str, address: str) -> tuple[int, int, int]:
    """(receipts, minted, fees) the chain paid `address`: every MINT and SETTLE of every block as the
    node answers them (GetBlock with transactions), summed here, independently of the explorer."""
    import grpc

    from aitbc.v1 import ledger_pb2, ledger_pb2_grpc

    receipts = minted = fees = 0
    with grpc.insecure_channel(ledger) as ch:
        stub = ledger_pb2_grpc.LedgerServiceStub(ch)
        head = stub.GetHead(ledger_pb2.GetHeadRequest(), timeout=10).head.height
        for h in range(1, head + 1):
            for t in stub.GetBlock(ledger_pb2.GetBlockRequest(height=h, include_transactions=True), timeout=10).transactions:
                if t.receipt_hash and t.provider == address:
                    receipts, minted, fees = receipts + 1, minted + t.mint_amount, fees + t.fee
    return receipts, minted, fees


def row_of(drv: Any, name: str) -> str:
    """The value of a field row (`<th>name</th><td>value</td>`) on the page."""
    return drv.find_element("xpath", f"//table[@class='fields']//tr[th[text()='{name}']]/td").text


def test_every_receipt_rule_vector_in_the_browser(tmp_path: Path) -> None:
    """The page's verifier (static/verify.js) answers each conformance case as docs/receipts.md says."""
    from aitbc.explorer.app import _static

    page = tmp_path / "verify.html"
    page.write_text("<!doctype html><meta charset='utf-8'><script>" + _static("verify.js").decode() + "</script>")
    drv = browser()
    try:
        drv.get(page.as_uri())
        cases = json.loads(RULES.read_text())["cases"]
        for c in cases:
            data = c["input"]["text"].encode() if "text" in c["input"] else bytes.fromhex(c["input"]["hex"])
            opts = c.get("options", {})
            got = drv.execute_script(
                "return AITBC.verifyReceiptBytes(Uint8Array.from(arguments[0]), "
                "{allowUnattested: arguments[1], attesters: arguments[2]})",
                list(data), bool(opts.get("allow_unattested")), opts.get("attesters") or [])
            if c["verdict"] == "valid":
                assert got["valid"], (c["name"], got)
            else:
                assert not got["valid"] and got["reason"].startswith(c["reason"]), (c["name"], c["reason"], got)
    finally:
        drv.quit()


def test_explorer_on_a_devnet_in_a_browser(tmp_path: Path) -> None:
    shots = Path(os.environ.get("AITBC_EXPLORER_SCREENSHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    home = tmp_path / "home"
    env = dict(os.environ, AITBC_HOME=str(home))
    port = free_port()
    proc, _ = start_devnet(env, tmp_path, extra=("--explorer-listen", f"127.0.0.1:{port}"))
    drv = browser()
    try:
        ep = json.loads((home / "devnet" / "endpoints.json").read_text())
        url = ep["explorer"].rstrip("/")
        assert url == f"http://127.0.0.1:{port}"
        r = aitbc(env, "submit", "a lighthouse at dusk", "--steps", "4", "--seed", "3", "-o", "light.png", cwd=tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
        job_id = [ln.split(":", 1)[1].strip() for ln in r.stdout.splitlines() if ln.startswith("job id:")][0]
        deadline = time.monotonic() + 60
        while "settlement FINAL" not in (r := aitbc(env, "receipts", "--job-id", job_id, "-o", "receipt.json",
                                                     cwd=tmp_path)).stderr:
            assert time.monotonic() < deadline, r.stderr
            time.sleep(0.5)
        receipt = json.loads((tmp_path / "receipt.json").read_text())
        rh = receipt["receipt_hash"]
        paid_fee = pay_for_a_job(env, ep, tmp_path)

        # the block list: a block made after the page opened appears without a reload
        drv.get(url + "/")
        top = int(drv.find_element("css selector", "#blocks tbody tr").get_attribute("data-height"))
        opened = time.monotonic()
        newer = wait_for(drv, lambda d: int(d.find_element("css selector", "#blocks tbody tr").get_attribute(
            "data-height")) > top)
        print(f"a new block appeared {time.monotonic() - opened:.2f} s after the page opened")
        assert newer
        shoot(drv, "blocks", shots)

        # search: a job id, a receipt hash, an address, a height, a transaction hash
        def search(q: str) -> str:
            before = drv.find_element("tag name", "h1")
            box = drv.find_element("name", "q")
            box.clear()
            box.send_keys(q)
            box.submit()
            wait_for(drv, lambda d: stale(before))  # the answer page replaced this one
            return wait_for(drv, lambda d: d.find_element("tag name", "h1").text)

        assert search(job_id).startswith("Receipt") and receipt["receipt"]["provider"] in drv.page_source
        assert "VALID" in drv.page_source
        shoot(drv, "receipt", shots)
        assert search(rh).startswith("Receipt")
        tx_link = drv.find_element("css selector", "a[href^='/tx/']").get_attribute("href")
        drv.get(tx_link)  # get() returns once the new page loaded
        assert drv.find_element("tag name", "h1").text.startswith("Transaction")
        shoot(drv, "transaction", shots)
        assert search(ep["miner_address"]).startswith("Account")
        shoot(drv, "account", shots)
        assert search("1") == "Block 1"
        shoot(drv, "block", shots)
        assert search("no-such-thing") == "Not found"

        # the market: the devnet's miner and its price
        drv.get(url + "/market")
        wait_for(drv, lambda d: ep["miner_address"] in d.page_source)
        assert "tiny-sd" in drv.page_source and "Recent fills" in drv.page_source  # MarketService: no API key
        fills = drv.find_elements("css selector", "#fills tbody tr")
        assert fills and "tile_steps" in fills[0].text  # the job submitted above
        assert len(drv.find_elements("css selector", ".charts svg")) == 3
        shoot(drv, "market", shots)

        # the miner page, reached from the market's miners table: the coordinator's record, what the chain paid
        drv.find_element("css selector", f"#miners a[href='/miner/{ep['miner_address']}']").click()
        wait_for(drv, lambda d: d.find_element("tag name", "h1").text.startswith("Miner"))
        receipts, minted, fees = chain_paid(ep["ledger"], ep["miner_address"])
        assert receipts >= 2 and fees >= paid_fee > 0  # the free job and the paid one
        page = drv.page_source
        assert f"{minted + fees:,} (minted + fees + slash rewards)" in page, (receipts, minted, fees)
        assert f"<td>{minted:,}</td>" in page and f"<td>{fees:,}</td>" in page
        served = int(row_of(drv, "jobs served").replace(",", ""))
        assert served >= receipts and "passed" in row_of(drv, "verifications") and row_of(drv, "connected now") == "yes"
        shoot(drv, "miner", shots)
        # the windows are plain links: 24 hourly bars, then 30 daily ones, each holding every receipt
        for window, bars in (("24 h", "24"), ("30 d", "30")):
            drv.find_element("link text", window).click()
            wait_for(drv, lambda d, w=window: d.find_elements("css selector", ".windows b") and
                     d.find_element("css selector", ".windows b").text == w)
            first = drv.find_element("css selector", ".charts figure")
            assert (first.get_attribute("data-bars"), first.get_attribute("data-sum")) == (bars, str(receipts))
        drv.get(url + "/?window=30d")
        assert [f.get_attribute("data-bars") for f in drv.find_elements("css selector", ".charts figure")] == ["120"] * 3
        shoot(drv, "charts-30d", shots)

        # a receipt file checked in the browser: VALID, then a one-character edit is INVALID with the CLI's reason
        drv.get(url + "/verify")
        drv.find_element("id", "file").send_keys(str(tmp_path / "receipt.json"))
        verdict = wait_for(drv, lambda d: d.find_element("id", "verdict").text)
        assert verdict.startswith(f"VALID receipt {rh}"), verdict
        shoot(drv, "verify", shots)
        text = (tmp_path / "receipt.json").read_text()
        units = f'"steps": {receipt["receipt"]["steps"]}'
        assert units in text
        (tmp_path / "edited.json").write_text(text.replace(units, units[:-1] + str((receipt["receipt"]["steps"] + 1) % 10)))
        cli = aitbc(env, "receipts", "verify", "edited.json", cwd=tmp_path)
        assert cli.returncode == 1 and cli.stdout.startswith("INVALID: "), cli.stdout + cli.stderr
        drv.get(url + "/verify")
        drv.find_element("id", "file").send_keys(str(tmp_path / "edited.json"))
        verdict = wait_for(drv, lambda d: d.find_element("id", "verdict").text)
        assert verdict == cli.stdout.strip().splitlines()[0], (verdict, cli.stdout)
    finally:
        drv.quit()
        stop_devnet(proc)
