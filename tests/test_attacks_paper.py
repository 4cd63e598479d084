"""Each gradient attack against its paper's definition, on cases small enough to compute by hand.

- FGSM (Goodfellow et al. 2015): x' = clip(x + eps sign(grad_x J(x, y))), on linear models whose
  input gradient has a closed form.
- BIM / ILLC (Kurakin et al. 2017): the iteration count min(eps + 4, 1.25 eps), alpha = 1/255,
  and X_{N+1} = Clip_{X,eps}{X_N +- alpha sign(grad J(X_N, .))} replayed step by step.
- PGD (Madry et al. 2018): the random start is uniform in the ball, restarts keep the best
  result per example, and attack strength orders as the papers report.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from advbench.attacks.bim import paper_steps
from advbench.attacks.losses import l2_normalize, per_example_objective, project_l2_
from advbench.registry import ATTACKS
from advbench.threat import ThreatModel


class Recorder(nn.Module):
    """Wraps a model and keeps a copy of every input it is called on, with its grad flag."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls: list[tuple[torch.Tensor, bool]] = []
        self.eval()  # like the model it wraps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.detach().clone(), x.requires_grad))
        return self.model(x)

    def grad_inputs(self) -> list[torch.Tensor]:
        """Inputs of the forward passes made to take a gradient (the attack's iterates)."""
        return [x for x, g in self.calls if g]


def linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Module:
    lin = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        lin.weight.copy_(weight)
        lin.bias.copy_(torch.zeros(weight.shape[0]) if bias is None else bias)
    return nn.Sequential(nn.Flatten(), lin).eval()


def ce_input_grad(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    return torch.autograd.grad(F.cross_entropy(model(x), labels, reduction="sum"), x)[0]


# ---------------------------------------------------------------------- FGSM
def test_fgsm_on_a_binary_linear_model_is_x_plus_eps_sign_of_the_weight_difference():
    # For logits z = W x and label y, grad_x J(x, y) = -(1 - p_y) (w_y - w_o): its sign is
    # sign(w_o - w_y) whatever x is (while p_y < 1). So x' = clip(x + eps sign(w_o - w_y)).
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2, 16, generator=g)
    model = linear(w)
    x = torch.rand(32, 1, 4, 4, generator=g) * 0.8 + 0.1
    x[0, 0, 0, :] = torch.tensor([0.0, 1.0, 0.97, 0.03])  # where the bounds clip
    y = torch.randint(0, 2, (32,), generator=g)
    direction = torch.sign(w[1 - y] - w[y]).view(32, 1, 4, 4)  # w_o - w_y, per example
    eps = 0.1
    res = ATTACKS.create("fgsm")(model, x, y, ThreatModel(norm="linf", eps=eps))
    expected = (x + eps * direction).clamp(0, 1)
    assert torch.allclose(res.x_adv, expected, rtol=0, atol=1e-7)
    assert torch.equal(torch.sign(res.x_adv - x), torch.sign(expected - x))  # every coordinate moved as predicted
    # l2, the fast gradient method: x' = x + eps (w_o - w_y) / ||w_o - w_y||
    diff = (w[1 - y] - w[y]).view(32, 1, 4, 4)
    x_mid = torch.full_like(x, 0.5)
    res2 = ATTACKS.create("fgsm")(model, x_mid, y, ThreatModel(norm="l2", eps=0.5))
    expected2 = x_mid + 0.5 * diff / diff.flatten(1).norm(dim=1).view(32, 1, 1, 1)
    assert torch.allclose(res2.x_adv, expected2, atol=1e-6)
    assert torch.allclose(res2.distances, torch.full((32,), 0.5), atol=1e-6)


