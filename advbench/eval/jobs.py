"""The unit of work: one (model, defense, threat model, attack, shard of examples) job.

A :class:`Job` is self-contained and JSON-serializable: it carries the specs of the data,
the model, the defense, the threat model and the attack, the example indices of its shard,
and its seed. Its key is a hash of all of that, so it is the same on every machine and in
every run. A :class:`Worker` turns jobs into :class:`~advbench.store.JobRecord` s, caching the
loaded data and models between jobs. Jobs run in-process today (:class:`InProcessExecutor`);
a distributed engine only needs to ship ``Job.to_json()`` to workers that call
``Worker(device).run(job)`` and send the records back.

Defended models (:mod:`advbench.defenses.base`). The attack of a job is handed either the
deployed model (a *naive* attacker: autograd's own gradients, one draw of any randomness per
forward pass) or, when the job's attack spec carries ``adaptive`` (``{"bpda": true,
"eot_samples": n}``), its adaptive view: BPDA through the surrogates of non-differentiable
stages, EoT over n draws. Whatever the attacker saw, what it produced is audited and scored on
the *deployed* model. A randomized deployed model is scored over ``Job.draws`` draws of its
randomness: draw d uses a seed derived from the run seed, the model, the defense and the shard
(not the attack), with the same randomness for the clean input and the adversarial example,
and the records keep each draw's clean and adversarial prediction. Before each attack the
model's generator restarts from the job's seed, so no result depends on which jobs ran before
(resume gives the same numbers).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from advbench.attacks.base import Attack, AttackResult
from advbench.audit import audit, targetable
from advbench.defenses.base import DefendedModel, adaptive, find_defended
from advbench.errors import ConfigError, ModelOutputError
from advbench.eval import threads
from advbench.models.zoo import num_threads
from advbench.store import JobRecord
from advbench.threat import Targeting, ThreatModel


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

    @property
    def key(self) -> str:
        """The job's identity in the store: its specs *and* the content they resolved to, so a
        replaced model file, retrained weights or changed data never resume stale results."""
        return stable_hash(self._identity())

    def _identity(self, content: bool = True) -> dict[str, Any]:
        """What the job's key hashes: everything but how its output is kept (and one draw, so a
        deterministic model's jobs keep the keys, and seeds, they had before draws existed)."""
        d = asdict(self)
        d.pop("save_adversarial")
        if d["draws"] == 1:
            d.pop("draws")
        if not content or not d["content"]:
            d.pop("content")
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
        return cls(**d)


@dataclass(frozen=True)
class CleanPass:
    """A shard's clean predictions on the deployed model, computed once for all its jobs."""

    pred: torch.Tensor  # (N,) the prediction (a randomized model's first scoring draw)
    least_likely: torch.Tensor  # (N,) argmin of the same logits: Kurakin et al.'s y_LL
    num_outputs: int  # scores per example the model returns
    draws: torch.Tensor | None = None  # (draws, N) a randomized model's prediction in each draw

    def correct(self, y: torch.Tensor) -> torch.Tensor:
        """Clean-correct (a randomized model: in at least one draw): the examples an attack gets."""
        return self.pred == y if self.draws is None else (self.draws == y).any(dim=0)


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


