"""The math of each inference-time defense stage: thermometer, randomization, JPEG, bit depth, median."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F

from advbench.defenses import (
    JPEG,
    BitDepth,
    InputTransform,
    Median,
    Randomization,
    Thermometer,
)
from advbench.errors import ConfigError
from advbench.registry import DEFENSES


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _smooth(channels: int, size: int = 16) -> torch.Tensor:
    """A smooth (1, channels, size, size) image in [0.1, 0.9]: JPEG's easy case."""
    t = torch.linspace(0, 1, size)
    waves = [torch.sin(3 * t[:, None] + 2 * t[None, :] + 0.5 * c) for c in range(channels)]
    return (0.5 + 0.4 * torch.stack(waves)).unsqueeze(0)


# ---------------------------------------------------------------------------- registry
def test_registry_names_and_params():
    assert {"thermometer", "randomization", "jpeg", "bit_depth", "median"} <= set(DEFENSES.list())
    assert DEFENSES.create("thermometer", levels=8).levels == 8
    assert DEFENSES.create("jpeg").quality == 75
    assert DEFENSES.create("bit_depth").bits == 4
    assert DEFENSES.create("median").size == 3
    r = DEFENSES.create("randomization", min_size=28, pad_size=32)
    assert r.params() == {"min_size": 28, "pad_size": 32, "resize_back": True, "mode": "nearest", "pad_value": 0.0}
    assert repr(DEFENSES.create("bit_depth", bits=2)) == "BitDepth(bits=2)"
    with pytest.raises(ConfigError, match="allowed: levels"):
        DEFENSES.create("thermometer", level=8)


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("thermometer", {"levels": 1}, "levels"),
        ("thermometer", {"levels": 2.0}, "levels"),
        ("thermometer", {"levels": True}, "levels"),
        ("randomization", {"min_size": 0}, "min_size"),
        ("randomization", {"pad_size": 28.5}, "pad_size"),
        ("randomization", {"min_size": 32, "pad_size": 32}, "pad_size must be larger"),
        ("randomization", {"mode": "bicubic"}, "mode: Input should be 'nearest' or 'bilinear'"),
        ("randomization", {"resize_back": "yes"}, "resize_back"),
        ("randomization", {"pad_value": 1.5}, "pad_value: Input should be less than or equal to 1"),
        ("jpeg", {"quality": 0}, "quality: Input should be greater than or equal to 1"),
        ("jpeg", {"quality": 101}, "quality"),
        ("jpeg", {"quality": 75.0}, "quality"),
        ("bit_depth", {"bits": 0}, "bits: Input should be greater than or equal to 1"),
        ("bit_depth", {"bits": 9}, "bits"),
        ("median", {"size": 1}, "size"),
        ("median", {"size": "3"}, "size"),
    ],
)
def test_bad_parameters_are_config_errors(name, params, match):
    with pytest.raises(ConfigError, match=match):
        DEFENSES.create(name, **params)


def test_tags():
    tags = {n: (DEFENSES.get(n).factory.differentiable, DEFENSES.get(n).factory.randomized) for n in DEFENSES.list()}
    assert tags["thermometer"] == (False, False)
    assert tags["randomization"] == (True, True)
    assert tags["jpeg"] == (False, False)
    assert tags["bit_depth"] == (False, False)
    assert tags["median"] == (True, False)
    assert all(issubclass(DEFENSES.get(n).factory, InputTransform) for n in tags)


# ---------------------------------------------------------------------------- thermometer
def test_thermometer_levels_and_boundaries():
    t = Thermometer(levels=4)  # thresholds 0, 1/4, 2/4, 3/4; bit k = x > k/4 (strict)
    x = torch.tensor([0.0, 0.1, 0.25, 0.3, 0.5, 0.74, 0.75, 0.76, 1.0]).view(1, 1, 1, -1)
    expected = [
        [0, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0],
        [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1],
    ]
    out = t.transform(x)
    assert out.shape == (1, 4, 1, 9) and out.dtype == x.dtype
    assert out[0, :, 0, :].T.tolist() == expected
    # ten levels: 0.66 sets the bits k = 0..6 (x > 0, 0.1, ..., 0.6)
    bits = Thermometer(levels=10).transform(torch.full((1, 1, 1, 1), 0.66)).flatten().tolist()
    assert bits == [1, 1, 1, 1, 1, 1, 1, 0, 0, 0]


