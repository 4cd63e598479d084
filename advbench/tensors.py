"""Tensor utilities every floor above uses: a model frozen for attacking, seeded noise, row masks,
and a counter of host-device synchronisations.

Randomness comes from an explicit ``torch.Generator`` (drawn on the generator's device, then
moved), never from the global RNG, so a seed fixes every result. The move from a CPU generator's
draws to a GPU is ``non_blocking`` (:func:`to_device`): the same values, without the stream
synchronisation of a blocking copy.

:class:`HostSyncCounter` counts the calls that make the host wait for the device, on any device,
so a test on a CPU can check that an attack's iteration loop makes none.
"""

from __future__ import annotations

import collections
import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode


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


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` on ``device``. From host memory to a CUDA device the copy is ``non_blocking``: CUDA
    stages pageable memory before the call returns (so ``t`` may be freed at once, and the values
    are the same), and torch then skips the stream synchronisation it adds after a blocking
    copy, so the host need not wait for the device's queue to drain (CUDA's driver may still
    stage through one of its own). Any other move blocks as usual (a non-blocking copy *to* the
    host could be read before it lands)."""
    target = torch.device(device)
    return t.to(target, non_blocking=t.device.type == "cpu" and target.type == "cuda")


def rand_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Uniform [0, 1) noise shaped like ``x``, drawn from ``generator`` on its own device."""
    dev = generator.device if generator is not None else x.device
    return to_device(torch.rand(x.shape, generator=generator, device=dev, dtype=x.dtype), x.device)


def randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like ``x``, drawn from ``generator`` on its own device."""
    dev = generator.device if generator is not None else x.device
    return to_device(torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype), x.device)


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


# ---------------------------------------------------------------------- host synchronisation
#: calls that make the host wait for the device to finish: a value read back (``item``, a Python
#: number or truth value, a list or array), a copy to the host, or a result whose *shape* depends
#: on the data (``nonzero`` and everything built on it), which the host must read to allocate
_SYNC_CALLS: dict[Callable[..., Any], str] = {
    torch.Tensor.item: "item", torch.Tensor.__bool__: "bool", torch.Tensor.__float__: "float",
    torch.Tensor.__int__: "int", torch.Tensor.__index__: "index", torch.Tensor.__complex__: "complex",
    torch.Tensor.tolist: "tolist", torch.Tensor.numpy: "numpy", torch.Tensor.cpu: "cpu",
    torch.Tensor.nonzero: "nonzero", torch.nonzero: "nonzero", torch.Tensor.argwhere: "argwhere",
    torch.argwhere: "argwhere", torch.Tensor.masked_select: "masked_select", torch.masked_select: "masked_select",
    torch.Tensor.unique: "unique", torch.unique: "unique", torch.unique_consecutive: "unique",
    torch.Tensor.bincount: "bincount", torch.bincount: "bincount", torch.Tensor.equal: "equal",
    torch.equal: "equal", torch.Tensor.allclose: "allclose", torch.allclose: "allclose",
    torch.Tensor.is_nonzero: "is_nonzero", torch.is_nonzero: "is_nonzero",
}
_INDEXING = {torch.Tensor.__getitem__: "bool-mask getitem", torch.Tensor.__setitem__: "bool-mask setitem",
             torch.Tensor.index_put_: "bool-mask index_put", torch.Tensor.index_put: "bool-mask index_put"}
_HERE = os.path.abspath(__file__)


def _has_mask(index: Any) -> bool:
    """Whether an index holds a boolean tensor (indexing with it is a ``nonzero``: a sync)."""
    if isinstance(index, torch.Tensor):
        return index.dtype == torch.bool
    if isinstance(index, (tuple, list)):
        return any(_has_mask(i) for i in index)
    return False


def _sync_kind(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """The kind of host synchronisation ``func(*args, **kwargs)`` makes on a device, or None."""
    if func in _SYNC_CALLS:
        return _SYNC_CALLS[func]
    if func in _INDEXING:
        return _INDEXING[func] if len(args) > 1 and _has_mask(args[1]) else None
    if func is torch.where and len(args) + len(kwargs) == 1:
        return "where(cond)"  # the one-argument form is nonzero
    if func is torch.repeat_interleave or func is torch.Tensor.repeat_interleave:
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        if isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None:
            return "repeat_interleave"
    if func is torch.Tensor.to and args and isinstance(args[0], torch.Tensor):
        # a copy to the host: written as "cpu" (a no-op on CPU, a wait on a GPU), or a real move
        for a in (*args[1:], kwargs.get("device")):
            if (isinstance(a, str) and a.split(":")[0] == "cpu") or \
                    (isinstance(a, torch.device) and a.type == "cpu" and args[0].device.type != "cpu"):
                return "to(cpu)"
    return None


def _caller() -> str:
    """``file:line`` of the innermost frame outside this module and torch (where the call was written)."""
    frame = sys._getframe(2)
    torch_dir = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if path != _HERE and not path.startswith(torch_dir):
            return f"{os.path.relpath(path)}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"  # pragma: no cover


class HostSyncCounter(TorchFunctionMode):
    """Counts, while active, the calls that would make the host wait for the device (see
    ``_SYNC_CALLS``; also boolean-mask indexing, one-argument ``torch.where``, ``repeat_interleave``
    without ``output_size`` and copies to the host), on any device: on a CPU they cost nothing,
    but the same code on a GPU stalls the launch queue at each of them. ``counts`` maps
    (kind, ``file:line`` of the call) to how often it happened; ``total`` sums them.

    Seen are calls that pass through ``__torch_function__`` from Python; syncs torch makes inside
    one of its own kernels are not (``torch.cuda.set_sync_debug_mode("error")`` catches those on a
    GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        kind = _sync_kind(func, args, kwargs)
        if kind is not None:
            self.counts[kind, _caller()] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def where(self) -> list[tuple[str, str, int]]:
        """(kind, location, count) for every sync seen, most frequent first."""
        return [(kind, loc, n) for (kind, loc), n in self.counts.most_common()]
