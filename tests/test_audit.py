"""The audit never lets a violating example count, and attackers get only the access they are granted.

Misbehaving attacks are registered here for one test each (and unregistered after), and run
through the ordinary ``Attack.__call__`` path that every real attack takes.
"""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from torch import nn

from advbench.access import LabelOracle, ScoreOracle, WhiteBoxModel
from advbench.attacks.base import Attack
from advbench.audit import audit
from advbench.errors import QueryBudgetExceeded
from advbench.registry import ATTACKS
from advbench.threat import Knowledge, Norm, Targeting, ThreatModel, quantize_8bit


@pytest.fixture
def register():
    names: list[str] = []

    def add(name: str, cls: type) -> Attack:
        ATTACKS.add(name, cls)
        names.append(name)
        return ATTACKS.create(name)

    yield add
    for name in names:
        ATTACKS.unregister(name)
    assert not set(names) & set(ATTACKS.list())


def threshold_model(coord: int = 0, at: float = 0.5, gain: float = 100.0, d: int = 16) -> nn.Module:
    """Two classes, decided by one coordinate: class 1 iff x[coord] > at."""
    lin = nn.Linear(d, 2)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.zero_()
        lin.weight[1, coord] = gain
        lin.bias[1] = -gain * at
    return nn.Sequential(nn.Flatten(), lin).eval()


# ---------------------------------------------------------------------- ball, bounds, NaN
def _crafted(x: torch.Tensor, threat: ThreatModel) -> torch.Tensor:
    """Row k of the batch gets case k: every case moves coordinate 0 across the decision
    boundary of ``threshold_model`` (so it *would* be adversarial), then:
    0 exactly on the ball's boundary (valid), 1 outside the ball by 2x its float32 slack,
    2 inside the ball but above the upper bound, 3 NaN elsewhere, 4 +inf elsewhere,
    5 untouched (valid, not adversarial)."""
    eps = threat.eps
    tol = float(threat.slack(x + eps / x[0].numel() ** 0.5, x).max())
    out = x.clone().view(x.shape[0], -1)
    e0 = torch.zeros_like(out[0])
    e0[0] = 1.0
    if threat.norm is Norm.LINF:
        out[0] += eps * e0
        out[1] += (eps + 2 * tol) * e0
        out[2] += eps * e0
        out[2, 1] = 1.0 + 1e-6  # clean value is 1 - eps/2, so this is within eps but out of [0, 1]
    else:  # l2: all the budget on coordinate 0
        out[0] += eps * e0
        out[1] += (eps + 2 * tol) * e0
        out[2] += 0.6 * eps * e0  # with coordinate 1 (eps / 2): norm 0.78 eps
        out[2, 1] = 1.0 + 1e-6
    for k in (3, 4):
        out[k] += eps * e0
    out[3, 2] = float("nan")
    out[4, 3] = float("inf")
    return out.view_as(x)


class Violator(Attack):
    norms: ClassVar[frozenset[Norm]] = frozenset({Norm.LINF, Norm.L2})

    def __init__(self) -> None:
        super().__init__()

    def _run(self, model, x, y, threat, target, generator):
        return _crafted(x, threat)


@pytest.mark.parametrize("norm, eps", [("linf", 0.1), ("l2", 0.1)])
def test_violating_examples_never_count(register, norm, eps):
    attack = register("test-violator", Violator)
    threat = ThreatModel(norm=norm, eps=eps)
    x = torch.full((6, 1, 4, 4), 0.3)
    x[:, 0, 0, 0] = 0.5 - eps / 2  # class 0, eps/2 below the boundary
    x[:, 0, 0, 1] = 1.0 - eps / 2
    y = torch.zeros(6, dtype=torch.long)
    model = threshold_model()
    x_adv = _crafted(x, threat)
    # the cases are what they claim to be (distances in float64, from the float32 tensors)
    dist = (x_adv - x).flatten(1).double().nan_to_num(0.0)
    dist = dist.abs().amax(1) if norm == "linf" else dist.norm(dim=1)
    slack = threat.slack(x_adv.nan_to_num(0.3), x)
    assert dist[0] <= eps + slack[0] and dist[1] > eps + slack[1]
    with torch.no_grad():
        would_be = model(torch.nan_to_num(x_adv, nan=0.3, posinf=0.3)).argmax(1) != y
    assert would_be[:5].all() and not would_be[5]

    res = attack(model, x, y, threat)
    assert res.valid.tolist() == [True, False, False, False, False, True]
    assert res.success.tolist() == [True, False, False, False, False, False]
    assert res.n_violations == 4
    assert torch.equal(res.pred_adv[1:5], torch.zeros(4, dtype=torch.long))  # judged on the clean stand-in
    assert (res.distances[res.valid].double() <= eps + threat.slack(res.x_adv, x)[res.valid]).all()
    # the audit function itself, called directly, agrees
    report = audit(model, x, x_adv, y, threat)
    assert torch.equal(report.valid, res.valid) and torch.equal(report.success, res.success)


