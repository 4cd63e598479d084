"""Running jobs: a :class:`Worker` turns :class:`~advbench.eval.jobs.Job` s into
:class:`~advbench.store.JobRecord` s, keeping data, models and clean predictions loaded between
them. An executor (:mod:`advbench.eval.executors`) calls ``Worker.run(job)`` in this process or
in the workers of a cluster and hands the records back to the driver.

An attack that runs out of device memory is retried on halves of its examples (then quarters,
...), one after another with the same generator; each halving is kept in ``oom_events`` (and
run.json). The numbers stay audited and correct; only the randomness each example drew may
differ from a run that fitted whole.

A job runs in four steps: **select** the examples its attack gets (clean-correct, targetable,
and in cascade mode still robust), **attack** them (the attack's own audit judges the output on
the deployed model), **score** a randomized model over its draws, and **record** the outcome.

Defended models (:mod:`advbench.defenses.base`). The attack of a job is handed either the
deployed model (a *naive* attacker: autograd's own gradients, one draw of any randomness per
forward pass) or, when the job's attack spec carries ``adaptive`` (``{"bpda": true,
"eot_samples": n}``), its adaptive view: BPDA through the surrogates of non-differentiable
stages, EoT over n draws. Whatever the attacker saw, what it produced is audited once, on the
*deployed* model. A randomized deployed model is then scored over ``Job.draws`` draws of its
randomness: draw d uses a seed derived from the run seed, the model, the defense and the shard
(not the attack), with the same randomness for the clean input and the adversarial example, and
the records keep each draw's clean and adversarial prediction. Before each attack the model's
generator restarts from the job's seed, so no result depends on which jobs ran before (resume
gives the same numbers).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from advbench.attacks.autoattack import still_robust
from advbench.attacks.base import Attack, AttackResult
from advbench.attacks.trace import PathRecorder, PathSummary
from advbench.audit import goal_met, physical_draws, predict, region_corners, targetable
from advbench.data.base import ImageData
from advbench.defenses.base import DefendedModel, adaptive, find_defended
from advbench.errors import AdvbenchError, ConfigError, ModelOutputError
from advbench.eval import threads
from advbench.eval.indicators import broken, doubled_params, path_reading, stability_reading
from advbench.eval.jobs import Job, ModelTags, stable_hash
from advbench.eval.masking import NOISE_EXAMPLES
from advbench.loading import Autocast, apply_defense, load_data, load_model, model_digest
from advbench.registry import ATTACKS
from advbench.store import FEED_COLUMN, JobRecord
from advbench.tensors import num_threads
from advbench.threat import Scope, Targeting, ThreatModel


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
class Context:
    """What a job works on: its examples, the deployed model, the attack, the clean pass, targets."""

    x: torch.Tensor
    y: torch.Tensor
    deployed: nn.Module
    randomized: DefendedModel | None  # the deployed model's defense, when it draws randomness
    threat: ThreatModel
    attack: Attack
    clean: CleanPass
    target: torch.Tensor | None  # one per example when targeted
    #: a universal threat model's fit set (images, labels), on the device
    fit: tuple[torch.Tensor, torch.Tensor] | None = None
    #: a region located fixed or random: each example's square corner (N, 2), the same for every attack
    corners: torch.Tensor | None = None
    #: a physical feed: (N, draws) the prediction on each draw of the transformed clean input
    feed: torch.Tensor | None = None


@dataclass
class Outcome:
    """A job's per-example results (over the whole shard) and what the attack cost."""

    pred_adv: torch.Tensor
    valid: torch.Tensor
    success: torch.Tensor
    distance: torch.Tensor  # NaN where not attacked
    min_distance: torch.Tensor  # NaN where not searched, inf where searched and none found
    x_adv: torch.Tensor  # the images that count: the clean input wherever nothing else does
    pred_adv_draws: torch.Tensor | None = None  # (draws, N) a randomized model's
    n_forward: int = 0
    n_backward: int = 0
    n_queries: int = 0
    quantization_failures: int = 0
    seconds: float | None = None  # a reused minimal-perturbation run: the seconds it took
    measured: dict[str, Any] | None = None  # the evaluation-failure indicators' readings (Job.indicators)
    extra_seconds: float = 0.0  # spent on those readings (not the attack's time)
    universal: torch.Tensor | None = None  # a universal threat model's one perturbation (or patch)


