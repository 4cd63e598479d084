"""Gradient-masking checks: signs that a result reflects obfuscated gradients, not robustness.

Athalye, Carlini & Wagner ("Obfuscated Gradients Give a False Sense of Security", ICML 2018,
section 3.1) list the symptoms of a defense that only breaks the attacker's gradients. Each
check below is a pure function of a results table (or of a model's outputs and input gradients
on a small batch) and returns :class:`Finding` s: a short ``code``, what was ``seen``, what to
try, and ``where``, the table rows it flags (column -> value or list of values). The evaluator
joins the codes of every finding that selects a row into that row's ``flags`` column (``;``
between codes) and writes every finding to ``masking.json``.

Codes and rules (``tol`` = max(3 examples / n, 1%); robust accuracies are fractions):

- ``eps_flat``: for one attack over the eps sweep of a threat group (same model, defense, norm,
  targeting, knowledge), robust accuracy rises by more than ``tol`` from one eps to the next
  (flags the larger eps), or over the whole sweep (largest eps >= 2 x smallest) it falls by no
  more than ``tol`` while it started above ``tol`` (flags the largest eps).
- ``large_eps``: the probe, the config's PGD (its step size scaled to the budget) at an eps that
  makes the ball cover the whole input range (linf: the bounds' width; l2: the width x
  sqrt(input size)) on the first :data:`PROBE_EXAMPLES` examples, leaves robust accuracy above
  :data:`LARGE_EPS_MAX` (an unbounded attack should reach ~0%). Flags the white-box rows of
  the same view (naive or adaptive) in that threat group.
- ``single_step``: at the same threat and eps and in the same view, a single-step attack (an
  attack class whose ``kind`` is ``single_step``: fgsm) leaves robust accuracy more than ``tol``
  below an iterative one (``kind`` ``iterative``: bim, pgd). Flags the iterative attack. The kinds
  are read from the store's job rows, never parsed from labels.
- ``black_box``: at the same norm, eps and targeting, a score-based, decision-based or transfer
  attack (or such an attack, by its ``kind``, run under a white-box threat: AutoAttack's Square)
  leaves robust accuracy more than ``tol`` below the best white-box gradient attack of a view
  (a suite's own row is not one). Flags the white-box rows of that view.
- ``grad_zero``: the input gradient of the cross-entropy is exactly zero on more than
  :data:`ZERO_GRAD_SHARE` of :data:`GRAD_EXAMPLES` examples (measured on the model the attack is
  handed). ``grad_nan``: any gradient entry is NaN or infinite. ``grad_nondet``: on a model
  declared deterministic, two gradients of the same batch differ by more than
  :data:`NONDET_RTOL` of their largest entry. Each flags the white-box rows of that view.
- ``probs``: the model's outputs are non-negative and sum to 1 (within 1e-3) on every example:
  it returns probabilities, not logits. Flags every attack row of the model and defense.
- ``dynamic``: the model's forward pass itself calls autograd (``torch.autograd.grad`` or
  ``backward``): a test-time-optimization ("dynamic") defense, which AutoAttack, like every
  attack on its static forward, may not evaluate adequately (AutoAttack's ``check_dynamic``).
  Flags every attack row of the model, defense and view.

``worst-case`` rows take part in ``eps_flat`` only.

Evaluation-failure indicators (:mod:`advbench.eval.indicators`; what the worker measured is kept
in the store with each job, so these too are a pure function of the store). Pintor et al.'s
*unavailable gradients* are ``grad_zero``/``grad_nan``, their *transfer failure* ``black_box``,
their *unconstrained attack failure* ``large_eps``; beside them:

- ``silent_success``: an iterative attack (kind ``iterative``: bim, pgd, apgd, apgd-t, AutoAttack's
  APGD components) had, on its path, an iterate that met the goal on the model it attacked and
  passes the audit on the deployed model (the first such iterate is audited like any output),
  but the point it returned does not: flagged when more than ``tol`` x n examples of the cell are
  (not on a randomized model, where one audited draw of each differs by chance: its readings are
  kept, and ``unstable_predictions`` and the scoring draws speak for it).
- ``incomplete_optimization``: among the examples the attack failed on, those whose logit margin
  toward the goal (max_{i != y} z_i - z_y; targeted z_t - max_{i != t} z_i) rose, from its mean
  over the second-to-last 10% of the iterates of their last run to its mean over the last 10%, by
  more than :data:`INCOMPLETE_RISE` of its change over the whole run (at least
  :data:`MARGIN_FLOOR` x (1 + |margin at the start|)): flagged when they are more than
  :data:`INCOMPLETE_SHARE` of those examples and more than ``tol`` x n.
- ``more_iterations`` (Carlini et al. 2019): the attack rerun with twice its steps (and twice its
  restarts where it has random restarts; a BIM schedule resolved at the eps first, every other
  parameter kept) on the run's first :data:`INDICATOR_EXAMPLES` examples leaves robust accuracy
  on them more than ``tol`` (of that subset) below the attack's own. Not for suite components,
  nor on a randomized model (one audited draw each, as for ``silent_success``).
- ``not_chance_at_large_eps`` (Carlini et al.): the large-eps probe leaves robust accuracy above
  chance (1 / the data's classes) + ``tol`` but not above :data:`LARGE_EPS_MAX` (there it is a
  ``large_eps`` finding, which says more). Flags what ``large_eps`` flags.
- ``unstable_predictions``: on the first :data:`NOISE_EXAMPLES` examples of each large-eps probe,
  the model its attack was handed, evaluated :data:`NOISE_DRAWS` times as it is and as often under
  uniform noise of +-:data:`NOISE_SCALE` of the input range, gives another prediction than the
  example's most frequent one in more than :data:`UNSTABLE_SHARE` of either set of evaluations.
  Flags what ``large_eps`` flags.
- ``suboptimal_minimal`` (AttackBench): where two or more minimal-perturbation attacks ran on a
  model, defense and threat group, one whose area under the robust-accuracy curve over [0, the
  largest eps] is more than 1 / :data:`OPTIMALITY_MIN` times that of the per-example best
  distance of them all (optimality below :data:`OPTIMALITY_MIN`). Flags that attack's rows.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from advbench.eval.jobs import PROBE_PREFIX
from advbench.eval.tables import is_worst_case, with_constraints, worst_case_rows
from advbench.tensors import frozen

TOL_EXAMPLES = 3  # "a few examples" of slack in every comparison of robust accuracies
TOL_MIN = 0.01  # ... and at least 1 percentage point
LARGE_EPS_MAX = 0.10  # robust accuracy at the probe's eps above this is "well above zero"
ZERO_GRAD_SHARE = 0.25  # more than this share of exactly-zero input gradients is flagged
NONDET_RTOL = 1e-3  # two gradients of a deterministic model may differ by this much of their max
PROBE_EXAMPLES = 100  # examples the large-eps probe attacks
GRAD_EXAMPLES = 32  # examples the gradient and output checks use
INDICATOR_EXAMPLES = 64  # the first examples an iterative attack is rerun on with a doubled budget
INCOMPLETE_RISE = 0.10  # an example still gaining: its margin rose this share of its change in the last window
INCOMPLETE_SHARE = 0.5  # incomplete optimization: more than this share of the failed examples still gaining
MARGIN_FLOOR = 1e-3  # a margin change below this (x (1 + |margin|)) is no change
NOISE_EXAMPLES = 32  # examples of each large-eps probe whose prediction stability is measured
NOISE_DRAWS = 8  # repeated evaluations, and as many noisy ones, per example
NOISE_SCALE = 1 / 255  # the uniform noise's half-width, in units of the input range
UNSTABLE_SHARE = 0.10  # evaluations differing from an example's most frequent prediction above this share
OPTIMALITY_MIN = 0.90  # a minimal attack's area under the curve against the per-example best's below this

FLAGS: dict[str, str] = {
    "eps_flat": "robust accuracy does not fall as eps grows",
    "large_eps": "an attack with an eps covering the whole input range leaves robust accuracy well above zero",
    "single_step": "a single-step attack beats an iterative one",
    "black_box": "a black-box (score-based, decision-based or transfer) attack beats the white-box ones",
    "grad_zero": "the input gradients are exactly zero",
    "grad_nan": "the input gradients are NaN or infinite",
    "grad_nondet": "the input gradients differ between two runs on a model declared deterministic",
    "probs": "the model returns probabilities instead of logits",
    "dynamic": "the model's forward pass computes gradients (a test-time-optimization defense)",
    "silent_success": "the attack passed an adversarial point on its path but returned a point that is not",
    "incomplete_optimization": "the attack's margin was still rising over its last iterations",
    "more_iterations": "twice the attack's steps (and restarts) lower robust accuracy on the first examples",
    "not_chance_at_large_eps": "accuracy stays above chance at an eps covering the whole input range",
    "unstable_predictions": "the model's predictions change when it is evaluated again or under tiny noise",
    "suboptimal_minimal": "a minimal-perturbation attack finds larger perturbations than the per-example best",
}

#: the codes measured on the models themselves, which a report cannot recompute from the store
#: (it carries them over from masking.json); every other code is a function of the store
MODEL_CODES = ("grad_zero", "grad_nan", "grad_nondet", "probs", "dynamic")

ADVICE: dict[str, str] = {
    "eps_flat": "the attack is not using the budget: attack adaptively (BPDA for non-differentiable stages, "
                "EoT for randomized ones: adaptive: auto), use more steps or restarts and a margin loss "
                "(pgd loss: margin, cw)",
    "large_eps": "an unbounded attack must reach ~0%: its gradients are useless here; try BPDA (adaptive: auto, "
                 "or a better surrogate), EoT with more samples (eot_samples), more steps, a margin loss",
    "single_step": "the iterative attack is stuck (masked or noisy gradients, or too small steps): try more "
                   "steps, a larger step size or random restarts, BPDA/EoT, a margin loss",
    "black_box": "the gradients mislead the white-box attacks: attack adaptively (BPDA, EoT), use a margin "
                 "loss, and report the black-box number as the upper bound",
    "grad_zero": "shattered or saturated gradients: attack through BPDA (adaptive: auto; declare the stage "
                 "non-differentiable), or use a margin loss on logits (pgd loss: margin, cw) against saturation",
    "grad_nan": "a stage's backward pass is broken: declare it non-differentiable so BPDA goes through its "
                "surrogate, or give it a smooth surrogate",
    "grad_nondet": "the model has randomness it does not declare: mark the stage randomized (so EoT is used "
                   "and it is scored over draws), or fix its seed",
    "probs": "losses on probabilities saturate and their gradients vanish: return logits (drop the final "
             "softmax), or attack with a margin loss",
    "dynamic": "attacks on the static forward may not evaluate it: attack the whole procedure adaptively "
               "(BPDA through its optimization, EoT over its randomness) and check transfer from a static copy",
    "silent_success": "the attack's robust accuracy overstates it: make the attack return the best adversarial "
                      "point it passed (APGD does), or use a margin loss, smaller final steps or more restarts; "
                      "AutoAttack's APGD keeps its adversarial iterates",
    "incomplete_optimization": "more iterations would help: raise steps (or the step size), add restarts, or use "
                               "APGD's step-size schedule (apgd, autoattack); see whether more_iterations agrees",
    "more_iterations": "the attack has not converged: raise steps and restarts until robust accuracy stops "
                       "falling, and report that number (or APGD/AutoAttack's)",
    "not_chance_at_large_eps": "a ball covering the input range reaches every image, so accuracy must fall to "
                               "chance or below: the attack's gradients mislead it here; try BPDA/EoT "
                               "(adaptive: auto), a margin loss, more steps, a black-box attack",
    "unstable_predictions": "a single evaluation is unreliable: declare the randomness (a randomized stage gets "
                            "EoT and scoring over draws), raise eot_samples and draws, or fix the noise's seed",
    "suboptimal_minimal": "the attack stops short of the smallest perturbations others find: more steps or "
                          "restarts, another starting point, or take the per-example best of several minimal "
                          "attacks (fab, cw, deepfool) as the number",
}


@dataclass(frozen=True)
class AttackInfo:
    """What the checks need to know of a results row's attack, as the store keeps it."""

    name: str  # registry name
    view: str = "naive"  # naive | adaptive
    kind: str = "other"  # the attack class's ``kind`` (single_step, iterative, minimal, ...)


