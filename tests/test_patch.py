"""The ``patch`` attack (Brown et al., "Adversarial Patch", 2017): per example (PGD inside each
example's square) and universal (one patch trained with EoT over locations), on the 8x8 digits.

Every property is checked directly on the tensors (which pixels changed, what was pasted where),
not only through the audit; the baselines are random patches of the same size at the same corners."""

from __future__ import annotations

import math

import pytest
import torch

from advbench.attacks.patch import Patch, paste, paste_transformed, saliency_corners
from advbench.audit import apply_universal, audit, region_corners, region_mask
from advbench.errors import ConfigError, UnsupportedThreatError
from advbench.registry import ATTACKS
from advbench.tensors import HostSyncCounter
from advbench.threat import Knowledge, Norm, Scope, Targeting, ThreatModel

N = 120  # test examples per check


def _threat(size: int, location: str = "random", **kw) -> ThreatModel:
    return ThreatModel.from_dict({"norm": "unbounded", "region": {"size": size, "location": location}, **kw})


@pytest.fixture(scope="module")
def batch(digits_test):
    idx = digits_test.sample_indices(N, 0)
    return digits_test.x[idx].clone(), digits_test.y[idx].clone()


@torch.no_grad()
def _pred(model, x: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(dim=1)


def _outside_unchanged(x_adv: torch.Tensor, x: torch.Tensor, corners: torch.Tensor, size: int) -> torch.Tensor:
    """Per example, whether every pixel outside its square is bit-for-bit the clean one (plain torch)."""
    out = []
    for i, (r, c) in enumerate(corners.tolist()):
        keep = torch.ones(x.shape[2:], dtype=torch.bool)
        keep[r:r + size, c:c + size] = False
        out.append(bool(torch.equal(x_adv[i][:, keep], x[i][:, keep])))
    return torch.tensor(out)


def _bounding_box(x_adv: torch.Tensor, x: torch.Tensor) -> list[tuple[int, int]]:
    """Per example, the (height, width) of the box around its changed pixels ((0, 0): none)."""
    boxes = []
    for i in range(x.shape[0]):
        changed = (x_adv[i] != x[i]).any(dim=0).nonzero()
        boxes.append((0, 0) if len(changed) == 0 else
                     tuple(int(changed[:, d].max() - changed[:, d].min() + 1) for d in (0, 1)))
    return boxes


def _random_patch_hits(model, x, y, size, corners, target: int | None, draws: int = 5) -> float:
    """The mean rate at which uniform-noise patches at ``corners`` fool the model (or hit ``target``)."""
    g = torch.Generator().manual_seed(99)
    rates = []
    for _ in range(draws):
        noise = torch.rand(x.shape[0], x.shape[1], size, size, generator=g)
        pred = _pred(model, paste(x, noise, corners))
        hit = pred != y if target is None else (pred == target) & (y != target)
        rates.append(float(hit.float().mean()))
    return sum(rates) / draws


# ---------------------------------------------------------------------- declaration
def test_registered_with_what_it_supports():
    attack = ATTACKS.create("patch")
    assert isinstance(attack, Patch) and attack.name == "patch"
    assert attack.regions and attack.scopes == frozenset({Scope.INDIVIDUAL, Scope.UNIVERSAL})
    assert attack.norms == frozenset({Norm.UNBOUNDED, Norm.LINF, Norm.L2}) and attack.targeting == frozenset(Targeting)
    assert attack.knowledge == frozenset({Knowledge.WHITE_BOX}) and attack.randomized is True
    assert attack.supports(_threat(3)) is None
    assert attack.supports(_threat(3, scope="universal")) is None
    assert "needs a region" in attack.supports(ThreatModel(norm="unbounded", scope="universal"))
    with pytest.raises(ConfigError, match="use norm unbounded"):  # the descriptor itself refuses it
        ThreatModel.from_dict({"norm": "linf", "eps": 0.1, "scope": "universal",
                               "region": {"size": 3, "location": "random"}})
    with pytest.raises(ConfigError, match="scale must be"):
        ATTACKS.create("patch", scale=[1.2, 0.8])
    with pytest.raises(ConfigError, match="rotation"):
        ATTACKS.create("patch", rotation=-5)


def test_unsupported_universal_threats_raise(digits_cnn, batch):
    x, y = batch
    with pytest.raises(UnsupportedThreatError, match="needs a region"):
        ATTACKS.create("patch")(digits_cnn, x, y, ThreatModel(norm="unbounded", scope="universal"))


# ---------------------------------------------------------------------- per example
def test_individual_patch_beats_a_random_patch_and_changes_nothing_outside_its_square(digits_cnn, batch):
    x, y = batch
    threat = _threat(3)
    res = ATTACKS.create("patch", steps=50)(digits_cnn, x, y, threat, generator=torch.Generator().manual_seed(0))
    assert res.corners is not None and res.corners.shape == (N, 2)
    assert res.valid.all()
    assert _outside_unchanged(res.x_adv, x, res.corners, 3).all()
    assert torch.equal(res.success, _pred(digits_cnn, res.x_adv) != y)
    random_rate = _random_patch_hits(digits_cnn, x, y, 3, res.corners, None)
    assert res.success_rate > random_rate + 0.3, (res.success_rate, random_rate)
    assert res.success_rate > 0.5


def test_fixed_corners_are_kept_and_linf_l2_budgets_hold_inside_the_square(digits_cnn, batch):
    x, y = batch
    corners = torch.tensor([[2, 3]]).expand(N, 2)
    for norm, eps in (("linf", 0.3), ("l2", 1.0)):
        threat = ThreatModel.from_dict({"norm": norm, "eps": eps, "region": {"size": 4, "location": "fixed", "at": [2, 3]}})
        res = ATTACKS.create("patch", steps=20)(digits_cnn, x, y, threat, generator=torch.Generator().manual_seed(1))
        assert torch.equal(res.corners, corners) and res.valid.all()
        assert _outside_unchanged(res.x_adv, x, corners, 4).all()
        delta = (res.x_adv - x).flatten(1).double()
        size = delta.abs().amax(dim=1) if norm == "linf" else delta.norm(dim=1)
        assert size.max() <= eps + 1e-5
        assert res.success.float().mean() > (_pred(digits_cnn, x) != y).float().mean() + 0.1


@pytest.mark.parametrize("max_batch", [100_000, 256, 1])  # the 4 candidates in one batch, in 2, in 4
def test_location_any_picks_a_square_per_example_and_is_audited_valid(max_batch, digits_cnn, batch):
    x, y = batch
    attack = ATTACKS.create("patch", steps=50, max_batch=max_batch)
    anywhere = attack(digits_cnn, x, y, _threat(3, "any"), generator=torch.Generator().manual_seed(0))
    assert anywhere.n_backward == N * (50 * 4 + 1)  # 4 candidates of 50 steps, and the saliency gradient
    assert anywhere.corners is None and anywhere.valid.all()
    assert all(h <= 3 and w <= 3 for h, w in _bounding_box(anywhere.x_adv, x))  # one 3x3 square each
    at_random = attack(digits_cnn, x, y, _threat(3), generator=torch.Generator().manual_seed(0))
    assert anywhere.success_rate > at_random.success_rate  # choosing the square beats being given one


def test_the_saliency_corner_is_the_square_of_largest_gradient_mass():
    grad = torch.zeros(2, 3, 8, 8)
    grad[0, 1, 5:7, 1:3] = -2.0  # example 0: the mass sits at rows 5-6, cols 1-2
    grad[1, :, 0, 7] = 1.0  # example 1: a single pixel in the top-right corner
    corners = saliency_corners(grad, 3)
    assert corners.shape == (2, 2)
    r, c = corners[0].tolist()
    assert r <= 5 and r + 3 >= 7 and c <= 1 and c + 3 >= 3  # the square covers the whole mass
    r, c = corners[1].tolist()
    assert r == 0 and c == 5


def test_the_audit_rejects_the_output_with_one_pixel_changed_outside_the_square(digits_cnn, batch):
    x, y = batch
    threat = _threat(3)
    res = ATTACKS.create("patch", steps=20)(digits_cnn, x, y, threat, generator=torch.Generator().manual_seed(0))
    assert audit(digits_cnn, x, res.x_adv, y, threat, corners=res.corners).valid.all()
    tampered = res.x_adv.clone()
    r, c = res.corners[4].tolist()
    row = r + 3 if r + 3 < 8 else r - 1  # the row just below (or above) the square
    tampered[4, 0, row, c] = (tampered[4, 0, row, c] + 0.25) % 1.0
    report = audit(digits_cnn, x, tampered, y, threat, corners=res.corners)
    assert not report.valid[4] and report.valid.sum() == N - 1


# ---------------------------------------------------------------------- universal
def test_universal_targeted_patch_fitted_on_train_hits_its_target_on_test(digits_cnn, digits_train, batch):
    x, y = batch
    size, target = 5, 3
    threat = _threat(size, scope="universal", targeting="fixed", target_class=target)
    res = ATTACKS.create("patch")(digits_cnn, x, y, threat, generator=torch.Generator().manual_seed(0),
                                  fit=(digits_train.x, digits_train.y))
    assert res.universal is not None and res.universal.shape == (1, 1, size, size)
    assert res.valid.all() and res.n_violations == 0
    # every test example carries exactly that patch, at its own corner, and nothing else changed
    assert torch.equal(res.x_adv, paste(x, res.universal.expand(N, 1, size, size), res.corners))
    assert len({tuple(c) for c in res.corners.tolist()}) > 5  # random locations
    assert res.universal.min() >= 0 and res.universal.max() <= 1
    random_rate = _random_patch_hits(digits_cnn, x, y, size, res.corners, target)
    assert res.success_rate > max(3 * random_rate, random_rate + 0.15), (res.success_rate, random_rate)
    assert res.n_backward >= len(digits_train.x) * 10  # epochs over the fit set, counted


def test_universal_untargeted_and_per_class_patches(digits_cnn, digits_train, batch):
    x, y = batch
    fit = (digits_train.x, digits_train.y)
    untargeted = ATTACKS.create("patch", epochs=5)(digits_cnn, x, y, _threat(4, scope="universal"),
                                                   generator=torch.Generator().manual_seed(0), fit=fit)
    assert untargeted.valid.all()
    assert untargeted.fooling_rate > _random_patch_hits(digits_cnn, x, y, 4, untargeted.corners, None) + 0.15
    per_class = ATTACKS.create("patch", epochs=5)(digits_cnn, x, y, _threat(4, scope="universal", shared_by="class"),
                                                  generator=torch.Generator().manual_seed(0), fit=fit)
    assert per_class.universal.shape == (10, 1, 4, 4) and per_class.valid.all()
    assert torch.equal(per_class.x_adv, paste(x, per_class.universal[y], per_class.corners))


def test_a_fixed_location_and_training_transformations(digits_cnn, digits_train, batch):
    x, y = batch
    fit = (digits_train.x[:300], digits_train.y[:300])
    threat = ThreatModel.from_dict({"norm": "unbounded", "scope": "universal",
                                    "region": {"size": 4, "location": "fixed", "at": [0, 4]}})
    for kw in ({"optimizer": "sign"}, {"scale": [0.7, 1.2], "rotation": 30.0}):
        res = ATTACKS.create("patch", epochs=3, **kw)(digits_cnn, x, y, threat, generator=torch.Generator().manual_seed(0),
                                                      fit=fit)
        assert res.valid.all() and (res.corners == torch.tensor([0, 4])).all()
        assert res.fooling_rate > 0.1


def test_pasting_matches_the_audit_and_transformations_stay_in_the_square():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 9, 9, generator=g)
    y = torch.zeros(6, dtype=torch.long)
    threat = _threat(3, scope="universal")
    corners = region_corners(threat, 6, 9, 9, g)
    patch = torch.rand(1, 3, 3, 3, generator=g)
    expected = apply_universal(x, y, threat, patch, corners)
    many = patch.expand(6, 3, 3, 3)
    assert torch.equal(paste(x, many, corners), expected)
    same = paste_transformed(x, many, corners, torch.ones(6), torch.zeros(6))
    assert torch.allclose(same, expected, atol=1e-5)
    # a quarter turn (clockwise on screen: rows point down) is a rot90 of the patch
    turned = paste_transformed(x, many, corners, torch.ones(6), torch.full((6,), math.pi / 2))
    assert torch.allclose(turned, apply_universal(x, y, threat, torch.rot90(patch, -1, dims=(2, 3)), corners), atol=1e-5)
    # scaled and rotated, the patch never reaches outside its square
    moved = paste_transformed(x, many, corners, torch.full((6,), 0.8), torch.full((6,), 0.5))
    outside = ~region_mask(corners, 3, 9, 9)
    assert torch.allclose(moved[outside.expand_as(x)], x[outside.expand_as(x)], atol=1e-5)
    # differentiable in the patch
    leaf = many.clone().requires_grad_(True)
    (g1,) = torch.autograd.grad(paste(x, leaf, corners).sum(), leaf)
    assert torch.equal(g1, torch.ones_like(leaf))


