"""Planning a run: every (model, defense, threat model, attack, shard) job of a config, in order,
and the gradient-masking probes.

Models and data are loaded (through a :class:`~advbench.eval.worker.Worker`) to learn what each
(model, defense) is (differentiable, randomized: which views an attack gets) and the digests of
the content every job evaluates.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from advbench.config import BenchmarkConfig, attack_threats
from advbench.eval.jobs import PROBE_PREFIX, Job, ModelTags
from advbench.eval.masking import INDICATOR_EXAMPLES, PROBE_EXAMPLES, probe_eps
from advbench.eval.worker import Worker
from advbench.registry import ATTACKS
from advbench.errors import AdvbenchError, ConfigError, DataError
from advbench.specs import DefenseSpec, ModelSpec
from advbench.threat import Knowledge, Scope, ThreatModel


def _threat_groups(config: BenchmarkConfig) -> list[list[ThreatModel]]:
    """The config's threat models grouped by everything but eps (an eps sweep per group)."""
    groups: dict[str, list[ThreatModel]] = {}
    for threat in config.threat_models():
        groups.setdefault(json.dumps({k: v for k, v in threat.to_dict().items() if k != "eps"}, sort_keys=True), []).append(threat)
    return list(groups.values())


def attack_views(config: BenchmarkConfig, tags: ModelTags) -> list[tuple[str, dict[str, Any] | None]]:
    """The views a white-box attack gets of a model, as (label suffix, adaptive spec or None):
    the deployed model (naive) and/or its adaptive view, per ``config.adaptive``."""
    if not tags.needs_adaptive or config.adaptive == "off":
        return [("", None)]
    view = (tags.suffix, {"bpda": True, "eot_samples": config.eot_samples if tags.randomized else 1})
    return [view] if config.adaptive == "only" else [("", None), view]


def _cells(config: BenchmarkConfig, worker: Worker) -> Iterator[tuple[dict[str, Any], dict[str, Any], ModelTags,
                                                                      list[ThreatModel]]]:
    """(model spec, defense spec, their tags, a threat group) in config order."""
    groups = _threat_groups(config)
    for model in config.models:
        mspec = model_spec(model)
        for defense in config.defenses:
            dspec = defense_spec(defense)
            mtags = worker.tags(mspec, dspec, seed=config.seed)
            for threats in groups:
                yield mspec, dspec, mtags, threats


def model_spec(model: ModelSpec) -> dict[str, Any]:
    """A model entry as jobs carry it (what the model *is* travels beside it, as the job's content
    digest; entries without ``trained`` keep the keys they had)."""
    spec = model.model_dump(mode="json", by_alias=True)
    if spec.get("trained") is None:
        spec.pop("trained", None)
    return spec


def defense_spec(defense: DefenseSpec) -> dict[str, Any]:
    """A defense entry as jobs carry it (a single defense without the empty ``stages``)."""
    return defense.model_dump(mode="json", exclude=None if defense.stages else {"stages"})


def _attack_spec(name: str, params: dict[str, Any], label: str, view: dict[str, Any] | None,
                 **extra: Any) -> dict[str, Any]:
    return {"name": name, "params": params, "label": label, **({"adaptive": view} if view else {}), **extra}


def attack_order(config: BenchmarkConfig) -> list[str]:
    """Attack labels in table order: each config entry (a suite's components, then the suite),
    then its adaptive variants."""
    suites = suite_labels(config)
    return [name + suffix for label in config.attack_labels() for suffix in ("", "+bpda", "+eot", "+bpda+eot")
            for name in [*suites.get(label, []), label]]


