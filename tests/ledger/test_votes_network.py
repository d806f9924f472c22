"""Finality votes between real nodes (in-process, real loopback gRPC servers): 4 authorities and a
follower sign and gossip votes, certify blocks by more than 2/3, and serve the certificates in
GetBlock, GetHead and StreamBlocks, where anyone holding the genesis can verify them; one of 4
down, certification goes on; a follower joining late verifies the certificates it catches up
with; SubmitVotes refuses bad votes each with a clear status."""

from __future__ import annotations

import asyncio

import pytest

from aitbc import crypto, rpc
from aitbc.errors import InvalidArgument
from aitbc.ledger import finality
from aitbc.ledger.store import MemoryStore
from aitbc.server.ledger import start_node
from aitbc.v1 import ledger_pb2, ledger_pb2_grpc

from .helpers import AUTH, BOB, addr, genesis, until

pytestmark = pytest.mark.timeout(120)
P, C = finality.PREPARE, finality.COMMIT


async def test_four_authorities_certify_blocks_and_anyone_can_verify():
    g = genesis(4, block_time_ms=300)
    stores = [MemoryStore() for _ in AUTH]
    first = await start_node(stores[0], g, AUTH[0], "127.0.0.1:0")
    running = [first]
    try:
        for k, st in zip(AUTH[1:], stores[1:], strict=True):
            running.append(await start_node(st, g, k, "127.0.0.1:0", peers=[addr(first[1])]))
        running.append(await start_node(MemoryStore(), g, None, "127.0.0.1:0", peers=[addr(first[1])]))
        nodes = [n for n, _ in running]
        await until(lambda: min(n.certified.height for n in nodes) >= 4, what="certified blocks everywhere")
        # every node's certified block is on one chain, and each certificate verifies from the genesis alone
        for n in nodes:
            c = n.certified
            assert all(m.chain.hash_at(c.height) == c.hash for m in nodes if m.chain.head.height >= c.height)
        async with rpc.channel(addr(running[4][1])) as ch:
            stub = ledger_pb2_grpc.LedgerServiceStub(ch)
            head = await stub.GetHead(ledger_pb2.GetHeadRequest())
            assert head.certified_height >= 4 and head.certified_hash
            blk = (await stub.GetBlock(ledger_pb2.GetBlockRequest(height=head.certified_height))).block
            assert blk.header.hash == head.certified_hash
            cert = finality.decode_certificate(blk.certificate)
            finality.verify_certificate(cert, g, block=finality.Checkpoint(blk.header.height,
                                                                           bytes.fromhex(blk.header.hash), C))
            assert len(cert.signatures) >= 3

            # bad votes, each refused with its reason
            tip = nodes[0].chain.head
            src, tgt = finality.Checkpoint(0, g.hash(), C), finality.Checkpoint(tip.height, tip.hash, P)
            other = genesis(4, block_time_ms=300, genesis_time_ms=1)
            bad = [
                finality.make_vote(BOB, g, src, tgt).encode(),
                finality.make_vote(AUTH[1], other, finality.Checkpoint(0, other.hash(), C), tgt).encode(),
                finality.make_vote(AUTH[1], g, src, finality.Checkpoint(tip.height + 50, b"\x01" * 32, P)).encode(),
                b"\x01junk",
            ]
            res = (await stub.SubmitVotes(ledger_pb2.SubmitVotesRequest(votes=bad))).results
            assert [(r.accepted, r.code) for r in res] == [
                (False, "PERMISSION_DENIED"), (False, "INVALID_ARGUMENT"), (False, "NOT_FOUND"),
                (False, "INVALID_ARGUMENT")]
            assert "not an authority" in res[0].error and res[1].error.startswith("wrong genesis")
            assert res[2].error.startswith("vote for an unknown block")

        # one of four down: the other three are still more than 2/3
        down_node, down_server = running.pop(3)
        await down_node.stop()
        await down_server.stop(0)
        nodes = [n for n, _ in running]
        c0 = max(n.certified.height for n in nodes)
        await until(lambda: min(n.certified.height for n in nodes) >= c0 + 4, what="certification with 3 of 4")

        # a follower joining late gets the certificates with the blocks it catches up with, and checks them
        late = await start_node(MemoryStore(), g, None, "127.0.0.1:0", peers=[addr(running[1][1])])
        running.append(late)
        await until(lambda: late[0].certified.height >= c0, what="the late follower to verify certificates")
        got = late[0].chain.certificate(late[0].certified.hash)
        assert got is not None
        finality.verify_certificate(finality.decode_certificate(got), g, block=late[0].certified)
        # an old block's certificate (its votes are long gone) came with the block from a peer, and was
        # checked (peers may hold different certificates for one block: other signers, or the other form)
        lc = late[0].chain
        old = next(h for h in range(1, c0 + 1) if lc.certificate(lc.hash_at(h) or b"") is not None)
        got_old = lc.certificate(lc.hash_at(old))
        assert any(n.chain.certificate(lc.hash_at(old)) == got_old for n, _ in running[:3])
        finality.verify_certificate(finality.decode_certificate(got_old), g,
                                    block=finality.Checkpoint(old, lc.hash_at(old), C))
        with pytest.raises(InvalidArgument, match="too few signers"):
            forged = finality.decode_certificate(got_old)
            late[0].receive_certificate(finality.Certificate(forged.source, forged.target, forged.signatures[:2]).encode())

        # the stopped authority restarts on its data: it remembers its certified block and its vote lock
        lock = stores[3].get(b"v1:vote:lock")
        assert lock is not None
        back = await start_node(stores[3], g, AUTH[3], "127.0.0.1:0", peers=[addr(running[0][1])])
        running.append(back)
        assert back[0].certified.height >= 4 and (back[0].voter.last_target, back[0].voter.last_source) == \
            back[0].chain.vote_lock()
        c1 = max(n.certified.height for n, _ in running)
        await until(lambda: back[0].certified.height >= c1 + 2, what="the restarted authority to certify again")
    finally:
        for n, s in reversed(running):
            await n.stop()
            await s.stop(0)


