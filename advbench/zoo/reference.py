"""The reference models: the architectures of :mod:`advbench.models.architectures`, each with a
recipe the training loop (:mod:`advbench.training.loop`) runs, shipped trained, with a card.

=============== ========= =====================================
name            input     training data (reported accuracy on)
=============== ========= =====================================
``digits-mlp``  1x8x8     digits ``train`` (``test``)
``digits-cnn``  1x8x8     digits ``train`` (``test``)
``mnist-cnn``   1x28x28   mnist ``test-train`` (``test-eval``)
                          or ``train`` (``test``) if present
``cifar10-cnn`` 3x32x32   cifar10 ``train`` (``test``)
=============== ========= =====================================

(Each card records its training time and accuracy; the README's model table quotes them.)

Every registered factory has the signature ``(pretrained: bool = True, root: str | None =
None)`` and returns the model in eval mode, taking inputs in [0, 1] (normalization is its first
layer). ``root`` is the data root handed to the data set loader (MNIST and CIFAR-10 only).

With ``pretrained=True`` the weights are the **reference checkpoints shipped with the package**
(``advbench/zoo/weights/<name>-<hash>.pt``, a state dict read with ``torch.load(...,
weights_only=True)``, next to its card ``<name>-<hash>.json``), so every machine evaluates the
same weights: training is deterministic on one machine, not across CPUs, and a benchmark or a
regression gate that retrained its models would measure other models elsewhere. A recipe with no
shipped checkpoint (MNIST with the full training set at hand, say), or any recipe with
``ADVBENCH_ZOO_SHIPPED=0``, is looked up in the cache, ``cache_dir()/models/<name>-<hash>.pt``.
On a miss the model is trained by the training loop (the ``plain`` recipe with the zoo recipe's
optimizer, schedule and augmentation) on the CPU with one thread and a fixed seed (a rerun
reproduces the weights bit for bit on that machine), evaluated, and both files are written
atomically, the card last: a card on disk means its weights are complete. A lock file keeps two
processes from training the same model at once: the second waits and loads. The hash covers the
architecture version and the whole recipe, so changing either trains a fresh model instead of
loading a stale one. :func:`verify_recipe` retrains a shipped model from its recipe and compares
the clean accuracy it reaches with the shipped card's.

The card's clean accuracy is always measured on the evaluation split after training, never
written by hand; :func:`model_card` returns it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advbench.data.base import ImageData
from advbench.data.mnist import find_idx_pair
from advbench.data.paths import cache_dir, data_root
from advbench.defenses.base import DefendedModel
from advbench.errors import ConfigError, DataError, unknown_name
from advbench.files import atomic_write, file_lock
from advbench.models import architectures
from advbench.models.layers import Normalize, count_parameters
from advbench.registry import DATASETS, MODELS
from advbench.tensors import num_threads
from advbench.training.config import TrainConfig
from advbench.training.loop import AUGMENTATIONS, run_loop
from advbench.training.recipes import make_recipe

CARD_VERSION = 1


# ---------------------------------------------------------------------------- recipe and card
@dataclass(frozen=True)
class Recipe:
    """How a zoo model is trained: the data, the optimizer, the schedule, the seed."""

    dataset: str
    train_split: str
    eval_split: str
    epochs: int
    batch_size: int
    optimizer: str = "adam"  # "adam", "adamw" or "sgd" (momentum 0.9, Nesterov)
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "constant"  # "constant" or "onecycle" (25% linear warm-up from lr/25, then cosine to lr/1000)
    augmentation: str = "none"  # "none", "shift-2" (random translation by up to 2 px) or "crop-4+hflip"
    seed: int = 0
    train_limit: int | None = None  # train on the first N images only (tests); None: all
    # the training recipe (advbench.training.recipes: plain, madry, fast, trades, distillation)
    # and its parameters as (name, value) pairs; part of the hash only when not plain
    method: str = "plain"
    method_params: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.optimizer not in ("adam", "adamw", "sgd"):
            raise ConfigError(f"recipe optimizer must be adam, adamw or sgd, got {self.optimizer!r}")
        if self.schedule not in ("constant", "onecycle"):
            raise ConfigError(f"recipe schedule must be constant or onecycle, got {self.schedule!r}")
        if self.augmentation not in AUGMENTATIONS:
            raise ConfigError(f"recipe augmentation must be one of {', '.join(AUGMENTATIONS)}, got {self.augmentation!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError(f"recipe needs epochs >= 1, batch_size >= 1 and lr > 0, got {self}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.method == "plain" and not self.method_params:  # the hashes of the plain models stay as they were
            d.pop("method"), d.pop("method_params")
        else:
            d["method_params"] = dict(self.method_params)
        return d


@dataclass(frozen=True)
class ModelCard:
    """What a cached zoo model is: where its weights came from and how good it is.

    ``clean_accuracy`` is measured on ``eval_split`` of ``dataset`` right after training
    (``eval_correct`` of ``eval_size`` images), with the weights that were then saved.
    """

    name: str
    architecture: str
    input_shape: tuple[int, int, int]
    num_classes: int
    dataset: str
    train_split: str
    train_size: int
    eval_split: str
    eval_size: int
    eval_correct: int
    clean_accuracy: float
    seed: int
    recipe: dict[str, Any]
    recipe_hash: str
    param_count: int
    torch_version: str
    num_threads: int
    train_seconds: float
    created: str
    weights_file: str
    normalization: dict[str, list[float]]
    data_note: str = ""
    card_version: int = CARD_VERSION

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["input_shape"] = list(self.input_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelCard:
        names = {f.name for f in dataclasses.fields(cls)}
        missing = names - set(d) - {"data_note", "card_version"}
        if missing:
            raise DataError(f"model card lacks {', '.join(sorted(missing))}")
        kw = {k: v for k, v in d.items() if k in names}
        kw["input_shape"] = tuple(kw["input_shape"])
        return cls(**kw)


@dataclass(frozen=True)
class ZooSpec:
    """One zoo entry: an architecture (by name) and its recipe (and one for full data, optionally)."""

    name: str
    recipe: Recipe
    # used instead of ``recipe`` when ``full_available(root)`` says its training split exists
    full_recipe: Recipe | None = None
    full_available: Callable[[str | None], bool] | None = field(default=None, compare=False)
    data_note: str = ""
    full_data_note: str = ""
    # CPU threads used while training: one keeps the weights independent of the core count
    train_threads: int = 1
    # the architecture, when the entry's name is not one (a defended variant: digits-cnn-madry)
    arch: str | None = None

    @property
    def architecture(self) -> architectures.Architecture:
        return architectures.get(self.arch or self.name)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.architecture.input_shape


def _mnist_train_files_present(root: str | None) -> bool:
    return find_idx_pair(data_root(root), "train") is not None


ZOO: dict[str, ZooSpec] = {}


def _add(spec: ZooSpec) -> None:
    ZOO[spec.name] = spec


_add(ZooSpec("digits-mlp", Recipe("digits", "train", "test", epochs=30, batch_size=64, optimizer="adam", lr=3e-3, seed=0)))
_add(ZooSpec("digits-cnn", Recipe("digits", "train", "test", epochs=15, batch_size=64, optimizer="adam", lr=3e-3, seed=1)))
# defended variants of digits-cnn, trained by advbench's recipes (configs/train-digits-*.yaml):
# the leaderboard's defended suite ranks them beside the undefended models
for _method, _params in (("madry", (("eps", 0.1), ("steps", 10), ("random_start", True))),
                         ("fast", (("eps", 0.1),)),
                         ("trades", (("eps", 0.1), ("steps", 10), ("beta", 6.0))),
                         ("distillation", (("temperature", 100.0),)),
                         ("thermometer", (("levels", 16),))):
    _add(ZooSpec(f"digits-cnn-{_method}", Recipe("digits", "train", "test", epochs=15, batch_size=64, optimizer="adam",
                                                 lr=3e-3, seed=0, method=_method, method_params=_params),
                 arch="digits-cnn"))
_add(
    ZooSpec(
        "mnist-cnn",
        Recipe("mnist", "test-train", "test-eval", epochs=4, batch_size=64, optimizer="adam", lr=2e-3,
               schedule="onecycle", augmentation="shift-2", seed=0),
        full_recipe=Recipe("mnist", "train", "test", epochs=2, batch_size=128, optimizer="adam", lr=2e-3,
                           schedule="onecycle", augmentation="none", seed=0),
        full_available=_mnist_train_files_present,
        data_note=(
            "MNIST training files not found: trained on 'test-train' (8,000 of the 10,000 official test images) "
            "and evaluated on 'test-eval' (the other 2,000); never attack it on 'test' or 'test-train'"
        ),
        full_data_note="trained on the official MNIST training set, evaluated on the official test set",
    )
)
_add(
    ZooSpec(
        "cifar10-cnn",
        Recipe("cifar10", "train", "test", epochs=5, batch_size=128, optimizer="adamw", lr=1e-2, weight_decay=5e-4,
               schedule="onecycle", augmentation="crop-4+hflip", seed=0),
    )
)


# ---------------------------------------------------------------------------- public API
def zoo_names() -> list[str]:
    """The zoo's model names, sorted."""
    return sorted(ZOO)


