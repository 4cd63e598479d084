"""Evaluation-failure indicators: each triggered by a toy model or attack built to trigger it, the
reference models with proper attacks raising none, and the path recorder changing nothing."""

from __future__ import annotations

import json
import sqlite3
from typing import ClassVar

import pandas as pd
import pytest
import torch

from advbench.attacks.pgd import PGD
from advbench.attacks.trace import PathRecorder
from advbench.config import load_config, parse_config
from advbench.eval.evaluator import evaluate
from advbench.eval.indicators import (
    doubled_params,
    optimality,
    path_reading,
    probe_findings,
    stability_reading,
)
from advbench.eval.masking import FLAGS, AttackInfo
from advbench.registry import ATTACKS
from advbench.tensors import HostSyncCounter
from advbench.threat import ThreatModel

torch.set_num_threads(1)

NEW_CODES = {"silent_success", "incomplete_optimization", "more_iterations", "not_chance_at_large_eps",
             "unstable_predictions", "suboptimal_minimal"}


class ReturnsTheStart(PGD):
    """PGD that walks its whole path and then returns the clean input: every adversarial point it
    passed is a silent success."""

    kind: ClassVar[str] = "iterative"

    def _run(self, model, x, y, threat, target, generator):
        super()._run(model, x, y, threat, target, generator)
        return x.clone()


@pytest.fixture
def returns_the_start():
    ATTACKS.add("test-returns-start", ReturnsTheStart)
    yield "test-returns-start"
    ATTACKS.unregister("test-returns-start")


def _config(**over):
    base = {"seed": 0, "device": "cpu", "data": {"name": "digits", "n": 100}, "models": ["digits-mlp"],
            "threats": [{"norm": "linf", "eps": [0.1]}], "attacks": [{"name": "pgd", "steps": 10}], "batch_size": 100}
    base.update(over)
    return parse_config(base)


def _codes(res) -> set[str]:
    return {f["code"] for f in res.masking["findings"]}


def _flags(res, attack: str) -> set[str]:
    rows = res.table[res.table.attack == attack]
    return {c for f in rows["flags"] for c in f.split(";") if c}


# ---------------------------------------------------------------------- the recorder
def test_codes_are_documented_next_to_the_others():
    from advbench.eval import masking

    assert NEW_CODES <= set(FLAGS) and all(f"``{c}``" in masking.__doc__ for c in NEW_CODES)
    assert {"grad_zero", "grad_nan", "black_box", "large_eps"} <= set(FLAGS)  # kept as they were


@pytest.mark.parametrize("name, params, norm, eps", [
    ("pgd", {"restarts": 3}, "linf", 0.1), ("pgd", {"loss": "margin"}, "l2", 1.0), ("bim", {}, "linf", 0.1),
    ("apgd", {"restarts": 2}, "linf", 0.1), ("apgd-t", {"targets": 2}, "l2", 1.0), ("illc", {}, "linf", 0.1),
])
def test_recording_changes_nothing_and_sees_every_run(name, params, norm, eps, digits_test, digits_mlp):
    x, y = digits_test.x[:60], digits_test.y[:60]
    threat = ThreatModel(norm=norm, eps=eps)
    attack = ATTACKS.create(name, **params)
    plain = attack(digits_mlp, x, y, threat, generator=torch.Generator().manual_seed(0))
    with PathRecorder(x, y) as rec:
        recorded = attack(digits_mlp, x, y, threat, generator=torch.Generator().manual_seed(0))
    assert torch.equal(plain.x_adv, recorded.x_adv) and torch.equal(plain.success, recorded.success)
    s = rec.summary()
    # an attack that returns what it found leaves no adversarial iterate behind; ILLC steers toward
    # the least-likely class and may pass a misclassified point on its way (the evaluator does not
    # trace it: its kind is not "iterative", it pursues another goal than misclassification)
    assert bool((s.found & ~recorded.success).any()) == (name == "illc")
    attacked = ~(digits_mlp(x).argmax(1) != y)  # the clean-wrong need no run (APGD skips them)
    assert bool((s.length[attacked] > 0).all()) and s.trace
    assert bool(torch.isfinite(s.margin_last[attacked]).all())


