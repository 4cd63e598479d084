"""Gradient-masking checks: each on a table or model built to trigger it, and one that must not."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from torch import nn

from advbench.defenses.base import DefendedModel, InputTransform
from advbench.eval.masking import (
    AttackInfo,
    Finding,
    check_black_box,
    check_eps_trend,
    check_large_eps,
    check_single_step,
    flags_column,
    format_findings,
    gradient_findings,
    gradient_stats,
    is_probabilities,
    probe_eps,
    table_findings,
    tolerance,
)

torch.set_num_threads(1)


def _table(rows, n=100):
    """A results table from (attack, eps, robust accuracy[, knowledge]) tuples."""
    out = []
    for r in rows:
        attack, eps, ra = r[:3]
        knowledge = r[3] if len(r) > 3 else "white_box"
        out.append({"model": "m", "defense": "d", "attack": attack, "norm": "linf", "eps": eps,
                    "targeting": "untargeted", "knowledge": knowledge, "n": n, "clean_accuracy": 0.95,
                    "robust_accuracy": ra})
    return pd.DataFrame(out)


def _codes(findings):
    return sorted(f.code for f in findings)


KINDS = {"fgsm": "single_step", "bim": "iterative", "pgd": "iterative"}


def _info(table):
    """What the store would say of each label of these hand-built tables (registry name, kind and
    view come from the store's job rows, not from the label, in a real run)."""
    info = {}
    for label in table.attack:
        name = label.removeprefix("probe:").split("+")[0]
        info[label] = AttackInfo(name, "adaptive" if "+" in label else "naive", KINDS.get(name, "other"))
    return info


# ---------------------------------------------------------------------- (a) eps trend and probe
def test_eps_flat_when_robust_accuracy_does_not_fall():
    t = _table([("pgd", 0.05, 0.90), ("pgd", 0.1, 0.90), ("pgd", 0.2, 0.89)])
    (f,) = check_eps_trend(t)
    assert f.code == "eps_flat" and f.where["eps"] == 0.2 and f.where["attack"] == "pgd"
    assert "90.0%" in f.seen and "89.0%" in f.seen
    assert flags_column(t, [f]).tolist() == ["", "", "eps_flat"]


def test_eps_flat_when_robust_accuracy_rises():
    t = _table([("pgd", 0.05, 0.50), ("pgd", 0.1, 0.60), ("pgd", 0.2, 0.10)])
    (f,) = check_eps_trend(t)
    assert f.where["eps"] == 0.1 and "rises" in f.seen


@pytest.mark.parametrize("ras, eps", [
    ([0.90, 0.50, 0.05], [0.05, 0.1, 0.2]),  # falls as it should
    ([0.0, 0.0, 0.0], [0.05, 0.1, 0.2]),  # nothing left to fall
    ([0.90, 0.89], [0.1, 0.15]),  # flat, but eps did not even double
    ([0.90, 0.885, 0.10], [0.05, 0.06, 0.2]),  # a dip within the tolerance (1.5 examples of 100)
])
def test_eps_trend_does_not_flag_a_normal_sweep(ras, eps):
    assert check_eps_trend(_table([("pgd", e, r) for e, r in zip(eps, ras)])) == []


def test_large_eps_probe_flags_the_rows_of_its_view_only():
    t = _table([("pgd", 0.1, 0.9), ("pgd+bpda", 0.1, 0.3), ("worst-case", 0.1, 0.3)])
    probes = _table([("probe:pgd", 1.0, 0.85), ("probe:pgd+bpda", 1.0, 0.0)])
    (f,) = check_large_eps(probes, t, {**_info(t), **_info(probes)})
    assert f.code == "large_eps" and f.where["attack"] == ["pgd"] and "85.0%" in f.seen
    assert flags_column(t, [f]).tolist() == ["large_eps", "", ""]
    assert check_large_eps(_table([("probe:pgd", 1.0, 0.05)]), t, _info(t)) == []  # ~0%: fine


def test_probe_eps_covers_the_input_range():
    assert probe_eps("linf", (0.0, 1.0), 64) == 1.0
    assert probe_eps("l2", (0.0, 2.0), 64) == pytest.approx(16.0)  # width * sqrt(64)
    assert probe_eps("l0", (0.0, 1.0), 64) is None


# ---------------------------------------------------------------------- (b) single step beats iterative
def test_single_step_beating_an_iterative_attack_flags_the_iterative_one():
    t = _table([("fgsm", 0.1, 0.20), ("bim", 0.1, 0.50), ("pgd", 0.1, 0.21)])
    (f,) = check_single_step(t, _info(t))
    assert f.code == "single_step" and f.where["attack"] == "bim" and "fgsm" in f.seen


def test_single_step_is_compared_within_a_view_and_with_tolerance():
    # naive fgsm vs adaptive pgd is not the comparison; 2 examples of 100 are within the tolerance
    t = _table([("fgsm", 0.1, 0.20), ("pgd+bpda", 0.1, 0.50), ("fgsm+bpda", 0.1, 0.49), ("pgd", 0.1, 0.22)])
    assert check_single_step(t, _info(t)) == []
    t2 = _table([("fgsm", 0.1, 0.5), ("pgd", 0.1, 0.2)])
    assert check_single_step(t2, _info(t2)) == []


def test_attack_kinds_come_from_the_store_not_the_label():
    t = _table([("fast", 0.1, 0.2), ("strong", 0.1, 0.6)])
    info = {"fast": AttackInfo("fgsm", kind="single_step"), "strong": AttackInfo("pgd", kind="iterative")}
    assert _codes(check_single_step(t, info)) == ["single_step"]
    assert check_single_step(t) == []  # nothing known of the labels: no kinds, no flag
    t = _table([("fgsm", 0.1, 0.2), ("pgd", 0.1, 0.6)])
    assert check_single_step(t) == []  # a label that looks like a name is not read as one


# ---------------------------------------------------------------------- (c) black box beats white box
def test_black_box_beating_every_white_box_attack_is_flagged():
    t = _table([("fgsm", 0.1, 0.70), ("pgd", 0.1, 0.60), ("worst-case", 0.1, 0.6),
                ("noise", 0.1, 0.30, "score_based")])
    (f,) = check_black_box(t, _info(t))
    assert f.code == "black_box" and f.where["attack"] == ["fgsm", "pgd"] and "noise (score_based)" in f.seen
    assert flags_column(t, [f]).tolist() == ["black_box", "black_box", "", ""]


def test_black_box_weaker_than_the_best_white_box_is_fine():
    t = _table([("fgsm", 0.1, 0.70), ("pgd", 0.1, 0.20), ("noise", 0.1, 0.30, "score_based"),
                ("other", 0.2, 0.0, "transfer")])  # another eps: not compared
    assert check_black_box(t, _info(t)) == []


# ---------------------------------------------------------------------- (d) gradients, (e) probabilities
class _Round(InputTransform):
    differentiable = False

    def transform(self, x, generator=None):
        return torch.round(x)


class _Noisy(nn.Module):
    """Undeclared randomness: the input is scaled by fresh noise on every call."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 3)

    def forward(self, x):
        return self.lin((x * (1 + torch.rand_like(x))).flatten(1))


class _NaNGrad(nn.Module):
    """Finite outputs, but d sqrt(u)/du at u = 0 is infinite, times 0: a NaN gradient."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 3)

    def forward(self, x):
        return self.lin(x.flatten(1)) + 0 * torch.sqrt(x - x).flatten(1).sum(1, keepdim=True)


def _linear():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 3))


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.rand(8, 1, 4, 4, generator=g), torch.randint(0, 3, (8,), generator=g)


