"""The command line: the embedded default, list, and one-line errors with exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, cwd=None, env_extra=None, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "advbench.cli", *args], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _matrix_cells(text: str) -> dict[tuple[str, str], list[float]]:
    """(model, attack) -> the numbers of each row of a printed matrix."""
    cells, model = {}, None
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0].startswith("digits-"):
            model, parts = parts[0], parts[2:]
        try:
            cells[(model, parts[0])] = [float(v) for v in parts[1:]] if model and len(parts) == 5 else None
        except (ValueError, IndexError):
            continue
    return {k: v for k, v in cells.items() if v is not None}


def test_default_evaluate_prints_the_matrix(tmp_path):
    r = _cli("evaluate", "--out", str(tmp_path / "run"), env_extra={"ADVBENCH_CACHE": str(tmp_path / "fresh-cache")})
    assert r.returncode == 0, r.stderr
    assert "robust accuracy %" in r.stdout and "digits-cnn" in r.stdout and "worst-case" in r.stdout
    # the README prints what a fresh machine prints (shipped weights; a cell may differ by one
    # example's float noise on another CPU, 0.3 points of 360)
    readme = (ROOT / "README.md").read_text()
    block = readme.split("$ advbench evaluate\n", 1)[1].split("```", 1)[0]
    printed, documented = _matrix_cells(r.stdout), _matrix_cells(block)
    assert printed.keys() == documented.keys() and len(printed) == 10
    for key, values in printed.items():
        assert max(abs(a - b) for a, b in zip(values, documented[key])) <= 0.3, (key, values, documented[key])
    assert "26 jobs run, 0 resumed" in r.stdout and "26 jobs run, 0 resumed" in block
    df = pd.read_csv(tmp_path / "run" / "results.csv")
    assert set(df.attack) == {"fgsm", "bim", "illc", "pgd", "worst-case"}
    assert len(df) == 2 * 3 * 5
    assert (df.audit_violations == 0).all()


@pytest.mark.parametrize("kind, expected", [("attacks", "pgd"), ("models", "digits-cnn"), ("datasets", "digits")])
def test_list(kind, expected):
    r = _cli("list", kind)
    assert r.returncode == 0 and expected in r.stdout.split()


def _write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


BAD_MODELS = '''
import torch
from torch import nn

class Scalar(nn.Module):
    def forward(self, x):
        return x.flatten(1).sum(1)

class NaNs(nn.Module):
    def forward(self, x):
        return torch.full((x.shape[0], 10), float("nan"))

def scalar():
    return Scalar()

def nans():
    return NaNs()
'''


@pytest.mark.parametrize(
    "config, fragment",
    [
        ("models: [digits-mlp]\nthreats: [{norm: linf, eps: [0.1]}]\nattacks: [fgsmm]\n", "unknown attack 'fgsmm'; did you mean 'fgsm'"),
        ("models: [digits-mlp]\nthreats: [{norm: linf, eps: [-0.1]}]\nattacks: [fgsm]\n", "eps must be finite and >= 0"),
        ("models: [digits-mlp]\nthreats: [{norm: linf, eps: [hello]}]\nattacks: [fgsm]\n", "eps must be a number"),
        ("models: [digits-mlp]\nthreats: [{norm: l2, eps: [0.5]}]\nattacks: [bim]\n", "does not support norm 'l2'"),
        ("models: [{name: m, file: /nonexistent/model.pt2}]\nthreats: [{norm: linf, eps: [0.1]}]\nattacks: [fgsm]\n", "/nonexistent/model.pt2"),
        ("models: [{name: m, import: 'badmodels:scalar'}]\nthreats: [{norm: linf, eps: [0.1]}]\nattacks: [fgsm]\n", "must return logits of shape (N, classes)"),
        ("models: [{name: m, import: 'badmodels:nans'}]\nthreats: [{norm: linf, eps: [0.1]}]\nattacks: [fgsm]\n", "NaN or infinite logits"),
        ("data: {path: /nonexistent/data.npz}\nmodels: [digits-mlp]\nthreats: [{norm: linf, eps: [0.1]}]\nattacks: [fgsm]\n", "/nonexistent/data.npz"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, config, fragment):
    (tmp_path / "badmodels.py").write_text(BAD_MODELS)
    r = _cli("evaluate", _write(tmp_path, config), "--out", str(tmp_path / "o"), "--quiet",
             env_extra={"PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"})
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in r.stderr


def test_missing_config_file_and_bad_usage(tmp_path):
    r = _cli("evaluate", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and r.stderr.startswith("error: config file not found")
    r = _cli("list", "gadgets")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "invalid choice" in r.stderr
