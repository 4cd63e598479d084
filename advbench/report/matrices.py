"""The transfer and destruction-rate matrices of a run rendered as Markdown pivots, from the
records the evaluator wrote (``transfer.csv``, ``destruction.csv``)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from advbench.eval.tables import with_constraints
from advbench.files import atomic_write_text
from advbench.report.markdown import table as pipe_table


def _markdown(table: pd.DataFrame) -> str:
    return pipe_table(table, index=True, float_format=lambda v: f"{v:.3g}")


def transfer_markdown(table: pd.DataFrame) -> str:
    """Per defense, threat and attack: sources x targets error rates, with each source's distortion."""
    text = ["# Transfer matrices (error rate of each target on each source's examples)\n"]
    if not table.empty:
        table = with_constraints(table)  # rows of one norm and eps under other axes stay apart
        for key, group in table.groupby(["defense", "norm", "eps", "targeting", "knowledge", "constraints", "attack"],
                                        sort=False):
            pivot = group.pivot(index="source", columns="target", values="error_rate")
            pivot = pivot.reindex(index=list(dict.fromkeys(group.source)), columns=list(dict.fromkeys(group.target)))
            pivot["av_distortion"] = group.groupby("source", sort=False).av_distortion.first()
            text.append(f"## {' / '.join(str(k) for k in key if k != '')}\n\n{_markdown(pivot)}\n")
    return "\n".join(text)


def destruction_markdown(table: pd.DataFrame) -> str:
    """Rows model / defense / norm / attack / eps, columns case / top-k / transformation."""
    text = ["# Destruction rates (Kurakin et al.): rows model / defense / attack / eps\n"]
    if not table.empty:
        table = with_constraints(table)
        axes = ["constraints"] if table.constraints.astype(bool).any() else []  # a column only where one is set
        pivot = table.pivot_table(index=["model", "defense", "norm", *axes, "attack", "eps"],
                                  columns=["case", "topk", "transformation"], values="rate", sort=False)
        columns = list(dict.fromkeys(zip(table["case"], table["topk"], table["transformation"])))
        pivot = pivot.reindex(columns=pd.MultiIndex.from_tuples(columns, names=pivot.columns.names))
        text.append(_markdown(pivot))
    return "\n".join(text) + "\n"


def render_matrices(run_folder: Path, out: Path | None = None) -> dict[str, str]:
    """``transfer.md`` and ``destruction.md`` for the matrices a run wrote, into ``out`` (default:
    the run folder); returns each file's text by name."""
    out = run_folder if out is None else out
    texts = {}
    for name, render in (("transfer", transfer_markdown), ("destruction", destruction_markdown)):
        records = run_folder / f"{name}.csv"
        if records.is_file():
            table = pd.read_csv(records) if records.stat().st_size > 1 else pd.DataFrame()
            texts[f"{name}.md"] = render(table)
            atomic_write_text(out / f"{name}.md", texts[f"{name}.md"])
    return texts
