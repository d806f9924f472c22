"""Text generation backends: a transformers causal LM (tiny in-process or from_pretrained) and null.

Import-light like `aitbc.miner.backend`: torch, transformers and tokenizers are imported only when a
real model is loaded, so the daemon and its tests can use the types, `is_text_model` and the null
backend without paying seconds of imports.

Models
- "tiny-llama" (TINY_TEXT_MODEL): the default. A byte-level BPE tokenizer (vocab 512; <unk> 0,
  <s> 1, </s> 2; <s> is prepended to every prompt, as Llama does) trained in-process on a fixed
  corpus, and a LlamaForCausalLM with 2 layers of width 64 whose random weights are fixed by
  `torch.manual_seed(TINY_SEED)`. Context 512 tokens. The text is gibberish; every line of code a
  job runs is the one a real checkpoint runs.
- "null-text" (NULL_TEXT_MODEL): no inference. Deterministic fake words, instantly, through the
  same validation, streaming, stop-sequence and cancel logic (dispatch/streaming benchmarks).
- Anything else: a Hugging Face model id or a local folder, loaded with
  AutoTokenizer/AutoModelForCausalLM.from_pretrained (local folder or local HF cache only, unless
  AITBC_MODEL_DOWNLOAD=1 and not HF_HUB_OFFLINE). Prompts are used as raw text (no chat template).

How a miner declares a text model
  The miner's model list holds both kinds; a name is a text model when `is_text_model` says so:
  - "tiny-llama" and "null-text";
  - any name written with the prefix "text:" (e.g. "text:meta-llama/Llama-3.2-1B" or
    "text:/models/llama-3.2-1b"): an explicit declaration, needed for a Hub id that is not in the
    local cache yet. The prefix is only a declaration: `load_text_backend` strips it and the
    backend's `model` (the name advertised and submitted by clients) is the name without it;
  - best effort without the prefix: a local folder, or a Hub id in the local HF cache, whose
    config.json names a `...ForCausalLM` / `...LMHeadModel` architecture (and which is not a
    diffusers pipeline, i.e. has no model_index.json). No torch import, no network.

Token counts
  `count_tokens(text)` is the number of context positions `text` takes as a prompt, special tokens
  the tokenizer adds (the tiny model's <s>) included, i.e. what `TextOutput.prompt_tokens` will be
  for that prompt. `generated_tokens` counts the tokens the model produced up to and including the
  one that ended the generation: a final EOS, or the token that completed a stop string (tokens
  that began the stop string count too); the text of those is not returned. transformers runs one
  more forward step after a stop string completes (it checks stopping criteria before streaming
  a token); that token is dropped and not counted.

Streaming
  `on_text(delta)` is called on the thread that runs `generate`, with each piece of text as soon as
  it is decodable: the decoder keeps back a token whose bytes end in an incomplete UTF-8 sequence
  until the next token completes it, and the stop-sequence logic keeps back a tail that could still
  grow into a stop string (flushed at the end if it did not). The concatenation of every delta is
  exactly `TextOutput.text`. An exception from `on_text` aborts the generation and propagates.

Concurrency and determinism
  Every text job of a transformers backend is one stream of its backend's decode loop (one thread
  per loaded model): up to the miner's max_concurrency jobs run at once, a new job joins at the
  next decoding step, and each step advances every stream by one token, so all streams make
  progress together and a new one gets its first token without waiting for the others to finish.
  Each stream samples with its own `torch.Generator` seeded with the job's seed (temperature,
  top-k, top-p are transformers' own warpers, in generate()'s order; then `torch.multinomial(probs,
  1, generator=g)`); nothing draws from the global torch RNG. How a step runs the streams is the
  miner's `text_batching` (docs/operations.md, "Text streams"):
  - "exact" (default, `_DecodeLoop`): each stream keeps its own KV cache and runs its own forward
    pass (batch 1). So a job's tokens are exactly those of the same job run alone, whichever jobs
    shared the loop, when they joined or whether they were cancelled
    (tests/miner/test_text_batching.py), and hub re-execution compares text byte for byte.
  - "stacked" (`_StackedDecodeLoop`, `_Rows`): a new stream's prompt is prefilled alone (its first
    token is the alone one), then its KV cache joins one left-padded batched cache, and every step
    is one forward pass over all rows (at most text_max_batch) with an attention mask hiding the
    padding and per-row position ids. Aggregate tokens/s grows with the streams; but a batched
    float forward is not bit-identical to batch 1 (a GEMM over 16 rows reduces in another order),
    so a near-tie between two tokens can flip. Measured on CPU it never did (docs/operations.md);
    the hub judges stacked text with `aitbc.hub.verification.compare_text` against the trace of
    an exact run (`TransformersTextBackend.trace`).
  A stream that is cancelled, hits a stop string or fails leaves the loop at the next step; the
  others do not notice.
  Decoding, stop strings and `on_text` run on the thread that called `generate` (tokens come to it
  through a queue). On CPU, the same request gives the same text in every process (tests check
  it); on CUDA, kernels can differ across GPUs and driver versions, so only same-machine
  repeatability holds, and a CUDA generator gives other numbers than a CPU one for one seed.
"""

from __future__ import annotations

import atexit
import gc
import hashlib
import itertools
import json
import math
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from aitbc import jobs
from aitbc.miner.backend import BackendError, JobCancelled, pick_device, weights_sha256

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from aitbc.hub.verification import TextTrace

