"""Carlini-Wagner (advbench.attacks.cw): its pieces, the paper's definitions on models whose
answer is known in closed form, and foolbox's L2CarliniWagnerAttack on the digits models.

The closed-form model is a two-class linear classifier z = (0, w.x + b) around x = 0.5, where
the smallest perturbation that flips the class is known exactly in every norm (the box never
binds there): l2 |s| / ||w||_2, linf |s| / ||w||_1 (s = w.x + b), and l0 the fewest
coordinates whose largest possible moves add up to |s|.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from advbench.attacks.cw import CarliniWagner, cw_objective, from_tanh_space, search_const, to_tanh_space
from advbench.errors import ConfigError
from advbench.registry import ATTACKS
from advbench.threat import ThreatModel


class TwoClassLinear(nn.Module):
    """Logits (0, w.x + b): class 1 exactly where w.x + b > 0."""

    def __init__(self, w: torch.Tensor, b: float) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone(), requires_grad=False)
        self.b = b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.flatten(1) @ self.w + self.b
        return torch.stack([torch.zeros_like(s), s], dim=1)


@pytest.fixture(scope="module")
def linear_case():
    """8 examples 1x8x8 at signed distances r along w's direction from the decision boundary,
    plus noise orthogonal to w: model, x, labels, and s = w.x + b."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, generator=g) / 8
    u = w / w.norm()
    r = torch.tensor([0.15, -0.2, 0.3, -0.35, 0.25, 0.4, -0.1, 0.5])
    noise = 0.1 * (2 * torch.rand(8, 64, generator=g) - 1)
    noise -= (noise @ u).unsqueeze(1) * u  # orthogonal to w: the distance stays r
    x = (0.5 + r.unsqueeze(1) * u + noise).view(8, 1, 8, 8)
    model = TwoClassLinear(w, -0.5 * float(w.sum())).eval()
    s = x.flatten(1) @ w - 0.5 * float(w.sum())
    y = (s > 0).long()
    return model, x, y, s


