"""Expectation over Transformation (Athalye, Engstrom, Ilyas & Kwok, "Synthesizing Robust
Adversarial Examples", ICML 2018): PGD on the expected loss over a distribution of physical
transformations, so the example stays adversarial after the feed that will be scored.

EoT solves, for a distribution T of transformations t,

    x' = argmax_{x' in x + S}  E_{t ~ T} [ L(f(t(x')), y) ]

by projected gradient ascent with a Monte-Carlo gradient: each step draws ``samples``
transformations and averages grad_x L(f(t_i(x'))) over them. Plain PGD maximizes L(f(x')) and
its examples sit just past the decision boundary, where a blur, a brightness change or a JPEG
round trip brings most of them back (Kurakin et al.'s destruction rate); the expectation moves
them to where the whole neighbourhood the feed reaches is misclassified.

The distribution is a registered destruction-rate transformation
(:mod:`advbench.analysis.transformations`): by default the threat model's ``physical.transform``
(so under a ``physical:`` threat the attack optimizes for exactly the feed it is audited under),
or the ``transform`` parameter. Each step runs a differentiable version of it (:class:`EoTFeed`).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from advbench import params
from advbench.access import Handle
from advbench.analysis.transformations import (
    JPEG,
    Blur,
    Brightness,
    Chain,
    Contrast,
    Identity,
    Noise,
    Quantize8,
    Rotation,
    Transformation,
    Translation,
    make_transformation,
)
from advbench.attacks import trace
from advbench.attacks.base import white_box
from advbench.attacks.losses import l2_step_, linf_box, objective, per_example_objective, project_l2_, sign_
from advbench.attacks.pgd import PGD
from advbench.audit import goal_met
from advbench.errors import AdvbenchError, ConfigError, ModelOutputError, UnsupportedThreatError
from advbench.registry import ATTACKS
from advbench.tensors import rows, to_device
from advbench.threat import Norm, ThreatModel

#: transformations whose ``apply`` is a chain of differentiable torch ops
DIFFERENTIABLE = (Identity, Blur, Noise, Brightness, Contrast, Rotation, Translation)
#: transformations with no useful gradient (rounding, a codec outside torch): BPDA with the identity
STRAIGHT_THROUGH = (JPEG, Quantize8)


class _StraightThrough(torch.autograd.Function):
    """BPDA with the identity (Athalye, Carlini & Wagner 2018): the value of the real step, the
    gradient of x -> x. Exact in the forward pass (no ``x + (t(x) - x)`` rounding)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:  # noqa: ARG004
        return real.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ARG004
        return grad, None


