"""The unit of work: one (model, defense, threat model, attack, shard of examples) job.

A :class:`Job` is self-contained and JSON-serializable: it carries the specs of the data,
the model, the defense, the threat model and the attack, the example indices of its shard,
and its seed. Its key is a hash of all of that, so it is the same on every machine and in
every run. A :class:`Worker` turns jobs into :class:`~advbench.store.JobRecord` s, caching the
loaded data and models between jobs. Jobs run in-process today (:class:`InProcessExecutor`);
a distributed engine only needs to ship ``Job.to_json()`` to workers that call
``Worker(device).run(job)`` and send the records back.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from advbench.attacks.base import Attack, AttackResult
from advbench.errors import ModelOutputError
from advbench.store import JobRecord
from advbench.threat import ThreatModel


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

    @property
    def key(self) -> str:
        d = asdict(self)
        d.pop("save_adversarial")
        return stable_hash(d)

    @property
    def minimal(self) -> bool:
        """Whether the attack is a minimal-perturbation one (one run serves every eps)."""
        return bool(self.attack.get("minimal"))

    @property
    def sweep_key(self) -> str:
        """The key of the attack run behind this job. A minimal-perturbation attack ignores eps,
        so its jobs at every eps of one threat model (norm, targeting, ...) share one run."""
        if not self.minimal:
            return self.key
        d = asdict(self)
        for k in ("save_adversarial", "after"):
            d.pop(k)
        d["threat"] = {k: v for k, v in d["threat"].items() if k != "eps"}
        return stable_hash(d)

    @property
    def seed(self) -> int:
        """The job's own seed: derived from the run seed and the job's content, not its position."""
        return int(stable_hash({"seed": self.base_seed, "key": self.sweep_key}, 15), 16)

    @property
    def cell(self) -> tuple[str, str, str, str]:
        return (self.model["name"], self.defense["name"], json.dumps(self.threat, sort_keys=True), self.attack_label)

    @property
    def attack_label(self) -> str:
        return str(self.attack.get("label") or self.attack["name"])

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> Job:
        d = json.loads(s)
        d["indices"], d["after"] = tuple(d["indices"]), tuple(d["after"])
        return cls(**d)


class Worker:
    """Runs jobs; keeps data, models and clean predictions loaded between them."""

    def __init__(
        self,
        device: torch.device,
        robust_lookup: Callable[[tuple[str, ...]], dict[int, bool]] | None = None,
        amp: bool = False,
    ) -> None:
        self.device = device
        self.amp = amp and device.type == "cuda"
        self.robust_lookup = robust_lookup
        self._data: dict[str, Any] = {}
        self._models: dict[str, nn.Module] = {}
        self._clean: dict[str, torch.Tensor] = {}
        # the last minimal-perturbation run, reused by the jobs of its other eps (planned next to it)
        self._sweep: tuple[tuple[str, bytes], AttackResult, float] | None = None

    # ------------------------------------------------------------------ cached context
    def preload_data(self, spec: dict[str, Any], data: Any) -> None:
        """Hand the worker a data set already loaded for ``spec`` (saves loading it twice)."""
        self._data[stable_hash(spec)] = (data, data.x.to(self.device), data.y.to(self.device))

    def data(self, spec: dict[str, Any]):
        from advbench.eval.resolve import load_data

        key = stable_hash(spec)
        if key not in self._data:
            data = load_data(spec)
            self._data[key] = (data, data.x.to(self.device), data.y.to(self.device))
        return self._data[key]

    def model(self, model_spec: dict[str, Any], defense_spec: dict[str, Any]) -> nn.Module:
        from advbench.eval.resolve import apply_defense, load_model

        key = stable_hash([model_spec, defense_spec])
        if key not in self._models:
            model = apply_defense(load_model(model_spec), defense_spec).to(self.device).eval()
            if self.amp:
                from advbench.eval.resolve import Autocast

                model = Autocast(model, self.device.type)
            self._models[key] = model
        return self._models[key]

    def clean_predictions(self, job: Job) -> torch.Tensor:
        key = stable_hash([job.data, job.model, job.defense])
        if key not in self._clean:
            data, x, _ = self.data(job.data)
            model = self.model(job.model, job.defense)
            self._clean[key] = clean_predictions(model, x, data.num_classes, job.model["name"])
        return self._clean[key]

    # ------------------------------------------------------------------ running
    def run(self, job: Job) -> JobRecord:
        from advbench.registry import ATTACKS

        data, x_all, y_all = self.data(job.data)
        model = self.model(job.model, job.defense)
        pred_clean_all = self.clean_predictions(job)
        start = time.perf_counter()  # the attack's time only: loading and training are not the attack's
        idx = torch.tensor(job.indices, dtype=torch.long, device=self.device)
        x, y, pred_clean = x_all[idx], y_all[idx], pred_clean_all[idx]
        threat = ThreatModel.from_dict(job.threat)
        attack = ATTACKS.create(job.attack["name"], **job.attack["params"])

        todo = pred_clean == y
        if job.after and self.robust_lookup is not None:
            still = self.robust_lookup(job.after)
            todo &= torch.tensor([still.get(int(i), True) for i in job.indices], device=self.device)
        n = len(job.indices)
        pred_adv = pred_clean.clone()
        valid = torch.ones(n, dtype=torch.bool, device=self.device)
        success = torch.zeros(n, dtype=torch.bool, device=self.device)
        distance = torch.full((n,), float("nan"), device=self.device)
        min_distance = torch.full((n,), float("nan"), device=self.device)  # inf: searched, none found
        target_all = torch.full((n,), -1, dtype=torch.long, device=self.device)
        x_adv_all = x.clone()
        n_forward = n_backward = n_queries = quant = 0
        seconds_run: float | None = None
        generator = torch.Generator(device="cpu").manual_seed(job.seed)
        if bool(todo.any()):
            sel = todo.nonzero().squeeze(1)
            result, seconds_run = self._attack(job, attack, model, x[sel], y[sel], sel, threat, generator)
            pred_adv[sel] = result.pred_adv
            valid[sel] = result.valid
            success[sel] = result.success
            distance[sel] = result.distances.to(distance.dtype)
            if result.target is not None:
                target_all[sel] = result.target
            x_adv_all[sel] = result.x_adv
            if result.minimal_distances is not None:
                min_distance[sel] = result.minimal_distances.to(min_distance.dtype)
            n_forward, n_backward, n_queries = result.n_forward, result.n_backward, result.n_queries
            quant = result.quantization_failures
        seconds = time.perf_counter() - start
        if seconds_run is not None:
            seconds = seconds_run  # a reused minimal-perturbation run: report what the run cost

        pos = list(job.indices)
        cols = {k: v.cpu().numpy() for k, v in dict(
            label=y, pred_clean=pred_clean, pred_adv=pred_adv, attacked=todo, valid=valid, success=success,
            distance=distance, min_distance=min_distance, target=target_all).items()}
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
            }
            for i in range(n)
        ]
        adversarial = None
        if job.save_adversarial:
            adversarial = {
                "idx": np.asarray(pos, dtype=np.int64),
                "x": x.cpu().numpy(),
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
        self, job: Job, attack: Attack, model: nn.Module, x: torch.Tensor, y: torch.Tensor, sel: torch.Tensor,
        threat: ThreatModel, generator: torch.Generator,
    ) -> tuple[AttackResult, float | None]:
        """Run the attack, or re-audit the run a minimal-perturbation job shares with its other
        eps. Returns the result and, when reused, the seconds the shared run took."""
        if not job.minimal:
            return attack(model, x, y, threat, generator=generator), None
        key = (job.sweep_key, sel.cpu().numpy().tobytes())
        if self._sweep is not None and self._sweep[0] == key:
            _, shared, seconds = self._sweep
            return attack.at_budget(model, x, y, threat, shared), seconds
        start = time.perf_counter()
        result = attack(model, x, y, threat, generator=generator)
        self._sweep = (key, result, time.perf_counter() - start)
        return result, None


@torch.no_grad()
def clean_predictions(model: nn.Module, x: torch.Tensor, num_classes: int, name: str, batch: int = 1000) -> torch.Tensor:
    """Clean top-1 predictions, checking the model really returns a finite batch of logits."""
    preds = []
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
        if out.shape[1] < num_classes:
            raise ModelOutputError(
                f"model {name!r} returns {out.shape[1]} scores per example but the data has {num_classes} classes"
            )
        if not bool(torch.isfinite(out).all()):
            raise ModelOutputError(f"model {name!r} returned NaN or infinite logits")
        preds.append(out.argmax(dim=1))
    return torch.cat(preds)


class InProcessExecutor:
    """Runs jobs one after another in this process (the seam a distributed engine replaces)."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def map(self, jobs: Iterable[Job]) -> Iterator[tuple[Job, JobRecord]]:
        for job in jobs:
            yield job, self.worker.run(job)