# ---------------------------------------------------------------------- seeds and synchronisation
@pytest.mark.parametrize("scope", ["individual", "universal"])
def test_seeded_and_reproducible(scope, digits_cnn, digits_train, batch):
    x, y = batch
    threat = _threat(4, scope=scope)
    attack = ATTACKS.create("patch", steps=10, epochs=2)
    fit = (digits_train.x[:200], digits_train.y[:200])
    state = torch.get_rng_state()
    a = attack(digits_cnn, x, y, threat, generator=torch.Generator().manual_seed(7), fit=fit)
    assert torch.equal(torch.get_rng_state(), state), "randomness must come from the generator only"
    b = attack(digits_cnn, x, y, threat, generator=torch.Generator().manual_seed(7), fit=fit)
    c = attack(digits_cnn, x, y, threat, generator=torch.Generator().manual_seed(8), fit=fit)
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.corners, b.corners) and a.seed == 7
    assert not torch.equal(a.x_adv, c.x_adv)
    if scope == "universal":
        assert torch.equal(a.universal, b.universal) and not torch.equal(a.universal, c.universal)


def _sync_counts(run) -> dict:
    with HostSyncCounter() as counter:
        run()
    return dict(counter.counts)


@pytest.mark.parametrize("location", ["random", "any"])
def test_no_host_synchronisation_grows_with_the_steps(location, digits_cnn, batch):
    x, y = batch
    threat = _threat(3, location)

    def run(steps: int):
        return lambda: ATTACKS.create("patch", steps=steps, restarts=2)(digits_cnn, x, y, threat,
                                                                         generator=torch.Generator().manual_seed(0))
    assert _sync_counts(run(3)) == _sync_counts(run(9))


def test_no_host_synchronisation_grows_with_the_epochs(digits_cnn, digits_train, batch):
    x, y = batch
    threat = _threat(3, scope="universal")
    fit = (digits_train.x[:256], digits_train.y[:256])

    def run(epochs: int, **kw):
        return lambda: ATTACKS.create("patch", epochs=epochs, **kw)(digits_cnn, x, y, threat,
                                                                     generator=torch.Generator().manual_seed(0), fit=fit)
    assert _sync_counts(run(1)) == _sync_counts(run(3))
    assert _sync_counts(run(1, rotation=10.0)) == _sync_counts(run(3, rotation=10.0))
