"""BPDA and EoT gradients through chains of defense stages, seeding, flattening, ``adaptive()``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advbench.defenses import (
    JPEG,
    AdaptiveModel,
    BitDepth,
    DefendedModel,
    Median,
    Randomization,
    Thermometer,
    adaptive,
    needs_adaptive,
)

LEVELS = 8


def _linear(in_channels: int, size: int, classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * size * size, classes)).double()


def _soft(u: torch.Tensor, levels: int = LEVELS) -> torch.Tensor:
    """The soft thermometer written out: bit k of channel c at c * levels + k is clamp(l u - k, 0, 1)."""
    bits = [torch.clamp(levels * u - k, 0, 1) for k in range(levels)]
    return torch.stack(bits, dim=2).flatten(1, 2)


def _grad(f, x: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(x), x)
    return g


@torch.no_grad()
def _central_differences(f, x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    g = torch.empty(x.numel(), dtype=x.dtype)
    for i in range(x.numel()):
        e = torch.zeros(x.numel(), dtype=x.dtype)
        e[i] = eps
        g[i] = (f(x + e.view_as(x)) - f(x - e.view_as(x))) / (2 * eps)
    return g.view_as(x)


def _inputs(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    # away from 0 and 1, so that no quantized value lands on a ramp's end
    return 0.1 + 0.8 * torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_bpda_gradient_through_bit_depth_then_thermometer():
    clf = _linear(LEVELS, 4)
    model = DefendedModel([BitDepth(bits=3), Thermometer(levels=LEVELS)], clf)
    view = adaptive(model)
    assert isinstance(view, AdaptiveModel) and view.bpda
    x = _inputs((2, 1, 4, 4), 0)
    w = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.2, -1.0]], dtype=torch.float64)
    bpda = _grad(lambda v: (view(v) * w).sum(), x)
    # each surrogate at its own real input: identity for bit depth, the soft ramp at q = bit_depth(x)
    q = torch.round(x * 7) / 7
    composed = lambda u: (clf(_soft(u)) * w).sum()
    analytic = _grad(composed, q)
    assert bpda.abs().sum() > 0
    assert torch.allclose(bpda, analytic, atol=1e-12)
    assert torch.allclose(bpda, _central_differences(composed, q), atol=1e-7)
    # closed form: d/dx of sum_k a_k clamp(l x - k, 0, 1) is l * a_k on the ramp bit k = floor(l q)
    weight = (w @ clf[1].weight).view(2, 1, LEVELS, 4, 4)  # d loss / d code, per example
    ramp = (LEVELS * q).floor().long().unsqueeze(2)
    assert torch.allclose(bpda, LEVELS * weight.gather(2, ramp).squeeze(2), atol=1e-12)
    # the forward pass is the real one
    assert torch.equal(view(x), model(x)) and torch.equal(model(x), clf(Thermometer(levels=LEVELS).transform(q)))


def test_bpda_gradient_through_median_jpeg_thermometer():
    clf = _linear(LEVELS, 6, seed=1)
    model = DefendedModel([Median(size=3), JPEG(quality=50), Thermometer(levels=LEVELS)], clf)
    x = _inputs((1, 1, 6, 6), 1)  # continuous values: no ties in the median's windows
    loss = lambda logits: logits[:, 0].sum() - logits[:, 2].sum()
    bpda = _grad(lambda v: loss(adaptive(model)(v)), x)
    # chain rule, each stage at its own real input: the soft ramp at u = jpeg(median(x)), JPEG's
    # identity, then the median's own Jacobian at x (a vector-Jacobian product)
    u = JPEG(quality=50).transform(Median(size=3).transform(x))
    outer = lambda v: loss(clf(_soft(v)))
    g_u = _grad(outer, u)
    assert torch.allclose(g_u, _central_differences(outer, u), atol=1e-7)
    xg = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(Median(size=3).transform(xg), xg, grad_outputs=g_u)
    assert bpda.abs().sum() > 0
    assert torch.allclose(bpda, expected, atol=1e-12)
    along = lambda v: (Median(size=3).transform(v) * g_u).sum()
    assert torch.allclose(bpda, _central_differences(along, x, eps=1e-7), atol=1e-6)


def test_bpda_gradient_through_jpeg_randomization_thermometer_uses_the_same_draws():
    levels = 7  # area-averaged JPEG values n / 1020 never sit exactly on a ramp end k / 7 in (0, 1)
    clf = _linear(levels, 6, seed=2)
    stages = [JPEG(quality=90), Randomization(min_size=6, pad_size=9), Thermometer(levels=levels)]
    model = DefendedModel(stages, clf, seed=11)
    x = _inputs((3, 1, 6, 6), 2)
    y = torch.tensor([0, 1, 2])
    bpda = _grad(lambda v: F.cross_entropy(adaptive(model, eot_samples=1)(v), y, reduction="sum"), x)
    # the loss's gradient is taken at the real logits (hard code), then carried back through the
    # soft ramp, the same draws of the resize and padding, and JPEG's identity
    rand, u = Randomization(min_size=6, pad_size=9), JPEG(quality=90).transform(x).requires_grad_(True)
    code = rand.transform(u, torch.Generator().manual_seed(11))
    logits = clf(Thermometer(levels=levels).transform(code.detach()))
    d_logits = torch.softmax(logits, 1) - F.one_hot(y, 3)  # d cross-entropy / d logits
    (expected,) = torch.autograd.grad(clf(_soft(code, levels)), u, grad_outputs=d_logits)
    assert bpda.abs().sum() > 0
    assert torch.allclose(bpda, expected, atol=1e-12)
    model.reseed(12)  # other draws, another gradient
    assert not torch.allclose(_grad(lambda v: F.cross_entropy(adaptive(model)(v), y, reduction="sum"), x), expected)


def test_naive_gradient_through_a_non_differentiable_stage_is_zero():
    for stage in (JPEG(), BitDepth(bits=2), Thermometer(levels=LEVELS)):
        clf = _linear(stage.out_channels(1), 5)
        model = DefendedModel([stage], clf)
        x = _inputs((2, 1, 5, 5), 3).requires_grad_(True)
        model(x).sum().backward()  # the naive attacker: autograd through the real forward pass
        assert x.grad is not None and torch.equal(x.grad, torch.zeros_like(x)), stage
        # BPDA gives a useful one
        bpda = _grad(lambda v, m=model: adaptive(m)(v).sum(), x)
        assert bpda.abs().sum() > 0, stage


def test_eot_gradient_is_the_mean_of_per_draw_gradients():
    draws, seed, size, pad = 6, 5, 5, 8
    clf = _linear(2, size, seed=3)
    rand = Randomization(min_size=size, pad_size=pad, mode="bilinear")
    model = DefendedModel([rand], clf, seed=seed)
    view = adaptive(model, eot_samples=draws)
    assert isinstance(view, AdaptiveModel) and view.eot_samples == draws and not view.bpda
    x = _inputs((2, 2, size, size), 4)
    y, t = torch.tensor([0, 1]), torch.tensor([2, 0])

    def margin(logits: torch.Tensor) -> torch.Tensor:  # linear in the logits
        return (logits.gather(1, t[:, None]) - logits.gather(1, y[:, None])).sum()

    eot = _grad(lambda v: margin(view(v)), x)
    # the EoT batch is draws x batch copies; copy i * batch + b is draw i of example b
    sizes, tops, lefts = rand.draw(draws * 2, size, size, torch.Generator().manual_seed(seed), x.device)

    def draw_logits(v: torch.Tensor, i: int) -> torch.Tensor:
        """The classifier's logits on draw i, the resize and padding written out per example."""
        outs = []
        for b in range(2):
            j = i * 2 + b
            s, top, left = int(sizes[j]), int(tops[j]), int(lefts[j])
            small = F.interpolate(v[b : b + 1], size=(s, s), mode="bilinear", align_corners=False)
            canvas = F.pad(small, (left, pad - s - left, top, pad - s - top))
            outs.append(F.interpolate(canvas, size=(size, size), mode="area"))
        return clf(torch.cat(outs))

    per_draw = torch.stack([_grad(lambda v, i=i: margin(draw_logits(v, i)), x) for i in range(draws)])
    assert torch.allclose(eot, per_draw.mean(0), atol=1e-12)
    assert not torch.allclose(per_draw[0], per_draw[1], atol=1e-6)  # the draws do differ
    model.reseed()
    mean_logits = torch.stack([draw_logits(x, i) for i in range(draws)]).mean(0)
    assert torch.allclose(view(x), mean_logits, atol=1e-12)