def test_boundary_tolerance_is_float32_rounding_only():
    threat = ThreatModel(norm="linf", eps=8 / 255)
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.25
    signs = torch.tensor([1.0, -1.0]).repeat(2).view(4, 1, 1, 1)
    on = x + signs * threat.eps
    assert threat.contains(on, x).all()
    slack = threat.slack(on, x)
    assert (slack < 1.5e-7).all()  # ulp(0.75 + 8/255)/2 + ulp(0.75)/2 + 2u eps: about 1.2e-7
    off = x + signs * (threat.eps + 2 * float(slack.max()))
    assert not threat.contains(off, x).any()


# ---------------------------------------------------------------------- 8-bit quantization
class Nudge(Attack):
    """Moves coordinate 0 of row 0 by 0.4 grey levels and of row 1 by one full level."""

    norms: ClassVar[frozenset[Norm]] = frozenset({Norm.LINF})

    def __init__(self) -> None:
        super().__init__()

    def _run(self, model, x, y, threat, target, generator):
        out = x.clone()
        out[0, 0, 0, 0] += 0.4 / 255
        out[1, 0, 0, 0] += 1.0 / 255
        return out


def test_8bit_quantization_rejects_an_example_adversarial_only_before_rounding(register):
    attack = register("test-nudge", Nudge)
    x = torch.full((2, 1, 4, 4), 40 / 255)  # on the 8-bit grid
    x[:, 0, 0, 0] = 100 / 255
    y = torch.zeros(2, dtype=torch.long)
    model = threshold_model(at=100.3 / 255, gain=1000.0)  # the boundary lies 0.3 levels above the clean pixel
    assert torch.equal(quantize_8bit(x, (0.0, 1.0)), x)
    with torch.no_grad():
        assert (model(x).argmax(1) == 0).all()
    raw = attack(model, x, y, ThreatModel(eps=2 / 255))
    assert raw.success.tolist() == [True, True]  # without quantization both count
    res = attack(model, x, y, ThreatModel(eps=2 / 255, quantize="8bit"))
    assert res.valid.all()
    assert res.success.tolist() == [False, True]  # 100.4 rounds back to 100: no longer adversarial
    assert res.quantization_failures == 1
    assert res.pred_adv.tolist() == [0, 1]  # the prediction that counts is the rounded image's


# ---------------------------------------------------------------------- access and budgets
class ScoreProbe(Attack):
    """Random search on probabilities only; records what it saw."""

    norms: ClassVar[frozenset[Norm]] = frozenset({Norm.LINF})
    knowledge: ClassVar[frozenset[Knowledge]] = frozenset({Knowledge.SCORE_BASED})
    seen: ClassVar[dict] = {}

    def __init__(self, *, rounds: int = 10**6) -> None:
        super().__init__()
        self.rounds = rounds

    def _run(self, model, x, y, threat, target, generator):
        seen = type(self).seen
        seen["handle"] = type(model)
        probe = x.clone().requires_grad_(True)
        p = model(probe)
        seen["requires_grad"] = p.requires_grad
        seen["row_sums"] = p.sum(dim=1)
        seen["min"] = float(p.min())
        best = x.clone()
        seen["queries"] = 1
        for _ in range(self.rounds):
            noise = torch.rand(x.shape, generator=generator) * 2 - 1
            cand = threat.project(x + threat.eps * noise.sign(), x)
            pop = torch.cat([cand, x])  # a population of two candidates per example
            index = torch.arange(x.shape[0]).repeat(2)
            model(pop, index=index)
            seen["queries"] += 2
            best = cand
        return best


