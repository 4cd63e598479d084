"""Adversarial patches (Brown, Mané, Roy, Abadi & Gilmer, "Adversarial Patch", 2017,
arXiv:1712.09665): universal, and per example.

A patch is a square of pixels (all channels) that replaces the image where it is pasted. Its
threat model is a region, ``region: {size: S, location: fixed|random|any}``, with ``norm:
unbounded`` (any value within the bounds: the classic patch) or a linf / l2 budget inside the
square (individual scope only); nothing outside the square may change.

**Universal scope** (``scope: universal``, ``_fit``): Brown et al.'s patch. One patch p (C, S, S)
(one per class with ``shared_by: class``) is trained on the fit images to maximize

    E_{x ~ X, l ~ L, t ~ T} [ log Pr(y_hat | A(p, x, l, t)) ]

(their Eq. 1), A pasting the patch p, transformed by t, at location l into the image x, and
y_hat the target class (``targeting: fixed``: Brown's "toaster"); untargeted it maximizes the
loss of the true label instead. The expectation over locations, an Expectation over
Transformation (Athalye et al.), is one random corner per image and step, drawn from the
generator (the fixed corner with ``location: fixed``). Over transformations it is optional:
``scale`` [lo, hi] (uniform) and ``rotation`` (uniform in [-rotation, rotation] degrees) resample
the patch inside its square (``affine_grid``/``grid_sample``, bilinear, the parts that leave the
square dropped, the image showing through what the patch does not cover). These are
**training-time augmentations only**: at evaluation the base class pastes the patch untransformed
at the evaluation's corners (:func:`advbench.audit.apply_universal`), so they buy robustness to
transformations (the paper's setting for a printed patch) at some cost in digital success.
The patch starts uniform in the bounds and takes ``epochs`` passes over the fit set in shuffled
mini-batches of ``batch_size``, each step Adam (``optimizer: adam``, steps of about ``lr`` times
the input range) or a sign-gradient step of ``lr`` times the range (``optimizer: sign``), the
patch clipped into the bounds after every step.

**Individual scope** (``_run_in_region``): projected gradient ascent (Madry et al.'s PGD) on the
pixels of each example's square only: the feasible box of every element outside the square is
the single value x, so sign steps clamped into it (linf, unbounded) or an l2 step of a gradient
masked to the square (l2) leave every other pixel exactly as it was. ``random_start`` draws the
start uniformly inside the square (in the bounds, or in the eps-ball), ``restarts`` rerun the
examples still failing from new starts. With ``location: any`` the attack chooses each example's
square: ``candidates`` corners per example, the one whose square has the largest input-gradient
saliency sum_{pixels, channels} |grad_x L(x, y)| (the first-order gain of an linf step confined
to that square) and ``candidates - 1`` drawn uniformly, are attacked in batches of at most
``max_batch`` rows (examples times candidates: on a CPU a bigger batch of images falls out of
cache and costs more per row), and per example the first successful candidate is kept, else the
one of highest loss. The saliency square alone (``candidates: 1``) costs one gradient more than a
given square.

Without a region (a plain Lp threat model) the whole image is the square: the attack is PGD in
the ball (and, for ``unbounded``, in the box).
"""

from __future__ import annotations

import math
from typing import Annotated, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from advbench import params
from advbench.access import Handle
from advbench.attacks import trace
from advbench.attacks.base import GradientAttack, white_box
from advbench.attacks.losses import ascend_l2, ascend_linf, input_gradient, linf_box, objective, per_example_objective
from advbench.audit import goal_met, region_mask
from advbench.registry import ATTACKS
from advbench.tensors import rand_like, randn_like, rows, to_device
from advbench.threat import Norm, Scope, Targeting, ThreatModel, quantize_8bit

ADAM_BETAS = (0.9, 0.999)  # Kingma & Ba's defaults
ADAM_EPS = 1e-8


# ---------------------------------------------------------------------- pasting
def paste(x: torch.Tensor, patch: torch.Tensor, corners: torch.Tensor) -> torch.Tensor:
    """``x`` (N, C, H, W) with ``patch`` (N, C, S, S) pasted at each example's ``corners`` (N, 2):
    the same values :func:`advbench.audit.apply_universal` gives, differentiable in ``patch``."""
    n, s = x.shape[0], patch.shape[-1]
    ar = torch.arange(s, device=x.device)
    r = corners[:, 0].view(n, 1, 1) + ar.view(1, s, 1)
    c = corners[:, 1].view(n, 1, 1) + ar.view(1, 1, s)
    b = torch.arange(n, device=x.device).view(n, 1, 1)
    out = x.permute(0, 2, 3, 1).index_put((b, r, c), patch.to(x.dtype).permute(0, 2, 3, 1))
    return out.permute(0, 3, 1, 2)


