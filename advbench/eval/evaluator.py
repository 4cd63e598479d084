"""The evaluator: config -> jobs -> results store -> tables, resumable at any point.

``evaluate(config, out_dir)`` plans every (model, defense, threat model, attack, shard) job,
skips those already in ``out_dir/results.sqlite`` for the same config hash, runs the rest
and rebuilds every table from the store. An interrupted run (even ``kill -9``) rerun with the
same config gives exactly the table an uninterrupted run gives: each job is written in one
transaction, and each job's seed depends only on its content, not on what ran before.

Defended models. A model behind a non-differentiable or randomized defense stage (a JPEG, a
quantizer, random resizing, a trained thermometer model) is attacked by every white-box attack
twice with ``adaptive: auto`` (the default): naively (label ``pgd``: the deployed model's own
gradients) and adaptively (label ``pgd+bpda``, ``pgd+eot`` or ``pgd+bpda+eot``: BPDA through the
stages' surrogates, EoT over ``eot_samples`` draws); ``off`` runs the naive rows only, ``only``
the adaptive ones. Both are audited and scored on the deployed model, and the worst case counts
both. Score- and decision-based attacks see the deployed model only. A randomized model is
scored over ``draws`` draws (``randomized_scoring``: ``mean`` or ``all``, see tables).

With ``masking_checks`` (default on) the run adds the large-eps probe jobs, measures gradients
and outputs of each attacked view, records the evaluation-failure indicators with the jobs
(:mod:`advbench.eval.indicators`), fills the table's ``flags`` column and writes masking.json
(:mod:`advbench.eval.masking`). A stored job that should carry indicators and does not (stored
with the checks off, or by an older advbench) is rerun, as one without its adversarial examples
is when they are asked for.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from advbench.config import BenchmarkConfig
from advbench.defenses.base import find_defended
from advbench.errors import ConfigError, ModelOutputError
from advbench.eval.executors import Executor, InProcessExecutor
from advbench.eval.indicators import indicator_findings
from advbench.eval.jobs import Job
from advbench.eval.masking import (
    FLAGS,
    GRAD_EXAMPLES,
    Finding,
    attack_info,
    flags_column,
    format_findings,
    gradient_findings,
    gradient_stats,
    table_findings,
)
from advbench.eval.masking import report as masking_report
from advbench.eval.matrices import write_matrices
from advbench.eval.plan import (
    attack_order,
    defense_spec,
    model_spec,
    plan_jobs,
    plan_probes,
)
from advbench.eval.ray_executor import RayExecutor
from advbench.eval.tables import constraints_of, robust_accuracy_matrix, robust_accuracy_table
from advbench.eval.worker import UNIVERSAL_KEY, Worker, checked_logits, examples_digest
from advbench.files import atomic_write_text, write_npz_rows
from advbench.loading import load_data
from advbench.params import check_whole
from advbench.provenance import device_info, resolve_device, timestamp, versions
from advbench.store import ResultStore
from advbench.threat import Knowledge, quantize_8bit

DB_NAME = "results.sqlite"


@dataclass(frozen=True)
class EvaluationResult:
    table: pd.DataFrame
    matrix: pd.DataFrame
    out_dir: Path
    config_hash: str
    jobs_run: int
    jobs_skipped: int
    masking: dict[str, Any] = field(default_factory=dict)  # the content of masking.json
    notes: list[str] = field(default_factory=list)  # the warnings printed before the run (also in run.json)

    @property
    def masking_lines(self) -> str:
        """The gradient-masking flags, one line each (empty when there is none)."""
        return masking_lines(self.masking)


def evaluate(
    config: BenchmarkConfig,
    out_dir: str | Path,
    *,
    save_adversarial: bool = False,
    progress: bool | None = None,
    config_source: str | None = None,
    warn: bool | None = None,
    threads: int | None = None,
    executor: Executor | None = None,
) -> EvaluationResult:
    """Run (or resume) ``config``; write results.csv, results.json, matrix.csv, masking.json and
    run.json into ``out_dir``. Warnings (a model with more outputs than the data has classes, a
    results folder holding other results, ...) are printed to stderr, one ``warning:`` line each,
    when ``warn`` is true (default: unless ``progress`` is False), and gradient-masking flags
    unless ``progress`` is False; both are kept in the result and run.json either way. ``threads``
    fixes the CPU thread count of every job (default: one thread for small jobs, see
    :mod:`advbench.eval.threads`); results do not depend on it. ``executor`` runs the jobs
    (default: the one ``config.executor`` names, see :mod:`advbench.eval.executors`); results do
    not depend on it either: this process plans and alone writes the store.

    Everything that can be checked before an attack runs is checked first (the data, the models'
    outputs, the threat models' bounds, the output folder): bad input fails before ``out_dir`` or
    its store is created, so it leaves nothing behind."""
    out = Path(out_dir)
    check_out_dir(out)
    device = resolve_device(config.device)
    config_hash = config.hash()
    started = timestamp()
    t0 = time.perf_counter()

    data_spec = config.data.model_dump(mode="json")
    data = load_data(data_spec)
    indices = data.sample_indices(config.data.n, config.seed).numpy()
    if threads is not None:
        check_whole(threads, "threads", 1)
    worker = Worker(device, amp=config.amp, threads=threads, channels_last=config.channels_last)
    worker.preload_data(data_spec, data)
    notes = preflight(config, data, indices, worker)
    keep = save_adversarial or config.analysis is not None  # the matrices need the examples
    jobs = plan_jobs(config, indices, keep, worker=worker)
    jobs += plan_probes(config, indices, int(data.x[0].numel()), worker=worker)

    runner = executor if executor is not None else make_executor(config.executor)
    try:
        runner.start(worker, data_spec, data)
        make_out_dir(out)
        result = _run(config, out, worker, runner, jobs, data, indices, notes, keep, save_adversarial, progress, warn)
    finally:
        runner.close()
    table, matrix, masking, todo, jobs_seconds = result

    provenance = {
        "advbench_run": 1,
        "config": config.canonical(),
        "config_hash": config_hash,
        "config_source": config_source or "embedded default",
        "seed": config.seed,
        "data": {"name": config.data.name or config.data.path, "split": data.split, "n": int(len(indices)),
                 "indices_sha": _indices_digest(indices),
                 "examples_sha": examples_digest(data, tuple(int(i) for i in indices))},
        "model_digests": {m.name: worker.base_model(model_spec(m))[1] for m in config.models},
        **_fit_provenance(jobs),
        "versions": versions(),
        "device": device_info(device),
        "started": started,
        "finished": timestamp(),
        "seconds": round(time.perf_counter() - t0, 3),
        "jobs": {"total": len(jobs), "run": len(todo), "skipped": len(jobs) - len(todo),
                 "probes": sum(j.probe for j in jobs), "seconds": round(jobs_seconds, 3)},
        "command": " ".join(sys.argv),
        "notes": notes,
        "threads": {"requested": threads if threads is not None else "auto", "chosen": worker.thread_choices},
        "executor": runner.describe(),
        "model_cards": _model_cards(worker, config),
        "defended_models": _defended_models(worker, config),
    }
    write_outputs(out, table, matrix, provenance)
    atomic_write_text(out / "masking.json", json.dumps(masking, indent=1, default=str))
    lines = masking_lines(masking)
    if lines and progress is not False:
        print(lines, file=sys.stderr)
    return EvaluationResult(table, matrix, out, config_hash, len(todo), len(jobs) - len(todo), masking, notes)


def _run(config: BenchmarkConfig, out: Path, worker: Worker, runner: Executor, jobs: list[Job], data: Any,
         indices: np.ndarray, notes: list[str], keep: bool, save_adversarial: bool, progress: bool | None,
         warn: bool | None) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any], list[Job], float]:
    """Run the jobs not yet in the store through ``runner`` (this process writes each record as
    it arrives), then build the tables (and the matrices and examples asked for) from the store."""
    config_hash = config.hash()
    with ResultStore(out / DB_NAME) as store:
        store.register_run(config_hash, config.canonical())
        store.set_plan(config_hash, [j.key for j in jobs])
        other, stale = store.other_jobs(config_hash, [j.key for j in jobs])
        if other or stale:
            notes.append(f"{out / DB_NAME} also holds {other} job(s) of other configs and {stale} of this config "
                         f"with other model or data content; they are kept, and no table uses them")
        if (progress is not False) if warn is None else warn:
            for note in notes:
                print(f"warning: {note}", file=sys.stderr)
        finished = store.finished_keys(config_hash)
        measured = store.measured_keys(config_hash) if any(j.indicators for j in jobs) else set()
        todo = [
            j for j in jobs
            if j.key not in finished or (keep and not j.probe and not store.has_adversarial(config_hash, j.key))
            or (j.indicators and j.key not in measured)
        ]
        show = sys.stderr.isatty() if progress is None else progress
        bar = tqdm(total=len(todo), disable=not show, desc="advbench", unit="job", dynamic_ncols=True)
        started = time.perf_counter()
        try:
            for job, record in runner.map(todo, worker, lambda keys: store.robust_mask(config_hash, keys)):
                store.write_job(config_hash, record)
                bar.set_postfix_str(f"{job.model['name']} {job.attack['label']} {job.threat['norm']}={job.threat['eps']}")
                bar.update(1)
        finally:
            bar.close()
        jobs_seconds = time.perf_counter() - started
        worker.robust_lookup = lambda keys: store.robust_mask(config_hash, keys)
        gradients = gradient_checks(worker, config, jobs, data, indices) if config.masking_checks else ([], [])
        table, matrix, masking = build_tables(store, config, {j.key for j in jobs}, *gradients)
        if config.analysis is not None:
            write_matrices(store, config, jobs, worker, out)
        if save_adversarial:
            _write_adversarial(store, config_hash, [j for j in jobs if not j.probe], data, indices, out / "adversarial")
    return table, matrix, masking, todo, jobs_seconds


def _fit_provenance(jobs: list[Job]) -> dict[str, Any]:
    """What universal perturbations were fit on (a run with a universal threat model only)."""
    job = next((j for j in jobs if j.fit is not None), None)
    if job is None:
        return {}
    idx = np.asarray(job.fit["indices"], dtype=np.int64)  # type: ignore[index]
    return {"fit": {"split": job.fit["split"], "n": int(len(idx)), "indices_sha": _indices_digest(idx),  # type: ignore[index]
                    "examples_sha": job.content.get("fit")}}


def make_executor(spec: Any) -> Executor:
    """The executor a config's ``executor`` entry names (Ray is imported only for a Ray run)."""
    if spec.name == "ray":
        return RayExecutor(address=spec.address, workers=spec.workers, gpus_per_job=spec.gpus_per_job)
    return InProcessExecutor()

def check_out_dir(out: Path) -> None:
    """A one-line ConfigError when ``out`` cannot be the output folder (before anything is written)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output folder {out} is a file; give a folder (created if missing)")
    parent = next((p for p in out.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ConfigError(f"output folder {out} lies under {parent}, which is a file, not a folder")


def make_out_dir(out: Path) -> None:
    """Create the output folder (and its parents), as a one-line ConfigError when that is impossible."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the output folder {out}: {exc.strerror or exc}; give a writable --out") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"the output folder {out} is not writable; give a writable --out")