TINY_TEXT_MODEL = "tiny-llama"
NULL_TEXT_MODEL = "null-text"
TEXT_PREFIX = "text:"  # explicit declaration of a text model in a miner's model list

# Allow from_pretrained to reach the Hugging Face Hub for an id that is not in the local cache.
DOWNLOAD_ENV = "AITBC_MODEL_DOWNLOAD"

TINY_SEED = 0  # fixed: the tiny model's random weights are part of its identity
TINY_CONTEXT = 512
TINY_VOCAB = 512
NULL_CONTEXT = 8192

# miner config text_batching (docs/operations.md, "Text streams"): how one model's concurrent streams run
TEXT_EXACT = "exact"  # each stream its own batch-1 forward pass: a job's tokens are those of the job alone
TEXT_STACKED = "stacked"  # one batched forward pass per round: throughput grows with streams, not bit-exact
TEXT_BATCHING = (TEXT_EXACT, TEXT_STACKED)
DEFAULT_TEXT_MAX_BATCH = 16

FINISH_LENGTH = "length"
FINISH_STOP = "stop"
FINISH_EOS = "eos"


@dataclass(frozen=True)
class TextRequest:
    prompt: str
    max_new_tokens: int
    temperature: float  # 0 = greedy
    top_p: float
    top_k: int  # 0 = off
    seed: int
    stop: tuple[str, ...]


@dataclass(frozen=True)
class TextOutput:
    text: str  # generated text only (not the prompt), ending before any stop string
    prompt_tokens: int
    generated_tokens: int
    gpu_ms: int  # device time of the generation, >= 1
    finish_reason: str  # "length" | "stop" | "eos"


@runtime_checkable
class TextBackend(Protocol):
    model: str  # the name the miner advertises
    device: str  # "cuda:0" / "cpu"
    context_length: int  # prompt tokens + max_new_tokens may not exceed it

    def count_tokens(self, text: str) -> int: ...

    def generate(
        self,
        req: TextRequest,
        on_text: Callable[[str], None],
        cancel: threading.Event,
    ) -> TextOutput: ...

    def trace(
        self, req: TextRequest, cancel: threading.Event | None = None, on_text: Callable[[str], None] | None = None,
    ) -> tuple[TextOutput, TextTrace]:
        """`req` run as an exact (batch-1) stream, streamed like `generate`, with its token trace
        (what a re-execution of a stacked miner's job returns, Task.want_text_trace)."""
        ...


def check_text_request(req: TextRequest) -> None:
    """Check `req` against the limits every text backend shares: those of aitbc.jobs, so a miner
    takes exactly what the coordinator can send (text jobs are never sharded: the seed is the job's,
    at most jobs.MAX_SEED). The context is checked later, once the prompt is tokenized."""
    if not isinstance(req.prompt, str):
        raise BackendError("prompt must be text")
    if len(req.prompt) > jobs.MAX_TEXT_PROMPT_CHARS:  # before it is tokenized
        raise BackendError(f"prompt is {len(req.prompt)} characters; the limit is {jobs.MAX_TEXT_PROMPT_CHARS}")
    if isinstance(req.max_new_tokens, bool) or not isinstance(req.max_new_tokens, int):
        raise BackendError("max_new_tokens must be an integer")
    if not 1 <= req.max_new_tokens <= jobs.MAX_NEW_TOKENS:
        raise BackendError(f"max_new_tokens must be between 1 and {jobs.MAX_NEW_TOKENS}, got {req.max_new_tokens}")
    if not isinstance(req.temperature, int | float) or not math.isfinite(req.temperature):
        raise BackendError(f"temperature must be a number between 0 and {jobs.MAX_TEMPERATURE:g}")
    if not 0.0 <= req.temperature <= jobs.MAX_TEMPERATURE:
        raise BackendError(f"temperature must be between 0 and {jobs.MAX_TEMPERATURE:g}, got {req.temperature}")
    if not isinstance(req.top_p, int | float) or not math.isfinite(req.top_p) or not 0.0 < req.top_p <= 1.0:
        raise BackendError(f"top_p must be greater than 0 and at most 1, got {req.top_p}")
    if isinstance(req.top_k, bool) or not isinstance(req.top_k, int) or not 0 <= req.top_k <= jobs.MAX_TOP_K:
        raise BackendError(f"top_k must be an integer between 0 (off) and {jobs.MAX_TOP_K}, got {req.top_k}")
    if isinstance(req.seed, bool) or not isinstance(req.seed, int) or not 0 <= req.seed <= jobs.MAX_SEED:
        raise BackendError(f"seed must be between 0 and {jobs.MAX_SEED}, got {req.seed}")
    if not isinstance(req.stop, tuple | list) or len(req.stop) > jobs.MAX_STOP:
        raise BackendError(f"at most {jobs.MAX_STOP} stop sequences are allowed")
    for s in req.stop:
        if not isinstance(s, str) or not 1 <= len(s) <= jobs.MAX_STOP_CHARS:
            raise BackendError(f"each stop sequence must be 1 to {jobs.MAX_STOP_CHARS} characters, got {s!r}")


def check_context(prompt_tokens: int, max_new_tokens: int, context_length: int) -> None:
    if prompt_tokens < 1:
        raise BackendError("prompt is empty: this model needs at least one prompt token")
    if prompt_tokens + max_new_tokens > context_length:
        raise BackendError(
            f"prompt is {prompt_tokens} tokens; with max_new_tokens {max_new_tokens} it exceeds "
            f"the model context of {context_length} tokens"
        )


