"""FAB and FAB-T (Croce & Hein, ICML 2020) against exact solvers, their definition and the reference.

- The projections onto a half-space intersected with the box are exact: on small random
  instances (zero weights, points on the bounds, ties, unreachable half-spaces) their norm is
  the optimum of the same problem solved by SciPy's linear-programming solver (linf, l1) and
  their step is the solution of a fine bisection on the dual (l2, the unique minimizer), never
  beaten by SciPy's SLSQP; and they agree with pyautoattack's ``fab_projections`` where those
  apply (the box [0, 1], a reachable hyperplane).
- On an affine model with bounds that never clip, the linearization is exact: one iteration
  lands at eta = 1.05 times the distance to the closest boundary (every norm, several
  classes), two at the closed-form factor the extrapolation and backward step give, and no
  number of iterations goes below the true minimum.
- Against pyautoattack's ``FABAttack_PT`` (same n_iter, n_restarts, norm, eps; untargeted, and
  targeted over n_target_classes = 9): robust accuracy at eps within 2 points and the median
  minimal distance within 1% on 100 digits (see ``test_matches_pyautoattack`` for why).
- The contract of a minimal attack: outputs in the bounds, adversarial wherever a distance is
  reported, independent of eps, seeded, the target reached under a targeted threat model,
  8-bit outputs that survive the audit, and the documented pass counts.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import advbench.attacks.fab  # noqa: F401  (registers fab and fab-t)
from advbench.attacks.fab import project_halfspace_box, project_onto_hyperplane
from advbench.errors import ConfigError, UnsupportedThreatError
from advbench.registry import ATTACKS
from advbench.threat import Norm, ThreatModel, quantize_8bit

scipy_optimize = pytest.importorskip("scipy.optimize")

NORMS = [Norm.LINF, Norm.L2, Norm.L1]
WIDE = (-100.0, 100.0)  # bounds that never clip


# ---------------------------------------------------------------------- projections
def instances(seed: int, rows: int, dim: int, bounds=(0.0, 1.0)):
    """Random (t, w, c): some weights zero or tied, some coordinates on the bounds, c from
    below zero (nothing to do) to beyond what the box allows (unreachable)."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = bounds
    t = lo + (hi - lo) * torch.rand(rows, dim, generator=g, dtype=torch.float64)
    edge = torch.rand(rows, dim, generator=g, dtype=torch.float64)
    t = torch.where(edge < 0.1, lo, torch.where(edge > 0.9, hi, t))
    w = torch.randn(rows, dim, generator=g, dtype=torch.float64)
    w = torch.where(torch.rand(rows, dim, generator=g) < 0.2, 0.0, w)
    tied = torch.rand(rows, 1, generator=g) < 0.3  # magnitudes from {1, 2}: ties for the sorts
    w = torch.where(tied, torch.randint(-2, 3, (rows, dim), generator=g).double(), w)
    room = torch.where(w > 0, hi - t, t - lo) * (w != 0)
    total = (w.abs() * room).sum(dim=1)
    c = total * (1.3 * torch.rand(rows, generator=g, dtype=torch.float64) - 0.1)
    return t, w, c


def box_of(t: np.ndarray, bounds) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = bounds
    return lo - t, hi - t


def solve_lp(t: np.ndarray, w: np.ndarray, c: float, bounds, norm: Norm) -> float | None:
    """min ||d|| (linf or l1) s.t. <w, d> >= c, box: the optimal value, None if infeasible."""
    low, high = box_of(t, bounds)
    dim = len(t)
    if norm is Norm.LINF:  # variables (d, r): min r, -r <= d_i <= r
        cost = np.r_[np.zeros(dim), 1.0]
        eye = np.eye(dim)
        a_ub = np.vstack([np.c_[eye, -np.ones(dim)], np.c_[-eye, -np.ones(dim)], np.r_[-w, 0.0][None]])
        b_ub = np.r_[np.zeros(2 * dim), -c]
        var_bounds = [*zip(low, high), (0, None)]
    else:  # d = p - q, p in [0, high], q in [0, -low]: min sum p + q
        cost = np.ones(2 * dim)
        a_ub = np.r_[-w, w][None]
        b_ub = np.array([-c])
        var_bounds = [*((0, h) for h in high), *((0, -lw) for lw in low)]
    res = scipy_optimize.linprog(cost, A_ub=a_ub, b_ub=b_ub, bounds=var_bounds, method="highs")
    return None if res.status == 2 else float(res.fun)


