"""The threat-model axes beyond one Lp ball per example: scope, region, perceptual, physical.

Each axis is a field of the descriptor (serialized into the threat's identity only when set), the
audit enforces it per example, and combinations without a meaning are one-line errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from advbench.attacks.base import Attack
from advbench.audit import apply_universal, audit, inside_region, region_corners, region_mask
from advbench.config import parse_config
from advbench.errors import ConfigError, UnsupportedThreatError
from advbench.registry import ATTACKS
from advbench.threat import Norm, Scope, ThreatModel


class Fixed(nn.Module):
    """Logits from the mean of the top-left 2x2 pixels: class 1 when it exceeds 0.5, else class 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x[:, :, :2, :2].mean(dim=(1, 2, 3))
        return torch.stack([0.5 - m, m - 0.5], dim=1) * 10


def _threat(**kw) -> ThreatModel:
    return ThreatModel.from_dict({"norm": "unbounded", **kw})


# ---------------------------------------------------------------------------- the descriptor
def test_the_new_axes_round_trip_and_stay_out_of_plain_identities():
    plain = ThreatModel(norm="linf", eps=0.1)
    assert set(plain.to_dict()) == {"norm", "eps", "bounds", "targeting", "target_class", "knowledge",
                                    "query_budget", "quantize"}  # keys, job ids and hashes as before
    assert plain.constraint_label() == "" and not plain.constrained
    t = ThreatModel.from_dict({"norm": "linf", "eps": 0.1, "scope": "universal", "shared_by": "class",
                               "perceptual": {"ssim": 0.9}, "physical": {"transform": {"name": "blur", "sigma": 0.5},
                                                                        "draws": 3, "rule": "majority"}})
    assert ThreatModel.from_dict(t.to_dict()) == t and hash(ThreatModel.from_dict(t.to_dict())) == hash(t)
    assert t.scope is Scope.UNIVERSAL and t.constrained
    assert t.constraint_label() == "universal-per-class-ssim0.9-blur(sigma=0.5)x3-majority"
    assert "universal-per-class" in t.describe()
    r = _threat(region={"size": 3, "location": "fixed", "at": [1, 2]})
    assert r.to_dict()["region"] == {"shape": "square", "size": 3, "location": "fixed", "at": [1, 2]}
    assert ThreatModel.from_dict(r.to_dict()) == r and r.constraint_label() == "square3@1,2"


@pytest.mark.parametrize("fields, message", [
    ({"scope": "universal", "targeting": "random"}, "targeting must be untargeted or fixed"),
    ({"scope": "universal", "knowledge": "score_based"}, "white-box attackers only"),
    ({"scope": "universal", "region": {"size": 2, "location": "any"}}, "fixed or random with scope universal"),
    ({"shared_by": "class"}, "only allowed with scope 'universal'"),
    ({"scope": "universal", "shared_by": "batch"}, "shared_by must be 'set' or 'class'"),
    ({"scope": "everyone"}, "unknown scope 'everyone'; allowed: individual, universal"),
    ({"region": {"size": 0}}, "region size"),
    ({"region": {"size": 2, "location": "fixed"}}, "needs at: \\[row, col\\]"),
    ({"region": {"size": 2, "location": "random", "at": [0, 0]}}, "only allowed with location 'fixed'"),
    ({"region": {"size": 2, "shape": "circle"}}, "region shape must be 'square'"),
    ({"region": {"size": 2, "colour": "red"}}, "unknown region field"),
    ({"region": 3}, "region must be a mapping"),
    ({"perceptual": {"ssim": 1.5}}, "perceptual ssim"),
    ({"perceptual": {"ssim": 0}}, "must lie in \\(0, 1\\]"),
    ({"perceptual": {"lpips": 0.1}}, "unknown perceptual field"),
    ({"physical": {"transform": "photo", "rule": "some"}}, "physical rule must be one of all, majority"),
    ({"physical": {"transform": "photo", "draws": 0}}, "physical draws"),
    ({"physical": {"draws": 2}}, "physical transform must be"),
    ({"physical": {"transform": "photo", "where": "street"}}, "unknown physical field"),
])
def test_combinations_without_a_meaning_are_one_line_errors(fields, message):
    with pytest.raises(ConfigError, match=message) as info:
        ThreatModel.from_dict({"norm": "linf", "eps": 0.1, **fields})
    assert "\n" not in str(info.value)


