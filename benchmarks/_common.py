"""What every benchmark script does the same way: print its report and write it under results/."""

from __future__ import annotations

import os
import sys


def publish(text: str, out: str) -> None:
    """Print the report and write it to ``out`` (creating its folder); ``out == "-"`` writes nothing."""
    print(text)
    if out == "-":
        return
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as fh:
        fh.write(text)
    print(f"wrote {out}", file=sys.stderr)