def l2_by_bisection(t: torch.Tensor, w: torch.Tensor, c: float, bounds) -> torch.Tensor:
    """The l2 minimizer d = clip(lambda w, box) with the lambda where <w, d> = c, by 200 halvings."""
    lo, hi = bounds
    low, high = lo - t, hi - t

    def step(lam: float) -> torch.Tensor:
        return torch.minimum(torch.maximum(lam * w, low), high)

    top = 1.0
    while float(w @ step(top)) < c:
        top *= 2
    bottom = 0.0
    for _ in range(200):
        mid = (bottom + top) / 2
        bottom, top = (mid, top) if float(w @ step(mid)) < c else (bottom, mid)
    return step(top)


def norm_of(d: torch.Tensor, norm: Norm) -> torch.Tensor:
    p = {Norm.LINF: math.inf, Norm.L2: 2, Norm.L1: 1}[norm]
    return torch.linalg.vector_norm(d, p, dim=-1)


@pytest.mark.parametrize("norm", NORMS, ids=lambda n: n.value)
@pytest.mark.parametrize("bounds", [(0.0, 1.0), (-1.0, 2.0)])
@pytest.mark.parametrize("dim", [1, 3, 8, 20])
def test_projection_is_exact(norm, bounds, dim):
    t, w, c = instances(dim * 7 + len(str(bounds)), 25, dim, bounds)
    d = project_halfspace_box(t, w, c, bounds, norm)
    lo, hi = bounds
    assert d.dtype == t.dtype and d.shape == t.shape
    assert ((t + d) >= lo - 1e-12).all() and ((t + d) <= hi + 1e-12).all()
    room = torch.where(w > 0, hi - t, t - lo) * (w != 0)
    corner = w.sign() * room
    for i in range(len(t)):
        if c[i] <= 0:  # already inside the half-space
            assert torch.equal(d[i], torch.zeros_like(d[i]))
            continue
        reachable = float((w[i].abs() * room[i]).sum()) > float(c[i])
        if not reachable:  # the furthest corner of the box along w
            assert torch.allclose(d[i], corner[i], atol=1e-12)
            if norm is not Norm.L2:
                assert solve_lp(t[i].numpy(), w[i].numpy(), float(c[i]) * 1.001, bounds, norm) is None
            continue
        assert float(w[i] @ d[i]) >= float(c[i]) * (1 - 1e-9) - 1e-12  # in the half-space
        ours = float(norm_of(d[i], norm))
        if norm is Norm.L2:
            exact = l2_by_bisection(t[i], w[i], float(c[i]), bounds)
            assert torch.allclose(d[i], exact, atol=1e-9, rtol=1e-9)
            low, high = box_of(t[i].numpy(), bounds)
            slsqp = scipy_optimize.minimize(
                lambda v: float(v @ v), np.zeros(dim), jac=lambda v: 2 * v, method="SLSQP",
                bounds=list(zip(low, high)), options={"ftol": 1e-14, "maxiter": 500},
                constraints=[{"type": "ineq", "fun": lambda v, i=i: float(w[i].numpy() @ v - c[i]),
                              "jac": lambda v, i=i: w[i].numpy()}])
            if slsqp.success:  # a local solver can only match the exact optimum, never beat it
                assert ours <= math.sqrt(max(slsqp.fun, 0.0)) * (1 + 1e-6) + 1e-9
        else:
            optimum = solve_lp(t[i].numpy(), w[i].numpy(), float(c[i]), bounds, norm)
            assert optimum is not None
            assert ours == pytest.approx(optimum, rel=1e-7, abs=1e-10)