class Worker:
    """Runs jobs; keeps data, models and clean predictions loaded between them."""

    def __init__(
        self,
        device: torch.device,
        robust_lookup: Callable[[tuple[str, ...]], dict[int, bool]] | None = None,
        amp: bool = False,
        threads: int | None = None,
    ) -> None:
        self.device = device
        self.amp = amp and device.type == "cuda"
        self.robust_lookup = robust_lookup
        #: CPU threads per job: an explicit count, or None to choose by the job's size
        #: (:mod:`advbench.eval.threads`); the count each (model, defense, rows) got is kept
        self.threads = threads
        self.available_threads = torch.get_num_threads()
        self.thread_choices: dict[str, int] = {}
        self._flops: dict[str, float | None] = {}
        self._data: dict[str, Any] = {}
        self._base: dict[str, tuple[nn.Module, str]] = {}  # model spec -> (loaded model, content digest)
        self._models: dict[str, nn.Module] = {}
        self._views: dict[str, nn.Module] = {}
        self._clean: dict[str, CleanPass] = {}
        self._digests: dict[str, str] = {}
        # the last minimal-perturbation run, reused by the jobs of its other eps (planned next to it)
        self._sweep: tuple[tuple[str, bytes], AttackResult, float] | None = None

    # ------------------------------------------------------------------ cached context
    def preload_data(self, spec: dict[str, Any], data: Any) -> None:
        """Hand the worker a data set already loaded for ``spec`` (saves loading it twice)."""
        self._data[stable_hash(spec)] = data

    def data(self, spec: dict[str, Any]) -> Any:
        """The data set ``spec`` names, loaded once and kept on the CPU: a job moves only its own
        shard to the device, so a large data set costs memory there for the examples evaluated."""
        from advbench.eval.resolve import load_data

        key = stable_hash(spec)
        if key not in self._data:
            self._data[key] = load_data(spec)
        return self._data[key]

    def base_model(self, model_spec: dict[str, Any]) -> tuple[nn.Module, str]:
        """The model a spec names, loaded once, and the digest of its content (weights, file bytes)."""
        from advbench.eval.resolve import load_model, model_digest

        key = stable_hash(model_spec)
        if key not in self._base:
            model = load_model(model_spec)
            self._base[key] = (model, model_digest(model_spec, model))
        return self._base[key]

    def content(self, data_spec: dict[str, Any], model_spec: dict[str, Any], indices: tuple[int, ...]) -> dict[str, str]:
        """What a job over ``indices`` evaluates, by content: the model's digest and the shard's."""
        key = stable_hash([data_spec, stable_hash(indices)])
        if key not in self._digests:
            self._digests[key] = examples_digest(self.data(data_spec), indices)
        return {"model": self.base_model(model_spec)[1], "data": self._digests[key]}

    def model(self, model_spec: dict[str, Any], defense_spec: dict[str, Any], seed: int = 0) -> nn.Module:
        """The deployed model: ``model_spec`` behind ``defense_spec``, its randomness seeded by ``seed``."""
        from advbench.eval.resolve import apply_defense

        key = stable_hash([model_spec, defense_spec, seed])
        if key not in self._models:
            model = apply_defense(self.base_model(model_spec)[0], defense_spec, seed=seed).to(self.device).eval()
            self._models[key] = self._autocast(model)
        return self._models[key]

    def tags(self, model_spec: dict[str, Any], defense_spec: dict[str, Any], seed: int = 0) -> ModelTags:
        return ModelTags.of(self.model(model_spec, defense_spec, seed))

    def view(self, job: Job) -> nn.Module:
        """The model the job's attack is handed: the deployed model, or its adaptive view."""
        deployed = self.model(job.model, job.defense, job.base_seed)
        spec = job.attack.get("adaptive")
        if not spec:
            return deployed
        key = stable_hash([job.model, job.defense, job.base_seed, spec])
        if key not in self._views:
            defended = find_defended(deployed)
            if defended is None:
                raise ConfigError(f"model {job.model['name']!r} with defense {job.defense['name']!r} has no "
                                  f"defense stages to attack adaptively")
            self._views[key] = self._autocast(adaptive(defended, eot_samples=spec["eot_samples"], bpda=spec["bpda"]))
        return self._views[key]

    def _autocast(self, model: nn.Module) -> nn.Module:
        if not self.amp:
            return model
        from advbench.eval.resolve import Autocast

        return Autocast(model, self.device.type)

    def clean_pass(self, job: Job, deployed: nn.Module, randomized: DefendedModel | None,
                   x: torch.Tensor) -> CleanPass:
        """The job's shard through the deployed model (each scoring draw of a randomized one): only
        the examples the job evaluates, computed once per shard for all its attacks and eps."""
        key = stable_hash([job.model, job.defense, job.base_seed, job.content, stable_hash(job.indices),
                           job.draw_seeds() if randomized is not None else None])
        if key not in self._clean:
            name = job.model["name"]
            if randomized is None:
                logits = checked_logits(deployed, x, name)
                self._clean[key] = CleanPass(logits.argmax(dim=1), logits.argmin(dim=1), int(logits.shape[1]))
            else:
                per_draw = [checked_logits(deployed, x, name) for _ in _each_draw(job, randomized)]
                draws = torch.stack([lg.argmax(dim=1) for lg in per_draw])
                self._clean[key] = CleanPass(draws[0], per_draw[0].argmin(dim=1), int(per_draw[0].shape[1]), draws)
        return self._clean[key]

    # ------------------------------------------------------------------ running
    def job_threads(self, job: Job, deployed: nn.Module, example: torch.Tensor) -> int | None:
        """The CPU thread count ``job`` runs with (None: leave torch's setting alone)."""
        if self.device.type != "cpu":
            return None
        if self.threads is not None:
            return self.threads
        if threads.explicit_in_environment():
            return None
        key = stable_hash([job.model, job.defense])
        if key not in self._flops:
            self._flops[key] = threads.forward_flops(deployed, example)
        per_input = int(job.attack.get("adaptive", {}).get("eot_samples", 1)) if job.attack.get("adaptive") else 1
        n = threads.choose(self._flops[key], len(job.indices) * per_input, self.available_threads)
        self.thread_choices[f"{job.model['name']} / {job.defense['name']} / {len(job.indices)} examples"] = n
        return n

    def run(self, job: Job) -> JobRecord:
        """Run one job (with the thread count :meth:`job_threads` picks) into its record."""
        data = self.data(job.data)
        deployed = self.model(job.model, job.defense, job.base_seed)
        with num_threads(self.job_threads(job, deployed, data.x[job.indices[0]:job.indices[0] + 1].to(self.device))):
            return self._run(job)

    def _run(self, job: Job) -> JobRecord:
        from advbench.registry import ATTACKS

        data = self.data(job.data)
        deployed = self.model(job.model, job.defense, job.base_seed)
        defended = find_defended(deployed)
        randomized = defended if defended is not None and defended.randomized else None
        idx = torch.tensor(job.indices, dtype=torch.long)
        x, y = data.x[idx].to(self.device), data.y[idx].to(self.device)
        threat = ThreatModel.from_dict(job.threat)
        attack = ATTACKS.create(job.attack["name"], **job.attack["params"])
        clean = self.clean_pass(job, deployed, randomized, x)  # also checks the model returns logits
        start = time.perf_counter()  # the attack's time only: loading and training are not the attack's
        target = job_targets(job, threat, clean, y)
        pred_clean = clean.pred
        # attacked: clean-correct, and (targeted) not already of the target class, which no attack
        # can be pursued toward; those stay robust unless another attack breaks them
        todo = clean.correct(y) & targetable(y, target)
        if job.after and self.robust_lookup is not None and not job.minimal:
            # cascade: only the points earlier attacks left robust. A minimal-perturbation attack
            # searches every point, so its distances mean the same in every mode
            still = self.robust_lookup(job.after)
            todo &= torch.tensor([still.get(int(i), True) for i in job.indices], device=self.device)
        n = len(job.indices)
        pred_adv = pred_clean.clone()
        valid = torch.ones(n, dtype=torch.bool, device=self.device)
        success = torch.zeros(n, dtype=torch.bool, device=self.device)
        distance = torch.full((n,), float("nan"), device=self.device)
        min_distance = torch.full((n,), float("nan"), device=self.device)  # inf: searched, none found
        x_adv_all = x.clone()  # the images that count: the clean input wherever nothing else does
        n_forward = n_backward = n_queries = quant = 0
        seconds_run: float | None = None
        generator = torch.Generator(device="cpu").manual_seed(job.seed)
        if bool(todo.any()):
            sel = todo.nonzero().squeeze(1)
            view = self.view(job)
            # scored on the deployed model whatever the attacker saw; a randomized one per draw below
            judge = deployed if randomized is None else view
            if randomized is not None:
                randomized.reseed(job.seed)
            result, seconds_run = self._attack(job, attack, view, judge, randomized, x[sel], y[sel],
                                               None if target is None else target[sel], sel, threat, generator)
            pred_adv[sel] = result.pred_adv
            valid[sel] = result.valid
            success[sel] = result.success
            distance[sel] = result.distances.to(distance.dtype)
            x_adv_all[sel] = result.x_adv
            if result.minimal_distances is not None:
                min_distance[sel] = result.minimal_distances.to(min_distance.dtype)
            n_forward, n_backward, n_queries = result.n_forward, result.n_backward, result.n_queries
            quant = result.quantization_failures
        pa_draws = None
        if randomized is not None:  # every draw audits the same (audited) examples; success: in any draw
            reports = [audit(deployed, x, x_adv_all, y, threat, target) for _ in _each_draw(job, randomized)]
            pa_draws = torch.stack([r.pred_adv for r in reports])
            success = torch.stack([r.success for r in reports]).any(dim=0) & todo & valid
            pred_adv = pa_draws[0]
            quant = int((torch.stack([r.quantization_failures for r in reports]).any(dim=0) & todo & valid).sum())
        seconds = time.perf_counter() - start
        if seconds_run is not None:
            seconds = seconds_run  # a reused minimal-perturbation run: report what the run cost

        pos = list(job.indices)
        target_all = torch.full((n,), -1, dtype=torch.long, device=self.device) if target is None else target
        cols = {k: v.cpu().numpy() for k, v in dict(
            label=y, pred_clean=pred_clean, pred_adv=pred_adv, attacked=todo, valid=valid, success=success,
            distance=distance, min_distance=min_distance, target=target_all).items()}
        draws = {k: None if v is None else [",".join(str(int(p)) for p in col) for col in v.T.cpu().numpy()]
                 for k, v in (("pred_clean_draws", clean.draws), ("pred_adv_draws", pa_draws))}
        examples = [
            {
                "idx": pos[i],
                "label": int(cols["label"][i]),
                "pred_clean": int(cols["pred_clean"][i]),
                "pred_adv": int(cols["pred_adv"][i]),
                "target": int(cols["target"][i]) if cols["target"][i] >= 0 else None,
                "attacked": bool(cols["attacked"][i]),
                "valid": bool(cols["valid"][i]),
                "success": bool(cols["success"][i]),
                "distance": float(cols["distance"][i]) if np.isfinite(cols["distance"][i]) else None,
                "min_distance": None if np.isnan(cols["min_distance"][i]) else float(cols["min_distance"][i]),
                **{k: None if v is None else v[i] for k, v in draws.items()},
            }
            for i in range(n)
        ]
        adversarial = None
        if job.save_adversarial:  # the audited images only; the clean ones live in the data set (once)
            adversarial = {
                "idx": np.asarray(pos, dtype=np.int64),
                "x_adv": x_adv_all.cpu().numpy(),
                "y": cols["label"],
                "pred_clean": cols["pred_clean"],
                "pred_adv": cols["pred_adv"],
            }
        return JobRecord(
            job_key=job.key,
            model=job.model["name"],
            defense=job.defense["name"],
            threat=job.threat,
            attack=job.attack_label,
            attack_params=job.attack["params"],
            shard=job.shard,
            seconds=seconds,
            n_forward=n_forward,
            n_backward=n_backward,
            n_queries=n_queries,
            violations=int((todo & ~valid).sum()),
            quantization_failures=quant,
            seed=job.seed,
            examples=examples,
            adversarial=adversarial,
        )

    def _attack(
        self, job: Job, attack: Attack, model: nn.Module, judge: nn.Module, randomized: DefendedModel | None,
        x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None, sel: torch.Tensor, threat: ThreatModel,
        generator: torch.Generator,
    ) -> tuple[AttackResult, float | None]:
        """Run the attack, or re-audit the run a minimal-perturbation job shares with its other
        eps. Returns the result and, when reused, the seconds the shared run took. On a randomized
        model every eps (the first too) re-audits the shared run from the job's seed, so the
        result does not depend on which eps ran first."""
        if not job.minimal:
            return attack(model, x, y, threat, target=target, generator=generator, judge=judge), None
        key = (job.sweep_key, sel.cpu().numpy().tobytes())
        reused: float | None = None
        if self._sweep is not None and self._sweep[0] == key:
            reused = self._sweep[2]
        else:
            start = time.perf_counter()
            result = attack(model, x, y, threat, target=target, generator=generator, judge=judge)
            self._sweep = (key, result, time.perf_counter() - start)
            if randomized is None:
                return result, None
        if randomized is not None:
            randomized.reseed(job.seed)
        return attack.at_budget(judge, x, y, threat, self._sweep[1]), reused