async def test_a_byzantine_voter_is_convicted_on_chain_and_finality_goes_on():
    """AUTH[3] runs no honest node: the test signs, with its key, two conflicting votes on the real
    chain (one target checkpoint height, two links) and sends one to one node and the other to
    another. Blocks are final within their own slot, so to give the votes a block that is not final
    yet, one honest authority is stopped first (two honest votes are below q = 3: nothing finalizes
    while it is down). The nodes' gossip brings both votes together, an authority puts the evidence
    on chain, everyone ignores AUTH[3] from then on (for blocks from the evidence block up),
    GetAccount shows it, and once the stopped authority is back the three honest ones certify again,
    although one of AUTH[3]'s votes had completed a quorum the others were locked on."""
    g = genesis(4, block_time_ms=300)
    first = await start_node(MemoryStore(), g, AUTH[0], "127.0.0.1:0")
    running = [first]
    store2 = MemoryStore()
    try:
        running.append(await start_node(MemoryStore(), g, AUTH[1], "127.0.0.1:0", peers=[addr(first[1])]))
        running.append(await start_node(store2, g, AUTH[2], "127.0.0.1:0", peers=[addr(first[1])]))
        running.append(await start_node(MemoryStore(), g, None, "127.0.0.1:0", peers=[addr(first[1])]))
        nodes = [n for n, _ in running]
        await until(lambda: min(n.certified.height for n in nodes) >= 3, what="certification by 3 of 4")
        stopped, server2 = running.pop(2)
        await stopped.stop()
        await server2.stop(0)
        nodes = [n for n, _ in running]
        chain = nodes[0].chain
        c = nodes[0].certified
        await until(lambda: chain.head.height >= c.height + 2, what="blocks above the certified one")
        tgt_h = chain.head.height
        tgt = finality.Checkpoint(tgt_h, chain.hash_at(tgt_h), P)
        # v1 is the honest authorities' own link ((c, commit) -> (tgt, prepare)): with their two votes it
        # justifies (tgt, prepare) where it arrives, and they lock on it; the stopped authority never
        # saw it, and must still be able to count it after the evidence (votes for blocks below the
        # evidence block still count), or the three honest ones could never agree again
        v1 = finality.make_vote(AUTH[3], g, finality.Checkpoint(c.height, c.hash, C), tgt)
        v2 = finality.make_vote(AUTH[3], g, finality.Checkpoint(c.height, c.hash, P), tgt)
        assert finality.conflict(v1, v2) == "double vote"
        for (_, server), vote in ((running[0], v1), (running[1], v2)):
            async with rpc.channel(addr(server)) as ch:
                res = await ledger_pb2_grpc.LedgerServiceStub(ch).SubmitVotes(
                    ledger_pb2.SubmitVotesRequest(votes=[vote.encode()]))
                assert res.results[0].accepted, res.results[0].error
        culprit = v1.voter
        await until(lambda: all(culprit in n.tally.ignored for n in nodes), what="everyone to ignore the culprit")
        async with rpc.channel(addr(running[2][1])) as ch:
            stub = ledger_pb2_grpc.LedgerServiceStub(ch)
            acct = await stub.GetAccount(ledger_pb2.GetAccountRequest(address=AUTH[3].address))
            assert acct.evidence_height > 0
            tx = await stub.GetTransaction(ledger_pb2.GetTransactionRequest(hash=acct.evidence_tx))
            assert tx.transaction.kind == ledger_pb2.TRANSACTION_KIND_EVIDENCE
            assert tx.transaction.convicted == AUTH[3].address
        # its votes are refused from then on, and the honest three keep certifying
        fresh = finality.make_vote(AUTH[3], g, finality.Checkpoint(0, g.hash(), C),
                                   finality.Checkpoint(chain.head.height, chain.head.hash, P))
        assert "ignored" in nodes[1].submit_votes([fresh.encode()])[0].message
        running.append(await start_node(store2, g, AUTH[2], "127.0.0.1:0", peers=[addr(first[1])]))
        nodes = [n for n, _ in running]
        await until(lambda: culprit in nodes[-1].tally.ignored, what="the restarted authority to read the evidence")
        c0 = max(n.certified.height for n in nodes)
        await until(lambda: min(n.certified.height for n in nodes) >= c0 + 3, what="certification after evidence")
        top = min(n.certified.height for n in nodes)
        assert len({n.chain.hash_at(top) for n in nodes}) == 1
    finally:
        for n, s in reversed(running):
            await n.stop()
            await s.stop(0)


