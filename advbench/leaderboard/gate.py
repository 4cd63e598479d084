"""The regression gate: rerun the leaderboard's suites and compare every number with its entry.

``check`` first compares each entry's ``model_digest``: a model that changed is reported as such
(the suites use the zoo's shipped reference checkpoints, so on a fresh machine it does not), apart
from numbers that changed on the same model; then the numbers (clean_accuracy, robust_accuracy,
attacks.*) with an absolute tolerance, ``n`` and ``config_hash`` exactly, and missing and stale
entries. Entries added from a user's run (``source: added``) are not the suites' and are not rerun.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from advbench.config import load_config
from advbench.errors import ConfigError
from advbench.eval.evaluator import DB_NAME, evaluate
from advbench.leaderboard.entries import MODEL, entries_from_table, entry_name
from advbench.store import ResultStore

# Absolute tolerance on accuracies (fractions). The suites evaluate the shipped reference
# checkpoints, deterministically on CPU for their seed, so on one machine a rerun reproduces every
# number exactly; the tolerance only absorbs float differences in inference across CPUs and torch
# versions, which can flip a few borderline examples (1 point = 3.6 of the 360 test digits). A
# broken attack moves robust accuracy far more.
DEFAULT_TOLERANCE = 0.01


def suite_files(folder: str | Path) -> list[Path]:
    """The suite configs of a leaderboard folder: ``suite.yaml`` and any ``suite-*.yaml`` (one per
    data set: a config evaluates one data set), in name order."""
    files = sorted(Path(folder).glob("suite*.yaml"))
    if not files:
        raise ConfigError(f"no suite config (suite.yaml or suite-*.yaml) in {str(folder)!r}")
    return files


def suite_entries(suite: str | Path, threads: int | None = None) -> list[dict[str, Any]]:
    """Evaluate one suite config from scratch (in a temporary folder); its entries."""
    config = load_config(suite)
    with tempfile.TemporaryDirectory(prefix="advbench-leaderboard-") as tmp:
        result = evaluate(config, tmp, progress=False, config_source=str(suite), threads=threads)
        run = json.loads((Path(tmp) / "run.json").read_text())
        with ResultStore(Path(tmp) / DB_NAME) as store:
            examples = store.examples(config.hash(), store.planned_keys(config.hash()))
    examples = examples[~examples.probe.fillna(0).astype(bool)]
    return entries_from_table(result.table, config, result.masking, cards=run.get("model_cards", {}),
                              digests=run.get("model_digests", {}), examples=examples)


def run_suite(folder: str | Path, processes: int | None = None) -> tuple[list[dict[str, Any]], float]:
    """Evaluate every suite config of ``folder`` from scratch; the entries (in suite order) and seconds.

    With more than one suite and more than one CPU, the suites run side by side in ``processes``
    worker processes (default: up to 2, the CPUs there are), each job on one thread: the numbers
    depend on neither (the evaluator's results do not depend on the thread count), only the wall
    time does. The largest config file is started first, so the smaller ones share the other CPU."""
    suites = suite_files(folder)
    t0 = time.perf_counter()
    workers = min(len(suites), processes if processes is not None else min(2, os.cpu_count() or 1))
    if workers <= 1:
        return [e for suite in suites for e in suite_entries(suite)], time.perf_counter() - t0
    order = sorted(range(len(suites)), key=lambda i: -suites[i].stat().st_size)  # the largest first
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {i: pool.submit(suite_entries, str(suites[i]), 1) for i in order}
        results = {i: f.result() for i, f in futures.items()}
    return [e for i in range(len(suites)) for e in results[i]], time.perf_counter() - t0


@dataclass(frozen=True)
class Difference:
    entry: str
    field: str
    stored: Any
    measured: Any

    @property
    def model_changed(self) -> bool:
        """The entry's numbers were measured on other weights: not a regression of the numbers."""
        return self.field == MODEL

    @property
    def difference(self) -> float | None:
        both = (self.stored, self.measured)
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in both):
            return float(self.measured) - float(self.stored)
        return None


def check_tolerance(tolerance: float) -> float:
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and 0 <= tolerance < 1):
        raise ConfigError(f"tolerance must be a number in [0, 1) (an absolute accuracy change), got {tolerance!r}")
    return tolerance


def compare(stored: dict[str, dict[str, Any]], measured: list[dict[str, Any]],
            tolerance: float = DEFAULT_TOLERANCE) -> list[Difference]:
    """Every difference beyond ``tolerance`` between stored entries and measured ones."""
    check_tolerance(tolerance)
    diffs: list[Difference] = []
    fresh = {entry_name(e): e for e in measured}
    stored = {k: v for k, v in stored.items() if v.get("source", "suite") == "suite"}
    for name in sorted(set(stored) - set(fresh)):
        diffs.append(Difference(name, "(entry)", "present", "not produced by the suite"))
    for name, new in fresh.items():
        old = stored.get(name)
        if old is None:
            diffs.append(Difference(name, "(entry)", "missing", "measured"))
            continue
        if old.get(MODEL) != new.get(MODEL):
            diffs.append(Difference(name, MODEL, old.get(MODEL), new.get(MODEL)))
        for field in ("n", "config_hash"):
            if old.get(field) != new[field]:
                diffs.append(Difference(name, field, old.get(field), new[field]))
        pairs = [("clean_accuracy", old["clean_accuracy"], new["clean_accuracy"]),
                 ("robust_accuracy", old["robust_accuracy"], new["robust_accuracy"])]
        for label in sorted(set(old["attacks"]) | set(new["attacks"])):
            pairs.append((f"attacks.{label}", old["attacks"].get(label), new["attacks"].get(label)))
        for field, a, b in pairs:
            if a is None or b is None or abs(b - a) > tolerance:
                diffs.append(Difference(name, field, a, b))
    return diffs


def format_differences(diffs: list[Difference]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    rows = [("entry", "field", "stored", "measured", "difference")]
    rows += [(d.entry, d.field, cell(d.stored), cell(d.measured),
              "" if d.difference is None else f"{d.difference:+.4f}") for d in diffs]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
