"""Model confidence over a triangle of images and along straight paths (the paper's Table 2).

For a source x_s and two LST outputs x_1, x_2 of the same source, the triangle is the set of
convex combinations a x_s + b x_1 + c x_2 (a + b + c = 1, all >= 0). It is sampled on the
uniform barycentric grid of resolution R: the (R + 1)(R + 2) / 2 points whose weights are
multiples of 1/R. Its statistics are the mean source-class confidence over the grid and, for
each delta, the fraction of grid points whose confidence is at least p_src - delta. The path
confidence is the mean confidence at R + 1 evenly spaced points of the segment x_s -> x_k.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from advbench import params
from advbench.errors import ConfigError

#: slack when comparing confidences with p_src - delta: the same image evaluated in batches of
#: different sizes can differ in the last bits, which must not decide a grid point's membership
CONF_TOLERANCE = 1e-6


def barycentric_grid(resolution: int) -> torch.Tensor:
    """The (R + 1)(R + 2) / 2 x 3 weights (a, b, c) of the uniform grid of resolution R (float64)."""
    params.check_whole(resolution, "the grid resolution", 1)
    i, j = torch.meshgrid(torch.arange(resolution + 1), torch.arange(resolution + 1), indexing="ij")
    keep = (i + j) <= resolution
    b, c = i[keep], j[keep]
    a = resolution - b - c
    return torch.stack([a, b, c], dim=1).double() / resolution


@torch.no_grad()
def confidence_at_combinations(
    model: nn.Module,
    vertices: torch.Tensor,
    weights: torch.Tensor,
    label: torch.Tensor,
    *,
    batch_size: int = 1024,
) -> torch.Tensor:
    """Source-class confidence at every convex combination, batched over vertices and weights.

    ``vertices`` is (N, V, C, H, W), ``weights`` (P, V); returns (N, P): the softmax probability
    of ``label[n]`` at sum_v weights[p, v] * vertices[n, v]. Images are built chunk by chunk, so
    memory stays at ``batch_size`` images whatever N x P is.
    """
    n, v = vertices.shape[:2]
    if weights.dim() != 2 or weights.shape[1] != v:
        raise ConfigError(f"weights must be (points, {v}), got {tuple(weights.shape)}")
    p = weights.shape[0]
    w = weights.to(device=vertices.device, dtype=vertices.dtype)
    flat = vertices.reshape(n, v, -1)
    out = torch.empty(n * p, dtype=vertices.dtype, device=vertices.device)
    rows = torch.arange(n * p, device=vertices.device)
    for start in range(0, n * p, batch_size):
        r = rows[start : start + batch_size]
        imgs = torch.einsum("kv,kvd->kd", w[r % p], flat[r // p]).reshape(-1, *vertices.shape[2:])
        probs = model(imgs).softmax(dim=1)
        out[start : start + batch_size] = probs.gather(1, label[r // p][:, None]).squeeze(1)
    return out.reshape(n, p)


def triangle_confidence(
    model: nn.Module,
    source: torch.Tensor,
    first: torch.Tensor,
    second: torch.Tensor,
    label: torch.Tensor,
    *,
    resolution: int,
    batch_size: int = 1024,
) -> torch.Tensor:
    """(N, grid points) source-class confidence over each triangle (source, first, second)."""
    grid = barycentric_grid(resolution)
    return confidence_at_combinations(
        model, torch.stack([source, first, second], dim=1), grid, label, batch_size=batch_size
    )


def path_confidence(
    model: nn.Module,
    source: torch.Tensor,
    end: torch.Tensor,
    label: torch.Tensor,
    *,
    points: int,
    batch_size: int = 1024,
) -> torch.Tensor:
    """(N, points) source-class confidence at evenly spaced points of each segment source -> end."""
    params.check_whole(points, "points", 2)
    t = torch.linspace(0, 1, points, dtype=torch.float64)
    weights = torch.stack([1 - t, t], dim=1)
    return confidence_at_combinations(model, torch.stack([source, end], dim=1), weights, label, batch_size=batch_size)


@dataclass(frozen=True)
class TriangleStats:
    """Per-triangle confidence statistics; every tensor has one entry per source."""

    p_src: torch.Tensor
    path_confidence: torch.Tensor  # mean over both paths source -> LST output
    triangle_confidence: torch.Tensor  # mean over the barycentric grid
    fractions: dict[float, torch.Tensor]  # delta -> fraction of the grid with confidence >= p_src - delta


def triangle_stats(
    p_src: torch.Tensor,
    triangle: torch.Tensor,
    paths: Sequence[torch.Tensor],
    deltas: Sequence[float] = (0.0, 0.1, 0.2, 0.3),
) -> TriangleStats:
    """Summarize grid confidences ``triangle`` (N, P) and path confidences (each (N, points)) per source."""
    path = torch.cat(list(paths), dim=1)
    fractions = {
        float(d): (triangle >= (p_src[:, None] - d - CONF_TOLERANCE)).double().mean(dim=1) for d in deltas
    }
    return TriangleStats(
        p_src=p_src.double(),
        path_confidence=path.double().mean(dim=1),
        triangle_confidence=triangle.double().mean(dim=1),
        fractions=fractions,
    )
