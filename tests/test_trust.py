"""The evaluator's numbers can be trusted: targets, the worst case over every attacker, audited
examples only in every table, distances that mean one thing, content-keyed results."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from advbench.attacks.base import Attack
from advbench.config import parse_config
from advbench.eval.evaluator import evaluate
from advbench.registry import ATTACKS
from advbench.threat import Norm

SMALL = {"seed": 0, "device": "cpu", "data": {"name": "digits", "n": 90}, "models": ["digits-mlp"], "batch_size": 45,
         "masking_checks": False}


def _run(tmp_path: Path, name: str = "run", **over):
    cfg = parse_config({**SMALL, **over})
    return evaluate(cfg, tmp_path / name, progress=False)


def _rows(table: pd.DataFrame, attack: str) -> pd.DataFrame:
    return table[table.attack == attack].reset_index(drop=True)


# ---------------------------------------------------------------------- 1. targets
@pytest.mark.parametrize("targeting", [{"targeting": "fixed", "target_class": 3}, {"targeting": "least_likely"},
                                       {"targeting": "random"}])
def test_at_eps_zero_a_targeted_attack_breaks_nothing(tmp_path, targeting):
    """At eps 0 nothing can move: robust accuracy equals clean accuracy and nothing succeeds, also
    for the examples whose label is the fixed target (left out and counted)."""
    res = _run(tmp_path, threats=[{"norm": "linf", "eps": [0.0, 0.1], **targeting}],
               attacks=["fgsm", {"name": "pgd", "steps": 5}])
    t = res.table
    at0 = t[t.eps == 0.0]
    assert (at0.robust_accuracy == at0.clean_accuracy).all()
    assert (at0[at0.attack != "worst-case"].attack_success_rate == 0).all()
    if targeting["targeting"] == "fixed":
        con = sqlite3.connect(res.out_dir / "results.sqlite")
        ex = pd.read_sql_query("SELECT * FROM examples", con)
        left = ex[(ex.label == 3) & (ex.pred_clean == 3)].idx.nunique()
        assert left > 0 and (t.target_is_label == left).all()
        assert not ex[(ex.label == 3)].attacked.any()  # left out of the targeted attack
    else:
        assert (t.target_is_label == 0).all()


def test_random_targets_are_drawn_per_example_not_per_attack(tmp_path):
    res = _run(tmp_path, threats=[{"norm": "linf", "eps": [0.05, 0.2], "targeting": "random"}],
               attacks=["fgsm", {"name": "pgd", "steps": 5}, "bim"])
    con = sqlite3.connect(res.out_dir / "results.sqlite")
    ex = pd.read_sql_query("SELECT e.idx, e.label, e.target, j.attack FROM examples e JOIN jobs j USING (config_hash, job_key)", con)
    per_example = ex.groupby("idx").target.nunique()
    assert (per_example == 1).all()  # one target per example for every attack and eps
    assert (ex.target != ex.label).all()


# ---------------------------------------------------------------------- 2. worst case over every attacker
def test_the_worst_case_combines_every_knowledge_level(tmp_path):
    """A transfer attack from a second model and the white-box attacks at the same norm and eps
    meet in one worst case: an example broken by either counts."""
    res = _run(tmp_path, models=["digits-cnn"],
               threats=[{"norm": "linf", "eps": [0.1, 0.2]}, {"norm": "linf", "eps": [0.1, 0.2], "knowledge": "transfer"}],
               attacks=[{"name": "fgsm", "knowledge": ["white_box"]}, {"name": "bim", "steps": 3, "knowledge": ["white_box"]},
                        {"name": "transfer", "source": {"name": "digits-mlp"}, "attack": {"name": "pgd", "steps": 10},
                         "label": "from-mlp", "knowledge": ["transfer"]}])
    t = res.table
    con = sqlite3.connect(res.out_dir / "results.sqlite")
    ex = pd.read_sql_query("SELECT e.*, j.attack, j.threat_json FROM examples e JOIN jobs j USING (config_hash, job_key)", con)
    ex["eps"] = ex.threat_json.map(lambda s: json.loads(s)["eps"])
    for eps in (0.1, 0.2):
        sub = ex[ex.eps == eps]
        broken = (sub.success.astype(bool) | (sub.valid.astype(bool) & (sub.pred_adv != sub.label))).groupby(sub.idx).any()
        correct = (sub.pred_clean == sub.label).groupby(sub.idx).first()
        expected = float((correct & ~broken).mean())
        any_row = t[(t.attack == "worst-case") & (t.eps == eps)]
        assert len(any_row) == 1 and any_row.knowledge.iloc[0] == "any"
        assert any_row.robust_accuracy.iloc[0] == pytest.approx(expected)
        white = t[(t.attack == "worst-case (white_box)") & (t.eps == eps)].robust_accuracy.iloc[0]
        transfer = t[(t.attack == "from-mlp") & (t.eps == eps)].robust_accuracy.iloc[0]
        assert any_row.robust_accuracy.iloc[0] <= min(white, transfer)
    assert "linf 0.1 any" in res.matrix.columns


# ---------------------------------------------------------------------- 3. audited examples only
class Outside(Attack):
    """Breaks every example with a point 3 eps away (outside its ball): the audit rejects them all."""

    norms: ClassVar[frozenset[Norm]] = frozenset({Norm.LINF})
    randomized: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()

    def _run(self, model, x, y, threat, target, generator):
        return (x + 3 * threat.eps * torch.where(x > 0.5, -1.0, 1.0)).clamp(0, 1)


@pytest.fixture
def outside():
    ATTACKS.add("test-outside", Outside)
    yield
    ATTACKS.unregister("test-outside")


def test_rejected_examples_enter_no_matrix(tmp_path, outside):
    res = _run(tmp_path, models=["digits-mlp", "digits-cnn"], threats=[{"norm": "linf", "eps": [0.1]}],
               attacks=["test-outside", "fgsm"], analysis={"transfer": True, "destruction": ["jpeg"]})
    row = _rows(res.table, "test-outside")
    assert (row.audit_violations > 0).all() and (row.robust_accuracy == row.clean_accuracy).all()
    transfer = pd.read_csv(res.out_dir / "transfer.csv")
    rejected = transfer[(transfer.attack == "test-outside") & transfer.source.isin(["digits-mlp", "digits-cnn"])]
    clean_error = {m: 1 - res.table[(res.table.model == m)].clean_accuracy.iloc[0] for m in ("digits-mlp", "digits-cnn")}
    for r in rejected.itertuples():  # the stand-ins are the clean inputs: each target's clean error rate
        assert r.error_rate == pytest.approx(clean_error[r.target]), r
        assert r.av_distortion == 0
    destruction = pd.read_csv(res.out_dir / "destruction.csv")
    assert (destruction[destruction.attack == "test-outside"].numerator == 0).all()


# ---------------------------------------------------------------------- 5. distances in every mode
def test_minimal_attack_distances_are_the_same_in_cascade_mode(tmp_path):
    base = dict(threats=[{"norm": "l2", "eps": [0.3, 0.6, 1.2]}], attacks=[{"name": "fgsm"}, "deepfool"])
    plain = _run(tmp_path, "plain", **base).table
    cascade = _run(tmp_path, "cascade", cascade=True, **base).table
    cols = ["median_distance", "mean_distance", "found_rate"]
    p, c = _rows(plain, "deepfool"), _rows(cascade, "deepfool")
    assert c[cols].nunique().max() == 1  # one search, scored at every eps
    pd.testing.assert_frame_equal(p[cols], c[cols])
    # and the cascade's rows stay cumulative: deepfool's row is the worst case of both
    w = _rows(plain, "worst-case")
    assert np.allclose(c.robust_accuracy, w.robust_accuracy)


# ---------------------------------------------------------------------- 6. costs per example
def test_pass_counts_are_the_same_for_any_batch_size(tmp_path):
    over = dict(threats=[{"norm": "linf", "eps": [0.1]}], attacks=["fgsm", {"name": "pgd", "steps": 4, "random_start": False}])
    one = _run(tmp_path, "a", batch_size=90, **over).table
    many = _run(tmp_path, "b", batch_size=7, **over).table
    cols = ["n_forward", "n_backward", "robust_accuracy"]
    pd.testing.assert_frame_equal(one[cols], many[cols])
    pgd = _rows(one, "pgd")
    attacked = round(pgd.clean_accuracy.iloc[0] * 90)
    assert pgd.n_backward.iloc[0] == 4 * attacked and _rows(one, "fgsm").n_backward.iloc[0] == attacked


# ---------------------------------------------------------------------- 8. results never stale
def _save_program(path: Path, seed: int) -> None:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    torch.export.save(torch.export.export(net, (torch.zeros(2, 1, 8, 8),)), str(path))


def _digest(res) -> str:
    return json.loads((res.out_dir / "run.json").read_text())["model_digests"]["mine"]


def test_a_replaced_model_file_is_evaluated_afresh(tmp_path):
    path = tmp_path / "model.pt2"
    over = dict(models=[{"name": "mine", "file": str(path)}], threats=[{"norm": "linf", "eps": [0.1]}], attacks=["fgsm"])
    _save_program(path, 0)
    first = _run(tmp_path, **over)
    before = _digest(first)
    _save_program(path, 1)  # the same path, other weights
    second = _run(tmp_path, **over)
    assert second.jobs_skipped == 0 and second.jobs_run == first.jobs_run
    assert (second.table.n == 90).all()
    assert not np.allclose(first.table.clean_accuracy, second.table.clean_accuracy)
    assert any("other model or data content" in note for note in second.notes)
    assert _digest(second) != before
    third = _run(tmp_path, **over)  # unchanged content: everything resumes
    assert third.jobs_run == 0
    pd.testing.assert_frame_equal(third.table.drop(columns="seconds"), second.table.drop(columns="seconds"))


def test_a_replaced_data_file_is_evaluated_afresh(tmp_path):
    from advbench.data.digits import load_digits

    d = load_digits("test")
    path = tmp_path / "d.npz"
    x = (d.x[:60].permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    np.savez(path, x=x, y=d.y[:60].numpy())
    over = dict(data={"path": str(path)}, threats=[{"norm": "linf", "eps": [0.1]}], attacks=["fgsm"], batch_size=30)
    assert _run(tmp_path, **over).jobs_run == 2
    x[40:] = 255 - x[40:]  # the second shard's images change
    np.savez(path, x=x, y=d.y[:60].numpy())
    second = _run(tmp_path, **over)
    assert second.jobs_run == 1 and second.jobs_skipped == 1  # only the changed shard reruns
    assert (second.table.n == 60).all()


def test_retraining_a_trained_model_never_mixes_old_and_new_jobs(tmp_path, monkeypatch):
    from advbench.training import parse_train_config, train

    monkeypatch.setenv("ADVBENCH_CACHE", str(tmp_path / "cache"))
    raw = {"name": "mine", "architecture": "digits-mlp", "data": {"name": "digits", "split": "train"},
           "eval": {"split": "test", "eps": 0.1, "steps": 2, "n": 30}, "recipe": "plain", "epochs": 1, "seed": 0}
    over = dict(models=[{"name": "mine", "trained": "mine"}], threats=[{"norm": "linf", "eps": [0.1]}], attacks=["fgsm"])
    train(parse_train_config(raw), progress=False)
    assert (_run(tmp_path, **over).table.n == 90).all()
    train(parse_train_config({**raw, "seed": 1}), progress=False)  # retrained into the same folder
    second = _run(tmp_path, **over)
    assert second.jobs_skipped == 0 and (second.table.n == 90).all()  # n does not double
    report = __import__("advbench.report", fromlist=["build_report"]).build_report(second.out_dir)
    assert (report.tables.results.n == 90).all()


def test_a_folder_with_another_configs_results_says_so(tmp_path):
    _run(tmp_path, threats=[{"norm": "linf", "eps": [0.1]}], attacks=["fgsm"])
    other = _run(tmp_path, threats=[{"norm": "linf", "eps": [0.2]}], attacks=["fgsm"])
    notes = [n for n in other.notes if "other configs" in n]
    assert len(notes) == 1 and "\n" not in notes[0]
    assert (other.table.eps == 0.2).all()


# ---------------------------------------------------------------------- 13-15. bad input, no litter
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "advbench.cli", *args], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def _config_file(tmp_path: Path, text: str, name: str = "c.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


TINY = """
seed: {seed}
device: cpu
data: {{name: digits, n: {n}}}
models: [{model}]
threats: [{{norm: linf, eps: [0.1]{threat}}}]
attacks: [fgsm]
masking_checks: false
"""


def _tiny(tmp_path, seed=0, n=20, model="digits-mlp", threat=""):
    return _config_file(tmp_path, TINY.format(seed=seed, n=n, model=model, threat=threat))


def _one_error(r, *words):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "internal error" not in lines[0], r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_out_that_is_a_file_or_under_a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    _one_error(_cli("evaluate", _tiny(tmp_path), "--out", str(tmp_path / "afile")), "is a file")
    _one_error(_cli("evaluate", _tiny(tmp_path), "--out", str(tmp_path / "afile" / "run")), "which is a file")
    assert (tmp_path / "afile").read_text() == "x"


def test_an_out_folder_that_cannot_be_created(tmp_path, monkeypatch):
    from advbench.errors import ConfigError

    def refuse(self, *a, **k):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(ConfigError, match="cannot create the output folder"):
        _run(tmp_path, threats=[{"norm": "linf", "eps": [0.1]}], attacks=["fgsm"])


def test_a_corrupt_store_is_reported_and_kept(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.sqlite").write_bytes(b"not a database" * 100)
    _one_error(_cli("evaluate", _tiny(tmp_path), "--out", str(out)), "results.sqlite", "not a readable advbench results store",
               "never deletes")
    assert (out / "results.sqlite").read_bytes() == b"not a database" * 100


@pytest.mark.parametrize("seed", [2**64, -1])
def test_a_seed_out_of_range(tmp_path, seed):
    _one_error(_cli("evaluate", _tiny(tmp_path, seed=seed), "--out", str(tmp_path / "run")), "seed")
    _one_error(_cli("evaluate", _tiny(tmp_path), "--seed", str(seed), "--out", str(tmp_path / "run")), "seed")
    assert not (tmp_path / "run").exists()


def test_a_training_config_whose_architecture_does_not_fit_the_data(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    path = _config_file(tmp_path, """
        name: wrong
        architecture: mnist-cnn
        data: {name: digits, split: train}
        eval: {split: test, eps: 0.1}
        recipe: plain
        epochs: 1
    """)
    env = {"ADVBENCH_CACHE": str(cache)}
    r = subprocess.run([sys.executable, "-m", "advbench.cli", "train", path, "--quiet"], cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT), **env}, capture_output=True, text=True, timeout=300)
    _one_error(r, "mnist-cnn", "1x28x28", "1x8x8")
    assert not (cache / "trained" / "wrong").exists()


@pytest.mark.parametrize("model", ['"a/b"', '"..\\\\x"', '"x\\0y"', '{name: m, trained: ../x}', '{name: "/abs"}'])
def test_names_that_would_leave_their_folder_are_refused(tmp_path, model):
    _one_error(_cli("evaluate", _tiny(tmp_path, model=model), "--out", str(tmp_path / "run")), "cannot be used as a name")
    assert not (tmp_path / "run").exists()


def test_a_leaderboard_suite_name_cannot_write_outside_entries(tmp_path):
    board = tmp_path / "board"
    board.mkdir()
    (board / "suite.yaml").write_text(TINY.format(seed=0, n=20, model='"../../escaped"', threat=""))
    _one_error(_cli("leaderboard", "update", "--dir", str(board)), "cannot be used as a name")
    assert not list(tmp_path.rglob("escaped*"))


def test_trained_names_stay_in_the_trained_store():
    from advbench.errors import ConfigError
    from advbench.models.trained import load_trained

    with pytest.raises(ConfigError, match="cannot be used as a name"):
        load_trained("../x")


def test_n_larger_than_the_data_is_an_error(tmp_path):
    _one_error(_cli("evaluate", _tiny(tmp_path, n=1000), "--out", str(tmp_path / "run")), "n is 1000", "360 examples")
    assert not (tmp_path / "run").exists()


def test_bounds_that_do_not_contain_the_data_are_an_error(tmp_path):
    r = _cli("evaluate", _tiny(tmp_path, threat=", bounds: [0.2, 1.0]"), "--out", str(tmp_path / "run"))
    _one_error(r, "outside the bounds [0.2, 1]")
    assert not (tmp_path / "run").exists()  # nothing is written for a config that fails its checks


def test_a_model_with_more_outputs_than_classes_is_warned_about(tmp_path):
    wide = tmp_path / "wide.pt2"
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 12)).eval()
    torch.export.save(torch.export.export(net, (torch.zeros(2, 1, 8, 8),)), str(wide))
    r = _cli("evaluate", _tiny(tmp_path, model=f'{{name: wide, file: "{wide}"}}'), "--out", str(tmp_path / "run"), "--quiet")
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "12 scores" in warnings[0] and "10 classes" in warnings[0]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["notes"]


def test_temporary_files_of_a_killed_run_are_removed_on_the_next_start(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    dead = out / ".results.csv.999999999.0123abcd.tmp"  # a pid no process has
    dead.write_text("half")
    mine = out / f".results.csv.{os.getpid()}.0123abcd.tmp"  # a live process's: left alone
    mine.write_text("busy")
    r = _cli("evaluate", _tiny(tmp_path), "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    assert not dead.exists() and mine.exists()


# ---------------------------------------------------------------------- 16. streamed examples
def test_saved_examples_stream_one_shard_at_a_time(tmp_path):
    import gc
    import weakref

    from advbench.files import write_npz_rows

    alive: list[weakref.ref] = []

    def parts():
        for k in range(4):
            gc.collect()
            assert all(r() is None for r in alive[:-1]), "an earlier part is still held"
            x = np.full((5, 3, 2, 2), k, dtype=np.float32)
            alive.append(weakref.ref(x))
            yield {"x_adv": x, "idx": np.arange(5 * k, 5 * k + 5)}
            del x

    write_npz_rows(tmp_path / "cell.npz", parts(), 20)
    with np.load(tmp_path / "cell.npz") as z:
        assert z["x_adv"].shape == (20, 3, 2, 2) and z["idx"].tolist() == list(range(20))
        assert z["x_adv"][:, 0, 0, 0].tolist() == [k for k in range(4) for _ in range(5)]
    assert [p.name for p in tmp_path.iterdir()] == ["cell.npz"]  # no temporary file is left


def test_the_store_keeps_each_clean_example_once(tmp_path):
    cfg = parse_config({**SMALL, "threats": [{"norm": "linf", "eps": [0.1]}], "attacks": ["fgsm", "bim"]})
    evaluate(cfg, tmp_path / "run", save_adversarial=True, progress=False)
    from advbench.store import ResultStore

    with ResultStore(tmp_path / "run" / "results.sqlite") as store:
        keys = store.jobs(cfg.hash()).job_key
        blobs = [store.adversarial(cfg.hash(), k) for k in keys if store.has_adversarial(cfg.hash(), k)]
    assert blobs and all("x" not in b and "x_adv" in b for b in blobs)


# ---------------------------------------------------------------------- 17. report paths
def test_report_on_a_folder_whose_name_looks_like_a_uri_query(tmp_path):
    out = tmp_path / "q?x#y"
    r = _cli("evaluate", _tiny(tmp_path), "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    r = _cli("report", str(out))
    assert r.returncode == 0, r.stderr
    assert (out / "report" / "report.md").is_file()


# ---------------------------------------------------------------------- 21. cost follows n
COUNTING = """
import torch
from torch import nn

