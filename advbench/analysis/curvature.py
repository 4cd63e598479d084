"""Input-space curvature per image and what it predicts (issue 14): one table row per image.

:func:`image_table` computes, for every clean-correct image of a batch:

- the spectrum of the input Hessian of the cross-entropy, in float64: by the Gauss-Newton path
  where it is the exact Hessian (piecewise-linear networks; checked per batch), else the exact
  ``D x D`` eigendecomposition (``D <= max_exact_dim``), else stochastic Lanczos quadrature (the
  trace then by Hutchinson, with its standard error ``trace_se``); its trace, largest eigenvalue and the share of negative curvature (``neg_share``: the mass of the
  negative eigenvalues over all absolute mass; zero for a Gauss-Newton matrix, which is PSD);
- KL and Jensen-Shannon divergence of the image's spectrum histogram from the batch's pooled one
  on shared bins (:mod:`advbench.analysis.spectra`);
- the curvature ``k(v, x)`` along the gradient, along the top eigenvector, averaged over random
  directions, and along the attack's perturbation;
- per step size alpha (8-bit units, the seed's 0.1, 0.5, 1, 10), iterative FGSM's steps to
  misclassify, the MSE and confidence there, and the label flips along the run;
- DeepFool's minimal L2 distance; the boundary point between the image and the first
  misclassified iterate at ``boundary_alpha`` (bisection), its MSE, and whether a second model
  misclassifies it (transfer).

:func:`summary` groups the rows by quantiles of a measure (the seed's low / mid / high
divergence) with bootstrap intervals of each outcome's median, and gives the Spearman
correlation (with its interval) of every curvature measure with every outcome; :func:`detector`
scores clean against adversarial images by a curvature measure (ROC AUC with its interval).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from advbench.analysis.hessian import (
    GaussNewton,
    InputHessian,
    curvature,
    gauss_newton_is_exact,
    hutchinson,
    slq,
    top_eigen,
)
from advbench.analysis.perturbability import boundary_point, ifgsm_trace, transfers
from advbench.analysis.spectra import histograms, js, kl, shared_edges
from advbench.analysis.stats import group_median, quantile_groups, roc_auc, spearman
from advbench.registry import ATTACKS
from advbench.tensors import randn_like
from advbench.threat import ThreatModel

ALPHAS = (0.1, 0.5, 1.0, 10.0)  # the seed's step sizes, in 8-bit pixel units
HUTCHINSON_SAMPLES = 100  # the trace where the spectrum is estimated (SLQ), with its standard error
CURVATURE_MEASURES = ("kl", "js", "trace", "top_eigenvalue", "neg_share", "k_gradient", "k_top", "k_random",
                      "k_attack")


def _alpha_label(alpha: float) -> str:
    return f"{alpha:g}"


def spectra(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, max_exact_dim: int = 3072, slq_steps: int = 40,
            slq_probes: int = 10, generator: torch.Generator | None = None) -> dict[str, Any]:
    """The Hessian's spectrum per image (``values`` (N, D) exact, or an SLQ ``density``), the
    method used, the float64 Hessian object, and its top eigenvector (N, D) and eigenvalue."""
    if bool(gauss_newton_is_exact(model, x, y, generator).all()):
        h: Any = GaussNewton(model, x, y, dtype=torch.float64)
        values = h.spectrum()
        top_value, top_vec = (t[:, 0] for t in h.top_eigen(1))
        return {"method": "gauss-newton", "hessian": h, "values": values, "top_value": top_value, "top_vector": top_vec}
    h = InputHessian(model, x, y, dtype=torch.float64)
    if h.dim <= max_exact_dim:
        lam, vec = torch.linalg.eigh(h.exact())
        return {"method": "exact", "hessian": h, "values": lam, "top_value": lam[:, -1], "top_vector": vec[:, :, -1]}
    density = slq(h, slq_steps, slq_probes, generator)
    value, vector = top_eigen(h, 1, steps=slq_steps, generator=generator)
    return {"method": "slq", "hessian": h, "density": density, "top_value": value[:, 0], "top_vector": vector[:, 0]}


def image_table(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, second: nn.Module | None = None,
                alphas: tuple[float, ...] = ALPHAS, steps: int = 100, bounds: tuple[float, float] = (0.0, 1.0),
                bins: int = 50, random_directions: int = 4, boundary_alpha: float = 1.0,
                generator: torch.Generator | None = None, max_exact_dim: int = 3072) -> tuple[pd.DataFrame, dict[str, Any]]:
    """One row per clean-correct image of ``x`` (its position in ``index``); see the module
    docstring. Returns the table and what was used (the spectrum method, products per image)."""
    with torch.no_grad():
        keep = model(x).argmax(dim=1) == y
    index = torch.nonzero(keep).squeeze(1)
    x, y = x[index], y[index]
    out: dict[str, Any] = {"index": index.cpu().numpy()}
    spec = spectra(model, x, y, max_exact_dim=max_exact_dim, generator=generator)
    h = spec["hessian"]
    out.update(spectral_columns(spec, bins, generator))
    g = h.gradient.double()
    out["grad_norm"] = g.norm(dim=1).cpu().numpy()
    out["k_gradient"] = curvature(h, g).cpu().numpy()
    out["k_top"] = curvature(h, spec["top_vector"]).cpu().numpy()
    like = torch.empty_like(g)
    out["k_random"] = torch.stack([curvature(h, randn_like(like, generator)) for _ in range(random_directions)]
                                  ).mean(dim=0).cpu().numpy()

    first_adv = None
    for alpha in alphas:
        trace = ifgsm_trace(model, x, y, alpha / 255 * (bounds[1] - bounds[0]), steps, bounds,
                            keep_iterates=alpha == boundary_alpha)
        a = _alpha_label(alpha)
        out[f"steps_{a}"] = trace.steps.cpu().numpy()
        out[f"mse_{a}"] = trace.mse.cpu().numpy()
        out[f"confidence_{a}"] = trace.confidence.cpu().numpy()
        out[f"flips_{a}"] = trace.flips.cpu().numpy()
        if trace.iterates is not None:
            t = trace.steps.clamp_min(0)
            first_adv = trace.iterates[t, torch.arange(len(x), device=x.device)]
            found = trace.steps >= 0
    if first_adv is not None:
        delta = (first_adv - x).reshape(len(x), -1).double()
        k_attack = curvature(h, delta)
        out["k_attack"] = torch.where(found, k_attack, torch.full_like(k_attack, float("nan"))).cpu().numpy()
        bp = boundary_point(model, x, first_adv, y)
        out["boundary_mse"] = torch.where(found, bp.mse, torch.full_like(bp.mse, float("nan"))).cpu().numpy()
        if second is not None:
            moved = transfers(second, bp.x, y)
            out["boundary_transfers"] = np.where(found.cpu().numpy(), moved.cpu().numpy().astype(float), np.nan)
    deepfool = ATTACKS.create("deepfool")(model, x, y, ThreatModel(norm="l2", eps=0.0, bounds=bounds))
    out["min_distance_l2"] = deepfool.minimal_distances.double().cpu().numpy()
    info = {"method": spec["method"], "images": int(len(x)), "excluded_misclassified": int((~keep).sum()),
            "hessian_products_per_image": int(h.products), "bins": bins, "alphas": list(alphas), "steps": steps}
    return pd.DataFrame(out), info


def outcomes(alphas: tuple[float, ...] = ALPHAS) -> list[str]:
    """The outcome columns of :func:`image_table` a curvature measure may predict."""
    cols = ["min_distance_l2", "boundary_mse"]
    for a in map(_alpha_label, alphas):
        cols += [f"steps_{a}", f"mse_{a}", f"confidence_{a}", f"flips_{a}"]
    return cols


def summary(table: pd.DataFrame, by: str = "kl", groups: int = 3, resamples: int = 1000,
            seed: int = 0) -> dict[str, Any]:
    """Per quantile group of ``by`` (0 = lowest): each outcome's median with its bootstrap
    interval; over all rows: Spearman of every curvature measure with every outcome (an image
    never misclassified within the run has steps NaN and drops out of that pair)."""
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
    return {"by": by, "groups": groups, "group_of_row": g.tolist(), "per_group": per_group,
            "spearman": correlations}


def spectral_columns(spec: dict[str, Any], bins: int, generator: torch.Generator | None) -> dict[str, np.ndarray]:
    """From :func:`spectra`'s result, per image: trace (by Hutchinson, with ``trace_se``, where the
    spectrum is an SLQ estimate), top eigenvalue, negative share, and KL / JS of the spectrum
    histogram from the pooled one on shared bins."""
    h, out = spec["hessian"], {}
    if "values" in spec:
        values = spec["values"]
        hist = histograms(values, shared_edges(values, bins))
        trace = values.sum(dim=1)
        neg = values.clamp_max(0).abs().sum(dim=1) / values.abs().sum(dim=1).clamp_min(1e-300)
    else:
        dens = spec["density"]
        lo, hi = float(dens.nodes.min()), float(dens.nodes.max())
        hist = dens.histogram(torch.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1, dtype=torch.float64,
                                             device=dens.nodes.device))
        trace, trace_se = hutchinson(h, HUTCHINSON_SAMPLES, generator)  # more samples than SLQ's probes
        out["trace_se"] = trace_se.cpu().numpy()
        neg = ((dens.nodes.clamp_max(0).abs() * dens.weights).sum(dim=2).mean(dim=1)
               / (dens.nodes.abs() * dens.weights).sum(dim=2).mean(dim=1).clamp_min(1e-300))
    pooled = hist.mean(dim=0, keepdim=True).expand_as(hist)
    return {"trace": trace.cpu().numpy(), **out, "neg_share": neg.cpu().numpy(),
            "kl": kl(hist, pooled).cpu().numpy(), "js": js(hist, pooled).cpu().numpy(),
            "top_eigenvalue": spec["top_value"].cpu().numpy()}


def spectral_measures(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, bins: int = 50,
                      generator: torch.Generator | None = None, max_exact_dim: int = 3072) -> pd.DataFrame:
    """Label-free-usable curvature measures per image at ``x`` for ``labels`` (a detector passes
    the model's own predictions): :func:`spectral_columns` and ``k`` along the gradient."""
    spec = spectra(model, x, labels, max_exact_dim=max_exact_dim, generator=generator)
    h = spec["hessian"]
    cols = {k: v for k, v in spectral_columns(spec, bins, generator).items() if k != "trace_se"}
    return pd.DataFrame({**cols, "k_gradient": curvature(h, h.gradient.double()).cpu().numpy()})


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
    return {m: roc_auc(table[m].to_numpy()[n:], table[m].to_numpy()[:n], resamples, seed).to_dict()
            for m in table.columns}
