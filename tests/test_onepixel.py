"""The one-pixel attack (Su, Vargas & Sakurai 2019): its pieces, its accounting, its results.

The generic contract (threat model, audit, seeding, counts) is in test_attack_contract.py; here
are the parts only this attack has: the candidate encoding, the DE step, the initialization,
early stopping and the query budget, batch independence, and its success against exhaustive
search and against torchattacks' and ART's implementations on the same model and images.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from advbench.access import ScoreOracle
from advbench.attacks.onepixel import (
    COLOUR_MEAN,
    COLOUR_STD,
    OnePixel,
    apply_pixels,
    mutate,
    mutation_indices,
    same_candidate,
    select,
)
from advbench.errors import ConfigError, UnsupportedThreatError
from advbench.registry import ATTACKS
from advbench.threat import ThreatModel, quantize_8bit


def l0(eps: int = 1, **kw) -> ThreatModel:
    return ThreatModel(norm="l0", eps=eps, knowledge="score_based", **kw)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class PixelLinear(nn.Module):
    """Logits = per-class weighted sums of the inputs, from a fixed seed.

    Each row is an elementwise product and a reduction over that row alone, so its logits do
    not depend on the batch it is in: chunking cannot flip a comparison.
    """

    def __init__(self, shape: tuple[int, ...], classes: int = 10, seed: int = 0) -> None:
        super().__init__()
        w = torch.randn(classes, math.prod(shape), generator=gen(seed))
        self.weight = nn.Parameter(w, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.flatten(1).unsqueeze(1) * self.weight.to(x.dtype)).sum(dim=-1)


class Constant(nn.Module):
    """The same logits for every input: class ``top`` at +5, the others at 0."""

    def __init__(self, top: int, classes: int = 10) -> None:
        super().__init__()
        self.logits = torch.zeros(classes)
        self.logits[top] = 5.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], -1).clone()


class RowCounter(nn.Module):
    """Counts the rows the wrapped model is asked for."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.rows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows += x.shape[0]
        return self.model(x)


@pytest.fixture(scope="module")
def cifar_shaped() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Random CIFAR-shaped images (3x32x32) and a fixed linear model, labels its predictions."""
    x = torch.rand(12, 3, 32, 32, generator=gen(7))
    model = PixelLinear((3, 32, 32)).eval()
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    return model, x, y


def correct(model: nn.Module, data, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` test images the model classifies correctly (the paper attacks those)."""
    with torch.no_grad():
        ok = model(data.x).argmax(dim=1) == data.y
    idx = ok.nonzero().squeeze(1)[:n]
    return data.x[idx].clone(), data.y[idx].clone()


