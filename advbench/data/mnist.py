"""MNIST handwritten digits (1x28x28, 10 classes) read from the official IDX files.

The files (``t10k-images-idx3-ubyte[.gz]``, ``t10k-labels-idx1-ubyte[.gz]`` and the ``train-``
pair) are searched in ``root/``, ``root/mnist/`` and ``root/MNIST/raw/`` (torchvision's layout),
with ``root`` defaulting to :func:`advbench.data.paths.data_root`. Offline machines often hold
only the test set, so two more splits cut it in a fixed way: ``test-train`` (8,000 images) and
``test-eval`` (the other 2,000). The cut is ``numpy.random.RandomState(0).permutation(N)``
(a stream NumPy keeps frozen): its first 80% is ``test-train``, the rest ``test-eval``, each
put back in file order. It is not stratified.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from advbench.data.base import ImageData
from advbench.data.paths import data_root, where_hint
from advbench.errors import DataError
from advbench.registry import DATASETS

SPLITS = ("train", "test", "test-train", "test-eval")
SPLIT_SEED = 0
TEST_TRAIN_FRACTION = 0.8
CLASSES = tuple(str(i) for i in range(10))
_UBYTE = 0x08


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes (gzipped if it ends in .gz) as a uint8 array of ``ndim`` dimensions."""
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from None
    magic = data[:4]
    if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] != _UBYTE or magic[3] != ndim:
        raise DataError(
            f"{path} is not an IDX file of unsigned bytes with {ndim} dimensions: "
            f"magic number 0x{magic.hex() or 'empty'}, expected 0x000008{ndim:02x}"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path} is truncated: {len(data)} bytes, shorter than its {header}-byte IDX header")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = math.prod(dims)
    if len(data) - header != expected:
        raise DataError(
            f"{path}: the IDX header gives shape {dims} ({expected} bytes) but the file holds {len(data) - header} data bytes"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def search_dirs(root: Path) -> list[Path]:
    """The folders searched for the IDX files, in order."""
    return [root, root / "mnist", root / "MNIST" / "raw"]


def find_idx_pair(root: Path, prefix: str) -> tuple[Path, Path] | None:
    """``(images, labels)`` files of ``prefix`` (``train`` or ``t10k``) from the first folder holding both."""
    for folder in search_dirs(root):
        images = _first_file(folder, f"{prefix}-images-idx3-ubyte")
        labels = _first_file(folder, f"{prefix}-labels-idx1-ubyte")
        if images is not None and labels is not None:
            return images, labels
    return None


def _first_file(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):  # torchvision keeps both; the plain file reads faster
        if (folder / name).is_file():
            return folder / name
    return None


def split_indices(n: int, part: str) -> np.ndarray:
    """Sorted indices of ``test-train`` or ``test-eval`` within an ``n``-image test set (seed-0 permutation)."""
    perm = np.random.RandomState(SPLIT_SEED).permutation(n)
    cut = int(round(n * TEST_TRAIN_FRACTION))
    return np.sort(perm[:cut] if part == "test-train" else perm[cut:])


def _download(root: Path) -> None:
    try:
        from torchvision.datasets import MNIST

        MNIST(str(root), train=False, download=True)
    except Exception as exc:  # noqa: BLE001 - network and archive errors come in many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"could not download MNIST into {root / 'MNIST' / 'raw'}: {first}") from None


@DATASETS.register("mnist", description="MNIST digits from IDX files (1x28x28; splits train, test, test-train, test-eval)")
def load_mnist(split: str = "test", root: str | None = None, download: bool = False) -> ImageData:
    """MNIST, 1x28x28 in [0, 1]: ``train`` (60,000), ``test`` (10,000), ``test-train`` / ``test-eval`` (8,000 / 2,000 of test).

    ``download=True`` fetches the files with torchvision into ``root/MNIST/raw`` first.
    """
    if split not in SPLITS:
        raise DataError(f"mnist has splits {', '.join(repr(s) for s in SPLITS)}, not {split!r}")
    base = data_root(root)
    if download:
        _download(base)
    prefix = "train" if split == "train" else "t10k"
    found = find_idx_pair(base, prefix)
    if found is None:
        note = " (offline copies often hold only the test set: try split='test-train')" if split == "train" else ""
        raise DataError(
            f"MNIST {split!r} files not found: no {prefix}-images-idx3-ubyte[.gz] with {prefix}-labels-idx1-ubyte[.gz] "
            f"in {', '.join(str(d) for d in search_dirs(base))}; {where_hint()}, or use download=True{note}"
        )
    images_path, labels_path = found
    images = read_idx(images_path, 3)
    labels = read_idx(labels_path, 1)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"MNIST: {images_path} holds {images.shape[0]} images but {labels_path} {labels.shape[0]} labels")
    if labels.size and labels.max() > 9:
        raise DataError(f"MNIST: {labels_path} has label {int(labels.max())}; allowed: 0..9")
    meta: dict[str, object] = {"source": str(images_path.parent), "format": "idx"}
    if split in ("test-train", "test-eval"):
        idx = split_indices(len(labels), split)
        images, labels = images[idx], labels[idx]
        meta.update(split_of="test", split_seed=SPLIT_SEED, split_fraction=TEST_TRAIN_FRACTION)
    pixels = images.astype(np.float32)  # a writable copy: the IDX arrays are read-only views
    pixels /= 255.0
    x = torch.from_numpy(pixels).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return ImageData(x, y, CLASSES, "mnist", split, meta)
