"""What an iterative attack saw along its optimization path (for the evaluation-failure
indicators of :mod:`advbench.eval.indicators`: Pintor et al., "Indicators of Attack Failure",
NeurIPS 2022).

A :class:`PathRecorder` entered around an attack call (``with PathRecorder(x, y, target) as
rec: attack(...)``) is seen by the loops that report to it: :func:`advbench.attacks.losses.ascend_linf`
and ``ascend_l2`` (BIM, ILLC, PGD) and APGD's iteration. At every iterate whose gradient the attack
takes it keeps, per example:

- whether some iterate met the goal on the attacker's model, and the first iterate that did
  (the evaluator audits it on the deployed model: an adversarial point on the path that the
  attack did not return is a *silent success*);
- the logit margin toward the goal (max_{i != y} z_i - z_y, or z_t - max_{i != t} z_i: positive
  where the goal is met) at the start of its run, averaged over the 10% of iterations before the
  last 10%, and over the last 10%: a margin still rising there is *incomplete optimization*. The
  margin, not each attack's own loss, because it reads the same for every loss: a cross-entropy
  near the decision boundary is so convex that a converged ascent still looks as if it climbed.
  With restarts, targets or stages, an example keeps the windows of the last run it took part in;
- the batch mean of the loss the attack ascends over the rows of its first run, per iterate (a
  curve to show).

Everything stays on the device: a recorded step makes no host synchronisation (``.summary()``
reads it back once, at the end). Without a recorder the loops pay one context-variable lookup
per run and nothing per step, and what an attack computes never depends on being recorded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar, Token
from dataclasses import dataclass

import torch

from advbench.audit import goal_met
from advbench.tensors import rows as _rows

_CURRENT: ContextVar[PathRecorder | None] = ContextVar("advbench_path_recorder", default=None)

WINDOW_SHARE = 0.1  # each loss window is this share of a run's iterates (at least one)


def _margin(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """The logit margin toward the goal, per example (positive where it is met)."""
    labels = y if target is None else target
    z = logits.gather(1, labels.unsqueeze(1)).squeeze(1)
    other = logits.scatter(1, labels.unsqueeze(1), float("-inf")).amax(dim=1)
    return other - z if target is None else z - other


@dataclass(frozen=True)
class PathSummary:
    """What a recorder saw: every tensor is per example (N,), on the attack's device."""

    found: torch.Tensor  # bool: some iterate met the goal on the attacker's model
    x_found: torch.Tensor  # the first such iterate (the clean input where none did)
    margin_first: torch.Tensor  # the margin at the start of the example's last run (NaN: never recorded)
    margin_prev: torch.Tensor  # its mean over the window before the last (NaN: a run too short for two)
    margin_last: torch.Tensor  # its mean over the last window
    length: torch.Tensor  # long: iterates recorded in the example's last run (0: none)
    trace: list[float]  # the attack's loss, its mean over the first run's rows, per iterate

    @staticmethod
    def join(parts: list[PathSummary]) -> PathSummary:
        """The summaries of one attack run on consecutive pieces of a batch, as one."""
        if len(parts) == 1:
            return parts[0]
        cat = {name: torch.cat([getattr(p, name) for p in parts])
               for name in ("found", "x_found", "margin_first", "margin_prev", "margin_last", "length")}
        return PathSummary(**cat, trace=parts[0].trace)


