"""The UCI 8x8 handwritten digits shipped with scikit-learn: the embedded default data set.

1,797 grey images of 8x8 pixels with 17 levels (0..16), scaled to [0, 1]. The split is
fixed: a stratified 80/20 split with seed 0 (1,437 train, 360 test), so every machine
evaluates on the same test digits without downloading anything.
"""

from __future__ import annotations

import numpy as np
import torch

from advbench.data.base import ImageData
from advbench.errors import DataError
from advbench.registry import DATASETS

SPLIT_SEED = 0
TEST_FRACTION = 0.2


@DATASETS.register("digits", description="UCI 8x8 handwritten digits from scikit-learn (1x8x8, 10 classes, no download)")
def load_digits(split: str = "test") -> ImageData:
    """UCI digits, fixed stratified split (seed 0): 1,437 train / 360 test images, 1x8x8 in [0, 1]."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test"):
        raise DataError(f"digits has splits 'train' and 'test', not {split!r}")
    bunch = sk_load_digits()
    images = bunch.images.astype(np.float32) / 16.0
    labels = bunch.target.astype(np.int64)
    idx_train, idx_test = train_test_split(
        np.arange(len(labels)), test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=labels
    )
    idx = np.sort(idx_train if split == "train" else idx_test)
    x = torch.from_numpy(images[idx]).unsqueeze(1).contiguous()
    y = torch.from_numpy(labels[idx])
    return ImageData(x, y, tuple(str(i) for i in range(10)), "digits", split, {"source": "sklearn.datasets.load_digits"})
