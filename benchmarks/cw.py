"""Carlini-Wagner L2 side by side: advbench, foolbox 3.3.4 and torchattacks 3.5.1.

On the same model and correctly classified images, each attack runs with the same Adam step
size (1e-2), iterations per problem (``steps``), initial c (1e-3) and early abort; foolbox and
advbench with the same number of binary-search steps. torchattacks' CW has no search over c:
it runs once per value of c on the grid 1e-3, 1e-2, ... (as many values as binary-search
steps, so the same budget of problems; the grid is the binary search's x10 phase, without its
bisection), keeping per example the smallest adversarial example over the grid.

Every output is audited here the same way: an example counts as found when the model
misclassifies the returned point; foolbox's all-zero outputs (what it returns where it found
nothing) are reported and not counted, whatever the model says about them. Reported per
attack: wall time (one thread, all runs in one process, interleaved when ``--rounds`` > 1),
passes through the model (forward passes of a batch, and example-passes: the sum of their
batch sizes), the share of images found, the median l2 over each attack's own finds and over
the images both it and advbench found, and the per-image ratio of distances on those.

advbench's linf and l0 attacks (the paper's tau schedule and shrinking pixel set) have no
counterpart in either library; their cost and results are reported alone.

    python benchmarks/cw.py                 # digits-cnn 100 steps x 5, mnist-cnn 1000 steps x 9
    python benchmarks/cw.py --quick --out - # smoke run: few images, short runs, no file
    python benchmarks/cw.py --help
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from _common import publish  # benchmarks/ is on sys.path when a script runs

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "cw.md")
DATA_ROOT = os.environ.get("ADVBENCH_DATA") or os.path.abspath(os.path.join(HERE, "..", "..", "shared", "data"))
MNIST_ROOT = os.path.join(DATA_ROOT, "mnist")


class Counting(nn.Module):
    """Counts forward passes and the examples they carried (backward passes follow forward ones
    one to one in all three attacks)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.passes = 0
        self.rows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.passes += 1
        self.rows += x.shape[0]
        return self.model(x)


@dataclass
class Run:
    label: str
    times: list[float] = field(default_factory=list)
    dist: torch.Tensor | None = None  # (N,) l2 where found, inf elsewhere
    passes: int = 0
    rows: int = 0
    note: str = ""


