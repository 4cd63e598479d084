"""The leaderboard: one JSON entry per (model, defense, threat model), and the regression gate.

Layout of a leaderboard folder (``leaderboard/`` in the repository)::

    suite.yaml, suite-*.yaml                    the fixed evaluation configs the entries come from
    entries/<model>__<defense>__<threat>.json   one entry each (schema below)
    README.md, index.html                       rendered by ``advbench leaderboard build``

Entry schema, version 2 (numbers are JSON numbers, accuracies are fractions in [0, 1])::

    schema_version   1
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

``check`` first compares each entry's ``model_digest``: a model that changed is reported as such
(the suites use the zoo's shipped reference checkpoints, so on a fresh machine it does not), apart
from numbers that changed on the same model; then the numbers (clean_accuracy, robust_accuracy,
attacks.*) with an absolute tolerance, ``n`` and ``config_hash`` exactly, and missing and stale
entries.
"""

from __future__ import annotations

import html
import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from advbench.config import load_config
from advbench.errors import ConfigError
from advbench.eval.evaluator import evaluate
from advbench.eval.tables import WORST_CASE, is_worst_case
from advbench.files import atomic_write_text
from advbench.params import check_number, check_whole
from advbench.provenance import timestamp
from advbench.provenance import versions as package_versions

SCHEMA_VERSION = 2
# Absolute tolerance on accuracies (fractions). The suites evaluate the shipped reference
# checkpoints, deterministically on CPU for their seed, so on one machine a rerun reproduces every
# number exactly; the tolerance only absorbs float differences in inference across CPUs and torch
# versions, which can flip a few borderline examples (1 point = 3.6 of the 360 test digits). A
# broken attack moves robust accuracy far more.
DEFAULT_TOLERANCE = 0.01
WORST = WORST_CASE
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
    return "-".join(parts)


def entry_name(entry: dict[str, Any]) -> str:
    return f"{entry['model']}__{entry['defense']}__{threat_id(entry['threat'])}"


