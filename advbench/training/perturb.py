"""Adversarial examples for training: PGD (Madry), FGSM with random start (Wong) and TRADES' PGD.

These call the gradient helpers of :mod:`advbench.attacks.losses` (``ascend_linf``,
``input_gradient``, ``linf_box``), the same code advbench's PGD and FGSM run, rather than the
attack classes: an attack call also runs a clean forward pass, resolves targets, counts passes
through a handle, toggles every parameter's ``requires_grad`` and audits the output with one
more forward pass. That is what an *evaluation* needs, and about two extra forward passes per
training batch that training does not (the card's robust accuracy does use the audited
:class:`~advbench.attacks.pgd.PGD`). Random draws come from the caller's ``torch.Generator``,
so a seed fixes every batch. The model is put in eval mode while the examples are computed
and the previous mode is restored (the zoo networks have no batch norm or dropout, so this
only matters for ``cifar10-cnn``: its batch statistics are not updated by the attack's passes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from advbench.tensors import rand_like
from advbench.attacks.losses import (
    Objective,
    ascend_linf,
    input_gradient,
    linf_box,
    objective,
    sign_,
)

BOUNDS = (0.0, 1.0)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def uniform_start(x: torch.Tensor, eps: float, generator: torch.Generator | None) -> torch.Tensor:
    """x + U(-eps, eps) per element, clamped into the linf ball and the [0, 1] box."""
    lower, upper = linf_box(x, eps, BOUNDS)
    return (x + rand_like(x, generator).mul_(2).sub_(1).mul_(eps)).clamp_(lower, upper)


def pgd_linf(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    steps: int,
    step_size: float,
    random_start: bool = True,
    generator: torch.Generator | None = None,
    objective_fn: Objective | None = None,
) -> torch.Tensor:
    """Madry et al.'s inner maximization: ``steps`` signed-gradient steps on the cross-entropy
    (or ``objective_fn``), each projected onto the linf ``eps``-ball around ``x`` and [0, 1]."""
    lower, upper = linf_box(x, eps, BOUNDS)
    start = uniform_start(x, eps, generator) if random_start else x
    with eval_mode(model):
        return ascend_linf(model, start, lower, upper, step_size, steps, objective_fn or objective("ce", y, None))


def fgsm_random_start(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Wong, Rice & Kolter (2020): delta ~ U(-eps, eps), one step delta += alpha * sign(grad),
    then back into the eps-ball and [0, 1] (alpha = 1.25 eps in the paper)."""
    lower, upper = linf_box(x, eps, BOUNDS)
    start = uniform_start(x, eps, generator)
    with eval_mode(model):
        grad = input_gradient(model, start, objective("ce", y, None))
    with torch.no_grad():
        return torch.add(start, sign_(grad), alpha=alpha).clamp_(lower, upper)


def trades_kl(
    model: nn.Module, x: torch.Tensor, *, eps: float, steps: int, step_size: float, generator: torch.Generator | None
) -> torch.Tensor:
    """TRADES' inner maximization (Zhang et al. 2019): PGD on KL(f(x) || f(x')) from
    x' = x + 0.001 * N(0, I), as in the authors' code."""
    with eval_mode(model), torch.no_grad():
        p_clean = F.softmax(model(x), dim=1)
    lower, upper = linf_box(x, eps, BOUNDS)
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=generator.device if generator else x.device)
    start = (x + 0.001 * noise.to(x.device)).clamp_(lower, upper)

    def kl(logits: torch.Tensor) -> torch.Tensor:
        return F.kl_div(F.log_softmax(logits, dim=1), p_clean, reduction="sum")

    with eval_mode(model):
        return ascend_linf(model, start, lower, upper, step_size, steps, kl)
