"""The `aitbc` command: what a person types (devnet, demo, submit, status, receipts, ...)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aitbc import jobs
from aitbc.errors import AitbcError, FailedPrecondition, InvalidArgument
from aitbc.v1 import job_pb2, receipt_pb2

_UNSETTLED = (receipt_pb2.SETTLEMENT_STATE_PENDING, receipt_pb2.SETTLEMENT_STATE_SUBMITTED,
              receipt_pb2.SETTLEMENT_STATE_INCLUDED)

DEFAULT_PROMPT = "a futuristic city skyline at night"


def _fail(message: str, code: int = 1) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


# ---- connection options -------------------------------------------------------------------------

def _coordinators(args: argparse.Namespace, ep: dict[str, Any]) -> list[str]:
    """--coordinator, else AITBC_COORDINATOR, else the running devnet's, else 127.0.0.1:18000: one
    address or several, comma-separated (the SDK fails over between them)."""
    from aitbc.config import coordinator_addresses

    if args.coordinator:
        return coordinator_addresses("--coordinator", args.coordinator)
    if os.environ.get("AITBC_COORDINATOR"):
        return coordinator_addresses("AITBC_COORDINATOR", os.environ["AITBC_COORDINATOR"])
    listed = ep.get("coordinators") or ep.get("coordinator") or "127.0.0.1:18000"
    return coordinator_addresses("coordinator (devnet endpoints.json)", listed)


def _client(args: argparse.Namespace) -> Any:
    from aitbc.clients.retry import RetryPolicy
    from aitbc.clients.sdk import CoordinatorClient, devnet_endpoints

    ep = devnet_endpoints(getattr(args, "data_dir", None))
    targets = _coordinators(args, ep)
    key = args.api_key or os.environ.get("AITBC_API_KEY") or ep.get("api_key")
    if not key:
        raise SystemExit(_fail("no API key: pass --api-key, set AITBC_API_KEY, or start `aitbc devnet` (it prints one)", 2))
    policy = RetryPolicy.from_env()
    said: list[bool] = []

    def on_retry(err: Any, wait: float) -> None:  # once per command: a restart shows as latency, not as noise
        if not said:
            said.append(True)
            where = ("coordinator " if len(targets) == 1 else "coordinators ") + ", ".join(targets)
            print(f"note: {where}: {err}; retrying (at most {policy.attempts} attempts in "
                  f"{policy.total_s:g} s; AITBC_RETRY_ATTEMPTS / AITBC_RETRY_TOTAL_S)", file=sys.stderr)

    def on_failover(source: str, err: Any, to: str) -> None:
        print(f"note: coordinator {source}: {err}; trying {to}", file=sys.stderr)

    return CoordinatorClient(targets, str(key), retry=policy, on_retry=on_retry, on_failover=on_failover)


def _add_conn(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coordinator", help="coordinator address host:port, or several comma-separated to fail over "
                   "between (default: $AITBC_COORDINATOR, the running devnet, else 127.0.0.1:18000)")
    p.add_argument("--api-key", help="client API key (default: $AITBC_API_KEY, else the running devnet's)")


# ---- progress and output ------------------------------------------------------------------------

class Progress:
    """One line per state, a queue line while queued (position, elapsed, ETA) and a progress bar
    with an ETA from the measured step rate; on a terminal the queue line and the bar redraw in
    place, otherwise each change is a line."""

    def __init__(self, stream: Any = sys.stderr, clock: Any = time.monotonic) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.clock = clock
        self.started = clock()
        self.last = ""
        self._first_step: tuple[float, int] | None = None

    def state(self, job: job_pb2.Job) -> None:
        key = (job.state, job.attempts)
        if key != getattr(self, "_last_state", None):
            self._last_state = key
            self._line(f"job {job.job_id}: {jobs.state_name(job.state)}" + (f" ({job.wait_reason})" if job.wait_reason else ""),
                       final=True)
        if job.state == job_pb2.JOB_STATE_QUEUED and job.HasField("queue"):
            self._line(queue_line(job.queue, self.clock() - self.started), final=not self.tty)

    def step(self, p: job_pb2.JobProgress) -> None:
        width = 30
        done = int(width * p.step / max(1, p.total_steps))
        now = self.clock()
        if self._first_step is None or p.step < self._first_step[1]:
            self._first_step = (now, p.step)
        t0, s0 = self._first_step
        eta = ""
        if p.step > s0 and p.step < p.total_steps:
            eta = f", ETA {(now - t0) / (p.step - s0) * (p.total_steps - p.step):.0f} s"
        self._line(f"[{'#' * done}{'.' * (width - done)}] step {p.step}/{p.total_steps}{eta}",
                   final=p.step == p.total_steps)

    def _line(self, text: str, final: bool) -> None:
        if text == self.last and not final:
            return
        self.last = text
        if self.tty:
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def queue_line(q: job_pb2.QueueInfo, elapsed_s: float) -> str:
    """`queued: position 3, 2 miner slots, waiting 4 s, ETA ~6 s (p90 9 s)` (docs/coordinator.md)."""
    if not q.can_run:
        return f"queued: position {q.position}, no connected miner can run it now; waiting {elapsed_s:.0f} s"
    eta = (f"ETA ~{q.eta_p50_ms / 1000:.0f} s (p90 {q.eta_p90_ms / 1000:.0f} s)" if q.eta_known
           else "ETA unknown (no job of this model finished yet)")
    return f"queued: position {q.position}, {q.slots} miner slot{'s' if q.slots != 1 else ''}, " \
           f"waiting {elapsed_s:.0f} s, {eta}"


def _out_path(base: str, index: int, count: int, suffix: str = ".png") -> Path:
    """File `index` of `count` written to `base`: base itself for one, else base-1, base-2 ..."""
    p = Path(base)
    return p if count == 1 else p.with_name(f"{p.stem}-{index + 1}{p.suffix or suffix}")


def run_image_job(client: Any, args: argparse.Namespace, *, out: str) -> int:
    """Submit, show progress, save the PNG(s) and the receipt; print the summary."""
    from aitbc.clients.sdk import ClientError, receipt_json

    t0 = time.monotonic()
    job = client.submit(args.model, job_params(args, text=False), request_id=args.request_id or "",
                        max_price_per_unit=args.max_price, webhook_url=getattr(args, "webhook_url", "") or "",
                        **_payment(args))
    progress = Progress()
    progress.state(job)
    if getattr(args, "no_wait", False):
        print(job.job_id)
        return 0
    with follow_hint(job.job_id):
        for ev in interruptible(client.watch(job.job_id)):
            if isinstance(ev, job_pb2.JobProgress):
                progress.step(ev)
            else:
                job = ev
                progress.state(job)
    if job.state != job_pb2.JOB_STATE_COMPLETED:
        return _fail(f"job {job.job_id} ended {jobs.state_name(job.state)}: {job.error}")
    saved = []
    for i in range(len(job.artifacts)):
        _, data = client.result(job.job_id, i)
        path = _out_path(out, i, len(job.artifacts))
        path.write_bytes(data)
        saved.append(str(path))
    try:
        recs, _ = client.receipts(job_id=job.job_id)  # a job split across miners has one per shard
    except ClientError as exc:
        return _fail(f"job completed but its receipt could not be read: {exc}")
    base = Path(args.receipt_out or (str(Path(out).with_suffix("")) + ".receipt.json"))
    receipt_files = [base if len(recs) == 1 else base.with_name(f"{base.name.removesuffix('.json')}-{i + 1}.json")
                     for i in range(len(recs))]
    for rec, path in zip(recs, receipt_files, strict=True):
        path.write_text(json.dumps(receipt_json(rec), indent=2) + "\n")
    wall = time.monotonic() - t0
    print(f"job id:       {job.job_id}")
    print(f"image:        {', '.join(saved)} ({job.artifacts[0].width}x{job.artifacts[0].height})")
    print(f"duration:     {(job.finished_at_unix_ms - job.created_at_unix_ms) / 1000:.2f} s (wall {wall:.2f} s)")
    print(f"gpu_seconds:  {job.gpu_ms / 1000:.3f} (measured by the miner; not what is paid)")
    print(f"miner:        {job.miner_id}")
    _print_cost(job, sum(r.body.units * r.body.price_per_unit for r in recs))
    if len(recs) > 1:
        print(f"shards:       {len(recs)} (one receipt per miner's share)")
    for rec, path in zip(recs, receipt_files, strict=True):
        print(f"receipt hash: {rec.receipt_hash}  ({rec.body.units} {rec.body.unit_type}, {rec.body.provider})")
        print(f"receipt file: {path}")
    return 0


# ---- commands -----------------------------------------------------------------------------------

TEXT_OPTIONS = ("max_new_tokens", "temperature", "top_p", "top_k", "stop")


def _is_text_job(client: Any, args: argparse.Namespace) -> bool:
    """Text when the coordinator says the model is a text model, or a text-only option was given."""
    try:
        kinds = {m.name: m.kind for m in client.list_models()}
    except Exception:  # an older coordinator: decide from the options
        kinds = {}
    if args.model in kinds:
        return kinds[args.model] == job_pb2.MODEL_KIND_TEXT
    return any(getattr(args, o) not in (None, [], 0) for o in TEXT_OPTIONS)


def run_text_job(client: Any, args: argparse.Namespace) -> int:
    """Submit a text job and print tokens as they arrive; then the summary on stderr. What stdout
    and `-o` end with is the job's final text, from GetJobResult (the stream may have missed some:
    a fast job can finish before its watcher has seen a token); the receipt goes to a file, as an
    image job's does."""
    from aitbc.clients.sdk import ClientError, receipt_json

    t0 = time.monotonic()
    job = client.submit(args.model, job_params(args, text=True), request_id=args.request_id or "",
                        max_price_per_unit=args.max_price, webhook_url=getattr(args, "webhook_url", "") or "",
                        **_payment(args))
    progress = Progress()
    progress.state(job)
    if args.no_wait:
        print(job.job_id)
        return 0
    first_token = None
    shown = ""  # what stdout has of the current attempt's text
    attempt = ""  # the current attempt's text as streamed (from offset 0)
    with follow_hint(job.job_id):
        for ev in interruptible(client.watch(job.job_id)):
            if isinstance(ev, job_pb2.TextChunk):
                if first_token is None:
                    first_token = time.monotonic() - t0
                attempt = attempt[:ev.offset] + ev.text
                shown = _show(shown, attempt, "the job was requeued to another miner: the text restarts")
            elif isinstance(ev, job_pb2.Job):
                job = ev
                progress.state(job)
    if job.state != job_pb2.JOB_STATE_COMPLETED:
        if shown:
            sys.stdout.write("\n")
        return _fail(f"job {job.job_id} ended {jobs.state_name(job.state)}: {job.error}")
    try:
        _, data = client.result(job.job_id, 0)
        final = data.decode("utf-8")
    except (ClientError, UnicodeDecodeError) as exc:
        final = attempt
        print(f"warning: the job's text could not be read back ({exc}); what was streamed is kept", file=sys.stderr)
    shown = _show(shown, final, "the streamed text was not the job's final text: the final text follows", final=True)
    if shown:
        sys.stdout.write("\n")
        sys.stdout.flush()
    if args.output:
        Path(args.output).write_text(final, encoding="utf-8")
    receipt_file = Path(args.receipt_out or (str(Path(args.output or "out.txt").with_suffix("")) + ".receipt.json"))
    try:
        rec = client.receipt(job_id=job.job_id)
    except ClientError as exc:
        return _fail(f"job completed but its receipt could not be read: {exc}")
    receipt_file.write_text(json.dumps(receipt_json(rec), indent=2) + "\n")
    wall = time.monotonic() - t0
    err = sys.stderr
    print(f"job id:       {job.job_id}", file=err)
    print(f"tokens:       {job.prompt_tokens} prompt + {job.generated_tokens} generated ({job.finish_reason})", file=err)
    print(f"duration:     {wall:.2f} s; first token after {(first_token or 0) * 1000:.0f} ms", file=err)
    print(f"miner:        {job.miner_id}", file=err)
    _print_cost(job, job.units * job.price_per_unit, file=err)
    print(f"receipt hash: {rec.receipt_hash}  ({rec.body.units} {rec.body.unit_type}, {rec.body.provider})", file=err)
    print(f"receipt file: {receipt_file}", file=err)
    return 0


