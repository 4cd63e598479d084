"""Projected gradient descent (Madry et al. 2018), linf and l2, with random restarts."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import model_validator

from advbench.access import Handle
from advbench.attacks import trace
from advbench.attacks.base import GradientAttack, white_box
from advbench.tensors import rand_like, randn_like, rows
from advbench.attacks.losses import ascend_l2, ascend_linf, linf_box, objective, per_example_objective
from advbench.audit import goal_met
from advbench import params
from advbench.registry import ATTACKS
from advbench.threat import Norm, Targeting, ThreatModel


@ATTACKS.register("pgd", description="Projected gradient descent with random restarts (Madry et al. 2018); linf, l2")
class PGD(GradientAttack):
    """Projected gradient descent (Madry, Makelov, Schmidt, Tsipras & Vladu, ICLR 2018).

    x^{t+1} = Proj_{x+S}( x^t + alpha * s(grad_x L(x^t)) ), S the eps-ball intersected with the
    bounds; s = sign for linf, s(g) = g / ||g||_2 per example for l2. L is the cross-entropy
    (``loss="ce"``: J(x, y), or -J(x, t) targeted) or the Carlini-Wagner margin on logits
    (``loss="margin"``: max_{i!=y} z_i - z_y, or z_t - max_{i!=t} z_i targeted), ascended.

    ``random_start`` draws x^0 uniformly from the ball (linf: per element; l2: a Gaussian
    direction with radius eps * u^(1/d)), then clips to the bounds. With ``restarts`` > 1 the
    attack reruns from new random starts on the examples not yet successful, keeping per
    example the first successful result, or else the one with the highest loss.
    ``step_size`` defaults to 2.5 * eps / steps.
    """

    norms: ClassVar[frozenset[Norm]] = frozenset({Norm.LINF, Norm.L2})
    targeting: ClassVar[frozenset[Targeting]] = frozenset(Targeting)
    kind: ClassVar[str] = "iterative"

    class Params(params.Params):
        steps: params.Count = 40
        step_size: params.PositiveNumber | None = None  # None: 2.5 * eps / steps
        random_start: params.Flag = True
        restarts: params.Count = 1
        loss: Literal["ce", "margin"] = "ce"

        @model_validator(mode="after")
        def _restarts_need_random_starts(self) -> PGD.Params:
            if self.restarts > 1 and not self.random_start:
                raise ValueError("restarts > 1 needs random_start=True (every restart would repeat the first)")
            return self

    @property
    def randomized(self) -> bool:
        """Whether the output depends on the generator (beyond randomly drawn targets)."""
        return self.random_start

    def _step_size(self, threat: ThreatModel) -> float:
        return self.step_size if self.step_size is not None else 2.5 * threat.eps / self.steps

    def _start(self, x: torch.Tensor, threat: ThreatModel, generator: torch.Generator | None) -> torch.Tensor:
        if not self.random_start:
            return x
        if threat.norm is Norm.LINF:
            noise = rand_like(x, generator).mul_(2).sub_(1).mul_(threat.eps)
        else:
            direction = randn_like(x, generator)
            u = rand_like(x.new_empty(x.shape[0]), generator)
            d = x[0].numel()
            norm = direction.reshape(x.shape[0], -1).norm(p=2, dim=1).clamp_min(1e-12)
            radius = threat.eps * u.pow(1.0 / d)
            noise = direction.mul_((radius / norm).view(-1, *([1] * (x.dim() - 1))))
        return threat.project(x + noise, x)

    def _once(
        self,
        model: torch.nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        threat: ThreatModel,
        target: torch.Tensor | None,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        start = self._start(x, threat, generator)
        step_size = self._step_size(threat)
        fn = objective(self.loss, y, target)
        if threat.norm is Norm.LINF:
            lower, upper = linf_box(x, threat.eps, threat.bounds)
            return ascend_linf(model, start, lower, upper, step_size, self.steps, fn)
        return ascend_l2(model, x, start, threat.eps, threat.bounds, step_size, self.steps, fn)

    def _run(
        self,
        model: Handle,
        x: torch.Tensor,
        y: torch.Tensor,
        threat: ThreatModel,
        target: torch.Tensor | None,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        net = white_box(model)
        if self.restarts == 1:
            return self._once(net, x, y, threat, target, generator)
        best = x.clone()
        best_loss = torch.full((x.shape[0],), float("-inf"), device=x.device)
        done = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        idx = torch.arange(x.shape[0], device=x.device)
        for r in range(self.restarts):  # one host synchronisation per restart, none per step
            if r > 0:
                idx = (~done).nonzero().squeeze(1)  # later restarts: only the examples still failing
                if idx.numel() == 0:
                    break
            t = None if target is None else target[idx]
            with trace.rows_of(idx):  # a path recorder follows the restart's rows
                x_r = self._once(net, x[idx], y[idx], threat, t, generator)
            with torch.no_grad():
                logits = net(x_r)
                loss = per_example_objective(self.loss, logits, y[idx], t).float()
                success = goal_met(logits.argmax(dim=1), y[idx], t)
                if threat.quantize == "8bit":  # succeed as the audit will judge it: after rounding too
                    success &= goal_met(net(threat.quantized(x_r, x[idx])).argmax(dim=1), y[idx], t)
                take = success | (loss > best_loss[idx])
                best[idx] = torch.where(rows(take, x_r), x_r, best[idx])  # a mask: no sync
                best_loss[idx] = torch.where(take, loss, best_loss[idx])
                done[idx] = success
        return best
