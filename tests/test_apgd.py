"""APGD and APGD-T against their paper's definitions and the original AutoAttack code.

The differential checks run advbench's ``apgd``/``apgd-t`` and pyautoattack's ``APGDAttack`` /
``APGDAttack_targeted`` (the reference, never used by advbench itself) on the same model, data,
eps and iterations. Both draw their random start from a seeded CPU generator in the same order,
so on one machine they usually agree example for example; the tests allow two examples of
difference (float64 against float32 norms can move a borderline example).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from advbench.attacks.apgd import checkpoints, dlr_loss, dlr_targeted_loss
from advbench.errors import ConfigError
from advbench.registry import ATTACKS
from advbench.threat import Norm, ThreatModel, project_l1_box

pyautoattack = pytest.importorskip("pyautoattack.autopgd_base")

N = 120


@pytest.fixture(scope="module")
def correct(digits_test, digits_mlp):
    x, y = digits_test.x[:200], digits_test.y[:200]
    with torch.no_grad():
        keep = digits_mlp(x).argmax(dim=1) == y
    return x[keep][:N], y[keep][:N]


def _robust(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor) -> int:
    with torch.no_grad():
        return int((model(x_adv).argmax(dim=1) == y).sum())


def _ours(name: str, model, x, y, threat, seed, **kw) -> int:
    result = ATTACKS.create(name, **kw)(model, x, y, threat, generator=torch.Generator().manual_seed(seed))
    return int((~result.success).sum())


@pytest.mark.parametrize("norm, eps", [("linf", 0.1), ("l2", 0.8), ("l1", 2.0)])
@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_apgd_matches_the_reference(norm, eps, loss, correct, digits_mlp):
    x, y = correct
    ref_norm = {"linf": "Linf", "l2": "L2", "l1": "L1"}[norm]
    for seed in (0, 1):
        ref = pyautoattack.APGDAttack(digits_mlp, n_iter=40, norm=ref_norm, eps=eps, seed=seed, loss=loss,
                                      n_restarts=1, use_largereps=norm == "l1", device="cpu")
        expected = _robust(digits_mlp, ref.perturb(x.clone(), y.clone()), y)
        got = _ours("apgd", digits_mlp, x, y, ThreatModel(norm=norm, eps=eps), seed, steps=40, loss=loss,
                    l1_eps_schedule=norm == "l1")
        assert 0 < expected < len(y), "eps should leave robust accuracy strictly between 0 and 100%"
        assert abs(got - expected) <= 2, f"seed {seed}: advbench leaves {got} robust, the reference {expected}"


@pytest.mark.parametrize("norm, eps", [("linf", 0.1), ("l2", 0.8)])
def test_apgd_t_matches_the_reference(norm, eps, correct, digits_mlp):
    x, y = correct
    ref = pyautoattack.APGDAttack_targeted(digits_mlp, n_iter=20, norm={"linf": "Linf", "l2": "L2"}[norm], eps=eps,
                                           seed=0, n_target_classes=4, device="cpu")
    expected = _robust(digits_mlp, ref.perturb(x.clone(), y.clone()), y)
    got = _ours("apgd-t", digits_mlp, x, y, ThreatModel(norm=norm, eps=eps), 0, steps=20, targets=4)
    assert abs(got - expected) <= 2


def test_checkpoints_follow_the_paper():
    """p0 = 0, p1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), in iterations."""
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    p, marks = [0.0, 0.22], [220]
    while True:
        nxt = p[-1] + max(p[-1] - p[-2] - 0.03, 0.06)
        if nxt > 1 + 1e-9:
            break
        p.append(nxt)
        marks.append(round(1000 * nxt))
    assert checkpoints(1000) == marks


def test_dlr_losses_are_shift_and_scale_invariant():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 10, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    t = (y + 1 + torch.randint(0, 9, (64,), generator=g)) % 10
    for loss in (lambda a: dlr_loss(a, y), lambda a: dlr_targeted_loss(a, y, t)):
        assert torch.allclose(loss(z), loss(3.0 * z + 7.0), atol=1e-5)
    zs = z.sort(dim=1).values
    z_y = z.gather(1, y[:, None]).squeeze(1)
    other = z.scatter(1, y[:, None], -math.inf).amax(dim=1)
    assert torch.allclose(dlr_loss(z, y), -(z_y - other) / (zs[:, -1] - zs[:, -3]), atol=1e-6)
    z_t = z.gather(1, t[:, None]).squeeze(1)
    assert torch.allclose(dlr_targeted_loss(z, y, t), -(z_y - z_t) / (zs[:, -1] - (zs[:, -3] + zs[:, -4]) / 2), atol=1e-6)


def test_dlr_needs_enough_classes():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    x, y = torch.rand(3, 1, 2, 2), torch.tensor([0, 1, 0])
    with pytest.raises(ConfigError, match="at least 3 classes"):
        ATTACKS.create("apgd", loss="dlr", steps=2)(model, x, y, ThreatModel(eps=0.1))
    with pytest.raises(ConfigError, match="at least 4 classes"):
        ATTACKS.create("apgd-t", steps=2)(model, x, y, ThreatModel(eps=0.1))


def test_l1_projection_is_exact():
    """Against bisection on the multiplier of the same problem, and never outside ball or box."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 30, generator=g)
    v = 2 * torch.randn(16, 30, generator=g, dtype=torch.float64).float()
    eps = 3.0
    d = project_l1_box(v, x, eps, (0.0, 1.0)).double()
    assert (d.abs().sum(dim=1) <= eps * (1 + 1e-6)).all()
    assert ((x + d) >= -1e-7).all() and ((x + d) <= 1 + 1e-7).all()
    vv, xx = v.double(), x.double()
    room = torch.where(vv >= 0, 1 - xx, xx)
    lo, hi = torch.zeros(16, 1, dtype=torch.float64), vv.abs().amax(dim=1, keepdim=True)
    for _ in range(200):
        mid = (lo + hi) / 2
        norm = torch.minimum((vv.abs() - mid).clamp_min(0), room).sum(dim=1, keepdim=True)
        lo, hi = torch.where(norm > eps, mid, lo), torch.where(norm > eps, hi, mid)
    inside = torch.minimum(vv.abs(), room).sum(dim=1, keepdim=True) <= eps
    lam = torch.where(inside, torch.zeros_like(hi), hi)
    expected = vv.sign() * torch.minimum((vv.abs() - lam).clamp_min(0), room)
    assert torch.allclose(d, expected, atol=1e-5)


def test_apgd_under_8bit_quantization_counts_the_saved_image(correct, digits_mlp):
    x, y = correct
    threat = ThreatModel(norm=Norm.LINF, eps=0.1, quantize="8bit")
    x8 = (x * 255).round() / 255
    result = ATTACKS.create("apgd", steps=20)(digits_mlp, x8, y, threat, generator=torch.Generator().manual_seed(0))
    levels = result.x_adv * 255
    assert (levels - levels.round()).abs().max() < 1e-3  # on the 8-bit grid
    with torch.no_grad():
        assert torch.equal(digits_mlp(result.x_adv).argmax(dim=1) != y, result.success)
    assert result.success.float().mean() > 0.2
