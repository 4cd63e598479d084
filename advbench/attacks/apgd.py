"""Auto-PGD (Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks", ICML 2020): PGD whose step size follows the loss's progress.

From a random start in the ball, each iteration takes a step of size eta along the gradient's
sign (linf), its direction (l2) or its largest coordinates (l1), projects, and mixes in momentum:

    z = P(x_k + eta grad),   x_{k+1} = P(x_k + alpha (z - x_k) + (1 - alpha)(x_k - x_{k-1}))

with alpha = ``momentum`` (0.75; 1 on the first step). eta starts at 2 eps (linf, l2; l1: eps).
At checkpoints p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06) (in fractions
of ``steps``) eta is halved, and the iterate restarts from the best point so far, where the
fraction of steps since the last checkpoint that raised the loss is at most ``rho`` (0.75), or
where the step was not halved at the last checkpoint and the best loss has not improved since.
The attack returns, per example, the last point it found that meets the goal, else the point of
highest loss; ``restarts`` reruns it from new random starts on the examples still failing.

Losses: ``ce``, the cross-entropy (under a targeted threat model, minus the cross-entropy toward
the target), and ``dlr``, the difference of logits ratio
-(z_y - max_{i!=y} z_i) / (z_pi1 - z_pi3), invariant to shifts and scalings of the logits (under a
targeted threat model the targeted DLR, -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)).

L1 (Croce & Hein, "Mind the box", 2021, as in the reference code): the step moves the ``topk``
share of the coordinates with the largest gradient, each by eta / k, the projection is the exact
one onto the ball intersected with the box (:func:`~advbench.threat.project_l1_box`), and at the
checkpoints (every 4% of ``steps``) the sparsity follows the best point's: where it fell by at
least 5% the step is reset to eps and the iterate restarts from the best point, else the step
shrinks by 1.5 (never below eps / 10). ``l1_eps_schedule`` runs 30%, 30% and 40% of the steps at
3, 2 and 1 eps, each starting where the last ended (the reference's ``use_largereps``, which
AutoAttack's standard L1 evaluation turns on).

``apgd-t`` (APGD-T) attacks an untargeted threat model through targets: for the ``targets``
most likely classes of the clean input other than the top one (9 by default), in order, the
targeted DLR loss toward that class on the examples still robust.

Where the reference code differs from the paper, it is followed: the oscillation count at the
first checkpoint compares the first step with the starting point (the reference compares it
with an unset, zero entry), and every random draw comes from the call's generator.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from advbench import params
from advbench.access import Handle
from advbench.attacks import trace
from advbench.attacks.base import GradientAttack, white_box
from advbench.audit import goal_met
from advbench.errors import ConfigError
from advbench.registry import ATTACKS
from advbench.tensors import rand_like, randn_like, rows
from advbench.threat import Norm, Targeting, ThreatModel, project_l1_box


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Untargeted difference of logits ratio, per example (higher: closer to misclassified)."""
    z, _ = logits.sort(dim=1)
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    top_is_y = logits.argmax(dim=1) == y
    other = torch.where(top_is_y, z[:, -2], z[:, -1])
    return -(z_y - other) / (z[:, -1] - z[:, -3] + 1e-12)


def dlr_targeted_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targeted difference of logits ratio toward ``target``, per example."""
    z, _ = logits.sort(dim=1)
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_t = logits.gather(1, target[:, None]).squeeze(1)
    return -(z_y - z_t) / (z[:, -1] - 0.5 * (z[:, -3] + z[:, -4]) + 1e-12)


def per_example_loss(name: str, logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    if name == "ce":
        return F.cross_entropy(logits, y, reduction="none") if target is None else \
            -F.cross_entropy(logits, target, reduction="none")
    return dlr_loss(logits, y) if target is None else dlr_targeted_loss(logits, y, target)


def checkpoints(steps: int) -> list[int]:
    """The iterations at which the step size may be halved: p_0 = 0, p_1 = 0.22,
    p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), as iteration counts (the reference's)."""
    first, least, shrink = max(int(0.22 * steps), 1), max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)
    out, k, at = [], first, 0
    while at + k <= steps:
        at += k
        out.append(at)
        k = max(k - shrink, least)
    return out


