"""Level Set Traversal and the blind-spot analysis: the algorithm, its metrics, the command line."""

from __future__ import annotations

import copy
import json
import math

import pandas as pd
import pytest
import torch
from torch import nn

from advbench.blindspots import LevelSetTraversal, orthogonal_part
from advbench.blindspots.metrics import LPIPSDistance, linf, rmse, ssim
from advbench.blindspots.pairs import sample_pairs
from advbench.blindspots.triangle import barycentric_grid, path_confidence, triangle_confidence, triangle_stats
from advbench.cli import main
from advbench.errors import ConfigError
from advbench.registry import TRAVERSALS


# ---------------------------------------------------------------------- helpers
def _pairs(data, model, n: int, seed: int = 0):
    """n correctly classified sources with one target of another class each."""
    with torch.no_grad():
        pred = model(data.x).argmax(1)
    pairs = sample_pairs(data, pred, n, seed)
    return data.x[pairs.source], data.x[pairs.targets[:, 0]], data.y[pairs.source]


class Constant(nn.Module):
    """Logits that ignore the input."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(logits, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], -1) + 0 * x.flatten(1).sum(1, keepdim=True)


class TwoClassLinear(nn.Module):
    """Logits (w . x, 0): the class-0 confidence is sigmoid(w . x)."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.flatten().double())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.flatten(1) @ self.w
        return torch.stack([z, torch.zeros_like(z)], dim=1)


# ---------------------------------------------------------------------- the traversal
def test_registered_and_keyword_only():
    assert "lst" in TRAVERSALS.list()
    lst = TRAVERSALS.create("lst")
    assert lst.params()["step_size"] == 2e-2 and lst.iterations == 400 and lst.delta == 0.2 and lst.adv_step == 0.0
    assert lst.restore == 1.0 and lst.restore_drop == 0.5
    with pytest.raises(TypeError):
        LevelSetTraversal(0.1)  # type: ignore[misc]


@pytest.mark.parametrize(
    "params, fragment",
    [
        ({"step_size": 0}, "step_size: Input should be greater than 0"),
        ({"step_size": float("nan")}, "step_size: Input should be"),
        ({"iterations": 2.5}, "iterations: Input should be a valid integer"),
        ({"delta": 1.5}, "delta: Input should be less than or equal to 1"),
        ({"adv_step": -1e-3}, "adv_step: Input should be greater than or equal to 0"),
        ({"restore": 1.5}, "restore: Input should be less than or equal to 1"),
        ({"restore": "1"}, "restore: Input should be a valid number"),
        ({"restore_drop": 1.0}, "restore_drop: Input should be less than 1"),
        ({"restore_drop": -0.1}, "restore_drop: Input should be greater than or equal to 0"),
        ({"bounds": (1.0, 0.0)}, "bounds: must have low < high"),
        ({"path_every": 0}, "path_every: Input should be greater than or equal to 1"),
        ({"stepsize": 0.1}, "unknown parameter(s) stepsize"),
    ],
)
def test_bad_parameters_are_config_errors(params, fragment):
    with pytest.raises(ConfigError) as err:
        TRAVERSALS.create("lst", **params)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_confidence_stays_within_delta_along_the_path_and_the_target_gets_closer(digits_test, digits_cnn):
    source, target, y = _pairs(digits_test, digits_cnn, 12)
    lst = LevelSetTraversal(iterations=150, path_every=10)
    r = lst(digits_cnn, source, target, y)
    assert r.path is not None and r.path.shape == (12, len(r.path_steps), 1, 8, 8)
    assert r.path_steps[0] == 0 and r.path_steps[-1] == 150
    with torch.no_grad():
        conf = digits_cnn(r.path.flatten(0, 1)).softmax(1).reshape(12, -1, 10)
    conf = conf.gather(2, y[:, None, None].expand(-1, conf.shape[1], 1)).squeeze(2)
    assert bool((conf >= r.p_src[:, None] - lst.delta - 1e-5).all())  # every recorded iterate
    assert bool((r.confidence >= r.p_src[:, None] - lst.delta - 1e-5).all())  # every iterate
    assert torch.allclose(conf, r.confidence[:, list(r.path_steps)], atol=1e-5)
    assert bool(r.within_delta.all())
    dist = (r.path - target[:, None]).flatten(2).norm(dim=2)
    assert bool((dist[:, -1] < 0.8 * dist[:, 0]).all())
    assert bool((dist[:, 1:] <= dist[:, :-1] + 1e-4).float().mean() > 0.9)  # mostly monotone
    assert torch.equal(r.path[:, -1], r.x_lst)
    # one forward for p_src, one forward+backward per iteration (the last needs no backward) and the start
    assert r.n_forward == 152 * 12 and r.n_backward == 150 * 12  # per example


