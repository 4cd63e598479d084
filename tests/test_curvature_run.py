"""`advbench curvature` end to end: files, resuming, stale parts, report, errors; and the pieces
the run adds to the per-image table (boundary curvature, symlog bins, partial correlations)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from advbench.analysis.curvature import Bins, boundary_curvature, shared_range, spectrum_histograms
from advbench.analysis.stats import partial_spearman, spearman
from advbench.cli import main
from advbench.curvature import load_curvature_config, run_curvature
from advbench.curvature.config import DEFAULT_CURVATURE_YAML, parse_curvature_config
from advbench.curvature.parts import part_path, read_part

pytestmark = pytest.mark.slow

SMALL = """\
seed: 3
data: {name: digits, split: test, n: 40}
model: digits-cnn
second_model: digits-mlp
batch_size: 16
alphas: [0.5, 1, 10]
steps: 40
trajectories: 2
trajectory_steps: 12
resamples: 100
detector: {attack: fgsm, norm: linf, eps: 0.1}
"""


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("curv")
    (tmp / "c.yaml").write_text(SMALL)
    out = tmp / "run"
    assert main(["curvature", str(tmp / "c.yaml"), "--out", str(out), "--quiet"]) == 0
    return tmp, out


def test_the_run_writes_every_table_and_figure(small_run):
    _, out = small_run
    for name in ("images.csv", "groups.csv", "correlations.csv", "detector.csv", "trajectories.csv", "spectra.csv",
                 "tables.md", "results.json", "run.json", "divergence_vs_mse.png", "spectra_by_group.png",
                 "steps_mse_per_alpha.png", "confidence_by_group.png", "divergence_trajectories.png"):
        assert (out / name).is_file(), name
    assert (out / "divergence_vs_mse.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    images = pd.read_csv(out / "images.csv")
    run = json.loads((out / "run.json").read_text())
    assert run["parts"] == {"batches": 3, "computed": 3, "resumed": 0}
    assert run["digests"]["model"] and run["digests"]["second_model"] and run["seed"] == 3
    assert len(images) <= 40 and images.data_index.is_unique and set(images.group) == {0, 1, 2}
    assert (images.kl >= 0).all() and (images.js <= math.log(2) + 1e-12).all()
    for col in ("steps_0.5", "mse_1", "confidence_10", "boundary_curvature", "boundary_transfers", "kl_slq",
                "clean_margin"):
        assert col in images
    assert np.allclose(images.boundary_curvature.dropna(), 0.0)  # a ReLU network's boundary is piecewise flat
    traj = pd.read_csv(out / "trajectories.csv")
    assert len(traj) == 2 * 13 and set(traj.step) == set(range(13)) and (traj.js >= 0).all()
    det = pd.read_csv(out / "detector.csv")
    assert set(det.measure) >= {"trace", "kl", "uncertainty"} and det.auc.between(0, 1).all()
    md = (out / "tables.md").read_text()
    assert "partialled out" in md and "Curvature detector" in md and "digits-mlp" in md
    results = json.loads((out / "results.json").read_text())
    assert len(results["images"]) == len(images) and "NaN" not in (out / "results.json").read_text()


def test_a_rerun_resumes_every_part_and_writes_the_same_tables(small_run):
    tmp, out = small_run
    before = (out / "images.csv").read_text()
    assert main(["curvature", str(tmp / "c.yaml"), "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "run.json").read_text())["parts"]["resumed"] == 3
    assert (out / "images.csv").read_text() == before


def test_an_interrupted_run_resumes_to_the_uninterrupted_result(small_run, tmp_path):
    tmp, out = small_run
    again = tmp_path / "again"
    config = load_curvature_config(tmp / "c.yaml")
    run_curvature(config, again)
    part_path(again, 1).unlink()  # as if the run had stopped there
    (again / "images.csv").unlink()
    run_curvature(config, again)
    assert json.loads((again / "run.json").read_text())["parts"] == {"batches": 3, "computed": 1, "resumed": 2}
    assert (again / "images.csv").read_text() == (out / "images.csv").read_text()


def test_a_parts_key_moves_with_every_digest():
    from advbench.curvature.parts import part_key

    base = part_key({"steps": 40}, {"model": "a", "second_model": None}, "images", "0.1.0")
    for other in (part_key({"steps": 41}, {"model": "a", "second_model": None}, "images", "0.1.0"),
                  part_key({"steps": 40}, {"model": "b", "second_model": None}, "images", "0.1.0"),
                  part_key({"steps": 40}, {"model": "a", "second_model": "c"}, "images", "0.1.0"),
                  part_key({"steps": 40}, {"model": "a", "second_model": None}, "other images", "0.1.0"),
                  part_key({"steps": 40}, {"model": "a", "second_model": None}, "images", "0.2.0")):
        assert other != base


def test_a_changed_setting_is_never_served_a_stale_part(small_run, tmp_path):
    tmp, out = small_run
    other = tmp_path / "o"
    (tmp_path / "c.yaml").write_text(SMALL.replace("steps: 40", "steps: 30"))
    for b in range(3):
        part_path(other, b).parent.mkdir(parents=True, exist_ok=True)
        part_path(other, b).write_bytes(part_path(out, b).read_bytes())
    assert main(["curvature", str(tmp_path / "c.yaml"), "--out", str(other), "--quiet"]) == 0
    assert json.loads((other / "run.json").read_text())["parts"]["computed"] == 3
    assert read_part(part_path(other, 0), read_part(part_path(out, 0))["key"]) is None
    # presentation settings (bins, groups, bootstrap) reuse the parts
    (tmp_path / "d.yaml").write_text(SMALL.replace("resamples: 100", "resamples: 50\nbins: 20\nbin_scale: linear"))
    third = tmp_path / "t"
    third.mkdir()
    (third / "parts").symlink_to(out / "parts", target_is_directory=True)
    assert main(["curvature", str(tmp_path / "d.yaml"), "--out", str(third), "--quiet"]) == 0
    assert json.loads((third / "run.json").read_text())["parts"]["resumed"] == 3


def test_report_rebuilds_the_tables_from_the_parts(small_run, capsys):
    _, out = small_run
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Input-space curvature of digits-cnn" in printed
    for name in ("images.csv", "groups.csv", "tables.md", "correlations.csv"):
        assert (out / "report" / name).read_text() == (out / name).read_text(), name


@pytest.mark.parametrize("text, fragment", [
    ("alphas: []", "at least one step size"),
    ("alphas: [1, -2]", "positive"),
    ("boundary_alpha: 3", "boundary_alpha must be one of the alphas"),
    ("by: colour", "must be one of kl, js"),
    ("detector: {attack: nope}", "nope"),
    ("detector: {attack: pgd, norm: l0}", "norm"),
    ("detector: {attack: pgd, eps: -1}", "positive"),
    ("bin_scale: log2", "bin_scale"),
    ("model: not-a-model", "not-a-model"),
    ("steps: 0", "steps"),
    ("colour: red", "unknown field"),
])
def test_bad_configs_are_one_line_errors_with_exit_2(tmp_path, capsys, text, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(text + "\n")
    assert main(["curvature", str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and fragment in err
    assert not (tmp_path / "o").exists()  # nothing written


def test_report_of_a_folder_without_a_run(tmp_path, capsys):
    (tmp_path / "run.json").write_text(json.dumps({"advbench_curvature": 1, "config": {}, "parts": {"batches": 2},
                                                   "data": {"sampled": 3}}))
    (tmp_path / "images.csv").write_text("position,data_index\n")
    assert main(["report", str(tmp_path)]) == 2
    assert "parts missing" in capsys.readouterr().err


def test_the_embedded_default_parses_and_prints(capsys):
    config = parse_curvature_config(__import__("yaml").safe_load(DEFAULT_CURVATURE_YAML))
    assert config.model.name == "digits-cnn" and config.bin_scale == "symlog" and config.detector is not None
    assert main(["curvature", "--print-config"]) == 0
    assert capsys.readouterr().out == DEFAULT_CURVATURE_YAML


# ------------------------------------------------------------------ the pieces
class Sphere(nn.Module):
    """Two classes with the decision boundary the sphere |x - c| = r: logits (0, r^2 - |x - c|^2)."""

    def __init__(self, r: float, d: int) -> None:
        super().__init__()
        self.r, self.c = r, torch.full((d,), 0.5, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.r ** 2 - (x.flatten(1) - self.c.to(x.dtype)).pow(2).sum(dim=1)
        return torch.stack([torch.zeros_like(f), f], dim=1)


@pytest.mark.parametrize("r", [0.2, 0.4])
def test_boundary_curvature_of_a_sphere_is_one_over_its_radius(r):
    d = 16
    g = torch.Generator().manual_seed(0)
    u = torch.randn(5, d, generator=g, dtype=torch.float64)
    x = 0.5 + r * (1 + 1e-9) * u / u.norm(dim=1, keepdim=True)  # just outside the sphere: class 0 there
    y = torch.ones(5, dtype=torch.long)
    k = boundary_curvature(Sphere(r, d).double(), x.reshape(5, 1, 4, 4), y, generator=g)
    assert torch.allclose(k.abs(), torch.full((5,), 1 / r, dtype=torch.float64), rtol=1e-6)


def test_symlog_bins_separate_spectra_a_linear_axis_puts_in_one_bin():
    values = np.array([[1e-9, 0.0, 0.0], [1e-5, 0.0, 0.0], [100.0, 0.0, 0.0]])
    lin = spectrum_histograms([{"values": values}], shared_range([{"values": values}], 10, "linear"))
    log = spectrum_histograms([{"values": values}], shared_range([{"values": values}], 10, "symlog"))
    assert np.allclose(lin[0], lin[1])  # both all in the first bin
    assert not np.allclose(log[0], log[1]) and np.allclose(log.sum(axis=1), 1)
    b = shared_range([{"values": values}], 10, "symlog")
    assert isinstance(b, Bins) and b.eigenvalue_edges()[0] == pytest.approx(0.0) and \
        b.eigenvalue_edges()[-1] == pytest.approx(100.0)


def test_partial_spearman_removes_what_the_control_explains():
    rng = np.random.default_rng(0)
    c = rng.normal(size=400)
    a = c + 0.1 * rng.normal(size=400)
    b = c + 0.1 * rng.normal(size=400)  # a and b related only through c
    assert spearman(a, b, 200).value > 0.9
    part = partial_spearman(a, b, c, 200)
    assert abs(part.value) < 0.15 and part.low <= part.value <= part.high
    e = rng.normal(size=400)
    assert partial_spearman(c + e, c + e + 0.3 * rng.normal(size=400), c, 200).value > 0.7  # related beyond c


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_the_run_on_cuda_matches_the_cpu_run(small_run, tmp_path):
    tmp, out = small_run
    raw = __import__("yaml").safe_load(SMALL)
    run_curvature(parse_curvature_config({**raw, "device": "cuda"}), tmp_path / "gpu")
    cpu, gpu = pd.read_csv(out / "images.csv"), pd.read_csv(tmp_path / "gpu" / "images.csv")
    assert cpu.data_index.tolist() == gpu.data_index.tolist()
    for col in ("trace", "top_eigenvalue", "clean_margin", "min_distance_l2"):
        assert np.allclose(cpu[col], gpu[col], rtol=1e-3, atol=1e-9), col
    assert (cpu["steps_1"] == gpu["steps_1"]).mean() > 0.9  # float32 sign steps may flip a pixel's rounding