def preflight(config: BenchmarkConfig, data: Any, indices: np.ndarray, worker: Worker) -> list[str]:
    """Check what the run will meet before any job runs; errors raise, warnings are returned.

    Errors: a threat model whose bounds do not contain the evaluated examples; a model (behind each
    defense) that fails on an example, returns no finite logits, fewer scores than the data has
    classes, or fewer than a fixed target class needs; a region that does not fit the images; a
    physical feed on a randomized model. Warnings: a model with more scores than the
    data has classes (a prediction of another class counts as an error); ``quantize: 8bit`` on
    examples that are not on the 8-bit grid (their 8-bit images may not fit the ball: rejected)."""
    notes: list[str] = []
    idx = torch.as_tensor(indices, dtype=torch.long)
    x = data.x[idx]
    lo_x, hi_x = float(x.min()), float(x.max())
    for t in config.threat_models():
        lo, hi = t.bounds
        if lo_x < lo or hi_x > hi:
            raise ConfigError(f"the evaluated examples lie in [{lo_x:g}, {hi_x:g}], outside the bounds [{lo:g}, {hi:g}] "
                              f"of threat {t.describe()}; give bounds that contain the data (inputs in [0, 1] with "
                              f"the normalization inside the model is the convention)")
        if t.region is not None:
            if x.dim() != 4:
                raise ConfigError(f"threat {t.describe()} has a region, which needs images (N, C, H, W); "
                                  f"the data's examples have shape {tuple(x.shape[1:])}")
            t.region.check_fits(x.shape[2], x.shape[3])
        if t.quantize == "8bit" and not torch.equal(quantize_8bit(x, t.bounds), x):
            note = (f"quantize: 8bit with examples off the 8-bit grid of bounds [{lo:g}, {hi:g}]: an example whose "
                    f"8-bit image leaves the eps-ball is rejected by the audit")
            notes += [note] if note not in notes else []
    probe = x[:1].to(worker.device)
    fixed = [t.target_class for t in config.threat_models() if t.target_class is not None]
    physical = next((t for t in config.threat_models() if t.physical is not None), None)
    for m in config.models:
        for d in config.defenses:
            deployed = worker.model(model_spec(m), defense_spec(d), config.seed)
            k = int(checked_logits(deployed, probe, m.name).shape[1])
            if k < data.num_classes:
                raise ModelOutputError(f"model {m.name!r} returns {k} scores per example but the data has "
                                       f"{data.num_classes} classes")
            if fixed and max(fixed) >= k:
                raise ConfigError(f"target_class {max(fixed)} is out of range for model {m.name!r} with {k} outputs; "
                                  f"allowed: 0..{k - 1}")
            note = (f"model {m.name!r} returns {k} scores per example but the data has {data.num_classes} classes: "
                    f"a prediction outside 0..{data.num_classes - 1} counts as a misclassification")
            if k > data.num_classes and note not in notes:
                notes.append(note)
            defended = find_defended(deployed)
            if physical is not None and defended is not None and defended.randomized:
                raise ConfigError(f"threat {physical.describe()} has a physical feed and model {m.name!r} behind "
                                  f"defense {d.name!r} is randomized: the two randomnesses are not scored together "
                                  f"yet; evaluate that model without the physical field")
    return notes


