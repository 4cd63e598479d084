"""The per-image curvature table (advbench.analysis.curvature): every column means what it says,
on a piecewise-linear reference model (Gauss-Newton path) and a smooth one (exact path)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from advbench.analysis.curvature import ALPHAS, detector, image_table, outcomes, spectral_measures, summary
from advbench.analysis.hessian import InputHessian, eigenvalues

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def table(digits_cnn, digits_mlp, digits_test):
    x, y = digits_test.x[:30], digits_test.y[:30]
    return image_table(digits_cnn, x, y, second=digits_mlp, steps=40, generator=torch.Generator().manual_seed(0))


def test_rows_are_the_clean_correct_images_and_the_spectrum_is_exact(table, digits_cnn, digits_test):
    df, info = table
    x, y = digits_test.x[:30], digits_test.y[:30]
    with torch.no_grad():
        ok = (digits_cnn(x).argmax(dim=1) == y).numpy()
    assert df["index"].tolist() == np.flatnonzero(ok).tolist()
    assert info["method"] == "gauss-newton" and info["excluded_misclassified"] == int((~ok).sum())
    idx = torch.as_tensor(df["index"].to_numpy().copy())
    exact = eigenvalues(InputHessian(digits_cnn, x[idx], y[idx], dtype=torch.float64).exact())
    assert np.allclose(df.trace, exact.sum(dim=1).numpy(), rtol=1e-8, atol=1e-12)
    assert np.allclose(df.top_eigenvalue, exact[:, -1].numpy(), rtol=1e-8)
    assert np.allclose(df.k_top, df.top_eigenvalue / df.grad_norm, rtol=1e-6)
    assert (df.neg_share.abs() < 1e-9).all()  # a Gauss-Newton matrix has no negative curvature
    assert (df.kl >= 0).all() and (df.js >= 0).all() and (df.js <= np.log(2) + 1e-12).all()


def test_outcome_columns(table):
    df, _ = table
    assert set(outcomes()) <= set(df.columns)
    for a in ("0.1", "0.5", "1", "10"):
        found = df[f"steps_{a}"] >= 0
        assert df.loc[found, f"mse_{a}"].notna().all() and df.loc[~found, f"mse_{a}"].isna().all()
        assert ((df.loc[found, f"confidence_{a}"] > 0) & (df.loc[found, f"confidence_{a}"] <= 1)).all()
    assert (df["steps_10"][df["steps_10"] >= 0].median() <= df["steps_1"][df["steps_1"] >= 0].median())
    found = df["steps_1"] >= 0
    assert (df.loc[found, "boundary_mse"] <= df.loc[found, "mse_1"] + 1e-12).all()
    assert set(df.loc[found, "boundary_transfers"].unique()) <= {0.0, 1.0}
    assert (df.min_distance_l2[np.isfinite(df.min_distance_l2)] > 0).all()


def test_summary_groups_and_correlations(table):
    df, _ = table
    s = summary(df, by="kl", groups=3, resamples=200)
    assert sorted(set(s["group_of_row"])) == [0, 1, 2]
    med = s["per_group"]["min_distance_l2"]
    assert set(med) == {0, 1, 2} and all(m["low"] <= m["value"] <= m["high"] for m in med.values())
    rho = s["spearman"]["kl"]["min_distance_l2"]
    assert -1 <= rho["value"] <= 1 and rho["low"] <= rho["high"]
    assert set(s["spearman"]) >= {"kl", "js", "trace", "k_gradient", "k_attack"}


def test_a_smooth_model_takes_the_exact_path(digits_test):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).eval()
    x, y = digits_test.x[:40], digits_test.y[:40]
    with torch.no_grad():
        y = net(x).argmax(dim=1)  # every image clean-correct for this random net
    df, info = image_table(net, x, y, alphas=(1.0,), steps=5, generator=torch.Generator().manual_seed(0))
    assert info["method"] == "exact" and len(df) == 40 and info["hessian_products_per_image"] >= 64
    assert (df.neg_share > 0).any()  # a smooth model has negative curvature somewhere


def test_the_detector_reports_an_auc_per_measure(digits_cnn, digits_test):
    x, y = digits_test.x[:20], digits_test.y[:20]
    from advbench import ATTACKS, ThreatModel

    res = ATTACKS.create("pgd", steps=10)(digits_cnn, x, y, ThreatModel(norm="linf", eps=0.2),
                                          generator=torch.Generator().manual_seed(0))
    adv = res.x_adv[res.success]
    out = detector(digits_cnn, x[:len(adv)], adv, resamples=200)
    assert set(out) == {"trace", "top_eigenvalue", "neg_share", "k_gradient", "uncertainty", "kl", "js"}
    assert all(0 <= v["value"] <= 1 for k, v in out.items() if k != "neg_share" or not np.isnan(v["value"]))
    again = spectral_measures(digits_cnn, x[:3], y[:3])
    assert len(again) == 3 and again.kl.ge(0).all()
    assert ALPHAS == (0.1, 0.5, 1.0, 10.0)


def test_above_max_exact_dim_a_smooth_model_takes_the_slq_path(digits_test):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).eval()
    x = digits_test.x[:12]
    with torch.no_grad():
        y = net(x).argmax(dim=1)
    df, info = image_table(net, x, y, alphas=(1.0,), steps=5, max_exact_dim=32,
                           generator=torch.Generator().manual_seed(0))
    assert info["method"] == "slq" and len(df) == 12
    exact = eigenvalues(InputHessian(net, x, y, dtype=torch.float64).exact())
    assert (np.abs(df.trace - exact.sum(dim=1).numpy()) <= 4 * df.trace_se).all()  # Hutchinson, 100 samples
    assert np.allclose(df.top_eigenvalue, exact[:, -1].numpy(), rtol=1e-3)
    assert (df.kl >= 0).all() and np.isfinite(df.kl).all()
