"""Webhooks with several coordinators on one PostgreSQL database (docs/scaling.md): the outbox is
shared, one coordinator (the settler lock's holder) delivers every event once, and when it dies
the other delivers what is left and what comes next. A real server, real coordinators and miners,
a real HTTP receiver on loopback."""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path
from typing import Any

from tests.coordinator.test_jobs_api import MD, image_job, stub, wait_done
from tests.coordinator.test_pg_shared import crash, pair
from tests.coordinator.test_webhooks import EVENT, Receiver, clients


async def test_each_event_is_posted_by_one_coordinator_and_the_survivor_takes_over(
        network_factory: Any, pg_url: str, tmp_path: Path, null_backend: Any) -> None:
    # a slow receiver: an event stays in the shared outbox for longer than every coordinator's poll,
    # so a second deliverer would POST it too
    receiver = Receiver(delay_s=1.5)
    try:
        a, b = await pair(network_factory, pg_url, tmp_path, clients=clients(receiver.url + "/hook"))
        await a.add_miner({"null": null_backend})
        await b.add_miner({"null": null_backend})
        sa, sb = stub(a), stub(b)
        for net in (a, b):
            await net.until(lambda net=net: "null" in net.core.served_models())
        ended = []
        for i in range(4):
            s = sa if i % 2 == 0 else sb
            job = (await s.SubmitJob(image_job(model="null", seed=i, steps=1), metadata=MD)).job
            ended.append((await wait_done(s, job.job_id)).job_id)
        await a.until(lambda: not a.core.webhooks.pending(), timeout=30)  # the outbox is one table
        await asyncio.sleep(2.5)  # past both polls: a second deliverer would have POSTed by now
        counts = collections.Counter(h[EVENT] for _, h, _ in receiver.posts)
        assert counts == {f"{j}.COMPLETED": 1 for j in ended}, counts
        [deliverer] = [n for n in (a, b) if n.core.store._settler_conn is not None]
        survivor, ss = (b, sb) if deliverer is a else (a, sa)
        await crash(deliverer)
        job = (await ss.SubmitJob(image_job(model="null", seed=99, steps=1), metadata=MD)).job
        done = await wait_done(ss, job.job_id)
        await survivor.until(lambda: not survivor.core.webhooks.pending(), timeout=30)
        counts = collections.Counter(h[EVENT] for _, h, _ in receiver.posts)
        assert counts[f"{done.job_id}.COMPLETED"] == 1 and len(counts) == 5, counts
    finally:
        receiver.close()
