"""The GPU path: the same attacks and evaluator on CUDA, their iteration loops free of host
synchronisation, and ``benchmarks/gpu.py``. The CUDA tests (marked ``gpu``) are skipped cleanly
where there is no GPU; the benchmark's CPU smoke run is not."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from advbench import ATTACKS, ThreatModel
from advbench.attacks import apgd as apgd_module
from advbench.attacks import bim as bim_module
from advbench.attacks import fab as fab_module
from advbench.attacks import pgd as pgd_module

BENCHMARK = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu.py")

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


@pytest.mark.gpu
@cuda
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


@pytest.mark.gpu
@cuda
def test_evaluator_on_gpu_with_amp(tmp_path):
    from advbench.config import parse_config
    from advbench.eval.evaluator import evaluate

    cfg = parse_config({"device": "cuda", "amp": True, "models": ["digits-cnn"], "data": {"name": "digits"},
                        "threats": [{"norm": "linf", "eps": [0.1]}], "attacks": [{"name": "pgd", "steps": 10}]})
    res = evaluate(cfg, tmp_path, progress=False)
    assert res.table.audit_violations.sum() == 0
    assert 0.0 <= float(res.table.robust_accuracy.iloc[0]) < float(res.table.clean_accuracy.iloc[0])


# ---------------------------------------------------------------------- no sync in the loops
@contextlib.contextmanager
def sync_is_an_error() -> Iterator[None]:
    """CUDA raises at any host synchronisation for the duration (torch's sync debug mode)."""
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)


def strict(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run with every host synchronisation an error (the attack's loop; not its set-up)."""
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with sync_is_an_error():
            return fn(*args, **kwargs)
    return run


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("name, params, norm, eps", [
    ("bim", {"steps": 10}, "linf", 0.1),
    ("pgd", {"steps": 10}, "linf", 0.1),
    ("pgd", {"steps": 10, "restarts": 2}, "l2", 1.0),
    ("apgd", {"steps": 20, "loss": "ce"}, "linf", 0.1),
    ("apgd", {"steps": 20, "loss": "dlr"}, "l2", 1.0),
    ("apgd", {"steps": 20, "loss": "ce", "l1_eps_schedule": True}, "l1", 6.0),
    ("apgd-t", {"steps": 10, "targets": 2}, "linf", 0.1),
    ("fab", {"steps": 10}, "linf", 0.1),
    ("fab-t", {"steps": 10, "targets": 2}, "l2", 1.0),
], ids=lambda v: v if isinstance(v, str) else None)
def test_iteration_loops_make_no_host_sync_on_cuda(name, params, norm, eps, digits_cnn, digits_test, monkeypatch):
    """The loops of PGD and BIM (``ascend_linf``/``ascend_l2``), APGD and APGD-T (``_Loop.run``) and
    FAB (``_single``) under ``torch.cuda.set_sync_debug_mode("error")``: any sync in them raises.
    The set-up around them (input checks, restarts, audit) may sync once per call or restart."""
    model = digits_cnn.to("cuda")
    try:
        x, y = digits_test.x[:64].cuda(), digits_test.y[:64].cuda()
        threat = ThreatModel(norm=norm, eps=eps)
        attack = ATTACKS.create(name, **params)
        gen = torch.Generator().manual_seed(0)  # on the CPU, as the evaluator's: its draws are moved
        attack(model, x, y, threat, generator=gen)  # warm-up: lazy CUDA initialization outside the check
        monkeypatch.setattr(pgd_module, "ascend_linf", strict(pgd_module.ascend_linf))
        monkeypatch.setattr(pgd_module, "ascend_l2", strict(pgd_module.ascend_l2))
        monkeypatch.setattr(bim_module, "ascend_linf", strict(bim_module.ascend_linf))
        monkeypatch.setattr(apgd_module._Loop, "run", strict(apgd_module._Loop.run))
        monkeypatch.setattr(fab_module._FAB, "_single", strict(fab_module._FAB._single))
        res = attack(model, x, y, threat, generator=torch.Generator().manual_seed(0))
        assert res.x_adv.device.type == "cuda" and bool(res.valid.all())
    finally:
        digits_cnn.to("cpu")


# ---------------------------------------------------------------------- benchmarks/gpu.py
def load_benchmark() -> Any:
    spec = importlib.util.spec_from_file_location("_benchmarks_gpu", BENCHMARK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def table_rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith(("| model", "| ---"))]


def test_benchmark_runs_on_cpu(tmp_path):
    """``benchmarks/gpu.py --device cpu`` on a tiny config: a row per attack with a finite cost
    ratio and the GPU busy fraction "n/a", labelled as CPU figures, in a few seconds."""
    bench = load_benchmark()
    out = tmp_path / "gpu.md"
    start = time.perf_counter()
    assert bench.main(["--device", "cpu", "--models", "cifar10-cnn", "--n", "3", "--batch", "2", "--quick",
                       "--out", str(out)]) == 0
    assert time.perf_counter() - start < 30
    text = out.read_text()
    assert "(CPU figures)" in text and "device cpu" in text
    rows = table_rows(text)
    assert [r[1].split(" ")[0] for r in rows] == ["PGD-1", "APGD-CE,", "AutoAttack"]
    for r in rows:
        assert r[0] == "cifar10-cnn" and r[2] == "3" and float(r[3]) > 0
        ratio = float(re.sub(r"\*", "", r[6]))
        assert 0 < ratio < 100 and r[7] == "n/a"


@pytest.mark.gpu
@cuda
def test_benchmark_runs_on_cuda(tmp_path):
    bench = load_benchmark()
    out = tmp_path / "gpu.md"
    assert bench.main(["--device", "cuda", "--models", "cifar10-cnn", "--n", "64", "--batch", "32", "--quick",
                       "--amp", "--channels-last", "--out", str(out)]) == 0
    text = out.read_text()
    assert "(GPU figures)" in text and "amp bfloat16" in text
    assert len(table_rows(text)) == 3
