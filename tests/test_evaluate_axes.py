"""`advbench evaluate` under the threat axes beyond the Lp ball (scope, region, perceptual bound,
physical feed): each is its own row, routed to the attacks made for it, scored from the audited
records, and universal perturbations are fit on held-out examples in one unsharded job."""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from advbench.config import parse_config
from advbench.errors import ConfigError
from advbench.eval.evaluator import evaluate
from advbench.eval.jobs import Job
from advbench.eval.plan import plan_jobs
from advbench.eval.tables import _outcomes
from advbench.eval.worker import job_corners
from advbench.leaderboard.entries import entries_from_table
from advbench.threat import ThreatModel

ROOT = Path(__file__).resolve().parents[1]

PLAIN = {"norm": "linf", "eps": 0.1}
UNIVERSAL = {"norm": "linf", "eps": 0.3, "scope": "universal"}
REGION = {"norm": "unbounded", "region": {"size": 3, "location": "random"}}
PERCEPTUAL = {"norm": "linf", "eps": 0.1, "perceptual": {"ssim": 0.9}}
PHYSICAL = {"norm": "linf", "eps": 0.1, "physical": {"transform": "noise", "draws": 4}}
PHYSICAL_MEAN = {"norm": "linf", "eps": 0.1,
                 "physical": {"transform": {"name": "noise", "std": 0.3}, "draws": 4, "rule": "mean"}}
ATTACKS = [{"name": "pgd", "steps": 10}, {"name": "uap", "method": "sgd", "epochs": 10, "batch_size": 16},
           {"name": "patch", "steps": 20}, {"name": "eot-pgd", "steps": 10, "samples": 4}]


def _raw(**over):
    base = {"seed": 0, "device": "cpu", "data": {"name": "digits", "n": 60}, "models": ["digits-cnn"],
            "fit": {"split": "train", "n": 100},
            "threats": [PLAIN, UNIVERSAL, REGION, PERCEPTUAL, PHYSICAL, PHYSICAL_MEAN], "attacks": ATTACKS,
            "batch_size": 25}
    base.update(over)
    return base


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("axes")
    return evaluate(parse_config(_raw()), out, progress=False, save_adversarial=True)


def _examples(out: Path) -> pd.DataFrame:
    con = sqlite3.connect(out / "results.sqlite")
    return pd.read_sql_query("SELECT e.*, j.attack, j.threat_json, j.shard FROM examples e JOIN jobs j "
                             "USING (config_hash, job_key) WHERE j.probe = 0", con)


def test_each_axis_is_its_own_row_routed_to_the_attacks_made_for_it(run):
    t = run.table
    rows = {(r.attack, r.constraints) for r in t.itertuples() if not r.attack.startswith("worst-case")}
    assert rows == {("pgd", ""), ("pgd", "ssim0.9"), ("pgd", "noisex4-all"), ("eot-pgd", "noisex4-all"),
                    ("pgd", "noise(std=0.3)x4-mean"), ("eot-pgd", "noise(std=0.3)x4-mean"), ("uap", "universal"),
                    ("patch", "square3@random")}
    # the matrix keeps threats of one norm and eps apart by their axes
    assert {"linf 0.1", "linf 0.1 ssim0.9", "linf 0.1 noisex4-all", "linf 0.3 universal",
            "unbounded inf square3@random"} <= set(run.matrix.columns)
    csv = pd.read_csv(run.out_dir / "results.csv", keep_default_na=False)
    assert list(csv.constraints) == list(t.constraints)


