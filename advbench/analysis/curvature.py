"""Input-space curvature per image and what it predicts (issue 14): one table row per image.

:func:`batch_rows` computes, for every clean-correct image of a batch:

- the spectrum of the input Hessian of the cross-entropy, in float64: by the Gauss-Newton path
  where it is the exact Hessian (piecewise-linear networks; checked per batch), else the exact
  ``D x D`` eigendecomposition (``D <= max_exact_dim``), else stochastic Lanczos quadrature (the
  trace then by Hutchinson, with its standard error ``trace_se``); its trace, largest eigenvalue
  and the share of negative curvature (``neg_share``: the mass of the negative eigenvalues over
  all absolute mass; zero for a Gauss-Newton matrix, which is PSD);
- the curvature ``k(v, x)`` along the gradient, along the top eigenvector, averaged over random
  directions, and along the attack's perturbation;
- per step size alpha (8-bit units, the seed's 0.1, 0.5, 1, 10), iterative FGSM's steps to
  misclassify, the MSE and confidence there, and the label flips along the run;
- DeepFool's minimal L2 distance; the boundary point between the image and the first
  misclassified iterate at ``boundary_alpha`` (bisection), its MSE, whether a second model
  misclassifies it (transfer), and the decision boundary's curvature there
  (:func:`boundary_curvature`).

KL and Jensen-Shannon divergence of each image's spectrum histogram from the pooled one of all
images, on shared bins, need every image's spectrum: :func:`spectrum_histograms` and
:func:`divergence_columns` take the spectra of all batches (:func:`image_table` does all of it
for one batch). :func:`summary` groups the rows by quantiles of a measure (the seed's low / mid /
high divergence) with bootstrap intervals of each outcome's median, and gives the Spearman
correlation (with its interval) of every curvature measure with every outcome;
:func:`detector` scores clean against adversarial images by a curvature measure (ROC AUC).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from advbench.analysis.hessian import (
    GaussNewton,
    InputHessian,
    SpectralDensity,
    curvature,
    gauss_newton_is_exact,
    hutchinson,
    lanczos,
    slq,
    top_eigen,
)
from advbench.analysis.perturbability import boundary_point, ifgsm_trace, transfers
from advbench.analysis.spectra import histograms, js, kl
from advbench.analysis.stats import group_median, partial_spearman, quantile_groups, roc_auc, spearman
from advbench.registry import ATTACKS
from advbench.tensors import frozen, randn_like
from advbench.threat import ThreatModel

ALPHAS = (0.1, 0.5, 1.0, 10.0)  # the seed's step sizes, in 8-bit pixel units
HUTCHINSON_SAMPLES = 100  # the trace where the spectrum is estimated (SLQ), with its standard error
BOUNDARY_LANCZOS_STEPS = 20  # Lanczos iterations for the boundary's largest principal curvature
CURVATURE_MEASURES = ("kl", "js", "trace", "top_eigenvalue", "neg_share", "k_gradient", "k_top", "k_random",
                      "k_attack")

#: one image set's spectra: ``{"values": (N, D)}`` (exact) or ``{"nodes", "weights": (N, probes, m)}`` (SLQ)
Spectra = dict[str, np.ndarray]


def alpha_label(alpha: float) -> str:
    """The column suffix of a step size (``steps_0.5``)."""
    return f"{alpha:g}"


def spectra(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, max_exact_dim: int = 3072, slq_steps: int = 40,
            slq_probes: int = 10, generator: torch.Generator | None = None, method: str = "auto") -> dict[str, Any]:
    """The Hessian's spectrum per image (``values`` (N, D) exact, or an SLQ ``density``), the
    method used, the float64 Hessian object, and its top eigenvector (N, D) and eigenvalue.
    ``method="slq"`` forces the estimate (to compare it with the exact spectrum)."""
    gn = GaussNewton(model, x, y, dtype=torch.float64) if method == "auto" else None
    if gn is not None and bool(gauss_newton_is_exact(model, x, y, generator, gn=gn).all()):
        h: Any = gn  # the Jacobian's K backward passes serve the check and the spectrum
        values = h.spectrum()
        top_value, top_vec = (t[:, 0] for t in h.top_eigen(1))
        return {"method": "gauss-newton", "hessian": h, "values": values, "top_value": top_value, "top_vector": top_vec}
    h = InputHessian(model, x, y, dtype=torch.float64)
    if method == "auto" and h.dim <= max_exact_dim:
        lam, vec = torch.linalg.eigh(h.exact())
        return {"method": "exact", "hessian": h, "values": lam, "top_value": lam[:, -1], "top_vector": vec[:, :, -1]}
    density = slq(h, slq_steps, slq_probes, generator)
    value, vector = top_eigen(h, 1, steps=slq_steps, generator=generator)
    return {"method": "slq", "hessian": h, "density": density, "top_value": value[:, 0], "top_vector": vector[:, 0]}


def spectrum_arrays(spec: dict[str, Any]) -> Spectra:
    """What of :func:`spectra`'s result the divergences need, as arrays (stored per batch)."""
    if "values" in spec:
        return {"values": spec["values"].double().cpu().numpy()}
    return {"nodes": spec["density"].nodes.double().cpu().numpy(), "weights": spec["density"].weights.double().cpu().numpy()}


