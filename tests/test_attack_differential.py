"""advbench's gradient attacks against independent implementations, on the same models and data.

References: torchattacks 3.5.1 (FGSM, BIM, PGD, PGDL2) and foolbox 3.3.4 (the L2 fast gradient
method and L2 PGD, which torchattacks lacks or samples differently). Models: the digits MLP and
CNN from conftest, which return logits and take [0, 1] inputs, as both libraries expect. Data:
the 360 digits test images. Hyperparameters are matched exactly (torchattacks' losses are batch
means, ours sums: the sign and the L2-normalized step are the same).

Deterministic settings (no random start) must give the same robust accuracy within one
percentage point, and the same prediction on nearly every example. Random starts are compared
as the mean over three seeds of each library, with the tolerance each comparison justifies
(see the tests).
"""

from __future__ import annotations

import pytest
import torch

from advbench.registry import ATTACKS
from advbench.threat import ThreatModel

torchattacks = pytest.importorskip("torchattacks")
foolbox = pytest.importorskip("foolbox")

EPS_LINF = 0.1
EPS_L2 = 0.75
STEPS = 20
ONE_POINT = 0.01 + 1e-6


@pytest.fixture(scope="module", params=["digits_mlp", "digits_cnn"])
def setup(request, digits_test):
    return request.getfixturevalue(request.param), digits_test.x, digits_test.y


@torch.no_grad()
def predictions(model, x):
    return model(x).argmax(dim=1)


def ours(model, x, y, name, threat, seed=0, **params):
    res = ATTACKS.create(name, **params)(model, x, y, threat, generator=torch.Generator().manual_seed(seed))
    assert res.valid.all()
    return res


def accuracy(pred, y) -> float:
    return (pred == y).float().mean().item()


def theirs_torchattacks(model, x, y, cls, seed=0, **params):
    torch.manual_seed(seed)  # torchattacks draws from the global generator
    x_adv = getattr(torchattacks, cls)(model, **params)(x, y)
    return predictions(model, x_adv)


def theirs_foolbox(model, x, y, attack, eps, seed=0):
    torch.manual_seed(seed)  # foolbox (eagerpy) draws from the global generator too
    fmodel = foolbox.PyTorchModel(model, bounds=(0, 1))
    _, x_adv, _ = attack(fmodel, x, y, epsilons=eps)
    return predictions(model, x_adv)


def compare_exact(setup, name, threat, params, reference):
    model, x, y = setup
    res = ours(model, x, y, name, threat, **params)
    ref = reference(model, x, y)
    ours_acc, ref_acc = 1.0 - res.success_rate, accuracy(ref, y)
    assert abs(ours_acc - ref_acc) <= ONE_POINT, (ours_acc, ref_acc)
    assert (res.pred_adv == ref).float().mean() >= 0.99  # the same examples, not just the same count
    return ours_acc, ref_acc


def test_fgsm_linf_matches_torchattacks(setup):
    compare_exact(setup, "fgsm", ThreatModel(eps=EPS_LINF), {},
                  lambda m, x, y: theirs_torchattacks(m, x, y, "FGSM", eps=EPS_LINF))


def test_fgm_l2_matches_foolbox(setup):
    compare_exact(setup, "fgsm", ThreatModel(norm="l2", eps=EPS_L2), {},
                  lambda m, x, y: theirs_foolbox(m, x, y, foolbox.attacks.L2FastGradientAttack(), EPS_L2))


def test_bim_matches_torchattacks(setup):
    alpha = 1 / 255
    steps = ATTACKS.create("bim").schedule(ThreatModel(eps=EPS_LINF))[0]  # the paper's rule: 30
    assert steps == 30
    compare_exact(setup, "bim", ThreatModel(eps=EPS_LINF), {},  # advbench's defaults, spelled out for torchattacks
                  lambda m, x, y: theirs_torchattacks(m, x, y, "BIM", eps=EPS_LINF, alpha=alpha, steps=steps))
    compare_exact(setup, "bim", ThreatModel(eps=EPS_LINF), {"steps": 10, "step_size": 0.02},
                  lambda m, x, y: theirs_torchattacks(m, x, y, "BIM", eps=EPS_LINF, alpha=0.02, steps=10))


def test_pgd_linf_without_random_start_matches_torchattacks(setup):
    alpha = 2.5 * EPS_LINF / STEPS
    compare_exact(setup, "pgd", ThreatModel(eps=EPS_LINF), {"steps": STEPS, "random_start": False},
                  lambda m, x, y: theirs_torchattacks(m, x, y, "PGD", eps=EPS_LINF, alpha=alpha, steps=STEPS,
                                                      random_start=False))