def test_step_is_orthogonal_to_the_gradient_on_a_linear_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).double()
    x = 0.3 + 0.4 * torch.rand(4, 1, 3, 4, dtype=torch.float64)
    t = 0.3 + 0.4 * torch.rand(4, 1, 3, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0])
    W, b = model[1].weight.detach(), model[1].bias.detach()
    p = torch.softmax(x.flatten(1) @ W.T + b, dim=1)
    g = (p - torch.eye(3, dtype=torch.float64)[y]) @ W  # grad_x CE by hand
    dx = (t - x).flatten(1)
    c = (g * dx).sum(1, keepdim=True) / (g * g).sum(1, keepdim=True)
    expected = x.flatten(1) + 0.05 * (dx - c * g)

    r = LevelSetTraversal(step_size=0.05, iterations=1, delta=1.0, adv_step=0.0, restore=0.0)(model, x, t, y)
    assert torch.allclose(r.x_lst.flatten(1), expected, atol=1e-12)
    step = r.x_lst.flatten(1) - x.flatten(1)
    cos = (step * g).sum(1) / (step.norm(dim=1) * g.norm(dim=1))
    assert float(cos.abs().max()) < 1e-10
    # the correction x_par = clip(-eps g) descends the CE: it raises the source-class confidence
    lst = LevelSetTraversal(adv_step=1e-2)
    x_new, x_par = lst.step(x, g.reshape(x.shape), x, torch.zeros_like(x))
    assert torch.allclose(x_par, (-1e-2 * g).clamp(-1e-2, 1e-2).reshape(x.shape))
    p_new = torch.softmax(x_new.flatten(1) @ W.T + b, dim=1).gather(1, y[:, None]).squeeze(1)
    assert bool((p_new > p.gather(1, y[:, None]).squeeze(1)).all())


def test_orthogonal_part_of_a_zero_gradient_is_the_vector():
    v = torch.randn(3, 1, 2, 2)
    assert torch.equal(orthogonal_part(v, torch.zeros_like(v)), v)
    g = torch.randn(3, 1, 2, 2) * 1e-30  # tiny, not zero: still a clean projection
    out = orthogonal_part(v, g)
    assert torch.isfinite(out).all()
    gd = g.double() * 1e30
    cos = (out.double() * gd).flatten(1).sum(1) / (out.double().flatten(1).norm(dim=1) * gd.flatten(1).norm(dim=1))
    assert float(cos.abs().max()) < 1e-5


def test_frozen_pairs_stay_frozen(digits_test, digits_cnn):
    source, target, y = _pairs(digits_test, digits_cnn, 10, seed=1)
    lst = LevelSetTraversal(iterations=120, delta=0.01, adv_step=0.0, restore=0.0, path_every=1)
    r = lst(digits_cnn, source, target, y)
    assert bool(r.stopped.any()), "delta=0.01 without any correction should stop some pairs"
    for i in r.stopped.nonzero().squeeze(1).tolist():
        k = int(r.iterations[i])
        assert k < 120
        assert bool((r.path[i, k:] == r.x_lst[i]).all())  # nothing moves after the stop
        assert bool((r.confidence[i, k:] == r.p_final[i]).all())
        assert not torch.equal(r.path[i, k - 1], r.x_lst[i]) if k > 0 else True
    assert bool((r.iterations[~r.stopped] == 120).all())


