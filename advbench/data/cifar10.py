"""CIFAR-10 (3x32x32, 10 classes): 50,000 train and 10,000 test images.

Sources, searched in this order below ``root`` (default :func:`advbench.data.paths.data_root`):

1. torchvision's pickled release, ``cifar-10-batches-py/`` (or ``cifar10/cifar-10-batches-py/``);
2. an extracted JPEG folder, ``cifar10/<split>/<class>/*.jpg`` or ``<split>/<class>/*.jpg``;
3. the JPEG tar, ``cifar10/cifar10-jpg.tar.gz`` or ``cifar10-jpg.tar.gz``, read in place.

Decoding the tar's JPEGs takes seconds (tens of them for the train split on a small machine), so
the decoded uint8 arrays are cached per split in ``cache_dir()/data/cifar10-jpg/`` under a name
holding the tar's size and mtime; a changed tar gets a fresh cache file. The JPEGs are
re-encoded from the original, so their pixels differ slightly from the pickled release. Images
are ordered by class, then by file name. The pickled batches are read by an unpickler that
accepts numpy arrays, lists, dicts, strings and numbers only, so a crafted folder cannot run code.
"""

from __future__ import annotations

import pickle
import tarfile
import warnings
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from advbench.data.base import ImageData
from advbench.data.folder import decode_image, is_image_name, scan_class_folders, stack_nchw
from advbench.data.paths import cache_dir, data_root, where_hint
from advbench.files import atomic_write
from advbench.errors import DataError
from advbench.registry import DATASETS

SPLITS = ("train", "test")
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
PICKLE_DIR = "cifar-10-batches-py"
PICKLE_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
TAR_NAME = "cifar10-jpg.tar.gz"
CACHE_VERSION = 1
_SHAPE = (3, 32, 32)


def candidates(root: Path, split: str) -> list[tuple[str, Path]]:
    """Every ``(kind, path)`` searched for ``split``, in order; kind is ``pickle``, ``folder`` or ``tar``."""
    return [
        ("pickle", root / PICKLE_DIR),
        ("pickle", root / "cifar10" / PICKLE_DIR),
        ("folder", root / "cifar10" / split),
        ("folder", root / split),
        ("tar", root / "cifar10" / TAR_NAME),
        ("tar", root / TAR_NAME),
    ]


def _present(kind: str, path: Path) -> bool:
    if kind == "tar":
        return path.is_file()
    if kind == "folder":  # a folder named test/ or train/ counts only if it has a CIFAR class folder
        return any((path / c).is_dir() for c in CLASSES)
    return path.is_dir()