def test_thermometer_channel_layout_and_out_channels():
    t = Thermometer(levels=16)
    assert t.out_channels(1) == 16 and t.out_channels(3) == 48
    x = torch.tensor([0.3, 0.8]).view(1, 2, 1, 1).expand(2, 2, 3, 5).contiguous()
    out = t.transform(x)
    assert out.shape == (2, t.out_channels(2), 3, 5)
    # channel-major: channel c's 16 bits are output channels 16c .. 16c + 15
    assert out[0, :16, 0, 0].sum().item() == 5  # ceil(16 * 0.3)
    assert out[0, 16:, 0, 0].sum().item() == 13  # ceil(16 * 0.8)
    assert torch.equal(out[:, :16], Thermometer(levels=16).transform(x[:, :1]))


def test_thermometer_surrogate_matches_hard_code():
    levels = 16
    t = Thermometer(levels=levels)
    grid = (torch.arange(levels + 1, dtype=torch.float64) / levels).view(1, 1, 1, -1)
    assert torch.equal(t.surrogate(grid), t.transform(grid))  # exact at every level boundary j / l
    x = torch.rand(1, 1, 1, 200, generator=_gen(1), dtype=torch.float64)
    hard, soft = t.transform(x), t.surrogate(x)
    assert torch.equal(torch.ceil(soft), hard)
    assert torch.allclose(soft.sum(1), levels * x.squeeze(1))  # the soft code counts the value
    # away from the thresholds they agree: only bit floor(l x) (the ramp x sits on) differs
    ramp_bit = (x * levels).floor().long().squeeze(1)  # (1, 1, 200)
    differs = (soft != hard).squeeze(0)  # (levels, 1, 200)
    bit_index = torch.arange(levels).view(-1, 1, 1)
    assert torch.equal(differs, bit_index == ramp_bit)
    # its gradient is l on that bit, 0 elsewhere
    xg = x.clone().requires_grad_(True)
    (jac,) = torch.autograd.grad(t.surrogate(xg)[0, :, 0, 7].sum(), xg)
    assert jac[0, 0, 0, 7].item() == levels and jac.abs().sum().item() == levels


# ---------------------------------------------------------------------------- randomization
@pytest.mark.parametrize(("size", "expected"), [(28, (28, 32)), (32, (32, 40)), (8, (8, 16))])
def test_randomization_default_sizes(size, expected):
    r = Randomization()
    assert r.sizes(size, size) == expected
    assert r.output_size(size, size) == (size, size)
    assert Randomization(resize_back=False).output_size(size, size) == (expected[1],) * 2
    assert Randomization(min_size=size, pad_size=size + 3).sizes(size, size) == (size, size + 3)


def test_randomization_draws_cover_the_ranges():
    r = Randomization(min_size=5, pad_size=9)
    size, top, left = r.draw(4000, 5, 5, _gen(0), torch.device("cpu"))
    assert set(size.tolist()) == {5, 6, 7, 8}
    assert (top >= 0).all() and (left >= 0).all() and (top <= 9 - size).all() and (left <= 9 - size).all()
    for s in (5, 8):  # both extreme offsets occur for the smallest and largest size
        assert {0, 9 - s} <= set(top[size == s].tolist()) and {0, 9 - s} <= set(left[size == s].tolist())
    counts = torch.bincount(size - 5).double()
    assert (counts / counts.sum() - 0.25).abs().max() < 0.04  # uniform over the sizes


