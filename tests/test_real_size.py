"""Real-size CIFAR-10 models end to end through ``advbench evaluate``: a torchvision ResNet-18
with a 10-class head and local weights, a timm model from a local weights file, and RobustBench's
``Standard`` WideResNet-28-10 from a checkpoint in ``model_dir``, each attacked with PGD and
AutoAttack (few examples, few steps: seconds on 2 cores). The weights are random, saved here in
each loader's layout; the examples are CIFAR-10 test images labelled with the model's own
predictions, so every example is clean-correct and every attack really runs."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import yaml

from advbench.cli import main

pytestmark = pytest.mark.slow

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)


@pytest.fixture(scope="module")
def cifar_images(shared_data):
    from advbench.data.cifar10 import load_cifar10

    data = load_cifar10("test", root=os.path.join(shared_data, "cifar10"))
    return data.x[:3].clone()


def _labelled_by(model: torch.nn.Module, x: torch.Tensor, path) -> str:
    """An .npz of ``x`` labelled with ``model``'s predictions (every example clean-correct)."""
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    np.savez(path, x=x.numpy(), y=y.numpy())
    return str(path)


def _evaluate(tmp_path, data_path: str, model: dict, capsys, autoattack_steps: int = 2,
              masking: bool = True) -> tuple[dict, str]:
    config = {
        "seed": 0, "device": "cpu",
        "data": {"path": data_path},
        "models": [model],
        "threats": [{"norm": "linf", "eps": ["8/255"]}],
        "attacks": [{"name": "pgd", "steps": 3},
                    {"name": "autoattack", "steps": autoattack_steps, "queries": 10}],
        "masking_checks": masking,
    }
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    assert main(["evaluate", str(cfg), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    return json.loads((out / "results.json").read_text()), printed


def _check(results: dict, printed: str, n: int) -> None:
    rows = {r["attack"]: r for r in results["rows"]}
    assert {"pgd", "autoattack", "autoattack.apgd-ce"} <= set(rows)
    for r in rows.values():
        assert r["n"] == n and r["clean_accuracy"] == 1.0 and r["audit_violations"] == 0
    assert rows["pgd"]["n_backward"] > 0 and rows["autoattack.apgd-ce"]["n_backward"] > 0
    assert rows["autoattack"]["robust_accuracy"] <= rows["autoattack.apgd-ce"]["robust_accuracy"]
    assert "linf 8/255" in printed and "0.0313725" not in printed  # eps as the config wrote it


def test_torchvision_resnet18_with_a_10_class_head_and_local_weights(tmp_path, cifar_images, capsys):
    import torchvision

    from advbench.models.layers import Normalize

    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10).eval()
    torch.save({"state_dict": net.state_dict()}, tmp_path / "resnet18.pt")
    deployed = torch.nn.Sequential(Normalize(CIFAR_MEAN, CIFAR_STD), net).eval()
    data = _labelled_by(deployed, cifar_images, tmp_path / "data.npz")
    model = {"name": "resnet18", "torchvision": "resnet18", "weights": str(tmp_path / "resnet18.pt"),
             "num_classes": 10, "mean": list(CIFAR_MEAN), "std": list(CIFAR_STD)}
    _check(*_evaluate(tmp_path, data, model, capsys), n=len(cifar_images))


def test_a_timm_model_from_a_local_weights_file(tmp_path, cifar_images, capsys):
    import timm

    from advbench.models.layers import Normalize

    torch.manual_seed(0)
    net = timm.create_model("resnet10t", pretrained=False, num_classes=10).eval()
    torch.save(net.state_dict(), tmp_path / "resnet10t.pth")
    deployed = torch.nn.Sequential(Normalize(CIFAR_MEAN, CIFAR_STD), net).eval()
    data = _labelled_by(deployed, cifar_images, tmp_path / "data.npz")
    model = {"name": "resnet10t", "timm": "resnet10t", "weights": str(tmp_path / "resnet10t.pth"),
             "num_classes": 10, "mean": list(CIFAR_MEAN), "std": list(CIFAR_STD)}
    _check(*_evaluate(tmp_path, data, model, capsys), n=len(cifar_images))


def test_robustbench_standard_wideresnet_28_10_from_model_dir(tmp_path, cifar_images, capsys, monkeypatch):
    from advbench.models import loaders
    from advbench.models.robustbench_compat import import_robustbench

    import_robustbench()
    import robustbench.utils
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    for fn in ("download_gdrive", "download_gdrive_new"):  # nothing may be downloaded
        if hasattr(robustbench.utils, fn):
            monkeypatch.setattr(robustbench.utils, fn, lambda *a, **k: pytest.fail("tried to download"))
    torch.manual_seed(0)
    net = model_dicts[BenchmarkDataset.cifar_10][ThreatModel.Linf]["Standard"]["model"]().eval()
    path = loaders.robustbench_checkpoint_paths("Standard", model_dir=tmp_path / "models")[0]
    path.parent.mkdir(parents=True)
    torch.save(net.state_dict(), path)
    x = cifar_images[:2]
    data = _labelled_by(net, x, tmp_path / "data.npz")
    model = {"name": "wrn-28-10", "robustbench": "Standard", "dataset": "cifar10", "threat_model": "Linf",
             "model_dir": str(tmp_path / "models")}
    _check(*_evaluate(tmp_path, data, model, capsys, autoattack_steps=1, masking=False), n=len(x))
