"""GetReceiptProof over real nodes (in-process, real loopback gRPC servers, 4 authorities so that
certificates form): a receipt minted while only one authority runs has no proof yet
(FAILED_PRECONDITION "not final yet"), an unknown one is NOT_FOUND; once the others join and
certify, the proof (from an authority, or from a follower that joined later) verifies offline from
the genesis alone and every tampered variant is refused;
`aitbc receipts proof` writes it and `aitbc receipts verify --proof` checks it, from the file or
fetched from the node."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from aitbc import rpc
from aitbc.errors import InvalidArgument
from aitbc.ledger import finality
from aitbc.ledger.genesis import Genesis
from aitbc.ledger.proof import ReceiptProof, decode_proof, verify_proof
from aitbc.ledger.store import MemoryStore
from aitbc.ledger.tx import make_mint
from aitbc.server.ledger import start_node
from aitbc.v1 import ledger_pb2, ledger_pb2_grpc

from .helpers import ALICE, AUTH, addr, genesis, receipt, until

pytestmark = pytest.mark.timeout(120)


async def test_receipt_proof_from_real_nodes_verifies_offline_and_tampering_is_refused(tmp_path, capsys):
    from aitbc.clients.cli import main

    g = genesis(4, block_time_ms=250)
    first = await start_node(MemoryStore(), g, AUTH[0], "127.0.0.1:0")
    running = [first]
    node = first[0]
    r = receipt(41)
    rh = r.receipt_hash
    try:
        async with rpc.channel(addr(first[1])) as ch:
            stub = ledger_pb2_grpc.LedgerServiceStub(ch)
            await stub.BroadcastTransaction(ledger_pb2.BroadcastTransactionRequest(raw=make_mint(ALICE, g.ref, 0, r)))
            await until(lambda: node.chain.receipt_minted(rh) is not None, what="the MINT in a block")
            height = node.chain.receipt_minted(rh)[0]
            # one authority of four certifies nothing: no proof yet, and the message says what to wait for
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.GetReceiptProof(ledger_pb2.GetReceiptProofRequest(receipt_hash=rh.hex()))
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert err.value.details().startswith(f"not final yet: receipt {rh.hex()} is in block {height}")
            assert f"retry after height {height} is certified" in err.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.GetReceiptProof(ledger_pb2.GetReceiptProofRequest(receipt_hash=receipt(42).receipt_hash.hex()))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND and "was never minted" in err.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.GetReceiptProof(ledger_pb2.GetReceiptProofRequest(receipt_hash="zz"))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

            for k in AUTH[1:]:
                running.append(await start_node(MemoryStore(), g, k, "127.0.0.1:0", peers=[addr(first[1])]))
            await until(lambda: node.certified.height >= height, what="the MINT's block to be certified")
            resp = await stub.GetReceiptProof(ledger_pb2.GetReceiptProofRequest(receipt_hash=rh.hex()))
        assert resp.block_height == height and resp.certified_height >= height
        # a follower that caught up later (certificates came with the blocks) serves a proof too
        late = await start_node(MemoryStore(), g, None, "127.0.0.1:0", peers=[addr(running[1][1])])
        running.append(late)
        await until(lambda: late[0].certified.height >= height, what="the follower to verify certificates")
        async with rpc.channel(addr(late[1])) as ch:
            from_follower = await ledger_pb2_grpc.LedgerServiceStub(ch).GetReceiptProof(
                ledger_pb2.GetReceiptProofRequest(receipt_hash=rh.hex()))
        assert verify_proof(from_follower.proof, g, rh).block_height == height

        # offline: the genesis file alone (a fresh copy, as a light client holds it)
        g.save(tmp_path / "genesis.json")
        pinned = Genesis.load(tmp_path / "genesis.json")
        res = verify_proof(resp.proof, pinned, rh)
        assert (res.block_height, res.certified_height, res.certified_hash.hex()) == \
            (height, resp.certified_height, resp.certified_hash)
        assert res.tx_hash.hex() == resp.tx_hash and res.amount == 100 * 10
        p = decode_proof(resp.proof)
        cert = finality.decode_certificate(p.certificate)
        tampered = {
            "a flipped tx byte": (ReceiptProof(p.tx[:-1] + bytes([p.tx[-1] ^ 1]), p.tx_index, p.path, p.headers,
                                               p.certificate), "proof transaction: bad signature"),
            "a flipped tx root": (ReceiptProof(p.tx, p.tx_index, p.path, (p.headers[0][:-72] + bytes(
                [p.headers[0][-72] ^ 1]) + p.headers[0][-71:],) + p.headers[1:], p.certificate), "merkle path"),
            "a sibling too many": (ReceiptProof(p.tx, p.tx_index, (*p.path, b"\x00" * 32), p.headers, p.certificate),
                                   "merkle path has"),
            "two signers": (ReceiptProof(p.tx, p.tx_index, p.path, p.headers, finality.Certificate(
                cert.source, cert.target, cert.signatures[:2]).encode()), "proof certificate: certificate has too few"),
            "an extra header above the certified one": (ReceiptProof(p.tx, p.tx_index, p.path, (*p.headers, p.headers[0]),
                                                                     p.certificate), "header chain is broken"),
        }
        for name, (bad, why) in tampered.items():
            with pytest.raises(InvalidArgument, match="^" + why):
                verify_proof(bad.encode(), pinned, rh)
            assert name
        with pytest.raises(InvalidArgument, match="^proof transaction: wrong genesis"):
            verify_proof(resp.proof, genesis(4, block_time_ms=250, genesis_time_ms=1), rh)

        # the CLI: write the proof, check it offline, and check it fetched from the node
        rfile, pfile = tmp_path / "receipt.json", tmp_path / "receipt.proof"
        rfile.write_text(json.dumps(r.to_json_dict()))
        run = asyncio.get_running_loop().run_in_executor
        node_addr = addr(first[1])
        assert await run(None, main, ["receipts", "proof", rh.hex(), "-o", str(pfile), "--node", node_addr]) == 0
        assert "wrote " in capsys.readouterr().err and pfile.read_bytes().startswith(b"AITBC-RP")
        gfile = str(tmp_path / "genesis.json")
        assert await run(None, main, ["receipts", "verify", str(rfile), "--proof", str(pfile), "--genesis", gfile]) == 0
        out = capsys.readouterr().out
        assert "VALID receipt" in out and f"block {height} is final" in out and "checked offline against genesis" in out
        assert await run(None, main, ["receipts", "verify", str(rfile), "--proof", "--genesis", gfile,
                                      "--node", node_addr]) == 0
        assert f"from {node_addr}" in capsys.readouterr().out
        assert await run(None, main, ["receipts", "proof", str(rfile), "-o", str(tmp_path / "again.proof"),
                                      "--node", node_addr]) == 0  # a receipt file instead of its hash
        bad = tmp_path / "bad.proof"
        bad.write_bytes(tampered["two signers"][0].encode())
        assert await run(None, main, ["receipts", "verify", str(rfile), "--proof", str(bad), "--genesis", gfile]) == 1
        assert "INVALID PROOF" in capsys.readouterr().out
        assert await run(None, main, ["receipts", "verify", str(rfile), "--proof", str(pfile)]) == 1
        assert "--proof needs --genesis" in capsys.readouterr().err
        assert await run(None, main, ["receipts", "proof", receipt(43).receipt_hash.hex(), "-o",
                                      str(tmp_path / "none.proof"), "--node", node_addr]) == 1
        assert "was never minted" in capsys.readouterr().err and not (tmp_path / "none.proof").exists()
    finally:
        for n, s in reversed(running):
            await n.stop()
            await s.stop(0)
