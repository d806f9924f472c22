"""The miner's image backends: the tiny diffusers pipeline (real code path, toy weights) and null."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from aitbc import jobs
from aitbc.miner.backend import (
    BackendError,
    ImageBackend,
    ImageOutput,
    ImageRequest,
    JobCancelled,
    load_image_backend,
    pick_device,
)

STEPS = 4


def request(**overrides: object) -> ImageRequest:
    fields: dict[str, object] = dict(
        prompt="a futuristic city skyline at night",
        negative_prompt="",
        steps=STEPS,
        guidance_scale=7.5,
        width=64,
        height=64,
        images=1,
        seed=7,
    )
    fields.update(overrides)
    return ImageRequest(**fields)  # type: ignore[arg-type]


def run(backend: ImageBackend, req: ImageRequest) -> ImageOutput:
    return backend.generate(req, lambda i, n: None, threading.Event())


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_png(data: bytes, width: int, height: int) -> None:
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.format == "PNG" and image.size == (width, height)


@pytest.fixture(scope="module")
def tiny() -> ImageBackend:
    return load_image_backend("tiny-sd", "cpu")


@pytest.fixture(scope="module")
def tiny_bytes(tiny: ImageBackend) -> bytes:
    out = run(tiny, request())
    assert len(out.pngs) == 1
    return out.pngs[0]


# --- tiny pipeline ------------------------------------------------------------------------------


def test_tiny_backend_shape(tiny: ImageBackend, tiny_bytes: bytes) -> None:
    assert isinstance(tiny, ImageBackend)
    assert (tiny.model, tiny.device, tiny.native_size) == ("tiny-sd", "cpu", 64)
    check_png(tiny_bytes, 64, 64)
    assert Image.open(io.BytesIO(tiny_bytes)).info == {}  # no metadata chunks


def test_same_seed_same_bytes_in_process(tiny: ImageBackend, tiny_bytes: bytes) -> None:
    assert run(tiny, request()).pngs[0] == tiny_bytes


def test_same_seed_same_bytes_in_fresh_process(tiny_bytes: bytes) -> None:
    code = (
        "import hashlib, threading\n"
        "from aitbc.miner.backend import ImageRequest, load_image_backend\n"
        "b = load_image_backend('tiny-sd', 'cpu')\n"
        f"r = ImageRequest('a futuristic city skyline at night', '', {STEPS}, 7.5, 64, 64, 1, 7)\n"
        "print(hashlib.sha256(b.generate(r, lambda i, n: None, threading.Event()).pngs[0]).hexdigest())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == sha(tiny_bytes)


def test_different_seed_or_prompt_differs(tiny: ImageBackend, tiny_bytes: bytes) -> None:
    assert run(tiny, request(seed=8)).pngs[0] != tiny_bytes
    assert run(tiny, request(prompt="a red bicycle")).pngs[0] != tiny_bytes


def test_progress_called_once_per_step(tiny: ImageBackend) -> None:
    calls: list[tuple[int, int]] = []
    out = tiny.generate(request(steps=5), lambda i, n: calls.append((i, n)), threading.Event())
    assert calls == [(i, 5) for i in range(1, 6)]
    assert out.gpu_ms >= 1


def test_cancel_mid_run(tiny: ImageBackend) -> None:
    cancel = threading.Event()
    calls: list[int] = []

    def on_step(i: int, n: int) -> None:
        calls.append(i)
        if i == 2:
            cancel.set()

    with pytest.raises(JobCancelled):
        tiny.generate(request(steps=20), on_step, cancel)
    assert calls == [1, 2]  # stopped right after the step that saw the cancel
    # the backend is still usable and unaffected by the aborted call
    assert run(tiny, request()).pngs


def test_cancel_before_start(tiny: ImageBackend) -> None:
    cancel = threading.Event()
    cancel.set()
    calls: list[int] = []
    with pytest.raises(JobCancelled):
        tiny.generate(request(), lambda i, n: calls.append(i), cancel)
    assert calls == []


@pytest.mark.parametrize(
    "overrides",
    [
        dict(width=60),
        dict(height=12),
        dict(width=-8),
        dict(width=4096),
        dict(steps=0),
        dict(steps=jobs.MAX_STEPS + 1),
        dict(images=0),
        dict(images=9),
        dict(seed=-1),
        dict(guidance_scale=float("nan")),
    ],
)
def test_invalid_request_is_backend_error(tiny: ImageBackend, overrides: dict[str, object]) -> None:
    with pytest.raises(BackendError) as err:
        run(tiny, request(**overrides))
    assert next(iter(overrides)) in str(err.value)


def test_zero_size_means_native_and_non_square(tiny: ImageBackend) -> None:
    out = run(tiny, request(width=0, height=0, steps=2))
    assert (out.width, out.height) == (64, 64)
    out = run(tiny, request(width=48, height=32, steps=2))
    assert (out.width, out.height) == (48, 32)
    check_png(out.pngs[0], 48, 32)


def test_two_images(tiny: ImageBackend) -> None:
    out = run(tiny, request(images=2, steps=2))
    assert len(out.pngs) == 2 and out.pngs[0] != out.pngs[1]
    for png in out.pngs:
        check_png(png, 64, 64)


def test_concurrent_calls_match_sequential(tiny: ImageBackend, tiny_bytes: bytes) -> None:
    other = run(tiny, request(seed=11, steps=2, guidance_scale=1.0))
    with ThreadPoolExecutor(2) as pool:
        a = pool.submit(run, tiny, request())
        b = pool.submit(run, tiny, request(seed=11, steps=2, guidance_scale=1.0))
        assert a.result().pngs[0] == tiny_bytes
        assert b.result().pngs[0] == other.pngs[0]


def test_save_pretrained_then_from_pretrained_same_bytes(
    tiny: ImageBackend, tiny_bytes: bytes, tmp_path
) -> None:
    tiny.pipeline.save_pretrained(tmp_path)  # type: ignore[attr-defined]
    loaded = load_image_backend(str(tmp_path), "cpu")
    assert type(loaded) is type(tiny)
    assert (loaded.model, loaded.native_size) == (str(tmp_path), 64)
    assert run(loaded, request()).pngs[0] == tiny_bytes


def test_missing_model_fails_fast(tmp_path) -> None:
    started = time.monotonic()
    with pytest.raises(BackendError, match="does not exist"):
        load_image_backend(str(tmp_path / "nope"), "cpu")
    with pytest.raises(BackendError, match="model_index.json"):
        load_image_backend(str(tmp_path), "cpu")
    with pytest.raises(BackendError, match="aitbc-test/no-such-model"):
        load_image_backend("aitbc-test/no-such-model", "cpu")
    assert time.monotonic() - started < 10


def test_pick_device() -> None:
    import torch

    assert pick_device("cpu") == "cpu"
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert pick_device(None) == pick_device("auto") == expected
    with pytest.raises(BackendError):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="CUDA"):
            pick_device("cuda:0")


# --- null backend -------------------------------------------------------------------------------


def test_null_backend_is_deterministic_fast_and_valid() -> None:
    backend = load_image_backend("null")
    assert (backend.model, backend.device) == ("null", "cpu")
    calls: list[tuple[int, int]] = []
    started = time.perf_counter()
    out = backend.generate(
        request(steps=20, width=512, height=512), lambda i, n: calls.append((i, n)), threading.Event()
    )
    assert time.perf_counter() - started < 0.05
    assert calls == [(i, 20) for i in range(1, 21)]
    assert out.gpu_ms >= 1 and (out.width, out.height) == (512, 512)
    check_png(out.pngs[0], 512, 512)
    assert run(backend, request(steps=20, width=512, height=512)).pngs == out.pngs
    for change in (dict(seed=8), dict(prompt="x"), dict(width=256)):
        assert run(backend, request(**{**dict(steps=20, width=512, height=512), **change})).pngs != out.pngs
    two = run(backend, request(images=2))
    assert len(two.pngs) == 2 and two.pngs[0] != two.pngs[1]
    check_png(two.pngs[1], 64, 64)


def test_null_backend_cancel_and_validation() -> None:
    backend = load_image_backend("null")
    cancel = threading.Event()

    def on_step(i: int, n: int) -> None:
        if i == 3:
            cancel.set()

    with pytest.raises(JobCancelled):
        backend.generate(request(steps=10), on_step, cancel)
    with pytest.raises(BackendError, match="width"):
        run(backend, request(width=65))


def test_null_backend_never_imports_torch() -> None:
    code = (
        "import sys, threading\n"
        "from aitbc.miner.backend import ImageRequest, load_image_backend\n"
        "b = load_image_backend('null')\n"
        "b.generate(ImageRequest('p', '', 3, 7.5, 0, 0, 1, 1), lambda i, n: None, threading.Event())\n"
        "print('torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().lower()) is False
