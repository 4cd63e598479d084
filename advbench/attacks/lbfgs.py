"""Box-constrained L-BFGS (Szegedy et al., ICLR 2014): the smallest l2 perturbation that reaches
the goal, by a per-example search over the trade-off constant c around a batched projected
L-BFGS that keeps a history and a line search per example."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import torch

from advbench.access import Handle
from advbench.attacks.base import GradientAttack, white_box
from advbench.audit import reached
from advbench import params
from advbench.registry import ATTACKS
from advbench.threat import Norm, Targeting, ThreatModel

#: Armijo sufficient-decrease constant of the line search (SciPy's value)
SIGMA = 1e-4
#: failed trials in a row after which a row's line search gives up (and its minimization stops)
LINE_SEARCH_STEPS = 10
#: a row has converged when an accepted step lowers its objective by less than this, relative
#: to max(|F|, 1)...
FTOL = 1e-6
#: ...or when its projected gradient is below this in every coordinate (SciPy's pgtol)
PGTOL = 1e-5

#: the model always runs on at least this many rows (repeating the first where fewer are due):
#: BLAS libraries switch to other kernels for a handful of rows (MKL below 4), which sum in
#: another order, and the search over c, which probes the decision boundary, would amplify
#: that float noise into a result that depends on how many other examples were still running
MIN_ROWS = 8

#: ``fun(v, rows)``: the objective per row at points ``v`` (k, D) of the rows ``rows`` (k,):
#: values (k,) in float64 and gradients (k, D)
Objective = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _logits(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """net(x), computed on at least :data:`MIN_ROWS` rows (the first repeated) so that each
    row's arithmetic does not depend on how many rows there are."""
    k = x.shape[0]
    if k < MIN_ROWS:
        x = torch.cat([x, x[:1].expand(MIN_ROWS - k, *x.shape[1:])])
    return net(x)[:k]


def attack_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """The paper's loss_f per example: the cross-entropy toward ``target``, or untargeted the
    cross-entropy of the event "not y", -log(1 - p_y) = logsumexp(z) - logsumexp_{k != y}(z).

    Unlike -CE(x + r, y) it is bounded below (by 0) and flattens out once y is unlikely, so each
    c has a finite minimizer that does not run into the box; unlike the cross-entropy toward one
    fixed other class it crosses whichever boundary is nearest.
    """
    lse = logits.logsumexp(dim=1)
    if target is not None:
        return lse - logits.gather(1, target.unsqueeze(1)).squeeze(1)
    others = logits.scatter(1, y.unsqueeze(1), -math.inf)
    return lse - others.logsumexp(dim=1)


def _two_loop(
    q: torch.Tensor, s: torch.Tensor, yv: torch.Tensor, rho: torch.Tensor, rows: torch.Tensor,
    count: torch.Tensor, gamma: torch.Tensor,
) -> torch.Tensor:
    """H q for the rows ``rows`` (k,) by the L-BFGS two-loop recursion. ``s``, ``yv`` (m, N, D)
    and ``rho`` (m, N) are per-row ring buffers; row ``rows[i]`` holds ``count[i]`` pairs, the
    newest at slot (count - 1) % m. H_0 = ``gamma`` I per row."""
    m = rho.shape[0]
    q = q.clone()
    slots, alphas = [], []
    for age in range(min(m, int(count.max()))):  # newest first
        slot = (count - 1 - age) % m
        r = torch.where(age < count, rho[slot, rows], torch.zeros_like(q[:, 0]))  # 0: no pair, a no-op
        a = r * (s[slot, rows] * q).sum(dim=1)
        q.sub_(a.unsqueeze(1) * yv[slot, rows])
        slots.append((slot, r))
        alphas.append(a)
    q.mul_(gamma.unsqueeze(1))
    for (slot, r), a in zip(reversed(slots), reversed(alphas)):
        b = r * (yv[slot, rows] * q).sum(dim=1)
        q.add_((a - b).unsqueeze(1) * s[slot, rows])
    return q


