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

The axes beyond the Lp ball (:mod:`advbench.threat`) are checked per example too:

- ``region``: nothing may change outside the example's square (its corner, for ``fixed`` and
  ``random`` locations, is given; for ``any`` the changed pixels must fit in one square);
- ``scope: universal``: the attack hands over the one perturbation it claims (an additive
  ``delta``, or a patch's content under a region), which must lie in the budget itself, and every
  example must be exactly that perturbation applied to its clean input (per class with
  ``shared_by: class``): a perturbation that is not really shared fails the audit;
- ``perceptual``: the example's SSIM to its clean input must be at least the bound;
- ``physical``: the goal must be met by the model's predictions on the transformation of the
  image that counts, in all (or a strict majority of) the transformation's seeded draws.

Region and scope concern the attacker's change, so they are checked on the attack's output;
``quantize: 8bit`` then rounds the whole image, as saving it would (on data off the 8-bit grid
that also moves pixels outside the square: the saving did it, not the attacker).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from advbench.similarity import ssim
from advbench.threat import Region, Scope, ThreatModel, quantize_8bit


@dataclass(frozen=True)
class AuditReport:
    valid: torch.Tensor  # (N,) bool: finite, in bounds, in the eps-ball (the 8-bit image too, if asked)
    adversarial: torch.Tensor  # (N,) bool: valid, and the model's prediction on the scored image meets the goal
    pred_adv: torch.Tensor  # (N,) long: the model's prediction on the image that counts
    quantization_failures: torch.Tensor  # (N,) bool: valid and adversarial before 8-bit rounding, not after
    x_scored: torch.Tensor  # the image that counts per example: x_adv (8-bit rounded if asked), x where invalid
    #: per example, the SSIM of x_adv to x (threat models with a perceptual bound only)
    ssim: torch.Tensor | None = None
    #: per example, the share of the physical transformation's draws in which the goal is met
    physical_share: torch.Tensor | None = None
    #: (N, draws) long: the model's prediction on each draw of the physical transformation
    physical_draws: torch.Tensor | None = None

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
    *,
    corners: torch.Tensor | None = None,
    universal: torch.Tensor | None = None,
) -> AuditReport:
    """Check ``x_adv`` against ``threat`` and recompute success from ``model``'s predictions.

    ``corners`` (N, 2): each example's region corner (row, col), for a region located ``fixed``
    or ``random``; ``universal``: the shared perturbation of a universal threat model (see
    :func:`apply_universal`)."""
    valid = threat.contains(x_adv, x)
    if threat.region is not None:
        valid &= inside_region(x_adv, x, threat.region, corners)
    if threat.scope is Scope.UNIVERSAL:
        valid &= shared(x_adv, x, y, threat, universal, corners)
    # A violating example is replaced by its clean input: it never reaches the model (no NaN),
    # and the prediction that counts for it is the clean one.
    safe = torch.where(_rows(valid, x), x_adv, x)
    quant_fail = torch.zeros_like(valid)
    if threat.quantize == "8bit":
        rounded = threat.quantized(safe, x)
        before = goal_met(predict(model, safe), y, target) & valid
        valid &= threat.contains(rounded, x)
        safe = torch.where(_rows(valid, x), rounded, x)
    similarity = None
    if threat.perceptual is not None:
        similarity = ssim(safe, x, data_range=threat.bounds[1] - threat.bounds[0]).to(x.device)
        valid &= similarity >= threat.perceptual.ssim
        safe = torch.where(_rows(valid, x), safe, x)
    share = per_draw = None
    if threat.physical is not None:
        per_draw, share = physical_draws(model, x, safe, y, threat, target)
        pred = per_draw[:, 0]
        met = share > 0.5 if threat.physical.rule == "majority" else share == 1  # all; mean: in every draw
        adversarial = met & valid
    else:
        pred = predict(model, safe)
        adversarial = goal_met(pred, y, target) & valid
    if threat.quantize == "8bit":
        quant_fail = before & valid & ~adversarial
    return AuditReport(valid=valid, adversarial=adversarial, pred_adv=pred, quantization_failures=quant_fail,
                       x_scored=safe, ssim=similarity, physical_share=share, physical_draws=per_draw)