def test_l0_does_not_combine_with_regions_or_universal_scope():
    with pytest.raises(ConfigError, match="not l0"):
        ThreatModel.from_dict({"norm": "l0", "eps": 3, "region": {"size": 2}})
    with pytest.raises(ConfigError, match="universal scope with norm l0"):
        ThreatModel.from_dict({"norm": "l0", "eps": 3, "scope": "universal"})


def test_a_config_keeps_its_hash_until_it_uses_an_axis_and_checks_the_physical_transform():
    base = {"models": ["digits-mlp"], "attacks": ["fgsm"], "threats": [{"norm": "linf", "eps": 0.1}]}
    plain = parse_config(base)
    assert all(k not in plain.canonical()["threats"][0] for k in ("scope", "region", "perceptual", "physical"))
    with_ssim = parse_config({**base, "threats": [{"norm": "linf", "eps": 0.1, "perceptual": {"ssim": 0.9}}]})
    assert with_ssim.hash() != plain.hash() and with_ssim.threat_models()[0].perceptual.ssim == 0.9
    with pytest.raises(ConfigError, match="threat physical: unknown transformation 'fax'"):
        parse_config({**base, "threats": [{"norm": "linf", "eps": 0.1, "physical": {"transform": "fax"}}]})
    with pytest.raises(ConfigError, match="is met by none of the attack entries"):  # fgsm is per example
        parse_config({**base, "threats": [{"norm": "linf", "eps": 0.1, "scope": "universal"}]})


# ---------------------------------------------------------------------------- regions
def test_the_audit_rejects_a_change_outside_the_region():
    x = torch.zeros(3, 1, 6, 6)
    threat = _threat(region={"size": 2, "location": "fixed", "at": [0, 0]})
    corners = region_corners(threat, 3, 6, 6)
    assert corners.tolist() == [[0, 0]] * 3
    x_adv = x.clone()
    x_adv[:, :, :2, :2] = 1.0  # inside: every example becomes class 1
    x_adv[1, 0, 5, 5] = 0.3  # one pixel outside the square
    report = audit(Fixed(), x, x_adv, torch.zeros(3, dtype=torch.long), threat, corners=corners)
    assert report.valid.tolist() == [True, False, True] and report.success.tolist() == [True, False, True]
    assert torch.equal(report.x_scored[1], x[1])  # the violating example counts as its clean input


def test_random_corners_are_seeded_and_any_location_is_checked_by_extent():
    threat = _threat(region={"size": 3, "location": "random"})
    a = region_corners(threat, 50, 8, 8, torch.Generator().manual_seed(0))
    b = region_corners(threat, 50, 8, 8, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 5 and len({tuple(c) for c in a.tolist()}) > 5
    mask = region_mask(a, 3, 8, 8)
    assert mask.shape == (50, 1, 8, 8) and (mask.flatten(1).sum(1) == 9).all()
    anywhere = _threat(region={"size": 3, "location": "any"})
    x = torch.zeros(2, 3, 8, 8)
    x_adv = x.clone()
    x_adv[0, 1, 4:7, 2:5] = 0.5  # a 3x3 square anywhere: fine
    x_adv[1, 0, 0, 0] = x_adv[1, 2, 3, 0] = 0.5  # rows 0 and 3: 4 rows apart
    assert inside_region(x_adv, x, anywhere.region, None).tolist() == [True, False]
    with pytest.raises(ConfigError, match="region size 9 does not fit 8x8 images"):
        region_corners(_threat(region={"size": 9, "location": "random"}), 1, 8, 8)


def test_attacks_that_cannot_keep_to_a_region_or_share_a_perturbation_are_refused():
    pgd = ATTACKS.create("pgd")
    in_region = ThreatModel(norm="linf", eps=0.1, region={"size": 2})
    assert "cannot keep its change inside a region" in pgd.supports(in_region)
    assert "does not produce universal" in pgd.supports(ThreatModel(norm="linf", eps=0.1, scope="universal"))
    with pytest.raises(UnsupportedThreatError):
        pgd(Fixed(), torch.zeros(1, 1, 4, 4), torch.zeros(1, dtype=torch.long), in_region)


# ---------------------------------------------------------------------------- universal scope
def test_the_audit_rejects_a_perturbation_that_is_not_shared_or_not_in_budget():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 5, 5, generator=g) * 0.5
    y = torch.zeros(4, dtype=torch.long)
    threat = ThreatModel(norm="linf", eps=0.3, scope="universal")
    delta = torch.full((1, 1, 5, 5), 0.3)
    shared_adv = apply_universal(x, y, threat, delta)
    report = audit(Fixed(), x, shared_adv, y, threat, universal=delta)
    assert report.valid.all()
    tampered = shared_adv.clone()
    tampered[2, 0, 4, 4] -= 0.1  # example 2 gets its own perturbation: in the ball, but not shared
    report = audit(Fixed(), x, tampered, y, threat, universal=delta)
    assert report.valid.tolist() == [True, True, False, True]
    big = torch.full((1, 1, 5, 5), 0.31)  # the shared perturbation itself leaves the ball
    assert not audit(Fixed(), x, apply_universal(x, y, threat, big), y, threat, universal=big).valid.any()
    assert not audit(Fixed(), x, shared_adv, y, threat, universal=None).valid.any()  # nothing claimed, nothing counts


