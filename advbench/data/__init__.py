"""Data sets: every loader returns an :class:`ImageData` (float32 NCHW in [0, 1]).

Importing this package registers every built-in loader in :data:`advbench.registry.DATASETS`:
``digits``, ``mnist``, ``cifar10``, ``imagefolder`` and ``npz``.
"""

from advbench.data import cifar10, digits, folder, mnist, npz  # noqa: F401  (registers)
from advbench.data.base import ImageData
from advbench.data.cifar10 import load_cifar10
from advbench.data.digits import load_digits
from advbench.data.folder import load_image_folder
from advbench.data.mnist import load_mnist
from advbench.data.npz import load_npz
from advbench.data.paths import cache_dir, data_root

__all__ = [
    "ImageData",
    "cache_dir",
    "data_root",
    "load_cifar10",
    "load_digits",
    "load_image_folder",
    "load_mnist",
    "load_npz",
]