class StopText:
    """Turns decoded pieces into the deltas handed to `on_text`, ending before any stop string.

    The text sent so far never ends with a proper prefix of a stop string (that tail is held back),
    so a stop string found later always starts at or after the sent position.
    """

    def __init__(self, stops: tuple[str, ...], on_text: Callable[[str], None]) -> None:
        self._stops = tuple(stops)
        self._longest = max((len(s) for s in self._stops), default=0)
        self._on_text = on_text
        self._text = ""  # everything decoded so far
        self._sent = 0  # length of the prefix of _text handed to on_text
        self.stopped = False

    @property
    def text(self) -> str:
        return self._text[: self._sent]

    def _send(self, end: int) -> None:
        if end > self._sent:
            piece = self._text[self._sent : end]
            self._sent = end
            self._on_text(piece)

    def feed(self, piece: str) -> bool:
        """Add decoded text; returns True once a stop string has appeared."""
        if self.stopped or not piece:
            return self.stopped
        self._text += piece
        if not self._stops:
            self._send(len(self._text))
            return False
        start = max(0, self._sent - self._longest)
        hits = [i for i in (self._text.find(s, start) for s in self._stops) if i >= 0]
        if hits:
            self.stopped = True
            self._send(max(self._sent, min(hits)))
            self._text = self._text[: self._sent]
            return True
        hold = 0
        for n in range(min(self._longest - 1, len(self._text) - self._sent), 0, -1):
            tail = self._text[-n:]
            if any(s.startswith(tail) for s in self._stops):
                hold = n
                break
        self._send(len(self._text) - hold)
        return False

    def finish(self) -> str:
        """Flush the held-back tail (it never became a stop string) and return the whole text."""
        if not self.stopped:
            self._send(len(self._text))
        return self.text


# --- null backend -------------------------------------------------------------------------------

_NULL_WORDS = (
    "the", "miner", "block", "token", "ledger", "proof", "of", "authority", "stream", "compute",
    "a", "receipt", "signed", "model", "and", "fast", "GPU", "job", "is", "to",
)


