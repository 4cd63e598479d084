"""Tables built from the stored per-example records (never from anything held only in memory).

``robust_accuracy_table`` gives one row per model x defense x threat model x attack, plus a
``worst-case`` row per model x defense x threat model that counts an example as broken when
any attack broke it. A suite (AutoAttack) gets a row of its own, the worst case over its
components, whose rows are cumulative when the suite cascaded (each component ran on the points
the earlier ones left robust, so its row is the robust accuracy after it, as AutoAttack prints).
Definitions (n = evaluated examples):

- clean_accuracy = #(clean prediction correct) / n
- robust_accuracy = #(clean correct and still correctly classified on every audited adversarial
  example) / n: for a targeted threat, a misclassification into another class than the target
  breaks the example too, though it is not a success of the attack
- attack_success_rate = #(successful attacks) / #(clean correct)  (targeted: target reached)
- fooling_rate (universal threat models only, else NaN) = #(examples whose prediction the audited
  shared perturbation changes, whatever the label) / n: every held-out example carries it
- feed_accuracy (physical feeds only, else NaN) = #(clean-correct examples the transformation of
  the clean input does not break, by the threat's rule over the same draws) / n: what the feed
  alone leaves, the ceiling of the row's robust accuracy against an attacker who can submit x
- audit_violations = #(attacked examples rejected by the threat-model audit)
- median/mean distance: over successful examples, in the threat model's norm. For a
  minimal-perturbation attack (C&W, DeepFool, L-BFGS): over the clean-correct examples where it
  found any adversarial example, whatever eps (the distribution of minimal perturbations, the
  same at every eps); ``found_rate`` is the fraction of clean-correct examples where it found one
- a minimal-perturbation attack runs once per threat model and shard and is re-audited at each
  eps, so its rows at every eps report that one run's seconds and passes

``constraints`` names a threat's axes beyond the Lp ball (scope, region, perceptual bound,
physical feed; :meth:`~advbench.threat.ThreatModel.constraint_label`), empty when it has none:
two threats of one norm and eps that differ there are two rows, and never share a worst case.
Under a physical feed the records keep the model's prediction on each of the transformation's
draws (seeded per example, so every attack meets the same draws): an example is broken in a
draw where it is misclassified there, and with rule ``all`` (``majority``) it is broken when it
is in all (a strict majority of) the draws; with rule ``mean`` it counts for the share of draws
it holds in, like a randomized model's ``mean`` scoring (whatever ``scoring`` says), and the
worst case over attacks is per draw as below.

A randomized defended model is scored over several draws of its randomness (the records keep
each draw's clean and adversarial prediction). Per example and draw: clean-correct, and robust
= clean-correct and not broken in that draw. ``scoring="mean"``: a point's clean (robust) score
is the fraction of draws it is clean-correct (robust) in, and the accuracies average the scores;
``scoring="all"``: a point counts only if it is clean-correct (robust) in every draw. The attack
success rate is successes / clean-correct over (point, draw) pairs (``mean``), or the share of
points clean-correct in every draw that the attack broke in some draw (``all``); distances are
over the points it succeeded on in some draw. The worst case is per draw too: a point survives
a draw if it survives every attack in that draw. A deterministic model has one draw, where both
rules are the definitions above.

``flags`` is empty here; the evaluator fills it with the gradient-masking codes
(:mod:`advbench.eval.masking`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from advbench.threat import Scope, ThreatModel

WORST_CASE = "worst-case"
ANY_KNOWLEDGE = "any"  # the knowledge column of a worst case over attackers of several knowledge levels
KNOWLEDGE_ORDER = ("white_box", "score_based", "decision_based", "transfer")

COLUMNS = [
    "model", "defense", "attack", "norm", "eps", "targeting", "knowledge", "constraints", "n", "clean_accuracy",
    "robust_accuracy", "attack_success_rate", "fooling_rate", "feed_accuracy", "target_is_label", "audit_violations", "quantization_failures", "median_distance",
    "mean_distance", "found_rate", "seconds", "n_forward", "n_backward", "n_queries", "flags",
]

SCORING = ("mean", "all")


def _threat_columns(threat_json: str) -> dict[str, object]:
    t = json.loads(threat_json)
    eps = t.get("eps")
    return {"norm": t["norm"], "eps": float("inf") if eps is None else float(eps), "targeting": t["targeting"],
            "knowledge": t["knowledge"], "constraints": constraints_of(t)}


def constraints_of(threat: dict[str, object]) -> str:
    """A threat's axes beyond the Lp ball as its ``constraints`` column (``universal``,
    ``square8@random``, ``ssim0.95``, ``photox8-all``, joined by ``-``; empty when none)."""
    return ThreatModel.from_dict(threat).constraint_label()


def with_constraints(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with its ``constraints`` column as strings: '' where unset, or for a table read
    from a results.csv (or records) written before the column existed, so rows group and match
    on it whatever their source."""
    values = table["constraints"].fillna("").astype(str) if "constraints" in table else ""
    return table.assign(constraints=values)


