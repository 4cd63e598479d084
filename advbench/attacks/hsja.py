"""HopSkipJumpAttack (Chen, Jordan & Wainwright, "HopSkipJumpAttack: A Query-Efficient
Decision-Based Attack", IEEE S&P 2020, arXiv:1904.02144): minimal l2 and linf perturbations from
top-1 labels only.

With phi(z) = 1 where the model's label of z meets the goal (untargeted: not the true class;
targeted: the target class), x* the clean input and d its number of elements:

1. **Start**: an input with phi = 1. Untargeted: uniform noise over the bounds, drawn up to
   ``init_tries`` times, then blended toward x* by a binary search on the blend factor with
   tolerance 0.001 (the reference code's). Targeted: the image of the batch nearest to x* (in the
   threat model's norm) that the oracle labels as the target (one query per example, on its own
   clean image), else the same noise search for an input of the target class. An untargeted
   example whose noise search fails falls back on the nearest batch image labelled otherwise.
   An example with no start gets ``x*`` back (nothing found).
2. **Boundary search** from a point z with phi(z) = 1: l2 bisects alpha in [0, 1] over
   (1 - alpha) x* + alpha z until the bracket is at most theta; linf bisects the radius alpha in
   [0, ||z - x*||_inf] of clip(z, x* - alpha, x* + alpha) until it is at most
   min(theta ||z - x*||_inf, theta). The result is the upper end (phi = 1). theta = gamma / d^(3/2)
   (l2) or gamma / d^2 (linf), ``gamma`` = 1.
3. **Gradient-direction estimate** at the boundary point x_t, iteration t = 1, 2, ...:
   B_t = min(``init_evals`` sqrt(t), ``max_evals``) samples (100 sqrt(t), capped at 10,000),
   u_b Gaussian (l2) or uniform on [-1, 1]^d (linf), scaled to unit l2 norm, queried at
   clip(x_t + delta_t u_b) (u_b is recomputed from the clipped point), and
   v_t = mean_b (phi_b - mean phi) u_b with phi_b in {-1, +1} (without the baseline where all
   B_t agree), normalized to unit l2 norm. delta_1 = 0.1 (hi - lo); then delta_t = sqrt(d) theta
   ||x~_{t-1} - x*||_2 (l2) or d theta ||x~_{t-1} - x*||_inf (linf), x~_{t-1} the last step's
   point before its boundary search.
4. **Step-size search**: the update is v_t (l2) or sign(v_t) (linf); xi_t = ||x_t - x*|| / sqrt(t),
   halved until phi(clip(x_t + xi_t update)) = 1; x~_t = clip(x_t + xi_t update), then back to
   step 2. ``steps`` iterations (foolbox's default, 64).

The attack is *minimal*: it returns, per example, the boundary point of smallest distance it
found (the reference returns its last iterate, which is almost always that one), whatever eps.

Budget. Every example has its own budget, the smaller of ``queries`` (5000) and the threat
model's ``query_budget``, and it is never exceeded: each iteration keeps back the queries of a
full boundary search and one step-size query, shrinks B_t to what is left, and caps the
step-size halvings and the boundary search by what remains; an example that cannot pay for one
more sample stops and keeps its best point. Examples are processed together: the Monte-Carlo
samples of all examples form one batch of queries (chunked by ``max_batch`` rows), and the
per-example sample counts and search lengths are masks, not loops over examples.

Access. Labels only: through the decision-based handle (``LabelOracle``, every row's example
named by ``index``), or, for an attacker who may read more, a labels-only view of the score
oracle or of the white-box model (which counts its forward passes; the attack's own per-example
count enforces ``queries``). Under ``quantize: 8bit`` every decision is taken on the 8-bit
rounding of the queried point and the output is that rounding, so what the attack calls
adversarial is what the audit judges.

Where the reference code (github.com/Jianbo-Lab/HSJA, ``hsja.py``) and the paper differ, the
reference is followed: delta_1 = 0.1 (hi - lo) instead of sqrt(d) theta ||x~_0 - x*||, and the
linf search's tolerance min(theta ||z - x*||_inf, theta). Like the paper and the reference (and
unlike foolbox, which takes the distance after the boundary search), delta_t is sized by the
point before the search. The reference's targeted start is an image given by the user; here it
is taken from the batch (see above). ART's version sets theta = 0.01 / sqrt(d) (l2) and
0.01 / d (linf) and starts each step at twice the step size; neither is followed.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import ClassVar

import torch
from pydantic import model_validator

from advbench import params
from advbench.access import Handle, LabelOracle, ScoreOracle, WhiteBoxModel
from advbench.attacks.base import Attack
from advbench.errors import QueryBudgetExceeded, UnsupportedThreatError
from advbench.registry import ATTACKS
from advbench.tensors import rows
from advbench.threat import Knowledge, Norm, Targeting, ThreatModel

#: the reference's tolerance on the blend factor when a noise start is pulled toward x*
BLEND_TOLERANCE = 1e-3
#: the reference's first gradient-estimate radius, as a fraction of the bounds' width
FIRST_DELTA = 0.1
#: pairwise distances of the batch are computed this many elements at a time (linf)
_PAIR_CHUNK = 1 << 24


class Decisions:
    """phi: whether the model's label of each queried row meets its example's goal, counted.

    A labels-only view of any handle, with a per-example budget of its own (``budget``) on top
    of the oracle's. Rows are sent in chunks of ``max_batch``; ``index`` (CPU, long) names each
    row's example."""

    def __init__(self, handle: Handle, y: torch.Tensor, target: torch.Tensor | None, budget: int,
                 threat: ThreatModel, max_batch: int) -> None:
        if not isinstance(handle, (LabelOracle, ScoreOracle, WhiteBoxModel)):  # pragma: no cover
            raise UnsupportedThreatError("HopSkipJump needs a model handle that gives labels")
        self.handle = handle
        self.goal = y if target is None else target
        self.targeted = target is not None
        self.budget = budget
        self.used = torch.zeros(len(y), dtype=torch.long)
        # the audit's own rounding of a minimal attack's output (to the nearest level)
        self.rounding = replace(threat, norm=Norm.UNBOUNDED, eps=math.inf) if threat.quantize == "8bit" else None
        self.max_batch = max_batch

    def remaining(self) -> torch.Tensor:
        """Queries each example may still make (CPU, long)."""
        left = self.budget - self.used
        if isinstance(self.handle, (LabelOracle, ScoreOracle)):
            left = torch.minimum(left, self.handle.remaining())
        return left

    def view(self, z: torch.Tensor) -> torch.Tensor:
        """The image the model is asked about (its 8-bit rounding under ``quantize: 8bit``)."""
        return z if self.rounding is None else self.rounding.quantized(z, z)

    def labels(self, z: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        add = torch.bincount(index, minlength=len(self.used))
        if bool((self.used + add > self.budget).any()):  # never reached: the attack plans within it
            raise QueryBudgetExceeded(f"HopSkipJump's own budget of {self.budget} queries per example")
        out = []
        for start in range(0, len(index), self.max_batch):
            part = slice(start, start + self.max_batch)
            chunk, idx = self.view(z[part]), index[part]
            if isinstance(self.handle, LabelOracle):
                out.append(self.handle(chunk, index=idx))
            elif isinstance(self.handle, ScoreOracle):
                out.append(self.handle(chunk, index=idx).argmax(dim=1))
            else:
                out.append(self.handle(chunk).argmax(dim=1))
        self.used += add
        return torch.cat(out).to(z.device)

    def __call__(self, z: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """phi per row (bool, on ``z``'s device)."""
        label = self.labels(z, index)
        goal = self.goal[index.to(self.goal.device)].to(label.device)
        return label == goal if self.targeted else label != goal


def _flat_norm(t: torch.Tensor, linf: bool) -> torch.Tensor:
    flat = t.reshape(t.shape[0], -1)
    return flat.abs().amax(dim=1) if linf else torch.linalg.vector_norm(flat, 2, dim=1)


def _halvings(gap: torch.Tensor, tolerance: torch.Tensor) -> torch.Tensor:
    """Bisections that bring ``gap`` to at most ``tolerance`` (CPU, long; float64 inputs)."""
    ratio = (gap / tolerance).clamp_min(1.0)
    k = torch.ceil(torch.log2(ratio) - 1e-9).clamp_min(0).long()
    return k + (gap / torch.pow(2.0, k.double()) > tolerance).long()  # log2 rounding, either way


@ATTACKS.register(
    "hsja",
    description="HopSkipJump (Chen, Jordan & Wainwright 2020); minimal l2/linf from labels only, decision-based",
)
class HopSkipJump(Attack):
    """HopSkipJumpAttack (module docstring): decision-based, minimal l2 and linf perturbations."""

    norms: ClassVar[frozenset[Norm]] = frozenset({Norm.L2, Norm.LINF})
    targeting: ClassVar[frozenset[Targeting]] = frozenset(Targeting)
    knowledge: ClassVar[frozenset[Knowledge]] = frozenset(
        {Knowledge.DECISION_BASED, Knowledge.SCORE_BASED, Knowledge.WHITE_BOX})
    minimal: ClassVar[bool] = True
    kind: ClassVar[str] = "decision_based"
    randomized: ClassVar[bool] = True

    class Params(params.Params):
        steps: params.Count = 64  # iterations (foolbox's default; the reference's is 40)
        queries: params.Count = 5000  # own per-example budget; the threat model's applies too
        init_evals: params.Count = 100  # B_0
        max_evals: params.Count = 10000  # the cap on B_t
        gamma: params.PositiveNumber = 1.0  # theta = gamma / d^(3/2) (l2), gamma / d^2 (linf)
        init_tries: params.Count = 100  # random-noise draws per example for a start
        max_batch: params.Count | None = None  # rows per query; None: 256 on a CPU, 4096 elsewhere

        @model_validator(mode="after")
        def _evals_ordered(self) -> HopSkipJump.Params:
            if self.max_evals < self.init_evals:
                raise ValueError(f"max_evals must be at least init_evals, got max_evals={self.max_evals}, "
                                 f"init_evals={self.init_evals}")
            return self

    # ------------------------------------------------------------------ pieces
    @staticmethod
    def theta(d: int, norm: Norm, gamma: float = 1.0) -> float:
        """The boundary-search tolerance: gamma / d^(3/2) (l2) or gamma / d^2 (linf)."""
        return gamma / (d * d if norm is Norm.LINF else d * math.sqrt(d))

    def _reserve(self, d: int, threat: ThreatModel) -> int:
        """Queries a full boundary search can take (kept back before each gradient estimate)."""
        theta = self.theta(d, threat.norm, self.gamma)
        lo, hi = threat.bounds
        gap = max(1.0, hi - lo) if threat.norm is Norm.LINF else 1.0
        return int(_halvings(torch.tensor([gap], dtype=torch.float64), torch.tensor([theta], dtype=torch.float64)))

    @staticmethod
    def _project(x: torch.Tensor, z: torch.Tensor, alpha: torch.Tensor, linf: bool) -> torch.Tensor:
        """The point at ``alpha`` between ``x`` and ``z``: a blend (l2), a clip to the box (linf)."""
        a = rows(alpha, x)
        if linf:
            return torch.minimum(torch.maximum(z, x - a), x + a)
        return (1 - a) * x + a * z

    def boundary(self, phi: Decisions, x: torch.Tensor, z: torch.Tensor, idx: torch.Tensor, linf: bool,
                 theta: float, blend_tolerance: float | None = None) -> torch.Tensor:
        """Bisection from ``z`` (phi = 1) toward ``x`` (the clean inputs of examples ``idx``, CPU),
        each example within its remaining budget; the upper ends (phi = 1).

        ``blend_tolerance``: an l2 blend to that tolerance (the noise start's search) whatever the norm."""
        blend = blend_tolerance is not None
        box = linf and not blend
        dev = x.device
        if box:
            high = _flat_norm(z - x, True)
            gap = high.cpu().double()
            tol = torch.minimum(gap * theta, torch.full_like(gap, theta))
        else:
            high = torch.ones(len(idx), dtype=x.dtype, device=dev)
            gap = torch.ones(len(idx), dtype=torch.float64)
            tol = torch.full_like(gap, blend_tolerance if blend else theta)
        start = high.clone()
        low = torch.zeros_like(high)
        todo = torch.minimum(_halvings(gap, tol), phi.remaining()[idx])
        for j in range(int(todo.max()) if len(todo) else 0):
            sel = (todo > j).nonzero().squeeze(1)
            s = sel.to(dev)
            mid = (low[s] + high[s]) / 2
            ok = phi(self._project(x[s], z[s], mid, box), idx[sel])
            high[s] = torch.where(ok, mid, high[s])
            low[s] = torch.where(ok, low[s], mid)
        # where no bisection succeeded, z itself (its projection at the start may differ by rounding)
        return torch.where(rows(high < start, z), self._project(x, z, high, box), z)

    @staticmethod
    def _uniform(shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """U[0, 1) noise of ``shape``, drawn from ``generator`` on its own device, on ``like``'s."""
        dev = generator.device if generator is not None else like.device
        return torch.rand(shape, generator=generator, device=dev, dtype=like.dtype).to(like.device)

    @staticmethod
    def _noise(shape: tuple[int, ...], like: torch.Tensor, linf: bool,
               generator: torch.Generator | None) -> torch.Tensor:
        """The sampling directions before scaling: Gaussian (l2) or uniform on [-1, 1] (linf)."""
        if linf:
            return HopSkipJump._uniform(shape, like, generator).mul_(2).sub_(1)
        dev = generator.device if generator is not None else like.device
        return torch.randn(shape, generator=generator, device=dev, dtype=like.dtype).to(like.device)

    def gradient(self, phi: Decisions, x_t: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor,
                 delta: torch.Tensor, linf: bool, bounds: tuple[float, float],
                 generator: torch.Generator | None) -> torch.Tensor:
        """The Monte-Carlo estimate of the boundary's normal at ``x_t`` (examples ``idx``, CPU),
        ``counts[i]`` samples for example i (CPU, all >= 1), radius ``delta``; unit l2 norm.

        The samples of all examples are queried together, ``max_batch`` rows at a time; the
        per-example sums are one-hot matrix products over the examples a chunk spans (no
        scatter-add, so the result is deterministic on every device)."""
        lo, hi = bounds
        dev, dtype = x_t.device, x_t.dtype
        owner = torch.repeat_interleave(torch.arange(len(idx)), counts)  # sorted by example
        sum_fu = torch.zeros_like(x_t).reshape(len(idx), -1)
        sum_u = torch.zeros_like(sum_fu)
        sum_f = torch.zeros(len(idx), dtype=dtype, device=dev)
        for start in range(0, len(owner), phi.max_batch):
            part = owner[start:start + phi.max_batch]
            first, last = int(part[0]), int(part[-1])
            own = part.to(dev)
            base = x_t[own]
            u = self._noise((len(part), *x_t.shape[1:]), x_t, linf, generator)
            u = u / rows(torch.linalg.vector_norm(u.reshape(len(part), -1), 2, dim=1).clamp_min(1e-12), u)
            radius = rows(delta[own], u)
            probe = (base + radius * u).clamp(lo, hi)
            u = ((probe - base) / radius).reshape(len(part), -1)
            f = phi(probe, idx[part]).to(dtype).mul_(2).sub_(1)
            onehot = (own[None, :] == torch.arange(first, last + 1, device=dev)[:, None]).to(dtype)
            sum_fu[first:last + 1] += onehot @ (u * f[:, None])
            sum_u[first:last + 1] += onehot @ u
            sum_f[first:last + 1] += onehot @ f
        n = counts.to(dev, dtype)
        mean_f = sum_f / n
        baseline = torch.where(mean_f.abs() == 1, torch.zeros_like(mean_f), mean_f)
        grad = (sum_fu - baseline[:, None] * sum_u) / n[:, None]
        grad = grad / torch.linalg.vector_norm(grad, 2, dim=1, keepdim=True).clamp_min(1e-12)
        return grad.view_as(x_t)

    def step_size(self, phi: Decisions, x_t: torch.Tensor, update: torch.Tensor, xi: torch.Tensor,
                  idx: torch.Tensor, limit: torch.Tensor, bounds: tuple[float, float]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Geometric step-size search: halve ``xi`` until clip(x_t + xi update) is adversarial,
        at most ``limit`` queries per example (CPU); (the new points, found per example, CPU).
        Where none was found the point stays ``x_t``."""
        lo, hi = bounds
        dev = x_t.device
        xi = xi.clone()
        found = torch.zeros(len(idx), dtype=torch.bool)
        tries = torch.zeros(len(idx), dtype=torch.long)
        searching = limit >= 1
        while bool(searching.any()):
            sel = searching.nonzero().squeeze(1)
            s = sel.to(dev)
            hit = phi((x_t[s] + rows(xi[s], x_t) * update[s]).clamp(lo, hi), idx[sel])
            xi[s] = torch.where(hit, xi[s], xi[s] / 2)
            hit = hit.cpu()
            found[sel] = hit
            tries[sel] += 1
            searching[sel] = ~hit & (tries[sel] < limit[sel])
        step = (x_t + rows(xi, x_t) * update).clamp(lo, hi)
        return torch.where(rows(found.to(dev), x_t), step, x_t), found

    def _pairwise(self, a: torch.Tensor, b: torch.Tensor, linf: bool) -> torch.Tensor:
        """Distances between the rows of ``a`` and of ``b`` (flattened), (len(a), len(b))."""
        a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
        if not linf:
            return torch.cdist(a, b)
        per = max(1, _PAIR_CHUNK // max(1, len(b) * a.shape[1]))
        return torch.cat([(part[:, None] - b[None]).abs().amax(dim=2) for part in a.split(per)])

    def start(self, phi: Decisions, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None,
              todo: torch.Tensor, linf: bool, theta: float, threat: ThreatModel,
              generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Starting points with phi = 1 on the boundary (module docstring, step 1), and found
        per example (CPU). Where none was found the point is ``x``."""
        n, dev = len(x), x.device
        lo, hi = threat.bounds
        point = x.clone()
        found = torch.zeros(n, dtype=torch.bool)
        noisy = torch.zeros(n, dtype=torch.bool)  # started from noise: blended toward x first
        if target is not None:
            self._from_batch(phi, x, y, target, todo, found, point, linf)
        for _ in range(self.init_tries):  # random noise, one draw per round for those still without
            want = (todo & ~found & (phi.remaining() >= 1)).nonzero().squeeze(1)
            if len(want) == 0:
                break
            w = want.to(dev)
            draw = self._uniform((len(want), *x.shape[1:]), x, generator) * (hi - lo) + lo
            hit = phi(draw, want)
            point[w] = torch.where(rows(hit, draw), draw, point[w])
            hit = hit.cpu()
            found[want] |= hit
            noisy[want] |= hit
        if target is None and bool((todo & ~found).any()):
            self._from_batch(phi, x, y, None, todo, found, point, linf)
        blend = noisy.nonzero().squeeze(1)
        if len(blend):
            b = blend.to(dev)
            point[b] = self.boundary(phi, x[b], point[b], blend, linf, theta, blend_tolerance=BLEND_TOLERANCE)
        return point, found

    def _from_batch(self, phi: Decisions, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None,
                    todo: torch.Tensor, found: torch.Tensor, point: torch.Tensor, linf: bool) -> None:
        """Start examples still without a point from the nearest image of the batch that the
        oracle labels as the target (untargeted: as anything but the example's label). Each
        example pays one query, for its own clean image (those out of budget are not asked)."""
        dev = x.device
        asked = (phi.remaining() >= 1).nonzero().squeeze(1)
        if len(asked) == 0:
            return
        label = torch.full((len(x),), -1, dtype=torch.long, device=dev)
        label[asked.to(dev)] = phi.labels(x[asked.to(dev)], asked)
        known = label >= 0
        goal = (target if target is not None else y).to(dev)
        fits = label[None, :] == goal[:, None] if target is not None else known[None, :] & (label[None, :] != goal[:, None])
        need = (todo & ~found).to(dev)
        fits &= need[:, None]
        dist = self._pairwise(x, x, linf)
        dist = torch.where(fits, dist, torch.full_like(dist, math.inf))
        nearest, j = dist.min(dim=1)
        ok = torch.isfinite(nearest)
        point.copy_(torch.where(rows(ok, x), x[j], point))
        found |= ok.cpu()

    # ------------------------------------------------------------------ attack
    @torch.no_grad()
    def _run(self, model: Handle, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
             target: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
        n, dev = len(x), x.device
        d = x[0].numel()
        linf = threat.norm is Norm.LINF
        theta = self.theta(d, threat.norm, self.gamma)
        lo, hi = threat.bounds
        batch = self.max_batch or (256 if x.device.type == "cpu" else 4096)
        phi = Decisions(model, y, target, self.queries, threat, batch)
        todo = torch.ones(n, dtype=torch.bool) if target is None else (target != y).cpu()

        point, found = self.start(phi, x, y, target, todo, linf, theta, threat, generator)
        idx = found.nonzero().squeeze(1)
        i_dev = idx.to(dev)
        x_t = x.clone()
        x_t[i_dev] = self.boundary(phi, x[i_dev], point[i_dev], idx, linf, theta)
        dist_before = _flat_norm(point - x, linf)  # ||x~_{t-1} - x*||, for delta_t
        best = x_t.clone()
        best_dist = torch.where(found.to(dev), _flat_norm(phi.view(x_t) - x, linf),
                                torch.full((n,), math.inf, device=dev))
        active = found.clone()
        reserve = self._reserve(d, threat)

        for t in range(1, self.steps + 1):
            evals = int(min(self.init_evals * math.sqrt(t), self.max_evals))
            counts = torch.clamp(phi.remaining() - reserve - 1, max=evals)
            active &= counts >= 1
            idx = active.nonzero().squeeze(1)
            if len(idx) == 0:
                break
            i_dev = idx.to(dev)
            xs, x0 = x_t[i_dev], x[i_dev]
            delta = (FIRST_DELTA * (hi - lo) * torch.ones_like(dist_before[i_dev]) if t == 1
                     else dist_before[i_dev] * (self.gamma / d))  # sqrt(d) theta (l2) = d theta (linf) = gamma / d
            grad = self.gradient(phi, xs, idx, counts[idx], delta, linf, threat.bounds, generator)
            update = grad.sign() if linf else grad
            xi = _flat_norm(xs - x0, linf) / math.sqrt(t)
            stepped, moved = self.step_size(phi, xs, update, xi, idx, phi.remaining()[idx] - reserve, threat.bounds)
            active[idx] &= moved  # no adversarial step within the budget: stop, keep the best
            keep = moved.nonzero().squeeze(1)
            idx, i_dev, k = idx[keep], i_dev[keep.to(dev)], keep.to(dev)
            x0, stepped = x0[k], stepped[k]
            dist_before[i_dev] = _flat_norm(stepped - x0, linf)
            xs = self.boundary(phi, x0, stepped, idx, linf, theta)
            x_t[i_dev] = xs
            dist = _flat_norm(phi.view(xs) - x0, linf)
            better = dist < best_dist[i_dev]
            best[i_dev] = torch.where(rows(better, xs), xs, best[i_dev])
            best_dist[i_dev] = torch.minimum(dist, best_dist[i_dev])
        return torch.where(rows(found.to(dev), x), phi.view(best), x)