def gradient_checks(worker: Worker, config: BenchmarkConfig, jobs: list[Job], data: Any,
                    indices: np.ndarray) -> tuple[list[Finding], list[dict[str, Any]]]:
    """The gradient and output checks of every (model, defense, view) a white-box attack saw,
    on the first ``GRAD_EXAMPLES`` evaluated examples (a randomized model reseeded first)."""
    idx = torch.as_tensor(indices[:GRAD_EXAMPLES], dtype=torch.long)
    x, y = data.x[idx].to(worker.device), data.y[idx].to(worker.device)
    views: dict[tuple[str, str, str], Job] = {}
    labels: dict[tuple[str, ...], list[str]] = {}
    for j in jobs:
        if j.probe:
            continue
        m, d = j.model["name"], j.defense["name"]
        labels.setdefault((m, d), []).append(j.attack_label)
        if j.threat["knowledge"] == Knowledge.WHITE_BOX.value:
            key = (m, d, json.dumps(j.attack.get("adaptive"), sort_keys=True))
            views.setdefault(key, j)
            labels.setdefault(key, []).append(j.attack_label)
    findings: list[Finding] = []
    records: list[dict[str, Any]] = []
    for key, job in views.items():
        model = worker.view(job)
        defended = find_defended(model)
        randomized = defended is not None and defended.randomized
        if randomized:
            defended.reseed(config.seed)
        stats = gradient_stats(model, x, y, deterministic=not randomized)
        view = "adaptive" if job.attack.get("adaptive") else "naive"
        where = {"model": key[0], "defense": key[1], "attack": list(dict.fromkeys(labels[key])),
                 "knowledge": Knowledge.WHITE_BOX.value}
        where_all = {"model": key[0], "defense": key[1], "attack": list(dict.fromkeys(labels[key[:2]]))}
        findings += gradient_findings(stats, where, where_all, view=view)
        records.append({"model": key[0], "defense": key[1], "view": view, **stats.to_dict()})
    return findings, records