@pytest.mark.parametrize("name, params", [("pgd", {"restarts": 2}), ("apgd", {}), ("bim", {})])
def test_recording_makes_no_host_sync_per_step(name, params, digits_test, digits_mlp):
    x, y = digits_test.x[:40], digits_test.y[:40]
    threat = ThreatModel(norm="linf", eps=0.1)
    counts = []
    for steps in (5, 20):
        with PathRecorder(x, y), HostSyncCounter() as counter:
            ATTACKS.create(name, steps=steps, **params)(digits_mlp, x, y, threat,
                                                       generator=torch.Generator().manual_seed(0))
        counts.append(counter.counts)
    assert counts[0] == counts[1], counts


def test_path_reading_finds_the_silent_successes(digits_test, digits_mlp):
    x, y = digits_test.x[:70], digits_test.y[:70]
    keep = digits_mlp(x).argmax(1) == y  # clean-correct: the clean input it returns is no success
    x, y = x[keep][:60], y[keep][:60]
    threat = ThreatModel(norm="linf", eps=0.2)
    with PathRecorder(x, y) as rec:
        result = ReturnsTheStart(steps=10)(digits_mlp, x, y, threat, generator=torch.Generator().manual_seed(0))
    reading = path_reading(rec.summary(), result, digits_mlp, x, y, threat, None, list(range(100, 160)))
    assert not bool(result.success.any())
    assert reading["silent"] == reading["path_adversarial"] > 50
    assert all(100 <= i < 160 for i in reading["silent_examples"])


def test_doubled_params():
    linf = ThreatModel(norm="linf", eps=0.1)
    assert doubled_params("pgd", {"steps": 10}, linf) == {"steps": 20, "restarts": 2}
    assert doubled_params("pgd", {"steps": 10, "random_start": False}, linf) == {"steps": 20, "random_start": False}
    assert doubled_params("bim", {}, linf) == {"steps": 60}  # the paper's 30 at eps 0.1, resolved
    assert doubled_params("apgd", {"restarts": 2}, linf) == {"steps": 200, "restarts": 4}
    assert doubled_params("fgsm", {}, linf) is None


# ---------------------------------------------------------------------- each indicator, end to end
def test_silent_success_end_to_end_and_in_the_report(tmp_path, returns_the_start):
    cfg = _config(attacks=[{"name": returns_the_start, "steps": 10}])
    res = evaluate(cfg, tmp_path / "run", progress=False)
    assert "silent_success" in _flags(res, returns_the_start)
    (f,) = [f for f in res.masking["findings"] if f["code"] == "silent_success"]
    assert f["where"]["attack"] == returns_the_start and f["seen"] and f["try"]
    (reading,) = res.masking["indicators"]["paths"]
    assert reading["silent"] == reading["path_adversarial"] > 30 and reading["attack"] == returns_the_start
    # advbench report rebuilds it from the store alone
    from advbench.report import build_report

    report = build_report(tmp_path / "run")
    assert "silent_success" in {f["code"] for f in report.tables.masking["findings"]}
    assert "silent_success" in report.tables.results.set_index("attack").loc[returns_the_start, "flags"]
    assert "silent_success" in (report.folder / "report.md").read_text()


def test_a_two_step_pgd_is_incomplete_and_more_iterations_help(tmp_path):
    weak = {"name": "pgd", "steps": 2, "step_size": 0.02, "random_start": False, "label": "pgd-2"}
    res = evaluate(_config(threats=[{"norm": "linf", "eps": [0.2]}], attacks=[weak], data={"name": "digits", "n": 120},
                           batch_size=40), tmp_path, progress=False)
    assert {"incomplete_optimization", "more_iterations"} <= _flags(res, "pgd-2")
    (more,) = res.masking["indicators"]["more_iterations"]
    assert more["n"] == 64 and more["params"] == {"steps": 4}  # the first 64 examples, over two shards
    assert more["drop"] > 0.1
    (path,) = res.masking["indicators"]["paths"]
    assert path["rising"] > 0.5 * path["windowed"] and path["iterates"] == 2
    again = evaluate(_config(threats=[{"norm": "linf", "eps": [0.2]}], attacks=[weak],
                             data={"name": "digits", "n": 120}, batch_size=40), tmp_path, progress=False)
    assert again.jobs_run == 0 and again.masking == res.masking  # resumed from the store, the same readings


NOISY_MODEL = '''
import torch
from torch import nn

from advbench.registry import MODELS

class Noisy(nn.Module):
    """digits-mlp with fresh noise on its logits at every call: an undeclared randomized model."""
    def __init__(self):
        super().__init__()
        self.net = MODELS.create("digits-mlp")
    def forward(self, x):
        z = self.net(x)
        return z + 10.0 * torch.randn_like(z)

def build():
    return Noisy()
'''


