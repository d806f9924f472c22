#!/usr/bin/env python3
"""Coordinator memory under unfinished uploads: 64 miners each upload 60 MiB for a job and never
send the result (THREAT-MODEL.md: a miner must not keep coordinator memory growing).

A real coordinator process (so its RSS is its own) and hand-written miners in this process that
speak the real MinerService protocol over gRPC: GetChallenge, Register with a fresh key, the Work
stream, JobAccepted, then ArtifactChunk messages of 1 MiB. After its chunks each miner sends a
message the coordinator must refuse (JobAccepted for a job it does not hold): the coordinator
handles a stream in order, so that refusal means every chunk before it was handled. RSS is read
from /proc (VmRSS now, VmHWM the peak) before, once every upload is handled, and after the
miners left (their uploads dropped, their jobs requeued).

    python bench/upload_memory.py [--miners 64] [--mib 60] [--in-flight-mib 4096]

--in-flight-mib sets max_upload_bytes_in_flight (and max_upload_bytes_per_miner, where the
coordinator has it) so that every upload is admitted; 0 keeps the coordinator's defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import MD, machine, start_coordinator  # noqa: E402

from aitbc import crypto  # noqa: E402
from aitbc.coordinator import register_digest  # noqa: E402
from aitbc.rpc import CHUNK_BYTES, channel  # noqa: E402
from aitbc.v1 import coordinator_pb2, coordinator_pb2_grpc, job_pb2, miner_pb2, miner_pb2_grpc  # noqa: E402

MIB = 1024 * 1024
BARRIER = "bench-barrier"


def rss_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def files_under(folder: Path) -> tuple[int, int]:
    """(files, bytes) under a folder (0, 0 when it does not exist)."""
    files = [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []
    return len(files), sum(p.stat().st_size for p in files)


class HoardingMiner:
    """Registers, takes one job, uploads `size` bytes for it and never finishes."""

    def __init__(self, ch: object) -> None:
        self.key = crypto.PrivateKey.generate()
        self.stub = miner_pb2_grpc.MinerServiceStub(ch)
        self.outbox: asyncio.Queue[miner_pb2.WorkRequest | None] = asyncio.Queue(maxsize=4)
        self.rejected: list[str] = []  # reasons the coordinator gave (the barrier's excluded)
        self.call: object = None

    async def connect(self) -> None:
        ch = await self.stub.GetChallenge(miner_pb2.GetChallengeRequest())
        reg = await self.stub.Register(miner_pb2.RegisterRequest(
            public_key=self.key.pubkey, challenge=ch.challenge,
            signature=self.key.sign(register_digest(ch.challenge, self.key.pubkey)),
            info=miner_pb2.MinerInfo(models=["null"], max_concurrency=1, device="cpu")))

        async def requests():  # type: ignore[no-untyped-def]
            while (msg := await self.outbox.get()) is not None:
                yield msg

        self.call = self.stub.Work(requests(), metadata=(("x-miner-session", reg.session_token),))

    async def read(self) -> miner_pb2.WorkResponse:
        return await asyncio.wait_for(self.call.read(), 60)  # type: ignore[attr-defined]

    async def hoard(self, size: int) -> None:
        """Upload `size` bytes for the assigned job, then wait for the barrier's refusal."""
        msg = await self.read()
        assert msg.WhichOneof("msg") == "assignment", msg
        job_id = msg.assignment.task.job_id
        await self.outbox.put(miner_pb2.WorkRequest(accepted=miner_pb2.JobAccepted(job_id=job_id)))
        piece = b"\x89" * CHUNK_BYTES
        for off in range(0, size, CHUNK_BYTES):
            await self.outbox.put(miner_pb2.WorkRequest(chunk=miner_pb2.ArtifactChunk(
                job_id=job_id, index=0, data=piece[:min(CHUNK_BYTES, size - off)])))
        await self.outbox.put(miner_pb2.WorkRequest(accepted=miner_pb2.JobAccepted(job_id=BARRIER)))
        for _ in range(size // CHUNK_BYTES + 8):  # bounded: one reply per message sent at most
            reply = await self.read()
            if reply.WhichOneof("msg") == "rejected":
                if reply.rejected.job_id == BARRIER:
                    return
                self.rejected.append(reply.rejected.reason)
        raise AssertionError("the coordinator never answered the barrier")

    async def leave(self) -> None:
        await self.outbox.put(None)


async def run(miners: int, mib: int, in_flight_mib: int) -> None:
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        extra: dict[str, object] = {}
        if in_flight_mib:
            extra["max_upload_bytes_in_flight"] = in_flight_mib * MIB
            extra["heartbeat_timeout_s"] = 120.0  # an upload of GiBs on 2 cores takes a while
            import aitbc.config

            if "max_upload_bytes_per_miner" in aitbc.config.CoordinatorConfig.__dataclass_fields__:
                extra["max_upload_bytes_per_miner"] = max(64, mib) * MIB
        proc, addr = start_coordinator(Path(tmp), **extra)
        data = Path(tmp) / "coord"
        try:
            time.sleep(1.0)
            before, _ = rss_mib(proc.pid)
            chans = [channel(addr) for _ in range(8)]
            hoarders = [HoardingMiner(chans[i % len(chans)]) for i in range(miners)]
            await asyncio.gather(*(h.connect() for h in hoarders))
            stub = coordinator_pb2_grpc.CoordinatorServiceStub(chans[0])
            for _ in range(100):  # bounded wait: every miner's stream is open
                listed = (await stub.ListMiners(coordinator_pb2.ListMinersRequest(), metadata=MD)).miners
                if sum(m.connected for m in listed) == miners:
                    break
                await asyncio.sleep(0.1)
            params = job_pb2.JobParams(image=job_pb2.ImageParams(prompt="hoard", steps=1, width=64, height=64, seed=1))
            for _ in range(miners):
                await stub.SubmitJob(coordinator_pb2.SubmitJobRequest(model="null", params=params), metadata=MD)
            t0 = time.perf_counter()
            await asyncio.gather(*(h.hoard(mib * MIB) for h in hoarders))
            took = time.perf_counter() - t0
            during, peak = rss_mib(proc.pid)
            await asyncio.sleep(3.0)  # the uploads stay unfinished, the streams open and idle
            held, _ = rss_mib(proc.pid)
            on_disk = files_under(data / "uploads")
            refused = sum(len(h.rejected) > 0 for h in hoarders)
            for h in hoarders:
                await h.leave()
            for _ in range(100):  # bounded wait: the coordinator saw every miner leave
                listed = (await stub.ListMiners(coordinator_pb2.ListMinersRequest(), metadata=MD)).miners
                if not any(m.connected for m in listed):
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)
            after, peak = rss_mib(proc.pid)
            left = files_under(data / "uploads")
            for ch in chans:
                await ch.close()
        finally:
            proc.terminate()
            proc.wait(10)
    admitted = miners - refused
    print(f"{miners} miners x {mib} MiB unfinished uploads ({admitted} admitted, {refused} refused by a limit; "
          f"{miners * mib / took:.0f} MiB/s sent in {took:.1f} s)")
    if refused:
        reasons = {r for h in hoarders for r in h.rejected}
        print(f"  refusals: {'; '.join(sorted(reasons))}")
    print(f"coordinator RSS: before {before:.0f} MiB; every upload in {during:.0f} MiB, 3 s later (uploads held "
          f"unfinished) {held:.0f} MiB; peak {peak:.0f} MiB; after the miners left {after:.0f} MiB")
    print(f"growth while the uploads are held: {held - before:+.0f} MiB (goal: under 64 MiB); "
          f"peak while bytes were arriving {peak - before:+.0f} MiB")
    print(f"upload files on disk: {on_disk[0]} files, {on_disk[1] / MIB:.0f} MiB during; "
          f"{left[0]} files, {left[1] / MIB:.0f} MiB after the miners left")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--miners", type=int, default=64)
    ap.add_argument("--mib", type=int, default=60, help="MiB each miner uploads (under max_artifact_bytes)")
    ap.add_argument("--in-flight-mib", type=int, default=4096,
                    help="max_upload_bytes_in_flight in MiB, so every upload is admitted; 0: the coordinator's default")
    args = ap.parse_args()
    asyncio.run(run(args.miners, args.mib, args.in_flight_mib))


if __name__ == "__main__":
    main()