class NullTextBackend:
    """Everything real but the model: validates, streams one fake word per token, honours stop
    strings and cancel, and returns at once. Torch is never imported.

    Its tokenizer: one token for the start of the prompt plus one per 4 UTF-8 bytes (rounded up).
    Token i of the output is a word chosen by sha256(seed, prompt, i), so the text depends on seed
    and prompt only (sampling parameters are accepted and ignored); it never ends with "eos".
    gpu_ms is the wall time of the call, at least 1.
    """

    model = NULL_TEXT_MODEL
    device = "cpu"
    context_length = NULL_CONTEXT

    def count_tokens(self, text: str) -> int:
        return 1 + -(-len(text.encode("utf-8")) // 4)

    def generate(
        self,
        req: TextRequest,
        on_text: Callable[[str], None],
        cancel: threading.Event,
    ) -> TextOutput:
        started = time.perf_counter()
        check_text_request(req)
        prompt_tokens = self.count_tokens(req.prompt)
        check_context(prompt_tokens, req.max_new_tokens, self.context_length)
        if cancel.is_set():
            raise JobCancelled("cancelled before start")
        out = StopText(req.stop, on_text)
        generated = 0
        finish = FINISH_LENGTH
        for i, word in enumerate(self._words(req, req.max_new_tokens)):
            generated += 1
            if out.feed(word if i == 0 else " " + word):
                finish = FINISH_STOP
                break
            if cancel.is_set():
                raise JobCancelled(f"cancelled after {generated} tokens")
        text = out.finish()
        gpu_ms = max(1, round((time.perf_counter() - started) * 1000))
        return TextOutput(text, prompt_tokens, generated, gpu_ms, finish)

    def trace(
        self, req: TextRequest, cancel: threading.Event | None = None, on_text: Callable[[str], None] | None = None,
    ) -> tuple[TextOutput, TextTrace]:
        """Its output is a function of seed and prompt, with no decision to flip: every token's
        margin is +inf (a stacked run must match it exactly)."""
        from aitbc.hub.verification import TextTrace

        pieces: list[str] = []

        def keep(delta: str) -> None:
            pieces.append(delta)
            if on_text is not None:
                on_text(delta)

        out = self.generate(req, keep, cancel or threading.Event())
        words = [w if i == 0 else " " + w for i, w in enumerate(self._words(req, out.generated_tokens))]
        ends = tuple(itertools.accumulate(len(w) for w in words))
        return out, TextTrace(out.text, ends, (math.inf,) * len(ends))

    @staticmethod
    def _words(req: TextRequest, n: int) -> list[str]:
        base = hashlib.sha256(f"{req.seed}|{req.prompt}".encode()).digest()
        return [_NULL_WORDS[hashlib.sha256(base + i.to_bytes(4, "big")).digest()[0] % len(_NULL_WORDS)] for i in range(n)]


# --- which names are text models ----------------------------------------------------------------

_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def _config_is_causal_lm(config_file: Path) -> bool:
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return False
    architectures = config.get("architectures") if isinstance(config, dict) else None
    return isinstance(architectures, list) and any(
        isinstance(a, str) and a.endswith(_CAUSAL_SUFFIXES) for a in architectures
    )


def is_text_model(model: str) -> bool:
    """Whether `model` (a name from a miner's model list) is served by the text backend.

    True for tiny-llama, null-text and any "text:..." name; best effort otherwise: a local folder or
    a locally cached Hub id whose config.json declares a causal-LM architecture. Never downloads.
    """
    if not isinstance(model, str):
        return False
    name = model.strip()
    if name in (TINY_TEXT_MODEL, NULL_TEXT_MODEL) or (
        name.startswith(TEXT_PREFIX) and name[len(TEXT_PREFIX) :].strip()
    ):
        return True
    if not name:
        return False
    folder = Path(name).expanduser()
    if folder.is_dir():
        return not (folder / "model_index.json").is_file() and _config_is_causal_lm(folder / "config.json")
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        return False
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on it
        return False
    try:
        if isinstance(try_to_load_from_cache(name, "model_index.json"), str):
            return False
        cached = try_to_load_from_cache(name, "config.json")
    except Exception:  # malformed repo id and the like: not a model we know
        return False
    return isinstance(cached, str) and _config_is_causal_lm(Path(cached))


def load_text_backend(model: str, device: str | None = None, *, batching: str = TEXT_EXACT,
                      max_batch: int = DEFAULT_TEXT_MAX_BATCH) -> TextBackend:
    """Load `model` once and return a backend for it; `batching` and `max_batch` are the miner's
    text_batching and text_max_batch (TransformersTextBackend; the null backend ignores them).

    "tiny-llama": built in-process (no download). "null-text": no inference at all. Anything else
    (a "text:" prefix is stripped first): a Hugging Face model id or a local folder, loaded with
    from_pretrained through the same backend class as the tiny model.
    """
    if not isinstance(model, str) or not model.strip():
        raise BackendError("model name is empty")
    model = model.strip()
    if model.startswith(TEXT_PREFIX):
        model = model[len(TEXT_PREFIX) :].strip()
        if not model:
            raise BackendError("model name after 'text:' is empty")
    if model == NULL_TEXT_MODEL:
        return NullTextBackend()
    resolved = pick_device(device)
    if model == TINY_TEXT_MODEL:
        tokenizer, lm = build_tiny_text_model()
    else:
        tokenizer, lm = load_pretrained_text_model(model, resolved)
    return TransformersTextBackend(tokenizer, lm, model=model, device=resolved, batching=batching,
                                   max_batch=max_batch)


# --- transformers backend -----------------------------------------------------------------------

# A fixed corpus: the tiny tokenizer's merges are trained on it, so they are part of its identity.
_TINY_CORPUS = (
    "The miner runs jobs for the coordinator and streams tokens back to the client.",
    "A block is sealed by an authority once its transactions are verified.",
    "Proof of authority: a fixed set of signers take turns producing blocks.",
    "Receipts count prompt tokens and generated tokens, and are signed by the miner.",
    "Explain proof of authority in one paragraph.",
    "Once upon a time, a small language model learned to write stories about GPUs.",
    "The quick brown fox jumps over the lazy dog. 0123456789 !?,;:'\"()[]{}<>/\\|@#$%^&*-+=_~`",
    "Héllo wörld, naïve café, Straße, ¿qué? 東京 😀",
)


def build_tiny_tokenizer() -> PreTrainedTokenizerBase:
    """Byte-level BPE (every byte is a token, so any text round-trips), 512 entries, <s> prepended.

    Built as a `tokenizers.Tokenizer` object and wrapped, not written to vocab/merges files: with
    transformers 5 a tokenizer constructor may silently ignore *_file arguments.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=["<unk>", "<s>", "</s>"],  # ids 0, 1, 2 as in Llama
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=1,
        show_progress=False,
    )
    tok.train_from_iterator(_TINY_CORPUS, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=TINY_CONTEXT,
    )


def build_tiny_text_model() -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """The default text model: the tiny tokenizer and a float32 LlamaForCausalLM on the CPU with
    weights fixed by TINY_SEED; the backend moves it to its device."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    if len(tokenizer) > TINY_VOCAB:  # pragma: no cover - guards a tokenizers behaviour change
        raise BackendError(f"tiny tokenizer has {len(tokenizer)} entries, more than {TINY_VOCAB}")
    config = LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=TINY_CONTEXT,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(TINY_SEED)
    lm = LlamaForCausalLM(config).eval()
    lm.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return tokenizer, lm


def load_pretrained_text_model(model: str, device: str) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """Load a causal LM and its tokenizer from a local folder or the Hugging Face cache.

    float32 on CPU; on CUDA bfloat16 where supported, else float16. A Hub id is looked up in the
    local cache only, unless AITBC_MODEL_DOWNLOAD=1 (and not HF_HUB_OFFLINE) allows a download;
    every failure becomes a BackendError that names the model.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(model).expanduser()
    is_folder = folder.is_dir()
    if not is_folder and model.startswith((".", "/", "~")):
        raise BackendError(f"model folder {model!r} does not exist")
    if is_folder and not (folder / "config.json").is_file():
        raise BackendError(f"model folder {model!r} has no config.json: not a transformers model")
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    allow_download = os.environ.get(DOWNLOAD_ENV, "") == "1" and not offline
    source = str(folder) if is_folder else model
    local_only = is_folder or not allow_download
    if device.startswith("cuda"):
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = torch.float32
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local_only)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        lm = AutoModelForCausalLM.from_pretrained(
            source, config=config, dtype=dtype, local_files_only=local_only
        )
    except BackendError:
        raise
    except Exception as exc:  # transformers/hub raise a zoo of types (OSError, ValueError, KeyError ...)
        if is_folder:
            raise BackendError(f"cannot load text model folder {model!r}: {exc}") from exc
        hint = "" if allow_download else f" (not in the local Hugging Face cache; set {DOWNLOAD_ENV}=1 to download)"
        raise BackendError(f"cannot load text model {model!r}{hint}: {type(exc).__name__}: {exc}") from exc
    return tokenizer, lm.eval()


def _context_length(lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int:
    config = lm.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 10**7:  # tokenizers without a limit report ~1e30
        return limit
    raise BackendError("cannot tell this model's context length (no max_position_embeddings in its config)")


class _Stream:
    """One text job in a decode loop: its inputs, its own sampling state and its KV cache.

    The loop thread writes ("token", id), then ("end", None) or ("error", exc) to `out`; the
    caller's thread sets `halt` (stop string seen, on_text failed) or the job's cancel event."""

    def __init__(
        self, prompt_ids: list[int], req: TextRequest, eos_ids: frozenset[int], cancel: threading.Event,
        device: str,
    ) -> None:
        import torch
        from transformers import (
            LogitsProcessorList,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        self.prompt_ids = prompt_ids
        self.max_new_tokens = req.max_new_tokens
        self.eos_ids = eos_ids
        self.cancel = cancel
        self.halt = False
        self.out: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.sample = req.temperature > 0
        self.temperature = float(req.temperature)
        self.warpers = LogitsProcessorList()
        self.generator: torch.Generator | None = None
        if self.sample:
            # as generate() builds them for do_sample, in its order
            if req.temperature != 1.0:
                self.warpers.append(TemperatureLogitsWarper(float(req.temperature)))
            if req.top_k:
                self.warpers.append(TopKLogitsWarper(top_k=int(req.top_k), min_tokens_to_keep=1))
            if req.top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(top_p=float(req.top_p), min_tokens_to_keep=1))
            # the job's own generator: its draws never depend on any other job (module docstring)
            self.generator = torch.Generator(device).manual_seed(req.seed)
        self.ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # prompt + generated
        self.cache: Any = None
        self.produced = 0
        self.busy_s = 0.0  # wall time of this stream's own steps (forward, sampling, the token's copy)
        self.margins: list[float] | None = None  # a list when tracing (TransformersTextBackend.trace)

    def step(self, lm: PreTrainedModel) -> int:
        """One forward pass of this stream alone (the prompt first, then the last token) and its
        next token."""
        started = time.perf_counter()
        if self.cache is None:
            out = lm(input_ids=self.ids, use_cache=True)
        else:
            out = lm(input_ids=self.ids[:, -1:], past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        token_id = self.take(out.logits[:, -1, :])
        self.busy_s += time.perf_counter() - started
        return token_id

    def take(self, logits: torch.Tensor) -> int:
        """This stream's next token from its row of logits (1 x vocab), drawn with its own
        generator and sampling parameters, whichever forward pass (alone or stacked) made them."""
        import torch

        logits = logits.to(dtype=torch.float32)  # as generate(): scores in float32
        if self.sample:
            probs = torch.softmax(self.warpers(self.ids, logits), dim=-1)
            if self.margins is not None:
                self.margins.append(_sampling_margin(probs, self.generator) * self.temperature)
            token = torch.multinomial(probs, 1, generator=self.generator)
        else:
            if self.margins is not None:
                self.margins.append(_top2_gap(torch.log_softmax(logits, dim=-1)))
            token = torch.argmax(logits, dim=-1, keepdim=True)
        self.ids = torch.cat([self.ids, token.to(self.ids.dtype)], dim=-1)
        self.produced += 1
        return int(token.item())

    @property
    def done(self) -> bool:
        return self.produced >= self.max_new_tokens or (self.produced > 0 and int(self.ids[0, -1]) in self.eos_ids)


_LOOPS: weakref.WeakSet[_DecodeLoop] = weakref.WeakSet()


@atexit.register
def _close_loops() -> None:
    """At interpreter exit, end every decode thread before finalization: a daemon thread that wakes
    from its idle wait (or finishes a step) while the interpreter is torn down aborts the process
    ("terminate called without an active exception", seen in test runs)."""
    for loop in list(_LOOPS):
        loop.close()
    # and free now what their streams left in reference cycles (stacked KV caches): freed after
    # finalization instead, a torch object's release aborted the process the same way (the stacking
    # tests: about 1 run in 8 before, 0 in 38 after)
    gc.collect()


class _DecodeLoop:
    """Advances every stream of one model by a token per round, on one thread (started on demand,
    gone after `IDLE_S` without streams, or at `close`). See the module docstring."""

    IDLE_S = 1.0

    def __init__(self, lm: PreTrainedModel) -> None:
        self._lm = lm
        self._cond = threading.Condition()
        self._pending: list[_Stream] = []
        self._thread: threading.Thread | None = None
        self._closing = False
        self.rounds = 0  # decoding rounds run (tests, benchmarks)
        self.most_streams = 0  # the most streams one round has advanced (tests, benchmarks)
        _LOOPS.add(self)

    def submit(self, stream: _Stream) -> None:
        with self._cond:
            if self._closing:
                raise BackendError("the text backend is shutting down")
            self._pending.append(stream)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="aitbc-text-decode", daemon=True)
                self._thread.start()
            self._cond.notify()

    def close(self, timeout: float = 10.0) -> None:
        """End the thread: streams still in it fail with a BackendError; later submits are refused."""
        with self._cond:
            self._closing = True
            thread = self._thread
            self._cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _joining(self, busy: bool, room: int | None = None) -> list[_Stream] | None:
        """The streams that join this round (at most `room`, None = all); None when the thread ends: idle for
        IDLE_S, or closing (every stream it holds then fails, `_abandon`)."""
        with self._cond:
            if not busy and not self._pending and not self._closing:
                self._cond.wait(self.IDLE_S)
            if self._closing or (not busy and not self._pending):
                self._thread = None
                self._abandon(self._pending)
                self._pending = []
                return None
            if room is None:
                room = len(self._pending)
            joining, self._pending = self._pending[:room], self._pending[room:]
            return joining

    @staticmethod
    def _abandon(streams: list[_Stream]) -> None:
        for stream in streams:
            stream.cache = None
            stream.out.put(("error", BackendError("the text backend is shutting down")))

    def _run(self) -> None:
        import torch

        active: list[_Stream] = []
        with torch.inference_mode():
            while True:
                joining = self._joining(bool(active))
                if joining is None:
                    self._abandon(active)
                    return
                active += joining  # new streams join at this round
                self.rounds += 1
                self.most_streams = max(self.most_streams, len(active))
                for stream in list(active):
                    if stream.halt or stream.cancel.is_set():
                        active.remove(stream)
                        stream.out.put(("end", None))
                        continue
                    try:
                        token_id = stream.step(self._lm)
                    except Exception as exc:  # this stream's failure (bad input, out of memory): it alone ends
                        active.remove(stream)
                        stream.cache = None
                        stream.out.put(("error", exc))
                        continue
                    stream.out.put(("token", token_id))
                    if stream.done:
                        active.remove(stream)
                        stream.cache = None  # frees its KV cache now
                        stream.out.put(("end", None))


def _top2_gap(scores: torch.Tensor) -> float:
    """Best minus second-best of the finite scores (inf when fewer than two are allowed)."""
    import torch

    finite = scores[torch.isfinite(scores)]
    if finite.numel() < 2:
        return math.inf
    top = finite.topk(2).values
    return float(top[0] - top[1])


def _sampling_margin(probs: torch.Tensor, generator: torch.Generator | None) -> float:
    """The gap of the sampling decision about to be made: torch.multinomial(probs, 1) takes the
    argmax of probs / q with q ~ Exp(1) drawn from the generator (one draw per entry), so the
    same draw from a copy of the generator gives the scores log p - log q it compares (in units
    of logits / temperature: the caller multiplies by the temperature). Checked against
    torch.multinomial by tests/miner/test_text_stacking.py."""
    import torch

    twin = torch.Generator(probs.device)
    assert generator is not None
    twin.set_state(generator.get_state())
    q = torch.empty_like(probs).exponential_(1, generator=twin)
    return _top2_gap(torch.log(probs) - torch.log(q))


class _Rows:
    """The stacked streams of a `_StackedDecodeLoop`: one KV cache whose row i is `streams[i]`'s,
    each row left-padded to the common length, and the attention mask (1 = a real position) that
    hides the padding. A row's next position id is its count of real positions, so rotary
    positions are those the stream has alone; a stream leaves by having its row dropped, and
    leading columns that only padding still uses are trimmed then."""

    def __init__(self) -> None:
        self.streams: list[_Stream] = []
        self.cache: Any = None  # transformers DynamicCache (DynamicLayer per layer: keys/values B x H x T x D)
        self.mask: torch.Tensor | None = None  # B x T, long

    def join(self, stream: _Stream) -> None:
        """Add a stream whose prompt was prefilled alone (its own batch-1 cache)."""
        import torch
        import torch.nn.functional as F

        cache, stream.cache = stream.cache, None
        n = cache.layers[0].keys.shape[-2]
        if self.mask is None:
            self.cache, self.mask = cache, torch.ones((1, n), dtype=torch.long, device=stream.ids.device)
            self.streams = [stream]
            return
        t = self.mask.shape[1]
        if n > t:  # the newcomer is longer: everyone else gets more left padding
            for layer in self.cache.layers:
                layer.keys, layer.values = F.pad(layer.keys, (0, 0, n - t, 0)), F.pad(layer.values, (0, 0, n - t, 0))
            self.mask = F.pad(self.mask, (n - t, 0))
        row = torch.zeros((1, max(n, t)), dtype=torch.long, device=self.mask.device)
        row[:, -n:] = 1
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            k, v = theirs.keys, theirs.values
            if n < t:
                k, v = F.pad(k, (0, 0, t - n, 0)), F.pad(v, (0, 0, t - n, 0))
            mine.keys, mine.values = torch.cat([mine.keys, k]), torch.cat([mine.values, v])
        self.mask = torch.cat([self.mask, row])
        self.streams.append(stream)

    def drop(self, gone: list[_Stream]) -> None:
        import torch

        if not gone:
            return
        keep = [i for i, s in enumerate(self.streams) if s not in gone]
        self.streams = [self.streams[i] for i in keep]
        if not keep or self.mask is None:
            self.cache = self.mask = None
            return
        idx = torch.tensor(keep, device=self.mask.device)
        mask = self.mask[idx]
        first = int(mask.any(dim=0).nonzero()[0])  # columns before it are padding in every row left
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[idx, :, first:], layer.values[idx, :, first:]
        self.mask = mask[:, first:]

    def forward(self, lm: PreTrainedModel) -> Any:
        """One forward pass of every row (its last token) through the shared cache: the next-token
        logits, one row per stream."""
        import torch

        assert self.mask is not None
        last = torch.stack([s.ids[0, -1] for s in self.streams]).unsqueeze(1)
        positions = self.mask.sum(dim=1, keepdim=True)
        mask = torch.cat([self.mask, torch.ones_like(positions)], dim=1)
        out = lm(input_ids=last, attention_mask=mask, position_ids=positions, past_key_values=self.cache,
                 use_cache=True)
        self.cache, self.mask = out.past_key_values, mask
        return out.logits[:, -1, :]

    def step(self, lm: PreTrainedModel) -> list[int]:
        """One forward pass of every row, then each row's token drawn by its stream."""
        logits = self.forward(lm)
        return [s.take(logits[i : i + 1]) for i, s in enumerate(self.streams)]


def _check_stackable(lm: PreTrainedModel, model: str, device: str) -> None:
    """Stacking pads and concatenates the KV cache of full-attention layers; refuse a model whose
    cache is anything else (sliding windows, linear attention, recurrent state) at load time."""
    import torch
    from transformers.cache_utils import DynamicLayer

    with torch.inference_mode():
        cache = lm(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device), use_cache=True).past_key_values
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers or []}) or [type(cache).__name__]
        raise BackendError(f"text_batching = \"stacked\" needs a model with a full-attention KV cache; {model!r} "
                           f"has {', '.join(kinds)}: use text_batching = \"exact\"")


