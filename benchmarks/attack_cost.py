"""Cost ratio of the gradient attacks: attack time over (gradient steps x one forward+backward).

For every gradient attack (FGSM, BIM, PGD linf, PGD l2) this measures, on one batch and one
model big enough to dominate the cost (a small CIFAR-sized CNN, 256 images 3x32x32),

    ratio = attack wall time / (number of gradient steps x time of one forward+backward
                                w.r.t. the input on the same batch)

for advbench's attack and torchattacks' equivalent. A ratio of 1.00 means the attack costs
exactly its gradient evaluations; everything above is overhead (projections, sign, norms,
bookkeeping, and for advbench's end-to-end figure the clean pass and the audit, two forward
passes without gradient, about one step, which torchattacks does not do). advbench is reported twice:
end to end (``attack(model, x, y, threat)``, what a user pays) and its attack loop alone
(``attack._run`` on a counting white-box handle), which is what torchattacks' figure measures.

Machines are noisy, so the measurements are interleaved (each attack run bracketed by two
baseline runs; advbench, its loop and torchattacks in an order rotating every round, for
several rounds) and the table reports the median over rounds of each run's ratio, and the
ratio of the fastest runs, never lone absolute times.

    python benchmarks/attack_cost.py                      # CPU, 2 threads, batch 256, 9 rounds
    python benchmarks/attack_cost.py --device cuda        # on a GPU, if there is one
    python benchmarks/attack_cost.py --quick              # a smoke run (small batch, 2 rounds)
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from _common import publish, timed  # benchmarks/ is on sys.path when a script runs

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "attack_cost.md")


def make_model(seed: int = 0) -> nn.Module:
    """A small CIFAR-sized CNN (4 conv layers, 0.2M parameters, 12M multiply-adds per image);
    random weights: the cost of a pass does not depend on them."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10),
    ).eval()


@dataclass
class Case:
    label: str  # row label
    steps: int  # gradient evaluations the attack makes
    advbench: Callable[[], object]  # end to end
    loop: Callable[[], object]  # advbench's attack loop alone
    torchattacks: Callable[[], object] | None


