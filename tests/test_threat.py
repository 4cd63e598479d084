"""ThreatModel: validation, serialization, distances, projections and membership."""

from __future__ import annotations

import json
import math

import pytest
import torch

from advbench.errors import ConfigError
from advbench.threat import Knowledge, Norm, Targeting, ThreatModel, project_l1_box, quantize_8bit


def _batch(seed: int = 0, shape=(6, 3, 5, 5)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g)
    return x, x + 0.5 * torch.randn(shape, generator=g)


def test_frozen_hashable_and_roundtrip():
    t = ThreatModel(norm="l2", eps=0.5, targeting="random", knowledge="score-based", query_budget=100)
    assert t.norm is Norm.L2 and t.targeting is Targeting.RANDOM and t.knowledge is Knowledge.SCORE_BASED
    assert {t: 1}[ThreatModel.from_dict(json.loads(json.dumps(t.to_dict())))] == 1
    with pytest.raises(Exception):
        t.eps = 1.0  # type: ignore[misc]
    u = ThreatModel(norm="unbounded")
    assert u.eps == math.inf and ThreatModel.from_dict(u.to_dict()) == u


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"norm": "l3"}, "allowed: linf, l2, l1, l0, unbounded"),
        ({"eps": -0.1}, "eps for norm linf must be a finite number >= 0"),
        ({"eps": "big"}, "eps for norm linf must be a finite number"),
        ({"eps": float("nan")}, "must be a finite number"),
        ({"norm": "l0", "eps": 1.5}, "whole number of pixels"),
        ({"eps": 2.0}, "exceeds the input range"),
        ({"bounds": (1, 0)}, "low < high"),
        ({"targeting": "fixed"}, "needs target_class"),
        ({"target_class": 3}, "only allowed with targeting 'fixed'"),
        ({"query_budget": 0}, "query_budget"),
        ({"quantize": "4bit"}, "quantize must be '8bit'"),
        ({"knowledge": "oracle"}, "allowed: white_box, score_based, decision_based, transfer"),
    ],
)
def test_bad_values_name_the_problem(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        ThreatModel(**kwargs)


def test_unknown_field_in_dict():
    with pytest.raises(ConfigError, match="unknown threat-model field"):
        ThreatModel.from_dict({"norm": "linf", "eps": 0.1, "epsilon": 3})


def test_distances_by_hand():
    x = torch.zeros(1, 2, 2, 2)
    xa = x.clone()
    xa[0, 0, 0, 0], xa[0, 1, 0, 0], xa[0, 1, 1, 1] = 0.3, -0.4, 0.1
    t = ThreatModel(norm="linf", eps=0.1)
    assert t.distance(xa, x, "linf").item() == pytest.approx(0.4)
    assert t.distance(xa, x, "l2").item() == pytest.approx(math.sqrt(0.09 + 0.16 + 0.01))
    assert t.distance(xa, x, "l1").item() == pytest.approx(0.8)
    assert t.distance(xa, x, "l0").item() == 2  # two pixels changed; one of them in two channels


@pytest.mark.parametrize("norm, eps", [("linf", 0.1), ("l2", 0.7), ("l1", 2.0), ("l0", 4)])
def test_projection_lands_inside_and_is_idempotent(norm, eps):
    x, xa = _batch()
    t = ThreatModel(norm=norm, eps=eps)
    p = t.project(xa, x)
    assert bool(t.contains(p, x).all())
    assert bool(((p >= 0) & (p <= 1)).all())
    assert torch.allclose(t.project(p, x), p, atol=1e-6)
    assert bool((t.distance(p, x).double() <= eps + t.slack(p, x) + 1e-7 * (norm != "l0")).all())


def project_l1(v: torch.Tensor, eps: float) -> torch.Tensor:
    """The L1-ball projection: the ball-in-box one with a box no coordinate reaches."""
    return project_l1_box(v, torch.zeros_like(v), eps, (-100.0, 100.0))


def test_l1_projection_matches_definition():
    """The L1 projection is the closest point of the ball: no random point in the ball is closer."""
    g = torch.Generator().manual_seed(1)
    v = torch.randn(4, 30, generator=g)
    p = project_l1(v, 1.5)
    assert torch.allclose(p.abs().sum(1), torch.full((4,), 1.5), atol=1e-5)
    for _ in range(200):
        q = torch.randn(4, 30, generator=g)
        q = q / q.abs().sum(1, keepdim=True) * 1.5 * torch.rand(4, 1, generator=g)
        assert bool(((v - p).norm(dim=1) <= (v - q).norm(dim=1) + 1e-5).all())
    inside = torch.full((1, 30), 0.01)
    assert torch.equal(project_l1(inside, 1.5), inside)


def test_contains_tolerance_is_float32_rounding_only():
    x = torch.full((2, 1, 4, 4), 0.5)
    t = ThreatModel(norm="linf", eps=0.1)
    on_boundary = x + torch.tensor(0.1)
    assert bool(t.contains(on_boundary, x).all())
    beyond = x + (0.1 + 1e-5)
    assert not bool(t.contains(beyond, x).any())
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")
    out_of_box = x.clone()
    out_of_box[1, 0, 0, 0] = 1.0 + 1e-6
    assert t.contains(nan, x).tolist() == [False, True]
    assert ThreatModel(norm="unbounded").contains(out_of_box, x).tolist() == [True, False]


def test_resolve_targets():
    logits = torch.tensor([[3.0, 1.0, -2.0], [0.0, -5.0, 2.0]])
    y = torch.tensor([0, 2])
    assert ThreatModel(targeting="untargeted").resolve_targets(logits, y) is None
    assert ThreatModel(targeting="least_likely").resolve_targets(logits, y).tolist() == [2, 1]
    assert ThreatModel(targeting="fixed", target_class=1).resolve_targets(logits, y).tolist() == [1, 1]
    with pytest.raises(ConfigError, match="out of range"):
        ThreatModel(targeting="fixed", target_class=7).resolve_targets(logits, y)
    t = ThreatModel(targeting="random")
    ys = torch.randint(0, 3, (500,))
    r1 = t.resolve_targets(torch.zeros(500, 3), ys, torch.Generator().manual_seed(0))
    r2 = t.resolve_targets(torch.zeros(500, 3), ys, torch.Generator().manual_seed(0))
    assert torch.equal(r1, r2) and not bool((r1 == ys).any())
    assert set(r1.tolist()) == {0, 1, 2}


def test_quantize_8bit_levels():
    x = torch.tensor([0.0, 0.5 / 255, 0.6 / 255, 1.0])
    assert torch.allclose(quantize_8bit(x, (0.0, 1.0)) * 255, torch.tensor([0.0, 0.0, 1.0, 255.0]))


def test_8bit_rounding_maps_data_on_the_grid_to_itself_under_every_norm():
    """Data stored as k / 255 is its own 8-bit image: the audit's rounding and quantize_8bit use one
    formula (they differed on 126 of the 256 levels, so under l0 every example, even the clean
    input, changed ~100 pixels and failed the audit)."""
    from advbench.threat import quantize_8bit

    x = (torch.arange(256, dtype=torch.float32) / 255).view(1, 1, 16, 16)
    for norm, eps in (("l0", 3), ("linf", 0.01), ("l2", 0.1), ("l1", 0.1)):
        t = ThreatModel(norm=norm, eps=eps, quantize="8bit")
        assert torch.equal(t.quantized(x, x), x) and bool(t.contains(t.quantized(x, x), x)), norm
    assert torch.equal(quantize_8bit(x, (0.0, 1.0)), x)
