"""The transfer matrix (Szegedy et al.'s cross-model table) and the ``transfer`` attack."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from advbench.access import NoAccess, handle_for
from advbench.analysis.transfer_matrix import (
    DISTORTION,
    amplify,
    gaussian_like,
    rms,
    transfer_matrix,
    uniform_like,
)
from advbench.audit import audit
from advbench.config import parse_config
from advbench.errors import ConfigError, UnsupportedThreatError
from advbench.eval.evaluator import evaluate
from advbench.registry import ATTACKS
from advbench.threat import ThreatModel

SOURCE = {"name": "digits-mlp"}
PGD = {"name": "pgd", "steps": 5}


def _linear(w: list[list[float]], b: list[float]) -> nn.Module:
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor(w))
        model.bias.copy_(torch.tensor(b))
    return model.eval()


# Two 2-feature models: A says class 1 iff x0 > 0.5; B says class 1 iff x0 + x1 > 1.
MODEL_A = _linear([[0, 0], [1, 0]], [0, -0.5])
MODEL_B = _linear([[0, 0], [1, 1]], [0, -1.0])
X = torch.full((4, 2), 0.4)  # class 0 for both models
Y = torch.zeros(4, dtype=torch.long)


def _hand_sources() -> dict[str, torch.Tensor]:
    # A's examples raise x0 to 0.7 (A: 1; B: 0.7 + 0.4 > 1 -> 1), on examples 0-2: they fool both.
    # B's raise x1 to 0.7 (B: 1; A: x0 still 0.4 -> 0), on examples 0-1: they fool B only.
    xa, xb = X.clone(), X.clone()
    xa[:3, 0] = 0.7
    xb[:2, 1] = 0.7
    return {"A": xa, "B": xb}


def test_matrix_of_two_known_models_by_hand():
    m = transfer_matrix(_hand_sources(), {"A": MODEL_A, "B": MODEL_B}, X, Y, noise=())
    assert list(m.rates.index) == ["clean", "A", "B"]
    assert list(m.rates.columns) == ["A", "B", DISTORTION]
    assert m.n == 4
    assert m.errors.loc["clean"].tolist() == [0, 0]
    assert m.errors.loc["A"].tolist() == [3, 3]  # A's examples transfer to B
    assert m.errors.loc["B"].tolist() == [0, 2]  # B's do not transfer to A
    assert m.rates.loc["A", "B"] == 0.75 and m.rates.loc["B", "A"] == 0.0 and m.rates.loc["B", "B"] == 0.5
    # Av. distortion: mean over examples of ||delta||_2 / sqrt(d); a changed example: 0.3 / sqrt(2)
    one = 0.3 / math.sqrt(2)
    assert m.rates.loc["clean", DISTORTION] == 0
    assert m.rates.loc["A", DISTORTION] == pytest.approx(3 * one / 4, rel=1e-6)
    assert m.rates.loc["B", DISTORTION] == pytest.approx(2 * one / 4, rel=1e-6)


def test_diagonal_is_the_white_box_error_rate(digits_test, digits_mlp, digits_cnn):
    x, y = digits_test.x[:60], digits_test.y[:60]
    threat = ThreatModel(eps=0.1)
    models = {"mlp": digits_mlp, "cnn": digits_cnn}
    results = {k: ATTACKS.create("pgd", steps=5)(m, x, y, threat, generator=torch.Generator().manual_seed(0))
               for k, m in models.items()}
    m = transfer_matrix({k: r.x_adv for k, r in results.items()}, models, x, y, noise=(), batch_size=7)
    for k, r in results.items():
        assert m.errors.loc[k, k] == int((r.pred_adv != y).sum())
        assert m.rates.loc[k, DISTORTION] == pytest.approx(float(((r.x_adv - x).pow(2).mean(dim=(1, 2, 3))).sqrt().mean()))
    assert m.errors.loc["cnn", "mlp"] == int((digits_mlp(results["cnn"].x_adv).argmax(1) != y).sum())


def test_noise_rows_match_each_examples_std():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(3, 1, 64, 64, generator=g) * torch.tensor([0.01, 0.05, 0.2]).view(3, 1, 1, 1)
    noise = gaussian_like(delta, torch.Generator().manual_seed(1))
    assert torch.allclose(rms(noise), rms(delta), rtol=0.05)
    assert not torch.allclose(noise, delta)
    assert torch.equal(noise, gaussian_like(delta, torch.Generator().manual_seed(1)))  # seeded
    u = uniform_like(delta, torch.Generator().manual_seed(1))
    radius = delta.flatten(1).abs().amax(1)
    assert (u.flatten(1).abs().amax(1) <= radius).all() and (u.flatten(1).abs().amax(1) > 0.99 * radius).all()
    # in the matrix (wide bounds: no clipping), the Gaussian row's distortion is the source's
    x = torch.full((3, 1, 64, 64), 0.5)
    target = nn.Sequential(nn.Flatten(), nn.Linear(64 * 64, 2))
    m = transfer_matrix({"s": x + delta}, {"t": target}, x, torch.zeros(3, dtype=torch.long), bounds=(-10, 10),
                        noise_stds=(0.1,), seed=3)
    assert list(m.rates.index) == ["clean", "s", "gaussian[s]", "uniform[s]", "gaussian(std=0.1)"]
    d = m.rates[DISTORTION]
    assert d["gaussian[s]"] == pytest.approx(d["s"], rel=0.05)
    assert d["gaussian(std=0.1)"] == pytest.approx(0.1, rel=0.05)
    again = transfer_matrix({"s": x + delta}, {"t": target}, x, torch.zeros(3, dtype=torch.long), bounds=(-10, 10),
                            noise_stds=(0.1,), seed=3)
    assert again.rates.equals(m.rates)


def test_amplification_reaches_the_std_and_is_clipped():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 1, 8, 8, generator=g)
    delta = (torch.rand(x.shape, generator=g) - 0.5) * 0.02
    delta[4] = 0  # a zero perturbation stays zero
    amp = amplify(delta, 0.1)
    assert torch.allclose(rms(amp[:4]), torch.full((4,), 0.1, dtype=torch.float64))
    assert torch.equal(amp[4], delta[4])
    target = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    m = transfer_matrix({"s": x + delta}, {"t": target}, x, torch.zeros(5, dtype=torch.long), noise=(),
                        amplify_to=(0.1,))
    assert list(m.rates.index) == ["clean", "s", "s amplified to std=0.1"]
    clipped = (x + amp).clamp(0, 1)
    assert m.rates.loc["s amplified to std=0.1", DISTORTION] == pytest.approx(float(rms(clipped - x).mean()))
    assert m.rates.loc["s amplified to std=0.1", DISTORTION] <= 0.1 * 4 / 5 + 1e-9


def test_matrix_rejects_bad_inputs():
    with pytest.raises(ConfigError, match="target"):
        transfer_matrix({"A": X}, {}, X, Y)
    with pytest.raises(ConfigError, match="shape"):
        transfer_matrix({"A": X[:2]}, {"A": MODEL_A}, X, Y)
    with pytest.raises(ConfigError, match="noise"):
        transfer_matrix({"A": X}, {"A": MODEL_A}, X, Y, noise=("salt",))


# ---------------------------------------------------------------------- the attack
class Guarded(nn.Module):
    """Counts forward passes; raises while ``armed`` (the attack phase)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls = 0
        self.armed = False

    def forward(self, x):  # type: ignore[override]
        if self.armed:
            raise AssertionError("the transfer attack queried the target")
        self.calls += 1
        return self.model(x)