def attack_info(jobs: pd.DataFrame) -> dict[str, AttackInfo]:
    """Each stored attack label's identity, read from the store's job rows (never from the label)."""
    out: dict[str, AttackInfo] = {}
    for r in jobs.itertuples():
        if r.attack not in out:
            out[r.attack] = AttackInfo(name=r.attack_name or r.attack, view=r.view or "naive", kind=r.attack_kind or "other")
        suite = getattr(r, "suite", None)
        if isinstance(suite, str) and suite not in out:  # a suite's own row (its components' worst case)
            out[suite] = AttackInfo(name=suite, view=r.view or "naive", kind="suite")
    return out


#: attack kinds that see no gradient: under a white-box threat (AutoAttack's Square reads the
#: white-box model's scores) they are compared with the gradient attacks like black-box attackers
NO_GRADIENT_KINDS = frozenset({"score_based", "decision_based", "transfer"})


@dataclass(frozen=True)
class Finding:
    code: str
    seen: str
    where: dict[str, Any] = field(default_factory=dict)  # column -> value or values: the rows flagged

    @property
    def advice(self) -> str:
        return ADVICE[self.code]

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "flag": FLAGS[self.code], "where": self.where, "seen": self.seen,
                "try": self.advice}

    def line(self) -> str:
        w = self.where
        attacks = w.get("attack")
        attacks = ", ".join(attacks) if isinstance(attacks, (list, tuple)) else attacks
        threat = " ".join(str(w[k]) for k in ("norm", "targeting") if k in w and w[k] != "untargeted")
        if "eps" in w:
            threat += f" eps {_eps(w['eps'])}"
        if w.get("constraints"):
            threat += f" {w['constraints']}"
        scope = " / ".join(str(p) for p in (w.get("model"), w.get("defense"), attacks) if p)
        return f"[{self.code}] {scope}{f' ({threat.strip()})' if threat.strip() else ''}: {self.seen}; try: {self.advice}"