def job_targets(job: Job, threat: ThreatModel, clean: CleanPass, y: torch.Tensor) -> torch.Tensor | None:
    """The target of every example of a targeted job (None when untargeted), the same for every
    attack, eps and norm, so the worst case over attacks is a worst case for one target per example:

    - ``fixed``: ``target_class``;
    - ``least_likely``: argmin of the deployed model's clean logits (its first scoring draw);
    - ``random``: a class other than the label, drawn per example from the run seed and the
      example's index (not from the attack's generator).
    """
    k = clean.num_outputs
    if threat.targeting is Targeting.UNTARGETED:
        return None
    if threat.targeting is Targeting.FIXED:
        if threat.target_class >= k:  # type: ignore[operator]
            raise ConfigError(f"target_class {threat.target_class} is out of range for model "
                              f"{job.model['name']!r} with {k} outputs; allowed: 0..{k - 1}")
        return torch.full_like(y, int(threat.target_class))  # type: ignore[arg-type]
    if threat.targeting is Targeting.LEAST_LIKELY:
        return clean.least_likely.clone()
    offsets = [1 + int(stable_hash({"seed": job.base_seed, "random_target": i}, 12), 16) % (k - 1)
               for i in job.indices]
    return (y + torch.tensor(offsets, dtype=torch.long, device=y.device)) % k


