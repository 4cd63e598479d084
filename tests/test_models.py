"""Model loaders: saved programs, import paths, torchvision, timm, RobustBench; the Normalize layer."""

from __future__ import annotations

import sys
import textwrap
import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

from advbench.errors import AdvbenchError, ConfigError, DataError, UnknownNameError
from advbench.models import loaders
from advbench.models.layers import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Normalize,
)


def one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert msg and "\n" not in msg, msg
    return msg


def small_net() -> nn.Module:
    """A 1x8x8 classifier with batch norm and dropout, so train and eval mode differ."""
    torch.manual_seed(0)
    net = nn.Sequential(
        Normalize(0.3, 0.38),
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(0.5), nn.Linear(8 * 16, 10),
    )
    with torch.no_grad():  # non-trivial running statistics
        net[2].running_mean.uniform_(-0.5, 0.5)
        net[2].running_var.uniform_(0.5, 2.0)
    return net.eval()


X8 = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))


# ============================================================================ Normalize
def test_normalize_layer():
    norm = Normalize((0.5, 0.25, 0.0), (0.5, 0.5, 2.0))
    x = torch.rand(2, 3, 4, 4)
    expected = (x - torch.tensor([0.5, 0.25, 0.0]).view(1, 3, 1, 1)) / torch.tensor([0.5, 0.5, 2.0]).view(1, 3, 1, 1)
    assert torch.allclose(norm(x), expected)
    assert set(norm.state_dict()) == {"mean", "std"} and not list(norm.parameters())
    assert torch.allclose(Normalize(0.5, 0.5)(x), (x - 0.5) / 0.5)  # one value for every channel
    with pytest.raises(ConfigError):
        Normalize((0.5,), (0.0,))
    with pytest.raises(ConfigError):
        Normalize((0.5, 0.5), (0.5, 0.5, 0.5))


# ============================================================================ saved model files
@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic-batch", "static-batch"])
@pytest.mark.parametrize("name", ["model.pt2", "model.bin"])  # the format is read from the contents
def test_exported_program_round_trip(tmp_path, dynamic, name):
    net = small_net()
    kwargs = {"dynamic_shapes": ({0: torch.export.Dim("batch", min=1)},)} if dynamic else {}
    program = torch.export.export(net, (X8[:4],), **kwargs)
    torch.export.save(program, str(tmp_path / "model.pt2"))
    if name != "model.pt2":
        (tmp_path / "model.pt2").rename(tmp_path / name)
    model = loaders.load_model_file(tmp_path / name)
    assert isinstance(model, nn.Module) and not model.training
    model.eval()  # supported, unlike on a bare exported graph module
    with torch.no_grad():
        expected = net(X8)
        assert torch.allclose(model(X8), expected, atol=1e-6)  # 6 rows, exported with 4
        assert torch.allclose(model(X8[:1]), expected[:1], atol=1e-6)
        assert model(X8[:0]).shape == (0, 10)
    x = X8.clone().requires_grad_(True)
    model(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_exported_in_training_mode_evaluates_in_eval_mode(tmp_path):
    net = small_net().train()
    program = torch.export.export(net, (X8,))
    torch.export.save(program, str(tmp_path / "train.pt2"))
    model = loaders.load_model_file(tmp_path / "train.pt2")
    net.eval()
    with torch.no_grad():
        assert torch.allclose(model(X8), net(X8), atol=1e-6)
        assert torch.equal(model(X8), model(X8))  # dropout is off
    model.train()
    assert model.training
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(X8), net(X8), atol=1e-6)


@pytest.mark.parametrize("how", ["script", "trace"])
@pytest.mark.parametrize("name", ["model.pt", "model.torchscript"])
def test_torchscript_round_trip(tmp_path, how, name):
    net = small_net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(net) if how == "script" else torch.jit.trace(net, X8[:2])
        torch.jit.save(scripted, str(tmp_path / name))
    model = loaders.load_model_file(str(tmp_path / name))
    assert not model.training
    with torch.no_grad():
        assert torch.allclose(model(X8), net(X8), atol=1e-6)


