"""Reference models: small networks trained on first use, cached, each with a model card.

Four architectures are registered in :data:`advbench.registry.MODELS`:

=============== ========= ===================================== ========================
name            input     training data (reported accuracy on)  training time, 1 thread
=============== ========= ===================================== ========================
``digits-mlp``  1x8x8     digits ``train`` (``test``)           1-2 s
``digits-cnn``  1x8x8     digits ``train`` (``test``)           1-2 s
``mnist-cnn``   1x28x28   mnist ``test-train`` (``test-eval``)  about 15 s
                          or ``train`` (``test``) if present    (estimated 40 s)
``cifar10-cnn`` 3x32x32   cifar10 ``train`` (``test``)          about 2 minutes
=============== ========= ===================================== ========================

Every factory has the signature ``(pretrained: bool = True, root: str | None = None)`` and
returns the model in eval mode, taking inputs in [0, 1] (normalization is its first layer).
``root`` is the data root handed to the data set loader (MNIST and CIFAR-10 only).

With ``pretrained=True`` the weights are the **reference checkpoints shipped with the package**
(``advbench/models/weights/<name>-<hash>.pt``, a state dict read with ``torch.load(...,
weights_only=True)``, next to its card ``<name>-<hash>.json``), so every machine evaluates the
same weights: training is deterministic on one machine, not across CPUs, and a benchmark or a
regression gate that retrained its models would measure other models elsewhere. A recipe with no
shipped checkpoint (MNIST with the full training set at hand, say), or any recipe with
``ADVBENCH_ZOO_SHIPPED=0``, is looked up in the cache, ``cache_dir()/models/<name>-<hash>.pt``.
On a miss the model is trained on the CPU with one thread and a fixed seed (a rerun reproduces
the weights bit for bit on that machine), evaluated, and both files are written atomically
(temporary file + ``os.replace``), the card last: a reader never sees half a file, and a card on
disk means its weights are complete. :func:`verify_recipe` retrains a shipped model from its
recipe and compares the clean accuracy it reaches with the shipped card's. A lock file (``<name>-<hash>.lock``, where the platform has ``fcntl``)
keeps two processes from training the same model at once: the second waits and loads. The
hash covers the architecture version and the whole training recipe, so changing either trains
a fresh model instead of loading a stale one.

The card's clean accuracy is always measured on the evaluation split after training, never
written by hand; :func:`model_card` returns it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from advbench.files import atomic_write, file_lock
from advbench.data.base import ImageData
from advbench.errors import ConfigError, DataError, UnknownNameError
from advbench.models.layers import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    MNIST_MEAN,
    MNIST_STD,
    Normalize,
    conv_bn_relu,
    count_parameters,
)
from advbench.registry import DATASETS, MODELS

CARD_VERSION = 1
DIGITS_MEAN = (0.3,)  # the UCI digits' pixel statistics (scaled to [0, 1]), rounded
DIGITS_STD = (0.38,)


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
        return dataclasses.asdict(self)


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


AUGMENTATIONS = ("none", "shift-2", "crop-4+hflip")


# ---------------------------------------------------------------------------- architectures
def _digits_mlp() -> nn.Module:
    return nn.Sequential(
        OrderedDict(
            normalize=Normalize(DIGITS_MEAN, DIGITS_STD),
            flatten=nn.Flatten(),
            fc1=nn.Linear(64, 128),
            relu1=nn.ReLU(),
            fc2=nn.Linear(128, 10),
        )
    )


def _digits_cnn() -> nn.Module:
    return nn.Sequential(
        OrderedDict(
            normalize=Normalize(DIGITS_MEAN, DIGITS_STD),
            conv1=nn.Conv2d(1, 16, 3, padding=1),
            relu1=nn.ReLU(),
            conv2=nn.Conv2d(16, 32, 3, padding=1),
            relu2=nn.ReLU(),
            pool=nn.MaxPool2d(2),  # 32x4x4
            flatten=nn.Flatten(),
            fc1=nn.Linear(32 * 4 * 4, 64),
            relu3=nn.ReLU(),
            fc2=nn.Linear(64, 10),
        )
    )


def _mnist_cnn() -> nn.Module:
    """LeNet-like: two 5x5 conv + max-pool stages, then two fully connected layers."""
    return nn.Sequential(
        OrderedDict(
            normalize=Normalize(MNIST_MEAN, MNIST_STD),
            conv1=nn.Conv2d(1, 16, 5, padding=2),
            relu1=nn.ReLU(),
            pool1=nn.MaxPool2d(2),  # 16x14x14
            conv2=nn.Conv2d(16, 32, 5, padding=2),
            relu2=nn.ReLU(),
            pool2=nn.MaxPool2d(2),  # 32x7x7
            flatten=nn.Flatten(),
            fc1=nn.Linear(32 * 7 * 7, 128),
            relu3=nn.ReLU(),
            fc2=nn.Linear(128, 10),
        )
    )


def _cifar10_cnn() -> nn.Module:
    """Three conv-BN-ReLU-pool stages (16, 32, 64 channels) and a linear classifier."""
    return nn.Sequential(
        OrderedDict(
            normalize=Normalize(CIFAR10_MEAN, CIFAR10_STD),
            block1=conv_bn_relu(3, 16, pool=True),  # 16x16x16
            block2=conv_bn_relu(16, 32, pool=True),  # 32x8x8
            block3=conv_bn_relu(32, 64, pool=True),  # 64x4x4
            flatten=nn.Flatten(),
            fc=nn.Linear(64 * 4 * 4, 10),
        )
    )


@dataclass(frozen=True)
class ZooSpec:
    """One zoo entry: architecture, input shape, recipe and (optionally) a recipe for full data."""

    name: str
    build: Callable[[], nn.Module]
    architecture: str
    input_shape: tuple[int, int, int]
    recipe: Recipe
    arch_version: int = 1
    num_classes: int = 10
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    # used instead of ``recipe`` when ``full_available(root)`` says its training split exists
    full_recipe: Recipe | None = None
    full_available: Callable[[str | None], bool] | None = field(default=None, compare=False)
    data_note: str = ""
    full_data_note: str = ""
    # CPU threads used while training. One thread keeps the weights identical on machines with
    # different core counts, and is also faster for these small nets on a busy machine: with
    # two threads on two shared cores, OpenMP's busy-waiting made training 5-8x slower.
    train_threads: int = 1


def _mnist_train_files_present(root: str | None) -> bool:
    try:
        from advbench.data.mnist import find_idx_pair
        from advbench.data.paths import data_root
    except ImportError:  # pragma: no cover - the MNIST loader not installed
        return False
    return find_idx_pair(data_root(root), "train") is not None


ZOO: dict[str, ZooSpec] = {}


def _add(spec: ZooSpec) -> None:
    ZOO[spec.name] = spec


_add(
    ZooSpec(
        name="digits-mlp",
        build=_digits_mlp,
        architecture="MLP 64-128-10 (ReLU), normalization inside",
        input_shape=(1, 8, 8),
        recipe=Recipe("digits", "train", "test", epochs=30, batch_size=64, optimizer="adam", lr=3e-3, seed=0),
        mean=DIGITS_MEAN,
        std=DIGITS_STD,
    )
)
_add(
    ZooSpec(
        name="digits-cnn",
        build=_digits_cnn,
        architecture="CNN conv3x3(16)-conv3x3(32)-maxpool-fc64-fc10 (ReLU), normalization inside",
        input_shape=(1, 8, 8),
        recipe=Recipe("digits", "train", "test", epochs=15, batch_size=64, optimizer="adam", lr=3e-3, seed=1),
        mean=DIGITS_MEAN,
        std=DIGITS_STD,
    )
)
_add(
    ZooSpec(
        name="mnist-cnn",
        build=_mnist_cnn,
        architecture="LeNet-like CNN conv5x5(16)-pool-conv5x5(32)-pool-fc128-fc10 (ReLU), normalization inside",
        input_shape=(1, 28, 28),
        recipe=Recipe(
            "mnist", "test-train", "test-eval", epochs=4, batch_size=64, optimizer="adam", lr=2e-3,
            schedule="onecycle", augmentation="shift-2", seed=0,
        ),
        full_recipe=Recipe(
            "mnist", "train", "test", epochs=2, batch_size=128, optimizer="adam", lr=2e-3,
            schedule="onecycle", augmentation="none", seed=0,
        ),
        full_available=_mnist_train_files_present,
        mean=MNIST_MEAN,
        std=MNIST_STD,
        data_note=(
            "MNIST training files not found: trained on 'test-train' (8,000 of the 10,000 official test images) "
            "and evaluated on 'test-eval' (the other 2,000); never attack it on 'test' or 'test-train'"
        ),
        full_data_note="trained on the official MNIST training set, evaluated on the official test set",
    )
)
_add(
    ZooSpec(
        name="cifar10-cnn",
        build=_cifar10_cnn,
        architecture="CNN 3x[conv3x3-BN-ReLU-maxpool] (16, 32, 64 channels)-fc10, normalization inside",
        input_shape=(3, 32, 32),
        recipe=Recipe(
            "cifar10", "train", "test", epochs=5, batch_size=128, optimizer="adamw", lr=1e-2, weight_decay=5e-4,
            schedule="onecycle", augmentation="crop-4+hflip", seed=0,
        ),
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
    )
)


# ---------------------------------------------------------------------------- public API
def zoo_names() -> list[str]:
    """The zoo's model names, sorted."""
    return sorted(ZOO)


