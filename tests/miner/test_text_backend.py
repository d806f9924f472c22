"""The miner's text backends: the tiny Llama (real transformers code path, toy weights) and null-text."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from aitbc import jobs
from aitbc.miner.backend import BackendError, JobCancelled
from aitbc.miner.text import (
    NULL_TEXT_MODEL,
    TINY_TEXT_MODEL,
    StopText,
    TextBackend,
    TextOutput,
    TextRequest,
    TransformersTextBackend,
    _IncrementalDecoder,
    is_text_model,
    load_text_backend,
)

PROMPT = "Explain proof of authority in one paragraph"


def request(**overrides: object) -> TextRequest:
    fields: dict[str, object] = dict(
        prompt=PROMPT, max_new_tokens=60, temperature=0.9, top_p=0.95, top_k=50, seed=7, stop=()
    )
    fields.update(overrides)
    return TextRequest(**fields)  # type: ignore[arg-type]


def run(backend: TextBackend, req: TextRequest) -> tuple[TextOutput, list[str]]:
    deltas: list[str] = []
    out = backend.generate(req, deltas.append, threading.Event())
    assert "".join(deltas) == out.text
    return out, deltas


@pytest.fixture(scope="module")
def tiny() -> TransformersTextBackend:
    backend = load_text_backend(TINY_TEXT_MODEL, "cpu")
    assert isinstance(backend, TransformersTextBackend)
    return backend


@pytest.fixture(scope="module")
def tiny_out(tiny: TransformersTextBackend) -> TextOutput:
    return run(tiny, request())[0]


@pytest.fixture(scope="module")
def null() -> TextBackend:
    return load_text_backend(NULL_TEXT_MODEL)


# --- tiny model: shape, tokenizer ---------------------------------------------------------------


def test_tiny_backend_shape(tiny: TransformersTextBackend, tiny_out: TextOutput) -> None:
    assert isinstance(tiny, TextBackend)
    assert (tiny.model, tiny.device, tiny.context_length) == ("tiny-llama", "cpu", 512)
    assert len(tiny.tokenizer) == 512
    assert tiny_out.finish_reason == "length"
    assert tiny_out.generated_tokens == 60
    assert tiny_out.prompt_tokens == tiny.count_tokens(PROMPT)
    assert tiny_out.gpu_ms >= 1 and tiny_out.text


def test_tokenizer_really_tokenizes(tiny: TransformersTextBackend) -> None:
    # transformers 5 can silently ignore tokenizer files: check the trained merges are in use
    tok = tiny.tokenizer
    a, b = tok("Explain proof")["input_ids"], tok("a red bicycle")["input_ids"]
    assert a != b and a[0] == b[0] == 1  # <s> first
    assert len(tok("the miner")["input_ids"]) < 1 + len(b"the miner")  # merges shorten known words
    assert tiny.count_tokens("") == 1  # just <s>
    text = "Héllo wörld 東京 😀 \x00 tabs\tand\nnewlines"
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


# --- determinism --------------------------------------------------------------------------------


def test_same_seed_same_text_in_process(tiny: TransformersTextBackend, tiny_out: TextOutput) -> None:
    again = run(tiny, request())[0]
    assert (again.text, again.prompt_tokens, again.generated_tokens, again.finish_reason) == (
        tiny_out.text, tiny_out.prompt_tokens, tiny_out.generated_tokens, tiny_out.finish_reason
    )


def test_same_seed_same_text_in_fresh_process(tiny_out: TextOutput) -> None:
    code = (
        "import json, threading\n"
        "from aitbc.miner.text import TextRequest, load_text_backend\n"
        "b = load_text_backend('tiny-llama', 'cpu')\n"
        f"r = TextRequest({PROMPT!r}, 60, 0.9, 0.95, 50, 7, ())\n"
        "print(json.dumps(b.generate(r, lambda d: None, threading.Event()).text))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == tiny_out.text


def test_greedy_is_deterministic_and_ignores_seed(tiny: TransformersTextBackend) -> None:
    first = run(tiny, request(temperature=0.0, seed=1))[0]
    assert run(tiny, request(temperature=0.0, seed=2))[0].text == first.text


def test_different_seed_or_prompt_differs(tiny: TransformersTextBackend, tiny_out: TextOutput) -> None:
    assert run(tiny, request(seed=8))[0].text != tiny_out.text
    assert run(tiny, request(prompt="a red bicycle"))[0].text != tiny_out.text


def test_text_is_the_decoded_tokens_of_plain_generate(tiny: TransformersTextBackend) -> None:
    """The streamer and stopping criteria do not change what transformers generates."""
    import torch

    out = run(tiny, request(temperature=0.0, max_new_tokens=30))[0]
    ids = torch.tensor([tiny.tokenizer(PROMPT)["input_ids"]])
    with torch.inference_mode():
        full = tiny.language_model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, do_sample=False
        )
    new = full[0, ids.shape[1] :].tolist()
    assert out.generated_tokens == len(new)
    assert out.text == tiny.tokenizer.decode(new, skip_special_tokens=True)


def test_concurrent_calls_stay_deterministic(tiny: TransformersTextBackend) -> None:
    reqs = [request(seed=s, max_new_tokens=40) for s in (11, 12, 13, 14)]
    alone = [run(tiny, r)[0].text for r in reqs]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda r: run(tiny, r)[0].text, reqs))
    assert together == alone


def test_eos_finishes_early(tiny: TransformersTextBackend) -> None:
    # with these fixed weights, greedy decoding of this prompt emits </s> after a few dozen tokens
    out = run(tiny, request(prompt="Explain proof of authority", temperature=0.0, max_new_tokens=200))[0]
    assert out.finish_reason == "eos"
    assert out.generated_tokens < 200
    assert "</s>" not in out.text


# --- streaming and incremental decoding ---------------------------------------------------------


def test_deltas_stream_while_generating(tiny: TransformersTextBackend) -> None:
    times: list[float] = []
    started = time.perf_counter()
    deltas: list[str] = []

    def on_text(delta: str) -> None:
        assert delta
        times.append(time.perf_counter() - started)
        deltas.append(delta)

    out = tiny.generate(request(max_new_tokens=120), on_text, threading.Event())
    assert "".join(deltas) == out.text
    assert len(deltas) > 20  # one per decodable token, not one at the end
    assert times[0] < times[-1]


def test_incremental_decoder_multibyte(tiny: TransformersTextBackend) -> None:
    tok = tiny.tokenizer
    text = "Héllo 東京 😀 naïve ∑x"
    # one token per byte: every multi-byte character is split across tokens
    pieces = tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)  # byte-level alphabet
    byte_ids = [tok.convert_tokens_to_ids(ch) for piece, _ in pieces for ch in piece]
    assert tok.decode(byte_ids) == text and len(byte_ids) == len(text.encode())
    for ids in (byte_ids, tok(text, add_special_tokens=False)["input_ids"]):
        decoder = _IncrementalDecoder(tok)
        deltas = [decoder.push(i) for i in ids] + [decoder.flush()]
        assert "".join(deltas) == text
        assert not any("\ufffd" in d for d in deltas)
    # an invalid sequence still comes out (as U+FFFD), and the whole matches a full decode
    ids = [byte_ids[2], byte_ids[0], byte_ids[7]]  # stray continuation byte, 'H', lead byte of 東
    decoder = _IncrementalDecoder(tok)
    streamed = "".join([decoder.push(i) for i in ids] + [decoder.flush()])
    assert streamed == tok.decode(ids)


# --- stop sequences -----------------------------------------------------------------------------


def test_stop_sequence_truncates(tiny: TransformersTextBackend, tiny_out: TextOutput) -> None:
    full = tiny_out.text
    stop = full[len(full) // 2 : len(full) // 2 + 3]  # a string this seed really produces
    cut = full.find(stop)
    out, deltas = run(tiny, request(stop=("never-there", stop)))
    assert out.finish_reason == "stop"
    assert out.text == full[:cut]
    assert stop not in "".join(deltas)
    assert out.generated_tokens < tiny_out.generated_tokens


def test_stop_sequence_absent_changes_nothing(tiny: TransformersTextBackend, tiny_out: TextOutput) -> None:
    # the last character can begin a stop string: held back, then flushed at the end
    out = run(tiny, request(stop=(tiny_out.text[-1] + "\x07never",)))[0]
    assert (out.text, out.finish_reason) == (tiny_out.text, "length")


def test_stop_text_holds_back_partial_matches() -> None:
    deltas: list[str] = []
    s = StopText(("STOP", "xy"), deltas.append)
    assert not s.feed("abc S")
    assert deltas == ["abc "]  # "S" could start STOP
    assert not s.feed("T")
    assert not s.feed("x!")  # "STx" is no stop: all but nothing held
    assert deltas == ["abc ", "STx!"]
    assert not s.feed("ST")
    assert s.feed("OPz")
    assert s.stopped and deltas[-1:] == ["STx!"] and s.finish() == "abc STx!"
    deltas.clear()
    s = StopText(("STOP",), deltas.append)
    s.feed("a ST")
    assert s.finish() == "a ST" and "".join(deltas) == "a ST"  # flushed: never became a stop
    deltas.clear()
    s = StopText(("bc", "abcd"), deltas.append)
    assert s.feed("xabcd") and s.finish() == "x"  # the stop that starts first wins ("abcd" at 1)


# --- cancel -------------------------------------------------------------------------------------


def test_cancel_mid_generation(tiny: TransformersTextBackend) -> None:
    cancel = threading.Event()
    deltas: list[str] = []

    def on_text(delta: str) -> None:
        deltas.append(delta)
        if len(deltas) == 3:
            cancel.set()

    started = time.perf_counter()
    with pytest.raises(JobCancelled):
        tiny.generate(request(max_new_tokens=400, temperature=1.0), on_text, cancel)
    assert time.perf_counter() - started < 2.0
    assert len(deltas) == 3  # stopped right after the token that saw the cancel


def test_cancel_before_start(tiny: TransformersTextBackend) -> None:
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(JobCancelled):
        tiny.generate(request(), lambda d: pytest.fail("no text after cancel"), cancel)


# --- limits -------------------------------------------------------------------------------------


def test_prompt_too_long(tiny: TransformersTextBackend) -> None:
    n = tiny.count_tokens("word " * 600)
    with pytest.raises(BackendError, match=rf"prompt is {n} tokens; with max_new_tokens 1 it exceeds the model context of 512 tokens"):
        run(tiny, request(prompt="word " * 600, max_new_tokens=1))
    p = tiny.count_tokens(PROMPT)
    run(tiny, request(max_new_tokens=512 - p, temperature=0.0, stop=("a",)))  # exactly fits
    with pytest.raises(BackendError, match=rf"prompt is {p} tokens; with max_new_tokens {513 - p} it exceeds"):
        run(tiny, request(max_new_tokens=513 - p))


BAD = [
    dict(temperature=-0.1),
    dict(temperature=2.01),
    dict(temperature=math.nan),
    dict(top_p=0.0),
    dict(top_p=1.01),
    dict(top_k=-1),
    dict(top_k=1001),
    dict(max_new_tokens=0),
    dict(max_new_tokens=4097),
    dict(seed=-1),
    dict(seed=jobs.MAX_SEED + 1),
    dict(stop=("a", "b", "c", "d", "e")),
    dict(stop=("",)),
    dict(stop=("x" * 65,)),
    dict(prompt=None),
]


@pytest.mark.parametrize("bad", BAD, ids=[str(b)[:40] for b in BAD])
def test_bad_ranges(tiny: TransformersTextBackend, null: TextBackend, bad: dict[str, object]) -> None:
    for backend in (tiny, null):
        with pytest.raises(BackendError):
            backend.generate(request(**bad), lambda d: pytest.fail("no text"), threading.Event())


def test_edges_of_ranges_accepted(tiny: TransformersTextBackend) -> None:
    for ok in (dict(temperature=2.0, top_p=1.0, top_k=0), dict(top_k=1000, top_p=0.01), dict(seed=jobs.MAX_SEED)):
        assert run(tiny, request(max_new_tokens=5, **ok))[0].generated_tokens >= 1  # type: ignore[arg-type]


# --- from_pretrained ----------------------------------------------------------------------------


def test_save_pretrained_loads_through_from_pretrained(
    tiny: TransformersTextBackend, tiny_out: TextOutput, tmp_path: Path
) -> None:
    tiny.language_model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    assert is_text_model(str(tmp_path))
    loaded = load_text_backend(str(tmp_path), "cpu")
    assert isinstance(loaded, TransformersTextBackend) and loaded.language_model is not tiny.language_model
    assert (loaded.model, loaded.context_length) == (str(tmp_path), 512)
    assert loaded.count_tokens(PROMPT) == tiny.count_tokens(PROMPT)
    assert run(loaded, request())[0].text == tiny_out.text
    greedy = request(temperature=0.0, stop=("e",))
    assert run(loaded, greedy)[0].text == run(tiny, greedy)[0].text
    prefixed = load_text_backend("text:" + str(tmp_path), "cpu")
    assert prefixed.model == str(tmp_path)


def test_missing_models_fail_fast(tmp_path: Path) -> None:
    started = time.perf_counter()
    with pytest.raises(BackendError, match="not in the local Hugging Face cache"):
        load_text_backend("aitbc-test/no-such-model", "cpu")
    with pytest.raises(BackendError, match="does not exist"):
        load_text_backend(str(tmp_path / "absent"), "cpu")
    with pytest.raises(BackendError, match="no config.json"):
        load_text_backend(str(tmp_path), "cpu")
    with pytest.raises(BackendError, match="empty"):
        load_text_backend("text:  ")
    assert time.perf_counter() - started < 30


def test_is_text_model(tmp_path: Path) -> None:
    assert is_text_model("tiny-llama") and is_text_model("null-text")
    assert is_text_model("text:meta-llama/Llama-3.2-1B") and is_text_model("text:/models/llama")
    for name in ("tiny-sd", "null", "", "text:", "aitbc-test/no-such-model", str(tmp_path / "absent")):
        assert not is_text_model(name), name
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert is_text_model(str(tmp_path))
    (tmp_path / "model_index.json").write_text("{}")  # a diffusers pipeline folder
    assert not is_text_model(str(tmp_path))


# --- null-text ----------------------------------------------------------------------------------


def test_null_text_streams_deterministically(null: TextBackend) -> None:
    assert (null.model, null.device) == ("null-text", "cpu")
    out, deltas = run(null, request(max_new_tokens=50))
    assert out.generated_tokens == 50 and len(deltas) == 50 and out.finish_reason == "length"
    assert out.prompt_tokens == null.count_tokens(PROMPT) == 1 + math.ceil(len(PROMPT) / 4)
    assert run(null, request(max_new_tokens=50))[0].text == out.text
    assert run(null, request(max_new_tokens=50, seed=8))[0].text != out.text


def test_null_text_stop_and_cancel(null: TextBackend) -> None:
    full = run(null, request(max_new_tokens=50))[0].text
    stop = full.split(" ")[10]
    out = run(null, request(max_new_tokens=50, stop=(" " + stop,)))[0]
    assert out.finish_reason == "stop" and out.text == full[: full.find(" " + stop)]
    cancel = threading.Event()
    deltas: list[str] = []

    def on_text(delta: str) -> None:
        deltas.append(delta)
        if len(deltas) == 5:
            cancel.set()

    with pytest.raises(JobCancelled):
        null.generate(request(max_new_tokens=4096, prompt="x"), on_text, cancel)
    assert len(deltas) == 5
    with pytest.raises(BackendError, match="exceeds the model context of 8192"):
        run(null, request(prompt="word " * 6000, max_new_tokens=4096))  # 30,000 characters: within the prompt limit


def test_null_text_imports_no_torch() -> None:
    code = (
        "import sys, threading\n"
        "from aitbc.miner.text import TextRequest, load_text_backend, is_text_model\n"
        "b = load_text_backend('null-text')\n"
        "b.generate(TextRequest('hi', 5, 0.0, 1.0, 0, 1, ()), lambda d: None, threading.Event())\n"
        "assert is_text_model('tiny-llama') and not is_text_model('tiny-sd')\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("backend", ["tiny", "null"])
def test_a_trace_streams_like_generate_and_covers_every_counted_token(backend: str) -> None:
    """What a re-execution of a stacked miner's job returns (Task.want_text_trace): the exact run,
    streamed through on_text as generate streams it, with one end and one margin per generated
    token, ends reaching the text (past it when a stop string cut it)."""
    from aitbc.miner.text import load_text_backend

    b = load_text_backend("tiny-llama" if backend == "tiny" else "null-text", "cpu")
    full = b.generate(request(max_new_tokens=24), lambda d: None, threading.Event()).text
    stop = full.split(" ")[3] if backend == "null" else full[8:10]
    for req in (request(max_new_tokens=24), request(max_new_tokens=24, stop=(stop,))):
        deltas: list[str] = []
        out, trace = b.trace(req, None, deltas.append)
        alone = b.generate(req, lambda d: None, threading.Event())
        assert (out.text, out.generated_tokens, out.finish_reason) == (alone.text, alone.generated_tokens,
                                                                      alone.finish_reason)
        assert "".join(deltas) == out.text == trace.text
        assert len(trace.ends) == len(trace.margins) == out.generated_tokens
        assert trace.ends[-1] == len(out.text) if out.finish_reason != "stop" else trace.ends[-1] > len(out.text)
        if backend == "null":
            assert all(m == math.inf for m in trace.margins)  # nothing to flip: a stacked run must match it
    assert out.finish_reason == "stop"
