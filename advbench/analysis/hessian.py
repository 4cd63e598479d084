"""The Hessian of the loss with respect to the *input*, per example, batched.

For an eval-mode classifier the examples of a batch do not interact, so the Hessian of the
summed per-example cross-entropy with respect to the batch is block diagonal: one double
backward gives ``H_i v_i`` for every example ``i`` at once (:class:`InputHessian`). The first
backward (with ``create_graph``) is done once and kept, so each further product costs one
backward through the gradient's graph. It is autograd's exact second derivative: for a
piecewise-linear network (ReLU, max-pooling) it equals the generalized Gauss-Newton matrix
``J^T (diag p - p p^T) J`` (the network's second derivative is zero almost everywhere), for a
smooth one it includes the network's own curvature.

On top of the products, for every example of the batch at once:

- :meth:`InputHessian.exact`: the full ``D x D`` Hessian (symmetrized) from ``D`` products, the
  basis directions taken ``chunk`` at a time through a replicated batch; :func:`eigenvalues`;
- :func:`lanczos`: ``m`` steps with full reorthogonalization (twice, in float64), restarting
  from a fresh random direction where the Krylov space closes (so ``m`` up to ``D`` is exact);
  :func:`top_eigen`: the top-k Ritz pairs;
- :func:`slq`: the spectral density by stochastic Lanczos quadrature (Ubaru et al. 2017): per
  probe vector the Ritz values and the squared first components of their eigenvectors;
- :func:`hutchinson`: the trace, as the mean of ``z^T H z`` over Rademacher ``z``, with its
  standard error;
- :func:`curvature`: ``k(v, x) = v^T H v / (|v|^2 |grad|)``, the curvature along ``v`` scaled
  by the gradient's norm (the seed's eq. 3).

:class:`GaussNewton` is the fast path for piecewise-linear networks (every reference model):
the logits' Jacobian from K backward passes, then products as small matrix products and the
whole spectrum from a K x K eigenproblem; :func:`gauss_newton_is_exact` checks, per example,
that it is the Hessian (7-18x a per-example loop on a batch of 64 here, where the batched double
backward is 0.7-2.2x: benchmarks/results/hvp.md).

Precision: give ``dtype=torch.float64`` for an analysis. In float32 the Hessian of an example
classified with ``p ~ 1`` is rounding noise (``diag p - p p^T`` cancels): on digits-cnn the
float32 spectrum's error relative to its largest eigenvalue grows like ~1e-8 / loss (27-56% at
losses ~1e-8, ~1e-3 at ~1e-5), while float64 matches autograd's float64 Hessian to 1e-9.

Randomness comes from an explicit ``torch.Generator``; every function reports the number of
Hessian-vector products it used per example (``InputHessian.products``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from advbench.tensors import frozen, rand_like, randn_like

Operator = Callable[[torch.Tensor], torch.Tensor]  # (N, D) -> (N, D), one product per example


class InputHessian:
    """Products with each example's input Hessian of the cross-entropy ``loss(model(x_i), y_i)``
    (or, with ``target``, of the logit margin ``z_y - z_target``: the decision boundary's view).

    ``x``: (N, ...) inputs; ``y``: (N,) labels. The model is used frozen (eval mode, no parameter
    gradients), in its own dtype unless ``dtype`` asks for another (then a float64 copy, say, is
    differentiated). ``products`` counts the products computed per example."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None,
                 dtype: torch.dtype | None = None) -> None:
        if dtype is not None:
            import copy

            model = copy.deepcopy(model).to(dtype)
            x = x.to(dtype)
        self.model, self.y, self.target = model, y, target
        self.n, self.dim = int(x.shape[0]), int(x[0].numel())
        self.shape = tuple(x.shape)
        self.products = 0
        self._x = x.detach().clone().requires_grad_(True)
        with frozen(model), torch.enable_grad():
            logits = model(self._x)
            if target is None:
                self.loss = F.cross_entropy(logits, y, reduction="none")
            else:
                self.loss = logits.gather(1, y[:, None]).squeeze(1) - logits.gather(1, target[:, None]).squeeze(1)
            (self._g,) = torch.autograd.grad(self.loss.sum(), self._x, create_graph=True)
        self.logits = logits.detach()
        self.loss = self.loss.detach()
        self.gradient = self._g.detach().reshape(self.n, -1)
        self._differentiable = self._g.requires_grad  # a model linear in x has a zero Hessian

    @property
    def dtype(self) -> torch.dtype:
        return self._x.dtype

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        """``H_i v_i`` for every example (``v``: (N, D) or the inputs' shape), as (N, D)."""
        self.products += 1
        v = v.reshape(self.shape).to(self.dtype)
        if not self._differentiable:
            return torch.zeros(self.n, self.dim, dtype=self.dtype, device=v.device)
        (hv,) = torch.autograd.grad(self._g, self._x, grad_outputs=v, retain_graph=True)
        return hv.reshape(self.n, -1)

    def exact(self, chunk: int | None = None) -> torch.Tensor:
        """The (N, D, D) Hessians, symmetrized, in float64: ``D`` products per example, ``chunk``
        basis directions at a time through a batch replicated ``chunk`` times (default: as many
        as keep the replicated batch within 4,096 rows)."""
        chunk = max(1, min(self.dim, chunk or 4096 // max(self.n, 1)))
        x = self._x.detach()
        rep = InputHessian(self.model, x.repeat_interleave(chunk, dim=0), self.y.repeat_interleave(chunk, dim=0),
                           None if self.target is None else self.target.repeat_interleave(chunk, dim=0))
        out = torch.empty(self.n, self.dim, self.dim, dtype=torch.float64, device=x.device)
        eye = torch.eye(self.dim, dtype=self.dtype, device=x.device)
        for start in range(0, self.dim, chunk):
            cols = eye[start : start + chunk]  # (c, D)
            c = cols.shape[0]
            if c < chunk:  # the last chunk: pad with zero directions
                cols = torch.cat([cols, cols.new_zeros(chunk - c, self.dim)])
            hv = rep.hvp(cols.repeat(self.n, 1)).reshape(self.n, chunk, self.dim)[:, :c]
            out[:, :, start : start + c] = hv.transpose(1, 2).double()
        self.products += self.dim
        return (out + out.transpose(1, 2)) / 2


def eigenvalues(hessians: torch.Tensor) -> torch.Tensor:
    """Ascending eigenvalues (N, D) of symmetric (N, D, D) matrices."""
    return torch.linalg.eigvalsh(hessians)


@dataclass(frozen=True)
class Tridiagonal:
    """What ``m`` Lanczos steps leave per example: the tridiagonal ``T`` (N, m, m) and the
    orthonormal basis ``Q`` (N, m, D) with ``Q H Q^T = T``."""

    T: torch.Tensor
    Q: torch.Tensor


def lanczos(op: Operator, start: torch.Tensor, steps: int, generator: torch.Generator | None = None) -> Tridiagonal:
    """``steps`` Lanczos iterations of ``op`` (one product per example each) from ``start``
    (N, D), all examples at once, with full reorthogonalization in float64. Where the Krylov
    space of an example closes (its next vector vanishes) the iteration goes on from a random
    direction orthogonal to all before, with a zero coupling, so ``T``'s eigenvalues stay
    eigenvalues of ``H`` and ``steps = D`` gives the whole spectrum."""
    n, d = start.shape
    steps = min(steps, d)
    q = start.double() / start.double().norm(dim=1, keepdim=True).clamp_min(1e-300)
    Q = torch.zeros(n, steps, d, dtype=torch.float64, device=start.device)
    alpha = torch.zeros(n, steps, dtype=torch.float64, device=start.device)
    beta = torch.zeros(n, max(steps - 1, 0), dtype=torch.float64, device=start.device)
    q_prev = torch.zeros_like(q)
    b_prev = torch.zeros(n, dtype=torch.float64, device=start.device)
    for j in range(steps):
        Q[:, j] = q
        w = op(q).double()
        a = (w * q).sum(dim=1)
        alpha[:, j] = a
        if j == steps - 1:
            break
        w = w - a[:, None] * q - b_prev[:, None] * q_prev
        basis = Q[:, : j + 1]
        for _ in range(2):  # twice is enough (Parlett's "twice is enough")
            w = w - torch.einsum("nj,njd->nd", torch.einsum("njd,nd->nj", basis, w), basis)
        b = w.norm(dim=1)
        scale = torch.maximum(a.abs(), b_prev).clamp_min(1.0)
        closed = b <= 1e-10 * scale
        fresh = randn_like(w, generator)
        for _ in range(2):
            fresh = fresh - torch.einsum("nj,njd->nd", torch.einsum("njd,nd->nj", basis, fresh), basis)
        fresh = fresh / fresh.norm(dim=1, keepdim=True).clamp_min(1e-300)
        b = torch.where(closed, torch.zeros_like(b), b)
        q_prev, q = q, torch.where(closed[:, None], fresh, w / b.clamp_min(1e-300)[:, None])
        beta[:, j] = b
        b_prev = b
    T = torch.diag_embed(alpha) + torch.diag_embed(beta, offset=1) + torch.diag_embed(beta, offset=-1)
    return Tridiagonal(T, Q)


def top_eigen(hessian: InputHessian, k: int, steps: int | None = None,
              generator: torch.Generator | None = None, by: str = "value") -> tuple[torch.Tensor, torch.Tensor]:
    """The top-``k`` Ritz values (N, k), descending, and unit Ritz vectors (N, k, D) of every
    example's Hessian after ``steps`` Lanczos iterations (default ``min(D, max(3k, 30))``) from
    a random start; ``by="magnitude"`` ranks by |eigenvalue|."""
    steps = min(hessian.dim, steps or max(3 * k, 30))
    start = randn_like(torch.empty(hessian.n, hessian.dim, dtype=torch.float64, device=hessian.gradient.device),
                       generator)
    tri = lanczos(hessian.hvp, start, steps, generator)
    theta, S = torch.linalg.eigh(tri.T)
    key = theta.abs() if by == "magnitude" else theta
    order = key.argsort(dim=1, descending=True)[:, :k]
    values = theta.gather(1, order)
    vectors = torch.einsum("nmk,nmd->nkd", S.gather(2, order[:, None, :].expand(-1, S.shape[1], -1)), tri.Q)
    return values, vectors


@dataclass(frozen=True)
class SpectralDensity:
    """Stochastic Lanczos quadrature: per example and probe, nodes (Ritz values) and weights
    (summing to 1 per probe); the density is their average over probes."""

    nodes: torch.Tensor  # (N, probes, m)
    weights: torch.Tensor  # (N, probes, m)

    def histogram(self, edges: torch.Tensor) -> torch.Tensor:
        """The density's mass in each bin of ``edges`` (B+1,), per example (N, B); mass outside
        the edges goes to the first or last bin."""
        b = edges.numel() - 1
        idx = (torch.bucketize(self.nodes.contiguous(), edges.to(self.nodes), right=True) - 1).clamp(0, b - 1)
        out = torch.zeros(*self.nodes.shape[:2], b, dtype=torch.float64, device=self.nodes.device)
        out.scatter_add_(2, idx, self.weights.double())
        return out.mean(dim=1)


def slq(hessian: InputHessian, steps: int, probes: int, generator: torch.Generator | None = None) -> SpectralDensity:
    """The spectral density of every example's Hessian by stochastic Lanczos quadrature:
    ``probes`` Rademacher start vectors, ``steps`` Lanczos iterations each (``steps x probes``
    products per example)."""
    nodes, weights = [], []
    like = torch.empty(hessian.n, hessian.dim, dtype=torch.float64, device=hessian.gradient.device)
    for _ in range(probes):
        z = rand_like(like, generator).lt(0.5).double().mul(2).sub(1)
        tri = lanczos(hessian.hvp, z, steps, generator)
        theta, S = torch.linalg.eigh(tri.T)
        nodes.append(theta)
        weights.append(S[:, 0, :] ** 2)
    return SpectralDensity(torch.stack(nodes, dim=1), torch.stack(weights, dim=1))


def hutchinson(hessian: InputHessian, samples: int, generator: torch.Generator | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Hutchinson's trace estimate per example (N,) and its standard error (N,): the mean and
    the standard deviation / sqrt(samples) of ``z^T H z`` over Rademacher ``z``."""
    like = torch.empty(hessian.n, hessian.dim, dtype=torch.float64, device=hessian.gradient.device)
    values = []
    for _ in range(samples):
        z = rand_like(like, generator).lt(0.5).double().mul(2).sub(1)
        values.append((hessian.hvp(z).double() * z).sum(dim=1))
    v = torch.stack(values, dim=1)
    se = v.std(dim=1, correction=1) / math.sqrt(samples) if samples > 1 else torch.full_like(v[:, 0], math.inf)
    return v.mean(dim=1), se


def curvature(hessian: InputHessian, v: torch.Tensor) -> torch.Tensor:
    """``k(v, x) = v^T H v / (|v|^2 |grad_x loss|)`` per example (N,): the curvature along ``v``
    relative to the gradient's size (NaN where ``v`` or the gradient vanishes)."""
    v = v.reshape(hessian.n, -1).double()
    vhv = (hessian.hvp(v).double() * v).sum(dim=1)
    denom = v.pow(2).sum(dim=1) * hessian.gradient.double().norm(dim=1)
    return torch.where(denom > 0, vhv / denom.clamp_min(1e-300), torch.full_like(vhv, math.nan))


class GaussNewton:
    """The input Hessian of the cross-entropy as ``J^T (diag p - p p^T) J`` per example, from the
    logits' Jacobian ``J`` (N, K, D): K backward passes for the whole batch, after which every
    product is two small matrix products and the whole spectrum a K x K eigenproblem
    (:meth:`spectrum`). It *is* the Hessian exactly where the network is piecewise linear in its
    input (ReLU, max-pooling, linear layers: their second derivative is zero almost everywhere);
    :func:`gauss_newton_is_exact` checks that per example against :class:`InputHessian`. Same
    interface as :class:`InputHessian` (``hvp``, ``exact``, ``gradient``, ``products``, ...), so
    every estimator here takes either."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype | None = None) -> None:
        if dtype is not None:
            import copy

            model = copy.deepcopy(model).to(dtype)
            x = x.to(dtype)
        self.model, self.y = model, y
        self.n, self.dim = int(x.shape[0]), int(x[0].numel())
        self.products = 0
        xg = x.detach().clone().requires_grad_(True)
        with frozen(model), torch.enable_grad():
            logits = model(xg)
            rows = []
            for k in range(logits.shape[1]):
                (g,) = torch.autograd.grad(logits[:, k].sum(), xg, retain_graph=k < logits.shape[1] - 1,
                                           allow_unused=True)
                rows.append(torch.zeros_like(xg) if g is None else g)
        self.J = torch.stack([r.reshape(self.n, -1) for r in rows], dim=1).double()  # (N, K, D)
        self.logits = logits.detach()
        p = F.softmax(self.logits.double(), dim=1)
        self.p = p
        # (N, K, K), positive semi-definite. The diagonal p_k (1 - p_k) with 1 - p_k summed from the
        # other classes' probabilities: p_k - p_k^2 would cancel to rounding for a confident class
        eye = torch.eye(p.shape[1], dtype=p.dtype, device=p.device)
        rest = (p[:, None, :] * (1 - eye)).sum(dim=2)
        self.A = torch.diag_embed(p * rest) - (p[:, :, None] * p[:, None, :]) * (1 - eye)
        self.loss = F.cross_entropy(self.logits.double(), y, reduction="none")
        onehot = F.one_hot(y, p.shape[1]).double()
        self.gradient = torch.einsum("nkd,nk->nd", self.J, p - onehot)
        self.dtype = torch.float64

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        self.products += 1
        jv = torch.einsum("nkd,nd->nk", self.J, v.reshape(self.n, -1).double())
        return torch.einsum("nkd,nk->nd", self.J, torch.einsum("nkl,nl->nk", self.A, jv))

    def exact(self, chunk: int | None = None) -> torch.Tensor:
        """The (N, D, D) matrices ``J^T A J``."""
        return torch.einsum("nkd,nkl,nle->nde", self.J, self.A, self.J)

    def _small(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``A^(1/2)`` and the K x K matrix ``A^(1/2) J J^T A^(1/2)``, whose nonzero eigenvalues
        are the Hessian's."""
        lam, U = torch.linalg.eigh(self.A)
        root = U @ torch.diag_embed(lam.clamp_min(0).sqrt()) @ U.transpose(1, 2)
        return root, root @ torch.einsum("nkd,nld->nkl", self.J, self.J) @ root

    def spectrum(self) -> torch.Tensor:
        """All D eigenvalues per example (N, D), ascending, without forming a D x D matrix: the
        nonzero ones are those of the K x K matrix ``A^(1/2) J J^T A^(1/2)``, the rest zero."""
        if self.dim <= self.J.shape[1]:
            return eigenvalues(self.exact())
        small = torch.linalg.eigvalsh(self._small()[1])
        zeros = small.new_zeros(self.n, self.dim - small.shape[1])
        return torch.cat([small, zeros], dim=1).sort(dim=1).values

    def top_eigen(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-``k`` eigenvalues (N, k), descending, and unit eigenvectors (N, k, D), from the
        K x K problem (k at most K; eigenvectors of zero eigenvalues are not unique: left zero)."""
        root, small = self._small()
        lam, U = torch.linalg.eigh(small)
        lam, U = lam.flip(1)[:, :k], U.flip(2)[:, :, :k]
        vec = torch.einsum("nkd,nkl,nlj->njd", self.J, root, U)
        norm = vec.norm(dim=2, keepdim=True)
        return lam, torch.where(norm > 0, vec / norm.clamp_min(1e-300), torch.zeros_like(vec))


def gauss_newton_is_exact(model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None,
                          rtol: float = 1e-6, gn: GaussNewton | None = None) -> torch.Tensor:
    """Per example (N,): whether ``J^T A J`` is the input Hessian at ``x`` (float64), checked on a
    random direction against autograd's double backward (a model with curvature of its own
    differs on almost every direction). The tolerance is ``rtol`` of the product plus rounding of
    the products' own terms (1e-12 of ``|J^T diag(p) J v|``): for a very confident image the
    Hessian is the small difference of larger terms, and two exact routes differ by their rounding.
    ``gn``: the float64 :class:`GaussNewton` of the same batch, when the caller has it already."""
    full = InputHessian(model, x, y, dtype=torch.float64)
    gn = gn if gn is not None else GaussNewton(model, x, y, dtype=torch.float64)
    v = randn_like(torch.empty(full.n, full.dim, dtype=torch.float64, device=x.device), generator)
    a, b = full.hvp(v).double(), gn.hvp(v)
    jv = torch.einsum("nkd,nd->nk", gn.J, v)
    terms = torch.einsum("nkd,nk->nd", gn.J, gn.p * jv).norm(dim=1)
    return (a - b).norm(dim=1) <= rtol * a.norm(dim=1) + 1e-12 * terms + 1e-300