class Worker:
    """Runs jobs; keeps data, models and clean predictions loaded between them."""

    def __init__(
        self,
        device: torch.device,
        robust_lookup: Callable[[tuple[str, ...]], dict[int, bool]] | None = None,
        amp: bool = False,
        threads: int | None = None,
        channels_last: bool = False,
    ) -> None:
        self.device = device
        self.amp = amp and device.type == "cuda"
        self.channels_last = channels_last
        #: each out-of-memory halving: the job, its examples and the batch that fitted
        self.oom_events: list[dict[str, Any]] = []
        self.robust_lookup = robust_lookup
        #: CPU threads per job: an explicit count, or None to choose by the job's size
        #: (:mod:`advbench.eval.threads`); the count each (model, defense, rows) got is kept
        self.threads = threads
        self.available_threads = torch.get_num_threads()
        self.thread_choices: dict[str, int] = {}
        self._flops: dict[str, float | None] = {}
        self._data: dict[str, ImageData] = {}
        self._base: dict[str, tuple[nn.Module, str]] = {}  # model spec -> (loaded model, content digest)
        self._models: dict[str, nn.Module] = {}
        self._views: dict[str, nn.Module] = {}
        self._clean: dict[str, CleanPass] = {}
        self._clean_feed: dict[str, torch.Tensor] = {}
        self._digests: dict[str, str] = {}
        self._attacks: dict[str, Attack] = {}  # one instance per attack spec (a transfer source loads once)
        # the last minimal-perturbation run, reused by the jobs of its other eps (planned next to it)
        self._sweep: tuple[tuple[str, bytes], AttackResult, float] | None = None

    # ------------------------------------------------------------------ cached context
    def preload_data(self, spec: dict[str, Any], data: ImageData) -> None:
        """Hand the worker a data set already loaded for ``spec`` (saves loading it twice)."""
        self._data[stable_hash(spec)] = data

    def data(self, spec: dict[str, Any]) -> ImageData:
        """The data set ``spec`` names, loaded once and kept on the CPU: a job moves only its own
        shard to the device, so a large data set costs memory there for the examples evaluated."""
        key = stable_hash(spec)
        if key not in self._data:
            self._data[key] = load_data(spec)
        return self._data[key]

    def base_model(self, model_spec: dict[str, Any]) -> tuple[nn.Module, str]:
        """The model a spec names, loaded once, and the digest of its content (weights, file bytes)."""
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
        key = stable_hash([model_spec, defense_spec, seed])
        if key not in self._models:
            model = apply_defense(self.base_model(model_spec)[0], defense_spec, seed=seed).to(self.device).eval()
            if self.channels_last:  # NHWC weights; a 4-D input follows them through the convolutions
                model = model.to(memory_format=torch.channels_last)
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
        return Autocast(model, self.device.type) if self.amp else model

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
                per_draw = [checked_logits(deployed, x, name) for _ in each_draw(job, randomized)]
                draws = torch.stack([lg.argmax(dim=1) for lg in per_draw])
                self._clean[key] = CleanPass(draws[0], per_draw[0].argmin(dim=1), int(per_draw[0].shape[1]), draws)
        return self._clean[key]

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
        per_input = int(job.attack["adaptive"].get("eot_samples", 1)) if job.attack.get("adaptive") else 1
        n = threads.choose(self._flops[key], len(job.indices) * per_input, self.available_threads)
        self.thread_choices[f"{job.model['name']} / {job.defense['name']} / {len(job.indices)} examples"] = n
        return n

    def check_content(self, job: Job) -> None:
        """Raise when the model or examples this worker sees are not what the driver planned (a
        cluster node with another file at the same path, other weights, another data copy)."""
        if not job.content:
            return
        seen = self.content(job.data, job.model, job.indices)
        if job.fit_data is not None:  # a universal job's fit set, by content too
            seen = {**seen, "fit": self.content(job.fit_data, job.model, tuple(job.fit["indices"]))["data"]}  # type: ignore[index]
        for what in ("model", "data", "fit"):
            if what in job.content and seen.get(what) != job.content[what]:
                thing = {"model": f"model {job.model['name']!r}", "data": f"the examples of shard {job.shard}",
                         "fit": "the examples its universal perturbation is fit on"}[what]
                raise ContentMismatchError(
                    f"this worker sees {thing} with content digest {seen[what]}, but the run was planned on "
                    f"{job.content[what]}: every worker must load the same files and data as the driver")

    # ------------------------------------------------------------------ running
    def run(self, job: Job) -> JobRecord:
        """Run one job (with the thread count :meth:`job_threads` picks) into its record."""
        data = self.data(job.data)
        deployed = self.model(job.model, job.defense, job.base_seed)
        first = job.indices[0]
        with num_threads(self.job_threads(job, deployed, data.x[first : first + 1].to(self.device))):
            ctx = self.context(job)
            start = time.perf_counter()  # the attack's time only: loading and training are not the attack's
            todo = self.select(job, ctx)
            outcome = self.attack(job, ctx, todo)
            if ctx.randomized is not None:
                self.score_draws(job, ctx, todo, outcome)
            if job.indicators and job.probe_kind == "large_eps":
                self.probe_readings(job, ctx, outcome)
            spent = time.perf_counter() - start - outcome.extra_seconds
            return record(job, ctx, todo, outcome, spent if outcome.seconds is None else outcome.seconds)

    def context(self, job: Job) -> Context:
        """The job's examples (moved to the device), models, attack, clean pass and targets."""
        data = self.data(job.data)
        deployed = self.model(job.model, job.defense, job.base_seed)
        defended = find_defended(deployed)
        randomized = defended if defended is not None and defended.randomized else None
        idx = torch.tensor(job.indices, dtype=torch.long)
        x, y = data.x[idx].to(self.device), data.y[idx].to(self.device)
        threat = ThreatModel.from_dict(job.threat)
        key = stable_hash([job.attack["name"], job.attack["params"]])
        if key not in self._attacks:  # attacks are stateless configs: one serves every job of its spec
            self._attacks[key] = ATTACKS.create(job.attack["name"], **job.attack["params"])
        attack = self._attacks[key]
        clean = self.clean_pass(job, deployed, randomized, x)  # also checks the model returns logits
        fit = None
        if job.fit_data is not None:
            pool = self.data(job.fit_data)
            at = torch.tensor(job.fit["indices"], dtype=torch.long)  # type: ignore[index]
            fit = (pool.x[at].to(self.device), pool.y[at].to(self.device))
        return Context(x, y, deployed, randomized, threat, attack, clean, job_targets(job, threat, clean, y),
                       fit, job_corners(job, threat, x), self.feed_pass(job, threat, deployed, x, y))

    def feed_pass(self, job: Job, threat: ThreatModel, deployed: nn.Module, x: torch.Tensor,
                  y: torch.Tensor) -> torch.Tensor | None:
        """Under a physical feed, the deployed model's prediction on each draw of the transformed
        clean inputs (the same seeded draws the audit uses), once per shard and feed."""
        if threat.physical is None:
            return None
        key = stable_hash(["feed", job.model, job.defense, job.base_seed, job.content, stable_hash(job.indices),
                           threat.physical.to_dict(), threat.bounds])
        if key not in self._clean_feed:
            self._clean_feed[key] = physical_draws(deployed, x, x, y, threat, None)[0]
        return self._clean_feed[key]

    def select(self, job: Job, ctx: Context) -> torch.Tensor:
        """The examples the attack gets: clean-correct and, targeted, not already of the target
        class (no attack can be pursued toward it: they stay robust unless another attack breaks
        them); in cascade mode only the points earlier attacks left robust. A minimal-perturbation
        attack searches every such point in every mode, so its distances mean the same. Under a
        universal threat model every example carries the one perturbation (its fooling rate is
        over all of them), in every mode."""
        if ctx.threat.scope is Scope.UNIVERSAL:
            return torch.ones(len(job.indices), dtype=torch.bool, device=self.device)
        todo = ctx.clean.correct(ctx.y) & targetable(ctx.y, ctx.target)
        if self.robust_lookup is None:
            return todo
        if job.after and not job.minimal:
            return still_robust(todo, ~self._robust(job, job.after))
        if job.sweep_after:  # a suite's minimal component: the points still robust at some eps of its sweep
            robust_somewhere = torch.zeros_like(todo)
            for after in job.sweep_after:
                robust_somewhere |= self._robust(job, after) if after else torch.ones_like(todo)
            return still_robust(todo, ~robust_somewhere)
        return todo

    def _robust(self, job: Job, after: tuple[str, ...]) -> torch.Tensor:
        """Per example of the job: no job of ``after`` broke it."""
        still = self.robust_lookup(after)  # type: ignore[misc]
        return torch.tensor([still.get(int(i), True) for i in job.indices], device=self.device)

    def attack(self, job: Job, ctx: Context, todo: torch.Tensor) -> Outcome:
        """Run the attack on the selected examples; its audit judges them on the deployed model."""
        n = len(job.indices)
        out = Outcome(
            pred_adv=ctx.clean.pred.clone(),
            valid=torch.ones(n, dtype=torch.bool, device=self.device),
            success=torch.zeros(n, dtype=torch.bool, device=self.device),
            distance=torch.full((n,), float("nan"), device=self.device),
            min_distance=torch.full((n,), float("nan"), device=self.device),
            x_adv=ctx.x.clone(),
        )
        if not bool(todo.any()):
            if self.traced(job, ctx):  # nothing attacked: nothing on a path (and nothing to rerun for)
                out.measured = {"kind": "path", "attacked": 0}
            return out
        sel = todo.nonzero().squeeze(1)
        if ctx.randomized is not None:
            ctx.randomized.reseed(job.seed)
        target = None if ctx.target is None else ctx.target[sel]
        generator = torch.Generator(device="cpu").manual_seed(job.seed)
        traces: list[PathSummary] | None = [] if self.traced(job, ctx) else None
        result, out.seconds = self._run_attack(job, ctx, ctx.x[sel], ctx.y[sel], target, sel, generator, traces)
        out.pred_adv[sel] = result.pred_adv
        out.valid[sel] = result.valid
        out.success[sel] = result.success
        out.distance[sel] = result.distances.to(out.distance.dtype)
        out.x_adv[sel] = result.x_adv
        if result.minimal_distances is not None:
            out.min_distance[sel] = result.minimal_distances.to(out.min_distance.dtype)
        out.universal = result.universal
        if result.physical_draws is not None:  # each draw of the physical feed, kept like a randomized model's
            out.pred_adv_draws = ctx.clean.pred.repeat(result.physical_draws.shape[1], 1)
            out.pred_adv_draws[:, sel] = result.physical_draws.T.to(out.pred_adv_draws.dtype)
        out.n_forward, out.n_backward, out.n_queries = result.n_forward, result.n_backward, result.n_queries
        out.quantization_failures = result.quantization_failures
        if traces is not None:
            start = time.perf_counter()
            out.measured = self.path_readings(job, ctx, sel, result, target, traces)
            out.extra_seconds = time.perf_counter() - start
        return out

    # ------------------------------------------------------------------ evaluation-failure indicators
    @staticmethod
    def traced(job: Job, ctx: Context) -> bool:
        """Whether the job records its attack's path: an iterative attack's job with indicators."""
        return job.indicators and not job.probe and not job.minimal and ctx.attack.kind == "iterative"

    def path_readings(self, job: Job, ctx: Context, sel: torch.Tensor, result: AttackResult,
                      target: torch.Tensor | None, traces: list[PathSummary]) -> dict[str, Any]:
        """The path's readings (:func:`~advbench.eval.indicators.path_reading`, its iterates audited
        on the deployed model) and, on the shard's first ``job.more_examples`` examples, the attack
        rerun with a doubled budget. A randomized model restarts from the job's seed for each, after
        the attack and before the scoring draws (which restart it themselves)."""
        x, y = ctx.x[sel], ctx.y[sel]
        if ctx.randomized is not None:
            ctx.randomized.reseed(job.seed)
        idx = [job.indices[i] for i in sel.tolist()]
        measured = path_reading(PathSummary.join(traces), result, ctx.deployed, x, y, ctx.threat, target, idx)
        measured["randomized"] = ctx.randomized is not None
        params = None
        if job.more_examples > 0 and not job.attack.get("suite"):
            params = doubled_params(job.attack["name"], job.attack["params"], ctx.threat)
        if params is None:
            return measured
        n = min(job.more_examples, len(job.indices))
        correct = ctx.clean.correct(ctx.y)[:n]
        broken_main = torch.zeros(len(job.indices), dtype=torch.bool, device=self.device)
        broken_main[sel] = broken(result, y)
        broken_more = broken_main.clone()
        first = (sel < n).nonzero().squeeze(1)  # positions in sel of the shard's first n examples
        if first.numel():
            key = stable_hash([job.attack["name"], params])
            if key not in self._attacks:
                self._attacks[key] = ATTACKS.create(job.attack["name"], **params)
            if ctx.randomized is not None:
                ctx.randomized.reseed(job.seed)
            rerun = dataclasses.replace(ctx, attack=self._attacks[key])
            t = None if target is None else target[first]
            more = self._attack_fitting(job, rerun, self.view(job), x[first], y[first], t,
                                        torch.Generator(device="cpu").manual_seed(job.seed))
            broken_more[sel[first]] = broken(more, y[first])
        measured["more_iterations"] = {
            "n": n, "attacked": int(first.numel()),
            "robust": int((correct & ~broken_main[:n]).sum()), "robust_more": int((correct & ~broken_more[:n]).sum()),
            "params": {k: v for k, v in params.items() if job.attack["params"].get(k) != v}}
        return measured

    def probe_readings(self, job: Job, ctx: Context, out: Outcome) -> None:
        """A large-eps probe's extra readings: the data's class count (chance) and the stability of
        the predictions of the model its attack was handed (:func:`~advbench.eval.indicators.stability_reading`)
        on its first ``NOISE_EXAMPLES`` examples, a randomized model restarted from the job's seed."""
        start = time.perf_counter()
        if ctx.randomized is not None:
            ctx.randomized.reseed(job.seed)
        generator = torch.Generator(device="cpu").manual_seed(job.seed)
        stability = stability_reading(self.view(job), ctx.x[:NOISE_EXAMPLES], ctx.threat.bounds, generator)
        out.measured = {"kind": "large_eps", "classes": int(self.data(job.data).num_classes), "stability": stability}
        out.extra_seconds += time.perf_counter() - start

    def score_draws(self, job: Job, ctx: Context, todo: torch.Tensor, out: Outcome) -> None:
        """A randomized model's scoring over its draws: the audited images (their validity known
        from the one audit) predicted in every draw; an example is broken in the draws where the
        prediction meets the goal."""
        draws = []
        for _ in each_draw(job, ctx.randomized):  # type: ignore[arg-type]
            draws.append(predict(ctx.deployed, out.x_adv))
        out.pred_adv_draws = torch.stack(draws)
        hit = torch.stack([goal_met(p, ctx.y, ctx.target) for p in draws]).any(dim=0)
        out.success = hit & todo & out.valid
        out.pred_adv = out.pred_adv_draws[0]

    def _run_attack(
        self, job: Job, ctx: Context, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None,
        sel: torch.Tensor, generator: torch.Generator, traces: list[PathSummary] | None = None,
    ) -> tuple[AttackResult, float | None]:
        """Run the attack, or re-audit the run a minimal-perturbation job shares with its other
        eps. Returns the result and, when reused, the seconds the shared run took. On a randomized
        model every eps (the first too) re-audits the shared run from the job's seed, so the
        result does not depend on which eps ran first. ``traces`` collects the path of a
        non-minimal attack (:mod:`advbench.attacks.trace`)."""
        view = self.view(job)
        corners = None if ctx.corners is None else ctx.corners[sel]
        if not job.minimal:
            return self._attack_fitting(job, ctx, view, x, y, target, generator, traces, corners), None
        key = (job.sweep_key, sel.cpu().numpy().tobytes())
        reused: float | None = None
        if self._sweep is not None and self._sweep[0] == key:
            reused = self._sweep[2]
        else:
            start = time.perf_counter()
            result = self._attack_fitting(job, ctx, view, x, y, target, generator)
            self._sweep = (key, result, time.perf_counter() - start)
            if ctx.randomized is None:
                return result, None
        if ctx.randomized is not None:
            ctx.randomized.reseed(job.seed)
        return ctx.attack.at_budget(ctx.deployed, x, y, ctx.threat, self._sweep[1]), reused

    def _attack_fitting(self, job: Job, ctx: Context, view: nn.Module, x: torch.Tensor, y: torch.Tensor,
                        target: torch.Tensor | None, generator: torch.Generator,
                        traces: list[PathSummary] | None = None, corners: torch.Tensor | None = None) -> AttackResult:
        """The attack on ``x`` (each example's region at ``corners``); out of device memory, on
        halves of it in turn (recursively), the results joined in order. One example that does not
        fit is an error, not a number; so is a universal attack that does not fit (its halves
        would fit two perturbations). With ``traces`` each piece's path is recorded and appended."""
        kwargs: dict[str, Any] = {"target": target, "generator": generator, "judge": ctx.deployed,
                                  "fit": ctx.fit, "corners": corners}
        try:
            if traces is None:
                return ctx.attack(view, x, y, ctx.threat, **kwargs)
            with PathRecorder(x, y, target) as recorder:
                result = ctx.attack(view, x, y, ctx.threat, **kwargs)
            traces.append(recorder.summary())
            return result
        except torch.OutOfMemoryError:
            if len(x) <= 1 or ctx.threat.scope is Scope.UNIVERSAL:
                what = "its universal perturbation" if len(x) > 1 else "a single example"
                raise OutOfMemory(f"model {job.model['name']!r}: attack {job.attack_label!r} runs out of device "
                                  f"memory on {what}; use a larger device or a smaller model "
                                  f"(or, universal, a smaller fit n)") from None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        half = (len(x) + 1) // 2
        self.oom_events.append({"job": job.key, "model": job.model["name"], "attack": job.attack_label,
                                "examples": len(x), "batch": half})
        parts = [self._attack_fitting(job, ctx, view, x[s : s + half], y[s : s + half],
                                      None if target is None else target[s : s + half], generator, traces,
                                      None if corners is None else corners[s : s + half])
                 for s in range(0, len(x), half)]
        return join_results(parts)


