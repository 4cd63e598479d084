"""The Square attack: score-based random search with square-shaped updates.

Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a query-efficient black-box
adversarial attack via random search", ECCV 2020 (arXiv:1912.00049). The reference code is
AutoAttack's ``SquareAttack`` (``pyautoattack/square.py``); where it and the paper differ, the
reference is followed (its batch-shared draws by default, see the end).

The attack minimizes, from scores only, a loss L of the model's output, keeping per example the
best point x* so far. Losses, on log-probabilities (they differ from the logits by a per-row
constant, so the margin is the logit margin and stays finite for confident models):

- untargeted: the margin m = z_y - max_{i != y} z_i, which is also the loss (``loss="margin"``,
  the default), or log p_y (``loss="ce"``, minus the cross-entropy);
- targeted: m = max_{i != t} z_i - z_t, and the loss is the cross-entropy toward the target,
  -log p_t, whatever ``loss`` says (the reference's targeted loss).

An example has met its goal when m < 0 and is queried no more. Each iteration makes one query
per example still failing (all of them in one forward pass): a candidate x' built from x*
replaces x* where L(x') < L(x*) or m(x') < 0 (the reference's acceptance rule).

Square size: at iteration i (0-based) the share of the image a square covers is
p = p_selection(i'), with i' = int(i / Q * 10000) (``rescale_schedule``, the reference's
rescaling of the schedule to a 10,000-query horizon; Q the run's iterations, its query
allowance less the first query, which is the reference's ``n_queries``), and

    p_selection(i') = p_init / 2^k, k = 0 for i' <= 10 and k = 1..9 for i' in (10, 50], (50, 200],
    (200, 500], (500, 1000], (1000, 2000], (2000, 4000], (4000, 6000], (6000, 8000], > 8000.

The side is s = round(sqrt(p h w)) (at least 1 for linf; at least 3 and odd for l2), at most
min(h, w); its top-left corner is drawn uniformly per example from [0, h - s) x [0, w - s)
(integer parts of a uniform draw, as the reference's ``random_int``: 0 where s = h).

L-inf (``eps``): the start is vertical stripes, x + eps r with r in {-1, 1}^{c x 1 x w} per
example, clipped to the bounds. A candidate sets the square of x* to x + eps sigma (sigma in
{-1, 1}^c, one sign per channel), clipped to the bounds (the reference adds 2 eps sigma to x*
and projects, which gives the same point).

L2 (``eps``): the start tiles the image with s0 x s0 blocks, s0 = h // 5, from offset
(h - 5 s0) // 2 (in both directions, as the reference), each block holding the centred
"meta-pseudo-gaussian" eta(s0) with a random sign per channel; the perturbation is scaled to
norm eps and clipped. eta(s) is two rectangles stacked, the upper s//2 rows positive, the rest
negative, each holding sum_{k=d}^{K-1} 1/(k+1)^2 at Chebyshev distance d from its centre
(K = its half-size + 1) normalized to unit L2 norm, the whole normalized again and transposed
with probability 1/2. A candidate draws two windows W1, W2 of side s and, per channel, moves
the perturbation's mass out of W1 u W2 into W1 (the window-wise redistribution):

    new = eta(s) sigma + delta_W1 / ||delta_W1||,
    new <- new / ||new|| sqrt(max(eps^2 - ||delta||^2, 0) / c + ||delta_{W1 u W2}||^2),
    delta_W2 <- 0, delta_W1 <- new, x' = clip(x + eps delta / ||delta||)

(norms per channel over the window, ||delta|| over the whole example; the mass lost to clipping
comes back through the first term under the root). Norms and scales are computed in float64.

Budget: ``queries`` per example and restart, the initial evaluation included, and never more
than the threat model's ``query_budget`` (read from the score oracle's ``remaining()``; under
white-box access the attack counts itself, so both give the same result for one seed). The
reference makes ``n_queries`` queries after its initial one; with ``queries = Q`` this makes
at most Q in all, with the same schedule. ``restarts`` runs again, from a new start, on the
examples still failing. Under ``quantize: 8bit`` every candidate is queried as the 8-bit image
that counts (``threat.quantized``), so a success found is a success of the audited image.

Defaults (the reference's): ``queries`` 5000, ``p_init`` 0.8, ``restarts`` 1, ``loss`` margin,
``rescale_schedule`` on. Returned per example: the first point that met the goal, else the
point of lowest loss over the restarts.

Draws (``draws``): the reference code draws one square position, one set of channel signs
(linf) and one eta transposition (l2) per iteration for the whole batch (so the examples of a
batch move together), the l2 signs per example; ``draws: batch`` (the default) does the same,
in the reference's order from the call's generator, so a seed gives the reference's result for
the same seed (and, under linf, an example's result does not depend on the rest of its batch).
``draws: example`` draws them per example, as in the paper and the authors' original code.
Each example sees uniformly distributed squares either way; the size is one per iteration (it
depends on the iteration only). The authors' original linf code also redraws a candidate that
would not change x*; AutoAttack's, followed here, does not.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Annotated, ClassVar, Literal

import torch
from pydantic import Field

from advbench import params
from advbench.access import Handle, ScoreOracle, WhiteBoxModel
from advbench.attacks.base import Attack
from advbench.audit import targetable
from advbench.errors import UnsupportedThreatError
from advbench.registry import ATTACKS
from advbench.tensors import rows, to_device
from advbench.threat import Knowledge, Norm, Targeting, ThreatModel

#: halving points of the reference's schedule, in iterations of a 10,000-query horizon
SCHEDULE = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_selection(p_init: float, i: int, horizon: int, rescale: bool = True) -> float:
    """The share of the image a square covers at iteration ``i`` (0-based) of ``horizon``."""
    it = int(i / horizon * 10000) if rescale else i
    return p_init / 2 ** sum(it > b for b in SCHEDULE)


def square_side(p: float, h: int, w: int, norm: Norm) -> int:
    """The square's side for share ``p`` of an h x w image (the reference's rounding)."""
    s = round(math.sqrt(p * h * w))
    if norm is Norm.LINF:
        s = max(s, 1)
    else:
        s = max(s, 3)
        s += 1 - s % 2
    return min(s, min(h, w))


def _rectangles(a: int, b: int, device: torch.device) -> torch.Tensor:
    """The reference's ``eta_rectangles``: nested rectangles centred at (a // 2, b // 2), the k-th
    adding 1/(k+1)^2, normalized to unit L2 norm (a x b)."""
    if a == 0:
        return torch.zeros(0, b, dtype=torch.float64, device=device)
    r = (torch.arange(a, device=device) - a // 2).abs()
    c = (torch.arange(b, device=device) - b // 2).abs()
    d = torch.maximum(r[:, None], c[None, :])  # Chebyshev distance to the centre
    terms = 1.0 / (torch.arange(max(a // 2 + 1, b // 2 + 1), device=device, dtype=torch.float64) + 1) ** 2
    tail = terms.flip(0).cumsum(0).flip(0)  # tail[d] = sum_{k >= d} terms[k]
    out = tail[d]
    return out / out.norm()


@functools.lru_cache(maxsize=64)
def eta(s: int, device: torch.device) -> torch.Tensor:
    """The L2 update's pattern, untransposed and transposed: (2, s, s), float64, each of unit L2
    norm (cached: one per side and device; never modified)."""
    top = _rectangles(s // 2, s, device)
    bottom = -_rectangles(s - s // 2, s, device)
    e = torch.cat([top, bottom], dim=0)
    e = e / e.norm()
    return torch.stack([e, e.t()])


def window(corner_h: torch.Tensor, corner_w: torch.Tensor, s: int, h: int, w: int) -> torch.Tensor:
    """Per example, the s x s square at (corner_h, corner_w) as a (k, 1, h, w) bool mask."""
    ar_h = torch.arange(h, device=corner_h.device)
    ar_w = torch.arange(w, device=corner_w.device)
    in_h = (ar_h >= corner_h[:, None]) & (ar_h < corner_h[:, None] + s)
    in_w = (ar_w >= corner_w[:, None]) & (ar_w < corner_w[:, None] + s)
    return (in_h[:, :, None] & in_w[:, None, :]).unsqueeze(1)


def place(pattern: torch.Tensor, which: torch.Tensor, corner_h: torch.Tensor, corner_w: torch.Tensor,
          h: int, w: int) -> torch.Tensor:
    """``pattern[which]`` (pattern (2, s, s), which (k,)) written at each example's corner of a
    zero (k, 1, h, w) image."""
    s = pattern.shape[-1]
    ar_h = torch.arange(h, device=corner_h.device)
    ar_w = torch.arange(w, device=corner_w.device)
    rh = ar_h[None, :] - corner_h[:, None]
    rw = ar_w[None, :] - corner_w[:, None]
    inside = ((rh >= 0) & (rh < s))[:, :, None] & ((rw >= 0) & (rw < s))[:, None, :]
    out = pattern[which[:, None, None], rh.clamp(0, s - 1)[:, :, None], rw.clamp(0, s - 1)[:, None, :]]
    return (out * inside).unsqueeze(1)


def _l2(t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """L2 norm over ``dims``, kept, reduced in float64."""
    return torch.linalg.vector_norm(t, 2, dim=dims, keepdim=True, dtype=torch.float64)


def _images(x: torch.Tensor) -> torch.Tensor:
    """``x`` as NCHW: 3-D batches get one channel, others become 1 x 1 x numel strips."""
    if x.dim() == 4:
        return x
    if x.dim() == 3:
        return x.unsqueeze(1)
    return x.reshape(x.shape[0], 1, 1, -1)


@ATTACKS.register(
    "square",
    description="Square attack (Andriushchenko et al. 2020): score-based random search with squares; linf, l2",
)
class Square(Attack):
    """Square attack (module docstring): random search over square updates, from scores only."""

    norms: ClassVar[frozenset[Norm]] = frozenset({Norm.LINF, Norm.L2})
    targeting: ClassVar[frozenset[Targeting]] = frozenset(Targeting)
    knowledge: ClassVar[frozenset[Knowledge]] = frozenset({Knowledge.WHITE_BOX, Knowledge.SCORE_BASED})
    kind: ClassVar[str] = "score_based"
    randomized: ClassVar[bool] = True

    class Params(params.Params):
        queries: params.Count = 5000  # per example and restart, the initial evaluation included
        p_init: Annotated[params.PositiveNumber, Field(le=1)] = 0.8
        restarts: params.Count = 1
        loss: Literal["margin", "ce"] = "margin"  # untargeted only; targeted uses the cross-entropy
        rescale_schedule: params.Flag = True
        #: "batch": one square position, one set of linf channel signs and one l2 pattern
        #: orientation per iteration for the whole batch (AutoAttack's code: its numbers per seed);
        #: "example": drawn per example (the paper's and the authors' original code)
        draws: Literal["batch", "example"] = "batch"

    # ------------------------------------------------------------------ pieces
    def _draw(self, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        """Uniform draws from ``generator`` on its own device, then moved to ``device`` (from a CPU
        generator to a GPU without a blocking copy's stream synchronisation:
        :func:`~advbench.tensors.to_device`)."""
        dev = generator.device if generator is not None else device
        return to_device(torch.rand(shape, generator=generator, device=dev), device)

    def _signs(self, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device,
               dtype: torch.dtype) -> torch.Tensor:
        u = self._draw(shape, generator, device)
        return torch.where(u < 0.5, -1.0, 1.0).to(dtype)

    def _corners(self, n: int, h: int, w: int, s: int, generator: torch.Generator | None,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        u = self._draw((2, n), generator, device)
        return (u[0] * (h - s)).long(), (u[1] * (w - s)).long()

    def _margin_loss(self, logp: torch.Tensor, label: torch.Tensor, targeted: bool
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(margin, loss) per example from log-probabilities; ``label`` is y or the target."""
        own = logp.gather(1, label[:, None]).squeeze(1)
        other = logp.scatter(1, label[:, None], -math.inf).amax(dim=1)
        if targeted:
            return other - own, -own
        margin = own - other
        return margin, (margin if self.loss == "margin" else own)

    def _init_linf(self, x: torch.Tensor, threat: ThreatModel, generator: torch.Generator | None) -> torch.Tensor:
        n, c, _, w = x.shape
        stripes = self._signs((n, c, 1, w), generator, x.device, x.dtype)
        return (x + threat.eps * stripes).clamp(*threat.bounds)

    def _scale_l2(self, x: torch.Tensor, delta: torch.Tensor, threat: ThreatModel) -> torch.Tensor:
        """clip(x + eps delta / ||delta||): the reference's ``normalize`` times eps, in float64."""
        n = _l2(delta, tuple(range(1, delta.dim())))
        factor = (threat.eps / (n + 1e-12)).to(delta.dtype)
        return (x + delta * factor).clamp(*threat.bounds)

    def _init_l2(self, x: torch.Tensor, threat: ThreatModel, generator: torch.Generator | None) -> torch.Tensor:
        n, c, h, w = x.shape
        s = max(h // 5, 1)
        start = (h - 5 * s) // 2  # the reference's offset, from h, in both directions
        nb_h, nb_w = h // s, w // s
        if self.draws == "batch":  # the reference's order: per block, its orientation, then the signs
            flip_list, sign_list = [], []
            for _ in range(nb_h * nb_w):
                flip_list.append(self._draw((1,), generator, x.device))
                sign_list.append(self._signs((n, c, 1), generator, x.device, x.dtype))
            flips = (torch.cat(flip_list).view(1, nb_h, nb_w) > 0.5).long()
            signs = torch.cat(sign_list, dim=2).view(n, c, nb_h, nb_w)
        else:
            flips = (self._draw((n, nb_h, nb_w), generator, x.device) > 0.5).long()
            signs = self._signs((n, c, nb_h, nb_w), generator, x.device, x.dtype)
        pattern = eta(s, x.device).to(x.dtype)
        rr = torch.arange(h, device=x.device) - start
        cc = torch.arange(w, device=x.device) - start
        in_r = (rr >= 0) & (rr < nb_h * s)
        in_c = (cc >= 0) & (cc < nb_w * s)
        br, lr = rr.clamp(0, nb_h * s - 1) // s, rr.clamp(0, nb_h * s - 1) % s
        bc, lc = cc.clamp(0, nb_w * s - 1) // s, cc.clamp(0, nb_w * s - 1) % s
        which = flips[:, br[:, None], bc[None, :]]  # (n, h, w)
        values = pattern[which, lr[None, :, None], lc[None, None, :]]
        sign = signs[:, :, br[:, None], bc[None, :]]  # (n, c, h, w)
        delta = values.unsqueeze(1) * sign * (in_r[:, None] & in_c[None, :])
        return self._scale_l2(x, delta, threat)

    def _candidate_linf(self, x: torch.Tensor, best: torch.Tensor, s: int, threat: ThreatModel,
                        generator: torch.Generator | None) -> torch.Tensor:
        k, c, h, w = x.shape
        k = 1 if self.draws == "batch" else k  # one draw for the batch, broadcast
        ch, cw = self._corners(k, h, w, s, generator, x.device)
        sign = self._signs((k, c, 1, 1), generator, x.device, x.dtype)
        return torch.where(window(ch, cw, s, h, w), (x + threat.eps * sign).clamp(*threat.bounds), best)

    def _candidate_l2(self, x: torch.Tensor, best: torch.Tensor, s: int, threat: ThreatModel,
                      generator: torch.Generator | None) -> torch.Tensor:
        k, c, h, w = x.shape
        dev = x.device
        shared = 1 if self.draws == "batch" else k  # windows and orientation: one for the batch, broadcast
        h1, w1 = self._corners(shared, h, w, s, generator, dev)
        h2, w2 = self._corners(shared, h, w, s, generator, dev)
        flips = (self._draw((shared,), generator, dev) > 0.5).long()
        sign = self._signs((k, c, 1, 1), generator, dev, x.dtype)  # per example in both (the reference's)
        delta = best - x
        m1, m2 = window(h1, w1, s, h, w), window(h2, w2, s, h, w)
        spatial = (2, 3)
        in_w1 = delta * m1
        norm_w1 = _l2(in_w1, spatial)  # per channel
        norm_all = _l2(delta, (1, 2, 3))
        norm_union = _l2(delta * (m1 | m2), spatial)
        new = place(eta(s, dev), flips, h1, w1, h, w) * sign.double() + in_w1.double() / (1e-12 + norm_w1)
        mass = ((threat.eps ** 2 - norm_all ** 2).clamp_min(0) / c + norm_union ** 2).sqrt()
        new = (new / (1e-12 + _l2(new, spatial)) * mass).to(x.dtype)
        delta = torch.where(m1, new, torch.where(m2, torch.zeros_like(delta), delta))
        return self._scale_l2(x, delta, threat)

    # ------------------------------------------------------------------ attack
    @torch.no_grad()
    def _run(self, model: Handle, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
             target: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
        shape = x.shape[1:]  # queries go to the model in the inputs' own shape
        if isinstance(model, ScoreOracle):
            def score(z: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
                return model.log_scores(z.reshape(-1, *shape), index=idx).to(z.device)

            def left() -> torch.Tensor:
                return model.remaining().to(x.device)
        elif isinstance(model, WhiteBoxModel):
            def score(z: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
                return model(z.reshape(-1, *shape)).float().log_softmax(dim=1)

            def left() -> torch.Tensor:
                budget = threat.query_budget
                return torch.full_like(used, 2**62) if budget is None else budget - used
        else:  # pragma: no cover - guarded by check_threat
            raise UnsupportedThreatError("the square attack needs scores (a score oracle or white-box access)")
        n = x.shape[0]
        images = _images(x)
        label = y if target is None else target
        used = torch.zeros(n, dtype=torch.long, device=x.device)
        out = images.clone()
        out_loss = torch.full((n,), math.inf, device=x.device)
        done = ~targetable(y, target)  # an example of its target class is not attacked
        for _ in range(self.restarts):
            allow = torch.minimum(left(), torch.full_like(used, self.queries))
            idx = (~done & (allow > 0)).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            found, point, loss = self._single(score, images[idx], label[idx], idx, allow[idx], threat,
                                              target is not None, generator)
            used[idx] += found[1]
            keep = found[0] | (loss < out_loss[idx])
            out[idx] = torch.where(rows(keep, point), point, out[idx])
            out_loss[idx] = torch.where(keep, loss, out_loss[idx])
            done[idx] |= found[0]
        return out.reshape(x.shape)

    def _single(self, score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
                label: torch.Tensor, index: torch.Tensor, allow: torch.Tensor, threat: ThreatModel,
                targeted: bool, generator: torch.Generator | None
                ) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor, torch.Tensor]:
        """One run on ``x`` (k examples, each allowed ``allow`` queries): ((met the goal, queries
        used), the best point, its loss) per example."""
        k, _, h, w = x.shape
        quantize = threat.quantize == "8bit"

        def ask(z: torch.Tensor, at: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self._margin_loss(score(z, index[at]), label[at], targeted)

        linf = threat.norm is Norm.LINF
        best = self._init_linf(x, threat, generator) if linf else self._init_l2(x, threat, generator)
        if quantize:
            best = threat.quantized(best, x)
        everyone = torch.arange(k, device=x.device)
        margin, loss = ask(best, everyone)
        used = torch.ones(k, dtype=torch.long, device=x.device)
        horizon = min(self.queries, int(allow.max())) - 1  # iterations after the first query
        for i in range(horizon):
            active = (margin >= 0) & (used < allow)
            # the iteration's one host synchronisation, kept: only the examples still failing are
            # queried (the reference's ``idx_to_fool``), so queries and passes are counted as
            # spent, and under l2 (or ``draws: example``) the generator draws per queried example,
            # so masking the whole batch instead would change the draws and the results
            a = active.nonzero().squeeze(1)
            if a.numel() == 0:
                break
            s = square_side(p_selection(self.p_init, i, horizon, self.rescale_schedule), h, w, threat.norm)
            xa, ba = x[a], best[a]
            cand = self._candidate_linf(xa, ba, s, threat, generator) if linf else \
                self._candidate_l2(xa, ba, s, threat, generator)
            if quantize:
                cand = threat.quantized(cand, xa)
            m, v = ask(cand, a)
            improved = v < loss[a]
            accept = improved | (m < 0)
            loss[a] = torch.where(improved, v, loss[a])
            margin[a] = torch.where(accept, m, margin[a])
            best[a] = torch.where(rows(accept, cand), cand, ba)
            used[a] += 1
        return (margin < 0, used), best, loss
