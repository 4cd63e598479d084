"""Plugin registries for attacks, defenses, models and data sets.

One :class:`Registry` kind serves all four. Entries register with a decorator::

    @ATTACKS.register("fgsm", description="Fast gradient sign method")
    class FGSM(Attack): ...

and are built with ``ATTACKS.create("fgsm", **params)``. A second registration under a name
already taken is an error. Third-party packages add entries through the entry-point groups
``advbench.attacks``, ``advbench.defenses``, ``advbench.models`` and ``advbench.datasets``;
they are loaded lazily, on the first lookup, unless the environment variable
``ADVBENCH_DISABLE_PLUGIN_AUTOLOAD`` is set to a non-empty value other than ``0``. A plugin
that fails to import is recorded (``registry.plugin_errors``), warned about by name, and does
not stop the others from loading.

An entry point may name a module (importing it runs its ``@register`` decorators) or an
object (a class or factory), which is registered under the entry point's name if it is not
registered already.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata as importlib_metadata
import inspect
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Generic, TypeVar

from advbench.errors import ConfigError, DuplicateNameError, unknown_name

T = TypeVar("T")

AUTOLOAD_ENV = "ADVBENCH_DISABLE_PLUGIN_AUTOLOAD"


def autoload_disabled() -> bool:
    return os.environ.get(AUTOLOAD_ENV, "") not in ("", "0")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    factory: Callable[..., T]
    description: str
    source: str  # "builtin" or "plugin:<distribution or entry point>"


class Registry(Generic[T]):
    """Name -> factory map with glob listing, close-match errors and entry-point plugins."""

    def __init__(self, kind: str, group: str) -> None:
        self.kind = kind  # singular noun used in messages: "attack", "model", ...
        self.group = group  # entry-point group
        self._entries: dict[str, Entry[T]] = {}
        self._plugins_loaded = False
        self.plugin_errors: dict[str, str] = {}
        self._loading_source = "builtin"

    # ------------------------------------------------------------------ registration
    def register(
        self, name: str | None = None, *, description: str | None = None
    ) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator registering a class or factory under ``name`` (default: its ``name`` attribute)."""

        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            self.add(name or getattr(factory, "name", None) or factory.__name__, factory, description=description)
            return factory

        return decorator

    def add(self, name: str, factory: Callable[..., T], *, description: str | None = None) -> None:
        if not isinstance(name, str) or not name or name != name.strip():
            raise ConfigError(f"a {self.kind} name must be a non-empty string without surrounding spaces, got {name!r}")
        if name in self._entries:
            old = self._entries[name]
            raise DuplicateNameError(
                f"{self.kind} {name!r} is already registered (by {old.source}: {_qualname(old.factory)}); "
                f"choose another name"
            )
        if description is None:
            doc = inspect.getdoc(factory) or ""
            description = doc.strip().splitlines()[0] if doc.strip() else ""
        if inspect.isclass(factory) and getattr(factory, "name", None) != name:
            try:
                factory.name = name  # type: ignore[attr-defined]
            except (AttributeError, TypeError):
                pass
        self._entries[name] = Entry(name, factory, description, self._loading_source)

    def unregister(self, name: str) -> None:
        """Remove an entry (for tests and interactive use)."""
        self._entries.pop(name, None)

    # ------------------------------------------------------------------ lookup
    def __contains__(self, name: object) -> bool:
        self._ensure_plugins()
        return name in self._entries

    def get(self, name: str) -> Entry[T]:
        self._ensure_plugins()
        if not isinstance(name, str):
            raise ConfigError(f"a {self.kind} name must be a string, got {name!r}")
        try:
            return self._entries[name]
        except KeyError:
            raise unknown_name(self.kind, name, self._entries) from None

    def create(self, name: str, **params: Any) -> T:
        """Build the entry ``name`` with ``params``; a bad parameter is a :class:`ConfigError`."""
        entry = self.get(name)
        _check_params(self.kind, name, entry.factory, params)
        return entry.factory(**params)

    def list(self, pattern: str = "*") -> list[str]:
        """Sorted names matching a shell-style glob pattern."""
        self._ensure_plugins()
        return sorted(n for n in self._entries if fnmatch.fnmatchcase(n, pattern))

    def entries(self, pattern: str = "*") -> list[Entry[T]]:
        return [self._entries[n] for n in self.list(pattern)]

    # ------------------------------------------------------------------ plugins
    def _ensure_plugins(self) -> None:
        if self._plugins_loaded:
            return
        # the built-ins are registered already: importing any advbench module runs the package's
        # __init__, which imports them, before a registry can be looked up
        self._plugins_loaded = True
        if autoload_disabled():
            return
        self.load_plugins()

    def load_plugins(self) -> None:
        """Load every entry point of this registry's group; failures are recorded, not raised."""
        for ep in _entry_points(self.group):
            label = f"{ep.name} ({ep.value})"
            previous = self._loading_source
            self._loading_source = f"plugin:{ep.name}"
            try:
                obj = ep.load()
                if not isinstance(obj, ModuleType) and ep.name not in self._entries:
                    if not callable(obj):
                        raise TypeError(f"entry point object {obj!r} is neither a module nor callable")
                    self.add(ep.name, obj)
            except Exception as exc:  # noqa: BLE001 - a broken plugin must not break the others
                self.plugin_errors[ep.name] = f"{type(exc).__name__}: {exc}"
                warnings.warn(
                    f"advbench: {self.kind} plugin {label} failed to load and was skipped: "
                    f"{type(exc).__name__}: {exc}",
                    RuntimeWarning,
                    stacklevel=2,
                )
            finally:
                self._loading_source = previous


def _entry_points(group: str) -> list[importlib_metadata.EntryPoint]:
    return list(importlib_metadata.entry_points(group=group))


def _qualname(obj: object) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _check_params(kind: str, name: str, factory: Callable[..., Any], params: dict[str, Any]) -> None:
    """Reject unknown keyword arguments with the list of accepted ones, before calling (the same
    one line a plugin's ``Params`` class gives; its signature lists the Params fields)."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return
    ps = sig.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in ps):
        return
    accepted = [p.name for p in ps if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ConfigError(
            f"{kind} {name!r}: unknown parameter(s) {', '.join(unknown)}; "
            f"allowed: {', '.join(accepted) if accepted else 'none'}"
        )


ATTACKS: Registry[Any] = Registry("attack", "advbench.attacks")
DEFENSES: Registry[Any] = Registry("defense", "advbench.defenses")
MODELS: Registry[Any] = Registry("model", "advbench.models")
DATASETS: Registry[Any] = Registry("dataset", "advbench.datasets")
#: level-set traversals (blind-spot analyses): they map a (source, target) image pair to an image
#: the model still gives the source class, so they are not attacks with a threat model
TRAVERSALS: Registry[Any] = Registry("traversal", "advbench.traversals")
#: training recipes (advbench.training.recipes): what one training batch costs the model
RECIPES: Registry[Any] = Registry("recipe", "advbench.recipes")
#: image transformations T(x) of the destruction rate (Kurakin et al. 2016): JPEG, blur, noise, ...
#: (advbench.analysis.transformations); not defenses, they are applied to stored adversarial examples
TRANSFORMATIONS: Registry[Any] = Registry("transformation", "advbench.transformations")

REGISTRIES: dict[str, Registry[Any]] = {
    "attacks": ATTACKS,
    "defenses": DEFENSES,
    "models": MODELS,
    "datasets": DATASETS,
    "traversals": TRAVERSALS,
    "recipes": RECIPES,
    "transformations": TRANSFORMATIONS,
}