# ---------------------------------------------------------------------- regions
def region_corners(threat: ThreatModel, n: int, height: int, width: int,
                   generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """Each example's region corner (N, 2) (row, col): the fixed one, or drawn uniformly among
    the corners that keep the square inside the image (from ``generator``); None for ``any``."""
    region = threat.region
    if region is None or region.location == "any":
        return None
    region.check_fits(height, width)
    if region.location == "fixed":
        return torch.tensor([list(region.at)], dtype=torch.long, device=device).expand(n, 2).clone()
    rows = torch.randint(0, height - region.size + 1, (n,), generator=generator, device="cpu")
    cols = torch.randint(0, width - region.size + 1, (n,), generator=generator, device="cpu")
    return torch.stack([rows, cols], dim=1).to(device)


def region_mask(corners: torch.Tensor, size: int, height: int, width: int) -> torch.Tensor:
    """(N, 1, H, W) bool: True inside each example's ``size`` x ``size`` square at ``corners``."""
    r = torch.arange(height, device=corners.device).view(1, height, 1)
    c = torch.arange(width, device=corners.device).view(1, 1, width)
    r0, c0 = corners[:, 0].view(-1, 1, 1), corners[:, 1].view(-1, 1, 1)
    inside = (r >= r0) & (r < r0 + size) & (c >= c0) & (c < c0 + size)
    return inside.unsqueeze(1)


def inside_region(x_adv: torch.Tensor, x: torch.Tensor, region: Region, corners: torch.Tensor | None) -> torch.Tensor:
    """Per example, whether every changed pixel lies inside its square (NCHW). For ``any``: the
    bounding box of the changed pixels is at most ``size`` on each side."""
    if x.dim() != 4:
        return torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)  # a region needs images
    changed = (torch.nan_to_num(x_adv, nan=math.inf) != x).any(dim=1)  # (N, H, W)
    n, h, w = changed.shape
    if corners is not None:
        mask = region_mask(corners, region.size, h, w)[:, 0]
        return ~(changed & ~mask).flatten(1).any(dim=1)
    rows_any, cols_any = changed.any(dim=2), changed.any(dim=1)  # (N, H), (N, W)
    return (_extent(rows_any) <= region.size) & (_extent(cols_any) <= region.size)


def _extent(hit: torch.Tensor) -> torch.Tensor:
    """Per row of a bool matrix, last True index - first True index + 1 (0 where none is True)."""
    idx = torch.arange(hit.shape[1], device=hit.device)
    first = torch.where(hit, idx, hit.shape[1]).amin(dim=1)
    last = torch.where(hit, idx, -1).amax(dim=1)
    return (last - first + 1).clamp_min(0)


# ---------------------------------------------------------------------- universal perturbations
def apply_universal(x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, universal: torch.Tensor,
                    corners: torch.Tensor | None = None) -> torch.Tensor:
    """Every example with the shared perturbation: ``clip(x + delta)`` (``universal`` (1, C, H, W),
    or (K, C, H, W) indexed by the label with ``shared_by: class``), or under a region the patch
    ``universal`` (1 or K, C, S, S) pasted at each example's corner."""
    pick = universal[y] if threat.shared_by == "class" else universal.expand(x.shape[0], *universal.shape[1:])
    if threat.region is None:
        return threat.clip(x + pick.to(x.dtype))
    if corners is None:
        raise ValueError("a universal patch needs each example's corner")
    s = threat.region.size
    n, _, h, w = x.shape
    mask = region_mask(corners, s, h, w)
    canvas = torch.zeros_like(x)
    r = corners[:, 0].view(n, 1, 1) + torch.arange(s, device=x.device).view(1, s, 1)
    c = corners[:, 1].view(n, 1, 1) + torch.arange(s, device=x.device).view(1, 1, s)
    batch = torch.arange(n, device=x.device).view(n, 1, 1)
    canvas.permute(0, 2, 3, 1)[batch, r, c] = pick.to(x.dtype).permute(0, 2, 3, 1)
    return torch.where(mask, canvas, x)