def examples_digest(data: Any, indices: tuple[int, ...]) -> str:
    """SHA-256 (20 hex digits) of the images and labels at ``indices``: a job's examples by content."""
    idx = torch.as_tensor(indices, dtype=torch.long)
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(data.x[idx].cpu().numpy()).tobytes())
    h.update(np.ascontiguousarray(data.y[idx].cpu().numpy().astype(np.int64)).tobytes())
    return h.hexdigest()[:20]


def _each_draw(job: Job, defended: DefendedModel) -> Iterator[int]:
    """Restart ``defended``'s randomness at each of the job's scoring draws in turn."""
    for seed in job.draw_seeds():
        defended.reseed(seed)
        yield seed


@torch.no_grad()
def checked_logits(model: nn.Module, x: torch.Tensor, name: str, batch: int = 1000) -> torch.Tensor:
    """The clean logits of ``x``, checking the model really returns a finite batch of logits."""
    outs = []
    for chunk in x.split(batch):
        try:
            out = model(chunk)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise ModelOutputError(
                f"model {name!r} failed on inputs of shape {tuple(chunk.shape)}: {' '.join(str(exc).split())[:300]}"
            ) from None
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != chunk.shape[0]:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ModelOutputError(
                f"model {name!r} must return logits of shape (N, classes); got {shape} for an input of shape {tuple(chunk.shape)}"
            )
        if not bool(torch.isfinite(out).all()):
            raise ModelOutputError(f"model {name!r} returned NaN or infinite logits")
        outs.append(out.float())
    return torch.cat(outs)


class InProcessExecutor:
    """Runs jobs one after another in this process (the seam a distributed engine replaces)."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def map(self, jobs: Iterable[Job]) -> Iterator[tuple[Job, JobRecord]]:
        for job in jobs:
            yield job, self.worker.run(job)