def spectrum_stats(spec: dict[str, Any], generator: torch.Generator | None) -> dict[str, np.ndarray]:
    """Per image, from :func:`spectra`'s result: trace (by Hutchinson, with ``trace_se``, where the
    spectrum is an SLQ estimate), top eigenvalue and negative share."""
    out: dict[str, np.ndarray] = {}
    if "values" in spec:
        values = spec["values"]
        trace = values.sum(dim=1)
        # eigenvalues within rounding of zero (the numerical-rank tolerance D * eps * max |lambda|)
        # are zero: a PSD Gauss-Newton matrix's rounding-level negatives are no negative curvature
        tol = values.shape[1] * torch.finfo(values.dtype).eps * values.abs().amax(dim=1, keepdim=True)
        neg = (values.clamp_max(0).abs() * (values.abs() > tol)).sum(dim=1) / values.abs().sum(dim=1).clamp_min(1e-300)
    else:
        dens = spec["density"]
        trace, trace_se = hutchinson(spec["hessian"], HUTCHINSON_SAMPLES, generator)  # more samples than SLQ's probes
        out["trace_se"] = trace_se.cpu().numpy()
        neg = ((dens.nodes.clamp_max(0).abs() * dens.weights).sum(dim=2).mean(dim=1)
               / (dens.nodes.abs() * dens.weights).sum(dim=2).mean(dim=1).clamp_min(1e-300))
    return {"trace": trace.cpu().numpy(), **out, "neg_share": neg.cpu().numpy(),
            "top_eigenvalue": spec["top_value"].cpu().numpy()}


SCALES = ("linear", "symlog")
SYMLOG_RANGE = 1e-12  # symlog bins: |eigenvalues| below this fraction of the largest count as zero


@dataclass(frozen=True)
class Bins:
    """Shared histogram bins: ``edges`` on the ``scale``d axis. ``linear`` bins the eigenvalues
    themselves (the seed's); ``symlog`` bins ``sign(l) log10(1 + |l| / tau)`` with ``tau`` 1e-12
    of the largest ``|l|``, so spectra that are all near zero on a linear axis (a confident
    image's) still differ."""

    edges: np.ndarray
    scale: str = "linear"
    tau: float = 1.0

    def transform(self, v: torch.Tensor) -> torch.Tensor:
        return v if self.scale == "linear" else torch.sign(v) * torch.log10(1 + v.abs() / self.tau)

    def eigenvalue_edges(self) -> np.ndarray:
        """The edges in eigenvalue units."""
        e = self.edges
        return e if self.scale == "linear" else np.sign(e) * self.tau * (10 ** np.abs(e) - 1)