class APGD(GradientAttack):
    """Auto-PGD (module docstring); linf, l2 and l1; losses ``ce`` and ``dlr``."""

    norms: ClassVar[frozenset[Norm]] = frozenset({Norm.LINF, Norm.L2, Norm.L1})
    targeting: ClassVar[frozenset[Targeting]] = frozenset(Targeting)
    kind: ClassVar[str] = "iterative"
    randomized: ClassVar[bool | None] = True  # random starts

    class Params(params.Params):
        steps: params.Count = 100
        restarts: params.Count = 1
        loss: Literal["ce", "dlr"] = "ce"
        rho: params.UnitInterval = 0.75  # the share of loss-raising steps a checkpoint expects
        momentum: params.UnitInterval = 0.75  # alpha
        eot_iter: params.Count = 1  # gradients averaged per step (a randomized model's EoT)
        l1_eps_schedule: params.Flag = False  # l1: 3 eps, 2 eps, then eps (AutoAttack's standard L1)

    # ------------------------------------------------------------------ running
    def _run(self, model: Handle, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
             target: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
        net = white_box(model)
        check_classes(net, x, self.loss, target is not None)
        with torch.no_grad():
            done = goal_met(net(x).argmax(dim=1), y, target)  # the clean input already meets the goal
        out = x.clone()
        return self.restarted(net, x, y, threat, None if target is None else (lambda idx: target[idx]),
                              self.loss, generator, out, done, goal_target=target is not None)

    def restarted(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
                  target_of: Callable[[torch.Tensor], torch.Tensor] | None, loss: str,
                  generator: torch.Generator | None, out: torch.Tensor, done: torch.Tensor,
                  goal_target: bool) -> torch.Tensor:
        """``restarts`` runs, each on the examples not yet ``done``; updates ``out`` (per example
        the point that met the goal, else the last run's point of highest loss) and ``done`` in
        place. ``target_of(idx)`` gives the loss's target for the examples ``idx`` (None:
        untargeted loss); the goal is the target's class where ``goal_target``, else
        misclassification."""
        for _ in range(self.restarts):
            idx = (~done).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            t = None if target_of is None else target_of(idx)
            goal = t if goal_target else None
            with trace.rows_of(idx):  # a path recorder follows the restart's rows
                found, point = self.run_once(net, x[idx], y[idx], threat, t, goal, loss, generator)
            if threat.quantize == "8bit":  # as the audit will judge it: the 8-bit image too
                with torch.no_grad():
                    found &= goal_met(net(threat.quantized(point, x[idx])).argmax(dim=1), y[idx], goal)
            out[idx] = torch.where(rows(found | ~done[idx], point), point, out[idx])
            done[idx] |= found
        return out

    def run_once(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
                 target: torch.Tensor | None, goal: torch.Tensor | None, loss: str,
                 generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One APGD run from a random start: (met the goal, the point to return) per example.
        ``target`` is the loss's target (None: untargeted loss), ``goal`` the goal's (None:
        misclassification)."""
        loop = _Loop(self, net, x, y, threat, target, goal, loss)
        if threat.norm is not Norm.L1 or not self.l1_eps_schedule:
            return loop.run(self.steps, threat.eps, random_start(x, threat, threat.eps, generator), fresh=True)[:2]
        counts = [math.ceil(0.3 * self.steps), math.ceil(0.3 * self.steps)]
        counts.append(self.steps - sum(counts))
        start = random_start(x, threat, 3 * threat.eps, generator)
        result = (torch.zeros(len(x), dtype=torch.bool, device=x.device), x)
        for scale, n in zip((3.0, 2.0, 1.0), counts):
            if n < 1:
                continue
            eps = scale * threat.eps
            start = (x + project_l1_box(start - x, x, eps, threat.bounds)).clamp(*threat.bounds)
            found, point, start = loop.run(n, eps, start, fresh=False)
            result = (found, point)
        return result


def check_classes(net: nn.Module, x: torch.Tensor, loss: str, targeted: bool) -> None:
    """The DLR losses need at least 3 classes (untargeted) or 4 (targeted): z_pi3, z_pi4."""
    if loss != "dlr":
        return
    with torch.no_grad():
        classes = net(x[:1]).shape[1]
    need = 4 if targeted else 3
    if classes < need:
        kind = "targeted DLR" if targeted else "DLR"
        raise ConfigError(f"the {kind} loss needs at least {need} classes, the model has {classes}; use loss: ce")


def random_start(x: torch.Tensor, threat: ThreatModel, eps: float, generator: torch.Generator | None) -> torch.Tensor:
    """A random point of the ball of radius ``eps`` around ``x``, in the box: linf on the sphere's
    scaled cube, l2 on the sphere, l1 a normal draw projected onto the ball and box (the
    reference's starts)."""
    lo, hi = threat.bounds
    if threat.norm is Norm.LINF:
        t = rand_like(x, generator).mul_(2).sub_(1)
        start = x + eps * t / rows(t.flatten(1).abs().amax(dim=1) + 1e-12, x)
    elif threat.norm is Norm.L2:
        t = randn_like(x, generator)
        start = x + eps * t / rows(t.flatten(1).norm(dim=1) + 1e-12, x)
    else:
        start = x + project_l1_box(randn_like(x, generator), x, eps, threat.bounds)
    return start.clamp(lo, hi)


def project(z: torch.Tensor, x: torch.Tensor, threat: ThreatModel, eps: float) -> torch.Tensor:
    """``z`` projected onto the ``threat.norm`` ball of radius ``eps`` around ``x`` and the box
    (not ``ThreatModel.project``: the radius changes under the l1 schedule, and linf clamps z
    between x - eps and x + eps, the reference's rounding, not x + clamp(z - x))."""
    lo, hi = threat.bounds
    if threat.norm is Norm.LINF:
        return torch.minimum(torch.maximum(z, x - eps), x + eps).clamp_(lo, hi)
    if threat.norm is Norm.L2:
        d = z - x
        n = torch.linalg.vector_norm(d.flatten(1), 2, dim=1, dtype=torch.float64)
        factor = (eps / n.clamp_min(1e-12)).clamp(max=1.0).to(d.dtype)
        return (x + d * rows(factor, d)).clamp_(lo, hi)
    return (x + project_l1_box(z - x, x, eps, threat.bounds)).clamp_(lo, hi)


def direction(grad: torch.Tensor, norm: Norm, sparsity: torch.Tensor) -> torch.Tensor:
    """The unit step: sign (linf), normalized gradient (l2), or for l1 the signs of the share
    ``sparsity`` of coordinates with the largest |gradient|, scaled to unit l1 norm."""
    if norm is Norm.LINF:
        return grad.sign()
    if norm is Norm.L2:
        n = torch.linalg.vector_norm(grad.flatten(1), 2, dim=1, dtype=torch.float64)
        return grad / rows((n + 1e-12).to(grad.dtype), grad)
    flat = grad.abs().flatten(1)
    d = flat.shape[1]
    at = ((1 - sparsity) * d).clamp(0, d - 1).long()
    cut = flat.sort(dim=1).values.gather(1, at[:, None]).squeeze(1)
    signs = grad.sign() * (grad.abs() >= rows(cut, grad))
    return signs / rows(signs.abs().flatten(1).sum(dim=1) + 1e-10, grad)


class _Loop:
    """The APGD iteration on one batch: :meth:`run` from a given start, ``steps`` iterations."""

    def __init__(self, attack: APGD, net: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
                 target: torch.Tensor | None, goal: torch.Tensor | None, loss: str) -> None:
        self.attack, self.net, self.x, self.y, self.threat = attack, net, x, y, threat
        self.target, self.goal, self.loss = target, goal, loss

    def gradient(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gradient averaged over ``eot_iter`` passes, per-example loss, logits of the last pass)."""
        grad = torch.zeros_like(z)
        value = logits = z.new_empty(0)
        with torch.enable_grad():
            for _ in range(self.attack.eot_iter):
                leaf = z.detach().requires_grad_(True)
                logits = self.net(leaf)
                value = per_example_loss(self.loss, logits, self.y, self.target)
                grad += torch.autograd.grad(value.sum(), leaf)[0]
        return grad / self.attack.eot_iter, value.detach(), logits.detach()

    @torch.no_grad()
    def run(self, steps: int, eps: float, start: torch.Tensor, fresh: bool
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(met the goal, the last point that met it else the point of highest loss, the point of
        highest loss) per example. ``fresh``: an l1 run's sparsity starts at 20% (else at the
        start's own, as the reference's runs from a given start)."""
        x, threat, attack = self.x, self.threat, self.attack
        n, d = len(x), x[0].numel()
        l1 = threat.norm is Norm.L1
        base = (1.0 if l1 else 2.0) * eps
        grad, value, logits = self.gradient(start)
        watch = trace.run(steps + 1)  # a path recorder sees the start and every iterate
        if watch is not None:
            watch.see(start, logits, value.mean())
        x_adv, x_prev = start.clone(), start.clone()
        x_best, grad_best, loss_best = start.clone(), grad.clone(), value.clone()
        found = goal_met(logits.argmax(dim=1), self.y, self.goal)
        x_found = start.clone()
        step = torch.full((n,) + (1,) * (x.dim() - 1), base, device=x.device, dtype=x.dtype)
        if l1:
            every = max(int(0.04 * steps), 1)
            marks = set(range(every, steps + 1, every))
            sparse_old = torch.full((n,), float(d), device=x.device) if fresh else \
                (start - x).flatten(1).ne(0).sum(dim=1).float()
            sparsity = torch.full((n,), 0.2, device=x.device) if fresh else sparse_old / d / 1.5
        else:
            marks = set(checkpoints(steps))
            sparsity = torch.zeros(n, device=x.device)
        previous = value.clone()
        raised = torch.zeros(n, device=x.device)
        since = 0
        reduced_last = torch.ones(n, dtype=torch.bool, device=x.device)
        best_at_last = loss_best.clone()
        for i in range(steps):
            a = attack.momentum if i > 0 else 1.0
            momentum = x_adv - x_prev
            x_prev = x_adv
            z = project(x_adv + step * direction(grad, threat.norm, sparsity), x, threat, eps)
            if not l1:  # the reference's l1 steps carry no momentum
                z = project(x_adv + a * (z - x_adv) + (1 - a) * momentum, x, threat, eps)
            x_adv = z
            grad, value, logits = self.gradient(x_adv)
            if watch is not None:
                watch.see(x_adv, logits, value.mean())
            hit = goal_met(logits.argmax(dim=1), self.y, self.goal)
            x_found = torch.where(rows(hit, x), x_adv, x_found)
            found |= hit
            better = value > loss_best
            x_best = torch.where(rows(better, x), x_adv, x_best)
            grad_best = torch.where(rows(better, x), grad, grad_best)
            loss_best = torch.where(better, value, loss_best)
            raised += (value > previous).float()
            previous = value
            since += 1
            if i + 1 not in marks:
                continue
            if l1:  # sparsity follows the best point's; a falling sparsity resets the step
                sparse_now = (x_best - x).flatten(1).ne(0).sum(dim=1).float()
                reduce = sparse_now / sparse_old.clamp_min(1) < 0.95
                sparsity = sparse_now / d / 1.5
                step = torch.where(rows(reduce, x), torch.full_like(step, base), step / 1.5).clamp(base / 10, base)
                sparse_old = sparse_now
            else:
                reduce = (raised <= since * attack.rho) | (~reduced_last & (best_at_last >= loss_best))
                step = torch.where(rows(reduce, x), step / 2, step)
                reduced_last, best_at_last = reduce, loss_best.clone()
            x_adv = torch.where(rows(reduce, x), x_best, x_adv)
            grad = torch.where(rows(reduce, x), grad_best, grad)
            raised.zero_()
            since = 0
        if watch is not None:
            watch.close()
        return found, torch.where(rows(found, x), x_found, x_best), x_best


@ATTACKS.register("apgd", description="Auto-PGD (Croce & Hein 2020): a step-size schedule from the loss; linf, l2, l1")
class AutoPGD(APGD):
    """Auto-PGD with the ``ce`` or ``dlr`` loss (module docstring)."""


@ATTACKS.register("apgd-t", description="APGD-T: APGD with the targeted DLR loss over the top-k other classes; linf, l2, l1")
class AutoPGDTargeted(APGD):
    """APGD-T (module docstring): for each of the ``targets`` most likely other classes of the
    clean input, in order, APGD on the targeted DLR loss toward it, on the examples still robust.
    Under an untargeted threat model (the goal stays misclassification)."""

    targeting: ClassVar[frozenset[Targeting]] = frozenset({Targeting.UNTARGETED})

    class Params(APGD.Params):
        targets: params.Count = 9
        loss: Literal["dlr"] = "dlr"  # type: ignore[assignment]

    def _run(self, model: Handle, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
             target: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
        net = white_box(model)
        check_classes(net, x, "dlr", targeted=True)
        with torch.no_grad():
            logits = net(x)
        out = x.clone()
        done = logits.argmax(dim=1) != y  # already misclassified: nothing to do
        ranked = logits.scatter(1, y[:, None], -math.inf).argsort(dim=1, descending=True)
        for k in range(min(self.targets, logits.shape[1] - 1)):
            goal = ranked[:, k]  # the (k+1)-th most likely class other than the true one
            self.restarted(net, x, y, threat, lambda idx, goal=goal: goal[idx], "dlr", generator, out, done,
                           goal_target=False)
        return out