def tolerance(n: int) -> float:
    return max(TOL_EXAMPLES / n, TOL_MIN) if n else 1.0


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def _eps(e: float) -> str:
    return "inf" if not math.isfinite(e) else f"{e:g}"


def _cell(row: Any) -> dict[str, Any]:
    return {k: getattr(row, k) for k in ("model", "defense", "attack", "norm", "eps", "targeting", "knowledge",
                                         "constraints")}


def _lookup(info: dict[str, AttackInfo] | None):
    def get(label: str) -> AttackInfo:
        return (info or {}).get(label) or AttackInfo(label)

    return get


# ---------------------------------------------------------------------- table checks
def check_eps_trend(table: pd.DataFrame) -> list[Finding]:
    """``eps_flat``: robust accuracy rises with eps, or stays flat over a sweep that doubles eps."""
    table = with_constraints(table)
    out: list[Finding] = []
    keys = ["model", "defense", "attack", "norm", "targeting", "knowledge", "constraints"]
    for _, g in table.groupby(keys, sort=False):
        g = g.sort_values("eps", kind="stable")
        eps, ra = g.eps.to_numpy(float), g.robust_accuracy.to_numpy(float)
        if len(g) < 2 or len(set(eps)) < len(eps) or np.isnan(ra).any() or not np.isfinite(eps).all():
            continue
        tol = tolerance(int(g.n.min()))
        rows = list(g.itertuples())
        seen: dict[int, str] = {}
        for j in range(1, len(rows)):
            if ra[j] > ra[j - 1] + tol:
                seen[j] = f"robust accuracy rises from {_pct(ra[j - 1])} at eps {_eps(eps[j - 1])} to {_pct(ra[j])}"
        last = len(rows) - 1
        if last not in seen and eps[last] >= 2 * eps[0] and ra[0] > tol and ra[last] >= ra[0] - tol:
            seen[last] = (f"robust accuracy stays at {_pct(ra[last])} from eps {_eps(eps[0])} ({_pct(ra[0])}) "
                          f"to eps {_eps(eps[last])}")
        out += [Finding("eps_flat", s, _cell(rows[j])) for j, s in sorted(seen.items())]
    return out