# ---------------------------------------------------------------------- pickled release
def read_pickled(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 NCHW images and labels of ``split`` from torchvision's ``cifar-10-batches-py`` folder."""
    meta_path = folder / "batches.meta"
    if meta_path.is_file():
        names = _load_pickle(meta_path).get("label_names")
        if names is None or tuple(_text(n) for n in names) != CLASSES:
            raise DataError(f"{meta_path} lists classes {names!r}; expected CIFAR-10's {', '.join(CLASSES)}")
    xs, ys = [], []
    for name in PICKLE_FILES[split]:
        path = folder / name
        if not path.is_file():
            raise DataError(f"CIFAR-10 {split!r} batch {path} is missing; {folder} needs {', '.join(PICKLE_FILES[split])}")
        entry = _load_pickle(path)
        labels = entry.get("labels", entry.get("fine_labels"))
        data = entry.get("data")
        if data is None or labels is None:
            raise DataError(f"{path} has no 'data' and 'labels' entries (found: {', '.join(map(str, entry))})")
        data = np.asarray(data, dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != np.prod(_SHAPE) or len(labels) != data.shape[0]:
            raise DataError(
                f"{path}: 'data' has shape {data.shape} with {len(labels)} labels; expected (N, 3072) with N labels"
            )
        xs.append(data.reshape(-1, *_SHAPE))
        ys.append(np.asarray(labels, dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


#: the only globals a CIFAR-10 batch pickle needs: numpy's array reconstruction (protocols 2 to 5,
#: numpy 1 and 2 module names) and the bytes decoding of protocol 2; its dicts, lists, strings and
#: numbers need none
_BATCH_GLOBALS = {
    *((f"numpy.{core}.multiarray", "_reconstruct") for core in ("core", "_core")),
    *((f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles the arrays, lists and dicts of CIFAR-10's batches and nothing else: any other
    global (a function or class a crafted file names to run) is refused before it is loaded."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in _BATCH_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}: a CIFAR-10 batch holds only arrays, "
                                     f"lists, dicts, strings and numbers")


def _load_pickle(path: Path) -> dict[str, object]:
    try:
        with open(path, "rb") as f:
            obj = _BatchUnpickler(f, encoding="latin1").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, ImportError) as exc:
        raise DataError(f"cannot read CIFAR-10 pickle {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} holds a {type(obj).__name__}, not the dict of a CIFAR-10 batch")
    return {_text(k): v for k, v in obj.items()}


def _text(value: object) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


# ---------------------------------------------------------------------- JPEG folder and tar
def read_folder(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """uint8 NCHW images and labels from ``folder/<class>/*.jpg`` with the ten CIFAR-10 class folders."""
    _, samples = scan_class_folders(folder, CLASSES)
    images = [decode_image(f, "RGB") for f, _ in samples]
    x = stack_nchw(images, [f for f, _ in samples], hint=f"CIFAR-10 images must all be 32x32 ({folder})")
    return _checked(x, folder), np.array([label for _, label in samples], dtype=np.int64)


def read_tar(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 NCHW images and labels of ``split`` straight from a tar of ``[prefix/]<split>/<class>/<image>``."""
    index = {c: i for i, c in enumerate(CLASSES)}
    found: list[tuple[int, str, np.ndarray]] = []
    try:
        with tarfile.open(path, "r|*") as tar:  # streamed: one pass, nothing written to disk
            for member in tar:
                parts = PurePosixPath(member.name).parts
                if not member.isfile() or len(parts) < 3 or parts[-3] != split or parts[-2] not in index:
                    continue
                if not is_image_name(parts[-1]):
                    continue
                f = tar.extractfile(member)
                if f is None:
                    continue
                image = decode_image(f.read(), "RGB", name=f"{path}:{member.name}")
                found.append((index[parts[-2]], member.name, image))
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"cannot read tar {path}: {exc}") from None
    if not found:
        raise DataError(f"{path} holds no {split}/<class>/<image> files for the CIFAR-10 classes ({', '.join(CLASSES)})")
    found.sort(key=lambda item: (item[0], item[1]))
    x = stack_nchw([img for _, _, img in found], [f"{path}:{n}" for _, n, _ in found], hint="CIFAR-10 images must all be 32x32")
    return _checked(x, path), np.array([label for label, _, _ in found], dtype=np.int64)


def _checked(x: np.ndarray, where: Path) -> np.ndarray:
    if x.shape[1:] != _SHAPE:
        raise DataError(f"{where}: CIFAR-10 images must be 3x32x32, found {'x'.join(map(str, x.shape[1:]))}")
    return x


def tar_cache_path(tar: Path, split: str) -> Path:
    """The cache file for ``split`` of ``tar``, named by the tar's size and mtime (so a new tar misses)."""
    st = tar.stat()
    return cache_dir() / "data" / "cifar10-jpg" / f"{split}-{st.st_size}-{st.st_mtime_ns}-v{CACHE_VERSION}.npz"


def read_tar_cached(tar: Path, split: str) -> tuple[np.ndarray, np.ndarray, str]:
    """Like :func:`read_tar`, through the decoded-array cache; the third item is ``hit`` or ``miss``."""
    cached = tar_cache_path(tar, split)
    if cached.is_file():
        try:
            with np.load(cached, allow_pickle=False) as z:
                x, y = z["x"], z["y"]
            if x.dtype == np.uint8 and x.shape[1:] == _SHAPE and y.shape == x.shape[:1]:
                return x, y, "hit"
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
            pass  # unreadable or stale: decode again and overwrite it
    x, y = read_tar(tar, split)
    try:
        save_npz_atomic(cached, x=x, y=y)
    except OSError as exc:
        warnings.warn(f"advbench: could not write the CIFAR-10 cache {cached}: {exc}", RuntimeWarning, stacklevel=3)
    return x, y, "miss"


def save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    """Write an uncompressed .npz through a temporary file and ``os.replace``, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: np.savez(f, **arrays))


def _download(root: Path, split: str) -> None:
    try:
        from torchvision.datasets import CIFAR10

        CIFAR10(str(root), train=split == "train", download=True)
    except Exception as exc:  # noqa: BLE001 - network and archive errors come in many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"could not download CIFAR-10 into {root / PICKLE_DIR}: {first}") from None


@DATASETS.register("cifar10", description="CIFAR-10 (3x32x32) from torchvision pickles, a JPEG folder or the JPEG tar")
def load_cifar10(split: str = "test", root: str | None = None, download: bool = False) -> ImageData:
    """CIFAR-10, 3x32x32 in [0, 1]: ``train`` (50,000) or ``test`` (10,000), classes in the usual order.

    ``download=True`` fetches torchvision's pickled release into ``root/cifar-10-batches-py`` first.
    """
    if split not in SPLITS:
        raise DataError(f"cifar10 has splits {', '.join(repr(s) for s in SPLITS)}, not {split!r}")
    base = data_root(root)
    if download:
        _download(base, split)
    searched = candidates(base, split)
    for kind, path in searched:
        if not _present(kind, path):
            continue
        meta: dict[str, object] = {"source": str(path), "format": kind}
        if kind == "pickle":
            x, y = read_pickled(path, split)
        elif kind == "folder":
            x, y = read_folder(path)
        else:
            x, y, meta["cache"] = read_tar_cached(path, split)
        if y.size and (y.min() < 0 or y.max() >= len(CLASSES)):
            raise DataError(f"CIFAR-10 labels in {path} must lie in 0..9, found {int(y.min())}..{int(y.max())}")
        data = torch.from_numpy(x).float().div_(255.0)
        return ImageData(data, torch.from_numpy(y), CLASSES, "cifar10", split, meta)
    raise DataError(
        f"CIFAR-10 {split!r} not found: looked for {', '.join(str(p) for _, p in searched)}; "
        f"{where_hint()}, or use download=True"
    )