def test_per_class_perturbations_and_universal_patches_are_applied_and_audited():
    x = torch.rand(4, 1, 6, 6, generator=torch.Generator().manual_seed(1)) * 0.4
    y = torch.tensor([0, 1, 0, 1])
    per_class = ThreatModel(norm="l2", eps=1.0, scope="universal", shared_by="class")
    deltas = torch.stack([torch.full((1, 6, 6), 0.1), torch.full((1, 6, 6), -0.1)])
    x_adv = apply_universal(x, y, per_class, deltas)
    assert torch.allclose(x_adv[1] - x[1], (-0.1 * torch.ones(1, 6, 6)).clamp(-x[1], None))
    assert audit(Fixed(), x, x_adv, y, per_class, universal=deltas).valid.all()
    patch_threat = _threat(scope="universal", region={"size": 2, "location": "random"})
    corners = region_corners(patch_threat, 4, 6, 6, torch.Generator().manual_seed(3))
    patch = torch.ones(1, 1, 2, 2)
    pasted = apply_universal(x, y, patch_threat, patch, corners)
    for i, (r, c) in enumerate(corners.tolist()):
        assert torch.equal(pasted[i, :, r:r + 2, c:c + 2], patch[0])
        outside = torch.ones(6, 6, dtype=torch.bool)
        outside[r:r + 2, c:c + 2] = False
        assert torch.equal(pasted[i, 0][outside], x[i, 0][outside])
    report = audit(Fixed(), x, pasted, y, patch_threat, corners=corners, universal=patch)
    assert report.valid.all()
    moved = apply_universal(x, y, patch_threat, patch, (corners + 1).clamp(max=4))
    assert not audit(Fixed(), x, moved, y, patch_threat, corners=corners, universal=patch).valid.all()


class Constant(Attack):
    """A toy universal attack for the base class's plumbing: the fitted perturbation is +eps everywhere."""

    name = "constant-universal"
    norms = frozenset({Norm.LINF})
    scopes = frozenset({Scope.INDIVIDUAL, Scope.UNIVERSAL})

    def _run(self, model, x, y, threat, target, generator):
        return threat.clip(x + threat.eps)

    def _fit(self, model, x, y, threat, generator):
        model(x)  # counted on the fit data
        return torch.full((1, *x.shape[1:]), threat.eps)


def test_a_universal_attack_is_fitted_on_one_set_applied_to_another_and_audited():
    x_fit, x = torch.rand(6, 1, 4, 4) * 0.2, torch.rand(3, 1, 4, 4) * 0.2
    y_fit, y = torch.zeros(6, dtype=torch.long), torch.zeros(3, dtype=torch.long)
    threat = ThreatModel(norm="linf", eps=0.4, scope="universal")
    result = Constant()(Fixed(), x, y, threat, fit=(x_fit, y_fit))
    assert result.universal is not None and result.universal.shape == (1, 1, 4, 4)
    assert torch.equal(result.x_adv, threat.clip(x + 0.4)) and result.valid.all()
    assert result.n_forward >= 6  # the fit pass is counted
    assert 0 <= result.fooling_rate <= 1 and result.fooling_rate == float((result.pred_adv != result.pred_clean).float().mean())


# ---------------------------------------------------------------------------- perceptual and physical
def test_the_audit_rejects_an_example_below_the_ssim_bound():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 1, 8, 8, generator=g)
    x_adv = x.clone()
    x_adv[0] = (x_adv[0] + 0.01).clamp(0, 1)  # near: high SSIM
    x_adv[1] = torch.rand(1, 8, 8, generator=g)  # another image: low SSIM
    threat = _threat(perceptual={"ssim": 0.9})
    report = audit(Fixed(), x, x_adv, torch.zeros(2, dtype=torch.long), threat)
    assert report.ssim[0] > 0.9 > report.ssim[1] and report.valid.tolist() == [True, False]


