"""The one place that makes robustbench 1.1.1 importable (and safe) in this environment.

Why this module exists
----------------------
robustbench 1.1.1 (the last release on PyPI) cannot be imported as installed from the
registries, for two reasons:

1. It imports ``pkg_resources``, which setuptools removed in version 81. ``pyproject.toml``
   pins ``setuptools<81`` for that reason; :func:`import_robustbench` reports a clear error
   if it is missing anyway.
2. ``robustbench/eval.py`` does ``from autoattack import AutoAttack`` and
   ``from autoattack.state import EvaluationState``. AutoAttack has never been released on
   PyPI under the name ``autoattack``; the registry's package ``pyautoattack`` ships the same
   code as the top-level module ``pyautoattack``. Before importing robustbench we therefore
   alias ``sys.modules["autoattack"]`` (and every submodule of it, e.g. ``autoattack.state``)
   to the ``pyautoattack`` modules. An existing real ``autoattack`` module (a user who
   installed AutoAttack from git) is respected and left alone.

A third adjustment concerns safety rather than importability: robustbench's ``load_model``
calls ``torch.load(path, map_location=...)`` without ``weights_only``. torch >= 2.6 defaults
to ``weights_only=True``, but the environment variable ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``
would switch that back to full unpickling (arbitrary code execution from a checkpoint).
:func:`import_robustbench` replaces the name ``torch`` *inside* ``robustbench.utils`` with a
thin proxy module whose ``load`` always passes ``weights_only=True``; every other attribute
is the real torch. Nothing outside ``robustbench.utils`` is affected.

Everything in advbench that needs robustbench calls :func:`import_robustbench` instead of
``import robustbench``.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
import threading
import warnings
from types import ModuleType
from typing import Any

import torch

from advbench.errors import ConfigError

_LOCK = threading.Lock()
_ALIASED_FROM = "pyautoattack"


def alias_autoattack() -> bool:
    """Make ``import autoattack`` (and ``autoattack.<sub>``) resolve to pyautoattack.

    Returns True if the alias was installed (or already present), False if a genuine
    ``autoattack`` package is importable and was used instead.
    """
    existing = sys.modules.get("autoattack")
    if existing is not None:
        return getattr(existing, "__name__", "") == _ALIASED_FROM
    try:  # a real AutoAttack install (from git) takes precedence
        spec = importlib.util.find_spec("autoattack")
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        return False
    try:
        pkg = importlib.import_module(_ALIASED_FROM)
    except ImportError as exc:
        raise ConfigError(
            "robustbench needs AutoAttack: install the 'pyautoattack' package (pip install pyautoattack)"
        ) from exc
    sys.modules["autoattack"] = pkg
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name in ("fab_tf", "utils_tf", "utils_tf2"):  # TensorFlow variants: not needed, not importable
            continue
        try:
            sub = importlib.import_module(f"{_ALIASED_FROM}.{info.name}")
        except ImportError:
            continue
        sys.modules[f"autoattack.{info.name}"] = sub
    return True


class _WeightsOnlyTorch(ModuleType):
    """``torch`` as seen from robustbench.utils: identical except that ``load`` is weights-only."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.__dict__["_real"] = torch

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def load(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return torch.load(f, *args, **kwargs)


def _harden(utils: ModuleType) -> None:
    if not isinstance(getattr(utils, "torch", None), _WeightsOnlyTorch):
        utils.torch = _WeightsOnlyTorch()  # type: ignore[attr-defined]


def import_robustbench() -> ModuleType:
    """Import and return the ``robustbench`` module, applying the fixes described above.

    Also imports ``robustbench.utils`` (``load_model``) and makes its checkpoint loads
    weights-only. Raises :class:`~advbench.errors.ConfigError` with a one-line fix if
    robustbench or one of its requirements is missing.
    """
    with _LOCK:
        alias_autoattack()
        # robustbench's imports warn (pkg_resources and old timm module paths are deprecated):
        # nothing a user of advbench can act on, so those warnings are silenced here.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", message=".*pkg_resources.*")
            try:
                import pkg_resources  # noqa: F401  (robustbench imports it; fail here with a clear message)
            except ImportError as exc:
                raise ConfigError(
                    "robustbench 1.1.1 needs pkg_resources, removed in setuptools 81: pip install 'setuptools<81'"
                ) from exc
            try:
                import robustbench
                import robustbench.utils
            except ImportError as exc:
                raise ConfigError(f"could not import robustbench ({exc}); pip install robustbench==1.1.1") from exc
        _harden(robustbench.utils)
        return robustbench


__all__ = ["alias_autoattack", "import_robustbench"]