async def test_a_caller_sending_invalid_votes_is_refused_and_others_are_not():
    """Checking a vote's signature costs CPU: junk votes (here signed by the wrong key in an
    authority's name) cost the calling host tokens, and once its budget is spent its SubmitVotes
    calls are refused RESOURCE_EXHAUSTED (with a retry-after) before any vote is checked; another
    host's votes still count."""
    import time

    import grpc

    from aitbc.ledger import node as node_mod

    g = genesis(4, block_time_ms=300)
    n, server = await start_node(MemoryStore(), g, AUTH[0], "127.0.0.1:0")
    try:
        src, tgt = finality.Checkpoint(0, g.hash(), C), finality.Checkpoint(1, b"\x02" * 32, P)
        honest = finality.make_vote(AUTH[1], g, src, tgt)
        forged = finality.Vote(honest.chain_id, honest.genesis_hash, src, tgt, honest.voter,
                               BOB.sign(honest.digest())).encode()
        async with rpc.channel(addr(server)) as ch:
            stub = ledger_pb2_grpc.LedgerServiceStub(ch)
            spent, refused, t0 = 0, None, time.monotonic()
            for _ in range(12):  # the bucket refills while batches are checked: spend until refused
                try:
                    res = (await stub.SubmitVotes(ledger_pb2.SubmitVotesRequest(votes=[forged] * 1024))).results
                except grpc.aio.AioRpcError as exc:
                    refused = exc
                    break
                assert {(r.accepted, r.code) for r in res} == {(False, "INVALID_ARGUMENT")}
                assert res[0].error.startswith("bad vote signature: not signed by")
                spent += len(res)
            assert refused is not None, f"never refused after {spent} invalid votes"
            # not before the burst was spent, and not much after (the refill during the checks)
            assert node_mod.INVALID_VOTES_BURST <= spent <= node_mod.INVALID_VOTES_BURST + 1024 + \
                node_mod.INVALID_VOTES_PER_S * (time.monotonic() - t0)
            assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "too many invalid votes from 127.0.0.1: retry in" in refused.details()
            assert rpc.error_from_rpc(refused).retry_after_s > 0
        # another host is not affected: its (valid) vote is checked and kept for its unknown block
        [err] = n.submit_votes([honest.encode()], caller="10.0.0.2")
        assert err is not None and err.code == "NOT_FOUND" and "kept until it arrives" in err.message
    finally:
        await n.stop()
        await server.stop(0)


