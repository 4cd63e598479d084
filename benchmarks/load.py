"""The embedded default under load: advbench's per-job thread choice beside a competing job.

Runs ``advbench evaluate`` (the embedded default: two digits models, four attacks, three eps,
the gradient-masking checks) as a fresh process into a fresh folder, in four conditions:

- ``quiet``: nothing else running;
- ``loaded``: beside one competing job, a process doing 1500x1500 float32 matrix products on
  two threads (what a second benchmark or a test run does to a 2-core machine);

each with advbench's automatic choice (``auto``: one thread for small jobs, see
``advbench/eval/threads.py``) and with two threads forced (``--threads 2``, what every job used
before). A second table times one forward and backward pass of each reference model at two batch
sizes with one and two threads, quiet and loaded, each in a fresh process: the measurements the
automatic choice's threshold comes from. Conditions are interleaved: each round runs every (load, threads) pair once, in an
order rotating from round to round; the load process is started before and stopped after each
loaded run. The table gives each condition's median wall time over rounds and the median ratio
to the quiet ``auto`` run of the same round; every run's results.csv (less the seconds column)
must equal the first's, or the script fails.

    python benchmarks/load.py                 # 3 rounds
    python benchmarks/load.py --rounds 1 --out -
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from _common import publish  # benchmarks/ is on sys.path when a script runs

from advbench.eval.threads import SMALL_FLOPS, choose

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "load.md"
LOAD = """
import time, torch
torch.set_num_threads(2)
a = torch.rand(1500, 1500)
while True:
    a @ a
"""


PASSES = """
import sys, time, torch
from advbench.attacks.losses import input_gradient, objective
from advbench.eval.threads import forward_flops
from advbench.registry import MODELS
name, shape, batch, threads = sys.argv[1], tuple(map(int, sys.argv[2].split("x"))), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
model = MODELS.create(name, **({"root": sys.argv[5]} if len(sys.argv) > 5 else {}))
x, y = torch.rand(batch, *shape, generator=torch.Generator().manual_seed(0)), torch.zeros(batch, dtype=torch.long)
for _ in range(3):
    input_gradient(model, x, objective("ce", y, None))
start, k = time.perf_counter(), 0
while time.perf_counter() - start < 1.5:
    input_gradient(model, x, objective("ce", y, None))
    k += 1
print(forward_flops(model, x[:1]) * batch, (time.perf_counter() - start) / k)
"""
MODELS = [("digits-mlp", "1x8x8"), ("digits-cnn", "1x8x8"), ("mnist-cnn", "1x28x28"), ("cifar10-cnn", "3x32x32")]


def pass_times(env: dict[str, str], loaded: bool) -> dict[tuple[str, int, int], tuple[float, float]]:
    """(model, batch, threads) -> (FLOPs of the batch's forward pass, seconds of one forward and
    backward pass w.r.t. the input), each measured in a fresh process, quiet or beside the load."""
    out = {}
    shared = str((HERE / ".." / ".." / "shared" / "data").resolve())
    for name, shape in MODELS:
        for batch in (100, 500):
            for threads in (1, 2):
                competitor = subprocess.Popen([sys.executable, "-c", LOAD]) if loaded else None
                try:
                    if competitor is not None:
                        time.sleep(1.0)
                    extra = [shared] if name == "mnist-cnn" else []
                    r = subprocess.run([sys.executable, "-c", PASSES, name, shape, str(batch), str(threads), *extra],
                                       env=env, capture_output=True, text=True, check=True)
                finally:
                    if competitor is not None:
                        competitor.kill()
                        competitor.wait()
                flops, seconds = map(float, r.stdout.split())
                out[(name, batch, threads)] = (flops, seconds)
    return out


def run_default(out: Path, threads: int | None, env: dict[str, str]) -> float:
    cmd = [sys.executable, "-m", "advbench.cli", "evaluate", "--out", str(out), "--quiet"]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    return time.perf_counter() - start


def table_of(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "results.csv").drop(columns=["seconds"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    args = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    conditions = [("quiet", None), ("quiet", 2), ("loaded", None), ("loaded", 2)]
    times: dict[tuple[str, int | None], list[float]] = {c: [] for c in conditions}
    ratios: dict[tuple[str, int | None], list[float]] = {c: [] for c in conditions}
    reference = None
    with tempfile.TemporaryDirectory(prefix="advbench-load-") as tmp:
        env["ADVBENCH_CACHE"] = str(Path(tmp) / "cache")
        for r in range(args.rounds):
            order = conditions[r % len(conditions):] + conditions[: r % len(conditions)]
            this_round = {}
            for load, threads in order:
                out = Path(tmp) / f"run-{r}-{load}-{threads}"
                competitor = subprocess.Popen([sys.executable, "-c", LOAD]) if load == "loaded" else None
                try:
                    if competitor is not None:
                        time.sleep(1.0)  # let it spin up
                    seconds = run_default(out, threads, env)
                finally:
                    if competitor is not None:
                        competitor.kill()
                        competitor.wait()
                table = table_of(out)
                if reference is None:
                    reference = table
                pd.testing.assert_frame_equal(table, reference)  # same numbers in every condition
                this_round[(load, threads)] = seconds
                times[(load, threads)].append(seconds)
                print(f"round {r + 1} {load:6s} threads={threads or 'auto'}: {seconds:.1f} s", file=sys.stderr)
            for c in conditions:
                ratios[c].append(this_round[c] / this_round[("quiet", None)])

    lines = [
        "# The embedded default under load",
        "",
        "`advbench evaluate` (the embedded default: digits-mlp and digits-cnn, fgsm/bim/illc/pgd at three",
        "L-inf eps, gradient-masking checks) as a fresh process, quiet and beside one competing 2-thread",
        "matrix-product job, with advbench's per-job thread choice (`auto`) and with two threads forced.",
        f"{args.rounds} interleaved rounds; medians. Every run's results.csv (less `seconds`) is identical.",
        "",
        "| condition | threads | median s | min s | max s | median ratio to quiet auto |",
        "|---|---|---|---|---|---|",
    ]
    for load, threads in conditions:
        t = times[(load, threads)]
        lines.append(f"| {load} | {threads or 'auto (1 per small job)'} | {statistics.median(t):.1f} | {min(t):.1f} | "
                     f"{max(t):.1f} | {statistics.median(ratios[(load, threads)]):.2f} |")
    passes = {load: pass_times(env, load == "loaded") for load in ("quiet", "loaded")}
    lines += [
        "",
        "## One forward and backward pass w.r.t. the input, 1 vs 2 threads",
        "",
        "Each figure measured in a fresh process (quiet, or beside the same competing job); the last",
        "column is what advbench's automatic choice picks (one thread below "
        f"{SMALL_FLOPS:.0e} FLOPs per forward pass of the job's examples).",
        "",
        "| model | batch | forward GFLOP | quiet 1 thread ms | quiet 2 threads ms | loaded 1 thread ms | "
        "loaded 2 threads ms | auto picks |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, _ in MODELS:
        for batch in (100, 500):
            flops = passes["quiet"][(name, batch, 1)][0]
            ms = [1e3 * passes[load][(name, batch, t)][1] for load in ("quiet", "loaded") for t in (1, 2)]
            lines.append(f"| {name} | {batch} | {flops / 1e9:.3f} | " + " | ".join(f"{v:.2f}" for v in ms)
                         + f" | {choose(flops / batch, batch, 2)} |")
    lines += [
        "",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}.",
        f"Command: `python benchmarks/{Path(__file__).name} {shlex.join(sys.argv[1:])}`".rstrip() + "",
        "",
    ]
    publish("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
