"""Data loaders: real MNIST and CIFAR-10 from the shared folder, fake on-disk layouts, npz and image folders."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from advbench.data import ImageData
from advbench.data import cifar10 as cifar_mod
from advbench.data.cifar10 import CLASSES as CIFAR_CLASSES
from advbench.data.cifar10 import load_cifar10
from advbench.data.folder import load_image_folder
from advbench.data.mnist import load_mnist, split_indices
from advbench.data.npz import load_npz
from advbench.data.paths import cache_dir, data_root
from advbench.errors import DataError
from advbench.registry import DATASETS


def assert_one_line(exc: pytest.ExceptionInfo[DataError], *parts: str) -> None:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    for part in parts:
        assert part in msg, f"{part!r} not in {msg!r}"


def assert_images(data: ImageData, n: int, shape: tuple[int, int, int]) -> None:
    assert isinstance(data, ImageData)
    assert data.x.shape == (n, *shape) and data.x.dtype == torch.float32
    assert data.y.shape == (n,) and data.y.dtype == torch.int64
    assert 0.0 <= float(data.x.min()) and float(data.x.max()) <= 1.0


# ---------------------------------------------------------------------- registry and paths
def test_registry_lists_every_loader() -> None:
    import advbench.data  # noqa: F401

    assert {"digits", "mnist", "cifar10", "imagefolder", "npz"} <= set(DATASETS.list())


def test_data_root_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADVBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ADVBENCH_DATA", raising=False)
    assert data_root() == tmp_path / "cache" / "data"
    monkeypatch.setenv("ADVBENCH_DATA", str(tmp_path / "env"))
    assert data_root() == tmp_path / "env"
    assert data_root(tmp_path / "explicit") == tmp_path / "explicit"
    assert data_root(str(tmp_path)) == tmp_path


def test_cache_dir_env_and_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADVBENCH_CACHE", str(tmp_path / "a" / "b"))
    # resolving the cache folder creates nothing: a run that fails early leaves no folder behind
    assert cache_dir() == tmp_path / "a" / "b" and not (tmp_path / "a").exists()
    monkeypatch.delenv("ADVBENCH_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "advbench" and not (tmp_path / "xdg").exists()


# ---------------------------------------------------------------------- MNIST, real files
@pytest.fixture(scope="session")
def mnist_test(shared_data: str) -> ImageData:
    return load_mnist("test", root=os.path.join(shared_data, "mnist"))


def test_mnist_real_test_split(mnist_test: ImageData) -> None:
    assert_images(mnist_test, 10_000, (1, 28, 28))
    assert mnist_test.classes == tuple(str(i) for i in range(10))
    assert float(mnist_test.x.max()) == 1.0 and float(mnist_test.x.min()) == 0.0
    counts = torch.bincount(mnist_test.y, minlength=10)
    assert counts.sum() == 10_000 and int(counts.min()) > 850 and int(counts.max()) < 1200
    assert counts.tolist()[:2] == [980, 1135]  # the official test set's first two class counts
    assert 0.1 < float(mnist_test.x.mean()) < 0.15  # mostly black background


def test_mnist_root_parent_env_and_folder_agree(
    shared_data: str, mnist_test: ImageData, monkeypatch: pytest.MonkeyPatch
) -> None:
    from_parent = load_mnist("test", root=shared_data)
    assert torch.equal(from_parent.x, mnist_test.x) and torch.equal(from_parent.y, mnist_test.y)
    monkeypatch.setenv("ADVBENCH_DATA", shared_data)
    from_env = load_mnist()
    assert torch.equal(from_env.y, mnist_test.y)
    assert DATASETS.create("mnist", split="test", root=shared_data).meta["source"] == from_parent.meta["source"]


def test_mnist_test_train_and_eval_partition_test(shared_data: str, mnist_test: ImageData) -> None:
    train = load_mnist("test-train", root=shared_data)
    evaluation = load_mnist("test-eval", root=shared_data)
    assert len(train) == 8_000 and len(evaluation) == 2_000
    idx_train, idx_eval = split_indices(10_000, "test-train"), split_indices(10_000, "test-eval")
    assert not set(idx_train.tolist()) & set(idx_eval.tolist())
    assert sorted(idx_train.tolist() + idx_eval.tolist()) == list(range(10_000))
    assert torch.equal(train.x, mnist_test.x[torch.from_numpy(idx_train)])
    assert torch.equal(evaluation.y, mnist_test.y[torch.from_numpy(idx_eval)])
    # the documented cut: RandomState(0).permutation(10000)[8000:], sorted
    assert idx_eval[:5].tolist() == np.sort(np.random.RandomState(0).permutation(10_000)[8000:])[:5].tolist()
    assert train.split == "test-train" and evaluation.meta["split_seed"] == 0
    assert torch.bincount(evaluation.y, minlength=10).min() > 150  # every digit present


def test_mnist_missing_train_and_bad_split(shared_data: str, tmp_path: Path) -> None:
    with pytest.raises(DataError) as exc:
        load_mnist("train", root=shared_data)
    assert_one_line(exc, "train-images-idx3-ubyte", str(Path(shared_data) / "MNIST" / "raw"), "ADVBENCH_DATA", "test-train")
    with pytest.raises(DataError) as exc:
        load_mnist("test", root=tmp_path)
    assert_one_line(exc, "t10k-images-idx3-ubyte", str(tmp_path), "download=True")
    with pytest.raises(DataError) as exc:
        load_mnist("validation", root=shared_data)
    assert_one_line(exc, "'test-eval'", "'validation'")


# ---------------------------------------------------------------------- MNIST, fake torchvision layout
def idx_bytes(array: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()


def write_fake_mnist(folder: Path, n_train: int = 12, n_test: int = 6, gz: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        arrays[f"{prefix}-images-idx3-ubyte"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{prefix}-labels-idx1-ubyte"] = rng.integers(0, 10, n, dtype=np.uint8)
    for name, array in arrays.items():
        data = idx_bytes(array)
        if gz:
            (folder / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return arrays


def test_mnist_torchvision_layout_matches_torchvision(tmp_path: Path) -> None:
    from torchvision.datasets import MNIST

    arrays = write_fake_mnist(tmp_path / "MNIST" / "raw")
    ours = load_mnist("train", root=str(tmp_path))
    assert_images(ours, 12, (1, 28, 28))
    theirs = MNIST(str(tmp_path), train=True, download=False)
    assert torch.equal((ours.x[:, 0] * 255).round().to(torch.uint8), theirs.data)
    assert torch.equal(ours.y, theirs.targets)
    test = load_mnist("test", root=str(tmp_path))
    assert torch.equal(test.y, torch.from_numpy(arrays["t10k-labels-idx1-ubyte"].astype(np.int64)))
    assert len(load_mnist("test-train", root=str(tmp_path))) + len(load_mnist("test-eval", root=str(tmp_path))) == 6


def test_mnist_gzipped_in_root(tmp_path: Path) -> None:
    arrays = write_fake_mnist(tmp_path, gz=True)
    data = load_mnist("test", root=str(tmp_path))
    assert torch.equal((data.x[:, 0] * 255).round().to(torch.uint8), torch.from_numpy(arrays["t10k-images-idx3-ubyte"]))


@pytest.mark.parametrize(
    "corrupt, expected",
    [
        (lambda b: b"\x00\x00\x0d\x03" + b[4:], "magic number 0x00000d03"),  # float, not ubyte
        (lambda b: b[:-5], "header gives shape"),
        (lambda b: b[:10], "truncated"),
        (lambda b: b"", "magic number 0xempty"),
    ],
)
def test_mnist_malformed_idx(tmp_path: Path, corrupt: Callable[[bytes], bytes], expected: str) -> None:
    write_fake_mnist(tmp_path)
    images = tmp_path / "t10k-images-idx3-ubyte"
    images.write_bytes(corrupt(images.read_bytes()))
    with pytest.raises(DataError) as exc:
        load_mnist("test", root=str(tmp_path))
    assert_one_line(exc, str(images), expected)


def test_mnist_label_count_mismatch_and_bad_gzip(tmp_path: Path) -> None:
    write_fake_mnist(tmp_path)
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    labels.write_bytes(idx_bytes(np.zeros(5, np.uint8)))
    with pytest.raises(DataError) as exc:
        load_mnist("test", root=str(tmp_path))
    assert_one_line(exc, "6 images", "5 labels")
    labels.unlink()
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError) as exc:
        load_mnist("test", root=str(tmp_path))
    assert_one_line(exc, "cannot read IDX file")


# ---------------------------------------------------------------------- CIFAR-10, real tar (one decode per session)
@pytest.fixture(scope="session")
def cifar_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("advbench-cache")


@pytest.fixture(scope="session")
def cifar_test(shared_data: str, cifar_cache: Path) -> tuple[ImageData, float]:
    """The real CIFAR-10 test split decoded from the shared tar into a fresh cache, and the seconds it took."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADVBENCH_CACHE", str(cifar_cache))
        start = time.perf_counter()
        data = load_cifar10("test", root=shared_data)
        return data, time.perf_counter() - start