@pytest.mark.parametrize("pad_value", [0.0, 0.5])
def test_randomization_pads_at_the_drawn_position(pad_value):
    r = Randomization(min_size=6, pad_size=10, resize_back=False, pad_value=pad_value)
    x = torch.ones(64, 1, 6, 6)
    size, top, left = r.draw(64, 6, 6, _gen(3), torch.device("cpu"))
    out = r.transform(x, _gen(3))  # same seed: the same draws
    assert out.shape == (64, 1, 10, 10)
    for i in range(64):  # exactly an r x r block of ones at (top, left), pad_value around it
        block = torch.full((10, 10), pad_value)
        block[top[i] : top[i] + size[i], left[i] : left[i] + size[i]] = 1
        assert torch.equal(out[i, 0], block), i


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_randomization_content_is_the_resized_image(mode):
    r = Randomization(min_size=7, pad_size=12, resize_back=False, mode=mode)
    x = torch.rand(16, 3, 7, 7, generator=_gen(4))
    size, top, left = r.draw(16, 7, 7, _gen(5), torch.device("cpu"))
    out = r.transform(x, _gen(5))
    kw = {"mode": "nearest-exact"} if mode == "nearest" else {"mode": "bilinear", "align_corners": False}
    for i in range(16):
        s, t, le = int(size[i]), int(top[i]), int(left[i])
        assert torch.allclose(out[i, :, t : t + s, le : le + s], F.interpolate(x[i : i + 1], size=(s, s), **kw)[0])
    if mode == "nearest":  # nearest neighbour keeps pixel values
        assert set(out.unique().tolist()) <= set(x.unique().tolist()) | {0.0}


def test_randomization_is_reproducible_and_per_example():
    r = Randomization()
    x = torch.rand(1, 1, 28, 28, generator=_gen(0)).expand(32, 1, 28, 28)
    a, b = r.transform(x, _gen(7)), r.transform(x, _gen(7))
    assert a.shape == x.shape and torch.equal(a, b)
    assert not torch.equal(a, r.transform(x, _gen(8)))
    distinct = {tuple(a[i].flatten().tolist()) for i in range(32)}
    assert len(distinct) > 16  # identical inputs, independent draws per example
    g = _gen(7)
    r.transform(x, g)
    assert not torch.equal(a, r.transform(x, g))  # a second call draws anew


