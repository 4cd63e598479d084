"""Plugin parameters, declared once: a pydantic model per plugin, validated by the registry and by
the constructor alike, with one-line errors.

Every attack, defense stage, image transformation, traversal and training recipe declares its
parameters as a nested ``Params`` class (a :class:`Params` subclass) and nothing else::

    class PGD(GradientAttack):
        class Params(params.Params):
            steps: params.Count = 40
            step_size: params.PositiveNumber | None = None

``Configurable.__init__`` validates the keyword arguments through it (so ``PGD(steps=0)`` and
``ATTACKS.create("pgd", steps=0)`` fail the same way), keeps the validated values as ``self.p``
and as attributes of the same names, and ``params()`` reads them back. A plugin author gets the
same validation for free. Cross-field rules go in the Params class (a pydantic
``model_validator``); the error names the plugin, the field and what is allowed.

The field types below refuse what a YAML config can silently turn into a number (``true`` for
1, ``"3"`` for 3): whole numbers are strict integers, numbers refuse booleans, and every number
is finite.
"""

from __future__ import annotations

import inspect
import math
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from advbench.errors import ConfigError


def _no_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"must be a number, not {value!r}")
    return value


def _fraction(value: Any) -> Any:
    """A number, or a fraction string such as ``"8/255"``."""
    if isinstance(value, str) and "/" in value:
        num, den = (p.strip() for p in value.split("/", 1))
        try:
            return float(num) / float(den)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"must be a number or a fraction like '8/255', got {value!r}") from None
    return _no_bool(value)


#: a whole number >= 1
Count = Annotated[int, Field(strict=True, ge=1)]
#: a whole number >= 0
Natural = Annotated[int, Field(strict=True, ge=0)]
#: a finite number > 0 (an int or a float; not a string, not a boolean)
PositiveNumber = Annotated[float, BeforeValidator(_no_bool), Field(strict=True, gt=0, allow_inf_nan=False)]
#: a finite number >= 0
NonNegativeNumber = Annotated[float, BeforeValidator(_no_bool), Field(strict=True, ge=0, allow_inf_nan=False)]
#: a finite number
Number = Annotated[float, BeforeValidator(_no_bool), Field(strict=True, allow_inf_nan=False)]
#: a number in [0, 1]
UnitInterval = Annotated[float, BeforeValidator(_no_bool), Field(strict=True, ge=0, le=1)]
#: a finite number > 0, also written as a fraction ("8/255")
Budget = Annotated[float, BeforeValidator(_fraction), Field(strict=True, gt=0, allow_inf_nan=False)]
#: true or false (not 1, not "yes")
Flag = Annotated[bool, Field(strict=True)]


class Params(BaseModel):
    """A plugin's parameters (no fields: the plugin takes none)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False, arbitrary_types_allowed=True)


def describe_error(kind: str, name: str, exc: ValidationError, allowed: list[str]) -> str:
    """One line for the first problems of a validation error, naming the plugin and the field."""
    errors = exc.errors()
    extra = [".".join(str(p) for p in e["loc"]) for e in errors if e["type"] == "extra_forbidden"]
    parts = [f"unknown parameter(s) {', '.join(extra)}; allowed: {', '.join(allowed) if allowed else 'none'}"] if extra else []
    for err in [e for e in errors if e["type"] != "extra_forbidden"][: 3 - len(parts)]:
        field = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        got = err.get("input")
        where = f"{field}: " if field else ""
        parts.append(f"{where}{msg} (got {got!r})" if field and not isinstance(got, dict) else f"{where}{msg}")
    shown = len(extra) + len(parts) - (1 if extra else 0)
    more = f" (+{len(errors) - shown} more)" if len(errors) > shown else ""
    return f"{kind} {name!r}: " + "; ".join(parts) + more


def validate(cls: type, values: dict[str, Any], kind: str, name: str | None = None) -> Params:
    """``values`` validated into ``cls.Params`` (a one-line ConfigError naming ``kind`` and the plugin)."""
    schema: type[Params] = getattr(cls, "Params", Params)
    try:
        return schema.model_validate(values)
    except ValidationError as exc:
        label = name or getattr(cls, "name", None) or cls.__name__
        raise ConfigError(describe_error(kind, label, exc, list(schema.model_fields))) from None


class Configurable:
    """A plugin configured by keyword arguments validated through its ``Params`` class.

    Subclasses declare ``Params`` and, where they need more than the validated values, override
    :meth:`setup` (called once after validation). ``plugin_kind`` names the family in errors."""

    Params: ClassVar[type[Params]] = Params
    plugin_kind: ClassVar[str] = "plugin"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Give the class the signature its Params declare (keyword-only, with the defaults), so
        ``help()``, ``inspect.signature`` and editors show the real parameters."""
        super().__init_subclass__(**kwargs)
        if _declares_own_init(cls):  # a plugin with a constructor of its own keeps its signature
            cls.__signature__ = None  # type: ignore[attr-defined]  (not the Params-made one it inherits)
            return
        fields = getattr(cls, "Params", Params).model_fields
        cls.__signature__ = inspect.Signature([  # type: ignore[attr-defined]
            inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY,
                              default=inspect.Parameter.empty if f.is_required() else f.default)
            for k, f in fields.items()
        ])

    def __init__(self, **values: Any) -> None:
        self.p = validate(type(self), values, self.plugin_kind)
        for field in type(self.p).model_fields:
            if not hasattr(type(self), field):  # a method or property of that name reads self.p itself
                setattr(self, field, getattr(self.p, field))
        self.setup()

    def setup(self) -> None:
        """Work the validated parameters call for (derived values, inner plugins); none by default."""

    def params(self) -> dict[str, Any]:
        """The validated parameters, by name (a plugin written with a constructor of its own, that
        keeps its arguments as attributes, is read back through that constructor's signature)."""
        p = self.__dict__.get("p")
        if isinstance(p, Params) and not _declares_own_init(type(self)):
            return {k: getattr(p, k) for k in type(p).model_fields}
        names = [n for n in inspect.signature(type(self).__init__).parameters if n != "self"]
        return {n: getattr(self, n) for n in names if hasattr(self, n)}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


def _declares_own_init(cls: type) -> bool:
    """Whether ``cls`` (or a class between it and Configurable) writes its own constructor."""
    owner = next(c for c in cls.__mro__ if "__init__" in c.__dict__)
    return owner is not Configurable


def check_whole(value: Any, what: str, minimum: int | None = None) -> int:
    """``value`` as a whole number (>= ``minimum``), else a one-line ConfigError: the one check
    for parameters that are not a plugin's (a threat model's budget, a tolerance, ...)."""
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ConfigError(f"{what} must be a whole number{bound}, got {value!r}")
    return value


def check_number(value: Any, what: str, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a finite number in the given range, else a one-line ConfigError."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        if low is not None and high is not None:
            span = f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None:
            span = f" {'>' if low_open else '>='} {low:g}"
        elif high is not None:
            span = f" {'<' if high_open else '<='} {high:g}"
        else:
            span = ""
        raise ConfigError(f"{what} must be a finite number{span}, got {value!r}")
    return float(value)