async def test_a_byzantine_proposer_signs_two_blocks_for_its_slot_and_votes_for_both():
    """AUTH[3] runs no honest node. In one of its slots the test signs, with its key, two different
    blocks on the same parent, sends one to node 0 and the other to node 2, and votes for each on
    the side that has it. The nodes see the equivocation as the blocks spread, converge on one of
    them, put the double vote on chain as evidence and ignore AUTH[3], keep certifying with the
    three honest authorities, and no two nodes ever hold different final blocks at one height."""
    import dataclasses
    import time

    from aitbc.ledger import state
    from aitbc.ledger.block import Header, make_block, tx_root

    bt = 300
    g = genesis(4, block_time_ms=bt)
    first = await start_node(MemoryStore(), g, AUTH[0], "127.0.0.1:0")
    running = [first]

    def no_conflicting_finals() -> None:
        for a, _ in running:
            for b, _ in running:
                h = min(a.chain.final_height, b.chain.final_height)
                assert a.chain.hash_at(h) == b.chain.hash_at(h), f"conflicting final blocks at height {h}"

    async def until_safe(pred, what: str) -> None:
        for _ in range(1200):
            no_conflicting_finals()
            if pred():
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}")

    try:
        for k in AUTH[1:3]:
            running.append(await start_node(MemoryStore(), g, k, "127.0.0.1:0", peers=[addr(first[1])]))
        running.append(await start_node(MemoryStore(), g, None, "127.0.0.1:0", peers=[addr(first[1])]))
        nodes = [n for n, _ in running]
        await until_safe(lambda: min(n.certified.height for n in nodes) >= 3, "certification by 3 of 4")
        # wait for a slot of AUTH[3] (which nobody honest fills), a little into it
        slot = int(time.time() * 1000) // bt + 1
        while slot % 4 != 3:
            slot += 1
        await asyncio.sleep(max(0.0, (slot * bt + 60) / 1000 - time.time()))
        parent = nodes[0].chain.head
        header = Header(g.chain_id, g.hash(), parent.height + 1, parent.hash, slot, slot * bt + 1,
                        crypto.sha256(AUTH[3].pubkey)[:20], tx_root([]),
                        state.state_root(parent.state_root, parent.height + 1, {}), parent.set_chain, 0)
        x = make_block(header, AUTH[3], [])
        y = make_block(dataclasses.replace(header, timestamp_ms=slot * bt + 2), AUTH[3], [])
        assert x.hash != y.hash
        assert await nodes[0].receive_blocks([x.raw]) == ["extended"]
        assert (await nodes[2].receive_blocks([y.raw]))[0] in ("extended", "reorg", "side")
        source = nodes[0].tally.highest_justified()
        vx = finality.make_vote(AUTH[3], g, source, finality.Checkpoint(x.height, x.hash, P))
        vy = finality.make_vote(AUTH[3], g, source, finality.Checkpoint(y.height, y.hash, P))
        assert nodes[0].submit_votes([vx.encode()]) == [None]
        assert nodes[2].submit_votes([vy.encode()])[0] is None
        culprit = vx.voter
        await until_safe(lambda: all(culprit in n.tally.ignored for n in nodes), "everyone to ignore the culprit")
        await until_safe(lambda: any(n.chain.equivocations for n in nodes), "the two blocks to meet")
        c0 = max(n.certified.height for n in nodes)
        await until_safe(lambda: min(n.chain.final_height for n in nodes) >= c0 + 3, "finality after the equivocation")
        top = min(n.chain.final_height for n in nodes)
        assert top > x.height and len({n.chain.hash_at(x.height) for n in nodes}) == 1
        assert nodes[0].chain.hash_at(x.height) in (x.hash, y.hash)  # one of the twins won everywhere
    finally:
        for n, s in reversed(running):
            await n.stop()
            await s.stop(0)


