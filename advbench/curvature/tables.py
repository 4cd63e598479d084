"""A curvature run's tables, summary and files, pooled from its parts (no model needed).

Files in the output folder, each written atomically:

- ``images.csv``: one row per analysed image (its data-set index, curvature measures, KL / JS on
  the shared bins, its group, and every outcome);
- ``groups.csv``: per group of ``by`` and outcome, the median with its 95% bootstrap interval;
- ``correlations.csv``: Spearman's rho of every curvature measure with every outcome, with its
  interval;
- ``detector.csv``: the curvature detector's ROC AUC per measure (clean vs adversarial);
- ``trajectories.csv``: KL / JS along the iterative-FGSM iterations of the followed images;
- ``spectra.csv``: the shared bin edges and the pooled histogram of each group;
- ``tables.md``, ``results.json`` (everything above and the summary), ``run.json`` (provenance),
  and the figures (:mod:`advbench.curvature.figures`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from advbench.analysis.curvature import (
    CURVATURE_MEASURES,
    Bins,
    alpha_label,
    detector_auc,
    divergence_columns,
    shared_range,
    spectrum_histograms,
    summary,
)
from advbench.analysis.stats import spearman
from advbench.curvature import figures
from advbench.curvature.config import CurvatureConfig
from advbench.curvature.parts import part_path, read_part
from advbench.errors import DataError
from advbench.files import atomic_write_text

@dataclass(frozen=True)
class CurvatureResult:
    """The per-image table, the summary (groups, correlations, comparisons, detector) and the files."""

    images: pd.DataFrame
    summary: dict[str, Any]
    out: Path
    files: list[Path] = field(default_factory=list)


def finish(run: Path, out: Path, config: CurvatureConfig, provenance: dict[str, Any],
           data_indices: np.ndarray) -> CurvatureResult:
    """Pool the parts of the run folder ``run`` into its tables and write every file into ``out``
    (see the module docstring)."""
    parts = read_parts(run, provenance["parts"]["batches"])
    rows = pd.concat([p["tables"]["rows"] for p in parts if "rows" in p["tables"]], ignore_index=True)
    if rows.empty:
        raise DataError("no image of the sample is classified correctly by the model: nothing to analyse")
    rows.insert(1, "data_index", data_indices[rows["position"].to_numpy()])
    clean = [p["spectra"]["clean"] for p in parts if "clean" in p["spectra"]]
    edges = shared_range(clean, config.bins, config.bin_scale)
    hist = spectrum_histograms(clean, edges)
    rows = rows.assign(**divergence_columns(hist))
    comparison: dict[str, Any] = {"kl_vs_js": spearman(rows.kl.to_numpy(), rows.js.to_numpy(), config.resamples,
                                                       config.seed).to_dict()}
    approx = [p["spectra"]["approx"] for p in parts if "approx" in p["spectra"]]
    if approx and len(approx) == len(clean):
        hist_a = spectrum_histograms(approx, edges)
        div_a = divergence_columns(hist_a)
        rows["kl_slq"], rows["js_slq"] = div_a["kl"], div_a["js"]
        rows["slq_tv"] = 0.5 * np.abs(hist - hist_a).sum(axis=1)  # total variation: exact vs SLQ histogram
        comparison["exact_vs_slq"] = {
            "kl": spearman(rows.kl.to_numpy(), rows.kl_slq.to_numpy(), config.resamples, config.seed).to_dict(),
            "js": spearman(rows.js.to_numpy(), rows.js_slq.to_numpy(), config.resamples, config.seed).to_dict(),
            "tv_median": float(np.median(rows.slq_tv)), "tv_max": float(rows.slq_tv.max()),
            "slq_steps": config.slq_steps, "slq_probes": config.slq_probes,
        }
    s = summary(rows, by=config.by, groups=config.groups, resamples=config.resamples, seed=config.seed)
    rows["group"] = s.pop("group_of_row")
    s["tied_across_groups"] = _tied_across_groups(rows[config.by].to_numpy(), rows.group.to_numpy())
    s["comparison"] = comparison
    s["detector"] = _detector(parts, rows, config)
    traj = _trajectories(parts, edges, hist.mean(axis=0))
    s["images"], s["methods"] = int(len(rows)), sorted({p["info"].get("method") for p in parts} - {None})
    s["excluded_misclassified"] = int(sum(p["info"]["excluded_misclassified"] for p in parts))
    s["hessian_products_per_image"] = max(p["info"].get("hessian_products_per_image", 0) for p in parts)
    if "boundary_transfers" in rows:
        s["boundary_transfer_rate"] = float(rows.boundary_transfers.mean())
    s["boundary_curvature_abs_median"] = float(np.nanmedian(rows.boundary_curvature.abs())) \
        if "boundary_curvature" in rows and rows.boundary_curvature.notna().any() else math.nan
    return _write(out, config, provenance, rows, s, traj, edges, hist)


def read_parts(run: Path, batches: int) -> list[dict[str, Any]]:
    """Every part of the run folder (DataError naming the first missing one)."""
    parts = [read_part(part_path(run, b)) for b in range(batches)]
    missing = [b for b, p in enumerate(parts) if p is None]
    if missing:
        raise DataError(f"{run}: {len(missing)} of {batches} parts missing or unreadable (batch {missing[0]} first); "
                        "rerun 'advbench curvature' with the same config and --out to compute them")
    return parts  # type: ignore[return-value]


def _tied_across_groups(values: np.ndarray, groups: np.ndarray) -> int:
    """How many images share their grouping value with an image of another group (the quantile
    split then separates equal values by their order alone)."""
    df = pd.DataFrame({"v": values, "g": groups})
    spread = df.groupby("v")["g"].nunique()
    return int(df.v.isin(spread[spread > 1].index).sum())


def _detector(parts: list[dict[str, Any]], rows: pd.DataFrame, config: CurvatureConfig) -> dict[str, Any] | None:
    """Clean and adversarial measures pooled on shared bins over both, and the AUC per measure."""
    if config.detector is None:
        return None
    adv_parts = [p for p in parts if "adversarial" in p["tables"]]
    attacked = sum(p["info"].get("detector_attacked", 0) for p in parts)
    successes = sum(p["info"].get("detector_successes", 0) for p in parts)
    spec = {"attack": config.detector.attack, "norm": config.detector.norm, "eps": config.detector.eps,
            "params": config.detector.params, "attacked": attacked, "successes": successes}
    if not adv_parts:
        return {**spec, "auc": {}}
    clean_sets = [p["spectra"]["clean"] for p in parts if "clean" in p["spectra"]]
    adv_sets = [p["spectra"]["adversarial"] for p in adv_parts]
    edges = shared_range(clean_sets + adv_sets, config.bins, config.bin_scale)
    h = spectrum_histograms(clean_sets + adv_sets, edges)
    div = divergence_columns(h)
    n = len(rows)
    measures = ["trace", "top_eigenvalue", "neg_share", "k_gradient", "uncertainty"]
    clean_df = rows.assign(uncertainty=1 - rows.clean_confidence)[measures].assign(kl=div["kl"][:n], js=div["js"][:n])
    adv_df = pd.concat([p["tables"]["adversarial"] for p in adv_parts], ignore_index=True)[measures]
    adv_df = adv_df.assign(kl=div["kl"][n:], js=div["js"][n:])
    return {**spec, "auc": detector_auc(clean_df, adv_df, config.resamples, config.seed)}


def _trajectories(parts: list[dict[str, Any]], edges: Bins, pooled: np.ndarray) -> pd.DataFrame | None:
    """KL / JS of every followed iterate from the clean images' pooled histogram, on its bins (KL
    is infinite where an iterate has mass in a bin no clean image has; JS is always finite)."""
    first = parts[0] if parts else None
    if first is None or "trajectory" not in first["tables"]:
        return None
    traj = first["tables"]["trajectory"].copy()
    h = spectrum_histograms([first["spectra"]["trajectory"]], edges)
    return traj.assign(**divergence_columns(h, pooled))


# ---------------------------------------------------------------------- files
def _write(out: Path, config: CurvatureConfig, provenance: dict[str, Any], rows: pd.DataFrame, s: dict[str, Any],
           traj: pd.DataFrame | None, edges: Bins, hist: np.ndarray) -> CurvatureResult:
    out.mkdir(parents=True, exist_ok=True)
    groups = _groups_table(s, config.group_names())
    corr = _correlation_table(s)
    det = _detector_table(s["detector"])
    e = edges.eigenvalue_edges()
    spectra = pd.DataFrame({"edge_low": e[:-1], "edge_high": e[1:], "bin_low": edges.edges[:-1],
                            "bin_high": edges.edges[1:],
                            **{name: hist[rows.group.to_numpy() == g].mean(axis=0)
                               for g, name in enumerate(config.group_names())}})
    files: list[Path] = []

    def put(name: str, text: str) -> None:
        atomic_write_text(out / name, text)
        files.append(out / name)

    put("images.csv", rows.to_csv(index=False))
    put("groups.csv", groups.to_csv(index=False))
    put("correlations.csv", corr.to_csv(index=False))
    put("spectra.csv", spectra.to_csv(index=False))
    if det is not None:
        put("detector.csv", det.to_csv(index=False))
    if traj is not None:
        put("trajectories.csv", traj.to_csv(index=False))
    put("tables.md", markdown(config, provenance, s, groups, corr, det))
    results = {"summary": s, "images": json.loads(rows.to_json(orient="records")),
               "trajectories": None if traj is None else json.loads(traj.to_json(orient="records"))}
    put("results.json", json.dumps(_finite(results), indent=1, sort_keys=True))
    put("run.json", json.dumps(provenance, indent=1, sort_keys=True))
    files += figures.draw_all(out, config, rows, spectra, traj)
    return CurvatureResult(rows, s, out, files)


def _finite(obj: Any) -> Any:
    """JSON without NaN / inf literals (null instead; ``inf`` KL as the string "inf")."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    return obj


