"""The explorer: a read-only web app over a ledger node (and optionally a coordinator).

A server-side app (docs/explorer.md says why): it is a gRPC client of the node and the coordinator,
renders every page as HTML on the server (readable without JavaScript), keeps its own LMDB index
(aitbc.explorer.index) fed by StreamBlocks, and pushes new blocks to open pages as server-sent
events. It holds no key. Receipt files dropped on /verify are checked in the browser by
static/verify.js, from docs/receipts.md alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import grpc
from aiohttp import web

from aitbc import crypto, errors, receipts, rpc
from aitbc.explorer.index import HOUR, MINUTE, Bucket, Earnings, ExplorerIndex, IndexReset, ProviderBucket
from aitbc.ledger.client import LedgerClient
from aitbc.ledger.genesis import Genesis
from aitbc.ledger.tx import KIND_NAMES, decode_tx
from aitbc.limits import Backoff, TokenBucket
from aitbc.v1 import coordinator_pb2, coordinator_pb2_grpc, job_pb2, ledger_pb2

B = TypeVar("B", Bucket, ProviderBucket)  # a series' bucket: the chain's or a provider's

log = logging.getLogger("aitbc.explorer")
PAGE_BLOCKS = 20
MAX_VIEWERS = 1000  # live pages at once; more are told to reload later (503)
VIEWER_QUEUE = 64  # blocks a slow viewer may lag before it is dropped (its page reconnects)
# a write to a live page that the page does not take within this ends its connection: a client that
# never reads would otherwise hold its handler (and its connection) for ever once its buffers are full
EVENTS_WRITE_TIMEOUT_S = 30.0
_HEX64 = re.compile(r"\A[0-9a-f]{64}\Z")
_HEIGHT = re.compile(r"\A[0-9]{1,20}\Z")  # ASCII digits (\d and isdigit() take any script's), uint64's at most
_JOB_ID = re.compile(r"\A[\x21-\x7e]{1,256}\Z")  # any job id a receipt may carry (this network: 28 hex)
esc = html.escape
# chart windows: the series they read, seconds per bar, bars (the index keeps minutes for 24 h, hours for 30 d)
WINDOWS = {"1h": (MINUTE, 60, 60), "24h": (MINUTE, 900, 96), "30d": (HOUR, 21_600, 120)}
MINER_WINDOWS = {"24h": (3600, 24), "30d": (86_400, 30)}  # a provider's series is hourly, kept 30 days
MARKET_CACHE_S = 1.0  # GetMarket is budgeted per calling host (5/s): page views within this share one answer
MARKET_CACHE_ENTRIES = 1024  # answers kept at once (the market, and miner pages' answers)
# GetMarket(miner_id) calls a second (burst) for miner pages, beside the shared answer's one a second:
# together under the coordinator's 5/s per host, so views of many miner pages cannot exhaust the
# explorer's budget and take the market page down with them
RECORD_RATE_PER_S, RECORD_BURST = 3.0, 6


def _static(name: str) -> bytes:
    return resources.files("aitbc.explorer").joinpath("static", name).read_bytes()


class Explorer:
    def __init__(self, ledger: str, index_dir: str | Path, *, coordinator: str = "") -> None:
        self.ledger = LedgerClient(ledger, timeout=5.0)
        self.index = ExplorerIndex(index_dir)
        self.coordinator = coordinator
        self.viewers: set[asyncio.Queue[dict[str, Any]]] = set()  # the pages told of new blocks
        # /events handlers running: what MAX_VIEWERS counts, so a page dropped from `viewers` as too slow
        # counts until its handler ends (its last write done, or timed out and its connection closed)
        self.live_pages = 0
        self.tasks: list[asyncio.Task[None]] = []
        # the latest blocks as the stream brought them (height -> summary): the block list is drawn
        # from them without asking the node for each block again
        self.recent: dict[int, dict[str, Any]] = {}
        self.genesis: Genesis | None = None  # the node's: the index pays receipts and cuts stake by its rules
        self._market: dict[str, tuple[float, coordinator_pb2.GetMarketResponse]] = {}  # miner_id -> (when, answer)
        self._records = TokenBucket(RECORD_RATE_PER_S, RECORD_BURST, time.monotonic)

    # ---- following the chain ---------------------------------------------------------------------

    async def follow(self) -> None:
        """Index every canonical block and push each new one to the open pages; reconnect on loss."""
        backoff = Backoff(0.5, 5.0)  # full jitter, as every retry loop here
        while True:
            try:
                if self.genesis is None:
                    self.genesis = await self.ledger.get_genesis()
                req = ledger_pb2.StreamBlocksRequest(from_height=self.index.tip + 1)
                async for resp in self.ledger.stub.StreamBlocks(req):
                    raws = [b.raw for b in resp.blocks]
                    self.index.add_blocks(raws, self.genesis, final=resp.finalized_height)
                    for b in resp.blocks:
                        summary = _block_summary(b.header, b.final or b.header.height <= resp.finalized_height)
                        self._remember(summary)
                        self._publish(summary)
                    for summary in self.recent.values():
                        summary["final"] = summary["final"] or summary["height"] <= resp.finalized_height
                    self._publish({"final_height": resp.finalized_height})  # pages mark older rows final
                    backoff.reset()
            except grpc.aio.AioRpcError as exc:
                log.warning("ledger stream: %s: %s; reconnecting", exc.code().name, exc.details())
            except errors.AitbcError as exc:  # GetGenesis (LedgerClient maps its status)
                log.warning("ledger genesis: %s; reconnecting", exc.message)
            except IndexReset as exc:
                log.error("explorer index: %s", exc)
                self.recent.clear()
            await asyncio.sleep(backoff.next())

    def _remember(self, summary: dict[str, Any]) -> None:
        h = summary["height"]
        for old in [k for k in self.recent if k >= h or k <= h - PAGE_BLOCKS]:  # a reorg resends from the fork
            del self.recent[old]
        self.recent[h] = summary

    def _publish(self, summary: dict[str, Any]) -> None:
        for q in list(self.viewers):
            if q.full():
                self.viewers.discard(q)  # too slow: its page reconnects and reloads the list
                continue
            q.put_nowait(summary)

    # ---- pages -------------------------------------------------------------------------------------

    async def home(self, request: web.Request) -> web.Response:
        window = request.query.get("window", "24h")
        if window not in WINDOWS:
            return _bad_window(window, WINDOWS)
        head = await self.ledger.stub.GetHead(ledger_pb2.GetHeadRequest(), timeout=5)
        top = head.head.height
        if top in self.recent:  # the stream is at the head: the blocks are here already
            summaries = [self.recent[h] for h in sorted(self.recent, reverse=True)]
        else:  # still catching up (or the stream is behind): ask the node
            summaries = []
            for h in range(top, max(0, top - PAGE_BLOCKS), -1):
                b = (await self.ledger.stub.GetBlock(ledger_pb2.GetBlockRequest(height=h), timeout=5)).block
                summaries.append(_block_summary(b.header, b.final))
        rows = [_block_row(x) for x in summaries]
        supply = ""
        with contextlib.suppress(grpc.aio.AioRpcError):
            s = await self.ledger.stub.GetSupply(ledger_pb2.GetSupplyRequest(), timeout=5)
            supply = (f"<p>Supply {s.supply:,} (minted {s.minted:,}, burned {s.burned:,}); staked {s.staked:,}, "
                      f"unbonding {s.unbonding:,}, escrowed {s.escrowed:,}</p>")
        pts, step = self._chain_points(window)
        span = f"{_span(window)}, a bar per {_span_s(step)}"
        supply += _windows(window, WINDOWS) + "<div class='charts'>" + "".join((
            _bars([b.gap_ms / b.gaps / 1000 if b.gaps else 0.0 for b in pts], f"mean seconds between blocks, {span}"),
            _bars([float(b.txs) for b in pts], f"transactions, {span}"),
            _bars([float(b.minted) for b in pts], f"minted, {span}"))) + "</div>"
        body = (f"<p>Chain <b>{esc(head.chain_id)}</b>, head <a href='/block/{top}'>{top}</a>, final "
                f"{head.finalized_height}, {len(head.authorities)} authorities, blocks every "
                f"{head.block_time_ms / 1000:g} s.</p>{supply}"
                "<h2>Latest blocks</h2><table id='blocks'><thead><tr><th>height</th><th>time</th><th>proposer</th>"
                f"<th>txs</th><th>final</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
                "<script src='/static/explorer.js'></script>")
        return _page("Blocks", body)

    async def block(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        req = ledger_pb2.GetBlockRequest(include_transactions=True)
        if (height := _height(key)) is not None:
            req.height = height
        elif _HEX64.match(key):
            req.hash = key
        else:
            return _not_found(f"'{key}' is neither a block height nor a block hash")
        try:
            resp = await self.ledger.stub.GetBlock(req, timeout=5)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                return _not_found(f"no block {key} on this chain")
            raise
        b, h = resp.block, resp.block.header
        fields = [("height", h.height), ("hash", h.hash), ("parent", Safe(f"<a href='/block/{esc(h.parent_hash)}'>{esc(h.parent_hash)}</a>")
                   if h.height > 1 else h.parent_hash), ("time", _time(h.timestamp_ms)), ("slot", h.slot),
                  ("proposer", _addr(h.proposer)), ("tx root", h.tx_root), ("state root", h.state_root),
                  ("authority set chain", h.set_chain),
                  ("transactions", h.tx_count), ("final", "yes" if b.final else "not yet"),
                  ("finality certificate", f"{len(b.certificate)} bytes (votes of more than 2/3 of the authorities)"
                   if b.certificate else "none held by this node")]
        txs = "".join(_tx_row(t) for t in resp.transactions)
        body = (_fields(fields) + "<h2>Transactions</h2><table><thead><tr><th>hash</th><th>kind</th><th>from</th>"
                f"<th>detail</th></tr></thead><tbody>{txs}</tbody></table>")
        return _page(f"Block {h.height}", body)

    async def tx(self, request: web.Request) -> web.Response:
        key = request.match_info["hash"]
        if not _HEX64.match(key):
            return _not_found(f"'{key}' is not a transaction hash (64 lower-case hex)")
        try:
            r = await self.ledger.stub.GetTransaction(ledger_pb2.GetTransactionRequest(hash=key), timeout=5)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return _not_found(f"no transaction {key} on this chain")
            raise
        t = r.transaction
        status = ledger_pb2.TransactionStatus.Name(r.status).removeprefix("TRANSACTION_STATUS_").lower()
        fields = [("hash", t.hash), ("kind", _kind(t.kind)), ("status", status),
                  ("block", Safe(f"<a href='/block/{r.block_height}'>{r.block_height}</a> (index {r.index})")
                   if r.block_height else "-"),
                  ("sender", _addr(t.sender)), ("nonce", t.nonce)]
        fields += [(n, _addr(v) if n in ("to", "provider", "attester", "client", "slashed") else v) for n, v in (
            ("to", t.to), ("amount", t.amount), ("provider", t.provider), ("minted", t.mint_amount), ("fee", t.fee),
            ("client", t.client_address), ("attester", t.attester), ("slashed", t.slashed_provider)) if v]
        if t.receipt_hash:
            fields.append(("receipt", Safe(f"<a href='/receipt/{esc(t.receipt_hash)}'>{esc(t.receipt_hash)}</a>")))
        fields.append(("bytes", f"{len(t.raw)} (canonical encoding, docs/ledger.md)"))
        return _page(f"Transaction {t.hash[:16]}...", _fields(fields))

    async def account(self, request: web.Request) -> web.Response:
        address = request.match_info["address"]
        try:
            account_id = crypto.validate_address(address)
        except errors.CryptoError as exc:
            return _not_found(exc.message)
        a = await self.ledger.stub.GetAccount(ledger_pb2.GetAccountRequest(address=address), timeout=5)
        before = _cursor(request.query.get("before", ""))
        items, nxt = self.index.history(account_id, before=before)
        rows = "".join(f"<tr><td><a href='/block/{h}'>{h}</a></td><td class='hash'><a href='/tx/{t}'>{t}</a></td></tr>"
                       for h, t in items)
        more = f"<p><a href='/account/{address}?before={nxt[0]}.{nxt[1]}'>older</a></p>" if nxt else ""
        fields = [("address", address), ("balance", f"{a.balance:,}"), ("nonce", a.nonce), ("staked", f"{a.staked:,}"),
                  ("unbonding", f"{a.unbonding:,}" + (f" (unlocks at height {a.unlock_height})" if a.unbonding else ""))]
        fields += [(f"escrow for {e.attester}", f"{e.available:,} available, {e.unlocking:,} unlocking") for e in a.escrows]
        earned = self.index.earnings(account_id)
        paid = ""
        if _is_provider(earned):
            paid = (f"<h2>Earnings as a provider (on chain)</h2>{_earnings(earned)}<p><a href='/miner/{esc(address)}'>"
                    "its miner page</a> (jobs served, verifications, earnings over time)</p>")
        body = (_fields(fields) + paid + f"<h2>History</h2><table><thead><tr><th>block</th><th>transaction</th></tr></thead>"
                f"<tbody>{rows}</tbody></table>{more}")
        return _page(f"Account {address[:14]}...", body)

    async def receipt(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        rh = key if _HEX64.match(key) else (self.index.job_receipt(key) if _JOB_ID.match(key) else None)
        tx_hash = self.index.receipt_tx(bytes.fromhex(rh)) if rh else None
        if tx_hash is None:
            return _not_found(f"no receipt {key} was minted on this chain (a receipt hash or a job id)")
        r = await self.ledger.stub.GetTransaction(ledger_pb2.GetTransactionRequest(hash=tx_hash), timeout=5)
        t = decode_tx(r.transaction.raw)
        assert t.receipt is not None
        try:  # the chain accepted it, so it verifies: shown anyway, computed here from the bytes
            receipts.verify_receipt(t.receipt, require_attestation=True)
            verdict = "VALID: the provider's signature and the attestation verify (docs/receipts.md)"
        except errors.ReceiptError as exc:
            verdict = f"INVALID: {exc.message}"
        status = ledger_pb2.TransactionStatus.Name(r.status).removeprefix("TRANSACTION_STATUS_").lower()
        body_fields = [(k, _addr(v) if k == "provider" else v) for k, v in t.receipt.body.to_dict().items()]
        fields = [("receipt hash", t.receipt.receipt_hash.hex()), ("verdict", verdict),
                  ("attester", _addr(t.receipt.attester)),
                  ("paid by", Safe(f"<a href='/tx/{tx_hash}'>{_kind(r.transaction.kind)} {tx_hash[:16]}...</a> in "
                                   f"block <a href='/block/{r.block_height}'>{r.block_height}</a> ({esc(status)})")),
                  ("minted", f"{r.transaction.mint_amount:,}")]
        if r.transaction.fee:
            fields.append(("client fee", f"{r.transaction.fee:,} (quote {r.transaction.quote_hash})"))
        file_json = json.dumps(t.receipt.to_json_dict(), indent=2, sort_keys=True)
        body = (_fields(fields) + "<h2>Body</h2>" + _fields(body_fields) +
                f"<h2>Receipt file</h2><pre id='receipt-file'>{esc(file_json)}</pre>")
        return _page(f"Receipt {t.receipt.receipt_hash.hex()[:16]}...", body)

    async def verify_page(self, request: web.Request) -> web.Response:
        body = ("<p>Drop a receipt file (JSON) here, or choose one: it is checked in this browser against "
                "docs/receipts.md (canonical hash, the provider's signature, the attestation); nothing is sent "
                "to any server.</p><div id='drop' class='drop'>drop a receipt file here</div>"
                "<p><input type='file' id='file' accept='.json,application/json'> "
                "<label><input type='checkbox' id='unattested'> allow unattested</label></p>"
                "<pre id='verdict' aria-live='polite'></pre>"
                "<script src='/static/verify.js'></script><script src='/static/explorer.js'></script>")
        return _page("Verify a receipt", body)

    def _cached(self, miner_id: str) -> coordinator_pb2.GetMarketResponse | None:
        hit = self._market.get(miner_id)
        return hit[1] if hit is not None and time.monotonic() - hit[0] < MARKET_CACHE_S else None

    async def get_market(self, miner_id: str = "") -> coordinator_pb2.GetMarketResponse:
        """GetMarket (public, no API key; with miner_id, that miner's record too), one answer per
        question shared by the page views of MARKET_CACHE_S."""
        hit = self._cached(miner_id)
        if hit is not None:
            return hit
        now = time.monotonic()
        async with rpc.channel(self.coordinator) as ch:
            m = await coordinator_pb2_grpc.MarketServiceStub(ch).GetMarket(
                coordinator_pb2.GetMarketRequest(miner_id=miner_id), timeout=5)
        if len(self._market) >= MARKET_CACHE_ENTRIES:
            self._market = {k: v for k, v in self._market.items() if now - v[0] < MARKET_CACHE_S}
        if len(self._market) < MARKET_CACHE_ENTRIES:
            self._market[miner_id] = (now, m)
        return m

    async def market(self, request: web.Request) -> web.Response:
        window = request.query.get("window", "24h")
        if window not in WINDOWS:
            return _bad_window(window, WINDOWS)
        pts, step = self._chain_points(window)
        span = f"{_span(window)}, a bar per {_span_s(step)}"
        charts = _windows(window, WINDOWS) + "<div class='charts'>" + "".join((
            _bars([float(b.receipts) for b in pts], f"jobs paid on chain (MINT and SETTLE), {span}"),
            _bars([b.price_sum / b.receipts if b.receipts else 0.0 for b in pts], f"mean price per unit paid, {span}"),
            _bars([float(b.fees) for b in pts], f"client fees paid, {span}"))) + "</div>"
        top = "".join(
            f"<tr><td><a href='/miner/{_address(a)}'>{_address(a)}</a></td><td>{e.receipts:,}</td><td>{e.minted:,}</td>"
            f"<td>{e.fees:,}</td><td>{e.slash_rewards:,}</td><td>{e.earned:,}</td><td>{e.slashed:,}</td>"
            f"<td><a href='/block/{e.last_height}'>{e.last_height}</a></td></tr>" for a, e in self.index.top_earners(25))
        earners = ("<h2>Top earners (on chain)</h2><table id='earners'><thead><tr><th>provider</th><th>receipts</th>"
                   "<th>minted</th><th>fees</th><th>slash rewards</th><th>earned</th><th>slashed</th><th>last paid</th>"
                   f"</tr></thead><tbody>{top}</tbody></table>")
        if not self.coordinator:
            return _page("Market", "<p>This explorer was started without --coordinator: no offers or demand, only "
                         f"what the chain paid.</p>{charts}{earners}")
        try:
            m = await self.get_market()
        except grpc.aio.AioRpcError as exc:
            return _page("Market", f"<p>The coordinator answered {esc(exc.code().name)}: {esc(exc.details() or '')}</p>"
                         f"{charts}{earners}", status=503)
        kind = lambda k: esc(job_pb2.ModelKind.Name(k).removeprefix("MODEL_KIND_").lower()) if k else "-"  # noqa: E731
        mrows = "".join(
            f"<tr><td>{esc(x.name)}</td><td>{kind(x.kind)}</td><td>{x.miners}</td><td>{x.free_slots}/{x.slots}</td>"
            f"<td>{x.min_price_per_unit}-{x.max_price_per_unit}</td><td>{x.queued}</td><td>{x.queued_paid}</td>"
            f"<td>{x.best_fee_per_unit_micro / 1e6:g}</td>"
            f"<td>{f'{x.service_p50_ms / 1000:.2f} s' if x.service_p50_ms else '-'}</td></tr>"
            for x in m.models)
        orows = []
        for o in m.offers:
            e = self._earnings_of(o.miner_id)
            orows.append(
                f"<tr><td>{_miner(o.miner_id)}</td><td>{esc(', '.join(o.models))}</td><td>{o.price_per_unit}</td>"
                f"<td>{o.free_slots}/{o.max_concurrency}</td><td>{o.reputation:.2f}</td><td>{o.jobs_served}</td>"
                f"<td>{_pass_rate(o)}</td><td>{o.staked:,}</td><td>{esc(o.device_class or '-')}</td>"
                f"<td>{e.earned if e else 0:,}</td></tr>")
        frows = "".join(
            f"<tr><td>{_time(f.finished_at_unix_ms)}</td><td>{esc(f.model)}</td><td>{f.units} {esc(f.unit_type)}</td>"
            f"<td>{f.price_per_unit}</td><td>{f.fee}</td><td>{f.duration_ms / 1000:.2f} s</td><td>{_miner(f.miner_id)}</td>"
            "</tr>" for f in m.recent_fills[:25])
        body = (f"<p>{m.queued} jobs queued; {len(m.offers)} miners offering.</p>{charts}"
                "<h2>Models: supply and demand</h2><table id='models'><thead><tr><th>model</th><th>kind</th>"
                "<th>miners</th><th>free slots</th><th>price/unit</th><th>queued</th><th>paid</th>"
                f"<th>best fee/unit</th><th>service p50</th></tr></thead><tbody>{mrows}</tbody></table>"
                "<h2>Miners offering now</h2><table id='miners'><thead><tr><th>miner</th><th>models</th><th>price/unit</th>"
                "<th>free</th><th>reputation</th><th>served</th><th>verified ok</th><th>stake</th><th>device</th>"
                f"<th>earned (chain)</th></tr></thead><tbody>{''.join(orows)}</tbody></table>{earners}"
                "<h2>Recent fills</h2><table id='fills'><thead><tr><th>finished</th><th>model</th><th>units</th>"
                "<th>price/unit</th><th>fee</th><th>took</th><th>miner</th></tr></thead>"
                f"<tbody>{frows}</tbody></table>")
        return _page("Market", body)

    async def miner(self, request: web.Request) -> web.Response:
        """One miner: what the chain paid it (the index) and, from the coordinator, its offer, jobs
        served and verifications; its earnings per hour or day."""
        address = request.match_info["address"]
        try:
            account_id = crypto.validate_address(address)
        except errors.CryptoError as exc:
            return _not_found(exc.message)
        window = request.query.get("window", "30d")
        if window not in MINER_WINDOWS:
            return _bad_window(window, MINER_WINDOWS)
        earned = self.index.earnings(account_id)
        offer, record, fills, note = None, None, [], ""
        if self.coordinator:
            try:
                m = await self.get_market()  # the shared answer: offers and fills
                offer = next((o for o in m.offers if o.miner_id == address), None)
                fills = [f for f in m.recent_fills if f.miner_id == address]
                if offer is None:
                    note = "<p>Not offering on the coordinator now (not connected, or quarantined).</p>"
                # its record: only for a miner the chain paid or that offers (not for any address a
                # visitor makes up), and within the explorer's own budget of such calls
                if _is_provider(earned) or offer is not None:
                    if self._cached(address) is None and self._records.take():
                        note += ("<p>The coordinator's record of this miner is not fetched right now (many miner "
                                 "pages asked for at once): reload in a moment.</p>")
                    else:
                        r = await self.get_market(address)
                        record = r.miner if r.HasField("miner") else None
            except grpc.aio.AioRpcError as exc:
                note += f"<p>The coordinator answered {esc(exc.code().name)}: {esc(exc.details() or '')}</p>"
        if not _is_provider(earned) and offer is None:
            return _not_found(f"no miner {address}: the chain never paid it and it offers nothing on the coordinator")
        parts = [_fields([("address", _addr(address))])]
        if record is not None:
            parts.append("<h2>Record (coordinator)</h2>" + _fields([
                ("jobs served", f"{record.jobs_served:,}"),
                ("verifications", f"{record.verifications_passed:,} passed, {record.verifications_failed:,} failed"),
                ("verification pass rate", _pass_rate(record)), ("failed jobs, stalls", f"{record.failures:,}, "
                                                                 f"{record.stalls:,}"),
                ("reputation", f"{record.reputation:.3f}"), ("quarantined", "yes" if record.quarantined else "no"),
                ("connected now", "yes" if record.connected else "no")]))
        if offer is not None:
            parts.append("<h2>Offer (coordinator)</h2>" + _fields([
                ("models", ", ".join(offer.models)), ("price per unit", offer.price_per_unit),
                ("free slots", f"{offer.free_slots}/{offer.max_concurrency}"), ("device", offer.device_class or "-"),
                ("stake (as the coordinator read it)", f"{offer.staked:,}")]))
        parts.append(note)
        step, n = MINER_WINDOWS[window]
        pts = self._provider_points(account_id, step, n)
        span = f"{_span(window)}, a bar per {_span_s(step)}"
        parts.append("<h2>Earnings (on chain)</h2>" + (_earnings(earned) if earned else "<p>Never paid yet.</p>") +
                     _windows(window, MINER_WINDOWS) + "<div class='charts'>" +
                     _bars([float(b.receipts) for b in pts], f"receipts paid, {span}") +
                     _bars([float(b.minted + b.fees) for b in pts], f"earned (minted + fees), {span}") + "</div>")
        if fills:
            parts.append("<h2>Its recent fills</h2><table id='miner-fills'><thead><tr><th>finished</th><th>model</th>"
                         "<th>units</th><th>price/unit</th><th>fee</th><th>took</th></tr></thead><tbody>" + "".join(
                             f"<tr><td>{_time(f.finished_at_unix_ms)}</td><td>{esc(f.model)}</td><td>{f.units} "
                             f"{esc(f.unit_type)}</td><td>{f.price_per_unit}</td><td>{f.fee}</td>"
                             f"<td>{f.duration_ms / 1000:.2f} s</td></tr>" for f in fills[:25]) + "</tbody></table>")
        parts.append(f"<p><a href='/account/{esc(address)}'>its account</a> (balance, every transaction)</p>")
        return _page(f"Miner {address[:14]}...", "".join(parts))

    def _earnings_of(self, address: str) -> Earnings | None:
        try:
            return self.index.earnings(crypto.validate_address(address))
        except errors.CryptoError:
            return None

    def _chain_points(self, window: str) -> tuple[list[Bucket], int]:
        """The window's bars from the index's series, ending with the newest indexed block."""
        res, step, n = WINDOWS[window]
        return self._bars(lambda start, end: self.index.series(res, start, end), Bucket(), step, n), step

    def _provider_points(self, account_id: bytes, step: int, n: int) -> list[ProviderBucket]:
        return self._bars(lambda start, end: self.index.provider_series(account_id, start, end),
                          ProviderBucket(), step, n)

    def _bars(self, series: Callable[[int, int], Iterable[tuple[int, B]]], empty: B, step: int, n: int) -> list[B]:
        """`n` bars of `step` seconds ending with the newest indexed block, each the sum of the
        series' buckets within it (`empty` where there are none)."""
        end = (self.index.tip_time_ms // 1000 // step + 1) * step
        start = end - step * n
        pts = [empty] * n
        for t, b in series(start, end):
            i = (t - start) // step
            pts[i] = type(empty)(*(x + y for x, y in zip(pts[i], b, strict=True)))
        return pts

    async def search(self, request: web.Request) -> web.Response:
        q = request.query.get("q", "").strip()
        if (height := _height(q)) is not None:
            raise web.HTTPFound(f"/block/{height}")
        if q.startswith("ait1"):
            raise web.HTTPFound(f"/account/{q}")
        if _HEX64.match(q):
            if self.index.receipt_tx(bytes.fromhex(q)):
                raise web.HTTPFound(f"/receipt/{q}")
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self.ledger.stub.GetTransaction(ledger_pb2.GetTransactionRequest(hash=q), timeout=5)
                raise web.HTTPFound(f"/tx/{q}")
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self.ledger.stub.GetBlock(ledger_pb2.GetBlockRequest(hash=q), timeout=5)
                raise web.HTTPFound(f"/block/{q}")
        elif _JOB_ID.match(q) and self.index.job_receipt(q):
            raise web.HTTPFound(f"/receipt/{q}")
        return _not_found(f"nothing on this chain matches '{q}' (a height, a block, transaction or receipt hash, "
                          "an address or a job id)")

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: a `block` event per new canonical block, a `final` event with the
        finalized height after each message from the node."""
        if self.live_pages >= MAX_VIEWERS:
            raise web.HTTPServiceUnavailable(text="too many live pages; try again later", headers={"Retry-After": "5"})
        self.live_pages += 1
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue(VIEWER_QUEUE)
        try:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await resp.prepare(request)
            self.viewers.add(q)
            await _write_or_close(request, resp, b"retry: 1000\n\n")
            while q in self.viewers:
                try:
                    item = await asyncio.wait_for(q.get(), 15)
                except TimeoutError:
                    await _write_or_close(request, resp, b": keep-alive\n\n")
                    continue
                kind = "final" if "final_height" in item else "block"
                await _write_or_close(request, resp, f"event: {kind}\ndata: {json.dumps(item)}\n\n".encode())
        except (ConnectionResetError, asyncio.CancelledError, _NotReading):
            pass
        finally:
            self.viewers.discard(q)
            self.live_pages -= 1
        return resp

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        types = {".js": "text/javascript", ".css": "text/css"}
        suffix = Path(name).suffix
        if suffix not in types or "/" in name:
            raise web.HTTPNotFound()
        try:
            data = _static(name)
        except FileNotFoundError:
            raise web.HTTPNotFound() from None
        return web.Response(body=data, content_type=types[suffix])

    # ---- the app -----------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[_errors])
        app.add_routes([
            web.get("/", self.home), web.get("/block/{key}", self.block), web.get("/tx/{hash}", self.tx),
            web.get("/account/{address}", self.account), web.get("/receipt/{key}", self.receipt),
            web.get("/verify", self.verify_page), web.get("/market", self.market), web.get("/miner/{address}", self.miner),
            web.get("/search", self.search),
            web.get("/events", self.events), web.get("/static/{name}", self.static),
        ])
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, app: web.Application) -> None:
        self.tasks.append(asyncio.create_task(self.follow()))

    async def _stop(self, app: web.Application) -> None:
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self.viewers.clear()
        await self.ledger.close()
        self.index.close()


class _NotReading(Exception):
    """A live page did not take a write within EVENTS_WRITE_TIMEOUT_S; its connection is closed."""


async def _write_or_close(request: web.Request, resp: web.StreamResponse, data: bytes) -> None:
    try:
        async with asyncio.timeout(EVENTS_WRITE_TIMEOUT_S):
            await resp.write(data)
    except TimeoutError:
        if request.transport is not None:
            request.transport.abort()  # what it has not read is dropped with it: its page reconnects
        raise _NotReading from None


@web.middleware
async def _errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    try:
        return await handler(request)
    except grpc.aio.AioRpcError as exc:
        log.warning("%s: ledger %s: %s", request.path, exc.code().name, exc.details())
        return _page("Unavailable", f"<p>The ledger answered {esc(exc.code().name)}: {esc(exc.details() or '')}. "
                     "Reload in a moment.</p>", status=503)


def _height(key: str) -> int | None:
    """A block height as a page or a search names it; None for anything else. str.isdigit() alone
    takes "\u00b2" (which int() refuses) and numbers no uint64 holds: a 500 for anyone's typing."""
    if not (_HEIGHT.match(key) and int(key) < 2**64):
        return None
    return int(key)


def _cursor(text: str) -> tuple[int, int] | None:
    """An account page's `before=<height>.<index>` (the index's 8- and 2-byte key parts); None
    (the newest page) for anything else: a part out of range was a struct.error, a 500."""
    height, _, index = text.partition(".")
    h = _height(height)
    if h is None or not (_HEIGHT.match(index) and int(index) < 2**16):
        return None
    return h, int(index)


def _block_summary(h: ledger_pb2.BlockHeader, final: bool) -> dict[str, Any]:
    return {"height": h.height, "hash": h.hash, "time_ms": h.timestamp_ms, "proposer": h.proposer,
            "tx_count": h.tx_count, "final": final}


def _block_row(s: dict[str, Any]) -> str:
    return (f"<tr data-height='{s['height']}'><td><a href='/block/{s['height']}'>{s['height']}</a></td>"
            f"<td>{_time(s['time_ms'])}</td><td>{_addr(s['proposer'])}</td><td>{s['tx_count']}</td>"
            f"<td>{'yes' if s['final'] else 'not yet'}</td></tr>")


def _tx_row(t: ledger_pb2.Transaction) -> str:
    detail = ""
    if t.to:
        detail = f"{t.amount:,} to {_addr(t.to)}"
    elif t.receipt_hash:
        detail = f"receipt <a href='/receipt/{t.receipt_hash}'>{t.receipt_hash[:16]}...</a>, minted {t.mint_amount:,}" + (
            f", fee {t.fee:,}" if t.fee else "")
    elif t.amount:
        detail = f"{t.amount:,}"
    return (f"<tr><td class='hash'><a href='/tx/{t.hash}'>{t.hash[:16]}...</a></td><td>{_kind(t.kind)}</td>"
            f"<td>{_addr(t.sender)}</td><td>{detail}</td></tr>")


def _kind(kind: int) -> str:
    return KIND_NAMES.get(kind, str(kind))


def _addr(a: str) -> Safe:
    return Safe(f"<a href='/account/{esc(a)}'>{esc(a)}</a>" if a else "-")


def _miner(a: str) -> Safe:
    return Safe(f"<a href='/miner/{esc(a)}'>{esc(a)}</a>" if a else "-")


def _address(account_id: bytes) -> str:
    from aitbc import bech32

    return bech32.encode(crypto.ADDRESS_HRP, account_id)


def _is_provider(e: Earnings | None) -> bool:
    return e is not None and bool(e.receipts or e.slash_rewards or e.slashed)


def _earnings(e: Earnings) -> str:
    return _fields([
        ("earned", f"{e.earned:,} (minted + fees + slash rewards)"), ("minted for its receipts", f"{e.minted:,}"),
        ("client fees (SETTLE)", f"{e.fees:,}"), ("slash rewards (honest runs)", f"{e.slash_rewards:,}"),
        ("slashed from its stake", f"{e.slashed:,}"), ("receipts paid", f"{e.receipts:,} ({e.units:,} units)"),
        ("first and last paid", Safe(f"<a href='/block/{e.first_height}'>{e.first_height}</a> to "
                                     f"<a href='/block/{e.last_height}'>{e.last_height}</a>") if e.receipts else "-"),
        ("stake (staked, unbonding)", f"{e.staked:,}, {e.unbonding:,}")])


def _pass_rate(o: coordinator_pb2.MinerOffer | coordinator_pb2.MarketMiner) -> str:
    checks = o.verifications_passed + o.verifications_failed
    return f"{o.verifications_passed / checks:.0%} of {checks}" if checks else "not checked yet"


def _span(window: str) -> str:
    return {"1h": "last hour", "24h": "last 24 h", "30d": "last 30 days"}[window]


def _span_s(step: int) -> str:
    return f"{step // 86_400} d" if step % 86_400 == 0 else f"{step // 3600} h" if step % 3600 == 0 else f"{step // 60} min"


def _windows(current: str, windows: dict[str, Any]) -> str:
    """The window selector: plain links (no script), the current one in bold."""
    names = {"1h": "1 h", "24h": "24 h", "30d": "30 d"}
    links = " ".join(f"<b>{names[w]}</b>" if w == current else f"<a href='?window={w}'>{names[w]}</a>" for w in windows)
    return f"<p class='windows'>window: {links}</p>"


def _bad_window(window: str, windows: dict[str, Any]) -> web.Response:
    return _page("Bad request", f"<p class='notfound'>window must be one of {', '.join(windows)} (got "
                 f"'{esc(window)}')</p>", status=400)


def _time(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d} UTC"


def _bars(values: list[float], title: str) -> str:
    """A small bar chart as inline SVG (drawn on the server: no script, no CDN)."""
    w, h, top = 300, 80, max(values, default=0) or 1
    bw = w / max(1, len(values))
    bars = "".join(f"<rect x='{i * bw:.1f}' y='{h - v / top * h:.1f}' width='{max(1.0, bw - 1):.1f}' "
                   f"height='{v / top * h:.1f}'/>" for i, v in enumerate(values) if v)
    return (f"<figure data-bars='{len(values)}' data-sum='{_num(sum(values))}'><svg viewBox='0 0 {w} {h}' width='{w}' "
            f"height='{h}' role='img' aria-label='{esc(title)}'>{bars}</svg><figcaption>{esc(title)} (max {_num(top)})"
            "</figcaption></figure>")


def _num(x: float) -> str:
    return str(int(x)) if x == int(x) else f"{x:.3f}"


class Safe(str):
    """HTML this module built (escaping what it put in); everything else a page shows is escaped."""


def _fields(rows: list[tuple[str, Any]]) -> str:
    cells = "".join(f"<tr><th>{esc(str(k))}</th><td>{v if isinstance(v, Safe) else esc(str(v))}</td></tr>"
                    for k, v in rows)
    return f"<table class='fields'>{cells}</table>"


def _not_found(why: str) -> web.Response:
    return _page("Not found", f"<p class='notfound'>Not found: {esc(why)}</p>", status=404)


def _page(title: str, body: str, *, status: int = 200) -> web.Response:
    doc = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><meta name='viewport' "
           f"content='width=device-width, initial-scale=1'><title>{esc(title)} - AITBC explorer</title>"
           "<link rel='stylesheet' href='/static/style.css'></head><body><header><a href='/' class='brand'>AITBC "
           "explorer</a> <nav><a href='/'>blocks</a> <a href='/market'>market</a> <a href='/verify'>verify a "
           "receipt</a></nav><form action='/search'><input name='q' placeholder='height, hash, address, job id' "
           f"aria-label='search'> <button>search</button></form></header><main><h1>{esc(title)}</h1>{body}</main>"
           "</body></html>")
    return web.Response(text=doc, content_type="text/html", status=status)


async def run_explorer(ledger: str, listen: str, data_dir: str | Path, *, coordinator: str = "",
                       port_file: str = "", public: bool = False) -> None:
    """Serve until cancelled (SIGINT/SIGTERM in the CLI). Plain HTTP: beyond loopback only with
    `public` (the operator puts it behind a TLS-terminating proxy; docs/explorer.md)."""
    if not public and not rpc.is_loopback(listen):
        raise errors.FailedPrecondition(
            f"refusing to serve plain HTTP on {listen}: beyond loopback pass --public (and put the explorer behind a "
            "TLS-terminating reverse proxy: docs/explorer.md)")
    host, _, port = listen.rpartition(":")
    ex = Explorer(ledger, Path(data_dir) / "index", coordinator=coordinator)
    runner = web.AppRunner(ex.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host or "127.0.0.1", int(port))
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise errors.FailedPrecondition(f"cannot listen on {listen}: address in use or invalid (--listen)") from None
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    if port_file:
        Path(port_file).write_text(str(bound))
    from aitbc import telemetry

    telemetry.announce(f"explorer on http://{host or '127.0.0.1'}:{bound}/ (ledger {ledger}"
                       f"{', coordinator ' + coordinator if coordinator else ''})", logger="aitbc.explorer")
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
