"""Partition: 4 authorities in network namespaces that this test creates (ip netns + veth + two
bridges) and a follower. One authority is cut off for 10 s and healed: the three others (more than
2/3) keep finalizing, the one alone finalizes nothing, and afterwards every node agrees. Then a 2/2
split (two bridges): neither side has more than 2/3, so nothing finalizes anywhere while both keep
producing; after healing, all converge and finality resumes. Fails, saying why, where namespaces
cannot be created (not root, no CAP_NET_ADMIN, no iproute2), unless AITBC_SKIP_NETNS=1."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from aitbc import crypto
from aitbc.ledger.genesis import make_genesis
from aitbc.v1 import ledger_pb2, ledger_pb2_grpc
from tests.fault.cluster import ROOT, Proc, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
SUBNET = "10.231.{n}.{host}"


def sh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=20)


class Net:
    """Two bridges in the root namespace (the second one unaddressed: a side of a split) and one
    namespace per authority, all test-owned."""

    def __init__(self, count: int) -> None:
        self.tag = f"{os.getpid() % 10000:04d}"
        self.n = os.getpid() % 200 + 20  # third octet, so parallel runs do not collide
        self.bridge = f"aitbr{self.tag}"
        self.other_side = f"aitbs{self.tag}"
        self.ns = [f"aitbc-{self.tag}-{i}" for i in range(count)]
        self.veth = [f"aitv{self.tag}{i}" for i in range(count)]
        self.gateway = SUBNET.format(n=self.n, host=1)
        self.ips = [SUBNET.format(n=self.n, host=11 + i) for i in range(count)]

    def create(self) -> None:
        steps = [("ip", "link", "add", self.bridge, "type", "bridge"),
                 ("ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge),
                 ("ip", "link", "set", self.bridge, "up"),
                 ("ip", "link", "add", self.other_side, "type", "bridge"),
                 ("ip", "link", "set", self.other_side, "up")]
        for ns, veth, ip in zip(self.ns, self.veth, self.ips, strict=True):
            steps += [("ip", "netns", "add", ns),
                      ("ip", "link", "add", veth, "type", "veth", "peer", "name", veth + "p"),
                      ("ip", "link", "set", veth + "p", "netns", ns),
                      ("ip", "link", "set", veth, "master", self.bridge),
                      ("ip", "link", "set", veth, "up"),
                      ("ip", "netns", "exec", ns, "ip", "addr", "add", f"{ip}/24", "dev", veth + "p"),
                      ("ip", "netns", "exec", ns, "ip", "link", "set", veth + "p", "up"),
                      ("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")]
        for step in steps:
            r = sh(*step)
            if r.returncode:
                raise OSError(f"{' '.join(step)}: {r.stderr.strip()}")

    def cut(self, i: int, down: bool) -> None:
        r = sh("ip", "link", "set", self.veth[i], "down" if down else "up")
        assert r.returncode == 0, r.stderr

    def split(self, side: list[int], apart: bool) -> None:
        """Move these authorities' links to the other bridge (they reach each other, nobody else)
        or back."""
        for i in side:
            r = sh("ip", "link", "set", self.veth[i], "master", self.other_side if apart else self.bridge)
            assert r.returncode == 0, r.stderr

    def destroy(self) -> None:
        for veth in self.veth:
            sh("ip", "link", "del", veth)
        for ns in self.ns:
            sh("ip", "netns", "del", ns)
        sh("ip", "link", "del", self.bridge)
        sh("ip", "link", "del", self.other_side)


def head(target: str) -> ledger_pb2.GetHeadResponse:
    with grpc.insecure_channel(target) as ch:
        return ledger_pb2_grpc.LedgerServiceStub(ch).GetHead(ledger_pb2.GetHeadRequest(), timeout=3)


def block_hash(target: str, height: int) -> str:
    with grpc.insecure_channel(target) as ch:
        b = ledger_pb2_grpc.LedgerServiceStub(ch).GetBlock(ledger_pb2.GetBlockRequest(height=height), timeout=3)
        return b.block.header.hash


NS_QUERY = """
import sys, grpc
from aitbc.v1 import ledger_pb2, ledger_pb2_grpc
with grpc.insecure_channel(sys.argv[1]) as ch:
    h = ledger_pb2_grpc.LedgerServiceStub(ch).GetHead(ledger_pb2.GetHeadRequest(), timeout=3)