def test_fgsm_on_a_multiclass_linear_model_matches_the_hand_gradient():
    # grad_x J(x, y) = W^T (softmax(W x + b) - e_y): computed here in float64, by hand.
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(5, 12, generator=g), torch.randn(5, generator=g)
    model = linear(w, b)
    x = torch.rand(64, 12, generator=g) * 0.6 + 0.2
    y = torch.randint(0, 5, (64,), generator=g)
    t = (y + 1 + torch.randint(0, 4, (64,), generator=g)) % 5
    p = torch.softmax(x.double() @ w.double().T + b.double(), dim=1)
    grad_y = (p - F.one_hot(y, 5).double()) @ w.double()
    grad_t = (p - F.one_hot(t, 5).double()) @ w.double()
    eps = 0.05
    untargeted = ATTACKS.create("fgsm")(model, x, y, ThreatModel(eps=eps))
    assert torch.allclose(untargeted.x_adv.double(), x.double() + eps * grad_y.sign(), atol=1e-7)
    # targeted (Kurakin's "step toward t"): x' = x - eps sign(grad_x J(x, t))
    targeted = ATTACKS.create("fgsm")(model, x, y, ThreatModel(eps=eps, targeting="random"), target=t)
    assert torch.allclose(targeted.x_adv.double(), x.double() - eps * grad_t.sign(), atol=1e-7)
    l2 = ATTACKS.create("fgsm")(model, x, y, ThreatModel(norm="l2", eps=eps))
    assert torch.allclose(l2.x_adv.double(), x.double() + eps * grad_y / grad_y.norm(dim=1, keepdim=True), atol=1e-6)


def test_fgsm_is_safe_for_zero_and_tiny_gradients():
    x = torch.rand(8, 1, 4, 4)
    y = torch.zeros(8, dtype=torch.long)
    flat = linear(torch.zeros(3, 16))  # no gradient at all
    for norm in ("linf", "l2"):
        res = ATTACKS.create("fgsm")(flat, x, y, ThreatModel(norm=norm, eps=0.3))
        assert torch.equal(res.x_adv, x) and res.valid.all()
    # a gradient of ~1e-25 per entry has a float32 norm of 0, yet its direction is well defined
    g = torch.full((2, 100), 1e-25)
    g[1] *= -1
    assert torch.allclose(l2_normalize(g), torch.full((2, 100), 0.1) * torch.tensor([[1.0], [-1.0]]))
    assert torch.equal(l2_normalize(torch.zeros(2, 5)), torch.zeros(2, 5))


# ---------------------------------------------------------------------- BIM / ILLC
@pytest.mark.parametrize(
    "eps_255, steps",
    [(1, 2), (2, 3), (4, 5), (8, 10), (16, 20), (32, 36), (0.3 * 255, 81), (0.25, 1)],
)
def test_bim_default_iterations_follow_the_paper(eps_255, steps):
    # min(eps + 4, 1.25 eps), eps in 0-255 units, rounded up, at least 1:
    # 1 -> min(5, 1.25) = 1.25 -> 2; 4 -> min(8, 5) = 5; 16 -> min(20, 20) = 20; 32 -> min(36, 40) = 36;
    # 76.5 (eps 0.3) -> min(80.5, 95.6) -> 81
    assert paper_steps(eps_255 / 255 * 255) == steps
    bim = ATTACKS.create("bim")
    assert bim.schedule(ThreatModel(eps=eps_255 / 255)) == (steps, 1 / 255)
    # eps and alpha are relative to the input range: bounds [-1, 1] have 2/255 per grey level
    assert bim.schedule(ThreatModel(eps=2 * eps_255 / 255, bounds=(-1, 1))) == (steps, 2 / 255)


def test_bim_runs_its_default_schedule(digits_mlp, digits_test):
    x, y = digits_test.x[:20], digits_test.y[:20]
    res = ATTACKS.create("bim")(digits_mlp, x, y, ThreatModel(eps=4 / 255))
    assert res.n_backward == 5 * 20 and res.n_forward == 5 * 20  # per example
    res = ATTACKS.create("bim", steps=3, step_size=0.01)(digits_mlp, x, y, ThreatModel(eps=4 / 255))
    assert res.n_backward == 3 * 20


