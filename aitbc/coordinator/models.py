"""The coordinator's model registry: what each model is, decided by the operator, not by miners.

A model's kind (image or text) and its price ceiling come from coordinator.toml (`[[models]]`).
A model the config does not name is learned from the first miner that registers it, when
`allow_new_models` is on (the default: a devnet serves whatever its miner loads); its kind is then
fixed and kept in the store, so it survives restarts. A miner that declares a known model as the
other kind is refused at Register: one registration can no longer change what a model is.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from aitbc import jobs
from aitbc.config import ModelConfig
from aitbc.coordinator.store import JobStore
from aitbc.errors import FailedPrecondition, ResourceExhausted
from aitbc.v1 import miner_pb2

log = logging.getLogger("aitbc.coordinator")
META_KEY = "model_kinds"
MAX_LEARNED_MODELS = 1024  # learned from miners (not counting [[models]]): fresh keys are free, disk is not
KINDS = {"image": jobs.IMAGE, "text": jobs.TEXT}


@dataclass(frozen=True, slots=True)
class ModelEntry:
    name: str
    kind: int  # jobs.IMAGE or jobs.TEXT
    max_price_per_unit: int | None = None  # the operator's ceiling; None: the default ceiling
    source: str = "config"  # "config", or the miner that first registered it


def declared_kind(info: miner_pb2.MinerInfo, model: str) -> int:
    """A model's kind as a miner declares it; undeclared models are image models."""
    for spec in info.model_specs:
        if spec.name == model:
            return spec.kind or jobs.IMAGE
    return jobs.IMAGE


class ModelRegistry:
    def __init__(self, store: JobStore, configured: list[ModelEntry], *, allow_new: bool,
                 default_max_price: int | None, max_learned: int = MAX_LEARNED_MODELS) -> None:
        self.store = store
        self.max_learned = max_learned
        self.allow_new = allow_new
        self.default_max_price = default_max_price
        self.entries: dict[str, ModelEntry] = {}
        raw = store.get_meta(META_KEY)
        for name, rec in (json.loads(raw) if raw else {}).items():
            self.entries[name] = ModelEntry(name, rec["kind"], source=rec.get("source", "learned"))
        for e in configured:  # the config wins over what was learned
            self.entries[e.name] = e

    def get(self, model: str) -> ModelEntry | None:
        return self.entries.get(model)

    def kind(self, model: str) -> int | None:
        e = self.entries.get(model)
        return e.kind if e is not None else None

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
        learned = []
        for model in info.models:
            have = self.entries.get(model)
            said = declared_kind(info, model)
            if have is None:
                if not self.allow_new:
                    raise FailedPrecondition(
                        f"model '{model}' is not served by this coordinator (allow_new_models = false: the operator "
                        f"lists models under [[models]] in coordinator.toml)")
                learned.append(ModelEntry(model, said, source=miner_id))
            elif have.kind != said:
                by = "coordinator.toml" if have.source == "config" else f"its first miner {have.source}"
                raise FailedPrecondition(
                    f"model '{model}' is a {jobs.kind_name(have.kind)} model on this coordinator (set by {by}); "
                    f"this miner declares it as {jobs.kind_name(said)}: fix the miner's model list")
        known = sum(1 for e in self.entries.values() if e.source != "config")
        if learned and known + len(learned) > self.max_learned:
            raise ResourceExhausted(
                f"this coordinator has learned {known} models from miners (at most {self.max_learned}): it takes "
                f"no new ones; the operator lists models under [[models]] in coordinator.toml")
        for e in learned:
            self.entries[e.name] = e
            log.info("model %s learned as a %s model from miner %s", e.name, jobs.kind_name(e.kind), miner_id)
        if learned:
            self._save()

    def _save(self) -> None:
        learned = {n: {"kind": e.kind, "source": e.source} for n, e in self.entries.items() if e.source != "config"}
        self.store.put_meta(META_KEY, json.dumps(learned, sort_keys=True).encode())


def from_config(models: list[ModelConfig]) -> list[ModelEntry]:
    return [ModelEntry(m.name, KINDS[m.kind], m.max_price_per_unit) for m in models]