def test_transfer_handle_gives_no_access(digits_cnn):
    handle = handle_for(digits_cnn, ThreatModel(eps=0.1, knowledge="transfer"), 3)
    assert isinstance(handle, NoAccess) and not hasattr(handle, "model")
    with pytest.raises(UnsupportedThreatError, match="no access"):
        handle(torch.zeros(3, 1, 8, 8))


def test_transfer_never_queries_the_target_and_equals_source_attack_then_audit(digits_test, digits_cnn):
    x, y = digits_test.x[:40], digits_test.y[:40]
    threat = ThreatModel(eps=0.1, knowledge="transfer")
    attack = ATTACKS.create("transfer", source=SOURCE, attack=PGD)
    target = Guarded(digits_cnn)
    inner = attack._inner

    def armed_inner(*args, **kwargs):
        target.armed = True
        try:
            return inner(*args, **kwargs)
        finally:
            target.armed = False

    attack._inner = armed_inner
    res = attack(target, x, y, threat, generator=torch.Generator().manual_seed(0))
    assert target.calls == 2  # the base class's clean pass and the audit, nothing from the attack
    assert res.n_queries == 0 and res.n_forward == 5 * 40 and res.n_backward == 5 * 40  # the source's passes, per example
    # the same as the source attack run white-box on the source, audited on the target
    white = ThreatModel(eps=0.1)
    src = ATTACKS.create("pgd", steps=5)(attack.source_model(), x, y, white, generator=torch.Generator().manual_seed(0))
    assert torch.equal(res.x_adv, src.x_adv)
    report = audit(digits_cnn, x, src.x_adv, y, threat, None)
    assert torch.equal(res.success, report.success) and torch.equal(res.pred_adv, report.pred_adv)
    assert res.valid.all() and res.distances.max() <= 0.1 + 1e-6
    assert 0 < int(res.success.sum()) < int(src.success.sum())  # it transfers, less than white-box


