"""Evaluation-failure indicators: signs that an attack, not the model, failed.

Beside the gradient-masking checks of :mod:`advbench.eval.masking` (whose codes, advice and
thresholds this module uses), every run with ``masking_checks`` records, at almost no cost:

- Pintor et al. ("Indicators of Attack Failure: Debugging and Improving Optimization of
  Adversarial Examples", NeurIPS 2022): the path of every iterative attack (BIM, PGD, APGD,
  APGD-T, AutoAttack's APGD components; :mod:`advbench.attacks.trace`), read for a **silent
  success** (an adversarial iterate the attack did not return) and **incomplete optimization**
  (the logit margin still rising over the last iterations); the **stability** of each view's
  predictions under repeated evaluation and tiny uniform noise (unstable predictions);
- Carlini et al. ("On Evaluating Adversarial Robustness", 2019): the attack rerun with twice the
  steps (and restarts) on the run's first examples (**more iterations**), and accuracy at an eps
  covering the input range against **chance**;
- AttackBench-style **optimality** of the minimal-perturbation attacks: the area under each one's
  robust-accuracy curve against the per-example best of all of them.

What the worker measures travels with the job's record (``measured``, the store's
``measured_json``): the path with the attack's own job, the rerun too (the first shard's jobs),
the class count and stability with each large-eps probe. The findings are then a pure function
of the store, like every other table: ``advbench report`` recomputes them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from advbench.attacks.base import AttackResult
from advbench.attacks.trace import WINDOW_SHARE, PathSummary
from advbench.audit import audit
from advbench.eval.masking import (
    INCOMPLETE_RISE,
    INCOMPLETE_SHARE,
    LARGE_EPS_MAX,
    MARGIN_FLOOR,
    NOISE_DRAWS,
    NOISE_SCALE,
    OPTIMALITY_MIN,
    UNSTABLE_SHARE,
    AttackInfo,
    Finding,
    tolerance,
)
from advbench.eval.tables import _threat_columns, constraints_of, is_worst_case
from advbench.registry import ATTACKS
from advbench.tensors import frozen, rand_like
from advbench.threat import ThreatModel

TRACE_POINTS = 50  # points of a loss curve kept in masking.json
EXAMPLES_SHOWN = 20  # example indices kept per finding


# ---------------------------------------------------------------------- measured by the worker
def broken(result: AttackResult, y: torch.Tensor) -> torch.Tensor:
    """Per example: the attack's audited output breaks it (a success, or valid and misclassified)."""
    return result.success | (result.valid & (result.pred_adv != y))


def _downsample(values: Sequence[float], points: int) -> list[float]:
    if len(values) <= points:
        return list(values)
    at = np.unique(np.linspace(0, len(values) - 1, points).round().astype(int))
    return [values[i] for i in at]


def path_reading(summary: PathSummary, result: AttackResult, judge: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 threat: ThreatModel, target: torch.Tensor | None, idx: Sequence[int]) -> dict[str, Any]:
    """What an iterative attack's path says (``x``, ``y``, ``idx``: the attacked examples): the first
    adversarial iterate of each audited on ``judge`` like any output (a silent success where the
    attack's own audited output is no success), and, over the examples the attack failed on, how
    many still gained more than :data:`INCOMPLETE_RISE` of their whole margin change in the last
    window. Counts and sums, so the readings of several shards add up."""
    with frozen(judge):
        path_hit = summary.found & audit(judge, x, summary.x_found, y, threat, target).success
    silent = path_hit & ~result.success
    failed = ~result.success
    first, prev, last = summary.margin_first, summary.margin_prev, summary.margin_last
    windowed = failed & torch.isfinite(first) & torch.isfinite(prev) & torch.isfinite(last)
    scale = torch.maximum((last - first).abs(), MARGIN_FLOOR * (1 + first.abs()))
    rising = windowed & ((last - prev) / scale > INCOMPLETE_RISE)
    lengths = summary.length[summary.length > 0]
    w = windowed
    return {
        "kind": "path",
        "attacked": len(y),
        "path_adversarial": int(path_hit.sum()),
        "silent": int(silent.sum()),
        "silent_examples": [int(idx[i]) for i in silent.nonzero().squeeze(1).tolist()[:EXAMPLES_SHOWN]],
        "failed": int(failed.sum()),
        "windowed": int(w.sum()),
        "rising": int(rising.sum()),
        "margin_first": float(first[w].sum()) if bool(w.any()) else 0.0,
        "margin_prev": float(prev[w].sum()) if bool(w.any()) else 0.0,
        "margin_last": float(last[w].sum()) if bool(w.any()) else 0.0,
        "iterates": int(lengths.mode().values.item()) if lengths.numel() else 0,
        "trace": [float(f"{v:.6g}") for v in _downsample(summary.trace, 4 * TRACE_POINTS)],
    }