def paste_transformed(x: torch.Tensor, patch: torch.Tensor, corners: torch.Tensor, scale: torch.Tensor,
                      angle: torch.Tensor) -> torch.Tensor:
    """``x`` with ``patch`` (N, C, S, S), scaled by ``scale`` (N,) and rotated by ``angle`` (N,
    radians) about its centre, composited into each example's square at ``corners`` (bilinear;
    what leaves the square is dropped, and the image shows where the patch does not reach).

    One ``affine_grid`` maps the image's normalized coordinates u to the patch's: with no
    transformation, pixel column j = c0 + i reads patch column i, i.e. v = (W/S) u + (W - 2 c0)/S - 1
    (``align_corners=False``), and likewise for rows; the transformation multiplies that by
    R(-angle) / scale (the inverse map, as ``grid_sample`` reads the source)."""
    n, _, h, w = x.shape
    s = patch.shape[-1]
    dt = x.dtype
    r0, c0 = corners[:, 0].to(dt), corners[:, 1].to(dt)
    cos, sin = torch.cos(angle).to(dt), torch.sin(angle).to(dt)
    inv = (1.0 / scale).to(dt)
    ax, ay = w / s, h / s  # the diagonal D
    tx, ty = (w - 2 * c0) / s - 1, (h - 2 * r0) / s - 1  # the translation t
    # theta = (1/scale) R(-angle) [D | t], R(-angle) = [[cos, sin], [-sin, cos]]
    theta = torch.stack([
        torch.stack([cos * ax, sin * ay, cos * tx + sin * ty], dim=1),
        torch.stack([-sin * ax, cos * ay, -sin * tx + cos * ty], dim=1),
    ], dim=1) * inv.view(n, 1, 1)
    grid = F.affine_grid(theta, [n, 1, h, w], align_corners=False)
    colour = F.grid_sample(patch.to(dt), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    alpha = F.grid_sample(torch.ones(n, 1, s, s, dtype=dt, device=x.device), grid, mode="bilinear",
                          padding_mode="zeros", align_corners=False)
    return x * (1 - alpha) + colour  # colour is alpha times the covered patch pixels' mean


def _randint(high: int, n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    dev = generator.device if generator is not None else device
    return to_device(torch.randint(0, high, (n,), generator=generator, device=dev), device)


def _rand(n: int, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    return rand_like(like.new_empty(n), generator)


def random_corners(n: int, size: int, height: int, width: int, generator: torch.Generator | None,
                   device: torch.device) -> torch.Tensor:
    """(N, 2) corners drawn uniformly among those that keep a ``size`` square inside the image."""
    return torch.stack([_randint(height - size + 1, n, generator, device),
                        _randint(width - size + 1, n, generator, device)], dim=1)


def saliency_corners(grad: torch.Tensor, size: int) -> torch.Tensor:
    """Per example (N, 2), the corner of the ``size`` square with the largest sum of |grad|
    over its pixels and channels (a box sum: ``avg_pool2d`` with stride 1)."""
    sal = F.avg_pool2d(grad.abs().sum(dim=1, keepdim=True), size, stride=1)  # (N, 1, H-S+1, W-S+1)
    cols = sal.shape[-1]
    best = sal.flatten(1).argmax(dim=1)
    return torch.stack([best // cols, best % cols], dim=1)


# ---------------------------------------------------------------------- the attack
@ATTACKS.register("patch", description="Adversarial patch (Brown et al. 2017): universal with EoT over location, "
                                       "scale, rotation; per example PGD inside the square; regions")
class Patch(GradientAttack):
    """Adversarial patches, universal (Brown et al.'s EoT training) or per example (PGD in the
    square); see the module docstring for the definitions and defaults."""

    norms: ClassVar[frozenset[Norm]] = frozenset({Norm.UNBOUNDED, Norm.LINF, Norm.L2})
    targeting: ClassVar[frozenset[Targeting]] = frozenset(Targeting)  # universal: untargeted or fixed only
    scopes: ClassVar[frozenset[Scope]] = frozenset({Scope.INDIVIDUAL, Scope.UNIVERSAL})
    regions: ClassVar[bool] = True
    made_for_text: ClassVar[str] = "threat models with a region (region: {size: S, location: random})"
    randomized: ClassVar[bool] = True
    kind: ClassVar[str] = "iterative"

    class Params(params.Params):
        # ---- per example (PGD in the square)
        steps: params.Count = 100
        #: None: 2.5 r / steps, r = eps (linf, l2) or the input range (unbounded), PGD's rule
        step_size: params.PositiveNumber | None = None
        random_start: params.Flag = True
        restarts: params.Count = 1
        #: location any: squares tried per example (the most salient one and candidates - 1 random)
        candidates: params.Count = 4
        #: location any: the most rows (examples x candidates) in one PGD batch (on a GPU, raise it)
        max_batch: params.Count = 256
        #: the objective ascended, per example and universal alike (see advbench.attacks.losses)
        loss: Literal["ce", "margin"] = "ce"
        # ---- universal (Brown et al.'s EoT training)
        epochs: params.Count = 10
        batch_size: params.Count = 64
        #: the step, as a share of the input range (Adam: its step size; sign: the step itself)
        lr: params.PositiveNumber = 0.05
        optimizer: Literal["adam", "sign"] = "adam"
        #: training-time scale of the patch inside its square, uniform in [lo, hi]
        scale: tuple[params.PositiveNumber, params.PositiveNumber] = (1.0, 1.0)
        #: training-time rotation, uniform in [-rotation, rotation] degrees
        rotation: Annotated[params.NonNegativeNumber, Field(le=180)] = 0.0

        @model_validator(mode="after")
        def _check(self) -> Patch.Params:
            if self.restarts > 1 and not self.random_start:
                raise ValueError("restarts > 1 needs random_start=True (every restart would repeat the first)")
            if self.scale[0] > self.scale[1]:
                raise ValueError(f"scale must be [lo, hi] with lo <= hi, got {list(self.scale)}")
            return self

    def made_for(self, threat: ThreatModel) -> bool:
        """Region threat models only: without a region the patch attack would be PGD over the
        whole image (which it can still be run as, from Python), a row pgd already gives."""
        return super().made_for(threat) and threat.region is not None

    def supports(self, threat: ThreatModel) -> str | None:
        """The base checks; a universal patch is pasted content, so it needs a region and norm unbounded."""
        reason = super().supports(threat)
        if reason is None and threat.scope is Scope.UNIVERSAL:
            if threat.region is None:
                return (f"attack {self.name!r} fits a universal patch, which needs a region "
                        "(region: {size: S, location: random}); for an additive universal perturbation use uap")
        return reason

    # ------------------------------------------------------------------ per example
    def _step_size(self, threat: ThreatModel) -> float:
        if self.step_size is not None:
            return self.step_size
        radius = threat.bounds[1] - threat.bounds[0] if threat.norm is Norm.UNBOUNDED else threat.eps
        return 2.5 * radius / self.steps

    def _start(self, x: torch.Tensor, threat: ThreatModel, generator: torch.Generator | None,
               mask: torch.Tensor | None) -> torch.Tensor:
        """A uniform draw inside the square: in the bounds (unbounded), or the eps-ball (linf:
        per element; l2: a Gaussian direction with radius eps u^(1/d), d the square's elements)."""
        if not self.random_start:
            return x
        lo, hi = threat.bounds
        if threat.norm is Norm.UNBOUNDED:
            start = rand_like(x, generator).mul_(hi - lo).add_(lo)
        elif threat.norm is Norm.LINF:
            start = (x + rand_like(x, generator).mul_(2).sub_(1).mul_(threat.eps)).clamp_(lo, hi)
        else:
            direction = randn_like(x, generator)
            if mask is not None:
                direction = direction * mask
                d = mask.expand_as(x).flatten(1).sum(dim=1).to(x.dtype)
            else:
                d = torch.full((x.shape[0],), float(x[0].numel()), dtype=x.dtype, device=x.device)
            u = _rand(x.shape[0], generator, x)
            norm = direction.flatten(1).norm(p=2, dim=1).clamp_min(1e-12)
            direction = direction * rows(threat.eps * u.pow(1.0 / d) / norm, x)
            start = threat.project(x + direction, x)
        return start if mask is None else torch.where(mask, start, x)

    def _once(self, net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
              target: torch.Tensor | None, generator: torch.Generator | None,
              mask: torch.Tensor | None) -> torch.Tensor:
        """One PGD run changing only the pixels where ``mask`` (N, 1, H, W) is True (all: None)."""
        start = self._start(x, threat, generator, mask)
        step, fn = self._step_size(threat), objective(self.loss, y, target)
        if threat.norm is Norm.L2:
            model = net if mask is None else (lambda z: net(torch.where(mask, z, x)))  # gradient 0 outside
            return ascend_l2(model, x, start, threat.eps, threat.bounds, step, self.steps, fn)  # type: ignore[arg-type]
        lo, hi = threat.bounds
        if threat.norm is Norm.LINF:
            lower, upper = linf_box(x, threat.eps, threat.bounds)
        else:
            lower, upper = torch.full_like(x, lo), torch.full_like(x, hi)
        if mask is not None:  # outside the square the box is the point x itself
            lower, upper = torch.where(mask, lower, x), torch.where(mask, upper, x)
        return ascend_linf(net, start, lower, upper, step, self.steps, fn)

    @torch.no_grad()
    def _score(self, net: torch.nn.Module, x_adv: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
               target: torch.Tensor | None, threat: ThreatModel) -> tuple[torch.Tensor, torch.Tensor]:
        """Per example: whether ``x_adv`` meets the goal (after 8-bit rounding too, if asked) and its objective."""
        logits = net(x_adv)
        loss = per_example_objective(self.loss, logits, y, target).float()
        success = goal_met(logits.argmax(dim=1), y, target)
        if threat.quantize == "8bit":
            success &= goal_met(net(threat.quantized(x_adv, x)).argmax(dim=1), y, target)
        return success, loss

    def _candidates(self, net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
                    target: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
        """(N, candidates, 2) corners: the most salient square first, then uniform draws."""
        s = threat.region.size  # type: ignore[union-attr]
        n, _, h, w = x.shape
        grad = input_gradient(net, x, objective(self.loss, y, target))
        first = saliency_corners(grad, s).unsqueeze(1)
        if self.candidates == 1:
            return first
        others = random_corners(n * (self.candidates - 1), s, h, w, generator, x.device).view(n, -1, 2)
        return torch.cat([first, others], dim=1)

    def _attempt(self, net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
                 target: torch.Tensor | None, generator: torch.Generator | None,
                 corners: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One restart on these rows: (x_adv, success, objective). ``corners`` None under a region
        located ``any``: the candidate squares are attacked as one batch and the best is kept."""
        region = threat.region
        if region is None or corners is not None:
            mask = None if region is None else region_mask(corners, region.size, x.shape[2], x.shape[3])
            x_adv = self._once(net, x, y, threat, target, generator, mask)
            return (x_adv, *self._score(net, x_adv, x, y, target, threat))
        cand = self._candidates(net, x, y, threat, target, generator)
        n, k = cand.shape[:2]
        group = max(1, min(k, self.max_batch // n))  # candidates per PGD batch
        best, best_success = x, torch.zeros_like(y, dtype=torch.bool)
        best_key = torch.full((n,), -math.inf, device=x.device)
        best_loss = best_key.clone()
        for j0 in range(0, k, group):  # a few groups; no host synchronisation
            g = min(group, k - j0)
            xr, yr = x.repeat_interleave(g, dim=0), y.repeat_interleave(g, dim=0)
            tr = None if target is None else target.repeat_interleave(g, dim=0)
            mask = region_mask(cand[:, j0:j0 + g].reshape(n * g, 2), region.size, x.shape[2], x.shape[3])
            with trace.rows_of(torch.arange(n, device=x.device).repeat_interleave(g)):
                x_adv = self._once(net, xr, yr, threat, tr, generator, mask)
            success, loss = self._score(net, x_adv, xr, yr, tr, threat)
            key = torch.where(success, torch.full_like(loss, math.inf), loss).view(n, g)
            top, pick = key.max(dim=1)  # within the group: the first success, else the best loss
            pick = torch.arange(n, device=x.device) * g + pick
            take = top > best_key  # across groups: strictly better only, so earlier candidates win ties
            best = torch.where(rows(take, x), x_adv[pick], best)
            best_success = torch.where(take, success[pick], best_success)
            best_loss = torch.where(take, loss[pick], best_loss)
            best_key = torch.where(take, top, best_key)
        return best, best_success, best_loss

    def _search(self, net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
                target: torch.Tensor | None, generator: torch.Generator | None,
                corners: torch.Tensor | None) -> torch.Tensor:
        """``restarts`` attempts, later ones on the examples still failing only; per example the
        first successful result, else the one with the highest objective (as PGD)."""
        if self.restarts == 1:
            if threat.region is None or corners is not None:  # no choice to make: no scoring pass
                mask = None if threat.region is None else region_mask(corners, threat.region.size, x.shape[2], x.shape[3])
                return self._once(net, x, y, threat, target, generator, mask)
            return self._attempt(net, x, y, threat, target, generator, corners)[0]
        best = x.clone()
        best_loss = torch.full((x.shape[0],), float("-inf"), device=x.device)
        done = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        idx = torch.arange(x.shape[0], device=x.device)
        for r in range(self.restarts):  # one host synchronisation per restart, none per step
            if r > 0:
                idx = (~done).nonzero().squeeze(1)
                if idx.numel() == 0:
                    break
            t = None if target is None else target[idx]
            c = None if corners is None else corners[idx]
            with trace.rows_of(idx):
                x_r, success, loss = self._attempt(net, x[idx], y[idx], threat, t, generator, c)
            take = success | (loss > best_loss[idx])
            best[idx] = torch.where(rows(take, x_r), x_r, best[idx])
            best_loss[idx] = torch.where(take, loss, best_loss[idx])
            done[idx] = success
        return best

    def _run(self, model: Handle, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
             target: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
        """No region: the whole image is the square (PGD in the ball; in the box for unbounded)."""
        return self._search(white_box(model), x, y, threat, target, generator, None)

    def _run_in_region(self, model: Handle, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
                       target: torch.Tensor | None, generator: torch.Generator | None,
                       corners: torch.Tensor | None) -> torch.Tensor:
        return self._search(white_box(model), x, y, threat, target, generator, corners)

    # ------------------------------------------------------------------ universal
    def _fit(self, model: Handle, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
             generator: torch.Generator | None) -> torch.Tensor:
        """Brown et al.'s patch, (1, C, S, S) or (K, C, S, S) per class, trained on ``x`` with EoT."""
        net = white_box(model)
        region = threat.region
        assert region is not None  # supports() refuses a universal threat without one
        s, (lo, hi) = region.size, threat.bounds
        n, c, h, w = x.shape
        with torch.no_grad():
            k = net(x[:1]).shape[1] if threat.shared_by == "class" else 1  # one patch per class
        patch = rand_like(x.new_empty(k, c, s, s), generator).mul_(hi - lo).add_(lo)
        m, v = torch.zeros_like(patch), torch.zeros_like(patch)
        lr = self.lr * (hi - lo)
        transformed = self.scale != (1.0, 1.0) or self.rotation > 0
        fixed = None if region.location != "fixed" else torch.tensor([list(region.at)], device=x.device)  # type: ignore[arg-type]
        t = 0
        dev = generator.device if generator is not None else x.device
        for _ in range(self.epochs):
            perm = to_device(torch.randperm(n, generator=generator, device=dev), x.device)
            for idx in perm.split(self.batch_size):
                b = idx.shape[0]
                xb, yb = x[idx], y[idx]
                corners = fixed.expand(b, 2) if fixed is not None else random_corners(b, s, h, w, generator, x.device)
                scale = angle = None
                if transformed:
                    lo_s, hi_s = self.scale
                    scale = _rand(b, generator, x).mul_(hi_s - lo_s).add_(lo_s)
                    angle = _rand(b, generator, x).mul_(2).sub_(1).mul_(math.radians(self.rotation))
                target = None if threat.targeting is Targeting.UNTARGETED else torch.full_like(yb, int(threat.target_class))  # type: ignore[arg-type]
                with torch.enable_grad():
                    leaf = patch.detach().requires_grad_(True)
                    pb = leaf[yb] if threat.shared_by == "class" else leaf.expand(b, c, s, s)
                    x_in = paste(xb, pb, corners) if scale is None else paste_transformed(xb, pb, corners, scale, angle)
                    # the batch mean of log p(target) (targeted) or of the true label's loss: ascended
                    value = per_example_objective(self.loss, net(x_in), yb, target).mean()
                    (grad,) = torch.autograd.grad(value, leaf)
                t += 1
                with torch.no_grad():
                    if self.optimizer == "sign":
                        patch.add_(grad.sign(), alpha=lr)
                    else:  # Adam (Kingma & Ba), ascending; bias corrections from the host's step count
                        b1, b2 = ADAM_BETAS
                        m.mul_(b1).add_(grad, alpha=1 - b1)
                        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                        denom = (v / (1 - b2**t)).sqrt_().add_(ADAM_EPS)
                        patch.addcdiv_(m, denom, value=lr / (1 - b1**t))
                    patch.clamp_(lo, hi)
        if threat.quantize == "8bit":  # the patch on the 256-level grid, as a saved patch would be
            patch = quantize_8bit(patch, threat.bounds)
        return patch
