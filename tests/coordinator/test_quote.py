"""QuoteJob: what a job will cost before it runs, and that the receipt then mints exactly that."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from aitbc import receipts
from aitbc.v1 import coordinator_pb2, job_pb2
from tests.coordinator.test_jobs_api import MD, stub, wait_done


def quote_req(model: str = "null", cap: int | None = None, **image: Any) -> coordinator_pb2.QuoteJobRequest:
    req = coordinator_pb2.QuoteJobRequest(model=model, params=job_pb2.JobParams(
        image=job_pb2.ImageParams(prompt="a red bicycle", seed=1, **image)))
    if cap is not None:
        req.max_price_per_unit = cap
    return req


async def test_an_image_quote_is_what_the_receipt_mints(network_factory: Any, null_backend: Any) -> None:
    net = await network_factory(default_max_price_per_unit=50)
    cheap = await net.add_miner({"null": null_backend}, price=3)
    await net.add_miner({"null": null_backend}, price=7)
    s = stub(net)
    q = await s.QuoteJob(quote_req(steps=5), metadata=MD)
    # native size (64, the miner's declaration) made explicit; 1 tile x 5 steps x 1 image
    assert (q.params.image.width, q.params.image.height, q.params.image.steps) == (64, 64, 5)
    assert q.unit_type == "tile_steps" and q.units_exact and q.units == receipts.tile_steps(64, 64, 5, 1) == 5
    assert q.price_per_unit == 3 and q.cost == 15  # the cheaper miner wins matching when all else is equal
    assert q.max_price_per_unit == 50 and q.max_cost == 250  # the operator's ceiling bounds what it can cost
    assert [(x.miner_id, x.price_per_unit, x.cost) for x in q.miners][0] == (cheap.key.address, 3, 15)
    assert sorted(x.price_per_unit for x in q.miners) == [3, 7]
    assert not net.core.machine.records  # a quote queues nothing
    job = (await s.SubmitJob(coordinator_pb2.SubmitJobRequest(model="null", params=q.params), metadata=MD)).job
    done = await wait_done(s, job.job_id)
    recs = (await s.ListReceipts(coordinator_pb2.ListReceiptsRequest(job_id=job.job_id), metadata=MD)).receipts
    minted = sum(r.body.units * r.body.price_per_unit for r in recs)
    assert done.units == q.units and done.price_per_unit == q.price_per_unit and minted == q.cost
    # a job split across both miners: each shard is paid at its own miner's price, within the quote's bounds
    q2 = await s.QuoteJob(quote_req(steps=5, images=2), metadata=MD)
    job = (await s.SubmitJob(coordinator_pb2.SubmitJobRequest(model="null", params=q2.params), metadata=MD)).job
    await wait_done(s, job.job_id)
    recs = (await s.ListReceipts(coordinator_pb2.ListReceiptsRequest(job_id=job.job_id), metadata=MD)).receipts
    assert sum(r.body.units for r in recs) == q2.units == 10
    assert q2.units * 3 <= sum(r.body.units * r.body.price_per_unit for r in recs) <= q2.units * 7 <= q2.max_cost


async def test_a_cap_below_every_miner_quotes_no_miner_and_says_why(network_factory: Any, null_backend: Any) -> None:
    net = await network_factory()
    await net.add_miner({"null": null_backend}, price=9)
    q = await stub(net).QuoteJob(quote_req(cap=4, steps=2), metadata=MD)
    assert not q.miners and q.price_per_unit == 0 and q.cost == 0
    assert "price" in q.unavailable_reason and q.max_price_per_unit == 4 and q.max_cost == 4 * q.units


async def test_a_text_quote_bounds_the_units_the_receipt_can_carry(net: Any, null_text: Any) -> None:
    await net.add_miner({"null-text": null_text})
    s = stub(net)
    params = job_pb2.JobParams(text=job_pb2.TextParams(prompt="hi there", max_new_tokens=16, seed=1))
    q = await s.QuoteJob(coordinator_pb2.QuoteJobRequest(model="null-text", params=params), metadata=MD)
    assert q.unit_type == "tokens" and not q.units_exact and q.units == len(b"hi there") + 8 + 16
    job = (await s.SubmitJob(coordinator_pb2.SubmitJobRequest(model="null-text", params=params), metadata=MD)).job
    done = await wait_done(s, job.job_id)
    assert 1 <= done.units <= q.units


@pytest.mark.parametrize(("req", "code", "needle"), [
    (quote_req(steps=999), grpc.StatusCode.INVALID_ARGUMENT, "steps must be between 1 and 150"),
    (quote_req(model="nobody-serves-this"), grpc.StatusCode.FAILED_PRECONDITION, "no miner serves model"),
    (quote_req(model="bad model!"), grpc.StatusCode.INVALID_ARGUMENT, "malformed"),
    (coordinator_pb2.QuoteJobRequest(model="null"), grpc.StatusCode.INVALID_ARGUMENT, "params must set"),
])
async def test_a_bad_quote_request_gets_the_same_status_as_a_bad_submission(
        net: Any, null_backend: Any, req: coordinator_pb2.QuoteJobRequest, code: grpc.StatusCode, needle: str) -> None:
    await net.add_miner({"null": null_backend})
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub(net).QuoteJob(req, metadata=MD)
    assert err.value.code() == code and needle in err.value.details()


async def test_a_quote_needs_an_api_key(net: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub(net).QuoteJob(quote_req())
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