def box_lbfgs(
    fun: Objective, start: torch.Tensor, lower: float, upper: float, gamma0: torch.Tensor,
    max_iter: int, history: int,
) -> torch.Tensor:
    """Minimize ``fun`` in the box [lower, upper]^D independently for every row of ``start``
    (N, D), by projected L-BFGS with per-row history, step scaling, line search and stopping.

    Direction: -H P g, H the row's L-BFGS inverse-Hessian estimate (H_0 = ``gamma0`` I until a
    curvature pair is stored, then s'y / y'y), P g the gradient with the coordinates it holds at
    a bound zeroed; coordinates the direction would push out of the box are dropped, and where
    that leaves no descent it falls back to the scaled -P g. Step: an Armijo backtracking search
    along the projected path clamp(v + alpha d), alpha from 1, shrunk by safeguarded quadratic
    interpolation. Every iteration makes exactly one ``fun`` call, one trial point per running
    row: a row whose trial fails the Armijo test stays where it is and tries a shorter step
    next iteration, so rows never wait for each other's line searches. A row stops after
    ``max_iter`` evaluations, after :data:`LINE_SEARCH_STEPS` failed trials in a row, or on the
    :data:`FTOL` / :data:`PGTOL` tests.
    """
    n, _ = start.shape
    dev = start.device
    v = start.clone()
    f, g = fun(v, torch.arange(n, device=dev))
    s_hist = v.new_zeros(history, *v.shape)
    y_hist = v.new_zeros(history, *v.shape)
    rho = v.new_zeros(history, n)
    count = torch.zeros(n, dtype=torch.long, device=dev)  # pairs stored per row
    gamma = gamma0.to(v.dtype).clone()
    d = torch.zeros_like(v)
    alpha = v.new_ones(n)
    slope = torch.zeros_like(f)  # g'd along the current direction
    fails = torch.zeros_like(count)  # failed trials in a row
    searching = torch.zeros(n, dtype=torch.bool, device=dev)  # has a direction, retrying it
    running = torch.ones_like(searching)
    for _ in range(max_iter):
        fresh = (running & ~searching).nonzero().squeeze(1)  # rows that need a new direction
        if fresh.numel():
            vi, gi = v[fresh], g[fresh]
            at_lo, at_hi = vi <= lower, vi >= upper
            held = (at_lo & (gi > 0)) | (at_hi & (gi < 0))
            pg = gi.masked_fill(held, 0)
            di = -_two_loop(pg, s_hist, y_hist, rho, fresh, count[fresh], gamma[fresh])
            di.masked_fill_(held | (at_lo & (di < 0)) | (at_hi & (di > 0)), 0)
            uphill = (gi * di).sum(dim=1) >= 0
            di = torch.where(uphill.unsqueeze(1), -gamma[fresh].unsqueeze(1) * pg, di)
            d[fresh], alpha[fresh], fails[fresh] = di, 1.0, 0
            slope[fresh] = (gi * di).sum(dim=1, dtype=torch.float64)
            running[fresh] = pg.abs().amax(dim=1) > PGTOL
            searching[fresh] = True
        ids = running.nonzero().squeeze(1)
        if ids.numel() == 0:
            break
        vi, gi, fi = v[ids], g[ids], f[ids]
        trial = (vi + alpha[ids].unsqueeze(1) * d[ids]).clamp_(lower, upper)
        ft, gt = fun(trial, ids)
        step = trial - vi
        decrease = (gi * step).sum(dim=1, dtype=torch.float64)  # g'(v_t - v), <= alpha g'd
        ok = (ft <= fi + SIGMA * decrease) & (ft < fi)

        # rejected: shrink the step to the minimizer of the quadratic through f, the slope and
        # f_t, kept within [0.1, 0.5] of the current step
        a = alpha[ids].double()
        curv = ft - fi - slope[ids] * a
        shrink = (-slope[ids] * a / (2 * curv)).nan_to_num(0.5).clamp(0.1, 0.5)
        bad = ids[~ok]
        alpha[bad] *= shrink[~ok].to(v.dtype)
        fails[bad] += 1
        running[bad] = fails[bad] < LINE_SEARCH_STEPS

        # accepted: store the curvature pair, move, test convergence
        acc = ids[ok]
        s, yv = step[ok], gt[ok] - gi[ok]
        sy = (s * yv).sum(dim=1, dtype=torch.float64)
        yy = (yv * yv).sum(dim=1, dtype=torch.float64)
        pair = sy > torch.finfo(v.dtype).eps * yy
        keep, slot = acc[pair], count[acc[pair]] % history
        s_hist[slot, keep], y_hist[slot, keep] = s[pair], yv[pair]
        rho[slot, keep] = (1 / sy[pair]).to(v.dtype)
        gamma[keep] = (sy[pair] / yy[pair]).to(v.dtype)
        count[keep] += 1
        small = (fi[ok] - ft[ok]) <= FTOL * torch.maximum(fi[ok].abs(), ft[ok].abs()).clamp_min(1.0)
        v[acc], f[acc], g[acc] = trial[ok], ft[ok], gt[ok]
        searching[acc] = False
        running[acc] = ~small
    return v


