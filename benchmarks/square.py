"""Square attack: advbench against pyautoattack's (AutoAttack's) ``SquareAttack``.

On the same zoo models and the same images (the first correctly classified ones of each test
split: digits for ``digits-mlp``/``digits-cnn``, MNIST ``test-eval`` for ``mnist-cnn``,
CIFAR-10 ``test`` for ``cifar10-cnn``), with the same hyperparameters (5,000 queries,
p_init 0.8, the margin loss, one restart), this measures per model, norm and eps

- robust accuracy (the share of those images still classified correctly after the attack):
  advbench's audited result, and the bare model's prediction on pyautoattack's output (checked
  to lie inside the threat model too), each averaged over several seeds, since two runs of a
  random search differ: the per-seed figures and their range show the seed-to-seed spread;
- wall time, advbench / pyautoattack, measured side by side in the same run (the two alternate,
  their order swapping from seed to seed): advbench end to end (``attack(model, x, y, threat)``
  under ``knowledge: score_based``, its clean pass and audit included), pyautoattack's
  ``perturb`` (its clean pass and final check included);
- queries per example, mean and median, over all images and over the images the attack broke
  (advbench: the score oracle's own per-example counts; pyautoattack: the counts its
  ``attack_single_run`` returns). advbench's ``queries`` counts the initial evaluation, so it makes
  at most 5,000; pyautoattack makes its ``n_queries`` after its initial one, so at most 5,001.

    python benchmarks/square.py                  # about 20 min on 2 cores, 1 thread
    python benchmarks/square.py --quick --out -  # smoke run: 500 queries, 20 images, 1 seed
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from _common import publish  # benchmarks/ is on sys.path when a script runs
from torch import nn

import advbench.attacks.base as attack_base
import advbench.attacks.square  # noqa: F401  (registers "square")
from advbench.data.cifar10 import load_cifar10
from advbench.data.digits import load_digits
from advbench.data.mnist import load_mnist
from advbench.registry import ATTACKS
from advbench.threat import ThreatModel
from advbench.zoo import load_zoo_model

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "square.md")
SHARED_DATA = os.path.abspath(os.path.join(HERE, "..", "..", "shared", "data"))
P_INIT = 0.8


@dataclass
class Setting:
    model: str
    norm: str
    eps: float
    eps_label: str
    images: int
    seeds: int


@dataclass
class Side:
    """One implementation's runs on a setting, one entry per seed."""

    robust: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    queries: list[torch.Tensor] = field(default_factory=list)  # per example
    broken: list[torch.Tensor] = field(default_factory=list)  # per example, bool
    violations: int = 0


def settings(args: argparse.Namespace) -> list[Setting]:
    d, m, c = args.digits_images, args.mnist_images, args.cifar_images
    sd, so = args.digits_seeds, args.seeds
    return [
        Setting("digits-mlp", "linf", 0.1, "0.1", d, sd),
        Setting("digits-mlp", "l2", 0.6, "0.6", d, sd),
        Setting("digits-cnn", "linf", 0.12, "0.12", d, so),
        Setting("digits-cnn", "l2", 0.6, "0.6", d, so),
        Setting("mnist-cnn", "linf", 0.12, "0.12", m, so),
        Setting("cifar10-cnn", "linf", 2 / 255, "2/255", c, so),
    ]


def load(name: str, root: str):
    if name.startswith("digits"):
        return load_digits("test")
    if name == "mnist-cnn":
        return load_mnist("test-eval", root=root)
    return load_cifar10("test", root=root)


def first_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        keep = torch.cat([model(chunk).argmax(dim=1) for chunk in x.split(1000)]) == y
    return x[keep][:n].clone(), y[keep][:n].clone()


@contextlib.contextmanager
def captured_handles() -> Iterator[list]:
    """The model handles the attack base class hands out, for their per-example query counts."""
    made: list = []
    original = attack_base.handle_for

    def recording(*args, **kw):
        made.append(original(*args, **kw))
        return made[-1]

    attack_base.handle_for = recording
    try:
        yield made
    finally:
        attack_base.handle_for = original


