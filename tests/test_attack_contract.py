"""The contract every registered attack keeps, checked on the digits models.

Parametrized over ``ATTACKS.list()`` at collection time and each attack's declared norms, so an
attack registered later (built-in or plugin) is checked without editing this file. The threat
model is built from what the attack declares: its norms, and the first knowledge it accepts
(white-box before score-based before decision-based; score- and decision-based attackers get a
query budget). Every property is recomputed here with plain torch, never read back from the
code under test (``ThreatModel.contains``, the audit).
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from torch import nn

from advbench.errors import UnsupportedThreatError
from advbench.registry import ATTACKS
from advbench.threat import Knowledge, Norm, Scope, Targeting, ThreatModel

N = 48  # examples per check: enough to see a rate, small enough to keep the suite fast
QUERY_BUDGET = 300  # per example, for score- and decision-based attackers
EPS = {Norm.LINF: 0.15, Norm.L2: 1.5, Norm.L1: 6.0, Norm.L0: 6, Norm.UNBOUNDED: math.inf}
VALID_EPS = {Norm.LINF: 0.1, Norm.L2: 1.0, Norm.L1: 4.0, Norm.L0: 4, Norm.UNBOUNDED: 0.0}
# Cheaper settings for the built-ins (the contract does not depend on the iteration count);
# an attack not listed here runs with its defaults.
FAST = {
    "bim": {"steps": 8, "step_size": 0.025},
    "illc": {"steps": 8, "step_size": 0.025},
    "pgd": {"steps": 10},
    "cw": {"steps": 100, "search_steps": 4, "lr": 1e-2},  # lr: linf's 5e-3 needs more than 100 steps per problem
    "deepfool": {"steps": 6},
    "lbfgs": {},
    "onepixel": {"population": 50, "generations": 5},
    "apgd": {"steps": 10},
    "apgd-t": {"steps": 10, "targets": 3},
    "fab": {"steps": 10},
    "fab-t": {"steps": 10, "targets": 3},
    "square": {"queries": 200},
    "hsja": {"steps": 4},
    "uap": {"max_passes": 2},
    # takes its expectation over a transformation: the threats here have no physical field, so give it one
    "eot-pgd": {"steps": 10, "samples": 4, "transform": "photo"},
    # needs its source; its knowledge is transfer, so knowledge_of skips the checks that need a handle
    "transfer": {"source": {"name": "digits-mlp"}, "attack": {"name": "pgd", "steps": 10}},
}
KNOWLEDGE_PREFERENCE = (Knowledge.WHITE_BOX, Knowledge.SCORE_BASED, Knowledge.DECISION_BASED)


def make(name: str):
    entry = ATTACKS.get(name)
    schema = getattr(entry.factory, "Params", None)  # a plugin's declared parameters, else its signature's
    accepted = set(schema.model_fields) if schema is not None else set(inspect.signature(entry.factory).parameters)
    return ATTACKS.create(name, **{k: v for k, v in FAST.get(name, {}).items() if k in accepted})


def _cases() -> list[tuple[str, Norm]]:
    return [(name, norm) for name in ATTACKS.list() for norm in sorted(make(name).norms, key=lambda n: n.value)]


CASES = _cases()
IDS = [f"{name}-{norm.value}" for name, norm in CASES]
NAMES = ATTACKS.list()


def knowledge_of(attack) -> Knowledge:
    for k in KNOWLEDGE_PREFERENCE:
        if k in attack.knowledge:
            return k
    pytest.skip(f"{attack.name} needs {sorted(k.value for k in attack.knowledge)}: no model handle to test with")


def threat_for(attack, norm: Norm, targeting: Targeting = Targeting.UNTARGETED, **kw) -> ThreatModel:
    knowledge = knowledge_of(attack)
    budget = None if knowledge is Knowledge.WHITE_BOX else QUERY_BUDGET
    if Scope.INDIVIDUAL not in attack.scopes:  # a universal-only attack (uap): fitted in-sample on the batch
        kw.setdefault("scope", Scope.UNIVERSAL)
    return ThreatModel(norm=norm, eps=EPS[norm], targeting=targeting, knowledge=knowledge, query_budget=budget, **kw)


def default_norm(attack) -> Norm:
    return Norm.LINF if Norm.LINF in attack.norms else sorted(attack.norms, key=lambda n: n.value)[0]


@pytest.fixture(scope="module")
def batch(digits_test):
    idx = torch.arange(0, len(digits_test), len(digits_test) // N)[:N]
    return digits_test.x[idx].clone(), digits_test.y[idx].clone()


def plain_distance(x_adv: torch.Tensor, x: torch.Tensor, norm: Norm) -> torch.Tensor:
    d = (x_adv - x).reshape(x.shape[0], -1).double()
    if norm in (Norm.LINF, Norm.UNBOUNDED):
        return d.abs().max(dim=1).values
    if norm is Norm.L2:
        return d.pow(2).sum(dim=1).sqrt()
    if norm is Norm.L1:
        return d.abs().sum(dim=1)
    # l0 counts pixels (all channels at one position) for NCHW batches
    pix = (x_adv - x).abs().amax(dim=1).reshape(x.shape[0], -1) if x.dim() == 4 else d.abs()
    return (pix > 0).sum(dim=1).double()


def check_inside(x_adv: torch.Tensor, x: torch.Tensor, threat: ThreatModel) -> None:
    """Finite, inside the bounds and inside the ball, with float32 rounding as the only slack."""
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert torch.isfinite(x_adv).all()
    lo, hi = threat.bounds
    assert x_adv.min() >= lo and x_adv.max() <= hi
    if threat.norm is not Norm.UNBOUNDED:
        slack = 1e-5 * threat.eps + 1e-6 if threat.norm in (Norm.L2, Norm.L1) else 1e-6
        dist = plain_distance(x_adv, x, threat.norm)
        assert dist.max() <= threat.eps + slack, f"max distance {float(dist.max())} > eps {threat.eps}"


@torch.no_grad()
def argmax(model, x: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(dim=1)


# ---------------------------------------------------------------------- the contract
@pytest.mark.parametrize("name, norm", CASES, ids=IDS)
@pytest.mark.parametrize("model_name", ["digits_mlp", "digits_cnn"])
def test_output_inside_threat_model_and_success_recomputed(name, norm, model_name, batch, request):
    model = request.getfixturevalue(model_name)
    x, y = batch
    x_before = x.clone()
    attack = make(name)
    threat = threat_for(attack, norm)
    res = attack(model, x, y, threat, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, x_before), "the attack modified its input"
    check_inside(res.x_adv, x, threat)
    assert res.valid.all() and res.n_violations == 0
    pred = argmax(model, res.x_adv)
    assert torch.equal(res.pred_adv, pred)
    assert torch.equal(res.success, pred != y)
    assert torch.equal(res.pred_clean, argmax(model, x))
    # the attack does something: more errors than the clean ones at this (generous) eps
    assert res.success.sum() > (res.pred_clean != y).sum()
    assert torch.allclose(res.distances.double(), plain_distance(res.x_adv, x, norm), rtol=1e-5, atol=1e-6)
    assert res.attack == name and res.params == attack.params()


@pytest.mark.parametrize("name, norm", CASES, ids=IDS)
def test_targeted_modes_reach_their_target(name, norm, batch, digits_mlp):
    x, y = batch
    attack = make(name)
    modes = [t for t in (Targeting.RANDOM, Targeting.FIXED, Targeting.LEAST_LIKELY) if t in attack.targeting]
    if not modes:
        pytest.skip(f"{name} is untargeted only")
    untargeted = attack(digits_mlp, x, y, threat_for(attack, norm), generator=torch.Generator().manual_seed(1))
    for mode in modes:
        kw = {"target_class": 3} if mode is Targeting.FIXED else {}
        threat = threat_for(attack, norm, mode, **kw)
        res = attack(digits_mlp, x, y, threat, generator=torch.Generator().manual_seed(1))
        check_inside(res.x_adv, x, threat)
        t = res.target
        assert t is not None and t.shape == y.shape
        if mode is Targeting.RANDOM:
            assert (t != y).all()
        elif mode is Targeting.FIXED:
            assert (t == 3).all()
        else:
            with torch.no_grad():
                assert torch.equal(t, digits_mlp(x).argmin(dim=1))
        pred = argmax(digits_mlp, res.x_adv)
        # success is hitting the target, nothing else; an example of the target class is no success
        assert torch.equal(res.success, (pred == t) & (t != y))
        if mode in (Targeting.RANDOM, Targeting.FIXED):
            # the targeted run hits its targets more often than the untargeted one happens to
            keep = y != t
            hits = (pred == t)[keep].float().mean()
            by_chance = (untargeted.pred_adv == t)[keep].float().mean()
            assert hits > by_chance, f"{mode.value}: {float(hits):.2f} <= untargeted {float(by_chance):.2f}"


@pytest.mark.parametrize("name, norm", CASES, ids=IDS)
def test_seeded_and_reproducible(name, norm, batch, digits_mlp):
    x, y = batch
    attack = make(name)
    threat = threat_for(attack, norm)
    global_state = torch.get_rng_state()
    a = attack(digits_mlp, x, y, threat, generator=torch.Generator().manual_seed(123))
    assert torch.equal(torch.get_rng_state(), global_state), "randomness must come from the generator only"
    b = attack(digits_mlp, x, y, threat, generator=torch.Generator().manual_seed(123))
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.success, b.success)
    assert a.seed == 123
    c = attack(digits_mlp, x, y, threat, generator=torch.Generator().manual_seed(124))
    randomized = getattr(attack, "randomized", None)
    if randomized:
        assert not torch.equal(a.x_adv, c.x_adv), "a randomized attack ignored its seed"
    elif randomized is False:
        assert torch.equal(a.x_adv, c.x_adv), "a deterministic attack depends on its seed"
        assert torch.equal(a.x_adv, attack(digits_mlp, x, y, threat).x_adv)
    if Targeting.RANDOM in attack.targeting:
        rt = threat_for(attack, norm, Targeting.RANDOM)
        r1 = attack(digits_mlp, x, y, rt, generator=torch.Generator().manual_seed(5))
        r2 = attack(digits_mlp, x, y, rt, generator=torch.Generator().manual_seed(5))
        r3 = attack(digits_mlp, x, y, rt, generator=torch.Generator().manual_seed(6))
        assert torch.equal(r1.target, r2.target) and torch.equal(r1.x_adv, r2.x_adv)
        assert not torch.equal(r1.target, r3.target) and not torch.equal(r1.x_adv, r3.x_adv)


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_attacks_treat_examples_independently(name, batch, digits_mlp):
    """Attacking a sub-batch gives what the full batch gave those examples: no batch coupling
    (a mean-reduced loss, batch statistics, a shared step size)."""
    attack = make(name)
    if getattr(attack, "randomized", None) and "random_start" in attack.params():
        attack = ATTACKS.create(name, **{**attack.params(), "random_start": False})  # its deterministic form
    if getattr(attack, "randomized", None) is not False:
        pytest.skip(f"{name} is randomized (or does not say): its draws depend on the batch")
    x, y = batch
    threat = threat_for(attack, default_norm(attack))
    full = attack(digits_mlp, x, y, threat)
    part = attack(digits_mlp, x[5:17], y[5:17], threat)
    # BLAS may sum in another order for another batch size: allow float noise, not a changed step
    assert torch.allclose(full.x_adv[5:17], part.x_adv, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_counts_are_plausible(name, batch, digits_mlp):
    x, y = batch
    attack = make(name)
    threat = threat_for(attack, default_norm(attack))
    res = attack(digits_mlp, x, y, threat, generator=torch.Generator().manual_seed(0))
    params = attack.params()
    if threat.knowledge is Knowledge.WHITE_BOX:
        assert res.n_queries == 0
        if attack.kind in ("score_based", "decision_based"):
            # a query attack given the white-box handle (AutoAttack's Square) still reads outputs only
            assert res.n_forward >= 1 and res.n_backward == 0
            return
        # not n_forward >= n_backward: DeepFool takes one gradient per candidate class per forward pass
        assert res.n_forward >= 1 and res.n_backward >= 1
        steps = params.get("steps")
        if isinstance(steps, int) and not attack.minimal:  # minimal attacks stop once they are adversarial
            # a fixed-budget iterative attack takes at least one gradient per step
            assert res.n_backward >= steps
    else:
        assert res.n_backward == 0
        assert 1 <= res.n_queries <= QUERY_BUDGET * x.shape[0]


def test_counts_of_the_builtins(batch, digits_mlp):
    x, y = batch
    t = ThreatModel(norm="linf", eps=4 / 255)
    n = len(y)  # passes are counted per example
    assert ATTACKS.create("fgsm")(digits_mlp, x, y, t).n_backward == n
    bim = ATTACKS.create("bim")(digits_mlp, x, y, t)  # paper rule: min(4 + 4, 1.25 * 4) = 5 steps
    assert (bim.n_forward, bim.n_backward) == (5 * n, 5 * n)
    pgd = ATTACKS.create("pgd", steps=7)(digits_mlp, x, y, t)
    assert (pgd.n_forward, pgd.n_backward) == (7 * n, 7 * n)
    pgd = ATTACKS.create("pgd", steps=7, restarts=3)(digits_mlp, x, y, ThreatModel(eps=0.3))
    # later restarts run on the examples still failing only
    assert 7 * n <= pgd.n_backward <= 21 * n and pgd.n_backward % 7 == 0
    assert pgd.n_forward == pgd.n_backward + pgd.n_backward // 7  # one evaluation per example and restart


@pytest.mark.parametrize("name", NAMES)
def test_unsupported_threats_raise(name, batch, digits_mlp):
    x, y = batch
    attack = make(name)
    knowledge = knowledge_of(attack)
    budget = None if knowledge is Knowledge.WHITE_BOX else QUERY_BUDGET
    for norm in set(Norm) - set(attack.norms):
        threat = ThreatModel(norm=norm, eps=VALID_EPS[norm], knowledge=knowledge, query_budget=budget)
        with pytest.raises(UnsupportedThreatError, match=norm.value):
            attack(digits_mlp, x, y, threat)
    norm = default_norm(attack)
    for targeting in set(Targeting) - set(attack.targeting):
        kw = {"target_class": 1} if targeting is Targeting.FIXED else {}
        threat = ThreatModel(norm=norm, eps=VALID_EPS[norm], targeting=targeting, knowledge=knowledge,
                             query_budget=budget, **kw)
        with pytest.raises(UnsupportedThreatError, match=targeting.value):
            attack(digits_mlp, x, y, threat)
    for other in set(Knowledge) - set(attack.knowledge):
        threat = ThreatModel(norm=norm, eps=VALID_EPS[norm], knowledge=other, query_budget=10)
        with pytest.raises(UnsupportedThreatError):
            attack(digits_mlp, x, y, threat)


@pytest.mark.parametrize("name", NAMES)
def test_model_state_is_restored(name, batch, digits_mlp):
    x, y = batch
    attack = make(name)
    digits_mlp.train()
    flags = [p.requires_grad for p in digits_mlp.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in digits_mlp.parameters()]
    digits_mlp[1].weight.requires_grad_(True)
    try:
        res = attack(digits_mlp, x, y, threat_for(attack, default_norm(attack)), generator=torch.Generator().manual_seed(0))
        assert digits_mlp.training and digits_mlp[1].weight.requires_grad
        for p, g in zip(digits_mlp.parameters(), grads):
            assert (p.grad is None and g is None) or torch.equal(p.grad, g), "the attack touched parameter gradients"
        assert res.x_adv.grad_fn is None and not res.x_adv.requires_grad
    finally:
        digits_mlp.eval()
        for p, f in zip(digits_mlp.parameters(), flags):
            p.requires_grad_(f)


def test_submodule_modes_are_restored(batch, digits_mlp):
    """A wrapper in train mode around a model in eval mode (a defense around a pretrained net)
    must leave the attack with each module's own mode, or the next clean pass runs dropout and
    batch-norm statistics in training mode."""
    x, y = batch
    wrapper = nn.Sequential(digits_mlp)  # train mode by default; digits_mlp is in eval mode
    assert wrapper.training and not digits_mlp.training
    try:
        ATTACKS.create("fgsm")(wrapper, x, y, ThreatModel(eps=0.1))
        assert wrapper.training and not digits_mlp.training
    finally:
        digits_mlp.eval()


def test_every_attack_is_covered():
    """Each registered attack declares at least one norm, so it is in the parametrization."""
    assert {name for name, _ in CASES} == set(ATTACKS.list())
    assert {"fgsm", "bim", "illc", "pgd"} <= set(ATTACKS.list())


# ---------------------------------------------------------------------- the axes beyond the ball
REGION_NAMES = [n for n in NAMES if make(n).regions]
UNIVERSAL_NAMES = [n for n in NAMES if Scope.UNIVERSAL in make(n).scopes]


@pytest.mark.parametrize("location", ["random", "fixed", "any"])
@pytest.mark.parametrize("name", REGION_NAMES)
def test_a_region_attack_changes_nothing_outside_each_examples_square(name, location, digits_cnn, batch):
    """Recomputed here: every changed pixel lies in the example's 3x3 square (its corner from the
    result for fixed and random, the changed pixels' extent for any), and success is the model's."""
    x, y = batch
    attack = make(name)
    region = {"size": 3, "location": location, **({"at": [2, 1]} if location == "fixed" else {})}
    threat = ThreatModel.from_dict({"norm": "unbounded", "region": region})
    if attack.supports(threat):
        pytest.skip(attack.supports(threat))
    res = attack(digits_cnn, x, y, threat, generator=torch.Generator().manual_seed(0))
    changed = (res.x_adv != x).any(dim=1)  # (N, H, W)
    for i in range(x.shape[0]):
        rows, cols = changed[i].nonzero(as_tuple=True)
        if location == "any":
            assert rows.numel() == 0 or (rows.max() - rows.min() < 3 and cols.max() - cols.min() < 3)
        else:
            r, c = res.corners[i].tolist()
            assert (location != "fixed" or (r, c) == (2, 1))
            assert bool(((rows >= r) & (rows < r + 3) & (cols >= c) & (cols < c + 3)).all())
    assert res.valid.all() and torch.equal(res.success, argmax(digits_cnn, res.x_adv) != y)


@pytest.mark.parametrize("name", UNIVERSAL_NAMES)
def test_a_universal_attack_hands_over_one_perturbation_every_example_carries(name, digits_cnn, batch):
    """Recomputed here: one perturbation (or patch), every example exactly it applied to the clean
    input, fitted on other images than the ones it is judged on."""
    x, y = batch
    fit_x, fit_y = x.flip(0)[: N // 2], y.flip(0)[: N // 2]
    attack = make(name)
    threat = threat_for(attack, default_norm(attack) if Norm.UNBOUNDED not in attack.norms else Norm.UNBOUNDED,
                        scope=Scope.UNIVERSAL)
    if attack.supports(threat):  # a patch attack: universal patches need a region
        threat = ThreatModel.from_dict({"norm": "unbounded", "scope": "universal",
                                        "region": {"size": 3, "location": "random"}})
    res = attack(digits_cnn, x, y, threat, fit=(fit_x, fit_y), generator=torch.Generator().manual_seed(0))
    assert res.universal is not None and res.universal.shape[0] == 1
    if threat.region is None:
        delta = res.universal[0]
        assert plain_distance(delta[None], torch.zeros_like(delta[None]), threat.norm).item() <= threat.eps + 1e-6
        assert torch.equal(res.x_adv, (x + delta).clamp(*threat.bounds))
    else:
        for i in range(x.shape[0]):
            r, c = res.corners[i].tolist()
            assert torch.equal(res.x_adv[i, :, r:r + 3, c:c + 3], res.universal[0])
    assert res.valid.all() and torch.equal(res.pred_adv, argmax(digits_cnn, res.x_adv))
