"""Adaptive evaluation in the evaluator: defenses and chains in configs, naive and adaptive rows,
randomized models scored over draws, masking flags end to end, resume with the new columns."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from advbench.config import parse_config
from advbench.defenses.base import InputTransform
from advbench.errors import AdvbenchError
from advbench.eval.evaluator import evaluate
from advbench.eval.tables import robust_accuracy_table
from advbench.registry import DEFENSES
from advbench.store import ResultStore

ROOT = Path(__file__).resolve().parents[1]
VOLATILE = ["seconds"]


class Binarize(InputTransform):
    """Pixels to 0 or 1 at 0.5: a non-differentiable stage (autograd's gradient is zero)."""

    differentiable = False

    def transform(self, x, generator=None):
        return (x > 0.5).to(x.dtype)


class Drop(InputTransform):
    """Randomized: each image is replaced by zeros with probability 1/2 (one draw per example)."""

    randomized = True

    def transform(self, x, generator=None):
        keep = torch.rand(x.shape[0], generator=generator, device="cpu").to(x.device) < 0.5
        return x * keep.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)


class Wrap:
    """A defense that is not an input transformation (wraps the model itself)."""

    def apply(self, model):
        return model


# A two-class model on 1x4x4 images: class 1 iff more than half the (transformed) pixels are on.
MODEL_SOURCE = '''
import torch
from torch import nn

class Majority(nn.Module):
    def forward(self, x):
        s = x.flatten(1).sum(1, keepdim=True) - 8.0
        return torch.cat([-s, s], dim=1)

def build():
    return Majority()
'''