def test_pgd_l2_without_random_start_matches_torchattacks_and_foolbox(setup):
    alpha = 2.5 * EPS_L2 / STEPS
    threat = ThreatModel(norm="l2", eps=EPS_L2)
    params = {"steps": STEPS, "random_start": False}
    compare_exact(setup, "pgd", threat, params,
                  lambda m, x, y: theirs_torchattacks(m, x, y, "PGDL2", eps=EPS_L2, alpha=alpha, steps=STEPS,
                                                      random_start=False))
    compare_exact(setup, "pgd", threat, params,
                  lambda m, x, y: theirs_foolbox(m, x, y, foolbox.attacks.L2PGD(abs_stepsize=alpha, steps=STEPS,
                                                                                random_start=False), EPS_L2))


def test_targeted_pgd_matches_torchattacks(setup):
    model, x, y = setup
    keep = y != 0
    x, y = x[keep], y[keep]
    alpha = 2.5 * EPS_LINF / STEPS
    res = ours(model, x, y, "pgd", ThreatModel(eps=EPS_LINF, targeting="fixed", target_class=0),
               steps=STEPS, random_start=False)
    atk = torchattacks.PGD(model, eps=EPS_LINF, alpha=alpha, steps=STEPS, random_start=False)
    atk.set_mode_targeted_by_function(lambda images, labels: torch.zeros_like(labels), quiet=True)
    ref = predictions(model, atk(x, y))
    assert abs(res.success_rate - (ref == 0).float().mean().item()) <= ONE_POINT
    assert (res.pred_adv == ref).float().mean() >= 0.99


SEEDS = tuple(range(8))  # one run's robust accuracy moves by about a point from seed to seed


def mean_over_seeds(fn) -> float:
    return sum(fn(s) for s in SEEDS) / len(SEEDS)


def test_pgd_linf_random_start_matches_torchattacks(setup):
    """Both draw the start uniformly from the linf ball, so only the draws differ (we seed the two
    libraries differently on purpose, so that the comparison does not rest on a shared random
    stream). On these models one run's robust accuracy moves by 0.5 to 1 point from seed to seed
    (12 seeds of the l2 attack on digits-cnn: 16.1% to 19.7%, std 1.0 point), so the means of
    eight runs each side must agree within 1.5 points (about 3 standard deviations of their
    difference; with three runs a side it was under 2, and failed on a machine where the model
    trained otherwise: 16.9% against foolbox's 18.4%, where 12 seeds give 17.8% and 18.0%)."""
    model, x, y = setup
    alpha = 2.5 * EPS_LINF / STEPS
    a = mean_over_seeds(lambda s: 1 - ours(model, x, y, "pgd", ThreatModel(eps=EPS_LINF), seed=s, steps=STEPS).success_rate)
    b = mean_over_seeds(lambda s: accuracy(theirs_torchattacks(model, x, y, "PGD", seed=100 + s, eps=EPS_LINF,
                                                               alpha=alpha, steps=STEPS, random_start=True), y))
    assert abs(a - b) <= 0.015, (a, b)


def test_pgd_l2_random_start_matches_foolbox_and_brackets_torchattacks(setup):
    """foolbox draws the L2 start uniformly from the ball (Voelker et al.'s method), as advbench
    does (Gaussian direction, radius eps * u^(1/d)): same distribution, same 1.5-point tolerance
    as linf. torchattacks' PGDL2 draws the radius as eps * u, which in d = 64 puts most starts
    well inside the ball (median radius 0.5 eps against 0.99 eps for a uniform draw): a
    different, slightly stronger start on these models (about 1.5 points lower robust accuracy
    measured), so it gets a looser 4-point tolerance, and both random starts must stay within
    reach of the deterministic run."""
    model, x, y = setup
    alpha = 2.5 * EPS_L2 / STEPS
    threat = ThreatModel(norm="l2", eps=EPS_L2)
    a = mean_over_seeds(lambda s: 1 - ours(model, x, y, "pgd", threat, seed=s, steps=STEPS).success_rate)
    fb = mean_over_seeds(lambda s: accuracy(theirs_foolbox(
        model, x, y, foolbox.attacks.L2PGD(abs_stepsize=alpha, steps=STEPS, random_start=True), EPS_L2, seed=100 + s), y))
    ta = mean_over_seeds(lambda s: accuracy(theirs_torchattacks(model, x, y, "PGDL2", seed=100 + s, eps=EPS_L2,
                                                                alpha=alpha, steps=STEPS, random_start=True), y))
    assert abs(a - fb) <= 0.015, (a, fb)
    assert abs(a - ta) <= 0.04, (a, ta)
    fixed = 1 - ours(model, x, y, "pgd", threat, steps=STEPS, random_start=False).success_rate
    assert abs(a - fixed) <= 0.06 and abs(ta - fixed) <= 0.06, (a, ta, fixed)
