"""The seed's perturbability measures (advbench.analysis.perturbability) and the statistics that
relate them to curvature (advbench.analysis.stats)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats as sps

from advbench import ATTACKS, ThreatModel
from advbench.analysis.perturbability import boundary_point, ifgsm_trace, transfers
from advbench.analysis.stats import group_median, quantile_groups, roc_auc, spearman


@pytest.fixture(scope="module")
def clean_correct(digits_cnn, digits_test):
    with torch.no_grad():
        ok = digits_cnn(digits_test.x).argmax(dim=1) == digits_test.y
    return digits_test.x[ok][:40], digits_test.y[ok][:40]


def test_ifgsm_trace_is_bims_path_without_a_ball(digits_cnn, clean_correct):
    """With an eps-ball covering the whole box, BIM's t-th iterate is the trace's t-th iterate."""
    x, y = clean_correct
    alpha = 2 / 255
    trace = ifgsm_trace(digits_cnn, x, y, alpha, steps=6, keep_iterates=True)
    bim = ATTACKS.create("bim", steps=6, step_size=alpha)
    res = bim(digits_cnn, x, y, ThreatModel(norm="linf", eps=1.0))
    assert torch.allclose(trace.iterates[-1], res.x_adv, atol=1e-6)
    steps = (trace.iterates[1:] - trace.iterates[:-1]).abs().flatten(2).amax(dim=2)
    assert float(steps.max()) <= alpha + 1e-6 and float(trace.iterates.min()) >= 0 and float(trace.iterates.max()) <= 1


def test_ifgsm_trace_records_the_first_misclassification(digits_cnn, clean_correct):
    x, y = clean_correct
    trace = ifgsm_trace(digits_cnn, x, y, 10 / 255, steps=20, keep_iterates=True)
    found = trace.steps >= 0
    assert bool(found.any()) and bool((trace.labels[:, 0] == y).all()) and bool((trace.steps != 0).all())
    for i in torch.nonzero(found).squeeze(1).tolist():
        t = int(trace.steps[i])
        assert bool((trace.labels[i, :t] == y[i]).all()) and int(trace.labels[i, t]) != int(y[i])
        mse = float((trace.iterates[t, i] - x[i]).double().pow(2).mean())
        assert trace.mse[i].item() == pytest.approx(mse, rel=1e-9)
        with torch.no_grad():
            p = torch.softmax(digits_cnn(trace.iterates[t, i : i + 1]).double(), dim=1).max()
        # a batch and one row go through float32 kernels that sum in other orders (1.6e-6 relative seen)
        assert trace.confidence[i].item() == pytest.approx(float(p), rel=1e-5)
    assert bool(trace.mse[~found].isnan().all()) and bool(trace.confidence[~found].isnan().all())
    assert torch.equal(trace.flips, (trace.labels[:, 1:] != trace.labels[:, :-1]).sum(dim=1))
    # a larger step misclassifies in no more steps, here in fewer on the median
    small = ifgsm_trace(digits_cnn, x, y, 1 / 255, steps=20)
    both = found & (small.steps >= 0)
    assert float(trace.steps[both].double().median()) < float(small.steps[both].double().median())


def test_a_misclassified_image_takes_zero_steps(digits_cnn, clean_correct):
    x, y = clean_correct
    wrong = (y + 1) % 10
    trace = ifgsm_trace(digits_cnn, x[:3], wrong[:3], 0.1, steps=2)
    assert torch.equal(trace.steps, torch.zeros(3, dtype=torch.long))
    assert torch.equal(trace.mse, torch.zeros(3, dtype=torch.float64))


def test_the_boundary_point_is_adversarial_and_a_hair_from_the_clean_side(digits_cnn, digits_mlp, clean_correct):
    x, y = clean_correct
    trace = ifgsm_trace(digits_cnn, x, y, 10 / 255, steps=20, keep_iterates=True)
    found = torch.nonzero(trace.steps >= 0).squeeze(1)
    x_adv = trace.iterates[trace.steps[found], found]
    xs, ys = x[found], y[found]
    bp = boundary_point(digits_cnn, xs, x_adv, ys, iterations=30)
    with torch.no_grad():
        assert bool((digits_cnn(bp.x).argmax(dim=1) != ys).all())
        inside = xs + (bp.t - 2.0**-30).to(xs.dtype).view(-1, 1, 1, 1) * (x_adv - xs)
        assert float((digits_cnn(inside).argmax(dim=1) == ys).double().mean()) >= 0.9  # float rounding at 2^-30
    assert bool((bp.t > 0).all() & (bp.t <= 1).all()) and bool((bp.mse <= trace.mse[found] + 1e-12).all())
    moved = transfers(digits_mlp, bp.x, ys)
    assert moved.dtype == torch.bool and moved.shape == ys.shape


def test_spearman_and_its_bootstrap_interval():
    rng = np.random.default_rng(0)
    a = rng.normal(size=200)
    b = a + rng.normal(scale=1.0, size=200)
    est = spearman(a, b, resamples=500, seed=1)
    assert est.value == pytest.approx(sps.spearmanr(a, b).statistic)
    assert est.low < est.value < est.high and est.n == 200
    assert spearman(a, b, resamples=500, seed=1) == est  # seeded
    none = spearman(a, rng.normal(size=200), resamples=500)
    assert none.low < 0 < none.high  # no relation: the interval covers 0
    assert spearman(np.array([1.0, np.nan, 2.0, 3.0]), np.array([1.0, 5.0, np.nan, 2.0])).n == 2
    assert np.isnan(spearman(np.array([1.0, 2.0]), np.array([1.0, 2.0])).value)


def test_roc_auc_is_the_mann_whitney_fraction():
    assert roc_auc(np.array([3.0, 4.0, 5.0]), np.array([0.0, 1.0, 2.0]), resamples=200).value == 1.0
    assert roc_auc(np.array([0.0, 1.0]), np.array([2.0, 3.0]), resamples=200).value == 0.0
    assert roc_auc(np.array([1.0, 1.0]), np.array([1.0, 1.0]), resamples=200).value == 0.5  # ties: one half
    rng = np.random.default_rng(0)
    est = roc_auc(rng.normal(1.0, 1.0, 300), rng.normal(0.0, 1.0, 300), resamples=500)
    assert 0.7 < est.value < 0.8 and est.low < est.value < est.high  # Phi(1/sqrt 2) = 0.76


def test_quantile_groups_and_their_medians():
    v = np.array([5.0, 1.0, np.nan, 3.0, 2.0, 6.0, 4.0])
    g = quantile_groups(v, 3)
    assert g.tolist() == [2, 0, -1, 1, 0, 2, 1]
    med = group_median(np.arange(7.0), g, resamples=200)
    assert set(med) == {0, 1, 2} and med[0].n == 2 and med[0].value == 2.5
