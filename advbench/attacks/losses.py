"""Shared pieces of the gradient attacks: objectives, input gradients, steps and the ascent loop.

Conventions every gradient attack here follows:

- an *objective* maps a batch of logits to the scalar the attack **ascends**: the untargeted
  loss J(x, y), or minus the targeted loss J(x, t) (so "x - alpha sign(grad J(x, t))" is an
  ascent step on -J). It is a **sum** over the batch, never a mean, so each example's gradient
  is its own loss's gradient whatever the batch size;
- gradients are taken with respect to the input only (``torch.autograd.grad``), model
  parameters being frozen by :class:`~advbench.attacks.base.Attack`;
- the per-step loop makes no host-device synchronisation and updates one input buffer in place.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from advbench.attacks import trace
from advbench.errors import ConfigError, ModelOutputError

Objective = Callable[[torch.Tensor], torch.Tensor]

LOSSES = ("ce", "margin")


# ---------------------------------------------------------------------- objectives
def _other_max(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """max_{i != label} z_i per example."""
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, labels.unsqueeze(1), True)
    return logits.masked_fill(mask, float("-inf")).amax(dim=1)


def per_example_objective(
    loss: str, logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None
) -> torch.Tensor:
    """The quantity an attack ascends, per example (shape (N,)); higher is better for the attacker.

    ``ce``: J(x, y) untargeted, -J(x, t) targeted (J the cross-entropy).
    ``margin`` (Carlini & Wagner's f on logits, unclipped): max_{i!=y} z_i - z_y untargeted,
    z_t - max_{i!=t} z_i targeted; positive exactly when the goal is met (ties aside).
    """
    if loss == "ce":
        if target is None:
            return F.cross_entropy(logits, y, reduction="none")
        return -F.cross_entropy(logits, target, reduction="none")
    if loss == "margin":
        labels = y if target is None else target
        z_label = logits.gather(1, labels.unsqueeze(1)).squeeze(1)
        other = _other_max(logits, labels)
        return other - z_label if target is None else z_label - other
    raise ConfigError(f"unknown loss {loss!r}; allowed: {', '.join(LOSSES)}")


def objective(loss: str, y: torch.Tensor, target: torch.Tensor | None) -> Objective:
    """The batch objective (a sum over examples) for ``loss`` toward ``target`` (or away from ``y``)."""
    if loss == "ce":
        if target is None:
            return lambda logits: F.cross_entropy(logits, y, reduction="sum")
        return lambda logits: -F.cross_entropy(logits, target, reduction="sum")
    if loss == "margin":
        return lambda logits: per_example_objective("margin", logits, y, target).sum()
    raise ConfigError(f"unknown loss {loss!r}; allowed: {', '.join(LOSSES)}")


def least_likely_objective() -> Objective:
    """-J(x, y_LL) where y_LL = argmin_y p(y | x) is read from the *first* logits it sees.

    An iterative attack that starts at the clean input sees the clean logits first, so y_LL is
    Kurakin et al.'s least-likely class of the clean input, at no extra forward pass. The
    closure holds per-call state: build a new one for every attack call.
    """
    labels: list[torch.Tensor] = []

    def fn(logits: torch.Tensor) -> torch.Tensor:
        if not labels:
            labels.append(logits.detach().argmin(dim=1))
        return -F.cross_entropy(logits, labels[0], reduction="sum")

    return fn


# ---------------------------------------------------------------------- gradients and steps
def _grad(model: nn.Module, x_adv: torch.Tensor, objective_fn: Objective, watch: trace.Run | None = None
          ) -> torch.Tensor:
    """grad of the objective w.r.t. the leaf ``x_adv`` (grad mode on): one forward, one backward.
    ``watch`` (a path recorder's run) sees the iterate, its logits and the objective's batch mean."""
    logits = model(x_adv)
    value = objective_fn(logits)
    if watch is not None:
        watch.see(x_adv, logits, value.detach() / x_adv.shape[0])
    if not value.requires_grad:
        raise ModelOutputError(
            "the model's logits do not depend differentiably on its input (a detach, a non-differentiable "
            "step or torch.no_grad inside the model?); a gradient attack needs a differentiable model or "
            "a BPDA surrogate"
        )
    (grad,) = torch.autograd.grad(value, x_adv, allow_unused=True)
    return torch.zeros_like(x_adv) if grad is None else grad


def input_gradient(model: nn.Module, x: torch.Tensor, objective_fn: Objective) -> torch.Tensor:
    """grad_x of ``objective_fn(model(x))``: one forward and one backward, w.r.t. the input only."""
    with torch.enable_grad():
        return _grad(model, x.detach().requires_grad_(True), objective_fn)


def sign_(grad: torch.Tensor) -> torch.Tensor:
    """sign(grad), in place on autograd's fresh buffer when it can be written to (some backward
    formulas return a broadcast view, which cannot)."""
    return grad.sign_() if grad.is_contiguous() else grad.sign()


def _per_example(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def _inverse_l2_norm(g: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """scale / ||g||_2 per example, shape (N,), in ``g``'s dtype; 0 where g is zero.

    The norm is reduced in float64 (no copy is made), because float32 squares underflow: a
    gradient of 1e-20 per entry has a float32 norm of exactly 0 and would give no step at all.
    """
    norm = torch.linalg.vector_norm(g.reshape(g.shape[0], -1), 2, dim=1, dtype=torch.float64)
    inv = torch.where(norm > 0, scale / norm, torch.zeros_like(norm))
    finfo = torch.finfo(g.dtype)
    return inv.clamp_(max=finfo.max).to(g.dtype)


def l2_normalize(g: torch.Tensor) -> torch.Tensor:
    """g / ||g||_2 per example: zero where the gradient is zero, exact for tiny gradients."""
    return g * _per_example(_inverse_l2_norm(g), g)


def l2_step_(x_adv: torch.Tensor, grad: torch.Tensor, step_size: float) -> torch.Tensor:
    """x_adv += step_size * grad / ||grad||_2 per example, in place (one fused pass)."""
    return x_adv.addcmul_(grad, _per_example(_inverse_l2_norm(grad, step_size), grad))


def project_l2_(x_adv: torch.Tensor, x: torch.Tensor, eps: float, bounds: tuple[float, float]) -> torch.Tensor:
    """In place: the same arithmetic as :meth:`ThreatModel.project` for l2 (ball, then bounds),
    without its four temporary batch-sized tensors. Overwrites and returns ``x_adv``."""
    delta = x_adv.sub_(x)
    # the norm and the scale in float64, so the product is the only rounding of the perturbation
    n = torch.linalg.vector_norm(delta.reshape(delta.shape[0], -1), 2, dim=1, dtype=torch.float64).clamp_min(1e-12)
    factor = (eps / n).clamp(max=1.0).to(delta.dtype)
    lo, hi = bounds
    return delta.mul_(_per_example(factor, delta)).add_(x).clamp_(lo, hi)


def linf_box(x: torch.Tensor, eps: float, bounds: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-element interval [max(x - eps, lo), min(x + eps, hi)]: the linf ball intersected
    with the bounds. Clamping into it is Kurakin et al.'s Clip_{X,eps} and the exact Euclidean
    projection onto ball and bounds (what ``ThreatModel.project`` computes for linf)."""
    lo, hi = bounds
    return (x - eps).clamp_(min=lo), (x + eps).clamp_(max=hi)


# ---------------------------------------------------------------------- the ascent loop
def ascend_linf(
    model: nn.Module,
    x_start: torch.Tensor,
    lower: torch.Tensor,
    upper: torch.Tensor,
    step_size: float,
    steps: int,
    objective_fn: Objective,
) -> torch.Tensor:
    """``steps`` iterations of x <- clamp(x + step_size * sign(grad objective(x)), lower, upper).

    Each step is one forward, one backward and three in-place elementwise passes over one
    reused buffer; no synchronisation with the host. Returns a new tensor (``x_start`` is
    left untouched). An active path recorder (:mod:`advbench.attacks.trace`) sees every iterate
    whose gradient is taken.
    """
    watch = trace.run(steps)
    with torch.enable_grad():
        x_adv = x_start.detach().clone().requires_grad_(True)
        for _ in range(steps):
            grad = _grad(model, x_adv, objective_fn, watch)
            with torch.no_grad():
                x_adv.add_(sign_(grad), alpha=step_size).clamp_(lower, upper)
    if watch is not None:
        watch.close()
    return x_adv.detach()


def ascend_l2(
    model: nn.Module,
    x: torch.Tensor,
    x_start: torch.Tensor,
    eps: float,
    bounds: tuple[float, float],
    step_size: float,
    steps: int,
    objective_fn: Objective,
) -> torch.Tensor:
    """``steps`` iterations of x <- Proj(x + step_size * grad / ||grad||_2), per example, Proj
    onto the l2 eps-ball around ``x`` and then the bounds. In place on one buffer, no sync; an
    active path recorder sees every iterate whose gradient is taken."""
    watch = trace.run(steps)
    with torch.enable_grad():
        x_adv = x_start.detach().clone().requires_grad_(True)
        for _ in range(steps):
            grad = _grad(model, x_adv, objective_fn, watch)
            with torch.no_grad():
                project_l2_(l2_step_(x_adv, grad, step_size), x, eps, bounds)
    if watch is not None:
        watch.close()
    return x_adv.detach()
