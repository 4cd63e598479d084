"""Scaling out: one grid of jobs in this process, on a Ray cluster of 1 worker and of 2 workers.

The grid (:func:`grid`): the MNIST reference CNN on the 2,000 MNIST ``test-eval`` images in
shards of 250, FGSM, BIM-20 and PGD-40 at three L-inf budgets, plus the gradient-masking probe:
8 shards x 3 attacks x 3 eps = 72 jobs and the probe. Each condition is a fresh ``advbench evaluate`` process into a
fresh folder, one thread per job (``--threads 1`` in process; a Ray worker has one CPU):

- ``inprocess``: the default executor;
- ``ray-1`` / ``ray-2``: ``--executor ray --workers N``, a local Ray cluster started by the run.

Conditions are interleaved round by round (order rotating). The table gives each condition's
median wall time over rounds (the whole process: imports, planning, Ray's start-up), the median
time of its job phase (run.json ``jobs.seconds``: first job dispatched to last record stored),
and the speed-ups of ``ray-2`` over ``ray-1`` and over ``inprocess``; every run's results.csv
(less the seconds column) must equal the in-process run's byte for byte, or the script fails.

    python benchmarks/scale.py                # 2 rounds, ~8 min on 2 cores
    python benchmarks/scale.py --rounds 1 --n 1000 --out -
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from _common import publish  # benchmarks/ is on sys.path when a script runs

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "scale.md"
SHARED = HERE.parent.parent / "shared" / "data"


def grid(n: int) -> dict:
    """The benchmark's config over ``n`` MNIST test images."""
    return {
        "seed": 0, "device": "cpu",
        "data": {"name": "mnist", "split": "test-eval", "n": n, "root": str(SHARED)},
        "models": ["mnist-cnn"],
        "threats": [{"norm": "linf", "eps": [0.1, 0.2, 0.3]}],
        "attacks": ["fgsm", {"name": "bim", "steps": 20}, {"name": "pgd", "steps": 40}],
        "batch_size": 250,
    }


CONDITIONS = {
    "inprocess": ["--threads", "1"],
    "ray-1": ["--executor", "ray", "--workers", "1"],
    "ray-2": ["--executor", "ray", "--workers", "2"],
}


def without_seconds(path: Path) -> str:
    rows = list(csv.reader(io.StringIO(path.read_text())))
    col = rows[0].index("seconds")
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([r[:col] + r[col + 1 :] for r in rows])
    return buf.getvalue()


def run(config: Path, out: Path, extra: list[str]) -> tuple[float, dict]:
    """One fresh ``advbench evaluate`` process: its wall time and run.json."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)  # each Ray condition starts its own local cluster
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "advbench.cli", "evaluate", str(config), "--out", str(out), "--quiet",
                           *extra], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"advbench evaluate {' '.join(extra)} failed:\n{proc.stderr[-2000:]}")
    return wall, json.loads((out / "run.json").read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--n", type=int, default=2000, help="MNIST test-eval images (shards of 250; at most 2000)")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="report file ('-': print only)")
    args = ap.parse_args(argv)

    walls: dict[str, list[float]] = {c: [] for c in CONDITIONS}
    phases: dict[str, list[float]] = {c: [] for c in CONDITIONS}
    jobs = 0
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "grid.yaml"
        config.write_text(yaml.safe_dump(grid(args.n)))
        reference: str | None = None
        names = list(CONDITIONS)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                out = Path(tmp) / f"{name}-{r}"
                wall, info = run(config, out, CONDITIONS[name])
                table = without_seconds(out / "results.csv")
                if name == "inprocess" and reference is None:
                    reference = table
                walls[name].append(wall)
                phases[name].append(info["jobs"]["seconds"])
                jobs = info["jobs"]["total"]
                print(f"round {r + 1} {name}: {wall:.1f} s (jobs {info['jobs']['seconds']:.1f} s)", file=sys.stderr)
                if name != "inprocess" and reference is not None and table != reference:
                    sys.exit(f"{name}'s results.csv differs from the in-process run's")
        # runs before the first in-process one are checked against it now
        for name in names:
            for r in range(args.rounds):
                if without_seconds(Path(tmp) / f"{name}-{r}" / "results.csv") != reference:
                    sys.exit(f"{name} round {r + 1}: results.csv differs from the in-process run's")

    med = {c: statistics.median(v) for c, v in walls.items()}
    ph = {c: statistics.median(v) for c, v in phases.items()}
    lines = [
        "# Scaling out: in process, Ray with 1 worker, Ray with 2 workers",
        "",
        f"`python benchmarks/scale.py --rounds {args.rounds} --n {args.n}` on {platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}: {jobs} jobs (mnist-cnn, {args.n} MNIST "
        f"test images in shards of 250, FGSM, BIM-20, PGD-40 at linf 0.1/0.2/0.3, and the masking probe), "
        f"one thread per job, median of {args.rounds} interleaved rounds, each a fresh process.",
        "",
        "| condition | wall time (s) | job phase (s) | wall vs ray-1 | job phase vs ray-1 |",
        "|---|---:|---:|---:|---:|",
    ]
    for c in CONDITIONS:
        lines.append(f"| {c} | {med[c]:.1f} | {ph[c]:.1f} | {med['ray-1'] / med[c]:.2f}x | {ph['ray-1'] / ph[c]:.2f}x |")
    lines += [
        "",
        f"2 workers over 1: **{med['ray-1'] / med['ray-2']:.2f}x** wall, **{ph['ray-1'] / ph['ray-2']:.2f}x** job phase "
        f"(target >= 1.7x); over in-process: {med['inprocess'] / med['ray-2']:.2f}x wall, "
        f"{ph['inprocess'] / ph['ray-2']:.2f}x job phase.",
        "Every run's results.csv (less the seconds column) is byte-identical to the in-process run's.",
        "Wall time includes the process's start, planning (which loads the model and data in the driver) "
        "and, for Ray, starting a local cluster and its workers (a few seconds); the job phase runs from "
        "the first job dispatched to the last record stored.",
        "",
    ]
    publish("\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