@pytest.fixture(autouse=True)
def registered():
    names = {"t-binarize": Binarize, "t-drop": Drop, "t-wrap": Wrap}
    for name, factory in names.items():
        if name not in DEFENSES:
            DEFENSES.add(name, factory)
    yield
    for name in names:
        DEFENSES.unregister(name)


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """40 images: class 0 has every pixel in [0.1, 0.2], class 1 every pixel in [0.8, 0.9]."""
    (tmp_path / "majority_model.py").write_text(MODEL_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    g = np.random.default_rng(0)
    y = np.arange(40) % 2
    x = (0.1 + 0.1 * g.random((40, 1, 4, 4)) + 0.7 * y[:, None, None, None]).astype(np.float32)
    np.savez(tmp_path / "tiny.npz", x=x, y=y)
    return tmp_path


def _tiny_config(tiny, **over):
    base = {
        "seed": 0, "device": "cpu", "data": {"path": str(tiny / "tiny.npz")},
        "models": [{"name": "majority", "import": "majority_model:build"}],
        "defenses": ["t-binarize"],
        "threats": [{"norm": "linf", "eps": [0.2, 0.45]}],
        "attacks": ["fgsm", {"name": "pgd", "steps": 10, "random_start": False}],
        "batch_size": 20,
    }
    base.update(over)
    return parse_config(base)


def _cells(table):
    return table.set_index(["defense", "attack", "eps"])


# ---------------------------------------------------------------------- naive vs adaptive
def test_naive_attacks_see_no_gradient_and_bpda_breaks_every_point(tiny):
    """Binarize has zero gradient: naive FGSM/PGD (no random start) cannot move, so robust
    accuracy stays at 100%; through BPDA (identity surrogate) one step of 0.45 pushes every pixel
    across 0.5 and every point flips, while 0.2 is too small to flip any pixel."""
    res = evaluate(_tiny_config(tiny), tiny / "run", progress=False)
    t = _cells(res.table)
    assert list(dict.fromkeys(res.table.attack)) == ["fgsm", "fgsm+bpda", "pgd", "pgd+bpda", "worst-case"]
    assert (res.table.clean_accuracy == 1.0).all()
    for attack in ("fgsm", "pgd"):
        assert t.loc[("t-binarize", attack, 0.45), "robust_accuracy"] == 1.0
        assert t.loc[("t-binarize", attack + "+bpda", 0.45), "robust_accuracy"] == 0.0
        assert t.loc[("t-binarize", attack + "+bpda", 0.2), "robust_accuracy"] == 1.0
    assert t.loc[("t-binarize", "worst-case", 0.45), "robust_accuracy"] == 0.0  # both views count
    assert (res.table.audit_violations == 0).all()
    # the naive rows are flagged (zero gradients, flat over eps, the probe); the adaptive ones are not
    flags = res.table.set_index(["attack", "eps"])["flags"]
    assert set(flags["pgd", 0.45].split(";")) == {"eps_flat", "large_eps", "grad_zero"}
    assert flags["pgd", 0.2] == "large_eps;grad_zero"
    assert flags["pgd+bpda", 0.45] == flags["fgsm+bpda", 0.45] == flags["worst-case", 0.45] == ""
    masking = json.loads((tiny / "run" / "masking.json").read_text())
    probes = {p["attack"]: p["robust_accuracy"] for p in masking["probes"]}
    assert probes == {"probe:pgd": 1.0, "probe:pgd+bpda": 0.0}
    assert {f["code"] for f in masking["findings"]} == {"eps_flat", "large_eps", "grad_zero"}
    assert all(f["try"] for f in masking["findings"])
    assert "flags" in res.matrix.columns and "grad_zero" in res.matrix.loc[("majority", "t-binarize", "pgd"), "flags"]
    run = json.loads((tiny / "run" / "run.json").read_text())
    assert run["defended_models"]["majority / t-binarize"]["differentiable"] is False


@pytest.mark.parametrize("mode, attacks", [("off", ["pgd"]), ("only", ["pgd+bpda"])])
def test_adaptive_off_and_only(tiny, mode, attacks):
    cfg = _tiny_config(tiny, adaptive=mode, attacks=[{"name": "pgd", "steps": 5, "random_start": False}],
                       masking_checks=False)
    res = evaluate(cfg, tiny / mode, progress=False)
    assert list(res.table.attack.unique()) == attacks
    assert (res.table["flags"] == "").all() and not res.masking["enabled"]


def test_yaml_off_is_the_adaptive_mode_off():
    import yaml

    raw = yaml.safe_load("models: [digits-mlp]\nthreats: [{eps: 0.1}]\nattacks: [fgsm]\nadaptive: off\n")
    assert parse_config(raw).adaptive == "off"


# ---------------------------------------------------------------------- randomized scoring
def _examples(draws_clean, draws_adv, attack="pgd", label=1):
    rows = []
    for i, (c, a) in enumerate(zip(draws_clean, draws_adv)):
        rows.append({"idx": i, "label": label, "pred_clean": int(c[0]), "pred_adv": int(a[0]), "target": None,
                     "attacked": "1" in c, "valid": True, "success": any(p != "1" for p in a), "distance": 0.1,
                     "min_distance": None, "pred_clean_draws": ",".join(c), "pred_adv_draws": ",".join(a),
                     "model": "m", "defense": "d", "attack": attack,
                     "threat_json": json.dumps({"norm": "linf", "eps": 0.1, "targeting": "untargeted",
                                                "knowledge": "white_box"})})
    return pd.DataFrame(rows)


def _jobs(attacks):
    return pd.DataFrame([{"model": "m", "defense": "d", "attack": a, "threat_json": None, "violations": 0,
                          "quantization_failures": 0, "seconds": 0.0, "n_forward": 0, "n_backward": 0,
                          "n_queries": 0} for a in attacks])


def test_randomized_scoring_mean_and_all_on_a_hand_built_case():
    """Four points, four draws (label 1; a '0' is a wrong prediction in that draw):
    A survives 4/4, B 2/4, C 0/4 (attack), D 3/4 (clean wrong in one draw)."""
    clean = ["1111", "1111", "1111", "1011"]
    adv = ["1111", "1010", "0000", "1011"]
    ex = _examples(clean, adv)
    ex = pd.concat([ex, _examples(clean, ["1111", "0111", "1011", "1011"], attack="bim")])
    jobs = _jobs(["pgd", "bim"])
    for scoring, expected in (("mean", {"clean": 15 / 16, "pgd": (4 + 2 + 0 + 3) / 16, "worst": (4 + 1 + 0 + 3) / 16}),
                              ("all", {"clean": 3 / 4, "pgd": 1 / 4, "worst": 1 / 4})):
        t = robust_accuracy_table(ex.copy(), jobs, {"attacks": ["pgd", "bim"]}, scoring=scoring).set_index("attack")
        assert t.clean_accuracy["pgd"] == pytest.approx(expected["clean"])
        assert t.robust_accuracy["pgd"] == pytest.approx(expected["pgd"])
        # the worst case is per draw: B survives pgd in draws 0, 2 and bim in 1, 2, 3: both only in 2
        assert t.robust_accuracy["worst-case"] == pytest.approx(expected["worst"])
    mean = robust_accuracy_table(ex.copy(), jobs, scoring="mean").set_index("attack")
    # success over (point, draw) pairs where the clean prediction was right: B 2, C 4 of 15
    assert mean.attack_success_rate["pgd"] == pytest.approx(6 / 15)
    everything = robust_accuracy_table(ex.copy(), jobs, scoring="all").set_index("attack")
    assert everything.attack_success_rate["pgd"] == pytest.approx(2 / 3)  # B, C of A, B, C
    with pytest.raises(ValueError, match="scoring"):
        robust_accuracy_table(ex, jobs, scoring="median")


def test_randomized_model_is_scored_over_draws_end_to_end(tiny):
    """Drop zeroes an image with probability 1/2 per draw, and zeros are class 0: class-0 points
    are always right; class-1 points only in the draws that keep them. Over 12 draws a class-1
    point is right in every draw with probability 2^-12, so `all` gives the class-0 share."""
    common = {"defenses": ["t-drop"], "attacks": [{"name": "pgd", "steps": 5}], "draws": 12, "eot_samples": 3,
              "threats": [{"norm": "linf", "eps": [0.3]}], "masking_checks": False}
    mean = evaluate(_tiny_config(tiny, **common), tiny / "mean", progress=False)
    every = evaluate(_tiny_config(tiny, randomized_scoring="all", **common), tiny / "all", progress=False)
    assert list(mean.table.attack.unique()) == ["pgd", "pgd+eot", "worst-case"]
    assert (every.table.clean_accuracy == 0.5).all()
    con = sqlite3.connect(tiny / "mean" / "results.sqlite")
    ex = pd.read_sql_query("SELECT e.* FROM examples e JOIN jobs j USING (config_hash, job_key) "
                           "WHERE j.attack = 'pgd'", con)
    draws = np.array([[int(p) for p in s.split(",")] for s in ex.pred_clean_draws])
    assert draws.shape == (40, 12)
    assert mean.table.clean_accuracy.iloc[0] == pytest.approx((draws == ex.label.to_numpy()[:, None]).mean())
    assert 0.5 < mean.table.clean_accuracy.iloc[0] < 1.0
    # the same draws for every attack: one clean accuracy per model; all <= mean everywhere
    assert mean.table.clean_accuracy.nunique() == 1
    assert (every.table.robust_accuracy.to_numpy() <= mean.table.robust_accuracy.to_numpy() + 1e-12).all()


# ---------------------------------------------------------------------- resume with the new columns
def test_interrupted_run_resumes_to_the_same_table(tiny):
    """Jobs lost from the store (as after kill -9) are redone with the same numbers, also for a
    randomized chain attacked adaptively (the model's draws restart from each job's seed)."""
    cfg = _tiny_config(tiny, defenses=["none", ["t-binarize", "t-drop"]], draws=3, eot_samples=2,
                       attacks=["fgsm", {"name": "pgd", "steps": 5}])
    ref = evaluate(cfg, tiny / "ref", progress=False)
    assert "t-binarize+t-drop" in set(ref.table.defense)
    assert {"pgd", "pgd+bpda+eot"} <= set(ref.table.attack)
    part = evaluate(cfg, tiny / "part", progress=False)
    con = sqlite3.connect(tiny / "part" / "results.sqlite")
    keys = [k for (k,) in con.execute("SELECT job_key FROM jobs ORDER BY job_key")][::2]
    for table in ("jobs", "examples"):
        con.executemany(f"DELETE FROM {table} WHERE job_key = ?", [(k,) for k in keys])
    con.commit()
    con.close()
    again = evaluate(cfg, tiny / "part", progress=False)
    assert again.jobs_run == len(keys) and again.jobs_skipped == part.jobs_run - len(keys)
    pd.testing.assert_frame_equal(ref.table.drop(columns=VOLATILE), again.table.drop(columns=VOLATILE))
    masks = [json.loads((tiny / d / "masking.json").read_text()) for d in ("ref", "part")]
    for m in masks:
        for p in m["probes"]:
            p.pop("seconds")
    assert masks[0] == masks[1] and masks[0]["probes"]


def test_a_store_without_the_draw_columns_is_migrated(tmp_path):
    db = tmp_path / "old.sqlite"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE examples (config_hash TEXT NOT NULL, job_key TEXT NOT NULL, idx INTEGER NOT NULL, "
                "label INTEGER NOT NULL, pred_clean INTEGER NOT NULL, pred_adv INTEGER NOT NULL, target INTEGER, "
                "attacked INTEGER NOT NULL, valid INTEGER NOT NULL, success INTEGER NOT NULL, distance REAL, "
                "PRIMARY KEY (config_hash, job_key, idx))")
    con.execute("INSERT INTO examples VALUES ('h', 'k', 0, 1, 1, 1, NULL, 1, 1, 0, NULL)")
    con.commit()
    con.close()
    with ResultStore(db):
        pass
    con = sqlite3.connect(db)
    cols = [r[1] for r in con.execute("PRAGMA table_info(examples)")]
    assert {"min_distance", "pred_clean_draws", "pred_adv_draws"} <= set(cols)
    assert con.execute("SELECT pred_clean_draws FROM examples").fetchone() == (None,)


# ---------------------------------------------------------------------- configs
@pytest.mark.parametrize("defenses, message", [
    (["nope"], "unknown defense 'nope'"),
    ([["t-binarize", "nope"]], "unknown defense 'nope'"),
    ([[]], "needs at least one stage"),
    ([["t-binarize", ["t-drop"]]], "do not nest"),
    ([["t-binarize", "none"]], "'none' cannot be a stage"),
    ([["t-binarize", "t-wrap"]], "stage 't-wrap' is not an input transformation"),
    ([["t-binarize", {"name": "t-drop", "rate": 2}]], "unknown parameter"),
    ([{"name": "t-binarize", "quality": 2}], "unknown parameter"),
    (["t-binarize", ["t-binarize"]], "defense names must be unique"),
])
def test_bad_defense_and_chain_configs_give_one_line_errors(defenses, message):
    raw = {"models": ["digits-mlp"], "threats": [{"eps": 0.1}], "attacks": ["fgsm"], "defenses": defenses}
    with pytest.raises(AdvbenchError, match=message) as err:  # a ConfigError or an UnknownNameError
        parse_config(raw)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("field, value, message", [
    ("adaptive", "sometimes", "adaptive"), ("eot_samples", 0, "eot_samples"), ("draws", 0, "draws"),
    ("randomized_scoring", "median", "randomized_scoring"), ("masking_checks", "maybe", "masking_checks"),
])
def test_bad_adaptive_knobs_give_one_line_errors(field, value, message):
    raw = {"models": ["digits-mlp"], "threats": [{"eps": 0.1}], "attacks": ["fgsm"], field: value}
    with pytest.raises(AdvbenchError, match=message) as err:
        parse_config(raw)
    assert "\n" not in str(err.value)


def test_a_chain_config_end_to_end_on_digits_through_the_cli(tmp_path):
    """A chain of the registered transforms (bit depth, then randomization) on the digits MLP."""
    if not {"bit_depth", "randomization"} <= set(DEFENSES.list()):
        pytest.skip("the bit_depth and randomization defenses are not registered")
    cfg = tmp_path / "chain.yaml"
    cfg.write_text(textwrap.dedent("""
        seed: 0
        device: cpu
        data: {name: digits, n: 60}
        models: [digits-mlp]
        defenses: [none, [bit_depth, randomization]]
        threats: [{norm: linf, eps: [0.1, 0.3]}]
        attacks: [fgsm, {name: pgd, steps: 5}]
        eot_samples: 2
        draws: 2
    """))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "advbench.cli", "evaluate", str(cfg), "--out", str(tmp_path / "out")],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    assert "bit_depth+randomization" in r.stdout and "pgd+bpda+eot" in r.stdout
    df = pd.read_csv(tmp_path / "out" / "results.csv")
    assert set(df.defense) == {"none", "bit_depth+randomization"}
    chain = df[df.defense == "bit_depth+randomization"]
    assert set(chain.attack) == {"fgsm", "fgsm+bpda+eot", "pgd", "pgd+bpda+eot", "worst-case"}
    assert "flags" in df.columns and (df.audit_violations == 0).all()
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    stages = run["defended_models"]["digits-mlp / bit_depth+randomization"]["stages"]
    assert stages.index("BitDepth") < stages.index("Randomization")
    assert (tmp_path / "out" / "masking.json").exists()