ROWS = []

class Counting(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x):
        ROWS.append(x.shape[0])
        return self.net(x)

def build():
    return Counting()
"""


def test_a_small_n_on_a_large_data_set_runs_only_its_examples(tmp_path, monkeypatch):
    """n = 8 of a 6,000-image data set: the model sees rows of those 8 examples only (clean pass,
    attack, audit, probes and checks), never the whole set."""
    (tmp_path / "advbench_counting_model.py").write_text(COUNTING)
    monkeypatch.syspath_prepend(str(tmp_path))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "big.npz", x=rng.integers(0, 256, (6000, 8, 8), dtype=np.uint8), y=rng.integers(0, 10, 6000))
    import importlib

    counting = importlib.import_module("advbench_counting_model")
    cfg = parse_config({"seed": 0, "device": "cpu", "data": {"path": str(tmp_path / "big.npz"), "n": 8},
                        "models": [{"name": "c", "import": "advbench_counting_model:build"}],
                        "threats": [{"norm": "linf", "eps": [0.1]}], "attacks": ["fgsm", {"name": "pgd", "steps": 3}]})
    evaluate(cfg, tmp_path / "run", progress=False)
    assert counting.ROWS and max(counting.ROWS) <= 8
    assert sum(counting.ROWS) < 500  # passes over 8 examples (attacks, audits, masking probe), not 6,000


# ---------------------------------------------------------------------- 20. threads by job size
def test_thread_count_follows_the_job_size_and_an_explicit_choice_wins(monkeypatch):
    from advbench.eval import threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    digits_cnn = threads.forward_flops(__import__("advbench").MODELS.create("digits-cnn"), torch.rand(1, 1, 8, 8))
    assert 0.6e6 < digits_cnn < 0.8e6  # conv 16 and 32 channels on 8x8, two linear layers
    assert threads.choose(digits_cnn, 500, 2) == 1  # tiny: one thread
    assert threads.choose(2e9, 500, 2) == 2  # a real-size model keeps the process's threads
    assert threads.choose(None, 500, 2) == 2  # unknown: leave it
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.explicit_in_environment()


def test_numbers_do_not_depend_on_the_thread_count(tmp_path):
    over = dict(threats=[{"norm": "linf", "eps": [0.1]}], attacks=["fgsm", {"name": "pgd", "steps": 5}], models=["digits-cnn"])
    tables = []
    for n in (1, 2):
        cfg = parse_config({**SMALL, **over})
        res = evaluate(cfg, tmp_path / f"t{n}", progress=False, threads=n)
        assert json.loads((res.out_dir / "run.json").read_text())["threads"]["requested"] == n
        tables.append(res.table.drop(columns="seconds"))
    pd.testing.assert_frame_equal(*tables)