def plan_jobs(config: BenchmarkConfig, indices: np.ndarray, save_adversarial: bool = False,
              worker: Worker | None = None) -> list[Job]:
    """All jobs of a config, in a fixed order: models, defenses, threat models (grouped by all
    but eps), attacks (each white-box attack on a model that needs it naive, then adaptive), then
    shards and eps. A minimal-perturbation attack's jobs at the eps of one group come one after
    another for each shard, so the worker runs the attack once and re-audits its result at each
    eps. ``worker`` loads the models and data to learn what each (model, defense) is and the
    content digests the jobs carry (default: a CPU worker of its own).

    With ``masking_checks`` the jobs of an iterative attack record its path, and those holding the
    run's first ``INDICATOR_EXAMPLES`` examples (outside a suite) rerun it on them with a doubled
    budget (:mod:`advbench.eval.indicators`); neither changes a job's key or seed."""
    worker = worker or Worker(torch.device("cpu"))
    data = config.data.model_dump(mode="json")
    batched = [tuple(int(i) for i in indices[s : s + config.batch_size]) for s in range(0, len(indices), config.batch_size)]
    labels = config.attack_labels()
    jobs: list[Job] = []
    fit = None
    for mspec, dspec, mtags, threats in _cells(config, worker):
        universal = threats[0].scope is Scope.UNIVERSAL
        # a universal perturbation is one for every example: its jobs are not sharded
        shards = [tuple(int(i) for i in indices)] if universal else batched
        content = [worker.content(data, mspec, shard) for shard in shards]
        if universal:
            fit = fit or fit_set(config, indices, worker)
            content = [{**c, "fit": worker.content(fit.data, mspec, fit.indices)["data"]} for c in content]
        draws = config.draws if mtags.randomized else 1
        views = attack_views(config, mtags) if threats[0].knowledge is Knowledge.WHITE_BOX else [("", None)]
        earlier: dict[tuple[int, ThreatModel], list[str]] = {}  # config.cascade: every earlier job
        for (attack, label), (suffix, view) in itertools.product(zip(config.attacks, labels), views):
            allowed = attack_threats(config, attack)
            planned = [t for t in threats if t in allowed]
            if not planned:
                continue
            in_suite: dict[tuple[int, ThreatModel], list[str]] = {}  # a suite's cascade: its earlier components
            for part in planned_parts(attack.name, attack.params, label, planned[0]):
                minimal = bool(getattr(ATTACKS.get(part.name).factory, "minimal", False))  # a class attribute
                # the path indicators audit each iterate under the Lp ball alone: not for the other axes
                traced = (config.masking_checks and not minimal and not planned[0].constrained
                          and getattr(ATTACKS.get(part.name).factory, "kind", "") == "iterative")
                extra = {**({"minimal": True} if minimal else {}),
                         **({"suite": part.suite + suffix, "suite_cascade": part.cascade} if part.suite else {})}
                aspec = _attack_spec(part.name, part.params, part.label + suffix, view, **extra)
                order = ([(s, t) for s in range(len(shards)) for t in planned] if minimal
                         else [(s, t) for t in planned for s in range(len(shards))])
                suite_after = {(s, t): tuple(in_suite.get((s, t), [])) if part.cascade else () for s, t in order}
                for s, threat in order:
                    after = tuple(earlier.get((s, threat), [])) if config.cascade else ()
                    after = after + tuple(k for k in suite_after[(s, threat)] if k not in after)
                    sweep = tuple(suite_after[(s, t)] for t in planned) if minimal and part.cascade else ()
                    more = max(0, min(len(shards[s]), INDICATOR_EXAMPLES - s * config.batch_size))
                    job = Job(data, mspec, dspec, threat.to_dict(), aspec, s, shards[s], config.seed, after,
                              save_adversarial, draws, content[s], sweep_after=sweep, indicators=traced,
                              more_examples=more if traced and not part.suite else 0,
                              fit=fit.spec if universal and fit is not None else None)
                    earlier.setdefault((s, threat), []).append(job.key)
                    in_suite.setdefault((s, threat), []).append(job.key)
                    jobs.append(job)
    return jobs


@dataclasses.dataclass(frozen=True)
class FitSet:
    """The examples universal perturbations are fit on (``config.fit``): a split of the evaluated
    data set and the indices drawn from it, disjoint from the evaluated ones on the same split."""

    data: dict[str, Any]  # the data spec of the fit split
    indices: tuple[int, ...]

    @property
    def spec(self) -> dict[str, Any]:
        return {"split": self.data["split"], "indices": list(self.indices)}


