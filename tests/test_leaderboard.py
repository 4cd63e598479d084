"""The leaderboard: entries, rendering, the RobustBench export and the regression gate."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from advbench import leaderboard as lb
from advbench.cli import main

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT / "leaderboard"

TINY_SUITE = """\
seed: 0
device: cpu
data: {name: digits, split: test, n: 60}
models: [digits-mlp]
threats: [{norm: linf, eps: [0.1, 0.2]}]
attacks: [fgsm, {name: pgd, steps: 5}]
masking_checks: false
"""


def _run(capsys, *args):
    code = main(["leaderboard", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A leaderboard folder whose entries come from a tiny suite (a few seconds)."""
    folder = tmp_path_factory.mktemp("lb") / "board"
    folder.mkdir()
    (folder / "suite.yaml").write_text(TINY_SUITE)
    assert main(["leaderboard", "update", "--dir", str(folder)]) == 0
    return folder


@pytest.fixture
def board(tiny, tmp_path):
    """A private copy of the tiny leaderboard, free to perturb."""
    return Path(shutil.copytree(tiny, tmp_path / "board"))


def test_the_real_entries_are_the_suites_entries():
    """Every committed entry was measured by a committed suite, on the shipped weights it names. (The
    rerun itself is the CI gate, `advbench leaderboard check` in .ci/run, not repeated here.)"""
    from advbench.config import load_config
    from advbench.loading import load_model, model_digest

    hashes = {load_config(p).hash() for p in lb.suite_files(REAL)}
    entries = lb.load_entries(REAL)
    assert len(entries) == 19 and {e["config_hash"] for e in entries.values()} == hashes
    for e in entries.values():
        if e["dataset"]["name"] == "digits":
            spec = {"name": e["model"]}
            assert e["model_digest"] == model_digest(spec, load_model(spec)), e["model"]


def test_check_passes_on_unchanged_entries(board, capsys):
    code, out, _ = _run(capsys, "check", "--dir", board)
    assert code == 0 and "2 entries within tolerance 0.01" in out


def test_check_fails_on_a_perturbed_entry_with_a_readable_diff(board, capsys):
    path = board / "entries" / "digits-mlp__none__linf-0.1.json"
    entry = json.loads(path.read_text())
    true_pgd = entry["attacks"]["pgd"]
    entry["attacks"]["pgd"] = true_pgd + 0.05
    path.write_text(lb.dumps(entry))
    code, out, _ = _run(capsys, "check", "--dir", board)
    assert code == 1
    assert "the numbers changed: 1 difference(s) beyond tolerance 0.01 on the same models" in out
    assert "the model changed" not in out
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("the numbers changed"))
    header, row = [line.split() for line in lines[at + 1 : at + 3]]
    assert header == ["entry", "field", "stored", "measured", "difference"]
    assert row[:2] == ["digits-mlp__none__linf-0.1", "attacks.pgd"]
    assert float(row[2]) == pytest.approx(true_pgd + 0.05, abs=1e-4) and float(row[3]) == pytest.approx(true_pgd, abs=1e-4)
    assert row[4] == "-0.0500"
    # within a looser tolerance the same entry passes
    assert _run(capsys, "check", "--dir", board, "--tolerance", "0.06")[0] == 0


def test_a_changed_model_is_reported_apart_from_changed_numbers(board, capsys):
    path = board / "entries" / "digits-mlp__none__linf-0.1.json"
    entry = json.loads(path.read_text())
    assert entry["model_digest"]  # the weights the numbers were measured on
    entry["model_digest"] = "0" * 20
    path.write_text(lb.dumps(entry))
    code, out, _ = _run(capsys, "check", "--dir", board)
    assert code == 1
    assert "the model changed: 1 entry measured on other weights" in out and "the numbers changed" not in out
    assert "digits-mlp__none__linf-0.1  model_digest  00000000000000000000" in out


