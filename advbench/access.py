"""Model handles that enforce the attacker's knowledge and count what the attack used.

Passes are counted **per example** (as AttackBench does): a forward call on a batch of B inputs
is B forward passes, a backward through it B backward passes, whatever the batch size, so costs
compare across configs, batch sizes and peer libraries. A model that runs its classifier several
times per input (an EoT view over S draws) says so with ``passes_per_input`` (S).

- :class:`WhiteBoxModel`: logits with gradients; counts forward and backward passes.
- :class:`ScoreOracle`: probabilities only (no gradient can flow), queries counted per example.
- :class:`LabelOracle`: top-1 labels only, queries counted per example.
- :class:`NoAccess`: a transfer attacker's handle: no access to the target; any use raises.

Oracles take an optional ``index`` tensor naming, for every row of the query batch, which
example of the attacked batch it belongs to (a population of candidates for one image shares
its index). Without it, a batch of exactly N rows is taken to be examples 0..N-1. A query that
would take any example past the threat model's ``query_budget`` raises
:class:`~advbench.errors.QueryBudgetExceeded` *before* the model runs, so the budget is never
exceeded; the attack base class then stops the attack and keeps what it had.
"""

from __future__ import annotations

import torch
from torch import nn

from advbench.errors import ConfigError, QueryBudgetExceeded, UnsupportedThreatError
from advbench.threat import Knowledge, ThreatModel


class WhiteBoxModel(nn.Module):
    """Full access: returns logits, differentiable w.r.t. the input; counts passes."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.n_forward = 0
        self.n_backward = 0
        self._per_input = int(getattr(model, "passes_per_input", 1))

    def _count_backward(self, grad: torch.Tensor) -> None:
        self.n_backward += grad.shape[0] * self._per_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.n_forward += x.shape[0] * self._per_input
        out = self.model(x)
        if out.requires_grad:
            out.register_hook(self._count_backward)
        return out


class _Oracle:
    """Shared query accounting for score- and decision-based handles."""

    def __init__(self, model: nn.Module, n_examples: int, budget: int | None) -> None:
        self._model = model
        self.n_examples = n_examples
        self.budget = budget
        self.queries = torch.zeros(n_examples, dtype=torch.long)
        self.n_forward = 0
        self.n_backward = 0

    def _charge(self, rows: int, index: torch.Tensor | None) -> None:
        if index is None:
            if rows != self.n_examples:
                raise ConfigError(
                    f"a query of {rows} rows needs an index naming each row's example (batch has {self.n_examples})"
                )
            add = torch.ones(self.n_examples, dtype=torch.long)
        else:
            index = index.detach().to("cpu", torch.long).reshape(-1)
            if index.numel() != rows:
                raise ConfigError(f"index has {index.numel()} entries for a query of {rows} rows")
            add = torch.bincount(index, minlength=self.n_examples)
        if self.budget is not None and bool(((self.queries + add) > self.budget).any()):
            raise QueryBudgetExceeded(f"query budget of {self.budget} per example would be exceeded")
        self.queries += add

    @torch.no_grad()
    def _logits(self, x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        self._charge(x.shape[0], index)
        self.n_forward += x.shape[0]
        return self._model(x.detach())

    def remaining(self) -> torch.Tensor:
        """Queries left per example (a large number when there is no budget)."""
        if self.budget is None:
            return torch.full_like(self.queries, 2**62)
        return self.budget - self.queries


class ScoreOracle(_Oracle):
    """Score-based access: class probabilities only."""

    def __call__(self, x: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        return self._logits(x, index).float().softmax(dim=1)

    def log_scores(self, x: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """The log of the probabilities :meth:`__call__` returns, computed without underflow: the
        same information (the logits up to a per-row constant), so margins of confident models
        stay finite. Counted as one query per row, like ``__call__``."""
        return self._logits(x, index).float().log_softmax(dim=1)


class LabelOracle(_Oracle):
    """Decision-based access: predicted labels only."""

    def __call__(self, x: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        return self._logits(x, index).argmax(dim=1)


class NoAccess:
    """A transfer attacker's handle on the target: none. It holds no model, and calling it raises.

    ``n_forward`` and ``n_backward`` start at 0 (the target is never run); a transfer attack adds
    the passes it spent on its source model, so the result reports the attack's cost."""

    def __init__(self) -> None:
        self.n_forward = 0
        self.n_backward = 0

    def __call__(self, *args: object, **kwargs: object) -> torch.Tensor:
        raise UnsupportedThreatError(
            "a transfer attacker has no access to the target model; craft on a source model (white-box)"
        )


Handle = WhiteBoxModel | ScoreOracle | LabelOracle | NoAccess


def handle_for(model: nn.Module, threat: ThreatModel, n_examples: int) -> Handle:
    """The model handle an attacker with ``threat.knowledge`` is allowed to hold."""
    if threat.knowledge is Knowledge.WHITE_BOX:
        return WhiteBoxModel(model)
    if threat.knowledge is Knowledge.SCORE_BASED:
        return ScoreOracle(model, n_examples, threat.query_budget)
    if threat.knowledge is Knowledge.DECISION_BASED:
        return LabelOracle(model, n_examples, threat.query_budget)
    return NoAccess()  # transfer: the examples are crafted on a source model, never on ``model``
