"""FAB, the Fast Adaptive Boundary attack (Croce & Hein, "Minimally distorted adversarial examples
with a fast adaptive boundary attack", ICML 2020): minimal linf, l2 and l1 perturbations.

Each iteration linearizes the classifier at the current point x_k. With f = z_l - z_y (z the
logits, y the true class) and w = grad_x f at x_k, the decision boundary toward class l becomes
the hyperplane pi = {z : f + <w, z - x_k> = 0}; untargeted, l is the class of the closest
linearized boundary, l = argmin_{l != y} |f_l| / ||w_l||_q (q the dual norm: 1 for linf, 2 for
l2, inf for l1); targeted, l is the target (one gradient per iteration). Both the current point
and the original point x are projected onto pi intersected with the box [bounds] in the
attack's norm (:func:`project_halfspace_box`, exact), giving steps d_k and d_0, and

    alpha = min(||d_k|| / (||d_k|| + ||d_0||), alpha_max)
    x_{k+1} = clip((1 - alpha) (x_k + eta d_k) + alpha (x + eta d_0))

(the extrapolation: a biased step toward the original point, overshooting the boundary by eta).
Where x_{k+1} is adversarial it is recorded if it is the closest adversarial point so far, and
then pulled back toward x: x_{k+1} = x + beta (x_{k+1} - x) (the backward step). Defaults are
the reference code's (pyautoattack's ``FABAttack_PT``): ``steps`` 100, ``alpha_max`` 0.1,
``eta`` 1.05, ``beta`` 0.9, ``restarts`` 1; the first run starts at x, every further restart at
a random point (below). ``fab-t`` (FAB-T, as AutoAttack runs it) attacks an untargeted threat
model through targets: for each of the ``targets`` (9) most likely classes of the clean input
other than the true one, in order, ``restarts`` targeted runs.

A minimal-perturbation attack (:mod:`advbench.attacks.base`): ``_run`` returns, per example,
the smallest adversarial example found over all runs (every restart and every target), or x
where none was found, and never reads eps; the base class scores it at every eps. Where the
reference differs, and why:

- the reference's ``perturb`` runs each later restart (and, for FAB-T, each later target) only on
  the examples not yet broken within eps, and keeps the first example found within eps. Without
  an eps, every run goes over every example and the smallest adversarial example over all runs
  is kept: an example is then broken at eps exactly when some run found a perturbation within
  eps, which is the reference's robust accuracy at that eps, at the cost of the runs the
  reference skips on examples it has already broken;
- the reference draws a restart's start in the ball of radius min(res2, eps) / 2, res2 meant to
  be the best distance so far but reset to 1e10 before the draw, so effectively eps / 2. Here
  the radius is half the smallest adversarial perturbation found so far for the example (the
  same formula without the budget) and, where none has been found, half of ``start_radius``
  (default: the reference's default eps for the norm, linf 0.3, l2 1.0, l1 5.0, times the width
  of the bounds). Starts are drawn from the call's generator: linf uniform in [-1, 1]^d scaled
  to the sphere, l2 and l1 a normal draw scaled to the sphere, then clipped into the bounds;
- FAB-T's runs linearize z_t - z_y and count an example as adversarial when it is misclassified
  (the reference's targeted runs). ``fab`` under a targeted threat model (which the reference
  does not have) counts the target only, and linearizes z_t - z_r, r the largest class other
  than t at x_k (y while y leads, so the reference's as long as no third class takes over): past
  a third class's boundary, z_t - z_y no longer describes the goal and the steps stall there;
- untargeted, the K - 1 gradients of z_l - z_y come from K - 1 backward passes through one
  forward graph, each over the whole batch, keeping a running closest class (the reference
  backpropagates each of the K logits and takes the differences afterwards);
- the projections are exact (float64, by sorting) with no thresholds (the reference treats
  |w_i| < 1e-8 as zero for l2); where the box does not reach the hyperplane, the projection is
  the corner of the box furthest along w (what the reference's l2 and l1 projections return and
  its linf one reaches after clipping);
- under ``quantize: 8bit`` an adversarial point is recorded only where its 8-bit rounding is
  adversarial too (:func:`advbench.audit.reached`), so the example returned survives the audit.

Cost per iteration and run: two forward passes (the linearization and the check of the new
point) and K - 1 backward passes untargeted (K classes, one per other class's logit difference,
through one forward graph) or one backward pass targeted, on every attacked example.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from advbench import params
from advbench.access import Handle
from advbench.attacks.base import GradientAttack, white_box
from advbench.audit import goal_met, reached
from advbench.registry import ATTACKS
from advbench.tensors import rand_like, randn_like, rows
from advbench.threat import Norm, Targeting, ThreatModel

#: the reference's default eps per norm (pyautoattack's DEFAULT_EPS_DICT_BY_NORM), in units of
#: the bounds' width: the default random-start radius where nothing has been found yet
DEFAULT_START = {Norm.LINF: 0.3, Norm.L2: 1.0, Norm.L1: 5.0}


# ---------------------------------------------------------------------- projections
def project_halfspace_box(t: torch.Tensor, w: torch.Tensor, c: torch.Tensor, bounds: tuple[float, float],
                          norm: Norm) -> torch.Tensor:
    """Per row, the smallest step d (in ``norm``: linf, l2 or l1) with <w, d> >= c and
    lo <= t + d <= hi: the exact projection of t onto the half-space {z : <w, z - t> >= c}
    intersected with the box, batched over rows (t, w: (M, ...), c: (M,); t inside the box).

    Where c <= 0 (t is in the half-space) d = 0. Where the box does not reach the half-space,
    d is the corner of the box furthest along w (d_i = room_i sign(w_i), 0 where w_i = 0).

    Moving coordinate i by m_i in [0, room_i] in the direction of sign(w_i) (room_i the distance
    to the box that way) gains |w_i| m_i, so the problem is: reach a gain of c at least norm.

    - l1 (greedy): fill the coordinates in decreasing order of |w_i|, each up to its room, the
      last one partly;
    - l2, linf (water filling): the KKT conditions give m_i = min(lambda v_i, room_i), with
      v_i = |w_i| (l2) or 1 (linf; 0 where w_i = 0) and the smallest lambda >= 0 that reaches c.
      The gain is piecewise linear and non-decreasing in lambda with breakpoints room_i / v_i;
      sorting them gives lambda in closed form.

    Computed in float64 and rounded once to t's dtype."""
    if norm not in (Norm.LINF, Norm.L2, Norm.L1):
        raise ValueError(f"no FAB projection for norm {norm.value!r}")
    lo, hi = bounds
    tf = t.reshape(t.shape[0], -1).double()
    wf = w.reshape(w.shape[0], -1).double()
    need = c.double().reshape(-1, 1)
    a = wf.abs()
    room = torch.where(wf > 0, hi - tf, tf - lo).clamp_min_(0)  # (irrelevant where w_i = 0: sign 0 below)
    gain = a * room  # what each coordinate gives at full room
    if norm is Norm.L1:
        mag, total = _greedy(a, room, gain, need)
    else:
        mag, total = _water_fill(a, a if norm is Norm.L2 else (a > 0).double(), room, gain, need)
    mag = torch.where(total <= need, room, mag)  # unreachable: the furthest corner
    mag = torch.where(need > 0, mag, 0.0)
    return (wf.sign() * mag).to(t.dtype).view(t.shape)


