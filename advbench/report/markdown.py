"""Markdown: any table as a pipe table, and report.md, the page a person reads."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pandas as pd

from advbench.analysis.stats import binomial_interval
from advbench.eval.masking import FLAGS, Finding
from advbench.eval.tables import with_constraints


def _cell(value: Any, float_format: Callable[[float], str]) -> str:
    if isinstance(value, float):
        return "–" if math.isnan(value) else float_format(value)
    if value is None or (isinstance(value, str) and not value):
        return ""
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(df: pd.DataFrame, index: bool = False, float_format: Callable[[float], str] = lambda v: f"{v:.4g}") -> str:
    """``df`` as a Markdown pipe table (a NaN shows as –; multi-level column names joined by spaces)."""
    if df.empty:
        return "(none)\n"
    frame = df.reset_index() if index else df
    head = [" ".join(str(p) for p in c if p != "") if isinstance(c, tuple) else str(c) for c in frame.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(_cell(v, float_format) for v in row) + " |")
    return "\n".join(lines) + "\n"


def matrix_table(matrix: pd.DataFrame) -> str:
    return table(matrix, index=True, float_format=lambda v: f"{v:.1f}")


def findings_frame(masking: dict[str, Any]) -> pd.DataFrame:
    """One row per gradient-masking flag: its code, what it means, where, what was seen, what to try."""
    rows = []
    for f in masking.get("findings", []):
        finding = Finding(f["code"], f["seen"], f["where"])
        scope = finding.line().split(": ", 1)[0].removeprefix(f"[{f['code']}] ")
        rows.append({"code": f["code"], "flag": FLAGS.get(f["code"], ""), "where": scope, "seen": f["seen"],
                     "try": f.get("try", "")})
    return pd.DataFrame(rows, columns=["code", "flag", "where", "seen", "try"])


def _provenance(prov: dict[str, Any], config_hash: str, seed: int) -> str:
    if not prov:
        return (f"config hash `{config_hash}`, seed {seed}. The run has no run.json (it was interrupted before "
                "its end): versions, device and date are unknown.\n")
    v = prov.get("versions", {})
    data = prov.get("data", {})
    jobs = prov.get("jobs", {})
    rows = [
        ("config hash", f"`{prov.get('config_hash', config_hash)}`"),
        ("config", prov.get("config_source", "")),
        ("seed", prov.get("seed", seed)),
        ("data", f"{data.get('name')} ({data.get('split')}), n = {data.get('n')}, indices sha `{data.get('indices_sha')}`"),
        ("versions", ", ".join(f"{k} {val}" for k, val in v.items() if val)),
        ("device", prov.get("device", {}).get("device", "")),
        ("date", f"{prov.get('started', '')} to {prov.get('finished', '')} ({prov.get('seconds', '')} s)"),
        ("jobs", (f"{jobs.get('total')} ({jobs.get('run')} run, {jobs.get('skipped')} resumed, "
                  f"{jobs.get('probes')} masking probes)")),
    ]
    return table(pd.DataFrame(rows, columns=["", "value"]))


def _missing(missing: pd.DataFrame) -> str:
    if missing.empty:
        return "Every cell the config asks for is stored.\n"
    return (f"**{len(missing)} cell(s) are missing or partial** (the run is unfinished: rerun `advbench evaluate` with "
            "the same config to resume it). Matrix cells shown as – and worst-case rows over those cells count only "
            "the attacks stored.\n\n" + table(missing))


def intervals_frame(results: pd.DataFrame) -> pd.DataFrame:
    """Per results row: clean and robust accuracy (%) with their exact binomial 95% intervals."""
    rows = []
    axes = with_constraints(results).constraints
    for r, constraints in zip(results.itertuples(index=False), axes):
        n = int(r.n)
        clean, robust = binomial_interval(r.clean_accuracy * n, n), binomial_interval(r.robust_accuracy * n, n)
        rows.append({"model": r.model, "defense": r.defense, "attack": r.attack, "norm": r.norm, "eps": f"{r.eps:g}",
                     "constraints": constraints, "n": n, "clean %": 100 * r.clean_accuracy, "clean low": 100 * clean[0], "clean high": 100 * clean[1],
                     "robust %": 100 * r.robust_accuracy, "robust low": 100 * robust[0],
                     "robust high": 100 * robust[1], "flags": r.flags})
    columns = ["model", "defense", "attack", "norm", "eps", "constraints", "n", "clean %", "clean low",
               "clean high", "robust %", "robust low", "robust high", "flags"]
    if not axes.astype(bool).any():  # a column only where some threat has axes beyond the ball
        columns.remove("constraints")
    return pd.DataFrame(rows, columns=columns)


def report(*, config_hash: str, seed: int, provenance: dict[str, Any], matrix: pd.DataFrame,
           missing: pd.DataFrame, masking: dict[str, Any], cost: pd.DataFrame, plots: list[str],
           intervals: pd.DataFrame | None = None) -> str:
    """The text of report.md."""
    intervals = intervals if intervals is not None else pd.DataFrame()
    heatmaps = [p for p in plots if p.startswith("heatmap")]
    curves = [p for p in plots if p.startswith("curves")]
    parts = [
        "# advbench report\n",
        "Rebuilt from the run's stored results (`advbench report`); no attack was rerun.\n",
        "## Provenance\n", _provenance(provenance, config_hash, seed),
        "## Robust accuracy (%)\n",
        ("Rows: model / defense / attack (`worst-case`: an example counts as broken if any attack broke it); "
         "columns: clean accuracy, then norm and eps.\n"),
        matrix_table(matrix),
        *(f"![robust accuracy]({p})\n" for p in heatmaps),
        "## Missing cells\n", _missing(missing),
        "## Robust accuracy with 95% intervals\n",
        ("Exact binomial (Clopper-Pearson) intervals over the n examples of each row; a randomized model's "
         "score (its mean over draws) is rounded to whole examples for the interval.\n"),
        table(intervals, float_format=lambda v: f"{v:.1f}"),
        "## Robustness curves\n",
        *([f"![{p}]({p})\n" for p in curves] or
          ["No curve drawn: every norm was measured at a single eps (a curve needs two or more).\n"]),
        "## Gradient-masking flags\n",
    ]
    if not masking.get("enabled", True):
        parts.append("The gradient-masking checks were off for this run (`masking_checks: false`).\n")
    else:
        flags = findings_frame(masking)
        parts.append("None raised.\n" if flags.empty else table(flags))
    parts += ["## Cost per attack\n", "Summed over the eps of each norm (`cells`: how many).\n",
              table(cost, float_format=lambda v: f"{v:.3f}"),
              "Full tables: `results.csv` / `.json` / `.md`, `matrix.*`, `cost.*`, `masking.*`, `missing.*`.\n"]
    return "\n".join(parts)
