"""The attack interface: a stateless config whose final ``__call__`` validates, runs and audits.

Subclasses set the class attributes ``norms``, ``targeting`` and ``knowledge`` (what they
support), take their hyperparameters as keyword-only constructor arguments and implement
``_run``. ``Attack.__call__`` then

1. checks the threat model against what the attack supports and validates the inputs;
2. resolves the targets of a targeted threat model (fixed, random from the generator, or the
   least-likely class of the clean prediction);
3. hands ``_run`` the model handle the attacker's knowledge allows (white-box logits, a
   probability oracle, a label oracle, or for a transfer attacker no access at all, see
   :mod:`advbench.access`), with parameter gradients off and the model in eval mode;
4. audits the output (:mod:`advbench.audit`): success is recomputed from the model's own
   predictions and examples outside the threat model count as failures, never as successes.
   The result's ``x_adv`` is the image that counts (the clean input where the output was
   rejected), so whatever uses it afterwards (a transfer or destruction table) sees audited
   examples only.

*Minimal-perturbation* attacks (``minimal = True``: Carlini-Wagner, DeepFool, L-BFGS) search
for the smallest adversarial example whatever the budget. Their ``_run`` returns, per example,
the smallest adversarial example it found (or ``x`` where it found none) and ignores ``eps``.
The base class audits that output without the eps-ball (finite, in bounds, goal met) to get
each example's minimal distance (``inf`` where none was found), then counts it under the threat
model only where that distance is within ``eps``; elsewhere the clean input counts (the attack
failed within the budget). :meth:`Attack.at_budget` re-derives the result at another ``eps``
without rerunning the attack, so one run serves a whole eps sweep.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, final

import torch
from torch import nn

from advbench.access import Handle, WhiteBoxModel, handle_for
from advbench.audit import AuditReport, apply_universal, audit, goal_met, region_corners
from advbench.errors import ConfigError, ModelOutputError, QueryBudgetExceeded, UnsupportedThreatError
from advbench.params import Configurable
from advbench.tensors import frozen, rows
from advbench.threat import Knowledge, Norm, Scope, Targeting, ThreatModel


@dataclass(frozen=True)
class AttackResult:
    """What an attack produced, audited. All tensors have the batch as first dimension."""

    #: the image that counts, per example: the attack's output where it passed the audit (its
    #: 8-bit rounding under ``quantize: 8bit``), the clean input where it did not
    x_adv: torch.Tensor
    success: torch.Tensor  # bool: valid and the goal is met by the model's own prediction
    valid: torch.Tensor  # bool: the attack's output passed the threat-model audit
    pred_clean: torch.Tensor
    pred_adv: torch.Tensor  # the model's prediction on x_adv
    distances: torch.Tensor  # of x_adv, in the threat model's norm (0 where the output was rejected)
    target: torch.Tensor | None
    n_forward: int
    n_backward: int
    n_queries: int
    quantization_failures: int
    attack: str
    params: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    budget_exhausted: bool = False
    #: minimal-perturbation attacks only: the smallest adversarial example found per example
    #: (``x`` where none was found), whatever the budget
    x_minimal: torch.Tensor | None = None
    #: minimal-perturbation attacks only: its distance where it is audited adversarial
    #: (finite, in bounds, goal met), ``inf`` where the attack found nothing
    minimal_distances: torch.Tensor | None = None
    #: under a region located fixed or random: each example's square corner (N, 2), (row, col)
    corners: torch.Tensor | None = None
    #: under a universal threat model: the shared perturbation (or patch) every example carries
    universal: torch.Tensor | None = None
    #: under a perceptual bound: each example's SSIM to its clean input
    ssim: torch.Tensor | None = None
    #: under a physical feed: per example, the share of the transformation's draws that stay adversarial
    physical_share: torch.Tensor | None = None
    #: under a physical feed: (N, draws) the model's prediction on each draw of the transformation
    physical_draws: torch.Tensor | None = None

    @property
    def n_violations(self) -> int:
        return int((~self.valid).sum())

    @property
    def success_rate(self) -> float:
        return float(self.success.float().mean()) if self.success.numel() else 0.0

    @property
    def fooling_rate(self) -> float:
        """The share of examples whose prediction the (audited) perturbation changes, whatever
        the label (Moosavi-Dezfooli et al.'s measure for universal perturbations)."""
        return float((self.valid & (self.pred_adv != self.pred_clean)).float().mean()) if self.valid.numel() else 0.0


def _describe(values: frozenset[Any]) -> str:
    return ", ".join(sorted(v.value for v in values))


class Attack(Configurable, ABC):
    """Base class of every attack. Hyperparameters are declared once, in a nested ``Params`` class
    (:mod:`advbench.params`), and given as keyword arguments to the constructor."""

    plugin_kind: ClassVar[str] = "attack"

    name: ClassVar[str] = "attack"
    #: whether the output depends on the generator (beyond randomly drawn targets); None: unknown
    randomized: ClassVar[bool | None] = None
    norms: ClassVar[frozenset[Norm]] = frozenset()
    targeting: ClassVar[frozenset[Targeting]] = frozenset({Targeting.UNTARGETED})
    knowledge: ClassVar[frozenset[Knowledge]] = frozenset({Knowledge.WHITE_BOX})
    #: searches for the smallest adversarial example, ignoring eps (see the module docstring)
    minimal: ClassVar[bool] = False
    #: the perturbation scopes it produces: per example (``_run``) and/or universal (``_fit``)
    scopes: ClassVar[frozenset[Scope]] = frozenset({Scope.INDIVIDUAL})
    #: whether it honours a region (changes only inside each example's square: ``_run_in_region``)
    regions: ClassVar[bool] = False
    #: the threat models it is made for, in words, when :meth:`made_for` asks more than its
    #: scopes and regions say (the error for a config entry that meets none of them)
    made_for_text: ClassVar[str] = ""
    #: what kind of attack it is, for the gradient-masking checks (:mod:`advbench.eval.masking`):
    #: ``single_step``, ``iterative`` (an iterative ascent of the same goal), ``minimal``,
    #: ``score_based``, ``decision_based``, ``transfer`` or ``other``
    kind: ClassVar[str] = "other"

    # ------------------------------------------------------------------ config
    def supports(self, threat: ThreatModel) -> str | None:
        """None when the attack can run under ``threat``, else the reason it cannot."""
        if threat.norm not in self.norms:
            return f"attack {self.name!r} does not support norm {threat.norm.value!r}; allowed: {_describe(self.norms)}"
        if threat.targeting not in self.targeting:
            return (
                f"attack {self.name!r} does not support targeting {threat.targeting.value!r}; "
                f"allowed: {_describe(self.targeting)}"
            )
        if threat.scope not in self.scopes:
            return (f"attack {self.name!r} does not produce {threat.scope.value} perturbations; allowed: "
                    f"{_describe(self.scopes)} (universal: uap, patch)")
        if threat.region is not None and not self.regions:
            return (f"attack {self.name!r} cannot keep its change inside a region; attacks that can: patch "
                    "(and any registered with regions = True)")
        if threat.knowledge not in self.knowledge:
            return (
                f"attack {self.name!r} needs knowledge {_describe(self.knowledge)}, "
                f"but the threat model grants {threat.knowledge.value!r}"
            )
        return None

    def made_for(self, threat: ThreatModel) -> bool:
        """Whether ``threat``'s axes beyond the Lp ball are ones this attack is made for (its
        scope, and a region only if it honours one): a config routes each attack entry to these
        threats only, so a universal attack and a per-example one can share a config. Norm,
        targeting and knowledge are not routed: an entry meeting a threat it cannot run is an error."""
        return threat.scope in self.scopes and (threat.region is None or self.regions)

    def check_threat(self, threat: ThreatModel) -> None:
        reason = self.supports(threat)
        if reason:
            raise UnsupportedThreatError(reason)

    # ------------------------------------------------------------------ running
    @final
    def __call__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        threat: ThreatModel,
        *,
        target: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        judge: nn.Module | None = None,
        fit: tuple[torch.Tensor, torch.Tensor] | None = None,
        corners: torch.Tensor | None = None,
    ) -> AttackResult:
        """Attack ``model`` at inputs ``x`` with labels ``y`` under ``threat``; see the module docstring.

        ``judge`` is the model the output is audited and scored on (default: ``model``): an
        evaluator hands the attacker an adaptive view of a defended model and judges on the
        deployed one. Under a universal threat model the perturbation is fitted on ``fit``
        (images, labels: a training split, held out from ``x``; default ``x`` itself, in-sample)
        and applied to ``x``. Under a region located fixed or random, ``corners`` (N, 2) places
        each example's square (default: the fixed corner, or drawn from ``generator``)."""
        self.check_threat(threat)
        judge = model if judge is None else judge
        _validate_inputs(x, y, threat)
        if threat.region is not None and x.dim() != 4:
            raise ConfigError(f"a region threat model needs NCHW images, got shape {tuple(x.shape)}")
        if threat.region is not None:
            threat.region.check_fits(x.shape[2], x.shape[3])
            if corners is None:
                corners = region_corners(threat, x.shape[0], x.shape[2], x.shape[3], generator, x.device)
        if threat.scope is Scope.UNIVERSAL:
            fit = (x, y) if fit is None else fit
            _validate_inputs(fit[0], fit[1], threat)
            if fit[0].shape[1:] != x.shape[1:]:
                raise ConfigError(f"the fit set's images are {tuple(fit[0].shape[1:])}, the attacked ones "
                                  f"{tuple(x.shape[1:])}: a universal perturbation needs one shape")
        with frozen(model):
            clean_logits = _checked_logits(model, x)
            pred_clean = clean_logits.argmax(dim=1)
            if threat.targeting is Targeting.UNTARGETED:
                if target is not None:
                    raise ConfigError("a target was given for an untargeted threat model")
            elif target is None:
                target = threat.resolve_targets(clean_logits, y, generator)
            elif target.shape != y.shape:
                raise ConfigError(f"target must have shape {tuple(y.shape)}, got {tuple(target.shape)}")
            handle = handle_for(model, threat, x.shape[0])
            exhausted = False
            universal = None
            try:
                with torch.enable_grad():
                    if threat.scope is Scope.UNIVERSAL:
                        assert fit is not None
                        fit_handle = handle_for(model, threat, fit[0].shape[0])
                        universal = self._fit(fit_handle, fit[0], fit[1], threat, generator).detach()
                        handle.n_forward, handle.n_backward = fit_handle.n_forward, fit_handle.n_backward
                        x_adv = apply_universal(x, y, threat, universal, corners)
                    elif threat.region is not None:
                        x_adv = self._run_in_region(handle, x, y, threat, target, generator, corners)
                    else:
                        x_adv = self._run(handle, x, y, threat, target, generator)
            except QueryBudgetExceeded as stop:
                # keep what the attack found within the budget (it is audited like any output)
                best = stop.best
                x_adv = best if isinstance(best, torch.Tensor) and best.shape == x.shape else x.clone()
                exhausted = True
            if not isinstance(x_adv, torch.Tensor) or x_adv.shape != x.shape:
                raise ModelOutputError(
                    f"attack {self.name!r} returned {getattr(x_adv, 'shape', type(x_adv))}, expected shape {tuple(x.shape)}"
                )
            x_adv = x_adv.detach()
            queries = int(handle.queries.sum()) if hasattr(handle, "queries") else 0
            result = AttackResult(
                x_adv=x_adv,
                success=torch.zeros_like(y, dtype=torch.bool),  # filled in by the audit below
                valid=torch.zeros_like(y, dtype=torch.bool),
                pred_clean=pred_clean,
                pred_adv=pred_clean,
                distances=_distances(x_adv, x, threat),
                target=target,
                n_forward=handle.n_forward,
                n_backward=handle.n_backward,
                n_queries=queries,
                quantization_failures=0,
                attack=self.name,
                params=self.params(),
                seed=generator.initial_seed() if generator is not None else None,
                budget_exhausted=exhausted,
                corners=corners,
                universal=universal,
            )
            if self.minimal:
                return self._budgeted(judge, x, y, threat, result, x_adv)
            with frozen(judge):
                report = audit(judge, x, x_adv, y, threat, target, corners=corners, universal=universal)
        return _audited(result, report, x, threat)

    @final
    def at_budget(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
                  result: AttackResult) -> AttackResult:
        """A minimal-perturbation attack's ``result`` re-audited under ``threat`` (another eps of
        the same norm, targeting and knowledge) on ``model`` (the judge), without running the
        attack again. The counts (passes, queries) stay those of the run that produced ``result``."""
        if not self.minimal or result.x_minimal is None:
            raise ConfigError(f"attack {self.name!r} is not a minimal-perturbation attack; rerun it at each eps")
        self.check_threat(threat)
        _validate_inputs(x, y, threat)
        with frozen(model):
            return self._budgeted(model, x, y, threat, result, result.x_minimal)

    def _budgeted(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
                  result: AttackResult, x_minimal: torch.Tensor) -> AttackResult:
        """Audit ``x_minimal`` without the ball, then count it only where it lies within eps.

        The smallest example that counts is the audited one (its 8-bit rounding under
        ``quantize: 8bit``), so its distance is the distance of the image that is scored."""
        # where the clean input already meets the goal, it is the smallest example there is
        clean_hit = goal_met(result.pred_clean, y, result.target)
        x_minimal = torch.where(rows(clean_hit, x), x, x_minimal)
        anywhere = dataclasses.replace(threat, norm=Norm.UNBOUNDED, eps=math.inf)
        with frozen(model):
            found_report = audit(model, x, x_minimal, y, anywhere, result.target)
            found = found_report.success
            x_minimal = torch.where(rows(found, x), found_report.x_scored, x)  # nothing found: x
            dist = _distances(x_minimal, x, threat)
            minimal_distances = torch.where(found, dist, torch.full_like(dist, math.inf))
            within = found & threat.contains(x_minimal, x)
            x_adv = torch.where(rows(within, x), x_minimal, x)
            report = audit(model, x, x_adv, y, threat, result.target)
        return dataclasses.replace(_audited(result, report, x, threat), x_minimal=x_minimal,
                                   minimal_distances=minimal_distances)

    @abstractmethod
    def _run(
        self,
        model: Handle,
        x: torch.Tensor,
        y: torch.Tensor,
        threat: ThreatModel,
        target: torch.Tensor | None,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """Return adversarial inputs, shape of ``x``. ``target`` is None for untargeted threats."""

    def _run_in_region(self, model: Handle, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
                       target: torch.Tensor | None, generator: torch.Generator | None,
                       corners: torch.Tensor | None) -> torch.Tensor:
        """Adversarial inputs that change each example only inside its square (``corners`` (N, 2),
        or None where the threat lets the attacker place it); attacks with ``regions = True``."""
        raise UnsupportedThreatError(f"attack {self.name!r} cannot keep its change inside a region")

    def _fit(self, model: Handle, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
             generator: torch.Generator | None) -> torch.Tensor:
        """The universal perturbation fitted on ``x`` (see :func:`advbench.audit.apply_universal`
        for its shape); attacks whose ``scopes`` include universal."""
        raise UnsupportedThreatError(f"attack {self.name!r} does not produce universal perturbations")


class GradientAttack(Attack):
    """A white-box attack that follows the gradient of a loss on the logits."""

    knowledge: ClassVar[frozenset[Knowledge]] = frozenset({Knowledge.WHITE_BOX})


# ---------------------------------------------------------------------- helpers
def _validate_inputs(x: torch.Tensor, y: torch.Tensor, threat: ThreatModel) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ConfigError(f"inputs must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dim() < 2 or x.shape[0] == 0:
        raise ConfigError(f"inputs must be a non-empty batch (N, ...), got shape {tuple(x.shape)}")
    if not isinstance(y, torch.Tensor) or y.dtype not in (torch.int64, torch.int32) or y.shape != x.shape[:1]:
        raise ConfigError(f"labels must be an integer tensor of shape ({x.shape[0]},), got {getattr(y, 'shape', y)}")
    if not bool(torch.isfinite(x).all()):
        raise ConfigError("inputs contain NaN or infinite values")
    lo, hi = threat.bounds
    if bool(((x < lo) | (x > hi)).any()):
        raise ConfigError(
            f"inputs lie outside the threat model's bounds [{lo:g}, {hi:g}] "
            f"(min {float(x.min()):g}, max {float(x.max()):g}); normalize inside the model"
        )


@torch.no_grad()
def _checked_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0]:
        raise ModelOutputError(
            f"the model must return a batch of logits of shape (N, classes); got "
            f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__} for N={x.shape[0]}"
        )
    if not bool(torch.isfinite(out).all()):
        raise ModelOutputError("the model returned NaN or infinite logits")
    return out


def _audited(result: AttackResult, report: AuditReport, x: torch.Tensor, threat: ThreatModel) -> AttackResult:
    """``result`` with the audit's verdicts, and the image that counts as its ``x_adv``."""
    return dataclasses.replace(
        result,
        x_adv=report.x_scored,
        success=report.success,
        valid=report.valid,
        pred_adv=report.pred_adv,
        distances=_distances(report.x_scored, x, threat),
        quantization_failures=int(report.quantization_failures.sum()),
        ssim=report.ssim,
        physical_share=report.physical_share,
        physical_draws=report.physical_draws,
    )


def _distances(x_adv: torch.Tensor, x: torch.Tensor, threat: ThreatModel) -> torch.Tensor:
    d = threat.distance(torch.nan_to_num(x_adv), x)
    finite = x_adv.reshape(x_adv.shape[0], -1).isfinite().all(dim=1)
    return torch.where(finite, d, torch.full_like(d, float("nan")))


def white_box(model: Handle) -> WhiteBoxModel:
    if not isinstance(model, WhiteBoxModel):  # pragma: no cover - guarded by check_threat
        raise UnsupportedThreatError("a gradient attack needs white-box access")
    return model
