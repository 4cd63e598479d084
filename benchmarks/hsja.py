"""HopSkipJump: advbench against foolbox 3.3.4's ``HopSkipJumpAttack`` at a per-example query budget.

On the same zoo models and the same correctly classified images (digits-cnn on the digits test
split, mnist-cnn on MNIST ``test-eval``, cifar10-cnn on the CIFAR-10 test split; the first
``--images`` the model gets right in a fixed random order), with the same hyperparameters (foolbox's
defaults: B_0 = 100 initial evaluations, at most 10,000, gamma = 1, geometric step-size search,
64 steps), this measures the median minimal perturbation (l2; linf on one model) at 1,000 and
5,000 queries per example, and the wall time of a 5,000-query run of each.

advbench enforces the budget itself (a decision-based threat model with ``query_budget``).
foolbox does not, so its model is wrapped: every call queries every example of the batch once
(foolbox always sends the whole batch), so its per-example count is the number of calls, and
the wrapper stops the run after exactly 5,000 calls. foolbox's iterate after each boundary
search is recorded (a subclass hook on ``_binary_search``) with the calls made so far; its
result at budget Q is the last iterate recorded within Q calls, which is exactly what a foolbox
run with as many steps as fit in Q returns (the same computation, cut where it would stop).

foolbox, batched, normalizes its sampling directions and its gradient estimate over the whole
batch instead of per example (``flatten(rv, keep=1)`` and an axis-less ``l2`` over
``(steps, batch, ...)`` and ``(batch, ...)``), which shrinks each example's l2 update by about
sqrt(batch size); linf updates use the sign and are not affected. So foolbox is also run one
example at a time (batch of 1: the algorithm without that coupling) on the first
``--per-example`` images, against advbench's results on the same images.

Times are side by side in one process: advbench's 5,000-query run and foolbox's batched run to
5,000 calls on the same images, ``--rounds`` times in alternating order (median and the median
ratio advbench / foolbox; below 1: advbench is faster).

    python benchmarks/hsja.py                   # 1 thread; about 20 minutes on 2 cores
    python benchmarks/hsja.py --quick --out -   # smoke run: digits-cnn only, few images, no file
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch
from _common import distances_of, publish  # benchmarks/ is on sys.path when a script runs
from torch import nn

import advbench.attacks.hsja  # noqa: F401  (registers "hsja")
from advbench.data.cifar10 import load_cifar10
from advbench.data.digits import load_digits
from advbench.data.mnist import load_mnist
from advbench.registry import ATTACKS
from advbench.threat import ThreatModel
from advbench.zoo import load_zoo_model

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "hsja.md")
SHARED_DATA = os.path.abspath(os.path.join(HERE, "..", "..", "shared", "data"))
BUDGETS = (1000, 5000)


class Stop(Exception):
    """Raised by the counting wrapper when foolbox would exceed the largest budget."""


class Counting(nn.Module):
    """The model, counting calls (each call queries every example of the batch once)."""

    def __init__(self, model: nn.Module, limit: int) -> None:
        super().__init__()
        self.model, self.limit, self.calls = model, limit, 0

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.calls >= self.limit:
            raise Stop
        self.calls += 1
        return self.model(z)


def recording_hsja(counter: Counting, **kw):
    import foolbox

    class Recording(foolbox.attacks.HopSkipJumpAttack):
        """foolbox's attack, keeping (calls so far, iterate) after every boundary search."""

        def __init__(self) -> None:
            super().__init__(**kw)
            self.snapshots: list[tuple[int, torch.Tensor]] = []

        def _binary_search(self, is_adversarial, originals, perturbed):
            out = super()._binary_search(is_adversarial, originals, perturbed)
            self.snapshots.append((counter.calls, out.raw.detach().clone()))
            return out

    return Recording()