def shared(x_adv: torch.Tensor, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
           universal: torch.Tensor | None, corners: torch.Tensor | None) -> torch.Tensor:
    """Per example, whether ``x_adv`` is exactly the claimed universal perturbation applied to
    ``x``, and that perturbation is finite and in budget (False everywhere without one)."""
    n = x.shape[0]
    if universal is None or not isinstance(universal, torch.Tensor) or universal.dim() != x.dim():
        return torch.zeros(n, dtype=torch.bool, device=x.device)
    rows_needed = int(y.max()) + 1 if threat.shared_by == "class" else 1
    if universal.shape[0] < rows_needed or (threat.shared_by != "class" and universal.shape[0] != 1):
        return torch.zeros(n, dtype=torch.bool, device=x.device)
    expected = (x.shape[1], threat.region.size, threat.region.size) if threat.region is not None else tuple(x.shape[1:])
    if tuple(universal.shape[1:]) != expected or not bool(torch.isfinite(universal).all()):
        return torch.zeros(n, dtype=torch.bool, device=x.device)
    universal = universal.to(x.device)
    if threat.region is None:  # the perturbation itself in the ball (about the zero image)
        zero = torch.zeros_like(universal)
        budget_ok = ThreatModel(norm=threat.norm, eps=threat.eps, bounds=(-1e30, 1e30)).contains(universal, zero)
    else:  # the patch's pixels are image values
        budget_ok = threat.in_bounds(universal)
    ok = budget_ok[y] if threat.shared_by == "class" else budget_ok.expand(n)
    same = (apply_universal(x, y, threat, universal, corners) == x_adv).flatten(1).all(dim=1)
    return ok & same


# ---------------------------------------------------------------------- physical feed
def physical_draws(model: nn.Module, x: torch.Tensor, x_scored: torch.Tensor, y: torch.Tensor,
                   threat: ThreatModel, target: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's prediction on each of ``draws`` seeded draws of the physical transformation of
    each image, (N, draws), and per example the share of the draws in which the goal is met.

    A random transformation draws each example's randomness from its own generator, seeded by
    the threat's seed, the draw and the example's clean image (``x``'s bytes): an example's
    verdict does not depend on the batch it is audited in, nor on the batch size."""
    phys = threat.physical
    assert phys is not None
    transform = phys.build()
    seeds = _example_seeds(x, phys.seed) if getattr(transform, "random", False) else None
    met = torch.zeros(x_scored.shape[0], dtype=torch.float64, device=x_scored.device)
    preds = []
    for d in range(phys.draws):
        if seeds is None:
            seen = transform(x_scored)
        else:
            seen = torch.cat([transform(x_scored[i : i + 1], torch.Generator(device="cpu").manual_seed(_mix(s, d)))
                              for i, s in enumerate(seeds)])
        pred = predict(model, seen)
        preds.append(pred)
        met += goal_met(pred, y, target).double()
    return torch.stack(preds, dim=1), met / phys.draws


def _example_seeds(x: torch.Tensor, seed: int) -> list[int]:
    """Per example, a 63-bit seed from ``seed`` and the bytes of its clean image."""
    rows = x.detach().to("cpu", torch.float32).contiguous().reshape(x.shape[0], -1).numpy()
    prefix = seed.to_bytes(8, "little")
    return [int.from_bytes(hashlib.sha256(prefix + r.tobytes()).digest()[:8], "little") >> 1 for r in rows]


def _mix(seed: int, draw: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{draw}".encode()).digest()[:8], "little") >> 1
