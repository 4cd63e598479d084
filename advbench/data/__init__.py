"""Data sets: every loader returns an :class:`ImageData` (float32 NCHW in [0, 1])."""

from advbench.data import digits  # noqa: F401  (registers)
from advbench.data.base import ImageData

__all__ = ["ImageData"]
