"""Writing files so that a crash never leaves a half-written one, and locking across processes.

Every result, card, checkpoint and picture advbench writes goes through :func:`atomic_write`:
written to a unique temporary file in the same folder, flushed to disk, then renamed over the
target (``os.replace`` is atomic), so a reader or a resumed run sees the old file or the new
one, never a torn one, even after ``kill -9``.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from advbench.errors import ConfigError

#: the temporary files :func:`atomic_write` makes: ``.<name>.<pid>.<8 hex>.tmp``
_TEMP = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}\.tmp$")


def temp_path(path: Path) -> Path:
    """A unique temporary name beside ``path`` that :func:`remove_stale_temps` recognizes."""
    return path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # someone else's process (or unknowable): leave its file alone
    return True


def remove_stale_temps(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files a killed process left in ``folder`` (those of live processes
    stay); returns what was removed. Every atomic write runs it first, so no folder advbench
    writes to keeps the litter of an earlier crash."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP.match(entry.name)
        if m and not _alive(int(m.group(1))):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write`` on a binary file that replaces ``path`` only once it is complete."""
    path = Path(path)
    remove_stale_temps(path.parent)
    # a unique name in the same folder (so os.replace is atomic); opened with open(), not
    # mkstemp, so the file gets the usual umask permissions and a shared cache stays readable
    tmp = temp_path(path)
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


def write_npz_rows(path: str | os.PathLike[str], parts: Iterable[dict[str, np.ndarray]], rows: int) -> None:
    """Write the row-wise concatenation of ``parts`` (mappings of arrays that share their first
    axis, the same names in each) as a compressed ``.npz`` at ``path``, holding one part in memory
    at a time: each array is streamed into its own ``.npy`` beside the target (its header written
    for ``rows`` rows up front), then the zip is assembled from those files, atomically."""
    path = Path(path)
    files: dict[str, tuple[Path, IO[bytes]]] = {}
    counts: dict[str, int] = {}
    try:
        for part in parts:
            for name, array in part.items():
                array = np.ascontiguousarray(array)
                if name not in files:
                    tmp = temp_path(path.with_name(f"{path.name}.{name}"))
                    f = open(tmp, "xb")
                    files[name] = (tmp, f)
                    header = {"descr": np.lib.format.dtype_to_descr(array.dtype), "fortran_order": False,
                              "shape": (rows, *array.shape[1:])}
                    np.lib.format.write_array_header_2_0(f, header)
                    counts[name] = 0
                files[name][1].write(array.tobytes())
                counts[name] += array.shape[0]
        wrong = {k: v for k, v in counts.items() if v != rows}
        if wrong:
            raise ValueError(f"write_npz_rows: expected {rows} rows, got {wrong}")
        for _, f in files.values():
            f.close()

        def assemble(out: IO[bytes]) -> None:
            with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as z:
                for name, (tmp, _) in files.items():
                    z.write(tmp, arcname=f"{name}.npy")

        atomic_write(path, assemble)
    finally:
        for tmp, f in files.values():
            f.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


#: what a name used as a file or folder name may not hold
_UNSAFE = re.compile(r"[/\\\x00-\x1f\x7f]")


def check_name(name: object, what: str) -> str:
    """``name`` if it can name a file inside a folder (no path separator, NUL or control
    character, not ``.`` or ``..``, at most 200 characters), else a one-line ConfigError.

    Model, defense and attack names become file names (leaderboard entries, saved examples) and a
    trained model's name a folder: validated once where configs are read, they stay inside."""
    if not isinstance(name, str) or not name.strip() or name in (".", "..") or len(name) > 200 \
            or _UNSAFE.search(name) or name != name.strip():
        raise ConfigError(f"{what} {name!r} cannot be used as a name: give 1 to 200 characters without "
                          f"'/', '\\', NUL or control characters, other than '.' and '..', with no surrounding spaces")
    return name