def get_spec(name: str) -> ZooSpec:
    """The zoo entry ``name`` (an UnknownNameError with close matches otherwise)."""
    try:
        return ZOO[name]
    except KeyError:
        raise unknown_name("zoo model", name, ZOO) from None


def select_recipe(name: str, root: str | None = None) -> tuple[Recipe, str]:
    """The recipe ``name`` trains with given the data at ``root``, and the note for its card."""
    spec = get_spec(name)
    if spec.full_recipe is not None and spec.full_available is not None and spec.full_available(root):
        return spec.full_recipe, spec.full_data_note
    return spec.recipe, spec.data_note


def recipe_hash(name: str, recipe: Recipe) -> str:
    """12 hex digits of SHA-256 over the model name, its architecture version and the recipe."""
    spec = get_spec(name)
    blob = json.dumps(
        {"name": name, "arch_version": spec.architecture.arch_version, "recipe": recipe.to_dict()}, sort_keys=True
    ).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


#: the reference checkpoints and cards shipped with the package
SHIPPED_DIR = Path(__file__).resolve().parent / "weights"
SHIPPED_ENV = "ADVBENCH_ZOO_SHIPPED"


def use_shipped() -> bool:
    """Whether shipped checkpoints are used (``ADVBENCH_ZOO_SHIPPED=0`` turns them off)."""
    return os.environ.get(SHIPPED_ENV, "1") not in ("0", "false", "no")


