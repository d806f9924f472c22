"""Chaos: a network of real processes under steady mixed load while processes are killed -9,
paused (SIGSTOP 10 s) and restarted at random; afterwards the invariants a user relies on.

Network: 4 authorities + 1 follower (ledger; finality by votes of more than 2/3, so one
authority down or paused at a time leaves three to finalize), a coordinator settling through the
follower, 3 miners (null image and null-text backends: everything real but the models, so the CPU
goes to the protocol). Load: image and text jobs (every fourth paid from miner0's escrow, which it
tops up from what it earns), token transfers. Bounded: AITBC_CHAOS_PERTURBATIONS (default 50)
perturbations about a second apart, then recovery and checks with timeouts: besides nothing lost
and nodes agreeing, every receipt minted once, every fee settled once (one SETTLE per receipt and
per quote, for exactly the job's fee), and the supply invariant (minted - burned = balances +
escrowed) on the chain as replayed from its transactions.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import defaultdict
from pathlib import Path

import grpc
import pytest

from aitbc import crypto, jobs
from aitbc.clients.retry import RetryPolicy
from aitbc.clients.sdk import ClientError, CoordinatorClient, image_params
from aitbc.coordinator import eventlog
from aitbc.ledger import tx as txmod
from aitbc.v1 import job_pb2, ledger_pb2, ledger_pb2_grpc, receipt_pb2
from tests.fault.cluster import API_KEY, Cluster, Proc

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
PERTURBATIONS = int(os.environ.get("AITBC_CHAOS_PERTURBATIONS", "50"))
RECOVERY_S = 20.0


class Load:
    """Steady mixed load from background threads; records what the network accepted."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.accepted: list[str] = []
        self.paid: list[str] = []  # accepted jobs with a fee
        self.refused = 0
        self.transfers_sent = 0
        self.deposits_sent = 0
        self.sink = crypto.PrivateKey.generate()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._jobs, daemon=True),
                        threading.Thread(target=self._transfers, daemon=True),
                        threading.Thread(target=self._escrow, daemon=True)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)

    def _jobs(self) -> None:
        rng = random.Random(1)
        # retried (same request id) for a few seconds at most, so that finish() stays prompt
        client = CoordinatorClient(self.cluster.coordinator_target, API_KEY, timeout=3.0,
                                   retry=RetryPolicy(total_s=5.0))
        i = 0
        while not self.stop.wait(0.2):
            i += 1
            try:
                if i % 4 == 3:  # paid: a priority fee from miner0's escrow (refused while it is too low)
                    job = client.submit(
                        "null", image_params(f"chaos paid {i}", width=64, height=64, steps=4, seed=i),
                        request_id=f"paid-{i}", priority_fee=2)
                    self.paid.append(job.job_id)
                elif i % 2:
                    job = client.submit_image(f"chaos image {i}", model="null", images=rng.choice((1, 2)), seed=i,
                                              width=64, height=64, steps=4, request_id=f"img-{i}")
                else:
                    job = client.submit_text(f"chaos text {i}", model="null-text", max_new_tokens=24, seed=i,
                                             request_id=f"txt-{i}")
                self.accepted.append(job.job_id)
            except ClientError:
                self.refused += 1  # coordinator down or paused: the job was never accepted
        client.close()

    def _escrow(self) -> None:
        """miner0 moves half of what it holds into its escrow for the coordinator, now and then."""
        key = self.cluster.miner_keys[0]
        while not self.stop.wait(2.0):
            node = self.cluster.nodes[-1]
            try:
                with grpc.insecure_channel(node.target) as ch:
                    stub = ledger_pb2_grpc.LedgerServiceStub(ch)
                    acct = stub.GetAccount(ledger_pb2.GetAccountRequest(address=key.address), timeout=2)
                    if acct.balance < 40:
                        continue
                    raw = txmod.make_escrow_deposit(key, self.cluster.chain_ref, acct.pending_nonce,
                                                    self.cluster.coord_key.address, acct.balance // 2)
                    stub.BroadcastTransaction(ledger_pb2.BroadcastTransactionRequest(raw=raw), timeout=2)
                    self.deposits_sent += 1
            except grpc.RpcError:
                pass  # node down or paused, or a nonce race with a transfer: nothing moved

    def _transfers(self) -> None:
        rng = random.Random(2)
        while not self.stop.wait(1.0):
            key = rng.choice(self.cluster.miner_keys)
            node = rng.choice(self.cluster.nodes)
            try:
                with grpc.insecure_channel(node.target) as ch:
                    stub = ledger_pb2_grpc.LedgerServiceStub(ch)
                    acct = stub.GetAccount(ledger_pb2.GetAccountRequest(address=key.address), timeout=2)
                    if acct.balance < 10:
                        continue
                    raw = txmod.make_transfer(key, self.cluster.chain_ref, acct.pending_nonce, self.sink.address, rng.randint(1, 5))
                    stub.BroadcastTransaction(ledger_pb2.BroadcastTransactionRequest(raw=raw), timeout=2)
                    self.transfers_sent += 1
            except grpc.RpcError:
                pass  # node down, paused or nonce race: a transfer that was refused moved nothing


def perturb(cluster: Cluster, rng: random.Random, log: list[str]) -> None:
    """Kill -9 + restart, SIGSTOP for 10 s, or restart, on random processes; at most one authority
    disturbed at a time (a second one would halt finality by design: 2 of 4 are not more than 2/3)."""
    paused_until: dict[str, float] = {}
    timers: list[threading.Timer] = []
    for n in range(PERTURBATIONS):
        now = time.monotonic()
        disturbed_auth = any(p.kind == "authority" and paused_until.get(p.name, 0) > now for p in cluster.procs)
        choices = [p for p in cluster.procs if paused_until.get(p.name, 0) <= now
                   and not (p.kind == "authority" and disturbed_auth)]
        p: Proc = rng.choice(choices)
        action = rng.choice(("kill9", "kill9", "pause", "restart"))
        if action == "pause":
            p.pause()
            paused_until[p.name] = now + 10.0
            t = threading.Timer(10.0, p.resume)
            t.start()
            timers.append(t)
        else:
            if action == "restart":
                p.stop()
            took = p.restart(RECOVERY_S)
            log.append(f"{n}: {action} {p.name}: healthy again after {took:.1f} s")
            if p.kind == "authority":
                paused_until[p.name] = time.monotonic() + 3.0  # let it catch up before the next authority hit
        if action == "pause":
            log.append(f"{n}: pause {p.name} 10 s")
        time.sleep(rng.uniform(0.5, 1.5))
    for t in timers:
        t.join()


def chain_view(target: str, upto: int) -> tuple[list[tuple[str, str]], list[ledger_pb2.Transaction]]:
    hashes, txs = [], []
    with grpc.insecure_channel(target) as ch:
        stub = ledger_pb2_grpc.LedgerServiceStub(ch)
        for h in range(1, upto + 1):
            b = stub.GetBlock(ledger_pb2.GetBlockRequest(height=h, include_transactions=True), timeout=5)
            hashes.append((b.block.header.hash, b.block.header.state_root))
            txs.extend(b.transactions)
    return hashes, txs


def head(target: str) -> ledger_pb2.GetHeadResponse:
    with grpc.insecure_channel(target) as ch:
        return ledger_pb2_grpc.LedgerServiceStub(ch).GetHead(ledger_pb2.GetHeadRequest(), timeout=5)


def test_chaos_nothing_lost_minted_once_nodes_agree(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    cluster.start()
    load = Load(cluster)
    rng = random.Random(int(os.environ.get("AITBC_CHAOS_SEED", "7")))
    events: list[str] = []
    try:
        load.start()
        time.sleep(3)  # steady state first
        perturb(cluster, rng, events)
        load.finish()

        # every process recovers: anything dead is restarted, anything paused resumed
        for p in cluster.procs:
            p.resume()
            if not p.alive():
                p.restart(RECOVERY_S)
            p.wait_healthy(RECOVERY_S)
        worst = max((t for p in cluster.procs for t in p.recovery_s), default=0.0)
        assert worst <= RECOVERY_S

        # every accepted job ends COMPLETED, CANCELLED or FAILED with a reason: none vanished
        client = CoordinatorClient(cluster.coordinator_target, API_KEY, timeout=5.0)
        deadline = time.monotonic() + 240
        final: dict[str, job_pb2.Job] = {}
        while len(final) < len(load.accepted) and time.monotonic() < deadline:
            for job_id in load.accepted:
                if job_id not in final:
                    job = client.get_job(job_id)
                    if job.state in jobs.TERMINAL:
                        final[job_id] = job
            time.sleep(0.5)
        missing = [j for j in load.accepted if j not in final]
        assert not missing, f"{len(missing)} accepted jobs never finished, e.g. {missing[:3]}"
        for job in final.values():
            assert job.state in (job_pb2.JOB_STATE_COMPLETED, job_pb2.JOB_STATE_CANCELLED, job_pb2.JOB_STATE_FAILED)
            if job.state != job_pb2.JOB_STATE_COMPLETED:
                assert job.error, f"job {job.job_id} ended {jobs.state_name(job.state)} without a reason"
        completed = [j for j in final.values() if j.state == job_pb2.JOB_STATE_COMPLETED]
        assert len(completed) >= len(final) // 2, "most jobs should complete despite the chaos"

        # every completed job's receipt is minted, exactly once, and final
        deadline = time.monotonic() + 240
        receipts: dict[str, receipt_pb2.Receipt] = {}
        settled: set[str] = set()
        while len(settled) < len(completed) and time.monotonic() < deadline:
            for job in completed:
                if job.job_id not in settled:
                    recs, _ = client.receipts(job_id=job.job_id)  # a split job has one per shard
                    if all(r.settlement.state == receipt_pb2.SETTLEMENT_STATE_FINAL for r in recs):
                        settled.add(job.job_id)
                        receipts.update({r.receipt_hash: r for r in recs})
            time.sleep(0.5)
        unsettled = [j.job_id for j in completed if j.job_id not in settled]
        if unsettled:
            states = [(r.settlement.state, r.settlement.error, r.settlement.tx_hash)
                      for j in unsettled[:5] for r in client.receipts(job_id=j)[0]]
            pools = {n.name: (head(n.target).mempool_size, head(n.target).head.height, head(n.target).finalized_height)
                     for n in cluster.nodes}
            raise AssertionError(f"{len(unsettled)} receipts not final: {states}; nodes (mempool, head, final): {pools}")
        client.close()

        # all nodes agree on block hashes and state roots at every height up to the common final height
        time.sleep(2)
        common = min(head(n.target).finalized_height for n in cluster.nodes)
        assert common > 0
        views = [chain_view(n.target, common) for n in cluster.nodes]
        for n, (hashes, _) in zip(cluster.nodes[1:], views[1:], strict=True):
            assert hashes == views[0][0], f"{n.name} disagrees with {cluster.nodes[0].name}"

        # minted once; balances = mints - transfers out + transfers in
        top = head(cluster.nodes[0].target).head.height
        _, txs = chain_view(cluster.nodes[0].target, top)
        mints_by_receipt: dict[str, int] = defaultdict(int)
        balance: dict[str, int] = defaultdict(int)
        escrowed: dict[str, int] = defaultdict(int)
        minted = 0
        for t in txs:
            if t.kind in (ledger_pb2.TRANSACTION_KIND_MINT, ledger_pb2.TRANSACTION_KIND_SETTLE):
                mints_by_receipt[t.receipt_hash] += 1
                balance[t.provider] += t.mint_amount + t.fee
                escrowed[t.client_address] -= t.fee
                minted += t.mint_amount
            elif t.kind == ledger_pb2.TRANSACTION_KIND_TRANSFER:
                balance[t.sender] -= t.amount
                balance[t.to] += t.amount
            elif t.kind == ledger_pb2.TRANSACTION_KIND_ESCROW_DEPOSIT:
                balance[t.sender] -= t.amount
                escrowed[t.sender] += t.amount
        assert all(c == 1 for c in mints_by_receipt.values()), "a receipt was minted twice"
        for rec in receipts.values():
            assert mints_by_receipt[rec.receipt_hash] == 1
        # every fee settled once: one SETTLE per quote, each paid job's receipt carries its fee
        settles = [t for t in txs if t.kind == ledger_pb2.TRANSACTION_KIND_SETTLE]
        assert len({t.quote_hash for t in settles}) == len(settles), "a quote was settled twice"
        fee_of = {t.receipt_hash: t.fee for t in settles}
        paid_done = [final[j] for j in load.paid if j in final and final[j].state == job_pb2.JOB_STATE_COMPLETED]
        for job in paid_done:
            [rec] = [r for r in receipts.values() if r.body.job_id == job.job_id]
            assert rec.settlement.fee in (job.fee, 0), (job.fee, rec.settlement)  # 0: the escrow could not pay
            assert fee_of.get(rec.receipt_hash, 0) == rec.settlement.fee
        with grpc.insecure_channel(cluster.nodes[0].target) as ch:
            stub = ledger_pb2_grpc.LedgerServiceStub(ch)
            for addr in {*balance, *(k.address for k in cluster.miner_keys), load.sink.address}:
                acct = stub.GetAccount(ledger_pb2.GetAccountRequest(address=addr), timeout=5)
                assert acct.balance == balance[addr]
                assert sum(e.available + e.unlocking for e in acct.escrows) == escrowed[addr]
            # the supply invariant (nothing burned without a SLASH; no transaction came after `top`, as above)
            sup = stub.GetSupply(ledger_pb2.GetSupplyRequest(), timeout=5)
            assert sup.minted == minted and sup.burned == 0
            assert sup.supply == sum(balance.values()) + sum(escrowed.values()) and sup.escrowed == sum(escrowed.values())
        # each client receipt's settled amount is its MINT's on chain (re-executions by the hub's
        # verification are minted too, under their own receipts)
        mint_amount = {t.receipt_hash: (t.provider, t.mint_amount) for t in txs
                       if t.kind in (ledger_pb2.TRANSACTION_KIND_MINT, ledger_pb2.TRANSACTION_KIND_SETTLE)}
        for rec in receipts.values():
            assert mint_amount[rec.receipt_hash] == (rec.body.provider, rec.settlement.amount)
        # the coordinator's job machine, replayed from the events it logged (restarts included),
        # decides every transition again exactly as it did under the chaos
        replayed = eventlog.replay(eventlog.lines(cluster.event_log))
        assert replayed.starts >= 1 and replayed.transitions >= len(load.accepted)
        assert not replayed.mismatches, replayed.mismatches
        if os.environ.get("AITBC_CHAOS_KEEP_EVENTS"):  # how tests/vectors/coordinator/ logs are made
            import shutil

            shutil.copy(cluster.event_log, os.environ["AITBC_CHAOS_KEEP_EVENTS"])
        print(f"chaos: {PERTURBATIONS} perturbations, {replayed.calls} machine calls replayed identically, {len(load.accepted)} jobs accepted ({load.refused} refused "
              f"while the coordinator was down), {len(completed)} completed, {len(receipts)} minted once, "
              f"{len(load.paid)} paid jobs accepted ({len(settles)} SETTLEs), {load.deposits_sent} escrow deposits, "
              f"{load.transfers_sent} transfers sent, chain height {top}, worst recovery {worst:.1f} s")
        print("\n".join(events))
    finally:
        load.stop.set()
        cluster.stop()