def doubled_params(name: str, params: dict[str, Any], threat: ThreatModel) -> dict[str, Any] | None:
    """The attack's parameters with twice its steps (and twice its restarts where it restarts from
    random starts), for Carlini et al.'s "more iterations" check; None for an attack without a
    ``steps`` parameter. A step count left to the attack's own rule (BIM's schedule) is resolved
    at ``threat`` first; every other parameter stays the config's (a step size left to its default
    follows the attack's rule: PGD's 2.5 eps / steps halves, BIM's 1/255 stays)."""
    attack = ATTACKS.create(name, **params)
    current = attack.params()
    if "steps" not in current:
        return None
    steps = current["steps"]
    if steps is None:
        schedule = getattr(attack, "schedule", None)
        if schedule is None:
            return None
        steps = schedule(threat)[0]
    out = {**params, "steps": 2 * int(steps)}
    if "restarts" in current and current.get("random_start", True):
        out["restarts"] = 2 * int(current["restarts"])
    return out


@torch.no_grad()
def stability_reading(model: nn.Module, x: torch.Tensor, bounds: Sequence[float],
                      generator: torch.Generator) -> dict[str, Any]:
    """Predictions of ``model`` on ``x`` evaluated :data:`NOISE_DRAWS` times as it is and as many
    times under uniform noise of +-:data:`NOISE_SCALE` of the input range (clipped to the bounds):
    per example, how often each evaluation differs from its most frequent prediction, and the
    spread (std over the noisy evaluations) of its cross-entropy at that prediction."""
    lo, hi = float(bounds[0]), float(bounds[1])
    scale = NOISE_SCALE * (hi - lo)
    n, d = x.shape[0], NOISE_DRAWS
    with frozen(model):  # one call per evaluation: a model only ever sees the evaluated examples
        clean = model(x).float()
        repeat = torch.stack([model(x).float() for _ in range(d)])
        noisy = torch.stack([model((x + (2 * rand_like(x, generator) - 1) * scale).clamp(lo, hi)).float()
                             for _ in range(d)])
    preds = torch.cat([clean.argmax(1)[None], repeat.argmax(2), noisy.argmax(2)])
    mode = preds.mode(dim=0).values
    changed_repeat = int((preds[1 : d + 1] != mode).sum())
    changed_noise = int((preds[d + 1 :] != mode).sum())
    loss = F.cross_entropy(noisy.flatten(0, 1), mode.repeat(d), reduction="none").view(d, n)
    return {"n": int(n), "draws": d, "scale": scale, "changed_repeat": changed_repeat,
            "changed_noise": changed_noise, "loss_std": float(loss.std(dim=0).mean()) if d > 1 else 0.0}


# ---------------------------------------------------------------------- read from the store
def _measured(jobs: pd.DataFrame) -> pd.DataFrame:
    """The stored jobs that measured something, with ``measured`` parsed (an empty frame for a
    store or a hand-built table without the column)."""
    if "measured_json" not in jobs or jobs.empty:
        return jobs.iloc[0:0].assign(measured=[])
    m = jobs[jobs.measured_json.notna()]
    return m.assign(measured=[json.loads(s) for s in m.measured_json])


#: what names a reading's cell (kept exactly: a reading is matched to its table row by them)
CELL_KEYS = frozenset({"model", "defense", "attack", "attacks", "probe", "view", "norm", "eps", "eps_max",
                       "targeting", "knowledge", "params", "scale"})


def _round(v: Any, key: str | None = None) -> Any:
    """A reading for masking.json: measurements to 4 significant digits (non-finite: None), the
    cell's keys as they are."""
    if key in CELL_KEYS:
        return v
    if isinstance(v, float):
        return None if not math.isfinite(v) else float(f"{v:.4g}")
    if isinstance(v, dict):
        return {k: _round(x, k) for k, x in v.items()}
    if isinstance(v, list):
        return [_round(x) for x in v]
    return v