def test_the_gate_evaluates_shipped_weights_and_never_trains(tmp_path, monkeypatch):
    """On a fresh machine with an empty cache the suites' models load from the shipped checkpoints
    (retrained weights differ across CPUs), whose digests the entries record; nothing trains. (The
    gate's full rerun is CI's `advbench leaderboard check`.)"""
    from advbench.config import load_config
    from advbench.loading import load_model, model_digest
    from advbench.zoo import reference as zoo

    monkeypatch.setenv("ADVBENCH_CACHE", str(tmp_path / "fresh-cache"))
    monkeypatch.delenv(zoo.SHIPPED_ENV, raising=False)

    def fail(*args, **kwargs):
        raise AssertionError("the gate trained a model")

    monkeypatch.setattr(zoo, "_train", fail)
    entries = lb.load_entries(REAL)
    specs = [m for name in ("suite.yaml", "suite-masking.yaml") for m in load_config(REAL / name).models]
    assert len(specs) == 7
    for spec in specs:
        raw = spec.model_dump(mode="json", by_alias=True)
        digest = model_digest(raw, load_model(raw))
        assert {e["model_digest"] for e in entries.values() if e["model"] == spec.name} == {digest}, spec.name


def test_check_reports_missing_and_stale_entries(board, capsys):
    (board / "entries" / "digits-mlp__none__linf-0.2.json").rename(board / "entries" / "old__none__linf-0.2.json")
    code, out, _ = _run(capsys, "check", "--dir", board)
    assert code == 1
    assert "digits-mlp__none__linf-0.2  (entry)  missing" in out and "old__none__linf-0.2" in out


def test_entries_are_numbers_and_the_schema_round_trips():
    entries = lb.load_entries(REAL)
    models = ("digits-mlp", "digits-cnn", "digits-cnn-madry", "digits-cnn-fast", "digits-cnn-trades",
              "digits-cnn-distillation", "digits-cnn-thermometer", "mnist-cnn")
    transforms = [f"digits-cnn__{d}__linf-0.1" for d in ("jpeg", "bit_depth", "randomization")]
    assert sorted(entries) == sorted([f"{m}__none__{t}" for m in models for t in ("linf-0.1", "l2-1")] + transforms)
    encoded = [f"digits-cnn-thermometer__none__{t}" for t in ("linf-0.1", "l2-1")]
    for name in transforms + encoded:  # naive and adaptive attacks side by side; the adaptive worst case ranks
        e = entries.pop(name)
        adaptive = "+eot" if "randomization" in name else "+bpda"
        assert {"pgd", f"pgd{adaptive}", "autoattack", f"autoattack{adaptive}"} <= set(e["attacks"])
        assert e["n"] == (360 if name in encoded else 100)
        assert e["naive_robust_accuracy"] is not None and e["robust_accuracy"] <= e["naive_robust_accuracy"]
        assert e["robust_accuracy"] <= min(e["attacks"].values()) + 1e-12
    for name in encoded:  # BPDA breaks what the encoding's zero gradient hides from the naive attacks
        e = lb.load_entries(REAL)[name]
        assert e["robust_accuracy"] < e["naive_robust_accuracy"] - 0.1
        # the masking flags concern the naive attacks only: they explain the naive number; the
        # ranked (adaptive) evaluation passed those checks, so RobustBench's form is not "unreliable"
        assert {"grad_zero", "black_box"} <= set(e["naive_flags"]) and e["flags"] == []
        assert all(d["naive"] for d in e["flag_details"]) and not lb.to_robustbench(e)["unreliable"]
        assert "the naive attacks alone leave" in lb.to_robustbench(e)["footnote"] and "grad_zero" in lb.to_robustbench(e)["footnote"]
    distilled = lb.load_entries(REAL)["digits-cnn-distillation__none__linf-0.1"]  # no adaptive view: flags rank
    assert "grad_zero" in distilled["flags"] and distilled["naive_flags"] == []
    for name, e in entries.items():
        assert lb.entry_name(e) == name and e["schema_version"] == lb.SCHEMA_VERSION
        assert json.loads(lb.dumps(e)) == e
        for v in (e["clean_accuracy"], e["robust_accuracy"], *e["attacks"].values()):
            assert isinstance(v, float) and 0 <= v <= 1
        assert e["robust_accuracy"] <= min(e["attacks"].values()) and isinstance(e["n"], int)
        auto = {"autoattack", *(f"autoattack.{c}" for c in ("apgd-ce", "apgd-t", "fab-t", "square"))}
        with_auto = not name.startswith("mnist")  # the digits suites run AutoAttack, suite-mnist.yaml does not
        assert set(e["attacks"]) == {"fgsm", "pgd", "deepfool", *(auto if with_auto else ())}
        assert e["n"] == (200 if name.startswith("mnist") else 360)
        if with_auto:  # the suite's row is its per-example worst case, and the last cumulative component's
            assert e["attacks"]["autoattack"] == e["attacks"]["autoattack.square"] <= e["attacks"]["autoattack.apgd-ce"]
            assert lb.to_robustbench(e)["autoattack_acc"] == f"{100 * e['attacks']['autoattack']:.2f}"
        assert e["config"]["seed"] == e["seed"] and len(e["config_hash"]) == 16 and e["versions"]["torch"]