def test_randomization_gradient_is_the_true_one():
    r = Randomization(min_size=4, pad_size=7)
    x = torch.rand(3, 2, 5, 5, dtype=torch.float64, generator=_gen(1), requires_grad=True)
    # for fixed draws the map is linear: autograd must match finite differences
    assert torch.autograd.gradcheck(lambda v: r.transform(v, _gen(2)), (x,), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_randomization_keeps_dtype_and_device(dtype):
    x = torch.rand(4, 3, 8, 8, dtype=dtype)
    out = Randomization(min_size=8, pad_size=11).transform(x, _gen(0))
    assert out.dtype == dtype and out.device == x.device and out.shape == x.shape
    with pytest.raises(ConfigError, match="pad_size must be larger"):
        Randomization(pad_size=30).transform(torch.rand(1, 1, 32, 32), _gen(0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_randomization_on_cuda_uses_the_generator():
    x = torch.rand(8, 3, 32, 32, device="cuda")
    r = Randomization()
    a = r.transform(x, torch.Generator(device="cuda").manual_seed(1))
    b = r.transform(x, torch.Generator(device="cuda").manual_seed(1))
    assert a.device == x.device and torch.equal(a, b)
    jpeg = JPEG().transform(x)
    assert jpeg.device == x.device and jpeg.shape == x.shape


# ---------------------------------------------------------------------------- JPEG
@pytest.mark.parametrize("channels", [1, 3])
def test_jpeg_quality(channels):
    x = _smooth(channels).repeat(2, 1, 1, 1)
    hi, lo = JPEG(quality=100).transform(x), JPEG(quality=5).transform(x)
    assert hi.shape == lo.shape == x.shape and hi.dtype == x.dtype
    err_hi, err_lo = (hi - x).abs().mean().item(), (lo - x).abs().mean().item()
    assert err_hi < 0.01
    assert err_lo > 0.01 and err_lo > 3 * err_hi
    for out in (hi, lo):  # decoded 8-bit levels
        assert torch.allclose(out * 255, (out * 255).round(), atol=1e-4)
        assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(lo, JPEG(quality=5).transform(x))  # deterministic


def test_jpeg_float64_and_bad_channels():
    x = _smooth(3).double()
    assert JPEG().transform(x).dtype == torch.float64
    assert JPEG().transform(x[:0]).shape == (0, 3, 16, 16)
    with pytest.raises(ConfigError, match="1 .* or 3 .* channels"):
        JPEG().transform(torch.rand(1, 2, 8, 8))


# ---------------------------------------------------------------------------- bit depth
@pytest.mark.parametrize("bits", [1, 2, 4, 5, 8])
def test_bit_depth_has_exactly_2_to_the_bits_levels(bits):
    x = torch.linspace(0, 1, 2001, dtype=torch.float64).view(1, 1, 1, -1)
    out = BitDepth(bits=bits).transform(x)
    top = 2**bits - 1
    levels = out.unique()
    assert len(levels) == 2**bits
    assert torch.allclose(levels, torch.arange(top + 1, dtype=torch.float64) / top)
    assert (out - x).abs().max() <= 0.5 / top + 1e-12  # rounds to the nearest level


def test_bit_depth_one_bit_thresholds_at_half():
    x = torch.tensor([0.0, 0.49, 0.51, 1.0, 1.3, -0.2]).view(1, 1, 1, -1)
    assert BitDepth(bits=1).transform(x).flatten().tolist() == [0, 0, 1, 1, 1, 0]


# ---------------------------------------------------------------------------- median
def test_median_on_a_known_image():
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 2, 2] = 1.0  # an isolated impulse disappears
    x[0, 0, 0, :] = 0.5  # a full row at the border survives (reflection keeps it majority at the edge)
    out = Median(size=3).transform(x)
    assert out[0, 0, 2, 2] == 0
    assert out[0, 0, 0].tolist() == [0.5] * 5 and out[0, 0, 1:].abs().sum() == 0
    y = torch.arange(9.0).view(1, 1, 3, 3)  # 0 1 2 / 3 4 5 / 6 7 8
    assert Median(size=3).transform(y)[0, 0, 1, 1] == 4
    assert Median(size=3).transform(y)[0, 0, 0, 0] == 1  # window 0 0 1 / 0 0 1 / 3 3 4


@pytest.mark.parametrize("size", [2, 3, 4, 5])
def test_median_matches_scipy(size):
    x = torch.rand(2, 3, 9, 7, generator=_gen(size), dtype=torch.float64)
    ours = Median(size=size).transform(x).numpy()
    ref = scipy.ndimage.median_filter(x.numpy(), size=(1, 1, size, size), mode="reflect")
    np.testing.assert_array_equal(ours, ref)


def test_median_gradient_is_the_selection():
    x = torch.rand(1, 2, 6, 6, generator=_gen(9), dtype=torch.float64, requires_grad=True)
    m = Median(size=3)
    assert torch.autograd.gradcheck(m.transform, (x,), eps=1e-7, atol=1e-8)
    (g,) = torch.autograd.grad(m.transform(x)[0, 1, 3, 3], x)
    pick = (x[0, 1, 2:5, 2:5] == m.transform(x)[0, 1, 3, 3]).nonzero()
    assert g.sum().item() == 1 and g[0, 1, 2 + pick[0, 0], 2 + pick[0, 1]].item() == 1


def test_thermometer_surrogate_moves_values_on_the_level_grid():
    """Values on the 1/l grid (0 and 1 included) sit at two ramps' kinks: BPDA must still get a
    gradient there (autograd's clamp alone gives zero), l inside a ramp and l / 2 at its ends."""
    levels = 16
    t = DEFENSES.create("thermometer", levels=levels)
    x = torch.tensor([0.0, 1 / 16, 0.5, 1.0, 0.3], dtype=torch.float64).view(1, 1, 1, 5).requires_grad_(True)
    (g,) = torch.autograd.grad(t.surrogate(x).sum(), x)
    assert g.flatten().tolist() == [levels / 2, levels, levels, levels / 2, levels]
