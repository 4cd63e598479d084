"""The transfer and destruction-rate matrices of a run, from its stored adversarial examples.

With an ``analysis`` section in the config, every job keeps its adversarial examples in the
store, and after the attacks the evaluator computes

- **transfer** (Szegedy et al.): for each defense, threat model and attack, the examples crafted
  on each model (white-box) evaluated on every model of the config behind the same defense:
  error rate per (source, target), the diagonal being the white-box number, with each source's
  average distortion, matched Gaussian and uniform noise rows and optionally the perturbations
  amplified to given stds (:func:`advbench.analysis.transfer_matrix.transfer_matrix`);
- **destruction** (Kurakin et al.): for each cell, the destruction rate of every configured
  transformation, average and prefiltered case, top-1 and top-5
  (:func:`advbench.analysis.destruction.destruction_records`).

Both are written as long tables (``transfer.csv``/``.json``, ``destruction.csv``/``.json``);
:mod:`advbench.report.matrices` renders them as Markdown pivots. Nothing here reruns an attack,
so a resumed run gives the same matrices.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from advbench.analysis.destruction import destruction_records
from advbench.analysis.transfer_matrix import transfer_matrix
from advbench.config import BenchmarkConfig
from advbench.eval.jobs import Job
from advbench.eval.plan import defense_spec, model_spec
from advbench.eval.tables import constraints_of
from advbench.eval.worker import UNIVERSAL_KEY, Worker
from advbench.files import atomic_write_text
from advbench.store import ResultStore

Cell = tuple[str, str, str, str]  # (model, defense, threat_json, attack)


def stored_cells(store: ResultStore, config_hash: str, jobs: list[Job], data: Any) -> dict[Cell, dict[str, np.ndarray]]:
    """Each cell's stored examples (the audited x_adv, y, idx, ...) merged over its shards, in index
    order, with the clean inputs ``x`` taken from ``data`` (the store keeps each example once)."""
    parts: dict[Cell, list[dict[str, np.ndarray]]] = {}
    for job in jobs:
        if job.probe:
            continue
        arrays = store.adversarial(config_hash, job.key)
        if arrays is not None:
            arrays.pop(UNIVERSAL_KEY, None)  # a universal job's one perturbation: not a row per example
            parts.setdefault(job.cell, []).append(arrays)
    cells = {}
    for cell, chunks in parts.items():
        merged = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
        order = np.argsort(merged["idx"], kind="stable")
        cells[cell] = {k: v[order] for k, v in merged.items()}
        cells[cell]["x"] = data.x[torch.as_tensor(cells[cell]["idx"], dtype=torch.long)].numpy()
    return cells


def _threat_columns(threat_json: str) -> dict[str, Any]:
    t = json.loads(threat_json)
    return {"norm": t["norm"], "eps": t["eps"], "targeting": t["targeting"], "knowledge": t["knowledge"],
            "constraints": constraints_of(t)}


def transfer_table(cells: dict[Cell, dict[str, np.ndarray]], models: dict[tuple[str, str], torch.nn.Module],
                   seed: int, amplify: list[float] | None = None) -> pd.DataFrame:
    """Long table: defense, threat, attack, source (a model or a noise row), target, error rate,
    errors, n, av_distortion. ``models`` maps (model, defense) to the deployed model."""
    groups: dict[tuple[str, str, str], dict[str, dict[str, np.ndarray]]] = {}
    for (model, defense, threat_json, attack), arrays in cells.items():
        groups.setdefault((defense, threat_json, attack), {})[model] = arrays
    rows = []
    for (defense, threat_json, attack), by_model in groups.items():
        names = list(by_model)
        first = by_model[names[0]]
        if any(not np.array_equal(by_model[m]["idx"], first["idx"]) for m in names):
            continue  # models evaluated on different examples cannot share a matrix
        x, y = torch.from_numpy(first["x"]), torch.from_numpy(first["y"]).long()
        sources = {m: torch.from_numpy(by_model[m]["x_adv"]) for m in names}
        targets = {m: models[(m, defense)] for (m, d) in models if d == defense}
        bounds = tuple(json.loads(threat_json).get("bounds", (0.0, 1.0)))
        result = transfer_matrix(sources, targets, x, y, bounds=bounds, noise=("gaussian", "uniform"),
                                 amplify_to=tuple(amplify or ()), seed=seed)
        for source, rates in result.rates.iterrows():
            for target in targets:
                rows.append({"defense": defense, **_threat_columns(threat_json), "attack": attack, "source": source,
                             "target": target, "error_rate": float(rates[target]),
                             "errors": int(result.errors.loc[source, target]), "n": result.n,
                             "av_distortion": float(rates["av_distortion"])})
    return pd.DataFrame(rows)


def destruction_table(cells: dict[Cell, dict[str, np.ndarray]], models: dict[tuple[str, str], torch.nn.Module],
                      transforms: list[Any], seed: int) -> pd.DataFrame:
    """Long table: model, defense, threat, attack, transformation, case, topk, numerator,
    denominator, n, rate (Kurakin et al.'s destruction rate of each cell's examples)."""
    frames = []
    for (model, defense, threat_json, attack), arrays in cells.items():
        net = models[(model, defense)]
        x, y = torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"]).long()
        eps = json.loads(threat_json)["eps"]
        classes = int(net(x[:1]).shape[1])
        topk = (1, 5) if classes > 5 else (1,)
        records = destruction_records(net, x, y, {(attack, eps): torch.from_numpy(arrays["x_adv"])}, transforms,
                                      topk=topk, seed=seed)
        records.insert(0, "model", model)
        records.insert(1, "defense", defense)
        for k, v in _threat_columns(threat_json).items():
            if k != "eps":
                records.insert(2, k, v)
        frames.append(records)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


@torch.no_grad()
def write_matrices(store: ResultStore, config: BenchmarkConfig, jobs: list[Job], worker: Worker, out: Path) -> None:
    """Compute the matrices the config's ``analysis`` section asks for and write them as records
    (``transfer.csv``/``.json``, ``destruction.csv``/``.json``); :mod:`advbench.report.matrices`
    renders them."""
    analysis = config.analysis
    if analysis is None:
        return
    cells = stored_cells(store, config.hash(), jobs, worker.data(config.data.model_dump(mode="json")))
    models = {(m.name, d.name): worker.model(model_spec(m), defense_spec(d), config.seed)
              for m in config.models for d in config.defenses}
    if analysis.transfer:
        table = transfer_table(cells, models, config.seed, list(analysis.amplify))
        atomic_write_text(out / "transfer.csv", table.to_csv(index=False))
        atomic_write_text(out / "transfer.json", table.to_json(orient="records", indent=1))
    if analysis.destruction:
        table = destruction_table(cells, models, list(analysis.destruction), config.seed)
        atomic_write_text(out / "destruction.csv", table.to_csv(index=False))
        atomic_write_text(out / "destruction.json", table.to_json(orient="records", indent=1))