def _by_rule(hits: np.ndarray, rule: str) -> np.ndarray:
    """(n, draws) bool -> (n,): hit in all draws (``all``) or in a strict majority (``majority``)."""
    need = hits.shape[1] if rule == "all" else hits.shape[1] // 2 + 1
    return hits.sum(axis=1) >= need


def _physical_rule(threat_json: str) -> str | None:
    """A threat's physical rule (``all``, ``majority``, ``mean``), None without a physical feed."""
    physical = json.loads(threat_json).get("physical")
    return None if physical is None else str(physical.get("rule", "all"))


def _scoring(threat_json: str, scoring: str) -> str:
    """How a group's draws count: a physical feed's ``mean`` rule scores its draws by the mean,
    whatever ``randomized_scoring`` says (that is for a randomized model's own draws)."""
    return "mean" if _physical_rule(threat_json) == "mean" else scoring


def _universal(threat_json: str) -> bool:
    return json.loads(threat_json).get("scope") == Scope.UNIVERSAL.value


def _draws(col: pd.Series) -> np.ndarray:
    return np.array([[int(p) for p in s.split(",")] for s in col], dtype=np.int64).reshape(len(col), -1)


def _outcomes(ex: pd.DataFrame, rule: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per example and draw, arrays (n, draws) of: clean prediction correct, attack succeeded,
    example broken (an audited example the model misclassifies, or a success). A deterministic
    model has one draw (the stored predictions); a randomized one each stored draw.

    Under a physical feed (``rule``) the records keep the model's prediction on each draw of the
    transformation (the clean prediction is the untransformed input's): an example is broken in a
    draw where that prediction is wrong, and with ``all`` / ``majority`` it is broken when it is in
    all / a strict majority of the draws (one column); with ``mean`` every draw stays a column,
    scored by the mean. Records without the draws count the audited success alone."""
    label = ex.label.to_numpy()[:, None]
    valid = ex.valid.to_numpy(dtype=bool)[:, None]
    if len(ex) and "pred_clean_draws" in ex and ex.pred_clean_draws.notna().all():
        pc, pa = _draws(ex.pred_clean_draws), _draws(ex.pred_adv_draws)
        target = pd.to_numeric(ex.target).to_numpy(dtype=float)[:, None]
        goal = np.where(np.isnan(target), pa != label, pa == np.nan_to_num(target, nan=-1))
        success = ex.attacked.to_numpy(dtype=bool)[:, None] & valid & goal
        broken = success | (valid & (pa != label))
        if rule in ("all", "majority"):
            return (pc == label)[:, :1], _by_rule(success, rule)[:, None], _by_rule(broken, rule)[:, None]
        return pc == label, success, broken
    success = ex.success.to_numpy(dtype=bool)[:, None]
    broken = success if rule else success | (valid & (ex.pred_adv != ex.label).to_numpy()[:, None])
    return (ex.pred_clean == ex.label).to_numpy()[:, None], success, broken


def _row(ex: pd.DataFrame, jobs: pd.DataFrame, clean: np.ndarray, success: np.ndarray, broken: np.ndarray,
         scoring: str = "mean") -> dict[str, object]:
    """A row's numbers from per-example-and-draw outcomes (see :func:`_outcomes`)."""
    n = len(ex)
    hit = clean & success
    # a targeted threat's examples already of the target class are left out of its attacks: they
    # stay robust unless broken otherwise, and are not counted as attempts
    left_out = _target_is_label(ex)
    if scoring == "all":  # a point counts only if it holds in every draw
        clean_pts = clean.all(axis=1)
        clean_score, robust_score = clean_pts.sum(), (clean & ~broken).all(axis=1).sum()
        asr_num, asr_den = (clean_pts & hit.any(axis=1)).sum(), (clean_pts & ~left_out).sum()
    else:  # the fraction of draws a point holds in
        clean_score, robust_score = clean.mean(axis=1).sum(), (clean & ~broken).mean(axis=1).sum()
        asr_num, asr_den = hit.sum(), (clean & ~left_out[:, None]).sum()
    correct = clean.any(axis=1)
    found_rate = float("nan")
    if "min_distance" in ex and ex.min_distance.notna().any():  # a minimal-perturbation attack
        searched = ex.min_distance[correct & ex.attacked.to_numpy(dtype=bool)].dropna()
        dist = searched[np.isfinite(searched)]
        attempted = int((correct & ~left_out).sum())
        found_rate = len(dist) / attempted if attempted else float("nan")
    else:
        dist = ex.distance[hit.any(axis=1)].dropna()
    return {
        "n": n,
        "clean_accuracy": float(clean_score) / n if n else float("nan"),
        "robust_accuracy": float(robust_score) / n if n else float("nan"),
        "attack_success_rate": float(asr_num) / float(asr_den) if asr_den else float("nan"),
        "fooling_rate": _fooling_rate(ex),
        "feed_accuracy": _feed_accuracy(ex),
        "target_is_label": int((correct & left_out).sum()),
        "audit_violations": int(jobs.violations.sum()),
        "quantization_failures": int(jobs.quantization_failures.sum()),
        "median_distance": float(dist.median()) if len(dist) else float("nan"),
        "mean_distance": float(dist.mean()) if len(dist) else float("nan"),
        "found_rate": found_rate,
        "seconds": float(jobs.seconds.sum()),
        "n_forward": int(jobs.n_forward.sum()),
        "n_backward": int(jobs.n_backward.sum()),
        "n_queries": int(jobs.n_queries.sum()),
        "flags": "",
    }


def _fooling_rate(ex: pd.DataFrame) -> float:
    """Under a universal threat model, Moosavi-Dezfooli et al.'s fooling rate: the share of the
    held-out examples (all of them: a universal perturbation is applied to every one) whose
    prediction the audited perturbation changes, whatever the label (a randomized model's, or a
    physical feed's, first draw). NaN for any other threat model."""
    if not len(ex) or "threat_json" not in ex or not _universal(ex.threat_json.iloc[0]):
        return float("nan")
    changed = ex.valid.to_numpy(dtype=bool) & ex.attacked.to_numpy(dtype=bool) & (ex.pred_adv != ex.pred_clean).to_numpy()
    return float(changed.mean())


def _feed_accuracy(ex: pd.DataFrame) -> float:
    """Under a physical feed, what the feed alone leaves: the share of examples clean-correct and
    not broken by the transformation of their clean input, by the threat's rule over its draws
    (the robust accuracy of an attack that changes nothing). NaN for any other threat model."""
    rule = _physical_rule(ex.threat_json.iloc[0]) if len(ex) and "threat_json" in ex else None
    if rule is None or "pred_feed_draws" not in ex or not ex.pred_feed_draws.notna().all():
        return float("nan")
    wrong = _draws(ex.pred_feed_draws) != ex.label.to_numpy()[:, None]
    correct = (ex.pred_clean == ex.label).to_numpy()
    if rule == "mean":
        return float((correct * (1 - wrong.mean(axis=1))).mean())
    return float((correct & ~_by_rule(wrong, rule)).mean())


def _target_is_label(ex: pd.DataFrame) -> np.ndarray:
    """Per example: a targeted threat whose target is the example's own label."""
    target = pd.to_numeric(ex.target).to_numpy(dtype=float)
    return ~np.isnan(target) & (target == ex.label.to_numpy(dtype=float))


def is_worst_case(label: object) -> bool:
    """Whether a results row is a worst case (over every attack, or over those of one knowledge)."""
    return isinstance(label, str) and (label == WORST_CASE or label.startswith(WORST_CASE + " ("))


def worst_case_rows(table: pd.DataFrame) -> pd.Series:
    """The boolean mask of a table's worst-case rows."""
    return table.attack.map(is_worst_case).astype(bool)


def _worst_key(threat_json: str) -> str:
    """A threat model without the attacker's access (knowledge, query budget): the worst case over
    attacks combines every attacker that ran against the same perturbation set."""
    t = json.loads(threat_json)
    return json.dumps({k: v for k, v in t.items() if k not in ("knowledge", "query_budget")}, sort_keys=True)


def _access(threat_json: str) -> str:
    t = json.loads(threat_json)
    return t["knowledge"] + (f", {t['query_budget']} queries" if t.get("query_budget") else "")


class _Group:
    """One (model, defense, threat) group's per-example outcomes by attack, on a shared index."""

    def __init__(self, group: pd.DataFrame, attacks: list[str]) -> None:
        self.index = pd.Index(sorted(group.idx.unique()), name="idx")
        self.parts = []
        for attack in attacks:
            ex = group[group.attack == attack].set_index("idx").sort_index()
            clean, success, brk = _outcomes(ex, _physical_rule(ex.threat_json.iloc[0]) if len(ex) else None)
            pos = self.index.get_indexer(ex.index)
            s_all = np.zeros((len(self.index), success.shape[1]), bool)
            b_all = np.zeros((len(self.index), brk.shape[1]), bool)
            s_all[pos], b_all[pos] = success, brk
            self.parts.append((attack, ex, clean, success, brk, pos, s_all, b_all))

    def only(self, attacks: Sequence[str]) -> _Group:
        """The same group with the parts of ``attacks`` only."""
        sub = object.__new__(_Group)
        sub.index, sub.parts = self.index, [p for p in self.parts if p[0] in attacks]
        return sub


def _suites(jobs: pd.DataFrame) -> dict[str, tuple[list[str], bool]]:
    """Each suite (AutoAttack) among ``jobs``: its components' labels and whether it cascaded."""
    if "suite" not in jobs or jobs.suite.isna().all():
        return {}
    out: dict[str, tuple[list[str], bool]] = {}
    for r in jobs[jobs.suite.notna()].itertuples():
        members, _ = out.get(r.suite, ([], False))
        if r.attack not in members:
            members.append(r.attack)
        out[r.suite] = (members, bool(r.suite_cascade))
    return out


def robust_accuracy_table(
    examples: pd.DataFrame,
    jobs: pd.DataFrame,
    order: dict[str, list[str]] | None = None,
    cascade: bool = False,
    scoring: str = "mean",
) -> pd.DataFrame:
    """One row per cell plus worst-case rows; ``order`` lists models/defenses/threats/attacks in config order.

    The worst case per (model, defense, threat model) is the per-example minimum over *every*
    attack that ran there, whatever its knowledge: where attacks of several knowledge levels (or
    query budgets) met the same perturbation set, the ``worst-case`` row (knowledge ``any``)
    combines them all, and ``worst-case (<knowledge>)`` rows give each level's own.

    With ``cascade`` the attacks ran in order on the points still robust, so each attack's row
    reports the cumulative numbers of the attacks up to it. ``scoring`` says how a randomized
    model's draws count (module docstring).
    """
    if scoring not in SCORING:
        raise ValueError(f"scoring must be one of {SCORING}, got {scoring!r}")
    if examples.empty:
        return pd.DataFrame(columns=COLUMNS)
    examples = examples.assign(success=examples.success.astype(bool))
    order = order or {}
    base_scoring = scoring
    rows = []
    by_key: dict[tuple[str, str, str], list[tuple[str, _Group, pd.DataFrame]]] = {}
    for (model, defense, threat_json), group in examples.groupby(["model", "defense", "threat_json"], sort=False):
        gjobs = jobs[(jobs.model == model) & (jobs.defense == defense) & (jobs.threat_json == threat_json)]
        tcols = _threat_columns(threat_json)
        attacks = list(dict.fromkeys(group.attack))
        if "attacks" in order:
            attacks.sort(key=lambda a: order["attacks"].index(a) if a in order["attacks"] else len(order["attacks"]))
        g = _Group(group, attacks)
        scoring = _scoring(threat_json, base_scoring)
        suites = _suites(gjobs)
        suite_of = {m: name for name, (members, cascaded) in suites.items() if cascaded for m in members}
        succeeded = broken = None  # per example of the group and draw: by any attack so far
        in_suite: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # the same within each cascaded suite
        for attack, ex, clean, success, brk, pos, s_all, b_all in g.parts:
            succeeded = s_all if succeeded is None else succeeded | s_all
            broken = b_all if broken is None else broken | b_all
            if cascade:
                success, brk = succeeded[pos], broken[pos]
            elif attack in suite_of:  # a cascaded suite's rows are cumulative over its components
                s_so_far, b_so_far = in_suite.get(suite_of[attack], (s_all, b_all))
                s_so_far, b_so_far = s_so_far | s_all, b_so_far | b_all
                in_suite[suite_of[attack]] = (s_so_far, b_so_far)
                success, brk = s_so_far[pos], b_so_far[pos]
            rows.append({"model": model, "defense": defense, "attack": attack, **tcols,
                         **_row(ex, gjobs[gjobs.attack == attack], clean, success, brk, scoring)})
        for name, (members, _) in suites.items():  # a suite's row: its components' per-example worst case
            rows.append(_worst_row(model, defense, name, tcols, [g.only(members)],
                                   gjobs[gjobs.attack.isin(members)], scoring))
        by_key.setdefault((model, defense, _worst_key(threat_json)), []).append((threat_json, g, gjobs))
    for (model, defense, _), members in by_key.items():
        several = len(members) > 1
        for threat_json, g, gjobs in members:
            if len(g.parts) > 1 or (cascade and not several):
                label = f"{WORST_CASE} ({_access(threat_json)})" if several else WORST_CASE
                rows.append(_worst_row(model, defense, label, _threat_columns(threat_json), [g], gjobs,
                                       _scoring(threat_json, base_scoring)))
        if several:
            tcols = {**_threat_columns(members[0][0]), "knowledge": ANY_KNOWLEDGE}
            gjobs = pd.concat([m[2] for m in members])
            rows.append(_worst_row(model, defense, WORST_CASE, tcols, [m[1] for m in members], gjobs,
                                   _scoring(members[0][0], base_scoring)))
    table = pd.DataFrame(rows, columns=COLUMNS)
    return _sort(table, order)


def _worst_row(model: str, defense: str, label: str, tcols: dict[str, object], groups: list[_Group],
               gjobs: pd.DataFrame, scoring: str) -> dict[str, object]:
    """The worst case over every attack of ``groups`` (threat groups over the same examples): an
    example is broken when any of them broke it; its distance is the smallest successful one."""
    index = groups[0].index
    for g in groups[1:]:
        index = index.union(g.index)
    succeeded = broken = None
    base = None
    for g in groups:
        for attack, ex, clean, success, brk, pos, s_all, b_all in g.parts:
            at = index.get_indexer(g.index)
            s = np.zeros((len(index), s_all.shape[1]), bool)
            b = np.zeros((len(index), b_all.shape[1]), bool)
            s[at], b[at] = s_all, b_all
            succeeded = s if succeeded is None else succeeded | s
            broken = b if broken is None else broken | b
            base = (ex, clean) if base is None else base
    ex, clean = base
    pos = index.get_indexer(ex.index)
    row = {"model": model, "defense": defense, "attack": label, **tcols,
           **_row(ex, gjobs, clean, succeeded[pos], broken[pos], scoring)}
    row["found_rate"] = row["fooling_rate"] = float("nan")  # a worst case is no one perturbation
    succ = pd.concat([part[1][part[1].success] for g in groups for part in g.parts])
    if len(succ):  # the worst case's distances: the smallest successful perturbation over attacks
        best = succ.groupby(level="idx").distance.min().dropna()
        row["median_distance"], row["mean_distance"] = float(best.median()), float(best.mean())
    else:
        row["median_distance"] = row["mean_distance"] = float("nan")
    return row


def _sort(table: pd.DataFrame, order: dict[str, list[str]]) -> pd.DataFrame:
    def rank(col: str, values: pd.Series) -> pd.Series:
        ref = order.get(col + "s", [])
        return values.map(lambda v: ref.index(v) if v in ref else (
            len(ref) + (2 if v == WORST_CASE else 1 if is_worst_case(v) else 0)))

    levels = [*KNOWLEDGE_ORDER, ANY_KNOWLEDGE]
    keys = table.assign(
        _m=rank("model", table.model), _d=rank("defense", table.defense), _a=rank("attack", table.attack),
        _k=table.knowledge.map(lambda k: levels.index(k) if k in levels else len(levels)),
    )
    keys = keys.sort_values(["_m", "_d", "norm", "targeting", "constraints", "_k", "eps", "_a"], kind="stable")
    return keys.drop(columns=["_m", "_d", "_a", "_k"]).reset_index(drop=True)


def robust_accuracy_matrix(table: pd.DataFrame, attack_order: list[str] | None = None,
                           flag_order: Sequence[str] = (),
                           eps_labels: dict[tuple[str, float], str] | None = None) -> pd.DataFrame:
    """Robust accuracy (%) with rows model/defense/attack and one column per threat budget,
    headed by the eps as the config wrote it (``eps_labels``: (norm, eps) -> ``8/255``; else ``%g``).

    Rows follow the table's model and defense order and ``attack_order`` (default: first
    appearance), with each group's worst case last. When any cell has gradient-masking flags, a
    last ``flags`` column lists each row's codes (over all its threats), in ``flag_order``.
    """
    if table.empty:
        return pd.DataFrame()
    labels = eps_labels or {}
    t = table.assign(
        threat=[f"{n} {('inf' if not np.isfinite(e) else labels.get((n, e), f'{e:g}'))}"
                + ("" if g == "untargeted" else f" {g}")
                + ("" if k == "white_box" else f" {k}")  # threats that differ only in knowledge stay apart
                + (f" {c}" if c else "")  # ... or in the axes beyond the Lp ball
                for n, e, g, k, c in zip(table.norm, table.eps, table.targeting, table.knowledge,
                                         with_constraints(table).constraints)],
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
    if "flags" in table and table["flags"].fillna("").astype(bool).any():  # the row's codes over its threats
        codes: dict[tuple[str, str, str], dict[str, None]] = {}
        for mo, de, a, f in zip(table.model, table.defense, table.attack, table["flags"].fillna("")):
            codes.setdefault((mo, de, a), {}).update(dict.fromkeys(c for c in f.split(";") if c))
        rank = {c: i for i, c in enumerate(flag_order)}
        m["flags"] = [";".join(sorted(codes.get(r, {}), key=lambda c: rank.get(c, len(rank)))) for r in m.index]
    m.columns.name = "robust accuracy %"
    return m


def format_matrix(matrix: pd.DataFrame) -> str:
    if matrix.empty:
        return "(no results)"
    return matrix.to_string(float_format=lambda v: f"{v:.1f}")


def worst_case_examples(examples: pd.DataFrame, scoring: str = "mean",
                        keep: Callable[[str], bool] | None = None) -> list[dict[str, object]]:
    """Per (model, defense, perturbation set): each example's robust score under the worst case
    over its attacks (those ``keep`` accepts, by label; default all), as ``idx`` and ``robust``
    arrays: 1 / 0 for a deterministic model, the share of draws it holds in (``scoring: mean``)
    or whether it holds in all (``all``) for a randomized one. Its mean is the worst-case row's
    robust accuracy; paired comparisons of two models on the same examples use the arrays."""
    if scoring not in SCORING:
        raise ValueError(f"scoring must be one of {SCORING}, got {scoring!r}")
    out: list[dict[str, object]] = []
    if examples.empty:
        return out
    examples = examples.assign(success=examples.success.astype(bool),
                               worst_key=examples.threat_json.map(_worst_key))
    for (model, defense, key), group in examples.groupby(["model", "defense", "worst_key"], sort=False):
        attacks = [a for a in dict.fromkeys(group.attack) if keep is None or keep(a)]
        if not attacks:
            continue
        g = _Group(group[group.attack.isin(attacks)], attacks)
        broken = np.logical_or.reduce([p[7] for p in g.parts])
        clean = np.zeros_like(broken)
        for p in g.parts:
            clean[p[5]] = p[2]
        held = clean & ~broken
        rule = _scoring(key, scoring)
        robust = held.all(axis=1) if rule == "all" else held.mean(axis=1)
        t = json.loads(key)
        out.append({"model": model, "defense": defense, "norm": t["norm"],
                    "eps": float("inf") if t.get("eps") is None else float(t["eps"]), "targeting": t["targeting"],
                    "constraints": constraints_of(t), "idx": g.index.to_numpy(), "robust": robust.astype(float),
                    "clean": (clean.all(axis=1) if rule == "all" else clean.mean(axis=1)).astype(float)})
    return out
