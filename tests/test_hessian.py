"""Input-space Hessians (advbench.analysis.hessian) against autograd's own Hessian, the ReLU
closed form, and each estimator against the exact spectrum; divergences (advbench.analysis.spectra)
never negative, finite on empty bins."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from advbench.analysis.hessian import (
    InputHessian,
    curvature,
    eigenvalues,
    hutchinson,
    lanczos,
    slq,
    top_eigen,
)
from advbench.analysis.spectra import divergences, histograms, js, kl, shared_edges


@pytest.fixture(scope="module")
def smooth_mlp():
    """A twice-differentiable model (tanh): its Hessian is full rank, not only J^T A J."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).eval()


def _autograd_hessians(model, x, y):
    out = []
    for xi, yi in zip(x, y):
        f = lambda v: F.cross_entropy(model(v.reshape(1, *xi.shape)), yi[None])  # noqa: E731
        out.append(torch.autograd.functional.hessian(f, xi.reshape(-1)).double())
    return torch.stack(out)


@pytest.mark.parametrize("which", ["digits_mlp", "digits_cnn", "smooth_mlp"])
def test_batched_products_are_autograds_hessian_times_v(which, request, digits_test):
    model = request.getfixturevalue(which)
    x, y = digits_test.x[:6], digits_test.y[:6]
    h = InputHessian(model, x, y)
    v = torch.randn(6, 64, generator=torch.Generator().manual_seed(1))
    ref = torch.einsum("nij,nj->ni", _autograd_hessians(model, x, y), v.double())
    got = h.hvp(v).double()
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    assert h.products == 1
    exact = h.exact(chunk=7)  # a chunk that does not divide D
    assert torch.allclose(exact, _autograd_hessians(model, x, y), rtol=1e-4, atol=1e-5 * float(exact.abs().max()))
    assert h.products == 1 + 64


def test_a_relu_networks_hessian_is_the_gauss_newton_form(digits_mlp, digits_test):
    """H = J^T (diag p - p p^T) J, J the logits' Jacobian: a ReLU network is piecewise linear."""
    import copy

    x, y = digits_test.x[:3].double(), digits_test.y[:3]
    exact = InputHessian(digits_mlp, x, y, dtype=torch.float64).exact()  # float64: the forms agree to rounding
    net = copy.deepcopy(digits_mlp).double()
    for i in range(3):
        J = torch.autograd.functional.jacobian(lambda v: net(v.reshape(1, 1, 8, 8))[0], x[i].reshape(-1))
        with torch.no_grad():
            p = F.softmax(net(x[i : i + 1])[0], dim=0)
            gn = J.T @ (torch.diag(p) - torch.outer(p, p)) @ J
        assert torch.allclose(exact[i], gn, rtol=1e-9, atol=1e-12 * float(gn.abs().max()))
    assert int((eigenvalues(exact).abs() > 1e-6 * eigenvalues(exact).abs().max()).sum(dim=1).max()) <= 9  # rank <= K-1


@pytest.mark.parametrize("which", ["digits_cnn", "smooth_mlp"])
def test_exact_eigenvalues_match_autograds_within_1e_4(which, request, digits_test):
    model = request.getfixturevalue(which)
    x, y = digits_test.x[:4], digits_test.y[:4]
    mine = eigenvalues(InputHessian(model, x, y).exact())
    H = _autograd_hessians(model, x, y)
    ref = torch.linalg.eigvalsh((H + H.transpose(1, 2)) / 2)  # symmetric but for float32 rounding
    scale = ref.abs().amax(dim=1, keepdim=True)
    assert float(((mine - ref).abs() / scale).max()) < 1e-4


@pytest.mark.parametrize("which", ["digits_cnn", "smooth_mlp"])
def test_lanczos_top5_within_1e_3_of_the_exact(which, request, digits_test):
    model = request.getfixturevalue(which)
    x, y = digits_test.x[:8], digits_test.y[:8]
    h = InputHessian(model, x, y, dtype=torch.float64)
    exact = eigenvalues(h.exact()).flip(1)[:, :5]
    before = h.products
    values, vectors = top_eigen(h, 5, steps=40, generator=torch.Generator().manual_seed(0))
    assert h.products - before == 40
    scale = exact.abs().amax(dim=1, keepdim=True)
    assert float(((values - exact).abs() / scale).max()) < 1e-3
    # Ritz vectors: unit, and H v = lambda v for the converged top pair
    assert torch.allclose(vectors.norm(dim=2), torch.ones(8, 5, dtype=torch.float64), atol=1e-8)
    hv = h.hvp(vectors[:, 0]).double()
    assert float(((hv - values[:, :1] * vectors[:, 0]).norm(dim=1) / scale[:, 0]).max()) < 1e-2


