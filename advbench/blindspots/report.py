"""The analysis' tables (mean and std over pairs, as in the paper) and the files it writes.

Files in the output folder, each written atomically:

- ``pairs.csv``: one row per (source, target) pair (confidences, iterations, distances);
- ``triangles.csv``: one row per source (triangle and path confidences, fractions);
- ``distances.csv`` / ``confidence.csv``: Table 1 and Table 2, mean and std per column;
- ``tables.md``: both tables in Markdown, with the notes (e.g. why LPIPS is missing);
- ``results.json``: the summary, both tables and every per-pair and per-triangle record;
- ``run.json``: provenance (config, seed, versions, device, timing);
- ``blindspots.png``: the picture (see :mod:`advbench.blindspots.figure`).

Standard deviations are sample standard deviations (ddof 1), NaN over a single value.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from advbench.files import atomic_write, atomic_write_text
from advbench.blindspots.figure import FigureSpec, draw

DISTANCE_COLUMNS = (("rmse", "RMSE"), ("linf", "ℓ∞ dist"), ("ssim", "SSIM"), ("lpips", "LPIPS dist"))


def fraction_column(delta: float) -> str:
    """Column name of the triangle fraction for ``delta`` (e.g. ``frac_0.1``)."""
    return f"frac_{delta:g}"


def _mean_std(values: pd.Series) -> tuple[float, float]:
    v = values.astype(float)
    return float(v.mean()), float(v.std(ddof=1)) if v.count() > 1 else math.nan


def summary_tables(
    pairs: pd.DataFrame, triangles: pd.DataFrame, model: str, deltas: Sequence[float]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Table 1 (distances LST output -> target, over pairs) and Table 2 (confidences, over triangles)."""
    dist: dict[str, Any] = {"model": model, "n": len(pairs)}
    for col, _ in DISTANCE_COLUMNS:
        dist[f"{col}_mean"], dist[f"{col}_std"] = _mean_std(pairs[col])
    conf: dict[str, Any] = {"model": model, "n": len(triangles)}
    for col in ["p_src", "triangle_confidence", *(fraction_column(d) for d in deltas), "path_confidence"]:
        conf[f"{col}_mean"], conf[f"{col}_std"] = _mean_std(triangles[col])
    return pd.DataFrame([dist]), pd.DataFrame([conf])


def _pm(mean: float, std: float, digits: int = 3) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if not math.isnan(std) else f"{mean:.{digits}f}"


def markdown(
    dist: pd.DataFrame, conf: pd.DataFrame, deltas: Sequence[float], summary: dict[str, Any], notes: Sequence[str]
) -> str:
    """Both tables as Markdown (μ ± σ), the quality-bar line and the notes."""
    lines = ["## Table 1: distances between LST outputs and targets (μ ± σ over pairs)", ""]
    lines.append("| model | pairs | " + " | ".join(name for _, name in DISTANCE_COLUMNS) + " |")
    lines.append("| --- | ---: | " + " | ".join("---:" for _ in DISTANCE_COLUMNS) + " |")
    for _, r in dist.iterrows():
        cells = [_pm(r[f"{c}_mean"], r[f"{c}_std"]) for c, _ in DISTANCE_COLUMNS]
        lines.append(f"| {r['model']} | {r['n']} | " + " | ".join(cells) + " |")
    lines += ["", "## Table 2: source-class confidence over triangles and paths (μ ± σ over triangles)", ""]
    heads = ["p_src", "avg Δ conf", *(f"Δ frac δ={d:g}" for d in deltas), "avg path conf"]
    cols = ["p_src", "triangle_confidence", *(fraction_column(d) for d in deltas), "path_confidence"]
    lines.append("| model | triangles | " + " | ".join(heads) + " |")
    lines.append("| --- | ---: | " + " | ".join("---:" for _ in heads) + " |")
    for _, r in conf.iterrows():
        cells = [_pm(r[f"{c}_mean"], r[f"{c}_std"], 2) for c in cols]
        lines.append(f"| {r['model']} | {r['n']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Pairs whose LST output lies within RMSE {summary['rmse_goal']:g} of the target with source-class "
        f"confidence within delta of p_src: **{summary['fraction_reached']:.1%}** of {summary['pairs']}; "
        f"stopped early by the confidence check: {summary['fraction_stopped']:.1%}; "
        f"mean accepted iterations: {summary['mean_iterations']:.1f}.",
        "",
        *(f"- {n}" for n in notes),
        "",
    ]
    return "\n".join(lines)


def extra_versions() -> dict[str, str | None]:
    """Versions of the packages the analysis adds to the evaluator's list."""
    out: dict[str, str | None] = {}
    for name in ("scikit-image", "lpips", "matplotlib"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def _text(path: Path, text: str) -> None:
    atomic_write_text(path, text)


def write_outputs(
    out: Path,
    pairs: pd.DataFrame,
    triangles: pd.DataFrame,
    dist: pd.DataFrame,
    conf: pd.DataFrame,
    summary: dict[str, Any],
    provenance: dict[str, Any],
    figure: FigureSpec | None,
) -> None:
    """Write every file listed in the module docstring into ``out`` (created if missing)."""
    out.mkdir(parents=True, exist_ok=True)
    deltas = provenance["config"]["deltas"]
    notes = provenance.get("notes", [])
    _text(out / "pairs.csv", pairs.to_csv(index=False))
    _text(out / "triangles.csv", triangles.to_csv(index=False))
    _text(out / "distances.csv", dist.to_csv(index=False))
    _text(out / "confidence.csv", conf.to_csv(index=False))
    data = provenance.get("data", {})
    header = (
        f"# LST blind spots: {summary['model']} on {data.get('name')}/{data.get('split')}\n\n"
        f"Seed {provenance['seed']}; LST {provenance['traversal']['params']}; triangle grid resolution "
        f"{provenance['config']['grid']}; config hash {provenance['config_hash']} ({provenance['config_source']}).\n\n"
    )
    _text(out / "tables.md", header + markdown(dist, conf, deltas, summary, notes))
    records = {
        "summary": summary,
        "notes": notes,
        "distances": json.loads(dist.to_json(orient="records")),
        "confidence": json.loads(conf.to_json(orient="records")),
        "pairs": json.loads(pairs.to_json(orient="records")),
        "triangles": json.loads(triangles.to_json(orient="records")),
    }
    _text(out / "results.json", json.dumps(records, indent=1))
    _text(out / "run.json", json.dumps(provenance, indent=1, default=str))
    if figure is not None and figure.source.shape[0] > 0:
        atomic_write(out / "blindspots.png", lambda f: draw(figure, f))
