"""The contract every registered defense keeps, checked for each (as the attack contract is for
each attack): its tags say what it does, its output is in bounds with the shape it declares, and
its parameters are declared once and validated.

- ``randomized`` false: the same input gives the same output twice, whatever the generator;
  ``randomized`` true: the same generator state reproduces the output, another seed changes it.
- ``differentiable`` true: the input gradient is non-zero and matches finite differences;
  false: the surrogate BPDA uses is differentiable, has the transform's shape, and the
  transform's own gradient is zero or missing somewhere (it really is not differentiable).
- the output lies in [0, 1], keeps the batch and has ``out_channels(C)`` channels.
"""

from __future__ import annotations

import pytest
import torch

from advbench.defenses.base import InputTransform
from advbench.errors import ConfigError
from advbench.registry import DEFENSES

NAMES = [n for n in DEFENSES.list() if isinstance(DEFENSES.create(n), InputTransform)]


def batch(channels: int = 3, seed: int = 0) -> torch.Tensor:
    """Smooth images in (0, 1) (so finite differences stay away from the bounds and the corners)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(4, channels, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(low, size=(16, 16), mode="bilinear", align_corners=False)
    return 0.1 + 0.8 * x


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_every_builtin_defense_is_covered():
    assert set(NAMES) >= {"thermometer", "randomization", "jpeg", "bit_depth", "median"}


@pytest.mark.parametrize("name", NAMES)
def test_output_in_bounds_with_the_declared_shape(name):
    stage = DEFENSES.create(name)
    for channels in (1, 3):
        x = batch(channels)
        out = stage.transform(x, gen(0))
        assert out.shape[0] == x.shape[0] and out.shape[1] == stage.out_channels(channels)
        assert out.dtype == x.dtype and bool(torch.isfinite(out).all())
        assert float(out.min()) >= 0 and float(out.max()) <= 1


@pytest.mark.parametrize("name", NAMES)
def test_the_randomized_tag_matches_behaviour(name):
    stage = DEFENSES.create(name)
    x = batch()
    if not stage.randomized:
        assert torch.equal(stage.transform(x, gen(0)), stage.transform(x, gen(1)))
        assert torch.equal(stage.transform(x, None), stage.transform(x, None))
    else:
        assert torch.equal(stage.transform(x, gen(0)), stage.transform(x, gen(0)))
        assert not torch.equal(stage.transform(x, gen(0)), stage.transform(x, gen(1)))


@pytest.mark.parametrize("name", NAMES)
def test_the_differentiable_tag_matches_behaviour(name):
    stage = DEFENSES.create(name)
    x = batch(seed=3).requires_grad_(True)
    w = torch.randn(stage.transform(x.detach(), gen(0)).shape, generator=gen(5))
    if stage.differentiable:
        out = stage.transform(x, gen(0))
        (grad,) = torch.autograd.grad((out * w).sum(), x)
        assert bool((grad != 0).any())
        v = torch.randn(x.shape, generator=gen(7))
        h = 1e-3
        with torch.no_grad():
            up = (stage.transform(x + h * v, gen(0)) * w).sum()
            down = (stage.transform(x - h * v, gen(0)) * w).sum()
        numeric = float((up - down) / (2 * h))
        analytic = float((grad * v).sum())
        assert analytic == pytest.approx(numeric, rel=0.05, abs=1e-3)
    else:
        surrogate = stage.surrogate(x)
        assert surrogate.shape == stage.transform(x.detach(), gen(0)).shape
        (grad,) = torch.autograd.grad((surrogate * w).sum(), x)
        assert bool((grad != 0).any())  # BPDA has a useful gradient
        out = stage.transform(x, gen(0))
        if out.requires_grad:  # the real map's own gradient is useless: zero somewhere it should not be
            (real,) = torch.autograd.grad((out * w).sum(), x, allow_unused=True)
            assert real is None or bool((real == 0).any())


@pytest.mark.parametrize("name", NAMES)
def test_parameters_are_declared_once_and_validated(name):
    stage = DEFENSES.create(name)
    assert stage.params() == {k: getattr(stage.p, k) for k in type(stage.p).model_fields}
    assert type(stage)(**stage.params()).params() == stage.params()  # round trip
    with pytest.raises(ConfigError, match=rf"defense '{name}': unknown parameter\(s\) no_such_parameter"):
        DEFENSES.create(name, no_such_parameter=1)
