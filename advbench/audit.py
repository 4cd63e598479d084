"""The audit every adversarial example passes before it counts.

An example counts as a successful attack only when it is finite, inside the input bounds,
inside the threat model's eps-ball (tolerance: float32 rounding only) and the model's own
prediction on it meets the attack's goal. With ``quantize: 8bit`` it must also meet the goal
after rounding to 8-bit pixels, as a saved image would. Violating examples are never clipped
into success: they count as failed attacks and are reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from advbench.threat import ThreatModel, quantize_8bit


@dataclass(frozen=True)
class AuditReport:
    valid: torch.Tensor  # (N,) bool: finite, in bounds, in the eps-ball
    adversarial: torch.Tensor  # (N,) bool: the model's prediction meets the goal (quantized too if asked)
    pred_adv: torch.Tensor  # (N,) long: the model's prediction on the example that counts
    quantization_failures: torch.Tensor  # (N,) bool: adversarial before 8-bit rounding, not after

    @property
    def success(self) -> torch.Tensor:
        return self.valid & self.adversarial

    @property
    def n_violations(self) -> int:
        return int((~self.valid).sum())


def goal_met(pred: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """Untargeted: prediction differs from the label. Targeted: prediction equals the target."""
    return pred != y if target is None else pred == target


def reached(
    net: torch.nn.Module,
    x_adv: torch.Tensor,
    logits: torch.Tensor,
    y: torch.Tensor,
    target: torch.Tensor | None,
    threat: ThreatModel,
) -> torch.Tensor:
    """Per example, whether ``x_adv`` (whose logits are ``logits``) meets the goal as the audit will
    judge it: after 8-bit rounding too when the threat model asks for that (one extra forward
    pass, on the examples that meet it before rounding only)."""
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
    safe = torch.where(valid.view(-1, *([1] * (x.dim() - 1))), x_adv, x)
    pred = predict(model, safe)
    adversarial = goal_met(pred, y, target)
    quant_fail = torch.zeros_like(adversarial)
    if threat.quantize == "8bit":
        pred_q = predict(model, quantize_8bit(safe, threat.bounds))
        adv_q = goal_met(pred_q, y, target)
        quant_fail = adversarial & ~adv_q
        adversarial = adversarial & adv_q
        pred = pred_q
    adversarial &= valid
    return AuditReport(valid=valid, adversarial=adversarial, pred_adv=pred, quantization_failures=quant_fail)
