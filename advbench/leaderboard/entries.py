"""Leaderboard entries: one JSON file per (model, defense, threat model), built from a run.

Entry schema, version 3 (numbers are JSON numbers, accuracies are fractions in [0, 1])::

    schema_version   3
    model, defense   names as in the suite config
    threat           {norm, eps, targeting, knowledge}; ``threat_id`` is its file-name form
    dataset          {name, split}
    n                number of evaluated examples (int)
    clean_accuracy   accuracy on the clean examples
    robust_accuracy  worst case over the suite's attacks, per example (the ``worst-case`` row)
    worst_attack     the attack with the lowest robust accuracy on its own
    attacks          {attack label: robust accuracy}
    seed, config_hash, config   the suite config (canonical form, embedded) and its hash
    versions         package versions (advbench.provenance.versions)
    date             when the numbers were measured (ISO 8601)
    architecture     from the model card, or null
    masking_findings number of gradient-masking flags raised for this model and defense
    model_digest     digest of the model's weights the numbers were measured on
    ranking          ``<data set>/<split>/<threat id>``: entries are ranked only within one
    intervals        exact binomial (Clopper-Pearson) 95% intervals: {clean_accuracy, robust_accuracy:
                     [low, high], attacks: {label: [low, high]}, level}
    robust_examples  the worst case per example, in index order: a string of 0/1 (a randomized
                     model: a list of the share of draws each example held in); with
                     ``examples_digest`` (of the indices) it pairs two entries' examples
    naive_robust_accuracy  where the model was also attacked adaptively (BPDA / EoT views):
                     the worst case over the naive attacks only (the adaptive number ranks)
    flags            the gradient-masking / attack-failure codes raised for this model, defense and
                     threat; ``flag_details`` what each saw and what to try
    naive_flags      of an entry attacked adaptively, the codes raised on its naive attacks only
                     (why the naive number is wrong; ``flags`` are those on the ranked evaluation)
    source           ``suite`` (measured by a suite: the gate reruns it) or ``added`` (by
                     ``advbench leaderboard add RUN_DIR``: kept, not rerun)

The gate (:mod:`advbench.leaderboard.gate`) first compares each entry's ``model_digest``: a model that changed is reported as such
(the suites use the zoo's shipped reference checkpoints, so on a fresh machine it does not), apart
from numbers that changed on the same model; then the numbers (clean_accuracy, robust_accuracy,
attacks.*) with an absolute tolerance, ``n`` and ``config_hash`` exactly, and missing and stale
entries.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from advbench.analysis.stats import binomial_interval
from advbench.errors import ConfigError
from advbench.eval.tables import WORST_CASE, is_worst_case, with_constraints, worst_case_examples
from advbench.files import atomic_write_text
from advbench.params import check_number, check_whole
from advbench.provenance import timestamp
from advbench.provenance import versions as package_versions

SCHEMA_VERSION = 3
WORST = WORST_CASE
LEVEL = 0.95
ADAPTIVE_MARKS = ("+bpda", "+eot")  # the label suffixes of an attack's adaptive view
REQUIRED = ("schema_version", "model", "defense", "threat", "n", "clean_accuracy", "robust_accuracy",
            "attacks", "config_hash", "config", "seed", "versions", "date", "model_digest")
MODEL = "model_digest"


# ----------------------------------------------------------------------------- entries
def threat_id(threat: dict[str, Any]) -> str:
    """File-name form of a threat model: ``linf-0.1``, plus targeting/knowledge when not default."""
    parts = [str(threat["norm"]), f"{float(threat['eps']):g}"]
    if threat.get("targeting", "untargeted") != "untargeted":
        parts.append(str(threat["targeting"]))
    if threat.get("knowledge", "white_box") != "white_box":
        parts.append(str(threat["knowledge"]))
    if threat.get("constraints"):  # the axes beyond the Lp ball: their own ranking, never mixed in
        parts.append(str(threat["constraints"]))
    return "-".join(parts)


def entry_name(entry: dict[str, Any]) -> str:
    return f"{entry['model']}__{entry['defense']}__{threat_id(entry['threat'])}"


def ranking_key(entry: dict[str, Any]) -> str:
    """The ranking an entry belongs to: ``<data set>/<split>/<threat id>`` (never across them)."""
    data = entry.get("dataset") or {}
    return f"{data.get('name')}/{data.get('split')}/{threat_id(entry['threat'])}"


def is_adaptive(label: str) -> bool:
    return any(mark in label for mark in ADAPTIVE_MARKS)


def interval(accuracy: float, n: int) -> list[float]:
    """The exact binomial 95% interval of an accuracy over ``n`` examples."""
    return list(binomial_interval(accuracy * n, n, LEVEL))


def _per_example(examples: pd.DataFrame | None, scoring: str) -> dict[tuple, dict[str, Any]]:
    """Per (model, defense, norm, eps, targeting): the worst case per example, all attacks and naive only."""
    if examples is None or examples.empty:
        return {}
    out: dict[tuple, dict[str, Any]] = {}
    for rec in worst_case_examples(examples, scoring):
        out.setdefault(_key(rec), {})["all"] = rec
    for rec in worst_case_examples(examples, scoring, keep=lambda a: not is_adaptive(a)):
        out.setdefault(_key(rec), {})["naive"] = rec
    return out


def _key(rec: dict[str, Any]) -> tuple:
    return (str(rec["model"]), str(rec["defense"]), str(rec["norm"]), float(rec["eps"]), str(rec["targeting"]),
            str(rec.get("constraints", "")))


def _selects(finding: dict[str, Any], model: str, defense: str, norm: str, eps: float, constraints: str = "") -> bool:
    """Whether a masking / failure finding concerns this model, defense and threat (a finding's
    ``where`` names columns and their value or values; a column it does not name is any)."""
    if finding.get("model", model) != model or finding.get("defense", defense) != defense:
        return False
    where = finding.get("where") or {}

    def holds(column: str, value: Any) -> bool:
        want = where.get(column)
        if want is None:
            return True
        values = want if isinstance(want, list) else [want]
        try:
            return any(float(v) == value for v in values) if column == "eps" else value in values
        except (TypeError, ValueError):
            return False

    return (holds("model", model) and holds("defense", defense) and holds("norm", norm) and holds("eps", eps)
            and holds("constraints", constraints))


def _naive_only(finding: dict[str, Any], adaptive: bool) -> bool:
    """Whether a finding concerns only the naive attacks of an entry whose ranked number includes
    adaptive (BPDA / EoT) views: it says why the naive number is wrong, not that the ranked one is."""
    attacks = (finding.get("where") or {}).get("attack")
    attacks = [attacks] if isinstance(attacks, str) else attacks or []
    return adaptive and bool(attacks) and not any(is_adaptive(str(a)) for a in attacks)


def encode_examples(robust: np.ndarray) -> str | list[float]:
    """Per-example scores as a 0/1 string (a list of floats when some are fractional)."""
    if np.all((robust == 0) | (robust == 1)):
        return "".join("1" if v else "0" for v in robust)
    return [round(float(v), 6) for v in robust]


def decode_examples(value: str | list[float]) -> np.ndarray:
    return np.array([c == "1" for c in value], dtype=float) if isinstance(value, str) else np.asarray(value, float)


def indices_digest(idx: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(idx, dtype=np.int64).tobytes()).hexdigest()[:20]


def entries_from_table(table: Any, config: Any, masking: dict[str, Any] | None = None,
                       versions: dict[str, Any] | None = None, date: str | None = None,
                       cards: dict[str, Any] | None = None, digests: dict[str, str] | None = None,
                       examples: pd.DataFrame | None = None, source: str = "suite") -> list[dict[str, Any]]:
    """Leaderboard entries from an evaluation's results table (one per model, defense and threat
    model; the worst case over every attacker that ran there, whatever its knowledge, ranks).
    ``digests`` maps each model to the digest of the weights the table was measured on;
    ``examples`` (the store's per-example records) gives each entry its per-example worst case
    and, where adaptive views ran, the naive worst case beside it."""

    findings = (masking or {}).get("findings", [])
    per_example = _per_example(examples, getattr(config, "randomized_scoring", "mean"))
    keys = ["model", "defense", "norm", "eps", "targeting", "constraints"]
    out = []
    table = with_constraints(table)
    for key, group in table.groupby(keys, sort=False):
        model, defense, norm, eps, targeting, constraints = key
        rows = {str(r.attack): r for r in group.itertuples(index=False)}
        attacks = {a: float(r.robust_accuracy) for a, r in rows.items() if not is_worst_case(a)}
        if not attacks:
            continue
        worst_attack = min(attacks, key=lambda a: (attacks[a], a))
        first = rows.get(WORST, next(iter(rows.values())))
        knowledge = first.knowledge
        entry = {
            "schema_version": SCHEMA_VERSION,
            "model": str(model),
            "defense": str(defense),
            "threat": {"norm": str(norm), "eps": float(eps), "targeting": str(targeting), "knowledge": str(knowledge),
                       **({"constraints": str(constraints)} if constraints else {})},
            "dataset": {"name": config.data.name or config.data.path, "split": config.data.split},
            "n": int(first.n),
            "clean_accuracy": float(first.clean_accuracy),
            "robust_accuracy": float(rows[WORST].robust_accuracy) if WORST in rows else attacks[worst_attack],
            "worst_attack": worst_attack,
            "attacks": attacks,
            "seed": config.seed,
            "config_hash": config.hash(),
            "config": config.canonical(),
            "versions": versions if versions is not None else package_versions(),
            "date": date or timestamp(),
            "architecture": ((cards or {}).get(str(model)) or {}).get("architecture"),
            "masking_findings": sum(1 for f in findings
                                    if _selects(f, str(model), str(defense), str(norm), float(eps), str(constraints))),
            MODEL: (digests or {}).get(str(model)),
        }
        entry["threat_id"] = threat_id(entry["threat"])
        entry["ranking"] = ranking_key(entry)
        n = entry["n"]
        entry["intervals"] = {"clean_accuracy": interval(entry["clean_accuracy"], n),
                              "robust_accuracy": interval(entry["robust_accuracy"], n),
                              "attacks": {a: interval(v, n) for a, v in attacks.items()}, "level": LEVEL}
        rec = per_example.get((str(model), str(defense), str(norm), float(eps), str(targeting), str(constraints)), {})
        entry["robust_examples"] = encode_examples(rec["all"]["robust"]) if "all" in rec else None
        entry["examples_digest"] = indices_digest(rec["all"]["idx"]) if "all" in rec else None
        adaptive = any(is_adaptive(a) for a in attacks)
        entry["naive_robust_accuracy"] = (float(rec["naive"]["robust"].mean()) if adaptive and "naive" in rec
                                          else None)
        mine = [f for f in findings if _selects(f, str(model), str(defense), str(norm), float(eps), str(constraints))]
        naive = [_naive_only(f, adaptive) for f in mine]
        entry["flags"] = sorted({str(f.get("code")) for f, n in zip(mine, naive) if not n})
        entry["naive_flags"] = sorted({str(f.get("code")) for f, n in zip(mine, naive) if n})
        entry["flag_details"] = [{"code": str(f.get("code")), "seen": str(f.get("seen", "")),
                                  "try": str(f.get("try", "")), "naive": n} for f, n in zip(mine, naive)]
        entry["source"] = source
        out.append(entry)
    return out


def validate_entry(entry: Any, source: str = "entry") -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise ConfigError(f"{source}: a leaderboard entry must be a JSON object")
    missing = [k for k in REQUIRED if k not in entry]
    if missing:
        raise ConfigError(f"{source}: missing field(s) {', '.join(missing)}")
    if entry["schema_version"] != SCHEMA_VERSION:
        raise ConfigError(f"{source}: schema_version {entry['schema_version']!r} is not {SCHEMA_VERSION}")
    numbers = {"clean_accuracy": entry["clean_accuracy"], "robust_accuracy": entry["robust_accuracy"],
               **{f"attacks.{k}": v for k, v in entry["attacks"].items()}}
    for field, value in numbers.items():
        check_number(value, f"{source}: {field}", low=0, high=1)
    check_whole(entry["n"], f"{source}: n", 0)
    if entry.get("source", "suite") not in ("suite", "added"):
        raise ConfigError(f"{source}: source must be 'suite' or 'added', got {entry.get('source')!r}")
    robust = entry.get("robust_examples")
    if robust is not None and len(robust) != entry["n"]:
        raise ConfigError(f"{source}: robust_examples holds {len(robust)} examples, n is {entry['n']}")
    return entry


def dumps(entry: dict[str, Any]) -> str:
    return json.dumps(entry, indent=1) + "\n"


def load_entries(folder: str | Path) -> dict[str, dict[str, Any]]:
    """The entries under ``<folder>/entries``, by name (file stem)."""
    entries_dir = Path(folder) / "entries"
    if not Path(folder).is_dir():
        raise ConfigError(f"leaderboard folder {str(folder)!r} does not exist")
    out = {}
    for path in sorted(entries_dir.glob("*.json")):
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: not a readable JSON entry ({exc})") from None
        out[path.stem] = validate_entry(raw, str(path))
    return out


def write_entries(folder: str | Path, entries: list[dict[str, Any]], replace: bool = True) -> list[Path]:
    """Write ``entries`` into ``<folder>/entries``; with ``replace`` (a suite's update) the suite
    entries not among them are removed (added ones are kept)."""

    entries_dir = Path(folder) / "entries"
    entries_dir.mkdir(parents=True, exist_ok=True)
    keep = {entry_name(e) for e in entries}
    for old in entries_dir.glob("*.json") if replace else ():
        try:
            added = json.loads(old.read_text()).get("source") == "added"
        except (OSError, ValueError, AttributeError):
            added = False
        if old.stem not in keep and not added:
            old.unlink()
    paths = []
    for e in entries:
        path = entries_dir / f"{entry_name(e)}.json"
        atomic_write_text(path, dumps(e))
        paths.append(path)
    return paths