def test_the_readme_autoattack_table_is_the_entries():
    """The README's AutoAttack table quotes the digits entries: it moves when they do."""
    readme = (ROOT / "README.md").read_text()
    columns = ["pgd", "autoattack.apgd-ce", "autoattack.apgd-t", "autoattack.fab-t", "autoattack.square", "autoattack"]
    for name, e in lb.load_entries(REAL).items():
        if not name.startswith("digits") or e["defense"] != "none" or e["naive_robust_accuracy"] is not None:
            continue  # (the thermometer model's naive and BPDA rows: the sentence below the table)
        cells = [e["model"], f"{e['threat']['norm']} {e['threat']['eps']:g}", f"{100 * e['clean_accuracy']:.2f}",
                 *(f"{100 * e['attacks'][c]:.2f}" for c in columns)]
        assert "| " + " | ".join(cells) + " |" in readme, name
    therm = {t: lb.load_entries(REAL)[f"digits-cnn-thermometer__none__{t}"] for t in ("linf-0.1", "l2-1")}
    linf, l2 = therm["linf-0.1"], therm["l2-1"]
    readme = " ".join(readme.split())
    assert (f"naive PGD-20 leaves {100 * linf['attacks']['pgd']:.1f}% and naive AutoAttack "
            f"{100 * linf['attacks']['autoattack']:.1f}%") in readme
    assert f"through BPDA AutoAttack leaves {100 * linf['attacks']['autoattack+bpda']:.1f}%" in readme
    assert (f"naive {100 * l2['naive_robust_accuracy']:.1f}%, adaptive {100 * l2['robust_accuracy']:.1f}%"
            in readme)


def test_validate_entry_rejects_strings_for_numbers():
    e = next(iter(lb.load_entries(REAL).values()))
    with pytest.raises(lb.ConfigError, match="robust_accuracy must be a finite number in \\[0, 1\\]"):
        lb.validate_entry({**e, "robust_accuracy": "0.5"})
    with pytest.raises(lb.ConfigError, match="missing field"):
        lb.validate_entry({k: v for k, v in e.items() if k != "config_hash"})


def test_build_renders_one_ranking_per_threat_and_every_page(board, capsys):
    code, out, _ = _run(capsys, "build", "--dir", board)
    assert code == 0 and "2 entries in 2 rankings" in out
    md = (board / "README.md").read_text()
    assert md.count("\n## ") == 2  # linf 0.1 and linf 0.2: never one list
    entries = lb.load_entries(board)
    for r in lb.rankings(entries):
        assert len({e["threat_id"] for e in r.entries}) == 1 and len({e["ranking"] for e in r.entries}) == 1
        page = (board / "rankings" / f"{r.slug}.html").read_text()
        assert page.count("<tr>") == len(r.entries) + 1 and 'class="sortable"' in page
    for name in entries:
        assert (board / "models" / f"{name}.html").is_file()
    assert "`" not in (board / "index.html").read_text()  # HTML, not Markdown backticks


def _links(page: Path) -> list[str]:
    return re.findall(r'href="([^"#]+)"', page.read_text())


