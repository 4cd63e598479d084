"""DeepFool (Moosavi-Dezfooli, Fawzi & Frossard, CVPR 2016): minimal l2 and linf perturbations by
repeatedly stepping onto the closest linearized decision boundary."""

from __future__ import annotations

import math
from typing import Annotated, ClassVar

import torch
from pydantic import Field

from advbench.access import Handle
from advbench.attacks.base import GradientAttack, white_box
from advbench.audit import reached
from advbench import params
from advbench.registry import ATTACKS
from advbench.threat import Norm, Targeting, ThreatModel

#: added to |f_l| so that a step crosses the linearized boundary (by 1e-4 in logit units)
#: instead of landing exactly on it
CROSSING = 1e-4


def _rows(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-example vector shaped to broadcast against ``like`` (N, ...)."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def closest_boundary_step(
    logits: torch.Tensor, x_leaf: torch.Tensor, y: torch.Tensor, classes: torch.Tensor, norm: Norm
) -> torch.Tensor:
    """One DeepFool step per example: the smallest step (in ``norm``) onto the closest linearized
    boundary between class ``y`` and one of ``classes`` (N, K), crossing it by :data:`CROSSING`.

    With f_k = z_k - z_y and w_k = grad_x f_k at ``x_leaf`` (whose graph produced ``logits``),
    l = argmin_k |f_k| / ||w_k||_q (q the dual norm: 2 for l2, 1 for linf) and the step is
    (|f_l| + 1e-4) / ||w_l||_2^2 * w_l for l2, (|f_l| + 1e-4) / ||w_l||_1 * sign(w_l) for linf.
    The K gradients come from K backward passes through the one forward graph, each over the
    whole batch (a sum over examples), keeping a running best so memory stays that of one
    gradient. Zero where every w_k is zero.
    """
    n, k = classes.shape
    z_y = logits.gather(1, y.unsqueeze(1)).squeeze(1)
    p = 1 if norm is Norm.LINF else 2
    best_dist = torch.full((n,), math.inf, dtype=torch.float64, device=x_leaf.device)
    best_f = torch.zeros_like(best_dist)
    best_norm = torch.full_like(best_dist, math.inf)
    best_w = torch.zeros_like(x_leaf)
    for j in range(k):
        f = logits.gather(1, classes[:, j : j + 1]).squeeze(1) - z_y
        (w,) = torch.autograd.grad(f.sum(), x_leaf, retain_graph=j < k - 1)
        # reduced in float64: float32 squares of tiny gradients underflow to a zero norm
        w_norm = torch.linalg.vector_norm(w.reshape(n, -1), p, dim=1, dtype=torch.float64)
        f = f.detach().double().abs()
        dist = f / w_norm  # inf (or NaN) where w_k = 0: never the closest
        better = dist < best_dist
        best_dist = torch.where(better, dist, best_dist)
        best_f = torch.where(better, f, best_f)
        best_norm = torch.where(better, w_norm, best_norm)
        best_w = torch.where(_rows(better, w), w, best_w)
    coef = (best_f + CROSSING) / best_norm.pow(p)  # 0 where no class had a gradient
    direction = best_w.sign() if norm is Norm.LINF else best_w
    return direction * _rows(coef.to(direction.dtype), direction)


@ATTACKS.register(
    "deepfool", description="DeepFool, minimal perturbation by iterated linearization (Moosavi-Dezfooli et al. 2016); l2, linf"
)
class DeepFool(GradientAttack):
    """DeepFool (Moosavi-Dezfooli, Fawzi & Frossard, "DeepFool: a simple and accurate method to
    fool deep neural networks", CVPR 2016), multi-class, l2 (Algorithm 2) and linf (Section 3.3).

    Each iteration linearizes the classifier at the current point and takes the smallest step
    onto the closest boundary between the original class and one of the ``candidates`` - 1 other
    most likely classes of the clean input (see :func:`closest_boundary_step`). The steps
    accumulate into r; the current point is clip(x + (1 + overshoot) r), as in the authors' code.
    Each example stops as soon as it is misclassified and drops out of later passes (one host
    synchronisation per iteration: the size of the next pass's batch); after
    ``steps`` iterations an example still classified correctly gets ``x`` back (nothing found).
    A minimal-perturbation attack: the budget eps is ignored (see :mod:`advbench.attacks.base`).

    Cost per iteration: one forward pass and ``candidates`` - 1 backward passes over the
    examples still running.
    """

    norms: ClassVar[frozenset[Norm]] = frozenset({Norm.L2, Norm.LINF})
    targeting: ClassVar[frozenset[Targeting]] = frozenset({Targeting.UNTARGETED})
    minimal: ClassVar[bool] = True
    kind: ClassVar[str] = "minimal"
    randomized: ClassVar[bool] = False

    class Params(params.Params):
        steps: params.Count = 50
        #: the original class and at least one other
        candidates: Annotated[params.Count, Field(ge=2)] = 10
        overshoot: params.NonNegativeNumber = 0.02

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
        lo, hi = threat.bounds
        x_adv = x.clone()
        r_total = torch.zeros_like(x)
        found = torch.zeros_like(y, dtype=torch.bool)
        idx = torch.arange(x.shape[0], device=x.device)  # the examples still running
        classes: torch.Tensor | None = None
        for it in range(self.steps + 1):
            x_leaf = x_adv[idx].requires_grad_(True)
            logits = net(x_leaf)
            if classes is None:  # the candidates: the most likely classes of the clean input other than y
                scores = logits.detach().scatter(1, y.unsqueeze(1), math.inf)
                classes = scores.topk(min(self.candidates, scores.shape[1]), dim=1).indices[:, 1:]
            done = reached(net, x_leaf.detach(), logits.detach(), y[idx], None, threat)
            found[idx] = done
            if it == self.steps:
                break
            # the iteration's one host synchronisation: which examples go on (the next pass's
            # batch size); it pays for itself, each example dropped saves its candidates - 1
            # backward passes in every later iteration, and ends the loop when none is left
            keep = (~done).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            step = closest_boundary_step(logits, x_leaf, y[idx], classes[idx], threat.norm)
            with torch.no_grad():
                idx = idx[keep]
                r_total[idx] += step[keep]
                x_adv[idx] = (x[idx] + (1 + self.overshoot) * r_total[idx]).clamp_(lo, hi)
        return torch.where(_rows(found, x), x_adv, x)
