"""Verification by re-execution: which results are re-run, and what the runs decide.

The rules are aitbc.hub.verification's (keyed sampling, majority arbitration); this unit applies
them to stored jobs. A sampled job's receipt is HELD; its re-execution is a job of its own
(client "hub-verify", `verify_of` set) queued through the job machine. When the runs are done the
majority decides: agreeing receipts are released, outvoted ones rejected (through the receipt
book), the miners' reputation updated, and a REPLACED job gets the agreed result. Two runs are
compared byte for byte (within the pixel tolerance on GPUs), units included, except a stacked text
miner's run against a re-execution that returned a token trace: `compare_stacked` (docs/hub.md,
"Text from stacked miners", "Units after a divergence").

Trust bootstrap (docs/hub.md): a miner is established once it passed `trust_checks` verifications
(and is neither on probation nor quarantined), or from the start when the operator lists it in
`trusted_miners`. Every result of a miner not yet established is re-executed; re-executions and
referees run only on established miners; and only established miners' runs vote: an unproven run
passes when it matches what the established runs agree on, so any number of fresh keys cannot
outvote one established miner. An unproven miner's result that no established miner re-executed
in time is not minted (the client keeps the result).

Decided once (docs/scaling.md, "What exists today (fifth slice)"): on a store several coordinators
share, the decision over an original job's runs is taken by the one coordinator that claims
(job, number of runs) first (`JobStore.decide_once`): reputation, receipts and verdicts change once.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable

from aitbc import jobs, metrics
from aitbc.coordinator.machine import Submit
from aitbc.coordinator.receipt_book import ReceiptBook
from aitbc.coordinator.store import JobStore
from aitbc.hub.reputation import ReputationBook
from aitbc.hub.verification import (
    DEFAULT_TEXT_EPSILON,
    TextTrace,
    Verdict,
    compare_artifacts,
    compare_stacked,
    majority,
    sample_key,
    should_verify,
)
from aitbc.v1 import job_pb2, receipt_pb2

log = logging.getLogger("aitbc.coordinator")
S = job_pb2.JobState
V = job_pb2.VerificationState
VERIFY_CLIENT = "hub-verify"  # client id of re-execution jobs: no client sees them
VERDICT_META = "verdict:"  # cheater's receipt hash -> the honest receipts' hashes: a SLASH to send
MAX_HONEST = 15  # a SLASH carries at most 16 receipts (docs/ledger.md)


class Verifier:
    def __init__(self, store: JobStore, book: ReceiptBook, reputation: ReputationBook, *, rate: float,
                 tolerance: float, load: Callable[[str], job_pb2.Job | None],
                 record: Callable[[str, bool], None], now_ms: Callable[[], int],
                 trust_checks: int = 0, trusted: frozenset[str] = frozenset(),
                 text_epsilon: float = DEFAULT_TEXT_EPSILON) -> None:
        self.store = store
        self.book = book
        self.reputation = reputation
        self.rate = rate
        self.tolerance = tolerance
        self.text_epsilon = text_epsilon  # a constant calibrated on CPU float32 (aitbc.hub.verification)
        self.trust_checks = trust_checks
        self.trusted = trusted
        self.load = load  # a job by id, active (the machine's record) or stored
        self.record = record  # (miner, passed) -> reputation, with the runtime's follow-ups
        self.now_ms = now_ms
        # keyed sampling: miners cannot tell which of their jobs will be checked; one secret for every
        # coordinator on a shared store (the first one's), so a result is sampled the same everywhere
        self.secret = store.first_meta("verify_secret", secrets.token_bytes(32))

    def established(self, miner_id: str) -> bool:
        """May this miner re-execute others' jobs, and does its run vote? (module docstring)"""
        if miner_id in self.trusted or self.trust_checks <= 0:
            return True
        rec = self.reputation.snapshot(miner_id)
        return rec.verifications_passed >= self.trust_checks and not rec.probation_left and not rec.quarantined

    def sampled(self, miner_id: str, job: job_pb2.Job) -> bool:
        """Is this original result re-executed? Every one while the miner is not established or on
        probation, else its next sampling draw at verify_rate (the draw is counted by record_success)."""
        if job.verify_of:
            return False
        if not self.established(miner_id):
            return True
        if self.rate <= 0:
            return False
        rec = self.reputation.snapshot(miner_id)
        return rec.probation_left > 0 or should_verify(sample_key(miner_id, rec.draws), self.rate, secret=self.secret)

    def runs(self, orig: job_pb2.Job) -> list[job_pb2.Job]:
        """The original job and its re-executions."""
        out = [orig]
        for vid in orig.verification_job_ids:
            v = self.load(vid)
            if v is not None:
                out.append(v)
        return out

    def placement(self, orig: job_pb2.Job, extra: str = "", *, without: str = "") -> tuple[frozenset[str], str]:
        """Where a re-execution may run: never on a miner that ran the job (`extra` too; the run
        `without` does not count); on the original's device class."""
        ran = {r.miner_id for r in self.runs(orig) if r.miner_id and r.job_id != without}
        return frozenset(ran | ({extra} if extra else set())), orig.device_class

    def new_run(self, orig: job_pb2.Job, *, ran_on: str = "", device_class: str = "") -> Submit:
        """A re-execution of `orig` (whose result came from `ran_on`). Marks orig PENDING; the
        returned Submit stores orig with the new job in one transaction."""
        v = job_pb2.Job(job_id=jobs.new_job_id(), model=orig.model, params=orig.params, client_id=VERIFY_CLIENT,
                        created_at_unix_ms=self.now_ms(), prompt_hash=orig.prompt_hash, verify_of=orig.job_id,
                        traceparent=orig.traceparent,
                        # a stacked miner's text is judged against the re-executor's exact run and its trace
                        want_text_trace=orig.text_batching == job_pb2.TEXT_BATCHING_STACKED)
        exclude, device = self.placement(orig, ran_on)
        orig.verification = V.VERIFICATION_STATE_PENDING
        orig.verification_job_ids.append(v.job_id)
        return Submit(v, cause=f"re-execution of job {orig.job_id}", exclude=exclude,
                      device_class=device_class or device or None)

    def _artifacts(self, job: job_pb2.Job) -> list[bytes]:
        out = []
        for a in job.artifacts:  # a decision compares whole images: read them (the GC keeps them meanwhile)
            f = self.store.open_artifact(a.sha256)
            if f is None:
                out.append(b"")
                continue
            with f:
                out.append(f.read())
        return out

    def _evidence(self, job: job_pb2.Job) -> list[bytes]:
        """What two runs of a job must agree on: the outputs, and the units their receipts claim
        (a text run that streamed the same text but counted more tokens does not agree)."""
        return [*self._artifacts(job), f"{job.unit_type}={job.units}".encode()]

    def _compare(self, a: job_pb2.Job, b: job_pb2.Job, exact: bool) -> Verdict:
        """Do two runs of a job agree? A stacked miner's text against a run that returned a trace:
        compare_stacked (the text up to a near-tie, and the units rule: docs/hub.md, "Units after a
        divergence"); any other pair: compare_artifacts on the evidence (outputs and units)."""
        for stacked, ref in ((a, b), (b, a)):
            if stacked.text_batching == job_pb2.TEXT_BATCHING_STACKED and ref.HasField("text_trace"):
                try:
                    trace = TextTrace.from_proto(self._text(ref), ref.text_trace)
                except ValueError as exc:  # checked when it arrived: only a lost artifact gets here
                    return Verdict(False, 1.0, f"the re-execution's trace cannot be read: {exc}")
                return compare_stacked(trace, (ref.prompt_tokens, ref.generated_tokens), self._text(stacked),
                                       (stacked.prompt_tokens, stacked.generated_tokens), epsilon=self.text_epsilon)
        return compare_artifacts(self._evidence(a), self._evidence(b), exact=exact, tolerance=self.tolerance)

    def _text(self, job: job_pb2.Job) -> str:
        arts = self._artifacts(job)
        return arts[0].decode("utf-8", "replace") if arts else ""

    def run_ended(self, v: job_pb2.Job) -> Submit | None:
        """A re-execution ended: decide by majority, or start a referee (returned), or give up unverified."""
        orig = self.store.get_job(v.verify_of)
        if orig is not None and orig.verification == V.VERIFICATION_STATE_PENDING:
            return self.decide(orig)
        return None

    def _release(self, runs: list[job_pb2.Job], outvoted: frozenset[str], reason: str) -> None:
        """Release the held receipts of runs that agreed; reject those that were outvoted."""
        for run in runs:
            rec = self.book.get(run.receipt_hash) if run.receipt_hash else None
            if rec is None or rec.settlement.state != receipt_pb2.SETTLEMENT_STATE_HELD:
                continue
            if run.miner_id in outvoted:
                self.book.reject(rec, f"failed verification: {reason}")
            else:
                self.book.release(rec)

    def decide(self, orig: job_pb2.Job) -> Submit | None:
        all_runs = self.runs(orig)
        if any(r.state in jobs.ACTIVE for r in all_runs):
            return None
        if not self.store.decide_once(orig.job_id, len(all_runs)):  # another coordinator decides these runs
            log.info("job %s: its verification over %d runs is decided by another coordinator", orig.job_id,
                     len(all_runs))
            return None
        stored = self.store.get_job(orig.job_id)  # decided meanwhile by one that claimed the runs and then died
        if stored is None or stored.verification != V.VERIFICATION_STATE_PENDING \
                or len(stored.verification_job_ids) != len(orig.verification_job_ids):
            return None
        runs = [r for r in all_runs if r.state == S.JOB_STATE_COMPLETED]
        exact = all(r.device_class != "cuda" for r in runs)  # CPU runs byte for byte; GPU ones within a tolerance
        voters = [r for r in runs if self.established(r.miner_id)]
        unproven = [r for r in runs if not self.established(r.miner_id)]
        outcome = self._vote(voters, unproven, exact)
        if outcome is None:  # two established runs disagree: a third (established) miner referees, once
            if len(all_runs) < 3:
                referee = self.new_run(orig)
                return Submit(referee.job, cause=f"referee for job {orig.job_id}", exclude=referee.exclude,
                              device_class=referee.device_class, also_store=(orig,))
        if outcome is None or outcome == "unverified":
            orig.verification = V.VERIFICATION_STATE_UNVERIFIED
            metrics.VERIFICATIONS.labels(outcome="unverified").inc()
            self.store.write([orig])
            # an established miner's result stands; an unproven one's is not minted on its own word
            self._release(runs, frozenset(r.miner_id for r in unproven),
                          "no established miner re-executed it in time (docs/hub.md, \"Trust bootstrap\")")
            log.info("job %s stays unverified (%d usable executions, %d by established miners)", orig.job_id,
                     len(runs), len(voters))
            return None
        agreed, outvoted = outcome
        for r in runs:
            self.record(r.miner_id, r.miner_id not in outvoted)
        winner = next(r for r in runs if r.miner_id in agreed)
        if orig.miner_id in outvoted:
            # the client gets the verified result; the first miner's receipt is not minted
            orig.verification = V.VERIFICATION_STATE_REPLACED
            metrics.VERIFICATIONS.labels(outcome="replaced").inc()
            del orig.artifacts[:]
            orig.artifacts.extend(winner.artifacts)
            log.warning("job %s: miner %s failed verification; result replaced by %s's", orig.job_id,
                        orig.miner_id, winner.miner_id)
        else:
            orig.verification = V.VERIFICATION_STATE_PASSED
            metrics.VERIFICATIONS.labels(outcome="passed").inc()
        self.store.write([orig])
        self._release(runs, outvoted, f"its result differs from {len(agreed)} other executions")
        self._record_verdicts(runs, agreed, outvoted, exact)
        return None

    def _record_verdicts(self, runs: list[job_pb2.Job], agreed: frozenset[str], outvoted: frozenset[str],
                         exact: bool) -> None:
        """Proven cheating becomes a SLASH (sent by settlement, docs/economy.md "Slashing"): each
        outvoted run's receipt with the receipts of the established runs that outvoted it. Runs
        that outvoted it as unproven miners do not count as proof, and neither does a mismatch an
        honest run can make (a stacked run that counted more tokens after a near-tie: not `proven`)."""
        honest = [r.receipt_hash for r in runs if r.miner_id in agreed and r.receipt_hash
                  and self.established(r.miner_id)][:MAX_HONEST]
        if not honest:
            return
        winner = next(r for r in runs if r.miner_id in agreed)
        for r in runs:
            if r.miner_id in outvoted and r.receipt_hash:
                verdict = self._compare(winner, r, exact)
                if not verdict.proven:
                    log.warning("miner %s: outvoted on job %s without proof of cheating (no SLASH): %s", r.miner_id,
                                r.job_id, verdict.reason)
                    continue
                self.store.put_meta(VERDICT_META + r.receipt_hash, " ".join(honest).encode())
                log.warning("miner %s: verdict recorded for a SLASH (receipt %s, outvoted by %d established runs)",
                            r.miner_id, r.receipt_hash, len(honest))

    def _vote(self, voters: list[job_pb2.Job], unproven: list[job_pb2.Job],
              exact: bool) -> tuple[frozenset[str], frozenset[str]] | str | None:
        """(agreed, outvoted) miner ids; "unverified" when nothing can decide; None when a referee
        is needed. Only established runs vote: two or more decide by majority among themselves; one
        is the reference when the run it checks is unproven. An unproven run passes when it matches
        the reference."""
        if len(voters) >= 2:
            by_id = {r.miner_id: r for r in voters}
            verdict = majority(by_id, lambda a, b: self._compare(by_id[a], by_id[b], exact).match)
            if not verdict.decided:
                return None
            agreed, outvoted = set(verdict.agreed), set(verdict.outvoted)
        elif len(voters) == 1 and unproven:
            agreed, outvoted = {voters[0].miner_id}, set()
        else:
            return "unverified"
        reference = next(r for r in voters if r.miner_id in agreed)
        for r in unproven:
            same = self._compare(reference, r, exact).match
            (agreed if same else outvoted).add(r.miner_id)
        return frozenset(agreed), frozenset(outvoted)

    def reconcile_held(self) -> list[Submit]:
        """Receipts held for a verification that can no longer progress (the coordinator was killed
        between two of its steps) are decided or released now: a held MINT never waits forever."""
        out = []
        for rec in self.store.held_receipts():
            job = self.load(rec.body.job_id)
            orig = (self.load(job.verify_of) if job.verify_of else job) if job is not None else None
            if orig is None or any(r.state in jobs.ACTIVE for r in self.runs(orig)):
                continue
            if orig.verification == V.VERIFICATION_STATE_PENDING:
                referee = self.decide(orig)
                if referee is not None:
                    out.append(referee)
            else:  # decided before the crash: release what agrees with the job's final result
                runs = [r for r in self.runs(orig) if r.state == S.JOB_STATE_COMPLETED]
                if orig.verification == V.VERIFICATION_STATE_REPLACED:  # the final result is a re-execution's
                    final = self._artifacts(orig)
                    outvoted = {r.miner_id for r in runs[1:] if self._artifacts(r) != final} | {orig.miner_id}
                else:  # the original's own result stands: the runs that agree with it as decide() compares
                    exact = all(r.device_class != "cuda" for r in runs)
                    outvoted = {r.miner_id for r in runs[1:] if not self._compare(orig, r, exact).match}
                self._release(runs, frozenset(outvoted), "its result differs from the verified one")
        return out
