"""Writing a trained model's folder (:mod:`advbench.models.trained` reads it back).

Every file is written to a temporary name and renamed (atomic on one file system), so a process
killed at any point leaves either the old file or the new one, never half of one; the card is
written last, so its presence means the rest is complete.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from advbench.files import atomic_write
from advbench.models.trained import CARD, CONFIG, DESCRIPTION, WEIGHTS


def write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def save_tensors(path: Path, obj: Any) -> None:
    """``torch.save`` atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


def save_trained(folder: Path, classifier: nn.Module, description: dict[str, Any], config: dict[str, Any],
                 card: dict[str, Any]) -> None:
    """Write a finished model: weights, description, config, and the card last."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in classifier.state_dict().items()}
    save_tensors(folder / WEIGHTS, state)
    write_bytes(folder / DESCRIPTION, (json.dumps(description, indent=2, sort_keys=True) + "\n").encode())
    write_bytes(folder / CONFIG, yaml.safe_dump(config, sort_keys=False).encode())
    write_bytes(folder / CARD, (json.dumps(card, indent=2, sort_keys=True) + "\n").encode())