def test_score_based_attack_gets_probabilities_only_and_stops_at_its_budget(register, digits_mlp, digits_test):
    attack = register("test-score-probe", ScoreProbe)
    x, y = digits_test.x[:10], digits_test.y[:10]
    budget = 25
    threat = ThreatModel(eps=0.1, knowledge="score_based", query_budget=budget)
    res = attack(digits_mlp, x, y, threat, generator=torch.Generator().manual_seed(0))
    seen = ScoreProbe.seen
    assert seen["handle"] is ScoreOracle
    assert seen["requires_grad"] is False  # no gradient can flow through the oracle
    assert torch.allclose(seen["row_sums"], torch.ones(10)) and seen["min"] >= 0
    assert res.budget_exhausted
    assert seen["queries"] == budget  # 1 + 2 * 12: the 13th round would have made 26
    assert res.n_queries == budget * 10 and res.n_backward == 0
    assert torch.equal(res.x_adv, x)  # the base class hands back the clean input when the budget runs out
    assert torch.equal(res.success, res.pred_clean != y)  # only the clean errors count
    # within its budget it runs to the end and its output counts
    ok = ATTACKS.create("test-score-probe", rounds=3)(digits_mlp, x, y, threat, generator=torch.Generator().manual_seed(0))
    assert not ok.budget_exhausted and ok.n_queries == 7 * 10
    assert ok.valid.all()


def test_score_based_attack_is_refused_white_box_and_decision_based_access(register, digits_mlp, digits_test):
    from advbench.errors import UnsupportedThreatError

    attack = register("test-score-probe", ScoreProbe)
    x, y = digits_test.x[:4], digits_test.y[:4]
    for knowledge in ("white_box", "decision_based"):
        with pytest.raises(UnsupportedThreatError):
            attack(digits_mlp, x, y, ThreatModel(eps=0.1, knowledge=knowledge, query_budget=5))


class LabelProbe(Attack):
    norms: ClassVar[frozenset[Norm]] = frozenset({Norm.LINF})
    knowledge: ClassVar[frozenset[Knowledge]] = frozenset({Knowledge.DECISION_BASED})
    targeting: ClassVar[frozenset[Targeting]] = frozenset({Targeting.UNTARGETED})
    seen: ClassVar[dict] = {}

    def __init__(self) -> None:
        super().__init__()

    def _run(self, model, x, y, threat, target, generator):
        out = model(x)
        type(self).seen.update(handle=type(model), dtype=out.dtype, shape=tuple(out.shape))
        while True:
            model(x)


def test_decision_based_attack_gets_labels_only(register, digits_mlp, digits_test):
    attack = register("test-label-probe", LabelProbe)
    x, y = digits_test.x[:6], digits_test.y[:6]
    res = attack(digits_mlp, x, y, ThreatModel(eps=0.1, knowledge="decision_based", query_budget=4))
    assert LabelProbe.seen == {"handle": LabelOracle, "dtype": torch.int64, "shape": (6,)}
    assert res.budget_exhausted and res.n_queries == 4 * 6


def test_white_box_handle_counts_passes(register, digits_mlp, digits_test):
    class TwoSteps(Attack):
        norms: ClassVar[frozenset[Norm]] = frozenset({Norm.LINF})

        def __init__(self) -> None:
            super().__init__()

        def _run(self, model, x, y, threat, target, generator):
            assert isinstance(model, WhiteBoxModel)
            for _ in range(2):
                xr = x.clone().requires_grad_(True)
                torch.autograd.grad(model(xr).sum(), xr)
            with torch.no_grad():
                model(x)
            return x

    attack = register("test-two-steps", TwoSteps)
    res = attack(digits_mlp, digits_test.x[:5], digits_test.y[:5], ThreatModel(eps=0.1))
    # per example (AttackBench's convention): 3 forward and 2 backward passes on each of 5 inputs
    assert (res.n_forward, res.n_backward, res.n_queries) == (15, 10, 0)


