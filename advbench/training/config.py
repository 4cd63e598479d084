"""The train config (``advbench train CONFIG.yaml``): YAML in, a validated TrainConfig out.

Example (``configs/train-digits-madry.yaml``)::

    name: digits-madry                  # the output: <ADVBENCH_CACHE>/trained/digits-madry/
    architecture: digits-cnn            # a reference architecture (advbench.models.architectures)
    data: {name: digits, split: train}  # the training split (a DataSpec; ``n`` keeps the first n)
    eval: {split: test, eps: 0.1}       # the evaluation split, and the eps of the card's PGD
    recipe: {name: madry, eps: 0.1, steps: 10}
    epochs: 15
    batch_size: 64
    lr: 3.0e-3
    seed: 0

Every field is checked before anything trains; bad input is a one-line
:class:`~advbench.errors.ConfigError` naming the field. The recipe's own parameters are
checked against the recipe's schema (:mod:`advbench.training.recipes`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from advbench.errors import ConfigError
from advbench.models import architectures
from advbench.registry import DATASETS
from advbench.specs import DataSpec, _Strict, check_device, parse_number, read_yaml_file, seed_field, validated
from advbench.training.recipes import make_recipe

#: splits of one data set that share images (MNIST's ``test`` holds ``test-train`` and ``test-eval``)
_OVERLAPPING = {frozenset({"test", "test-train"}), frozenset({"test", "test-eval"})}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def _number(value: Any, what: str) -> Any:
    return None if value is None else parse_number(value, what)


class RecipeSpec(_Strict):
    """A training recipe and its parameters, written flat (``{name: madry, eps: 0.1, steps: 10}``)
    or as a bare name (``plain``)."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _flat(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = {"name": value}
        if not isinstance(value, dict) or "params" in value:
            return value
        params = {k: v for k, v in value.items() if k != "name"}
        return {"params": params} | ({"name": value["name"]} if "name" in value else {})


class EvalSpec(_Strict):
    """Where and how the card measures the trained model: the split, and PGD's settings.

    The evaluation data is the training ``data`` with ``split`` (or ``path``) replaced; ``n``
    keeps its first n images (as ``data.n`` does for training). ``eps`` defaults to the recipe's
    own (a recipe without one, such as ``plain``, needs it here). PGD is linf, ``steps`` of
    ``step_size`` (default 2.5 eps / steps) from a random start, ``restarts`` times.
    """

    split: str | None = None
    path: str | None = None
    n: int | None = Field(default=None, ge=1)
    eps: float | None = None
    steps: int = Field(default=20, ge=1)
    step_size: float | None = None
    restarts: int = Field(default=1, ge=1)
    batch_size: int = Field(default=500, ge=1)

    @field_validator("eps", "step_size", mode="before")
    @classmethod
    def _numbers(cls, value: Any) -> Any:
        return _number(value, "eval eps and step_size")

    @field_validator("eps", "step_size")
    @classmethod
    def _positive(cls, value: float | None) -> float | None:
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"must be finite and > 0, got {value}")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> EvalSpec:
        if (self.split is None) == (self.path is None):
            raise ValueError("give exactly one of 'split' (of the training data set) or 'path' (an .npz file)")
        return self


class TrainConfig(_Strict):
    """Everything ``advbench train`` needs; ``canonical()`` is stored next to the trained model."""

    name: str
    architecture: str
    data: DataSpec
    eval: EvalSpec
    recipe: RecipeSpec = Field(default_factory=lambda: RecipeSpec(name="plain"))
    epochs: int = Field(ge=1)
    batch_size: int = Field(default=64, ge=1)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    schedule: Literal["constant", "onecycle"] = "constant"
    augmentation: Literal["none", "shift-2", "crop-4+hflip"] = "none"
    seed: int = seed_field()
    device: str = "cpu"
    threads: int = Field(default=1, ge=1)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(
                f"name must be 1-100 letters, digits, '.', '_' or '-' (a folder name), starting with a letter or digit; got {value!r}"
            )
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        return check_device(value)  # the same devices as an evaluation

    @model_validator(mode="after")
    def _splits(self) -> TrainConfig:
        if "split" not in self.data.model_fields_set and self.data.path is None:
            raise ValueError("data.split must be given (the training split, e.g. 'train', or 'test-train' for MNIST)")
        if self.eval.split is not None:
            if self.data.path is not None:
                raise ValueError("data comes from an .npz path, so eval needs a 'path' too, not a split")
            pair = {self.data.split, self.eval.split}
            if len(pair) == 1 or pair in _OVERLAPPING:
                raise ValueError(
                    f"the evaluation split {self.eval.split!r} overlaps the training split {self.data.split!r}; "
                    "evaluate on held-out data (digits: train/test, MNIST: test-train/test-eval)"
                )
        return self

    # ------------------------------------------------------------------ derived
    def canonical(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def hash(self) -> str:
        """16 hex digits over everything that changes the trained weights (not device or threads)."""
        blob = {k: v for k, v in self.canonical().items() if k not in ("device", "threads")}
        return hashlib.sha256(json.dumps(blob, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]

    def data_spec(self) -> dict[str, Any]:
        """The training DataSpec as a dict (what :func:`advbench.loading.load_data` reads)."""
        return self.data.model_dump(mode="json")

    def eval_data_spec(self) -> dict[str, Any]:
        """The evaluation DataSpec: the training data with the eval split (or path)."""
        spec = self.data_spec()
        if self.eval.path is not None:
            return {**spec, "name": None, "path": self.eval.path, "params": {}, "n": self.eval.n}
        return {**spec, "split": self.eval.split, "n": self.eval.n}


def parse_train_config(raw: Any, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Validate a parsed YAML mapping (plus ``overrides`` of top-level fields) into a TrainConfig."""
    if isinstance(raw, dict) and overrides:
        raw = {**raw, **overrides}
    config = validated(TrainConfig, raw, "a train config")
    _check_names(config)
    return config


def load_train_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read and validate a train config file (ConfigError, one line, on bad input)."""
    return parse_train_config(read_yaml_file(path), overrides)


def _check_names(config: TrainConfig) -> None:
    """The architecture, the data set and the recipe (with its parameters) exist; eval has an eps."""
    architectures.get(config.architecture)
    if config.data.name is not None:
        DATASETS.get(config.data.name)
    recipe = make_recipe(config.recipe.name, config.recipe.params)
    if config.eval.eps is None and recipe.eps is None:
        raise ConfigError(
            f"eval.eps is needed: recipe {config.recipe.name!r} has no eps of its own for the card's PGD evaluation"
        )


def robust_eps(config: TrainConfig) -> float:
    """The eps of the card's PGD evaluation: ``eval.eps``, else the recipe's."""
    eps = config.eval.eps if config.eval.eps is not None else make_recipe(config.recipe.name, config.recipe.params).eps
    assert eps is not None  # guaranteed by _check_names
    return eps
