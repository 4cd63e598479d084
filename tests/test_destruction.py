"""The destruction rate (Kurakin et al. 2016) on hand-built sets with known answers, and the
image transformations it is computed for."""

from __future__ import annotations

import math

import pytest
import torch

from advbench.analysis.destruction import (
    PAPER_PREFILTER,
    Prefilter,
    destruction_matrix,
    destruction_rate,
    destruction_records,
    pivot_destruction,
)
from advbench.analysis.transformations import Transformation
from advbench.cli import main as cli_main
from advbench.defenses.transforms import JPEG as JPEGDefense
from advbench.errors import ConfigError, UnknownNameError
from advbench.registry import REGISTRIES, TRANSFORMATIONS

N_CLASSES = 10


def _logits(rank_of_true: int, confident: bool) -> torch.Tensor:
    """Outputs over 10 classes where the true class 0 has the given rank (1 = top); the top
    class gets probability ~0.9996 when ``confident``, ~0.25 otherwise."""
    order = list(range(1, N_CLASSES))
    order.insert(rank_of_true - 1, 0)  # classes from highest to lowest
    z = torch.empty(N_CLASSES)
    for rank, cls in enumerate(order):
        z[cls] = -0.1 * rank
    z[order[0]] = 10.0 if confident else 0.5
    return z


