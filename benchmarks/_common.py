"""What every benchmark script does the same way: print its report and write it under results/."""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable

import torch
from torch import nn


def publish(text: str, out: str) -> None:
    """Print the report and write it to ``out`` (creating its folder); ``out == "-"`` writes nothing."""
    print(text)
    if out == "-":
        return
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as fh:
        fh.write(text)
    print(f"wrote {out}", file=sys.stderr)


def norm_of(delta: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-example l2 or linf size of ``delta``, in float64."""
    flat = delta.flatten(1).double()
    return flat.norm(dim=1) if norm == "l2" else flat.abs().amax(dim=1)


def distances_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-example size of ``x_adv - x``, +inf where the model does not misclassify ``x_adv``."""
    with torch.no_grad():
        fooled = model(x_adv).argmax(dim=1) != y
    d = norm_of(x_adv - x, norm)
    return torch.where(fooled, d, torch.full_like(d, math.inf))


def sync(device: torch.device) -> None:
    """Wait for a CUDA device's queued work (a no-op elsewhere)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of ``fn()``, the device drained before and after (never inside)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0
