"""The reference zoo: architectures, first-use training, the weight cache and the model cards."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from advbench.data.base import ImageData
from advbench.errors import UnknownNameError
from advbench.zoo import reference as zoo
from advbench.defenses.base import DefendedModel, adaptive, needs_adaptive
from advbench.models.architectures import classifier_of
from advbench.models.layers import Normalize
from advbench.registry import MODELS

ZOO_NAMES = ["digits-mlp", "digits-cnn", "mnist-cnn", "cifar10-cnn", "digits-cnn-madry", "digits-cnn-fast",
             "digits-cnn-trades", "digits-cnn-distillation", "digits-cnn-thermometer"]
DEFENDED = ["digits-cnn-madry", "digits-cnn-fast", "digits-cnn-trades", "digits-cnn-distillation", "digits-cnn-thermometer"]
DIGITS = ["digits-mlp", "digits-cnn"]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private, empty advbench cache for one test, the shipped checkpoints turned off (the
    training and cache machinery is what these tests exercise)."""
    monkeypatch.setenv("ADVBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(zoo.SHIPPED_ENV, "0")
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory) -> Path:
    """One cache in which both digits models are trained once, shared by this module's tests."""
    path = tmp_path_factory.mktemp("zoo-cache")
    old = {k: os.environ.get(k) for k in ("ADVBENCH_CACHE", zoo.SHIPPED_ENV)}
    os.environ["ADVBENCH_CACHE"] = str(path)
    os.environ[zoo.SHIPPED_ENV] = "0"
    try:
        for name in DIGITS:
            MODELS.create(name)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return path


@pytest.fixture
def use_digits_cache(digits_cache, monkeypatch) -> Path:
    monkeypatch.setenv("ADVBENCH_CACHE", str(digits_cache))
    monkeypatch.setenv(zoo.SHIPPED_ENV, "0")
    return digits_cache


# ---------------------------------------------------------------------------- shipped reference checkpoints
SHIPPED = {"digits-mlp": None, "digits-cnn": None, "mnist-cnn": str(Path(__file__).resolve().parents[2] / "shared" / "data"),
           "cifar10-cnn": None, **dict.fromkeys(DEFENDED)}


@pytest.mark.parametrize("name", list(SHIPPED))
def test_reference_checkpoints_are_shipped_and_used_without_training(name, tmp_path, monkeypatch):
    """Every machine evaluates the same weights: the zoo loads the checkpoint in the package (with
    its card) instead of training, and the card's accuracy is the loaded weights' own."""
    monkeypatch.setenv("ADVBENCH_CACHE", str(tmp_path / "empty"))
    monkeypatch.delenv(zoo.SHIPPED_ENV, raising=False)

    def fail(*args, **kwargs):
        raise AssertionError("a shipped model was trained")

    monkeypatch.setattr(zoo, "_train", fail)
    root = SHIPPED[name] if name != "cifar10-cnn" else None
    path = zoo.shipped_path(name, root)
    assert path is not None and path.parent == zoo.SHIPPED_DIR
    assert path.stat().st_size < 1_000_000
    model = MODELS.create(name, **({"root": root} if root else {}))
    card = json.loads(path.with_suffix(".json").read_text())
    assert model.advbench_card == card and zoo.model_card(name, root) == card
    sd = torch.load(path, map_location="cpu", weights_only=True)
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    assert not (tmp_path / "empty").exists()  # nothing trained, nothing written


@pytest.mark.parametrize("name", DIGITS)
def test_shipped_digits_cards_measure_the_shipped_weights(name, digits_test, monkeypatch):
    monkeypatch.delenv(zoo.SHIPPED_ENV, raising=False)
    model = MODELS.create(name)
    with torch.no_grad():
        correct = int((model(digits_test.x).argmax(1) == digits_test.y).sum())
    assert correct == model.advbench_card["eval_correct"]


@pytest.mark.parametrize("name", DIGITS)
def test_training_from_the_recipe_reaches_the_shipped_accuracy(name, cache):
    """The tolerant check: retrained here (maybe another CPU than the one that made the shipped
    weights, so not bit for bit), the recipe reaches the shipped card's clean accuracy within 2
    points. The regression gate never depends on it."""
    shipped, fresh = zoo.verify_recipe(name, tolerance=0.02)
    assert abs(shipped - fresh) <= 0.02 and shipped >= 0.95


