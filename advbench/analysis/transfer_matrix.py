"""The transfer matrix: adversarial examples crafted on each source, scored on every target.

Szegedy et al. (2014), "Cross-model generalization of adversarial examples": rows are the
models the examples were crafted on (white-box), columns the models they are scored on, each
cell the error rate of the column's model on the row's adversarial set, so the diagonal is the
white-box number wherever a source is also a target. The last column, ``av_distortion``, is the
paper's "Av. distortion": the average over the row's examples of the root-mean-square change per
input value, ``||x_adv - x||_2 / sqrt(d)`` with ``d`` the number of input values, i.e. the
standard deviation of the perturbation about zero, matching the paper's noise rows where the
distortion of "Gaussian noise, stddev=0.1" is 0.1 (and its cross-training-set table's
"av. stddev=0.062" labels).

Baseline rows show how much of the transfer is more than noise:

- ``gaussian[<source>]``: per example, Gaussian noise with the standard deviation (as above) of
  that source's perturbation of that example, added and clipped to the bounds;
- ``uniform[<source>]``: per example, uniform noise in the linf ball whose radius is that
  example's perturbation's linf norm, added and clipped;
- ``gaussian(std=s)``: Gaussian noise of a fixed ``s`` per value (the paper's
  "Gaussian noise, stddev=0.1" rows), for each ``s`` in ``noise_stds``;
- ``<source> amplified to std=s``: the paper's "amplified to stddev=0.1" rows, each example's
  perturbation scaled to RMS ``s`` before clipping to the bounds.

Noise is drawn from one ``torch.Generator`` seeded with ``seed`` on the CPU, in a fixed order,
so the matrix does not depend on the device or the batch size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn

from advbench.errors import ConfigError

DISTORTION = "av_distortion"


@dataclass(frozen=True)
class TransferMatrix:
    """The error-rate matrix and the counts it was computed from (same rows and target columns)."""

    rates: pd.DataFrame  # error rate per (row, target), plus the ``av_distortion`` column
    errors: pd.DataFrame  # misclassified examples per (row, target)
    n: int  # examples per row


def rms(delta: torch.Tensor) -> torch.Tensor:
    """Per example, ``||delta||_2 / sqrt(d)``: the RMS change per input value (Szegedy's distortion)."""
    flat = delta.reshape(delta.shape[0], -1).double()
    return flat.pow(2).mean(dim=1).sqrt()


def _broadcast(per_example: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return per_example.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def gaussian_like(delta: torch.Tensor, generator: torch.Generator, std: torch.Tensor | float | None = None) -> torch.Tensor:
    """Gaussian noise shaped like ``delta`` with per-example std ``std`` (default: ``rms(delta)``)."""
    std = rms(delta) if std is None else torch.as_tensor(std, dtype=torch.float64).expand(delta.shape[0])
    noise = torch.randn(delta.shape, generator=generator, dtype=delta.dtype)
    return noise * _broadcast(std, noise)


def uniform_like(delta: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Uniform noise in each example's linf ball of radius ``max |delta|``."""
    radius = delta.reshape(delta.shape[0], -1).abs().amax(dim=1)
    noise = torch.rand(delta.shape, generator=generator, dtype=delta.dtype).mul_(2).sub_(1)
    return noise * _broadcast(radius, noise)


def amplify(delta: torch.Tensor, std: float) -> torch.Tensor:
    """Each example's perturbation scaled to RMS ``std`` (zero perturbations stay zero)."""
    r = rms(delta)
    scale = torch.where(r > 0, std / r.clamp_min(1e-300), torch.zeros_like(r))
    return delta * _broadcast(scale, delta)


@torch.no_grad()
def _errors(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> int:
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    wrong = 0
    for s in range(0, x.shape[0], batch_size):
        xb = x[s : s + batch_size].to(device)
        wrong += int((model(xb).argmax(dim=1).cpu() != y[s : s + batch_size].cpu()).sum())
    return wrong


def transfer_matrix(
    sources: Mapping[str, torch.Tensor],
    targets: Mapping[str, nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    bounds: tuple[float, float] = (0.0, 1.0),
    noise: Sequence[str] = ("gaussian", "uniform"),
    noise_stds: Sequence[float] = (),
    amplify_to: Sequence[float] = (),
    seed: int = 0,
    batch_size: int = 500,
) -> TransferMatrix:
    """The transfer matrix of ``sources`` (name -> adversarial examples crafted white-box on that
    source, shape of ``x``) against ``targets`` (name -> model), on clean inputs ``x``, labels ``y``.

    Rows, in order: a ``clean`` row; each source; the baseline rows (see the module docstring)
    of ``noise`` (``"gaussian"``, ``"uniform"``) per source; one ``gaussian(std=s)`` row per
    ``noise_stds``; one amplified row per source and ``amplify_to``. Columns: the targets, then
    ``av_distortion``. Models are evaluated in batches of ``batch_size`` on their own device
    (that of their first parameter); noise comes from a CPU generator seeded with ``seed``.
    """
    if not targets:
        raise ConfigError("transfer_matrix needs at least one target model")
    unknown = set(noise) - {"gaussian", "uniform"}
    if unknown:
        raise ConfigError(f"unknown noise {sorted(unknown)}; allowed: gaussian, uniform")
    x = x.detach().cpu()
    y = y.detach().cpu()
    lo, hi = bounds
    rows: dict[str, torch.Tensor] = {"clean": x}
    deltas = {}
    for name, x_adv in sources.items():
        if x_adv.shape != x.shape:
            raise ConfigError(f"source {name!r}: examples of shape {tuple(x_adv.shape)}, expected {tuple(x.shape)}")
        rows[name] = x_adv.detach().cpu()
        deltas[name] = rows[name] - x
    g = torch.Generator().manual_seed(seed)
    draws: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "gaussian": lambda d: gaussian_like(d, g),
        "uniform": lambda d: uniform_like(d, g),
    }
    for kind in noise:
        for name, delta in deltas.items():
            rows[f"{kind}[{name}]"] = (x + draws[kind](delta)).clamp(lo, hi)
    for std in noise_stds:
        rows[f"gaussian(std={std:g})"] = (x + gaussian_like(x, g, std)).clamp(lo, hi)
    for std in amplify_to:
        for name, delta in deltas.items():
            rows[f"{name} amplified to std={std:g}"] = (x + amplify(delta, std)).clamp(lo, hi)
    errors = pd.DataFrame(
        {t: [_errors(model, xr, y, batch_size) for xr in rows.values()] for t, model in targets.items()},
        index=pd.Index(list(rows), name="source"),
    )
    n = int(x.shape[0])
    rates = errors / n if n else errors.astype(float) * math.nan
    rates[DISTORTION] = [float(rms(xr - x).mean()) if n else math.nan for xr in rows.values()]
    return TransferMatrix(rates=rates, errors=errors, n=n)