def models_dir() -> Path:
    """``cache_dir()/models``, where zoo weights and cards trained here are kept."""
    return cache_dir() / "models"


def shipped_path(name: str, root: str | None = None) -> Path | None:
    """The shipped checkpoint of ``name`` for the recipe ``root``'s data selects, if there is one."""
    recipe, _ = select_recipe(name, root)
    path = SHIPPED_DIR / f"{name}-{recipe_hash(name, recipe)}.pt"
    return path if path.is_file() and path.with_suffix(".json").is_file() else None


def weights_path(name: str, root: str | None = None) -> Path:
    """Where the weights of ``name`` (trained with the recipe ``root``'s data selects) are cached."""
    recipe, _ = select_recipe(name, root)
    return models_dir() / f"{name}-{recipe_hash(name, recipe)}.pt"


def card_path(name: str, root: str | None = None) -> Path:
    return weights_path(name, root).with_suffix(".json")


def build(name: str, *, seed: int | None = None) -> nn.Module:
    """A freshly initialized (untrained) ``name``, in eval mode; ``seed`` (default: the recipe's)
    fixes the initialization.

    A recipe that deploys defense stages (``thermometer``) gives the deployed model: its stages in
    front of a classifier widened to the encoding's channels, the module tree the training loop
    saved (so the shipped state dict loads into it)."""
    spec = get_spec(name)
    method = make_recipe(spec.recipe.method, dict(spec.recipe.method_params))
    return architectures.build_deployed(spec.arch or name, seed=spec.recipe.seed if seed is None else seed,
                                        in_channels=method.in_channels(spec.input_shape[0]),
                                        stages=method.stages()).eval()