def _groups_table(s: dict[str, Any], names: tuple[str, ...]) -> pd.DataFrame:
    recs = [{"by": s["by"], "group": names[int(g)], "outcome": col, "median": e["value"],
             "low": e["low"], "high": e["high"], "n": e["n"]}
            for col, per in s["per_group"].items() for g, e in per.items()]
    return pd.DataFrame(recs, columns=["by", "group", "outcome", "median", "low", "high", "n"])


def _correlation_table(s: dict[str, Any]) -> pd.DataFrame:
    recs = [{"measure": m, "outcome": o, "rho": e["value"], "low": e["low"], "high": e["high"], "n": e["n"]}
            for m, per in s["spearman"].items() for o, e in per.items()]
    return pd.DataFrame(recs, columns=["measure", "outcome", "rho", "low", "high", "n"])


def _detector_table(det: dict[str, Any] | None) -> pd.DataFrame | None:
    if det is None:
        return None
    recs = [{"measure": m, "auc": e["value"], "low": e["low"], "high": e["high"], "n": e["n"]}
            for m, e in det["auc"].items()]
    return pd.DataFrame(recs, columns=["measure", "auc", "low", "high", "n"])


def _g(v: float) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3g}"


def _ci(e: dict[str, float]) -> str:
    return f"{_g(e['value'])} [{_g(e['low'])}, {_g(e['high'])}]"