def check_single_step(table: pd.DataFrame, info: dict[str, AttackInfo] | None = None) -> list[Finding]:
    """``single_step``: a single-step attack leaves lower robust accuracy than an iterative one."""
    table = with_constraints(table)
    get = _lookup(info)
    out: list[Finding] = []
    rows = table[~worst_case_rows(table)]
    for _, g in rows.groupby(["model", "defense", "norm", "eps", "targeting", "knowledge", "constraints"], sort=False):
        tol = tolerance(int(g.n.min()))
        cells = list(g.itertuples())
        for it in cells:
            if get(it.attack).kind != "iterative":
                continue
            beaten = [s for s in cells if get(s.attack).kind == "single_step" and get(s.attack).view == get(it.attack).view
                      and s.robust_accuracy < it.robust_accuracy - tol]
            if beaten:
                s = min(beaten, key=lambda r: r.robust_accuracy)
                out.append(Finding("single_step", f"{s.attack} (one step) leaves {_pct(s.robust_accuracy)} robust "
                                                  f"but {it.attack} leaves {_pct(it.robust_accuracy)}", _cell(it)))
    return out


def check_black_box(table: pd.DataFrame, info: dict[str, AttackInfo] | None = None) -> list[Finding]:
    """``black_box``: an attack that sees no gradient (a score-, decision-based or transfer attacker,
    or such an attack run under a white-box threat, as AutoAttack runs Square) beats every
    gradient attack of a view. With a cascaded suite's cumulative rows this is AutoAttack's own
    check that Square, run last, broke points the white-box components left robust."""
    table = with_constraints(table)
    get = _lookup(info)
    out: list[Finding] = []
    rows = table[~worst_case_rows(table)]
    for (model, defense, norm, eps, targeting, constraints), g in rows.groupby(
            ["model", "defense", "norm", "eps", "targeting", "constraints"], sort=False):
        kinds = g.attack.map(lambda a: get(a).kind)
        no_gradient = (g.knowledge != "white_box") | kinds.isin(NO_GRADIENT_KINDS)
        black, white = g[no_gradient], g[~no_gradient & (kinds != "suite")]
        if black.empty or white.empty:
            continue
        tol = tolerance(int(g.n.min()))
        bb = black.loc[black.robust_accuracy.idxmin()]
        views = white.attack.map(lambda a: get(a).view)
        for view in dict.fromkeys(views):
            w = white[views == view]
            best = w.loc[w.robust_accuracy.idxmin()]
            if best.robust_accuracy > bb.robust_accuracy + tol:
                out.append(Finding(
                    "black_box",
                    f"{bb.attack} ({bb.knowledge}) leaves {_pct(bb.robust_accuracy)} robust but the best white-box "
                    f"attack ({best.attack}) leaves {_pct(best.robust_accuracy)}",
                    {"model": model, "defense": defense, "attack": list(w.attack), "norm": norm, "eps": eps,
                     "targeting": targeting, "knowledge": "white_box", "constraints": constraints}))
    return out