@ATTACKS.register(
    "lbfgs", description="Box-constrained L-BFGS, minimal perturbation with a search over c (Szegedy et al. 2014); l2"
)
class LBFGS(GradientAttack):
    """Box-constrained L-BFGS (Szegedy, Zaremba, Sutskever, Bruna, Erhan, Goodfellow & Fergus,
    "Intriguing properties of neural networks", ICLR 2014, Section 4.1).

    For each example and a constant c > 0 it minimizes

        c ||r||_2^2 + loss_f(x + r, l)   subject to x + r in the bounds,

    by :func:`box_lbfgs`. ``loss_f`` is the cross-entropy toward the target l, or untargeted
    -log(1 - p_y) (see :func:`attack_loss`: it finds smaller perturbations than the
    cross-entropy toward the clean runner-up class or -CE(x + r, y)). The squared norm
    replaces the paper's ||r||_2, which has no gradient at r = 0 (the start) and a curvature
    L-BFGS cannot model near it: a minimizer of one is a stationary point of the other for
    c' = c / (2 ||r||), so the search over c walks the same family of solutions.

    The paper line-searches c for the minimizer that reaches the goal with the smallest r,
    which is the *largest* such c (larger c, smaller r). Per example, c starts at
    ``initial_const``; it is multiplied by 10 after a success (the minimizer reaches the goal)
    and divided by 10 after a failure until both are seen, then bisected geometrically between
    the largest success and the smallest failure, for ``search_steps`` values in all. The
    first minimization starts at r = 0, each later one where the previous one ended (for the
    same cost, slightly smaller perturbations than restarting at r = 0 each time). Every
    point the minimizations evaluate is checked, and the smallest one that reaches the goal is
    returned (``x`` where none did). Examples that meet the goal unperturbed are not attacked.

    Cost: at most ``search_steps`` x (``max_iter`` + 1) forward+backward passes over the
    examples still minimizing (one per L-BFGS evaluation, line-search trials included), plus
    one forward pass per c. Defaults (chosen on mnist-cnn and the digits models, the figures in
    ``benchmarks/results/design-choices.md``; times and distances against SciPy in
    ``benchmarks/results/deepfool.md``): ``max_iter=20``, because
    the search keeps the best point of every minimization, so a partial one still serves and
    more iterations buy little; ``search_steps=8``, enough to bracket c by factors of 10 and
    then narrow it to about 10^(1/32); ``history=10``, SciPy's default; ``initial_const=1``
    (the result hardly depends on it).
    """

    norms: ClassVar[frozenset[Norm]] = frozenset({Norm.L2})
    targeting: ClassVar[frozenset[Targeting]] = frozenset(Targeting)
    minimal: ClassVar[bool] = True
    kind: ClassVar[str] = "minimal"
    randomized: ClassVar[bool] = False

    class Params(params.Params):
        initial_const: params.PositiveNumber = 1.0
        search_steps: params.Count = 8
        max_iter: params.Count = 20
        history: params.Count = 10

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
        n, shape = x.shape[0], x.shape[1:]
        best = x.clone()
        best_sq = torch.full((n,), math.inf, dtype=torch.float64, device=x.device)
        with torch.no_grad():
            todo = (~reached(net, x, _logits(net, x), y, target, threat)).nonzero().squeeze(1)
        if todo.numel() == 0:
            return best
        xs, ys = x[todo].reshape(todo.numel(), -1), y[todo]
        ts = None if target is None else target[todo]
        c = torch.full((todo.numel(),), self.initial_const, dtype=torch.float64, device=x.device)
        c_ok = torch.zeros_like(c)  # largest c whose minimizer reached the goal (0: none yet)
        c_fail = torch.full_like(c, math.inf)  # smallest c whose minimizer did not

        def fun(v: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            t_rows = None if ts is None else ts[rows]
            x_adv = v.detach().reshape(-1, *shape).requires_grad_(True)
            logits = _logits(net, x_adv)
            loss = attack_loss(logits, ys[rows], t_rows)
            (grad,) = torch.autograd.grad(loss.sum(), x_adv)
            r = v - xs[rows]
            sq = r.pow(2).sum(dim=1, dtype=torch.float64)
            with torch.no_grad():  # keep the smallest point that reaches the goal
                hit = reached(net, x_adv.detach(), logits.detach(), ys[rows], t_rows, threat)
                better = hit & (sq < best_sq[todo[rows]])
                best[todo[rows[better]]] = x_adv.detach()[better]
                best_sq[todo[rows[better]]] = sq[better]
            value = c[rows] * sq + loss.detach().double()
            return value, grad.reshape(v.shape) + (2 * c[rows]).to(v.dtype).unsqueeze(1) * r

        v = xs
        for _ in range(self.search_steps):
            v = box_lbfgs(fun, v, lo, hi, 1 / (2 * c), self.max_iter, self.history)
            with torch.no_grad():
                x_min = v.reshape(-1, *shape)
                success = reached(net, x_min, _logits(net, x_min), ys, ts, threat)
            c_ok = torch.where(success, c, c_ok)
            c_fail = torch.where(success, c_fail, c)
            bracketed = (c_ok > 0) & torch.isfinite(c_fail)
            c = torch.where(bracketed, (c_ok * c_fail).sqrt(), torch.where(success, c * 10, c / 10))
        return best
