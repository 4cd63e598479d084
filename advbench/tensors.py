"""Tensor utilities every floor above uses: a model frozen for attacking, seeded noise, row masks.

Randomness comes from an explicit ``torch.Generator`` (drawn on the generator's device, then
moved), never from the global RNG, so a seed fixes every result.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients for the duration; the previous state is restored."""
    modes = [(m, m.training) for m in model.modules()]  # per module: a wrapper may mix modes
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode


def rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-example (N,) mask or vector shaped to broadcast over ``like``'s (N, ...) batch."""
    return mask.view(-1, *([1] * (like.dim() - 1)))


def rand_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Uniform [0, 1) noise shaped like ``x``, drawn from ``generator`` on its own device."""
    dev = generator.device if generator is not None else x.device
    return torch.rand(x.shape, generator=generator, device=dev, dtype=x.dtype).to(x.device)


def randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like ``x``, drawn from ``generator`` on its own device."""
    dev = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype).to(x.device)


@contextlib.contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` for the block (None or the current count:
    unchanged), then restored."""
    if n is None or n == torch.get_num_threads():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
