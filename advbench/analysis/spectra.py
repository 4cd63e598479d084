"""Spectrum histograms and their divergences: how each image's Hessian spectrum differs from
the data set's.

Every image's eigenvalues are binned on **shared** edges (over the pooled range of all images),
normalized to a probability vector, and compared with the pooled histogram (the mixture of all
images' histograms, this image's included) by Kullback-Leibler and Jensen-Shannon divergence.
Because the pooled histogram contains every image's, it is positive wherever an image's is, so
``KL(p || pooled)`` is finite; terms where ``p`` is zero contribute zero (``0 log 0 = 0``), never
a negative number, so the divergence is >= 0 as Gibbs' inequality says (the seed's negative KL
came from bins that were empty in one histogram being mishandled). Any other reference ``q`` with
a zero where ``p`` has mass gives ``inf``, not a wrong finite number.
"""

from __future__ import annotations

import math

import torch


def shared_edges(spectra: torch.Tensor, bins: int) -> torch.Tensor:
    """``bins + 1`` equal-width edges over the pooled range of ``spectra`` (N, D) (float64)."""
    lo, hi = float(spectra.min()), float(spectra.max())
    if hi <= lo:  # one value everywhere: a bin around it
        lo, hi = lo - 0.5, hi + 0.5
    return torch.linspace(lo, hi, bins + 1, dtype=torch.float64, device=spectra.device)


def histograms(spectra: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Each row of ``spectra`` (N, D) as a probability vector over the bins of ``edges`` (N, B);
    values outside the edges fall into the first or last bin."""
    b = edges.numel() - 1
    idx = (torch.bucketize(spectra.double().contiguous(), edges, right=True) - 1).clamp(0, b - 1)
    counts = torch.zeros(spectra.shape[0], b, dtype=torch.float64, device=spectra.device)
    counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))
    return counts / counts.sum(dim=1, keepdim=True)


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` along the last dimension (nats): ``sum p log(p / q)`` over the bins where
    ``p > 0``; ``inf`` where ``q`` is zero and ``p`` is not. Never negative (clamped at the
    rounding error of a sum of probabilities)."""
    p, q = p.double(), q.double()
    mass = p > 0
    terms = torch.where(mass, p * (torch.log(p.clamp_min(1e-300)) - torch.log(q.clamp_min(1e-300))),
                        torch.zeros_like(p))
    out = terms.sum(dim=-1)
    out = torch.where((mass & (q <= 0)).any(dim=-1), torch.full_like(out, math.inf), out)
    return out.clamp_min(0.0)


def js(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence (nats, in [0, ln 2]) along the last dimension: symmetric, and
    finite whatever bins are empty."""
    m = (p.double() + q.double()) / 2
    return ((kl(p, m) + kl(q, m)) / 2).clamp(0.0, math.log(2))


def divergences(spectra: torch.Tensor, bins: int = 50) -> dict[str, torch.Tensor]:
    """Per image (N,): KL and JS of its spectrum histogram from the pooled one, on shared edges;
    also the edges, the histograms and the pooled histogram."""
    edges = shared_edges(spectra, bins)
    h = histograms(spectra, edges)
    pooled = h.mean(dim=0, keepdim=True).expand_as(h)
    return {"kl": kl(h, pooled), "js": js(h, pooled), "edges": edges, "histograms": h, "pooled": pooled[0]}