def _greedy(a: torch.Tensor, room: torch.Tensor, gain: torch.Tensor, need: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """l1: per row, the coordinates by decreasing |w_i| at full room until the gain reaches
    ``need``, the last of them partly. (magnitudes, total gain at full room)."""
    a_s, order = a.sort(dim=1, descending=True)
    room_s, gain_s = room.gather(1, order), gain.gather(1, order)
    reach = gain_s.cumsum(dim=1)
    total = reach[:, -1:]
    k = (reach < need).sum(dim=1, keepdim=True).clamp_(max=a.shape[1] - 1)  # the coordinate filled partly
    before = reach.gather(1, k) - gain_s.gather(1, k)
    part = ((need - before) / a_s.gather(1, k)).nan_to_num_(0.0).clamp_min_(0)
    part = torch.minimum(part, room_s.gather(1, k))
    rank = torch.arange(a.shape[1], device=a.device)
    mag_s = torch.where(rank < k, room_s, torch.where(rank == k, part, 0.0))
    return torch.empty_like(mag_s).scatter_(1, order, mag_s), total


def _water_fill(a: torch.Tensor, v: torch.Tensor, room: torch.Tensor, gain: torch.Tensor, need: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """l2/linf: m_i = min(lambda v_i, room_i) with the smallest lambda whose gain
    sum_i |w_i| m_i reaches ``need``. (magnitudes, total gain at full room).

    Coordinate i saturates at lambda_i = room_i / v_i (0 where v_i = 0: it gains nothing); at the
    k-th smallest breakpoint the gain is that of the saturated coordinates plus lambda times the
    summed |w_i| v_i of the others, and lambda follows on the segment where the gain reaches c."""
    lam_s, order = torch.where(v > 0, room / v, 0.0).sort(dim=1)
    gain_s, slope_s = gain.gather(1, order), (a * v).gather(1, order)
    saturated = gain_s.cumsum(dim=1)  # the gain of the coordinates saturated at each breakpoint
    slope_all = slope_s.sum(dim=1, keepdim=True)
    slope = (slope_all - slope_s.cumsum(dim=1)).clamp_min_(0)  # d gain / d lambda after each breakpoint
    total = saturated[:, -1:]
    k = (saturated + lam_s * slope < need).sum(dim=1, keepdim=True)  # the first breakpoint reaching c
    base = torch.cat([torch.zeros_like(total), saturated], dim=1).gather(1, k)
    rate = torch.cat([slope_all, slope], dim=1).gather(1, k)
    lam_star = ((need - base) / rate).nan_to_num_(0.0, posinf=0.0).clamp_min_(0)
    return torch.minimum(lam_star * v, room), total


def project_onto_hyperplane(t: torch.Tensor, w: torch.Tensor, gap: torch.Tensor, bounds: tuple[float, float],
                            norm: Norm) -> torch.Tensor:
    """The smallest step d with <w, d> = ``gap`` inside the box (its projection onto the
    hyperplane from either side, as FAB's): :func:`project_halfspace_box` with the half-space
    oriented away from t (w and gap negated where gap < 0)."""
    s = torch.where(gap < 0, -1.0, 1.0).to(w.dtype)
    return project_halfspace_box(t, w * rows(s, w), gap.abs(), bounds, norm)


def _norm(d: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Per-row norm of (M, D) ``d``, float64."""
    if norm is Norm.LINF:
        return d.abs().amax(dim=1).double()
    return torch.linalg.vector_norm(d, 2 if norm is Norm.L2 else 1, dim=1, dtype=torch.float64)


_DUAL = {Norm.LINF: 1, Norm.L2: 2, Norm.L1: math.inf}


# ---------------------------------------------------------------------- the attack
class _FAB(GradientAttack):
    """FAB (module docstring): the shared machinery of ``fab`` and ``fab-t``."""

    norms: ClassVar[frozenset[Norm]] = frozenset({Norm.LINF, Norm.L2, Norm.L1})
    minimal: ClassVar[bool] = True
    kind: ClassVar[str] = "minimal"

    class Params(params.Params):
        steps: params.Count = 100
        restarts: params.Count = 1
        alpha_max: params.UnitInterval = 0.1  # the largest weight of the step from the original point
        eta: params.PositiveNumber = 1.05  # overshoot of the projections
        beta: params.UnitInterval = 0.9  # backward step toward the original point
        #: restarts' random-start radius where nothing was found yet (None: DEFAULT_START x bounds width)
        start_radius: params.PositiveNumber | None = None

    @property
    def randomized(self) -> bool:  # type: ignore[override]
        return self.restarts > 1  # only restarts after the first draw random starts

    # ------------------------------------------------------------------ one run
    def _linearize(self, net: torch.nn.Module, x1: torch.Tensor, y: torch.Tensor, toward: torch.Tensor | None,
                   norm: Norm, rival: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(f, w) at ``x1`` per example: f = z_l - z_y and w = grad f for l the target
        (``toward``), else the class of the closest linearized boundary, argmin |f_l| / ||w_l||_q.
        ``rival`` (a targeted goal): z_y is replaced by the largest logit other than the target's
        at ``x1`` (y's as long as y leads)."""
        leaf = x1.detach().requires_grad_(True)
        logits = net(leaf)
        if toward is not None:
            other = logits.detach().scatter(1, toward[:, None], -math.inf).argmax(dim=1) if rival else y
            f = (logits.gather(1, toward[:, None]) - logits.gather(1, other[:, None])).squeeze(1)
            (w,) = torch.autograd.grad(f.sum(), leaf)
            return f.detach(), w
        z_y = logits.gather(1, y[:, None]).squeeze(1)
        n, k = logits.shape
        others = (y[:, None] + torch.arange(1, k, device=y.device)) % k  # every class but y
        q = _DUAL[norm]
        best_dist = torch.full((n,), math.inf, dtype=torch.float64, device=x1.device)
        best_f = torch.zeros(n, dtype=logits.dtype, device=x1.device)
        best_w = torch.zeros_like(x1)
        for j in range(k - 1):
            f = logits.gather(1, others[:, j : j + 1]).squeeze(1) - z_y
            (w,) = torch.autograd.grad(f.sum(), leaf, retain_graph=j < k - 2)
            f = f.detach()
            w_norm = torch.linalg.vector_norm(w.reshape(n, -1), q, dim=1, dtype=torch.float64)
            dist = f.double().abs() / w_norm  # inf or NaN where w_l = 0: never the closest
            better = dist < best_dist
            best_dist = torch.where(better, dist, best_dist)
            best_f = torch.where(better, f, best_f)
            best_w = torch.where(rows(better, w), w, best_w)
        return best_f, best_w

    def _single(self, net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
                toward: torch.Tensor | None, goal: torch.Tensor | None, start: torch.Tensor,
                best_x: torch.Tensor, best_d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One FAB run from ``start``: ``best_x``/``best_d`` (the smallest adversarial example and
        its distance per example, inf where none) updated with what it finds. ``toward``: the
        class whose boundary is linearized (None: the closest); ``goal``: the target of the
        threat model (None: misclassification)."""
        lo, hi = threat.bounds
        norm = threat.norm
        n = x.shape[0]
        x0 = x.reshape(n, -1)
        x1 = start.clone()
        for _ in range(self.steps):
            f, w = self._linearize(net, x1, y, toward, norm, goal is not None)
            with torch.no_grad():
                x1f, wf = x1.reshape(n, -1), w.reshape(n, -1)
                # the hyperplane f + <w, z - x1> = 0: the gain each point needs along w
                gap1 = -f.double()
                gap0 = gap1 - (wf.double() * (x0.double() - x1f.double())).sum(dim=1)
                d = project_onto_hyperplane(torch.cat([x1f, x0]), torch.cat([wf, wf]), torch.cat([gap1, gap0]),
                                            threat.bounds, norm)
                size = _norm(d, norm).clamp_min(1e-8)
                a1, a0 = size[:n], size[n:]
                alpha = (a1 / (a1 + a0)).clamp(0, self.alpha_max).to(x.dtype)[:, None]
                x1f = ((x1f + self.eta * d[:n]) * (1 - alpha) + (x0 + self.eta * d[n:]) * alpha).clamp_(lo, hi)
                x1 = x1f.view_as(x)
                logits = net(x1)
                adv = goal_met(logits.argmax(dim=1), y, goal)
                counts = reached(net, x1, logits, y, goal, threat) if threat.quantize else adv
                dist = _norm(x1f - x0, norm)
                better = counts & (dist < best_d)
                best_x = torch.where(rows(better, x), x1, best_x)
                best_d = torch.where(better, dist, best_d)
                x1 = torch.where(rows(adv, x), x + self.beta * (x1 - x), x1)  # the backward step
        return best_x, best_d

    # ------------------------------------------------------------------ restarts and targets
    def _start(self, x: torch.Tensor, best_d: torch.Tensor, threat: ThreatModel,
               generator: torch.Generator | None) -> torch.Tensor:
        """A random start at half the best distance so far (``start_radius`` where none)."""
        lo, hi = threat.bounds
        default = self.start_radius if self.start_radius is not None else DEFAULT_START[threat.norm] * (hi - lo)
        radius = 0.5 * torch.where(torch.isfinite(best_d), best_d, torch.full_like(best_d, default))
        n = x.shape[0]
        if threat.norm is Norm.LINF:
            t = rand_like(x, generator).mul_(2).sub_(1)
        else:
            t = randn_like(x, generator)
        size = _norm(t.reshape(n, -1), threat.norm).clamp_min(1e-12)
        return (x + t * rows((radius / size).to(x.dtype), x)).clamp(lo, hi)

    def _search(self, net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
                towards: list[torch.Tensor | None], goal: torch.Tensor | None,
                generator: torch.Generator | None) -> torch.Tensor:
        """``restarts`` runs per entry of ``towards`` (the class linearized: a target, or None for
        the closest boundary), in order, all on every example; the smallest adversarial example
        over all runs per example, x where none was found."""
        best_x = x.clone()
        best_d = torch.full((x.shape[0],), math.inf, dtype=torch.float64, device=x.device)
        for toward in towards:
            for r in range(self.restarts):
                start = x if r == 0 else self._start(x, best_d, threat, generator)
                best_x, best_d = self._single(net, x, y, threat, toward, goal, start, best_x, best_d)
        return best_x


@ATTACKS.register("fab", description="FAB, minimal perturbation by fast adaptive boundary steps (Croce & Hein 2020); "
                                     "linf, l2, l1, untargeted and targeted")
class FAB(_FAB):
    """FAB (module docstring): untargeted toward the closest linearized boundary among all other
    classes, or under a targeted threat model toward the target (one gradient per iteration)."""

    targeting: ClassVar[frozenset[Targeting]] = frozenset(Targeting)

    def _run(self, model: Handle, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
             target: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
        net = white_box(model)
        with torch.no_grad():
            pred = net(x).argmax(dim=1)
        todo = ~goal_met(pred, y, target)  # the clean input meets the goal: nothing to search
        if target is not None:
            todo &= target != y
        idx = todo.nonzero().squeeze(1)
        out = x.clone()
        if idx.numel() == 0:
            return out
        goal = None if target is None else target[idx]
        out[idx] = self._search(net, x[idx], y[idx], threat, [goal], goal, generator)
        return out


@ATTACKS.register("fab-t", description="FAB-T: targeted FAB over the top-k other classes, kept at the smallest "
                                       "(AutoAttack's); linf, l2, l1")
class FABTargeted(_FAB):
    """FAB-T (module docstring): under an untargeted threat model, targeted FAB runs toward each of
    the ``targets`` most likely classes of the clean input other than the true one, in order; the
    smallest misclassified example over all of them is kept."""

    targeting: ClassVar[frozenset[Targeting]] = frozenset({Targeting.UNTARGETED})

    class Params(_FAB.Params):
        targets: params.Count = 9

    def _run(self, model: Handle, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
             target: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
        net = white_box(model)
        with torch.no_grad():
            logits = net(x)
        idx = (logits.argmax(dim=1) == y).nonzero().squeeze(1)  # misclassified already: nothing to search
        out = x.clone()
        if idx.numel() == 0:
            return out
        ranked = logits[idx].scatter(1, y[idx, None], -math.inf).argsort(dim=1, descending=True, stable=True)
        towards: list[torch.Tensor | None] = [ranked[:, k] for k in range(min(self.targets, logits.shape[1] - 1))]
        out[idx] = self._search(net, x[idx], y[idx], threat, towards, None, generator)
        return out
