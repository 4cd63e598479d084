"""The Jacobian-based saliency map attack (JSMA), with the saliency map over pairs of features.

Papernot, McDaniel, Jha, Fredrikson, Celik & Swami, "The Limitations of Deep Learning in
Adversarial Settings", IEEE EuroS&P 2016 (arXiv:1511.07528), Algorithms 2 and 3.

Each iteration takes the forward derivative of the logits Z at the current point and, for the
target class t, the two per-feature terms a_i = dZ_t/dx_i and b_i = sum_{j != t} dZ_j/dx_i. The
paper's pair saliency map (Algorithm 3) scores every pair (p, q) of distinct features of the
search domain with alpha = a_p + a_q and beta = b_p + b_q:

- increasing (theta > 0): S(p, q) = -alpha beta where alpha > 0 and beta < 0, else 0;
- decreasing (theta < 0): S(p, q) = -alpha beta where alpha < 0 and beta > 0, else 0

(the decreasing map flips both conditions, Section III-B), and the pair of largest S moves by
theta. All examples advance together: the two gradients are two backward passes through one
forward pass of the whole batch of running examples (the full K-class Jacobian is never formed),
and the pair map is built with tensor ops (alpha and beta as outer sums over the features,
masked), over blocks of at most ``max_elements`` entries so memory stays bounded. An example
stops changing once it meets its goal, or when no pair of positive saliency fits in its search
domain and budget; it then drops out of the later passes. That selection of the examples still
running is the loop's one host synchronisation per iteration (it also ends the loop).
"""

from __future__ import annotations

import math
from typing import Annotated, ClassVar

import torch
from pydantic import Field, field_validator

from advbench import params
from advbench.access import Handle
from advbench.attacks.base import GradientAttack, white_box
from advbench.audit import goal_met, targetable
from advbench.registry import ATTACKS
from advbench.threat import Norm, Targeting, ThreatModel, quantize_8bit

#: the paper's MNIST settings: features set to the maximum, at most 14.5% of them changed
PAPER_THETA = 1.0
PAPER_GAMMA = 0.145
#: the largest block of the pair map (examples x rows x features) computed at once: 64 MiB of float32
MAX_ELEMENTS = 2**24


# ---------------------------------------------------------------------- the saliency map
#: a gradient term far beyond any real one: b = +BIG (theta > 0; -BIG for theta < 0) puts a
#: feature outside the search domain in no pair of positive saliency, without an inf or a NaN
BIG = 1e30


def _block_saliency(neg_a: torch.Tensor, b: torch.Tensor, r0: int, r1: int, increasing: bool,
                    out: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Rows r0..r1 of the pair saliency map, (m, r1 - r0, F), into ``out``, from ``neg_a`` = -a.

    s = (-alpha) min(beta, 0) when increasing, (-alpha) max(beta, 0) when decreasing: positive
    exactly where the pair meets the paper's sign conditions (alpha > 0 > beta, or
    alpha < 0 < beta), and there equal to -alpha beta; <= 0 elsewhere, and 0 on the diagonal (a
    feature paired with itself). Four in-place passes over preallocated memory (``scratch``
    holds beta): a fresh (m, r, F) tensor per call would cost more in page faults than the
    arithmetic."""
    beta = torch.add(b[:, r0:r1, None], b[:, None, :], out=scratch)
    beta.clamp_(max=0.0) if increasing else beta.clamp_(min=0.0)
    s = torch.add(neg_a[:, r0:r1, None], neg_a[:, None, :], out=out).mul_(beta)
    s.diagonal(offset=r0, dim1=1, dim2=2).fill_(0.0)
    return s


def _buffer(workspace: dict[str, torch.Tensor], key: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A tensor of ``shape`` carved from ``workspace[key]``, grown when too small (kept for reuse)."""
    need = math.prod(shape)
    buf = workspace.get(key)
    if buf is None or buf.numel() < need or buf.dtype != like.dtype or buf.device != like.device:
        buf = workspace[key] = torch.empty(need, dtype=like.dtype, device=like.device)
    return buf[:need].view(shape)


def pair_saliency(a: torch.Tensor, b: torch.Tensor, increasing: bool = True) -> torch.Tensor:
    """The paper's saliency map over all pairs of features (Algorithm 3), shape (m, F, F).

    ``a`` (m, F) is the target logit's gradient dZ_t/dx, ``b`` (m, F) the summed gradient of the
    other logits sum_{j != t} dZ_j/dx. With alpha = a_p + a_q and beta = b_p + b_q, the entry
    (p, q), p != q, is -alpha beta where alpha > 0 and beta < 0 (``increasing``; alpha < 0 and
    beta > 0 otherwise), else 0. Symmetric; the diagonal is 0."""
    m, f = a.shape
    out = a.new_empty(m, f, f)
    return _block_saliency(-a, b, 0, f, increasing, out, torch.empty_like(out)).clamp_(min=0.0)


