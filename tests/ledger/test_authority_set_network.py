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


async def test_receipt_proofs_across_two_set_changes_verify_offline_from_the_genesis_alone(tmp_path, capsys):
    """Ledger format 5, real nodes: the authorities vote NEW in, then AUTH[3] out; a receipt minted
    after each change gets its proof from a follower (GetReceiptProof), which carries the changes
    and checks out offline against the genesis file alone, also through `aitbc receipts verify`; a
    proof that leaves out a change, a forged boundary, a boundary certified by the wrong set and a
    wrong member list are each refused with their reason."""
    import dataclasses
    import json

    from aitbc import crypto
    from aitbc.clients.cli import main
    from aitbc.ledger import authorities
    from aitbc.ledger.block import decode_header
    from aitbc.ledger.genesis import Genesis
    from aitbc.ledger.proof import SetChange, decode_proof, verify_proof
    from aitbc.ledger.tx import make_mint

    from .helpers import ALICE, key, receipt

    g = genesis(4, block_time_ms=250, epoch_blocks=E)
    g.save(tmp_path / "genesis.json")
    pinned = Genesis.load(tmp_path / "genesis.json")  # what a light client holds
    first = await start_node(MemoryStore(), g, AUTH[0], "127.0.0.1:0")
    running = [first]
    try:
        for k in [*AUTH[1:], NEW]:
            running.append(await start_node(MemoryStore(), g, k, "127.0.0.1:0", peers=[addr(first[1])]))
        running.append(await start_node(MemoryStore(), g, None, "127.0.0.1:0", peers=[addr(first[1])]))
        nodes = [n for n, _ in running]
        follower = nodes[-1]
        await until(lambda: min(n.certified.height for n in nodes) >= 1, what="first certified blocks")

        async def mint_and_prove(i: int, nonce: int) -> tuple[bytes, bytes]:
            r = receipt(60 + i)
            await _broadcast(running[0][1], [make_mint(ALICE, g.ref, nonce, r)])
            await until(lambda: follower.chain.receipt_minted(r.receipt_hash) is not None
                        and follower.certified.height >= follower.chain.receipt_minted(r.receipt_hash)[0],
                        timeout=60, what=f"receipt {i} minted and certified on the follower")
            async with rpc.channel(addr(running[-1][1])) as ch:
                resp = await ledger_pb2_grpc.LedgerServiceStub(ch).GetReceiptProof(
                    ledger_pb2.GetReceiptProofRequest(receipt_hash=r.receipt_hash.hex()))
            assert resp.set_changes == len(decode_proof(resp.proof).changes) >= 1
            async with rpc.channel(addr(running[-1][1])) as ch:  # GetBlock shows each header's set chain
                got = await ledger_pb2_grpc.LedgerServiceStub(ch).GetBlock(
                    ledger_pb2.GetBlockRequest(height=resp.certified_height))
            assert got.block.header.set_chain == decode_header(decode_proof(resp.proof).headers[-1]).set_chain.hex()
            rfile = tmp_path / f"receipt{i}.json"
            rfile.write_text(json.dumps(r.to_json_dict()))
            return resp.proof, r.receipt_hash

        five = (*(aid(k) for k in AUTH), aid(NEW))
        four = (aid(AUTH[0]), aid(AUTH[1]), aid(AUTH[2]), aid(NEW))
        await _broadcast(running[1][1], [make_authority_vote(k, g.ref, 0, ACTION_ADD, NEW.address) for k in AUTH[:3]])
        await until(lambda: all(n.chain.current_authorities() == five for n in nodes), timeout=90, what="NEW in")
        proof1, rh1 = await mint_and_prove(1, 0)
        res1 = verify_proof(proof1, pinned, rh1)
        assert res1.set_changes >= 1 and res1.authorities == five
        first_change = decode_proof(proof1).changes[0]
        assert first_change.members == five and first_change.epoch <= g.epoch(res1.block_height)

        await _broadcast(running[0][1], [make_authority_vote(k, g.ref, 1, ACTION_REMOVE, AUTH[3].address)
                                         for k in AUTH[:3]]
                         + [make_authority_vote(NEW, g.ref, 0, ACTION_REMOVE, AUTH[3].address)])
        await until(lambda: all(n.chain.current_authorities() == four for n in nodes), timeout=90, what="AUTH[3] out")
        proof2, rh2 = await mint_and_prove(2, 1)
        res2 = verify_proof(proof2, pinned, rh2)
        p = decode_proof(proof2)
        assert res2.set_changes == len(p.changes) == 2 and res2.authorities == four
        assert [c.members for c in p.changes] == [five, four]
        for c in p.changes:  # each change's block is a final block of the follower's chain
            h = decode_header(c.header)
            assert follower.chain.hash_at(h.height) == h.hash and authorities.fixed_epoch(g, h.height) == c.epoch
        # the proof of receipt 1 still verifies (a light client never needs a newer genesis)
        assert verify_proof(proof1, pinned, rh1).block_height == res1.block_height

        c1, c2 = p.changes
        evil = [key(90 + i) for i in range(4)]
        evil_ids = tuple(aid(k) for k in evil)
        h2 = decode_header(c2.header)
        forged_header = dataclasses.replace(
            h2, set_chain=authorities.set_link(decode_header(c1.header).set_chain, c2.epoch, evil_ids)).encode()

        def cert_by(header: bytes, signers) -> bytes:
            h = decode_header(header)
            cp = finality.Checkpoint(h.height, h.hash, finality.PREPARE)
            return finality.make_certificate([finality.make_vote(k, g, cp, cp.at(finality.COMMIT))
                                              for k in signers]).encode()

        first_evil = min(evil, key=lambda k: crypto.sha256(k.pubkey)[:20]).address
        refused = {
            "a set change left out": (dataclasses.replace(p, changes=(c1,)),
                                      f"block {decode_header(p.headers[-1]).height}'s set chain does not match the "
                                      "proof's 1 set change(s): a set change is missing"),
            "the first set change left out": (dataclasses.replace(p, changes=(c2,)),
                                              f"set change 1 (epoch {c2.epoch}): block {h2.height}'s set chain does "
                                              "not match the listed sets"),
            "a forged boundary": (dataclasses.replace(p, changes=(c1, SetChange(c2.epoch, evil_ids, forged_header,
                                                                               cert_by(forged_header, evil)))),
                                  f"set change 2 (epoch {c2.epoch}) certificate: certificate refused: vote from "
                                  f"{first_evil}, which is not an authority"),
            "a boundary certified by the wrong set": (
                dataclasses.replace(p, changes=(SetChange(c1.epoch, c1.members, c1.header,
                                                          cert_by(c1.header, [AUTH[0], AUTH[1], NEW])), c2)),
                f"set change 1 (epoch {c1.epoch}) certificate: certificate refused: vote from {NEW.address}, which "
                "is not an authority"),
            "a wrong member list": (dataclasses.replace(p, changes=(c1, SetChange(c2.epoch, (*c2.members[:3], aid(
                AUTH[3])), c2.header, c2.certificate))), f"set change 2 (epoch {c2.epoch}): block {h2.height}'s set "
                "chain does not match the listed sets"),
        }
        for name, (bad, why) in refused.items():
            with pytest.raises(InvalidArgument, match="^" + why.replace("(", r"\(").replace(")", r"\)")):
                verify_proof(bad.encode(), pinned, rh2)
            assert name

        # the CLI, offline, with the genesis file alone
        run = asyncio.get_running_loop().run_in_executor
        pfile, bfile = tmp_path / "r2.proof", tmp_path / "bad.proof"
        pfile.write_bytes(proof2)
        bfile.write_bytes(refused["a set change left out"][0].encode())
        gfile, rfile = str(tmp_path / "genesis.json"), str(tmp_path / "receipt2.json")
        assert await run(None, main, ["receipts", "verify", rfile, "--proof", str(pfile), "--genesis", gfile]) == 0
        out = capsys.readouterr().out
        assert f"block {res2.block_height} is final" in out and "2 set change(s) since the genesis" in out
        assert NEW.address in out and AUTH[3].address not in out.split("the block's set:")[1]
        assert await run(None, main, ["receipts", "verify", rfile, "--proof", str(bfile), "--genesis", gfile]) == 1
        assert "INVALID PROOF" in capsys.readouterr().out
    finally:
        for n, s in reversed(running):
            await n.stop()
            await s.stop(0)