class _Clip(torch.autograd.Function):
    """clamp(x, 0, 1) whose gradient passes where 0 <= x <= 1, bounds included (torch's clamp
    gives 0 at the bounds: every black background pixel of a digit would get no gradient)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        inside = (x >= 0) & (x <= 1)
        ctx.save_for_backward(inside)
        return x.clamp(0, 1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (inside,) = ctx.saved_tensors
        return grad * inside


def clip01(x: torch.Tensor) -> torch.Tensor:
    """x clipped to [0, 1] (a transformation's output range), with the gradient of the identity
    inside the interval and on its bounds, 0 outside (a saturated pixel)."""
    return _Clip.apply(x) if x.requires_grad else x.clamp(0, 1)


def straight_through(x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """``real`` (a non-differentiable map of ``x``, computed without gradients) with the
    identity's gradient: d out / d x = I."""
    return _StraightThrough.apply(x, real.detach())


def _flatten(t: Transformation) -> list[Transformation]:
    """A chain's steps, recursively (a chain clips after every step, as each step does alone)."""
    if isinstance(t, Chain):
        return [s for step in t.steps for s in _flatten(step)]
    return [t]


def _uniform(n: int, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """n draws of U[-1, 1), from the generator on its own device, moved to ``like``'s."""
    dev = generator.device if generator is not None else like.device
    u = torch.rand(n, generator=generator, device=dev, dtype=like.dtype)
    return to_device(u.mul_(2).sub_(1), like.device)


class EoTFeed:
    """A differentiable stand-in for a registered transformation, batched: ``feed(x, generator)``.

    - rotation, blur, contrast, brightness, noise, translation, identity: their own ``apply``
      (torch ops), with gradients, so the forward pass is the scoring transformation's arithmetic;
    - jpeg, quantize8: BPDA with the identity (:func:`straight_through`): the real codec or
      rounding forward, the identity backward, as Athalye et al. (2018) attack JPEG;
    - any other (plugin) transformation: its ``apply`` with gradients where that gives one,
      else the straight-through identity.

    Every step clips to [0, 1], as :class:`~advbench.analysis.transformations.Chain` does
    (:func:`clip01`: zero gradient where a pixel saturates past a bound, the identity's on it).
    Noise draws come from the generator, one independent draw per row, so rows that repeat one
    image are independent samples.

    ``random_params``: the attacker's EoT distribution widened, per row, to a uniform range
    around the identity that reaches the given value (Athalye et al. sample rotation, translation,
    brightness and contrast this way): rotation in [-|degrees|, |degrees|], translation by whole
    pixels in [-|dx|, |dx|] x [-|dy|, |dy|], brightness in [-|delta|, |delta|], contrast factor in
    [1 - |1 - f|, 1 + |1 - f|], blur sigma in [0, sigma]; noise and JPEG keep theirs. It changes the
    attacker's expectation only: the audit scores the threat's own transformation.
    """

    def __init__(self, transform: Transformation, random_params: bool = False) -> None:
        self.transform = transform
        self.steps = _flatten(transform)
        self.random_params = random_params

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        for step in self.steps:
            x = clip01(self._step(step, x, generator))
        return x

    def _step(self, step: Transformation, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if isinstance(step, STRAIGHT_THROUGH):
            return straight_through(x, step(x, generator))
        if self.random_params and isinstance(step, (Rotation, Translation, Brightness, Contrast, Blur)):
            return self._random(step, x, generator)
        if isinstance(step, DIFFERENTIABLE):
            return step.apply(x, generator)
        return self._unknown(step, x, generator)

    @staticmethod
    def _unknown(step: Transformation, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """A plugin transformation: its gradient if ``apply`` has one, else straight through."""
        if not (torch.is_grad_enabled() and x.requires_grad):
            return step.apply(x, generator)
        state = generator.get_state() if generator is not None else None
        try:
            out = step.apply(x, generator)
        except RuntimeError:  # e.g. .numpy() on a tensor that requires grad
            if generator is not None:
                generator.set_state(state)  # the draws the real step takes are the same
            return straight_through(x, step(x, generator))
        return out if out.requires_grad else straight_through(x, out)

    @staticmethod
    def _random(step: Transformation, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """``step`` with its parameter drawn per row (see the class docstring)."""
        n, c, h, w = x.shape
        u = _uniform(n, generator, x)  # U[-1, 1) per row
        col = u.view(-1, 1, 1, 1)
        if isinstance(step, Brightness):
            return x + abs(step.delta) * col
        if isinstance(step, Contrast):
            m = x.mean(dim=(1, 2, 3), keepdim=True)
            return m + (1 + abs(1 - step.factor) * col) * (x - m)
        if isinstance(step, Rotation):
            a = torch.deg2rad(abs(step.degrees) * u)
            cos, sin = a.cos(), a.sin()
            zero = torch.zeros_like(a)
            theta = torch.stack([torch.stack([cos, -sin * h / w, zero], 1), torch.stack([sin * w / h, cos, zero], 1)], 1)
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            return F.grid_sample(x, grid, mode="bilinear", padding_mode=step.padding, align_corners=False)
        if isinstance(step, Translation):
            v = _uniform(n, generator, x)
            # a whole shift uniform in [-d, d]: floor(U[0, 1) (2d + 1)) - d
            dx = ((u + 1) / 2 * (2 * abs(step.dx) + 1)).floor().long().clamp(max=2 * abs(step.dx)) - abs(step.dx)
            dy = ((v + 1) / 2 * (2 * abs(step.dy) + 1)).floor().long().clamp(max=2 * abs(step.dy)) - abs(step.dy)
            r = torch.arange(h, device=x.device).view(1, -1) - dy.view(-1, 1)  # (n, h)
            q = torch.arange(w, device=x.device).view(1, -1) - dx.view(-1, 1)  # (n, w)
            out = x.gather(2, r.clamp(0, h - 1).view(n, 1, h, 1).expand(n, c, h, w))
            out = out.gather(3, q.clamp(0, w - 1).view(n, 1, 1, w).expand(n, c, h, w))
            if step.padding == "zeros":
                inside = ((r >= 0) & (r < h)).view(n, 1, h, 1) & ((q >= 0) & (q < w)).view(n, 1, 1, w)
                out = out * inside.to(x.dtype)
            return out
        # blur: sigma uniform in [0, sigma] per row, one kernel per row (a grouped convolution)
        if step.sigma == 0:
            return x.clone()
        radius = math.ceil(3 * step.sigma)
        sigma = (step.sigma * (u + 1) / 2).clamp_min(1e-3).view(-1, 1)  # (n, 1); ~0: a delta kernel
        i = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype).view(1, -1)
        k = torch.exp(-(i**2) / (2 * sigma**2))
        k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (n * c, 2r + 1)
        planes = x.reshape(1, n * c, h, w)
        planes = F.conv2d(F.pad(planes, (radius, radius, 0, 0), mode="replicate"), k.view(n * c, 1, 1, -1), groups=n * c)
        planes = F.conv2d(F.pad(planes, (0, 0, radius, radius), mode="replicate"), k.view(n * c, 1, -1, 1), groups=n * c)
        return planes.reshape(n, c, h, w)


@ATTACKS.register("eot-pgd", description="PGD over the expectation of a physical transformation (Athalye et al. 2018); linf, l2")
class EoTPGD(PGD):
    """Expectation over Transformation PGD (Athalye, Engstrom, Ilyas & Kwok, ICML 2018).

    x^{k+1} = Proj_{x+S}( x^k + alpha s(g^k) ),  g^k = (1/m) sum_{i=1}^m grad_x L(f(t_i(x^k))),
    t_1..t_m ~ T drawn afresh every step (``samples`` = m), s = sign for linf and g / ||g||_2 for
    l2, L the cross-entropy or the margin (as :class:`~advbench.attacks.pgd.PGD`). The m samples
    are stacked along the batch: one forward and one backward of N m rows per step, no host
    synchronisation in the loop (but the JPEG codec's, which runs on the host). The transformations are run differentiably (:class:`EoTFeed`:
    torch ops where they exist, BPDA with the identity for JPEG and 8-bit rounding), from the
    attack's generator, never from the threat's scoring seed.

    T is ``transform`` (a registered transformation's name or ``{name, **params}``) if given, else
    the threat model's ``physical.transform``; with neither the attack refuses the threat (a
    transformation is needed to take the expectation over). Under ``quantize: 8bit`` the 8-bit
    rounding the audit applies first is in the feed too (straight through).

    Final selection (``select="best"``): per example, the iterate (x^0 .. x^K, each scored on the
    m samples its step drew, x^K on one more forward pass) with the highest share of sampled
    transformations that meet the goal, ties to the higher mean loss; the share is the attacker's
    own estimate of what the audit will see. ``select="last"`` returns x^K. ``restarts`` > 1
    reruns from new random starts on the examples whose estimated share misses the rule
    (``physical.rule``: all, or a strict majority; ``all`` without a physical field), keeping per
    example the best by the same order. Step size, steps, random start: as PGD (``step_size``
    2.5 eps / steps by default).
    """

    made_for_text: ClassVar[str] = "threat models with a physical feed (physical: {transform: photo})"

    class Params(PGD.Params):
        transform: str | dict[str, Any] | None = None  # None: the threat model's physical transform
        samples: params.Count = 8
        random_params: params.Flag = False
        select: Literal["best", "last"] = "best"

    def setup(self) -> None:
        try:
            self._transform = None if self.transform is None else make_transformation(self.transform)
        except AdvbenchError as exc:  # an unknown name or a bad parameter: one line naming the attack
            raise ConfigError(f"attack {self.name!r}: transform: {exc}") from None

    @property
    def randomized(self) -> bool:  # type: ignore[override]
        """Always: the transformations' draws come from the generator, whatever the start."""
        return True

    def made_for(self, threat: ThreatModel) -> bool:
        """Threat models with a physical feed (unless the attack brings its own transformation)."""
        return super().made_for(threat) and (self._transform is not None or threat.physical is not None)

    def supports(self, threat: ThreatModel) -> str | None:
        """The base checks, and that there is a transformation to take the expectation over."""
        reason = super().supports(threat)
        if reason is None and self._transform is None and threat.physical is None:
            return (f"attack {self.name!r} needs a transformation to take the expectation over: give the threat "
                    "model a physical field (physical: {transform: photo}) or the attack a transform parameter")
        return reason

    def feed(self, threat: ThreatModel) -> EoTFeed:
        """The differentiable transformation the attack takes the expectation over under ``threat``."""
        if self._transform is not None:
            return EoTFeed(self._transform, self.random_params)
        if threat.physical is None:
            raise UnsupportedThreatError(self.supports(threat) or "no transformation")
        return EoTFeed(threat.physical.build(), self.random_params)

    # ------------------------------------------------------------------ one run
    def _eot_once(
        self,
        net: torch.nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        threat: ThreatModel,
        target: torch.Tensor | None,
        generator: torch.Generator | None,
        feed: EoTFeed,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One EoT-PGD run: (selected iterate, its estimated share of draws that meet the goal,
        its mean loss over the draws), per example."""
        n, m = x.shape[0], self.samples
        tile = (m, *([1] * (x.dim() - 1)))
        ys = y.repeat(m)  # row i * n + j is sample i of example j
        ts = None if target is None else target.repeat(m)
        fn = objective(self.loss, ys, ts)
        step_size = self._step_size(threat)
        x_rep = x.repeat(tile) if threat.quantize == "8bit" else None
        if threat.norm is Norm.LINF:
            lower, upper = linf_box(x, threat.eps, threat.bounds)
        keep_best = self.select == "best"
        best = x.clone()
        best_share = torch.full((n,), -1.0, device=x.device)
        best_loss = torch.full((n,), float("-inf"), device=x.device)
        watch = trace.run(self.steps)
        with torch.enable_grad():
            x_adv = self._start(x, threat, generator).detach().clone().requires_grad_(True)
            for k in range(self.steps + 1):  # the last pass only scores the final iterate
                last = k == self.steps
                with torch.set_grad_enabled(not last):
                    xs = x_adv.repeat(tile)
                    if x_rep is not None:  # the audit rounds to 8 bits before the feed
                        xs = straight_through(xs, threat.quantized(xs.detach(), x_rep))
                    logits = net(feed(xs, generator))
                    if not last:
                        grad = self._grad(fn(logits), x_adv)
                with torch.no_grad():
                    logits = logits.detach()
                    share = goal_met(logits.argmax(dim=1), ys, ts).view(m, n).float().mean(dim=0)
                    loss = per_example_objective(self.loss, logits, ys, ts).float().view(m, n).mean(dim=0)
                    if watch is not None and not last:  # the recorder sees the EoT view: the mean logits
                        watch.see(x_adv, logits.view(m, n, -1).mean(dim=0), loss.mean())
                    if keep_best or last:
                        better = (share > best_share) | ((share == best_share) & (loss >= best_loss)) | (not keep_best)
                        best = torch.where(rows(better, x), x_adv.detach(), best)
                        best_share = torch.where(better, share, best_share)
                        best_loss = torch.where(better, loss, best_loss)
                    if last:
                        break
                    if threat.norm is Norm.LINF:
                        x_adv.add_(sign_(grad), alpha=step_size).clamp_(lower, upper)
                    else:
                        project_l2_(l2_step_(x_adv, grad, step_size), x, threat.eps, threat.bounds)
        if watch is not None:
            watch.close()
        return best, best_share, best_loss

    @staticmethod
    def _grad(value: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
        """grad of the summed objective w.r.t. the iterate (its m stacked copies add up)."""
        if not value.requires_grad:
            raise ModelOutputError("the model's logits do not depend differentiably on its input (a detach, "
                                   "torch.no_grad inside the model?); eot-pgd needs a differentiable model or a "
                                   "BPDA surrogate")
        (grad,) = torch.autograd.grad(value, x_adv, allow_unused=True)
        return torch.zeros_like(x_adv) if grad is None else grad

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
        feed = self.feed(threat)
        if self.restarts == 1:
            return self._eot_once(net, x, y, threat, target, generator, feed)[0]
        majority = threat.physical is not None and threat.physical.rule == "majority"
        best = x.clone()
        best_share = torch.full((x.shape[0],), -1.0, device=x.device)
        best_loss = torch.full((x.shape[0],), float("-inf"), device=x.device)
        idx = torch.arange(x.shape[0], device=x.device)
        for r in range(self.restarts):  # one host synchronisation per restart, none per step
            if r > 0:
                done = best_share > 0.5 if majority else best_share >= 1
                idx = (~done).nonzero().squeeze(1)  # later restarts: only the examples still failing
                if idx.numel() == 0:
                    break
            t = None if target is None else target[idx]
            with trace.rows_of(idx):
                x_r, share, loss = self._eot_once(net, x[idx], y[idx], threat, t, generator, feed)
            take = (share > best_share[idx]) | ((share == best_share[idx]) & (loss > best_loss[idx]))
            best[idx] = torch.where(rows(take, x_r), x_r, best[idx])
            best_share[idx] = torch.where(take, share, best_share[idx])
            best_loss[idx] = torch.where(take, loss, best_loss[idx])
        return best

