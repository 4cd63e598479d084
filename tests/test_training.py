"""Training defended models: the loop, resume, the recipes' math, saving/loading, ``advbench train``."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from advbench import cli
from advbench.errors import ConfigError
from advbench.training import (
    load_train_config,
    load_trained,
    make_recipe,
    parse_train_config,
    perturb,
    train,
    trained_dir,
)
from advbench.training.recipes import Phase, soft_labels
from advbench.models.trained import CHECKPOINT

TINY = {
    "name": "tiny",
    "architecture": "digits-cnn",
    "data": {"name": "digits", "split": "train", "n": 192},
    "eval": {"split": "test", "n": 60, "eps": 0.1, "steps": 3},
    "recipe": {"name": "plain"},
    "epochs": 2,
    "batch_size": 64,
    "lr": 3e-3,
    "seed": 0,
}


def _config(**over):
    return parse_train_config({**TINY, **over})


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ADVBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def digits_batch():
    from advbench.data.digits import load_digits

    data = load_digits("test")
    return data.x[:64], data.y[:64]


# ---------------------------------------------------------------------------- the loop
def test_the_loop_is_deterministic_for_a_seed(tmp_path, monkeypatch):
    cfg = _config(recipe={"name": "madry", "eps": 0.1, "steps": 2}, augmentation="shift-2")
    runs = []
    for i, c in enumerate([cfg, cfg, _config(recipe={"name": "madry", "eps": 0.1, "steps": 2}, augmentation="shift-2", seed=1)]):
        monkeypatch.setenv("ADVBENCH_CACHE", str(tmp_path / f"c{i}"))
        rng = torch.get_rng_state()
        runs.append(_weights(train(c, progress=False).model))
        assert torch.equal(rng, torch.get_rng_state())  # the caller's global RNG is left alone
    assert _same(runs[0], runs[1])
    assert not _same(runs[0], runs[2])


@pytest.mark.parametrize(
    "over, stop_after",
    [
        ({"recipe": {"name": "madry", "eps": 0.1, "steps": 2}, "schedule": "onecycle", "epochs": 3}, 1),
        # stops exactly at the end of the teacher phase: the resumed run must label with that teacher
        ({"recipe": {"name": "distillation", "temperature": 20, "teacher_epochs": 2}, "epochs": 1}, 2),
    ],
    ids=["madry-onecycle", "distillation-phase-boundary"],
)
def test_resume_after_an_interruption_gives_the_uninterrupted_weights(tmp_path, monkeypatch, over, stop_after):
    cfg = _config(**over)
    monkeypatch.setenv("ADVBENCH_CACHE", str(tmp_path / "straight"))
    straight = _weights(train(cfg, progress=False).model)
    assert not (trained_dir("tiny") / CHECKPOINT).exists()  # removed once the card is written

    monkeypatch.setenv("ADVBENCH_CACHE", str(tmp_path / "interrupted"))
    first = train(cfg, progress=False, stop_after_epochs=stop_after)
    assert first.stopped and first.card is None and (trained_dir("tiny") / CHECKPOINT).is_file()
    with pytest.raises(ConfigError, match="advbench train CONFIG"):
        load_trained("tiny")  # not finished: no card, not loadable
    second = train(cfg, progress=False)
    assert second.resumed_from is not None and second.card is not None
    assert _same(straight, _weights(second.model))
    assert len(second.card["history"]) == sum(p["epochs"] for p in second.card["phases"])
    assert train(cfg, progress=False).skipped  # done: a rerun trains nothing


def test_a_checkpoint_of_another_config_is_not_resumed(cache):
    assert train(_config(epochs=3), progress=False, stop_after_epochs=1).stopped
    r = train(_config(epochs=3, lr=1e-3), progress=False)
    assert r.resumed_from is None and r.card["optimizer"]["lr"] == 1e-3


# ---------------------------------------------------------------------------- recipes
def _model() -> nn.Module:
    from advbench.models.architectures import build_classifier

    return build_classifier("digits-cnn", seed=0).eval()


@pytest.mark.parametrize(
    "name, params",
    [
        ("madry", {"eps": 0.1, "steps": 10}),
        ("fast", {"eps": 0.1}),
        ("trades", {"eps": 0.1, "steps": 5}),
    ],
)
def test_adversarial_batches_lie_in_the_ball_and_raise_the_loss(digits_batch, name, params):
    x, y = digits_batch
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(30):  # a few steps of plain training, so that the loss surface is not flat
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    recipe = make_recipe(name, params)
    x_adv = recipe.inputs(model, x, y, torch.Generator().manual_seed(0))
    assert float((x_adv - x).abs().max()) <= 0.1 + 1e-6
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    with torch.no_grad():
        clean, adv = F.cross_entropy(model(x), y), F.cross_entropy(model(x_adv), y)
    assert float(adv) > 2 * float(clean)
    assert torch.isfinite(recipe.loss(Phase("train", 1), model, x, y, torch.Generator().manual_seed(0)))


def test_fast_steps_1_25_eps_from_a_uniform_start(digits_batch):
    x, y = digits_batch
    model, eps = _model(), 0.1
    recipe = make_recipe("fast", {"eps": eps})
    assert recipe.alpha() == pytest.approx(1.25 * eps)
    start = perturb.uniform_start(x, eps, torch.Generator().manual_seed(3))
    noise = start - x
    inside = (x > eps) & (x < 1 - eps)  # where the box does not clip the start
    assert float(noise.abs().max()) <= eps + 1e-7
    assert float(noise[inside].std()) == pytest.approx(eps / math.sqrt(3), rel=0.1)  # U(-eps, eps)
    x_adv = recipe.inputs(model, x, y, torch.Generator().manual_seed(3))  # the same start
    x0 = start.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x0), y, reduction="sum"), x0)
    expected = torch.min(torch.max(start + 1.25 * eps * grad.sign(), (x - eps).clamp(min=0)), (x + eps).clamp(max=1))
    assert torch.allclose(x_adv, expected, atol=1e-6)
    # where neither the ball nor the box clips, the step is exactly 1.25 eps from the start
    free = (start + 1.25 * eps * grad.sign() - x).abs() <= eps
    free &= (start + 1.25 * eps * grad.sign() >= 0) & (start + 1.25 * eps * grad.sign() <= 1) & (grad != 0)
    assert free.any()
    assert torch.allclose((x_adv - start)[free].abs(), torch.full_like(x_adv[free], 1.25 * eps), atol=1e-6)


def test_distillation_soft_labels_are_the_teachers_softmax_at_T():
    teacher = nn.Linear(2, 3)
    with torch.no_grad():
        teacher.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 1.0]]))
        teacher.bias.copy_(torch.tensor([0.0, 1.0, 0.5]))
    x = torch.tensor([[3.0, 1.0], [0.0, 0.0]])
    t = 2.0
    labels = soft_labels(teacher, x, t)
    # by hand: logits (3, 3, -1.5) and (0, 1, 0.5), divided by T = 2, then softmax
    for row, logits in zip(labels, [(3.0, 3.0, -1.5), (0.0, 1.0, 0.5)]):
        e = [math.exp(z / t) for z in logits]
        assert row.tolist() == pytest.approx([v / sum(e) for v in e], rel=1e-6)
    assert torch.allclose(labels.sum(1), torch.ones(2))
    recipe = make_recipe("distillation", {"temperature": t})
    y = torch.tensor([0, 1])
    assert recipe.p.temperature == t and make_recipe("distillation").p.temperature == 100
    with torch.no_grad():
        teacher_loss = recipe.loss(Phase("teacher", 1), teacher, x, y, None)
        assert float(teacher_loss) == pytest.approx(float(F.cross_entropy(teacher(x) / t, y)), rel=1e-6)
        student_loss = recipe.loss(Phase("student", 1), teacher, x, labels, None)
        expected = -(labels * F.log_softmax(teacher(x) / t, dim=1)).sum(1).mean()
        assert float(student_loss) == pytest.approx(float(expected), rel=1e-6)


def test_the_distilled_student_is_deployed_at_T_1(cache, digits_batch):
    x, _ = digits_batch
    t = 50
    cfg = _config(data={"name": "digits", "split": "train"}, epochs=3, lr=1e-2,
                  recipe={"name": "distillation", "temperature": t})
    r = train(cfg, progress=False)
    assert [p["name"] for p in r.card["phases"]] == ["teacher", "student"]
    assert r.card["clean_accuracy"] > 0.8
    loaded = load_trained("tiny")
    assert type(loaded) is nn.Sequential and [n for n, _ in loaded.named_children()] == [
        n for n, _ in _model().named_children()
    ]  # the zoo architecture itself: no temperature layer
    with torch.no_grad():
        assert torch.equal(loaded(x), r.model(x))
        # raw logits: trained on logits / T, so at T = 1 the softmax saturates (Papernot et al.)
        p1, p_t = F.softmax(loaded(x), 1).amax(1).mean(), F.softmax(loaded(x) / t, 1).amax(1).mean()
    assert float(p1) > 0.99 and float(p1) > float(p_t) + 0.05
    assert "T = 1" in r.card["deployment"]


def test_the_thermometer_model_saves_and_loads_as_a_defended_model(cache, digits_batch):
    from advbench.defenses.base import DefendedModel, needs_adaptive
    from advbench.defenses.thermometer import Thermometer
    from advbench.loading import load_model

    x, _ = digits_batch
    r = train(_config(recipe={"name": "thermometer", "levels": 4}), progress=False)
    for model in (load_trained("tiny"), load_model({"name": "x", "trained": "tiny"})):
        assert isinstance(model, DefendedModel) and needs_adaptive(model)
        assert len(model.stages) == 1 and isinstance(model.stages[0], Thermometer) and model.stages[0].levels == 4
        assert model.classifier.conv1.in_channels == 4  # 1 channel x 4 levels
        with torch.no_grad():
            assert torch.equal(model(x), r.model(x))
    assert r.card["stages"] == [{"name": "thermometer", "params": {"levels": 4}}]
    assert r.card["classifier_in_channels"] == 4
    # the card reports the naive number next to the adaptive (BPDA) one
    assert {"pgd", "pgd+bpda", "pgd-margin", "pgd-margin+bpda"} == set(r.card["robust"]["accuracy"])


def test_adversarial_thermometer_training_attacks_through_bpda(digits_batch):
    from advbench.defenses.base import DefendedModel
    from advbench.defenses.thermometer import Thermometer
    from advbench.models.architectures import build_classifier

    x, y = digits_batch
    model = DefendedModel([Thermometer(levels=8)], build_classifier("digits-cnn", seed=0, in_channels=8)).eval()
    recipe = make_recipe("thermometer", {"levels": 8, "adversarial": True, "eps": 0.1, "steps": 3})
    x_adv = recipe.inputs(model, x, y, torch.Generator().manual_seed(0))
    assert float((x_adv - x).abs().max()) <= 0.1 + 1e-6
    assert not torch.equal(x_adv, x)  # the BPDA gradient moved it (a naive gradient is zero)
    assert torch.equal(make_recipe("thermometer").inputs(model, x, y, None), x)  # default: not adversarial


# ---------------------------------------------------------------------------- robustness
def test_adversarial_training_raises_pgd_robust_accuracy(cache):
    # about 5 s; measured: plain 50% vs madry 80% PGD-10 robust accuracy at eps 0.1 on the 360 test digits
    base = {"data": {"name": "digits", "split": "train"}, "eval": {"split": "test", "eps": 0.1, "steps": 10}, "epochs": 8}
    plain = train(_config(**base, name="plain"), progress=False).card
    madry = train(_config(**base, name="madry", recipe={"name": "madry", "eps": 0.1, "steps": 5}), progress=False).card
    assert plain["clean_accuracy"] > 0.9 and madry["clean_accuracy"] > 0.9
    assert madry["robust_accuracy"] > plain["robust_accuracy"] + 0.2, (plain["robust"], madry["robust"])
    assert madry["robust"]["worst_case"] > plain["robust"]["worst_case"] + 0.2


# ---------------------------------------------------------------------------- the command line
def _write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


def test_advbench_train_then_evaluate_by_name(cache, tmp_path, capsys):
    cfg = _write(tmp_path, yaml.safe_dump({**TINY, "name": "from-file", "recipe": {"name": "fast", "eps": 0.1}}))
    assert cli.main(["train", cfg, "--out", "cli-model"]) == 0
    out = capsys.readouterr().out
    assert "clean accuracy" in out and "robust accuracy" in out and "trained: cli-model" in out
    card = yaml.safe_load((trained_dir("cli-model") / "card.json").read_text())
    assert card["name"] == "cli-model" and card["recipe"]["name"] == "fast"
    assert card["versions"]["torch"] and card["train_seconds"] > 0 and card["seed"] == 0
    assert yaml.safe_load((trained_dir("cli-model") / "config.yaml").read_text())["name"] == "cli-model"
    evaluate = _write(tmp_path, """
        device: cpu
        data: {name: digits, split: test, n: 20}
        models: [{name: mine, trained: cli-model}]
        threats: [{norm: linf, eps: [0.1]}]
        attacks: [fgsm]
    """, "e.yaml")
    assert cli.main(["evaluate", evaluate, "--out", str(tmp_path / "run"), "--quiet"]) == 0
    import pandas as pd

    table = pd.read_csv(tmp_path / "run" / "results.csv")
    assert set(table.model) == {"mine"} and (table.n == 20).all()


@pytest.mark.parametrize(
    "over, fragment",
    [
        ({"recipe": {"name": "madri", "eps": 0.1}}, "unknown recipe 'madri'"),
        ({"recipe": {"name": "madry", "eps": -1}}, "recipe 'madry': eps: eps must lie in (0, 1]"),
        ({"recipe": {"name": "madry"}}, "recipe 'madry': eps: Field required"),
        ({"recipe": {"name": "madry", "eps": 0.1, "stpes": 3}}, "unknown parameter(s) stpes; allowed: eps, steps"),
        ({"recipe": {"name": "thermometer", "adversarial": True}}, "adversarial: true needs eps"),
        ({"eval": {"split": "test"}}, "eval.eps is needed"),
        ({"eval": {"split": "train", "eps": 0.1}}, "overlaps the training split"),
        ({"data": {"name": "digits"}}, "data.split must be given"),
        ({"architecture": "digits-cnnn"}, "unknown architecture 'digits-cnnn'"),
        ({"epochs": 0}, "epochs: Input should be greater than or equal to 1"),
        ({"name": "../escape"}, "name must be"),
        ({"lr": "fast"}, "lr: Input should be a valid number"),
        ({"bogus": 1}, "bogus: unknown field"),
    ],
)
def test_bad_train_configs_are_one_line_errors_with_exit_2(cache, tmp_path, capsys, over, fragment):
    cfg = _write(tmp_path, yaml.safe_dump({**TINY, **over}))
    assert cli.main(["train", cfg, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and fragment in err, err


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("train-*.yaml")), ids=lambda p: p.name
)
def test_shipped_train_configs_are_valid(path):
    config = load_train_config(path)
    assert config.name == path.stem.removeprefix("train-") and config.hash()


def test_train_cli_usage_errors(tmp_path, capsys):
    assert cli.main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["train"])
    assert exc.value.code == 2


def test_a_missing_trained_model_is_a_one_line_error(cache, tmp_path, capsys):
    from advbench.config import ModelSpec
    from advbench.loading import load_model

    assert ModelSpec.model_validate({"name": "m", "trained": "nope"}).source == "trained"
    with pytest.raises(ValueError, match="several sources"):
        ModelSpec.model_validate({"name": "m", "trained": "nope", "file": "m.pt"})
    with pytest.raises(ConfigError, match=r"no trained model 'nope'.*advbench train CONFIG"):
        load_model({"name": "m", "trained": "nope"})
    evaluate = _write(tmp_path, """
        device: cpu
        data: {name: digits, split: test, n: 10}
        models: [{name: m, trained: nope}]
        threats: [{norm: linf, eps: [0.1]}]
        attacks: [fgsm]
    """)
    assert cli.main(["evaluate", evaluate, "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no trained model 'nope'" in err and "advbench train CONFIG" in err
