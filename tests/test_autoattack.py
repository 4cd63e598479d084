"""AutoAttack: the versions' components against the reference code's, the suite's number against
``run_standard_evaluation``, and the evaluator's cascade (one mechanism for both).

pyautoattack (the original AutoAttack) is a reference here only; advbench's components are its
own attacks (tests/test_apgd.py, test_fab.py, test_square.py check each against the reference).
"""

from __future__ import annotations

import logging
import sqlite3
import warnings

import pandas as pd
import pytest
import torch

from advbench.attacks.autoattack import components
from advbench.config import parse_config
from advbench.errors import ConfigError
from advbench.eval.evaluator import evaluate
from advbench.eval.plan import plan_jobs
from advbench.registry import ATTACKS
from advbench.threat import Norm, ThreatModel

pyautoattack = pytest.importorskip("pyautoattack")

REF_NAMES = {"apgd-ce": ("apgd", "ce"), "apgd-dlr": ("apgd", "dlr"), "apgd-t": ("apgd-t", None),
             "fab": ("fab", None), "fab-t": ("fab-t", None), "square": ("square", None)}


@pytest.mark.parametrize("version", ["standard", "plus", "rand"])
@pytest.mark.parametrize("norm", ["Linf", "L2", "L1"])
def test_components_are_the_references(version, norm, digits_mlp):
    """The order, iterations, restarts, target counts, queries and EoT of each component are
    those ``AutoAttack._set_version`` configures (Square omitted under L1: advbench's covers
    linf and l2, the paper's norms)."""
    ref = pyautoattack.AutoAttack(digits_mlp, norm=norm, eps=0.1, version=version, device="cpu")
    ours = components(version, Norm(norm.lower()))
    expected = [a for a in ref.attacks_to_run if not (a == "square" and norm == "L1")]
    assert [c.label for c in ours] == expected
    for c in ours:
        name, loss = REF_NAMES[c.label]
        assert c.attack == name
        if name == "apgd":
            assert c.params["loss"] == loss
            assert c.params["restarts"] == ref.apgd.n_restarts
            assert c.params.get("eot_iter", 1) == ref.apgd.eot_iter
            assert c.params.get("l1_eps_schedule", False) == ref.apgd.use_largereps
            assert ATTACKS.create(name, **c.params).steps == ref.apgd.n_iter
        elif name == "apgd-t":
            assert c.params["targets"] == ref.apgd_targeted.n_target_classes
            assert c.params["restarts"] == ref.apgd_targeted.n_restarts
            assert c.params.get("l1_eps_schedule", False) == ref.apgd_targeted.use_largereps
        elif name == "fab-t":
            assert c.params["targets"] == ref.fab.n_target_classes
            assert c.params["restarts"] == 1  # run_standard_evaluation sets it for fab-t
        elif name == "fab":
            assert c.params["restarts"] == ref.fab.n_restarts
        else:
            # advbench's budget counts the first query, the reference's n_queries the iterations after it
            assert c.params["queries"] == ref.square.n_queries + 1 and c.params["p_init"] == ref.square.p_init
            assert c.params["rescale_schedule"] == ref.square.rescale_schedule
        ATTACKS.create(c.attack, **c.params)  # valid parameters


@pytest.fixture(scope="module")
def batch(digits_test):
    return digits_test.x[:60].clone(), digits_test.y[:60].clone()


