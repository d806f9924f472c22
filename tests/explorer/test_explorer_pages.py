"""The explorer's pages over HTTP against a real ledger node (in this process): every page renders
from the chain, search finds each kind of key and says "not found" otherwise, the index follows
the chain and survives a restart, and new blocks reach live pages as server-sent events."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from aitbc.explorer.app import Explorer
from aitbc.ledger.client import LedgerClient
from aitbc.ledger.store import LmdbStore
from aitbc.server.ledger import start_node
from aitbc.v1 import ledger_pb2
from tests.ledger.helpers import ALICE, ATTESTER, AUTH, BOB, PROVIDER, genesis, receipt

pytestmark = pytest.mark.timeout(120)


class Site:
    def __init__(self, ledger: str, index_dir: Path, *, coordinator: str = "") -> None:
        self.ledger, self.index_dir, self.coordinator = ledger, index_dir, coordinator
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        self.explorer = Explorer(self.ledger, self.index_dir, coordinator=self.coordinator)
        self.runner = web.AppRunner(self.explorer.app())
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]

    async def stop(self) -> None:
        assert self.runner is not None
        await self.runner.cleanup()

    async def get(self, path: str, *, status: int = 200) -> str:
        async with aiohttp.ClientSession() as s, s.get(self.url + path, allow_redirects=True) as r:
            text = await r.text()
            assert r.status == status, (path, r.status, text[:500])
            return text


@pytest.fixture
async def chain(tmp_path: Path) -> Any:
    g = genesis(1, block_time_ms=200)
    store = LmdbStore(tmp_path / "ledger")
    node, server = await start_node(store, g, AUTH[0], "127.0.0.1:0")
    lc = LedgerClient(f"127.0.0.1:{server.port}")
    r = receipt(1, units=100, price=10)
    await lc.wait_for_tx(await lc.mint(ALICE, r), final=True)
    # a receipt whose strings are HTML: shown as text, never run (the provider signs what it likes)
    import dataclasses

    from aitbc.receipts import sign_receipt

    body = dataclasses.replace(receipt(2).body, client="<script>alert(1)</script>", model="<a onclick=x>m</a>")
    nasty = sign_receipt(body, PROVIDER).attest(ATTESTER)
    await lc.wait_for_tx(await lc.mint(ALICE, nasty), final=True)
    tx = await lc.transfer(PROVIDER, BOB.address, 250)
    await lc.wait_for_tx(tx, final=True)
    yield {"ledger": f"127.0.0.1:{server.port}", "receipt": r, "transfer": tx, "client": lc, "nasty": nasty}
    await lc.close()
    await node.stop()
    await server.stop(0)
    store.close()


async def until(predicate: Any, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)


async def test_pages_search_and_the_index(chain: dict[str, Any], tmp_path: Path) -> None:
    site = Site(chain["ledger"], tmp_path / "index")
    await site.start()
    try:
        head = (await chain["client"].get_head()).height
        await until(lambda: site.explorer.index.tip >= head)
        home = await site.get("/")
        assert "Latest blocks" in home and f"/block/{head}'" in home and "aitbc-test" in home
        r, tx = chain["receipt"], chain["transfer"]
        rh = r.receipt_hash.hex()
        # a receipt page by receipt hash and by job id: every body field, the MINT, the verdict
        for key in (rh, r.body.job_id):
            page = await site.get(f"/receipt/{key}")
            assert "VALID" in page and r.body.provider in page and ATTESTER.address in page and "MINT" in page
            assert all(name in page for name in r.body.to_dict())
        page = await site.get(f"/receipt/{chain['nasty'].receipt_hash.hex()}")
        assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
        assert "<a onclick" not in page and "&lt;a onclick=x&gt;" in page
        # the account page has the history from the index: the MINT to it and its transfer
        acct = await site.get(f"/account/{PROVIDER.address}")
        assert "<td>1,750</td>" in acct  # minted 1,000 and 1,000, sent 250
        assert tx in acct and "History" in acct
        assert tx in await site.get(f"/account/{BOB.address}")
        page = await site.get(f"/tx/{tx}")
        assert "TRANSFER" in page and BOB.address in page and "final" in page
        # search: each kind of key, and a clear not found
        assert f"Block {head}" in await site.get(f"/search?q={head}")
        assert "Transaction" in await site.get(f"/search?q={tx}")
        assert "Receipt" in await site.get(f"/search?q={rh}")
        assert "Receipt" in await site.get(f"/search?q={r.body.job_id}")
        assert "Account" in await site.get(f"/search?q={BOB.address}")
        assert "Not found" in await site.get("/search?q=" + "ab" * 32, status=404)
        assert "Not found" in await site.get("/search?q=nothing-like-this", status=404)
        assert "Not found" in await site.get("/block/999999", status=404)
        assert "checksum" in await site.get("/account/ait1qqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqq", status=404)
        tip = site.explorer.index.tip
    finally:
        await site.stop()
    # the index is kept: a restarted explorer starts from where it stopped, not from block 1
    site2 = Site(chain["ledger"], tmp_path / "index")
    await site2.start()
    try:
        assert site2.explorer.index.tip >= tip
        assert chain["transfer"] in await site2.get(f"/account/{BOB.address}")
    finally:
        await site2.stop()


async def test_new_blocks_reach_a_live_page_as_server_sent_events(chain: dict[str, Any], tmp_path: Path) -> None:
    site = Site(chain["ledger"], tmp_path / "index")
    await site.start()
    try:
        head = (await chain["client"].get_head()).height
        await until(lambda: site.explorer.index.tip >= head)
        seen: list[dict[str, Any]] = []
        finals: list[int] = []
        async with aiohttp.ClientSession() as s, s.get(site.url + "/events") as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            async with asyncio.timeout(20):
                async for line in r.content:
                    if line.startswith(b"data: ") and b"final_height" not in line:
                        seen.append(json.loads(line[6:]))
                        if len(seen) == 2:
                            break
                    elif line.startswith(b"data: "):
                        finals.append(json.loads(line[6:])["final_height"])
        assert seen[1]["height"] == seen[0]["height"] + 1 > head  # blocks made after the page opened
        assert {"hash", "proposer", "tx_count", "time_ms", "final"} <= seen[0].keys()
        assert finals and finals[-1] >= head - 1  # the finalized height travels too
        await until(lambda: not site.explorer.viewers)  # the closed page is forgotten (at the next block)
    finally:
        await site.stop()


async def test_plain_http_beyond_loopback_needs_public(tmp_path: Path) -> None:
    from aitbc.errors import FailedPrecondition
    from aitbc.explorer.app import run_explorer

    with pytest.raises(FailedPrecondition, match="refusing to serve plain HTTP on 0.0.0.0:0: beyond loopback pass --public"):
        await run_explorer("127.0.0.1:1", "0.0.0.0:0", tmp_path)


async def chain_paid(lc: LedgerClient, address: str) -> tuple[int, int, int]:
    """(receipts, minted, fees) paid to `address`, summed from the node's own answers: every block's
    MINT and SETTLE transactions (GetBlock with transactions), independently of the explorer."""
    receipts = minted = fees = 0
    head = (await lc.get_head()).height
    for h in range(1, head + 1):
        resp = await lc.stub.GetBlock(ledger_pb2.GetBlockRequest(height=h, include_transactions=True))
        for t in resp.transactions:
            if t.receipt_hash and t.provider == address:
                receipts, minted, fees = receipts + 1, minted + t.mint_amount, fees + t.fee
    return receipts, minted, fees


def figures(page: str) -> list[tuple[int, str]]:
    """(bars, sum) of each chart on a page (the figure's data attributes)."""
    import re

    return [(int(n), s) for n, s in re.findall(r"<figure data-bars='(\d+)' data-sum='([^']*)'>", page)]


async def test_a_miner_page_shows_what_the_chain_paid_it(chain: dict[str, Any], tmp_path: Path) -> None:
    from tests.ledger.economy_helpers import CLIENT, quote_for, text_receipt

    lc: LedgerClient = chain["client"]
    g = await lc.get_genesis()
    # a paid job: the client funds an escrow with the attester, which settles the receipt with the quote's fee
    await lc.wait_for_tx(await lc.mint(ALICE, text_receipt(40, provider=CLIENT, price=100)))
    await lc.wait_for_tx(await lc.escrow_deposit(CLIENT, ATTESTER.address, 1000))
    paid = text_receipt(41, provider=PROVIDER, price=9)
    quote = quote_for(g, paid, price=5, fee=7)
    await lc.settle_receipt(ATTESTER, paid, quote=quote, wait="final")
    receipts, minted, fees = await chain_paid(lc, PROVIDER.address)
    assert (receipts, fees) == (3, quote.total) and minted == 1000 + 1000 + 50 * 9  # the chain's own figures
    site = Site(chain["ledger"], tmp_path / "index")
    await site.start()
    try:
        head = (await lc.get_head()).height
        await until(lambda: site.explorer.index.tip >= head)
        page = await site.get(f"/miner/{PROVIDER.address}")
        assert f"<td>{minted + fees:,} (minted + fees + slash rewards)</td>" in page
        assert f"<td>{minted:,}</td>" in page and f"<td>{fees:,}</td>" in page and f"<td>{receipts:,} (" in page
        assert "Not offering" not in page  # no coordinator: nothing claimed about offers
        for window, bars in (("24h", 24), ("30d", 30)):
            shown = figures(await site.get(f"/miner/{PROVIDER.address}?window={window}"))
            assert shown == [(bars, str(receipts)), (bars, str(minted + fees))], (window, shown)
        acct = await site.get(f"/account/{PROVIDER.address}")
        assert "Earnings as a provider" in acct and f"/miner/{PROVIDER.address}" in acct
        assert "Earnings as a provider" not in await site.get(f"/account/{BOB.address}")  # paid by a transfer only
        assert "Not found" in await site.get(f"/miner/{BOB.address}", status=404)
        assert "checksum" in await site.get("/miner/ait1qqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqq", status=404)
        # the chain's charts over three windows: every transaction is in each (the chain is minutes old)
        txs = all_receipts = 0
        for h in range(1, head + 1):
            resp = await lc.stub.GetBlock(ledger_pb2.GetBlockRequest(height=h, include_transactions=True))
            txs += resp.block.header.tx_count
            all_receipts += sum(1 for t in resp.transactions if t.receipt_hash)
        assert all_receipts == 4  # the fixture's two, the client's funding, the paid job
        for window, bars in (("1h", 60), ("24h", 96), ("30d", 120)):
            shown = figures(await site.get(f"/?window={window}"))
            assert [n for n, _ in shown] == [bars] * 3 and shown[1][1] == str(txs), (window, shown)
            market = figures(await site.get(f"/market?window={window}"))
            assert market[0] == (bars, str(all_receipts)) and market[2] == (bars, str(fees)), (window, market)
        assert "window must be one of 1h, 24h, 30d" in await site.get("/?window=7d", status=400)
        top = await site.get("/market")
        assert top.index(f"/miner/{CLIENT.address}") < top.index(f"/miner/{PROVIDER.address}")  # 5,000 before 2,707
    finally:
        await site.stop()
    # a restarted explorer keeps the earnings (and resumes from its tip, not from block 1)
    site2 = Site(chain["ledger"], tmp_path / "index")
    await site2.start()
    try:
        assert site2.explorer.index.tip >= head
        assert f"<td>{minted + fees:,} (minted + fees + slash rewards)</td>" in await site2.get(f"/miner/{PROVIDER.address}")
    finally:
        await site2.stop()


async def test_a_miner_page_with_the_coordinators_record(chain: dict[str, Any], tmp_path: Path, network_factory: Any,
                                                         null_backend: Any) -> None:
    """A real coordinator and miner: the miner page has its record (jobs served, verifications) and
    offer from GetMarket beside what the chain paid it; the market's miners table links to it.
    Miner pages fetch records within the explorer's own budget (under the coordinator's per-host
    limit), so views of many miner pages never turn into RESOURCE_EXHAUSTED for the market."""
    from aitbc.limits import TokenBucket
    from tests.coordinator.test_jobs_api import MD, image_job, stub, wait_done
    from tests.ledger.helpers import key
    from tests.ledger.helpers import receipt as make_receipt

    lc: LedgerClient = chain["client"]
    net = await network_factory()
    await net.add_miner({"null": null_backend}, price=3, key=PROVIDER)  # the chain's provider serves here
    s = stub(net)
    await wait_done(s, (await s.SubmitJob(image_job("a secret prompt", model="null", steps=5, seed=1),
                                          metadata=MD)).job.job_id)
    others = [key(200 + i) for i in range(25)]  # providers the chain paid that this coordinator never saw
    for i, k in enumerate(others):
        last = await lc.mint(ALICE, make_receipt(300 + i, provider=k))
    await lc.wait_for_tx(last)
    site = Site(chain["ledger"], tmp_path / "index", coordinator=net.address)
    await site.start()
    try:
        head = (await lc.get_head()).height
        await until(lambda: site.explorer.index.tip >= head)
        page = await site.get(f"/miner/{PROVIDER.address}")
        assert "Record (coordinator)" in page and "<th>jobs served</th><td>1</td>" in page
        assert "<th>connected now</th><td>yes</td>" in page and "<th>price per unit</th><td>3</td>" in page
        assert "<td>2,000 (minted + fees + slash rewards)</td>" in page  # the fixture's two MINTs
        assert "a secret prompt" not in page and "alice" not in page
        market = await site.get("/market")
        assert f"<td><a href='/miner/{PROVIDER.address}'>" in market.split("id='miners'")[1].split("</table>")[0]
        # 25 more miner pages at once, on a frozen clock: the explorer's budget of record calls (6) is
        # spent, the rest say so, none gets the coordinator's refusal
        site.explorer._records = TokenBucket(3.0, 6, lambda: 0.0)
        pages = [await site.get(f"/miner/{k.address}") for k in others]
        fetched = [p for p in pages if "<th>connected now</th><td>no</td>" in p or "Record (coordinator)" in p]
        assert not any("RESOURCE_EXHAUSTED" in p for p in pages)
        assert sum("not fetched right now" in p for p in pages) == 25 - 6 and len(fetched) == 0  # never seen
        assert "Not offering on the coordinator now" in pages[0] and "<td>1,000 (minted" in pages[0]
        assert "RESOURCE_EXHAUSTED" not in await site.get("/market")
    finally:
        await site.stop()


async def test_a_page_that_never_reads_loses_its_connection_and_counts_until_then(
        chain: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that opens /events and never reads fills its socket buffers; once its queue fills
    it is no longer told of blocks, but its handler is still in a write. That write ends within
    EVENTS_WRITE_TIMEOUT_S with the connection, and until then the connection counts against
    MAX_VIEWERS: never-reading clients cannot hold more connections than the cap."""
    import socket

    from aitbc.explorer import app as explorer_app

    monkeypatch.setattr(explorer_app, "MAX_VIEWERS", 2)
    monkeypatch.setattr(explorer_app, "EVENTS_WRITE_TIMEOUT_S", 8.0)  # margin for a loaded box
    site = Site(chain["ledger"], tmp_path / "index")
    await site.start()
    port = int(site.url.rsplit(":", 1)[1])
    stuck: list[socket.socket] = []
    try:
        for _ in range(2):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # its buffers fill fast
            sock.connect(("127.0.0.1", port))
            sock.sendall(b"GET /events HTTP/1.1\r\nHost: explorer\r\n\r\n")
            stuck.append(sock)
        await until(lambda: len(site.explorer.viewers) == 2)
        big = "x" * 256 * 1024  # events this big fill a page's buffers within a few
        for i in range(2000):  # bounded: both are dropped once their queues are full
            if not site.explorer.viewers:
                break
            site.explorer._publish({"height": 10**6 + i, "filler": big})
            await asyncio.sleep(0.005)  # each handler takes what it can and blocks in its write
        assert not site.explorer.viewers  # dropped as too slow: no longer told of blocks...
        # ...but their handlers, stuck in a write, still hold their connections: a third page waits
        async with aiohttp.ClientSession() as s, s.get(site.url + "/events") as r:
            assert r.status == 503 and r.headers["Retry-After"] == "5"
        # the stuck writes end, with the connections: the server closed them, not the client
        await until(lambda: site.explorer.live_pages == 0)
        for sock in stuck:
            sock.settimeout(10)
            ended = False
            for _ in range(100_000):  # what the kernel still held, then the end
                try:
                    if not sock.recv(1 << 20):
                        ended = True
                        break
                except ConnectionResetError:
                    ended = True
                    break
            assert ended
        # and a page that reads is served again
        async with aiohttp.ClientSession() as s, s.get(site.url + "/events") as r:
            assert r.status == 200
            assert (await r.content.readline()).startswith(b"retry:")
    finally:
        for sock in stuck:
            sock.close()
        await site.stop()
