"""Universal adversarial perturbations (Moosavi-Dezfooli, Fawzi, Fawzi & Frossard, CVPR 2017):
one perturbation v, small in an Lp ball, that changes the prediction of most images it is added to.

Two ways to fit it, chosen by ``method``:

- ``deepfool``: the paper's Algorithm 1. Passes over the fit images in a random order; for each
  image x_i that x_i + v does not fool yet, DeepFool's minimal perturbation dv_i of x_i + v is
  added and the sum projected back onto the ball, v <- P_{p,xi}(v + dv_i); stop once the fooling
  rate on the fit set reaches 1 - delta or after ``max_passes`` passes;
- ``sgd``: mini-batch projected ascent of a (clamped) loss of clip(x + v) over the fit set
  (Shafahi et al., "Universal adversarial training", AAAI 2020; Mummadi et al., ICCV 2019), which
  takes one gradient per image and step instead of DeepFool's one per candidate class: faster.

Both fit against what the audit scores, clip(x + v) (:func:`advbench.audit.apply_universal`),
and both fit one perturbation per class (rows of a (K, C, H, W) tensor indexed by the label) under
``shared_by: class``: every update touches only the rows of the images it came from, so the
classes are fitted side by side in the same loop, each on its own images only.
"""

from __future__ import annotations

import math
from typing import Annotated, ClassVar, Literal

import torch
from pydantic import Field

from advbench import params
from advbench.access import Handle
from advbench.attacks.base import GradientAttack, white_box
from advbench.attacks.deepfool import closest_boundary_step
from advbench.attacks.losses import l2_normalize, per_example_objective
from advbench.audit import predict
from advbench.errors import ConfigError, UnsupportedThreatError
from advbench.registry import ATTACKS
from advbench.tensors import rows, to_device
from advbench.threat import Norm, Scope, Targeting, ThreatModel

#: the clamp of the untargeted cross-entropy in the SGD method when ``clamp`` is None: beta = 12,
#: the reference SGD-UAP code's default (Shafahi et al.'s clipped loss min(J, beta), so that
#: images already fooled with confidence stop dominating the gradient of the batch)
CE_CLAMP = 12.0


def project_universal(v: torch.Tensor, threat: ThreatModel) -> torch.Tensor:
    """P_{p,xi}: each row of ``v`` (R, ...) projected onto the threat's eps-ball about zero (no
    bounds: the perturbation is not an image). linf: clamp to [-eps, eps]; l2: v * min(1, eps / ||v||_2),
    the norm and the factor in float64 so the product is the one rounding (what the audit allows)."""
    if threat.norm is Norm.LINF:
        return v.clamp(-threat.eps, threat.eps)
    n = torch.linalg.vector_norm(v.reshape(v.shape[0], -1), 2, dim=1, dtype=torch.float64).clamp_min(1e-12)
    factor = (threat.eps / n).clamp(max=1.0).to(v.dtype)
    return v * rows(factor, v)


