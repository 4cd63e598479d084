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
from advbench.eval.masking import PROBE_EXAMPLES, probe_eps
from advbench.eval.worker import Worker
from advbench.registry import ATTACKS
from advbench.specs import DefenseSpec, ModelSpec
from advbench.threat import Knowledge, ThreatModel


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
    """Attack labels in table order: each config entry, then its adaptive variants."""
    return [label + suffix for label in config.attack_labels() for suffix in ("", "+bpda", "+eot", "+bpda+eot")]


def plan_jobs(config: BenchmarkConfig, indices: np.ndarray, save_adversarial: bool = False,
              worker: Worker | None = None) -> list[Job]:
    """All jobs of a config, in a fixed order: models, defenses, threat models (grouped by all
    but eps), attacks (each white-box attack on a model that needs it naive, then adaptive), then
    shards and eps. A minimal-perturbation attack's jobs at the eps of one group come one after
    another for each shard, so the worker runs the attack once and re-audits its result at each
    eps. ``worker`` loads the models and data to learn what each (model, defense) is and the
    content digests the jobs carry (default: a CPU worker of its own)."""
    worker = worker or Worker(torch.device("cpu"))
    data = config.data.model_dump(mode="json")
    shards = [tuple(int(i) for i in indices[s : s + config.batch_size]) for s in range(0, len(indices), config.batch_size)]
    labels = config.attack_labels()
    jobs: list[Job] = []
    for mspec, dspec, mtags, threats in _cells(config, worker):
        content = [worker.content(data, mspec, shard) for shard in shards]
        draws = config.draws if mtags.randomized else 1
        views = attack_views(config, mtags) if threats[0].knowledge is Knowledge.WHITE_BOX else [("", None)]
        earlier: dict[tuple[int, ThreatModel], list[str]] = {}
        for (attack, label), (suffix, view) in itertools.product(zip(config.attacks, labels), views):
            minimal = bool(getattr(ATTACKS.get(attack.name).factory, "minimal", False))  # a class attribute
            aspec = _attack_spec(attack.name, attack.params, label + suffix, view, **({"minimal": True} if minimal else {}))
            allowed = attack_threats(config, attack)
            planned = [t for t in threats if t in allowed]
            order = ([(s, t) for s in range(len(shards)) for t in planned] if minimal
                     else [(s, t) for t in planned for s in range(len(shards))])
            for s, threat in order:
                after = tuple(earlier.get((s, threat), [])) if config.cascade else ()
                job = Job(data, mspec, dspec, threat.to_dict(), aspec, s, shards[s], config.seed, after,
                          save_adversarial, draws, content[s])
                earlier.setdefault((s, threat), []).append(job.key)
                jobs.append(job)
    return jobs


def plan_probes(config: BenchmarkConfig, indices: np.ndarray, input_numel: int,
                worker: Worker | None = None) -> list[Job]:
    """The large-eps probes of the gradient-masking checks (none when they are off): per model,
    defense, white-box threat group and view, PGD (the config's first PGD entry's parameters,
    its step size left to scale with eps; else PGD's defaults) at an eps whose ball covers the
    whole input range, on the first ``PROBE_EXAMPLES`` examples. Labels ``probe:pgd[+view]``."""
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
        if threats[0].knowledge is not Knowledge.WHITE_BOX or eps is None:
            continue
        threat = dataclasses.replace(threats[0], eps=eps)
        if attack.supports(threat):
            continue
        for suffix, view in attack_views(config, mtags):
            aspec = _attack_spec("pgd", params, f"{PROBE_PREFIX}pgd{suffix}", view, probe=True)
            jobs.append(Job(data, mspec, dspec, threat.to_dict(), aspec, -1, subset, config.seed,
                            draws=config.draws if mtags.randomized else 1,
                            content=worker.content(data, mspec, subset)))
    return jobs