def markdown(config: CurvatureConfig, provenance: dict[str, Any], s: dict[str, Any], groups: pd.DataFrame,
             corr: pd.DataFrame, det: pd.DataFrame | None) -> str:
    """``tables.md``: what was analysed, the groups, the correlations, the comparisons, the detector."""
    name = config.model.name
    data = provenance["data"]
    lines = [f"# Input-space curvature of {name} on {data['name']}/{data['split']}", "",
             f"{s['images']} clean-correct images of {data['sampled']} sampled (seed {config.seed}); spectra by "
             f"{', '.join(s['methods'])} ({s['hessian_products_per_image']} Hessian products per image); groups: "
             f"{config.groups} quantiles of `{s['by']}` on {config.bins} shared {config.bin_scale} bins; intervals: 95% bootstrap "
             f"({config.resamples} resamples). Steps are iterative-FGSM iterations to the first misclassified "
             f"iterate (alpha in 8-bit units, at most {config.steps}; images never misclassified leave that column).", ""]
    if s["tied_across_groups"]:
        lines += [f"**Ties**: {s['tied_across_groups']} images share their `{s['by']}` value with an image of another "
                  "group, so the split between those groups is by position, not by value (on linear bins a confident "
                  "image's whole spectrum falls into one bin; `bin_scale: symlog` separates them).", ""]
    alphas = [alpha_label(a) for a in config.alphas]
    shown = ["min_distance_l2", "boundary_mse"] + [f"{k}_{a}" for k in ("steps", "mse", "confidence") for a in alphas]
    names = config.group_names()
    lines += [f"## Outcomes per `{s['by']}` group (median [95% interval], n)", "",
              "| outcome | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
    for col in shown:
        sub = groups[groups.outcome == col]
        if sub.empty:
            continue
        cells = []
        for g in names:
            r = sub[sub.group == g]
            if r.empty or int(r["n"].iloc[0]) == 0:
                cells.append("none, 0")
            else:
                cells.append(f"{_g(r['median'].iloc[0])} [{_g(r['low'].iloc[0])}, {_g(r['high'].iloc[0])}], "
                             f"{int(r['n'].iloc[0])}")
        lines.append(f"| {col} | " + " | ".join(cells) + " |")
    key_outcomes = [o for o in ["min_distance_l2", "boundary_mse", f"steps_{alpha_label(config.boundary_alpha)}",
                                f"mse_{alpha_label(config.boundary_alpha)}"] if o in set(corr.outcome)]
    lines += ["", "## Spearman's rho of each curvature measure with the outcomes [95% interval]", "",
              "| measure | " + " | ".join(key_outcomes) + " |", "| --- |" + " ---: |" * len(key_outcomes)]
    for m in CURVATURE_MEASURES:
        sub = corr[corr.measure == m]
        if sub.empty:
            continue
        cells = [_ci({"value": r.rho, "low": r.low, "high": r.high}) for o in key_outcomes
                 for r in sub[sub.outcome == o].itertuples()]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if "partial_spearman" in s:
        ctl = " and ".join(f"`{c}`" for c in s["controls"])
        lines += ["", f"## The same with {ctl} partialled out [95% interval]", "",
                  "Does curvature tell anything beyond the clean confidence and the first-order (linear) distance "
                  "estimate? Their own rho: " + "; ".join(
                      f"`{c}` with {o} {_ci(s['control_spearman'][c][o])}" for c in s["controls"] for o in key_outcomes)
                  + ".", "",
                  "| measure | " + " | ".join(key_outcomes) + " |", "| --- |" + " ---: |" * len(key_outcomes)]
        for m, per in s["partial_spearman"].items():
            lines.append(f"| {m} | " + " | ".join(_ci(per[o]) for o in key_outcomes) + " |")
    comp = s["comparison"]
    lines += ["", "## KL vs Jensen-Shannon, exact vs approximate spectrum", "",
              f"- Spearman(KL, JS) over the images: {_ci(comp['kl_vs_js'])}."]
    if "exact_vs_slq" in comp:
        e = comp["exact_vs_slq"]
        lines.append(f"- SLQ ({e['slq_steps']} Lanczos steps x {e['slq_probes']} probes) against the exact spectrum: "
                     f"Spearman of the KLs {_ci(e['kl'])}, of the JSs {_ci(e['js'])}; total-variation distance "
                     f"between the two histograms median {_g(e['tv_median'])}, max {_g(e['tv_max'])}.")
    if "boundary_transfer_rate" in s:
        lines.append(f"- Boundary points that transfer to {config.second_model.name}: "  # type: ignore[union-attr]
                     f"{s['boundary_transfer_rate']:.1%}.")
    lines.append(f"- Decision-boundary curvature at the boundary points (median |k|): "
                 f"{_g(s['boundary_curvature_abs_median'])} (zero on a piecewise-linear network).")
    d = s["detector"]
    if d is not None:
        lines += ["", f"## Curvature detector: clean vs {d['attack']} ({d['norm']}, eps {d['eps']:g}) adversarial", "",
                  f"{d['successes']} audited adversarial examples of {d['attacked']} attacked images; ROC AUC "
                  "(adversarial positive; below 0.5: the measure is larger on clean images). `uncertainty` (one "
                  "minus the top softmax probability) is the curvature-free baseline.", ""]
        if det is not None and len(det):
            lines += ["| measure | AUC [95% interval] |", "| --- | ---: |"]
            lines += [f"| {r.measure} | {_ci({'value': r.auc, 'low': r.low, 'high': r.high})} |" for r in det.itertuples()]
    return "\n".join(lines) + "\n"


def rebuild(run_dir: str | Path, out: str | Path | None = None) -> CurvatureResult:
    """The tables and figures of a curvature run rebuilt from its parts, without the model
    (``advbench report RUN_DIR``; default output folder ``RUN_DIR/report``)."""
    run = Path(run_dir)
    provenance = read_run(run)
    try:
        batches, sampled = int(provenance["parts"]["batches"]), int(provenance["data"]["sampled"])
        config = CurvatureConfig.model_validate(provenance["config"])
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{run}: run.json lacks the config or the parts of a curvature run") from None
    read_parts(run, batches)
    try:
        images = pd.read_csv(run / "images.csv", usecols=["position", "data_index"])
    except (OSError, ValueError):
        raise DataError(f"{run}: no readable images.csv (the run did not finish)") from None
    indices = np.full(sampled, -1, dtype=np.int64)
    indices[images.position.to_numpy(dtype=np.int64)] = images.data_index.to_numpy(dtype=np.int64)
    return finish(run, Path(out) if out else run / "report", config, provenance, indices)


def read_run(run: Path) -> dict[str, Any]:
    """A curvature run's ``run.json`` (DataError when the folder holds none)."""
    try:
        provenance = json.loads((run / "run.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise DataError(f"{run}: no readable run.json (not a finished 'advbench curvature' folder)") from None
    if not isinstance(provenance, dict) or provenance.get("advbench_curvature") != 1:
        raise DataError(f"{run}: run.json is not a curvature run's")
    return provenance


def is_curvature_run(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a curvature run (its run.json says so)."""
    try:
        return json.loads((Path(run_dir) / "run.json").read_text()).get("advbench_curvature") == 1
    except (OSError, json.JSONDecodeError, AttributeError):
        return False