def check_large_eps(probes: pd.DataFrame, table: pd.DataFrame,
                    info: dict[str, AttackInfo] | None = None) -> list[Finding]:
    """``large_eps``: the probe (an attack whose ball covers the input range) leaves points robust."""
    probes, table = with_constraints(probes), with_constraints(table)
    get = _lookup(info)
    out: list[Finding] = []
    for p in probes.itertuples():
        if is_worst_case(p.attack) or not p.robust_accuracy > LARGE_EPS_MAX:
            continue
        view = get(p.attack).view
        same = table[(table.model == p.model) & (table.defense == p.defense) & (table.norm == p.norm)
                     & (table.targeting == p.targeting) & (table.knowledge == p.knowledge)
                     & (table.constraints == p.constraints) & ~worst_case_rows(table)]
        labels = [a for a in dict.fromkeys(same.attack) if get(a).view == view]
        out.append(Finding(
            "large_eps",
            f"{p.attack.removeprefix(PROBE_PREFIX)} at {p.norm} eps {_eps(p.eps)} (a ball covering the whole input "
            f"range) leaves {_pct(p.robust_accuracy)} robust on {p.n} examples; an unbounded attack reaches ~0%",
            {"model": p.model, "defense": p.defense, "attack": labels, "norm": p.norm, "targeting": p.targeting,
             "knowledge": p.knowledge, "constraints": p.constraints}))
    return out