def test_every_row_is_recomputed_from_the_audited_records(run):
    ex = _examples(run.out_dir)
    for r in run.table.itertuples():
        if r.attack.startswith("worst-case"):
            continue
        threat = {"": PLAIN, "ssim0.9": PERCEPTUAL, "noisex4-all": PHYSICAL, "noise(std=0.3)x4-mean": PHYSICAL_MEAN,
                  "universal": UNIVERSAL, "square3@random": REGION}[r.constraints]
        mine = ex[(ex.attack == r.attack) & ex.threat_json.map(lambda s: _same(json.loads(s), threat))]
        assert len(mine) == 60
        correct = (mine.pred_clean == mine.label).to_numpy()
        if "physical" in threat:  # per draw of the feed: the prediction on the transformed example
            draws = np.array([[int(p) for p in s.split(",")] for s in mine.pred_adv_draws])
            assert draws.shape == (60, 4) and (draws[:, 0] == mine.pred_adv).all()
            held = (draws == mine.label.to_numpy()[:, None]) | ~mine.valid.to_numpy(dtype=bool)[:, None]
            robust = correct & held.any(axis=1) if threat is PHYSICAL else correct * held.mean(axis=1)
            if threat is PHYSICAL:  # rule all: broken exactly where the audit said so
                assert (mine.success.astype(bool).to_numpy() == (correct & ~held.any(axis=1))).all()
            feed = np.array([[int(p) for p in s.split(",")] for s in mine.pred_feed_draws])
            fine = feed == mine.label.to_numpy()[:, None]  # the clean input through each draw of the feed
            expect = correct & fine.any(axis=1) if threat is PHYSICAL else correct * fine.mean(axis=1)
            assert r.feed_accuracy == pytest.approx(expect.mean())
            assert r.feed_accuracy <= r.clean_accuracy
            if threat is PHYSICAL_MEAN:  # some draws of the noise alone misclassify a clean digit
                assert (~fine[correct]).any() and r.feed_accuracy < r.clean_accuracy
        else:
            broken = mine.success.astype(bool) | (mine.valid.astype(bool) & (mine.pred_adv != mine.label))
            robust = correct & ~broken.to_numpy()
        assert r.robust_accuracy == pytest.approx(robust.mean())
        if "physical" not in threat:
            assert np.isnan(r.feed_accuracy) and mine.pred_feed_draws.isna().all()
        assert r.audit_violations == 0
        if threat is UNIVERSAL:  # all 60 carry it; the fooling rate counts changed predictions
            assert mine.attacked.all()
            assert r.fooling_rate == pytest.approx((mine.valid.astype(bool) & (mine.pred_adv != mine.pred_clean)).mean())
            assert r.fooling_rate > 0.5
        else:
            assert np.isnan(r.fooling_rate)


def _same(stored: dict, spec: dict) -> bool:
    tm = ThreatModel.from_dict(stored)
    want = parse_config(_raw(threats=[spec], attacks=[
        "uap" if "scope" in spec else "patch" if "region" in spec else "pgd"])).threat_models()[0]
    return tm == want


def test_a_universal_threat_runs_one_unsharded_job_fit_on_held_out_examples(run):
    cfg = parse_config(_raw(threats=[UNIVERSAL], attacks=[ATTACKS[1]], fit={"split": "test", "n": 80}))
    indices = np.arange(0, 120, 2)
    jobs = [j for j in plan_jobs(cfg, indices) if not j.probe]
    assert len(jobs) == 1 and len(jobs[0].indices) == 60  # batch_size 25 does not shard it
    fit = set(jobs[0].fit["indices"])
    assert len(fit) == 80 and not fit & set(indices.tolist())  # the same split: drawn among the others
    assert "fit" in jobs[0].content
    again = Job.from_json(jobs[0].to_json())
    assert again.key == jobs[0].key
    cell = run.out_dir / "adversarial" / "digits-cnn__none__uap__linf-0.3__untargeted__universal"
    with np.load(f"{cell}.universal.npz") as z:
        delta = torch.from_numpy(z["universal"])
    with np.load(f"{cell}.npz") as z:
        x_adv, idx = torch.from_numpy(z["x_adv"]), z["idx"]
    from advbench.data.digits import load_digits

    x = load_digits("test").x[idx]
    assert delta.shape == (1, 1, 8, 8) and float(delta.abs().max()) <= 0.3 + 1e-6
    assert torch.equal(x_adv, (x + delta).clamp(0, 1))  # every kept example is that one perturbation applied
    provenance = json.loads((run.out_dir / "run.json").read_text())
    assert provenance["fit"]["split"] == "train" and provenance["fit"]["n"] == 100


