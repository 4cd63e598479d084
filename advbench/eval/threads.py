"""How many CPU threads a job's tensor operations use: one for small models, all for large ones.

On a shared machine, two OpenMP threads per process on a small model spin and wait for each
other whenever the other core is busy: beside one competing job, small operations run many
times slower with two threads than with one, while on a quiet machine the second thread saves
a fraction of the time; the larger the operations, the smaller the loss under load and the
larger the gain (measured per reference model and batch size in ``benchmarks/results/load.md``).
So a job whose forward pass over its examples costs less than :data:`SMALL_FLOPS` runs with one
thread, and a larger one keeps the process's thread count. The numbers are the same either way
(checked by that benchmark and by the tests).

An explicit choice wins: ``evaluate(..., threads=N)`` / ``advbench evaluate --threads N``, or
``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` set in the environment (then advbench leaves torch's
setting alone). Only CPU jobs are affected.
"""

from __future__ import annotations

import os

import torch
from torch import nn

#: a forward pass over a job's examples cheaper than this (FLOPs) runs on one thread
SMALL_FLOPS = 1e9
EXPLICIT_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def explicit_in_environment() -> bool:
    """Whether the user fixed the thread count through the environment."""
    return any(os.environ.get(k) for k in EXPLICIT_ENV)


@torch.no_grad()
def forward_flops(model: nn.Module, example: torch.Tensor) -> float | None:
    """About the FLOPs of one forward pass of ``model`` on one example (``example``: a batch of
    one): 2 x the multiply-adds of its convolution and linear layers, read off their outputs by
    forward hooks (torch's FlopCounterMode is exact but costs a second to import). A model with no
    such modules (a ``torch.export`` graph) is counted as 2 x its parameters, a lower bound. None
    when the model cannot run the example."""
    total = [0.0]

    def count(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if isinstance(module, nn.Linear):
            total[0] += 2.0 * output.numel() * module.in_features
        else:  # convolutions: every output element is a dot product over in_channels/groups x kernel
            per_output = module.in_channels // module.groups * int(torch.tensor(module.kernel_size).prod())
            total[0] += 2.0 * output.numel() * per_output

    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    handles = [m.register_forward_hook(count) for m in layers]
    try:
        model(example)
    except Exception:  # noqa: BLE001 - a model that cannot run one example: keep the default
        return None
    finally:
        for h in handles:
            h.remove()
    if not layers:
        return 2.0 * sum(p.numel() for p in model.parameters())
    return total[0]


def choose(flops_per_example: float | None, rows: int, available: int) -> int:
    """The thread count for a job of ``rows`` examples (``available``: the process's count)."""
    if flops_per_example is None:
        return available
    return 1 if flops_per_example * rows < SMALL_FLOPS else available
