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
    0 exactly on the ball's boundary (valid), 1 outside the ball by 2x the float32 tolerance,
    2 inside the ball but above the upper bound, 3 NaN elsewhere, 4 +inf elsewhere,
    5 untouched (valid, not adversarial)."""
    eps, tol = threat.eps, threat.tolerance
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
    assert dist[0] <= eps + threat.tolerance and dist[1] > eps + threat.tolerance
    with torch.no_grad():
        would_be = model(torch.nan_to_num(x_adv, nan=0.3, posinf=0.3)).argmax(1) != y
    assert would_be[:5].all() and not would_be[5]

    res = attack(model, x, y, threat)
    assert res.valid.tolist() == [True, False, False, False, False, True]
    assert res.success.tolist() == [True, False, False, False, False, False]
    assert res.n_violations == 4
    assert torch.equal(res.pred_adv[1:5], torch.zeros(4, dtype=torch.long))  # judged on the clean stand-in
    assert (res.distances[res.valid] <= eps + threat.tolerance).all()
    # the audit function itself, called directly, agrees
    report = audit(model, x, x_adv, y, threat)
    assert torch.equal(report.valid, res.valid) and torch.equal(report.success, res.success)


def test_boundary_tolerance_is_float32_rounding_only():
    threat = ThreatModel(norm="linf", eps=8 / 255)
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.25
    signs = torch.tensor([1.0, -1.0]).repeat(2).view(4, 1, 1, 1)
    on = x + signs * threat.eps
    assert threat.contains(on, x).all()
    assert threat.tolerance < 1e-6
    off = x + signs * (threat.eps + 2 * threat.tolerance)
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
    assert (res.n_forward, res.n_backward, res.n_queries) == (3, 2, 0)


def test_oracle_never_runs_a_query_past_the_budget():
    model = threshold_model()
    oracle = ScoreOracle(model, 3, budget=2)
    x = torch.rand(3, 16)
    oracle(x)
    oracle(x[:2], index=torch.tensor([0, 1]))
    with pytest.raises(QueryBudgetExceeded):
        oracle(x)  # examples 0 and 1 are spent
    assert oracle.queries.tolist() == [2, 2, 1] and oracle.n_forward == 2


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