def table_findings(table: pd.DataFrame, probes: pd.DataFrame | None = None,
                   info: dict[str, AttackInfo] | None = None) -> list[Finding]:
    """Every check on a results table (and the probes' table, if any)."""
    found = check_eps_trend(table) + check_single_step(table, info) + check_black_box(table, info)
    if probes is not None and not probes.empty:
        found += check_large_eps(probes, table, info)
    return found


# ---------------------------------------------------------------------- model checks
@dataclass(frozen=True)
class GradientStats:
    """Input gradients of the cross-entropy and the outputs of a model on a small batch."""

    n: int
    zero: int  # examples whose input gradient is exactly zero
    nonfinite: int  # examples with a NaN or infinite gradient entry
    max_diff: float | None  # max |g1 - g2| / max |g1| over two runs; None: not measured (randomized)
    probabilities: bool  # every output row non-negative and summing to 1
    dynamic: bool = False  # the forward pass called autograd

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_probabilities(out: torch.Tensor, atol: float = 1e-3) -> bool:
    """Whether every row of ``out`` is non-negative and sums to 1 (a softmax, not logits)."""
    out = out.detach().float()
    return bool((out >= -1e-6).all()) and bool(((out.sum(dim=1) - 1).abs() <= atol).all())


def _input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = model(x)
        loss = F.cross_entropy(out.float(), y, reduction="sum")
        if not loss.requires_grad:  # no path from the input at all: the naive attacker's gradient is zero
            return out.detach(), torch.zeros_like(x)
        (grad,) = torch.autograd.grad(loss, x, allow_unused=True)
    return out.detach(), torch.zeros_like(x) if grad is None else grad.detach()


def gradient_stats(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, deterministic: bool = True) -> GradientStats:
    """Measure ``model`` on ``(x, y)``: outputs once, the input gradient twice when ``deterministic``."""

    with frozen(model):
        dynamic = calls_autograd(model, x)
        out, g1 = _input_gradient(model, x, y)
        max_diff = None
        if deterministic:
            _, g2 = _input_gradient(model, x, y)
            scale = float(g1.abs().max()) if bool(torch.isfinite(g1).all()) else float("nan")
            diff = float((g1 - g2).abs().max())
            max_diff = diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)
    flat = g1.reshape(g1.shape[0], -1)
    return GradientStats(
        n=int(x.shape[0]),
        zero=int((flat == 0).all(dim=1).sum()),
        nonfinite=int((~torch.isfinite(flat)).any(dim=1).sum()),
        max_diff=max_diff,
        probabilities=is_probabilities(out),
        dynamic=dynamic,
    )


#: what a forward pass that runs autograd calls (the entry points of ``torch.autograd``)
_AUTOGRAD_CALLS = frozenset({"grad", "backward", "_make_grads"})