def test_pairs_are_independent(digits_test, digits_cnn):
    source, target, y = _pairs(digits_test, digits_cnn, 8, seed=2)
    model = copy.deepcopy(digits_cnn).double()  # float64: batch-size-dependent rounding cannot flip a check
    source, target = source.double(), target.double()
    lst = LevelSetTraversal(iterations=100, delta=0.05)
    full = lst(model, source, target, y)
    parts = [lst(model, source[s], target[s], y[s]) for s in (slice(0, 3), slice(3, 8))]
    rev = lst(model, source.flip(0), target.flip(0), y.flip(0))
    assert torch.allclose(full.x_lst, torch.cat([p.x_lst for p in parts]), atol=1e-9)
    assert torch.equal(full.iterations, torch.cat([p.iterations for p in parts]))
    assert torch.equal(full.stopped, torch.cat([p.stopped for p in parts]))
    assert torch.allclose(full.x_lst, rev.x_lst.flip(0), atol=1e-9)


def test_start_noise_comes_only_from_the_generator(digits_test, digits_cnn):
    source, target, y = _pairs(digits_test, digits_cnn, 4)
    lst = LevelSetTraversal(iterations=5, init_noise=4 / 255)
    with pytest.raises(ConfigError, match="generator"):
        lst(digits_cnn, source, target, y)
    a = lst(digits_cnn, source, target, y, generator=torch.Generator().manual_seed(5))
    b = lst(digits_cnn, source, target, y, generator=torch.Generator().manual_seed(5))
    c = lst(digits_cnn, source, target, y, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a.x_lst, b.x_lst) and not torch.equal(a.x_lst, c.x_lst) and a.seed == 5


def test_inputs_are_checked(digits_cnn):
    lst = LevelSetTraversal(iterations=1)
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(ConfigError, match="same shape"):
        lst(digits_cnn, x, x[:1])
    with pytest.raises(ConfigError, match="outside the bounds"):
        lst(digits_cnn, x, x + 2)
    with pytest.raises(ConfigError, match="labels"):
        lst(digits_cnn, x, x, torch.tensor([0.0, 1.0]))


# ---------------------------------------------------------------------- triangle and paths
def test_barycentric_grid():
    g = barycentric_grid(4)
    assert g.shape == (15, 3)
    assert torch.allclose(g.sum(1), torch.ones(15, dtype=torch.float64))
    assert bool((g >= 0).all()) and len({tuple(r.tolist()) for r in g}) == 15


def test_constant_model_fills_the_whole_triangle():
    model = Constant([2.0, 0.5, -1.0])
    x = torch.rand(3, 3, 1, 4, 4, dtype=torch.float64)
    label = torch.tensor([0, 1, 2])
    tri = triangle_confidence(model, x[0], x[1], x[2], label, resolution=6, batch_size=7)
    p = torch.softmax(model.logits.detach(), 0)[label]
    assert tri.shape == (3, 28) and torch.allclose(tri, p[:, None].expand(-1, 28))
    paths = [path_confidence(model, x[0], e, label, points=7) for e in (x[1], x[2])]
    stats = triangle_stats(p, tri, paths)
    for frac in stats.fractions.values():
        assert torch.equal(frac, torch.ones(3, dtype=torch.float64))
    assert torch.allclose(stats.triangle_confidence, p) and torch.allclose(stats.path_confidence, p)


