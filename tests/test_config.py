"""Config parsing and validation: good configs expand correctly, bad ones fail with one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest

from advbench.config import load_config, parse_config
from advbench.errors import AdvbenchError, ConfigError


def _cfg(**over):
    base = {"models": ["digits-mlp"], "threats": [{"norm": "linf", "eps": [0.1]}], "attacks": ["fgsm"]}
    base.update(over)
    return base


def test_embedded_default_is_valid():
    c = load_config(None)
    assert [m.name for m in c.models] == ["digits-mlp", "digits-cnn"]
    assert [t.eps for t in c.threat_models()] == [0.05, 0.1, 0.2]
    assert [a.name for a in c.attacks] == ["fgsm", "bim", "illc", "pgd"]


def test_issue_example_form(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(
        """
seed: 0
device: auto
data: {name: digits, split: test, n: 300}
models:
  - digits-cnn
  - {name: mine, file: path/to/model.pt2}
threats:
  - {norm: linf, eps: [0.05, 0.1, 0.2]}
attacks:
  - fgsm
  - {name: pgd, steps: 40, step_size: 0.01, restarts: 1}
"""
    )
    c = load_config(p)
    assert c.models[1].source == "file" and c.models[0].source == "registry"
    assert c.attacks[1].params == {"steps": 40, "step_size": 0.01, "restarts": 1}
    assert c.data.n == 300


def test_fraction_eps_and_hash_stability():
    a = parse_config(_cfg(threats=[{"norm": "linf", "eps": ["8/255", 0.1]}]))
    assert a.threat_models()[0].eps == pytest.approx(8 / 255)
    assert a.hash() == parse_config(_cfg(threats=[{"norm": "linf", "eps": ["8/255", 0.1]}])).hash()
    assert a.hash() != parse_config(_cfg(threats=[{"norm": "linf", "eps": ["8/255", 0.2]}])).hash()


@pytest.mark.parametrize(
    "over, fragment",
    [
        ({"attacks": ["fgsmm"]}, "unknown attack 'fgsmm'; did you mean 'fgsm'"),
        ({"models": ["digits-mpl"]}, "unknown model 'digits-mpl'; did you mean"),
        ({"threats": [{"norm": "linf", "eps": [-1]}]}, "eps must be finite and >= 0"),
        ({"threats": [{"norm": "linf", "eps": ["abc"]}]}, "eps must be a number or a fraction"),
        ({"threats": [{"norm": "l7", "eps": [1]}]}, "unknown norm 'l7'; allowed"),
        ({"threats": [{"norm": "l2", "eps": [1.0]}], "attacks": ["bim"]}, "does not support norm 'l2'; allowed: linf"),
        ({"attacks": [{"name": "pgd", "stepz": 3}]}, "unknown parameter(s) stepz; allowed"),
        ({"device": "tpu"}, "device must be auto, cpu"),
        ({"colour": "red"}, "colour: unknown field"),
        ({"models": []}, "models: List should have at least 1 item"),
        ({"data": {"name": "digits", "path": "x.npz"}}, "exactly one of 'name'"),
        ({"data": {"name": "digits", "n": 0}}, "data.n: Input should be greater than or equal to 1"),
        ({"defenses": ["jpegg"]}, "unknown defense 'jpegg'"),
    ],
)
def test_bad_configs_give_one_line_errors(over, fragment):
    with pytest.raises(AdvbenchError) as err:
        parse_config(_cfg(**over))
    msg = str(err.value)
    assert fragment in msg, msg
    assert "\n" not in msg


def test_attack_norms_filter_allows_mixed_threats():
    c = parse_config(
        _cfg(
            threats=[{"norm": "linf", "eps": [0.1]}, {"norm": "l2", "eps": [0.5]}],
            attacks=[{"name": "bim", "norms": ["linf"]}, "pgd"],
        )
    )
    assert len(c.threat_models()) == 2


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [a\nthreats: {")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(bad)


def test_same_attack_twice_gets_distinct_labels():
    c = parse_config(_cfg(attacks=[{"name": "pgd", "steps": 5}, {"name": "pgd", "steps": 5, "loss": "margin"}, "fgsm"]))
    assert c.attack_labels() == ["pgd(steps=5)", "pgd(loss=margin,steps=5)", "fgsm"]
    c = parse_config(_cfg(attacks=[{"name": "pgd", "label": "pgd-ce"}, {"name": "pgd", "loss": "margin", "label": "pgd-cw"}]))
    assert c.attack_labels() == ["pgd-ce", "pgd-cw"]
    with pytest.raises(ConfigError, match="attack names must be unique.*distinct 'label'"):
        parse_config(_cfg(attacks=["pgd", "pgd"]))


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    """The example configs in configs/ parse and name only registered things (nothing runs)."""
    if path.name == "blindspots.yaml":
        from advbench.blindspots.config import load_blindspot_config

        assert load_blindspot_config(path).sources > 0
    elif path.name.startswith("curvature-"):
        from advbench.curvature import load_curvature_config

        config = load_curvature_config(path)
        assert config.detector is not None and config.data.n
    elif path.name.startswith("train-"):
        from advbench.training import load_train_config

        assert load_train_config(path).epochs >= 1
    else:
        assert load_config(path).attacks


def test_attack_knowledge_filter_runs_attacks_only_under_those_threats():
    """White-box and transfer attacks in one config: each entry lists the knowledge it runs under."""
    from advbench.config import attack_threats

    threats = [{"norm": "linf", "eps": [0.1]}, {"norm": "linf", "eps": [0.1], "knowledge": "transfer"}]
    with pytest.raises(ConfigError, match="knowledge: \\[...\\]"):
        parse_config(_cfg(threats=threats, attacks=["fgsm"]))
    c = parse_config(_cfg(threats=threats, attacks=[
        {"name": "fgsm", "knowledge": ["white_box"]},
        {"name": "transfer", "knowledge": ["transfer"], "source": {"name": "digits-mlp"}},
    ]))
    assert [t.knowledge.value for t in attack_threats(c, c.attacks[0])] == ["white_box"]
    assert [t.knowledge.value for t in attack_threats(c, c.attacks[1])] == ["transfer"]
    assert c.attacks[1].params == {"source": {"name": "digits-mlp"}}
    with pytest.raises(ConfigError, match="unknown knowledge 'whitebox'"):
        parse_config(_cfg(attacks=[{"name": "fgsm", "knowledge": ["whitebox"]}]))


def test_matrix_keeps_threats_that_differ_only_in_knowledge_apart():
    import pandas as pd

    from advbench.eval.tables import robust_accuracy_matrix

    rows = [("fgsm", "white_box", 0.8), ("transfer", "transfer", 0.9), ("worst-case", "white_box", 0.8),
            ("worst-case", "transfer", 0.9)]
    table = pd.DataFrame([{"model": "m", "defense": "none", "attack": a, "norm": "linf", "eps": 0.1,
                           "targeting": "untargeted", "knowledge": k, "clean_accuracy": 1.0, "robust_accuracy": r}
                          for a, k, r in rows])
    m = robust_accuracy_matrix(table)
    assert list(m.columns) == ["clean", "linf 0.1", "linf 0.1 transfer"]
    assert m.loc[("m", "none", "worst-case"), "linf 0.1"] == 80.0
    assert m.loc[("m", "none", "worst-case"), "linf 0.1 transfer"] == 90.0
