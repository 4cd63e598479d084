"""Tables built from the stored per-example records (never from anything held only in memory).

``robust_accuracy_table`` gives one row per model x defense x threat model x attack, plus a
``worst-case`` row per model x defense x threat model that counts an example as broken when
any attack broke it. Definitions (n = evaluated examples):

- clean_accuracy = #(clean prediction correct) / n
- robust_accuracy = #(clean correct and still correctly classified on every audited adversarial
  example) / n: for a targeted threat, a misclassification into another class than the target
  breaks the example too, though it is not a success of the attack
- attack_success_rate = #(successful attacks) / #(clean correct)  (targeted: target reached)
- audit_violations = #(attacked examples rejected by the threat-model audit)
- median/mean distance: over successful examples, in the threat model's norm. For a
  minimal-perturbation attack (C&W, DeepFool, L-BFGS): over the clean-correct examples where it
  found any adversarial example, whatever eps (the distribution of minimal perturbations, the
  same at every eps); ``found_rate`` is the fraction of clean-correct examples where it found one
- a minimal-perturbation attack runs once per threat model and shard and is re-audited at each
  eps, so its rows at every eps report that one run's seconds and passes
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

WORST_CASE = "worst-case"

COLUMNS = [
    "model", "defense", "attack", "norm", "eps", "targeting", "knowledge", "n", "clean_accuracy",
    "robust_accuracy", "attack_success_rate", "audit_violations", "quantization_failures", "median_distance",
    "mean_distance", "found_rate", "seconds", "n_forward", "n_backward", "n_queries",
]


def _threat_columns(threat_json: str) -> dict[str, object]:
    t = json.loads(threat_json)
    eps = t.get("eps")
    return {"norm": t["norm"], "eps": float("inf") if eps is None else float(eps), "targeting": t["targeting"],
            "knowledge": t["knowledge"]}


def _broken(ex: pd.DataFrame) -> pd.Series:
    """An audited example that the model misclassifies (success or not), or a success."""
    return ex.success.astype(bool) | (ex.valid.astype(bool) & (ex.pred_adv != ex.label))


def _row(ex: pd.DataFrame, jobs: pd.DataFrame, success: pd.Series, broken: pd.Series) -> dict[str, object]:
    correct = ex.pred_clean == ex.label
    n = len(ex)
    n_correct = int(correct.sum())
    succ = success & correct
    found_rate = float("nan")
    if "min_distance" in ex and ex.min_distance.notna().any():  # a minimal-perturbation attack
        searched = ex.min_distance[correct & ex.attacked.astype(bool)].dropna()
        dist = searched[np.isfinite(searched)]
        found_rate = len(dist) / n_correct if n_correct else float("nan")
    else:
        dist = ex.distance[succ].dropna()
    return {
        "n": n,
        "clean_accuracy": n_correct / n if n else float("nan"),
        "robust_accuracy": int((correct & ~(broken | succ)).sum()) / n if n else float("nan"),
        "attack_success_rate": int(succ.sum()) / n_correct if n_correct else float("nan"),
        "audit_violations": int(jobs.violations.sum()),
        "quantization_failures": int(jobs.quantization_failures.sum()),
        "median_distance": float(dist.median()) if len(dist) else float("nan"),
        "mean_distance": float(dist.mean()) if len(dist) else float("nan"),
        "found_rate": found_rate,
        "seconds": float(jobs.seconds.sum()),
        "n_forward": int(jobs.n_forward.sum()),
        "n_backward": int(jobs.n_backward.sum()),
        "n_queries": int(jobs.n_queries.sum()),
    }


def robust_accuracy_table(
    examples: pd.DataFrame,
    jobs: pd.DataFrame,
    order: dict[str, list[str]] | None = None,
    cascade: bool = False,
) -> pd.DataFrame:
    """One row per cell plus worst-case rows; ``order`` lists models/defenses/threats/attacks in config order.

    With ``cascade`` the attacks ran in order on the points still robust, so each attack's row
    reports the cumulative numbers of the attacks up to it.
    """
    if examples.empty:
        return pd.DataFrame(columns=COLUMNS)
    examples = examples.assign(success=examples.success.astype(bool))
    order = order or {}
    rows = []
    for (model, defense, threat_json), group in examples.groupby(["model", "defense", "threat_json"], sort=False):
        gjobs = jobs[(jobs.model == model) & (jobs.defense == defense) & (jobs.threat_json == threat_json)]
        tcols = _threat_columns(threat_json)
        attacks = list(dict.fromkeys(group.attack))
        if "attacks" in order:
            attacks.sort(key=lambda a: order["attacks"].index(a) if a in order["attacks"] else len(order["attacks"]))
        index = pd.Index(sorted(group.idx.unique()), name="idx")
        succeeded = pd.Series(False, index=index)  # by any attack so far
        broken = pd.Series(False, index=index)
        base = None
        for attack in attacks:
            ex = group[group.attack == attack].set_index("idx").sort_index()
            base = ex if base is None else base
            succeeded = succeeded | ex.success.reindex(index, fill_value=False)
            broken = broken | _broken(ex).reindex(index, fill_value=False)
            if cascade:
                success, brk = succeeded.reindex(ex.index), broken.reindex(ex.index)
            else:
                success, brk = ex.success, _broken(ex)
            row = {"model": model, "defense": defense, "attack": attack, **tcols,
                   **_row(ex, gjobs[gjobs.attack == attack], success, brk)}
            rows.append(row)
        if len(attacks) > 1 or cascade:
            ex = base
            row = {"model": model, "defense": defense, "attack": WORST_CASE, **tcols,
                   **_row(ex, gjobs, succeeded.reindex(ex.index), broken.reindex(ex.index))}
            # the worst case's distances: the smallest successful perturbation over attacks
            succ = group[group.success]
            if len(succ):
                best = succ.groupby("idx").distance.min().dropna()
                row["median_distance"], row["mean_distance"] = float(best.median()), float(best.mean())
            rows.append(row)
    table = pd.DataFrame(rows, columns=COLUMNS)
    return _sort(table, order)


def _sort(table: pd.DataFrame, order: dict[str, list[str]]) -> pd.DataFrame:
    def rank(col: str, values: pd.Series) -> pd.Series:
        ref = order.get(col + "s", [])
        return values.map(lambda v: ref.index(v) if v in ref else (len(ref) + 1 if v == WORST_CASE else len(ref)))

    keys = table.assign(
        _m=rank("model", table.model), _d=rank("defense", table.defense), _a=rank("attack", table.attack)
    )
    keys = keys.sort_values(["_m", "_d", "norm", "targeting", "knowledge", "eps", "_a"], kind="stable")
    return keys.drop(columns=["_m", "_d", "_a"]).reset_index(drop=True)


def robust_accuracy_matrix(table: pd.DataFrame, attack_order: list[str] | None = None) -> pd.DataFrame:
    """Robust accuracy (%) with rows model/defense/attack and one column per threat budget.

    Rows follow the table's model and defense order and ``attack_order`` (default: first
    appearance), with each group's worst case last.
    """
    if table.empty:
        return pd.DataFrame()
    t = table.assign(
        threat=[f"{n} {('inf' if not np.isfinite(e) else f'{e:g}')}" + ("" if g == "untargeted" else f" {g}")
                for n, e, g in zip(table.norm, table.eps, table.targeting)],
        acc=(table.robust_accuracy * 100).round(1),
    )
    clean = t.groupby(["model", "defense"], sort=False).clean_accuracy.first().mul(100).round(1)
    m = t.pivot_table(index=["model", "defense", "attack"], columns="threat", values="acc", sort=False)
    triples = list(dict.fromkeys(zip(table.model, table.defense, table.attack)))
    groups = list(dict.fromkeys((mo, de) for mo, de, _ in triples))
    attacks = list(attack_order or []) + [a for _, _, a in triples if a not in (attack_order or []) and a != WORST_CASE]
    rank = {a: i for i, a in enumerate(dict.fromkeys(attacks))}
    rows = sorted(triples, key=lambda r: (groups.index(r[:2]), rank.get(r[2], len(rank))))
    m = m.reindex(pd.MultiIndex.from_tuples(rows, names=m.index.names))
    m.insert(0, "clean", [clean[(mo, de)] for mo, de, _ in m.index])
    m.columns.name = "robust accuracy %"
    return m


def format_matrix(matrix: pd.DataFrame) -> str:
    if matrix.empty:
        return "(no results)"
    return matrix.to_string(float_format=lambda v: f"{v:.1f}")