def test_linear_model_triangle_has_the_computed_answer():
    # w . x_s = w . x_1 = s0 and w . x_2 = s0 - 6: the class-0 confidence at weights (a, b, c) is sigmoid(s0 - 6 c)
    w = torch.zeros(4, dtype=torch.float64)
    w[0] = 1.0
    xs = torch.tensor([[3.0, 0.1, 0.2, 0.3]], dtype=torch.float64)
    x1 = torch.tensor([[3.0, 0.9, 0.8, 0.7]], dtype=torch.float64)
    x2 = torch.tensor([[-3.0, 0.5, 0.5, 0.5]], dtype=torch.float64)
    model = TwoClassLinear(w)
    label = torch.tensor([0])
    R = 2  # 6 grid points; c = 0, 0, 0, 1/2, 1/2, 1
    tri = triangle_confidence(model, xs, x1, x2, label, resolution=R)
    grid = barycentric_grid(R)
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    expected = torch.tensor([[sig(3.0 - 6 * float(c)) for c in grid[:, 2]]], dtype=torch.float64)
    assert torch.allclose(tri, expected, atol=1e-12)
    p_src = torch.tensor([sig(3.0)], dtype=torch.float64)
    paths = [path_confidence(model, xs, e, label, points=3) for e in (x1, x2)]
    assert torch.allclose(paths[0], torch.full((1, 3), sig(3.0), dtype=torch.float64))
    assert torch.allclose(paths[1], torch.tensor([[sig(3.0), sig(0.0), sig(-3.0)]], dtype=torch.float64))
    stats = triangle_stats(p_src, tri, paths, deltas=(0.0, 0.1, 0.5, 0.95))
    # sig(3) = 0.953, sig(0) = 0.5, sig(-3) = 0.047: only the c = 0 edge (3 of 6 points) is within 0.1;
    # within 0.5 the c = 1/2 points join (0.5 >= 0.453); within 0.95 every point does (0.047 >= 0.003)
    assert stats.fractions[0.0].item() == pytest.approx(0.5)
    assert stats.fractions[0.1].item() == pytest.approx(0.5)
    assert stats.fractions[0.5].item() == pytest.approx(5 / 6)
    assert stats.fractions[0.95].item() == pytest.approx(1.0)
    assert stats.path_confidence.item() == pytest.approx((3 * sig(3.0) + sig(3.0) + 0.5 + sig(-3.0)) / 6)
    assert stats.triangle_confidence.item() == pytest.approx(float(expected.mean()))


# ---------------------------------------------------------------------- distances
def test_rmse_and_linf_on_known_images():
    x = torch.zeros(2, 1, 4, 4)
    y = torch.full((2, 1, 4, 4), 0.1)
    y[1, 0, 0, 0] = 0.5
    assert torch.allclose(rmse(x, y), torch.tensor([0.1, math.sqrt((15 * 0.01 + 0.25) / 16)]))
    assert torch.allclose(linf(x, y), torch.tensor([0.1, 0.5]))


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 16, 16)])
def test_ssim_on_known_images(shape):
    torch.manual_seed(0)
    x = torch.rand(2, *shape)
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-6)
    # constant images c1, c2: SSIM = (2 c1 c2 + C1) / (c1^2 + c2^2 + C1), C1 = (0.01 * data_range)^2
    a, b = torch.full((1, *shape), 0.2), torch.full((1, *shape), 0.6)
    c1 = 0.01**2
    assert ssim(a, b).item() == pytest.approx((2 * 0.2 * 0.6 + c1) / (0.2**2 + 0.6**2 + c1), rel=1e-5)


def test_ssim_colour_uses_the_channel_axis():
    from skimage.metrics import structural_similarity

    torch.manual_seed(1)
    x, y = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16)
    ref = structural_similarity(
        x[0].permute(1, 2, 0).double().numpy(), y[0].permute(1, 2, 0).double().numpy(), data_range=1.0,
        channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    )
    assert ssim(x, y).item() == pytest.approx(ref, rel=1e-6)


def test_lpips_is_skipped_clearly_without_alexnet_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    metric = LPIPSDistance(None)
    assert not metric.available
    assert "LPIPS skipped" in metric.note and "lpips_weights" in metric.note and str(tmp_path / "hub") in metric.note
    assert torch.isnan(metric(torch.rand(3, 1, 8, 8), torch.rand(3, 1, 8, 8))).all()
    with pytest.raises(ConfigError, match="no AlexNet weights file"):
        LPIPSDistance(str(tmp_path / "missing.pth"))


