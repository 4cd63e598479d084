"""Minimal-perturbation attacks: one run, audited without the ball, counted within each eps.

Checked with a toy attack whose minimal distances are known exactly: a line search along the
normalized input gradient that returns the first radius on a fixed grid that misclassifies.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from advbench.attacks.base import Attack
from advbench.config import parse_config
from advbench.errors import ConfigError
from advbench.eval.evaluator import evaluate
from advbench.eval.plan import plan_jobs
from advbench.registry import ATTACKS
from advbench.threat import Norm, ThreatModel

RADII = torch.linspace(0.1, 4.0, 40)


class LineSearch(Attack):
    """The first radius r on RADII where x + r g/|g| (clipped) is misclassified; x if none."""

    name = "toy-minimal"
    norms: ClassVar[frozenset[Norm]] = frozenset({Norm.L2})
    minimal = True
    randomized = False
    runs = 0  # counts calls of _run across instances, to see that one run serves every eps

    def __init__(self, *, escape: bool = False) -> None:
        self.escape = escape  # return a point outside the bounds instead (must never count)

    def _run(self, model, x, y, threat, target, generator):
        type(self).runs += 1
        xg = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)
        g = g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
        best, done = x.clone(), torch.zeros(len(x), dtype=torch.bool)
        with torch.no_grad():
            for r in RADII:
                cand = (x + r * g).clamp(0, 1)
                hit = (model(cand).argmax(1) != y) & ~done
                best[hit], done = cand[hit], done | hit
        if self.escape:
            best = best + 2.0
        return best


@pytest.fixture
def toy():
    ATTACKS.add("toy-minimal", LineSearch)
    LineSearch.runs = 0
    yield LineSearch
    ATTACKS.unregister("toy-minimal")


@pytest.fixture(scope="module")
def batch(digits_test):
    return digits_test.x[:80].clone(), digits_test.y[:80].clone()


def plain_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).flatten(1).double().norm(dim=1).float()


def test_counted_only_within_eps(batch, digits_cnn):
    x, y = batch
    res = LineSearch()(digits_cnn, x, y, ThreatModel(norm="l2", eps=0.8))
    with torch.no_grad():
        adv_min = digits_cnn(res.x_minimal).argmax(1) != y
    dmin = res.minimal_distances
    assert torch.equal(torch.isfinite(dmin), adv_min)  # found exactly where x_minimal misclassifies
    assert torch.allclose(dmin[adv_min], plain_l2(res.x_minimal, x)[adv_min], atol=1e-5)
    within = dmin <= 0.8
    assert torch.equal(res.success, within)
    assert torch.equal(res.x_adv[within], res.x_minimal[within])
    assert torch.equal(res.x_adv[~within], x[~within])  # outside the budget the clean input counts
    assert res.valid.all()
    assert 0 < int(within.sum()) < int(adv_min.sum())  # the budget cut something: the test sees it


def test_at_budget_equals_a_rerun(batch, digits_cnn, toy):
    x, y = batch
    attack = LineSearch()
    first = attack(digits_cnn, x, y, ThreatModel(norm="l2", eps=0.5))
    for eps in (0.25, 1.0, 3.0):
        threat = ThreatModel(norm="l2", eps=eps)
        again = attack.at_budget(digits_cnn, x, y, threat, first)
        fresh = attack(digits_cnn, x, y, threat)
        assert torch.equal(again.success, fresh.success) and torch.equal(again.x_adv, fresh.x_adv)
        assert torch.equal(again.minimal_distances, fresh.minimal_distances)
        assert again.n_backward == first.n_backward  # the counts of the run that produced it


def test_points_outside_the_bounds_are_never_found(batch, digits_cnn):
    x, y = batch
    res = LineSearch(escape=True)(digits_cnn, x, y, ThreatModel(norm="l2", eps=4.0))
    wrong = res.pred_clean != y  # already misclassified: the clean input is the minimal example
    assert 0 < int(wrong.sum()) < len(y)
    assert torch.isinf(res.minimal_distances[~wrong]).all() and (res.minimal_distances[wrong] == 0).all()
    assert torch.equal(res.success, wrong) and torch.equal(res.x_adv, x) and torch.equal(res.x_minimal, x)


def test_at_budget_refuses_other_attacks(batch, digits_cnn):
    x, y = batch
    fgsm = ATTACKS.create("fgsm")
    res = fgsm(digits_cnn, x, y, ThreatModel(eps=0.1))
    with pytest.raises(ConfigError, match="not a minimal-perturbation attack"):
        fgsm.at_budget(digits_cnn, x, y, ThreatModel(eps=0.2), res)


def _config(**over):
    base = {
        "seed": 0, "device": "cpu", "data": {"name": "digits", "n": 90}, "models": ["digits-cnn"],
        "threats": [{"norm": "l2", "eps": [0.4, 0.8, 1.6]}], "attacks": ["toy-minimal"], "batch_size": 30,
    }
    base.update(over)
    return parse_config(base)


def test_evaluator_runs_a_minimal_attack_once_per_shard(tmp_path, toy):
    cfg = _config()
    jobs = plan_jobs(cfg, np.arange(90))
    assert [j.shard for j in jobs] == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # each shard's eps back to back
    assert len({j.sweep_key for j in jobs}) == 3 and len({j.seed for j in jobs}) == 3
    res = evaluate(cfg, tmp_path, progress=False)
    assert toy.runs == 3  # 3 shards x 3 eps, one run per shard
    t = res.table.set_index("eps")
    # the distances describe the run (not the budget) and robust accuracy falls with eps
    assert t.median_distance.nunique() == 1 and t.found_rate.nunique() == 1
    assert t.robust_accuracy.is_monotonic_decreasing
    # against a direct call on the same examples
    from advbench.data.digits import load_digits
    from advbench.zoo import load_zoo_model

    data, model = load_digits("test"), load_zoo_model("digits-cnn")
    idx = data.sample_indices(90, 0)
    x, y = data.x[idx], data.y[idx]
    direct = LineSearch()(model, x, y, ThreatModel(norm="l2", eps=0.4))
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    dmin = direct.minimal_distances[correct]
    for eps in (0.4, 0.8, 1.6):
        expected = float(((dmin > eps)).sum()) / len(x)
        assert t.loc[eps, "robust_accuracy"] == pytest.approx(expected)
    found = dmin[torch.isfinite(dmin)]
    assert t.loc[0.4, "found_rate"] == pytest.approx(len(found) / int(correct.sum()))
    assert t.loc[0.4, "median_distance"] == pytest.approx(float(found.median()), abs=0.11)  # pandas/torch median
    assert t.loc[0.4, "mean_distance"] == pytest.approx(float(found.mean()), rel=1e-5)
    # resuming runs nothing and changes nothing
    runs = toy.runs
    again = evaluate(cfg, tmp_path, progress=False)
    assert again.jobs_run == 0 and toy.runs == runs
    assert again.table.drop(columns="seconds").equals(res.table.drop(columns="seconds"))
    assert not math.isnan(t.loc[0.4, "median_distance"])