# ---------------------------------------------------------------------------- architectures
def test_zoo_is_registered():
    assert set(ZOO_NAMES) <= set(MODELS.list())
    assert zoo.zoo_names() == sorted(ZOO_NAMES)


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_architecture_gives_logits(name):
    spec = zoo.ZOO[name]
    model = MODELS.create(name, pretrained=False)
    assert not model.training
    # normalization inside: [0, 1] input (behind an encoding's stages, the classifier's first layer)
    assert isinstance(next(iter(classifier_of(model).children())), Normalize)
    x = torch.rand(3, *spec.input_shape, requires_grad=True)
    out = adaptive(model)(x)  # the BPDA view of a non-differentiable encoding; the model itself otherwise
    assert out.shape == (3, 10) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert torch.equal(out, model(x))  # BPDA's forward is the real model's
    out.sum().backward()  # differentiable w.r.t. the input, as white-box attacks need
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_the_thermometer_model_ships_as_its_deployed_encoding(digits_test, monkeypatch):
    """A zoo recipe that deploys a defense stage ships the whole deployed model: the real
    (non-differentiable) 16-level thermometer code in front of a classifier on 16 channels, so
    the evaluator sees the stage, attacks it naively and through BPDA, and its card's accuracy is
    the encoded model's own."""
    monkeypatch.delenv(zoo.SHIPPED_ENV, raising=False)
    model = MODELS.create("digits-cnn-thermometer")
    assert isinstance(model, DefendedModel) and needs_adaptive(model) and not model.differentiable
    assert [type(s).__name__ for s in model.stages] == ["Thermometer"] and model.stages[0].levels == 16
    assert model.classifier.conv1.in_channels == 16
    card = model.advbench_card
    assert card["recipe"]["method"] == "thermometer" and card["normalization"] == {"mean": [0.5], "std": [0.5]}
    assert card["architecture"].startswith("Thermometer(levels=16) -> CNN")
    x = digits_test.x.clone().requires_grad_(True)
    logits = model(x)
    assert int((logits.argmax(1) == digits_test.y).sum()) == card["eval_correct"] and card["clean_accuracy"] > 0.95
    logits.sum().backward()  # the real code is piecewise constant: no input gradient reaches x
    assert x.grad is None or not x.grad.any()


