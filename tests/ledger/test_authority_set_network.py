"""Authority set changes between real nodes (in-process, real loopback gRPC servers): 4 authorities
vote a 5th in (its node started as a follower with its key); it proposes in its slots once its
epoch comes and its votes count in certificates; every node agrees on the set at every height;
then they vote one out: it stops proposing, keeps following, and finality goes on. A certificate
of the new set verifies; one signed by the removed authority for a later epoch does not."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from aitbc import rpc
from aitbc.errors import InvalidArgument
from aitbc.ledger import finality
from aitbc.ledger.store import MemoryStore
from aitbc.ledger.tx import ACTION_ADD, ACTION_REMOVE, KIND_AUTHORITY_VOTE, make_authority_vote
from aitbc.server.ledger import start_node
from aitbc.v1 import ledger_pb2, ledger_pb2_grpc

from .auth_helpers import NEW, aid
from .helpers import AUTH, addr, genesis, until

pytestmark = pytest.mark.timeout(180)
E = 4


async def _broadcast(server, raws: list[bytes]) -> None:
    async with rpc.channel(addr(server)) as ch:
        res = await ledger_pb2_grpc.LedgerServiceStub(ch).BroadcastTransactions(
            ledger_pb2.BroadcastTransactionsRequest(raws=raws))
        assert all(r.accepted for r in res.results), [r.error for r in res.results]


async def test_authorities_vote_one_in_and_one_out():
    g = genesis(4, block_time_ms=300, epoch_blocks=E)
    first = await start_node(MemoryStore(), g, AUTH[0], "127.0.0.1:0")
    running = [first]
    try:
        for k in AUTH[1:]:
            running.append(await start_node(MemoryStore(), g, k, "127.0.0.1:0", peers=[addr(first[1])]))
        running.append(await start_node(MemoryStore(), g, NEW, "127.0.0.1:0", peers=[addr(first[1])]))
        running.append(await start_node(MemoryStore(), g, None, "127.0.0.1:0", peers=[addr(first[1])]))
        nodes = [n for n, _ in running]
        newcomer, follower = nodes[4], nodes[5]
        await until(lambda: min(n.certified.height for n in nodes) >= 2, what="first certified blocks")
        assert not newcomer.in_authority_set() and newcomer.produced == 0

        # three of four (more than 2/3) vote NEW in
        await _broadcast(running[1][1], [make_authority_vote(k, g.ref, 0, ACTION_ADD, NEW.address) for k in AUTH[:3]])
        await until(lambda: all(aid(NEW) in n.chain.current_authorities() for n in nodes), timeout=90,
                    what="NEW in the set everywhere")
        joined = min(h for h in range(1, follower.chain.head.height + 2)
                     if aid(NEW) in (follower.chain.authorities_at(h) or ()))
        assert joined % E == 1 and g.epoch(joined) >= 2  # the first block of an epoch, two epochs after the votes
        await until(lambda: newcomer.produced >= 1 and min(n.certified.height for n in nodes) >= joined + 2 * E,
                    timeout=90, what="NEW to propose and blocks of its epochs to be certified")
        chain = follower.chain
        by_new = [h for h in range(joined, chain.final_height + 1)
                  if chain.block_at(h).header.proposer == aid(NEW)]
        assert by_new, "NEW proposed no final block"

        # then all five but AUTH[3]... four of five (more than 2/3) vote AUTH[3] out
        await _broadcast(running[0][1], [make_authority_vote(k, g.ref, 1, ACTION_REMOVE, AUTH[3].address)
                                         for k in AUTH[:3]]
                         + [make_authority_vote(NEW, g.ref, 0, ACTION_REMOVE, AUTH[3].address)])
        await until(lambda: all(aid(AUTH[3]) not in n.chain.current_authorities() for n in nodes), timeout=90,
                    what="AUTH[3] out of the set everywhere")
        left = min(h for h in range(joined, follower.chain.head.height + 2)
                   if aid(AUTH[3]) not in (follower.chain.authorities_at(h) or ()))
        assert left % E == 1
        # AUTH[2] stops: the three left (AUTH[0], AUTH[1], NEW) are exactly q of the 4, so every
        # certificate from now on carries NEW's vote, and finality goes on
        stopped_node, stopped_server = running.pop(2)
        await stopped_node.stop()
        await stopped_server.stop(0)
        nodes = [n for n, _ in running]
        c0 = max(n.certified.height for n in nodes)
        await until(lambda: min(n.certified.height for n in nodes) >= max(c0, left) + 2 * E, timeout=90,
                    what="certification by AUTH[0], AUTH[1] and NEW")
        chain = follower.chain
        top = chain.final_height
        cert = finality.decode_certificate(chain.certificate(chain.hash_at(top)))
        s = chain.authorities_at(cert.target.height)  # the set of the certificate's target block's epoch
        assert s == (aid(AUTH[0]), aid(AUTH[1]), aid(AUTH[2]), aid(NEW))
        assert aid(NEW) in {v for v, _ in cert.signatures}
        finality.verify_certificate(cert, g, block=finality.Checkpoint(top, chain.hash_at(top), finality.COMMIT),
                                    authorities=s)
        # the removed authority proposes nothing from its epoch on, and still follows the chain
        assert all(chain.block_at(h).header.proposer != aid(AUTH[3]) for h in range(left, top + 1))
        removed = nodes[2]
        assert removed.key is AUTH[3] and not removed.in_authority_set()
        await until(lambda: removed.chain.final_height >= top, what="the removed authority to follow")

        # every node agrees on the set at every height
        upto = min(n.chain.head.height for n in nodes)
        for h in range(1, upto + 1):
            assert len({n.chain.authorities_at(h) for n in nodes}) == 1, h

        # a certificate signed by the removed authority for a block of a later epoch does not verify
        src = finality.Checkpoint(top - 1, chain.hash_at(top - 1), finality.COMMIT)
        tgt = finality.Checkpoint(top, chain.hash_at(top), finality.PREPARE)
        forged = finality.make_certificate(finality.make_vote(k, g, src, tgt) for k in (AUTH[0], AUTH[1], AUTH[3]))
        with pytest.raises(InvalidArgument, match=f"certificate refused: vote from {AUTH[3].address}, which is not "
                                                  "an authority"):
            finality.verify_certificate(forged, g, authorities=chain.authorities_at(top))
        with pytest.raises(InvalidArgument, match="which is not an authority"):
            follower.receive_certificate(forged.encode())
        # and its votes are refused over gRPC
        vote = finality.make_vote(AUTH[3], g, src, tgt)
        assert "not an authority" in follower.submit_votes([vote.encode()])[0].message

        # GetAuthorities: the set of a height's epoch, and its proposals
        async with rpc.channel(addr(running[-1][1])) as ch:
            stub = ledger_pb2_grpc.LedgerServiceStub(ch)
            now = await stub.GetAuthorities(ledger_pb2.GetAuthoritiesRequest())
            assert list(now.authorities) == [AUTH[0].address, AUTH[1].address, AUTH[2].address, NEW.address]
            assert now.epoch_blocks == E and now.epoch == g.epoch(now.height)
            then = await stub.GetAuthorities(ledger_pb2.GetAuthoritiesRequest(height=1))
            assert list(then.authorities) == [k.address for k in AUTH] and then.epoch == 0
            # the epoch the removal was voted in has ended: its votes were deleted from the state by
            # its last block (GetAuthorities lists none), and the blocks still carry all four
            voted = g.epoch(left) - 2
            props = await stub.GetAuthorities(ledger_pb2.GetAuthoritiesRequest(height=voted * E + 1))
            assert list(props.proposals) == [] and props.epoch == voted
            cast = [t for h in range(voted * E + 1, (voted + 1) * E + 1) for t in chain.block_at(h).txs
                    if t.kind == KIND_AUTHORITY_VOTE and t.action == ACTION_REMOVE]
            assert {t.subject_address for t in cast} == {AUTH[3].address}
            assert {t.sender for t in cast} == {AUTH[0].address, AUTH[1].address, AUTH[2].address, NEW.address}
    finally:
        for n, s in reversed(running):
            await n.stop()
            await s.stop(0)


@pytest.mark.slow
async def test_cli_votes_an_authority_in_and_shows_the_set(tmp_path):
    import asyncio
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "aitbc.clients.chain_cli", *args], capture_output=True,
                              text=True, cwd=root, timeout=60)

    gpath = tmp_path / "genesis.json"
    keyfile = tmp_path / "a.key"
    keyfile.write_text(AUTH[0].secret.hex() + "\n")
    r = cli("chain", "init", "--chain-id", "sets-cli", "--authority", str(keyfile), "--epoch-blocks", "2",
            "--block-time", "0.2", "--out", str(gpath))
    assert r.returncode == 0, r.stderr
    assert json.loads(gpath.read_text())["epoch_blocks"] == 2
    bad = cli("chain", "init", "--authority", str(keyfile), "--epoch-blocks", "0", "--out", str(tmp_path / "x.json"))
    assert bad.returncode == 2 and "genesis epoch_blocks must be an integer in [1, 2^32-1]" in bad.stderr
    from aitbc.ledger.genesis import Genesis

    g = Genesis.load(gpath)
    node, server = await start_node(MemoryStore(), g, AUTH[0], "127.0.0.1:0")
    try:
        target = addr(server)
        shown = await asyncio.to_thread(cli, "chain", "authorities", "--node", target)
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["authorities"] == [AUTH[0].address]
        voted = await asyncio.to_thread(cli, "chain", "vote-authority", "add", NEW.address, "--key", str(keyfile),
                                        "--node", target)
        assert voted.returncode == 0, voted.stderr
        assert json.loads(voted.stdout)["subject"] == NEW.address
        await until(lambda: aid(NEW) in node.chain.current_authorities(), what="NEW in the set")
        now = json.loads((await asyncio.to_thread(cli, "chain", "authorities", "--node", target)).stdout)
        assert now["authorities"] == [AUTH[0].address, NEW.address] and now["epoch_blocks"] == "2"
        old = json.loads((await asyncio.to_thread(cli, "chain", "authorities", "--height", "1", "--node",
                                                  target)).stdout)
        assert old["authorities"] == [AUTH[0].address] and old["epoch"] == "0"
        again = await asyncio.to_thread(cli, "chain", "vote-authority", "add", NEW.address, "--key", str(keyfile),
                                        "--node", target)
        assert again.returncode == 1 and "authority vote refused" in again.stderr
    finally:
        await node.stop()
        await server.stop(0)


async def test_a_byzantine_authority_cannot_push_more_than_k_proposals_per_epoch():
    """One authority of two (within f of its own blocks: it proposes every other block) floods
    AUTHORITY_VOTEs for random subjects through BroadcastTransaction(s) over real gRPC: the mempool
    takes K of a batch, the chain refuses a (K+1)th proposal in one epoch, no block of either
    proposer carries more than K of its proposals per epoch, and the state of every node holds the
    votes of the current epoch only (the boundaries deleted the others)."""
    from aitbc.ledger import authorities

    from .helpers import key

    k_max = authorities.MAX_PROPOSALS_PER_VOTER
    e_blocks = 6
    g = genesis(2, block_time_ms=200, epoch_blocks=e_blocks)
    byz = AUTH[0]
    first = await start_node(MemoryStore(), g, byz, "127.0.0.1:0")
    running = [first]
    try:
        running.append(await start_node(MemoryStore(), g, AUTH[1], "127.0.0.1:0", peers=[addr(first[1])]))
        nodes = [n for n, _ in running]
        honest = nodes[1]
        await until(lambda: min(n.chain.head.height for n in nodes) >= 1, what="first blocks")
        fresh = iter(key(1000 + i) for i in range(10_000))
        async with rpc.channel(addr(running[1][1])) as ch:
            stub = ledger_pb2_grpc.LedgerServiceStub(ch)
            # a batch of 3K votes, consecutive nonces: the mempool takes K and refuses the rest
            batch = [make_authority_vote(byz, g.ref, i, ACTION_ADD, next(fresh).address) for i in range(3 * k_max)]
            res = await stub.BroadcastTransactions(ledger_pb2.BroadcastTransactionsRequest(raws=batch))
            assert [r.accepted for r in res.results] == [True] * k_max + [False] * (2 * k_max)
            assert all(r.error.startswith(f"too many proposals: {byz.address} has {k_max} authority votes pending")
                       and r.code == "FAILED_PRECONDITION" for r in res.results[k_max:])
            start = honest.chain.head.height
            # then one at a time with its next nonce, until the chain refused a (K+1)th proposal in an
            # epoch and two epoch boundaries have passed
            chain_refusals: list[str] = []
            for _ in range(1200):
                if chain_refusals and honest.chain.head.height >= start + 2 * e_blocks + 1:
                    break
                acct = await stub.GetAccount(ledger_pb2.GetAccountRequest(address=byz.address))
                raw = make_authority_vote(byz, g.ref, acct.pending_nonce, ACTION_ADD, next(fresh).address)
                try:
                    await stub.BroadcastTransaction(ledger_pb2.BroadcastTransactionRequest(raw=raw))
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc.details()
                    assert exc.details().startswith(f"too many proposals: {byz.address} "), exc.details()
                    if "already voted for" in exc.details():
                        chain_refusals.append(exc.details())
                await asyncio.sleep(0.03)
            else:
                raise AssertionError("the flood never met the chain's cap over two epochs")
        assert chain_refusals[0].startswith(f"too many proposals: {byz.address} already voted for {k_max} proposals "
                                            "in epoch ")
        for n, s in reversed(running):  # stop: read each node's chain and state at rest
            await n.stop()
            await s.stop(0)
        running = []
        chain = honest.chain
        per_epoch: dict[int, list[bytes]] = {}
        for h in range(1, chain.head.height + 1):
            for t in chain.block_at(h).txs:
                if t.kind == KIND_AUTHORITY_VOTE and t.sender == byz.address:
                    per_epoch.setdefault(g.epoch(h), []).append(t.subject)
        assert per_epoch and max(len(v) for v in per_epoch.values()) == k_max
        assert all(len(set(v)) == len(v) <= k_max for v in per_epoch.values()), per_epoch
        assert len(per_epoch) >= 2  # the flood filled more than one epoch, K each at most
        for n in nodes:
            now = g.epoch(n.chain.head.height + 1)
            records = [k for p in (authorities.AVOT, authorities.APRP, authorities.AVTR)
                       for k, _ in n.chain.store.scan(p)]
            assert all(int.from_bytes(k[8:16], "big") == now for k in records), "votes of a past epoch are left"
            assert len(list(n.chain.store.scan(authorities.AVOT))) <= 2 * k_max  # n x K
    finally:
        for n, s in reversed(running):
            await n.stop()
            await s.stop(0)