def test_every_link_of_the_site_resolves(board, capsys):
    _run(capsys, "build", "--dir", board)
    pages = [board / "index.html", *board.glob("rankings/*.html"), *board.glob("models/*.html")]
    assert len(pages) >= 5
    for page in pages:
        for href in _links(page):
            assert (page.parent / href).resolve().is_file(), f"{page.name} links to missing {href}"


def test_entries_carry_intervals_and_their_per_example_worst_case():
    for name, e in lb.load_entries(REAL).items():
        lo, hi = e["intervals"]["robust_accuracy"]
        assert lo <= e["robust_accuracy"] <= hi and e["intervals"]["level"] == 0.95
        for a, v in e["attacks"].items():
            assert e["intervals"]["attacks"][a][0] <= v <= e["intervals"]["attacks"][a][1]
        from advbench.leaderboard.entries import decode_examples

        robust = decode_examples(e["robust_examples"])  # a randomized model's: the share of draws held
        assert len(robust) == e["n"] and abs(robust.mean() - e["robust_accuracy"]) < 1e-9, name
        assert e["ranking"] == f"{e['dataset']['name']}/{e['dataset']['split']}/{e['threat_id']}"


def test_neighbours_are_compared_paired_on_the_same_examples():
    undefended = {k: e for k, e in lb.load_entries(REAL).items()
                  if e["defense"] == "none" and e["naive_robust_accuracy"] is None}
    rs = {r.key: r for r in lb.rankings(undefended)}
    linf = rs["digits/test/linf-0.1"]
    order = [e["model"] for e in linf.entries]
    assert order[0] in ("digits-cnn-madry", "digits-cnn-fast")  # adversarial training ranks first
    assert order.index("digits-cnn") + 1 == order.index("digits-mlp")
    comp = linf.comparisons[order.index("digits-cnn")]
    assert comp.paired and comp.low > 0 and comp.separated  # 60.3% vs 48.3% on the same 360 digits
    l2 = rs["digits/test/l2-1"]
    order = [e["model"] for e in l2.entries]
    comp = l2.comparisons[order.index("digits-cnn")]
    assert order.index("digits-cnn") + 1 == order.index("digits-mlp")
    assert comp.paired and comp.low <= 0 <= comp.high and not comp.separated  # 0.8% vs 0.6%: within the noise
    a = {"robust_accuracy": 0.5, "intervals": {"robust_accuracy": [0.4, 0.6]}, "robust_examples": None}
    b = {"robust_accuracy": 0.3, "intervals": {"robust_accuracy": [0.2, 0.45]}, "robust_examples": None}
    from advbench.leaderboard.rankings import compare

    assert not compare(a, b).paired and compare(a, b).overlap
    assert not compare(a, b).separated  # 0.4 < 0.45: the intervals overlap
    c = {**b, "robust_accuracy": 0.2, "intervals": {"robust_accuracy": [0.1, 0.3]}}
    assert compare(a, c).separated and compare(a, c).text() == "intervals do not overlap"


def test_the_committed_pages_match_the_entries(tmp_path):
    copy = Path(shutil.copytree(REAL, tmp_path / "lb"))
    lb.build(copy)
    for rel in ["README.md", "index.html", *(str(p.relative_to(REAL)) for p in REAL.glob("rankings/*.html")),
                *(str(p.relative_to(REAL)) for p in REAL.glob("models/*.html")),
                *(str(p.relative_to(REAL)) for p in REAL.glob("robustbench/export/*/*/*.json"))]:
        assert (copy / rel).read_text() == (REAL / rel).read_text(), rel
    assert sorted(p.name for p in copy.rglob("*.html")) == sorted(p.name for p in REAL.rglob("*.html"))


