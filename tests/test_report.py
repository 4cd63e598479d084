"""`advbench report`: tables, report.md and plots rebuilt from a run's store, without rerunning attacks."""

from __future__ import annotations

import json
import shutil
import sqlite3

import pandas as pd
import pytest
from PIL import Image

from advbench.cli import main
from advbench.config import parse_config
from advbench.eval.evaluator import evaluate

CONFIG = {
    "seed": 0, "device": "cpu", "data": {"name": "digits", "split": "test", "n": 24},
    "models": ["digits-mlp"], "defenses": ["none"],
    "threats": [{"norm": "linf", "eps": [0.05, 0.1]}, {"norm": "l2", "eps": [0.5, 1.0]}],
    "attacks": ["fgsm", {"name": "pgd", "steps": 3}],
}
TEXT = [f"{name}.{ext}" for name in ("results", "matrix", "cost", "masking", "missing") for ext in ("csv", "json", "md")]
PNGS = ["heatmap.png", "curves-linf.png", "curves-l2.png"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    evaluate(parse_config(CONFIG), out, progress=False)
    return out


def _report(capsys, *args):
    code = main(["report", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_report_equals_the_evaluator_tables(run_dir, tmp_path, capsys):
    code, out, _ = _report(capsys, run_dir, "--out", tmp_path / "rep")
    assert code == 0 and "worst-case" in out
    rep = tmp_path / "rep"
    assert (rep / "matrix.csv").read_text() == (run_dir / "matrix.csv").read_text()
    assert (rep / "results.csv").read_text() == (run_dir / "results.csv").read_text()
    pd.testing.assert_frame_equal(pd.read_csv(rep / "results.csv"), pd.read_csv(run_dir / "results.csv"))
    assert json.loads((rep / "results.json").read_text()) == json.loads((run_dir / "results.json").read_text())
    assert all((rep / name).stat().st_size > 0 for name in TEXT)
    for name in PNGS:
        assert (rep / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(rep / name) as im:
            assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
    md = (rep / "report.md").read_text()
    run = json.loads((run_dir / "run.json").read_text())
    assert run["config_hash"] in md and "| seed | 0 |" in md and f"torch {run['versions']['torch']}" in md
    assert run["started"] in md
    assert "| digits-mlp | none | pgd |" in md and "linf 0.05" in md and "## Cost per attack" in md
    assert (rep / "matrix.md").read_text() in md
    assert "heatmap.png" in md and "curves-l2.png" in md and "Every cell the config asks for is stored" in md


def test_report_is_deterministic_and_defaults_into_the_run(run_dir, capsys):
    assert _report(capsys, run_dir)[0] == 0
    first = {n: (run_dir / "report" / n).read_bytes() for n in [*TEXT, "report.md"]}
    assert _report(capsys, run_dir)[0] == 0
    assert first == {n: (run_dir / "report" / n).read_bytes() for n in [*TEXT, "report.md"]}


def test_partial_run_names_the_missing_cells(run_dir, tmp_path, capsys):
    part = tmp_path / "part"
    shutil.copytree(run_dir, part, ignore=shutil.ignore_patterns("report"))
    (part / "run.json").unlink()  # an interrupted run has no run.json yet
    with sqlite3.connect(part / "results.sqlite") as conn:
        keys = [k for k, t in conn.execute("SELECT job_key, threat_json FROM jobs WHERE attack = 'pgd'")
                if json.loads(t)["norm"] == "linf" and json.loads(t)["eps"] == 0.1]
        assert keys
        for table in ("jobs", "examples"):
            conn.executemany(f"DELETE FROM {table} WHERE job_key = ?", [(k,) for k in keys])
    code, out, _ = _report(capsys, part)
    assert code == 0 and "1 cell(s) missing" in out
    missing = pd.read_csv(part / "report" / "missing.csv")
    assert missing[["attack", "norm", "eps", "status"]].values.tolist() == [["pgd", "linf", 0.1, "missing"]]
    md = (part / "report" / "report.md").read_text()
    assert "1 cell(s) are missing or partial" in md and "| digits-mlp | none | pgd | linf | 0.1 |" in md
    assert "has no run.json" in md
    matrix = pd.read_csv(part / "report" / "matrix.csv", index_col=[0, 1, 2])
    assert pd.isna(matrix.loc[("digits-mlp", "none", "pgd"), "linf 0.1"])
    assert (part / "report" / "curves-linf.png").stat().st_size > 0


def test_bad_input_is_one_line_and_exit_2(run_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    shutil.copytree(run_dir, empty, ignore=shutil.ignore_patterns("report"))
    with sqlite3.connect(empty / "results.sqlite") as conn:
        conn.execute("DELETE FROM jobs")
        conn.execute("DELETE FROM examples")
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "results.sqlite").write_text("not a database")
    (tmp_path / "notrun").mkdir()
    for folder, fragment in [(tmp_path / "nope", "does not exist"), (tmp_path / "notrun", "not an advbench run folder"),
                             (empty, "no finished jobs"), (garbage, "not an advbench results store")]:
        code, out, err = _report(capsys, folder)
        assert code == 2 and out == ""
        assert err.startswith("error: ") and fragment in err and err.count("\n") == 1, err


def test_report_has_intervals_an_html_twin_and_no_single_eps_curve(run_dir, tmp_path, capsys):
    from advbench.analysis.stats import binomial_interval

    code, _, _ = _report(capsys, run_dir, "--out", tmp_path / "rep")
    rep = tmp_path / "rep"
    iv = pd.read_csv(rep / "intervals.csv")
    results = pd.read_csv(run_dir / "results.csv")
    assert len(iv) == len(results)
    iv.columns = [c.replace(" ", "_").replace("%", "pct") for c in iv.columns]
    for r, row in zip(iv.itertuples(), results.itertuples()):
        lo, hi = binomial_interval(row.robust_accuracy * row.n, int(row.n))
        assert r.robust_low == pytest.approx(100 * lo) and r.robust_high == pytest.approx(100 * hi)
        assert r.robust_low <= 100 * row.robust_accuracy <= r.robust_high
    md, page = (rep / "report.md").read_text(), (rep / "report.html").read_text()
    assert "## Robust accuracy with 95% intervals" in md
    assert page.startswith("<!DOCTYPE html>") and "<h2>Robust accuracy with 95% intervals</h2>" in page
    assert '<table class="sortable">' in page and '<img alt="robust accuracy" src="heatmap.png"' in page
    single = tmp_path / "single"
    evaluate(parse_config({**CONFIG, "threats": [{"norm": "linf", "eps": [0.1]}]}), single, progress=False)
    assert _report(capsys, single, "--out", tmp_path / "rep1")[0] == 0
    assert not list((tmp_path / "rep1").glob("curves-*.png"))  # one eps: a curve would say nothing
    assert "No curve drawn" in (tmp_path / "rep1" / "report.md").read_text()
