"""The card's numbers: clean accuracy and PGD robust accuracy on the evaluation split.

Robust accuracy is measured with advbench's own audited :class:`~advbench.attacks.pgd.PGD`
(linf, at the card's eps), per example: an example counts as robust when it is classified
correctly and the attack failed. Two losses are run, the cross-entropy (``pgd``, the number the
card reports as ``robust_accuracy``) and the C&W margin on logits (``pgd-margin``), which
distillation's saturated softmax cannot hide from. For a model with a non-differentiable or
randomized defense stage (the thermometer model) both also run through the adaptive view
(BPDA, EoT): ``pgd+bpda`` and ``pgd-margin+bpda``. ``worst_case`` counts an example as robust
only if every attack failed on it. The naive numbers of a defended model are what a
non-adaptive evaluation would report; the adaptive ones are the honest ones.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from advbench.attacks.pgd import PGD
from advbench.data.base import ImageData
from advbench.defenses.base import adaptive, needs_adaptive
from advbench.threat import ThreatModel


def clean_correct(model: nn.Module, data: ImageData, batch_size: int, device: torch.device) -> torch.Tensor:
    """Per example: the model's top-1 prediction is the label (bool, on the CPU)."""
    out = []
    model.eval()
    with torch.no_grad():
        for xb, yb in zip(data.x.split(batch_size), data.y.split(batch_size)):
            out.append((model(xb.to(device)).argmax(1) == yb.to(device)).cpu())
    return torch.cat(out)


def measure(
    model: nn.Module,
    data: ImageData,
    *,
    eps: float,
    steps: int,
    step_size: float | None,
    restarts: int,
    batch_size: int,
    seed: int,
    device: torch.device,
) -> dict[str, Any]:
    """Clean and robust accuracy of ``model`` (eval mode, on ``device``) on ``data``."""
    correct = clean_correct(model, data, batch_size, device)
    threat = ThreatModel.from_dict({"norm": "linf", "eps": eps})
    views = {"": model}
    if needs_adaptive(model):
        views["+bpda"] = adaptive(model)
    robust: dict[str, torch.Tensor] = {}
    for loss in ("ce", "margin"):
        attack = PGD(steps=steps, step_size=step_size, restarts=restarts, loss=loss)
        for suffix, view in views.items():
            label = ("pgd" if loss == "ce" else "pgd-margin") + suffix
            g = torch.Generator().manual_seed(seed)
            parts = []
            for xb, yb in zip(data.x.split(batch_size), data.y.split(batch_size)):
                parts.append(attack(view, xb.to(device), yb.to(device), threat, generator=g).success.cpu())
            robust[label] = correct & ~torch.cat(parts)
    worst = torch.stack(list(robust.values())).all(dim=0)
    n = len(data)

    def rate(mask: torch.Tensor) -> float:
        return round(float(mask.float().mean()), 6) if n else math.nan

    return {
        "eval_size": n,
        "eval_correct": int(correct.sum()),
        "clean_accuracy": rate(correct),
        "robust_accuracy": rate(robust["pgd"]),
        "robust": {
            "norm": "linf",
            "eps": eps,
            "attack": "pgd",
            "steps": steps,
            "step_size": step_size if step_size is not None else 2.5 * eps / steps,
            "restarts": restarts,
            "accuracy": {k: rate(v) for k, v in robust.items()},
            "worst_case": rate(worst),
        },
    }