def test_transfer_params_and_threats():
    attack = ATTACKS.create("transfer", source={"name": "digits-mlp"}, attack={"name": "pgd", "params": {"steps": 5}})
    assert attack.params() == {"source": {"name": "digits-mlp"}, "attack": PGD}
    again = ATTACKS.create("transfer", **attack.params())
    assert again.params() == attack.params() and again.norms == attack.norms
    assert ATTACKS.create("transfer", source="digits-mlp").params()["attack"] == {"name": "pgd"}
    assert attack.supports(ThreatModel(eps=0.1, knowledge="transfer")) is None
    assert attack.supports(ThreatModel(eps=0.1)) is not None  # white-box threat: not this attack's
    assert attack.supports(ThreatModel(eps=0.1, knowledge="transfer", targeting="least_likely")) is not None
    with pytest.raises(ConfigError, match="white-box"):
        ATTACKS.create("transfer", source=SOURCE, attack={"name": "onepixel"})
    with pytest.raises(ConfigError):
        ATTACKS.create("transfer", source={"file": "x.pt"})  # no name
    with pytest.raises(ConfigError):
        ATTACKS.create("transfer", source=SOURCE, attack={"name": "pgd", "stepz": 3})


def test_transfer_runs_in_evaluate_and_the_worst_case(tmp_path):
    cfg = parse_config({
        "seed": 0,
        "device": "cpu",
        "data": {"name": "digits", "n": 60},
        "models": ["digits-cnn"],
        "threats": [{"norm": "linf", "eps": [0.1], "knowledge": "transfer"}],
        "attacks": [{"name": "transfer", "source": {"name": "digits-mlp"}, "attack": PGD, "label": "from-mlp"},
                    {"name": "transfer", "source": {"name": "digits-cnn"}, "attack": PGD, "label": "from-cnn"}],
    })
    t = evaluate(cfg, tmp_path, progress=False).table.set_index("attack")
    assert list(t.index) == ["from-mlp", "from-cnn", "worst-case"]
    assert (t.knowledge == "transfer").all() and (t.n_queries == 0).all()
    assert t.loc["from-mlp", "robust_accuracy"] < t.loc["from-mlp", "clean_accuracy"]
    # a "source" that is the target itself is the white-box attack: it beats the transfer
    assert t.loc["from-cnn", "robust_accuracy"] < t.loc["from-mlp", "robust_accuracy"]
    assert t.loc["worst-case", "robust_accuracy"] <= t.loc["from-cnn", "robust_accuracy"]
