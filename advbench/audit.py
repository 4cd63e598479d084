"""The audit every adversarial example passes before it counts.

An example counts as a successful attack only when it is finite, inside the input bounds,
inside the threat model's eps-ball (allowing floating-point rounding only,
:meth:`~advbench.threat.ThreatModel.slack`) and the model's own prediction on it meets the
attack's goal. With ``quantize: 8bit`` the image that counts is its 8-bit rounding
(:meth:`~advbench.threat.ThreatModel.quantized`), which must itself pass the same checks and
meet the goal. Violating examples are never clipped into success: they count as failed attacks,
are reported, and the clean input stands in for them wherever an example is used afterwards.

A targeted goal is met only where the target differs from the label: an example already of the
target class cannot be attacked toward it, so reaching "its" target at distance 0 is no success.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from advbench.threat import ThreatModel, quantize_8bit


@dataclass(frozen=True)
class AuditReport:
    valid: torch.Tensor  # (N,) bool: finite, in bounds, in the eps-ball (the 8-bit image too, if asked)
    adversarial: torch.Tensor  # (N,) bool: valid, and the model's prediction on the scored image meets the goal
    pred_adv: torch.Tensor  # (N,) long: the model's prediction on the image that counts
    quantization_failures: torch.Tensor  # (N,) bool: valid and adversarial before 8-bit rounding, not after
    x_scored: torch.Tensor  # the image that counts per example: x_adv (8-bit rounded if asked), x where invalid

    @property
    def success(self) -> torch.Tensor:
        return self.valid & self.adversarial

    @property
    def n_violations(self) -> int:
        return int((~self.valid).sum())


def goal_met(pred: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """Untargeted: prediction differs from the label. Targeted: prediction equals the target, and
    the target is not the label (an example of the target class is no success at distance 0)."""
    return pred != y if target is None else (pred == target) & (target != y)


def targetable(y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """Per example, whether an attack can pursue its goal: always when untargeted; when targeted,
    where the target is not the label."""
    return torch.ones_like(y, dtype=torch.bool) if target is None else target != y


def reached(
    net: torch.nn.Module,
    x_adv: torch.Tensor,
    logits: torch.Tensor,
    y: torch.Tensor,
    target: torch.Tensor | None,
    threat: ThreatModel,
) -> torch.Tensor:
    """Per example, whether ``x_adv`` (whose logits are ``logits``) meets the goal after 8-bit
    rounding too when the threat model asks for that (one extra forward pass, on the examples that
    meet it before rounding only). The rounding is to the nearest level, as a minimal-perturbation
    search (which has no ball to stay in) is judged."""
    ok = goal_met(logits.argmax(dim=1), y, target)
    if threat.quantize == "8bit" and bool(ok.any()):
        idx = ok.nonzero().squeeze(1)
        with torch.no_grad():
            pred = net(quantize_8bit(x_adv[idx], threat.bounds)).argmax(dim=1)
        ok[idx] = goal_met(pred, y[idx], None if target is None else target[idx])
    return ok


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """Top-1 predictions, in chunks so an audit never needs more memory than the attack did."""
    return torch.cat([model(chunk).argmax(dim=1) for chunk in x.split(batch_size)])


def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, *([1] * (like.dim() - 1)))


@torch.no_grad()
def audit(
    model: nn.Module,
    x: torch.Tensor,
    x_adv: torch.Tensor,
    y: torch.Tensor,
    threat: ThreatModel,
    target: torch.Tensor | None = None,
) -> AuditReport:
    """Check ``x_adv`` against ``threat`` and recompute success from ``model``'s predictions."""
    valid = threat.contains(x_adv, x)
    # A violating example is replaced by its clean input: it never reaches the model (no NaN),
    # and the prediction that counts for it is the clean one.
    safe = torch.where(_rows(valid, x), x_adv, x)
    quant_fail = torch.zeros_like(valid)
    if threat.quantize == "8bit":
        rounded = threat.quantized(safe, x)
        before = goal_met(predict(model, safe), y, target) & valid
        valid &= threat.contains(rounded, x)
        safe = torch.where(_rows(valid, x), rounded, x)
    pred = predict(model, safe)
    adversarial = goal_met(pred, y, target) & valid
    if threat.quantize == "8bit":
        quant_fail = before & valid & ~adversarial
    return AuditReport(valid=valid, adversarial=adversarial, pred_adv=pred, quantization_failures=quant_fail,
                       x_scored=safe)
