"""The transfer and destruction-rate matrices the evaluator computes from a run's examples."""

from __future__ import annotations

import pandas as pd
import pytest

from advbench.config import parse_config
from advbench.errors import ConfigError
from advbench.eval.evaluator import evaluate


def _config(**over):
    base = {
        "seed": 0,
        "data": {"name": "digits", "split": "test", "n": 48},
        "models": ["digits-mlp", "digits-cnn"],
        "threats": [{"norm": "linf", "eps": [0.1, 0.2]}],
        "attacks": ["fgsm", {"name": "pgd", "steps": 5}],
        "masking_checks": False,
        "analysis": {"transfer": True, "amplify": [0.1],
                     "destruction": ["photo", {"name": "jpeg", "quality": 50}]},
    }
    base.update(over)
    return parse_config(base)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("matrices")
    return evaluate(_config(), out, progress=False), out


def test_transfer_diagonal_is_the_white_box_error_rate(run):
    result, out = run
    transfer = pd.read_csv(out / "transfer.csv")
    table = result.table[result.table.attack != "worst-case"]
    for row in table.itertuples():
        cell = transfer[(transfer.source == row.model) & (transfer.target == row.model)
                        & (transfer.attack == row.attack) & (transfer.eps == row.eps)]
        assert len(cell) == 1
        # a model misclassifies exactly the examples it does not get right robustly
        assert cell.error_rate.iloc[0] == pytest.approx(1 - row.robust_accuracy)
    noise = transfer[transfer.source.str.startswith("gaussian[")]
    attacks = transfer[transfer.source.isin(["digits-mlp", "digits-cnn"])]
    assert noise.error_rate.mean() < attacks.error_rate.mean()  # the attacks transfer more than noise
    from advbench.report.matrices import render_matrices

    assert "## none / linf / 0.1" in render_matrices(out, out)["transfer.md"]  # rendered from the records
    records = pd.read_json(out / "transfer.json")
    assert len(records) == len(transfer) and records.error_rate.to_numpy() == pytest.approx(transfer.error_rate.to_numpy())


def test_destruction_counts_match_the_run(run):
    result, out = run
    d = pd.read_csv(out / "destruction.csv")
    assert set(d.transformation) == {"photo(degrees=1, sigma=0.6, factor=0.9, delta=0.03, std=0.02, quality=75)",
                                     "jpeg(quality=50)"}
    assert ((d.numerator <= d.denominator) & (d.denominator <= d.n)).all()
    table = result.table[result.table.attack != "worst-case"]
    for row in table.itertuples():
        # top-1, average case: the denominator counts clean-right, adversarial-wrong examples
        cell = d[(d.model == row.model) & (d.attack == row.attack) & (d.eps == row.eps) & (d.case == "average")
                 & (d.topk == 1)]
        broken = round((row.clean_accuracy - row.robust_accuracy) * row.n)
        assert (cell.denominator == broken).all() and len(cell) == 2


def test_matrices_are_the_same_after_a_resume(run, tmp_path):
    _, out = run
    before = (out / "transfer.csv").read_text(), (out / "destruction.csv").read_text()
    again = evaluate(_config(), out, progress=False)
    assert again.jobs_run == 0
    assert ((out / "transfer.csv").read_text(), (out / "destruction.csv").read_text()) == before


def test_bad_analysis_sections_are_one_line_errors():
    with pytest.raises(ConfigError, match="analysis.destruction"):
        _config(analysis={"destruction": ["no-such-transformation"]})
    with pytest.raises(ConfigError):
        _config(analysis={"transfers": True})


def test_configs_without_analysis_keep_their_hash():
    c = _config()
    plain = parse_config({k: v for k, v in c.canonical().items() if k != "analysis"})
    assert "analysis" not in plain.canonical() and plain.hash() != c.hash()


def test_report_carries_the_matrices(run, tmp_path):
    from advbench.report.build import build_report

    _, out = run
    build_report(out, tmp_path / "report")
    text = (tmp_path / "report" / "report.md").read_text()
    assert "## Transfer matrices" in text and "### none / linf / 0.1" in text and "## Destruction rates" in text
    from advbench.report.matrices import transfer_markdown

    assert (tmp_path / "report" / "transfer.md").read_text() == transfer_markdown(pd.read_csv(out / "transfer.csv"))


def test_amplified_rows_and_heatmaps(run, tmp_path):
    from PIL import Image

    from advbench.report.build import build_report

    _, out = run
    transfer = pd.read_csv(out / "transfer.csv")
    amplified = transfer[transfer.source.str.contains("amplified to std=0.1")]
    assert len(amplified) and set(transfer.source.str.startswith("uniform[")) == {True, False}
    report = build_report(out, tmp_path / "r")
    for name in ("transfer.png", "destruction.png"):
        with Image.open(tmp_path / "r" / name) as im:
            assert im.format == "PNG" and im.size[0] > 100
        assert tmp_path / "r" / name in report.files
