"""``train(config)``: load the data, run (or resume) the loop, measure, write the card.

A second process training the same name waits on a lock file and then finds the model done.
A finished model of the same config is not trained again (its card is returned); a model of
the same name but another config is retrained, its old card removed first so that nobody
loads the old card with new weights.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advbench.errors import ConfigError, DataError
from advbench.files import file_lock
from advbench.loading import load_data
from advbench.models import architectures
from advbench.models.architectures import classifier_of, describe
from advbench.models.trained import CARD, CHECKPOINT, LOCK, read_card, trained_dir
from advbench.provenance import resolve_device
from advbench.tensors import num_threads
from advbench.training.card import make_card
from advbench.training.config import TrainConfig, robust_eps
from advbench.training.loop import run_loop
from advbench.training.measure import measure
from advbench.training.recipes import make_recipe
from advbench.training.save import save_trained


@dataclass
class TrainResult:
    folder: Path
    card: dict[str, Any] | None  # None when stopped before the end
    model: nn.Module | None = None  # the deployed model, when trained in this call
    skipped: bool = False  # already trained with this config: nothing was done
    stopped: bool = False  # ended early (stop_after_epochs): rerun to resume
    resumed_from: dict[str, Any] | None = None


def train(
    config: TrainConfig,
    *,
    progress: bool | None = None,
    stop_after_epochs: int | None = None,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train ``config`` into ``<ADVBENCH_CACHE>/trained/<name>/`` (see :mod:`advbench.training`)."""
    device = resolve_device(config.device)
    # everything that can be checked is checked before the model's folder exists: bad input
    # leaves nothing behind
    recipe = make_recipe(config.recipe.name, config.recipe.params)
    train_data = load_data(config.data_spec())
    eval_data = load_data(config.eval_data_spec())
    check_fits(config, recipe, train_data, eval_data)
    folder = trained_dir(config.name)
    folder.mkdir(parents=True, exist_ok=True)
    with file_lock(folder / LOCK):
        card = read_card(config.name)
        if card is not None and card.get("config_hash") == config.hash():
            if log:
                log(f"{config.name} is already trained with this config ({folder}); delete the folder to retrain")
            return TrainResult(folder, card, skipped=True)
        if card is not None:
            if log:
                log(f"{config.name} was trained with another config: training it again")
            (folder / CARD).unlink()
        threads = num_threads(config.threads) if device.type == "cpu" else contextlib.nullcontext()
        with threads, torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
            return _train(config, recipe, train_data, eval_data, folder, device, progress, stop_after_epochs, log)


def check_fits(config: TrainConfig, recipe: Any, train_data: Any, eval_data: Any) -> None:
    """A one-line error when the data does not fit the architecture (or the evaluation split
    differs from the training one): the zoo architecture fixes its input's size and channels
    (an encoding recipe such as thermometer widens the channels itself)."""
    if train_data.input_shape != eval_data.input_shape:
        raise DataError(f"training images are {train_data.input_shape} but evaluation images {eval_data.input_shape}")
    expected = architectures.get(config.architecture).input_shape
    c, h, w = train_data.input_shape
    if (h, w) != tuple(expected[1:]) or (recipe.in_channels(c) is None and c != expected[0]):
        shape = "x".join(map(str, expected))
        raise ConfigError(f"architecture {config.architecture!r} takes {shape} inputs but {train_data.name} "
                          f"{train_data.split!r} gives {c}x{h}x{w}; choose an architecture made for this data "
                          f"(advbench list models)")


def _train(config: TrainConfig, recipe: Any, train_data: Any, eval_data: Any, folder: Path, device: torch.device,
           progress: bool | None, stop_after_epochs: int | None, log: Callable[[str], None] | None) -> TrainResult:
    x, y = train_data.x, train_data.y
    if config.data.n is not None:
        x, y = x[: config.data.n], y[: config.data.n]
    if config.eval.n is not None:
        eval_data = eval_data.subset(torch.arange(min(config.eval.n, len(eval_data))))
    loop = run_loop(config, recipe, x, y, folder / CHECKPOINT, device=device, progress=progress,
                    stop_after_epochs=stop_after_epochs, log=log)
    if loop.stopped or loop.model is None:
        return TrainResult(folder, None, stopped=True, resumed_from=loop.resumed_from)
    model = loop.model.eval()
    began = time.perf_counter()
    e = config.eval
    numbers = measure(model, eval_data, eps=robust_eps(config), steps=e.steps, step_size=e.step_size,
                      restarts=e.restarts, batch_size=e.batch_size, seed=config.seed, device=device)
    eval_seconds = time.perf_counter() - began
    description = describe(config.architecture, recipe.in_channels(x.shape[1]), recipe.stages())
    card = make_card(config, recipe, model, description, numbers, train_size=len(x), train_seconds=loop.seconds,
                     eval_seconds=eval_seconds, history=loop.history, device=device,
                     data_meta=dict(train_data.meta))
    save_trained(folder, classifier_of(model), description, config.canonical(), card)
    (folder / CHECKPOINT).unlink(missing_ok=True)
    model.advbench_card = card
    return TrainResult(folder, card, model=model, resumed_from=loop.resumed_from)