def test_pass_counts_do_not_depend_on_the_batch_size(digits_mlp, digits_test):
    """The same attack on the same 40 examples costs the same passes in one batch or in eight."""
    x, y = digits_test.x[:40], digits_test.y[:40]
    threat = ThreatModel(eps=0.1)
    for name, params, per_example in (("fgsm", {}, (1, 1)), ("bim", {"steps": 7}, (7, 7)),
                                      ("pgd", {"steps": 5, "random_start": False}, (5, 5))):
        attack = ATTACKS.create(name, **params)
        whole = attack(digits_mlp, x, y, threat)
        parts = [attack(digits_mlp, xs, ys, threat) for xs, ys in zip(x.split(5), y.split(5))]
        assert (whole.n_forward, whole.n_backward) == (per_example[0] * 40, per_example[1] * 40), name
        assert sum(p.n_forward for p in parts) == whole.n_forward and sum(p.n_backward for p in parts) == whole.n_backward


def test_oracle_never_runs_a_query_past_the_budget():
    model = threshold_model()
    oracle = ScoreOracle(model, 3, budget=2)
    x = torch.rand(3, 16)
    oracle(x)
    oracle(x[:2], index=torch.tensor([0, 1]))
    with pytest.raises(QueryBudgetExceeded):
        oracle(x)  # examples 0 and 1 are spent
    assert oracle.queries.tolist() == [2, 2, 1] and oracle.n_forward == 5  # rows, not calls


class KeepsBest(ScoreProbe):
    """Catches the budget stop and hands its best candidate so far to the base class."""

    def _run(self, model, x, y, threat, target, generator):
        from advbench.errors import QueryBudgetExceeded

        best = x.clone()
        try:
            while True:
                cand = threat.project(x + threat.eps * torch.ones_like(x), x)
                model(cand)
                best = cand
        except QueryBudgetExceeded as stop:
            raise QueryBudgetExceeded(str(stop), best=best) from None


def test_budget_stop_keeps_the_best_found_so_far_and_audits_it(register, digits_mlp, digits_test):
    attack = register("test-keeps-best", KeepsBest)
    x, y = digits_test.x[:10], digits_test.y[:10]
    res = attack(digits_mlp, x, y, ThreatModel(eps=0.1, knowledge="score_based", query_budget=5))
    assert res.budget_exhausted and res.n_queries == 5 * 10
    assert torch.equal(res.x_adv, (x + 0.1).clamp(0, 1))
    assert bool(res.valid.all())
    assert torch.equal(res.success, digits_mlp(res.x_adv).argmax(1) != y)


# ---------------------------------------------------------------------- the slack is rounding only
def test_l2_and_linf_slack_is_the_rounding_of_the_arithmetic_and_no_more():
    """A point 1e-6 of eps beyond an L2 ball (d = 64) or 1e-7 beyond an L-inf one is no
    rounding error of float32 arithmetic: it is rejected. (A relative slack of 1e-5 let it in.)"""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 1, 8, 8, generator=g) * 0.8 + 0.1
    d = torch.randn(8, 1, 8, 8, generator=g)
    d = d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    l2 = ThreatModel(norm="l2", eps=0.5)
    assert not l2.contains(x + 0.5 * (1 + 1e-6) * d.double(), x).any()
    linf = ThreatModel(norm="linf", eps=0.1)
    x = torch.full((2, 1, 4, 4), 0.3)
    assert linf.contains(x + 0.1, x).all()
    assert not linf.contains((x.double() + 0.1 + 1e-7).float(), x).any()