def test_lanczos_over_all_d_steps_recovers_the_whole_spectrum_through_closures(digits_mlp, digits_test):
    """A ReLU network's input Hessian has rank <= 9 here: the Krylov space closes after ~10
    steps, and the iteration goes on from fresh orthogonal directions."""
    x, y = digits_test.x[:2], digits_test.y[:2]
    h = InputHessian(digits_mlp, x, y, dtype=torch.float64)
    exact = eigenvalues(h.exact())
    start = torch.randn(2, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    tri = lanczos(h.hvp, start, 64, torch.Generator().manual_seed(1))
    ritz = torch.linalg.eigvalsh(tri.T)
    assert torch.allclose(ritz, exact, atol=1e-6 * float(exact.abs().max()))
    eye = torch.eye(64, dtype=torch.float64).expand(2, -1, -1)
    assert torch.allclose(tri.Q @ tri.Q.transpose(1, 2), eye, atol=1e-8)  # orthonormal basis


def _w1(nodes, weights, exact):
    """Wasserstein-1 distance between a weighted point measure and the uniform measure on ``exact``."""
    grid = torch.linspace(float(min(nodes.min(), exact.min())), float(max(nodes.max(), exact.max())), 4001,
                          dtype=torch.float64)
    cdf_a = (weights[None, :] * (nodes[None, :] <= grid[:, None])).sum(1)
    cdf_b = (exact[None, :] <= grid[:, None]).double().mean(1)
    return float((cdf_a - cdf_b).abs().sum() * (grid[1] - grid[0]))


@pytest.mark.parametrize("which", ["digits_cnn", "smooth_mlp"])
def test_slq_density_is_close_to_the_exact_spectrum(which, request, digits_test):
    """Distance stated: Wasserstein-1 between the SLQ measure (20 probes x 20 steps) and the
    exact eigenvalue distribution, below 5% of the spectrum's range."""
    model = request.getfixturevalue(which)
    x, y = digits_test.x[:4], digits_test.y[:4]
    h = InputHessian(model, x, y, dtype=torch.float64)
    exact = eigenvalues(h.exact())
    dens = slq(h, steps=20, probes=20, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(dens.weights.sum(dim=2), torch.ones(4, 20, dtype=torch.float64), atol=1e-8)
    for i in range(4):
        span = float(exact[i].max() - exact[i].min())
        nodes, weights = dens.nodes[i].reshape(-1), dens.weights[i].reshape(-1) / 20
        assert _w1(nodes, weights, exact[i]) < 0.05 * span
    edges = shared_edges(exact, 10)
    assert torch.allclose(dens.histogram(edges).sum(dim=1), torch.ones(4, dtype=torch.float64))


def test_hutchinson_trace_within_its_interval_of_the_exact(digits_cnn, digits_test):
    x, y = digits_test.x[:8], digits_test.y[:8]
    h = InputHessian(digits_cnn, x, y, dtype=torch.float64)
    trace = eigenvalues(h.exact()).sum(dim=1)
    est, se = hutchinson(h, 300, torch.Generator().manual_seed(0))
    assert bool(((est - trace).abs() <= 3 * se).all())
    assert bool((se < trace.abs()).all())  # an estimate worth having


def test_curvature_along_the_top_eigenvector_and_the_gradient(digits_cnn, digits_test):
    x, y = digits_test.x[:5], digits_test.y[:5]
    h = InputHessian(digits_cnn, x, y, dtype=torch.float64)
    H = h.exact()
    lam, vec = torch.linalg.eigh(H)
    g = h.gradient.double()
    top = curvature(h, vec[:, :, -1] * 3.0)  # scale-free in v
    assert torch.allclose(top, lam[:, -1] / g.norm(dim=1), rtol=1e-4)
    along_g = curvature(h, g)
    assert torch.allclose(along_g, torch.einsum("ni,nij,nj->n", g, H, g) / g.norm(dim=1) ** 3, rtol=1e-4)
    zero = curvature(h, torch.zeros_like(g))
    assert bool(zero.isnan().all())


def test_the_margin_hessian_is_the_decision_boundarys(digits_cnn, digits_test):
    """With a target: the Hessian of z_y - z_t (a ReLU network's: zero almost everywhere)."""
    x, y = digits_test.x[:3], digits_test.y[:3]
    h = InputHessian(digits_cnn, x, y, target=(y + 1) % 10)
    assert torch.allclose(h.loss, (h.logits.gather(1, y[:, None]) - h.logits.gather(1, ((y + 1) % 10)[:, None])).squeeze(1))
    assert float(h.exact().abs().max()) < 1e-5


def test_float64_differentiates_a_copy_and_float32_fails_confident_examples(digits_cnn, digits_test):
    """In float32 the Hessian of an example classified with p ~ 1 is rounding noise (its loss
    is ~1e-6): float64 is what a curvature analysis must use."""
    import copy

    x, y = digits_test.x[:16], digits_test.y[:16]
    h64 = InputHessian(digits_cnn, x, y, dtype=torch.float64)
    assert next(digits_cnn.parameters()).dtype == torch.float32  # the model itself untouched
    e64 = eigenvalues(h64.exact())
    net = copy.deepcopy(digits_cnn).double()
    H = _autograd_hessians(net, x.double(), y)
    assert torch.allclose(e64, torch.linalg.eigvalsh((H + H.transpose(1, 2)) / 2), rtol=1e-9,
                          atol=1e-12 * float(e64.abs().max()))
    e32 = eigenvalues(InputHessian(digits_cnn, x, y).exact())
    rel = ((e32 - e64).abs().amax(dim=1) / e64.abs().amax(dim=1))
    order = h64.loss.argsort()  # float32's error grows as the loss shrinks (~1e-8 / loss on the zoo's model)
    assert float(rel[order[0]]) > 10 * float(rel[order[-1]])
    assert float(rel[h64.loss > 1e-3].max()) < 1e-3


def test_kl_is_never_negative_and_empty_bins_are_handled():
    p = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    q = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64).expand_as(p)
    assert torch.allclose(kl(p, q), torch.tensor([math.log(2), math.log(4)], dtype=torch.float64))
    assert torch.equal(kl(p, p), torch.zeros(2, dtype=torch.float64))
    assert kl(p[:1], p[1:]).item() == math.inf  # q empty where p has mass: inf, never a finite wrong number
    assert torch.allclose(js(p[:1], p[1:]), torch.tensor([math.log(2)], dtype=torch.float64))  # disjoint: ln 2
    assert torch.allclose(js(p[:1], q[:1]), js(q[:1], p[:1]))
    g = torch.Generator().manual_seed(0)
    for _ in range(50):  # sparse random histograms: many empty bins
        a = torch.rand(3, 20, generator=g, dtype=torch.float64) * (torch.rand(3, 20, generator=g) < 0.3)
        a = a / a.sum(dim=1, keepdim=True).clamp_min(1e-300)
        pooled = a.mean(dim=0, keepdim=True).expand_as(a)
        d = kl(a, pooled)
        assert bool((d >= 0).all() & torch.isfinite(d).all())
        assert bool(((js(a, pooled) >= 0) & (js(a, pooled) <= math.log(2))).all())


def test_divergences_of_exact_spectra_on_shared_bins(digits_cnn, digits_test):
    x, y = digits_test.x[:10], digits_test.y[:10]
    spectra = eigenvalues(InputHessian(digits_cnn, x, y).exact())
    out = divergences(spectra, bins=30)
    assert out["edges"].numel() == 31 and float(out["edges"][0]) == float(spectra.min())
    assert torch.allclose(out["histograms"].sum(dim=1), torch.ones(10, dtype=torch.float64))
    assert bool((out["kl"] >= 0).all() & torch.isfinite(out["kl"]).all())
    assert torch.allclose(histograms(spectra, out["edges"]).mean(dim=0), out["pooled"])


@pytest.mark.parametrize("which", ["digits_mlp", "digits_cnn"])
def test_the_gauss_newton_path_is_the_exact_hessian_of_a_relu_network(which, request, digits_test):
    from advbench.analysis.hessian import GaussNewton, gauss_newton_is_exact

    model = request.getfixturevalue(which)
    x, y = digits_test.x[:6], digits_test.y[:6]
    full, gn = InputHessian(model, x, y, dtype=torch.float64), GaussNewton(model, x, y, dtype=torch.float64)
    H = full.exact()
    scale = float(H.abs().max())
    assert torch.allclose(gn.exact(), H, rtol=1e-8, atol=1e-10 * scale)
    assert torch.allclose(gn.gradient, full.gradient.double(), rtol=1e-8, atol=1e-12)
    exact = eigenvalues(H)
    assert torch.allclose(gn.spectrum(), exact, atol=1e-9 * float(exact.abs().max()))
    values, vectors = gn.top_eigen(3)
    assert torch.allclose(values, exact.flip(1)[:, :3], atol=1e-9 * float(exact.abs().max()))
    hv = torch.einsum("nij,nkj->nki", H, vectors)
    assert torch.allclose(hv, values[:, :, None] * vectors, atol=1e-8 * float(exact.abs().max()))
    assert bool(gauss_newton_is_exact(model, x, y, torch.Generator().manual_seed(0)).all())
    # every estimator takes it: Hutchinson on the Gauss-Newton form, 2 products per sample of nothing but matmuls
    est, se = hutchinson(gn, 200, torch.Generator().manual_seed(1))
    assert bool(((est - exact.sum(dim=1)).abs() <= 3 * se + 1e-12).all())


def test_a_smooth_model_is_not_its_gauss_newton_form(smooth_mlp, digits_test):
    from advbench.analysis.hessian import gauss_newton_is_exact

    x, y = digits_test.x[:6], digits_test.y[:6]
    assert not bool(gauss_newton_is_exact(smooth_mlp, x, y, torch.Generator().manual_seed(0)).any())
