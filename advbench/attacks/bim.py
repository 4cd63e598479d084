"""The basic iterative method (I-FGSM) and the iterative least-likely class method.

Both are from Kurakin, Goodfellow & Bengio, "Adversarial examples in the physical world"
(ICLR 2017 workshop), and share one iteration: X_0 = X, then ``steps`` signed gradient steps
of size alpha, each followed by Clip_{X,eps} (the eps-ball around X and the input bounds).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from advbench.access import Handle
from advbench.attacks.base import GradientAttack, white_box
from advbench.attacks.losses import Objective, ascend_linf, least_likely_objective, linf_box, objective
from advbench import params
from advbench.registry import ATTACKS
from advbench.threat import Norm, Targeting, ThreatModel


def paper_steps(eps_255: float) -> int:
    """Kurakin et al.'s iteration count min(eps + 4, 1.25 eps), eps in 0-255 units, rounded up, >= 1.

    The rounding allows for float noise in ``eps_255`` (4/255 * 255 is not exactly 4), so
    eps = 4/255 gives min(8, 5) = 5 steps, not 6.
    """
    n = min(eps_255 + 4.0, 1.25 * eps_255)
    return max(1, math.ceil(round(n, 6)))


@ATTACKS.register("bim", description="Basic iterative method / I-FGSM (Kurakin et al. 2017); linf")
class BIM(GradientAttack):
    """Basic iterative method, I-FGSM (Kurakin, Goodfellow & Bengio 2017).

    X_0 = X;  X_{N+1} = Clip_{X,eps}{ X_N + alpha * sign(grad_X J(X_N, y_true)) }, where
    Clip_{X,eps} clamps every element to [max(lo, X - eps), min(hi, X + eps)].
    Targeted: X_{N+1} = Clip_{X,eps}{ X_N - alpha * sign(grad_X J(X_N, t)) }.

    Defaults follow the paper: alpha = 1/255 of the input range and
    min(eps + 4, 1.25 eps) iterations, eps counted in 1/255ths of the range (rounded up, >= 1).
    """

    norms: ClassVar[frozenset[Norm]] = frozenset({Norm.LINF})
    targeting: ClassVar[frozenset[Targeting]] = frozenset(Targeting)
    randomized: ClassVar[bool] = False  # the generator only matters through random targets
    kind: ClassVar[str] = "iterative"

    class Params(params.Params):
        steps: params.Count | None = None  # None: the paper's min(eps + 4, 1.25 eps)
        step_size: params.PositiveNumber | None = None  # None: 1/255 of the input range

    def schedule(self, threat: ThreatModel) -> tuple[int, float]:
        """(steps, step size) under ``threat``: the given values, or the paper's defaults."""
        lo, hi = threat.bounds
        steps = self.steps if self.steps is not None else paper_steps(threat.eps / (hi - lo) * 255)
        step_size = self.step_size if self.step_size is not None else (hi - lo) / 255
        return steps, step_size

    def _objective(self, y: torch.Tensor, target: torch.Tensor | None) -> Objective:
        return objective("ce", y, target)

    def _run(
        self,
        model: Handle,
        x: torch.Tensor,
        y: torch.Tensor,
        threat: ThreatModel,
        target: torch.Tensor | None,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        steps, step_size = self.schedule(threat)
        lower, upper = linf_box(x, threat.eps, threat.bounds)
        return ascend_linf(white_box(model), x, lower, upper, step_size, steps, self._objective(y, target))


@ATTACKS.register("illc", description="Iterative least-likely class method (Kurakin et al. 2017); linf")
class ILLC(BIM):
    """Iterative least-likely class method (Kurakin, Goodfellow & Bengio 2017).

    y_LL = argmin_y p(y | X) on the clean input;
    X_0 = X;  X_{N+1} = Clip_{X,eps}{ X_N - alpha * sign(grad_X J(X_N, y_LL)) }.
    Always steers toward y_LL. Under an untargeted threat model success is misclassification
    (what robust accuracy counts); under ``least_likely`` targeting success is predicting y_LL.
    Same defaults as BIM.
    """

    targeting: ClassVar[frozenset[Targeting]] = frozenset({Targeting.UNTARGETED, Targeting.LEAST_LIKELY})
    kind: ClassVar[str] = "other"  # it ascends another goal than misclassification: not compared with FGSM

    def _objective(self, y: torch.Tensor, target: torch.Tensor | None) -> Objective:
        # Untargeted: y_LL is read off the first forward pass, which is at X_0 = X.
        return least_likely_objective() if target is None else objective("ce", y, target)