def run_advbench(model, x, y, s: Setting, queries: int, seed: int, side: Side) -> None:
    queries += 1  # its first query counted too: the reference's `queries` iterations after it
    attack = ATTACKS.create("square", queries=queries, p_init=P_INIT)
    threat = ThreatModel(norm=s.norm, eps=s.eps, knowledge="score_based", query_budget=queries)
    with captured_handles() as made:
        t0 = time.perf_counter()
        res = attack(model, x, y, threat, generator=torch.Generator().manual_seed(seed))
        side.seconds.append(time.perf_counter() - t0)
    side.violations += res.n_violations
    side.robust.append(100 * (1 - float(res.success.float().mean())))
    side.queries.append(made[0].queries.clone())
    side.broken.append(res.success.clone())


def run_pyautoattack(model, x, y, s: Setting, queries: int, seed: int, side: Side) -> None:
    from pyautoattack.square import SquareAttack

    peer = SquareAttack(model, norm="Linf" if s.norm == "linf" else "L2", n_queries=queries, eps=s.eps,
                        p_init=P_INIT, n_restarts=1, seed=seed, loss="margin", device=x.device)
    counts: list[torch.Tensor] = []
    single = peer.attack_single_run

    def recording(xs, ys):
        n_queries, adv = single(xs, ys)
        counts.append(n_queries)
        return n_queries, adv

    peer.attack_single_run = recording
    with torch.random.fork_rng():  # it seeds torch's global generator
        t0 = time.perf_counter()
        x_adv = peer.perturb(x, y)
        side.seconds.append(time.perf_counter() - t0)
    threat = ThreatModel(norm=s.norm, eps=s.eps)
    valid = threat.contains(x_adv, x)
    with torch.no_grad():
        broken = (model(x_adv).argmax(dim=1) != y) & valid
    side.violations += int((~valid).sum())
    side.robust.append(100 * (1 - float(broken.float().mean())))
    side.queries.append(counts[0].long().cpu())  # perturb attacks every image here: all correctly classified
    side.broken.append(broken)


def query_stats(side: Side) -> tuple[str, str]:
    every = torch.cat(side.queries).double()
    hit = torch.cat([q[b] for q, b in zip(side.queries, side.broken)]).double()
    return summary(every), summary(hit)


def summary(t: torch.Tensor) -> str:
    return f"{t.mean():,.0f} / {t.median():,.0f}" if t.numel() else "-"


def noise(a: Side, b: Side) -> str:
    """The standard error of the difference of the two seed means, from the seed-to-seed spread."""
    if len(a.robust) < 2 or len(b.robust) < 2:
        return "-"
    var = statistics.variance(a.robust) / len(a.robust) + statistics.variance(b.robust) / len(b.robust)
    return f"{var ** 0.5:.2f}"


