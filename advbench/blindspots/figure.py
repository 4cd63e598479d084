"""The analysis' picture: a few pairs as images, and each source's triangle as a contour plot.

One row per example source: source | target 1 | LST output 1 | target 2 | LST output 2 |
source-class confidence over the triangle (source at the lower left, output 1 at the lower right,
output 2 at the top), as in the paper's figures. Drawn on matplotlib's Agg canvas (no pyplot, no display).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import torch

from advbench.blindspots.triangle import barycentric_grid

#: 2-D positions of the triangle's vertices: source, LST output 1, LST output 2
VERTICES = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, np.sqrt(3) / 2]])


@dataclass(frozen=True)
class FigureSpec:
    """What the picture shows, on the CPU: ``source`` (k, C, H, W); ``targets``, ``outputs`` (k, 2, C, H, W)."""

    source: torch.Tensor
    targets: torch.Tensor
    outputs: torch.Tensor
    p_src: torch.Tensor  # (k,)
    p_out: torch.Tensor  # (k, 2)
    triangle: torch.Tensor  # (k, grid points)
    resolution: int
    classes: tuple[str, ...]
    labels: torch.Tensor  # (k,) source classes
    target_labels: torch.Tensor  # (k, 2)
    title: str = ""


def triangle_coordinates(resolution: int) -> np.ndarray:
    """(grid points, 2) plane positions of the barycentric grid (see :data:`VERTICES`)."""
    return barycentric_grid(resolution).numpy() @ VERTICES


def lattice_triangles(resolution: int) -> np.ndarray:
    """(R^2, 3) grid-point indices of the small triangles tiling the grid (matplotlib's Delaunay
    triangulation of a regular lattice is ambiguous and can leave gaps at the border)."""
    index = {}
    for k, (_a, b, c) in enumerate(barycentric_grid(resolution).mul(resolution).round().long().tolist()):
        index[(b, c)] = k
    tris = []
    for b in range(resolution):
        for c in range(resolution - b):
            tris.append((index[(b, c)], index[(b + 1, c)], index[(b, c + 1)]))
            if b + c < resolution - 1:
                tris.append((index[(b + 1, c)], index[(b + 1, c + 1)], index[(b, c + 1)]))
    return np.array(tris)


def draw(fig_spec: FigureSpec, path: Path | IO[bytes]) -> None:
    """Write the picture to ``path`` (PNG; a path or a binary file)."""
    import matplotlib.tri as mtri
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    k = fig_spec.source.shape[0]
    fig = MplFigure(figsize=(13, 2.3 * k + 0.6), layout="constrained")
    FigureCanvasAgg(fig)  # the Agg canvas, without pyplot's global state or a display
    axes = fig.subplots(k, 6, squeeze=False, gridspec_kw={"width_ratios": [1, 1, 1, 1, 1, 1.5]})
    xy = triangle_coordinates(fig_spec.resolution)
    tri = mtri.Triangulation(xy[:, 0], xy[:, 1], lattice_triangles(fig_spec.resolution))
    levels = np.linspace(0.0, 1.0, 11)
    levels[-1] += 1e-6  # a saturated softmax gives exactly 1.0: keep it inside the top band
    contour = None
    for r in range(k):
        name = _class_name(fig_spec.classes, int(fig_spec.labels[r]))
        cells = [
            (fig_spec.source[r], f"source: {name}\np={float(fig_spec.p_src[r]):.3f}"),
            (fig_spec.targets[r, 0], f"target 1: {_class_name(fig_spec.classes, int(fig_spec.target_labels[r, 0]))}"),
            (fig_spec.outputs[r, 0], f"LST 1: p({name})={float(fig_spec.p_out[r, 0]):.3f}"),
            (fig_spec.targets[r, 1], f"target 2: {_class_name(fig_spec.classes, int(fig_spec.target_labels[r, 1]))}"),
            (fig_spec.outputs[r, 1], f"LST 2: p({name})={float(fig_spec.p_out[r, 1]):.3f}"),
        ]
        for c, (img, title) in enumerate(cells):
            ax = axes[r, c]
            _show(ax, img)
            ax.set_title(title, fontsize=8)
        ax = axes[r, 5]
        contour = ax.tricontourf(tri, fig_spec.triangle[r].double().clamp(0, 1).numpy(), levels=levels, cmap="viridis",
                                 vmin=0.0, vmax=1.0)
        for (x, y), text in zip(VERTICES, ("source", "LST 1", "LST 2")):
            ax.annotate(text, (x, y), fontsize=7, ha="center", va="top" if y == 0 else "bottom",
                        xytext=(0, -3 if y == 0 else 3), textcoords="offset points")
        ax.set_aspect("equal")
        ax.set_xlim(-0.1, 1.1)
        ax.set_ylim(-0.12, 1.0)
        ax.axis("off")
        ax.set_title(f"p({name}) over the triangle", fontsize=8)
    if contour is not None:
        fig.colorbar(contour, ax=axes[:, 5].tolist(), shrink=0.8, label="source-class confidence")
    if fig_spec.title:
        fig.suptitle(fig_spec.title, fontsize=10)
    fig.savefig(path, dpi=110, format="png")


def _show(ax: object, img: torch.Tensor) -> None:
    arr = img.detach().cpu().float().clamp(0, 1).numpy()
    if arr.shape[0] == 1:
        ax.imshow(arr[0], cmap="gray", vmin=0.0, vmax=1.0)  # type: ignore[attr-defined]
    else:
        ax.imshow(np.moveaxis(arr, 0, -1))  # type: ignore[attr-defined]
    ax.set_xticks([])  # type: ignore[attr-defined]
    ax.set_yticks([])  # type: ignore[attr-defined]


def _class_name(classes: tuple[str, ...], index: int) -> str:
    return classes[index] if 0 <= index < len(classes) else str(index)
