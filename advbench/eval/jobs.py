"""The unit of work: one (model, defense, threat model, attack, shard of examples) job.

A :class:`Job` is self-contained and JSON-serializable: it carries the specs of the data,
the model, the defense, the threat model and the attack, the example indices of its shard,
the digests of the content they resolved to, and its seed. Its key is a hash of all of that,
so it is the same on every machine and in every run. :mod:`advbench.eval.plan` makes them and
:mod:`advbench.eval.worker` runs them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from advbench.defenses.base import find_defended

PROBE_PREFIX = "probe:"  # the label prefix of a gradient-masking probe (its identity is the job's ``probe``)


def stable_hash(obj: Any, length: int = 20) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


@dataclass(frozen=True)
class Job:
    data: dict[str, Any]
    model: dict[str, Any]  # ModelSpec dump (by alias); model["name"] labels the results
    defense: dict[str, Any]
    threat: dict[str, Any]
    attack: dict[str, Any]  # {"name": registry name, "params": {...}, "label": name in the results}
    shard: int
    indices: tuple[int, ...]  # indices into the full data set (the shard's examples)
    base_seed: int
    after: tuple[str, ...] = ()  # cascade: keys of earlier jobs whose successes this job skips
    save_adversarial: bool = False
    draws: int = 1  # scoring draws (> 1 only for a randomized deployed model)
    #: digests of what the job evaluates: the model's weights (or file bytes) and the shard's examples
    content: dict[str, str] = field(default_factory=dict)
    #: a minimal-perturbation suite component in a cascade: ``after`` of every eps of its sweep
    #: (its one search covers the points still robust at any of them)
    sweep_after: tuple[tuple[str, ...], ...] = ()
    #: record the evaluation-failure indicators (:mod:`advbench.eval.indicators`) beside the rows:
    #: an iterative attack's path, a probe's class count and prediction stability. Like
    #: ``save_adversarial`` it says what is kept, not what is computed: not part of the key or seed
    indicators: bool = False
    #: rerun the attack with a doubled budget on this many of the shard's first examples (the run's
    #: first examples: Carlini et al.'s "more iterations" check); not part of the key or seed
    more_examples: int = 0
    #: a universal threat model's fit set: ``{"split": ..., "indices": [...]}`` of the job's data
    #: set (its content digest is ``content["fit"]``); None for every other job
    fit: dict[str, Any] | None = None

    @property
    def key(self) -> str:
        """The job's identity in the store: its specs *and* the content they resolved to, so a
        replaced model file, retrained weights or changed data never resume stale results."""
        return stable_hash(self._identity())

    def _identity(self, content: bool = True) -> dict[str, Any]:
        """What the job's key hashes: everything but how its output is kept (and one draw, so a
        deterministic model's jobs keep the keys, and seeds, they had before draws existed)."""
        d = asdict(self)
        for kept in ("save_adversarial", "indicators", "more_examples"):
            d.pop(kept)
        if d["draws"] == 1:
            d.pop("draws")
        if d["fit"] is None:  # jobs without a fit set keep the keys they had
            d.pop("fit")
        if not content or not d["content"]:
            d.pop("content")
        if not d["sweep_after"] or not content:  # (its keys hold content digests: seeds stay content-free)
            d.pop("sweep_after")
        return d

    @property
    def minimal(self) -> bool:
        """Whether the attack is a minimal-perturbation one (one run serves every eps)."""
        return bool(self.attack.get("minimal"))

    def _sweep(self, content: bool) -> dict[str, Any]:
        d = self._identity(content)
        if self.minimal:  # one run serves every eps, in every mode (cascade included)
            d.pop("after")
            d["threat"] = {k: v for k, v in d["threat"].items() if k != "eps"}
        return d

    @property
    def sweep_key(self) -> str:
        """The key of the attack run behind this job. A minimal-perturbation attack ignores eps,
        so its jobs at every eps of one threat model (norm, targeting, ...) share one run."""
        return stable_hash(self._sweep(True)) if self.minimal else self.key

    @property
    def seed(self) -> int:
        """The job's own seed: derived from the run seed and the job's specs, not its position,
        nor the digests (the same config draws the same randomness whatever the weights are)."""
        return int(stable_hash({"seed": self.base_seed, "key": stable_hash(self._sweep(False))}, 15), 16)

    @property
    def cell(self) -> tuple[str, str, str, str]:
        return (self.model["name"], self.defense["name"], json.dumps(self.threat, sort_keys=True), self.attack_label)

    @property
    def attack_label(self) -> str:
        return str(self.attack.get("label") or self.attack["name"])

    @property
    def probe(self) -> bool:
        """A gradient-masking probe (an almost unbounded attack; reported in masking.json only)."""
        return bool(self.attack.get("probe"))

    @property
    def probe_kind(self) -> str | None:
        """Which probe: ``large_eps`` (the unbounded-attack probe), None for an attack job."""
        kind = self.attack.get("probe")
        return None if not kind else "large_eps" if kind is True else str(kind)

    @property
    def view(self) -> str:
        """What the attacker was handed: ``naive`` (the deployed model) or ``adaptive`` (BPDA/EoT)."""
        return "adaptive" if self.attack.get("adaptive") else "naive"

    def draw_seeds(self) -> list[int]:
        """The seed of each scoring draw: the same for every attack and eps of a shard, so the
        clean predictions agree across rows and attacks are compared on the same draws."""
        base = {"seed": self.base_seed, "data": self.data, "model": self.model, "defense": self.defense,
                "shard": self.shard, "indices": stable_hash(self.indices)}
        return [int(stable_hash({**base, "draw": d}, 15), 16) for d in range(self.draws)]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> Job:
        d = json.loads(s)
        d["indices"], d["after"] = tuple(d["indices"]), tuple(d["after"])
        d["sweep_after"] = tuple(tuple(a) for a in d.get("sweep_after", ()))
        return cls(**d)

    @property
    def fit_data(self) -> dict[str, Any] | None:
        """The data spec of the fit set's split (None without a fit set)."""
        return None if self.fit is None else {**self.data, "split": self.fit["split"]}


@dataclass(frozen=True)
class ModelTags:
    """What the evaluator needs to know of a (model, defense) pair to plan its jobs."""

    differentiable: bool = True
    randomized: bool = False

    @property
    def needs_adaptive(self) -> bool:
        return not self.differentiable or self.randomized

    @property
    def suffix(self) -> str:
        """The label suffix of an adaptive attack on this model: ``+bpda``, ``+eot`` or both."""
        return ("" if self.differentiable else "+bpda") + ("+eot" if self.randomized else "")

    @classmethod
    def of(cls, model: nn.Module) -> ModelTags:
        defended = find_defended(model)
        if defended is None:
            return cls()
        return cls(differentiable=defended.differentiable, randomized=defended.randomized)