def build_cases(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> list[Case]:
    import torchattacks

    from advbench import ATTACKS, ThreatModel
    from advbench.access import WhiteBoxModel

    linf = ThreatModel(norm="linf", eps=8 / 255)
    l2 = ThreatModel(norm="l2", eps=0.5)
    alpha_linf = 2.5 * linf.eps / steps
    alpha_l2 = 2.5 * l2.eps / steps
    handle = WhiteBoxModel(model)
    gen = torch.Generator(device=x.device).manual_seed(0)

    def adv(attack, threat):  # noqa: ANN001
        return lambda: attack(model, x, y, threat, generator=gen)

    def loop(attack, threat):  # noqa: ANN001
        return lambda: attack._run(handle, x, y, threat, None, gen)

    fgsm = ATTACKS.create("fgsm")
    bim = ATTACKS.create("bim", steps=steps, step_size=1 / 255)
    pgd = ATTACKS.create("pgd", steps=steps, step_size=alpha_linf, random_start=True)
    pgd2 = ATTACKS.create("pgd", steps=steps, step_size=alpha_l2, random_start=True)
    ta_fgsm = torchattacks.FGSM(model, eps=linf.eps)
    ta_bim = torchattacks.BIM(model, eps=linf.eps, alpha=1 / 255, steps=steps)
    ta_pgd = torchattacks.PGD(model, eps=linf.eps, alpha=alpha_linf, steps=steps, random_start=True)
    ta_pgd2 = torchattacks.PGDL2(model, eps=l2.eps, alpha=alpha_l2, steps=steps, random_start=True)
    return [
        Case("fgsm linf eps=8/255", 1, adv(fgsm, linf), loop(fgsm, linf), lambda: ta_fgsm(x, y)),
        Case(f"bim linf eps=8/255, {steps} steps", steps, adv(bim, linf), loop(bim, linf), lambda: ta_bim(x, y)),
        Case(f"pgd linf eps=8/255, {steps} steps", steps, adv(pgd, linf), loop(pgd, linf), lambda: ta_pgd(x, y)),
        Case(f"pgd l2 eps=0.5, {steps} steps", steps, adv(pgd2, l2), loop(pgd2, l2), lambda: ta_pgd2(x, y)),
    ]


@dataclass
class Sample:
    attack: float  # seconds
    baseline: float  # seconds, mean of the forward+backward timed just before and just after
    steps: int

    @property
    def ratio(self) -> float:
        return self.attack / (self.steps * self.baseline)


def summarize(samples: list[Sample]) -> tuple[float, float, float, float]:
    """(median ratio, min ratio, max ratio, ratio of minima) over the rounds."""
    ratios = [s.ratio for s in samples]
    floor = min(s.attack for s in samples) / (samples[0].steps * min(s.baseline for s in samples))
    return statistics.median(ratios), min(ratios), max(ratios), floor


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="iterations of BIM and PGD (default 10)")
    p.add_argument("--rounds", type=int, default=9, help="interleaved measurement rounds (default 9)")
    p.add_argument("--out", default=DEFAULT_OUT, help="markdown file to write ('-' for none)")
    p.add_argument("--quick", action="store_true", help="smoke run: batch 32, 2 rounds, 3 steps")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.rounds, args.steps = 32, 2, 3
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda was asked for, but torch sees no CUDA device")
    torch.set_num_threads(args.threads)

    model = make_model().to(device)
    for q in model.parameters():  # every contender attacks the same frozen model
        q.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(args.batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(device)

    def fwd_bwd() -> torch.Tensor:
        xr = x.detach().requires_grad_(True)
        return torch.autograd.grad(F.cross_entropy(model(xr), y, reduction="sum"), xr)[0]

    cases = build_cases(model, x, y, args.steps)
    for _ in range(2):  # warm up every code path
        fwd_bwd()
        for c in cases:
            c.advbench(), c.loop()
            if c.torchattacks:
                c.torchattacks()

    contenders = ("advbench", "loop", "torchattacks")
    samples: dict[str, dict[str, list[Sample]]] = {c.label: {k: [] for k in contenders} for c in cases}
    baselines: list[float] = []
    for r in range(args.rounds):
        for c in cases:
            fns = {"advbench": c.advbench, "loop": c.loop, "torchattacks": c.torchattacks}
            order = contenders[r % 3:] + contenders[: r % 3]  # rotate the order every round
            for name in order:
                fn = fns[name]
                if fn is None:
                    continue
                # each attack timing is bracketed by two baseline timings, so that a change in
                # the machine's load shifts both sides of its ratio alike
                before = timed(fwd_bwd, device)
                t = timed(fn, device)
                after = timed(fwd_bwd, device)
                baselines += [before, after]
                samples[c.label][name].append(Sample(t, (before + after) / 2, c.steps))
        print(f"round {r + 1}/{args.rounds}: forward+backward median so far "
              f"{statistics.median(baselines) * 1e3:.1f} ms", file=sys.stderr)

    rows = [
        "| attack | steps | advbench end to end | advbench loop | torchattacks 3.5.1 | loop / torchattacks |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]

    def cell(v: list[Sample]) -> str:
        if not v:
            return "n/a"
        med, lo, hi, floor = summarize(v)
        return f"**{med:.3f}** ({lo:.3f}-{hi:.3f}; min {floor:.3f})"

    for c in cases:
        ss = samples[c.label]
        rel = "n/a"
        if ss["torchattacks"]:
            rel = f"{statistics.median(a.ratio / b.ratio for a, b in zip(ss['loop'], ss['torchattacks'])):.3f}"
        rows.append(f"| {c.label} | {c.steps} | {cell(ss['advbench'])} | {cell(ss['loop'])} | "
                    f"{cell(ss['torchattacks'])} | {rel} |")
    table = "\n".join(rows)
    shown = argv if argv is not None else sys.argv[1:]
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/attack_cost.py", *shown])
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    spread = f"{min(baselines) * 1e3:.0f}-{max(baselines) * 1e3:.0f}"
    text = f"""# Attack cost ratio

Cost ratio = attack wall time / (gradient steps x one forward+backward w.r.t. the input, same
batch and model); 1.000 is the floor. Each attack timing is bracketed by two baseline timings
and divided by their mean; the table gives the **median over {args.rounds} interleaved rounds**,
the (min-max) of the rounds, and "min", the ratio of the fastest attack run to the fastest
baseline (robust to a loaded machine, whose noise only ever adds time). "advbench end to end"
includes the clean forward pass and the audit's forward pass (two forwards without gradient,
about one step: it weighs on FGSM's single step); "advbench loop" is the attack's
`_run` alone, the figure comparable with torchattacks'. Random starts on for PGD; torchattacks
with the same eps, step size and steps. The last column is the median of the per-round
quotients loop ratio / torchattacks ratio (below 1: advbench's loop is cheaper).

Command: `{command}`

Environment: torch {torch.__version__}, {args.threads} intra-op thread(s), device {device} ({where}),
Python {platform.python_version()}; batch {args.batch}x3x32x32 random images; model: a 4-conv
CIFAR-sized CNN (0.2M parameters) with frozen parameters; one forward+backward took
{statistics.median(baselines) * 1e3:.0f} ms (median; {spread} ms over the run).

{table}
"""
    publish(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
