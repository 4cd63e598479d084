"""The typed benchmark config: YAML in, validated objects out, one-line errors for bad input.

A config names the data, the models, the defenses, the threat models (each with one or more
eps budgets) and the attacks. Validation happens before anything runs: unknown names, bad
values and attacks that do not support a threat model's norm, targeting or knowledge are all
reported as a :class:`~advbench.errors.ConfigError` naming the field and the allowed values.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, PrivateAttr, field_validator, model_validator

from advbench.analysis.transformations import make_transformation
from advbench.errors import AdvbenchError, ConfigError
from advbench.files import check_name
from advbench.loading import build_defense
from advbench.registry import ATTACKS, DATASETS, MODELS
from advbench.specs import (
    DataSpec,
    DefenseSpec,
    ModelSpec,
    _Strict,
    check_device,
    parse_number,
    read_yaml_file,
    seed_field,
    validated,
)
from advbench.threat import Knowledge, Norm, Scope, ThreatModel

DEFAULT_CONFIG_YAML = """\
# The embedded default: `advbench evaluate` with no argument runs this.
seed: 0
device: auto
data: {name: digits, split: test}          # all 360 test digits (UCI 8x8, ships with scikit-learn)
models: [digits-mlp, digits-cnn]            # reference models, trained on first use and cached
defenses: [none]
threats:
  - {norm: linf, eps: [0.05, 0.1, 0.2]}
attacks:
  - fgsm
  - bim
  - illc
  - {name: pgd, steps: 20, restarts: 2}
"""

class ThreatSpec(_Strict):
    """A threat model with one or more eps budgets; it expands to one ThreatModel per eps."""

    norm: str = "linf"
    eps: list[float] | None = None
    bounds: tuple[float, float] = (0.0, 1.0)
    targeting: str = "untargeted"
    target_class: int | None = None
    knowledge: str = "white_box"
    query_budget: int | None = None
    quantize: str | None = None
    # the axes beyond the Lp ball (advbench.threat): absent from the hash while unset
    scope: str = "individual"
    shared_by: str | None = None
    region: dict[str, Any] | None = None
    perceptual: dict[str, Any] | None = None
    physical: dict[str, Any] | None = None
    #: each eps as the config wrote it (``8/255``), for table headers; not part of the identity
    _written: tuple[str, ...] = PrivateAttr(default=())

    @model_validator(mode="wrap")
    @classmethod
    def _keep_written(cls, value: Any, handler: Any) -> Any:
        spec = handler(value)
        raw = value.get("eps") if isinstance(value, dict) else None
        raw = raw if isinstance(raw, (list, tuple)) else [] if raw is None else [raw]
        if spec.eps is not None and len(raw) == len(spec.eps):
            spec._written = tuple(str(r).strip() if isinstance(r, str) else f"{e:g}" for r, e in zip(raw, spec.eps))
        return spec

    def eps_labels(self) -> dict[float, str]:
        """Each eps budget and the text the config gave it (``8/255``, else ``%g``)."""
        return dict(zip(self.eps or [], self._written)) if self._written else {e: f"{e:g}" for e in self.eps or []}

    @field_validator("eps", mode="before")
    @classmethod
    def _eps_list(cls, value: Any) -> Any:
        if value is None:
            return None
        values = value if isinstance(value, (list, tuple)) else [value]
        if not values:
            raise ValueError("eps must list at least one budget")
        out = [parse_number(v, "eps") for v in values]
        for v in out:
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"eps must be finite and >= 0, got {v}")
        return out

    def expand(self) -> list[ThreatModel]:
        base = self.model_dump(exclude={"eps"})
        if str(self.norm).lower() == "unbounded":
            return [ThreatModel.from_dict({**base, "eps": math.inf})]
        if self.eps is None:
            raise ConfigError(f"threat with norm {self.norm!r} needs eps (a number or a list of numbers)")
        return [ThreatModel.from_dict({**base, "eps": e}) for e in self.eps]


class AttackSpec(_Strict):
    """A registered attack and its hyperparameters; ``norms`` and ``knowledge`` limit the threat
    models it runs under to those norms and attacker knowledge.

    ``label`` names the attack in the results; by default its registry name, or, when the same
    attack appears several times, the name with its parameters (``pgd(loss=margin)``).
    """

    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    norms: tuple[str, ...] | None = None
    knowledge: tuple[str, ...] | None = None
    label: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _flatten(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"name": value}
        if isinstance(value, dict) and "params" not in value:
            meta = ("name", "norms", "knowledge", "label")
            params = {k: v for k, v in value.items() if k not in meta}
            out = {k: value[k] for k in meta if k in value}
            return {**out, "params": params}
        return value


class AnalysisSpec(_Strict):
    """Matrices computed from the run's adversarial examples (advbench.eval.matrices)."""

    transfer: bool = False  # each model's examples on every model (behind the same defense)
    destruction: list[Any] = Field(default_factory=list)  # transformations: names or {name: ..., params}
    amplify: list[float] = Field(default_factory=list)  # transfer: also each perturbation scaled to these stds