#: the name of a universal job's perturbation among its kept arrays (written to its own file)
UNIVERSAL_KEY = "universal"


class ContentMismatchError(AdvbenchError):
    """A worker loaded other model weights or examples than those the run was planned on."""


class OutOfMemory(AdvbenchError):
    """An attack does not fit in device memory even on one example."""


def join_results(parts: list[AttackResult]) -> AttackResult:
    """The results of an attack run on consecutive pieces of a batch, as one result."""
    first = parts[0]

    def cat(name: str) -> torch.Tensor | None:
        values = [getattr(p, name) for p in parts]
        return None if values[0] is None else torch.cat(values)

    return dataclasses.replace(
        first,
        **{name: cat(name) for name in ("x_adv", "success", "valid", "pred_clean", "pred_adv", "distances",
                                        "target", "x_minimal", "minimal_distances", "corners", "ssim",
                                        "physical_share", "physical_draws")},
        **{name: sum(getattr(p, name) for p in parts)
           for name in ("n_forward", "n_backward", "n_queries", "quantization_failures")},
        budget_exhausted=any(p.budget_exhausted for p in parts),
    )


def record(job: Job, ctx: Context, todo: torch.Tensor, out: Outcome, seconds: float) -> JobRecord:
    """The job's record: per-example rows, the audited images (when kept), costs and identity."""
    pos = list(job.indices)
    target = torch.full_like(ctx.y, -1) if ctx.target is None else ctx.target
    cols = {k: v.cpu().numpy() for k, v in dict(
        label=ctx.y, pred_clean=ctx.clean.pred, pred_adv=out.pred_adv, attacked=todo, valid=out.valid,
        success=out.success, distance=out.distance, min_distance=out.min_distance, target=target).items()}
    clean_draws = ctx.clean.draws
    if clean_draws is None and out.pred_adv_draws is not None:  # a physical feed: the clean input, untransformed
        clean_draws = ctx.clean.pred.repeat(out.pred_adv_draws.shape[0], 1)
    draws = {k: None if v is None else [",".join(str(int(p)) for p in col) for col in v.T.cpu().numpy()]
             for k, v in (("pred_clean_draws", clean_draws), ("pred_adv_draws", out.pred_adv_draws),
                          (FEED_COLUMN, None if ctx.feed is None else ctx.feed.T))}
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
        for i in range(len(pos))
    ]
    adversarial = None
    if job.save_adversarial:  # the audited images only; the clean ones live in the data set (once)
        adversarial = {"idx": np.asarray(pos, dtype=np.int64), "x_adv": out.x_adv.cpu().numpy(), "y": cols["label"],
                       "pred_clean": cols["pred_clean"], "pred_adv": cols["pred_adv"]}
        if out.universal is not None:  # the one perturbation every example carries (not a row per example)
            adversarial[UNIVERSAL_KEY] = out.universal.cpu().numpy()
    return JobRecord(
        job_key=job.key,
        model=job.model["name"],
        defense=job.defense["name"],
        threat=job.threat,
        attack=job.attack_label,
        attack_params=job.attack["params"],
        shard=job.shard,
        seconds=seconds,
        n_forward=out.n_forward,
        n_backward=out.n_backward,
        n_queries=out.n_queries,
        violations=int((todo & ~out.valid).sum()),
        quantization_failures=out.quantization_failures,
        seed=job.seed,
        examples=examples,
        adversarial=adversarial,
        attack_name=job.attack["name"],
        attack_kind=ctx.attack.kind,
        view=job.view,
        minimal=job.minimal,
        probe=job.probe,
        suite=job.attack.get("suite"),
        suite_cascade=bool(job.attack.get("suite_cascade")),
        measured=out.measured,
    )


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


