"""Image folders in the ``root/<class>/<image>`` layout that ``torchvision.datasets.ImageFolder`` reads.

Class names are the sorted sub-folder names and files are listed the way ImageFolder lists them
(``sorted(os.walk(...))``, then sorted names), so on a folder both read, index ``i`` here is
sample ``i`` there. Unlike ImageFolder, hidden folders (``.ipynb_checkpoints``) are skipped and
only png/jpg/jpeg/bmp files count. The helpers below also serve the CIFAR-10 JPEG loader.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from advbench import params
from advbench.data.base import ImageData
from advbench.errors import ConfigError, DataError
from advbench.registry import DATASETS

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def scan_class_folders(path: Path, classes: Sequence[str] | None = None) -> tuple[tuple[str, ...], list[tuple[Path, int]]]:
    """``(classes, [(file, label), ...])`` for ``path/<class>/**/<image>``, in ImageFolder's order.

    ``classes`` fixes the class list and order (each folder must exist); by default it is the
    sorted names of the non-hidden sub-folders.
    """
    if not path.is_dir():
        raise DataError(f"image folder {path} does not exist (expected the layout {path}/<class>/<image>)")
    if classes is None:
        classes = sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise DataError(f"{path} has no class folders; expected the layout {path}/<class>/<image>")
    samples: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        folder = path / name
        if not folder.is_dir():
            raise DataError(f"class folder {folder} is missing; expected one folder per class: {', '.join(classes)}")
        found = [
            Path(dirpath) / fname
            for dirpath, _, fnames in sorted(os.walk(folder, followlinks=True))
            for fname in sorted(fnames)
            if is_image_name(fname)
        ]
        if not found:
            raise DataError(f"class folder {folder} holds no images (allowed: {', '.join(IMAGE_EXTENSIONS)})")
        samples.extend((f, label) for f in found)
    return tuple(classes), samples


def decode_image(source: Path | bytes, mode: str, size: int | None = None, name: str | None = None) -> np.ndarray:
    """One image file (a path or its bytes) as uint8 HWC (mode ``RGB``) or HW (mode ``L``)."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            img = img.convert(mode)
            if size is not None and img.size != (size, size):
                img = img.resize((size, size), Image.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {name or source}: {exc}") from None


def stack_nchw(images: Sequence[np.ndarray], names: Sequence[object], hint: str) -> np.ndarray:
    """Stack HWC / HW uint8 images into one contiguous NCHW array; different sizes are a DataError."""
    first = images[0].shape
    for img, name in zip(images, names):
        if img.shape != first:
            raise DataError(
                f"images differ in size: {names[0]} is {_shape_text(first)} but {name} is {_shape_text(img.shape)}; {hint}"
            )
    x = np.stack(images)
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x)


def _shape_text(shape: tuple[int, ...]) -> str:
    return f"{shape[1]}x{shape[0]}" + (f"x{shape[2]}" if len(shape) == 3 else "")


@DATASETS.register("imagefolder", description="Any root/<class>/<image> folder (png/jpg/jpeg/bmp), optionally resized")
def load_image_folder(path: str, size: int | None = None, grayscale: bool = False, split: str = "test") -> ImageData:
    """Your own images in ImageFolder's layout, so any labelled image set can be benchmarked.

    ``size`` resizes every image to size x size (bilinear); without it all images must share
    one size. ``grayscale`` gives 1 channel, else 3 (RGB). ``split`` only labels the result.
    """
    if size is not None:
        try:
            params.check_whole(size, "imagefolder size", 1)
        except ConfigError as exc:
            raise DataError(f"{exc} (or None to keep the images' own size)") from None
    root = Path(path).expanduser()
    classes, samples = scan_class_folders(root)
    mode = "L" if grayscale else "RGB"
    images = [decode_image(f, mode, size) for f, _ in samples]
    names = [f.relative_to(root) for f, _ in samples]
    x = stack_nchw(images, names, hint="pass size=N to resize them all to NxN")
    y = torch.tensor([label for _, label in samples], dtype=torch.int64)
    meta = {"source": str(root), "format": "imagefolder"}
    return ImageData(torch.from_numpy(x).float().div_(255.0), y, classes, root.name or str(root), split, meta)