def per_seed(side: Side) -> str:
    return ", ".join(f"{v:.1f}" for v in side.robust)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--queries", type=int, default=5000, help="queries per example (default 5000)")
    p.add_argument("--digits-images", type=int, default=360, help="digits test images per model, at most 360 (default all)")
    p.add_argument("--mnist-images", type=int, default=200, help="MNIST test-eval images (default 200)")
    p.add_argument("--cifar-images", type=int, default=200, help="CIFAR-10 test images (default 200)")
    p.add_argument("--digits-seeds", type=int, default=2, help="seeds per side on digits-mlp (default 2)")
    p.add_argument("--seeds", type=int, default=2,
                   help="seeds per side on digits-cnn, mnist-cnn and cifar10-cnn (default 2)")
    p.add_argument("--data", default=None, help="data root holding mnist/ and cifar10/ (default $ADVBENCH_DATA or ../shared/data)")
    p.add_argument("--out", default=DEFAULT_OUT, help="markdown file to write ('-' for none)")
    p.add_argument("--quick", action="store_true", help="smoke run: 500 queries, 20 images per model, 1 seed")
    args = p.parse_args(argv)
    if args.quick:
        args.queries, args.digits_images, args.mnist_images, args.cifar_images = 500, 20, 20, 20
        args.digits_seeds, args.seeds = 1, 1
    torch.set_num_threads(args.threads)
    root = args.data or os.environ.get("ADVBENCH_DATA") or SHARED_DATA
    started = time.perf_counter()

    header = ("| model | norm | eps | images | seeds | advbench robust % | pyautoattack robust % | difference "
              "| images broken by one side only (all seeds) "
              "| seed noise of the difference | advbench per seed | pyautoattack per seed | time advbench / pyautoattack | queries, all: mean / median "
              "(advbench; pyautoattack) | queries, broken: mean / median (advbench; pyautoattack) |")
    rows = [header, "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: | --- | --- |"]
    violations = 0
    cache: dict[str, tuple[nn.Module, object]] = {}
    for s in settings(args):
        if s.model not in cache:
            model = load_zoo_model(s.model, root=root).eval()
            for prm in model.parameters():
                prm.requires_grad_(False)
            cache[s.model] = (model, load(s.model, root))
        model, data = cache[s.model]
        x, y = first_correct(model, data.x, data.y, s.images)
        ours, peer = Side(), Side()
        for seed in range(s.seeds):
            order = [(run_advbench, ours), (run_pyautoattack, peer)]
            for fn, side in order if seed % 2 == 0 else order[::-1]:
                fn(model, x, y, s, args.queries, seed, side)
            print(f"{s.model} {s.norm} {s.eps_label} seed {seed}: advbench {ours.robust[-1]:.1f}% "
                  f"({ours.seconds[-1]:.1f} s), pyautoattack {peer.robust[-1]:.1f}% ({peer.seconds[-1]:.1f} s)",
                  file=sys.stderr, flush=True)
        violations += ours.violations + peer.violations
        a, b = statistics.mean(ours.robust), statistics.mean(peer.robust)
        qa_all, qa_hit = query_stats(ours)
        qp_all, qp_hit = query_stats(peer)
        ratio = sum(ours.seconds) / sum(peer.seconds)
        apart = sum(int((o != q).sum()) for o, q in zip(ours.broken, peer.broken))
        rows.append(f"| {s.model} | {s.norm} | {s.eps_label} | {len(x)} | {s.seeds} | {a:.2f} | {b:.2f} | {a - b:+.2f} | {apart} "
                    f"| {noise(ours, peer)} | {per_seed(ours)} | {per_seed(peer)} | {ratio:.2f} ({sum(ours.seconds):.1f} s / {sum(peer.seconds):.1f} s) "
                    f"| {qa_all}; {qp_all} | {qa_hit}; {qp_hit} |")
    minutes = (time.perf_counter() - started) / 60
    shown = argv if argv is not None else sys.argv[1:]
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/square.py", *shown])
    import pyautoattack

    text = f"""# Square attack: advbench against pyautoattack

advbench's `square` and pyautoattack's (AutoAttack's) `SquareAttack`, {args.queries:,} queries, p_init
{P_INIT}, margin loss, one restart, untargeted, on the same images: the first correctly classified
ones of the digits test split (digits-mlp, digits-cnn; 1x8x8), of MNIST `test-eval` (mnist-cnn,
1x28x28) and of CIFAR-10 `test` (cifar10-cnn, 3x32x32). Robust accuracy is over those images and
averaged over the seeds (seed k on both sides; the per-seed figures show how much two runs of a
random search differ on the same images). Time is the sum over the seeds, advbench end to end
(clean pass and audit included) and pyautoattack's `perturb`, the two alternating in the same run.
"Seed noise" is the standard error of that difference estimated from the
seed-to-seed spread on each side (sd / sqrt(seeds), combined): a difference within about two of
it is what two runs of the same random search give. Queries per example, mean / median, over every image and over the images broken, pooled over the
seeds; advbench's budget counts the initial evaluation, so it runs with {args.queries + 1:,}
queries: the same {args.queries:,} iterations after the first query as pyautoattack's `n_queries`
(at most {args.queries + 1:,} queries on both sides). Outputs outside the threat model: {violations}.

advbench runs with its default `draws: batch`: like pyautoattack, one square position, one set of
channel signs (linf) and one pattern orientation (l2) per iteration for the whole batch, drawn in
pyautoattack's order from a generator seeded as pyautoattack seeds torch's, so the same seed
replays the same search and the "broken by one side only" column counts where the two part
(float rounding flipping an acceptance; under L2, where the signs are drawn per example still
failing, one flip shifts every later draw). `draws: example` (the paper's per-example draws) is
the other choice; each example sees uniformly distributed squares either way.

Command: `{command}` ({minutes:.1f} min)

Environment: torch {torch.__version__}, pyautoattack {getattr(pyautoattack, '__version__', '?')},
{args.threads} intra-op thread(s), CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, shared with
other work), Python {platform.python_version()}.

{chr(10).join(rows)}
"""
    publish(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
