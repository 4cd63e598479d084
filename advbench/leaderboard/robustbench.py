"""RobustBench compatibility both ways: entries as RobustBench model-info JSON, and RobustBench's
published model-info files read back to be shown beside advbench's numbers for the same model.

RobustBench keeps one file per model at ``model_info/<dataset>/<Threat>/<model id>.json``
(accuracies as percent strings, eps as a string). :func:`to_robustbench` writes that form;
:func:`export` writes every entry under ``<folder>/robustbench/export/``; :func:`load_published`
reads files a user dropped under ``<folder>/robustbench/published/`` (never downloaded) and
:func:`published_for` matches them to an entry by the model's RobustBench id (a ``robustbench:``
model spec in the entry's config) or, failing that, by the model's name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from advbench.errors import ConfigError
from advbench.files import atomic_write_text
from advbench.leaderboard.entries import entry_name

THREAT_NAMES = {"linf": "Linf", "l2": "L2", "l1": "L1"}  # RobustBench's folder names

def pct(value: float | None) -> str | None:
    """An accuracy fraction as RobustBench's percent string (two decimals)."""
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
    # the suite's row, and its adaptive views' rows (BPDA / EoT) where the model has them: on a
    # defended model the adaptive AutoAttack is the number that counts
    auto = [attacks[label + view] for label in _standard_autoattack_labels(entry)
            for view in ("", "+bpda", "+eot", "+bpda+eot") if label + view in attacks]
    notes = []
    if not auto:
        notes.append(f"advbench worst case over {', '.join(sorted(attacks))}: "
                     f"{pct(entry['robust_accuracy'])}% (not AutoAttack)")
    if entry.get("naive_flags"):
        notes.append(f"evaluated adaptively (BPDA / EoT); the naive attacks alone leave "
                     f"{pct(entry['naive_robust_accuracy'])}% and were flagged {', '.join(entry['naive_flags'])}")
    footnote = "; ".join(notes) or None
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
        "clean_acc": pct(entry["clean_accuracy"]),
        "reported": None,
        "autoattack_acc": pct(min(auto)) if auto else None,
        # RobustBench's "external": a stronger (adaptive) evaluation's number below AutoAttack's
        "external": pct(entry["robust_accuracy"]) if auto and entry["robust_accuracy"] < min(auto) else None,
        "footnote": footnote,
        "unreliable": bool(entry.get("flags")),
    }


def export(folder: str | Path, entries: dict[str, dict[str, Any]]) -> list[Path]:
    """Every entry as ``<folder>/robustbench/export/<dataset>/<Threat>/<entry>.json``."""
    paths = []
    for e in entries.values():
        dataset = (e.get("dataset") or {}).get("name") or "unknown"
        threat = THREAT_NAMES.get(e["threat"]["norm"], e["threat"]["norm"])
        path = Path(folder) / "robustbench" / "export" / str(dataset) / threat / f"{entry_name(e)}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(to_robustbench(e), indent=1) + "\n")
        paths.append(path)
    return paths


def load_published(folder: str | Path) -> dict[str, dict[str, Any]]:
    """RobustBench model-info files under ``<folder>/robustbench/published/`` by model id (file
    stem), each with its ``threat`` (the folder above it) and ``dataset``; a malformed file is a
    one-line ConfigError naming it."""
    root = Path(folder) / "robustbench" / "published"
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(root.rglob("*.json")) if root.is_dir() else ():
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: not a readable RobustBench model-info file ({exc})") from None
        if not isinstance(info, dict) or "clean_acc" not in info:
            raise ConfigError(f"{path}: a RobustBench model-info file needs at least clean_acc")
        for field in ("clean_acc", "autoattack_acc", "external", "reported"):
            value = info.get(field)
            if value not in (None, "") and not _is_percent(value):
                raise ConfigError(f"{path}: {field} must be a percentage (a number or numeric string), got {value!r}")
        out[path.stem] = {**info, "threat": path.parent.name, "dataset": info.get("dataset") or path.parent.parent.name,
                          "file": str(path.relative_to(Path(folder)))}
    return out


def _is_percent(value: Any) -> bool:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return False
    return 0 <= v <= 100


def robustbench_id(entry: dict[str, Any]) -> str | None:
    """The model's RobustBench id when the entry's config loaded it with a ``robustbench:`` spec."""
    for spec in (entry.get("config") or {}).get("models", []):
        if isinstance(spec, dict) and spec.get("name") == entry["model"] and spec.get("robustbench"):
            return str(spec["robustbench"])
    return None


def published_for(entry: dict[str, Any], published: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """RobustBench's published numbers for the entry's model and threat, if a file is at hand."""
    threat = THREAT_NAMES.get(entry["threat"]["norm"], entry["threat"]["norm"])
    for key in (robustbench_id(entry), entry["model"]):
        info = published.get(key) if key else None
        if info and info["threat"] == threat and (info.get("eps") is None or _same_eps(info["eps"], entry["threat"]["eps"])):
            return info
    return None


def _same_eps(published: Any, eps: float) -> bool:
    try:
        if isinstance(published, str) and "/" in published:
            num, den = published.split("/")
            value = float(num) / float(den)
        else:
            value = float(published)
    except (TypeError, ValueError, ZeroDivisionError):
        return False
    return abs(value - eps) <= 1e-6 * max(1.0, abs(eps))