def test_an_encoding_recipe_round_trips_through_the_cache(cache, monkeypatch):
    """Trained on a miss (one epoch here), saved, and loaded back into the same deployed module tree."""
    spec = zoo.ZOO["digits-cnn-thermometer"]
    monkeypatch.setitem(zoo.ZOO, spec.name, dataclasses.replace(spec, recipe=dataclasses.replace(spec.recipe, epochs=1)))
    trained = MODELS.create(spec.name)
    monkeypatch.setattr(zoo, "_train", lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained twice")))
    loaded = MODELS.create(spec.name)
    assert isinstance(loaded, DefendedModel) and loaded.advbench_card == trained.advbench_card
    x = torch.rand(5, *spec.input_shape)
    assert torch.equal(trained(x), loaded(x))


def test_unknown_zoo_name_suggests():
    with pytest.raises(UnknownNameError, match="digits-cnn"):
        zoo.get_spec("digits-cn")


def test_untrained_build_is_seeded():
    a, b = zoo.build("digits-cnn"), zoo.build("digits-cnn")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    c = zoo.build("digits-cnn", seed=123)
    assert not torch.equal(a.state_dict()["conv1.weight"], c.state_dict()["conv1.weight"])


def test_recipe_hash_tracks_the_recipe():
    r = zoo.ZOO["digits-mlp"].recipe
    h = zoo.recipe_hash("digits-mlp", r)
    assert len(h) == 12 and h == zoo.recipe_hash("digits-mlp", dataclasses.replace(r))
    assert h != zoo.recipe_hash("digits-mlp", dataclasses.replace(r, lr=r.lr * 2))
    assert h != zoo.recipe_hash("digits-cnn", r)


# ---------------------------------------------------------------------------- digits: train, cache, card
@pytest.mark.parametrize("name", DIGITS)
def test_digits_model_card_and_accuracy(name, use_digits_cache, digits_test):
    card = zoo.model_card(name)
    spec = zoo.ZOO[name]
    assert card["name"] == name and card["dataset"] == "digits"
    assert (card["train_split"], card["eval_split"]) == ("train", "test")
    assert (card["train_size"], card["eval_size"]) == (1437, 360)
    assert card["clean_accuracy"] >= 0.95
    assert card["clean_accuracy"] == card["eval_correct"] / card["eval_size"]
    assert card["seed"] == spec.recipe.seed and card["recipe"] == spec.recipe.to_dict()
    assert card["torch_version"] == torch.__version__
    assert 0 < card["train_seconds"] < 30
    assert card["input_shape"] == list(spec.input_shape)
    # the files are where the docs say, the card on disk is the card returned
    pt = use_digits_cache / "models" / f"{name}-{card['recipe_hash']}.pt"
    assert pt.is_file() and card["weights_file"] == pt.name
    assert json.loads(pt.with_suffix(".json").read_text()) == card
    # the accuracy is re-measured from the loaded weights, not copied
    model = MODELS.create(name)
    assert not model.training
    assert card["param_count"] == sum(p.numel() for p in model.parameters())
    correct = int((model(digits_test.x).argmax(1) == digits_test.y).sum())
    assert correct == card["eval_correct"]
    # the state dict on disk loads with weights_only=True and matches the model
    sd = torch.load(pt, map_location="cpu", weights_only=True)
    for k, v in model.state_dict().items():
        assert torch.equal(sd[k], v)


@pytest.mark.parametrize("name", DIGITS)
def test_second_call_loads_from_cache_without_training(name, use_digits_cache, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the cached model was trained again")

    monkeypatch.setattr(zoo, "_train", fail)
    a = MODELS.create(name)
    b = MODELS.create(name)
    x = torch.rand(4, *zoo.ZOO[name].input_shape)
    assert torch.equal(a(x), b(x))
    assert a.advbench_card["name"] == name


def test_training_is_deterministic(digits_cache, digits_train):
    """Same seed, same weights: a fresh training run reproduces the cached one bit for bit."""
    model, card = zoo.train_zoo_model("digits-mlp", save=False)
    cached = torch.load(digits_cache / "models" / card.weights_file, map_location="cpu", weights_only=True)
    for k, v in model.state_dict().items():
        assert torch.equal(cached[k], v), k


def test_training_leaves_global_rng_and_threads_alone(cache, monkeypatch):
    tiny = dataclasses.replace(zoo.ZOO["digits-mlp"], recipe=dataclasses.replace(zoo.ZOO["digits-mlp"].recipe, epochs=1))
    monkeypatch.setitem(zoo.ZOO, "digits-mlp", tiny)
    threads = torch.get_num_threads()
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    zoo.load_zoo_model("digits-mlp")
    assert torch.equal(torch.rand(3), expected)
    assert torch.get_num_threads() == threads


# ---------------------------------------------------------------------------- cache machinery (no real CIFAR training)
@pytest.fixture
def tiny_cifar(cache, monkeypatch):
    """cifar10-cnn with a one-epoch recipe on 64 random 3x32x32 images (the real data is never read)."""
    spec = zoo.ZOO["cifar10-cnn"]
    monkeypatch.setitem(
        zoo.ZOO, "cifar10-cnn", dataclasses.replace(spec, recipe=dataclasses.replace(spec.recipe, epochs=1, batch_size=16))
    )
    loads = []

    def fake_split(recipe, split, root):
        loads.append((recipe.dataset, split, root))
        g = torch.Generator().manual_seed(0 if split == "train" else 1)
        n = 64 if split == "train" else 32
        return ImageData(
            torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g),
            tuple(str(i) for i in range(10)), "fake-cifar10", split,
        )

    monkeypatch.setattr(zoo, "_load_split", fake_split)
    return loads


def test_cifar_cache_and_card_machinery(tiny_cifar, cache):
    model = MODELS.create("cifar10-cnn", root="/some/data")
    assert tiny_cifar == [("cifar10", "train", "/some/data"), ("cifar10", "test", "/some/data")]
    card = zoo.model_card("cifar10-cnn")
    assert (card["train_split"], card["eval_split"], card["train_size"], card["eval_size"]) == ("train", "test", 64, 32)
    assert card["recipe"]["epochs"] == 1 and card["recipe"]["augmentation"] == "crop-4+hflip"
    files = sorted(p.name for p in (cache / "models").iterdir() if not p.name.endswith(".lock"))
    assert files == [f"cifar10-cnn-{card['recipe_hash']}.json", f"cifar10-cnn-{card['recipe_hash']}.pt"]
    assert not [p for p in (cache / "models").iterdir() if p.name.endswith(".tmp")]
    again = MODELS.create("cifar10-cnn")
    assert len(tiny_cifar) == 2  # loaded from cache: no data read, no training
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(model(x), again(x))


def test_changed_recipe_trains_a_new_entry(tiny_cifar, cache, monkeypatch):
    MODELS.create("cifar10-cnn")
    spec = zoo.ZOO["cifar10-cnn"]
    monkeypatch.setitem(zoo.ZOO, "cifar10-cnn", dataclasses.replace(spec, recipe=dataclasses.replace(spec.recipe, lr=0.02)))
    MODELS.create("cifar10-cnn")
    assert len(tiny_cifar) == 4
    assert len(list((cache / "models").glob("cifar10-cnn-*.pt"))) == 2


def test_damaged_cache_is_retrained(tiny_cifar, cache):
    MODELS.create("cifar10-cnn")
    pt = next((cache / "models").glob("cifar10-cnn-*.pt"))
    pt.write_bytes(b"not a checkpoint")
    with pytest.warns(RuntimeWarning, match="unreadable cached model"):
        MODELS.create("cifar10-cnn")
    assert len(tiny_cifar) == 4
    torch.load(pt, weights_only=True)  # rewritten whole


def test_weights_without_card_are_not_trusted(tiny_cifar, cache):
    MODELS.create("cifar10-cnn")
    next((cache / "models").glob("cifar10-cnn-*.json")).unlink()  # as if the writer died before the card
    MODELS.create("cifar10-cnn")
    assert len(tiny_cifar) == 4


def test_two_processes_share_one_training(tmp_path):
    """Two processes asking for the same model at once: one trains, the other waits and loads."""
    code = (
        "import dataclasses, sys\n"
        "from advbench.zoo import reference as zoo\n"
        "s = zoo.ZOO['digits-mlp']\n"
        "zoo.ZOO['digits-mlp'] = dataclasses.replace(s, recipe=dataclasses.replace(s.recipe, epochs=3))\n"
        "calls = []\n"
        "orig = zoo._train\n"
        "zoo._train = lambda *a, **k: calls.append(1) or orig(*a, **k)\n"
        "m = zoo.load_zoo_model('digits-mlp')\n"
        "print(len(calls), float(m[-1].weight.sum()))\n"
    )
    env = dict(os.environ, ADVBENCH_CACHE=str(tmp_path / "cache"), ADVBENCH_DISABLE_PLUGIN_AUTOLOAD="1")
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(int(o[0]) for o in outs) == [0, 1]
    assert outs[0][1] == outs[1][1]


# ---------------------------------------------------------------------------- MNIST on the shared test split
MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.slow
def test_mnist_cnn_trains_on_test_train_split(cache):
    """About 15 s on one core: 4 epochs over the 8,000 ``test-train`` digits, >= 97% on ``test-eval``."""
    if not (MNIST_DIR / "mnist" / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST test files not found under {MNIST_DIR}")
    model = MODELS.create("mnist-cnn", root=str(MNIST_DIR))
    card = zoo.model_card("mnist-cnn", root=str(MNIST_DIR))
    shipped = json.loads(zoo.SHIPPED_DIR.joinpath(card["weights_file"]).with_suffix(".json").read_text())
    assert abs(card["clean_accuracy"] - shipped["clean_accuracy"]) <= 0.01  # the recipe still reaches it
    assert (card["train_split"], card["eval_split"]) == ("test-train", "test-eval")
    assert (card["train_size"], card["eval_size"]) == (8000, 2000)
    assert "test-train" in card["data_note"]
    assert card["clean_accuracy"] >= 0.97
    assert card["train_seconds"] < 60
    from advbench.registry import DATASETS

    data = DATASETS.create("mnist", split="test-eval", root=str(MNIST_DIR))
    with torch.no_grad():
        correct = sum(int((model(data.x[i : i + 500]).argmax(1) == data.y[i : i + 500]).sum()) for i in range(0, len(data), 500))
    assert correct == card["eval_correct"]


def test_mnist_uses_the_real_training_set_when_present(tmp_path):
    (tmp_path / "mnist").mkdir()
    assert zoo.select_recipe("mnist-cnn", str(tmp_path))[0].train_split == "test-train"
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        (tmp_path / "mnist" / stem).write_bytes(b"")
    recipe, note = zoo.select_recipe("mnist-cnn", str(tmp_path))
    assert (recipe.train_split, recipe.eval_split) == ("train", "test") and "official" in note