class FitSpec(_Strict):
    """The examples a universal threat model's perturbation is fit on: ``n`` drawn (with the run
    seed) from ``split`` of the evaluated data set. From the evaluated split itself (or an ``.npz``
    file, which has no splits) they are drawn among the examples not evaluated, so the fooling
    rate is always measured on held-out images."""

    split: str = "train"
    n: int = Field(default=500, ge=1)


EXECUTORS = ("inprocess", "ray")


class ExecutorSpec(_Strict):
    """Where the jobs run: in this process (default) or on a Ray cluster (``pip install
    'advbench[ray]'``). Not part of a run's identity: every executor gives the same results."""

    name: Literal["inprocess", "ray"] = "inprocess"
    address: str | None = None  # ray: the head's address (host:port, ray://host:port, auto); none: a local cluster
    workers: int | None = Field(default=None, ge=1)  # ray: worker processes (default: as many as the cluster fits)
    gpus_per_job: float = Field(default=0.0, ge=0)  # ray: GPUs each worker asks for (a fraction shares a GPU)

    @model_validator(mode="before")
    @classmethod
    def _named(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _ray_only(self) -> ExecutorSpec:
        if self.name == "inprocess":
            given = [k for k in ("address", "workers") if getattr(self, k) is not None] + (
                ["gpus_per_job"] if self.gpus_per_job else [])
            if given:
                verb = "apply" if len(given) > 1 else "applies"
                raise ValueError(f"{', '.join(given)} {verb} to the ray executor only (name: ray)")
        return self


class BenchmarkConfig(_Strict):
    seed: int = seed_field()
    device: str = "auto"
    data: DataSpec = Field(default_factory=lambda: DataSpec(name="digits"))
    models: list[ModelSpec] = Field(min_length=1)
    defenses: list[DefenseSpec] = Field(default_factory=lambda: [DefenseSpec(name="none")])
    threats: list[ThreatSpec] = Field(min_length=1)
    attacks: list[AttackSpec] = Field(min_length=1)
    batch_size: int = Field(default=500, ge=1)
    cascade: bool = False
    amp: bool = False  # mixed precision (bfloat16 autocast) on a GPU; ignored on CPU
    channels_last: bool = False  # convolutions in NHWC memory layout (faster on GPUs and for CPU pooling)
    executor: ExecutorSpec = Field(default_factory=ExecutorSpec)  # where jobs run; not part of the hash
    # adaptive evaluation of defended models (see advbench.eval.jobs and advbench.eval.masking)
    adaptive: Literal["auto", "off", "only"] = "auto"  # auto: naive and adaptive rows where needed
    eot_samples: int = Field(default=10, ge=1)  # EoT draws per gradient for randomized models
    draws: int = Field(default=5, ge=1)  # scoring draws of a randomized deployed model
    randomized_scoring: Literal["mean", "all"] = "mean"  # robust on average over draws, or in every draw
    masking_checks: bool = True
    analysis: AnalysisSpec | None = None  # transfer and destruction-rate matrices (keeps adversarial examples)  # gradient-masking flags, an unbounded probe and gradient checks
    fit: FitSpec | None = None  # what universal perturbations are fit on (needed with a universal threat)

    @field_validator("adaptive", mode="before")
    @classmethod
    def _adaptive(cls, value: Any) -> Any:  # YAML reads a bare off/on as a boolean
        return {False: "off", True: "auto"}.get(value, value) if isinstance(value, bool) else value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        return check_device(value)

    @model_validator(mode="after")
    def _unique_labels(self) -> BenchmarkConfig:
        for what, labels in (
            ("model", [m.name for m in self.models]),
            ("defense", [d.name for d in self.defenses]),
            ("attack", self.attack_labels()),
        ):
            dup = sorted({x for x in labels if labels.count(x) > 1})
            if dup:
                hint = " (give the entries distinct 'label's)" if what == "attack" else ""
                raise ValueError(f"{what} names must be unique; repeated: {dup}{hint}")
        for label in self.attack_labels():  # labels name files too; a generated one may need a 'label'
            try:
                check_name(label, "attack label")
            except ConfigError as exc:
                raise ValueError(f"{exc} (give the entry a 'label')") from None
            if label.startswith("worst-case"):
                raise ValueError(f"attack label {label!r}: names starting with 'worst-case' are the results' own")
        return self

    def attack_labels(self) -> list[str]:
        """Result labels of the attack entries, in config order (see :class:`AttackSpec`)."""
        names = [a.name for a in self.attacks]
        labels = []
        for a in self.attacks:
            if a.label is not None:
                labels.append(a.label)
            elif names.count(a.name) == 1:
                labels.append(a.name)
            else:
                inner = ",".join(f"{k}={v}" for k, v in sorted(a.params.items()))
                labels.append(f"{a.name}({inner})" if inner else a.name)
        return labels

    # ------------------------------------------------------------------ derived
    def threat_models(self) -> list[ThreatModel]:
        out: list[ThreatModel] = []
        for spec in self.threats:
            for tm in spec.expand():
                if tm not in out:
                    out.append(tm)
        return out

    def canonical(self) -> dict[str, Any]:
        """What identifies the run's results: every field but where the jobs ran (the executor)."""
        d = self.model_dump(mode="json", by_alias=True, exclude={"executor"})
        for threat in d["threats"]:  # a threat without the newer axes keeps the hash it had
            for key, default in (("scope", "individual"), ("shared_by", None), ("region", None),
                                 ("perceptual", None), ("physical", None)):
                if threat.get(key) == default:
                    threat.pop(key, None)
        for key, default in (("analysis", None), ("channels_last", False), ("fit", None)):
            if d.get(key) == default:  # configs without it keep the hashes (and stored runs) they had
                d.pop(key, None)
        return d

    def eps_labels(self) -> dict[tuple[str, float], str]:
        """(norm, eps) -> the eps as the config wrote it (``8/255``), for table headers."""
        out: dict[tuple[str, float], str] = {}
        for spec in self.threats:
            for eps, text in spec.eps_labels().items():
                out.setdefault((str(spec.norm).lower(), eps), text)
        return out

    def hash(self) -> str:
        blob = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def parse_config(raw: Any) -> BenchmarkConfig:
    """Validate a parsed YAML/JSON mapping into a BenchmarkConfig (ConfigError on bad input)."""
    config = validated(BenchmarkConfig, raw, "a config")
    validate_names(config)
    return config


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> BenchmarkConfig:
    """Read a YAML config file, or the embedded default when ``path`` is None; ``overrides``
    replace top-level fields before validation (the command line's --device, --seed, ...). A
    mapping override is merged into the config's mapping field key by key (a one-word field,
    ``executor: ray``, counts as its ``name``)."""
    raw = yaml.safe_load(DEFAULT_CONFIG_YAML) if path is None else read_yaml_file(path)
    if overrides and isinstance(raw, dict):
        merged = dict(raw)
        for key, value in overrides.items():
            base = raw.get(key)
            base = {"name": base} if isinstance(base, str) else base
            merged[key] = {**base, **value} if isinstance(value, dict) and isinstance(base, dict) else value
        raw = merged
    return parse_config(raw)


def validate_names(config: BenchmarkConfig) -> None:
    """Resolve every registry name (building each defense and chain stage) and check each attack
    against each threat it will meet."""
    if config.data.name is not None:
        DATASETS.get(config.data.name)
    for m in config.models:
        if m.source == "registry":
            MODELS.get(m.name)
    for d in config.defenses:
        if d.name != "none":
            build_defense(d)
    if config.analysis is not None:
        for t in config.analysis.destruction:
            try:
                make_transformation(t)
            except AdvbenchError as exc:  # an unknown name or a bad parameter
                raise ConfigError(f"analysis.destruction: {exc}") from None
    for tm in config.threat_models():
        if tm.physical is not None:
            try:
                tm.physical.build()
            except AdvbenchError as exc:  # an unknown transformation or a bad parameter
                raise ConfigError(f"threat physical: {exc}") from None
    for spec in config.attacks:
        ATTACKS.create(spec.name, **spec.params)  # its parameters, checked first
        if spec.norms is not None:
            for n in spec.norms:
                try:
                    Norm(n)
                except ValueError:
                    raise ConfigError(
                        f"attack {spec.name!r}: unknown norm {n!r} in 'norms'; allowed: {', '.join(x.value for x in Norm)}"
                    ) from None
        if spec.knowledge is not None:
            for k in spec.knowledge:
                if k not in {x.value for x in Knowledge}:
                    raise ConfigError(f"attack {spec.name!r}: unknown knowledge {k!r} in 'knowledge'; "
                                      f"allowed: {', '.join(x.value for x in Knowledge)}")
    _check_coverage(config)
    for spec in config.attacks:
        attack = ATTACKS.create(spec.name, **spec.params)
        routed = attack_threats(config, spec)
        if not routed:
            raise ConfigError(f"attack {spec.name!r} runs under none of the config's threat models: "
                              f"{_unrouted(attack)}")
        for tm in routed:
            reason = attack.supports(tm)
            if reason:
                field = "norms" if "norm" in reason else "knowledge" if "knowledge" in reason else None
                hint = f" (list the {field} it should run under with '{field}: [...]' in its entry)" if field else ""
                raise ConfigError(f"{reason} (threat {tm.describe()}){hint}")


def _check_coverage(config: BenchmarkConfig) -> None:
    """Every threat model is met by some attack entry (routing by axes may leave one with none),
    and a universal one has the examples to fit its perturbation on."""
    covered = {t for spec in config.attacks for t in attack_threats(config, spec)}
    for tm in config.threat_models():
        if tm not in covered:
            raise ConfigError(f"threat {tm.describe()} is met by none of the attack entries; add one made for it "
                              f"(universal: uap or patch; a region: patch; a physical feed: eot-pgd or any "
                              f"per-example attack) or check the entries' 'norms' and 'knowledge'")
        if tm.scope is Scope.UNIVERSAL and config.fit is None:
            raise ConfigError(f"threat {tm.describe()} is universal: give the examples its perturbation is fit on, "
                              f"held out from the evaluated ones (fit: {{split: train, n: 500}})")


def _unrouted(attack: Any) -> str:
    """Why an attack met none of a config's threats (by its scopes, regions and needs)."""
    scopes = ", ".join(sorted(s.value for s in attack.scopes))
    return (f"it is made for {attack.made_for_text}" if attack.made_for_text else
            f"it produces {scopes} perturbations{' and keeps no region' if not attack.regions else ''}")


def attack_threats(config: BenchmarkConfig, spec: AttackSpec) -> list[ThreatModel]:
    """The threat models an attack entry runs under: all, or those whose norm and knowledge it
    lists; of these, only those whose scope, region and physical feed the attack is made for
    (:meth:`~advbench.attacks.base.Attack.made_for`: uap meets the universal threats, patch the
    region ones, eot-pgd the physical ones, and a per-example attack the rest)."""
    attack = ATTACKS.create(spec.name, **spec.params)
    return [t for t in config.threat_models()
            if (spec.norms is None or t.norm.value in spec.norms)
            and (spec.knowledge is None or t.knowledge.value in spec.knowledge)
            and attack.made_for(t)]

