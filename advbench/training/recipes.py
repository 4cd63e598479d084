"""Training recipes: what one training batch costs the model, for each defense that trains.

=================  ==========================================================================
``plain``          standard training, cross-entropy on the clean batch (the reference).
``madry``          PGD adversarial training (Madry et al. 2018): each batch is replaced by PGD
                   examples in the linf ``eps``-ball (``steps``, ``step_size``, default
                   2.5 eps / steps, ``random_start``), and the model is trained on them only.
``fast``           "Fast is better than free" (Wong, Rice & Kolter 2020): FGSM from a uniform
                   random start in the ball, step ``alpha`` = 1.25 eps by default.
``trades``         TRADES (Zhang et al. 2019): CE(f(x), y) + ``beta`` * KL(f(x) || f(x')), x'
                   from PGD on that KL (from x + 0.001 N(0, I)); ``beta`` default 6.
``distillation``   defensive distillation (Papernot et al. 2016): a teacher trained with
                   softmax(z / T), the training set labelled with the teacher's softmax at T, a
                   student of the same architecture trained at T on those soft labels, deployed
                   at T = 1 (the saved model returns its raw logits). ``temperature`` default
                   100; ``teacher_epochs`` default: the config's ``epochs``.
``thermometer``    a classifier trained on thermometer codes (Buckman et al. 2018), ``levels``
                   default 16; saved as ``DefendedModel([thermometer], classifier)`` whose
                   classifier takes C * levels channels. ``adversarial: true`` (default false)
                   adds PGD adversarial training as Buckman et al. did: the examples are found
                   in pixel space through the BPDA view (real codes forward, the soft ramp's
                   gradient backward), not by the paper's LS-PGA in code space.
=================  ==========================================================================

Each recipe is registered in :data:`advbench.registry.RECIPES` (``advbench list recipes``) and
declares its parameters once, as a pydantic ``Params`` class (:mod:`advbench.params`): unknown or
bad values are one-line ConfigErrors. ``eps`` may be written as a fraction (``"8/255"``).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from pydantic import model_validator

from advbench import params
from advbench.defenses.base import adaptive
from advbench.registry import RECIPES
from advbench.specs import parse_number
from advbench.training import perturb


class Phase(NamedTuple):
    """One model trained from scratch for ``epochs`` (distillation has two: teacher, student)."""

    name: str
    epochs: int


# ---------------------------------------------------------------------------- parameters
class _EpsParams(params.Params):
    eps: float

    @field_validator("eps", mode="before")
    @classmethod
    def _parse_eps(cls, value: Any) -> Any:
        return value if value is None else parse_number(value, "eps")

    @field_validator("eps")
    @classmethod
    def _eps_range(cls, value: float | None) -> float | None:
        if value is not None and not (math.isfinite(value) and 0 < value <= 1):
            raise ValueError(f"eps must lie in (0, 1], got {value}")
        return value


class _PGDParams(_EpsParams):
    steps: int = Field(default=10, ge=1)
    step_size: float | None = Field(default=None, gt=0)  # None: 2.5 * eps / steps
    random_start: bool = True

    def alpha(self) -> float:
        return self.step_size if self.step_size is not None else 2.5 * self.eps / self.steps


class FastParams(_EpsParams):
    alpha: float | None = Field(default=None, gt=0)  # None: 1.25 * eps


class TradesParams(_PGDParams):
    beta: float = Field(default=6.0, ge=0)


class DistillationParams(params.Params):
    temperature: float = Field(default=100.0, gt=0)
    teacher_epochs: int | None = Field(default=None, ge=1)


class ThermometerParams(_PGDParams):
    levels: int = Field(default=16, ge=2, le=1024)
    adversarial: bool = False
    eps: float | None = None  # type: ignore[assignment]  (needed only with adversarial: true)

    @model_validator(mode="after")
    def _adversarial_needs_eps(self) -> ThermometerParams:
        if self.adversarial and self.eps is None:
            raise ValueError("adversarial: true needs eps")
        return self


# ---------------------------------------------------------------------------- recipes
@RECIPES.register("plain", description="Standard training: cross-entropy on the clean batch")
class TrainingRecipe(params.Configurable):
    """The plain recipe; subclasses change the batch loss, the phases or the deployed model."""

    plugin_kind: ClassVar[str] = "recipe"
    name: ClassVar[str] = "plain"

    @property
    def eps(self) -> float | None:
        """The linf budget the recipe trains against (the card's default PGD eps), if any."""
        return getattr(self.p, "eps", None)

    def phases(self, epochs: int) -> list[Phase]:
        return [Phase("train", epochs)]

    def stages(self) -> list[dict[str, Any]]:
        """The deployed model's defense stages (``{"name", "params"}``), applied before the classifier."""
        return []

    def in_channels(self, channels: int) -> int | None:
        """The classifier's input channels when they differ from the data's, else None."""
        return None

    def targets(self, phase: Phase, previous: nn.Module | None, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """What the phase's model is trained to output for the training images ``x``."""
        return y

    def inputs(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        """The batch the model is trained on (adversarial recipes replace ``x``)."""
        return x

    def loss(self, phase: Phase, model: nn.Module, x: torch.Tensor, t: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        """The mean training loss of one batch (``t``: the phase's targets for it)."""
        return F.cross_entropy(model(self.inputs(model, x, t, g)), t)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "params": self.p.model_dump(mode="json")}


def _attack_view(model: nn.Module) -> nn.Module:
    """What a training attack differentiates: the BPDA/EoT view of a defended model, else the model."""
    return adaptive(model)


@RECIPES.register("madry", description="PGD adversarial training (Madry et al. 2018)")
class Madry(TrainingRecipe):
    name = "madry"
    Params = _PGDParams

    def inputs(self, model, x, y, g):  # type: ignore[override]
        p = self.p
        return perturb.pgd_linf(
            _attack_view(model), x, y, eps=p.eps, steps=p.steps, step_size=p.alpha(), random_start=p.random_start, generator=g
        )


@RECIPES.register("fast", description="FGSM from a random start (Wong et al. 2020)")
class Fast(TrainingRecipe):
    name = "fast"
    Params = FastParams

    def alpha(self) -> float:
        return self.p.alpha if self.p.alpha is not None else 1.25 * self.p.eps

    def inputs(self, model, x, y, g):  # type: ignore[override]
        return perturb.fgsm_random_start(_attack_view(model), x, y, eps=self.p.eps, alpha=self.alpha(), generator=g)


@RECIPES.register("trades", description="TRADES: CE plus beta KL to PGD examples (Zhang et al. 2019)")
class Trades(TrainingRecipe):
    name = "trades"
    Params = TradesParams

    def inputs(self, model, x, y, g):  # type: ignore[override]
        p = self.p
        return perturb.trades_kl(_attack_view(model), x, eps=p.eps, steps=p.steps, step_size=p.alpha(), generator=g)

    def loss(self, phase, model, x, t, g):  # type: ignore[override]
        x_adv = self.inputs(model, x, t, g)
        logits = model(x)
        robust = F.kl_div(F.log_softmax(model(x_adv), dim=1), F.softmax(logits, dim=1), reduction="batchmean")
        return F.cross_entropy(logits, t) + self.p.beta * robust


@RECIPES.register("distillation", description="Defensive distillation at temperature T (Papernot et al. 2016)")
class Distillation(TrainingRecipe):
    name = "distillation"
    Params = DistillationParams

    def phases(self, epochs: int) -> list[Phase]:
        return [Phase("teacher", self.p.teacher_epochs or epochs), Phase("student", epochs)]

    def targets(self, phase, previous, x, y):  # type: ignore[override]
        if phase.name == "teacher":
            return y
        assert previous is not None
        return soft_labels(previous, x, self.p.temperature)

    def loss(self, phase, model, x, t, g):  # type: ignore[override]
        log_p = F.log_softmax(model(x) / self.p.temperature, dim=1)
        if phase.name == "teacher":
            return F.nll_loss(log_p, t)
        return -(t * log_p).sum(dim=1).mean()  # cross-entropy with the teacher's soft labels


def soft_labels(teacher: nn.Module, x: torch.Tensor, temperature: float, batch_size: int = 1000) -> torch.Tensor:
    """softmax(teacher(x) / T) per example (rows sum to 1), computed in eval mode."""
    with perturb.eval_mode(teacher), torch.no_grad():
        return torch.cat([F.softmax(teacher(xb) / temperature, dim=1) for xb in x.split(batch_size)])


@RECIPES.register("thermometer", description="A classifier on thermometer codes (Buckman et al. 2018)")
class ThermometerRecipe(TrainingRecipe):
    name = "thermometer"
    Params = ThermometerParams

    def stages(self) -> list[dict[str, Any]]:
        return [{"name": "thermometer", "params": {"levels": self.p.levels}}]

    def in_channels(self, channels: int) -> int | None:
        return channels * self.p.levels

    def describe(self) -> dict[str, Any]:
        pgd = ("eps", "steps", "step_size", "random_start")  # unused unless adversarial
        exclude = set() if self.p.adversarial else set(pgd)
        return {"name": self.name, "params": self.p.model_dump(mode="json", exclude=exclude)}

    def inputs(self, model, x, y, g):  # type: ignore[override]
        p = self.p
        if not p.adversarial:
            return x
        return perturb.pgd_linf(
            _attack_view(model), x, y, eps=p.eps, steps=p.steps, step_size=p.alpha(), random_start=p.random_start, generator=g
        )


def make_recipe(name: str, values: dict[str, Any] | None = None) -> TrainingRecipe:
    """The registered recipe ``name`` with its parameters validated (one-line ConfigError)."""
    return RECIPES.create(name, **dict(values or {}))