def load_zoo_model(name: str, pretrained: bool = True, root: str | None = None) -> nn.Module:
    """The zoo model ``name`` in eval mode: trained (from cache, or now) if ``pretrained``, else freshly initialized."""
    if not pretrained:
        return build(name)
    model, card = _ensure(name, root)
    model.advbench_card = card.to_dict()  # provenance for whoever holds the model
    return model


def model_card(name: str, root: str | None = None) -> dict[str, Any]:
    """The card of the cached model ``name`` as a dict (training it first if it is not cached)."""
    cached = _read_cached(name, root, load_weights=False)
    if cached is not None:
        return cached[1].to_dict()
    return _ensure(name, root)[1].to_dict()


def verify_recipe(name: str, root: str | None = None, tolerance: float = 0.02) -> tuple[float, float]:
    """Retrain ``name`` from its recipe (nothing is saved) and check it reaches the shipped card's
    clean accuracy within ``tolerance`` (a fraction): the recipe still makes the model it claims,
    though on another CPU not bit for bit. Returns (shipped, retrained) accuracy; a DataError
    when they differ by more, or when no checkpoint is shipped for this recipe."""
    shipped = shipped_path(name, root)
    if shipped is None:
        raise DataError(f"no shipped checkpoint of {name!r} for this recipe to compare with")
    card = ModelCard.from_dict(json.loads(shipped.with_suffix(".json").read_text()))
    _, fresh = train_zoo_model(name, root, save=False)
    if abs(fresh.clean_accuracy - card.clean_accuracy) > tolerance:
        raise DataError(f"{name} retrained from its recipe reaches {fresh.clean_accuracy:.4f} clean accuracy, the "
                        f"shipped card {card.clean_accuracy:.4f}: more than {tolerance} apart")
    return card.clean_accuracy, fresh.clean_accuracy


def train_zoo_model(name: str, root: str | None = None, *, save: bool = True) -> tuple[nn.Module, ModelCard]:
    """Train ``name`` now (ignoring the cache), evaluate it, and cache it unless ``save`` is False."""
    recipe, note = select_recipe(name, root)
    model, card = _train(name, recipe, note, root)
    if save:
        _save(name, model, card)
    return model, card


