"""Black-box evaluation by transfer (Szegedy et al. 2014; Madry et al. 2018's sources A, A', B).

The attacker has no access to the target model: it crafts adversarial examples white-box on a
*source* model it holds (another architecture, another training run, another training set) and
the target is scored on them. The base class hands a transfer attack an
:class:`~advbench.access.NoAccess` handle, so it cannot query the target, and audits the
examples on the target like any other attack's; a transfer attack therefore takes part in the
evaluator's worst case over attacks.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from pydantic import Field, field_validator
from torch import nn

from advbench.access import Handle, NoAccess
from advbench.attacks.base import Attack
from advbench.errors import ConfigError
from advbench.loading import load_model
from advbench.specs import ModelSpec
from advbench import params
from advbench.registry import ATTACKS
from advbench.threat import Knowledge, Targeting, ThreatModel


def _attack_entry(attack: Any) -> dict[str, Any]:
    """``attack`` as ``{"name": ..., **params}`` (a bare name, a flat mapping or ``{name, params}``)."""
    if attack is None:
        return {"name": "pgd"}
    if isinstance(attack, str):
        return {"name": attack}
    if not isinstance(attack, dict) or not isinstance(attack.get("name"), str):
        got = f", got {attack!r}" if isinstance(attack, dict) else ""  # other values: the error adds "(got ...)"
        raise ValueError(f"must be an attack name or a mapping with a 'name'{got}")
    inner = attack.get("params")
    if inner is not None:
        if set(attack) - {"name", "params"} or not isinstance(inner, dict):
            raise ValueError(f"give the parameters either flat or under 'params', got {attack!r}")
        return {"name": attack["name"], **inner}
    return dict(attack)


@ATTACKS.register("transfer", description="Transfer from a source model: a white-box attack on the source, scored on the target")
class Transfer(Attack):
    """Craft on ``source`` with the white-box ``attack`` (default PGD), score on the target.

    ``source`` is a model spec as in configs (``{name: digits-mlp}``, ``{name: a, trained: a}``,
    or a bare registry name), built with :func:`advbench.loading.load_model` once per attack
    instance (and moved to the inputs' device). ``attack`` is the white-box attack run on the
    source: a registered name, or a mapping ``{name: pgd, steps: 100}``. It runs under the
    target's threat model (same norm, eps, bounds, targeting) with white-box knowledge of the
    source. Norms and targeting are those of the source attack, less least-likely targeting (its
    target class would come from the target model's logits). The result's ``n_forward`` and
    ``n_backward`` are the passes spent on the source; ``n_queries`` on the target is 0.
    """

    knowledge: ClassVar[frozenset[Knowledge]] = frozenset({Knowledge.TRANSFER})
    minimal: ClassVar[bool] = False
    kind: ClassVar[str] = "transfer"

    class Params(params.Params):
        source: str | dict[str, Any]
        #: the white-box attack on the source, kept as ``{"name": ..., **params}``; None: PGD
        attack: str | dict[str, Any] | None = Field(default=None, validate_default=True)

        @field_validator("source", mode="before")
        @classmethod
        def _spec_like(cls, value: Any) -> Any:
            if not isinstance(value, (str, dict)):
                raise ValueError("must be a model spec: a model name or a mapping such as {name: digits-mlp}")
            return value

        @field_validator("attack", mode="before")
        @classmethod
        def _entry(cls, value: Any) -> dict[str, Any]:
            return _attack_entry(value)

    def setup(self) -> None:
        try:
            self._spec = ModelSpec.model_validate(self.source).model_dump(by_alias=True)
        except ValueError as err:  # pydantic's ValidationError is a ValueError
            raise ConfigError(f"transfer: source is not a model spec ({self.source!r}): {err}") from None
        entry = self.attack
        inner = ATTACKS.create(entry["name"], **{k: v for k, v in entry.items() if k != "name"})
        if Knowledge.WHITE_BOX not in inner.knowledge:
            raise ConfigError(f"transfer: the source attack {entry['name']!r} must be a white-box attack")
        self._inner = inner
        self.norms = inner.norms
        self.targeting = inner.targeting - {Targeting.LEAST_LIKELY}
        self._model: nn.Module | None = None

    @property
    def randomized(self) -> bool | None:  # type: ignore[override]
        """As the source attack."""
        return getattr(self._inner, "randomized", None)

    def source_model(self, device: torch.device | str = "cpu") -> nn.Module:
        """The source model on ``device``, built on first use and cached in this instance."""
        if self._model is None:
            self._model = load_model(self._spec).eval()
        return self._model.to(device)

    def source_threat(self, threat: ThreatModel) -> ThreatModel:
        """The threat model the source attack runs under: the target's, with white-box knowledge."""
        return dataclasses.replace(threat, knowledge=Knowledge.WHITE_BOX, query_budget=None)

    def _run(
        self,
        model: Handle,
        x: torch.Tensor,
        y: torch.Tensor,
        threat: ThreatModel,
        target: torch.Tensor | None,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        res = self._inner(self.source_model(x.device), x, y, self.source_threat(threat), target=target,
                          generator=generator)
        if isinstance(model, NoAccess):  # report the source passes as the attack's cost
            model.n_forward += res.n_forward
            model.n_backward += res.n_backward
        return res.x_adv

