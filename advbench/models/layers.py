"""Small building blocks shared by the zoo architectures and the loaders.

advbench models take images in [0, 1] (the threat model's box) and normalize inside, the
convention of torchvision, timm and RobustBench: an attack's epsilon is then measured in
pixel space whatever normalization the network was trained with. :class:`Normalize` is that
first layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from advbench.errors import ConfigError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2471, 0.2435, 0.2616)
MNIST_MEAN: tuple[float] = (0.1307,)
MNIST_STD: tuple[float] = (0.3081,)


def _as_floats(name: str, value: float | Sequence[float] | torch.Tensor) -> tuple[float, ...]:
    if isinstance(value, torch.Tensor):
        value = value.detach().reshape(-1).tolist()
    if isinstance(value, (int, float)):
        return (float(value),)
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"Normalize {name} must be a number or a sequence of numbers, got {value!r}") from None
    if not out:
        raise ConfigError(f"Normalize {name} must not be empty")
    return out


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, for NCHW input in [0, 1].

    ``mean`` and ``std`` are buffers (saved in the state dict, moved with ``.to()``), shaped
    ``(1, C, 1, 1)``. A single value applies to every channel.
    """

    # (no class-level annotations for the buffers: torch.jit.script cannot resolve the string
    # annotations ``from __future__ import annotations`` makes of them)

    def __init__(self, mean: float | Sequence[float], std: float | Sequence[float]) -> None:
        super().__init__()
        m, s = _as_floats("mean", mean), _as_floats("std", std)
        if len(m) != len(s) and 1 not in (len(m), len(s)):
            raise ConfigError(f"Normalize mean has {len(m)} channels but std has {len(s)}")
        if any(v <= 0 for v in s):
            raise ConfigError(f"Normalize std must be positive, got {s}")
        self.register_buffer("mean", torch.tensor(m, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(s, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        fmt = lambda t: "(" + ", ".join(f"{v:.4g}" for v in t.reshape(-1).tolist()) + ")"  # noqa: E731
        return f"mean={fmt(self.mean)}, std={fmt(self.std)}"


def with_normalization(model: nn.Module, mean: float | Sequence[float], std: float | Sequence[float]) -> nn.Sequential:
    """``nn.Sequential(Normalize(mean, std), model)``: a network that takes [0, 1] input.

    The result's state-dict keys are ``0.mean``, ``0.std`` and ``1.<the model's keys>``.
    """
    return nn.Sequential(Normalize(mean, std), model)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (buffers excluded)."""
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only))


def conv_bn_relu(c_in: int, c_out: int, kernel: int = 3, *, pool: bool = False) -> nn.Sequential:
    """Conv (same padding, no bias) -> BatchNorm -> ReLU [-> 2x2 max pool]."""
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "Normalize",
    "conv_bn_relu",
    "count_parameters",
    "with_normalization",
]
