"""The fast gradient sign method and its L2 sibling, the fast gradient method."""

from __future__ import annotations

from typing import ClassVar

import torch

from advbench.access import Handle
from advbench.attacks.base import GradientAttack, white_box
from advbench.attacks.losses import input_gradient, l2_step_, linf_box, objective, project_l2_, sign_
from advbench.registry import ATTACKS
from advbench.threat import Norm, Targeting, ThreatModel


@ATTACKS.register("fgsm", description="Fast gradient (sign) method, one step (Goodfellow et al. 2015); linf, l2")
class FGSM(GradientAttack):
    """Fast gradient sign method (Goodfellow, Shlens & Szegedy, ICLR 2015).

    linf: x' = clip(x + eps * sign(grad_x J(x, y))); l2 (the fast gradient method):
    x' = clip(x + eps * g / ||g||_2), g = grad_x J(x, y), per example (no step where g = 0).
    Targeted: x' = clip(x - eps * sign(grad_x J(x, t))) (resp. -eps * g / ||g||_2).
    J is the cross-entropy; one forward and one backward pass.
    """

    norms: ClassVar[frozenset[Norm]] = frozenset({Norm.LINF, Norm.L2})
    targeting: ClassVar[frozenset[Targeting]] = frozenset(Targeting)
    randomized: ClassVar[bool] = False  # the generator only matters through random targets
    kind: ClassVar[str] = "single_step"

    def _run(
        self,
        model: Handle,
        x: torch.Tensor,
        y: torch.Tensor,
        threat: ThreatModel,
        target: torch.Tensor | None,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        grad = input_gradient(white_box(model), x, objective("ce", y, target))
        eps = threat.eps
        with torch.no_grad():
            if threat.norm is Norm.LINF:  # x + eps * sign(g), into the bounds (the ball holds by construction)
                lower, upper = linf_box(x, eps, threat.bounds)
                return torch.add(x, sign_(grad), alpha=eps).clamp_(lower, upper)
            return project_l2_(l2_step_(x.clone(), grad, eps), x, eps, threat.bounds)