def _cell(model: str, defense: str, attack: str, threat_json: str) -> dict[str, Any]:
    return {"model": model, "defense": defense, "attack": attack, **_threat_columns(threat_json)}


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def path_findings(jobs: pd.DataFrame, info: dict[str, AttackInfo]) -> tuple[list[Finding], list[dict[str, Any]],
                                                                           list[Finding], list[dict[str, Any]]]:
    """``silent_success``, ``incomplete_optimization`` (each cell's path) and ``more_iterations``
    (the rerun with a doubled budget), with each cell's readings."""
    found: list[Finding] = []
    paths: list[dict[str, Any]] = []
    more_found: list[Finding] = []
    more: list[dict[str, Any]] = []
    m = _measured(jobs)
    if m.empty:
        return found, paths, more_found, more
    m = m[[r.get("kind") == "path" for r in m.measured]]
    for (model, defense, threat_json, attack), g in m.groupby(["model", "defense", "threat_json", "attack"], sort=False):
        g = g.sort_values("shard", kind="stable")
        cell = _cell(model, defense, attack, threat_json)
        n = int(g.n.sum())
        tol = tolerance(n)
        total = {k: sum(r.get(k, 0) for r in g.measured) for k in
                 ("attacked", "path_adversarial", "silent", "failed", "windowed", "rising",
                  "margin_first", "margin_prev", "margin_last")}
        w = total["windowed"]
        # a randomized model's single audited draw makes a path point and the returned one differ by
        # chance: there the readings are kept, and unstable_predictions and the draws say the rest
        randomized = any(r.get("randomized") for r in g.measured)
        reading = {**cell, "view": info.get(attack, AttackInfo(attack)).view, "n": n, "randomized": randomized,
                   **{k: total[k] for k in ("attacked", "path_adversarial", "silent", "failed", "windowed", "rising")},
                   "silent_examples": [i for r in g.measured for i in r.get("silent_examples", [])][:EXAMPLES_SHOWN],
                   "margin_first": total["margin_first"] / w if w else None,
                   "margin_prev": total["margin_prev"] / w if w else None,
                   "margin_last": total["margin_last"] / w if w else None,
                   "iterates": g.measured.iloc[0].get("iterates", 0),
                   "trace": _downsample(g.measured.iloc[0].get("trace", []), TRACE_POINTS)}
        paths.append(_round(reading))
        if total["silent"] > tol * n and not randomized:
            shown = ", ".join(str(i) for i in reading["silent_examples"][:5])
            found.append(Finding(
                "silent_success",
                f"{total['silent']} of {total['attacked']} attacked examples had an audited adversarial iterate on the "
                f"attack's path but the point it returned is not adversarial (robust accuracy would be "
                f"{_pct(total['silent'] / n)} lower; e.g. examples {shown})", cell))
        if w >= 1 and total["rising"] > INCOMPLETE_SHARE * w and total["rising"] > tol * n:
            found.append(Finding(
                "incomplete_optimization",
                f"{total['rising']} of the {w} examples the attack failed on were still gaining: their logit margin "
                f"rose by more than {100 * INCOMPLETE_RISE:.0f}% of its change over the whole run from the "
                f"second-to-last to the last {100 * WINDOW_SHARE:.0f}% of its {reading['iterates']} iterates (mean "
                f"margin {reading['margin_first']:.3g} at the start, {reading['margin_prev']:.3g}, then "
                f"{reading['margin_last']:.3g})", cell))
        reruns = [r["more_iterations"] for r in g.measured if r.get("more_iterations")]
        if reruns:
            sub = sum(r["n"] for r in reruns)
            robust, robust_more = sum(r["robust"] for r in reruns), sum(r["robust_more"] for r in reruns)
            ra, ra_more = robust / sub if sub else float("nan"), robust_more / sub if sub else float("nan")
            params = reruns[0].get("params", {})
            more.append(_round({**cell, "view": reading["view"], "n": sub, "randomized": randomized, "robust_accuracy": ra,
                                "robust_accuracy_more": ra_more, "drop": ra - ra_more, "params": params}))
            if sub and ra - ra_more > tolerance(sub) and not randomized:
                budget = ", ".join(f"{k} {v}" for k, v in params.items() if k in ("steps", "restarts"))
                more_found.append(Finding(
                    "more_iterations",
                    f"with twice the budget ({budget}) robust accuracy on the first {sub} examples falls from "
                    f"{_pct(ra)} to {_pct(ra_more)}", cell))
    return found, paths, more_found, more


def _listed(where: dict[str, Any]) -> dict[str, Any]:
    """A probe's ``where`` as a reading: the rows it would flag as ``attacks``."""
    return {("attacks" if k == "attack" else k): v for k, v in where.items()}


def _same_view(table: pd.DataFrame, info: dict[str, AttackInfo], p: Any, view: str) -> list[str]:
    """The attack rows of a probe's model, defense, threat group and view (what a probe flags)."""
    same = table[(table.model == p.model) & (table.defense == p.defense) & (table.norm == p.norm)
                 & (table.targeting == p.targeting) & (table.knowledge == p.knowledge)]
    return [a for a in dict.fromkeys(same.attack) if not is_worst_case(a)
            and info.get(a, AttackInfo(a)).view == view]


