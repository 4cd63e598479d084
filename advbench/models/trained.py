"""Where trained models live, and reading them by name (``advbench train`` writes them).

``<ADVBENCH_CACHE>/trained/<name>/`` holds:

=================  ===================================================================
``model.pt``       the classifier's state dict (read with ``weights_only=True``)
``model.json``     how to rebuild the deployed model: zoo architecture, input channels,
                   defense stages (e.g. ``thermometer`` and its ``levels``)
``config.yaml``    the train config that produced it (canonical form)
``card.json``      the model card; written last, so its presence means the rest is complete
``checkpoint.pt``  while training: the last finished epoch (removed when the card is written)
=================  ===================================================================

Every file is written to a temporary name and renamed (atomic on one file system), so a
process killed at any point leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advbench.data.paths import cache_dir
from advbench.errors import ConfigError, DataError
from advbench.files import check_name
from advbench.models.architectures import classifier_of, rebuild

WEIGHTS, DESCRIPTION, CONFIG, CARD, CHECKPOINT, LOCK = (
    "model.pt", "model.json", "config.yaml", "card.json", "checkpoint.pt", ".lock",
)


def trained_root() -> Path:
    """``cache_dir()/trained``."""
    return cache_dir() / "trained"


def trained_dir(name: str) -> Path:
    """The folder of the trained model ``name``; a name that would leave the store is refused."""
    return trained_root() / check_name(name, "trained model name")


def read_card(name: str) -> dict[str, Any] | None:
    """The card of the trained model ``name``, or None when it has not (finished) training."""
    path = trained_dir(name) / CARD
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"unreadable model card {path}: {exc}") from None


def load_trained(name: str, map_location: str | torch.device = "cpu") -> nn.Module:
    """The trained model ``name`` (eval mode), with its card as ``model.advbench_card``.

    Raises a one-line ConfigError naming the command to run when it is missing.
    """
    folder = trained_dir(name)
    card = read_card(name)
    if card is None:
        raise ConfigError(
            f"no trained model {name!r} (looked in {folder}); train it first with `advbench train CONFIG` "
            f"(a train config with name: {name})"
        )
    try:
        description = json.loads((folder / DESCRIPTION).read_text())
        state = torch.load(folder / WEIGHTS, map_location=map_location, weights_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise DataError(f"trained model {name!r} in {folder} is damaged ({type(exc).__name__}: {exc}); train it again") from None
    model = rebuild(description)
    classifier_of(model).load_state_dict(state)
    model.eval()
    model.advbench_card = card  # provenance for whoever holds the model
    return model
