"""Writing the report folder: each table as CSV, JSON and Markdown, report.md and the PNGs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from advbench.files import atomic_write_text
from advbench.report import html, markdown, plots
from advbench.report.load import Run, load_run
from advbench.report.matrices import render_matrices
from advbench.report.rebuild import Tables, rebuild


@dataclass(frozen=True)
class Report:
    folder: Path
    tables: Tables
    files: list[Path]

    @property
    def matrix(self) -> pd.DataFrame:
        return self.tables.matrix

    @property
    def missing(self) -> pd.DataFrame:
        return self.tables.missing


def _records(df: pd.DataFrame, index: bool = False) -> list[dict[str, Any]]:
    return json.loads((df.reset_index() if index else df).to_json(orient="records"))


def _write_table(folder: Path, name: str, df: pd.DataFrame, csv: str, records: Any, md: str) -> list[Path]:
    paths = [folder / f"{name}.{ext}" for ext in ("csv", "json", "md")]
    for path, text in zip(paths, (csv, json.dumps(records, indent=1) + "\n", md)):
        atomic_write_text(path, text)
    return paths


def write_tables(folder: Path, run: Run, t: Tables) -> list[Path]:
    """results, matrix, cost, masking and missing as .csv / .json / .md (results and matrix as the
    evaluator writes them)."""
    flags = markdown.findings_frame(t.masking)
    files = _write_table(folder, "results", t.results, t.results.to_csv(index=False),
                         {"config_hash": run.config_hash, "rows": _records(t.results)}, markdown.table(t.results))
    files += _write_table(folder, "matrix", t.matrix, t.matrix.to_csv(), _records(t.matrix, index=True),
                          markdown.matrix_table(t.matrix))
    intervals = markdown.intervals_frame(t.results)
    for name, df in (("cost", t.cost), ("masking", flags), ("missing", t.missing), ("intervals", intervals)):
        files += _write_table(folder, name, df, df.to_csv(index=False), _records(df), markdown.table(df))
    return files


def build_report(run_dir: str | Path, out: str | Path | None = None) -> Report:
    """Rebuild a run's tables from its store and write them, report.md and the plots into ``out``
    (default ``RUN_DIR/report``)."""
    run = load_run(run_dir)
    tables = rebuild(run)
    folder = Path(out) if out is not None else run.folder / "report"
    folder.mkdir(parents=True, exist_ok=True)
    files = write_tables(folder, run, tables)
    pngs = []
    if not tables.matrix.empty:
        plots.heatmap(tables.matrix, folder / "heatmap.png")
        pngs.append(folder / "heatmap.png")
    pngs += plots.curves(tables.results, folder)
    text = markdown.report(config_hash=run.config_hash, seed=run.config.seed, provenance=run.provenance,
                           matrix=tables.matrix, missing=tables.missing, masking=tables.masking, cost=tables.cost,
                           plots=[p.name for p in pngs], intervals=markdown.intervals_frame(tables.results))
    pngs += _analysis_heatmaps(run.folder, folder)
    # the transfer and destruction matrices the run computed (config section ``analysis``)
    for name, body in render_matrices(run.folder, folder).items():
        files.append(folder / name)
        nested = "\n".join("#" + line if line.startswith("#") else line for line in body.splitlines())
        text = text.rstrip("\n") + "\n\n" + nested + "\n"
    atomic_write_text(folder / "report.md", text)
    atomic_write_text(folder / "report.html", html.from_markdown(text, f"advbench report {run.config_hash}"))
    return Report(folder, tables, [folder / "report.md", folder / "report.html", *files, *pngs])


def _analysis_heatmaps(run_folder: Path, folder: Path) -> list[Path]:
    """Heatmaps of the run's transfer (error rate %, rows defense / threat / attack / source,
    columns target) and destruction matrices (top-1 average case %, columns transformation)."""
    written = []
    transfer = run_folder / "transfer.csv"
    if transfer.is_file():
        t = pd.read_csv(transfer)
        if not t.empty:
            t["row"] = [f"{d} / {n} {e:g} / {a} / {s}" for d, n, e, a, s in
                        zip(t.defense, t.norm, t.eps, t.attack, t.source)]
            m = t.pivot_table(index="row", columns="target", values="error_rate", sort=False) * 100
            plots.heatmap(m, folder / "transfer.png", "transfer: error rate of each target (%)")
            written.append(folder / "transfer.png")
    destruction = run_folder / "destruction.csv"
    if destruction.is_file():
        d = pd.read_csv(destruction)
        d = d[(d["case"] == "average") & (d["topk"] == 1)]
        if not d.empty:
            d = d.assign(row=[f"{m} / {de} / {a} / {n} {e:g}" for m, de, a, n, e in
                              zip(d.model, d.defense, d.attack, d.norm, d.eps)])
            m = d.pivot_table(index="row", columns="transformation", values="rate", sort=False) * 100
            plots.heatmap(m, folder / "destruction.png", "destruction rate (%), top-1, average case")
            written.append(folder / "destruction.png")
    return written