@pytest.mark.parametrize("norm", NORMS, ids=lambda n: n.value)
def test_projection_matches_pyautoattack(norm):
    """Onto the hyperplane <w, z> = b (from either side) in the box [0, 1], where it is reachable:
    the same step norm as the reference's sorting-and-bisection projections (float32)."""
    proj = pytest.importorskip("pyautoattack.fab_projections")
    ref = {Norm.LINF: proj.projection_linf, Norm.L2: proj.projection_l2, Norm.L1: proj.projection_l1}[norm]
    g = torch.Generator().manual_seed(3)
    t = torch.rand(200, 30, generator=g)
    w = torch.randn(200, 30, generator=g)
    b = (w * torch.rand(200, 30, generator=g)).sum(dim=1)  # a point of the box lies on it: reachable
    ours = project_onto_hyperplane(t, w, b - (w * t).sum(dim=1), (0.0, 1.0), norm)
    theirs = ref(t, w, b)
    assert torch.allclose((w * (t + ours)).sum(dim=1), b, atol=1e-4)
    assert torch.allclose(norm_of(ours, norm), norm_of(theirs, norm), rtol=1e-4, atol=1e-5)
    if norm is Norm.L2:  # unique: the steps themselves agree
        assert torch.allclose(ours, theirs, atol=1e-5)


def test_projection_rejects_other_norms():
    t, w, c = instances(0, 2, 3)
    with pytest.raises(ValueError, match="l0"):
        project_halfspace_box(t, w, c, (0.0, 1.0), Norm.L0)


# ---------------------------------------------------------------------- the definition
def affine(d: int, classes: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, classes)).double().eval()


def closest_boundary(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: Norm) -> torch.Tensor:
    """The distance to the closest decision boundary of an affine model, in ``norm``, without a box:
    min_l |f_l| / ||w_l||_q, q the dual norm."""
    weight = model[1].weight.detach()
    with torch.no_grad():
        z = model(x)
    f = z - z.gather(1, y[:, None])
    w = weight[None] - weight[y][:, None]
    q = {Norm.LINF: 1, Norm.L2: 2, Norm.L1: math.inf}[norm]
    dist = f.abs() / torch.linalg.vector_norm(w, q, dim=2)
    return dist.scatter(1, y[:, None], math.inf).amin(dim=1)