class PathRecorder:
    """Records the path of the attack calls made while it is entered (module docstring).

    ``x``, ``y`` and ``target`` are the attack call's inputs, labels and targets (None when
    untargeted): the goal an iterate is judged by is the call's (misclassification, or the target)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None) -> None:
        n = x.shape[0]
        self.y, self.target = y, target
        self.found = torch.zeros(n, dtype=torch.bool, device=x.device)
        self.x_found = x.detach().clone()
        nan = torch.full((n,), float("nan"), device=x.device)
        self.first, self.prev, self.last = nan.clone(), nan.clone(), nan.clone()
        self.length = torch.zeros(n, dtype=torch.long, device=x.device)
        self.trace: list[torch.Tensor] = []
        self.runs = 0
        self._rows: list[torch.Tensor | None] = [None]
        self._token: Token[PathRecorder | None] | None = None

    def __enter__(self) -> PathRecorder:
        self._token = _CURRENT.set(self)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            _CURRENT.reset(self._token)
            self._token = None

    def summary(self) -> PathSummary:
        return PathSummary(self.found, self.x_found, self.first, self.prev, self.last, self.length,
                           [float(v) for v in torch.stack(self.trace).cpu()] if self.trace else [])


class Run:
    """One run of an attack's loop (``length`` iterates) on the rows the recorder is at."""

    def __init__(self, rec: PathRecorder, length: int) -> None:
        self.rec, self.length = rec, length
        self.rows = rec._rows[-1]
        self.y = rec.y if self.rows is None else rec.y[self.rows]
        self.target = None if rec.target is None else (rec.target if self.rows is None else rec.target[self.rows])
        self.window = max(1, int(WINDOW_SHARE * length))
        k = self.y.shape[0]
        self.first = torch.full((k,), float("nan"), device=self.y.device)
        self.prev = torch.zeros(k, device=self.y.device)
        self.last = torch.zeros(k, device=self.y.device)
        self.t = 0
        self.keep_trace = rec.runs == 0
        rec.runs += 1

    @property
    def wants_margin(self) -> bool:
        """Whether the next iterate's margin is read (the start and the two last windows)."""
        t, w, n = self.t, self.window, self.length
        return t == 0 or t >= n - 2 * w

    @torch.no_grad()
    def see(self, x_iter: torch.Tensor, logits: torch.Tensor, mean_loss: torch.Tensor | None = None) -> None:
        """The iterate ``x_iter`` (the run's rows), the attacker's logits there and, for the
        curve, the batch mean of the loss the attack ascends there (None: of the margin)."""
        rec, rows = self.rec, self.rows
        logits = logits.detach()
        hit = goal_met(logits.argmax(dim=1), self.y, self.target)
        x_iter = x_iter.detach()
        if rows is None:
            rec.x_found = torch.where(_rows(hit & ~rec.found, x_iter), x_iter, rec.x_found)
            rec.found |= hit
        else:
            found = rec.found[rows]
            rec.x_found[rows] = torch.where(_rows(hit & ~found, x_iter), x_iter, rec.x_found[rows])
            rec.found[rows] = found | hit
        t, w, n = self.t, self.window, self.length
        margin = None
        if self.wants_margin or (self.keep_trace and mean_loss is None):
            margin = _margin(logits.float(), self.y, self.target)
        if t == 0:
            self.first = margin.clone()
        if n - 2 * w <= t < n - w:
            self.prev += margin / w
        if t >= n - w:
            self.last += margin / w
        if self.keep_trace:
            rec.trace.append((margin.mean() if mean_loss is None else mean_loss.detach()).float())
        self.t += 1

    def close(self) -> None:
        """The run is over: its windows become its rows' (a later run of a row replaces them)."""
        rec, rows = self.rec, self.rows
        if self.t == 0:
            return
        short = self.t < 2 * self.window  # no window before the last
        prev = torch.full_like(self.prev, float("nan")) if short else self.prev
        length = torch.full_like(self.first, self.t, dtype=torch.long)
        if rows is None:
            rec.first, rec.prev, rec.last, rec.length = self.first, prev, self.last, length
        else:
            rec.first[rows], rec.prev[rows], rec.last[rows], rec.length[rows] = self.first, prev, self.last, length


def run(length: int) -> Run | None:
    """A run of ``length`` iterates for the active recorder (None when nothing records)."""
    rec = _CURRENT.get()
    return None if rec is None else Run(rec, length)


@contextlib.contextmanager
def rows_of(idx: torch.Tensor) -> Iterator[None]:
    """The attack works on the rows ``idx`` of its batch (or of the rows it is already at) for the
    block: a restart or a target on the examples still failing. Nothing without a recorder."""
    rec = _CURRENT.get()
    if rec is None:
        yield
        return
    parent = rec._rows[-1]
    rec._rows.append(idx if parent is None else parent[idx])
    try:
        yield
    finally:
        rec._rows.pop()