def test_add_ranks_a_users_run_of_a_suite_and_refuses_other_configs(board, tmp_path, capsys):
    run = tmp_path / "run"
    (tmp_path / "mine.yaml").write_text(TINY_SUITE.replace("models: [digits-mlp]", "models: [digits-cnn]"))
    assert main(["evaluate", str(tmp_path / "mine.yaml"), "--out", str(run), "--quiet"]) == 0
    code, out, err = _run(capsys, "add", str(run), "--dir", board)
    assert code == 0, err
    entries = lb.load_entries(board)
    added = [e for e in entries.values() if e["source"] == "added"]
    assert {e["model"] for e in added} == {"digits-cnn"} and len(added) == 2
    ranking = next(r for r in lb.rankings(entries) if r.threat == "linf-0.1")
    assert {e["model"] for e in ranking.entries} == {"digits-mlp", "digits-cnn"}
    assert _run(capsys, "check", "--dir", board)[0] == 0  # added entries are not rerun
    assert _run(capsys, "update", "--dir", board)[0] == 0 and len(lb.load_entries(board)) == 4  # and kept
    other = tmp_path / "other"
    (tmp_path / "other.yaml").write_text(TINY_SUITE.replace("steps: 5", "steps: 3"))
    assert main(["evaluate", str(tmp_path / "other.yaml"), "--out", str(other), "--quiet"]) == 0
    code, _, err = _run(capsys, "add", str(other), "--dir", board)
    assert code == 2 and "not a suite's" in err and "attacks" in err and err.count("\n") == 1
    code, _, err = _run(capsys, "add", "--dir", board)
    assert code == 2 and "takes a RUN_DIR" in err


def test_robustbench_published_numbers_are_shown_beside(board, capsys):
    folder = board / "robustbench" / "published" / "digits" / "Linf"
    folder.mkdir(parents=True)
    (folder / "digits-mlp.json").write_text(json.dumps({"name": "x", "clean_acc": "97.00", "autoattack_acc": "41.50",
                                                        "eps": "0.1"}))
    assert _run(capsys, "build", "--dir", board)[0] == 0
    page = (board / "models" / "digits-mlp__none__linf-0.1.html").read_text()
    assert "RobustBench's published numbers" in page and "41.50" in page
    assert "41.50" not in (board / "models" / "digits-mlp__none__linf-0.2.html").read_text()  # another eps
    (folder / "bad.json").write_text(json.dumps({"clean_acc": "lots"}))
    code, _, err = _run(capsys, "build", "--dir", board)
    assert code == 2 and "clean_acc must be a percentage" in err


def test_to_robustbench():
    e = lb.load_entries(REAL)["digits-cnn__none__linf-0.1"]
    plain = {**e, "attacks": {k: v for k, v in e["attacks"].items() if not k.startswith("autoattack")},
             "config": {**e["config"], "attacks": [a for a in e["config"]["attacks"] if a["name"] != "autoattack"]}}
    rb = lb.to_robustbench(plain)
    assert set(rb) == {"link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
                       "architecture", "eps", "clean_acc", "reported", "autoattack_acc", "external", "footnote",
                       "unreliable"}
    assert rb["unreliable"] is False and rb["external"] is None
    assert rb["eps"] == "0.1" and rb["dataset"] == "digits" and rb["number_forward_passes"] == 1
    assert rb["clean_acc"] == f"{100 * e['clean_accuracy']:.2f}" and rb["autoattack_acc"] is None
    assert f"{100 * e['robust_accuracy']:.2f}%" in rb["footnote"] and "not AutoAttack" in rb["footnote"]
    assert rb["architecture"].startswith("CNN") and rb["authors"] is None and rb["venue"] is None

    def run(spec: dict, rows: dict) -> dict:
        return lb.to_robustbench({**plain, "attacks": {**plain["attacks"], **rows},
                                  "config": {**plain["config"], "attacks": [*plain["config"]["attacks"], spec]}})

    suite = {"autoattack": 0.25, "autoattack.apgd-ce": 0.3, "autoattack.square": 0.2}  # components: cumulative rows
    got = run({"name": "autoattack", "params": {}, "label": None}, suite)
    assert got["autoattack_acc"] == "25.00" and got["footnote"] is None  # the suite's row, not the smallest row
    assert run({"name": "autoattack", "params": {"version": "standard"}, "label": "aa"}, {"aa": 0.2})["autoattack_acc"] == "20.00"
    assert run({"name": "autoattack", "params": {"version": "plus"}, "label": None}, suite)["autoattack_acc"] is None
    adaptive = {"autoattack": 0.73, "autoattack+bpda": 0.56}  # a defended model: the adaptive suite's row counts
    assert run({"name": "autoattack", "params": {}, "label": None}, adaptive)["autoattack_acc"] == "56.00"
    for quick in ({"steps": 5}, {"queries": 100}):  # fewer iterations is a smoke run, not the reference's number
        assert run({"name": "autoattack", "params": quick, "label": None}, suite)["autoattack_acc"] is None
    assert run({"name": "pgd", "params": {}, "label": "autoattack-like"}, {"autoattack-like": 0.1})["autoattack_acc"] is None