def test_a_rerun_resumes_and_another_fit_set_changes_the_universal_job_only(run, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(run.out_dir, out)
    same = evaluate(parse_config(_raw()), out, progress=False, save_adversarial=True)
    assert same.jobs_run == 0
    pd.testing.assert_frame_equal(same.table.drop(columns="seconds"), run.table.drop(columns="seconds"))
    indices = np.arange(60)
    keys = {j.key for j in plan_jobs(parse_config(_raw()), indices)}
    other = plan_jobs(parse_config(_raw(fit={"split": "train", "n": 90})), indices)
    moved = [j for j in other if j.key not in keys]
    assert [j.attack_label for j in moved] == ["uap"]  # the universal job; every other key is unchanged


def test_random_regions_are_drawn_per_example_and_shared_by_every_attack(run):
    cfg = parse_config(_raw(threats=[REGION], attacks=[{"name": "patch", "steps": 20, "label": "patch"},
                                                       {"name": "patch", "steps": 5, "label": "patch5"}]))
    res = evaluate(cfg, run.out_dir.parent / "regions", progress=False, save_adversarial=True)
    adv = {}
    for label in ("patch", "patch5"):
        with np.load(res.out_dir / "adversarial" / f"digits-cnn__none__{label}__unbounded-inf__untargeted__square3@random.npz") as z:
            adv[label] = {k: z[k] for k in z.files}
    from advbench.data.digits import load_digits

    x = load_digits("test").x
    idx = adv["patch"]["idx"]
    job = plan_jobs(cfg, idx)[0]
    corners = job_corners(dataclasses.replace(job, indices=tuple(int(i) for i in idx)),
                          ThreatModel.from_dict(job.threat), x[idx])
    for label, a in adv.items():
        changed = (torch.from_numpy(a["x_adv"]) != x[a["idx"]]).any(dim=1)
        for i, (r, c) in enumerate(corners.tolist()):
            outside = changed[i].clone()
            outside[r : r + 3, c : c + 3] = False
            assert not outside.any(), (label, i)
    assert len(set(map(tuple, corners.tolist()))) > 5  # random, per example
    # the same squares whatever the shards: batch_size does not move them
    for shard in plan_jobs(cfg, idx)[:3]:
        at = np.searchsorted(idx, shard.indices)
        mine = job_corners(shard, ThreatModel.from_dict(shard.threat), x[list(shard.indices)])
        assert torch.equal(mine, corners[at])


def test_a_physical_feed_breaks_an_example_by_its_rule_over_the_draws():
    # four draws: fooled in 2, in 3, in all 4 of them
    ex = pd.DataFrame({"label": [1, 1, 1], "pred_clean": [1, 1, 1], "pred_adv": [2, 2, 2], "valid": [1, 1, 1],
                       "success": [0, 0, 1], "attacked": [1, 1, 1], "target": [None, None, None],
                       "pred_clean_draws": ["1,1,1,1"] * 3, "pred_adv_draws": ["2,2,1,1", "2,2,2,1", "2,2,2,2"]})
    _, _, plain = _outcomes(ex.drop(columns=["pred_clean_draws", "pred_adv_draws"]))
    assert plain[:, 0].tolist() == [True, True, True]  # the first draw alone would break all three
    assert _outcomes(ex, "all")[2][:, 0].tolist() == [False, False, True]
    assert _outcomes(ex, "majority")[2][:, 0].tolist() == [False, True, True]  # a strict majority
    clean, _, broken = _outcomes(ex, "mean")
    assert (clean & ~broken).mean(axis=1).tolist() == [0.5, 0.25, 0.0]  # the share of draws it holds in
    # records without the draws: the audited success alone
    assert _outcomes(ex.drop(columns=["pred_clean_draws", "pred_adv_draws"]), "all")[2][:, 0].tolist() == [False, False, True]


def test_leaderboard_entries_and_ids_carry_the_axes(run):
    entries = entries_from_table(run.table, parse_config(_raw()), run.masking)
    ids = {e["threat_id"] for e in entries}
    assert {"linf-0.1", "linf-0.1-ssim0.9", "linf-0.1-noisex4-all", "linf-0.1-noise(std=0.3)x4-mean", "linf-0.3-universal",
            "unbounded-inf-square3@random"} == ids
    assert len({e["ranking"] for e in entries}) == len(entries)


@pytest.mark.parametrize("over, message", [
    ({"fit": None}, "is universal: give the examples its perturbation is fit on"),
    ({"threats": [PLAIN], "attacks": ["pgd", "patch"]}, "attack 'patch' runs under none of the config's threat models"),
    ({"threats": [PLAIN, REGION], "attacks": ["pgd"]}, "is met by none of the attack entries"),
    ({"threats": [{**REGION, "region": {"size": 9, "location": "random"}}], "attacks": ["patch"]},
     "region size 9 does not fit 8x8 images"),
    ({"threats": [UNIVERSAL], "attacks": ["uap"], "fit": {"split": "test", "n": 400}}, "fit: n is 400"),
    ({"threats": [PHYSICAL], "attacks": ["pgd"], "defenses": [{"name": "randomization"}]},
     "randomized: the two randomnesses are not scored together"),
])
def test_bad_axis_configs_are_one_line_errors_that_leave_nothing(tmp_path, over, message):
    raw = _raw(**over)
    raw = {k: v for k, v in raw.items() if v is not None}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "advbench.cli", "evaluate", str(path), "--out",
                        str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert not (tmp_path / "out").exists()


def test_routing_is_an_error_only_where_nothing_is_left():
    with pytest.raises(ConfigError, match="runs under none"):
        parse_config(_raw(threats=[PLAIN], attacks=["pgd", "uap"]))
    cfg = parse_config(_raw(threats=[PLAIN, UNIVERSAL], attacks=["pgd", "uap"]))
    from advbench.config import attack_threats

    assert [t.constraint_label() for t in attack_threats(cfg, cfg.attacks[0])] == [""]
    assert [t.constraint_label() for t in attack_threats(cfg, cfg.attacks[1])] == ["universal"]


def test_a_cascade_under_a_physical_feed_skips_only_what_the_audit_broke(tmp_path):
    """The stored prediction is the feed's first draw: an example misclassified there but not
    adversarial by the rule is still robust, and the next attack of the cascade gets it."""
    cfg = parse_config(_raw(threats=[PHYSICAL], attacks=[{"name": "pgd", "steps": 5},
                                                         {"name": "eot-pgd", "steps": 10, "samples": 4}],
                            cascade=True))
    res = evaluate(cfg, tmp_path / "run", progress=False)
    ex = _examples(res.out_dir)
    first, second = (ex[ex.attack == a].set_index("idx").sort_index() for a in ("pgd", "eot-pgd"))
    correct = first.pred_clean == first.label
    assert (second.attacked.astype(bool) == (correct & ~first.success.astype(bool))).all()
    fooled_in_first_draw = correct & ~first.success.astype(bool) & (first.pred_adv != first.label)
    assert fooled_in_first_draw.any()  # the case the rule decides: attacked again, not skipped


def test_an_npz_file_has_no_splits_so_its_fit_set_is_drawn_beside_the_evaluated_examples(tmp_path):
    from advbench.data.digits import load_digits

    test = load_digits("test")
    np.savez(tmp_path / "d.npz", x=test.x[:200].numpy(), y=test.y[:200].numpy())
    cfg = parse_config(_raw(data={"path": str(tmp_path / "d.npz"), "n": 60}, threats=[UNIVERSAL],
                            attacks=[ATTACKS[1]], fit={"split": "train", "n": 140}))
    indices = np.arange(60)
    (job,) = [j for j in plan_jobs(cfg, indices) if not j.probe]
    assert sorted(job.fit["indices"]) == list(range(60, 200))  # every other example, none evaluated


def test_the_destruction_matrix_takes_universal_cells_too(tmp_path):
    cfg = parse_config(_raw(threats=[PLAIN, UNIVERSAL], attacks=[{"name": "pgd", "steps": 5}, ATTACKS[1]],
                            analysis={"destruction": ["noise"]}))
    res = evaluate(cfg, tmp_path / "run", progress=False)
    table = pd.read_csv(res.out_dir / "destruction.csv", keep_default_na=False)
    assert set(table.constraints) == {"", "universal"} and set(table.attack) == {"pgd", "uap"}