@pytest.mark.parametrize("norm, eps", [("l2", 0.5), ("l2", 3.0), ("l1", 5.0), ("l1", 40.0), ("linf", 8 / 255)])
def test_projected_points_pass_on_large_inputs(norm, eps):
    """The slack is enough for the projection's own arithmetic on an ImageNet-sized input."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, 224, 224, generator=g)
    threat = ThreatModel(norm=norm, eps=eps)
    for scale in (0.01, 1.0, 30.0):
        p = threat.project(x + scale * torch.randn(x.shape, generator=g), x)
        assert threat.contains(p, x).all(), (norm, eps, scale)


# ---------------------------------------------------------------------- the image that counts
class Edge(Attack):
    """Returns x + eps on every element (the far corner of the L-inf ball)."""

    norms: ClassVar[frozenset[Norm]] = frozenset({Norm.LINF})

    def __init__(self) -> None:
        super().__init__()

    def _run(self, model, x, y, threat, target, generator):
        return threat.clip(x + threat.eps)


def test_8bit_scored_image_is_itself_inside_the_ball(register):
    """eps = 0.03 is 7.65 grey levels: rounding x + eps to the nearest level gives 8 levels, outside
    the ball. The image that counts is the 8-bit image inside the ball (7 levels), it passes the
    audit, and it is what the result holds and what the prediction is made on."""
    attack = register("test-edge", Edge)
    x = torch.full((3, 1, 4, 4), 40 / 255)
    y = torch.zeros(3, dtype=torch.long)
    model = threshold_model(at=46.5 / 255, gain=1000.0)  # crossed at 7 levels above the clean pixel
    threat = ThreatModel(eps=0.03, quantize="8bit")
    res = attack(model, x, y, threat)
    assert torch.equal(quantize_8bit(res.x_adv, threat.bounds), res.x_adv)  # on the 8-bit grid
    assert threat.contains(res.x_adv, x).all()
    assert torch.allclose(res.x_adv - x, torch.full_like(x, 7 / 255), atol=1e-7)
    with torch.no_grad():
        assert torch.equal(res.pred_adv, model(res.x_adv).argmax(dim=1))
    assert res.success.all() and res.valid.all()


def test_8bit_rounding_that_leaves_the_ball_is_a_violation(register):
    """Data off the 8-bit grid with a budget below half a level: the 8-bit image of any point of
    the ball lies outside it, so nothing can count, however the model answers the rounded image."""
    attack = register("test-edge-off", Edge)
    x = torch.full((2, 1, 4, 4), 40.4 / 255)  # off the grid
    y = torch.zeros(2, dtype=torch.long)
    model = threshold_model(at=40.2 / 255, gain=-1000.0)  # class 1 below 40.2 levels: the rounded image is "adversarial"
    with torch.no_grad():
        assert (model(x).argmax(1) == 0).all() and (model(quantize_8bit(x, (0.0, 1.0))).argmax(1) == 1).all()
    res = attack(model, x, y, ThreatModel(eps=0.1 / 255, quantize="8bit"))
    assert not res.valid.any() and not res.success.any()
    assert torch.equal(res.x_adv, x)  # the clean input stands in for the rejected example


def test_rejected_examples_leave_only_the_clean_input_in_the_result(register):
    attack = register("test-violator-2", Violator)
    threat = ThreatModel(norm="linf", eps=0.1)
    x = torch.full((6, 1, 4, 4), 0.3)
    x[:, 0, 0, 0] = 0.45
    x[:, 0, 0, 1] = 0.95
    res = attack(threshold_model(), x, torch.zeros(6, dtype=torch.long), threat)
    assert torch.equal(res.x_adv[~res.valid], x[~res.valid])
    assert threat.contains(res.x_adv, x).all()


# ---------------------------------------------------------------------- targets equal to the label
class Stay(Attack):
    """Returns the clean input (eps 0 in effect)."""

    norms: ClassVar[frozenset[Norm]] = frozenset({Norm.LINF})
    targeting: ClassVar[frozenset[Targeting]] = frozenset(Targeting)

    def __init__(self) -> None:
        super().__init__()

    def _run(self, model, x, y, threat, target, generator):
        return x.clone()


def test_an_example_of_the_target_class_is_no_targeted_success(register, digits_mlp, digits_test):
    attack = register("test-stay", Stay)
    x, y = digits_test.x[:60], digits_test.y[:60]
    res = attack(digits_mlp, x, y, ThreatModel(eps=0.0, targeting="fixed", target_class=3))
    assert (y == 3).any() and not res.success.any()
    flat = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))  # constant logits: argmin = argmax = class 0
    with torch.no_grad():
        flat[1].weight.zero_()
        flat[1].bias.zero_()
    res = attack(flat.eval(), x, torch.zeros_like(y), ThreatModel(eps=0.0, targeting="least_likely"))
    assert (res.target == 0).all() and not res.success.any()