async def test_a_lone_authority_killed_right_after_locking_a_vote_votes_again_after_restart():
    """A kill -9 just after a commit vote's lock reached the disk and before the certificate that
    vote made did: the lock names as source (head, prepare), above the certified block. After the restart the tally
    must know that checkpoint is justified (its votes were saved when it was justified), or the authority
    may never vote again and finality stops for good (what a crash-loop test hit)."""
    from aitbc.ledger.chain import VOTE_LOCK

    class DiesAfterLocking(MemoryStore):
        """Commits reach the 'disk' until the first vote-lock commit after arm(); nothing after it."""

        def __init__(self) -> None:
            super().__init__()
            self.armed = self.dead = False

        def commit(self, writes) -> None:  # type: ignore[no-untyped-def]
            if self.dead:
                return
            super().commit(writes)
            if self.armed and VOTE_LOCK in writes and int.from_bytes(writes[VOTE_LOCK][8:], "big") % 2 == 0:
                self.dead = True  # a commit vote's lock: its source is (head, prepare), justified just now

    g = genesis(1, block_time_ms=100)
    store = DiesAfterLocking()
    n, s = await start_node(store, g, AUTH[0], "127.0.0.1:0")
    try:
        await until(lambda: n.certified.height >= 5, what="certification")
        store.armed = True
        await until(lambda: store.dead, what="the next vote lock")
    finally:
        await n.stop()
        await s.stop(0)
    disk = MemoryStore()
    disk.commit(dict(store.scan(b"")))
    lock_source = int.from_bytes(disk.get(VOTE_LOCK)[8:], "big")  # a checkpoint height (2 x block + phase)
    certified = int.from_bytes(disk.get(b"v1:certified")[:8], "big")
    assert lock_source > 2 * certified + 1  # the state that stalled a restarted authority: above (certified, commit)
    n, s = await start_node(disk, g, AUTH[0], "127.0.0.1:0")
    try:
        await until(lambda: n.certified.height >= lock_source // 2 + 2, timeout=20,
                    what="certification after the restart")
    finally:
        await n.stop()
        await s.stop(0)


async def test_stream_blocks_reports_a_block_final_in_its_own_slot_without_waiting_for_the_next():
    """Ledger format 4 makes a block final after it was streamed (its commit round follows it), so
    StreamBlocks sends a message without blocks whenever the final height moved: a follower,
    explorer or wallet on the stream learns of finality at once, not with the next block."""
    from aitbc.ledger.chain import Chain

    from .helpers import certify

    g = genesis(4, block_time_ms=300)
    scratch = Chain(MemoryStore(), g)
    slot = g.genesis_time_ms // g.block_time_ms
    for _ in range(3):
        slot += 1
        scratch.build_block(AUTH[slot % 4], slot, slot * g.block_time_ms + 10, [])
    n, s = await start_node(MemoryStore(), g, None, "127.0.0.1:0")
    try:
        assert await n.receive_blocks([scratch.block_raw_at(h) for h in (1, 2, 3)]) == ["extended"] * 3
        async with rpc.channel(addr(s)) as ch:
            stream = ledger_pb2_grpc.LedgerServiceStub(ch).StreamBlocks(ledger_pb2.StreamBlocksRequest(from_height=1))
            first = await asyncio.wait_for(stream.read(), 10)
            assert [b.header.height for b in first.blocks] == [1, 2, 3] and first.finalized_height == 0
            n.receive_certificate(certify(scratch, g, 3))  # block 3's commit round, as its votes would make it
            nxt = await asyncio.wait_for(stream.read(), 10)
            assert list(nxt.blocks) == [] and nxt.finalized_height == 3 and nxt.head_height == 3
            stream.cancel()
    finally:
        await n.stop()
        await s.stop(0)