def test_cifar10_test_split_from_tar(cifar_test: tuple[ImageData, float]) -> None:
    data, _ = cifar_test
    assert_images(data, 10_000, (3, 32, 32))
    assert data.classes == CIFAR_CLASSES
    assert data.classes[0] == "airplane" and data.classes[-1] == "truck"
    assert torch.bincount(data.y, minlength=10).tolist() == [1_000] * 10
    assert torch.equal(data.y, torch.arange(10).repeat_interleave(1_000))  # sorted by class
    assert data.meta["format"] == "tar" and data.meta["cache"] == "miss"
    assert 0.4 < float(data.x.mean()) < 0.55


def test_cifar10_second_load_hits_cache(
    shared_data: str, cifar_test: tuple[ImageData, float], cifar_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, first_seconds = cifar_test
    monkeypatch.setenv("ADVBENCH_CACHE", str(cifar_cache))
    start = time.perf_counter()
    again = load_cifar10("test", root=os.path.join(shared_data, "cifar10"))  # the tar's own folder works too
    seconds = time.perf_counter() - start
    assert again.meta["cache"] == "hit"
    assert torch.equal(again.x, first.x) and torch.equal(again.y, first.y)
    assert seconds < first_seconds / 4, (seconds, first_seconds)
    tar = Path(shared_data) / "cifar10" / "cifar10-jpg.tar.gz"
    (cached,) = (cifar_cache / "data" / "cifar10-jpg").glob("test-*.npz")
    assert cached.name.startswith(f"test-{tar.stat().st_size}-{tar.stat().st_mtime_ns}-")


# ---------------------------------------------------------------------- CIFAR-10, fake layouts
def fake_jpegs(split: str, per_class: int) -> dict[str, bytes]:
    """``{"<split>/<class>/<name>.jpg": bytes}`` of flat-coloured 32x32 JPEGs, a different colour per class."""
    out = {}
    for label, name in enumerate(CIFAR_CLASSES):
        for i in range(per_class):
            buf = io.BytesIO()
            Image.new("RGB", (32, 32), (label * 25, 100 + i * 40, 200 - label * 10)).save(buf, "JPEG", quality=95)
            out[f"{split}/{name}/{per_class - i:04d}.jpg"] = buf.getvalue()
    return out


def write_tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_cifar10_fake_tar_cache_miss_hit_and_invalidation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("ADVBENCH_CACHE", str(cache))
    files = {**fake_jpegs("train", 2), **fake_jpegs("test", 1), "README.txt": b"not an image"}
    tar = write_tar(tmp_path / "cifar10-jpg.tar.gz", {f"cifar10/{k}": v for k, v in files.items()})
    first = load_cifar10("train", root=str(tmp_path))
    assert_images(first, 20, (3, 32, 32))
    assert first.y.tolist() == [c for c in range(10) for _ in range(2)]
    # within a class, files come in name order: 0001.jpg was written with the greener colour
    assert float(first.x[0, 1].mean()) > float(first.x[1, 1].mean())
    assert first.meta["cache"] == "miss"
    assert load_cifar10("train", root=str(tmp_path)).meta["cache"] == "hit"
    assert len(load_cifar10("test", root=str(tmp_path))) == 10
    folder = cache / "data" / "cifar10-jpg"
    assert not list(folder.glob("*.tmp")) and len(list(folder.glob("*.npz"))) == 2
    os.utime(tar, ns=(tar.stat().st_atime_ns, tar.stat().st_mtime_ns + 1_000_000_000))
    assert load_cifar10("train", root=str(tmp_path)).meta["cache"] == "miss"  # a touched tar is decoded again
    cached = cifar_mod.tar_cache_path(tar, "train")
    cached.write_bytes(b"half a file")
    rebuilt = load_cifar10("train", root=str(tmp_path))
    assert rebuilt.meta["cache"] == "miss" and torch.equal(rebuilt.x, first.x)
    assert load_cifar10("train", root=str(tmp_path)).meta["cache"] == "hit"


def test_cifar10_extracted_folder_matches_tar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADVBENCH_CACHE", str(tmp_path / "cache"))
    files = fake_jpegs("test", 2)
    (tmp_path / "tar").mkdir()
    write_tar(tmp_path / "tar" / "cifar10-jpg.tar.gz", files)
    for name, data in files.items():
        (tmp_path / "cifar10" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "cifar10" / name).write_bytes(data)
    from_folder = load_cifar10("test", root=str(tmp_path))
    from_tar = load_cifar10("test", root=str(tmp_path / "tar"))
    assert from_folder.meta["format"] == "folder" and from_tar.meta["format"] == "tar"
    assert torch.equal(from_folder.x, from_tar.x) and torch.equal(from_folder.y, from_tar.y)
    (tmp_path / "cifar10" / "test" / "frog" / "0001.jpg").unlink()
    (tmp_path / "cifar10" / "test" / "frog" / "0002.jpg").unlink()
    with pytest.raises(DataError) as exc:
        load_cifar10("test", root=str(tmp_path))
    assert_one_line(exc, "frog", "holds no images")


def write_fake_pickles(root: Path, per_batch: int = 3) -> dict[str, np.ndarray]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    xs, ys = {"train": [], "test": []}, {"train": [], "test": []}
    for name, split in [(f"data_batch_{i}", "train") for i in range(1, 6)] + [("test_batch", "test")]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        entry = {"batch_label": name, "labels": labels, "data": data, "filenames": [f"{i}.png" for i in range(per_batch)]}
        (folder / name).write_bytes(pickle.dumps(entry))
        xs[split].append(data)
        ys[split].extend(labels)
    meta = {"num_cases_per_batch": per_batch, "label_names": list(CIFAR_CLASSES), "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return {s: np.concatenate(xs[s]).reshape(-1, 3, 32, 32) for s in xs} | {f"{s}-y": np.array(ys[s]) for s in ys}


def test_cifar10_pickled_layout_matches_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.cifar as tv_cifar

    arrays = write_fake_pickles(tmp_path)
    write_tar(tmp_path / "cifar10-jpg.tar.gz", fake_jpegs("test", 1))  # present, but pickles come first
    train = load_cifar10("train", root=str(tmp_path))
    test = load_cifar10("test", root=str(tmp_path))
    assert_images(train, 15, (3, 32, 32))
    assert_images(test, 3, (3, 32, 32))
    assert test.meta["format"] == "pickle" and test.classes == CIFAR_CLASSES
    assert torch.equal((train.x * 255).round().to(torch.uint8), torch.from_numpy(arrays["train"]))
    assert train.y.tolist() == arrays["train-y"].tolist()
    # torchvision reads the same files the same way (its md5 checks patched out for the fakes)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)
    theirs = tv_cifar.CIFAR10(str(tmp_path), train=False, download=False)
    assert torch.equal((test.x * 255).round().to(torch.uint8).permute(0, 2, 3, 1), torch.from_numpy(theirs.data))
    assert test.y.tolist() == theirs.targets and tuple(theirs.classes) == test.classes


def test_cifar10_pickled_missing_batch_and_wrong_meta(tmp_path: Path) -> None:
    write_fake_pickles(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(DataError) as exc:
        load_cifar10("train", root=str(tmp_path))
    assert_one_line(exc, "data_batch_4", "is missing")
    (tmp_path / "cifar-10-batches-py" / "batches.meta").write_bytes(pickle.dumps({"label_names": ["a", "b"]}))
    with pytest.raises(DataError) as exc:
        load_cifar10("test", root=str(tmp_path))
    assert_one_line(exc, "batches.meta", "airplane")


def test_cifar10_missing_everywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADVBENCH_DATA", str(tmp_path))
    (tmp_path / "test").mkdir()  # an unrelated test/ folder without class folders is not a source
    with pytest.raises(DataError) as exc:
        load_cifar10()
    assert_one_line(
        exc, "CIFAR-10 'test' not found", str(tmp_path / "cifar-10-batches-py"), str(tmp_path / "cifar10-jpg.tar.gz"),
        "ADVBENCH_DATA", "download=True",
    )
    with pytest.raises(DataError) as exc:
        load_cifar10("valid", root=str(tmp_path))
    assert_one_line(exc, "'train', 'test'")


# ---------------------------------------------------------------------- image folder
def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_image_folder_reads_classes_in_order(tmp_path: Path) -> None:
    from torchvision.datasets import ImageFolder

    rng = np.random.default_rng(2)
    pictures = {f"{c}/{i}.png": rng.integers(0, 256, (6, 5, 3), dtype=np.uint8) for c in ("dog", "cat") for i in (2, 1)}
    for name, array in pictures.items():
        write_png(tmp_path / name, array)
    reference = ImageFolder(str(tmp_path))  # torchvision lists the same files in the same order
    assert [Path(p).relative_to(tmp_path).as_posix() for p, _ in reference.samples] == sorted(pictures)
    (tmp_path / ".ipynb_checkpoints").mkdir()  # hidden folders are skipped (torchvision would fail here)
    (tmp_path / "cat" / "notes.txt").write_text("ignored")
    data = load_image_folder(str(tmp_path))
    assert_images(data, 4, (3, 6, 5))
    assert data.classes == ("cat", "dog") and data.y.tolist() == [0, 0, 1, 1]
    expected = torch.from_numpy(np.stack([pictures[n] for n in ("cat/1.png", "cat/2.png", "dog/1.png", "dog/2.png")]))
    assert torch.equal((data.x * 255).round().to(torch.uint8), expected.permute(0, 3, 1, 2))
    grey = load_image_folder(str(tmp_path), grayscale=True)
    assert_images(grey, 4, (1, 6, 5))
    made = DATASETS.create("imagefolder", path=str(tmp_path), size=3, split="test")
    assert_images(made, 4, (3, 3, 3))


def test_image_folder_errors(tmp_path: Path) -> None:
    write_png(tmp_path / "a" / "x.png", np.zeros((8, 8, 3), np.uint8))
    write_png(tmp_path / "b" / "y.jpg", np.zeros((9, 8, 3), np.uint8))
    with pytest.raises(DataError) as exc:
        load_image_folder(str(tmp_path))
    assert_one_line(exc, "differ in size", "8x9", "size=")
    assert_images(load_image_folder(str(tmp_path), size=8), 2, (3, 8, 8))
    (tmp_path / "c").mkdir()
    with pytest.raises(DataError) as exc:
        load_image_folder(str(tmp_path), size=8)
    assert_one_line(exc, str(tmp_path / "c"), "holds no images", ".png")
    with pytest.raises(DataError) as exc:
        load_image_folder(str(tmp_path / "nowhere"))
    assert_one_line(exc, str(tmp_path / "nowhere"), "does not exist")
    with pytest.raises(DataError) as exc:
        load_image_folder(str(tmp_path / "a"))
    assert_one_line(exc, "no class folders")
    with pytest.raises(DataError) as exc:
        load_image_folder(str(tmp_path), size=0)
    assert_one_line(exc, "imagefolder size must be a whole number >= 1", "None")
    (tmp_path / "c" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError) as exc:
        load_image_folder(str(tmp_path), size=8)
    assert_one_line(exc, "cannot read image", "broken.png")


# ---------------------------------------------------------------------- npz
def save_npz(path: Path, **arrays: object) -> str:
    np.savez(path, **arrays)
    return str(path)


def test_npz_uint8_nhwc_and_grey(tmp_path: Path) -> None:
    x = np.random.default_rng(3).integers(0, 256, (4, 5, 6, 3), dtype=np.uint8)
    data = load_npz(save_npz(tmp_path / "rgb.npz", x=x, y=np.array([0, 2, 1, 2])))
    assert_images(data, 4, (3, 5, 6))
    assert torch.allclose(data.x, torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255)
    assert data.classes == ("0", "1", "2") and data.name == "rgb" and data.y.dtype == torch.int64
    grey = load_npz(save_npz(tmp_path / "grey.npz", x=x[..., 0], y=np.zeros(4, np.int32), classes=np.array(["a", "b"])))
    assert_images(grey, 4, (1, 5, 6))
    assert grey.classes == ("a", "b")
    assert DATASETS.create("npz", path=str(tmp_path / "grey.npz"), split="test").num_classes == 2


def test_npz_float_nchw(tmp_path: Path) -> None:
    x = np.random.default_rng(4).random((3, 1, 4, 4))  # float64
    data = load_npz(save_npz(tmp_path / "f.npz", x=x, y=np.array([1, 1, 0], np.int64)))
    assert_images(data, 3, (1, 4, 4))
    assert torch.equal(data.x, torch.from_numpy(x.astype(np.float32)))


GOOD_Y = np.zeros(2, np.int64)


@pytest.mark.parametrize(
    "arrays, expected",
    [
        ({"x": np.full((2, 3, 4, 4), 1.5, np.float32), "y": GOOD_Y}, "values in [1.5, 1.5]"),
        ({"x": np.full((2, 3, 4, 4), np.nan, np.float32), "y": GOOD_Y}, "non-finite"),
        ({"x": np.zeros((2, 4, 4, 3), np.float32), "y": GOOD_Y}, "float32 (2, 4, 4, 3)"),  # float NHWC
        ({"x": np.zeros((2, 4, 4, 3), np.int16), "y": GOOD_Y}, "int16"),
        ({"x": np.zeros((2, 4, 4, 5), np.uint8), "y": GOOD_Y}, "not 1 or 3 channels"),
        ({"x": np.zeros((2, 16), np.uint8), "y": GOOD_Y}, "uint8 (2, 16)"),
        ({"x": np.zeros((2, 4, 4), np.uint8), "y": np.zeros(2, np.float32)}, "y is float32"),
        ({"x": np.zeros((2, 4, 4), np.uint8), "y": np.zeros(3, np.int64)}, "shape (2,)"),
        ({"x": np.zeros((2, 4, 4), np.uint8), "y": np.array([0, -1])}, "negative label -1"),
        ({"x": np.zeros((2, 4, 4), np.uint8), "y": np.array([0, 2]), "classes": np.array(["a", "b"])}, "2 class names"),
        ({"x": np.zeros((2, 4, 4), np.uint8), "y": GOOD_Y, "classes": np.array([1, 2])}, "1-D array of strings"),
        ({"x": np.zeros((0, 4, 4), np.uint8), "y": np.zeros(0, np.int64)}, "no images"),
        ({"x": np.zeros((2, 4, 4), np.uint8)}, "lacks array(s) y"),
        ({"images": np.zeros((2, 4, 4), np.uint8), "labels": GOOD_Y}, "found: images, labels"),
    ],
)
def test_npz_bad_contents(tmp_path: Path, arrays: dict[str, np.ndarray], expected: str) -> None:
    path = save_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError) as exc:
        load_npz(path)
    assert_one_line(exc, path, expected)
    assert "allowed: " in str(exc.value) or "required: " in str(exc.value)  # says what would be accepted


def test_npz_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(DataError) as exc:
        load_npz(str(tmp_path / "missing.npz"))
    assert_one_line(exc, str(tmp_path / "missing.npz"), "not found")
    np.save(tmp_path / "single.npy", np.zeros(3))
    with pytest.raises(DataError) as exc:
        load_npz(str(tmp_path / "single.npy"))
    assert_one_line(exc, "single array")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(DataError) as exc:
        load_npz(str(tmp_path / "text.npz"))
    assert_one_line(exc, "cannot read", "text.npz")
    objects = np.empty(2, dtype=object)
    np.savez(tmp_path / "objects.npz", x=objects, y=GOOD_Y)
    with pytest.raises(DataError) as exc:
        load_npz(str(tmp_path / "objects.npz"))
    assert_one_line(exc, "cannot read array 'x'")


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_pickles_of_every_protocol_load(tmp_path: Path, protocol: int) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    data = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    entry = {b"batch_label": b"testing batch 1 of 1", b"labels": [3, 7], b"data": data, b"filenames": [b"a.png", b"b.png"]}
    (folder / "test_batch").write_bytes(pickle.dumps(entry, protocol=protocol))
    test = load_cifar10("test", root=str(tmp_path))
    assert test.y.tolist() == [3, 7]
    assert torch.equal((test.x * 255).round().to(torch.uint8).reshape(2, -1), torch.from_numpy(data))


class _Payload:
    """Unpickling this writes a marker file: what a crafted CIFAR folder would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_crafted_cifar10_pickle_runs_no_code(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "ran"
    entry = {"labels": [1], "data": np.zeros((1, 3072), np.uint8), "x": _Payload(marker)}
    (folder / "test_batch").write_bytes(pickle.dumps(entry))
    with pytest.raises(DataError) as exc:
        load_cifar10("test", root=str(tmp_path))
    assert_one_line(exc, "test_batch", "refused global")
    assert not marker.exists()