def test_a_noisy_model_has_unstable_predictions(tmp_path, monkeypatch):
    (tmp_path / "noisy_model.py").write_text(NOISY_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = _config(models=[{"name": "noisy", "import": "noisy_model:build"}, "digits-mlp"],
                  attacks=["fgsm", {"name": "pgd", "steps": 5}])
    res = evaluate(cfg, tmp_path / "run", progress=False)
    stability = {r["model"]: r for r in res.masking["indicators"]["stability"]}
    assert stability["noisy"]["share"] > 0.1 and stability["digits-mlp"]["share"] == 0
    rows = res.table[res.table.model == "noisy"]
    assert all("unstable_predictions" in f for f in rows[rows.attack != "worst-case"]["flags"])
    assert not any("unstable_predictions" in f for f in res.table[res.table.model == "digits-mlp"]["flags"])


def test_stability_of_a_deterministic_model(digits_test, digits_cnn):
    reading = stability_reading(digits_cnn, digits_test.x[:32], (0.0, 1.0), torch.Generator().manual_seed(0))
    assert reading["changed_repeat"] == 0 and reading["changed_noise"] <= 2 and reading["n"] == 32


def _probe_jobs(classes):
    threat = json.dumps({"norm": "linf", "eps": 1.0, "targeting": "untargeted", "knowledge": "white_box"})
    return pd.DataFrame([{"model": "m", "defense": "d", "threat_json": threat, "attack": "probe:pgd", "shard": -1,
                          "probe": 1, "measured_json": json.dumps({"kind": "large_eps", "classes": classes})}])


def _probe_table(robust):
    return pd.DataFrame([{"model": "m", "defense": "d", "attack": "probe:pgd", "norm": "linf", "eps": 1.0,
                          "targeting": "untargeted", "knowledge": "white_box", "n": 100, "robust_accuracy": robust}])


@pytest.mark.parametrize("classes, robust, flagged", [(100, 0.06, True), (100, 0.035, False), (10, 0.06, False),
                                                      (100, 0.2, False)])  # 0.2: a large_eps finding instead
def test_not_chance_at_large_eps(classes, robust, flagged):
    table = pd.DataFrame([{"model": "m", "defense": "d", "attack": "pgd", "norm": "linf", "eps": 0.1,
                           "targeting": "untargeted", "knowledge": "white_box"}])
    info = {"pgd": AttackInfo("pgd", kind="iterative"), "probe:pgd": AttackInfo("pgd", kind="iterative")}
    found, chance, _ = probe_findings(_probe_jobs(classes), table, _probe_table(robust), pd.DataFrame(), info)
    assert [f.code for f in found] == (["not_chance_at_large_eps"] if flagged else [])
    assert chance[0]["chance"] == pytest.approx(1 / classes) and chance[0]["attacks"] == ["pgd"]
    if flagged:
        assert found[0].where["attack"] == ["pgd"] and "chance (1.0%" in found[0].seen


def _minimal_examples(distances: dict[str, list[float]], eps=(0.5, 1.0)):
    rows, jobs = [], []
    for attack, ds in distances.items():
        for e in eps:
            threat = json.dumps({"norm": "l2", "eps": e, "targeting": "untargeted", "knowledge": "white_box"})
            key = f"{attack}-{e}"
            jobs.append({"job_key": key, "model": "m", "defense": "d", "attack": attack, "minimal": 1, "probe": 0,
                         "suite": None, "suite_cascade": 0, "threat_json": threat})
            rows += [{"job_key": key, "model": "m", "defense": "d", "attack": attack, "threat_json": threat, "idx": i,
                      "label": 1, "pred_clean": 1 if d is not None else 0, "attacked": d is not None,
                      "min_distance": d, "probe": 0} for i, d in enumerate(ds)]
    return pd.DataFrame(rows), pd.DataFrame(jobs)


def test_optimality_is_the_area_against_the_per_example_best():
    inf = float("inf")
    # four examples (the last clean-wrong): a finds 0.2, 0.4, nothing; b 0.2, 0.8, 0.6 (all within E = 1)
    ex, jobs = _minimal_examples({"a": [0.2, 0.4, inf, None], "b": [0.2, 0.8, 0.6, None]})
    found, rows = optimality(ex, jobs, {})
    by = {r["attack"]: r for r in rows}
    best = 0.2 + 0.4 + 0.6  # per example: min(0.2, 0.2), min(0.4, 0.8), min(1, 0.6), 0
    assert by["a"]["optimality"] == pytest.approx(best / (0.2 + 0.4 + 1.0), rel=1e-3)
    assert by["b"]["optimality"] == pytest.approx(best / (0.2 + 0.8 + 0.6), rel=1e-3)
    assert by["a"]["eps_max"] == 1.0 and by["a"]["n"] == 4
    assert sorted(f.where["attack"] for f in found) == ["a", "b"]  # 0.75 and 0.75 < 0.9
    ex, jobs = _minimal_examples({"a": [0.2, 0.4, 0.6], "b": [0.2, 0.41, 0.6]})
    found, rows = optimality(ex, jobs, {})
    assert found == [] and min(r["optimality"] for r in rows) > 0.99


def test_a_crippled_minimal_attack_is_suboptimal(tmp_path):
    cfg = _config(threats=[{"norm": "l2", "eps": [0.5, 1.0]}],
                  attacks=["deepfool", {"name": "deepfool", "steps": 1, "label": "deepfool-1"}, "fab"])
    res = evaluate(cfg, tmp_path, progress=False)
    by = {r["attack"]: r for r in res.masking["indicators"]["optimality"]}
    assert set(by) == {"deepfool", "deepfool-1", "fab"}
    assert by["deepfool-1"]["optimality"] < 0.9 < min(by["deepfool"]["optimality"], by["fab"]["optimality"])
    assert "suboptimal_minimal" in _flags(res, "deepfool-1")
    assert "suboptimal_minimal" not in _flags(res, "deepfool") | _flags(res, "fab")


# ---------------------------------------------------------------------- no false alarms, resume, switch
def test_the_reference_models_with_proper_attacks_raise_nothing(tmp_path):
    """The embedded default (digits-mlp and digits-cnn, FGSM, BIM, ILLC, PGD at three L-inf eps):
    no flag at all, so the printed matrix keeps its columns; every reading is there."""
    res = evaluate(load_config(None), tmp_path, progress=False)
    assert res.masking["findings"] == [] and (res.table["flags"] == "").all()
    ind = res.masking["indicators"]
    assert len(ind["paths"]) == 2 * 2 * 3 and len(ind["more_iterations"]) == 2 * 2 * 3  # bim, pgd
    assert all(r["silent"] == 0 for r in ind["paths"])
    assert [r["model"] for r in ind["stability"]] == ["digits-mlp", "digits-cnn"]  # in the table's order
    assert all(r["chance"] == 0.1 for r in ind["large_eps"])


def test_a_store_without_readings_reruns_the_jobs_that_should_have_them(tmp_path):
    cfg = _config(attacks=["fgsm", {"name": "pgd", "steps": 5}])
    first = evaluate(cfg, tmp_path, progress=False)
    con = sqlite3.connect(tmp_path / "results.sqlite")
    con.execute("UPDATE jobs SET measured_json = NULL")  # as a store written before the indicators
    con.commit()
    con.close()
    again = evaluate(cfg, tmp_path, progress=False)
    assert again.jobs_run == 2  # pgd and the probe; fgsm records nothing
    pd.testing.assert_frame_equal(first.table.drop(columns="seconds"), again.table.drop(columns="seconds"))
    for m in (first.masking, again.masking):
        for p in m["probes"]:
            p.pop("seconds")
    assert again.masking == first.masking
    off = evaluate(_config(attacks=["fgsm", {"name": "pgd", "steps": 5}], masking_checks=False), tmp_path / "off",
                   progress=False)
    assert off.masking["indicators"] == {} and off.jobs_run == 2  # no probe, nothing recorded


def test_a_randomized_defense_is_unstable_and_its_paths_are_not_judged_on_one_draw(tmp_path):
    """Random resizing and padding: the naive view's predictions change from one evaluation to the
    next (EoT's mean over 4 draws less so); a single audited draw of a path point and of the
    returned one differ by chance, so the path's readings are kept but do not flag."""
    cfg = _config(models=["digits-cnn"], defenses=[{"name": "randomization", "pad_size": 10}], eot_samples=4, draws=3,
                  data={"name": "digits", "n": 60}, attacks=[{"name": "pgd", "steps": 10}])
    res = evaluate(cfg, tmp_path, progress=False)
    stability = {r["view"]: r for r in res.masking["indicators"]["stability"]}
    assert stability["naive"]["share"] > 0.1 and stability["naive"]["changed_repeat"] > 0
    assert "unstable_predictions" in _flags(res, "pgd")
    assert all(r["randomized"] for r in res.masking["indicators"]["paths"])
    assert not {"silent_success", "more_iterations"} & _codes(res)