def test_lpips_runs_with_local_alexnet_weights(tmp_path):
    pytest.importorskip("lpips")
    g = torch.Generator().manual_seed(0)
    shapes = {0: (64, 3, 11, 11), 3: (192, 64, 5, 5), 6: (384, 192, 3, 3), 8: (256, 384, 3, 3), 10: (256, 256, 3, 3)}
    state = {}
    for i, s in shapes.items():  # random weights in torchvision's AlexNet layout (no download, no 240 MB file)
        state[f"features.{i}.weight"] = torch.randn(s, generator=g) * 0.05
        state[f"features.{i}.bias"] = torch.zeros(s[0])
    path = tmp_path / "alexnet.pth"
    torch.save(state, path)
    metric = LPIPSDistance(str(path))
    assert metric.available and str(path) in metric.note
    x, y = torch.rand(2, 1, 8, 8, generator=g), torch.rand(2, 1, 8, 8, generator=g)
    d = metric(x, y)
    assert torch.allclose(metric(x, x), torch.zeros(2), atol=1e-6)
    assert bool((d > 0).all()) and torch.isfinite(d).all()
    torch.save({"foo": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ConfigError, match="not torchvision AlexNet weights"):
        LPIPSDistance(str(tmp_path / "bad.pth"))


# ---------------------------------------------------------------------- pairs
def test_pairs_are_seeded_and_well_formed(digits_test, digits_cnn):
    with torch.no_grad():
        pred = digits_cnn(digits_test.x).argmax(1)
    a = sample_pairs(digits_test, pred, 20, seed=3)
    b = sample_pairs(digits_test, pred, 20, seed=3)
    c = sample_pairs(digits_test, pred, 20, seed=4)
    assert torch.equal(a.source, b.source) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.source, c.source)
    y = digits_test.y
    assert bool((pred[a.source] == y[a.source]).all()) and bool((pred[a.targets] == y[a.targets]).all())
    assert bool((y[a.targets] != y[a.source][:, None]).all())
    assert bool((y[a.targets[:, 0]] != y[a.targets[:, 1]]).all())
    assert len(set(a.source.tolist())) == 20


# ---------------------------------------------------------------------- command line
def test_cli_default_config_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # LPIPS: no weights here
    out = tmp_path / "bs"
    assert main(["blindspots", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Table 1" in printed and "Table 2" in printed and "LPIPS skipped" in printed
    for name in ("pairs.csv", "triangles.csv", "distances.csv", "confidence.csv", "tables.md", "results.json",
                 "run.json", "blindspots.png"):
        assert (out / name).is_file(), name
    pairs = pd.read_csv(out / "pairs.csv")
    assert len(pairs) == 32 and pairs.lpips.isna().all() and pairs.within_delta.all()
    assert (pairs.source_class != pairs.target_class).all()
    tri = pd.read_csv(out / "triangles.csv")
    assert len(tri) == 16 and {"frac_0", "frac_0.1", "frac_0.2", "frac_0.3"} <= set(tri.columns)
    assert ((tri.frac_0 <= tri["frac_0.1"]) & (tri["frac_0.1"] <= tri["frac_0.2"])).all()
    run = json.loads((out / "run.json").read_text())
    assert run["seed"] == 0 and run["config"]["model"]["name"] == "digits-cnn"
    assert run["versions"]["torch"] and run["versions"]["scikit-image"] and "LPIPS skipped" in run["notes"][0]
    results = json.loads((out / "results.json").read_text())
    assert results["summary"]["pairs"] == 32 and 0 <= results["summary"]["fraction_reached"] <= 1
    assert "LPIPS skipped" in (out / "tables.md").read_text()
    assert (out / "blindspots.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_lists_the_traversal(capsys):
    assert main(["list", "traversals"]) == 0
    assert "lst" in capsys.readouterr().out.split()


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("lst: {stepsize: 0.1}\n", "unknown parameter(s) stepsize"),
        ("lst: {delta: 2}\n", "delta: Input should be less than or equal to 1"),
        ("sources: 0\n", "sources"),
        ("model: digits-cnnn\n", "unknown model 'digits-cnnn'"),
        ("grid: many\n", "grid"),
        ("deltas: [0.1, 1.5]\n", "each delta must lie in [0, 1]"),
        ("lpips_weights: /nonexistent/alexnet.pth\n", "/nonexistent/alexnet.pth"),
        ("colour: red\n", "unknown field"),
        ("sources: [1\n", "not valid YAML"),
        ("sources: 5000\n", "5000 sources asked for"),
    ],
)
def test_cli_bad_config_is_one_line_and_exit_2(tmp_path, capsys, text, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["blindspots", str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and fragment in err, err


def test_cli_missing_config_file(tmp_path, capsys):
    assert main(["blindspots", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