class _StackedDecodeLoop(_DecodeLoop):
    """text_batching = "stacked": the streams of one model decode in one batched forward pass per
    round (at most `max_rows` rows; streams beyond it wait for a row to free). A new stream's
    prompt is prefilled alone, which gives its first token, and it joins the stack at the next
    round boundary; a stream that ends, is cancelled or halted leaves its row at the next round.
    Each stream still samples its own row with its own generator and parameters. The logits of
    a row are not bit-identical to those of the stream alone (module docstring, docs/operations.md
    "Text streams"). A failing stacked forward pass (out of memory) fails every stream in it."""

    def __init__(self, lm: PreTrainedModel, max_rows: int) -> None:
        super().__init__(lm)
        if max_rows < 1:
            raise BackendError("text_max_batch must be at least 1")
        self.max_rows = max_rows
        self.stacked_rounds = 0  # rounds that ran a forward pass over 2 or more rows (tests, benchmarks)

    def _run(self) -> None:
        import torch

        rows = _Rows()
        with torch.inference_mode():
            while True:
                joining = self._joining(bool(rows.streams), self.max_rows - len(rows.streams))
                if joining is None:
                    self._abandon(rows.streams)
                    rows.drop(list(rows.streams))
                    return
                self.rounds += 1
                gone = [s for s in rows.streams if s.halt or s.cancel.is_set()]
                rows.drop(gone)
                for stream in gone:
                    stream.out.put(("end", None))
                for stream in joining:
                    if stream.halt or stream.cancel.is_set():
                        stream.out.put(("end", None))
                        continue
                    try:
                        token_id = stream.step(self._lm)  # its prefill alone: the first token is the alone one
                    except Exception as exc:  # this stream's failure (bad input, out of memory): it alone ends
                        stream.cache = None
                        stream.out.put(("error", exc))
                        continue
                    stream.out.put(("token", token_id))
                    if stream.done:
                        stream.cache = None
                        stream.out.put(("end", None))
                    else:
                        rows.join(stream)
                self.most_streams = max(self.most_streams, len(rows.streams))
                if not rows.streams:
                    continue
                started = time.perf_counter()
                try:
                    tokens = rows.step(self._lm)
                except Exception as exc:  # the stacked pass failed: every stream in it fails
                    for stream in rows.streams:
                        stream.out.put(("error", exc))
                    rows.drop(list(rows.streams))
                    continue
                if len(tokens) > 1:
                    self.stacked_rounds += 1
                share = (time.perf_counter() - started) / len(tokens)
                finished = []
                for stream, token_id in zip(rows.streams, tokens, strict=True):
                    stream.busy_s += share
                    stream.out.put(("token", token_id))
                    if stream.done:
                        finished.append(stream)
                rows.drop(finished)
                for stream in finished:
                    stream.out.put(("end", None))