def probe_findings(jobs: pd.DataFrame, table: pd.DataFrame, probes: pd.DataFrame | None, examples: pd.DataFrame,
                   info: dict[str, AttackInfo]) -> tuple[list[Finding], list[dict[str, Any]], list[dict[str, Any]]]:
    """``not_chance_at_large_eps`` and ``unstable_predictions`` from the large-eps probes: (findings,
    large-eps readings, stability readings)."""
    out: list[Finding] = []
    chance_rows: list[dict[str, Any]] = []
    stability: list[dict[str, Any]] = []
    m = _measured(jobs)
    m = m[[r.get("kind") == "large_eps" for r in m.measured]] if not m.empty else m
    for (model, defense, threat_json, attack), g in m.groupby(["model", "defense", "threat_json", "attack"], sort=False):
        r0 = g.sort_values("shard", kind="stable").measured.iloc[0]
        t = _threat_columns(threat_json)
        view = info.get(attack, AttackInfo(attack)).view
        p = pd.Series({"model": model, "defense": defense, **t})
        where = {"model": model, "defense": defense, "attack": _same_view(table, info, p, view), "norm": t["norm"],
                 "targeting": t["targeting"], "knowledge": t["knowledge"], "constraints": t["constraints"]}
        scope = f"{attack} ({view} view)"
        row = None
        if probes is not None and not probes.empty:
            hit = probes[(probes.model == model) & (probes.defense == defense) & (probes.attack == attack)
                         & (probes.norm == t["norm"]) & (probes.targeting == t["targeting"])]
            row = hit.iloc[0] if len(hit) else None
        classes = r0.get("classes")
        if not classes:  # a probe recorded before the class count was: the labels seen
            classes = int(examples[examples.model == model].label.nunique()) if len(examples) else 0
        if row is not None and classes:
            chance = 1 / classes
            tol = tolerance(int(row.n))
            chance_rows.append(_round({**_listed(where), "probe": attack, "view": view, "eps": t["eps"], "n": int(row.n),
                                       "robust_accuracy": float(row.robust_accuracy), "classes": classes,
                                       "chance": chance}))
            # above LARGE_EPS_MAX the probe is a large_eps finding already (which says more)
            if chance + tol < row.robust_accuracy <= LARGE_EPS_MAX:
                out.append(Finding(
                    "not_chance_at_large_eps",
                    f"{scope} at {t['norm']} eps {t['eps']:g} (a ball covering the whole input range) leaves "
                    f"{_pct(row.robust_accuracy)} robust on {int(row.n)} examples, above chance "
                    f"({_pct(chance)}, {classes} classes) by more than the tolerance ({_pct(tol)})", where))
        s = r0.get("stability")
        if s:
            pairs = s["n"] * s["draws"]
            share = max(s["changed_repeat"], s["changed_noise"]) / pairs if pairs else 0.0
            stability.append(_round({**_listed(where), "probe": attack, "view": view, **s, "share": share}))
            if share > UNSTABLE_SHARE:
                out.append(Finding(
                    "unstable_predictions",
                    f"on {s['n']} examples ({view} view), {s['changed_repeat']} of {pairs} repeated evaluations and "
                    f"{s['changed_noise']} of {pairs} under uniform noise of +-{s['scale']:.3g} differ from the "
                    f"example's most frequent prediction (cross-entropy std {s['loss_std']:.3g})", where))
    return out, chance_rows, stability


