"""AutoAttack (Croce & Hein, ICML 2020): a fixed ensemble of complementary attacks, the reference
number RobustBench ranks models by.

Each version is a list of components, as the reference code (``autoattack.py``'s
``_set_version``) configures them:

- ``standard``, linf and l2: APGD-CE (1 restart), APGD-T (9 target classes, 1 restart), FAB-T (9
  target classes, 1 restart), Square (5,000 iterations, p_init 0.8, the square-size schedule not
  rescaled to the query count); l1: APGD-CE (5 restarts) and APGD-T (5 target classes), both with
  the 3-2-1 eps schedule, and FAB-T. The reference also lists Square under l1; advbench's Square
  covers linf and l2 only (the paper's), so the l1 suite runs without it.
- ``plus``: APGD-CE and APGD-DLR (5 restarts each), FAB (5 restarts), Square, APGD-T and FAB-T
  (9 target classes, 1 restart each).
- ``rand`` (randomized defenses): APGD-CE and APGD-DLR, 1 restart, EoT over 20 draws per step.

With ``cascade`` (the reference's ``run_standard_evaluation``) each component runs on the points
the earlier ones left robust; without it (``run_standard_evaluation_individual``) each runs on
every point. Either way an example counts as broken when any component broke it. The evaluator
(:mod:`advbench.eval.plan`) runs every component as its own job through its own cascade (the
jobs' ``after``), so each is its own row and ``autoattack`` is their per-example worst case;
calling this attack directly (the Python API) runs the same components in the same order on the
same points, the cascade rule being :func:`still_robust`, each component drawing from the call
generator's state at the start (the reference seeds every component with the same seed), so a
seed gives the reference's result for the same seed. Targets beyond the model's classes are
dropped (the reference warns about them); the square component reads scores through the
white-box handle (a white-box attacker can always read scores).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from advbench import params
from advbench.access import Handle
from advbench.attacks.base import Attack, AttackResult, white_box
from advbench.errors import ConfigError
from advbench.registry import ATTACKS
from advbench.tensors import rows
from advbench.threat import Knowledge, Norm, Targeting, ThreatModel

VERSIONS = ("standard", "plus", "rand")


@dataclass(frozen=True)
class Component:
    """One attack of a version: its label in the results (``apgd-ce``), registry name and params."""

    label: str
    attack: str
    params: dict[str, Any] = field(default_factory=dict)

    def create(self) -> Attack:
        return ATTACKS.create(self.attack, **self.params)


def components(version: str, norm: Norm) -> list[Component]:
    """The components of ``version`` under ``norm``, in the reference's order and settings."""
    # the reference's n_queries = 5000 iterations after its first query: 5,001 queries in advbench's count
    square = Component("square", "square", {"queries": 5001, "p_init": 0.8, "rescale_schedule": False})
    if version == "standard":
        if norm is Norm.L1:
            return [Component("apgd-ce", "apgd", {"loss": "ce", "restarts": 5, "l1_eps_schedule": True}),
                    Component("apgd-t", "apgd-t", {"targets": 5, "restarts": 1, "l1_eps_schedule": True}),
                    Component("fab-t", "fab-t", {"targets": 9, "restarts": 1})]
        return [Component("apgd-ce", "apgd", {"loss": "ce", "restarts": 1}),
                Component("apgd-t", "apgd-t", {"targets": 9, "restarts": 1}),
                Component("fab-t", "fab-t", {"targets": 9, "restarts": 1}),
                square]
    if version == "plus":
        out = [Component("apgd-ce", "apgd", {"loss": "ce", "restarts": 5}),
               Component("apgd-dlr", "apgd", {"loss": "dlr", "restarts": 5}),
               Component("fab", "fab", {"restarts": 5}),
               square,
               Component("apgd-t", "apgd-t", {"targets": 9, "restarts": 1}),
               Component("fab-t", "fab-t", {"targets": 9, "restarts": 1})]
        return [c for c in out if not (norm is Norm.L1 and c.attack == "square")]
    if version == "rand":
        return [Component("apgd-ce", "apgd", {"loss": "ce", "restarts": 1, "eot_iter": 20}),
                Component("apgd-dlr", "apgd", {"loss": "dlr", "restarts": 1, "eot_iter": 20})]
    raise ConfigError(f"unknown AutoAttack version {version!r}; allowed: {', '.join(VERSIONS)}")


def still_robust(eligible: torch.Tensor, broken: torch.Tensor) -> torch.Tensor:
    """The cascade's rule: the examples a component gets are the eligible ones no earlier
    component broke (``broken``: a success, or an audited example the model misclassifies)."""
    return eligible & ~broken


def broke(result: AttackResult, y: torch.Tensor) -> torch.Tensor:
    """Per example: the component broke it (its audited image meets the goal)."""
    return result.success | (result.valid & (result.pred_adv != y))


@ATTACKS.register("autoattack", description="AutoAttack (Croce & Hein 2020): standard, plus or rand; linf, l2, l1")
class AutoAttack(Attack):
    """AutoAttack (module docstring): its components in order; an example is broken when any
    component broke it."""

    norms: ClassVar[frozenset[Norm]] = frozenset({Norm.LINF, Norm.L2, Norm.L1})
    targeting: ClassVar[frozenset[Targeting]] = frozenset({Targeting.UNTARGETED})
    knowledge: ClassVar[frozenset[Knowledge]] = frozenset({Knowledge.WHITE_BOX})
    randomized: ClassVar[bool | None] = True
    kind: ClassVar[str] = "suite"

    class Params(params.Params):
        version: Literal["standard", "plus", "rand"] = "standard"
        cascade: params.Flag = True  # each component only on the points still robust
        #: iterations of every APGD and FAB component (None: the reference's 100); fewer makes a
        #: quick smoke run, which is not the reference suite (the leaderboard reports none)
        steps: params.Count | None = None
        queries: params.Count | None = None  # Square's queries (None: the reference's 5,000 + the first)

    def components(self, threat: ThreatModel) -> list[Component]:
        """The components this configuration runs under ``threat`` (with ``steps``/``queries``
        replacing the reference's iteration counts where given)."""
        out = components(self.version, threat.norm)
        if self.steps is None and self.queries is None:
            return out
        changed = []
        for c in out:
            over = ({"queries": self.queries} if c.attack == "square" and self.queries is not None else
                    {"steps": self.steps} if c.attack != "square" and self.steps is not None else {})
            changed.append(Component(c.label, c.attack, {**c.params, **over}))
        return changed

    def _run(self, model: Handle, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
             target: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
        net: nn.Module = white_box(model)
        out = x.clone()
        with torch.no_grad():  # the reference starts from the clean-correct points
            everyone = net(x).argmax(dim=1) == y
        broken = torch.zeros_like(everyone)
        start = None if generator is None else generator.get_state()
        for component in self.components(threat):
            todo = still_robust(everyone, broken) if self.cascade else everyone
            idx = todo.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            draws = None  # each component from the call's seed, as the reference reseeds each one
            if generator is not None:
                draws = torch.Generator(device=generator.device)
                draws.set_state(start)
            result = component.create()(net, x[idx], y[idx], threat, generator=draws)
            new = broke(result, y[idx]) & ~broken[idx]
            out[idx] = torch.where(rows(new, result.x_adv), result.x_adv, out[idx])
            broken[idx] |= new
        return out
