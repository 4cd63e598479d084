"""The seed's figures as PNGs, drawn from a curvature run's tables:

- ``divergence_vs_mse.png``: the grouping measure against the MSE of the first misclassified
  iterate (at ``boundary_alpha``) and against DeepFool's minimal distance, coloured by group;
- ``spectra_by_group.png``: the mean spectrum histogram of each group on the shared bins;
- ``steps_mse_per_alpha.png``: steps to misclassify and the MSE there per group, one column per alpha;
- ``confidence_by_group.png``: the confidence of the first misclassification per group and alpha;
- ``divergence_trajectories.png``: JS (and KL) along the iterations of the followed images, with
  the label flips marked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from advbench.analysis.curvature import alpha_label
from advbench.curvature.config import CurvatureConfig
from advbench.report.plots import new_figure, save_png

COLOURS = ("tab:blue", "tab:green", "tab:red", "tab:purple", "tab:orange", "tab:brown")


def _names(config: CurvatureConfig) -> list[str]:
    return list(config.group_names())


def draw_all(out: Path, config: CurvatureConfig, rows: pd.DataFrame, spectra: pd.DataFrame,
             traj: pd.DataFrame | None) -> list[Path]:
    """Every figure of the module docstring that the run has data for; the paths written."""
    paths = [_scatter(out, config, rows), _spectra(out, config, spectra), _per_alpha(out, config, rows),
             _confidence(out, config, rows)]
    if traj is not None and len(traj):
        paths.append(_trajectories(out, config, traj))
    return paths


def _colour(g: int) -> str:
    return COLOURS[g % len(COLOURS)]


def _scatter(out: Path, config: CurvatureConfig, rows: pd.DataFrame) -> Path:
    a = alpha_label(config.boundary_alpha)
    fig = new_figure(10, 4)
    axes = fig.subplots(1, 2)
    for ax, col, label in ((axes[0], f"mse_{a}", f"MSE at the first misclassification (alpha {a})"),
                           (axes[1], "min_distance_l2", "minimal L2 distance (DeepFool)")):
        for g, name in enumerate(_names(config)):
            sel = rows[rows.group == g]
            ax.scatter(sel[config.by], sel[col], s=12, color=_colour(g), label=f"{name} {config.by}", alpha=0.75)
        ax.set_xlabel(config.by)
        ax.set_ylabel(label)
        ax.set_yscale("log")
        x = rows[config.by].to_numpy(dtype=float)
        positive = x[np.isfinite(x) & (x > 0)]
        if len(positive) and (x.max() / positive.min() > 100 if positive.min() > 0 else False):
            ax.set_xscale("symlog", linthresh=float(positive.min()))  # divergences span decades
        ax.legend(fontsize=8)
    fig.suptitle(f"{config.model.name}: spectrum divergence against perturbation size")
    return _saved(fig, out / "divergence_vs_mse.png")


def _spectra(out: Path, config: CurvatureConfig, spectra: pd.DataFrame) -> Path:
    names = _names(config)
    fig = new_figure(10, 2.2 * len(names) + 0.6)
    axes = np.atleast_1d(fig.subplots(len(names), 1, sharex=True))
    centres = (spectra.bin_low + spectra.bin_high) / 2
    width = float((spectra.bin_high - spectra.bin_low).iloc[0])
    for g, (ax, name) in enumerate(zip(axes, names)):
        mass = spectra[name].to_numpy(dtype=float)
        shown = np.isfinite(mass) & (mass > 0)  # empty bins are not drawn (a log axis has no zero)
        ax.bar(centres[shown], mass[shown], width=width, color=_colour(g))
        ax.set_yscale("log")
        ax.set_ylabel(f"{name} {config.by}\nmass")
    axes[-1].set_xlabel("eigenvalue of the input Hessian of the loss" if config.bin_scale == "linear" else
                        "sign(l) log10(1 + |l| / tau): eigenvalue l on the symlog bins")
    fig.suptitle(f"{config.model.name}: mean spectrum histogram per {config.by} group ({config.bins} shared bins)")
    return _saved(fig, out / "spectra_by_group.png")


def _boxes(ax: Any, rows: pd.DataFrame, col: str, config: CurvatureConfig) -> None:
    names = _names(config)
    data = []
    for g in range(len(names)):
        v = rows.loc[rows.group == g, col].to_numpy(dtype=float)
        if col.startswith("steps_"):
            v = v[v >= 0]
        data.append(v[np.isfinite(v)])
    if not any(len(d) for d in data):
        ax.text(0.5, 0.5, "none misclassified", ha="center", va="center", transform=ax.transAxes)
        return
    parts = ax.boxplot([d if len(d) else [np.nan] for d in data], patch_artist=True)
    ax.set_xticks(range(1, len(names) + 1), names)
    for g, box in enumerate(parts["boxes"]):
        box.set_facecolor(_colour(g))
        box.set_alpha(0.6)


def _per_alpha(out: Path, config: CurvatureConfig, rows: pd.DataFrame) -> Path:
    alphas = [alpha_label(a) for a in config.alphas]
    fig = new_figure(3 * len(alphas) + 1, 6)
    axes = np.array(fig.subplots(2, len(alphas), squeeze=False))
    for j, a in enumerate(alphas):
        _boxes(axes[0, j], rows, f"steps_{a}", config)
        axes[0, j].set_title(f"alpha {a}")
        _boxes(axes[1, j], rows, f"mse_{a}", config)
        axes[1, j].set_yscale("log")
    axes[0, 0].set_ylabel("steps to misclassify")
    axes[1, 0].set_ylabel("MSE there")
    fig.suptitle(f"{config.model.name}: iterative FGSM per {config.by} group")
    return _saved(fig, out / "steps_mse_per_alpha.png")


def _confidence(out: Path, config: CurvatureConfig, rows: pd.DataFrame) -> Path:
    alphas = [alpha_label(a) for a in config.alphas]
    fig = new_figure(3 * len(alphas) + 1, 3.4)
    axes = np.atleast_1d(fig.subplots(1, len(alphas)))
    for ax, a in zip(axes, alphas):
        _boxes(ax, rows, f"confidence_{a}", config)
        ax.set_title(f"alpha {a}")
    axes[0].set_ylabel("confidence of the misclassification")
    fig.suptitle(f"{config.model.name}: confidence at the first misclassification per {config.by} group")
    return _saved(fig, out / "confidence_by_group.png")


def _trajectories(out: Path, config: CurvatureConfig, traj: pd.DataFrame) -> Path:
    images = sorted(traj.image.unique())
    fig = new_figure(10, 2.1 * len(images) + 0.6)
    axes = np.atleast_1d(fig.subplots(len(images), 1, sharex=True))
    for ax, i in zip(axes, images):
        t = traj[traj.image == i]
        ax.plot(t.step, t.js, color="tab:blue", label="JS")
        wrong = t[t.misclassified.astype(bool)]
        if len(wrong):
            ax.axvspan(wrong.step.min() - 0.5, t.step.max() + 0.5, color="tab:red", alpha=0.08, lw=0)
        flips = t[t.flip.astype(bool)]
        ax.scatter(flips.step, flips.js, color="tab:red", marker="x", zorder=3, label="label flip")
        ax.set_ylabel(f"image {int(t.position.iloc[0])}\nJS")
        ax.legend(fontsize=7, loc="best")
    axes[-1].set_xlabel(f"iterative-FGSM iteration (alpha {alpha_label(config.boundary_alpha)}; shaded: misclassified)")
    fig.suptitle(f"{config.model.name}: spectrum divergence along the attack")
    return _saved(fig, out / "divergence_trajectories.png")


def _saved(fig: Any, path: Path) -> Path:
    save_png(fig, path)
    return path