def entries_from_table(table: Any, config: Any, masking: dict[str, Any] | None = None,
                       versions: dict[str, Any] | None = None, date: str | None = None,
                       cards: dict[str, Any] | None = None, digests: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Leaderboard entries from an evaluation's results table (one per model, defense and threat
    model; the worst case over every attacker that ran there, whatever its knowledge, ranks).
    ``digests`` maps each model to the digest of the weights the table was measured on."""

    findings = (masking or {}).get("findings", [])
    keys = ["model", "defense", "norm", "eps", "targeting"]
    out = []
    for key, group in table.groupby(keys, sort=False):
        model, defense, norm, eps, targeting = key
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
            "threat": {"norm": str(norm), "eps": float(eps), "targeting": str(targeting), "knowledge": str(knowledge)},
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
            "masking_findings": sum(1 for f in findings if f.get("model") == model and f.get("defense") == defense),
            MODEL: (digests or {}).get(str(model)),
        }
        entry["threat_id"] = threat_id(entry["threat"])
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


def write_entries(folder: str | Path, entries: list[dict[str, Any]]) -> list[Path]:
    """Replace ``<folder>/entries`` with ``entries``."""

    entries_dir = Path(folder) / "entries"
    entries_dir.mkdir(parents=True, exist_ok=True)
    keep = {entry_name(e) for e in entries}
    for old in entries_dir.glob("*.json"):
        if old.stem not in keep:
            old.unlink()
    paths = []
    for e in entries:
        path = entries_dir / f"{entry_name(e)}.json"
        atomic_write_text(path, dumps(e))
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- RobustBench
def _pct(value: float | None) -> str | None:
    return None if value is None else f"{100 * value:.2f}"


def _standard_autoattack_labels(entry: dict[str, Any]) -> list[str]:
    """The row labels of the entry's config's ``autoattack`` attacks run as the reference's
    ``version: standard`` (not with fewer ``steps`` or ``queries``)."""
    labels = []
    for spec in (entry.get("config") or {}).get("attacks", []):
        given = (spec.get("params") or {}) if isinstance(spec, dict) else {}
        if isinstance(spec, dict) and spec.get("name") == "autoattack" and given.get("version", "standard") == "standard" \
                and given.get("steps") is None and given.get("queries") is None:
            labels.append(spec.get("label") or "autoattack")
    return labels


def to_robustbench(entry: dict[str, Any]) -> dict[str, Any]:
    """The entry in RobustBench's model-info form (``model_info/<dataset>/<Threat>/<name>.json``).

    RobustBench writes accuracies as percent strings and eps as a string. Our robust accuracy
    is the worst case over the suite's attacks, not AutoAttack, so ``autoattack_acc`` is only
    filled when the suite ran ``autoattack`` with ``version: standard`` (RobustBench's number:
    the suite's row, the per-example worst case over its components); otherwise the footnote
    carries our number.
    """
    attacks = entry.get("attacks", {})
    auto = [attacks[label] for label in _standard_autoattack_labels(entry) if label in attacks]
    footnote = None
    if not auto:
        footnote = (f"advbench worst case over {', '.join(sorted(attacks))}: "
                    f"{_pct(entry['robust_accuracy'])}% (not AutoAttack)")
    return {
        "link": None,
        "name": f"{entry['model']} ({entry['defense']})",
        "authors": None,
        "additional_data": False if entry.get("dataset") else None,
        "number_forward_passes": 1 if entry["defense"] == "none" else None,
        "dataset": (entry.get("dataset") or {}).get("name"),
        "venue": None,
        "architecture": entry.get("architecture"),
        "eps": f"{entry['threat']['eps']:g}",
        "clean_acc": _pct(entry["clean_accuracy"]),
        "reported": None,
        "autoattack_acc": _pct(min(auto)) if auto else None,
        "footnote": footnote,
    }


# ----------------------------------------------------------------------------- rendering
def _rows(entries: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    labels: list[str] = []
    for e in entries.values():
        labels += [a for a in e["attacks"] if a not in labels]
    ordered = sorted(entries.values(), key=lambda e: (-e["robust_accuracy"], -e["clean_accuracy"], entry_name(e)))
    header = ["#", "model", "defense", "threat", "clean %", "robust % (worst case)",
              *[f"{a} %" for a in labels], "n", "config", "date"]
    rows = []
    for i, e in enumerate(ordered, 1):
        per = [_pct(e["attacks"][a]) if a in e["attacks"] else "" for a in labels]
        rows.append([str(i), e["model"], e["defense"], threat_id(e["threat"]), _pct(e["clean_accuracy"]),
                     _pct(e["robust_accuracy"]), *per, str(e["n"]), e["config_hash"], str(e["date"])[:10]])
    return header, rows


INTRO = """\
Generated by `advbench leaderboard build` from `entries/*.json`; do not edit by hand.
One entry per (model, defense, threat model), measured by the fixed suites in `suite.yaml` (digits) and `suite-mnist.yaml`
on the zoo's shipped reference checkpoints (each entry records its model's weights digest).
Robust accuracy is the per-example worst case over the suite's attacks; rows are sorted by it.
`advbench leaderboard check` (run by `.ci/run`) reruns the suite and fails when any number
moves by more than {tol} (absolute) from its entry; `advbench leaderboard update` rewrites
the entries after an intentional change."""


def render_markdown(entries: dict[str, dict[str, Any]]) -> str:
    header, rows = _rows(entries)
    lines = ["# Leaderboard", "", INTRO.format(tol=DEFAULT_TOLERANCE), "",
             "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    if not rows:
        lines.append("\n(no entries yet: run `advbench leaderboard update`)")
    return "\n".join(lines) + "\n"


def render_html(entries: dict[str, dict[str, Any]]) -> str:
    header, rows = _rows(entries)
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "\n".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    intro = esc(INTRO.format(tol=DEFAULT_TOLERANCE)).replace("\n", " ")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head><meta charset=\"utf-8\"><title>advbench leaderboard</title>\n"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "th,td{border:1px solid #999;padding:.3em .6em;text-align:right}"
        "td:nth-child(2),td:nth-child(3),td:nth-child(4){text-align:left}</style></head>\n"
        f"<body>\n<h1>advbench leaderboard</h1>\n<p>{intro}</p>\n"
        f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>\n</body>\n</html>\n"
    )


def build(folder: str | Path) -> list[Path]:
    """Render ``README.md`` and ``index.html`` in ``folder`` from its entries."""

    entries = load_entries(folder)
    md, page = Path(folder) / "README.md", Path(folder) / "index.html"
    atomic_write_text(md, render_markdown(entries))
    atomic_write_text(page, render_html(entries))
    return [md, page]


# ----------------------------------------------------------------------------- the gate
def suite_files(folder: str | Path) -> list[Path]:
    """The suite configs of a leaderboard folder: ``suite.yaml`` and any ``suite-*.yaml`` (one per
    data set: a config evaluates one data set), in name order."""
    files = sorted(Path(folder).glob("suite*.yaml"))
    if not files:
        raise ConfigError(f"no suite config (suite.yaml or suite-*.yaml) in {str(folder)!r}")
    return files


def run_suite(folder: str | Path) -> tuple[list[dict[str, Any]], float]:
    """Evaluate every suite config of ``folder`` from scratch (in temporary folders); the entries and seconds."""
    entries: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for suite in suite_files(folder):
        config = load_config(suite)
        with tempfile.TemporaryDirectory(prefix="advbench-leaderboard-") as tmp:
            result = evaluate(config, tmp, progress=False, config_source=str(suite))
            run = json.loads((Path(tmp) / "run.json").read_text())
        entries += entries_from_table(result.table, config, result.masking, cards=run.get("model_cards", {}),
                                      digests=run.get("model_digests", {}))
    return entries, time.perf_counter() - t0


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
