"""A miner accepts exactly what the coordinator can send it: the limits of aitbc.jobs, with the
seeds of the highest shard of the highest job (seed + i), and refuses one more."""

from __future__ import annotations

import threading

import pytest

from aitbc import jobs
from aitbc.errors import InvalidArgument
from aitbc.hub.sharding import plan_shards, shard_seed
from aitbc.miner.backend import BackendError, ImageRequest, NullImageBackend
from aitbc.miner.text import NullTextBackend, TextRequest, check_text_request
from aitbc.v1 import job_pb2


def highest_image_job() -> job_pb2.ImageParams:
    """The largest image job the coordinator admits: every limit at its top."""
    return jobs.normalize_image_params(job_pb2.ImageParams(
        prompt="x" * jobs.MAX_PROMPT_CHARS, steps=jobs.MAX_STEPS, guidance_scale=jobs.MAX_GUIDANCE,
        width=64, height=64, images=jobs.MAX_IMAGES, seed=jobs.MAX_SEED))


def as_sent(p: job_pb2.ImageParams, *, images: int, seed: int, **changes: object) -> ImageRequest:
    """What the miner daemon builds from the params of a job or shard it was sent."""
    fields = dict(prompt=p.prompt, negative_prompt=p.negative_prompt, steps=p.steps, guidance_scale=p.guidance_scale,
                  width=p.width, height=p.height, images=images, seed=seed)
    fields.update(changes)
    return ImageRequest(**fields)  # type: ignore[arg-type]


def run(req: ImageRequest) -> int:
    steps: list[int] = []
    out = NullImageBackend().generate(req, lambda i, n: steps.append(i), threading.Event())
    assert len(out.pngs) == req.images and all(png.startswith(jobs.PNG_MAGIC) for png in out.pngs)
    return len(steps)


def test_the_coordinator_admits_the_top_and_nothing_above() -> None:
    top = highest_image_job()
    assert (top.steps, top.images, top.seed) == (jobs.MAX_STEPS, jobs.MAX_IMAGES, jobs.MAX_SEED)
    for over in (dict(steps=jobs.MAX_STEPS + 1), dict(seed=jobs.MAX_SEED + 1), dict(images=jobs.MAX_IMAGES + 1)):
        p = job_pb2.ImageParams()
        p.CopyFrom(top)
        for name, value in over.items():
            setattr(p, name, value)
        with pytest.raises(InvalidArgument):
            jobs.normalize_image_params(p)


@pytest.mark.parametrize("split", [1, 2, 3, jobs.MAX_IMAGES])
def test_every_shard_of_the_highest_job_is_accepted(split: int) -> None:
    top = highest_image_job()
    plan = plan_shards(top.images, split, jobs.MAX_IMAGES)
    for shard in plan:
        assert run(as_sent(top, images=shard.count, seed=shard_seed(top.seed, shard))) == jobs.MAX_STEPS
    last = plan[-1]
    # the highest seed any miner is asked to run: the last image of the highest job
    assert shard_seed(top.seed, last) + last.count - 1 == jobs.MAX_RUN_SEED == jobs.MAX_SEED + jobs.MAX_IMAGES - 1


@pytest.mark.parametrize("images", [1, 3, jobs.MAX_IMAGES])
def test_one_more_is_refused(images: int) -> None:
    top = highest_image_job()
    highest = jobs.MAX_RUN_SEED - (images - 1)  # its last image runs jobs.MAX_RUN_SEED
    assert run(as_sent(top, images=images, seed=highest)) == jobs.MAX_STEPS
    for req, field in ((as_sent(top, images=images, seed=highest + 1), "seed"),
                       (as_sent(top, images=images, seed=highest, steps=jobs.MAX_STEPS + 1), "steps"),
                       (as_sent(top, images=images, seed=0, guidance_scale=jobs.MAX_GUIDANCE + 0.5), "guidance_scale"),
                       (as_sent(top, images=jobs.MAX_IMAGES + 1, seed=0), "images"),
                       (as_sent(top, images=images, seed=0, width=jobs.MAX_SIDE + 8), "width")):
        with pytest.raises(BackendError, match=field):
            run(req)


def test_text_limits_are_the_coordinators() -> None:
    top = jobs.normalize_text_params(job_pb2.TextParams(
        prompt="hi", max_new_tokens=jobs.MAX_NEW_TOKENS, temperature=jobs.MAX_TEMPERATURE, top_k=jobs.MAX_TOP_K,
        seed=jobs.MAX_SEED, stop=["s" * jobs.MAX_STOP_CHARS] * jobs.MAX_STOP))

    def sent(**changes: object) -> TextRequest:
        fields = dict(prompt=top.prompt, max_new_tokens=top.max_new_tokens, temperature=top.temperature,
                      top_p=top.top_p, top_k=top.top_k, seed=top.seed, stop=tuple(top.stop))
        fields.update(changes)
        return TextRequest(**fields)  # type: ignore[arg-type]

    check_text_request(sent())  # text jobs are never sharded: the job's seed is the miner's
    assert NullTextBackend().generate(sent(max_new_tokens=3), lambda d: None, threading.Event()).generated_tokens >= 1
    for over in (dict(seed=jobs.MAX_SEED + 1), dict(max_new_tokens=jobs.MAX_NEW_TOKENS + 1),
                 dict(temperature=jobs.MAX_TEMPERATURE + 0.01), dict(top_k=jobs.MAX_TOP_K + 1),
                 dict(stop=("s",) * (jobs.MAX_STOP + 1)), dict(stop=("s" * (jobs.MAX_STOP_CHARS + 1),))):
        with pytest.raises(BackendError):
            check_text_request(sent(**over))
