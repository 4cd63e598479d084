"""A labelled image set saved with ``numpy.savez``: the simplest way to benchmark your own data.

Arrays: ``x`` (images) and ``y`` (integer labels) are required, ``classes`` (names) optional.
``x`` is one of

* uint8 ``(N, H, W, C)`` with C 1 or 3, the usual image layout, scaled by 1/255 to NCHW;
* uint8 ``(N, H, W)``, grey images, scaled by 1/255 to ``(N, 1, H, W)``;
* floating ``(N, C, H, W)`` with C 1 or 3, already in [0, 1] (cast to float32).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch
from numpy.lib.npyio import NpzFile

from advbench.data.base import ImageData
from advbench.errors import DataError
from advbench.registry import DATASETS

ALLOWED_X = "uint8 (N,H,W,C) or (N,H,W), or float (N,C,H,W) in [0, 1], with C 1 or 3"


def _images(x: np.ndarray, path: Path) -> torch.Tensor:
    found = f"{path}: x is {x.dtype} {tuple(x.shape)}"
    if x.dtype == np.uint8 and x.ndim == 3:
        x = x[:, None]
    elif x.dtype == np.uint8 and x.ndim == 4 and x.shape[3] in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    elif x.dtype == np.uint8 and x.ndim == 4:
        raise DataError(f"{found}, its last axis is not 1 or 3 channels; allowed: {ALLOWED_X}")
    elif np.issubdtype(x.dtype, np.floating) and x.ndim == 4 and x.shape[1] in (1, 3):
        if not np.isfinite(x).all():
            raise DataError(f"{found} holding non-finite values (nan or inf); allowed: {ALLOWED_X}")
        if x.size and (x.min() < 0 or x.max() > 1):
            raise DataError(f"{found} with values in [{x.min():.4g}, {x.max():.4g}]; allowed: {ALLOWED_X}")
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    else:
        raise DataError(f"{found}; allowed: {ALLOWED_X}")
    return torch.from_numpy(np.ascontiguousarray(x)).float().div_(255.0)


def _labels(y: np.ndarray, n: int, path: Path) -> torch.Tensor:
    if not np.issubdtype(y.dtype, np.integer) or y.shape != (n,):
        raise DataError(f"{path}: y is {y.dtype} {tuple(y.shape)}; allowed: integer labels of shape ({n},), one per image")
    if y.size and y.min() < 0:
        raise DataError(f"{path}: y holds the negative label {int(y.min())}; allowed: labels 0..K-1")
    return torch.from_numpy(y.astype(np.int64))


def _array(z: NpzFile, key: str, path: Path) -> np.ndarray:
    try:
        return z[key]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:  # object arrays need pickle: refused
        raise DataError(f"{path}: cannot read array {key!r}: {exc}") from None


def _classes(z: NpzFile, y: torch.Tensor, path: Path) -> tuple[str, ...]:
    needed = int(y.max()) + 1 if y.numel() else 1
    if "classes" not in z.files:
        return tuple(str(i) for i in range(needed))
    names = _array(z, "classes", path)
    if names.ndim != 1 or names.dtype.kind not in "US":
        raise DataError(f"{path}: classes is {names.dtype} {tuple(names.shape)}; allowed: a 1-D array of strings")
    if len(names) < needed:
        raise DataError(f"{path}: {len(names)} class names but y has label {needed - 1}; allowed: labels 0..{len(names) - 1}")
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names.tolist())


@DATASETS.register("npz", description="Your own images from a .npz file with arrays x, y (and optional classes)")
def load_npz(path: str, split: str = "test") -> ImageData:
    """Images and labels from a ``.npz`` (arrays ``x``, ``y``, optional ``classes``); see the module doc for layouts.

    ``split`` only labels the result.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"npz file {file} not found")
    try:
        loaded = np.load(file, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read {file} as a .npz file: {exc}") from None
    if not isinstance(loaded, NpzFile):
        raise DataError(f"{file} holds a single array, not a .npz of arrays; required: x and y, optional: classes")
    with loaded as z:
        missing = [k for k in ("x", "y") if k not in z.files]
        if missing:
            raise DataError(
                f"{file} lacks array(s) {', '.join(missing)} (found: {', '.join(z.files) or 'none'}); "
                f"required: x and y, optional: classes"
            )
        x = _images(_array(z, "x", file), file)
        y = _labels(_array(z, "y", file), x.shape[0], file)
        classes = _classes(z, y, file)
    if x.shape[0] == 0:
        raise DataError(f"{file}: x holds no images; allowed: {ALLOWED_X} with N >= 1")
    return ImageData(x, y, classes, file.stem, split, {"source": str(file), "format": "npz"})