def foolbox_run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str, seed: int,
                pool: torch.Tensor | None = None) -> tuple[dict[int, torch.Tensor], float, int]:
    """foolbox on the batch until 5,000 calls: (distances at each budget, seconds, steps done).
    ``pool``: the images a failed start falls back on (default: the batch)."""
    import foolbox

    counter = Counting(model, max(BUDGETS)).eval()
    attack = recording_hsja(counter, steps=64, initial_gradient_eval_steps=100, max_gradient_eval_steps=10000,
                            gamma=1.0, constraint=norm)
    fmodel = foolbox.PyTorchModel(counter, bounds=(0, 1))
    criterion = foolbox.criteria.Misclassification(y)
    torch.manual_seed(seed)  # foolbox (eagerpy) draws from the global generator
    t0 = time.perf_counter()
    try:
        # foolbox's own start (what run() does without starting points), through the counter;
        # where its noise finds nothing, the nearest batch image of another class, as advbench does
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            starts = foolbox.attacks.LinearSearchBlendedUniformNoiseAttack(steps=50).run(fmodel, x, criterion)
        starts = fallback_starts(model, x, y, starts, norm, x if pool is None else pool)
        attack.run(fmodel, x, criterion, starting_points=starts)
    except Stop:
        pass
    seconds = time.perf_counter() - t0
    out = {}
    for budget in BUDGETS:
        within = [s for calls, s in attack.snapshots if calls <= budget]
        out[budget] = distances_of(model, x, y, within[-1], norm) if within else torch.full((len(x),), math.inf)
    return out, seconds, len(attack.snapshots) - 1


def fallback_starts(model: nn.Module, x: torch.Tensor, y: torch.Tensor, starts: torch.Tensor, norm: str,
                    pool: torch.Tensor) -> torch.Tensor:
    """``starts``, with the nearest image of ``pool`` the model labels otherwise where the model
    does not misclassify the start (advbench's fallback for a failed noise search)."""
    with torch.no_grad():
        failed = model(starts).argmax(dim=1) == y
        label = model(pool).argmax(dim=1)
    if not bool(failed.any()):
        return starts
    dist = torch.cdist(x.flatten(1), pool.flatten(1), p=2.0 if norm == "l2" else math.inf)
    dist = dist.masked_fill(label[None, :] == y[:, None], math.inf)
    nearest = pool[dist.argmin(dim=1)]
    return torch.where(failed.view(-1, *[1] * (x.dim() - 1)), nearest, starts)


def advbench_run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str, budget: int, seed: int
                 ) -> tuple[torch.Tensor, float, float]:
    """advbench's hsja at ``budget`` queries per example: (distances, seconds, queries per example)."""
    attack = ATTACKS.create("hsja", steps=64, init_evals=100, max_evals=10000, gamma=1.0, queries=budget)
    threat = ThreatModel(norm=norm, eps=1.0 if norm == "l2" else 0.1, knowledge="decision_based", query_budget=budget)
    t0 = time.perf_counter()
    res = attack(model, x, y, threat, generator=torch.Generator().manual_seed(seed))
    seconds = time.perf_counter() - t0
    assert res.n_queries <= budget * len(x) and not res.budget_exhausted
    return res.minimal_distances.double(), seconds, res.n_queries / len(x)


@dataclass
class Setting:
    model_name: str
    data_name: str
    norm: str
    x: torch.Tensor
    y: torch.Tensor
    model: nn.Module
    ours: dict[int, torch.Tensor] = field(default_factory=dict)
    ours_queries: dict[int, float] = field(default_factory=dict)
    theirs: dict[int, torch.Tensor] = field(default_factory=dict)
    theirs_steps: int = 0
    ours_times: list[float] = field(default_factory=list)
    theirs_times: list[float] = field(default_factory=list)
    single: dict[int, torch.Tensor] = field(default_factory=dict)  # foolbox one example at a time
    single_seconds: float = 0.0