def fit_set(config: BenchmarkConfig, indices: np.ndarray, worker: Worker) -> FitSet:
    """``config.fit``'s examples: ``n`` drawn with the run seed from its split, among the examples
    not evaluated when that is the evaluated data (the evaluated split, or an ``.npz`` file, which
    has no splits); a DataError when too few are left."""
    spec = config.fit
    if spec is None:
        raise ConfigError("a universal threat model needs the examples to fit on (fit: {split: train, n: 500})")
    data = {**config.data.model_dump(mode="json"), "split": spec.split}
    try:
        pool = worker.data(data)
    except AdvbenchError as exc:
        raise ConfigError(f"fit: split {spec.split!r}: {exc}") from None
    candidates = np.arange(len(pool))
    same = config.data.path is not None or spec.split == config.data.split
    if same:
        candidates = np.setdiff1d(candidates, np.asarray(indices))
    if spec.n > len(candidates):
        left = " beside the evaluated ones" if same else ""
        raise DataError(f"fit: n is {spec.n} but split {spec.split!r} has {len(candidates)} examples{left}; "
                        f"allowed: 1..{len(candidates)}")
    g = torch.Generator().manual_seed(config.seed + 1)  # not the evaluated examples' draw
    pick = torch.randperm(len(candidates), generator=g)[: spec.n].sort().values.numpy()
    return FitSet(data, tuple(int(i) for i in candidates[pick]))


@dataclasses.dataclass(frozen=True)
class Part:
    """What one config attack entry runs under a threat group: the attack itself, or each
    component of a suite (AutoAttack), labelled ``<entry label>.<component>``."""

    name: str
    params: dict[str, Any]
    label: str
    suite: str | None = None  # the suite's label: its row is the components' per-example worst case
    cascade: bool = False  # a suite component that runs only on the points its earlier components left robust


def planned_parts(name: str, params: dict[str, Any], label: str, threat: ThreatModel) -> list[Part]:
    """The attacks an entry runs under ``threat``'s group: a suite's components, else itself."""
    attack = ATTACKS.create(name, **params)
    parts = getattr(attack, "components", None)
    if parts is None:
        return [Part(name, params, label)]
    cascade = bool(attack.params().get("cascade", True))
    return [Part(c.attack, dict(c.params), f"{label}.{c.label}", label, cascade) for c in parts(threat)]


def suite_labels(config: BenchmarkConfig) -> dict[str, list[str]]:
    """Each suite entry's label and its components' labels (over every norm it can run under), in order."""
    out: dict[str, list[str]] = {}
    for attack, label in zip(config.attacks, config.attack_labels()):
        for threat in attack_threats(config, attack):
            for part in planned_parts(attack.name, attack.params, label, threat):
                if part.suite:
                    members = out.setdefault(part.suite, [])
                    if part.label not in members:
                        members.append(part.label)
    return out


def plan_probes(config: BenchmarkConfig, indices: np.ndarray, input_numel: int,
                worker: Worker | None = None) -> list[Job]:
    """The large-eps probes of the gradient-masking checks (none when they are off): per model,
    defense, white-box threat group and view, PGD (the config's first PGD entry's parameters,
    its step size left to scale with eps; else PGD's defaults) at an eps whose ball covers the
    whole input range, on the first ``PROBE_EXAMPLES`` examples. Labels ``probe:pgd[+view]``. Each
    also records the data's class count and the stability of its view's predictions
    (:mod:`advbench.eval.indicators`)."""
    if not config.masking_checks:
        return []
    worker = worker or Worker(torch.device("cpu"))
    pgd = next((a for a in config.attacks if a.name == "pgd"), None)
    params = {k: v for k, v in (pgd.params if pgd else {}).items() if k != "step_size"}
    attack = ATTACKS.create("pgd", **params)
    data = config.data.model_dump(mode="json")
    subset = tuple(int(i) for i in indices[:PROBE_EXAMPLES])
    jobs: list[Job] = []
    for mspec, dspec, mtags, threats in _cells(config, worker):
        eps = probe_eps(threats[0].norm.value, threats[0].bounds, input_numel)
        if threats[0].knowledge is not Knowledge.WHITE_BOX or eps is None or threats[0].constrained:
            continue  # (the probe is for the Lp ball alone)
        threat = dataclasses.replace(threats[0], eps=eps)
        if attack.supports(threat):
            continue
        for suffix, view in attack_views(config, mtags):
            aspec = _attack_spec("pgd", params, f"{PROBE_PREFIX}pgd{suffix}", view, probe=True)
            jobs.append(Job(data, mspec, dspec, threat.to_dict(), aspec, -1, subset, config.seed,
                            draws=config.draws if mtags.randomized else 1,
                            content=worker.content(data, mspec, subset), indicators=True))
    return jobs