def get_spec(name: str) -> ZooSpec:
    try:
        return ZOO[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, list(ZOO), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownNameError(f"unknown zoo model {name!r}{hint} (available: {', '.join(zoo_names())})") from None


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
        {"name": name, "arch_version": spec.arch_version, "recipe": recipe.to_dict()}, sort_keys=True
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
    from advbench.data.paths import cache_dir

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
    """A freshly initialized (untrained) ``name``, in eval mode; ``seed`` fixes the initialization."""
    spec = get_spec(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.recipe.seed if seed is None else seed)
        model = spec.build()
    return model.eval()


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
        model = get_spec(name).build()
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
    import inspect

    import advbench.data  # noqa: F401  (registers the built-in data sets)

    entry = DATASETS.get(recipe.dataset)

    params: dict[str, Any] = {"split": split}
    if root is not None and "root" in inspect.signature(entry.factory).parameters:
        params["root"] = root
    return DATASETS.create(recipe.dataset, **params)


@contextlib.contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` for the block (None or the current count:
    unchanged), then restored."""
    if n is None or n == torch.get_num_threads():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def augment(x: torch.Tensor, kind: str, g: torch.Generator) -> torch.Tensor:
    if kind == "none":
        return x
    n, c, h, w = x.shape
    if kind == "shift-2":
        pad, flip = 2, False
    else:  # crop-4+hflip
        pad, flip = 4, True
    if flip:
        mask = torch.rand(n, generator=g) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect" if flip else "constant")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]
    return padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


def one_cycle(total: int, warmup: float = 0.25, start: float = 0.04, end: float = 1e-3) -> Callable[[int], float]:
    """LR factor per step: linear warm-up from ``start`` to 1 over ``warmup`` of the steps, then cosine to ``end``."""
    up = max(1, int(total * warmup))

    def factor(step: int) -> float:
        if step < up:
            return start + (1 - start) * step / up
        t = min(1.0, (step - up) / max(1, total - up))
        return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * t))

    return factor


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    params = model.parameters()
    if recipe.optimizer == "adam":
        return torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    return torch.optim.SGD(params, lr=recipe.lr, momentum=0.9, nesterov=True, weight_decay=recipe.weight_decay)


def _train(name: str, recipe: Recipe, note: str, root: str | None) -> tuple[nn.Module, ModelCard]:
    spec = get_spec(name)
    train = _load_split(recipe, recipe.train_split, root)
    evaluation = _load_split(recipe, recipe.eval_split, root)
    if train.input_shape != spec.input_shape or evaluation.input_shape != spec.input_shape:
        raise DataError(
            f"{name} takes {spec.input_shape} inputs but {recipe.dataset} gives {train.input_shape}"
        )
    x, y = train.x, train.y
    if recipe.train_limit is not None:
        x, y = x[: recipe.train_limit], y[: recipe.train_limit]
    channels_last = len(spec.input_shape) == 3 and spec.input_shape[0] == 3
    start = time.perf_counter()
    with num_threads(spec.train_threads), torch.random.fork_rng(devices=[]):  # leave the caller's RNG untouched
        torch.manual_seed(recipe.seed)
        model = spec.build()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        g = torch.Generator().manual_seed(recipe.seed)
        opt = make_optimizer(model, recipe)
        steps_per_epoch = (len(x) + recipe.batch_size - 1) // recipe.batch_size
        sched = (
            torch.optim.lr_scheduler.LambdaLR(opt, one_cycle(recipe.epochs * steps_per_epoch))
            if recipe.schedule == "onecycle"
            else None
        )
        model.train()
        for _ in range(recipe.epochs):
            perm = torch.randperm(len(x), generator=g)
            for idx in perm.split(recipe.batch_size):
                xb = augment(x[idx], recipe.augmentation, g)
                if channels_last:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(xb), y[idx]).backward()
                opt.step()
                if sched is not None:
                    sched.step()
        model.eval()
        if channels_last:
            model = model.to(memory_format=torch.contiguous_format)
        seconds = time.perf_counter() - start
        correct, total = evaluate_accuracy(model, evaluation)
    h = recipe_hash(name, recipe)
    card = ModelCard(
        name=name,
        architecture=spec.architecture,
        input_shape=spec.input_shape,
        num_classes=spec.num_classes,
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
        train_seconds=round(seconds, 3),
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        weights_file=f"{name}-{h}.pt",
        normalization={"mean": list(spec.mean), "std": list(spec.std)},
        data_note=note,
    )
    return model, card


# ---------------------------------------------------------------------------- registration
def _make_factory(name: str) -> Callable[..., nn.Module]:
    spec = ZOO[name]

    def factory(pretrained: bool = True, root: str | None = None) -> nn.Module:
        return load_zoo_model(name, pretrained=pretrained, root=root)

    factory.__name__ = name.replace("-", "_")
    factory.__qualname__ = factory.__name__
    factory.__doc__ = (
        f"{spec.architecture}; {'x'.join(map(str, spec.input_shape))} input in [0, 1], 10 classes; "
        f"trained on {spec.recipe.dataset} on first use and cached."
    )
    return factory


for _name, _spec in ZOO.items():
    if _name not in MODELS._entries:  # noqa: SLF001 - tolerate a re-import of this module
        MODELS.add(
            _name,
            _make_factory(_name),
            description=(
                f"{_spec.architecture} ({'x'.join(map(str, _spec.input_shape))}, {_spec.recipe.dataset}; "
                f"trained on first use, cached)"
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
    "train_zoo_model",
    "verify_recipe",
    "weights_path",
    "zoo_names",
]
