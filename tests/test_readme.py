"""The README's plugin example is real code: install it as a package and use it from a config."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from advbench import ATTACKS, ThreatModel
from advbench.errors import ConfigError

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_plugin_example_registers_through_an_entry_point(tmp_path, monkeypatch, digits_mlp, digits_test):
    code = next(b for b in _blocks("python") if "uniform-noise" in b)
    toml = next(b for b in _blocks("toml") if "advbench.attacks" in b)
    group, value = re.search(r'entry-points\."(.+?)"\]\s*\n(.+?)\n', toml).groups()
    pkg = tmp_path / "my_attacks"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "noise.py").write_text(code)
    dist = tmp_path / "my_attacks-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-attacks\nVersion: 0.1\n")
    name, target = (part.strip().strip('"') for part in value.split("=", 1))  # TOML -> entry_points.txt
    (dist / "entry_points.txt").write_text(f"[{group}]\n{name} = {target}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("ADVBENCH_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.setattr(ATTACKS, "_plugins_loaded", False)
    try:
        assert "uniform-noise" in ATTACKS.list()
        assert ATTACKS.get("uniform-noise").source == "plugin:uniform-noise"
        attack = ATTACKS.create("uniform-noise")
        assert attack.params() == {"tries": 1} and attack.tries == 1
        # the Params class validates for the plugin: through the registry and the constructor alike
        with pytest.raises(ConfigError, match=r"attack 'uniform-noise': tries: Input should be greater than or equal to 1"):
            ATTACKS.create("uniform-noise", tries=0)
        with pytest.raises(ConfigError, match=r"unknown parameter\(s\) trys; allowed: tries"):
            type(attack)(trys=2)
        threat = ThreatModel(norm="linf", eps=0.1)
        res = attack(digits_mlp, digits_test.x, digits_test.y, threat, generator=torch.Generator().manual_seed(0))
        assert bool(res.valid.all()) and res.n_violations == 0
        assert float((res.x_adv - digits_test.x).abs().max()) <= 0.1 + 1e-6
    finally:
        ATTACKS.unregister("uniform-noise")
        for mod in ("my_attacks.noise", "my_attacks"):
            sys.modules.pop(mod, None)


def test_readme_commands_are_the_ones_ci_runs():
    text = README.read_text()
    assert 'pip install -e . && advbench evaluate' in text
    assert 'pip install -e ".[test,ray]" && python -m pytest -q' in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert 'pip install --quiet -e ".[test,ray]"' in ci and "python -m pytest -q" in ci
