"""The evaluator: config -> jobs -> results store -> tables, resumable at any point.

``evaluate(config, out_dir)`` plans every (model, defense, threat model, attack, shard) job,
skips those already in ``out_dir/results.sqlite`` for the same config hash, runs the rest
and rebuilds every table from the store. An interrupted run (even ``kill -9``) rerun with the
same config gives exactly the table an uninterrupted run gives: each job is written in one
transaction, and each job's seed depends only on its content, not on what ran before.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from advbench.config import BenchmarkConfig, attack_threats
from advbench.eval.jobs import InProcessExecutor, Job, Worker
from advbench.eval.provenance import device_info, resolve_device, timestamp, versions
from advbench.eval.resolve import load_data
from advbench.eval.tables import robust_accuracy_matrix, robust_accuracy_table
from advbench.store import ResultStore
from advbench.threat import ThreatModel

DB_NAME = "results.sqlite"


@dataclass(frozen=True)
class EvaluationResult:
    table: pd.DataFrame
    matrix: pd.DataFrame
    out_dir: Path
    config_hash: str
    jobs_run: int
    jobs_skipped: int


def plan_jobs(config: BenchmarkConfig, indices: np.ndarray, save_adversarial: bool = False) -> list[Job]:
    """All jobs of a config, in a fixed order: models, defenses, threat models (grouped by all
    but eps), attacks, then shards and eps. A minimal-perturbation attack's jobs at the eps of one
    group come one after another for each shard, so the worker runs the attack once and re-audits
    its result at each eps."""
    from advbench.registry import ATTACKS

    data = config.data.model_dump(mode="json")
    shards = [tuple(int(i) for i in indices[s : s + config.batch_size]) for s in range(0, len(indices), config.batch_size)]
    groups: dict[str, list[ThreatModel]] = {}
    for threat in config.threat_models():
        groups.setdefault(json.dumps({k: v for k, v in threat.to_dict().items() if k != "eps"}, sort_keys=True), []).append(threat)
    labels = config.attack_labels()
    jobs: list[Job] = []
    for model in config.models:
        mspec = model.model_dump(mode="json", by_alias=True)
        for defense in config.defenses:
            dspec = defense.model_dump(mode="json")
            for threats in groups.values():
                earlier: dict[tuple[int, ThreatModel], list[str]] = {}
                for attack, label in zip(config.attacks, labels):
                    aspec: dict[str, Any] = {"name": attack.name, "params": attack.params, "label": label}
                    minimal = bool(getattr(ATTACKS.create(attack.name, **attack.params), "minimal", False))
                    if minimal:
                        aspec["minimal"] = True
                    allowed = attack_threats(config, attack)
                    planned = [t for t in threats if t in allowed]
                    order = ([(s, t) for s in range(len(shards)) for t in planned] if minimal
                             else [(s, t) for t in planned for s in range(len(shards))])
                    for s, threat in order:
                        after = tuple(earlier.get((s, threat), [])) if config.cascade else ()
                        job = Job(data, mspec, dspec, threat.to_dict(), aspec, s, shards[s], config.seed, after,
                                  save_adversarial)
                        earlier.setdefault((s, threat), []).append(job.key)
                        jobs.append(job)
    return jobs


def evaluate(
    config: BenchmarkConfig,
    out_dir: str | Path,
    *,
    save_adversarial: bool = False,
    progress: bool | None = None,
    config_source: str | None = None,
) -> EvaluationResult:
    """Run (or resume) ``config``; write results.csv, results.json, run.json into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    config_hash = config.hash()
    started = timestamp()
    t0 = time.perf_counter()

    data = load_data(config.data.model_dump(mode="json"))
    indices = data.sample_indices(config.data.n, config.seed).numpy()
    jobs = plan_jobs(config, indices, save_adversarial)

    with ResultStore(out / DB_NAME) as store:
        store.register_run(config_hash, config.canonical())
        finished = store.finished_keys(config_hash)
        todo = [
            j for j in jobs
            if j.key not in finished or (save_adversarial and not store.has_adversarial(config_hash, j.key))
        ]
        worker = Worker(device, robust_lookup=lambda keys: store.robust_mask(config_hash, keys), amp=config.amp)
        worker.preload_data(config.data.model_dump(mode="json"), data)
        show = sys.stderr.isatty() if progress is None else progress
        bar = tqdm(total=len(todo), disable=not show, desc="advbench", unit="job", dynamic_ncols=True)
        try:
            for job, record in InProcessExecutor(worker).map(todo):
                store.write_job(config_hash, record)
                bar.set_postfix_str(f"{job.model['name']} {job.attack['label']} {job.threat['norm']}={job.threat['eps']}")
                bar.update(1)
        finally:
            bar.close()
        table, matrix = build_tables(store, config)
        if save_adversarial:
            _write_adversarial(store, config_hash, jobs, out / "adversarial")

    provenance = {
        "advbench_run": 1,
        "config": config.canonical(),
        "config_hash": config_hash,
        "config_source": config_source or "embedded default",
        "seed": config.seed,
        "data": {"name": config.data.name or config.data.path, "split": data.split, "n": int(len(indices)),
                 "indices_sha": _indices_digest(indices)},
        "versions": versions(),
        "device": device_info(device),
        "started": started,
        "finished": timestamp(),
        "seconds": round(time.perf_counter() - t0, 3),
        "jobs": {"total": len(jobs), "run": len(todo), "skipped": len(jobs) - len(todo)},
        "command": " ".join(sys.argv),
        "model_cards": _model_cards(config),
    }
    write_outputs(out, table, matrix, provenance)
    return EvaluationResult(table, matrix, out, config_hash, len(todo), len(jobs) - len(todo))