def optimality(examples: pd.DataFrame, jobs: pd.DataFrame, info: dict[str, AttackInfo]
               ) -> tuple[list[Finding], list[dict[str, Any]]]:
    """``suboptimal_minimal``: per (model, defense, norm, targeting, knowledge), each minimal-
    perturbation attack's area under its robust-accuracy curve over [0, E] (E the largest eps of
    the threat group), which is the mean over examples of min(d_i, E) (d_i its audited minimal
    distance, infinite where it found none, 0 where the clean input is wrong), against the same area
    for each example's smallest distance over all of them: optimality = best area / its area (1: as
    good as the per-example best everywhere). Cascaded suite components (FAB-T in AutoAttack)
    search only the points earlier components left and are not compared."""
    out: list[Finding] = []
    rows: list[dict[str, Any]] = []
    if examples.empty or "minimal" not in jobs or "min_distance" not in examples:
        return out, rows
    minimal = jobs[jobs.minimal.fillna(0).astype(bool) & ~jobs.probe.fillna(0).astype(bool)]
    if "suite_cascade" in minimal:
        minimal = minimal[~(minimal.suite.notna() & minimal.suite_cascade.fillna(0).astype(bool))]
    if minimal.empty:
        return out, rows
    ex = examples[examples.job_key.isin(set(minimal.job_key))]
    ex = ex.assign(group=ex.threat_json.map(lambda s: json.dumps({k: v for k, v in json.loads(s).items()
                                                                 if k != "eps"}, sort_keys=True)),
                   eps=ex.threat_json.map(lambda s: json.loads(s)["eps"]))
    for (model, defense, group), g in ex.groupby(["model", "defense", "group"], sort=False):
        attacks = list(dict.fromkeys(g.attack))
        if len(attacks) < 2:
            continue
        e_max = float(g.eps.max())
        one = g[g.eps == e_max]  # a minimal attack's distances are the same at every eps
        dist = {}
        for a in attacks:
            s = one[one.attack == a].drop_duplicates("idx").set_index("idx")
            searched = s.attacked.astype(bool) & s.min_distance.notna()
            d = s.min_distance.where(searched, np.nan).astype(float)
            d[(s.pred_clean != s.label)] = 0.0  # clean-wrong: broken at any eps
            dist[a] = d
        common = pd.concat(dist, axis=1).dropna()  # the examples every attack searched (or are clean-wrong)
        if common.empty:
            continue
        clipped = common.clip(upper=e_max).fillna(e_max)
        best = clipped.min(axis=1).sum()
        t = json.loads(group)
        for a in attacks:
            area = float(clipped[a].sum())
            ratio = float(best / area) if area > 0 else 1.0
            where = {"model": model, "defense": defense, "attack": a, "norm": t["norm"],
                     "targeting": t["targeting"], "knowledge": t["knowledge"], "constraints": constraints_of(t)}
            rows.append(_round({**where, "view": info.get(a, AttackInfo(a)).view, "n": len(common),
                                "eps_max": e_max, "area": area / len(common), "area_best": float(best) / len(common),
                                "optimality": ratio, "compared_with": [b for b in attacks if b != a]}))
            if ratio < OPTIMALITY_MIN:
                out.append(Finding(
                    "suboptimal_minimal",
                    f"its area under the robust-accuracy curve over eps 0..{e_max:g} is {area / len(common):.4g} per "
                    f"example, the per-example best of {', '.join(attacks)} {float(best) / len(common):.4g}: "
                    f"optimality {ratio:.2f} on {len(common)} examples", where))
    return out, rows


def indicator_findings(examples: pd.DataFrame, jobs: pd.DataFrame, table: pd.DataFrame,
                       probes: pd.DataFrame | None, info: dict[str, AttackInfo]
                       ) -> tuple[list[Finding], dict[str, Any]]:
    """Every indicator of a run's stored records: the findings, and ``masking.json``'s
    ``indicators`` (each cell's readings, flagged or not)."""
    main = ~jobs.probe.fillna(0).astype(bool) if "probe" in jobs else pd.Series(True, index=jobs.index)
    silent_incomplete, paths, more_found, more = path_findings(jobs[main], info)
    probe_found, large_eps, stability = probe_findings(jobs[~main], table, probes, examples, info)
    main_ex = examples[~examples.probe.fillna(0).astype(bool)] if "probe" in examples else examples
    minimal_found, optimal = optimality(main_ex, jobs[main], info)
    found = silent_incomplete + more_found + probe_found + minimal_found
    readings = {"paths": paths, "more_iterations": more, "large_eps": large_eps, "stability": stability,
                "optimality": optimal}
    return found, {name: _in_table_order(rows, table) for name, rows in readings.items()}


def _in_table_order(rows: list[dict[str, Any]], table: pd.DataFrame) -> list[dict[str, Any]]:
    """Readings in the results table's row order (model, defense, threat, attack as configured)."""
    keys = ["model", "defense", "norm", "targeting", "knowledge", "eps", "attack"]
    rank: dict[tuple[Any, ...], int] = {}
    for i, r in enumerate(table[keys].itertuples(index=False)):
        for depth in range(5, len(keys) + 1):  # a reading without eps or attack ranks with its group
            rank.setdefault(tuple(r[:depth]), i)

    def position(row: dict[str, Any]) -> int:
        for depth in range(len(keys), 4, -1):
            key = tuple(row.get(k) for k in keys[:depth])
            if key in rank:
                return rank[key]
        return len(table)

    return sorted(rows, key=position)
