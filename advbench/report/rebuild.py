"""A stored run's tables rebuilt from its store by the evaluator's own functions (never recomputed
here): the results table with its flags, the matrix and the masking report; plus what the report
adds: the cells the config asks for that the store lacks, and each attack's cost."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pandas as pd

from advbench.config import attack_threats
from advbench.eval.evaluator import build_tables
from advbench.eval.masking import MODEL_CODES, Finding
from advbench.eval.tables import _threat_columns, with_constraints, worst_case_rows
from advbench.report.load import Run
from advbench.store import ResultStore

#: the findings of the gradient, output and forward-pass checks (table checks are recomputed from
#: the store); ``dynamic`` was missing here, so a report dropped that finding
GRADIENT_CODES = MODEL_CODES
CELL = ["model", "defense", "attack", "norm", "eps", "targeting", "knowledge", "constraints"]
COST = ["seconds", "n_forward", "n_backward", "n_queries"]


@dataclass(frozen=True)
class Tables:
    results: pd.DataFrame  # one row per cell, as results.csv
    matrix: pd.DataFrame  # as matrix.csv
    masking: dict[str, Any]  # as masking.json
    missing: pd.DataFrame  # CELL + stored n, expected n, status (missing | partial)
    cost: pd.DataFrame  # per model, defense, attack and norm: summed COST over its eps


def _expected_cells(run: Run, results: pd.DataFrame) -> pd.DataFrame:
    """Every cell the config asks for (adaptive variants only as far as a stored results.csv
    names them), with the examples each should have."""
    config = run.config
    cells = [
        {"model": m.name, "defense": d.name, "attack": label, **_threat_columns(json.dumps(t.to_dict()))}
        for m in config.models for d in config.defenses
        for spec, label in zip(config.attacks, config.attack_labels()) for t in attack_threats(config, spec)
    ]
    expected = pd.DataFrame(cells, columns=CELL)
    csv = run.folder / "results.csv"
    if csv.is_file():
        earlier = pd.read_csv(csv)
        earlier = earlier[~worst_case_rows(earlier)]
        earlier = with_constraints(earlier)
        if set(CELL) <= set(earlier.columns):
            expected = pd.concat([expected, earlier[CELL]], ignore_index=True)
    expected = expected.drop_duplicates(CELL, ignore_index=True)
    n = run.provenance.get("data", {}).get("n")
    return expected.assign(expected_n=int(n) if n is not None else int(results.n.max()) if len(results) else 0)


def missing_cells(run: Run, results: pd.DataFrame) -> pd.DataFrame:
    """The expected cells the store lacks (status ``missing``) or holds only some shards of (``partial``)."""
    expected = _expected_cells(run, results)
    stored = results[~worst_case_rows(results)][CELL + ["n"]]
    merged = expected.merge(stored, on=CELL, how="left")
    merged["n"] = merged.n.fillna(0).astype(int)
    merged["status"] = ["missing" if n == 0 else "partial" for n in merged.n]
    return merged[merged.n < merged.expected_n][CELL + ["n", "expected_n", "status"]].reset_index(drop=True)


def attack_cost(results: pd.DataFrame) -> pd.DataFrame:
    """Each attack's cost per model, defense and norm, summed over its eps."""
    rows = results[~worst_case_rows(results)]
    keys = ["model", "defense", "attack", "norm", "targeting", "knowledge", "constraints"]
    cost = rows.groupby(keys, sort=False)[COST].sum().reset_index()
    cells = rows.groupby(keys, sort=False).size().rename("cells").reset_index()
    return cells.merge(cost, on=keys)[keys + ["cells", *COST]]


def rebuild(run: Run) -> Tables:
    """The run's tables from its store; gradient findings and statistics come from masking.json
    (they were measured on the models, which a report does not load)."""
    stored = run.masking.get("findings", [])
    gradient = [Finding(f["code"], f["seen"], f["where"]) for f in stored if f.get("code") in GRADIENT_CODES]
    with ResultStore(run.db) as store:
        results, matrix, masking = build_tables(store, run.config, None, gradient, run.masking.get("gradients", []))
    return Tables(results, matrix, masking, missing_cells(run, results), attack_cost(results))
