"""The in-memory data set every loader returns.

Images are float32 NCHW in [0, 1] (the PyTorch convention; normalization belongs inside the
model), labels int64. Evaluation takes a fixed, seeded subset of indices, so a result names
exactly which examples it was computed on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from advbench.errors import DataError


@dataclass(frozen=True)
class ImageData:
    """A labelled image set held in memory: ``x`` (N, C, H, W) float32 in [0, 1], ``y`` (N,) int64."""

    x: torch.Tensor
    y: torch.Tensor
    classes: tuple[str, ...]
    name: str
    split: str = "test"
    meta: dict[str, object] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.x.dim() != 4:
            raise DataError(f"{self.name}: images must be NCHW, got shape {tuple(self.x.shape)}")
        if self.x.dtype != torch.float32:
            raise DataError(f"{self.name}: images must be float32, got {self.x.dtype}")
        if self.y.shape != self.x.shape[:1]:
            raise DataError(f"{self.name}: {self.y.shape[0]} labels for {self.x.shape[0]} images")
        if self.x.numel() and (float(self.x.min()) < 0 or float(self.x.max()) > 1):
            raise DataError(f"{self.name}: pixel values must lie in [0, 1]")
        if self.y.numel() and (int(self.y.min()) < 0 or int(self.y.max()) >= len(self.classes)):
            raise DataError(f"{self.name}: labels must lie in [0, {len(self.classes) - 1}]")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])  # type: ignore[return-value]

    def subset(self, indices: torch.Tensor) -> ImageData:
        return ImageData(self.x[indices], self.y[indices], self.classes, self.name, self.split, dict(self.meta))

    def sample_indices(self, n: int | None, seed: int) -> torch.Tensor:
        """``n`` distinct indices drawn with ``seed`` (all of them, in order, when n is None or N).

        An ``n`` larger than the data set is an error: a table must not claim more examples
        than it was computed on."""
        if n is not None and n > len(self):
            raise DataError(f"n is {n} but {self.name} {self.split!r} has {len(self)} examples; "
                            f"allowed: 1..{len(self)}, or leave n out for all of them")
        if n is None or n == len(self):
            return torch.arange(len(self))
        if n < 1:
            raise DataError(f"n must be >= 1, got {n}")
        g = torch.Generator().manual_seed(seed)
        return torch.randperm(len(self), generator=g)[:n].sort().values
