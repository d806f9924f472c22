"""Issue 5's cheater on the tiny pipeline: three real miner daemons run tiny-sd on CPU, one returns
altered PNG bytes on every job; at the default sampling rate it is caught and quarantined within 50
of its jobs, its checked receipts are rejected, clients get the verified images, and the honest
miners are never flagged."""

from __future__ import annotations

import asyncio
import hashlib
import io
import threading
from collections.abc import Callable
from typing import Any

import pytest
from PIL import Image

from aitbc import crypto
from aitbc.config import CoordinatorConfig
from aitbc.coordinator.store import LmdbJobStore
from aitbc.miner.backend import ImageOutput, ImageRequest
from aitbc.v1 import coordinator_pb2, job_pb2, receipt_pb2
from tests.coordinator.test_jobs_api import MD, fetch, image_job, stub, wait_done

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

V = job_pb2.VerificationState
St = receipt_pb2.SettlementState
# Fixed, so the test is deterministic: which of a miner's results are sampled is a keyed function
# of (coordinator secret, miner, n). tests/hub/test_hub_verification.py measures the same rule over
# 4,000 secrets (quarantined within 50 results 99.4% of the time).
SECRET = hashlib.sha256(b"AITBC issue 5 cheater test").digest()
CHEATER_KEY = crypto.PrivateKey(hashlib.sha256(b"AITBC issue 5 cheater key").digest())
CHEATER_JOB_LIMIT = 50


class AlteringBackend:
    """A miner that cheats subtly: it runs tiny-sd, then changes one pixel of every image and
    re-encodes it (a valid PNG, well signed, the wrong bytes). It remembers what it returned."""

    def __init__(self, honest: Any) -> None:
        self.honest = honest
        self.model, self.device, self.native_size = honest.model, honest.device, honest.native_size
        self.returned: dict[int, bytes] = {}  # seed -> the altered PNG

    def generate(self, req: ImageRequest, on_step: Callable[[int, int], None], cancel: threading.Event) -> ImageOutput:
        out = self.honest.generate(req, on_step, cancel)
        pngs = []
        for i, png in enumerate(out.pngs):
            with Image.open(io.BytesIO(png)) as im:
                im = im.convert("RGB")
                r, g, b = im.getpixel((0, 0))
                im.putpixel((0, 0), (255 - r, g, b))
                buf = io.BytesIO()
                im.save(buf, format="PNG")
            pngs.append(buf.getvalue())
            self.returned[req.seed + i] = pngs[-1]
        return ImageOutput(pngs=pngs, width=out.width, height=out.height, gpu_ms=out.gpu_ms)


async def _miners_status(s) -> dict[str, coordinator_pb2.MinerStatus]:
    return {m.miner_id: m for m in (await s.ListMiners(coordinator_pb2.ListMinersRequest(), metadata=MD)).miners}


async def test_a_tiny_sd_cheater_is_quarantined_within_50_jobs_at_the_default_rate(network_factory, tiny_backend) -> None:
    rate = CoordinatorConfig().verify_rate
    assert rate == 0.10  # the default this test is about
    net = await network_factory(verify_rate=rate, verify_timeout_s=60)
    await net.stop_coordinator()
    store = LmdbJobStore(net.tmp / "coordinator" / "jobs")
    store.put_meta("verify_secret", SECRET)
    store.close()
    await net.start_coordinator()

    cheat_backend = AlteringBackend(tiny_backend)
    cheater = await net.add_miner({"tiny-sd": cheat_backend}, key=CHEATER_KEY)
    honest = [await net.add_miner({"tiny-sd": tiny_backend}) for _ in range(2)]
    cheat_id, honest_ids = cheater.key.address, {h.key.address for h in honest}
    s = stub(net)

    served: list[job_pb2.Job] = []  # client jobs, as finished
    seed = 0
    for _wave in range(80):  # bounded: 3 jobs a wave, the cheater serves about one of them
        if net.core.book.snapshot(cheat_id).quarantined:
            break
        if sum(j.miner_id == cheat_id for j in served) >= CHEATER_JOB_LIMIT:
            break
        ids = []
        for _ in range(3):
            seed += 1
            ids.append((await s.SubmitJob(image_job("a lighthouse in fog", steps=2, seed=seed), metadata=MD)).job.job_id)
        served += await asyncio.gather(*(wait_done(s, j) for j in ids))

    # every verification the run started comes to a decision
    def decided() -> bool:
        return all(net.core.store.get_job(j.job_id).verification != V.VERIFICATION_STATE_PENDING for j in served)

    await net.until(decided, timeout=120)
    final = [net.core.store.get_job(j.job_id) for j in served]
    by_cheater = [j for j in final if j.miner_id == cheat_id]
    status = await _miners_status(s)

    # caught and quarantined within 50 of its jobs
    assert status[cheat_id].quarantined, f"not quarantined after {len(by_cheater)} of its jobs"
    assert len(by_cheater) <= CHEATER_JOB_LIMIT
    assert status[cheat_id].verifications_failed >= 2

    # each of its checked results: the receipt is rejected (never minted), the client gets the image
    # the honest majority produced, not the altered one
    checked = [j for j in by_cheater if j.verification != V.VERIFICATION_STATE_UNSPECIFIED]
    assert checked and all(j.verification == V.VERIFICATION_STATE_REPLACED for j in checked)
    for j in checked:
        j = (await s.GetJob(coordinator_pb2.GetJobRequest(job_id=j.job_id), metadata=MD)).job  # the client's view
        assert j.receipt.settlement.state == St.SETTLEMENT_STATE_REJECTED
        assert "failed verification" in j.receipt.settlement.error
        _, data = await fetch(s, j.job_id)
        assert data != cheat_backend.returned[j.params.image.seed]
        assert hashlib.sha256(data).hexdigest() == j.artifacts[0].sha256

    # honest miners are never flagged on CPU: every check of their work passed
    for h in honest_ids:
        assert status[h].verifications_failed == 0 and not status[h].quarantined
        assert status[h].verifications_passed >= 1
    honest_checked = [j for j in final if j.miner_id in honest_ids and j.verification]
    assert all(j.verification == V.VERIFICATION_STATE_PASSED for j in honest_checked)

    # quarantined: new work goes to the honest miners only
    for k in range(3):
        done = await wait_done(s, (await s.SubmitJob(image_job("after", steps=2, seed=1000 + k), metadata=MD)).job.job_id)
        assert done.miner_id in honest_ids
    print(f"cheater quarantined after {len(by_cheater)} of its jobs ({len(checked)} checked); "
          f"{len(served)} client jobs in all")