def test_model_file_errors(tmp_path):
    with pytest.raises(DataError) as e:
        loaders.load_model_file(tmp_path / "nope.pt2")
    msg = one_line(e)
    assert "nope.pt2" in msg and "torch.export" in msg and "TorchScript" in msg

    with pytest.raises(DataError) as e:
        loaders.load_model_file(tmp_path)
    assert "folder" in one_line(e)

    torch.save(small_net().state_dict(), tmp_path / "weights.pt")
    with pytest.raises(DataError) as e:
        loaders.load_model_file(tmp_path / "weights.pt")
    assert "state dict" in one_line(e) and "weights.pt" in str(e.value)

    (tmp_path / "junk.pt2").write_bytes(b"this is not a model" * 10)
    with pytest.raises(DataError) as e:
        loaders.load_model_file(tmp_path / "junk.pt2")
    assert "junk.pt2" in one_line(e) and "TorchScript" in str(e.value)

    program = torch.export.export(small_net(), (X8,))
    torch.export.save(program, str(tmp_path / "whole.pt2"))
    data = (tmp_path / "whole.pt2").read_bytes()
    (tmp_path / "cut.pt2").write_bytes(data[: len(data) // 2])  # a truncated download
    with pytest.raises(DataError) as e:
        loaders.load_model_file(tmp_path / "cut.pt2")
    assert "cut.pt2" in one_line(e)


# ============================================================================ import paths
@pytest.fixture
def user_module(tmp_path, monkeypatch):
    name = "advbench_test_user_models"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            def make(width=8, seed=0):
                torch.manual_seed(seed)
                return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 10)).train()

            class Net(nn.Module):
                def __init__(self, classes=10):
                    super().__init__()
                    self.fc = nn.Linear(64, classes)
                def forward(self, x):
                    return self.fc(x.flatten(1))

            instance = nn.Linear(64, 10)
            def not_a_model():
                return 42
            CONSTANT = 3

            class Holder:
                factory = staticmethod(make)
            """
        )
    )
    (tmp_path / "advbench_test_broken.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    for mod in (name, "advbench_test_broken"):
        sys.modules.pop(mod, None)


def test_import_path_loading(user_module):
    model = loaders.load_import_path(f"{user_module}:make", width=16)
    assert isinstance(model, nn.Sequential) and not model.training and model[1].out_features == 16
    assert torch.equal(model(X8), loaders.load_import_path(f"{user_module}:make", width=16)(X8))
    assert loaders.load_import_path(f"{user_module}:Net", classes=5)(X8).shape == (6, 5)
    assert isinstance(loaders.load_import_path(f"{user_module}:instance"), nn.Linear)
    assert isinstance(loaders.load_import_path(f"{user_module}:Holder.factory"), nn.Sequential)
    zoo_model = loaders.load_import_path("advbench.zoo.reference:build", name="digits-mlp")
    assert zoo_model(X8).shape == (6, 10)


@pytest.mark.parametrize(
    "spec, params, error, words",
    [
        ("no_colon_here", {}, ConfigError, ["package.module:factory"]),
        ("a:b:c", {}, ConfigError, ["package.module:factory"]),
        ("bad-name:make", {}, ConfigError, ["package.module:factory"]),
        ("advbench_no_such_module_xyz:make", {}, ConfigError, ["advbench_no_such_module_xyz", "no module"]),
        ("{mod}:mkae", {}, ConfigError, ["no attribute 'mkae'", "'make'"]),
        ("{mod}:not_a_model", {}, ConfigError, ["int", "nn.Module"]),
        ("{mod}:CONSTANT", {}, ConfigError, ["int", "neither a factory"]),
        ("{mod}:make", {"depth": 3}, ConfigError, ["depth"]),
        ("{mod}:instance", {"width": 3}, ConfigError, ["instance"]),
        ("advbench_test_broken:make", {}, ConfigError, ["RuntimeError", "boom at import"]),
    ],
)
def test_import_path_errors(user_module, spec, params, error, words):
    with pytest.raises(error) as e:
        loaders.load_import_path(spec.format(mod=user_module), **params)
    msg = one_line(e)
    for w in words:
        assert w in msg, msg


# ============================================================================ torchvision and timm
@pytest.mark.parametrize("variant", ["raw", "state_dict", "model", "dataparallel"])
def test_state_dict_file_variants(tmp_path, variant):
    sd = small_net().state_dict()
    obj = {
        "raw": sd,
        "state_dict": {"state_dict": sd, "epoch": 3},
        "model": {"model": sd, "optimizer": {"lr": 0.1}},
        "dataparallel": OrderedDict((f"module.{k}", v) for k, v in sd.items()),
    }[variant]
    torch.save(obj, tmp_path / "w.pt")
    loaded = loaders.load_state_dict_file(tmp_path / "w.pt")
    assert list(loaded) == list(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_torchvision_with_local_weights(tmp_path):
    import torchvision

    torch.manual_seed(0)
    ref = torchvision.models.resnet18(num_classes=10).eval()
    with torch.no_grad():  # make batch-norm statistics matter
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    torch.save({"state_dict": ref.state_dict(), "epoch": 7}, tmp_path / "w.pt")
    model = loaders.load_torchvision(
        "resnet18", weights=str(tmp_path / "w.pt"), num_classes=10, mean=CIFAR10_MEAN, std=CIFAR10_STD
    )
    assert not model.training and isinstance(model[0], Normalize)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), ref(Normalize(CIFAR10_MEAN, CIFAR10_STD)(x)), atol=1e-5)
    # a state dict of the wrapped model (as saved from a loaded one) loads too
    torch.save(model.state_dict(), tmp_path / "wrapped.pt")
    again = loaders.load_torchvision(
        "resnet18", weights=tmp_path / "wrapped.pt", num_classes=10, mean=CIFAR10_MEAN, std=CIFAR10_STD
    )
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_torchvision_defaults_and_errors(tmp_path):
    model = loaders.load_torchvision("resnet18", num_classes=10)  # random weights, ImageNet normalization
    assert torch.allclose(model[0].mean.flatten(), torch.tensor(IMAGENET_MEAN))
    assert torch.allclose(model[0].std.flatten(), torch.tensor(IMAGENET_STD))
    torch.save(model[1].state_dict(), tmp_path / "w10.pt")

    with pytest.raises(UnknownNameError) as e:
        loaders.load_torchvision("resnet81")
    assert "resnet18" in one_line(e)
    with pytest.raises(DataError) as e:  # a 10-class file into the default 1000-class head
        loaders.load_torchvision("resnet18", weights=tmp_path / "w10.pt")
    msg = one_line(e)
    assert "fc.weight" in msg and "num_classes" in msg
    with pytest.raises(DataError) as e:
        loaders.load_torchvision("resnet18", weights=tmp_path / "missing.pt")
    assert "missing.pt" in one_line(e)
    torch.save({"net": nn.Linear(2, 2)}, tmp_path / "pickled.pt")  # a pickled module: refused by weights_only
    with pytest.raises(DataError) as e:
        loaders.load_torchvision("resnet18", weights=tmp_path / "pickled.pt")
    assert "weights_only" in one_line(e)
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "nostate.pt")
    with pytest.raises(DataError) as e:
        loaders.load_torchvision("resnet18", weights=tmp_path / "nostate.pt")
    assert "not a state dict" in one_line(e)
    with pytest.raises(ConfigError):
        loaders.load_torchvision("resnet18", weights=tmp_path / "w10.pt", pretrained=True)


def test_timm_with_local_weights(tmp_path):
    import timm

    torch.manual_seed(0)
    ref = timm.create_model("test_efficientnet", pretrained=False, num_classes=10, in_chans=1).eval()
    torch.save({"state_dict": ref.state_dict()}, tmp_path / "t.pth")
    mean, std = (0.1307,), (0.3081,)
    model = loaders.load_timm("test_efficientnet", weights=tmp_path / "t.pth", num_classes=10, in_chans=1, mean=mean, std=std)
    assert not model.training
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(model(x), ref(Normalize(mean, std)(x)), atol=1e-5)


def test_timm_defaults_and_errors(tmp_path):
    model = loaders.load_timm("test_vit", num_classes=10)
    cfg = model[1].pretrained_cfg
    assert torch.allclose(model[0].mean.flatten(), torch.tensor(cfg["mean"], dtype=torch.float32))
    with pytest.raises(UnknownNameError) as e:
        loaders.load_timm("resnet_18")
    assert "resnet18" in one_line(e)
    with pytest.raises(ConfigError) as e:  # a 1-channel net cannot take the 3-channel default normalization
        loaders.load_timm("test_vit", in_chans=1)
    assert "mean" in one_line(e)
    with pytest.raises(ConfigError):
        loaders.load_timm("test_vit", mean=(0.5, 0.5, 0.5))  # mean without std


# ============================================================================ RobustBench
RB_MODEL = "Ding2020MMA"  # a WRN-28-4 (5.8M parameters): cheap to build, loads with strict checking


def test_robustbench_compat_imports():
    from advbench.models.robustbench_compat import import_robustbench

    rb = import_robustbench()
    import autoattack
    import autoattack.state
    import robustbench.utils

    assert rb is sys.modules["robustbench"] and callable(rb.load_model) and callable(robustbench.utils.load_model)
    assert autoattack.__name__ == "pyautoattack" and autoattack.state.__name__ == "pyautoattack.state"
    assert import_robustbench() is rb  # idempotent


def test_robustbench_loads_are_weights_only(tmp_path):
    from advbench.models.robustbench_compat import import_robustbench

    import_robustbench()
    import robustbench.utils

    torch.save({"obj": nn.Linear(2, 2)}, tmp_path / "pickled.pt")
    with pytest.raises(Exception, match="[Ww]eights only load failed|weights_only"):
        robustbench.utils.torch.load(tmp_path / "pickled.pt", map_location="cpu", weights_only=False)
    assert robustbench.utils.torch.device is torch.device  # everything else is the real torch


@pytest.fixture
def rb_reference():
    from advbench.models.robustbench_compat import import_robustbench

    import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    torch.manual_seed(0)
    return model_dicts[BenchmarkDataset.cifar_10][ThreatModel.Linf][RB_MODEL]["model"]().eval()


@pytest.fixture
def no_network(monkeypatch):
    import robustbench.utils

    def refuse(*args, **kwargs):
        raise AssertionError("tried to download")

    for fn in ("download_gdrive", "download_gdrive_new"):
        if hasattr(robustbench.utils, fn):
            monkeypatch.setattr(robustbench.utils, fn, refuse)


def test_robustbench_local_checkpoint(tmp_path, rb_reference, no_network):
    folder = tmp_path / "models" / "cifar10" / "Linf"
    folder.mkdir(parents=True)
    paths = loaders.robustbench_checkpoint_paths(RB_MODEL, model_dir=tmp_path / "models")
    assert paths == [folder / f"{RB_MODEL}.pt"]
    sd = rb_reference.state_dict()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = rb_reference(x)
    for saved in (sd, {"state_dict": sd}):  # both checkpoint shapes robustbench reads
        torch.save(saved, paths[0])
        model = loaders.load_robustbench(RB_MODEL, dataset="cifar10", threat_model="Linf", model_dir=str(tmp_path / "models"))
        assert not model.training
        with torch.no_grad():
            assert torch.allclose(model(x), expected, atol=1e-5)


def test_robustbench_errors(tmp_path, no_network):
    with pytest.raises(DataError) as e:
        loaders.load_robustbench(RB_MODEL, model_dir=tmp_path / "models")
    msg = one_line(e)
    assert str(tmp_path / "models" / "cifar10" / "Linf" / f"{RB_MODEL}.pt") in msg and "never downloads" in msg
    assert not (tmp_path / "models").exists()  # nothing created, nothing fetched

    with pytest.raises(UnknownNameError) as e:
        loaders.load_robustbench("Ding2020MM", model_dir=tmp_path)
    assert RB_MODEL in one_line(e)
    with pytest.raises(ConfigError) as e:
        loaders.load_robustbench(RB_MODEL, dataset="cifar11", model_dir=tmp_path)
    assert "cifar10" in one_line(e)
    with pytest.raises(ConfigError) as e:
        loaders.load_robustbench(RB_MODEL, threat_model="L3", model_dir=tmp_path)
    assert "Linf" in one_line(e)

    folder = tmp_path / "m" / "cifar10" / "Linf"
    folder.mkdir(parents=True)
    (folder / f"{RB_MODEL}.pt").write_bytes(b"garbage" * 100)
    with pytest.raises(DataError) as e:
        loaders.load_robustbench(RB_MODEL, model_dir=tmp_path / "m")
    assert f"{RB_MODEL}.pt" in one_line(e)
    torch.save({"conv1.weight": torch.zeros(1)}, folder / f"{RB_MODEL}.pt")  # wrong architecture
    with pytest.raises(DataError) as e:
        loaders.load_robustbench(RB_MODEL, model_dir=tmp_path / "m")
    one_line(e)
    torch.save({"obj": nn.Linear(2, 2)}, folder / f"{RB_MODEL}.pt")  # would run pickle code: refused
    with pytest.raises(DataError) as e:
        loaders.load_robustbench(RB_MODEL, model_dir=tmp_path / "m")
    assert "weights_only" in one_line(e)


def test_every_loader_error_is_an_advbench_error(tmp_path):
    """The command line turns AdvbenchError into one 'error:' line; nothing here may escape as another type."""
    calls = [
        lambda: loaders.load_model_file(tmp_path / "x"),
        lambda: loaders.load_import_path("x"),
        lambda: loaders.load_torchvision("nope"),
        lambda: loaders.load_timm("nope"),
        lambda: loaders.load_robustbench("nope"),
    ]
    for call in calls:
        with pytest.raises(AdvbenchError):
            call()


class _Payload:
    """Unpickling this writes a marker file: the code a crafted checkpoint would run."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_an_exported_program_with_a_pickle_payload_runs_no_code(tmp_path):
    """torch.export.load unpickles a weight the archive marks ``use_pickle`` with weights_only=False
    (and retries a failed safe load unsafely): advbench's load refuses it, and nothing runs."""
    import io
    import json
    import zipfile

    program = torch.export.export(small_net(), (X8[:1],))
    torch.export.save(program, str(tmp_path / "good.pt2"))
    assert loaders.load_model_file(tmp_path / "good.pt2")(X8).shape == (6, 10)
    marker = tmp_path / "ran"
    buf = io.BytesIO()
    torch.save({"w": _Payload(marker)}, buf)
    with zipfile.ZipFile(tmp_path / "good.pt2") as src, zipfile.ZipFile(tmp_path / "evil.pt2", "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("model_weights_config.json"):
                config = json.loads(data)
                first = next(iter(config["config"].values()))
                first["use_pickle"] = True
                victim = first["path_name"]
                data = json.dumps(config).encode()
            dst.writestr(info, data)
    with zipfile.ZipFile(tmp_path / "evil.pt2") as z, zipfile.ZipFile(tmp_path / "evil2.pt2", "w") as dst:
        for info in z.infolist():
            data = z.read(info.filename)
            if info.filename.endswith(f"data/weights/{victim}"):
                data = buf.getvalue()
            dst.writestr(info, data)
    with pytest.raises(DataError) as exc:
        loaders.load_model_file(tmp_path / "evil2.pt2")
    assert "evil2.pt2" in one_line(exc)
    assert not marker.exists()
    # without the guard torch itself would have run it (the test would be meaningless otherwise)
    with loaders._quiet_torch(), pytest.raises(Exception):
        torch.export.load(str(tmp_path / "evil2.pt2"))
    assert marker.exists()
