"""What made a result: package versions, device, platform and time."""

from __future__ import annotations

import importlib.metadata as md
import platform
import sys
import time
from typing import Any

import torch

from advbench.errors import ConfigError

PACKAGES = ("advbench", "torch", "torchvision", "numpy", "scipy", "pandas", "scikit-learn", "timm", "robustbench", "pydantic")


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def resolve_device(name: str) -> torch.device:
    """The torch device a config's ``device`` names (``auto``: CUDA when there is one)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for but CUDA is not available here; use cpu or auto")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device 'mps' was asked for but is not available here; use cpu or auto")
    return dev


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"device": str(device), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    info["platform"] = platform.platform()
    info["cpu"] = platform.processor() or platform.machine()
    return info


def timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
