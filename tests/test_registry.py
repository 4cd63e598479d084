"""The plugin registry: decorator, create, glob listing, duplicates, close matches, entry points."""

from __future__ import annotations

import sys
import textwrap
import warnings

import pytest

from advbench.errors import ConfigError, DuplicateNameError, UnknownNameError
from advbench.registry import ATTACKS, Registry


def _fresh() -> Registry:
    return Registry("widget", "advbench.test-widgets")


def test_register_create_list():
    reg = _fresh()

    @reg.register("alpha-one", description="first")
    class A:
        def __init__(self, *, k: int = 1):
            self.k = k

    @reg.register()
    def beta(*, scale: float = 2.0):
        """Beta factory. More text."""
        return scale

    assert reg.create("alpha-one", k=3).k == 3
    assert reg.create("beta") == 2.0
    assert reg.list() == ["alpha-one", "beta"]
    assert reg.list("alpha*") == ["alpha-one"]
    assert reg.get("beta").description == "Beta factory. More text."
    assert A.name == "alpha-one"


def test_duplicate_is_an_error_not_an_overwrite():
    reg = _fresh()
    reg.add("x", lambda: 1)
    with pytest.raises(DuplicateNameError, match="already registered"):
        reg.add("x", lambda: 2)
    assert reg.create("x") == 1


def test_unknown_name_suggests_close_matches():
    with pytest.raises(UnknownNameError, match=r"did you mean 'pgd'"):
        ATTACKS.get("pgdd")


def test_unknown_parameter_lists_allowed():
    reg = _fresh()
    reg.add("w", lambda *, size=1, depth=2: size)
    with pytest.raises(ConfigError, match="unknown parameter.*colour.*allowed: size, depth"):
        reg.create("w", colour="red")


def _install_fake_distribution(tmp_path, monkeypatch, entry_points: str, modules: dict[str, str]) -> None:
    """A real installed distribution: a .dist-info with entry_points.txt on sys.path."""
    dist = tmp_path / "fakeplugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fakeplugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    for name, src in modules.items():
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(src))
    monkeypatch.syspath_prepend(str(tmp_path))


def test_entry_point_plugins_load_lazily_and_failures_are_isolated(tmp_path, monkeypatch):
    _install_fake_distribution(
        tmp_path,
        monkeypatch,
        """
        [advbench.test-widgets]
        good = fake_good_plugin:GoodWidget
        viamodule = fake_module_plugin
        broken = fake_broken_plugin:Nope
        """,
        {
            "fake_good_plugin": """
                class GoodWidget:
                    '''A widget from a plugin.'''
            """,
            "fake_module_plugin": """
                from advbench.registry import Registry
                import advbench.registry as r
                r._TEST_TARGET.add("from-module", lambda: "m")
            """,
            "fake_broken_plugin": "raise ImportError('missing dependency foo')\n",
        },
    )
    reg = _fresh()
    import advbench.registry as r

    monkeypatch.setattr(r, "_TEST_TARGET", reg, raising=False)
    monkeypatch.delenv("ADVBENCH_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    assert not reg._plugins_loaded
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names = reg.list()
    assert names == ["from-module", "good"]
    assert reg.get("good").source == "plugin:good"
    assert "broken" in reg.plugin_errors and "missing dependency foo" in reg.plugin_errors["broken"]
    assert any("broken" in str(w.message) and "failed to load" in str(w.message) for w in caught)
    for mod in ("fake_good_plugin", "fake_module_plugin", "fake_broken_plugin"):
        sys.modules.pop(mod, None)


def test_autoload_can_be_disabled(tmp_path, monkeypatch):
    _install_fake_distribution(
        tmp_path, monkeypatch, "[advbench.test-widgets]\ngood2 = fake_good2:W\n", {"fake_good2": "class W: pass\n"}
    )
    monkeypatch.setenv("ADVBENCH_DISABLE_PLUGIN_AUTOLOAD", "1")
    reg = _fresh()
    assert reg.list() == []
    reg.load_plugins()  # explicit loading still works
    assert reg.list() == ["good2"]
    sys.modules.pop("fake_good2", None)
