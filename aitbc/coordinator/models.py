"""The coordinator's model registry: what each model is, decided by the operator, not by miners.

A model's kind (image or text), its price ceiling and (image models) its native size come from
coordinator.toml (`[[models]]`).
A model the config does not name is learned from the first miner that registers it, when
`allow_new_models` is on (the default: a devnet serves whatever its miner loads); its kind is then
fixed and kept in the store, so it survives restarts. A miner that declares a known model as the
other kind is refused at Register: one registration can no longer change what a model is. The
native size (the side of an image when a job leaves width and height at 0) is fixed the same way, by
the config or the first miner that declares one (DEFAULT_NATIVE_SIZE when none did); every image
job gets explicit sizes at submission, so a miner cannot choose how many pixels it is paid for.
The weights' sha256 (where a miner can say it) is fixed the same way: a miner that loads other
weights under a model's name is refused, whatever it calls them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass

from aitbc import jobs
from aitbc.config import ModelConfig
from aitbc.coordinator.store import JobStore
from aitbc.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from aitbc.v1 import miner_pb2

log = logging.getLogger("aitbc.coordinator")
META_KEY = "model_kinds"
MAX_LEARNED_MODELS = 1024  # learned from miners (not counting [[models]]): fresh keys are free, disk is not
KINDS = {"image": jobs.IMAGE, "text": jobs.TEXT}
DEFAULT_NATIVE_SIZE = 512  # Stable Diffusion 1.5's, for an image model nobody declared a size for


@dataclass(frozen=True, slots=True)
class ModelEntry:
    name: str
    kind: int  # jobs.IMAGE or jobs.TEXT
    max_price_per_unit: int | None = None  # the operator's ceiling; None: the default ceiling
    source: str = "config"  # "config", or the miner that first registered it
    native_size: int = 0  # image models: 0 until the config or a miner names it
    weights_sha256: str = ""  # "" until the config or a miner names it (docs/receipts.md, "Model identity")


# what a model is beyond its kind, fixed by the config or the first miner that says (0 / "": not said)
IDENTITY = ("native_size", "weights_sha256")
_SHA256_HEX = re.compile(r"\A[0-9a-f]{64}\Z")  # \Z: "$" would let a trailing newline pass


def declared(info: miner_pb2.MinerInfo, model: str) -> tuple[int, dict[str, int | str]]:
    """A model's kind and identity fields as a miner declares them; undeclared models are image
    models, and a text model has no native size."""
    for spec in info.model_specs:
        if spec.name == model:
            kind = spec.kind or jobs.IMAGE
            size = spec.native_size if kind == jobs.IMAGE else 0
            if size and (not jobs.MIN_SIDE <= size <= jobs.MAX_SIDE or size % jobs.SIDE_MULTIPLE):
                raise InvalidArgument(f"model '{model}': native_size must be 0 or a multiple of {jobs.SIDE_MULTIPLE} "
                                      f"between {jobs.MIN_SIDE} and {jobs.MAX_SIDE} (got {size})")
            weights = spec.weights_sha256
            if weights and not _SHA256_HEX.match(weights):
                raise InvalidArgument(f"model '{model}': weights_sha256 must be 64 lower-case hex characters or empty")
            return kind, {"native_size": size, "weights_sha256": weights}
    return jobs.IMAGE, {"native_size": 0, "weights_sha256": ""}


class ModelRegistry:
    def __init__(self, store: JobStore, configured: list[ModelEntry], *, allow_new: bool,
                 default_max_price: int | None, max_learned: int = MAX_LEARNED_MODELS) -> None:
        self.store = store
        self.max_learned = max_learned
        self.allow_new = allow_new
        self.default_max_price = default_max_price
        self.entries: dict[str, ModelEntry] = {e.name: e for e in configured}  # the config wins over what was learned
        self._absorb(quiet=True)

    def learn_stored(self) -> None:
        """What another coordinator of a shared store learned (read every REAP_S): its models, and
        the identity fields its miners declared for models this process knows without them (a
        `[[models]]` entry naming only the kind: without this, a job submitted here would get
        DEFAULT_NATIVE_SIZE while the miners make the model's native size; docs/scaling.md)."""
        self._absorb(quiet=False)

    def _absorb(self, *, quiet: bool) -> None:
        """The saved record into `entries`: a learned model this process does not know is added as
        saved; a known one of the same kind gets the identity fields it lacks (never changes one)."""
        raw = self.store.get_meta(META_KEY)
        for name, rec in (json.loads(raw) if raw else {}).items():
            have = self.entries.get(name)
            if have is None:
                if rec.get("source", "learned") != "config":  # (a config entry no longer configured goes)
                    self.entries[name] = ModelEntry(name, rec["kind"], source=rec.get("source", "learned"),
                                                    **{f: rec[f] for f in IDENTITY if f in rec})
                continue
            new = {f: rec[f] for f in IDENTITY if rec.get(f) and not getattr(have, f)}
            if new and rec.get("kind") == have.kind:
                self.entries[name] = dataclasses.replace(have, **new)
                if not quiet:
                    log.info("model %s: %s, as another coordinator's miner declared", name,
                             ", ".join(f"{f} {v}" for f, v in sorted(new.items())))

    def get(self, model: str) -> ModelEntry | None:
        return self.entries.get(model)

    def kind(self, model: str) -> int | None:
        e = self.entries.get(model)
        return e.kind if e is not None else None

    def native_size(self, model: str) -> int:
        """The side of an image of `model` when a job leaves width and height at 0."""
        e = self.entries.get(model)
        return (e.native_size if e is not None else 0) or DEFAULT_NATIVE_SIZE

    def ceiling(self, model: str) -> int | None:
        """The most a job of this model may pay per unit (None: no ceiling)."""
        e = self.entries.get(model)
        if e is not None and e.max_price_per_unit is not None:
            return e.max_price_per_unit
        return self.default_max_price

    def admit(self, miner_id: str, info: miner_pb2.MinerInfo) -> None:
        """At Register: every model the miner declares must have the kind the registry has (a
        model it does not know is learned, or refused when allow_new_models is off), and the
        miner's price must be within each model's ceiling."""
        for model in info.models:
            ceiling = self.ceiling(model)
            if ceiling is not None and info.price_per_unit > ceiling:
                raise FailedPrecondition(
                    f"price_per_unit {info.price_per_unit} is above this coordinator's ceiling for model '{model}' "
                    f"({ceiling}; the operator's [[models]] max_price_per_unit or default_max_price_per_unit)")
        learned, sized = [], []
        for model in info.models:
            have = self.entries.get(model)
            kind, ident = declared(info, model)
            if have is None:
                if not self.allow_new:
                    raise FailedPrecondition(
                        f"model '{model}' is not served by this coordinator (allow_new_models = false: the operator "
                        f"lists models under [[models]] in coordinator.toml)")
                learned.append(ModelEntry(model, kind, source=miner_id, **ident))  # type: ignore[arg-type]
                continue
            by = "coordinator.toml" if have.source == "config" else f"its first miner {have.source}"
            if have.kind != kind:
                raise FailedPrecondition(
                    f"model '{model}' is a {jobs.kind_name(have.kind)} model on this coordinator (set by {by}); "
                    f"this miner declares it as {jobs.kind_name(kind)}: fix the miner's model list")
            size = ident["native_size"]
            if size and have.native_size and size != have.native_size:
                raise FailedPrecondition(
                    f"model '{model}' makes {have.native_size}x{have.native_size} images on this coordinator (set by "
                    f"{by}); this miner declares {size}x{size}: it loads other weights under this name")
            weights = ident["weights_sha256"]
            if weights and have.weights_sha256 and weights != have.weights_sha256:
                raise FailedPrecondition(
                    f"model '{model}' has weights sha256 {have.weights_sha256[:16]}... on this coordinator (set by "
                    f"{by}); this miner's are {str(weights)[:16]}...: it loads other weights under this name")
            new = {f: ident[f] for f in IDENTITY if ident[f] and not getattr(have, f)}
            if new:
                sized.append(dataclasses.replace(have, **new))  # type: ignore[arg-type]
        known = sum(1 for e in self.entries.values() if e.source != "config")
        if learned and known + len(learned) > self.max_learned:
            raise ResourceExhausted(
                f"this coordinator has learned {known} models from miners (at most {self.max_learned}): it takes "
                f"no new ones; the operator lists models under [[models]] in coordinator.toml")
        for e in learned + sized:
            self.entries[e.name] = e
            log.info("model %s is a %s model (native size %s) from miner %s", e.name, jobs.kind_name(e.kind),
                     e.native_size or "unknown", miner_id)
        if learned or sized:
            self._save()

    def _save(self) -> None:
        saved = {n: {"kind": e.kind, "source": e.source, "native_size": e.native_size, "weights_sha256": e.weights_sha256}
                 for n, e in self.entries.items() if e.source != "config" or e.native_size or e.weights_sha256}
        self.store.put_meta(META_KEY, json.dumps(saved, sort_keys=True).encode())


def from_config(models: list[ModelConfig]) -> list[ModelEntry]:
    return [ModelEntry(m.name, KINDS[m.kind], m.max_price_per_unit, native_size=m.native_size,
                       weights_sha256=m.weights_sha256) for m in models]
