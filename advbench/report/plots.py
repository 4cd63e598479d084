"""The PNGs: a heatmap of the robust-accuracy matrix and robustness curves (accuracy against eps,
one figure per norm). Drawn on matplotlib's Agg canvas (no pyplot, no display)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from advbench.eval.tables import WORST_CASE, with_constraints
from advbench.files import atomic_write


def new_figure(width: float, height: float):
    """A matplotlib figure on the Agg canvas (no pyplot global state, no display), laid out constrained."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # the Agg canvas, without pyplot's global state or a display
    return fig


def save_png(fig, path: Path) -> None:
    """The figure as a PNG at ``path``, written atomically, without a timestamped software tag."""
    atomic_write(path, lambda f: fig.savefig(f, dpi=110, format="png", metadata={"Software": None}))


def heatmap(matrix: pd.DataFrame, path: Path, title: str = "robust accuracy (%)") -> None:
    """A matrix of percentages (default: robust accuracy per model / defense / attack and threat);
    a missing cell is grey."""
    values = matrix.drop(columns=["flags"], errors="ignore")
    data = values.to_numpy(dtype=float)
    rows = [" / ".join(map(str, r)) if isinstance(r, tuple) else str(r) for r in values.index]
    label = max((len(r) for r in rows), default=0)  # room for the row labels, at ~0.07 in a character
    fig = new_figure(2.5 + 0.9 * data.shape[1] + 0.07 * label, 1.6 + 0.4 * data.shape[0])
    ax = fig.subplots()
    from matplotlib import colormaps

    cmap = colormaps["viridis"].with_extremes(bad="lightgrey")
    image = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=0.0, vmax=100.0, aspect="auto")
    for (i, j), v in np.ndenumerate(data):
        ax.text(j, i, "–" if math.isnan(v) else f"{v:.1f}", ha="center", va="center", fontsize=8,
                color="black" if math.isnan(v) or v > 60 else "white")
    ax.set_xticks(range(data.shape[1]), [str(c) for c in values.columns], rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(data.shape[0]), rows, fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, shrink=0.8)
    save_png(fig, path)


def _panel_title(model: str, defense: str, targeting: str, knowledge: str, constraints: str = "") -> str:
    extra = [x for x, default in ((targeting, "untargeted"), (knowledge, "white_box"), (constraints, "")) if x != default]
    return " / ".join([model, defense, *extra])


def curves(table: pd.DataFrame, folder: Path) -> list[Path]:
    """One PNG per bounded norm measured at two or more eps, ``curves-NORM.png``: a panel per model /
    defense (and targeting / knowledge when not the default), a curve per attack of robust accuracy
    against eps, the worst case bold and black, the clean accuracy dashed."""
    written = []
    bounded = table[np.isfinite(table.eps.to_numpy(dtype=float))]
    bounded = with_constraints(bounded)
    for norm, sub in bounded.groupby("norm", sort=False):
        if sub.eps.nunique() < 2:  # one budget: a curve of single dots says nothing, so none is drawn
            continue
        panels = list(sub.groupby(["model", "defense", "targeting", "knowledge", "constraints"], sort=False))
        cols = min(3, len(panels))
        nrows = math.ceil(len(panels) / cols)
        fig = new_figure(4.2 * cols, 3.2 * nrows)
        axes = np.atleast_1d(fig.subplots(nrows, cols, squeeze=False)).ravel()
        for ax, (key, rows) in zip(axes, panels):
            for attack, pts in rows.groupby("attack", sort=False):
                pts = pts.sort_values("eps")
                worst = attack == WORST_CASE
                ax.plot(pts.eps, 100 * pts.robust_accuracy, marker="o", label=attack, color="black" if worst else None, alpha=0.55 if worst else 1.0,
                        linewidth=3.5 if worst else 1.3, zorder=1 if worst else 2)
            ax.axhline(100 * rows.clean_accuracy.iloc[0], color="grey", linestyle="--", linewidth=1, label="clean")
            ax.set_title(_panel_title(*key), fontsize=9)
            ax.set_xlabel(f"eps ({norm})")
            ax.set_ylabel("robust accuracy (%)")
            ax.set_ylim(-2, 102)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        for ax in axes[len(panels):]:
            ax.axis("off")
        path = folder / f"curves-{re.sub(r'[^A-Za-z0-9_.-]', '_', str(norm))}.png"
        save_png(fig, path)
        written.append(path)
    return written
