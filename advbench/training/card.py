"""The model card of a trained model, and its few-line summary for the terminal."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from advbench.models import architectures
from advbench.models.layers import count_parameters
from advbench.provenance import versions
from advbench.training.config import TrainConfig
from advbench.training.recipes import TrainingRecipe

CARD_VERSION = 1

_DEPLOYMENT = {
    "distillation": "the student, deployed at T = 1: the model returns its raw logits (trained on logits / T)",
    "thermometer": "DefendedModel([thermometer], classifier): the real, non-differentiable encoding runs at inference",
}


def make_card(
    config: TrainConfig,
    recipe: TrainingRecipe,
    model: nn.Module,
    description: dict[str, Any],
    numbers: dict[str, Any],
    *,
    train_size: int,
    train_seconds: float,
    eval_seconds: float,
    history: list[dict[str, Any]],
    device: torch.device,
    data_meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything about a trained model: what, on which data, how well, how made, with what."""
    spec = architectures.get(config.architecture)
    return {
        "card_version": CARD_VERSION,
        "name": config.name,
        "architecture": config.architecture,
        "architecture_description": spec.description,
        "input_shape": list(spec.input_shape),
        "num_classes": spec.num_classes,
        "classifier_in_channels": description["in_channels"] or spec.input_shape[0],
        "stages": description["stages"],
        "deployment": _DEPLOYMENT.get(recipe.name, "the trained network itself"),
        "dataset": config.data.name or config.data.path,
        "train_split": config.data.split if config.data.path is None else config.data.path,
        "train_size": train_size,
        "eval_split": config.eval.split if config.eval.path is None else config.eval.path,
        **numbers,
        "recipe": recipe.describe(),
        "phases": [p._asdict() for p in recipe.phases(config.epochs)],
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "optimizer": {"name": config.optimizer, "lr": config.lr, "weight_decay": config.weight_decay,
                      "schedule": config.schedule, "augmentation": config.augmentation},
        "seed": config.seed,
        "config_hash": config.hash(),
        "param_count": count_parameters(model),
        "device": str(device),
        "num_threads": torch.get_num_threads() if device.type == "cpu" else None,
        "train_seconds": round(train_seconds, 3),
        "eval_seconds": round(eval_seconds, 3),
        "history": history,
        "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "data_meta": {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in (data_meta or {}).items()},
    }


def summary(card: dict[str, Any]) -> str:
    """A few lines: the model, its data, clean and robust accuracy per attack, the time it took."""
    r = card["robust"]
    attacks = ", ".join(f"{k} {100 * v:.1f}%" for k, v in r["accuracy"].items())
    recipe = card["recipe"]
    params = ", ".join(f"{k}={v}" for k, v in recipe["params"].items() if v is not None)
    phases = card["phases"]
    epochs = f"{card['epochs']} epochs" if len(phases) == 1 else " + ".join(f"{p['epochs']} {p['name']}" for p in phases) + " epochs"
    return "\n".join(
        [
            f"{card['name']}: {card['architecture']} trained with recipe {recipe['name']}"
            + (f" ({params})" if params else "")
            + f", seed {card['seed']}, {epochs} in {card['train_seconds']:.1f} s on {card['device']}",
            f"  data: {card['dataset']} {card['train_split']} ({card['train_size']}), evaluated on {card['eval_split']} ({card['eval_size']})",
            f"  clean accuracy {100 * card['clean_accuracy']:.1f}%",
            f"  robust accuracy (linf eps {r['eps']:g}, PGD {r['steps']} steps x {r['restarts']}): {attacks}; "
            + f"worst case {100 * r['worst_case']:.1f}%",
            f"  deployed: {card['deployment']}",
        ]
    )