@pytest.mark.parametrize("args, fragment", [
    (["check", "--dir", "/nonexistent/board"], "does not exist"),
    (["update", "--dir", "/nonexistent/board"], "no suite config"),
    (["build", "--tolerance", "0.1"], "applies to 'leaderboard check' only"),
    (["check", "--tolerance", "-1"], "tolerance must be a number in [0, 1)"),
    (["check", "--tolerance", "x"], "invalid float value"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_arguments_exit_2_with_one_line(args, fragment, capsys):
    try:
        code = main(["leaderboard", *args])
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and fragment in err
    assert err.startswith("error:") and err.count("\n") == 1


def test_a_corrupt_entry_is_bad_input(board, capsys):
    (board / "entries" / "digits-mlp__none__linf-0.1.json").write_text("{not json")
    code, _, err = _run(capsys, "build", "--dir", board)
    assert code == 2 and err.startswith("error:") and "not a readable JSON entry" in err and err.count("\n") == 1


def test_a_finding_lands_on_the_entries_it_names():
    from advbench.leaderboard.entries import _selects

    f = {"code": "single_step", "where": {"model": "m", "defense": "none", "norm": "linf", "eps": [0.1, 0.2],
                                          "attack": "pgd"}, "seen": "x", "try": "y"}
    assert _selects(f, "m", "none", "linf", 0.1) and _selects(f, "m", "none", "linf", 0.2)
    assert not _selects(f, "m", "none", "linf", 0.3) and not _selects(f, "m", "none", "l2", 0.1)
    assert not _selects(f, "other", "none", "linf", 0.1) and not _selects(f, "m", "jpeg", "linf", 0.1)
    assert _selects({"code": "probs", "where": {"model": "m", "defense": "none"}}, "m", "none", "l2", 1.0)


def test_a_flag_on_naive_attacks_only_does_not_flag_an_adaptive_entry():
    from advbench.leaderboard.entries import _naive_only

    naive = {"code": "grad_zero", "where": {"attack": ["fgsm", "pgd", "autoattack.apgd-ce"]}}
    assert _naive_only(naive, adaptive=True)
    assert not _naive_only(naive, adaptive=False)  # no adaptive view ran: the flag is on the ranked number
    assert not _naive_only({"code": "black_box", "where": {"attack": ["pgd", "pgd+bpda"]}}, adaptive=True)
    assert not _naive_only({"code": "unstable_predictions", "where": {}}, adaptive=True)  # the whole cell
    assert _naive_only({"code": "suboptimal_minimal", "where": {"attack": "deepfool"}}, adaptive=True)
    assert not _naive_only({"code": "suboptimal_minimal", "where": {"attack": "deepfool+eot"}}, adaptive=True)


def test_suites_run_side_by_side_give_the_entries_run_one_after_another(tmp_path):
    """The gate runs the suite files in worker processes: the entries (and their order) are the
    ones a sequential run gives; only the wall time differs."""
    folder = tmp_path / "two"
    folder.mkdir()
    (folder / "suite.yaml").write_text(TINY_SUITE)
    (folder / "suite-cnn.yaml").write_text(TINY_SUITE.replace("models: [digits-mlp]", "models: [digits-cnn]")
                                           .replace("n: 60", "n: 40"))
    parallel, _ = lb.run_suite(folder, processes=2)
    sequential, _ = lb.run_suite(folder, processes=1)

    def strip(entries):
        return [{k: v for k, v in e.items() if k != "date"} for e in entries]

    assert [lb.entry_name(e) for e in parallel] == [lb.entry_name(e) for e in sequential]
    assert strip(parallel) == strip(sequential) and {e["model"] for e in parallel} == {"digits-mlp", "digits-cnn"}