def load(model_name: str, n: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The zoo model and its first ``n`` correctly classified evaluation images."""
    from advbench.zoo import load_zoo_model
    from advbench.registry import DATASETS

    model = load_zoo_model(model_name, root=DATA_ROOT).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if model_name.startswith("mnist"):
        data = DATASETS.create("mnist", root=MNIST_ROOT, split="test-eval")
    else:
        data = DATASETS.create("digits", split="test")
    with torch.no_grad():
        correct = model(data.x).argmax(dim=1) == data.y
    idx = correct.nonzero().squeeze(1)[:n]
    return model, data.x[idx].clone(), data.y[idx].clone()


@torch.no_grad()
def audited(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(l2 distance where x_adv is finite, in [0, 1] and misclassified, else inf; all-zero mask)."""
    flat = x_adv.flatten(1)
    ok = torch.isfinite(flat).all(dim=1) & (flat >= 0).all(dim=1) & (flat <= 1).all(dim=1)
    ok &= model(torch.nan_to_num(x_adv)).argmax(dim=1) != y
    zero = (flat == 0).all(dim=1)
    d = (x_adv - x).flatten(1).norm(dim=1)
    return torch.where(ok & ~zero, d, torch.full_like(d, math.inf)), ok & zero


def timed(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def l2_runs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, search: int, rounds: int) -> list[Run]:
    import foolbox
    import torchattacks

    from advbench.registry import ATTACKS
    from advbench.threat import ThreatModel

    counting = Counting(model).eval()
    consts = [1e-3 * 10**k for k in range(search)]

    def advbench() -> torch.Tensor:
        res = ATTACKS.create("cw", steps=steps, search_steps=search)(counting, x, y, ThreatModel(norm="l2", eps=1.0))
        return res.x_minimal

    def foolbox_cw() -> torch.Tensor:
        fmodel = foolbox.PyTorchModel(counting, bounds=(0, 1))
        attack = foolbox.attacks.L2CarliniWagnerAttack(binary_search_steps=search, steps=steps, stepsize=1e-2,
                                                       initial_const=1e-3, abort_early=True)
        return attack(fmodel, x, y, epsilons=None)[1]

    def torchattacks_grid() -> torch.Tensor:
        best, best_d = x.clone(), torch.full((len(x),), math.inf)
        for c in consts:
            x_adv = torchattacks.CW(counting, c=c, kappa=0, steps=steps, lr=1e-2)(x, y)
            d, _ = audited(model, x, y, x_adv)
            take = d < best_d
            best[take], best_d[take] = x_adv[take], d[take]
        return best

    fns = {"advbench": advbench, "foolbox": foolbox_cw, "torchattacks": torchattacks_grid}
    runs = {name: Run(name) for name in fns}
    order = list(fns)
    for r in range(rounds):
        for name in order[r % 3:] + order[: r % 3]:
            counting.passes = counting.rows = 0
            x_adv, t = timed(fns[name])
            run = runs[name]
            run.times.append(t)
            run.dist, zero = audited(model, x, y, x_adv)
            run.passes, run.rows = counting.passes, counting.rows
            if name == "foolbox":
                run.note = (f"{int(zero.sum())} all-zero outputs that the model misclassifies "
                            f"(not counted); {int((x_adv.flatten(1) == 0).all(dim=1).sum())} all-zero in all")
            print(f"  {name}: {t:.1f} s", file=sys.stderr, flush=True)
    runs["torchattacks"].label = f"torchattacks CW, c in {{1e-3 .. 1e{search - 4}}} (best per image)"
    runs["foolbox"].label = "foolbox L2CarliniWagnerAttack"
    runs["advbench"].label = "advbench cw"
    return list(runs.values())


def median(v: torch.Tensor) -> float:
    """The median of a 1-D tensor (the mean of the middle two for even sizes); nan when empty."""
    return float(v.double().quantile(0.5)) if v.numel() else math.nan


def l2_table(runs: list[Run], n: int) -> list[str]:
    ours = runs[0]
    t0 = min(ours.times)
    lines = [
        "| attack | time s (min) | time / advbench | passes | example-passes | found | median l2 (own finds) "
        "| median l2, both found: theirs / advbench | per-image l2 ratio theirs / advbench: median (min) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in runs:
        found = torch.isfinite(run.dist)
        both = found & torch.isfinite(ours.dist)
        ratio = run.dist[both] / ours.dist[both]
        lines.append(
            f"| {run.label} | {min(run.times):.1f} | {min(run.times) / t0:.2f} | {run.passes} | {run.rows} "
            f"| {int(found.sum())}/{n} ({found.float().mean():.1%}) | {median(run.dist[found]):.4f} "
            f"| {median(run.dist[both]):.4f} / {median(ours.dist[both]):.4f} ({int(both.sum())} images) "
            f"| {median(ratio):.4f} ({float(ratio.min()) if ratio.numel() else math.nan:.4f}) |"
        )
    notes = [f"- {run.label}: {run.note}" for run in runs if run.note]
    return lines + [""] + notes


def other_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> list[str]:
    """advbench's linf and l0 attacks alone: cost and results."""
    from advbench.registry import ATTACKS
    from advbench.threat import ThreatModel

    lines = ["| attack | time s | passes | example-passes | found | median distance | 90th percentile |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for norm, eps in (("linf", 0.1), ("l0", 10)):
        counting = Counting(model).eval()
        res, t = timed(lambda: ATTACKS.create("cw", steps=steps)(counting, x, y, ThreatModel(norm=norm, eps=eps)))
        d = res.minimal_distances
        found = torch.isfinite(d)
        unit = " pixels" if norm == "l0" else ""
        lines.append(
            f"| advbench cw {norm}, {steps} steps | {t:.1f} | {counting.passes} | {counting.rows} "
            f"| {int(found.sum())}/{len(y)} | {median(d[found]):.4g}{unit} "
            f"| {float(d[found].double().quantile(0.9)) if found.any() else math.nan:.4g}{unit} |"
        )
        print(f"  advbench {norm}: {t:.1f} s", file=sys.stderr, flush=True)
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--digits", type=int, default=300, help="digits-cnn images (default 300)")
    p.add_argument("--mnist", type=int, default=100, help="mnist-cnn images (default 100)")
    p.add_argument("--rounds", type=int, default=1, help="interleaved timing rounds per configuration (default 1)")
    p.add_argument("--out", default=DEFAULT_OUT, help="markdown file to write ('-' for none)")
    p.add_argument("--quick", action="store_true", help="smoke run: 40 digits, 20 MNIST images, 100 steps x 3")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    configs = [("digits-cnn", args.digits, 100, 5), ("mnist-cnn", args.mnist, 1000, 9)]
    if args.quick:
        configs = [("digits-cnn", 40, 100, 3), ("mnist-cnn", 20, 100, 3)]
    sections = []
    for model_name, n, steps, search in configs:
        print(f"{model_name}: {n} images, {steps} steps x {search} binary-search steps", file=sys.stderr, flush=True)
        model, x, y = load(model_name, n)
        runs = l2_runs(model, x, y, steps, search, args.rounds)
        sections.append(f"### {model_name}: {len(y)} correctly classified images, {steps} steps, "
                        f"{search} binary-search steps\n\n" + "\n".join(l2_table(runs, len(y))))
        if model_name == "mnist-cnn":
            sections.append(f"### advbench cw linf and l0 on mnist-cnn ({len(y)} images, the paper's other "
                            f"parameters)\n\n" + "\n".join(other_norms(model, x, y, steps)))
    import foolbox
    import torchattacks

    env = (f"torch {torch.__version__}, {args.threads} intra-op thread(s), cpu "
           f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores), Python {platform.python_version()}, "
           f"foolbox {foolbox.__version__}, torchattacks {torchattacks.__version__}")
    command = "python benchmarks/cw.py" + (" " + shlex.join(argv if argv is not None else sys.argv[1:])).rstrip()
    text = f"""# Carlini-Wagner L2: advbench, foolbox and torchattacks side by side

Same model, images (the first correctly classified ones of the evaluation split), Adam step
size 1e-2, initial c 1e-3, iterations per problem and early abort for all; foolbox with the
same binary-search steps; torchattacks (no search over c) once per c on a x10 grid of as many
values, the best per image kept. Every output audited alike: found = the model misclassifies
the returned point, and it is not foolbox's all-zero "nothing found" output. Times are wall
times in one process ({args.rounds} round(s), the minimum shown); passes count forward passes
of a batch through the model (each with one backward), example-passes the images they carried.

Command: `{command}`

Environment: {env}.

""" + "\n\n".join(sections) + "\n"
    publish(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