def _show(shown: str, text: str, restart_note: str, *, final: bool = False) -> str:
    """Bring stdout from `shown` to `text`: the rest of it when it continues what is shown, else
    (another attempt's text) a note on stderr and the whole of it. Returns what stdout now has.
    A stream that starts again (a watch reattached, or a requeued seeded job) with text that stdout
    already has shows nothing until it goes past it, unless `text` is the job's final text."""
    if not final and shown.startswith(text):
        return shown
    if text.startswith(shown):
        rest = text[len(shown):]
    else:
        print(f"\n[{restart_note}]", file=sys.stderr)
        sys.stdout.write("\n")
        rest = text
    if rest:
        sys.stdout.write(printable(rest))
        sys.stdout.flush()
    return text


_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x00, 0x09), *range(0x0b, 0x20), 0x7f)}  # all but \t and \n


def printable(text: str) -> str:
    """Model text for a terminal: control characters (a bell, a carriage return, escape sequences)
    shown as \\xNN instead of acting on the terminal; `-o FILE` keeps the text as generated."""
    return text.translate(_CONTROL)


def interruptible(events: Iterator[Any]) -> Iterator[Any]:
    """Iterate `events` (a blocking gRPC stream) on a daemon thread, so that Ctrl-C always reaches
    this thread at once, whatever the stream is blocked in, and the process can exit."""
    import queue
    import threading

    box: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=256)

    def pump() -> None:
        try:
            for ev in events:
                box.put(("event", ev))
            box.put(("end", None))
        except BaseException as exc:  # handed to the consumer, which raises it
            box.put(("error", exc))

    threading.Thread(target=pump, name="aitbc-watch", daemon=True).start()
    while True:
        try:
            kind, value = box.get(timeout=0.2)
        except queue.Empty:
            continue
        if kind == "end":
            return
        if kind == "error":
            raise value
        yield value


