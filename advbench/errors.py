"""Exceptions advbench raises for bad input.

Every error a user can cause derives from :class:`AdvbenchError`; the command line prints
its message as one ``error: ...`` line and exits with code 2, never a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class AdvbenchError(Exception):
    """Base class: a problem with the user's input, config, files or models."""


class ConfigError(AdvbenchError, ValueError):
    """A config value is missing, of the wrong type, or out of range."""


class UnknownNameError(AdvbenchError, KeyError):
    """A registry lookup found no entry of that name."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


def unknown_name(what: str, name: str, names: Iterable[str]) -> UnknownNameError:
    """The error for a name that is not among ``names``: close matches first, then every name."""
    names = sorted(names)
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return UnknownNameError(f"unknown {what} {name!r}{hint} (available: {', '.join(names) if names else 'none'})")


class DuplicateNameError(AdvbenchError, ValueError):
    """A second registration tried to take a name already in use."""


class UnsupportedThreatError(AdvbenchError, ValueError):
    """An attack was asked to run under a norm, targeting or knowledge it does not support."""


class ModelOutputError(AdvbenchError, ValueError):
    """A model returned something that is not a finite batch of logits."""


class DataError(AdvbenchError, ValueError):
    """A data set is missing, unreadable or malformed."""


class QueryBudgetExceeded(AdvbenchError, RuntimeError):
    """A score- or decision-based attack asked for more queries than its threat model allows.

    An attack that catches it may re-raise it with ``best`` set to its best inputs so far; the
    attack base class then audits and keeps those instead of discarding the attack's progress.
    """

    def __init__(self, message: str, best: object = None) -> None:
        super().__init__(message)
        self.best = best
