"""``advbench leaderboard add RUN_DIR``: a finished run of a suite becomes entries.

A run counts only if its config is one of the leaderboard's suites in everything but the models
(same data, defenses, threat models, attacks, seed and settings), so its numbers mean what the
suite's do; a user's own model is then ranked against the reference ones. Its entries are marked
``source: added``: the gate does not rerun them (it cannot: the model is the user's).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from advbench.config import load_config
from advbench.errors import ConfigError
from advbench.eval.evaluator import DB_NAME, build_tables
from advbench.leaderboard.entries import entries_from_table, entry_name, load_entries, write_entries
from advbench.leaderboard.gate import suite_files
from advbench.report.load import load_run
from advbench.store import ResultStore

IGNORED = ("models", "device", "executor")  # what may differ from the suite's config


def _comparable(canonical: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in canonical.items() if k not in IGNORED}


def matching_suite(folder: str | Path, config: Any) -> Path:
    """The suite ``config`` is a run of (all but its models); ConfigError naming the fields otherwise."""
    mine = _comparable(config.canonical())
    closest: tuple[int, Path, list[str]] | None = None
    for suite in suite_files(folder):
        theirs = _comparable(load_config(suite).canonical())
        differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if not differ:
            return suite
        if closest is None or len(differ) < closest[0]:
            closest = (len(differ), suite, differ)
    assert closest is not None
    raise ConfigError(f"the run's config is not a suite's: it differs from {closest[1].name} in "
                      f"{', '.join(closest[2])} (only models may differ; run 'advbench evaluate' with that suite "
                      "and your models)")


def add_run(folder: str | Path, run_dir: str | Path) -> list[Path]:
    """Write the entries of the finished run in ``run_dir`` into ``folder`` (see the module docstring)."""
    run = load_run(run_dir)
    matching_suite(folder, run.config)
    with ResultStore(Path(run_dir) / DB_NAME) as store:
        planned = store.planned_keys(run.config_hash) or set()
        missing = len(planned - store.finished_keys(run.config_hash))
        if missing:
            raise ConfigError(f"{run_dir}: the run is not finished ({missing} job(s) missing); rerun 'advbench "
                              "evaluate' to finish it first")
        table, _, masking = build_tables(store, run.config)
        examples = store.examples(run.config_hash, planned)
    examples = examples[~examples.probe.fillna(0).astype(bool)]
    entries = entries_from_table(table, run.config, masking, cards=run.provenance.get("model_cards", {}),
                                 digests=run.provenance.get("model_digests", {}), examples=examples, source="added")
    existing = load_entries(folder)
    clash = [entry_name(e) for e in entries if existing.get(entry_name(e), {}).get("source", "suite") == "suite"
             and entry_name(e) in existing]
    if clash:
        raise ConfigError(f"{clash[0]} is a suite entry: an added model needs a name of its own (rename it in the run's "
                          "config)")
    return write_entries(folder, entries, replace=False)