def optimal_l0(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Fewest coordinates to change to flip the class: each coordinate can move s by at most
    w_j (1 - x_j) up or w_j x_j down (with its sign); take the largest moves first."""
    xf = x.flatten(1)
    down = torch.where(w > 0, w * xf, -w * (1 - xf))  # largest decrease of s per coordinate
    up = torch.where(w > 0, w * (1 - xf), -w * xf)
    moves = torch.where((s > 0).unsqueeze(1), down, up).sort(dim=1, descending=True).values
    return ((moves.cumsum(dim=1) < s.abs().unsqueeze(1)).sum(dim=1) + 1).float()


# ---------------------------------------------------------------------- pieces
@pytest.mark.parametrize("bounds", [(0.0, 1.0), (-1.0, 2.0)])
def test_change_of_variables_round_trips_and_stays_in_bounds(bounds):
    lo, hi = bounds
    x = torch.cat([torch.tensor([lo, hi, (lo + hi) / 2]), lo + (hi - lo) * torch.rand(1000, generator=torch.Generator().manual_seed(0))])
    w = to_tanh_space(x, bounds)
    assert torch.isfinite(w).all()  # the 1e-6 shrink keeps the bounds themselves finite
    assert torch.allclose(from_tanh_space(w, bounds), x, atol=1e-6 * (hi - lo), rtol=0)
    extreme = torch.tensor([-1e6, -30.0, -1.0, 0.0, 1.0, 30.0, 1e6])
    out = from_tanh_space(extreme, bounds)
    assert (out >= lo).all() and (out <= hi).all()


def test_objective_on_hand_computed_logits():
    logits = torch.tensor([[1.0, 3.0, 2.0], [4.0, 0.5, 1.0], [0.0, 0.0, 5.0]])
    y = torch.tensor([1, 0, 2])
    # untargeted: Z_y - max_{i!=y} Z_i = 3-2, 4-1, 5-0, clipped below at -kappa
    assert torch.equal(cw_objective(logits, y, None, 0.0), torch.tensor([1.0, 3.0, 5.0]))
    t = torch.tensor([0, 2, 0])
    # targeted: max_{i!=t} Z_i - Z_t = 3-1, 4-1, 5-0
    assert torch.equal(cw_objective(logits, y, t, 0.0), torch.tensor([2.0, 3.0, 5.0]))
    met = torch.tensor([1, 0, 2])  # target = prediction: the margin is negative, clipped at -kappa
    assert torch.equal(cw_objective(logits, y, met, 0.0), torch.tensor([0.0, 0.0, 0.0]))
    assert torch.equal(cw_objective(logits, y, met, 2.0), torch.tensor([-1.0, -2.0, -2.0]))
    assert torch.equal(cw_objective(logits, y, met, 10.0), torch.tensor([-1.0, -3.0, -5.0]))


def test_binary_search_over_c_is_per_example():
    c = torch.tensor([1e-3, 1e-3, 1.0, 1.0, 0.5])
    lower = torch.tensor([0.0, 0.0, 0.1, 0.1, 0.0])
    upper = torch.tensor([math.inf, math.inf, math.inf, 2.0, 1.0])
    found = torch.tensor([True, False, False, False, True])
    c2, lower2, upper2 = search_const(c, lower, upper, found)
    # success: c becomes the upper bound and the next c the midpoint below it
    assert upper2[0] == 1e-3 and lower2[0] == 0 and c2[0] == pytest.approx(5e-4)
    assert upper2[4] == 0.5 and c2[4] == pytest.approx(0.25)
    # failure without an upper bound: x10; with one: bisection between the bounds
    assert lower2[1] == 1e-3 and c2[1] == pytest.approx(1e-2) and math.isinf(upper2[1])
    assert lower2[2] == 1.0 and c2[2] == pytest.approx(10.0)
    assert lower2[3] == 1.0 and upper2[3] == 2.0 and c2[3] == pytest.approx(1.5)


def test_parameters_are_validated():
    for bad in [{"steps": 0}, {"steps": 1.5}, {"search_steps": 0}, {"lr": -1.0}, {"initial_const": 0.0},
                {"largest_const": math.inf}, {"kappa": -0.1}, {"abort_early": 1}, {"lr": True}]:
        with pytest.raises(ConfigError, match=next(iter(bad))):
            ATTACKS.create("cw", **bad)
    cw = CarliniWagner(lr=0.05)
    assert cw.resolved(ThreatModel(norm="linf").norm) == {"lr": 0.05, "initial_const": 1e-5, "largest_const": 20.0}


# ---------------------------------------------------------------------- the paper's definitions
def test_l2_finds_the_closed_form_minimum_on_a_linear_model(linear_case):
    model, x, y, s = linear_case
    optimum = s.abs() / model.w.norm()
    res = CarliniWagner(steps=1000, search_steps=9)(model, x, y, ThreatModel(norm="l2", eps=1.0))
    d = res.minimal_distances
    assert torch.isfinite(d).all() and res.success.all()
    assert (d >= optimum * (1 - 1e-4)).all()  # nothing beats the optimum (it is adversarial, audited)
    assert (d <= optimum * 1.01).all(), (d / optimum)


def test_l2_targeted_on_a_linear_model(linear_case):
    model, x, y, s = linear_case
    threat = ThreatModel(norm="l2", eps=1.0, targeting="fixed", target_class=1)
    res = CarliniWagner(steps=1000, search_steps=9)(model, x, y, threat)
    d = res.minimal_distances
    hit = y == 0
    # already of class 1: it cannot be attacked toward its own class (no success at distance 0)
    assert torch.isinf(d[~hit]).all() and not res.success[~hit].any()
    assert torch.equal(res.x_minimal[~hit], x[~hit])
    optimum = s.abs() / model.w.norm()
    assert ((d[hit] >= optimum[hit] * (1 - 1e-4)) & (d[hit] <= optimum[hit] * 1.01)).all()


def test_more_search_steps_never_lose_the_best(digits_mlp, digits_test):
    """Each example's first k problems are the same whatever search_steps is, and the best of
    all of them is kept: more binary-search steps can only shrink each minimal distance."""
    x, y = digits_test.x[:40], digits_test.y[:40]
    threat = ThreatModel(norm="l2", eps=1.0)
    runs = [CarliniWagner(steps=60, search_steps=k)(digits_mlp, x, y, threat).minimal_distances for k in (2, 4, 6)]
    for fewer, more in zip(runs, runs[1:]):
        assert (more <= fewer + 1e-5).all()
    assert (runs[-1] < runs[0]).sum() >= 10  # and the search does improve many of them


class Brightness(nn.Module):
    """Logits (relu(S - 10), 1), S the sum of the pixels: no gradient at all where S < 10."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(x.flatten(1).sum(dim=1) - 10)
        return torch.stack([h, torch.ones_like(h)], dim=1)


def test_early_abort_is_per_example():
    """Example A sits where the model has no gradient: its loss never moves, so each of its
    problems ends at the first check; example B (S = 20, minimal l2 (20 - 11) / 8 = 1.125)
    keeps improving. A ends early alone, and gets the same result next to B, as B next to A."""
    model = Brightness()
    x = torch.stack([torch.full((1, 8, 8), 2 / 64), torch.full((1, 8, 8), 20 / 64)])
    y = torch.tensor([1, 0])
    threat = ThreatModel(norm="l2", eps=2.0)
    attack = CarliniWagner(steps=200, search_steps=3, initial_const=1.0)
    a = attack(model, x[:1], y[:1], threat)
    b = attack(model, x[1:], y[1:], threat)
    both = attack(model, x, y, threat)
    full = CarliniWagner(steps=200, search_steps=3, initial_const=1.0, abort_early=False)(model, x[:1], y[:1], threat)
    assert full.n_backward == 3 * 200 and a.n_backward < 200 < b.n_backward
    assert math.isinf(a.minimal_distances[0]) and torch.equal(a.x_minimal, x[:1])  # nothing found: x itself
    assert torch.equal(both.x_minimal[:1], a.x_minimal) and torch.allclose(both.x_minimal[1:], b.x_minimal, atol=1e-6)
    assert b.minimal_distances[0] == pytest.approx(1.125, rel=0.01)


def test_linf_tau_schedule_ends_within_a_tenth_of_the_optimum(linear_case):
    """tau shrinks by 0.9 after each success until a problem fails: the last success lies
    within 1/0.9 of the smallest linf perturbation, here |s| / ||w||_1."""
    model, x, y, s = linear_case
    optimum = s.abs() / model.w.abs().sum()
    res = CarliniWagner(steps=300)(model, x, y, ThreatModel(norm="linf", eps=0.1))
    d = res.minimal_distances
    assert torch.isfinite(d).all()
    assert (d >= optimum * (1 - 1e-4)).all() and (d <= optimum / 0.9 * 1.001).all(), (d / optimum)
    # the budgeted result counts exactly the examples within eps
    assert torch.equal(res.success, torch.isfinite(d) & ThreatModel(norm="linf", eps=0.1).contains(res.x_minimal, x))


def test_l0_on_a_linear_model_is_near_the_fewest_pixels(linear_case):
    model, x, y, s = linear_case
    optimum = optimal_l0(x, model.w, s)
    res = CarliniWagner(steps=300)(model, x, y, ThreatModel(norm="l0", eps=5))
    d = res.minimal_distances
    changed = ((res.x_minimal - x).abs().flatten(1) > 0).sum(dim=1).float()
    assert torch.equal(d, changed)
    assert (d >= optimum).all() and (d <= optimum + 2).all(), (d, optimum)


def test_l0_changes_few_pixels_and_is_adversarial(digits_mlp, digits_test):
    x, y = digits_test.x[:40], digits_test.y[:40]
    res = CarliniWagner(steps=100)(digits_mlp, x, y, ThreatModel(norm="l0", eps=4))
    d = res.minimal_distances
    found = torch.isfinite(d)
    assert found.float().mean() >= 0.95
    with torch.no_grad():
        pred = digits_mlp(res.x_minimal).argmax(dim=1)
    assert (pred[found] != y[found]).all()
    assert torch.equal(res.x_minimal[~found], x[~found])
    changed = ((res.x_minimal - x).abs().flatten(1) > 0).sum(dim=1).float()
    assert torch.equal(changed[found], d[found])
    assert d[found].median() <= 4 and d[found].max() <= 16  # of 64 pixels


def test_l0_counts_pixels_over_channels():
    """On 3-channel images the allowed set is one of pixels: every channel of a pixel moves
    with it, and the count is of pixels."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 5)).eval()
    x = torch.rand(6, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    res = CarliniWagner(steps=100)(model, x, y, ThreatModel(norm="l0", eps=3))
    d = res.minimal_distances
    assert torch.isfinite(d).all()
    moved = (res.x_minimal - x).abs()
    pixels = (moved.amax(dim=1) > 0).flatten(1).sum(dim=1).float()
    assert torch.equal(pixels, d) and (d < 36).all()
    assert ((moved > 0).flatten(1).sum(dim=1) > d).any()  # several channels of one pixel count once


@pytest.mark.parametrize("norm, eps", [("l2", 1.0), ("l0", 4)])
def test_examples_are_independent(norm, eps, digits_mlp, digits_test):
    """Every decision is per example: a sub-batch gets what the full batch gave it (the contract
    checks this for linf, the attack's default norm)."""
    x, y = digits_test.x[:24], digits_test.y[:24]
    attack = CarliniWagner(steps=50, search_steps=3)
    full = attack(digits_mlp, x, y, ThreatModel(norm=norm, eps=eps))
    part = attack(digits_mlp, x[5:13], y[5:13], ThreatModel(norm=norm, eps=eps))
    assert torch.allclose(full.x_minimal[5:13], part.x_minimal, atol=1e-5)


def test_minimal_distances_and_budget(digits_mlp, digits_test):
    """minimal_distances is the distance of x_minimal where it is adversarial, inf where
    nothing was found (and there x_minimal is x itself, never an arbitrary image); the budgeted
    result counts exactly the examples within eps, and at_budget re-derives other eps."""
    x, y = digits_test.x[:60], digits_test.y[:60]
    threat = ThreatModel(norm="l2", eps=0.5)
    attack = CarliniWagner(steps=20, search_steps=2)  # too short to find everything
    res = attack(digits_mlp, x, y, threat)
    d = res.minimal_distances
    found = torch.isfinite(d)
    assert 0 < found.sum() < len(y)
    assert torch.equal(res.x_minimal[~found], x[~found])
    assert torch.allclose(d[found], (res.x_minimal - x).flatten(1).norm(dim=1)[found])
    assert torch.equal(res.success, found & threat.contains(res.x_minimal, x))
    assert torch.equal(res.success, found & (d.double() <= 0.5 + threat.slack(res.x_minimal, x)))
    wider = attack.at_budget(digits_mlp, x, y, threat.with_eps(2.0), res)
    assert torch.equal(wider.success, found & (d.double() <= 2.0 + threat.with_eps(2.0).slack(res.x_minimal, x)))


# ---------------------------------------------------------------------- foolbox
foolbox_cases = pytest.mark.parametrize("model_name", ["digits_mlp", "digits_cnn"])


@foolbox_cases
def test_l2_no_worse_than_foolbox(model_name, digits_test, request):
    """Same steps (100), binary-search steps (5), step size, initial c and early abort as
    foolbox 3.3.4's L2CarliniWagnerAttack on 120 digits. foolbox's outputs are audited here:
    where it finds nothing it returns an all-zero image, which the model may well misclassify,
    so its successes are the misclassified outputs that are not all zero. advbench must succeed
    on at least as many, and on the examples both found its median l2 may exceed foolbox's by
    at most 1% (measured: equal to 4 digits on both models)."""
    foolbox = pytest.importorskip("foolbox")
    model = request.getfixturevalue(model_name)
    x, y = digits_test.x[:120], digits_test.y[:120]
    res = CarliniWagner(steps=100, search_steps=5)(model, x, y, ThreatModel(norm="l2", eps=1.0))
    ours = res.minimal_distances
    fmodel = foolbox.PyTorchModel(model, bounds=(0, 1))
    _, x_fb, _ = foolbox.attacks.L2CarliniWagnerAttack(binary_search_steps=5, steps=100)(fmodel, x, y, epsilons=None)
    with torch.no_grad():
        misclassified = model(x_fb).argmax(dim=1) != y
    theirs_found = misclassified & (x_fb.flatten(1).abs().sum(dim=1) > 0)
    theirs = torch.where(theirs_found, (x_fb - x).flatten(1).norm(dim=1), torch.full_like(ours, math.inf))
    found = torch.isfinite(ours)
    assert found.sum() >= theirs_found.sum()
    both = found & theirs_found
    assert ours[both].median() <= theirs[both].median() * 1.01, (ours[both].median(), theirs[both].median())