def build_tables(store: ResultStore, config: BenchmarkConfig, keys: set[str] | None = None,
                 gradient_found: list[Finding] | None = None, gradient_records: list[dict[str, Any]] | None = None,
                 ) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """The results table (with its ``flags``), the matrix and the masking report, from the store,
    over the jobs of the current run only (``keys``, else the store's plan). What each row's attack
    is (its registry name, kind, view, whether a probe) comes from the store's job rows."""
    config_hash = config.hash()
    order = {
        "models": [m.name for m in config.models],
        "defenses": [d.name for d in config.defenses],
        "attacks": attack_order(config),
    }
    # only the current run's jobs: a store may also hold jobs of this config over other content
    keys = keys if keys is not None else store.planned_keys(config_hash) or store.finished_keys(config_hash)
    examples, stored = store.examples(config_hash, keys), store.jobs(config_hash, keys)
    probe_ex, probe_jobs = examples.probe.fillna(0).astype(bool), stored.probe.fillna(0).astype(bool)
    scoring = config.randomized_scoring
    table = robust_accuracy_table(examples[~probe_ex], stored[~probe_jobs], order, cascade=config.cascade,
                                  scoring=scoring)
    if not config.masking_checks:
        return (table, robust_accuracy_matrix(table, order["attacks"], FLAGS, config.eps_labels()),
                masking_report([], None, [], enabled=False))
    probes = robust_accuracy_table(examples[probe_ex], stored[probe_jobs], order, scoring=scoring)
    info = attack_info(stored)
    indicated, readings = indicator_findings(examples, stored, table, probes, info)
    findings = table_findings(table, probes, info) + list(gradient_found or []) + indicated
    table["flags"] = flags_column(table, findings)
    return (table, robust_accuracy_matrix(table, order["attacks"], FLAGS, config.eps_labels()),
            masking_report(findings, probes, gradient_records or [], indicators=readings))