def pick(model: nn.Module, x: torch.Tensor, y: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` correctly classified images in a fixed random order (seed 0; classes are
    sorted in some splits)."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ok = torch.cat([model(x[part]).argmax(dim=1) == y[part] for part in order.split(1024)])
    chosen = order[ok][:n]
    return x[chosen].clone(), y[chosen].clone()


def build(args: argparse.Namespace) -> list[Setting]:
    root = args.data or os.environ.get("ADVBENCH_DATA") or SHARED_DATA
    plan = [("digits-cnn", "digits test", lambda: load_digits("test"), ["l2"])]
    if not args.quick:
        plan += [("mnist-cnn", "MNIST test-eval", lambda: load_mnist("test-eval", root=os.path.join(root, "mnist")),
                  ["l2", "linf"]),
                 ("cifar10-cnn", "CIFAR-10 test", lambda: load_cifar10("test", root=os.path.join(root, "cifar10")),
                  ["l2"])]
    out = []
    for model_name, data_name, load, norms in plan:
        model = load_zoo_model(model_name, root=root)
        for p in model.parameters():
            p.requires_grad_(False)
        data = load()
        x, y = pick(model, data.x, data.y, args.images)
        out += [Setting(model_name, data_name, norm, x, y, model) for norm in norms]
    return out


def med(d: torch.Tensor) -> str:
    return f"{float(d.median()):.4f}" if len(d) else "n/a"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--images", type=int, default=100, help="correctly classified images per model (default 100)")
    p.add_argument("--per-example", type=int, default=10,
                   help="images for foolbox one example at a time (default 10)")
    p.add_argument("--rounds", type=int, default=2, help="timing rounds of the 5,000-query runs (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None, help="data root holding mnist/ and cifar10/ (default $ADVBENCH_DATA or ../shared/data)")
    p.add_argument("--out", default=DEFAULT_OUT, help="markdown file to write ('-' for none)")
    p.add_argument("--quick", action="store_true", help="smoke run: digits-cnn only, 20 images, 3 per example")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.per_example = 20, 3
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    settings = build(args)
    for s in settings:
        where = f"{s.model_name} {s.norm}"
        s.ours[BUDGETS[0]], _, s.ours_queries[BUDGETS[0]] = advbench_run(s.model, s.x, s.y, s.norm, BUDGETS[0], args.seed)
        for r in range(args.rounds):  # side by side, alternating which goes first
            runs = ["ours", "theirs"] if r % 2 == 0 else ["theirs", "ours"]
            for who in runs:
                if who == "ours":
                    d, sec, q = advbench_run(s.model, s.x, s.y, s.norm, BUDGETS[1], args.seed)
                    s.ours[BUDGETS[1]], s.ours_queries[BUDGETS[1]] = d, q
                    s.ours_times.append(sec)
                else:
                    s.theirs, sec, s.theirs_steps = foolbox_run(s.model, s.x, s.y, s.norm, args.seed)
                    s.theirs_times.append(sec)
        k = min(args.per_example, len(s.x))
        singles = {b: [] for b in BUDGETS}
        t0 = time.perf_counter()
        for i in range(k):
            one, _, _ = foolbox_run(s.model, s.x[i:i + 1], s.y[i:i + 1], s.norm, args.seed + i, pool=s.x)
            for b in BUDGETS:
                singles[b].append(one[b])
        s.single_seconds = time.perf_counter() - t0
        s.single = {b: torch.cat(v) if v else torch.empty(0) for b, v in singles.items()}
        print(f"{where}: done ({time.perf_counter() - started:.0f} s so far)", file=sys.stderr)

    rows = [("| model | norm | images | queries / example | advbench median | foolbox median (batched) "
            "| advbench found | foolbox found |"),
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in settings:
        for b in BUDGETS:
            ours, theirs = s.ours[b], s.theirs[b]
            rows.append(f"| {s.model_name} | {s.norm} | {len(s.x)} | {b:,} (advbench used {s.ours_queries[b]:.0f}) | "
                        f"{med(ours)} | {med(theirs)} | {torch.isfinite(ours).double().mean():.0%} | "
                        f"{torch.isfinite(theirs).double().mean():.0%} |")
    table = "\n".join(rows)

    single_rows = [("| model | norm | images | queries / example | advbench median (same images) "
                   "| foolbox median, one at a time |"),
                   "| --- | --- | ---: | ---: | ---: | ---: |"]
    for s in settings:
        k = len(s.single[BUDGETS[0]])
        for b in BUDGETS:
            single_rows.append(f"| {s.model_name} | {s.norm} | {k} | {b:,} | {med(s.ours[b][:k])} | {med(s.single[b])} |")
    single_table = "\n".join(single_rows)

    time_rows = [("| model | norm | images | advbench 5,000 queries | foolbox to 5,000 calls (steps done) "
                 "| advbench / foolbox | foolbox one at a time, per image |"),
                 "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for s in settings:
        ratio = statistics.median(a / b for a, b in zip(s.ours_times, s.theirs_times))
        k = len(s.single[BUDGETS[0]])
        per = f"{s.single_seconds / k:.2f} s" if k else "n/a"
        time_rows.append(f"| {s.model_name} | {s.norm} | {len(s.x)} | {statistics.median(s.ours_times):.2f} s | "
                         f"{statistics.median(s.theirs_times):.2f} s ({s.theirs_steps}) | {ratio:.2f} | {per} |")
    time_table = "\n".join(time_rows)

    shown = argv if argv is not None else sys.argv[1:]
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/hsja.py", *shown])
    total = time.perf_counter() - started
    text = f"""# HopSkipJump against foolbox

Median minimal perturbation (l2, or linf for the linf row) over the same correctly classified
images, at a per-example query budget, for advbench `hsja` (decision-based threat model with
`query_budget`) and foolbox 3.3.4's `HopSkipJumpAttack`, both with foolbox's defaults (64
steps, 100 initial and at most 10,000 evaluations per gradient estimate, gamma 1, geometric
step-size search). Failures count as +inf (the found columns: the share with an adversarial
example). Seed {args.seed}.

**How the budgets are matched.** advbench enforces the budget per example (it never exceeds it
and stops an example, keeping its best point, when the next iteration cannot be paid for; the
"used" figure is its mean). foolbox does not: its model is wrapped to count calls, and every
call queries every example of the batch once (foolbox always sends the whole batch, also for
examples whose search has converged), so its per-example count is the number of calls,
its initial noise search and its `assert is_adversarial` checks included; the wrapper stops it
after 5,000 calls. Its result at budget Q is its iterate after the last boundary search done
within Q calls (recorded through a hook on `_binary_search`): what foolbox returns when run with
as many steps as fit in Q. Steps done within 5,000 calls are in the timing table. foolbox's
start is its own (`LinearSearchBlendedUniformNoiseAttack(steps=50)`, what it runs without
starting points, through the counter); where its noise search fails (foolbox would raise for the
whole batch) it is given advbench's fallback, the nearest batch image of another class, as
starting point.

**Batched foolbox and l2.** foolbox normalizes the sampling directions of the gradient estimate
and the estimate itself over the whole batch (`flatten(rv, keep=1)` flattens batch and pixels
together; `l2(...)` without an axis), not per example, so in a batch of N each example's l2
update is about 1/sqrt(N) of the intended size, and batched l2 runs progress slowly. linf
updates are signs and are unaffected. The second table runs foolbox one example at a time (the
reference algorithm without that coupling) on the first images, against advbench's results on
the same images: there the two agree within the spread of a few images.

Command: `{command}` (total {total / 60:.1f} min)

Environment: torch {torch.__version__}, {args.threads} intra-op thread(s), CPU
({platform.processor() or platform.machine()}, {os.cpu_count()} cores, shared with other work),
Python {platform.python_version()}.

## Median distance at equal queries per example

{table}

## foolbox one example at a time

{single_table}

## Wall time of the 5,000-query runs (side by side, {args.rounds} round(s))

{time_table}

advbench queries the Monte-Carlo samples of all examples in batches of 256 rows (its CPU
default), foolbox one sample of every example per call (batches of N rows); both run about
5,000 x N forward passes, so on these small convolutional models both are bound by the same
forward passes and the ratio mostly shows the per-call overhead. One example at a time,
foolbox pays that overhead 5,000 times per image.
"""
    publish(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
