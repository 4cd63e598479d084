"""Reading a run folder: its config, provenance, masking report and stored records."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from advbench.config import BenchmarkConfig, parse_config
from advbench.errors import AdvbenchError
from advbench.eval.evaluator import DB_NAME


class ReportError(AdvbenchError):
    """The folder is not a run advbench can report on (missing, not a run, no stored results)."""


@dataclass(frozen=True)
class Run:
    """What a report is built from. ``provenance`` and ``masking`` are empty when the run was
    interrupted before it wrote run.json / masking.json."""

    folder: Path
    config: BenchmarkConfig
    config_hash: str
    provenance: dict[str, Any]
    masking: dict[str, Any]
    db: Path


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ReportError(f"{path} is not readable JSON: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _stored_runs(db: Path) -> list[tuple[str, str, int]]:
    """(config hash, config JSON, finished jobs) of each config in the store, newest first."""
    try:
        # a file: URI, percent-encoded, so a folder named like "q?x#y" is not read as a query
        conn = sqlite3.connect(f"{db.absolute().as_uri()}?mode=ro", uri=True)
        try:
            return conn.execute(
                "SELECT r.config_hash, r.config_json, (SELECT COUNT(*) FROM jobs j WHERE j.config_hash = r.config_hash) "
                "FROM runs r ORDER BY r.created DESC"
            ).fetchall()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise ReportError(f"{db} is not an advbench results store ({exc})") from exc


def load_run(folder: str | Path) -> Run:
    """The run in ``folder``; :class:`ReportError` when there is none to report on."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ReportError(f"run folder {folder} does not exist")
    db = folder / DB_NAME
    if not db.is_file():
        raise ReportError(f"{folder} is not an advbench run folder (no {DB_NAME}; run 'advbench evaluate' first)")
    provenance = _read_json(folder / "run.json")
    runs = {h: (cfg, n) for h, cfg, n in _stored_runs(db)}
    config_hash = provenance.get("config_hash") or next((h for h, (_, n) in runs.items() if n), None)
    if config_hash is None or not runs.get(config_hash, ("", 0))[1]:
        raise ReportError(f"the results store {db} holds no finished jobs{f' for config {config_hash}' if config_hash else ''}")
    raw = provenance.get("config") or json.loads(runs[config_hash][0])
    config = parse_config(raw)
    if config.hash() != config_hash:
        raise ReportError(f"the config stored in {folder} hashes to {config.hash()}, not to its run's {config_hash} "
                          "(written by another advbench version?); rerun 'advbench evaluate' to rebuild it")
    return Run(folder, config, config_hash, provenance, _read_json(folder / "masking.json"), db)
