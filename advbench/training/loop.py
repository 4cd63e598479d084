"""The training loop: phases of epochs of seeded mini-batches, a checkpoint after every epoch.

Reproducibility: all randomness (the shuffling, the augmentation, the attacks' random
starts) is drawn from one ``torch.Generator`` seeded with the config's seed, and each phase's
model is initialized from ``seed + 1000 * phase index``. On the CPU with a fixed number of
threads (the config's ``threads``, default 1) a seed therefore fixes the weights bit for bit.

Resume: after every epoch the model, the optimizer, the learning-rate schedule, the generator's
state and the elapsed time are written to ``checkpoint.pt`` (a temporary file, then a rename).
A rerun of the same config loads it and continues with the next epoch; the weights it ends with
are those of an uninterrupted run. A checkpoint of another config (its hash differs) is ignored.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from advbench.models.architectures import build_deployed
from advbench.training.config import TrainConfig
from advbench.training.recipes import TrainingRecipe
from advbench.training.save import save_tensors

AUGMENTATIONS = ("none", "shift-2", "crop-4+hflip")



@dataclass
class LoopResult:
    model: nn.Module | None  # the last phase's model (None when stopped early)
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per epoch
    seconds: float = 0.0  # training time, summed over resumed runs
    resumed_from: dict[str, Any] | None = None  # {"phase", "epoch"} of the checkpoint loaded
    stopped: bool = False


def augment(x: torch.Tensor, kind: str, g: torch.Generator) -> torch.Tensor:
    """A batch's training augmentation (one of :data:`AUGMENTATIONS`), drawn from ``g``."""
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


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The config's optimizer: Adam, AdamW or SGD (momentum 0.9, Nesterov)."""
    params = model.parameters()
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay)


def build_model(config: TrainConfig, recipe: TrainingRecipe, index: int, channels: int) -> nn.Module:
    """Phase ``index``'s fresh model: the classifier, in its defense stages if the recipe has any."""
    return build_deployed(config.architecture, seed=config.seed + 1000 * index, in_channels=recipe.in_channels(channels),
                          stages=recipe.stages())


def run_loop(
    config: TrainConfig,
    recipe: TrainingRecipe,
    x: torch.Tensor,
    y: torch.Tensor,
    checkpoint: Path,
    *,
    device: torch.device,
    progress: bool | None = None,
    stop_after_epochs: int | None = None,
    log: Callable[[str], None] | None = None,
) -> LoopResult:
    """Train every phase of ``recipe`` on ``(x, y)``, resuming from ``checkpoint`` if it is this config's.

    ``stop_after_epochs`` ends the call after that many epochs (the checkpoint written), as an
    interruption would; ``progress`` None shows the bar only on a terminal (tqdm's rule). RGB
    images train in the channels-last memory format (faster convolutions on the CPU).
    """
    phases = recipe.phases(config.epochs)
    state = _load(checkpoint, config.hash())
    g = torch.Generator().manual_seed(config.seed)  # on the CPU, like the data: batches move to the device
    result = LoopResult(model=None)
    start_phase, start_epoch, previous = 0, 0, None
    if state is not None:
        result.resumed_from = {"phase": phases[state["phase"]].name, "epoch": state["epoch"]}
        result.history, result.seconds = list(state["history"]), float(state["seconds"])
        start_phase, start_epoch = state["phase"], state["epoch"]
        g.set_state(state["generator"])
        if log:
            log(f"resuming {config.name} after {phases[start_phase].name} epoch {start_epoch} from {checkpoint}")
    steps_per_epoch = (len(x) + config.batch_size - 1) // config.batch_size
    channels_last = x.dim() == 4 and x.shape[1] == 3
    done = sum(p.epochs for p in phases[:start_phase]) + start_epoch
    bar = tqdm(
        total=sum(p.epochs for p in phases) * steps_per_epoch, initial=done * steps_per_epoch, file=sys.stderr,
        disable=None if progress is None else not progress, desc=config.name, unit="batch", leave=False,
    )
    ran = 0
    try:
        for index in range(start_phase, len(phases)):
            phase = phases[index]
            model = build_model(config, recipe, index, x.shape[1]).to(device).train()
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
            opt = make_optimizer(model, config)
            sched = (
                torch.optim.lr_scheduler.LambdaLR(opt, one_cycle(phase.epochs * steps_per_epoch))
                if config.schedule == "onecycle" else None
            )
            first = 0
            if state is not None and index == start_phase:
                model.load_state_dict(state["model"])
                if start_epoch < phase.epochs:  # else the phase is finished: only its model is needed
                    opt.load_state_dict(state["optimizer"])
                    if sched is not None:
                        sched.load_state_dict(state["scheduler"])
                first = start_epoch
            if first < phase.epochs:
                targets = recipe.targets(phase, previous, x.to(device), y.to(device)).cpu()
            for epoch in range(first, phase.epochs):
                bar.set_description(f"{config.name} {phase.name} {epoch + 1}/{phase.epochs}")
                began = time.perf_counter()
                total, count = 0.0, 0
                for idx in torch.randperm(len(x), generator=g).split(config.batch_size):
                    xb = augment(x[idx], config.augmentation, g).to(device)
                    if channels_last:
                        xb = xb.contiguous(memory_format=torch.channels_last)
                    opt.zero_grad(set_to_none=True)
                    loss = recipe.loss(phase, model, xb, targets[idx].to(device), g)
                    loss.backward()
                    opt.step()
                    if sched is not None:
                        sched.step()
                    total += float(loss.detach()) * len(idx)
                    count += len(idx)
                    bar.update(1)
                    bar.set_postfix(loss=f"{total / count:.4f}", refresh=False)
                seconds = time.perf_counter() - began
                result.seconds += seconds
                result.history.append({"phase": phase.name, "epoch": epoch + 1, "loss": total / count, "seconds": round(seconds, 3)})
                _save(checkpoint, config, index, epoch + 1, model, opt, sched, g, result)
                ran += 1
                if stop_after_epochs is not None and ran >= stop_after_epochs and not (
                    index == len(phases) - 1 and epoch + 1 == phase.epochs
                ):
                    result.stopped = True
                    return result
            previous = model.eval()
            if channels_last:
                previous = previous.to(memory_format=torch.contiguous_format)
    finally:
        bar.close()
    result.model = previous
    return result


def _save(path: Path, config: TrainConfig, phase: int, epoch: int, model: nn.Module, opt: torch.optim.Optimizer,
          sched: Any, g: torch.Generator, result: LoopResult) -> None:
    save_tensors(
        path,
        {
            "config_hash": config.hash(),
            "phase": phase,
            "epoch": epoch,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": opt.state_dict(),
            "scheduler": None if sched is None else sched.state_dict(),
            "generator": g.get_state(),
            "history": result.history,
            "seconds": result.seconds,
        },
    )


def _load(path: Path, config_hash: str) -> dict[str, Any] | None:
    """This config's checkpoint, or None (none, another config's, or unreadable: start afresh)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a damaged checkpoint (cannot happen with atomic writes) is dropped
        return None
    return state if isinstance(state, dict) and state.get("config_hash") == config_hash else None