def evaluate_accuracy(model: nn.Module, data: ImageData, batch_size: int = 500) -> tuple[int, int]:
    """``(correct, total)`` top-1 predictions of ``model`` (in eval mode) on ``data``."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            logits = model(data.x[start : start + batch_size])
            correct += int((logits.argmax(1) == data.y[start : start + batch_size]).sum())
    return correct, len(data)


# ---------------------------------------------------------------------------- cache
def _ensure(name: str, root: str | None) -> tuple[nn.Module, ModelCard]:
    cached = _read_cached(name, root, load_weights=True)
    if cached is not None:
        return cached  # type: ignore[return-value]
    path = weights_path(name, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path.with_suffix(".lock")):
        cached = _read_cached(name, root, load_weights=True)  # another process may have finished meanwhile
        if cached is not None:
            return cached  # type: ignore[return-value]
        recipe, note = select_recipe(name, root)
        model, card = _train(name, recipe, note, root)
        _save(name, model, card)
        return model, card


def _read_cached(name: str, root: str | None, *, load_weights: bool) -> tuple[nn.Module | None, ModelCard] | None:
    """The (model, card) shipped or cached, or None on a miss; an unreadable entry is warned about
    and ignored."""
    recipe, _ = select_recipe(name, root)
    stem = f"{name}-{recipe_hash(name, recipe)}"
    folders = ([SHIPPED_DIR] if use_shipped() else []) + [models_dir()]
    for folder in folders:
        found = _read_entry(name, recipe, folder / f"{stem}.pt", load_weights=load_weights)
        if found is not None:
            return found
    return None


def _read_entry(name: str, recipe: Recipe, pt: Path, *, load_weights: bool) -> tuple[nn.Module | None, ModelCard] | None:
    js = pt.with_suffix(".json")
    if not js.is_file() or not pt.is_file():
        return None
    try:
        card = ModelCard.from_dict(json.loads(js.read_text()))
        if card.recipe_hash != recipe_hash(name, recipe) or card.name != name:
            raise DataError("its name or recipe hash does not match the file name")
        if not load_weights:
            return None, card
        state = torch.load(pt, map_location="cpu", weights_only=True)
        model = build(name)
        model.load_state_dict(state)
    except Exception as exc:  # noqa: BLE001 - any damage to the cache means: train again
        warnings.warn(
            f"advbench: ignoring the unreadable cached model {pt} ({type(exc).__name__}: {exc}); training it again",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return model.eval(), card


def _save(name: str, model: nn.Module, card: ModelCard) -> None:
    pt = models_dir() / card.weights_file
    pt.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    atomic_write(pt, lambda f: torch.save(state, f))
    text = json.dumps(card.to_dict(), indent=2, sort_keys=True) + "\n"
    atomic_write(pt.with_suffix(".json"), lambda f: f.write(text.encode()))  # the card last: it marks completion


# ---------------------------------------------------------------------------- training
def _load_split(recipe: Recipe, split: str, root: str | None) -> ImageData:
    """The data set split a recipe names (``root`` is passed to loaders that take one)."""
    params: dict[str, Any] = {"split": split}
    if root is not None and "root" in inspect.signature(DATASETS.get(recipe.dataset).factory).parameters:
        params["root"] = root
    return DATASETS.create(recipe.dataset, **params)


def train_config(name: str, recipe: Recipe) -> TrainConfig:
    """The zoo recipe as a train config: the ``plain`` recipe with its optimizer, schedule and
    augmentation, one thread (the loop is the one ``advbench train`` runs)."""
    return TrainConfig.model_validate({
        "name": f"zoo-{name}", "architecture": get_spec(name).arch or name,
        "data": {"name": recipe.dataset, "split": recipe.train_split}, "eval": {"split": recipe.eval_split},
        "recipe": {"name": recipe.method, **dict(recipe.method_params)}, "epochs": recipe.epochs, "batch_size": recipe.batch_size, "optimizer": recipe.optimizer,
        "lr": recipe.lr, "weight_decay": recipe.weight_decay, "schedule": recipe.schedule,
        "augmentation": recipe.augmentation, "seed": recipe.seed, "threads": get_spec(name).train_threads,
    })


def _train(name: str, recipe: Recipe, note: str, root: str | None) -> tuple[nn.Module, ModelCard]:
    spec = get_spec(name)
    arch = spec.architecture
    train = _load_split(recipe, recipe.train_split, root)
    evaluation = _load_split(recipe, recipe.eval_split, root)
    if train.input_shape != arch.input_shape or evaluation.input_shape != arch.input_shape:
        raise DataError(f"{name} takes {arch.input_shape} inputs but {recipe.dataset} gives {train.input_shape}")
    x, y = train.x, train.y
    if recipe.train_limit is not None:
        x, y = x[: recipe.train_limit], y[: recipe.train_limit]
    config = train_config(name, recipe)
    with num_threads(spec.train_threads), torch.random.fork_rng(devices=[]), \
            tempfile.TemporaryDirectory(prefix="advbench-zoo-") as tmp:  # leave the caller's RNG untouched
        loop = run_loop(config, make_recipe(recipe.method, dict(recipe.method_params)), x, y, Path(tmp) / "checkpoint.pt",
                        device=torch.device("cpu"), progress=False)
        model = loop.model.eval()
        correct, total = evaluate_accuracy(model, evaluation)
    h = recipe_hash(name, recipe)
    card = ModelCard(
        name=name,
        architecture=_deployed_description(model, arch.description),
        input_shape=arch.input_shape,
        num_classes=arch.num_classes,
        dataset=recipe.dataset,
        train_split=recipe.train_split,
        train_size=int(len(x)),
        eval_split=recipe.eval_split,
        eval_size=total,
        eval_correct=correct,
        clean_accuracy=correct / total if total else float("nan"),
        seed=recipe.seed,
        recipe=recipe.to_dict(),
        recipe_hash=h,
        param_count=count_parameters(model),
        torch_version=torch.__version__,
        num_threads=spec.train_threads,
        train_seconds=round(loop.seconds, 3),
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        weights_file=f"{name}-{h}.pt",
        normalization=_normalization(model, arch),
        data_note=note,
    )
    return model, card


def _deployed_description(model: nn.Module, description: str) -> str:
    """The architecture as deployed: the stages in front of the network, when it has any."""
    if not isinstance(model, DefendedModel):
        return description
    stages = " -> ".join(repr(s) for s in model.stages)
    return f"{stages} -> {description}, its input layer taking the encoding's channels"


def _normalization(model: nn.Module, arch: architectures.Architecture) -> dict[str, list[float]]:
    """The classifier's input statistics: the architecture's, or those of the leading Normalize
    layer an encoding recipe put in their place (0.5, 0.5: bits to {-1, 1})."""
    if not isinstance(model, DefendedModel):
        return {"mean": list(arch.mean), "std": list(arch.std)}
    norm = next(m for m in model.classifier.modules() if isinstance(m, Normalize))
    return {k: [round(v, 6) for v in t.flatten().tolist()] for k, t in (("mean", norm.mean), ("std", norm.std))}


# ---------------------------------------------------------------------------- registration
def _make_factory(name: str) -> Callable[..., nn.Module]:
    spec = ZOO[name]

    def factory(pretrained: bool = True, root: str | None = None) -> nn.Module:
        return load_zoo_model(name, pretrained=pretrained, root=root)

    factory.__name__ = name.replace("-", "_")
    factory.__qualname__ = factory.__name__
    factory.__doc__ = (
        f"{spec.architecture.description}; {'x'.join(map(str, spec.input_shape))} input in [0, 1], 10 classes; "
        f"trained on {spec.recipe.dataset} (shipped, or trained on first use and cached)."
    )
    return factory


for _name, _spec in ZOO.items():
    if _name not in MODELS._entries:  # noqa: SLF001 - tolerate a re-import of this module
        MODELS.add(
            _name,
            _make_factory(_name),
            description=(
                f"{_spec.architecture.description} ({'x'.join(map(str, _spec.input_shape))}, {_spec.recipe.dataset}; "
                f"shipped trained)"
            ),
        )


__all__ = [
    "ModelCard",
    "Recipe",
    "ZOO",
    "ZooSpec",
    "build",
    "card_path",
    "evaluate_accuracy",
    "load_zoo_model",
    "model_card",
    "recipe_hash",
    "select_recipe",
    "shipped_path",
    "train_config",
    "train_zoo_model",
    "verify_recipe",
    "weights_path",
    "zoo_names",
]
