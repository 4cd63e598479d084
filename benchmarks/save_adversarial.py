"""Memory of ``--save-adversarial``: the saved examples are streamed, not gathered per cell.

Runs ``advbench evaluate`` as a fresh process on 8,000 CIFAR-10 test images (``cifar10-cnn``,
FGSM and BIM at two L-inf eps: four cells of 8,000 adversarial images, 98 MB each as float32),
once without and once with ``--save-adversarial``, and reads each process's peak resident
memory (``ru_maxrss`` of the finished child). With streaming, saving adds about one shard's
worth of arrays, not a whole cell (before: every cell concatenated in memory, with its clean
images stored again per job). It also checks the saved files: ``clean.npz`` once, each cell's
``x_adv`` inside its eps-ball around the clean images.

    python benchmarks/save_adversarial.py            # reads CIFAR-10 from ../shared/data
    python benchmarks/save_adversarial.py --n 2000 --out -
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import publish  # benchmarks/ is on sys.path when a script runs

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "save_adversarial.md"
SHARED_DATA = (HERE / ".." / ".." / "shared" / "data").resolve()
CONFIG = """\
seed: 0
device: cpu
data: {{name: cifar10, split: test, n: {n}, root: {root}}}
models: [{{name: cifar10-cnn}}]
threats: [{{norm: linf, eps: ["2/255", "8/255"]}}]
attacks: [fgsm, {{name: bim, steps: 3}}]
masking_checks: false
batch_size: 500
"""


def peak_rss_mb(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(peak resident MB, seconds) of a child process running ``cmd``."""
    start = time.perf_counter()
    code = (f"import resource, subprocess, sys; r = subprocess.run({cmd!r}, capture_output=True, text=True); "
            "sys.stderr.write(r.stderr); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
            "sys.exit(r.returncode)")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"failed: {shlex.join(cmd)}\n{r.stderr}")
    return int(r.stdout.strip().splitlines()[-1]) / 1024, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=8000)
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="advbench-save-") as tmp:
        config = Path(tmp) / "cifar.yaml"
        config.write_text(CONFIG.format(n=args.n, root=SHARED_DATA))
        env = {**os.environ, "ADVBENCH_CACHE": os.environ.get("ADVBENCH_CACHE", str(Path(tmp) / "cache"))}
        base = [sys.executable, "-m", "advbench.cli", "evaluate", str(config), "--quiet"]
        # the first run decodes CIFAR-10's JPEGs into the cache: do it before measuring
        subprocess.run(base + ["--out", str(Path(tmp) / "warm")], env=env, check=True, capture_output=True)
        plain, t_plain = peak_rss_mb(base + ["--out", str(Path(tmp) / "plain")], env)
        saved, t_saved = peak_rss_mb(base + ["--out", str(Path(tmp) / "saved"), "--save-adversarial"], env)
        folder = Path(tmp) / "saved" / "adversarial"
        files = sorted(p.name for p in folder.iterdir())
        with np.load(folder / "clean.npz") as clean:
            x = clean["x"]
            for name in files:
                if name == "clean.npz":
                    continue
                eps = 2 / 255 if "-0.00784" in name else 8 / 255
                with np.load(folder / name) as z:
                    assert z["x_adv"].shape == x.shape and np.array_equal(z["idx"], clean["idx"])
                    assert float(np.abs(z["x_adv"] - x).max()) <= eps + 1e-6, name
        size = sum((folder / f).stat().st_size for f in files) / 2**20
    cell_mb = args.n * 3 * 32 * 32 * 4 / 2**20
    lines = [
        "# Memory of --save-adversarial",
        "",
        f"`advbench evaluate` on {args.n:,} CIFAR-10 test images (cifar10-cnn; fgsm and bim-3 at linf 2/255 and",
        f"8/255: 4 cells of {cell_mb:.0f} MB of float32 adversarial images each), peak resident memory of the process.",
        "",
        "| run | peak RSS (MB) | seconds |",
        "|---|---|---|",
        f"| without --save-adversarial | {plain:.0f} | {t_plain:.1f} |",
        f"| with --save-adversarial | {saved:.0f} | {t_saved:.1f} |",
        f"| difference | {saved - plain:+.0f} | |",
        "",
        f"Saved: {', '.join(files)} ({size:.0f} MB compressed); every cell's x_adv checked inside its ball.",
        "",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}.",
        f"Command: `python benchmarks/{Path(__file__).name} {shlex.join(sys.argv[1:])}`".rstrip(),
        "",
    ]
    publish("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