def deepfool_perturbation(
    net: torch.nn.Module,
    x0: torch.Tensor,
    label: torch.Tensor,
    target: torch.Tensor | None,
    norm: Norm,
    bounds: tuple[float, float],
    max_iter: int,
    overshoot: float,
    candidates: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepFool's perturbation of each image of ``x0`` (the authors' code: (1 + overshoot) r_tot after
    at most ``max_iter`` iterations, whether or not it crossed), and which images it was run on.

    Untargeted: r leaves class ``label`` (the clean prediction: the paper's k(x_i)), each step onto
    the closest linearized boundary among the ``candidates`` - 1 most likely other classes at x0
    (:func:`advbench.attacks.deepfool.closest_boundary_step`). Targeted: each step goes onto the
    linearized boundary between the current class and ``target``, until it is reached. Images
    already past get r = 0 and are not run. The iterate is clip(x0 + (1 + overshoot) r),
    as DeepFool's. One host synchronisation per iteration: the batch of images still running.
    """
    lo, hi = bounds
    n = x0.shape[0]
    r_tot = torch.zeros_like(x0)
    x_cur = x0.clone()
    ran = torch.zeros(n, dtype=torch.bool, device=x0.device)
    idx = torch.arange(n, device=x0.device)
    classes: torch.Tensor | None = None
    for it in range(max_iter):  # no forward pass after the last step: v takes r whether or not it crossed
        x_leaf = x_cur[idx].requires_grad_(True)
        logits = net(x_leaf)
        pred = logits.detach().argmax(dim=1)
        done = pred != label[idx] if target is None else pred == target[idx]
        if it == 0:
            ran = ~done
            if target is None:  # the candidates: the most likely classes at x0 other than the label
                scores = logits.detach().scatter(1, label.unsqueeze(1), math.inf)
                classes = scores.topk(min(candidates, scores.shape[1]), dim=1).indices[:, 1:]
        keep = (~done).nonzero().squeeze(1)
        if keep.numel() == 0:
            break
        if target is None:
            assert classes is not None
            step = closest_boundary_step(logits, x_leaf, label[idx], classes[idx], norm)
        else:  # the boundary toward the target, from whatever class the iterate is in now
            step = closest_boundary_step(logits, x_leaf, pred, target[idx].unsqueeze(1), norm)
        with torch.no_grad():
            idx = idx[keep]
            r_tot[idx] += step[keep]
            x_cur[idx] = (x0[idx] + (1 + overshoot) * r_tot[idx]).clamp_(lo, hi)
    return (1 + overshoot) * r_tot, ran


@ATTACKS.register(
    "uap", description="Universal adversarial perturbation (Moosavi-Dezfooli et al. 2017): DeepFool passes or SGD; linf, l2"
)
class UAP(GradientAttack):
    """Universal adversarial perturbations (Moosavi-Dezfooli, Fawzi, Fawzi & Frossard, CVPR 2017).

    Universal scope only (``scope: universal``; ``shared_by: set`` or ``class``): it fits v on the
    ``fit`` images and the base class applies clip(x + v) to the attacked ones and audits them.
    The untargeted goal is the paper's: k(clip(x_i + v)) != k(x_i), the clean *prediction*
    (Moosavi-Dezfooli et al.'s fooling rate, :attr:`AttackResult.fooling_rate`). Targeted
    (``fixed``): k(clip(x_i + v)) = t, fitted on the images whose label is not t.

    ``method="deepfool"`` (the paper's Algorithm 1, its defaults: ``delta`` = 0.2, i.e. stop at an
    80% fooling rate on the fit set, checked after each pass; ``overshoot`` = 0.02, ``max_iter`` = 10
    DeepFool iterations and ``candidates`` = 10 classes as in the authors' code). The paper loops
    until the rate is reached; ``max_passes`` = 10 bounds it. ``step_norm="l2"`` is the paper's
    dv_i = argmin ||r||_2 (whatever p; the projection enforces p), ``"threat"`` DeepFool in the
    threat's norm (linf: sign steps, Section 3.3 of the DeepFool paper). ``batch_size`` = 1 is the
    paper's strictly sequential update; B > 1 computes the DeepFool steps of B images at the same
    v in one batch and adds their sum before one projection (a Jacobi rather than Gauss-Seidel
    sweep: each image still moves v by its own DeepFool step, but B at a time, from the same v).

    ``method="sgd"``: ``epochs`` passes of mini-batches (``batch_size``, default 64) of projected
    ascent of sum_i min(o_i, clamp) at clip(x_i + v), o the per-example objective (``loss``: ``ce``
    J(x, k(x)) or -J(x, t); ``margin`` max_{j != k} z_j - z_k or z_t - max_{j != t} z_j), clamped at
    ``clamp`` (None: beta = 12 for the untargeted cross-entropy, the reference code's, none
    otherwise; for margin a clamp kappa >= 0 stops pushing images once fooled by kappa). The step
    is ``step_size`` (None: eps / 10) times sign(g) for linf, g / ||g||_2 for l2, then the
    projection; no host synchronisation per step.

    ``keep_best`` (default True, a deviation from both papers, which return the last iterate):
    the fit fooling rate is measured after every pass (Algorithm 1 measures it anyway, for its
    stopping rule) or epoch (one more forward pass over the fit set), and the perturbation with
    the highest rate is returned (per row under ``shared_by: class``). Algorithm 1 under a
    saturated linf ball does not converge: each sequential DeepFool update of a hard image flips
    many coordinates; on 8x8 digits at linf 0.3 the rate after a pass wanders between 0.3 and 0.5.
    Where the stopping rule fires, the last iterate is the best one anyway.

    The order of the images (per pass or epoch) is drawn from the generator, as the paper
    shuffles the data every pass.
    """

    norms: ClassVar[frozenset[Norm]] = frozenset({Norm.LINF, Norm.L2})
    targeting: ClassVar[frozenset[Targeting]] = frozenset({Targeting.UNTARGETED, Targeting.FIXED})
    scopes: ClassVar[frozenset[Scope]] = frozenset({Scope.UNIVERSAL})
    randomized: ClassVar[bool] = True
    kind: ClassVar[str] = "other"

    class Params(params.Params):
        method: Literal["deepfool", "sgd"] = "deepfool"
        #: images per update: None is 1 for deepfool (the paper's sequential update), 64 for sgd
        batch_size: params.Count | None = None
        # --- deepfool (Algorithm 1)
        #: stop once the fooling rate on the fit set reaches 1 - delta (paper: 0.2)
        delta: params.UnitInterval = 0.2
        max_passes: params.Count = 10
        #: DeepFool iterations per image and update (the authors' code: 10)
        max_iter: params.Count = 10
        overshoot: params.NonNegativeNumber = 0.02
        candidates: Annotated[params.Count, Field(ge=2)] = 10
        step_norm: Literal["l2", "threat"] = "l2"
        # --- sgd
        epochs: params.Count = 10
        step_size: params.PositiveNumber | None = None  # None: eps / 10
        loss: Literal["ce", "margin"] = "ce"
        clamp: params.Number | None = None
        # --- both
        #: return the iterate (after a pass or an epoch) with the highest fit fooling rate, not the last
        keep_best: params.Flag = True

    def _run(self, model: Handle, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
             target: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
        raise UnsupportedThreatError("attack 'uap' makes universal perturbations only: use scope: universal")

    def _fit(self, model: Handle, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
             generator: torch.Generator | None) -> torch.Tensor:
        """v of shape (1, C, H, W) (``shared_by: set``) or (K, C, H, W) (``shared_by: class``, K the
        model's number of classes; a class without fit images gets zeros)."""
        net = white_box(model)
        label = predict(net, x)  # k(x_i), the clean predictions (one forward pass over the fit set)
        classes = int(net(x[:1]).shape[1]) if threat.shared_by == "class" or threat.targeting is Targeting.FIXED else 0
        k = classes if threat.shared_by == "class" else 1
        if threat.shared_by == "class":
            if int(y.max()) >= k:
                raise ConfigError(f"fit labels go up to {int(y.max())} but the model has {k} classes")
            row = y
        else:
            row = torch.zeros_like(y)
        target: torch.Tensor | None = None
        if threat.targeting is Targeting.FIXED:
            t = int(threat.target_class)  # type: ignore[arg-type]
            if t >= classes:
                raise ConfigError(f"target_class {t} is out of range for the model's classes")
            keep = (y != t).nonzero().squeeze(1)  # an image of the target class cannot be sent there
            x, y, label, row = x[keep], y[keep], label[keep], row[keep]
            target = torch.full_like(y, t)
        v = torch.zeros(k, *x.shape[1:], dtype=x.dtype, device=x.device)
        if x.shape[0] == 0:
            return v
        if self.method == "deepfool":
            return self._fit_deepfool(net, x, label, target, row, v, threat, generator)
        return self._fit_sgd(net, x, label, target, row, v, threat, generator)

    # ------------------------------------------------------------------ Algorithm 1
    def _rates(self, net: torch.nn.Module, x: torch.Tensor, label: torch.Tensor, target: torch.Tensor | None,
               row: torch.Tensor, v: torch.Tensor, threat: ThreatModel, count: torch.Tensor) -> torch.Tensor:
        """Per row of ``v``, the share of its fit images that clip(x + v[row]) fools (meets the goal),
        float64 (R,); batched forward passes, no host synchronisation."""
        with torch.no_grad():
            pred = predict(net, threat.clip(x + v[row]))
            fooled = (pred != label if target is None else pred == target).to(torch.float64)
            return torch.zeros(v.shape[0], dtype=torch.float64, device=x.device).index_add_(0, row, fooled) / count

    @staticmethod
    def _better(rate: torch.Tensor, v: torch.Tensor, best_rate: torch.Tensor, best_v: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row, the perturbation with the higher fit fooling rate (ties: the earlier), by mask."""
        take = rate > best_rate
        return torch.where(take, rate, best_rate), torch.where(rows(take, v), v, best_v)

    def _fit_deepfool(self, net: torch.nn.Module, x: torch.Tensor, label: torch.Tensor, target: torch.Tensor | None,
                      row: torch.Tensor, v: torch.Tensor, threat: ThreatModel,
                      generator: torch.Generator | None) -> torch.Tensor:
        step_norm = Norm.L2 if self.step_norm == "l2" else threat.norm
        batch = self.batch_size or 1
        k = v.shape[0]
        count = torch.bincount(row, minlength=k).clamp_min(1).to(torch.float64)
        best_rate, best_v = torch.full((k,), -1.0, dtype=torch.float64, device=x.device), v
        open_rows = torch.ones(k, dtype=torch.bool, device=x.device)  # rows still short of 1 - delta
        for _ in range(self.max_passes):
            order = to_device(torch.randperm(x.shape[0], generator=generator), x.device)
            order = order[open_rows[row[order]]]  # the images of rows already done sit this pass out
            for chunk in order.split(batch):
                rc = row[chunk]
                with torch.no_grad():
                    xa = threat.clip(x[chunk] + v[rc])
                t = None if target is None else target[chunk]
                dv, ran = deepfool_perturbation(net, xa, label[chunk], t, step_norm, threat.bounds, self.max_iter,
                                                self.overshoot, self.candidates)
                with torch.no_grad():
                    if bool(ran.any()):  # nothing to add (and no projection) where every image is fooled
                        v = project_universal(v.index_add(0, rc, dv), threat)
            rate = self._rates(net, x, label, target, row, v, threat, count)
            best_rate, best_v = self._better(rate, v, best_rate, best_v)
            open_rows &= rate < 1 - self.delta
            if not bool(open_rows.any()):  # the paper's stopping rule: one synchronisation per pass
                break
        return best_v if self.keep_best else v

    # ------------------------------------------------------------------ SGD
    def _fit_sgd(self, net: torch.nn.Module, x: torch.Tensor, label: torch.Tensor, target: torch.Tensor | None,
                 row: torch.Tensor, v: torch.Tensor, threat: ThreatModel,
                 generator: torch.Generator | None) -> torch.Tensor:
        batch = self.batch_size or 64
        step = self.step_size if self.step_size is not None else threat.eps / 10
        clamp = self.clamp
        if clamp is None and self.loss == "ce" and target is None:
            clamp = CE_CLAMP
        k = v.shape[0]
        count = torch.bincount(row, minlength=k).clamp_min(1).to(torch.float64)
        best_rate, best_v = torch.full((k,), -1.0, dtype=torch.float64, device=x.device), v
        v = v.clone().requires_grad_(True)
        for _ in range(self.epochs):
            order = to_device(torch.randperm(x.shape[0], generator=generator), x.device)
            for chunk in order.split(batch):
                logits = net(threat.clip(x[chunk] + v[row[chunk]]))
                o = per_example_objective(self.loss, logits, label[chunk], None if target is None else target[chunk])
                if clamp is not None:
                    o = o.clamp(max=clamp)
                (g,) = torch.autograd.grad(o.sum(), v)
                with torch.no_grad():
                    # rows without an image in the batch have g = 0 and do not move
                    direction = g.sign() if threat.norm is Norm.LINF else l2_normalize(g)
                    v.copy_(project_universal(v + step * direction, threat))
            if self.keep_best:
                rate = self._rates(net, x, label, target, row, v.detach(), threat, count)
                best_rate, best_v = self._better(rate, v.detach().clone(), best_rate, best_v)
        return best_v if self.keep_best else v.detach()
