"""The GPU path: the same attacks and evaluator on CUDA. Skipped cleanly where there is no GPU."""

from __future__ import annotations

import pytest
import torch

from advbench import ATTACKS, ThreatModel

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
]


@pytest.mark.parametrize("name", ["fgsm", "bim", "illc", "pgd"])
def test_attack_on_gpu_matches_cpu_audit(name, digits_mlp, digits_test):
    model = digits_mlp.to("cuda")
    x, y = digits_test.x.cuda(), digits_test.y.cuda()
    threat = ThreatModel(norm="linf", eps=0.1)
    res = ATTACKS.create(name)(model, x, y, threat, generator=torch.Generator(device="cuda").manual_seed(0))
    assert res.x_adv.device.type == "cuda"
    assert bool(res.valid.all())
    assert bool((res.success == (model(res.x_adv).argmax(1) != y)).all())
    digits_mlp.to("cpu")


def test_evaluator_on_gpu_with_amp(tmp_path):
    from advbench.config import parse_config
    from advbench.eval.evaluator import evaluate

    cfg = parse_config({"device": "cuda", "amp": True, "models": ["digits-cnn"], "data": {"name": "digits"},
                        "threats": [{"norm": "linf", "eps": [0.1]}], "attacks": [{"name": "pgd", "steps": 10}]})
    res = evaluate(cfg, tmp_path, progress=False)
    assert res.table.audit_violations.sum() == 0
    assert 0.0 <= float(res.table.robust_accuracy.iloc[0]) < float(res.table.clean_accuracy.iloc[0])
