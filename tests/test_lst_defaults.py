"""LST's defaults: the restoring correction ends closer to the target than the reference setting, at kept confidence."""

from __future__ import annotations

import math

import torch
from torch import nn

from advbench.blindspots import LevelSetTraversal
from advbench.blindspots.lst import restoring_step
from advbench.blindspots.metrics import rmse
from advbench.blindspots.pairs import sample_pairs

REFERENCE = {"step_size": 0.01, "adv_step": 0.002, "restore": 0.0}  # the reference code's setting


class Radial(nn.Module):
    """Two classes; class 0 has logit a - b |x - c|, so its level sets are spheres around c."""

    def __init__(self, c: torch.Tensor, a: float, b: float) -> None:
        super().__init__()
        self.register_buffer("c", c)
        self.a, self.b = a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.a - self.b * (x.flatten(1) - self.c).norm(dim=1)
        return torch.stack([z, torch.zeros_like(z)], dim=1)


def _radial_case():
    """Source at radius 0.2, target at radius 0.45 and 120 degrees, in [0, 1]^16; a thin band of levels."""
    d, a, b = 16, 82.4, 400.0  # p_src = sigmoid(2.4); p_src - delta lies 0.0037 further out
    g = torch.Generator().manual_seed(0)
    c = torch.full((d,), 0.5, dtype=torch.float64)
    u = torch.randn(2, d, generator=g, dtype=torch.float64)
    u1 = u[0] / u[0].norm()
    v = u[1] - (u[1] @ u1) * u1
    v = v / v.norm()
    ut = math.cos(math.radians(120)) * u1 + math.sin(math.radians(120)) * v
    return Radial(c, a, b), c, (c + 0.2 * u1)[None], (c + 0.45 * ut)[None], ut, a, b


def test_defaults_end_at_the_aimed_level_nearest_the_target():
    model, c, xs, xt, ut, a, b = _radial_case()
    y = torch.tensor([0])
    new = LevelSetTraversal()(model, xs, xt, y)
    p_level = float(new.p_src) - 0.5 * 0.2
    rho_level = (a - math.log(p_level / (1 - p_level))) / b
    closest = c + rho_level * ut  # the point of the sphere p = p_level nearest the target
    assert not bool(new.stopped[0]) and bool(new.within_delta[0])
    assert float((new.x_lst[0] - closest).norm()) < 1e-3
    assert abs(float(new.p_final) - p_level) < 1e-3
    d_new = float((new.x_lst - xt).norm())
    # without a correction, the curvature of the level set stops the traversal early, far from the target
    bare = LevelSetTraversal(restore=0.0)(model, xs, xt, y)
    assert bool(bare.stopped[0]) and int(bare.iterations[0]) < 100
    assert float((bare.x_lst - xt).norm()) > d_new + 0.1
    # the reference's fixed correction pushes the confidence to 1 and the iterate away from the target
    ref = LevelSetTraversal(**REFERENCE)(model, xs, xt, y)
    assert float(ref.p_final) > 0.99 and float((ref.x_lst - xt).norm()) > d_new + 0.1


def test_defaults_end_closer_than_the_reference_on_digits(digits_test, digits_cnn):
    with torch.no_grad():
        pred = digits_cnn(digits_test.x).argmax(1)
    pairs = sample_pairs(digits_test, pred, 12, seed=0)
    source = digits_test.x[pairs.source].repeat_interleave(2, dim=0)
    target = digits_test.x[pairs.targets.reshape(-1)]
    y = pairs.label.repeat_interleave(2)
    new = LevelSetTraversal()(digits_cnn, source, target, y)
    ref = LevelSetTraversal(**REFERENCE)(digits_cnn, source, target, y)
    assert bool(new.within_delta.all()) and bool(ref.within_delta.all())
    d_new, d_ref = rmse(new.x_lst, target), rmse(ref.x_lst, target)
    assert float(d_new.mean()) < 0.8 * float(d_ref.mean()), (float(d_new.mean()), float(d_ref.mean()))
    assert float((d_new < d_ref).float().mean()) >= 0.9
    assert float(new.stopped.float().mean()) <= 0.1


def test_restoring_step_is_the_capped_newton_step():
    g = torch.tensor([[[3.0, 4.0]], [[0.0, 0.0]], [[6e-31, 8e-31]], [[0.0, 2.0]]])
    amount = torch.tensor([0.5, 0.5, 1e-30, 10.0])
    step = restoring_step(g, amount, torch.tensor([1.0, 1.0, 1.0, 0.5]))
    # raises log p_j = -CE by `amount` to first order: g . step = -amount, along -g
    assert torch.allclose(step[0], -0.5 / 25 * g[0])
    assert torch.equal(step[1], torch.zeros_like(g[1]))  # no gradient: no step
    assert torch.allclose(step[2], torch.tensor([[-0.6, -0.8]]))  # a tiny gradient: still a clean step
    assert torch.allclose(step[3], torch.tensor([[0.0, -0.5]]))  # capped at max_length


def test_the_correction_acts_only_below_the_level():
    torch.manual_seed(0)
    x, g, t = torch.rand(3, 1, 2, 2), torch.randn(3, 1, 2, 2), torch.rand(3, 1, 2, 2)
    lst = LevelSetTraversal(bounds=(-10.0, 10.0))
    zero = torch.zeros(3)
    plain, _ = lst.step(x, g, t, torch.zeros_like(x))
    assert torch.equal(lst.step(x, g, t, torch.zeros_like(x), zero)[0], plain)
    off = LevelSetTraversal(restore=0.0, bounds=(-10.0, 10.0))
    assert torch.equal(off.step(x, g, t, torch.zeros_like(x), torch.ones(3))[0], plain)
    moved, _ = lst.step(x, g, t, torch.zeros_like(x), torch.full((3,), 1e-3))
    assert bool(((moved - plain).flatten(1) * g.flatten(1)).sum(1).lt(0).all())  # along -g: confidence up