class _IncrementalDecoder:
    """Decodes a growing list of token ids into text deltas, correct across tokens that split a
    UTF-8 character or whose text depends on the previous token (SentencePiece leading spaces).

    The window scheme of TGI/vLLM: text is decoded from `prefix` (a token boundary where the
    decoded text was complete), and a delta is released only when it does not end with U+FFFD,
    i.e. no multi-byte character is still half-made.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(self.ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """The rest at the end of generation, replacement characters included."""
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return new_text[len(prefix_text) :]


class TransformersTextBackend:
    """Runs TextRequests on one causal LM, loaded once (see the module docstring for threading).

    gpu_ms: the wall time of this job's own decoding steps (its forward passes, sampling and the copy
    of each token to the host, which waits for the device on CUDA), summed; not the time it waited
    while other streams' steps ran, nor validation. Stacked: its prefill plus its share (1 / rows)
    of each stacked pass it was in.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, lm: PreTrainedModel, *, model: str, device: str,
        batching: str = TEXT_EXACT, max_batch: int = DEFAULT_TEXT_MAX_BATCH,
    ) -> None:
        if batching not in TEXT_BATCHING:
            raise BackendError(f"text_batching must be one of {', '.join(TEXT_BATCHING)} (got {batching!r})")
        self.model = model
        self.batching = batching
        self.device = device
        self._tokenizer = tokenizer
        self.weights_sha256 = weights_sha256({"model": lm})  # declared at Register (model identity)
        self._lm = lm.to(device)
        self.context_length = _context_length(lm, tokenizer)
        eos = lm.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        self._eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        pad = lm.generation_config.pad_token_id
        if pad is None:
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self._eos_ids, default=0)
        self._pad_id = pad
        self._bos_id = lm.generation_config.bos_token_id
        self._trace_lock = threading.Lock()
        self._exact_loop: _DecodeLoop | None = None  # the loop `trace` runs on (made on first use)
        if batching == TEXT_STACKED:
            _check_stackable(self._lm, model, device)
            self._loop: _DecodeLoop = _StackedDecodeLoop(self._lm, max_batch)
        else:
            self._loop = _DecodeLoop(self._lm)

    @property
    def decode_loop(self) -> _DecodeLoop:
        return self._loop

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self._tokenizer

    @property
    def language_model(self) -> PreTrainedModel:
        """The shared model (for save_pretrained, benchmarks); do not call it from worker threads."""
        return self._lm

    def _encode(self, text: str) -> list[int]:
        # the Rust tokenizer's padding/truncation settings are not touched here, so no lock needed
        return list(self._tokenizer(text, add_special_tokens=True)["input_ids"])

    def count_tokens(self, text: str) -> int:
        if not isinstance(text, str):
            raise BackendError("text must be a string")
        return len(self._encode(text))

    def generate(
        self,
        req: TextRequest,
        on_text: Callable[[str], None],
        cancel: threading.Event,
    ) -> TextOutput:
        return self._generate(req, on_text, cancel, self._loop, record=False)[0]

    def trace(
        self, req: TextRequest, cancel: threading.Event | None = None, on_text: Callable[[str], None] | None = None,
    ) -> tuple[TextOutput, TextTrace]:
        """Run `req` as an exact (batch-1) stream whatever this backend's text_batching, and return
        its output with its token trace: what a re-executor checks a stacked miner's text against
        (aitbc.hub.verification.compare_text). The output is the one `generate` gives in "exact";
        `on_text` gets its text as `generate`'s does."""
        with self._trace_lock:
            if self._exact_loop is None:
                self._exact_loop = self._loop if self.batching == TEXT_EXACT else _DecodeLoop(self._lm)
        from aitbc.hub.verification import TextTrace

        out, ends, margins = self._generate(req, on_text or (lambda d: None), cancel or threading.Event(),
                                            self._exact_loop, record=True)
        return out, TextTrace(out.text, tuple(ends), tuple(margins))

    def _generate(
        self, req: TextRequest, on_text: Callable[[str], None], cancel: threading.Event, loop: _DecodeLoop,
        *, record: bool,
    ) -> tuple[TextOutput, list[int], list[float]]:
        """One job on `loop`; with `record`, also the decoded length after each counted token and
        the margin of each decision (a trace)."""
        check_text_request(req)
        prompt_ids = self._encode(req.prompt)
        check_context(len(prompt_ids), req.max_new_tokens, self.context_length)
        if cancel.is_set():
            raise JobCancelled("cancelled before start")

        decoder = _IncrementalDecoder(self._tokenizer)
        out = StopText(req.stop, on_text)
        stream = _Stream(prompt_ids, req, self._eos_ids, cancel, self.device)
        ends: list[int] = []
        decoded = 0
        if record:
            stream.margins = []
        loop.submit(stream)
        failure: BaseException | None = None
        while True:
            try:
                kind, value = stream.out.get(timeout=0.05)
            except queue.Empty:
                continue  # the loop sees `cancel` itself; it answers with "end"
            if kind == "end":
                break
            if kind == "error":
                failure = failure or value
                break
            # a token made after the one that completed a stop string (or after the cancel) is
            # neither decoded nor counted
            if stream.halt or out.stopped or cancel.is_set():
                continue
            try:
                piece = decoder.push(int(value))
                decoded += len(piece)
                ends.append(decoded)
                out.feed(piece)
            except BaseException as exc:  # on_text failed: this stream stops, the exception propagates
                failure = exc
                stream.halt = True
                continue
            if out.stopped:
                stream.halt = True
        if failure is not None:
            raise failure
        generated = len(decoder.ids)
        if cancel.is_set() and not out.stopped:
            raise JobCancelled(f"cancelled after {generated} tokens")
        if out.stopped:
            finish = FINISH_STOP
        elif decoder.ids and decoder.ids[-1] in self._eos_ids:
            finish = FINISH_EOS
        else:
            finish = FINISH_LENGTH
        if not out.stopped:
            rest = decoder.flush()
            if ends:
                ends[-1] += len(rest)
            out.feed(rest)
            if out.stopped:
                finish = FINISH_STOP
        text = out.finish()
        output = TextOutput(text, len(prompt_ids), generated, max(1, round(stream.busy_s * 1000)), finish)
        return output, ends, (stream.margins or [])[:generated]