def masking_lines(masking: dict[str, Any]) -> str:
    """The printed form of a masking report: one line per flag (empty when there is none)."""
    return format_findings([Finding(f["code"], f["seen"], f["where"]) for f in masking.get("findings", [])])


def write_outputs(out: Path, table: pd.DataFrame, matrix: pd.DataFrame, provenance: dict[str, Any]) -> None:
    """results.csv / results.json (one row per cell), matrix.csv, run.json; each written atomically."""
    atomic_write_text(out / "results.csv", table.to_csv(index=False))
    records = json.loads(table.to_json(orient="records"))
    atomic_write_text(out / "results.json", json.dumps({"config_hash": provenance["config_hash"], "rows": records}, indent=1))
    atomic_write_text(out / "matrix.csv", matrix.to_csv())
    atomic_write_text(out / "run.json", json.dumps(provenance, indent=1, default=str))


def _write_adversarial(store: ResultStore, config_hash: str, jobs: list[Job], data: Any, indices: np.ndarray,
                       folder: Path) -> None:
    """``clean.npz`` (idx, x, y of the evaluated examples, once) and one .npz per cell with idx, the
    audited x_adv, y and the clean and adversarial predictions, streamed shard by shard (a cell is
    never held in memory whole); a universal cell also ``<cell>.universal.npz``, its perturbation
    (``universal``: (1 or classes, C, H, W), or the patch under a region)."""
    folder.mkdir(parents=True, exist_ok=True)
    idx = torch.as_tensor(indices, dtype=torch.long)
    write_npz_rows(folder / "clean.npz", [{"idx": np.asarray(indices, dtype=np.int64), "x": data.x[idx].numpy(),
                                            "y": data.y[idx].numpy()}], len(indices))
    cells: dict[tuple[str, ...], list[Job]] = {}
    for job in jobs:
        if store.has_adversarial(config_hash, job.key):
            cells.setdefault(job.cell, []).append(job)
    for (model, defense, threat_json, attack), parts in cells.items():
        t = json.loads(threat_json)
        eps = "inf" if t["eps"] is None else f"{t['eps']:g}"
        extra = "".join(f"__{v}" for v in (t["knowledge"] if t["knowledge"] != Knowledge.WHITE_BOX.value else "",
                                           constraints_of(t)) if v)  # threats apart in these: files apart
        name = f"{model}__{defense}__{attack}__{t['norm']}-{eps}__{t['targeting']}{extra}.npz"
        shared: list[np.ndarray] = []

        def rows(ordered: list[Job]) -> Any:
            for j in ordered:
                arrays = store.adversarial(config_hash, j.key)
                if arrays is not None and UNIVERSAL_KEY in arrays:
                    shared.append(arrays.pop(UNIVERSAL_KEY))
                yield arrays

        write_npz_rows(folder / name, rows(sorted(parts, key=lambda j: j.shard)), sum(len(j.indices) for j in parts))
        if shared:  # a universal cell: its one perturbation (or patch), beside the examples carrying it
            write_npz_rows(folder / name.replace(".npz", ".universal.npz"), [{"universal": shared[0]}], len(shared[0]))


def _indices_digest(indices: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(indices, dtype=np.int64).tobytes()).hexdigest()[:16]


def _model_cards(worker: Worker, config: BenchmarkConfig) -> dict[str, Any]:
    """The card each loaded model carries (``advbench_card``: the zoo's and trained models')."""
    cards: dict[str, Any] = {}
    for m in config.models:
        card = getattr(worker.base_model(model_spec(m))[0], "advbench_card", None)
        if card is not None:
            cards[m.name] = card
    return cards


def _defended_models(worker: Worker, config: BenchmarkConfig) -> dict[str, Any]:
    """Provenance of each defended (model, defense): its stages, tags and the seed of its randomness."""
    out: dict[str, Any] = {}
    for m in config.models:
        for d in config.defenses:
            defended = find_defended(worker.model(model_spec(m), defense_spec(d), config.seed))
            if defended is not None:
                out[f"{m.name} / {d.name}"] = {"stages": defended.describe(), "differentiable": defended.differentiable,
                                               "randomized": defended.randomized, "seed": config.seed}
    return out
