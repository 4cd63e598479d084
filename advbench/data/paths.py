"""Where advbench looks for data sets and keeps its caches.

* ``ADVBENCH_CACHE``: the cache folder (decoded data, downloaded weights). Default
  ``$XDG_CACHE_HOME/advbench``, or ``~/.cache/advbench`` when XDG_CACHE_HOME is unset.
* ``ADVBENCH_DATA``: the data root loaders search when no ``root`` is given. Default
  ``$ADVBENCH_CACHE/data``.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "ADVBENCH_DATA"
CACHE_ENV = "ADVBENCH_CACHE"


def cache_dir() -> Path:
    """The advbench cache folder (``ADVBENCH_CACHE``, else ``$XDG_CACHE_HOME/advbench``). Not created
    here: whoever writes into it creates what it needs, so a run that fails early leaves nothing."""
    env = os.environ.get(CACHE_ENV)
    if env:
        path = Path(env).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        path = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "advbench"
    return path


def data_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The folder to search for data: ``root`` if given, else ``ADVBENCH_DATA``, else ``cache_dir()/data``."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    return cache_dir() / "data"


def where_hint() -> str:
    """The tail every "data not found" message ends with: how to point advbench at the files."""
    return f"pass root=..., or set {DATA_ENV} (now {os.environ.get(DATA_ENV) or 'unset'})"