#: pairs excluded from the search: (u (m, F), v (m, F), pixels): (p, q) is excluded where
#: u_p v_q = 1, except, with a pixel count (not None), where p and q are channels of one pixel
#: (features c * pixels + i, NCHW order)
Forbidden = tuple[torch.Tensor, torch.Tensor, int | None]


def best_pairs(
    a: torch.Tensor,
    b: torch.Tensor,
    domain: torch.Tensor,
    increasing: bool,
    forbidden: tuple[Forbidden, ...] = (),
    max_elements: int = MAX_ELEMENTS,
    workspace: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per example, the pair (p, q) of largest saliency (:func:`pair_saliency`) among the pairs of
    distinct features of ``domain`` (bool (m, F)) that none of ``forbidden`` excludes (each a
    0/1 outer product: a budget with one unit left forbids two new features); returns (p, q,
    found), ``found`` false where no pair has positive saliency (p, q are then meaningless).

    Ties go to the smallest p, then q (p < q), as a row-major argmax would. The map is computed
    in blocks of examples x rows of at most ``max_elements`` entries, with a running best, in
    buffers kept in ``workspace`` (pass the same dict across calls to reuse them): memory is
    that of one block whatever the image size."""
    m, f = a.shape
    workspace = {} if workspace is None else workspace
    b = torch.where(domain, b, BIG if increasing else -BIG)
    neg_a = -a
    forbidden = tuple((u.to(a.dtype), v.to(a.dtype), pixels) for u, v, pixels in forbidden)
    if f * f <= max_elements:
        per, rows = max(1, max_elements // (f * f)), f
    else:
        per, rows = 1, max(1, max_elements // f)
    best = a.new_zeros(m)
    best_p = torch.zeros(m, dtype=torch.long, device=a.device)
    best_q = torch.zeros_like(best_p)
    for e0 in range(0, m, per):
        e = slice(e0, e0 + per)
        me = min(m, e0 + per) - e0
        for r0 in range(0, f, rows):
            r1 = min(f, r0 + rows)
            shape = (me, r1 - r0, f)
            s = _block_saliency(neg_a[e], b[e], r0, r1, increasing, _buffer(workspace, "s", shape, a),
                                _buffer(workspace, "beta", shape, a))
            for u, v, pixels in forbidden:  # s <- s - s u_p v_q: exactly s, or 0 where forbidden
                k = torch.mul(u[e, r0:r1, None], v[e, None, :], out=_buffer(workspace, "beta", shape, a))
                if pixels is not None:  # the features of one pixel lie a multiple of ``pixels`` apart
                    for d in range(pixels - f, f, pixels):
                        if d != 0 and -(r1 - r0) < d + r0 < f:
                            k.diagonal(offset=d + r0, dim1=1, dim2=2).fill_(0.0)
                s.addcmul_(s, k, value=-1.0)
            row_best = s.amax(dim=2)  # (me, rows); then the best row's columns only
            value, row = row_best.max(dim=1)
            col = s[torch.arange(me, device=a.device), row].argmax(dim=1)
            better = value > best[e]  # strict: an earlier block keeps its ties
            best[e] = torch.where(better, value, best[e])
            best_p[e] = torch.where(better, row + r0, best_p[e])
            best_q[e] = torch.where(better, col, best_q[e])
    return best_p, best_q, best > 0


# ---------------------------------------------------------------------- the attack
def _theta(value: float) -> float:
    if value == 0:
        raise ValueError("must not be 0 (the change per iteration: > 0 increases features, < 0 decreases them)")
    return value


@ATTACKS.register(
    "jsma",
    description="Jacobian-based saliency map attack over pixel pairs (Papernot et al. 2016); l0, white-box, targeted",
)
class JSMA(GradientAttack):
    """JSMA (Papernot et al., EuroS&P 2016): greedy, two features per iteration, by the pair
    saliency map of the logits (see the module docstring); l0, white-box.

    Parameters:

    - ``theta``: the change per iteration, as a fraction of the input range (the paper's inputs
      are [0, 1], where this is its theta): 1.0 sets features to the maximum, -1.0 to the
      minimum, smaller values move them part of the way (a feature then stays in the search
      domain, and may be picked again, until it reaches the bound). Under ``quantize: 8bit``
      each change is rounded to the 8-bit grid and is at least one level.
    - ``gamma``: the maximum distortion, the fraction of the features that may be changed; the
      attack stops when the next pair would pass it (or the threat model's eps).
    - ``saturation``: a feature within this fraction of the range from the bound theta moves it
      to counts as saturated, outside the search domain: 0 (the paper's rule) keeps every
      feature that can still move at all; torchattacks uses 0.01 (values above 0.99 excluded).
    - ``max_elements``: the largest block of the pair map computed at once (memory only).

    Defaults: theta = 1.0 and gamma = 0.145, the paper's MNIST evaluation (LeNet: 97.1% of the
    targets reached with at most 14.5% of the 784 pixels changed, 4.02% on average). The peers differ:
    ART's ``SaliencyMapMethod`` has theta = 0.1 and gamma = 1.0, torchattacks' ``JSMA`` theta =
    1.0 and gamma = 0.1 (cleverhans' tutorial values).

    Features and the budget. A feature is one input component (one channel value), as in the
    paper (grey-level pixels), ART and torchattacks; the l0 norm counts *pixels* (all channels
    at one position). The budget is min(eps pixels, floor(gamma x features) features), both
    held exactly: a pair costs the pixels and the features it changes for the first time (two
    channels of one new pixel pay for that pixel once), and pairs that do not fit what is left
    of either budget are left out of the search. No output ever changes more than eps pixels.
    With one channel a pair always costs two new pixels when theta = +-1, so an odd budget
    leaves one pixel unused, as the paper's max_iter = floor(|X| gamma / 2) does.

    Search domain: the features that can still move in theta's direction (below the upper bound
    for theta > 0, above the lower one for theta < 0, by more than ``saturation``); a feature
    leaves it when it reaches the bound (the paper's rule, which with theta = +-1 is after its
    one change). The paper starts from every feature and removes saturated ones after their
    first pick, where a feature already at the bound would waste an iteration; cleverhans, ART
    and torchattacks (at 0.99) exclude them from the start, as here. The saliency map ignores how
    far a feature can move: on MNIST (values k/255) a pixel at 254/255 may be picked and move by
    1/255, a pixel of the budget spent for almost nothing; ``saturation=0.01`` leaves those out
    (``benchmarks/results/jsma.md``: with it advbench returns torchattacks' images exactly).

    Logits: the paper takes the forward derivative of F, the network before its softmax (so do
    cleverhans and torchattacks; ART takes the classifier's output, the logits for a model that
    returns them). Two backward passes per iteration: dZ_t/dx and d(sum_j Z_j)/dx, whose
    difference is the other classes' sum.

    Targets: the threat model's (fixed, random, least likely), as in the paper. Untargeted
    threat models are attacked through one target per example, the best wrong class of the clean
    input (argmax_{j != y} Z_j(x), the runner-up), and the example stops as soon as it is
    misclassified as any class. An example whose target is its label is left unchanged.

    Deterministic: the generator is not used (random targets come from the threat model).
    """

    norms: ClassVar[frozenset[Norm]] = frozenset({Norm.L0})
    targeting: ClassVar[frozenset[Targeting]] = frozenset(Targeting)
    randomized: ClassVar[bool] = False
    # greedy and budgeted by eps: not an ascent of one loss over ``steps`` (which "iterative"
    # attacks are traced and rerun with twice as many of), and not a minimal-perturbation search
    kind: ClassVar[str] = "other"

    class Params(params.Params):
        theta: Annotated[params.Number, Field(ge=-1, le=1)] = PAPER_THETA
        gamma: Annotated[params.PositiveNumber, Field(le=1)] = PAPER_GAMMA
        #: within this fraction of the range from its bound a feature counts as saturated
        saturation: Annotated[params.NonNegativeNumber, Field(lt=1)] = 0.0
        max_elements: params.Count = MAX_ELEMENTS

        _nonzero = field_validator("theta")(_theta)

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
        n, shape = x.shape[0], x.shape[1:]
        lo, hi = threat.bounds
        features = math.prod(shape)
        channels = x.shape[1] if x.dim() == 4 else 1  # other shapes: every element is a pixel
        pixels = features // channels
        feature_budget = math.floor(self.gamma * features + 1e-9)
        pixel_budget = min(int(threat.eps), pixels)
        if channels == 1:
            feature_budget = pixel_budget = min(feature_budget, pixel_budget)
        if feature_budget < 2 or pixel_budget < 1:  # not even one pair fits
            return x.clone()
        increasing = self.theta > 0
        step = self.theta * (hi - lo)
        if threat.quantize == "8bit":  # at least one level, so a rounded change is a change
            step = math.copysign(max(abs(step), (hi - lo) / 255), step)
        # every change saturates its feature and with one channel costs one new pixel: the pair
        # costs 2, always, and needs no per-pair budget mask
        saturating = abs(step) >= (hi - lo) * (1 - self.saturation) and channels == 1
        moves = math.ceil((hi - lo) / abs(step))  # changes a feature takes to reach the bound
        max_iterations = math.ceil(feature_budget * moves / 2) + 1

        device = x.device
        xa = x.reshape(n, features).clone()
        margin = self.saturation * (hi - lo)
        domain = xa < hi - margin if increasing else xa > lo + margin
        changed = torch.zeros(n, features, dtype=torch.bool, device=device)
        pixel_of = torch.arange(features, device=device) % pixels
        changed_pixels = torch.zeros(n, pixels, dtype=torch.bool, device=device)
        workspace: dict[str, torch.Tensor] = {}  # the pair map's buffers, reused every iteration
        label = target.clone() if target is not None else y.clone()  # untargeted: set at the clean pass
        idx = targetable(y, target).nonzero().squeeze(1)
        for it in range(max_iterations):
            if idx.numel() == 0:
                break
            xi = xa[idx].view(-1, *shape).requires_grad_(True)
            logits = net(xi)
            z = logits.detach()
            if it == 0 and target is None:  # the runner-up class of the clean input
                label[idx] = z.scatter(1, y[idx, None], -math.inf).argmax(dim=1)
            hit = goal_met(z.argmax(dim=1), y[idx], None if target is None else target[idx])
            t = label[idx]
            (grad_t,) = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), xi, retain_graph=True)
            (grad_all,) = torch.autograd.grad(logits.sum(), xi)
            with torch.no_grad():
                a = grad_t.reshape(-1, features)
                b = grad_all.reshape(-1, features) - a
                dom, forbidden = self._within_budget(domain[idx], changed[idx], changed_pixels[idx], pixel_of,
                                                     feature_budget, pixel_budget, saturating)
                p, q, found = best_pairs(a, b, dom, increasing, forbidden, self.max_elements, workspace)
                go = found & ~hit
                for f in (p, q):
                    old = xa[idx, f]
                    new = (old + step).clamp(lo, hi)
                    if threat.quantize == "8bit":
                        new = quantize_8bit(new, threat.bounds)
                    xa[idx, f] = torch.where(go, new, old)
                    changed[idx, f] |= go
                    changed_pixels[idx, pixel_of[f]] |= go
                    saturated = new >= hi - margin if increasing else new <= lo + margin
                    domain[idx, f] &= ~(go & saturated)
                if saturating:  # a row that cannot pay for another pair stops without a forward pass
                    go &= changed[idx].sum(dim=1) + 2 <= feature_budget
                # the iteration's one host synchronisation: which examples go on (the next
                # pass's batch), which also ends the loop when none is left
                idx = idx[go.nonzero().squeeze(1)]
        return xa.view_as(x)

    @staticmethod
    def _within_budget(
        domain: torch.Tensor,
        changed: torch.Tensor,
        changed_pixels: torch.Tensor,
        pixel_of: torch.Tensor,
        feature_budget: int,
        pixel_budget: int,
        saturating: bool,
    ) -> tuple[torch.Tensor, tuple[Forbidden, ...]]:
        """The search domain and the forbidden pairs (:func:`best_pairs`) that hold every pair to
        what is left of the feature budget (gamma) and of the pixel budget (eps).

        A pair costs 0, 1 or 2 new features (pixels: two channels of one new pixel cost 1). With
        nothing left, new features leave the domain; with one unit left, pairs of two new ones are
        forbidden. Where every change saturates its feature and there is one channel, every
        feature of the domain is new and the rows that cannot pay for two were stopped already:
        nothing to do. With one channel the two budgets are one."""
        if saturating:
            return domain, ()
        pixels = changed_pixels.shape[1]
        new = ~changed
        left = feature_budget - changed.sum(dim=1, keepdim=True)
        budgets = [(new, left, None)]
        if pixels < changed.shape[1]:  # several channels: pixels are a budget of their own
            new_pixel = ~changed_pixels[:, pixel_of]
            budgets.append((new_pixel, pixel_budget - changed_pixels.sum(dim=1, keepdim=True), pixels))
        forbidden = []
        for fresh, rest, per_pixel in budgets:
            domain = domain & ~(fresh & (rest <= 0))
            forbidden.append(((fresh & (rest == 1)).to(torch.float32), fresh.to(torch.float32), per_pixel))
        return domain, tuple(forbidden)