@pytest.mark.parametrize("norm", NORMS, ids=lambda n: n.value)
@pytest.mark.parametrize("classes", [2, 5])
def test_affine_model_closed_form(norm, classes):
    model = affine(12, classes, seed=classes)
    x = torch.rand(30, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    true = closest_boundary(model, x, y, norm)
    threat = ThreatModel(norm=norm, eps=10.0, bounds=WIDE)
    eta, beta = 1.05, 0.9
    # one iteration: both projections are the step p onto the closest boundary, so x + eta p
    one = ATTACKS.create("fab", steps=1)(model, x, y, threat).minimal_distances.double()
    assert torch.allclose(one, eta * true, rtol=1e-6)  # distances are reported in float32
    # two: the backward step leaves x + beta eta p; the projections are then (1 - beta eta) p from
    # there and p from x, alpha = (1 - beta eta) / (2 - beta eta), and the point reached is
    # (1 - alpha)(beta eta + eta (1 - beta eta)) + alpha eta times p
    alpha = (1 - beta * eta) / (2 - beta * eta)
    factor = (1 - alpha) * (beta * eta + eta * (1 - beta * eta)) + alpha * eta
    two = ATTACKS.create("fab", steps=2)(model, x, y, threat).minimal_distances.double()
    assert torch.allclose(two, factor * true, rtol=1e-6)
    many = ATTACKS.create("fab", steps=30)(model, x, y, threat)
    dist = many.minimal_distances.double()
    assert (dist >= true * (1 - 1e-6)).all() and (dist <= factor * true * (1 + 1e-6)).all()
    assert many.success.all()  # eps 10 is far beyond these distances


def test_affine_model_counts(digits_test):
    """Two forward passes per iteration; K - 1 backward passes untargeted, one targeted (per example)."""
    model = affine(12, 5, seed=5)
    x = torch.rand(20, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    threat = ThreatModel(norm="l2", eps=1.0, bounds=WIDE)
    res = ATTACKS.create("fab", steps=7, restarts=2)(model, x, y, threat, generator=torch.Generator().manual_seed(0))
    n = len(y)
    assert (res.n_forward, res.n_backward) == (n + 2 * 7 * 2 * n, 4 * 7 * 2 * n)
    res = ATTACKS.create("fab-t", steps=7, targets=3)(model, x, y, threat)
    assert (res.n_forward, res.n_backward) == (n + 2 * 7 * 3 * n, 7 * 3 * n)
    targeted = ThreatModel(norm="l2", eps=1.0, bounds=WIDE, targeting="random")
    res = ATTACKS.create("fab", steps=7)(model, x, y, targeted, generator=torch.Generator().manual_seed(0))
    assert (res.n_forward, res.n_backward) == (n + 2 * 7 * n, 7 * n)


# ---------------------------------------------------------------------- the reference
def reference_distance(x: torch.Tensor, adv: torch.Tensor, norm: Norm) -> torch.Tensor:
    return norm_of((adv - x).flatten(1).double(), norm)


EPS = {Norm.LINF: 0.1, Norm.L2: 0.5, Norm.L1: 1.5}


@pytest.mark.parametrize("norm", NORMS, ids=lambda n: n.value)
@pytest.mark.parametrize("name", ["fab", "fab-t"])
def test_matches_pyautoattack(name, norm, digits_mlp, digits_test):
    """Same n_iter, n_restarts, norm and eps as pyautoattack's FABAttack_PT (targeted=True,
    n_target_classes=9 for fab-t) on 100 correctly classified digits.

    Tolerance: the algorithm and its defaults are the reference's and, with one restart,
    deterministic; the two differ in the projections' arithmetic (float64 and exact here,
    float32 with 1e-8 / 1e-12 guards there) and in tie-breaking, so trajectories agree unless a
    rounding difference flips a near tie (the closest class, whether a point is adversarial).
    2 points (2 examples of 100) for robust accuracy and 1% for the median distance allow a few
    such flips and no systematic difference (measured: identical on every setting here)."""
    fab_pt = pytest.importorskip("pyautoattack.fab_pt")
    x, y = digits_test.x[:120], digits_test.y[:120]
    with torch.no_grad():
        keep = digits_mlp(x).argmax(dim=1) == y
    x, y = x[keep][:100], y[keep][:100]
    steps, eps, targeted = 50, EPS[norm], name == "fab-t"
    ref = fab_pt.FABAttack_PT(digits_mlp, norm={"linf": "Linf", "l2": "L2", "l1": "L1"}[norm.value], n_restarts=1,
                              n_iter=steps, eps=eps, seed=0, targeted=targeted, n_target_classes=9, device="cpu")
    adv = ref.perturb(x, y)
    with torch.no_grad():
        ref_robust = ((digits_mlp(adv).argmax(dim=1) == y) | (reference_distance(x, adv, norm) > eps)).float().mean()
    # the reference's smallest adversarial example per example: its runs without the eps check
    ref_dist = torch.full((len(y),), math.inf, dtype=torch.float64)
    for target_class in range(2, 11) if targeted else [None]:
        ref.target_class = target_class
        point = ref.attack_single_run(x, y, use_rand_start=False, is_targeted=targeted)
        with torch.no_grad():
            fooled = digits_mlp(point).argmax(dim=1) != y
        ref_dist = torch.minimum(ref_dist, torch.where(fooled, reference_distance(x, point, norm), math.inf))
    res = ATTACKS.create(name, steps=steps)(digits_mlp, x, y, ThreatModel(norm=norm, eps=eps))
    robust = 1 - res.success.float().mean()
    assert 0.1 < float(ref_robust) < 0.9, "eps should leave robust accuracy in between"
    assert abs(float(robust - ref_robust)) <= 0.02
    ours = res.minimal_distances.double()
    assert torch.isfinite(ours).float().mean() >= torch.isfinite(ref_dist).float().mean() - 0.02
    assert float(ours.median()) == pytest.approx(float(ref_dist.median()), rel=0.01)


def test_restarts_match_pyautoattack(digits_mlp, digits_test):
    """Three restarts: the random starts differ (radius and generator, see the module docstring),
    so 3 points of robust accuracy; the restarts never lose what the first run found."""
    fab_pt = pytest.importorskip("pyautoattack.fab_pt")
    x, y = digits_test.x[:100], digits_test.y[:100]
    eps = 0.08
    ref = fab_pt.FABAttack_PT(digits_mlp, norm="Linf", n_restarts=3, n_iter=30, eps=eps, seed=0, device="cpu")
    adv = ref.perturb(x, y)
    with torch.no_grad():
        ref_robust = ((digits_mlp(adv).argmax(dim=1) == y) | (reference_distance(x, adv, Norm.LINF) > eps)).float().mean()
    threat = ThreatModel(norm="linf", eps=eps)
    res = ATTACKS.create("fab", steps=30, restarts=3)(digits_mlp, x, y, threat, generator=torch.Generator().manual_seed(0))
    assert abs(float((1 - res.success.float().mean()) - ref_robust)) <= 0.03
    single = ATTACKS.create("fab", steps=30)(digits_mlp, x, y, threat)
    assert (res.minimal_distances <= single.minimal_distances).all()


# ---------------------------------------------------------------------- the contract
@pytest.fixture(scope="module")
def batch(digits_test):
    return digits_test.x[::6][:50].clone(), digits_test.y[::6][:50].clone()


@pytest.mark.parametrize("norm", NORMS, ids=lambda n: n.value)
@pytest.mark.parametrize("name", ["fab", "fab-t"])
def test_minimal_outputs_are_adversarial_in_bounds_and_eps_free(name, norm, batch, digits_mlp):
    x, y = batch
    attack = ATTACKS.create(name, steps=15, restarts=2, **({"targets": 3} if name == "fab-t" else {}))
    small, large = EPS[norm] / 4, EPS[norm] * 2
    a = attack(digits_mlp, x, y, ThreatModel(norm=norm, eps=small), generator=torch.Generator().manual_seed(7))
    b = attack(digits_mlp, x, y, ThreatModel(norm=norm, eps=large), generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.x_minimal, b.x_minimal) and torch.equal(a.minimal_distances, b.minimal_distances)
    assert a.x_minimal.min() >= 0 and a.x_minimal.max() <= 1
    found = torch.isfinite(a.minimal_distances)
    assert found.float().mean() > 0.9
    with torch.no_grad():
        pred = digits_mlp(a.x_minimal).argmax(dim=1)
    assert (pred[found] != y[found]).all()
    assert torch.allclose(a.minimal_distances[found].double(), norm_of((a.x_minimal - x).flatten(1).double(), norm)[found],
                          rtol=1e-6)
    # scored at each eps: broken exactly where the minimal distance is within it
    for res, eps in ((a, small), (b, large)):
        assert torch.equal(res.success, found & (res.minimal_distances <= eps * (1 + 1e-6)))
    assert b.success.sum() > a.success.sum()


def test_seeded_and_randomized_only_with_restarts(batch, digits_mlp):
    x, y = batch
    threat = ThreatModel(norm="l2", eps=0.5)
    attack = ATTACKS.create("fab", steps=10, restarts=3)
    assert attack.randomized and not ATTACKS.create("fab", steps=10).randomized
    state = torch.get_rng_state()
    a = attack(digits_mlp, x, y, threat, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), state)
    b = attack(digits_mlp, x, y, threat, generator=torch.Generator().manual_seed(1))
    c = attack(digits_mlp, x, y, threat, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a.x_minimal, b.x_minimal)
    assert not torch.equal(a.x_minimal, c.x_minimal)
    once = ATTACKS.create("fab", steps=10)
    assert torch.equal(once(digits_mlp, x, y, threat).x_minimal,
                       once(digits_mlp, x, y, threat, generator=torch.Generator().manual_seed(9)).x_minimal)


@pytest.mark.parametrize("norm", NORMS, ids=lambda n: n.value)
def test_targeted_threat_reaches_the_target(norm, batch, digits_mlp):
    x, y = batch
    threat = ThreatModel(norm=norm, eps=EPS[norm] * 3, targeting="random")
    res = ATTACKS.create("fab", steps=30)(digits_mlp, x, y, threat, generator=torch.Generator().manual_seed(3))
    t = res.target
    found = torch.isfinite(res.minimal_distances)
    assert found.float().mean() > 0.8
    with torch.no_grad():
        pred = digits_mlp(res.x_minimal).argmax(dim=1)
    assert (pred[found] == t[found]).all() and (t[found] != y[found]).all()
    # toward a given class the smallest example is no closer than toward the closest boundary
    free = ATTACKS.create("fab", steps=30)(digits_mlp, x, y, ThreatModel(norm=norm, eps=1.0))
    both = found & torch.isfinite(free.minimal_distances)
    assert float(res.minimal_distances[both].median()) >= float(free.minimal_distances[both].median())


def test_fab_t_is_untargeted_only(batch, digits_mlp):
    x, y = batch
    with pytest.raises(UnsupportedThreatError, match="random"):
        ATTACKS.create("fab-t")(digits_mlp, x, y, ThreatModel(norm="linf", eps=0.1, targeting="random"))
    with pytest.raises(UnsupportedThreatError, match="l0"):
        ATTACKS.create("fab")(digits_mlp, x, y, ThreatModel(norm="l0", eps=3))


def test_clean_errors_and_untargetable_examples_are_left_alone(batch, digits_mlp):
    x, y = batch
    with torch.no_grad():
        pred = digits_mlp(x).argmax(dim=1)
    wrong = y.clone()
    wrong[:5] = (pred[:5] + 1) % 10  # labels the model gets wrong
    res = ATTACKS.create("fab-t", steps=5, targets=2)(digits_mlp, x, wrong, ThreatModel(norm="linf", eps=0.1))
    assert torch.equal(res.x_minimal[:5], x[:5]) and (res.minimal_distances[:5] == 0).all()
    fixed = ThreatModel(norm="linf", eps=0.1, targeting="fixed", target_class=int(y[0]))
    res = ATTACKS.create("fab", steps=5)(digits_mlp, x, y, fixed)
    assert torch.equal(res.x_minimal[y == y[0]], x[y == y[0]])
    assert torch.isinf(res.minimal_distances[y == y[0]]).all()


@pytest.mark.parametrize("norm", NORMS, ids=lambda n: n.value)
def test_8bit_outputs_survive_the_audit(norm, batch, digits_mlp):
    x, y = batch
    x = quantize_8bit(x, (0.0, 1.0))  # data on the 8-bit grid
    threat = ThreatModel(norm=norm, eps=EPS[norm] * 2, quantize="8bit")
    res = ATTACKS.create("fab-t", steps=15, targets=3)(digits_mlp, x, y, threat)
    assert res.n_violations == 0
    found = torch.isfinite(res.minimal_distances)
    assert found.float().mean() > 0.8
    assert torch.allclose(quantize_8bit(res.x_minimal, (0.0, 1.0)), res.x_minimal, rtol=0, atol=1e-6)  # 8-bit
    with torch.no_grad():
        assert (digits_mlp(res.x_minimal[found]).argmax(dim=1) != y[found]).all()


def test_params_are_validated():
    with pytest.raises(ConfigError, match="steps"):
        ATTACKS.create("fab", steps=0)
    with pytest.raises(ConfigError, match="alpha_max"):
        ATTACKS.create("fab", alpha_max=1.5)
    with pytest.raises(ConfigError, match="targets"):
        ATTACKS.create("fab-t", targets=0)
    with pytest.raises(ConfigError, match="targets"):
        ATTACKS.create("fab", targets=3)
    assert ATTACKS.create("fab-t").params() == {"steps": 100, "restarts": 1, "alpha_max": 0.1, "eta": 1.05,
                                                "beta": 0.9, "start_radius": None, "targets": 9}