@contextlib.contextmanager
def follow_hint(job_id: str) -> Iterator[None]:
    """Ctrl-C or a lost connection while watching: say that the job goes on, and how to follow it."""
    from aitbc.clients.sdk import ClientError

    follow = f"aitbc status {job_id} | aitbc result {job_id} | aitbc cancel {job_id}"
    try:
        yield
    except KeyboardInterrupt:
        print(f"\ninterrupted: job {job_id} keeps running on the network and is paid for when it completes; "
              f"follow it: {follow}", file=sys.stderr)
        raise
    except ClientError as exc:
        if exc.code not in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
            raise
        print(f"\nlost the coordinator while watching job {job_id} ({exc.code}); the job is kept there. "
              f"When it is back: {follow}", file=sys.stderr)
        raise


def _print_cost(job: job_pb2.Job, cost: int, file: Any = None) -> None:
    cap = job.max_price_per_unit if job.HasField("max_price_per_unit") else "none"
    print(f"cost:         {cost} ({job.units} {job.unit_type} x price per unit, minted to the miner; your cap was "
          f"{cap} per unit)", file=file or sys.stdout)


IMAGE_OPTIONS = ("negative_prompt", "steps", "guidance", "width", "height", "images")


def job_params(args: argparse.Namespace, *, text: bool) -> job_pb2.JobParams:
    """The job's parameters from the command line, checked here against the shared limits
    (aitbc.jobs) before anything is sent; an option of the other job kind is refused."""
    from aitbc.clients.sdk import image_params, text_params

    kind, other = ("text", IMAGE_OPTIONS) if text else ("image", TEXT_OPTIONS)
    given = [o for o in other if getattr(args, o, None) not in (None, [])]
    if given:
        flags = ", ".join("--" + o.replace("_", "-") for o in given)
        raise InvalidArgument(f"{flags} do{'es' if len(given) == 1 else ''} not apply: '{args.model}' is a {kind} "
                              f"model (see `aitbc models`)")
    for name in ("steps", "images", "max_new_tokens"):
        if getattr(args, name, None) is not None and getattr(args, name) < 1:
            raise InvalidArgument(f"--{name.replace('_', '-')} must be at least 1 (leave it out for the default)")
    if text:
        params = text_params(args.prompt, max_new_tokens=args.max_new_tokens or 0, temperature=args.temperature,
                             top_p=args.top_p, top_k=args.top_k or 0, seed=args.seed, stop=args.stop or [])
    else:
        params = image_params(args.prompt, negative_prompt=args.negative_prompt or "", steps=args.steps or 0,
                              guidance_scale=args.guidance, width=args.width or 0, height=args.height or 0,
                              images=args.images or 1, seed=args.seed)
    jobs.normalize_params(params)  # the coordinator's own checks, so a mistake is said before sending
    return params