def test_seeded_model_is_reproducible_and_reseed_restarts_it():
    clf = _linear(1, 8)
    x = _inputs((4, 1, 8, 8), 5)
    a, b = DefendedModel([Randomization()], clf, seed=3), DefendedModel([Randomization()], clf, seed=3)
    first = a(x)
    assert torch.equal(first, b(x))
    second = a(x)
    assert not torch.equal(first, second)  # each call draws anew
    a.reseed()
    assert torch.equal(a(x), first) and torch.equal(a(x), second)
    a.reseed(4)
    assert a.seed == 4
    other = a(x)
    assert not torch.equal(other, first) and torch.equal(other, DefendedModel([Randomization()], clf, seed=4)(x))


def test_nested_defended_models_flatten():
    torch.manual_seed(0)
    clf = nn.Sequential(nn.Conv2d(3 * LEVELS, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    inner = DefendedModel([Thermometer(levels=LEVELS)], clf)
    outer = DefendedModel([JPEG(), Randomization()], inner, seed=1)
    assert [type(s) for s in outer.stages] == [JPEG, Randomization, Thermometer]
    assert outer.classifier is clf
    assert not outer.differentiable and outer.randomized and needs_adaptive(outer)
    x = torch.rand(2, 3, 8, 8)
    assert outer(x).shape == (2, 10)
    view = adaptive(outer, eot_samples=3)
    assert view.bpda and view.eot_samples == 3
    xg = x.clone().requires_grad_(True)
    view(xg).logsumexp(1).sum().backward()
    assert xg.grad.abs().sum() > 0


def test_adaptive_leaves_what_needs_no_adaptation():
    clf = _linear(1, 6)
    assert adaptive(clf, eot_samples=8) is clf and not needs_adaptive(clf)
    plain = DefendedModel([Median(size=3)], clf)  # deterministic and differentiable
    assert adaptive(plain, eot_samples=8) is plain and not needs_adaptive(plain)
    rand = adaptive(DefendedModel([Randomization(min_size=6, pad_size=8)], clf), eot_samples=4)
    assert isinstance(rand, AdaptiveModel) and rand.eot_samples == 4 and not rand.bpda
    det = adaptive(DefendedModel([BitDepth()], clf), eot_samples=4)
    assert isinstance(det, AdaptiveModel) and det.eot_samples == 1 and det.bpda  # no draws to average


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_eot_samples_must_be_a_whole_number(bad):
    from advbench.errors import ConfigError

    with pytest.raises(ConfigError, match="eot_samples"):
        adaptive(DefendedModel([Randomization()], _linear(1, 6)), eot_samples=bad)
