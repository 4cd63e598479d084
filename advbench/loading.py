"""Specs in, objects out: data sets, models and defended models, and the digests of what loaded.

Every place that turns a spec (:mod:`advbench.specs`, or its JSON dump as jobs carry it) into a
data set, a model or a defense chain calls this module: the evaluator's workers, a transfer
attack's source model, training and the blind-spot analysis. It sits below the attacks and
above data, models and defenses, so none of those needs to know about configs.

The digests say what was loaded by content, not by name or path: a job's key carries them, so
a replaced file or a retrained model is never served results of the old one.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advbench.data.base import ImageData
from advbench.data.npz import load_npz
from advbench.defenses.base import DefendedModel, InputTransform
from advbench.errors import ConfigError
from advbench.models import loaders
from advbench.models.trained import DESCRIPTION, load_trained, trained_dir
from advbench.registry import DATASETS, DEFENSES, MODELS
from advbench.specs import DefenseSpec


# ---------------------------------------------------------------------------- data
def load_data(spec: dict[str, Any]) -> ImageData:
    """The full data set a DataSpec names (the evaluated subset is chosen by index later)."""
    if spec.get("path") is not None:
        return load_npz(spec["path"])
    params = dict(spec.get("params") or {})
    if spec.get("root") is not None:
        params["root"] = spec["root"]
    return DATASETS.create(spec["name"], split=spec.get("split", "test"), **params)


# ---------------------------------------------------------------------------- models
def load_model(spec: dict[str, Any]) -> nn.Module:
    """A model from a ModelSpec dump: registry name, saved file, import path, torchvision, timm,
    robustbench, or a model ``advbench train`` wrote (``trained``)."""
    params = dict(spec.get("params") or {})
    common = {k: spec[k] for k in ("weights", "num_classes") if spec.get(k) is not None}
    norm = {k: tuple(spec[k]) for k in ("mean", "std") if spec.get(k) is not None}
    if spec.get("file") is not None:
        model = loaders.load_model_file(spec["file"])
    elif spec.get("import") is not None:
        model = loaders.load_import_path(spec["import"], **params)
    elif spec.get("torchvision") is not None:
        model = loaders.load_torchvision(spec["torchvision"], **common, **norm, **params)
    elif spec.get("timm") is not None:
        model = loaders.load_timm(spec["timm"], **common, **norm, **params)
    elif spec.get("robustbench") is not None:
        rb = {k: spec[k] for k in ("dataset", "threat_model", "model_dir") if spec.get(k) is not None}
        model = loaders.load_robustbench(spec["robustbench"], **rb)
    elif spec.get("trained") is not None:
        model = load_trained(spec["trained"])
    else:
        model = MODELS.create(spec["name"], **params)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model {spec['name']!r} did not load as a torch.nn.Module (got {type(model).__name__})")
    return model


# ---------------------------------------------------------------------------- defenses
def build_defense(spec: DefenseSpec) -> list[Any]:
    """The built stages of a defense entry (one for a single defense), in order.

    A ConfigError (one line) for an unknown name, a bad parameter, or a chain stage that is not
    an input transformation (only those compose into one defended model)."""
    built = [DEFENSES.create(s.name, **s.params) for s in (spec.stages or (spec,))]
    if spec.stages:
        for s, b in zip(spec.stages, built):
            if not isinstance(b, InputTransform):
                raise ConfigError(
                    f"defense chain {spec.name!r}: stage {s.name!r} is not an input transformation "
                    f"(only InputTransform defenses chain); give it as a defense entry of its own"
                )
    return built


def apply_defense(model: nn.Module, spec: dict[str, Any], seed: int = 0) -> nn.Module:
    """``model`` behind a defense entry (a DefenseSpec dump); ``none`` leaves it as it is.

    Input transformations (one, or a chain's stages in order) become the stages of a
    :class:`~advbench.defenses.base.DefendedModel` whose randomness is seeded by ``seed`` (the
    config seed); on a model that is already a DefendedModel (a trained thermometer model) they
    go in front of its own stages. Any other defense wraps the model through ``apply(model)`` or
    by being called on it.
    """
    if spec["name"] == "none":
        return model
    built = build_defense(DefenseSpec.model_validate(spec))
    if all(isinstance(b, InputTransform) for b in built):
        return DefendedModel(built, model, seed=seed)
    defense = built[0]
    if hasattr(defense, "apply"):
        return defense.apply(model)
    if callable(defense):
        return defense(model)
    raise ConfigError(f"defense {spec['name']!r} neither has apply(model) nor is callable")


class Autocast(nn.Module):
    """Runs the wrapped model under ``torch.autocast`` (bfloat16) and returns float32 logits.

    Used for ``amp: true`` on a GPU: the attack, the audit and the clean pass all see the same
    mixed-precision model, so the reported numbers are about the model that was attacked.
    """

    def __init__(self, model: nn.Module, device_type: str) -> None:
        super().__init__()
        self.model = model
        self.device_type = device_type

    @property
    def passes_per_input(self) -> int:
        return int(getattr(self.model, "passes_per_input", 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            out = self.model(x)
        return out.float()


# ---------------------------------------------------------------------------- digests
def module_digest(model: nn.Module) -> str:
    """SHA-256 (20 hex digits) of a module's state: every parameter and buffer, by name, dtype,
    shape and bytes. Two modules with the same digest hold the same numbers."""
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        if not isinstance(value, torch.Tensor):
            h.update(f"{name}={value!r};".encode())
            continue
        t = value.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:20]


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 (20 hex digits) of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(Path(path).expanduser(), "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()[:20]


def model_digest(spec: dict[str, Any], model: nn.Module) -> str:
    """What a loaded model is, by content: its state (weights and buffers), and the bytes of the
    files that also define it (a saved program's graph, a trained model's encoding description).
    A job's key carries it, so replacing a file or retraining into the same name never resumes
    the old results."""
    parts = [module_digest(model)]
    if spec.get("file") is not None:
        parts.append(file_digest(spec["file"]))
    if spec.get("trained") is not None:
        described = trained_dir(spec["trained"]) / DESCRIPTION
        if described.is_file():
            parts.append(file_digest(described))
    return parts[0] if len(parts) == 1 else hashlib.sha256("+".join(parts).encode()).hexdigest()[:20]