WHERE = {"model": "m", "defense": "d", "attack": ["pgd"]}


def test_a_healthy_model_raises_no_gradient_flag(batch):
    stats = gradient_stats(_linear(), *batch)
    assert stats.zero == 0 and stats.nonfinite == 0 and stats.max_diff == 0 and not stats.probabilities
    assert gradient_findings(stats, WHERE) == []


def test_zero_gradients_of_a_quantizing_stage_are_flagged(batch):
    model = DefendedModel([_Round()], _linear())
    stats = gradient_stats(model, *batch)
    assert stats.zero == 8
    assert _codes(gradient_findings(stats, WHERE)) == ["grad_zero"]
    # the adaptive view (BPDA) of the same model has useful gradients
    from advbench.defenses.base import adaptive

    assert gradient_findings(gradient_stats(adaptive(model), *batch), WHERE) == []


def test_nan_gradients_are_flagged(batch):
    stats = gradient_stats(_NaNGrad(), *batch)
    assert stats.nonfinite == 8
    assert "grad_nan" in _codes(gradient_findings(stats, WHERE))


def test_gradients_that_differ_between_runs_are_flagged_only_on_a_deterministic_model(batch):
    torch.manual_seed(0)
    stats = gradient_stats(_Noisy(), *batch)
    assert stats.max_diff > 1e-3
    assert _codes(gradient_findings(stats, WHERE)) == ["grad_nondet"]
    undeclared = gradient_stats(_Noisy(), *batch, deterministic=False)  # declared randomized: not measured
    assert undeclared.max_diff is None and gradient_findings(undeclared, WHERE) == []


def test_probabilities_instead_of_logits_are_flagged(batch):
    model = nn.Sequential(_linear(), nn.Softmax(dim=1))
    stats = gradient_stats(model, *batch)
    assert stats.probabilities
    (f,) = [f for f in gradient_findings(stats, WHERE, {"model": "m"}) if f.code == "probs"]
    assert f.where == {"model": "m"}  # every attack row of the model, not only the white-box ones
    assert is_probabilities(torch.tensor([[0.2, 0.8], [1.0, 0.0]]))
    assert not is_probabilities(torch.tensor([[0.2, 0.8], [2.0, -1.0]]))  # sums to 1, but negative: logits
    assert not is_probabilities(torch.tensor([[3.0, 1.0]]))


# ---------------------------------------------------------------------- reporting
def test_flags_join_codes_in_a_fixed_order_and_print_one_line_each():
    t = _table([("fgsm", 0.1, 0.2), ("pgd", 0.1, 0.9), ("pgd", 0.3, 0.9)])
    findings = [Finding("grad_zero", "zero", {"attack": ["pgd"]}), *table_findings(t, info=_info(t))]
    col = flags_column(t, findings)
    assert col.tolist() == ["", "single_step;grad_zero", "eps_flat;grad_zero"]  # no fgsm at eps 0.3
    text = format_findings(findings)
    assert len(text.splitlines()) == 1 + len(findings) and "try:" in text
    assert format_findings([]) == ""


def test_tolerance_is_a_few_examples_or_one_point():
    assert tolerance(100) == pytest.approx(0.03) and tolerance(1000) == pytest.approx(0.01)