def calls_autograd(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether one forward pass of ``model`` on ``x`` calls into autograd (AutoAttack's
    ``check_dynamic``): Python-level calls traced for the duration of that one pass."""
    seen = False

    def trace(frame: Any, event: str, arg: Any) -> None:
        nonlocal seen
        code = frame.f_code
        if event == "call" and code.co_name in _AUTOGRAD_CALLS and "autograd" in code.co_filename:
            seen = True
        return None

    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        model(x)  # as an attack would call it (a dynamic defense may need gradients enabled)
    finally:
        sys.settrace(previous)
    return seen


def gradient_findings(stats: GradientStats, where: dict[str, Any], where_all: dict[str, Any] | None = None,
                      view: str = "naive") -> list[Finding]:
    """``grad_zero``, ``grad_nan``, ``grad_nondet`` (flagging ``where``) and ``probs`` (``where_all``)."""
    out = []
    seen_on = f"on {stats.n} examples ({view} view)"
    if stats.zero > ZERO_GRAD_SHARE * stats.n:
        out.append(Finding("grad_zero", f"the input gradient of the cross-entropy is exactly zero for {stats.zero} "
                                        f"of {stats.n} examples ({view} view)", where))
    if stats.nonfinite:
        out.append(Finding("grad_nan", f"the input gradient has NaN or infinite entries for {stats.nonfinite} of "
                                       f"{stats.n} examples ({view} view)", where))
    if stats.max_diff is not None and not stats.max_diff <= NONDET_RTOL:
        out.append(Finding("grad_nondet", f"two gradients of the same batch differ by {stats.max_diff:.3g} of their "
                                          f"largest entry {seen_on}", where))
    if stats.probabilities:
        out.append(Finding("probs", f"every output row is non-negative and sums to 1 {seen_on}",
                           where if where_all is None else where_all))
    if stats.dynamic:
        out.append(Finding("dynamic", f"its forward pass calls torch.autograd {seen_on}", where))
    return out


# ---------------------------------------------------------------------- reporting
def flags_column(table: pd.DataFrame, findings: Iterable[Finding]) -> pd.Series:
    """Per table row, the codes of the findings that select it, joined by ``;`` ('' for none)."""
    codes: list[set[str]] = [set() for _ in range(len(table))]
    keyed = with_constraints(table)
    for f in findings:
        mask = np.ones(len(table), dtype=bool)
        for col, val in f.where.items():
            mask &= keyed[col].isin(val if isinstance(val, (list, tuple)) else [val]).to_numpy()
        for i in np.flatnonzero(mask):
            codes[i].add(f.code)
    order = list(FLAGS)
    return pd.Series([";".join(sorted(c, key=order.index)) for c in codes], index=table.index, dtype=object)


def format_findings(findings: Sequence[Finding]) -> str:
    """One line per finding (empty when there is none)."""
    if not findings:
        return ""
    head = f"gradient masking or a failed evaluation? {len(findings)} flag(s); details in masking.json"
    return "\n".join([head, *("  " + f.line() for f in findings)])


def report(findings: Sequence[Finding], probes: pd.DataFrame | None, gradients: Sequence[dict[str, Any]],
           enabled: bool = True, indicators: dict[str, Any] | None = None) -> dict[str, Any]:
    """The content of masking.json. ``indicators`` holds the evaluation-failure indicators' readings
    of every cell, flagged or not (:func:`advbench.eval.indicators.indicator_findings`): ``paths``
    (each iterative attack's path), ``more_iterations`` (its rerun with a doubled budget),
    ``large_eps`` (each probe against chance), ``stability`` (prediction stability) and
    ``optimality`` (each minimal-perturbation attack against the per-example best)."""
    probe_rows = [] if probes is None or probes.empty else [
        {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
        for r in probes[~worst_case_rows(probes)][
            ["model", "defense", "attack", "norm", "eps", "targeting", "knowledge", "n", "clean_accuracy",
             "robust_accuracy", "seconds"]].to_dict(orient="records")
    ]
    return {
        "enabled": enabled,
        "thresholds": {"tolerance_examples": TOL_EXAMPLES, "tolerance_min": TOL_MIN, "large_eps_max": LARGE_EPS_MAX,
                       "zero_grad_share": ZERO_GRAD_SHARE, "nondet_rtol": NONDET_RTOL,
                       "probe_examples": PROBE_EXAMPLES, "grad_examples": GRAD_EXAMPLES,
                       "indicator_examples": INDICATOR_EXAMPLES, "incomplete_rise": INCOMPLETE_RISE,
                       "incomplete_share": INCOMPLETE_SHARE, "margin_floor": MARGIN_FLOOR,
                       "noise_examples": NOISE_EXAMPLES, "noise_draws": NOISE_DRAWS, "noise_scale": NOISE_SCALE,
                       "unstable_share": UNSTABLE_SHARE, "optimality_min": OPTIMALITY_MIN},
        "flags": FLAGS,
        "findings": [f.to_dict() for f in findings],
        "probes": probe_rows,
        "gradients": list(gradients),
        "indicators": dict(indicators or {}),
    }


def probe_eps(norm: str, bounds: Sequence[float], input_numel: int) -> float | None:
    """An eps whose ball covers the whole input range (None for norms the probe does not cover)."""
    width = float(bounds[1]) - float(bounds[0])
    return {"linf": width, "l2": width * math.sqrt(input_numel)}.get(norm)
