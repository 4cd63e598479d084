"""The results store: per-example records in an embedded SQLite database.

Records are keyed by ``(config_hash, job_key)``. A job's records, its summary row and (when
asked) its adversarial examples are written in ONE transaction, so a process killed at any
moment (``kill -9`` included) leaves either the whole job or none of it; a rerun skips the
finished jobs and redoes the rest. Primary keys make a doubled row impossible.
"""

from __future__ import annotations

import io
import json
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from advbench.errors import DataError

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    config_hash TEXT PRIMARY KEY,
    config_json TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    config_hash TEXT NOT NULL,
    job_key TEXT NOT NULL,
    model TEXT NOT NULL,
    defense TEXT NOT NULL,
    threat_json TEXT NOT NULL,
    attack TEXT NOT NULL,
    attack_params_json TEXT NOT NULL,
    shard INTEGER NOT NULL,
    n INTEGER NOT NULL,
    n_attacked INTEGER NOT NULL,
    seconds REAL NOT NULL,
    n_forward INTEGER NOT NULL,
    n_backward INTEGER NOT NULL,
    n_queries INTEGER NOT NULL,
    violations INTEGER NOT NULL,
    quantization_failures INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    finished REAL NOT NULL,
    attack_name TEXT,
    attack_kind TEXT,
    view TEXT,
    minimal INTEGER,
    probe INTEGER,
    suite TEXT,
    suite_cascade INTEGER,
    measured_json TEXT,
    PRIMARY KEY (config_hash, job_key)
);
CREATE TABLE IF NOT EXISTS examples (
    config_hash TEXT NOT NULL,
    job_key TEXT NOT NULL,
    idx INTEGER NOT NULL,
    label INTEGER NOT NULL,
    pred_clean INTEGER NOT NULL,
    pred_adv INTEGER NOT NULL,
    target INTEGER,
    attacked INTEGER NOT NULL,
    valid INTEGER NOT NULL,
    success INTEGER NOT NULL,
    distance REAL,
    min_distance REAL,
    pred_clean_draws TEXT,
    pred_adv_draws TEXT,
    pred_feed_draws TEXT,
    PRIMARY KEY (config_hash, job_key, idx)
);
CREATE TABLE IF NOT EXISTS adversarial (
    config_hash TEXT NOT NULL,
    job_key TEXT NOT NULL,
    npz BLOB NOT NULL,
    PRIMARY KEY (config_hash, job_key)
);
CREATE TABLE IF NOT EXISTS plans (
    config_hash TEXT NOT NULL,
    job_key TEXT NOT NULL,
    PRIMARY KEY (config_hash, job_key)
);
"""


#: what a job's row is, beside its label: the attack's registry name and kind (single_step,
#: iterative, minimal, score_based, decision_based, transfer, other), the view it attacked
#: (naive or adaptive), whether it is a minimal-perturbation attack and whether a masking probe;
#: for a suite's component (AutoAttack's), the suite's label and whether the suite cascaded
IDENTITY_COLUMNS = {"attack_name": "TEXT", "attack_kind": "TEXT", "view": "TEXT", "minimal": "INTEGER",
                    "probe": "INTEGER", "suite": "TEXT", "suite_cascade": "INTEGER"}

#: what a job measured beyond its per-example rows, as JSON (NULL: nothing): the evaluation-failure
#: indicators of :mod:`advbench.eval.indicators` (an iterative attack's path, its rerun with a doubled
#: budget on a few examples; a masking probe's class count and prediction stability)
MEASURED_COLUMN = "measured_json"

#: a randomized deployed model is scored over several draws of its randomness: per example, the
#: clean and the adversarial prediction in each draw, comma-separated (NULL for deterministic models)
DRAW_COLUMNS = ("pred_clean_draws", "pred_adv_draws")

#: under a physical feed: per example, the prediction on each draw of the transformation of its
#: clean input, comma-separated (what the feed alone does; NULL for every other threat model)
FEED_COLUMN = "pred_feed_draws"


@dataclass(frozen=True)
class JobRecord:
    """Everything one finished job stores; ``examples`` holds one dict per example of the shard."""

    job_key: str
    model: str
    defense: str
    threat: dict[str, Any]
    attack: str
    attack_params: dict[str, Any]
    shard: int
    seconds: float
    n_forward: int
    n_backward: int
    n_queries: int
    violations: int
    quantization_failures: int
    seed: int
    examples: list[dict[str, Any]]
    adversarial: dict[str, np.ndarray] | None = None
    attack_name: str | None = None
    attack_kind: str | None = None
    view: str = "naive"
    minimal: bool = False
    probe: bool = False
    suite: str | None = None
    suite_cascade: bool = False
    measured: dict[str, Any] | None = None  # MEASURED_COLUMN


class ResultStore:
    """SQLite-backed, append-only store of finished jobs."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(str(self.path), timeout=60, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise DataError(f"cannot open the results store {self.path}: {exc}") from None
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.executescript(SCHEMA)
            self._migrate()
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            if "readonly" in str(exc) or "unable to open" in str(exc):
                raise DataError(f"cannot write the results store {self.path}: {exc}; choose a writable --out") from None
            raise DataError(
                f"{self.path} is not a readable advbench results store ({exc}); it was left as it is: move it "
                f"away or choose another --out to start afresh (advbench never deletes a store)"
            ) from None

    def _migrate(self) -> None:
        """Bring a store written by an older advbench up to this schema (columns only get added)."""
        have = {row[1] for row in self._conn.execute("PRAGMA table_info(examples)")}
        if "min_distance" not in have:  # added with the minimal-perturbation attacks
            self._conn.execute("ALTER TABLE examples ADD COLUMN min_distance REAL")
        for col in DRAW_COLUMNS:  # added with randomized defenses (scored over several draws)
            if col not in have:
                self._conn.execute(f"ALTER TABLE examples ADD COLUMN {col} TEXT")
        if FEED_COLUMN not in have:  # added with physical feeds
            self._conn.execute(f"ALTER TABLE examples ADD COLUMN {FEED_COLUMN} TEXT")
        jobs = {row[1] for row in self._conn.execute("PRAGMA table_info(jobs)")}
        for col, kind in IDENTITY_COLUMNS.items():  # added with attack identity in the store
            if col not in jobs:
                self._conn.execute(f"ALTER TABLE jobs ADD COLUMN {col} {kind}")
        if MEASURED_COLUMN not in jobs:  # added with the evaluation-failure indicators
            self._conn.execute(f"ALTER TABLE jobs ADD COLUMN {MEASURED_COLUMN} TEXT")

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ runs
    def register_run(self, config_hash: str, config: dict[str, Any]) -> None:
        self._conn.execute(
            "INSERT OR IGNORE INTO runs(config_hash, config_json, created) VALUES (?, ?, ?)",
            (config_hash, json.dumps(config, sort_keys=True), time.time()),
        )

    # ------------------------------------------------------------------ plans
    def set_plan(self, config_hash: str, job_keys: Iterable[str]) -> None:
        """Record the jobs the current run of ``config_hash`` consists of (replacing the last plan):
        tables and reports are built from these jobs only, never from others in the store."""
        cur = self._conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            cur.execute("DELETE FROM plans WHERE config_hash = ?", (config_hash,))
            cur.executemany("INSERT OR IGNORE INTO plans VALUES (?, ?)", [(config_hash, k) for k in job_keys])
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise

    def planned_keys(self, config_hash: str) -> set[str] | None:
        """The keys of the last run's plan of ``config_hash`` (None for a store that has none)."""
        rows = self._conn.execute("SELECT job_key FROM plans WHERE config_hash = ?", (config_hash,)).fetchall()
        return {r[0] for r in rows} if rows else None

    def other_jobs(self, config_hash: str, job_keys: Iterable[str]) -> tuple[int, int]:
        """How many stored jobs are not part of this plan: (of other configs, of this config with
        other content: another model file, retrained weights, changed data)."""
        other = self._conn.execute("SELECT COUNT(*) FROM jobs WHERE config_hash != ?", (config_hash,)).fetchone()[0]
        mine = self.finished_keys(config_hash)
        return int(other), len(mine - set(job_keys))

    # ------------------------------------------------------------------ jobs
    def finished_keys(self, config_hash: str) -> set[str]:
        rows = self._conn.execute("SELECT job_key FROM jobs WHERE config_hash = ?", (config_hash,))
        return {r[0] for r in rows}

    def measured_keys(self, config_hash: str) -> set[str]:
        """The keys of the finished jobs that carry measurements (``measured_json``)."""
        rows = self._conn.execute(
            f"SELECT job_key FROM jobs WHERE config_hash = ? AND {MEASURED_COLUMN} IS NOT NULL", (config_hash,))
        return {r[0] for r in rows}

    def has_adversarial(self, config_hash: str, job_key: str) -> bool:
        row = self._conn.execute(
            "SELECT 1 FROM adversarial WHERE config_hash = ? AND job_key = ?", (config_hash, job_key)
        ).fetchone()
        return row is not None

    def write_job(self, config_hash: str, rec: JobRecord) -> None:
        """Write a job atomically; a job already stored is replaced whole (never doubled)."""
        cur = self._conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            for table in ("jobs", "examples", "adversarial"):
                cur.execute(f"DELETE FROM {table} WHERE config_hash = ? AND job_key = ?", (config_hash, rec.job_key))
            n_attacked = sum(int(e["attacked"]) for e in rec.examples)
            cur.execute(
                "INSERT INTO jobs(config_hash, job_key, model, defense, threat_json, attack, attack_params_json, shard, "
                "n, n_attacked, seconds, n_forward, n_backward, n_queries, violations, quantization_failures, seed, "
                "finished, attack_name, attack_kind, view, minimal, probe, suite, suite_cascade, measured_json) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    config_hash, rec.job_key, rec.model, rec.defense, json.dumps(rec.threat, sort_keys=True),
                    rec.attack, json.dumps(rec.attack_params, sort_keys=True, default=str), rec.shard,
                    len(rec.examples), n_attacked, rec.seconds, rec.n_forward, rec.n_backward, rec.n_queries,
                    rec.violations, rec.quantization_failures, rec.seed, time.time(),
                    rec.attack_name, rec.attack_kind, rec.view, int(rec.minimal), int(rec.probe),
                    rec.suite, int(rec.suite_cascade),
                    None if rec.measured is None else json.dumps(rec.measured, sort_keys=True),
                ),
            )
            cur.executemany(
                "INSERT INTO examples(config_hash, job_key, idx, label, pred_clean, pred_adv, target, attacked, "
                "valid, success, distance, min_distance, pred_clean_draws, pred_adv_draws, pred_feed_draws) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                [
                    (
                        config_hash, rec.job_key, e["idx"], e["label"], e["pred_clean"], e["pred_adv"], e.get("target"),
                        int(e["attacked"]), int(e["valid"]), int(e["success"]), e.get("distance"),
                        e.get("min_distance"), e.get("pred_clean_draws"), e.get("pred_adv_draws"),
                        e.get(FEED_COLUMN),
                    )
                    for e in rec.examples
                ],
            )
            if rec.adversarial is not None:
                buf = io.BytesIO()
                np.savez_compressed(buf, **rec.adversarial)
                cur.execute("INSERT INTO adversarial VALUES (?,?,?)", (config_hash, rec.job_key, buf.getvalue()))
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise

    # ------------------------------------------------------------------ reading
    def jobs(self, config_hash: str, job_keys: Iterable[str] | None = None) -> pd.DataFrame:
        """The stored jobs of ``config_hash`` (only those in ``job_keys`` when given)."""
        df = pd.read_sql_query(
            "SELECT * FROM jobs WHERE config_hash = ? ORDER BY job_key", self._conn, params=(config_hash,)
        )
        return df if job_keys is None else df[df.job_key.isin(set(job_keys))].reset_index(drop=True)

    def examples(self, config_hash: str, job_keys: Iterable[str] | None = None) -> pd.DataFrame:
        """Per-example records of ``config_hash`` with their job's cell (only ``job_keys`` when given)."""
        df = pd.read_sql_query(
            "SELECT e.*, j.model, j.defense, j.threat_json, j.attack, j.shard, j.probe FROM examples e "
            "JOIN jobs j ON e.config_hash = j.config_hash AND e.job_key = j.job_key "
            "WHERE e.config_hash = ? ORDER BY j.model, j.defense, j.threat_json, j.attack, e.idx",
            self._conn,
            params=(config_hash,),
        )
        if job_keys is not None:
            df = df[df.job_key.isin(set(job_keys))].reset_index(drop=True)
        return df

    def adversarial(self, config_hash: str, job_key: str) -> dict[str, np.ndarray] | None:
        row = self._conn.execute(
            "SELECT npz FROM adversarial WHERE config_hash = ? AND job_key = ?", (config_hash, job_key)
        ).fetchone()
        if row is None:
            return None
        with np.load(io.BytesIO(row[0])) as z:
            return {k: z[k] for k in z.files}

    def robust_mask(self, config_hash: str, job_keys: Iterable[str]) -> dict[int, bool]:
        """Per example index: False once any of the given jobs broke it (for cascaded attacks):
        a success, or an audited example the model misclassifies. Under a physical feed the
        stored prediction is one draw's, so there only the audit's verdict (adversarial by the
        threat's rule; under ``mean``, in every draw) breaks an example."""
        keys = list(job_keys)
        if not keys:
            return {}
        marks = ",".join("?" * len(keys))
        rows = self._conn.execute(
            f"SELECT e.idx, MAX(e.success OR (e.valid AND e.pred_adv != e.label "
            f"AND j.threat_json NOT LIKE '%\"physical\":%')) FROM examples e "
            f"JOIN jobs j ON e.config_hash = j.config_hash AND e.job_key = j.job_key "
            f"WHERE e.config_hash = ? AND e.job_key IN ({marks}) GROUP BY e.idx",
            (config_hash, *keys),
        )
        return {int(i): not bool(s) for i, s in rows}