class Lookup(torch.nn.Module):
    """A model whose output is looked up by an image id stored as id / 100 in every pixel."""

    def __init__(self, table: dict[int, torch.Tensor]) -> None:
        super().__init__()
        self.table = torch.stack([table.get(i, torch.zeros(N_CLASSES)) for i in range(max(table) + 1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x[:, 0, 0, 0].mul(100).round().long()]


def _images(ids: list[int]) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.float32).div(100).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()


# rank of the true class 0 on (clean, adversarial, transformed), and the clean confidence
CASES = [
    (1, 10, 1, True),  # 0: destroyed (top-1 and top-5)
    (1, 10, 10, True),  # 1: survives the transformation
    (2, 10, 1, True),  # 2: clean wrong in top-1, right in top-5
    (1, 1, 1, True),  # 3: the attack failed: never counted
    (1, 10, 1, False),  # 4: destroyed, but the clean prediction is not confident (not prefiltered)
    (1, 2, 1, True),  # 5: adversarial in top-1 only
    (1, 10, 3, True),  # 6: destroyed in top-5 only
]
CLEAN, ADV, TRANSFORMED = 0, 10, 20  # image ids: clean k, adversarial 10 + k, transformed 20 + k


@pytest.fixture
def known():
    table = {}
    for k, (rc, ra, rt, confident) in enumerate(CASES):
        table[CLEAN + k] = _logits(rc, confident)
        table[ADV + k] = _logits(ra, True)
        table[TRANSFORMED + k] = _logits(rt, True)
    n = len(CASES)
    x = _images([CLEAN + k for k in range(n)])
    x_adv = _images([ADV + k for k in range(n)])
    return Lookup(table), x, torch.zeros(n, dtype=torch.long), x_adv


def shift(x, generator=None):
    """The transformation of the known set: adversarial id 10 + k -> transformed id 20 + k."""
    return x + 0.1


# ---------------------------------------------------------------- the destruction rate


@pytest.mark.parametrize(
    "topk, prefilter, num, den, n",
    [
        (1, None, 3, 5, 7),  # images 0, 4, 5 of 0, 1, 4, 5, 6
        (5, None, 4, 5, 7),  # images 0, 2, 4, 6 of 0, 1, 2, 4, 6
        (1, PAPER_PREFILTER, 1, 3, 3),  # prefiltered: 0, 1, 6; destroyed: 0
        (5, PAPER_PREFILTER, 2, 3, 3),  # destroyed: 0, 6
    ],
)
def test_known_set(known, topk, prefilter, num, den, n):
    model, x, y, x_adv = known
    r = destruction_rate(model, x, y, x_adv, shift, topk=topk, prefilter=prefilter)
    assert (r.numerator, r.denominator, r.n, r.topk) == (num, den, n, topk)
    assert r.rate == pytest.approx(num / den)


def test_prefilter_confidence_threshold(known):
    model, x, y, x_adv = known
    # without the confidence rule image 4 (clean p ~ 0.25) joins the prefiltered set
    r = destruction_rate(model, x, y, x_adv, shift, prefilter=Prefilter(confidence=0.0))
    assert (r.numerator, r.denominator) == (2, 4)
    # top-1 only: image 5 (adversarial in top-1, not top-5) joins too
    r = destruction_rate(model, x, y, x_adv, shift, prefilter=Prefilter(confidence=0.8, topk=(1,)))
    assert (r.numerator, r.denominator) == (2, 4)
    assert PAPER_PREFILTER == Prefilter(confidence=0.8, topk=(1, 5))


def test_empty_denominator_is_nan(known):
    model, x, y, _ = known
    r = destruction_rate(model, x, y, x.clone(), shift)  # no adversarial example at all
    assert (r.numerator, r.denominator) == (0, 0) and math.isnan(r.rate)


def test_identity_destroys_nothing_and_restoring_destroys_everything(known):
    model, x, y, x_adv = known
    for topk in (1, 5):
        identity = destruction_rate(model, x, y, x_adv, "identity", topk=topk)
        assert identity.denominator > 0 and identity.rate == 0.0
        restore = destruction_rate(model, x, y, x_adv, lambda z, g: x, topk=topk)
        assert restore.rate == 1.0 and restore.numerator == restore.denominator


def test_identity_on_a_real_model_and_attack():
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5)).eval()
    x = torch.rand(64, 3, 4, 4, generator=g)
    y = model(x).argmax(1)  # all clean correct
    x.requires_grad_(True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    x_adv = (x + 0.5 * x.grad.sign()).clamp(0, 1).detach()
    x = x.detach()
    r = destruction_rate(model, x, y, x_adv, TRANSFORMATIONS.create("identity"))
    assert r.denominator > 0 and r.rate == 0.0


def test_bad_inputs(known):
    model, x, y, x_adv = known
    with pytest.raises(ConfigError, match="same shape"):
        destruction_rate(model, x, y, x_adv[:2], shift)
    with pytest.raises(ConfigError, match="top-11 needs at least 11 classes"):
        destruction_rate(model, x, y, x_adv, shift, topk=11)
    with pytest.raises(ConfigError, match="confidence"):
        Prefilter(confidence=1.5)
    with pytest.raises(UnknownNameError, match="blurr"):
        destruction_rate(model, x, y, x_adv, "blurr")


# ---------------------------------------------------------------- the matrix


def test_matrix_layout_values_and_counts(known):
    model, x, y, x_adv = known
    adversarial = {("fast", 4): x_adv, ("fast", 16): x.clone()}  # the second one never succeeds
    transforms = {"identity": "identity", "shift": shift}
    m = destruction_matrix(model, x, y, adversarial, transforms)
    assert list(m.index) == [("fast", 4), ("fast", 16)]
    assert m.index.names == ["attack", "eps"] and m.columns.names == ["case", "topk", "transformation"]
    assert m.shape == (2, 2 * 2 * 2)
    assert m.loc[("fast", 4), ("average", 1, "shift")] == pytest.approx(3 / 5)
    assert m.loc[("fast", 4), ("average", 5, "shift")] == pytest.approx(4 / 5)
    assert m.loc[("fast", 4), ("prefiltered", 1, "shift")] == pytest.approx(1 / 3)
    assert m.loc[("fast", 4), ("prefiltered", 5, "shift")] == pytest.approx(2 / 3)
    assert (m.loc[("fast", 4), (slice(None), slice(None), "identity")] == 0).all()
    assert m.loc[("fast", 16)].isna().all()  # 0/0 everywhere
    records = destruction_records(model, x, y, adversarial, transforms)
    assert len(records) == 2 * 2 * 2 * 2
    dens = pivot_destruction(records, "denominator")
    assert dens.loc[("fast", 4), ("prefiltered", 1, "shift")] == 3 and (dens.loc[("fast", 16)] == 0).all()
    top1 = destruction_matrix(model, x, y, adversarial, ["identity", {"name": "brightness", "delta": 0.0}],
                              topk=(1,), prefilter=None)
    assert list(top1.columns) == [("average", 1, "identity"), ("average", 1, "brightness(delta=0)")]
    with pytest.raises(ConfigError, match="distinct"):
        destruction_records(model, x, y, adversarial, ["identity", "identity"])


def test_matrix_is_seeded(known):
    model, x, y, x_adv = known
    args = (model, x, y, {("fast", 4): x_adv}, [{"name": "noise", "std": 0.05}])
    assert destruction_records(*args, seed=1).equals(destruction_records(*args, seed=1))


# ---------------------------------------------------------------- the transformations


def _create(name: str) -> Transformation:
    return TRANSFORMATIONS.create(name, steps=["quantize8", "blur"]) if name == "chain" else TRANSFORMATIONS.create(name)


@pytest.mark.parametrize("name", TRANSFORMATIONS.list())
@pytest.mark.parametrize("channels", [1, 3])
def test_every_transformation_keeps_shape_and_range(name, channels):
    x = torch.rand(3, channels, 9, 12, generator=torch.Generator().manual_seed(0))
    out = _create(name)(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_brightness_and_contrast_by_hand():
    x = torch.tensor([0.2, 0.4, 0.2, 0.4]).view(1, 1, 2, 2)
    assert torch.allclose(TRANSFORMATIONS.create("brightness", delta=0.1)(x), x + 0.1)
    assert torch.allclose(TRANSFORMATIONS.create("brightness", delta=0.7)(x), torch.tensor([0.9, 1.0, 0.9, 1.0]).view(1, 1, 2, 2))
    # mean 0.3: 0.3 + 2 (x - 0.3)
    assert torch.allclose(TRANSFORMATIONS.create("contrast", factor=2.0)(x), torch.tensor([0.1, 0.5, 0.1, 0.5]).view(1, 1, 2, 2))
    assert torch.allclose(TRANSFORMATIONS.create("contrast", factor=0.0)(x), torch.full_like(x, 0.3))


def test_rotation():
    x = torch.rand(2, 3, 7, 7, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(TRANSFORMATIONS.create("rotation", degrees=0.0)(x), x, atol=1e-6)
    # 90 degrees counter-clockwise maps pixel centres onto pixel centres
    assert torch.allclose(TRANSFORMATIONS.create("rotation", degrees=90.0)(x), torch.rot90(x, 1, (2, 3)), atol=1e-5)
    wide = torch.rand(1, 1, 5, 9, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(TRANSFORMATIONS.create("rotation", degrees=0.0)(wide), wide, atol=1e-6)
    assert torch.allclose(TRANSFORMATIONS.create("rotation", degrees=180.0)(wide), wide.flip(2, 3), atol=1e-5)
    flat = torch.full((1, 3, 6, 6), 0.4)
    assert torch.allclose(TRANSFORMATIONS.create("rotation", degrees=7.0)(flat), flat, atol=1e-6)


def test_translation():
    x = torch.rand(2, 3, 5, 6, generator=torch.Generator().manual_seed(0))
    out = TRANSFORMATIONS.create("translation", dx=2, dy=-1)(x)
    assert torch.equal(out[:, :, :-1, 2:], x[:, :, 1:, :-2])
    assert torch.equal(out[:, :, :, :2], out[:, :, :, 2:3].expand(-1, -1, -1, 2))  # border repeated
    zeros = TRANSFORMATIONS.create("translation", dx=2, dy=-1, padding="zeros")(x)
    assert torch.equal(zeros[:, :, :-1, 2:], x[:, :, 1:, :-2])
    assert (zeros[:, :, :, :2] == 0).all() and (zeros[:, :, -1] == 0).all()
    assert torch.equal(TRANSFORMATIONS.create("translation", dx=0, dy=0)(x), x)


def test_quantize8_and_jpeg():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    q = TRANSFORMATIONS.create("quantize8")(x)
    assert torch.allclose(q * 255, (q * 255).round(), atol=1e-4) and (q - x).abs().max() <= 0.5 / 255 + 1e-6
    jpeg = TRANSFORMATIONS.create("jpeg", quality=30)
    assert torch.equal(jpeg(x), JPEGDefense(quality=30).transform(x))


def test_blur():
    impulse = torch.zeros(1, 1, 15, 15)
    impulse[0, 0, 7, 7] = 1.0
    blur = TRANSFORMATIONS.create("blur", sigma=1.0)
    k = blur.kernel().float()
    assert len(k) == 7 and float(k.sum()) == pytest.approx(1.0)
    out = blur(impulse)
    assert torch.allclose(out[0, 0, 4:11, 4:11], torch.outer(k, k), atol=1e-6)
    assert float(out.sum()) == pytest.approx(1.0, abs=1e-5)
    x = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(TRANSFORMATIONS.create("blur", sigma=0.0)(x), x)
    flat = torch.full((1, 3, 4, 4), 0.3)
    assert torch.allclose(TRANSFORMATIONS.create("blur", sigma=3.0)(flat), flat)


def test_noise_is_seeded():
    x = torch.full((4, 3, 32, 32), 0.5)
    noise = TRANSFORMATIONS.create("noise", std=0.05)
    a = noise(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, noise(x, torch.Generator().manual_seed(3)))
    assert not torch.equal(a, noise(x, torch.Generator().manual_seed(4)))
    assert float((a - x).std()) == pytest.approx(0.05, rel=0.05)


def test_photo_and_chain():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    photo = TRANSFORMATIONS.create("photo")
    assert photo.params() == {"degrees": 1.0, "sigma": 0.6, "factor": 0.9, "delta": 0.03, "std": 0.02, "quality": 75}
    assert photo.label.startswith("photo(degrees=1, sigma=0.6")
    steps = [
        {"name": "rotation", "degrees": 1.0},
        {"name": "blur", "sigma": 0.6},
        {"name": "contrast", "factor": 0.9},
        {"name": "brightness", "delta": 0.03},
        {"name": "noise", "std": 0.02},
        {"name": "jpeg", "quality": 75},
    ]
    chain = TRANSFORMATIONS.create("chain", steps=steps)
    assert chain.random and photo.random
    a = photo(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, chain(x, torch.Generator().manual_seed(5)))
    assert torch.equal(a, photo(x, torch.Generator().manual_seed(5)))
    assert (a - x).abs().mean() > 0.01
    manual = TRANSFORMATIONS.create("brightness", delta=0.2)(TRANSFORMATIONS.create("quantize8")(x))
    assert torch.equal(TRANSFORMATIONS.create("chain", steps=["quantize8", {"name": "brightness", "delta": 0.2}])(x), manual)


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("jpeg", {"quality": 0}, "'jpeg': quality: Input should be greater than or equal to 1"),
        ("blur", {"sigma": -1.0}, "sigma: Input should be greater than or equal to 0"),
        ("noise", {"std": float("nan")}, "std: Input should be"),
        ("brightness", {"delta": 2}, "delta: Input should be less than or equal to 1"),
        ("contrast", {"factor": True}, "factor: must be a number"),
        ("rotation", {"degrees": 200}, "degrees: Input should be less than or equal to 180"),
        ("rotation", {"padding": "wrap"}, "padding: Input should be 'border', 'zeros' or 'reflection'"),
        ("translation", {"dx": 1.5}, "dx: Input should be a valid integer"),
        ("photo", {"quality": 101}, "'photo': quality: Input should be less than or equal to 100"),
        ("chain", {"steps": []}, "steps: must be a non-empty list"),
        ("chain", {"steps": [3]}, "a chain step must be"),
        ("blur", {"radius": 2}, "unknown parameter"),
    ],
)
def test_bad_parameters_are_one_line_config_errors(name, params, message):
    with pytest.raises(ConfigError, match=message) as info:
        TRANSFORMATIONS.create(name, **params)
    assert "\n" not in str(info.value)


def test_needs_an_image_batch():
    with pytest.raises(ConfigError, match="NCHW"):
        TRANSFORMATIONS.create("identity")(torch.zeros(3, 4, 4))


def test_registry_and_cli_list(capsys):
    assert REGISTRIES["transformations"] is TRANSFORMATIONS and TRANSFORMATIONS.kind == "transformation"
    expected = {"identity", "jpeg", "blur", "noise", "brightness", "contrast", "rotation", "translation",
                "quantize8", "photo", "chain"}
    assert set(TRANSFORMATIONS.list()) == expected
    with pytest.raises(UnknownNameError, match="did you mean 'rotation'"):
        TRANSFORMATIONS.get("rotate")
    assert cli_main(["list", "transformations"]) == 0
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines()}
    assert listed == expected
