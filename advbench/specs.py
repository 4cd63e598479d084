"""The vocabulary every config shares: data, model and defense specs, numbers, seeds, YAML.

A spec names something to load (a data set, a model, a defense or a chain of them) as plain,
validated data; :mod:`advbench.loading` turns it into the object. The benchmark config
(:mod:`advbench.config`), the train config, the blind-spot config and a transfer attack's source
all use these, so they live on a floor below all of them. Bad input is a one-line
:class:`~advbench.errors.ConfigError` naming the field.
"""

from __future__ import annotations

import re
from fractions import Fraction
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from advbench.errors import ConfigError
from advbench.files import check_name

_FRACTION = re.compile(r"^\s*[0-9]*\.?[0-9]+\s*/\s*[0-9]*\.?[0-9]+\s*$")


def parse_number(value: Any, what: str) -> float:
    """A float from a number or a fraction string such as ``"8/255"``."""
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be a number, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        s = value.strip()
        if _FRACTION.match(s):
            num, den = (Fraction(p.strip()) for p in s.split("/"))
            if den == 0:
                raise ConfigError(f"{what} divides by zero: {value!r}")
            return float(num / den)
        try:
            return float(s)
        except ValueError:
            pass
    raise ConfigError(f"{what} must be a number or a fraction like '8/255', got {value!r}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


#: the largest seed a config takes: every generator and derived seed accepts it on every platform
MAX_SEED = 2**32 - 1


def check_device(value: str) -> str:
    """A config's ``device``: auto, cpu, cuda, cuda:N or mps (a ValueError for pydantic otherwise)."""
    if value not in ("auto", "cpu", "cuda", "mps") and not re.fullmatch(r"cuda:\d+", value):
        raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {value!r}")
    return value


def seed_field() -> Any:
    """A config's ``seed``: a whole number from 0 to :data:`MAX_SEED`."""
    return Field(default=0, ge=0, le=MAX_SEED)


class DataSpec(_Strict):
    """Which examples to evaluate: a registered data set (``name``) or an ``.npz`` file (``path``)."""

    name: str | None = None
    path: str | None = None
    split: str = "test"
    n: int | None = Field(default=None, ge=1)
    root: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        if (self.name is None) == (self.path is None):
            raise ValueError("give exactly one of 'name' (a registered data set) or 'path' (an .npz file)")
        return self


MODEL_SOURCES = ("file", "import", "torchvision", "timm", "robustbench", "trained")


class ModelSpec(_Strict):
    """A model to evaluate. ``name`` labels it in the results; without a source key it is a registered model."""

    name: str
    file: str | None = None
    import_: str | None = Field(default=None, alias="import")
    torchvision: str | None = None
    timm: str | None = None
    robustbench: str | None = None
    trained: str | None = None  # a model `advbench train` wrote: <ADVBENCH_CACHE>/trained/<trained>/
    weights: str | None = None
    num_classes: int | None = Field(default=None, ge=2)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    dataset: str | None = None
    threat_model: str | None = None
    model_dir: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:  # it names files (leaderboard entries, saved examples)
        return check_name(value, "model name")

    @field_validator("trained")
    @classmethod
    def _safe_trained(cls, value: str | None) -> str | None:  # a folder under the trained store
        return None if value is None else check_name(value, "trained model name")

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        given = [k for k in MODEL_SOURCES if getattr(self, "import_" if k == "import" else k) is not None]
        if len(given) > 1:
            raise ValueError(f"model {self.name!r} names several sources {given}; give one of {list(MODEL_SOURCES)}")
        return self

    @property
    def source(self) -> str:
        for k in MODEL_SOURCES:
            if getattr(self, "import_" if k == "import" else k) is not None:
                return k
        return "registry"


class DefenseSpec(_Strict):
    """A registered defense (``jpeg``, ``{name: jpeg, quality: 50}``), or a chain of them given as
    a YAML list (``[jpeg, {name: randomization, ...}]``): the stages apply in order to the raw
    input, then the model; the chain is named by its stage names joined with ``+``."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    stages: tuple[DefenseSpec, ...] = ()  # a chain's stages (empty for a single defense)

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"name": value}
        if isinstance(value, (list, tuple)):
            if not value:
                raise ValueError("a defense chain (a list) needs at least one stage")
            if any(isinstance(s, (list, tuple)) for s in value):
                raise ValueError("defense chains do not nest: list each stage as a name or a {name: ...} mapping")
            names = [s if isinstance(s, str) else str(s.get("name", "?")) if isinstance(s, dict) else "?" for s in value]
            return {"name": "+".join(names), "stages": list(value)}
        if isinstance(value, dict) and "name" in value and "params" not in value:
            meta = ("name", "stages")
            return {**{k: value[k] for k in meta if k in value},
                    "params": {k: v for k, v in value.items() if k not in meta}}
        return value

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        return check_name(value, "defense name")

    @model_validator(mode="after")
    def _chain(self) -> DefenseSpec:
        if self.stages and self.params:
            raise ValueError(f"defense chain {self.name!r} takes no params of its own; give them to its stages")
        for s in self.stages:
            if s.stages:
                raise ValueError("defense chains do not nest: list each stage as a name or a {name: ...} mapping")
            if s.name == "none":
                raise ValueError(f"defense chain {self.name!r}: 'none' cannot be a stage")
        return self


def _format_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err["loc"] if p not in ("function-after", "function-before"))
        msg = err["msg"].removeprefix("Value error, ")
        got = err.get("input")
        where = f"{loc}: " if loc else ""
        extra = f" (got {got!r})" if err["type"] in ("extra_forbidden",) else ""
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{where}{msg}{extra}")
    more = f" (+{len(exc.errors()) - 3} more)" if len(exc.errors()) > 3 else ""
    return "invalid config: " + "; ".join(parts) + more


_M = TypeVar("_M", bound=BaseModel)


def validated(model: type[_M], raw: Any, what: str) -> _M:
    """``raw`` (a parsed YAML mapping) validated into ``model`` (ConfigError, one line, on bad input)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{what} must be a mapping of fields, got {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from None


def read_yaml_file(path: str | Path) -> Any:
    """The parsed contents of a YAML file (ConfigError naming the file, and the line of a syntax error)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{p}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