def paper_clip(x_new: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Clip_{X,eps}{X'} = min{1, X + eps, max{0, X - eps, X'}} (Kurakin et al., eq. for [0, 1] images)."""
    return torch.minimum(torch.minimum(torch.ones_like(x), x + eps), torch.maximum(torch.maximum(torch.zeros_like(x), x - eps), x_new))


@pytest.mark.parametrize("name", ["bim", "illc"])
def test_bim_and_illc_replay_the_paper_recursion_step_by_step(name, digits_mlp, digits_test):
    x, y = digits_test.x[:40], digits_test.y[:40]
    eps, alpha, steps = 0.06, 0.025, 6  # alpha large against eps: the per-step clip matters
    rec = Recorder(digits_mlp)
    res = ATTACKS.create(name, steps=steps, step_size=alpha)(rec, x, y, ThreatModel(eps=eps))
    iterates = rec.grad_inputs() + [res.x_adv]
    assert len(iterates) == steps + 1
    assert torch.equal(iterates[0], x)  # X_0 = X
    with torch.no_grad():
        y_ll = digits_mlp(x).argmin(dim=1)
    sign = 1.0 if name == "bim" else -1.0  # BIM ascends J(X, y_true); ILLC descends J(X, y_LL)
    labels = y if name == "bim" else y_ll
    clipped_on_the_way = False
    for n in range(steps):
        grad = ce_input_grad(digits_mlp, iterates[n], labels)
        unclipped = iterates[n] + sign * alpha * grad.sign()
        expected = paper_clip(unclipped, x, eps)
        assert torch.allclose(iterates[n + 1], expected, rtol=0, atol=1e-7), f"step {n + 1}"
        clipped_on_the_way |= bool((expected != unclipped).any()) and n < steps - 1
    assert clipped_on_the_way  # the case exercises the clip before the last step
    # clipping only once at the end would have given something else
    z = x.clone()
    for _ in range(steps):
        z = (z + sign * alpha * ce_input_grad(digits_mlp, z, labels).sign()).clamp(0, 1)
    assert not torch.allclose(paper_clip(z, x, eps), res.x_adv)


def test_illc_moves_toward_the_least_likely_class(digits_mlp, digits_test):
    x, y = digits_test.x, digits_test.y
    with torch.no_grad():
        clean = digits_mlp(x)
    y_ll = clean.argmin(dim=1)
    illc = ATTACKS.create("illc")
    res_ll = illc(digits_mlp, x, y, ThreatModel(eps=0.2, targeting="least_likely"))
    assert torch.equal(res_ll.target, y_ll)
    with torch.no_grad():
        adv = digits_mlp(res_ll.x_adv)
    p_clean = clean.softmax(1).gather(1, y_ll[:, None]).squeeze(1)
    p_adv = adv.softmax(1).gather(1, y_ll[:, None]).squeeze(1)
    assert (p_adv > p_clean).float().mean() > 0.99  # p(y_LL | X) rises for (nearly) every example
    assert torch.equal(res_ll.success, adv.argmax(1) == y_ll)  # success = predicting y_LL
    assert res_ll.success.float().mean() > 0.25
    # untargeted: the same steering (toward the clean y_LL), success is misclassification
    res_u = illc(digits_mlp, x, y, ThreatModel(eps=0.2))
    assert res_u.target is None
    assert torch.equal(res_u.x_adv, res_ll.x_adv)
    assert torch.equal(res_u.success, adv.argmax(1) != y)
    assert res_u.success.sum() >= res_ll.success.sum()


# ---------------------------------------------------------------------- PGD
def test_pgd_l2_random_start_is_uniform_in_the_ball():
    # Uniform in the d-ball: direction isotropic, radius r with (r / eps)^d ~ U(0, 1). In d = 64
    # most of the volume is near the sphere, yet not on it: P(r < 0.95 eps) = 0.95^64 = 3.7%.
    n, d, eps = 2000, 64, 0.8
    x = torch.full((n, 1, 8, 8), 0.5)  # far from the bounds: no clipping distorts the start
    y = torch.zeros(n, dtype=torch.long)
    rec = Recorder(linear(torch.randn(10, d, generator=torch.Generator().manual_seed(0))))
    ATTACKS.create("pgd", steps=1)(rec, x, y, ThreatModel(norm="l2", eps=eps), generator=torch.Generator().manual_seed(1))
    delta = (rec.grad_inputs()[0] - x).flatten(1).double()
    r = delta.norm(dim=1)
    assert r.max() <= eps * (1 + 1e-6)
    u = (r / eps).pow(d)
    assert stats.kstest(u.numpy(), "uniform").pvalue > 1e-3
    assert (r < 0.95 * eps).float().mean() > 0.01  # not concentrated on the boundary
    assert (r < 0.5 * eps).sum() == 0 or (r < 0.5 * eps).float().mean() < 1e-3  # nor near the centre
    mean_dir = (delta / r[:, None]).mean(dim=0)
    assert mean_dir.abs().max() < 4 / math.sqrt(n)  # isotropic


def test_pgd_linf_random_start_is_uniform_in_the_box():
    n, eps = 500, 0.1
    x = torch.full((n, 1, 8, 8), 0.5)
    y = torch.zeros(n, dtype=torch.long)
    rec = Recorder(linear(torch.randn(10, 64, generator=torch.Generator().manual_seed(0))))
    ATTACKS.create("pgd", steps=1)(rec, x, y, ThreatModel(eps=eps), generator=torch.Generator().manual_seed(2))
    delta = (rec.grad_inputs()[0] - x).flatten()
    assert delta.abs().max() <= eps + 1e-7
    assert stats.kstest(((delta.double() / eps + 1) / 2).numpy(), "uniform").pvalue > 1e-3


def test_l2_projection_matches_the_threat_model():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(64, 3, 5, 5, generator=g)
    x_adv = (x + torch.randn(64, 3, 5, 5, generator=g) * torch.rand(64, 1, 1, 1, generator=g)).clamp(-0.5, 1.5)
    threat = ThreatModel(norm="l2", eps=0.7)
    assert torch.equal(project_l2_(x_adv.clone(), x, threat.eps, threat.bounds), threat.project(x_adv, x))


def test_margin_loss_by_hand():
    z = torch.tensor([[1.0, 3.0, 2.0], [5.0, -1.0, 0.0]])
    y = torch.tensor([0, 0])
    t = torch.tensor([2, 1])
    assert torch.equal(per_example_objective("margin", z, y, None), torch.tensor([2.0, -5.0]))  # max_{i!=y} z_i - z_y
    assert torch.equal(per_example_objective("margin", z, y, t), torch.tensor([-1.0, -6.0]))  # z_t - max_{i!=t} z_i
    ce = per_example_objective("ce", z, y, None)
    assert torch.allclose(ce, F.cross_entropy(z, y, reduction="none"))
    assert torch.allclose(per_example_objective("ce", z, y, t), -F.cross_entropy(z, t, reduction="none"))


def _two_class_model() -> nn.Module:
    """Input (id_a, id_b, u) as 1x1x3: logits (0, 40 (u - 0.5)). Only u matters; ids name the example."""
    return linear(torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 40.0]]), torch.tensor([0.0, -20.0]))


def test_pgd_restarts_keep_the_best_per_example():
    # 64 examples (ids on a grid far apart against eps), label 0, u below the boundary u = 0.5:
    # half at 0.5 - 2 eps (no start in the ball can cross), half at 0.5 - 0.5 eps (a start crosses
    # with probability 1/4). One step of +alpha on u after the start (the ids have zero gradient).
    eps, alpha, restarts = 0.04, 0.005, 5
    ids = torch.linspace(0.1, 0.9, 8)
    grid = torch.cartesian_prod(ids, ids)
    u = torch.where(torch.arange(64) % 2 == 0, 0.5 - 2 * eps, 0.5 - 0.5 * eps)
    x = torch.cat([grid, u[:, None]], dim=1).view(64, 1, 1, 3)
    y = torch.zeros(64, dtype=torch.long)
    threat = ThreatModel(eps=eps)
    model = _two_class_model()
    rec = Recorder(model)
    pgd = ATTACKS.create("pgd", steps=1, step_size=alpha, restarts=restarts)
    res = pgd(rec, x, y, threat, generator=torch.Generator().manual_seed(4))

    # Replay by hand from the recorded starts: final = Clip(start + alpha sign(grad)), grad on u > 0.
    owner = lambda rows: torch.cdist(rows.flatten(1)[:, :2], grid).argmin(dim=1)  # noqa: E731
    lower, upper = (x - eps).clamp(min=0), (x + eps).clamp(max=1)
    best = torch.full_like(x, float("nan"))
    best_loss = torch.full((64,), -math.inf)
    done = torch.zeros(64, dtype=torch.bool)
    for start in rec.grad_inputs():
        who = owner(start)
        assert torch.equal(who.sort().values, (~done).nonzero().squeeze(1)), "a restart ran on a solved example"
        step = torch.zeros_like(start)
        step[..., 2] = alpha
        final = torch.minimum(torch.maximum(start + step, lower[who]), upper[who])
        with torch.no_grad():
            logits = model(final)
        loss = F.cross_entropy(logits, y[who], reduction="none")
        success = logits.argmax(1) != 0
        take = success | (loss > best_loss[who])
        best[who[take]] = final[take]
        best_loss[who] = torch.where(take, loss, best_loss[who])
        done[who] |= success
    runs = len(rec.grad_inputs())
    assert 2 <= runs <= restarts
    assert torch.allclose(res.x_adv, best, rtol=0, atol=1e-7)
    # which is: every example that any restart solved is solved, the others at their highest loss
    assert torch.equal(res.success, done)
    far = torch.arange(64) % 2 == 0
    assert not res.success[far].any() and res.success[~far].float().mean() > 0.5
    with torch.no_grad():
        final_loss = F.cross_entropy(model(res.x_adv), y, reduction="none")
    assert torch.allclose(final_loss[far], best_loss[far])
    one = ATTACKS.create("pgd", steps=1, step_size=alpha)(model, x, y, threat, generator=torch.Generator().manual_seed(4))
    assert res.success.sum() > one.success.sum()


# ---------------------------------------------------------------------- strength ordering
def robust_accuracy(model, x, y, name, threat, **params) -> float:
    res = ATTACKS.create(name, **params)(model, x, y, threat, generator=torch.Generator().manual_seed(0))
    return 1.0 - res.success_rate


SLACK = 1 / 360 + 1e-6  # one digit of the 360


@pytest.mark.parametrize("model_name", ["digits_mlp", "digits_cnn"])
def test_stronger_attacks_give_lower_robust_accuracy(model_name, digits_test, request):
    model = request.getfixturevalue(model_name)
    x, y = digits_test.x, digits_test.y
    for eps in (0.05, 0.1):
        t = ThreatModel(eps=eps)
        fgsm = robust_accuracy(model, x, y, "fgsm", t)
        bim = robust_accuracy(model, x, y, "bim", t)
        pgd = robust_accuracy(model, x, y, "pgd", t, steps=20, restarts=3)
        assert fgsm + SLACK >= bim >= pgd - SLACK, (eps, fgsm, bim, pgd)
    t2 = ThreatModel(norm="l2", eps=0.5)
    assert robust_accuracy(model, x, y, "fgsm", t2) + SLACK >= robust_accuracy(model, x, y, "pgd", t2, steps=20)


def test_robust_accuracy_falls_with_eps(digits_mlp, digits_test):
    x, y = digits_test.x, digits_test.y
    with torch.no_grad():
        clean = (digits_mlp(x).argmax(1) == y).float().mean().item()
    accs = [robust_accuracy(digits_mlp, x, y, "pgd", ThreatModel(eps=e), steps=20) for e in (0.0, 0.05, 0.1, 0.15, 0.2)]
    assert accs[0] == pytest.approx(clean, abs=1e-6)  # eps = 0: nothing may change
    assert all(a + SLACK >= b for a, b in zip(accs, accs[1:])), accs
    assert accs[-1] < accs[1] - 0.3