def changed_pixels(x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool: positions where any channel differs."""
    return (x_adv != x).any(dim=1)


# ---------------------------------------------------------------------- the pieces
def test_a_candidate_writes_exactly_its_pixels_and_colours():
    images = torch.rand(2, 3, 5, 6, generator=gen())
    genes = torch.tensor(
        [
            [[1.2, 4.0, 0.1, 0.2, 0.3], [3.0, 0.4, 0.4, 0.5, 0.6]],  # positions round to (1, 4), (3, 0)
            [[4.0, 5.0, 0.0, 0.0, 0.0], [4.0, 5.0, 1.0, 1.0, 1.0]],  # one position twice: the later wins
        ]
    )
    out = apply_pixels(images.clone(), genes)
    assert torch.equal(out[0, :, 1, 4], torch.tensor([0.1, 0.2, 0.3]))
    assert torch.equal(out[0, :, 3, 0], torch.tensor([0.4, 0.5, 0.6]))
    assert torch.equal(out[1, :, 4, 5], torch.ones(3))
    expected = torch.zeros(2, 5, 6, dtype=torch.bool)
    expected[0, 1, 4] = expected[0, 3, 0] = expected[1, 4, 5] = True
    assert torch.equal(changed_pixels(out, images), expected)


def test_same_candidate_compares_rounded_positions_and_exact_colours():
    a = torch.tensor([[[1.2, 3.0, 0.5]], [[1.0, 3.0, 0.5]]])
    b = torch.tensor([[[0.9, 2.6, 0.5]], [[1.0, 3.0, 0.25]]])
    assert same_candidate(a, b).tolist() == [True, False]


def test_mutation_is_xj_plus_f_times_xk_minus_xl():
    pop = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [4.0, 4.0, 4.0], [2.0, 0.0, 1.0]]).view(1, 4, 1, 3)
    indices = torch.tensor([[[1, 2, 3], [3, 0, 2], [0, 1, 2], [2, 3, 1]]])
    child = mutate(pop, indices, 0.5).view(4, 3)
    assert torch.equal(child[0], torch.tensor([2.0, 4.0, 4.5]))  # X1 + (X2 - X3) / 2
    assert torch.equal(child[1], torch.tensor([0.0, -2.0, -1.0]))  # X3 + (X0 - X2) / 2
    assert torch.equal(child[2], torch.tensor([-1.5, -1.0, -0.5]))  # X0 + (X1 - X2) / 2
    assert torch.equal(child[3], torch.tensor([4.5, 3.0, 3.0]))  # X2 + (X3 - X1) / 2


def test_mutation_draws_three_distinct_members_uniformly():
    idx = mutation_indices((60000,), 5, gen())
    j, k, l = idx.unbind(dim=1)  # noqa: E741
    assert ((j != k) & (j != l) & (k != l)).all()
    assert idx.min() >= 0 and idx.max() <= 4
    counts = torch.bincount(j * 25 + k * 5 + l, minlength=125)
    distinct = counts[counts > 0]
    assert distinct.numel() == 60  # every ordered triple of distinct members occurs
    assert (distinct - 1000).abs().max() < 150  # 1000 expected each, sd about 32
    assert mutation_indices((100,), 3, gen()).sort(dim=1).values.eq(torch.arange(3)).all()


def test_selection_keeps_the_fitter_and_ties_keep_the_parent():
    parents, children = torch.zeros(1, 3, 1, 2), torch.ones(1, 3, 1, 2)
    members, fitness = select(parents, torch.tensor([[0.5, 0.2, 0.7]]), children, torch.tensor([[0.4, 0.2, 0.9]]))
    assert members[0, :, 0, 0].tolist() == [1.0, 0.0, 0.0]
    assert torch.equal(fitness, torch.tensor([[0.4, 0.2, 0.7]]))


def test_initial_population_follows_the_paper():
    """Positions uniform over the grid; colours N(128, 127) on 0..255 mapped onto the bounds, clipped."""
    attack = OnePixel(population=20000)
    lo, hi = -1.0, 1.0
    genes = attack.initial_population(torch.zeros(1, 3, 5, 7), 2, l0(2, bounds=(lo, hi)), gen())
    assert genes.shape == (1, 20000, 2, 5)
    pos = genes[..., :2].reshape(-1, 2)
    assert torch.equal(pos, pos.round()) and pos[:, 0].max() == 4 and pos[:, 1].max() == 6 and pos.min() == 0
    counts = torch.bincount((pos[:, 0] * 7 + pos[:, 1]).long(), minlength=35).float()
    assert (counts / counts.mean() - 1).abs().max() < 0.15  # about 1143 per position, sd about 33
    colours = genes[..., 2:].flatten()
    mean, std = lo + COLOUR_MEAN * (hi - lo), COLOUR_STD * (hi - lo)
    assert colours.min() == lo and colours.max() == hi
    normal = torch.distributions.Normal(mean, std)
    assert abs(float((colours == lo).float().mean()) - float(normal.cdf(torch.tensor(lo)))) < 0.01
    assert abs(float((colours == hi).float().mean()) - float(1 - normal.cdf(torch.tensor(hi)))) < 0.01
    quartiles = torch.quantile(colours, torch.tensor([0.25, 0.5, 0.75]))
    assert torch.allclose(quartiles, torch.tensor([mean - 0.6745 * std, mean, mean + 0.6745 * std]), atol=0.03)
    quantized = attack.initial_population(torch.zeros(1, 3, 5, 7), 1, l0(1, quantize="8bit"), gen())[..., 2:]
    assert torch.equal(quantized, quantize_8bit(quantized, (0.0, 1.0)))


# ---------------------------------------------------------------------- stopping and queries
def test_early_stop_after_the_initial_population_when_the_goal_is_met():
    x, y = torch.rand(4, 1, 6, 6, generator=gen()), torch.tensor([1, 2, 3, 4])
    attack = OnePixel(population=10, generations=7)
    # untargeted: class 0 wins everywhere, p(true) = 1 / (e^5 + 9) < 5%: stop at once
    res = attack(Constant(top=0), x, y, l0(1), generator=gen())
    assert res.n_queries == 4 * 10 and res.success.all()
    # threshold 0: never satisfied, so every generation runs: 10 * (7 + 1) queries per image
    res = OnePixel(population=10, generations=7, untargeted_threshold=0.0)(Constant(0), x, y, l0(1), generator=gen())
    assert res.n_queries == 4 * 10 * 8
    # targeted: p(target) = e^5 / (e^5 + 9) > 90%
    res = attack(Constant(top=3), x, y, l0(1, targeting="fixed", target_class=3), generator=gen())
    # the example labelled 3 cannot be attacked toward 3: no success for it at distance 0
    assert res.n_queries == 4 * 10 and res.success.tolist() == [True, True, False, True]
    res = OnePixel(population=10, generations=7, targeted_threshold=1.0)(
        Constant(3), x, y, l0(1, targeting="fixed", target_class=3), generator=gen()
    )
    assert res.n_queries == 4 * 10 * 8


def test_stopping_at_the_goal_saves_queries(digits_test, digits_mlp):
    x, y = correct(digits_mlp, digits_test, 40)
    kw = {"population": 30, "generations": 15}
    at_goal = OnePixel(untargeted_threshold=1.0, **kw)(digits_mlp, x, y, l0(2), generator=gen())
    paper = OnePixel(**kw)(digits_mlp, x, y, l0(2), generator=gen())
    never = OnePixel(untargeted_threshold=0.0, **kw)(digits_mlp, x, y, l0(2), generator=gen())
    assert at_goal.success.sum() >= 10
    assert at_goal.n_queries < paper.n_queries < never.n_queries <= 40 * 30 * 16


def test_queries_are_the_rows_the_model_saw_and_the_first_generation_is_the_population(digits_test, digits_mlp):
    x, y = correct(digits_mlp, digits_test, 30)
    for generations in (0, 12):
        model = RowCounter(digits_mlp)
        res = OnePixel(population=25, generations=generations)(model, x, y, l0(1), generator=gen())
        assert res.n_queries == model.rows - 2 * 30  # all but the base class's clean pass and audit
        assert res.n_backward == 0
        if generations == 0:
            assert res.n_queries == 30 * 25
        else:  # children identical to their parent are not queried
            assert 30 * 25 < res.n_queries <= 30 * 25 * 13


def test_budget_is_honoured_per_example_and_the_result_is_audited(digits_test, digits_mlp):
    x, y = correct(digits_mlp, digits_test, 20)
    population, budget = 20, 70
    threat = l0(1, query_budget=budget)
    attack = OnePixel(population=population, generations=50, untargeted_threshold=0.0)  # no early stop
    oracle = ScoreOracle(digits_mlp, 20, budget)
    x_adv = attack._run(oracle, x, y, threat, None, gen())
    # each image ran until the next generation was unaffordable, never past the budget
    assert (oracle.queries <= budget).all() and (oracle.queries > budget - population).all()
    assert changed_pixels(x_adv, x).sum(dim=(1, 2)).le(1).all()
    res = attack(digits_mlp, x, y, threat, generator=gen())
    assert not res.budget_exhausted  # it stopped by itself
    assert res.n_queries == int(oracle.queries.sum())
    assert res.valid.all()
    with torch.no_grad():
        assert torch.equal(res.success, digits_mlp(res.x_adv).argmax(dim=1) != y)


def test_no_pixel_to_change_means_no_query(digits_test, digits_mlp):
    x, y = digits_test.x[:5], digits_test.y[:5]
    res = OnePixel()(digits_mlp, x, y, l0(0), generator=gen())
    assert res.n_queries == 0 and torch.equal(res.x_adv, x)


# ---------------------------------------------------------------------- shapes, seeds, independence
def test_three_channel_images_change_whole_pixels_within_the_budget(cifar_shaped):
    model, x, y = cifar_shaped
    attack = OnePixel(population=40, generations=10, max_batch=128)
    res = attack(model, x, y, l0(3), generator=gen())
    changed = changed_pixels(res.x_adv, x)
    assert changed.sum(dim=(1, 2)).le(3).all() and res.valid.all()
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1 and res.x_adv.dtype == x.dtype
    assert res.success.sum() >= 2  # 3 of 12 with these seeds
    attack = OnePixel(pixels=2, population=40, generations=10, max_batch=128)
    res = attack(model, x, y, l0(3, quantize="8bit"), generator=gen())
    changed = changed_pixels(res.x_adv, x)
    assert changed.sum(dim=(1, 2)).le(2).all()
    colours = res.x_adv.permute(0, 2, 3, 1)[changed]  # every channel of a changed pixel is an 8-bit level
    assert torch.equal(colours, quantize_8bit(colours, (0.0, 1.0)))


def test_double_inputs_stay_double(cifar_shaped):
    model, x, y = cifar_shaped
    res = OnePixel(population=20, generations=3, max_batch=128)(model, x.double(), y, l0(1), generator=gen())
    assert res.x_adv.dtype == torch.float64 and res.valid.all()


def test_flat_inputs_change_single_elements(digits_test, digits_mlp):
    x, y = correct(digits_mlp, digits_test, 30)
    flat = x.reshape(30, 64)
    res = OnePixel(population=30, generations=10)(digits_mlp, flat, y, l0(3), generator=gen())
    assert (res.x_adv != flat).sum(dim=1).le(3).all() and res.valid.all()
    assert res.success.sum() >= 15


def test_seeded_and_independent_of_chunking(cifar_shaped):
    model, x, y = cifar_shaped
    threat = l0(2)
    a = OnePixel(population=30, generations=6, max_batch=1024)(model, x, y, threat, generator=gen(3))
    b = OnePixel(population=30, generations=6, max_batch=7)(model, x, y, threat, generator=gen(3))
    c = OnePixel(population=30, generations=6, max_batch=1024)(model, x, y, threat, generator=gen(4))
    assert torch.equal(a.x_adv, b.x_adv) and a.n_queries == b.n_queries
    assert b.n_forward == a.n_forward  # passes are counted per example, not per call
    assert not torch.equal(a.x_adv, c.x_adv)


def test_an_example_does_not_depend_on_the_others(cifar_shaped):
    """Same position in the batch, same seed: example 0's run is the same whatever the others
    are, and however early they stop."""
    model, x, y = cifar_shaped
    attack = OnePixel(population=30, generations=8, untargeted_threshold=1.0)
    threat = l0(1)
    others = torch.rand(11, 3, 32, 32, generator=gen(99))
    with torch.no_grad():
        y_others = model(others).argmax(dim=1)
    runs = []
    for rest, y_rest in ((x[1:], y[1:]), (others, y_others), (others, (y_others + 1) % 10)):  # last: already wrong
        xs, ys = torch.cat([x[:1], rest]), torch.cat([y[:1], y_rest])
        oracle = ScoreOracle(model, 12, None)
        runs.append((attack._run(oracle, xs, ys, threat, None, gen(5))[0], int(oracle.queries[0]), oracle.queries[1:]))
    assert all(torch.equal(runs[0][0], r[0]) and runs[0][1] == r[1] for r in runs[1:])
    assert (runs[2][2] == 30).all()  # the others stopped after the initial population


# ---------------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    "kw",
    [
        {"pixels": 0},
        {"pixels": 1.5},
        {"population": 2},
        {"population": True},
        {"generations": -1},
        {"mutation": 0},
        {"mutation": 2.5},
        {"untargeted_threshold": 1.5},
        {"targeted_threshold": -0.1},
        {"max_batch": 0},
    ],
)
def test_bad_hyperparameters_raise(kw):
    name = next(iter(kw))
    with pytest.raises(ConfigError, match=name):
        OnePixel(**kw)


def test_pixels_must_fit_the_threat_model(digits_test, digits_mlp):
    x, y = digits_test.x[:4], digits_test.y[:4]
    with pytest.raises(UnsupportedThreatError, match="pixels=4 exceeds the threat model's l0 eps 3"):
        OnePixel(pixels=4)(digits_mlp, x, y, l0(3))
    assert ATTACKS.create("onepixel").params()["pixels"] is None


# ---------------------------------------------------------------------- success
def test_finds_the_one_pixel_adversarials_exhaustive_search_finds(digits_test, digits_cnn):
    """On 40 digits (8x8), exhaustive search over 64 positions x 9 grey levels finds the images
    one pixel can fool; DE with 60 x 21 = 1260 queries per image (vs 576) finds nearly all."""
    x, y = correct(digits_cnn, digits_test, 40)
    levels = torch.linspace(0, 1, 9)
    grid = x.unsqueeze(1).repeat(1, 64, 9, 1, 1).view(40, 64, 9, 8, 8)
    for p in range(64):
        grid[:, p, :, p // 8, p % 8] = levels
    with torch.no_grad():
        pred = torch.cat([digits_cnn(chunk).argmax(dim=1) for chunk in grid.view(-1, 1, 8, 8).split(2048)])
    foolable = (pred.view(40, -1) != y[:, None]).any(dim=1)
    res = OnePixel(population=60, generations=20, untargeted_threshold=1.0)(digits_cnn, x, y, l0(1), generator=gen())
    assert foolable.sum() >= 5  # the check means something
    assert (res.success & foolable).sum() >= 0.8 * foolable.sum()


@pytest.fixture()
def numpy_seeded():
    """Seed numpy's global generator (the peers draw from it) and put its state back after."""
    state = np.random.get_state()
    np.random.seed(0)
    yield
    np.random.set_state(state)


def test_at_least_as_successful_as_torchattacks(digits_test, digits_mlp, numpy_seeded):
    """torchattacks 3.5.1's OnePixel (scipy's DE, best1bin, dithered F, same population and
    generations: popsize 60 over 3 parameters gives 60 members) on the same 60 images."""
    torchattacks = pytest.importorskip("torchattacks")
    x, y = correct(digits_mlp, digits_test, 60)
    peer = torchattacks.OnePixel(digits_mlp, pixels=1, steps=20, popsize=60)
    with torch.no_grad():
        theirs = (digits_mlp(peer(x, y)).argmax(dim=1) != y).float().mean()
    ours = OnePixel(population=60, generations=20, untargeted_threshold=1.0)(digits_mlp, x, y, l0(1), generator=gen())
    assert ours.success_rate >= float(theirs) - 0.1  # 6 of 60 images: seed-to-seed noise of both


@pytest.mark.filterwarnings("ignore")
def test_at_least_as_successful_as_art(digits_test, digits_mlp, numpy_seeded):
    """ART's PixelAttack (es=1: its DE, population 400 // 3 * 3 = 399; max_iter generations)
    on 24 images, two generations (ART takes about 0.1 s a generation per image here)."""
    pytest.importorskip("art")
    from art.attacks.evasion import PixelAttack
    from art.estimators.classification import PyTorchClassifier

    x, y = correct(digits_mlp, digits_test, 24)
    clf = PyTorchClassifier(
        digits_mlp, loss=nn.CrossEntropyLoss(), input_shape=(1, 8, 8), nb_classes=10, clip_values=(0.0, 1.0)
    )
    adv = PixelAttack(clf, th=1, es=1, max_iter=2, verbose=False).generate(x.numpy(), y.numpy())
    with torch.no_grad():
        theirs = (digits_mlp(torch.from_numpy(adv)).argmax(dim=1) != y).float().mean()
    ours = OnePixel(population=399, generations=2, untargeted_threshold=1.0)(digits_mlp, x, y, l0(1), generator=gen())
    assert ours.success_rate >= float(theirs) - 0.1