def build_tables(store: ResultStore, config: BenchmarkConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    config_hash = config.hash()
    order = {
        "models": [m.name for m in config.models],
        "defenses": [d.name for d in config.defenses],
        "attacks": config.attack_labels(),
    }
    table = robust_accuracy_table(store.examples(config_hash), store.jobs(config_hash), order, cascade=config.cascade)
    return table, robust_accuracy_matrix(table, order["attacks"])


def write_outputs(out: Path, table: pd.DataFrame, matrix: pd.DataFrame, provenance: dict[str, Any]) -> None:
    """results.csv / results.json (one row per cell), matrix.csv, run.json; each written atomically."""
    _atomic_write(out / "results.csv", table.to_csv(index=False))
    records = json.loads(table.to_json(orient="records"))
    _atomic_write(out / "results.json", json.dumps({"config_hash": provenance["config_hash"], "rows": records}, indent=1))
    _atomic_write(out / "matrix.csv", matrix.to_csv())
    _atomic_write(out / "run.json", json.dumps(provenance, indent=1, default=str))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_adversarial(store: ResultStore, config_hash: str, jobs: list[Job], folder: Path) -> None:
    """One .npz per cell with x, x_adv, y and the clean and adversarial predictions."""
    folder.mkdir(parents=True, exist_ok=True)
    cells: dict[tuple[str, ...], list[dict[str, np.ndarray]]] = {}
    for job in jobs:
        arrays = store.adversarial(config_hash, job.key)
        if arrays is not None:
            cells.setdefault(job.cell, []).append(arrays)
    for (model, defense, threat_json, attack), parts in cells.items():
        t = json.loads(threat_json)
        eps = "inf" if t["eps"] is None else f"{t['eps']:g}"
        name = f"{model}__{defense}__{attack}__{t['norm']}-{eps}__{t['targeting']}.npz".replace("/", "_")
        merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        tmp = folder / (name + ".tmp.npz")
        np.savez_compressed(tmp, **merged)
        os.replace(tmp, folder / name)


def _indices_digest(indices: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(indices, dtype=np.int64).tobytes()).hexdigest()[:16]


def _model_cards(config: BenchmarkConfig) -> dict[str, Any]:
    cards: dict[str, Any] = {}
    try:
        from advbench.models.zoo import model_card
    except ImportError:
        return cards
    for m in config.models:
        if m.source == "registry":
            try:
                cards[m.name] = model_card(m.name)
            except Exception:  # noqa: BLE001 - a model outside the zoo has no card
                pass
    return cards