print(h.finalized_height, h.head.height)
"""


def ns_head(ns: str, target: str) -> tuple[int, int]:
    """(finalized height, head height) of a node asked from inside its own, cut-off namespace."""
    r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", NS_QUERY, target], capture_output=True,
                       text=True, timeout=30, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    final, height = r.stdout.split()
    return int(final), int(height)


def wait(pred, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred():
                return
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_cut_one_of_four_then_split_two_two_finality_only_with_more_than_two_thirds(tmp_path: Path) -> None:
    # CI (root, Linux, iproute2) must run it: a missing partition test fails, unless a developer
    # says in so many words that this machine cannot (AITBC_SKIP_NETNS=1)
    give_up = pytest.skip if os.environ.get("AITBC_SKIP_NETNS") == "1" else pytest.fail
    if sys.platform != "linux" or shutil.which("ip") is None:
        give_up("network namespaces need Linux and iproute2 (`ip`); AITBC_SKIP_NETNS=1 skips this test")
    net = Net(4)
    try:
        net.create()
    except (OSError, subprocess.SubprocessError) as exc:
        net.destroy()
        give_up(f"cannot create network namespaces here ({exc}); AITBC_SKIP_NETNS=1 skips this test")
    procs: list[Proc] = []
    try:
        keys = [crypto.PrivateKey.generate() for _ in range(4)]
        genesis = make_genesis("aitbc-partition", [k.address for k in keys], [keys[0].address], block_time_ms=400,
                               genesis_time_ms=int(time.time() * 1000))
        genesis.save(tmp_path / "genesis.json")
        port = 26657
        targets = [f"{ip}:{port}" for ip in net.ips]
        follower = f"{net.gateway}:{free_port()}"
        # plaintext on the veth addresses of namespaces this test made: said in so many words
        cli = [sys.executable, "-m", "aitbc.clients.cli", "node", "--genesis", str(tmp_path / "genesis.json"),
               "--allow-insecure"]
        for i, ns in enumerate(net.ns):
            d = tmp_path / f"a{i}"
            d.mkdir()
            (d / "key").write_text(keys[i].secret.hex())
            peers = ",".join([*(t for j, t in enumerate(targets) if j != i), follower])
            argv = ["ip", "netns", "exec", ns, *cli, "--data-dir", str(d / "data"), "--key", str(d / "key"),
                    "--listen", targets[i], "--peers", peers]
            procs.append(Proc(f"authority{i}", "authority", argv, targets[i], d / "node.log"))
        d = tmp_path / "follower"
        d.mkdir()
        procs.append(Proc("follower", "follower", [*cli, "--data-dir", str(d / "data"), "--listen", follower,
                                                   "--peers", ",".join(targets)], follower, d / "node.log"))
        for p in procs:
            p.start()
        for p in procs:
            p.wait_healthy(60)
        assert ROOT.exists()
        wait(lambda: min(head(t).finalized_height for t in [*targets, follower]) >= 3, 60, "finality on all nodes")

        majority = [targets[0], targets[1], targets[2], follower]
        net.cut(3, True)  # authority3 is alone now
        time.sleep(1.0)
        cut_final, cut_height = ns_head(net.ns[3], targets[3])
        start_final = min(head(t).finalized_height for t in majority)
        time.sleep(10)
        during = {t: head(t) for t in majority}
        alone_final, alone_height = ns_head(net.ns[3], targets[3])
        assert min(h.finalized_height for h in during.values()) > start_final + 3, (
            f"the majority stopped finalizing while one authority was cut off: {start_final} -> "
            f"{[h.finalized_height for h in during.values()]}")
        # alone, the minority may build on its own branch but finalizes none of it
        assert alone_height > cut_height, "the cut authority stopped producing in its own slots"
        assert alone_final == cut_final, f"the cut authority finalized alone: {cut_final} -> {alone_final}"
        net.cut(3, False)
        wait(lambda: head(targets[3]).finalized_height >= alone_final, 20, "the cut authority to answer again")
        # whatever it called final, the majority has at the same heights
        for h in range(1, alone_final + 1):
            assert block_hash(targets[3], h) == block_hash(targets[0], h), f"conflicting final block at {h}"
        wait(lambda: min(head(t).finalized_height for t in [*targets, follower]) >
             max(h.finalized_height for h in during.values()), 60, "finality everywhere after healing")

        # a 2/2 split: two authorities (and the follower) on one side, two on the other; no side has
        # more than 2/3 of the authorities, so nothing finalizes anywhere, while both sides produce
        net.split([2, 3], True)
        time.sleep(2.0)  # votes in flight land
        side_a = [targets[0], targets[1], follower]
        before = {t: head(t) for t in side_a}
        before_b = {i: ns_head(net.ns[i], targets[i]) for i in (2, 3)}
        time.sleep(8)
        after = {t: head(t) for t in side_a}
        after_b = {i: ns_head(net.ns[i], targets[i]) for i in (2, 3)}
        assert all(after[t].finalized_height == before[t].finalized_height for t in side_a), (
            f"a side with 2 of 4 authorities finalized: {[(before[t].finalized_height, after[t].finalized_height) for t in side_a]}")
        assert all(after_b[i][0] == before_b[i][0] for i in (2, 3)), f"the other side finalized: {before_b} -> {after_b}"
        assert after[targets[0]].head.height > before[targets[0]].head.height, "side A stopped producing"
        assert after_b[2][1] > before_b[2][1], "side B stopped producing"
        split_final = max([h.finalized_height for h in after.values()] + [after_b[i][0] for i in (2, 3)])
        net.split([2, 3], False)

        # after healing every node converges on one chain
        wait(lambda: len({head(t).head.hash for t in [*targets, follower]}) == 1 or
             min(head(t).finalized_height for t in [*targets, follower]) > split_final,
             60, "convergence after healing")
        wait(lambda: min(head(t).finalized_height for t in [*targets, follower]) > split_final + 2, 60,
             "finality to resume everywhere after the split")
        common = min(head(t).finalized_height for t in [*targets, follower])
        for h in range(1, common + 1):
            assert len({block_hash(t, h) for t in [*targets, follower]}) == 1, f"nodes disagree at height {h}"
    finally:
        for p in procs:
            p.stop()
        net.destroy()
