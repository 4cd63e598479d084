"""The resumable parts of a curvature run: one ``.npz`` per batch of images, keyed by content.

A part holds what its batch's images gave (the per-image columns, the spectra the divergences
need, the detector's adversarial measures, the divergence trajectories of the first batch) and a
key: the hash of the settings the batch depends on, the content digests of the models and of the
batch's images, and advbench's version. A part whose key differs from the run's is never read
(it is recomputed and replaced), so a changed model, data set or setting is never served a
stale result. Parts are written atomically and read without pickle.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from advbench.files import atomic_write

#: bumped whenever what a part holds changes, so parts written by older code are recomputed
PART_FORMAT = 3

#: the kinds of content a part holds: a table (its columns) or spectra (their arrays)
TABLES = ("rows", "adversarial", "trajectory")
SPECTRA = ("clean", "approx", "adversarial", "trajectory")


def part_key(settings: dict[str, Any], digests: dict[str, str | None], batch_digest: str, version: str | None) -> str:
    blob = json.dumps({"settings": settings, "digests": digests, "batch": batch_digest, "advbench": version,
                       "format": PART_FORMAT},
                      sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def part_path(folder: Path, batch: int) -> Path:
    return folder / "parts" / f"batch-{batch:04d}.npz"


def write_part(path: Path, key: str, tables: dict[str, pd.DataFrame], spectra: dict[str, dict[str, np.ndarray]],
               info: dict[str, Any]) -> None:
    """Store one batch's results (see the module docstring)."""
    arrays: dict[str, np.ndarray] = {"key": np.array(key), "info": np.array(json.dumps(info, sort_keys=True))}
    for name, table in tables.items():
        arrays[f"{name}.columns"] = np.array(list(table.columns), dtype=str)
        for i, col in enumerate(table.columns):
            arrays[f"{name}.{i}"] = table[col].to_numpy()
    for name, sets in spectra.items():
        for k, v in sets.items():
            arrays[f"spectra.{name}.{k}"] = np.asarray(v)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def read_part(path: Path, key: str | None = None) -> dict[str, Any] | None:
    """A stored part as ``{"tables", "spectra", "info", "key"}``, or None when it is missing,
    unreadable or (with ``key``) was made by other settings or content."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            stored = str(z["key"])
            if key is not None and stored != key:
                return None
            tables, spectra = {}, {}
            for name in TABLES:
                if f"{name}.columns" in z:
                    cols = [str(c) for c in z[f"{name}.columns"]]
                    tables[name] = pd.DataFrame({c: z[f"{name}.{i}"] for i, c in enumerate(cols)})
            for name in SPECTRA:
                sets = {k.rsplit(".", 1)[1]: z[k] for k in z.files if k.startswith(f"spectra.{name}.")}
                if sets:
                    spectra[name] = sets
            info = json.loads(str(z["info"]))
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return None  # a damaged part is recomputed
    return {"tables": tables, "spectra": spectra, "info": info, "key": stored}