def test_the_audit_rejects_an_example_the_physical_transformation_destroys():
    # the model reads the mean of the top-left 2x2 pixels; a shift by 2 px up and left moves the change away
    x = torch.zeros(2, 1, 6, 6)
    x_adv = x.clone()
    x_adv[0, :, :, :] = 1.0  # everywhere: survives the shift
    x_adv[1, :, :2, :2] = 1.0  # only where the model looks before the shift
    y = torch.zeros(2, dtype=torch.long)
    digital = audit(Fixed(), x, x_adv, y, _threat())
    assert digital.success.tolist() == [True, True]
    threat = _threat(physical={"transform": {"name": "translation", "dx": -2, "dy": -2}, "draws": 2})
    report = audit(Fixed(), x, x_adv, y, threat)
    assert report.success.tolist() == [True, False] and report.physical_share.tolist() == [1.0, 0.0]
    assert report.valid.all()  # in the threat model: destroyed, not invalid


def test_physical_draws_are_seeded_and_the_rule_decides():
    torch.manual_seed(0)
    x = torch.full((200, 1, 4, 4), 0.5)
    x[:, 0, 3, 3] = torch.arange(200) / 1000  # distinct images (outside what the model reads): distinct draws
    x_adv = x.clone()
    x_adv[:, :, :2, :2] = 0.52  # just over the boundary: noise flips it either way
    y = torch.zeros(200, dtype=torch.long)
    phys = {"transform": {"name": "noise", "std": 0.1}, "draws": 5}
    every = audit(Fixed(), x, x_adv, y, _threat(physical={**phys, "rule": "all"}))
    again = audit(Fixed(), x, x_adv, y, _threat(physical={**phys, "rule": "all"}))
    most = audit(Fixed(), x, x_adv, y, _threat(physical={**phys, "rule": "majority"}))
    assert torch.equal(every.physical_share, again.physical_share)  # seeded: the same draws each audit
    assert torch.equal(every.physical_share, most.physical_share)
    share = every.physical_share
    assert torch.equal(every.success, share == 1) and torch.equal(most.success, share > 0.5)
    assert 0 < every.success.float().mean() < most.success.float().mean() < 1



def test_a_chain_as_physical_feed_is_hashable_and_its_label_is_a_file_safe_token():
    t = ThreatModel.from_dict({"norm": "linf", "eps": 0.1, "physical": {
        "transform": {"name": "chain", "steps": [{"name": "blur", "sigma": 0.5}, "jpeg"]}, "draws": 2}})
    assert hash(t) == hash(ThreatModel.from_dict(t.to_dict())) and ThreatModel.from_dict(t.to_dict()) == t
    assert t.to_dict()["physical"]["transform"]["steps"] == [{"name": "blur", "sigma": 0.5}, "jpeg"]
    label = t.constraint_label()
    assert label.startswith("chain(") and label.endswith(")x2-all") and all(c not in label for c in " '{[\"")
    built = t.physical.build()  # the chain is rebuilt from the frozen steps, in order
    assert [step.name for step in built.steps] == ["blur", "jpeg"] and built.steps[0].sigma == 0.5


def test_a_universal_patch_goes_with_norm_unbounded():
    with pytest.raises(ConfigError, match="use norm unbounded with scope universal and a region"):
        ThreatModel.from_dict({"norm": "linf", "eps": 0.1, "scope": "universal", "region": {"size": 2, "location": "random"}})


def test_an_examples_physical_verdict_does_not_depend_on_its_batch():
    g = torch.Generator().manual_seed(4)
    x = torch.rand(40, 1, 4, 4, generator=g) * 0.2 + 0.4
    x_adv = (x + 0.05).clamp(0, 1)
    y = torch.zeros(40, dtype=torch.long)
    threat = _threat(physical={"transform": {"name": "noise", "std": 0.1}, "draws": 6})
    whole = audit(Fixed(), x, x_adv, y, threat).physical_share
    halves = torch.cat([audit(Fixed(), x[i:i + 13], x_adv[i:i + 13], y[i:i + 13], threat).physical_share
                        for i in range(0, 40, 13)])
    reversed_ = audit(Fixed(), x.flip(0), x_adv.flip(0), y, threat).physical_share.flip(0)
    assert torch.equal(whole, halves) and torch.equal(whole, reversed_)
    assert 0 < float(whole.mean()) < 1  # the draws do differ between examples and draws