def print_quote(q: Any) -> None:
    exact = "" if q.units_exact else " at most (prompt bound + max_new_tokens; the receipt counts what ran)"
    print(f"units:        {q.units} {q.unit_type}{exact}")
    if q.miners:
        print(f"price:        {q.price_per_unit} per unit (the miner that would get it now)")
        print(f"cost:         {q.cost}" + ("" if q.units_exact else " at most"))
    else:
        print(f"price:        no connected miner qualifies: {q.unavailable_reason}")
    if q.HasField("max_price_per_unit"):
        print(f"cap:          {q.max_price_per_unit} per unit: the job never costs more than {q.max_cost}")
    for mnr in q.miners:
        print(f"  miner {mnr.miner_id}  {mnr.price_per_unit} per unit  cost {mnr.cost}  {mnr.device_class or '-'}")
    if q.quote:
        from aitbc.clients.sdk import signed_quote

        b = signed_quote(q).body  # type: ignore[union-attr]
        left = max(0, (b.expires_at - int(time.time() * 1000)) // 1000)
        print(f"quote:        {b.quote_id}: total {b.total} = {b.units} x {b.price_per_unit} + priority fee "
              f"{b.priority_fee}, charged exactly on success, valid {left} s")
        print(f"escrow free:  {q.escrow_available}" + ("" if q.escrow_available >= b.total else
              f"  (less than the quote: aitbc escrow deposit {b.total - q.escrow_available})"))
    elif q.no_quote_reason:
        print(f"no quote:     {q.no_quote_reason}")


def _payment(args: argparse.Namespace) -> dict[str, Any]:
    """submit's --quote FILE / --fee N as SDK arguments (a free job without either)."""
    from aitbc.quotes import SignedQuote

    if getattr(args, "quote_file", None) and getattr(args, "fee", None) is not None:
        raise InvalidArgument("give --quote FILE or --fee N, not both (the quote states its priority fee)")
    if getattr(args, "quote_file", None):
        try:
            raw = Path(args.quote_file).read_bytes()
        except OSError as exc:
            raise InvalidArgument(f"cannot read quote {args.quote_file}: {exc.strerror}") from None
        return {"quote": SignedQuote.loads(raw)}
    if getattr(args, "fee", None) is not None:
        if args.fee < 0:
            raise InvalidArgument(f"--fee must be 0 or more, got {args.fee}")
        return {"priority_fee": args.fee}
    return {}


def cmd_quote(args: argparse.Namespace) -> int:
    """What a job would cost, and a signed quote to submit it with (-o FILE)."""
    from aitbc.clients.sdk import signed_quote

    if args.priority_fee is not None and args.priority_fee < 0:
        raise InvalidArgument(f"--priority-fee must be 0 or more, got {args.priority_fee}")
    with _client(args) as client:
        q = client.quote(args.model, job_params(args, text=_is_text_job(client, args)),
                         max_price_per_unit=args.max_price, priority_fee=args.priority_fee)
    print_quote(q)
    sq = signed_quote(q)
    if sq is not None and args.output:
        Path(args.output).write_text(sq.dumps())
        print(f"wrote {args.output}: submit with `aitbc submit ... --quote {args.output}` (same prompt and options)")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if _is_text_job(client, args):
            return run_text_job(client, args)
        return run_image_job(client, args, out=args.output or "out.png")


def _print_job(job: job_pb2.Job) -> None:
    from google.protobuf import json_format

    print(json.dumps(json_format.MessageToDict(job, preserving_proto_field_name=True), indent=2))


def cmd_models(args: argparse.Namespace) -> int:
    with _client(args) as client:
        models = client.list_models()
        if not models:
            print("no miner is connected")
        for m in models:
            kind = job_pb2.ModelKind.Name(m.kind).removeprefix("MODEL_KIND_").lower()
            extra = f"  context {m.context_length} tokens" if m.context_length else ""
            print(f"{m.name:24s} {kind:6s} miners {m.miners}  from {m.min_price_per_unit} per unit{extra}")
    return 0


def cmd_hub_release(args: argparse.Namespace) -> int:
    with _client(args) as client:
        m = client.release_miner(args.miner_id)
    print(f"released {m.miner_id}: on probation, its next {m.probation_left} verified results decide "
          f"(reputation {m.reputation:.2f}, {m.verifications_failed} failed verifications so far)")
    return 0


def cmd_hub_miners(args: argparse.Namespace) -> int:
    with _client(args) as client:
        miners = client.list_miners()
        if args.json:
            from google.protobuf import json_format

            print(json.dumps([json_format.MessageToDict(m, preserving_proto_field_name=True) for m in miners], indent=2))
            return 0
        if not miners:
            print("no miner has registered yet")
        print(f"{'miner':44s} {'state':11s} {'score':>5s} {'rep':>5s} {'load':>5s} {'price':>6s} {'stake':>8s} "
              f"{'served':>6s} {'verif ok/bad':>12s} {'fail':>4s} {'lat ms':>7s}  models")
        for m in miners:
            state = "QUARANTINE" if m.quarantined else ("connected" if m.connected else "offline")
            if m.probation_left and not m.quarantined:
                state = "probation"
            print(f"{m.miner_id:44s} {state:11s} {m.score:5.2f} {m.reputation:5.2f} "
                  f"{m.running}/{m.max_concurrency or '-':<3} {m.price_per_unit:6d} {m.staked:8d} {m.jobs_served:6d} "
                  f"{m.verifications_passed:>6d}/{m.verifications_failed:<5d} {m.failures + m.stalls:4d} "
                  f"{m.recent_latency_ms:7.0f}  {','.join(m.models)}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.get_job(args.job_id)
        print(f"{job.job_id}  {jobs.state_name(job.state)}  model={job.model}  miner={job.miner_id or '-'}  "
              f"attempts={job.attempts}" + (f"  progress={job.progress.step}/{job.progress.total_steps}" if job.progress.total_steps else ""))
        if job.verification:
            print("verification: " + job_pb2.VerificationState.Name(job.verification).removeprefix("VERIFICATION_STATE_"))
        if job.wait_reason:
            print(f"waiting: {job.wait_reason}")
        if job.error:
            print(f"reason: {job.error}")
        if args.story:
            print(format_story(job))
        if args.json:
            _print_job(job)
    return 0


def format_story(job: job_pb2.Job) -> str:
    """The job's transitions, one per line: time since submission, from -> to, cause."""
    if not job.story:
        return "story: none recorded (the job predates stories)"
    start = job.story[0].at_unix_ms
    lines = [f"story ({len(job.story)} transitions" + (f", {job.story_dropped} older ones dropped" if job.story_dropped else "") + "):"]
    for t in job.story:
        frm = "-" if t.from_state == job_pb2.JOB_STATE_UNSPECIFIED else jobs.state_name(t.from_state)
        since = f"+{(t.at_unix_ms - start) / 1000:.3f}s"
        lines.append(f"  {since:>10s}  {frm:>9s} -> {jobs.state_name(t.to_state):9s}  {t.cause}")
    return "\n".join(lines)


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.cancel(args.job_id, args.reason or "")
        print(f"{job.job_id}  {jobs.state_name(job.state)}")
    return 0


def cmd_result(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.get_job(args.job_id)
        for i in range(len(job.artifacts)):
            _, data = client.result(args.job_id, i)
            path = _out_path(args.output, i, len(job.artifacts))
            path.write_bytes(data)
            print(f"wrote {path} ({len(data)} bytes)")
        if not job.artifacts:
            return _fail(f"job {args.job_id} is {jobs.state_name(job.state)}: no result yet")
    return 0


def cmd_receipts(args: argparse.Namespace) -> int:
    """A table of receipts (newest first, or the job's: one per shard of a split job, in image
    order); `--json` prints them as JSON instead; `-o FILE` writes receipt files (FILE, or
    FILE-1.json, FILE-2.json ... for several) that `aitbc receipts verify` reads."""
    from aitbc.clients.sdk import receipt_json

    with _client(args) as client:
        if args.job_id:
            recs, _ = client.receipts(job_id=args.job_id)
        else:
            recs, _ = client.receipts(page_size=args.limit)
    if args.output:
        for i, r in enumerate(recs):
            path = _out_path(args.output, i, len(recs), ".json")
            path.write_text(json.dumps(receipt_json(r), indent=2) + "\n")
            print(f"wrote {path} (receipt of job {r.body.job_id})", file=sys.stderr)
    elif args.json:
        one = args.job_id and len(recs) == 1
        print(json.dumps(receipt_json(recs[0]) if one else [receipt_json(r) for r in recs], indent=2))
    else:
        print(receipts_table(recs))
    for r in recs:
        print(f"{r.body.job_id}  receipt {r.receipt_hash}  settlement {settlement_line(r)}", file=sys.stderr)
    if args.job_id and len(recs) > 1:
        from aitbc.hub.payout import shares

        for provider, amount in shares((r.body.provider, r.body.units, r.body.price_per_unit) for r in recs).items():
            print(f"share of {provider}: {amount}", file=sys.stderr)
    return 0


def receipts_table(recs: list[Any]) -> str:
    """One line per receipt: job, receipt hash, units, price, amount, provider, settlement."""
    rows = [("JOB", "RECEIPT", "UNITS", "PRICE", "AMOUNT", "PROVIDER", "SETTLEMENT")]
    for r in recs:
        b = r.body
        state = receipt_pb2.SettlementState.Name(r.settlement.state).removeprefix("SETTLEMENT_STATE_")
        rows.append((b.job_id, r.receipt_hash[:16], f"{b.units} {b.unit_type}", str(b.price_per_unit),
                     str(b.units * b.price_per_unit), b.provider[:20] + "...", state))
    if len(rows) == 1:
        return "no receipts"
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def cmd_receipts_verify(args: argparse.Namespace) -> int:
    from aitbc.receipts import load_receipt_file, verify_receipt

    if args.proof is not None and not args.genesis:
        return _fail("--proof needs --genesis GENESIS_FILE: a proof is only as good as the genesis (authority set) "
                     "it is checked against; keep the chain's genesis file (from its operator)")
    try:
        data = Path(args.file).read_bytes()
    except OSError as exc:
        return _fail(f"cannot read {args.file}: {exc.strerror}")
    try:
        receipt = load_receipt_file(data)  # strict: UTF-8 without BOM, no duplicate keys, integers only
        attesters = frozenset(args.attester) if args.attester else None
        verify_receipt(receipt, require_attestation=not args.allow_unattested, attesters=attesters)
    except AitbcError as exc:
        print(f"INVALID: {exc.message}")
        return 1
    b = receipt.body
    print("VALID receipt")
    print(f"  receipt hash: {receipt.receipt_hash.hex()}")
    print(f"  job:          {b.job_id}  model={b.model}")
    print(f"  provider:     {b.provider} (signature verified)")
    if receipt.attester:
        print(f"  attester:     {receipt.attester} (signature verified{', authorized' if args.attester else ''})")
    print(f"  units:        {b.units} {b.unit_type} x {b.price_per_unit} per unit  chain={b.chain_id}")
    if args.proof is not None:
        return _verify_proof(args, receipt)
    if args.node:
        try:
            status = asyncio.run(_receipt_status(args.node, receipt.receipt_hash.hex(), b.chain_id))
        except AitbcError as exc:
            print(f"NOT CHECKED on {args.node}: {exc.message}")
            return 1
        if status.status not in ("included", "final"):
            print(f"NOT MINTED on {args.node}: the ledger reports {status.status}")
            return 1
        print(f"  minted once:  {status.amount} in tx {status.tx_hash}, block {status.block_height}"
              f" ({'final' if status.status == 'final' else 'not final yet'}); the ledger accepts a receipt hash once")
    return 0


def _verify_proof(args: argparse.Namespace, receipt: Any) -> int:
    """`receipts verify FILE --proof [PROOF_FILE] --genesis GENESIS_FILE`: that the receipt was minted
    in a final block, checked against the genesis alone (aitbc.ledger.proof); the node that served
    the proof is not trusted."""
    from aitbc.ledger.genesis import Genesis
    from aitbc.ledger.proof import describe_set, verify_proof

    try:
        genesis = Genesis.load(args.genesis)
    except AitbcError as exc:
        return _fail(f"{args.genesis}: {exc.message}")
    if args.proof:
        try:
            raw = Path(args.proof).read_bytes()
        except OSError as exc:
            return _fail(f"cannot read {args.proof}: {exc.strerror}")
        where = args.proof
    else:
        from aitbc.clients.wallet_cli import resolve_ledger

        where = resolve_ledger(args.node)
        try:
            raw = asyncio.run(_receipt_proof(where, receipt.receipt_hash.hex()))
        except AitbcError as exc:
            print(f"NO PROOF from {where}: {exc.message}")
            return 1
    gh = genesis.hash()
    try:
        res = verify_proof(raw, genesis, receipt.receipt_hash, gh)
    except AitbcError as exc:
        print(f"INVALID PROOF ({where}): {exc.message}")
        return 1
    print(f"  minted once:  {res.amount} to {res.provider} in tx {res.tx_hash.hex()}, block {res.block_height}")
    print(f"  final:        block {res.block_height} is final: certificate of block {res.certified_height} "
          f"{res.certified_hash.hex()[:16]} (more than 2/3 of the {len(res.authorities)} authorities of its epoch)")
    if res.set_changes:
        print(f"  authorities:  {res.set_changes} set change(s) since the genesis, each certified by the set before "
              f"it; the block's set: {describe_set(res.authorities)}")
    print(f"  proof:        {len(raw)} bytes from {where}, checked offline against genesis {gh.hex()} "
          f"(chain {genesis.chain_id})")
    return 0


def cmd_receipts_proof(args: argparse.Namespace) -> int:
    """`receipts proof RECEIPT -o FILE`: fetch a receipt's proof (docs/ledger.md "Receipt proofs")
    from a ledger node and write it, for `aitbc receipts verify FILE --proof PROOF_FILE --genesis G`."""
    from aitbc.clients.wallet_cli import resolve_ledger
    from aitbc.ledger.proof import decode_proof
    from aitbc.receipts import SignedReceipt

    rh = args.receipt
    if Path(rh).is_file():
        try:
            rh = SignedReceipt.from_json_dict(json.loads(Path(rh).read_text())).receipt_hash.hex()
        except (ValueError, AitbcError) as exc:
            return _fail(f"{args.receipt} is not a receipt file: {getattr(exc, 'message', exc)}")
    node = resolve_ledger(args.node)
    try:
        raw = asyncio.run(_receipt_proof(node, rh))
        p = decode_proof(raw)
    except AitbcError as exc:
        return _fail(exc.message)
    Path(args.output).write_bytes(raw)
    print(f"wrote {args.output} ({len(raw)} bytes): receipt {rh}, {len(p.headers)} header(s) up to a certified "
          f"block, {len(p.changes)} authority set change(s); check it with `aitbc receipts verify RECEIPT_FILE --proof {args.output} --genesis GENESIS_FILE`",
          file=sys.stderr)
    return 0


async def _receipt_proof(node: str, receipt_hash: str) -> bytes:
    from aitbc.ledger.client import LedgerClient

    async with LedgerClient(node) as lc:
        return await lc.get_receipt_proof(receipt_hash)


async def _receipt_status(node: str, receipt_hash: str, chain_id: str) -> Any:
    """The receipt's status on `node`, which must run the receipt's chain (and the expected genesis)."""
    from aitbc.clients.wallet_cli import check_genesis, expected_genesis
    from aitbc.ledger.client import LedgerClient

    async with LedgerClient(node) as lc:
        head = await lc.get_head()
        if head.chain_id != chain_id:
            raise FailedPrecondition(f"the ledger at {node} runs chain {head.chain_id!r}; the receipt is for chain "
                                     f"{chain_id!r}: ask a node of that chain")
        await check_genesis(lc, node, *expected_genesis(node), head=head)
        return await lc.get_receipt_status(receipt_hash)


def cmd_coordinator(args: argparse.Namespace) -> int:
    from aitbc import config as cfg
    from aitbc.server.coordinator import run_coordinator

    conf = cfg.load(cfg.CoordinatorConfig, args.config, "COORDINATOR", listen=args.listen, port_file=args.port_file)
    asyncio.run(run_coordinator(conf))
    return 0


def cmd_explorer(args: argparse.Namespace) -> int:
    """`aitbc explorer`: the web explorer over a ledger node and (for the market page) a coordinator."""
    from aitbc.clients.sdk import devnet_endpoints
    from aitbc.clients.wallet_cli import resolve_ledger
    from aitbc.explorer.app import run_explorer

    ep = devnet_endpoints(None) if not args.coordinator else {}
    coordinator = ""
    if args.coordinator or os.environ.get("AITBC_COORDINATOR") or ep.get("coordinator"):
        coordinator = _coordinators(args, ep)[0]  # the market page reads one coordinator: the first listed
    data_dir = args.data_dir or str(Path(os.environ.get("AITBC_HOME", "~/.aitbc")).expanduser() / "explorer")
    try:
        asyncio.run(run_explorer(resolve_ledger(args.ledger), args.listen, data_dir, coordinator=coordinator,
                                 port_file=args.port_file or "", public=args.public))
    except KeyboardInterrupt:
        pass
    return 0


def cmd_miner(args: argparse.Namespace) -> int:
    from aitbc import config as cfg
    from aitbc.miner.daemon import run_miner

    conf = cfg.load(cfg.MinerConfig, args.config, "MINER", coordinator=args.coordinator, port_file=args.port_file)
    asyncio.run(run_miner(conf))
    return 0


def _devnet(args: argparse.Namespace) -> Any:
    from aitbc.clients.devnet import Devnet

    return Devnet(Path(args.data_dir).expanduser(), coordinator_listen=args.coordinator_listen,
                  miner_ops_listen=args.miner_ops_listen, ledger_listen=args.ledger_listen,
                  wallet_listen=args.wallet_listen, explorer_listen=getattr(args, "explorer_listen", "127.0.0.1:18080"),
                  models=args.models.split(","), postgres=getattr(args, "postgres", False),
                  coordinators=getattr(args, "coordinators", 1))


def cmd_devnet(args: argparse.Namespace) -> int:
    net = _devnet(args)
    print(f"devnet: starting in {net.data_dir} (first start builds the tiny model; logs in {net.data_dir / 'logs'})", flush=True)
    try:
        ep = net.start()
    except RuntimeError as exc:
        net.stop()  # whatever did start goes again
        return _fail(str(exc))
    print("devnet is up:")
    print(f"  coordinator   {ep['coordinator']}   (CoordinatorService, MinerService, health, reflection)")
    for i, addr in enumerate(list(ep.get("coordinators") or [])[1:], 2):
        print(f"  coordinator {i} {addr}   (the same services, the same database)")
    if ep.get("database_url"):
        print(f"  database      {ep['database_url']}   (PostgreSQL in {ep['data_dir']}/postgres; the coordinators' store)")
    print(f"  miner ops     {ep['miner_ops']}   (MinerOpsService/GetInfo)")
    print(f"  ledger        {ep['ledger']}   (LedgerService; single authority, chain {ep['chain_id']})")
    print(f"  wallet        {ep['wallet']}   (WalletService; keystore in {ep['data_dir']}/wallets, "
          f"token in {ep['wallet_token_file']})")
    print(f"  explorer      {ep['explorer']}   (blocks, accounts, receipts, market; in a browser)")
    print(f"  miner address {ep['miner_address']}   (minted tokens go here; key {ep['miner_key_file']})")
    print(f"  client id     {ep['client_id']}")
    print(f"  API key       {ep['api_key']}")
    print(f"  data          {ep['data_dir']}")
    for name, url in dict(ep.get("metrics") or {}).items():
        print(f"  metrics       {url}   ({name}; Prometheus text)")
    print(f"try:  aitbc submit \"{DEFAULT_PROMPT}\" --steps 20 --seed 7 -o city.png")
    print("      aitbc submit --model tiny-llama \"Explain proof of authority in one paragraph\"")
    print(f"      aitbc wallet import miner --key-file {ep['miner_key_file']} && aitbc wallet balance miner")
    print("Ctrl-C stops the devnet.", flush=True)
    try:
        net.run_forever()
    finally:
        print("devnet: stopping", flush=True)
        net.stop()
        print("devnet: stopped", flush=True)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Start a devnet on free ports, run one image job end to end, verify the receipt, stop."""
    from aitbc.clients.sdk import CoordinatorClient
    from aitbc.receipts import load_receipt_file, verify_receipt

    # every port free (a running `aitbc devnet` keeps its own): the demo prints what it uses
    args.coordinator_listen = args.miner_ops_listen = args.ledger_listen = args.explorer_listen = "127.0.0.1:0"
    args.wallet_listen = "unix"
    net = _devnet(args)
    print(f"demo: starting a devnet in {net.data_dir} ...", flush=True)
    try:
        ep = net.start()
    except RuntimeError as exc:
        return _fail(str(exc))
    try:
        print(f"demo: coordinator {ep['coordinator']}, miner connected; submitting {args.prompt!r}", flush=True)
        with CoordinatorClient(str(ep["coordinator"]), str(ep["api_key"])) as client:
            rc = run_image_job(client, args, out=args.output)
        if rc:
            return rc
        receipt_file = Path(args.receipt_out or (str(Path(args.output).with_suffix("")) + ".receipt.json"))
        receipt = load_receipt_file(receipt_file.read_bytes())
        verify_receipt(receipt)
        print("receipt verified offline (provider and attester signatures, canonical hash):")
        print(json.dumps(receipt.to_json_dict(), indent=2))
        with CoordinatorClient(str(ep["coordinator"]), str(ep["api_key"])) as client:
            rec = wait_settled(client, receipt.body.job_id, timeout=60)
        s = rec.settlement
        if s.state != receipt_pb2.SETTLEMENT_STATE_FINAL:
            return _fail(f"receipt not settled: {settlement_line(rec)}")
        print(f"settlement: {settlement_line(rec)}")
        after = asyncio.run(_balance(str(ep["ledger"]), str(ep["miner_address"])))
        print(f"miner {ep['miner_address']} balance: {after - s.amount} -> {after} (+{s.amount} minted for "
              f"{receipt.body.units} {receipt.body.unit_type} x {receipt.body.price_per_unit})")
        return 0
    finally:
        net.stop()
        print("demo: devnet stopped", flush=True)


def settlement_line(rec: Any) -> str:
    s = rec.settlement
    state = receipt_pb2.SettlementState.Name(s.state).removeprefix("SETTLEMENT_STATE_")
    if s.state in (receipt_pb2.SETTLEMENT_STATE_INCLUDED, receipt_pb2.SETTLEMENT_STATE_FINAL):
        return (f"{state}: minted {s.amount} in tx {s.tx_hash} at block {s.block_height}"
                f"{' (final)' if s.state == receipt_pb2.SETTLEMENT_STATE_FINAL else ' (not final yet)'}")
    return state + (f": {s.error}" if s.error else "") + (f" (tx {s.tx_hash})" if s.tx_hash else "")


def wait_settled(client: Any, job_id: str, *, timeout: float) -> Any:
    """Poll the receipt until its MINT is final (or settlement cannot progress)."""
    deadline = time.monotonic() + timeout
    while True:
        rec = client.receipt(job_id=job_id)
        if rec.settlement.state not in _UNSETTLED or time.monotonic() > deadline:
            return rec
        time.sleep(0.2)


async def _balance(ledger: str, address: str) -> int:
    from aitbc.ledger.client import LedgerClient

    async with LedgerClient(ledger) as lc:
        return (await lc.get_account(address)).balance


def _add_image_args(p: argparse.ArgumentParser, *, prompt_default: str | None = None) -> None:
    if prompt_default is None:
        p.add_argument("prompt", help="what to draw")
    else:
        p.add_argument("--prompt", default=prompt_default)
    p.add_argument("--model", default="tiny-sd", help="model to run (default: tiny-sd, the embedded tiny image pipeline; "
                   "tiny-llama is the embedded text model)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=int, default=None, help=f"denoising steps, 1-{jobs.MAX_STEPS} (default {jobs.DEFAULT_STEPS})")
    p.add_argument("--guidance", type=float, default=None, help=f"guidance scale 0-{jobs.MAX_GUIDANCE:g} (default {jobs.DEFAULT_GUIDANCE})")
    p.add_argument("--width", type=int, default=None, help="pixels, multiple of 8 (default: the model's native size)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--images", type=int, default=None, help=f"images to make, 1-{jobs.MAX_IMAGES} (default 1)")
    p.add_argument("--seed", type=int, default=None, help="fixed seed for a reproducible image")
    p.add_argument("--request-id", default="", help="idempotency key: resubmitting it returns the same job")
    p.add_argument("--max-price", type=int, default=None, metavar="N",
                   help="most you pay per unit; no miner above it gets the job (default: the coordinator's "
                        "ceiling for the model)")
    p.add_argument("--webhook-url", default="", metavar="URL",
                   help="POST the job's end here, signed (the operator must allow the URL; docs/coordinator.md)")
    p.add_argument("-o", "--output", default="out.png", help="PNG path (several images: out-1.png, out-2.png, ...); "
                   "text jobs: a file for the text")
    p.add_argument("--receipt-out", help="receipt JSON path (default: <output>.receipt.json; a text job without -o: "
                   "out.receipt.json)")


def _add_text_args(p: argparse.ArgumentParser) -> None:
    t = p.add_argument_group("text jobs (a text model such as tiny-llama)")
    t.add_argument("--max-new-tokens", type=int, default=None, help=f"tokens to generate, 1-{jobs.MAX_NEW_TOKENS} (default {jobs.DEFAULT_MAX_NEW_TOKENS})")
    t.add_argument("--temperature", type=float, default=None, help=f"0 (greedy) to {jobs.MAX_TEMPERATURE:g} (default {jobs.DEFAULT_TEMPERATURE})")
    t.add_argument("--top-p", type=float, default=None, help="nucleus sampling, (0, 1] (default 1)")
    t.add_argument("--top-k", type=int, default=None, help=f"0 (off) to {jobs.MAX_TOP_K}")
    t.add_argument("--stop", action="append", help=f"stop before this text (repeatable, at most {jobs.MAX_STOP})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aitbc", description="AITBC: AI compute network (client, miner, coordinator, devnet)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--tls-ca", default=os.environ.get("AITBC_TLS_CA", ""), metavar="PEM",
                        help="connect with TLS, trusting servers signed by this CA (default $AITBC_TLS_CA; "
                             "unset: plaintext)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    default_data = str(Path(os.environ.get("AITBC_HOME", "~/.aitbc")) / "devnet")

    p = sub.add_parser("devnet", help="run the whole network locally (stays up; Ctrl-C stops it)")
    p.add_argument("--data-dir", default=default_data)
    p.add_argument("--coordinator-listen", default="127.0.0.1:18000")
    p.add_argument("--miner-ops-listen", default="127.0.0.1:18001")
    p.add_argument("--ledger-listen", default="127.0.0.1:26657")
    p.add_argument("--wallet-listen", default="unix",
                   help="'unix' (default: a socket in DATA_DIR/wallets/.daemon) or a loopback host:port")
    p.add_argument("--explorer-listen", default="127.0.0.1:18080", help="the web explorer's host:port")
    p.add_argument("--models", default="tiny-sd,tiny-llama", help="comma-separated models for the devnet miner")
    p.add_argument("--postgres", action="store_true",
                   help="keep the coordinators' jobs in a PostgreSQL server started in DATA_DIR/postgres (from the "
                        "system's postgresql package) instead of LMDB")
    p.add_argument("--coordinators", type=int, default=1, metavar="N",
                   help="run N coordinators on the one database (needs --postgres; the miner lists them all)")
    p.set_defaults(func=cmd_devnet)

    p = sub.add_parser("demo", help="start a devnet, run one image job end to end, verify its receipt, stop")
    p.add_argument("--data-dir", default=str(Path(os.environ.get("AITBC_HOME", "~/.aitbc")) / "demo"))
    p.add_argument("--models", default="tiny-sd")
    _add_image_args(p, prompt_default=DEFAULT_PROMPT)
    p.set_defaults(func=cmd_demo, steps=20, seed=7)

    p = sub.add_parser("submit", help="submit a job: an image (progress, PNG, receipt) or text (tokens as they come)")
    _add_image_args(p)
    p.set_defaults(output=None)
    _add_text_args(p)
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    p.add_argument("--quote", dest="quote_file", metavar="FILE", help="pay the job with this signed quote "
                   "(aitbc quote ... -o FILE): charged exactly its total from your escrow")
    p.add_argument("--fee", type=int, default=None, metavar="N", help="pay the job from your escrow with this "
                   "priority fee on top of the miner's price (quoted at submit); jobs with fees run first")
    _add_conn(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("quote", help="what a job would cost (units, price, miners), and a signed quote to submit it "
                       "with; queues nothing")
    _add_image_args(p)
    _add_text_args(p)
    p._option_string_actions["-o"].help = "write the signed quote here (submit it with aitbc submit ... --quote FILE)"
    p.add_argument("--priority-fee", type=int, default=None, metavar="N",
                   help="a fee on top of the miner's price, for a place ahead of cheaper jobs")
    _add_conn(p)
    p.set_defaults(func=cmd_quote, output=None)

    p = sub.add_parser("models", help="models served by connected miners")
    _add_conn(p)
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("hub", help="pool hub (runs inside the coordinator): `aitbc hub miners` lists miners")
    hsub = p.add_subparsers(dest="hub_command", metavar="run|miners|release", required=True)
    h = hsub.add_parser("run", help="run a pool hub: a coordinator (the hub runs inside it; docs/hub.md)")
    h.add_argument("--config", help="coordinator TOML (hub keys: verify_rate, verify_timeout_s, verify_tolerance, "
                   "stall_timeout_s, hub_id)")
    h.add_argument("--listen")
    h.add_argument("--port-file", help="write the bound port here once serving")
    h.set_defaults(func=cmd_coordinator)
    h = hsub.add_parser("miners", help="each miner's score, reputation, load, price, jobs served, verification results")
    h.add_argument("--json", action="store_true")
    _add_conn(h)
    h.set_defaults(func=cmd_hub_miners)
    h = hsub.add_parser("release", help="lift a miner's quarantine (operator API key); it starts on probation")
    h.add_argument("miner_id", help="the miner's ait1... address (aitbc hub miners)")
    _add_conn(h)
    h.set_defaults(func=cmd_hub_release)

    p = sub.add_parser("status", help="show a job")
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true", help="also print the full job as JSON")
    p.add_argument("--story", action="store_true",
                   help="also print every state transition with its time and cause (why it waited, moved or failed)")
    _add_conn(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("cancel", help="cancel an unfinished job")
    p.add_argument("job_id")
    p.add_argument("--reason", default="")
    _add_conn(p)
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("result", help="download a completed job's image(s)")
    p.add_argument("job_id")
    p.add_argument("-o", "--output", default="out.png")
    _add_conn(p)
    p.set_defaults(func=cmd_result)

    p = sub.add_parser("receipts", help="show receipts (`aitbc receipts verify FILE` checks one offline)")
    rsub = p.add_subparsers(dest="receipts_command", metavar="verify|proof")
    p.add_argument("--job-id", default="")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("-o", "--output", help="write receipt files here (several: FILE-1.json, FILE-2.json, ...) "
                   "instead of printing; `aitbc receipts verify FILE` checks one")
    p.add_argument("--json", action="store_true", help="print the receipts as JSON instead of a table")
    _add_conn(p)
    p.set_defaults(func=cmd_receipts)
    v = rsub.add_parser("verify", help="verify a receipt JSON file offline (no server)")
    v.add_argument("file")
    v.add_argument("--attester", action="append", help="require the attester to be this address (repeatable)")
    v.add_argument("--allow-unattested", action="store_true", help="accept a receipt without attestation")
    v.add_argument("--node", help="also check on this ledger node (host:port) that the receipt was minted; with "
                   "--proof and no PROOF_FILE, the node to fetch the proof from (default: $AITBC_LEDGER, else the "
                   "running devnet's)")
    v.add_argument("--proof", nargs="?", const="", metavar="PROOF_FILE",
                   help="check that the receipt was minted in a final block with a receipt proof (from PROOF_FILE, "
                   "offline; without one, fetched from --node), against --genesis alone")
    v.add_argument("--genesis", metavar="GENESIS_FILE", help="the chain's genesis file (its authority set), for --proof")
    v.set_defaults(func=cmd_receipts_verify)
    pr = rsub.add_parser("proof", help="write a receipt's proof (minted in a final block) from a ledger node")
    pr.add_argument("receipt", help="receipt hash (hex) or receipt JSON file")
    pr.add_argument("-o", "--output", required=True, help="the proof file to write (docs/ledger.md, \"Receipt proofs\")")
    pr.add_argument("--node", help="ledger node host:port (default: $AITBC_LEDGER, else the running devnet's, else "
                    "127.0.0.1:26657)")
    pr.set_defaults(func=cmd_receipts_proof)

    p = sub.add_parser("coordinator", help="run a coordinator")
    p.add_argument("--config", help="TOML file (keys: see README); AITBC_COORDINATOR_* env overrides")
    p.add_argument("--listen")
    p.add_argument("--port-file", help="write the bound port here once serving")
    p.set_defaults(func=cmd_coordinator)

    p = sub.add_parser("explorer", help="serve the web explorer: live blocks, transactions, accounts, receipts "
                       "(checked in the browser), the market (docs/explorer.md)")
    p.add_argument("--ledger", help="ledger node host:port (default: $AITBC_LEDGER, else the running devnet's, else "
                   "127.0.0.1:26657)")
    p.add_argument("--coordinator", help="coordinator host:port for the market page (default: $AITBC_COORDINATOR, "
                   "else the running devnet's)")
    p.add_argument("--listen", default="127.0.0.1:18080", help="host:port to serve on (default 127.0.0.1:18080)")
    p.add_argument("--data-dir", help="where the explorer keeps its index (default: $AITBC_HOME/explorer)")
    p.add_argument("--port-file", help="write the bound port here once serving")
    p.add_argument("--public", action="store_true", help="allow a non-loopback --listen (plain HTTP: put a TLS proxy "
                   "in front)")
    p.set_defaults(func=cmd_explorer)

    p = sub.add_parser("miner", help="run a miner daemon")
    p.add_argument("--config", help="TOML file (keys: see README); AITBC_MINER_* env overrides")
    p.add_argument("--coordinator", help="coordinator address (overrides the config)")
    p.add_argument("--port-file", help="write the bound ops port here once serving")
    p.set_defaults(func=cmd_miner)

    from aitbc.clients import chain_cli, wallet_cli

    chain_cli.register(sub)  # node, chain ...
    wallet_cli.register(sub)  # wallet ..., wallet-daemon
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from aitbc import rpc
    from aitbc.clients.sdk import ClientError

    try:  # what this process dials; `aitbc coordinator|miner|node|wallet-daemon` then apply their own config
        rpc.configure_tls(ca_file=args.tls_ca, names=rpc.FLAG_NAMES)
    except AitbcError as exc:
        return _fail(exc.message)
    command = getattr(args.func, "__name__", "cmd").removeprefix("cmd_")
    traced = _client_tracing(command)
    try:
        if not traced:
            return int(args.func(args) or 0)
        from aitbc import telemetry

        with telemetry.span(f"aitbc {command}"):  # the root of the trace a client command makes
            return int(args.func(args) or 0)
    except ClientError as exc:
        return _fail(f"{exc.code}: {exc.message}")
    except AitbcError as exc:
        return _fail(exc.message)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `aitbc ... | head`: the reader left; no traceback, the shell's 141
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    finally:
        if traced:
            from aitbc import telemetry

            telemetry.shutdown()  # flush the batch exporter before the process ends


# Long-running processes set up their own telemetry (service name, metrics endpoint, logs).
_SERVER_COMMANDS = frozenset({"coordinator", "miner", "node", "wallet_daemon", "devnet", "demo"})


def _client_tracing(command: str) -> bool:
    """Trace a client command only when AITBC_TRACING asks for it: off, the CLI never imports the
    OpenTelemetry SDK and behaves exactly as before."""
    if command in _SERVER_COMMANDS or os.environ.get("AITBC_TRACING", "").strip().lower() in ("", "none"):
        return False
    from aitbc import telemetry

    try:
        telemetry.configure("aitbc-cli")
    except (ValueError, RuntimeError) as exc:  # a typo in AITBC_TRACING must not break the command
        print(f"aitbc: tracing off: {exc}", file=sys.stderr)
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