def job_corners(job: Job, threat: ThreatModel, x: torch.Tensor) -> torch.Tensor | None:
    """Each example's region corner under a region located ``fixed`` or ``random`` (None else).
    A random one is drawn per example from the run seed and the example's index (not from the
    attack's generator), so every attack and eps meets the same square: the worst case over
    attacks is one for one placement per example, as random targets are."""
    region = threat.region
    if region is None or region.location == "any" or x.dim() != 4:
        return None
    if region.location == "fixed":
        return region_corners(threat, x.shape[0], x.shape[2], x.shape[3], device=x.device)
    drawn = [region_corners(threat, 1, x.shape[2], x.shape[3],
                            torch.Generator().manual_seed(int(stable_hash({"seed": job.base_seed, "corner": i}, 15), 16)))
             for i in job.indices]
    return torch.cat(drawn).to(x.device)  # type: ignore[arg-type]


def examples_digest(data: ImageData, indices: tuple[int, ...]) -> str:
    """SHA-256 (20 hex digits) of the images and labels at ``indices``: a job's examples by content."""
    idx = torch.as_tensor(indices, dtype=torch.long)
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(data.x[idx].cpu().numpy()).tobytes())
    h.update(np.ascontiguousarray(data.y[idx].cpu().numpy().astype(np.int64)).tobytes())
    return h.hexdigest()[:20]


def each_draw(job: Job, defended: DefendedModel) -> Iterator[int]:
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

