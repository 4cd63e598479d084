"""Writing files so that a crash never leaves a half-written one, and locking across processes.

Every result, card, checkpoint and picture advbench writes goes through :func:`atomic_write`:
written to a unique temporary file in the same folder, flushed to disk, then renamed over the
target (``os.replace`` is atomic), so a reader or a resumed run sees the old file or the new
one, never a torn one, even after ``kill -9``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write`` on a binary file that replaces ``path`` only once it is complete."""
    path = Path(path)
    # a unique name in the same folder (so os.replace is atomic); opened with open(), not
    # mkstemp, so the file gets the usual umask permissions and a shared cache stays readable
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """:func:`atomic_write` of UTF-8 text."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


@contextlib.contextmanager
def file_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """An exclusive lock on ``path`` (created if missing) held across processes for the block."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: atomic writes still keep files consistent
        yield
        return
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