def test_standard_matches_run_standard_evaluation(batch, digits_mlp):
    """The suite's robust accuracy and the reference's on the same batch, within 2 examples."""
    x, y = batch
    logging.getLogger("auto-attack").setLevel(logging.ERROR)
    ref = pyautoattack.AutoAttack(digits_mlp, norm="Linf", eps=0.1, version="standard", seed=0, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x_ref, _ = ref.run_standard_evaluation(x.clone(), y.clone(), batch_size=len(x))
    with torch.no_grad():
        expected = int((digits_mlp(x_ref).argmax(dim=1) == y).sum())
        clean = digits_mlp(x).argmax(dim=1) == y
    result = ATTACKS.create("autoattack")(digits_mlp, x, y, ThreatModel(eps=0.1),
                                          generator=torch.Generator().manual_seed(0))
    got = int((clean & ~result.success).sum())
    assert 0 < expected < len(y)
    assert abs(got - expected) <= 2, (got, expected)
    assert result.valid.all()


def _config(**over):
    base = {"seed": 0, "device": "cpu", "data": {"name": "digits", "n": 60}, "models": ["digits-mlp"],
            "threats": [{"norm": "linf", "eps": [0.05, 0.1]}], "attacks": [{"name": "autoattack"}],
            "batch_size": 30, "masking_checks": False}
    base.update(over)
    return parse_config(base)


LABELS = ["autoattack.apgd-ce", "autoattack.apgd-t", "autoattack.fab-t", "autoattack.square"]


def _stored(out) -> pd.DataFrame:
    con = sqlite3.connect(out / "results.sqlite")
    return pd.read_sql_query("SELECT e.*, j.attack, j.threat_json, j.suite FROM examples e "
                             "JOIN jobs j USING (config_hash, job_key)", con)


def test_the_evaluator_runs_each_component_as_a_cascaded_job(tmp_path):
    cfg = _config()
    jobs = plan_jobs(cfg, __import__("numpy").arange(60))
    assert [j.attack_label for j in jobs if j.shard == 0 and j.threat["eps"] == 0.1] == LABELS
    by_key = {j.key: j for j in jobs}
    for j in jobs:
        assert j.attack["suite"] == "autoattack"
        earlier = [by_key[k].attack_label for k in j.after]
        assert earlier == LABELS[: LABELS.index(j.attack_label)] if not j.minimal else True
        assert all(by_key[k].shard == j.shard and by_key[k].threat == j.threat for k in j.after)
    fab = [j for j in jobs if j.attack_label == "autoattack.fab-t"]
    assert all(len(j.sweep_after) == 2 for j in fab)  # its one search covers both eps' survivors

    res = evaluate(cfg, tmp_path, progress=False)
    t = res.table.set_index(["eps", "attack"])
    ex = _stored(tmp_path)
    for eps in (0.05, 0.1):
        sub = ex[ex.threat_json.str.contains(f'"eps": {eps}')]
        broken = pd.Series(False, index=sorted(sub.idx.unique()))
        for label in LABELS:
            part = sub[sub.attack == label].set_index("idx").sort_index()
            if label != "autoattack.fab-t":  # the cascade: only points no earlier component broke
                assert not (part.attacked.astype(bool) & broken).any(), label
            broken |= part.success.astype(bool) | (part.valid.astype(bool) & (part.pred_adv != part.label))
            robust = ((part.pred_clean == part.label) & ~broken).mean()
            assert t.loc[(eps, label), "robust_accuracy"] == pytest.approx(robust), label  # cumulative rows
        assert t.loc[(eps, "autoattack"), "robust_accuracy"] == pytest.approx(t.loc[(eps, LABELS[-1]), "robust_accuracy"])
        assert t.loc[(eps, "worst-case"), "robust_accuracy"] == pytest.approx(t.loc[(eps, "autoattack"), "robust_accuracy"])
        assert 0.1 < t.loc[(eps, "autoattack"), "robust_accuracy"] < 0.95
    # resumed: nothing reruns, the same table
    again = evaluate(cfg, tmp_path, progress=False)
    assert again.jobs_run == 0 and again.jobs_skipped == res.jobs_run
    pd.testing.assert_frame_equal(again.table.drop(columns="seconds"), res.table.drop(columns="seconds"))


def test_without_cascade_each_component_attacks_every_point(tmp_path):
    cfg = _config(attacks=[{"name": "autoattack", "cascade": False}], threats=[{"norm": "linf", "eps": [0.1]}])
    res = evaluate(cfg, tmp_path, progress=False)
    ex = _stored(tmp_path)
    t = res.table.set_index("attack")
    correct = None
    worst = None
    for label in LABELS:
        part = ex[ex.attack == label].set_index("idx").sort_index()
        correct = part.pred_clean == part.label
        assert (part.attacked.astype(bool) == correct).all(), label  # every clean-correct point
        broken = part.success.astype(bool) | (part.valid.astype(bool) & (part.pred_adv != part.label))
        assert t.loc[label, "robust_accuracy"] == pytest.approx((correct & ~broken).mean())  # its own number
        worst = broken if worst is None else worst | broken
    assert t.loc["autoattack", "robust_accuracy"] == pytest.approx((correct & ~worst).mean())


def test_autoattack_rejects_what_it_cannot_run():
    with pytest.raises(ConfigError, match="targeting"):
        _config(threats=[{"norm": "linf", "eps": [0.1], "targeting": "random"}])
    with pytest.raises(ConfigError, match="version"):
        ATTACKS.create("autoattack", version="fast")


def test_steps_and_queries_replace_the_references_iteration_counts():
    threat = ThreatModel(norm="linf", eps=0.1)
    quick = ATTACKS.create("autoattack", steps=3, queries=20).components(threat)
    reference = components("standard", Norm.LINF)
    assert [c.label for c in quick] == [c.label for c in reference]
    for q, r in zip(quick, reference):
        over = {"queries": 20} if r.attack == "square" else {"steps": 3}
        assert q.params == {**r.params, **over} and q.attack == r.attack
    assert ATTACKS.create("autoattack").components(threat) == reference  # the default is the reference suite
    with pytest.raises(ConfigError):
        ATTACKS.create("autoattack", steps=0)