def shared_range(sets: Sequence[Spectra], bins: int, scale: str = "linear") -> Bins:
    """``bins`` equal-width bins over the pooled range of every eigenvalue (or SLQ node), on ``scale``."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    arrays = [s["values"] if "values" in s else s["nodes"] for s in sets]
    top = max(float(np.max(np.abs(a))) for a in arrays)
    tau = SYMLOG_RANGE * top if top > 0 else 1.0
    b = Bins(np.zeros(2), scale, tau)
    lo = min(float(b.transform(torch.as_tensor(np.min(a))).item()) for a in arrays)
    hi = max(float(b.transform(torch.as_tensor(np.max(a))).item()) for a in arrays)
    if hi <= lo:  # one value everywhere: a bin around it
        lo, hi = lo - 0.5, hi + 0.5
    return Bins(np.linspace(lo, hi, bins + 1), scale, tau)


def spectrum_histograms(sets: Sequence[Spectra], bins: Bins) -> np.ndarray:
    """Every image's normalized spectrum histogram on the shared ``bins`` (all sets stacked:
    (N, B)); mass outside the edges falls into the first or last bin."""
    e = torch.as_tensor(bins.edges, dtype=torch.float64)
    parts = []
    for s in sets:
        if "values" in s:
            parts.append(histograms(bins.transform(torch.as_tensor(s["values"])), e))
        else:
            nodes = bins.transform(torch.as_tensor(s["nodes"]))
            parts.append(SpectralDensity(nodes, torch.as_tensor(s["weights"])).histogram(e))
    return torch.cat(parts).numpy() if parts else np.zeros((0, len(bins.edges) - 1))


def divergence_columns(hist: np.ndarray, pooled: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """KL and JS of each histogram (N, B) from ``pooled`` (default: their mean, which is positive
    wherever any of them is, so KL is finite)."""
    p = torch.as_tensor(hist, dtype=torch.float64)
    q = torch.as_tensor(hist.mean(axis=0) if pooled is None else pooled, dtype=torch.float64).expand_as(p)
    return {"kl": kl(p, q).numpy(), "js": js(p, q).numpy()}


def boundary_curvature(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = BOUNDARY_LANCZOS_STEPS,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """The decision boundary's largest principal curvature (in magnitude, signed) at points ``x``
    on it (Fawzi et al.'s view): with ``F = z_y - z_t`` (``t`` the largest other logit at ``x``), the
    top eigenvalue of ``P H_F P / |grad F|``, ``P`` the projection onto the boundary's tangent
    space; ``steps`` Lanczos iterations per point (N,). Zero almost everywhere on a
    piecewise-linear network, whose boundary is piecewise flat."""
    with torch.no_grad():
        t = model(x).double().scatter(1, y[:, None], float("-inf")).argmax(dim=1)
    h = InputHessian(model, x, y, target=t, dtype=torch.float64)
    g = h.gradient.double()
    u = g / g.norm(dim=1, keepdim=True).clamp_min(1e-300)

    def project(v: torch.Tensor) -> torch.Tensor:
        return v - (v * u).sum(dim=1, keepdim=True) * u

    start = project(randn_like(torch.empty_like(g), generator))
    tri = lanczos(lambda v: project(h.hvp(project(v)).double()), start, min(steps, h.dim - 1), generator)
    theta = torch.linalg.eigvalsh(tri.T)
    top = theta.gather(1, theta.abs().argmax(dim=1, keepdim=True)).squeeze(1)
    return top / g.norm(dim=1).clamp_min(1e-300)


def batch_rows(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, second: nn.Module | None = None,
               alphas: tuple[float, ...] = ALPHAS, steps: int = 100, bounds: tuple[float, float] = (0.0, 1.0),
               random_directions: int = 4, boundary_alpha: float = 1.0, generator: torch.Generator | None = None,
               max_exact_dim: int = 3072, slq_steps: int = 40, slq_probes: int = 10, approximate: bool = False,
               ) -> tuple[pd.DataFrame, dict[str, Spectra], dict[str, Any]]:
    """The per-image columns of the module docstring for the clean-correct images of ``x`` (their
    positions in ``index``), all but the divergences; the spectra the divergences need
    (``clean``, and with ``approximate`` the SLQ estimate of the same Hessians, ``approx``); and
    what was used (method, products per image)."""
    with torch.no_grad():
        keep = model(x).argmax(dim=1) == y
    index = torch.nonzero(keep).squeeze(1)
    x, y = x[index], y[index]
    out: dict[str, Any] = {"index": index.cpu().numpy()}
    info: dict[str, Any] = {"images": int(len(x)), "excluded_misclassified": int((~keep).sum())}
    if len(x) == 0:
        return pd.DataFrame(out), {}, {**info, "method": None, "hessian_products_per_image": 0}
    spec = spectra(model, x, y, max_exact_dim=max_exact_dim, slq_steps=slq_steps, slq_probes=slq_probes,
                   generator=generator)
    sets = {"clean": spectrum_arrays(spec)}
    if approximate and "values" in spec:  # the estimate beside the exact spectrum (the seed's comparison)
        sets["approx"] = spectrum_arrays({"density": slq(spec["hessian"], slq_steps, slq_probes, generator)})
    h = spec["hessian"]
    out.update(spectrum_stats(spec, generator))
    out.update(confidence_columns(h.logits, y))
    out["first_order_distance"] = first_order_distance(model, x, y).cpu().numpy()
    g = h.gradient.double()
    out["grad_norm"] = g.norm(dim=1).cpu().numpy()
    out["k_gradient"] = curvature(h, g).cpu().numpy()
    out["k_top"] = curvature(h, spec["top_vector"]).cpu().numpy()
    like = torch.empty_like(g)
    out["k_random"] = torch.stack([curvature(h, randn_like(like, generator)) for _ in range(random_directions)]
                                  ).mean(dim=0).cpu().numpy()
    out.update(_perturbability(model, x, y, h, second, alphas, steps, bounds, boundary_alpha, generator))
    info.update({"method": spec["method"], "hessian_products_per_image": int(h.products)})
    return pd.DataFrame(out), sets, info


def confidence_columns(logits: torch.Tensor, y: torch.Tensor) -> dict[str, np.ndarray]:
    """The clean confidence (softmax probability of ``y``) and logit margin (``z_y`` over the
    largest other logit): what a curvature measure must predict *beyond* to tell anything new."""
    z = logits.double()
    p = torch.softmax(z, dim=1).gather(1, y[:, None]).squeeze(1)
    other = z.scatter(1, y[:, None], float("-inf")).amax(dim=1)
    return {"clean_confidence": p.cpu().numpy(), "clean_margin": (z.gather(1, y[:, None]).squeeze(1) - other).cpu().numpy()}


def first_order_distance(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The linear estimate of the L2 distance to the decision boundary, ``margin / |grad margin|``
    against the largest other logit (DeepFool's first step): the first-order information a
    curvature measure must add to (N,)."""
    xg = x.detach().double().clone().requires_grad_(True)
    m64 = copy.deepcopy(model).double()
    with frozen(m64), torch.enable_grad():
        z = m64(xg)
        t = z.detach().scatter(1, y[:, None], float("-inf")).argmax(dim=1)
        margin = z.gather(1, y[:, None]).squeeze(1) - z.gather(1, t[:, None]).squeeze(1)
        (g,) = torch.autograd.grad(margin.sum(), xg)
    return margin.detach() / g.flatten(1).norm(dim=1).clamp_min(1e-300)


def _perturbability(model: nn.Module, x: torch.Tensor, y: torch.Tensor, h: Any, second: nn.Module | None,
                    alphas: tuple[float, ...], steps: int, bounds: tuple[float, float], boundary_alpha: float,
                    generator: torch.Generator | None) -> dict[str, np.ndarray]:
    """Iterative FGSM per alpha, the attack direction's curvature, the boundary point, DeepFool."""
    out: dict[str, np.ndarray] = {}
    nan = float("nan")
    for alpha in alphas:
        trace = ifgsm_trace(model, x, y, alpha / 255 * (bounds[1] - bounds[0]), steps, bounds,
                            keep_iterates=alpha == boundary_alpha)
        a = alpha_label(alpha)
        out[f"steps_{a}"] = trace.steps.cpu().numpy()
        out[f"mse_{a}"] = trace.mse.cpu().numpy()
        out[f"confidence_{a}"] = trace.confidence.cpu().numpy()
        out[f"flips_{a}"] = trace.flips.cpu().numpy()
        if trace.iterates is None:
            continue
        found = trace.steps >= 0
        first_adv = trace.iterates[trace.steps.clamp_min(0), torch.arange(len(x), device=x.device)]
        delta = (first_adv - x).reshape(len(x), -1).double()
        out["k_attack"] = torch.where(found, curvature(h, delta), torch.full_like(delta[:, 0], nan)).cpu().numpy()
        bp = boundary_point(model, x, first_adv, y)
        out["boundary_mse"] = torch.where(found, bp.mse, torch.full_like(bp.mse, nan)).cpu().numpy()
        kb = boundary_curvature(model, bp.x, y, generator=generator)
        out["boundary_curvature"] = torch.where(found, kb, torch.full_like(kb, nan)).cpu().numpy()
        if second is not None:
            moved = transfers(second, bp.x, y)
            out["boundary_transfers"] = np.where(found.cpu().numpy(), moved.cpu().numpy().astype(float), np.nan)
    deepfool = ATTACKS.create("deepfool")(model, x, y, ThreatModel(norm="l2", eps=0.0, bounds=bounds))
    out["min_distance_l2"] = deepfool.minimal_distances.double().cpu().numpy()
    return out


def image_table(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, bins: int = 50, scale: str = "linear",
                **kwargs: Any) -> tuple[pd.DataFrame, dict[str, Any]]:
    """:func:`batch_rows` for one batch with its divergences, pooled over the batch's images."""
    table, sets, info = batch_rows(model, x, y, **kwargs)
    if "clean" in sets:
        hist = spectrum_histograms([sets["clean"]], shared_range([sets["clean"]], bins, scale))
        for name, col in divergence_columns(hist).items():
            table[name] = col
    return table, {**info, "bins": bins, "alphas": list(kwargs.get("alphas", ALPHAS)), "steps": kwargs.get("steps", 100)}


def trajectory(model: nn.Module, x: torch.Tensor, y: torch.Tensor, alpha: float, steps: int,
               bounds: tuple[float, float] = (0.0, 1.0), **spectra_kwargs: Any) -> tuple[pd.DataFrame, Spectra]:
    """Iterative FGSM at ``alpha`` (8-bit units) from each image for ``steps`` iterations: the
    prediction at every iterate and whether it flipped there (long table: image, step, label,
    flip), and the spectrum of the loss Hessian (for the clean label) at every iterate, row by
    row in the table's order, for the divergences along the path."""
    trace = ifgsm_trace(model, x, y, alpha / 255 * (bounds[1] - bounds[0]), steps, bounds, keep_iterates=True)
    t1, n = trace.iterates.shape[:2]
    flat = trace.iterates.transpose(0, 1).reshape(t1 * n, *x.shape[1:])  # image-major
    labels = y.repeat_interleave(t1)
    spec = spectra(model, flat, labels, **spectra_kwargs)
    lab = trace.labels.cpu()
    flip = torch.cat([torch.zeros(n, 1, dtype=torch.bool), lab[:, 1:] != lab[:, :-1]], dim=1)
    table = pd.DataFrame({"image": np.repeat(np.arange(n), t1), "step": np.tile(np.arange(t1), n),
                          "label": lab.reshape(-1).numpy(), "flip": flip.reshape(-1).numpy(),
                          "misclassified": (lab != y.cpu()[:, None]).reshape(-1).numpy()})
    return table, spectrum_arrays(spec)


def outcomes(alphas: tuple[float, ...] = ALPHAS) -> list[str]:
    """The outcome columns of :func:`batch_rows` a curvature measure may predict."""
    cols = ["min_distance_l2", "boundary_mse"]
    for a in map(alpha_label, alphas):
        cols += [f"steps_{a}", f"mse_{a}", f"confidence_{a}", f"flips_{a}"]
    return cols


CONTROLS = ("clean_margin", "first_order_distance")  # what curvature must predict beyond


def summary(table: pd.DataFrame, by: str = "kl", groups: int = 3, resamples: int = 1000,
            seed: int = 0, controls: Sequence[str] = CONTROLS) -> dict[str, Any]:
    """Per quantile group of ``by`` (0 = lowest): each outcome's median with its bootstrap
    interval; over all rows: Spearman of every curvature measure with every outcome (an image
    never misclassified within the run has steps NaN and drops out of that pair), and the same
    with ``controls`` partialled out (the clean logit margin and the first-order distance
    estimate: a curvature measure is only informative where it says more than these)."""
    steps_cols = [c for c in table if c.startswith("steps_")]
    t = table.copy()
    for c in steps_cols:  # -1: not misclassified within the run
        t[c] = t[c].where(t[c] >= 0)
    present = [c for c in outcomes(tuple(float(c.split("_", 1)[1]) for c in steps_cols)) if c in t]
    g = quantile_groups(t[by].to_numpy(), groups)
    per_group = {col: {k: v.to_dict() for k, v in group_median(t[col].to_numpy(), g, resamples, seed).items()}
                 for col in present}
    correlations = {m: {o: spearman(t[m].to_numpy(), t[o].to_numpy(), resamples, seed).to_dict() for o in present}
                    for m in CURVATURE_MEASURES if m in t}
    out = {"by": by, "groups": groups, "group_of_row": g.tolist(), "per_group": per_group, "spearman": correlations}
    controls = [c for c in controls if c in t]
    if controls:
        c = t[controls].to_numpy()
        out["controls"] = controls
        out["partial_spearman"] = {
            m: {o: partial_spearman(t[m].to_numpy(), t[o].to_numpy(), c, resamples, seed).to_dict() for o in present}
            for m in CURVATURE_MEASURES if m in t}
        out["control_spearman"] = {k: {o: spearman(t[k].to_numpy(), t[o].to_numpy(), resamples, seed).to_dict()
                                       for o in present} for k in controls}
    return out


def spectral_measures(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, bins: int = 50,
                      generator: torch.Generator | None = None, max_exact_dim: int = 3072) -> pd.DataFrame:
    """Label-free-usable curvature measures per image at ``x`` for ``labels`` (a detector passes
    the model's own predictions), divergences pooled over ``x``: trace, top eigenvalue, negative
    share, KL, JS, and ``k`` along the gradient."""
    table, sets = detector_measures(model, x, labels, generator, max_exact_dim)
    hist = spectrum_histograms([sets], shared_range([sets], bins))
    return table.assign(**divergence_columns(hist))


def detector_measures(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None,
                      max_exact_dim: int = 3072) -> tuple[pd.DataFrame, Spectra]:
    """:func:`spectral_measures` but the divergences, and the spectra they need (pooled later);
    also ``uncertainty`` (one minus the predicted class's probability), the curvature-free baseline
    a curvature detector must beat."""
    spec = spectra(model, x, labels, max_exact_dim=max_exact_dim, generator=generator)
    h = spec["hessian"]
    cols = {k: v for k, v in spectrum_stats(spec, generator).items() if k != "trace_se"}
    confidence = confidence_columns(h.logits, labels)["clean_confidence"]
    return pd.DataFrame({**cols, "k_gradient": curvature(h, h.gradient.double()).cpu().numpy(),
                         "uncertainty": 1 - confidence}), spectrum_arrays(spec)


def detector_auc(clean: pd.DataFrame, adversarial: pd.DataFrame, resamples: int = 1000,
                 seed: int = 0) -> dict[str, dict[str, float]]:
    """Per measure: the ROC AUC with its interval of telling adversarial (positive) from clean
    images by it (below 0.5: larger on clean)."""
    return {m: roc_auc(adversarial[m].to_numpy(), clean[m].to_numpy(), resamples, seed).to_dict()
            for m in clean.columns if m in adversarial}


def detector(model: nn.Module, clean: torch.Tensor, adversarial: torch.Tensor, bins: int = 50,
             resamples: int = 1000, seed: int = 0, generator: torch.Generator | None = None) -> dict[str, dict[str, float]]:
    """The seed's hypothesis as a detector: each spectral measure at clean and at adversarial
    images (for the model's own predictions, all pooled on shared bins), and the ROC AUC with
    its interval of telling them apart (adversarial = positive; below 0.5: larger on clean)."""
    x = torch.cat([clean, adversarial])
    with torch.no_grad():
        labels = model(x).argmax(dim=1)
    table = spectral_measures(model, x, labels, bins, generator)
    n = len(clean)
    return detector_auc(table.iloc[:n], table.iloc[n:], resamples, seed)
