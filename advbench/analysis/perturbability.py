"""How easily an image is perturbed, measured the seed's way (issue 14), batched over images.

- :func:`ifgsm_trace`: iterative FGSM with a fixed step ``alpha`` (the seed uses 0.1, 0.5, 1 and
  10 in 8-bit pixel units, i.e. ``alpha / 255`` for inputs in [0, 1]), unbounded but clipped to
  the input bounds, for ``steps`` iterations: the step at which each image is first
  misclassified, the MSE and the confidence (softmax probability of the predicted class) there,
  the predicted label at every iterate and how often it changes, and, on request, the iterates
  themselves (to follow a curvature measure along the path);
- :func:`boundary_point`: bisection on the segment from the clean image to an adversarial one
  for the point closest to the image where the label flips (assuming one flip on the segment,
  as the seed does; the point returned is always on the misclassified side), its MSE and the
  fraction of the segment;
- :func:`transfers`: whether such points are misclassified by a second model.

Every image is treated at once; the only host synchronisation is none inside the loops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from advbench.tensors import frozen, rows


@dataclass(frozen=True)
class IFGSMTrace:
    """Per image (N,) unless noted. ``steps`` is the first iteration whose iterate is
    misclassified (0: misclassified already; -1: not within the run)."""

    steps: torch.Tensor
    mse: torch.Tensor  # at the first misclassified iterate (NaN where none)
    confidence: torch.Tensor  # softmax probability of the predicted class there (NaN where none)
    labels: torch.Tensor  # (N, T + 1) the prediction at every iterate, the clean image first
    flips: torch.Tensor  # how often the prediction changes along the iterates
    iterates: torch.Tensor | None = None  # (T + 1, N, ...) when kept


def ifgsm_trace(model: nn.Module, x: torch.Tensor, y: torch.Tensor, alpha: float, steps: int,
                bounds: tuple[float, float] = (0.0, 1.0), keep_iterates: bool = False) -> IFGSMTrace:
    """Iterative FGSM (untargeted, ``x_{t+1} = clip(x_t + alpha sign(grad CE))``) for ``steps``
    iterations on every image; see :class:`IFGSMTrace`."""
    lo, hi = bounds
    n = x.shape[0]
    labels, kept = [], []
    first = torch.full((n,), -1, dtype=torch.long, device=x.device)
    mse = torch.full((n,), float("nan"), dtype=torch.float64, device=x.device)
    conf = torch.full((n,), float("nan"), dtype=torch.float64, device=x.device)
    cur = x.detach().clone()
    with frozen(model):
        for t in range(steps + 1):
            xt = cur.clone().requires_grad_(True)
            with torch.enable_grad():
                logits = model(xt)
                (g,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), xt)
            with torch.no_grad():
                pred = logits.argmax(dim=1)
                labels.append(pred)
                if keep_iterates:
                    kept.append(cur.clone())
                new = (pred != y) & (first < 0)
                first = torch.where(new, torch.full_like(first, t), first)
                err = (cur - x).double().pow(2).flatten(1).mean(dim=1)
                p = F.softmax(logits.double(), dim=1).gather(1, pred[:, None]).squeeze(1)
                mse = torch.where(new, err, mse)
                conf = torch.where(new, p, conf)
                if t < steps:
                    cur = (cur + alpha * g.sign()).clamp_(lo, hi)
    lab = torch.stack(labels, dim=1)
    return IFGSMTrace(first, mse, conf, lab, (lab[:, 1:] != lab[:, :-1]).sum(dim=1),
                      torch.stack(kept) if keep_iterates else None)


@dataclass(frozen=True)
class BoundaryPoint:
    """Per image: the point on the misclassified side of the flip closest to the clean image
    along the segment, the fraction ``t`` of the segment, and its MSE from the clean image."""

    x: torch.Tensor
    t: torch.Tensor
    mse: torch.Tensor


@torch.no_grad()
def boundary_point(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
                   iterations: int = 30) -> BoundaryPoint:
    """Bisection between ``x`` (classified ``y``) and ``x_adv`` (not): ``iterations`` halvings of
    the bracket ``[a, b]`` with ``x + a (x_adv - x)`` classified ``y`` and ``x + b (...)`` not;
    returns the ``b`` end (misclassified: it is an adversarial example, the closest found)."""
    with frozen(model):
        a = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        b = torch.ones_like(a)
        d = x_adv - x
        for _ in range(iterations):
            mid = (a + b) / 2
            wrong = model(x + rows(mid, x).to(x.dtype) * d).argmax(dim=1) != y
            b = torch.where(wrong, mid, b)
            a = torch.where(wrong, a, mid)
        point = x + rows(b, x).to(x.dtype) * d
    return BoundaryPoint(point, b, (point - x).double().pow(2).flatten(1).mean(dim=1))


@torch.no_grad()
def transfers(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per image: ``model`` misclassifies ``x_adv`` (a point found on another model)."""
    with frozen(model):
        return model(x_adv).argmax(dim=1) != y
