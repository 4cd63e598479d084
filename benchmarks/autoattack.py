"""AutoAttack: advbench's APGD variants and ``autoattack`` standard against the original code.

The reference is the ``pyautoattack`` package (Croce & Hein's AutoAttack, the code RobustBench
runs), used here and in the tests only. Same zoo model, same first ``n`` test images, same eps,
same iterations, restarts and target counts, on the CPU with one thread:

1. APGD-CE, APGD-DLR (``apgd`` with ``loss: ce|dlr``) and APGD-T (``apgd-t``, 9 targets), 100
   iterations, 1 restart, each on its own (not cascaded): robust accuracy of advbench and of the
   reference over ``--seeds`` seeds (each seeds both: the reference's ``torch.manual_seed`` and
   advbench's ``torch.Generator``). The bar: within 0.5 points.
2. ``autoattack`` standard (APGD-CE, APGD-T, FAB-T, Square with 5,000 queries, cascaded): advbench's
   ``ATTACKS.create("autoattack")`` against ``AutoAttack(version="standard").run_standard_evaluation``
   on the same batch over ``--seeds`` seeds, the two alternating: robust accuracy (the bar: within
   0.5 points), wall time (the bar: at most 0.7 of the reference's) and the examples each sends
   through the model's forward (the work both do).

Robust accuracy is over all ``n`` images (misclassified clean images count as not robust), as
AutoAttack reports it. eps are chosen where robust accuracy lies between 10% and 90%.

    python benchmarks/autoattack.py                    # every model, both parts (about 40 minutes)
    python benchmarks/autoattack.py --quick --out -    # one model, few images, nothing written
    python benchmarks/autoattack.py --part apgd        # part 1 only
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shlex
import sys
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from _common import publish  # benchmarks/ is on sys.path when a script runs

import advbench
from advbench.data.cifar10 import load_cifar10
from advbench.data.digits import load_digits
from advbench.data.mnist import load_mnist
from advbench.registry import ATTACKS
from advbench.threat import ThreatModel
from advbench.zoo import load_zoo_model

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "autoattack.md")
SHARED_DATA = os.path.abspath(os.path.join(HERE, "..", "..", "shared", "data"))
REF_NORM = {"linf": "Linf", "l2": "L2", "l1": "L1"}

#: (model, data set, threat models with robust accuracy between 10% and 90%)
SETTINGS = {
    "digits-mlp": ("digits", [("linf", 0.1), ("l2", 0.5)]),
    "digits-cnn": ("digits", [("linf", 0.1), ("l2", 0.6)]),
    "mnist-cnn": ("mnist", [("linf", 0.1), ("l2", 1.5)]),
    "cifar10-cnn": ("cifar10", [("linf", 2 / 255), ("l2", 0.25)]),
}


@dataclass
class Row:
    model: str
    threat: str
    attack: str
    ours: list[float]
    ref: list[float]
    t_ours: float = float("nan")
    t_ref: float = float("nan")
    f_ours: float = 0.0  # examples through the model's forward, per run
    f_ref: float = 0.0

    @property
    def diff(self) -> float:
        return 100 * (sum(self.ours) / len(self.ours) - sum(self.ref) / len(self.ref))


def data_for(name: str, root: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    if name == "digits":
        d = load_digits("test")
    elif name == "mnist":
        d = load_mnist("test-eval", root=os.path.join(root, "mnist"))
    else:
        d = load_cifar10("test", root=os.path.join(root, "cifar10"))
    return d.x[:n].clone(), d.y[:n].clone()


@torch.no_grad()
def robust(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x_adv).argmax(dim=1) == y).float().mean())


def ours(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str, eps: float, seed: int,
         name: str, **params: object) -> float:
    with torch.no_grad():
        clean = model(x).argmax(dim=1) == y
    result = ATTACKS.create(name, **params)(model, x, y, ThreatModel(norm=norm, eps=eps),
                                            generator=torch.Generator().manual_seed(seed))
    return float((clean & ~result.success).float().mean())


def reference_apgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str, eps: float, seed: int,
                   kind: str) -> float:
    from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted

    if kind == "apgd-t":
        attack = APGDAttack_targeted(model, n_iter=100, norm=REF_NORM[norm], eps=eps, seed=seed,
                                     n_target_classes=9, device="cpu")
    else:
        attack = APGDAttack(model, n_iter=100, norm=REF_NORM[norm], eps=eps, seed=seed, loss=kind.split("-")[1],
                            n_restarts=1, device="cpu")
    return robust(model, attack.perturb(x.clone(), y.clone()), y)


def reference_standard(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str, eps: float,
                       seed: int) -> float:
    from pyautoattack import AutoAttack

    attack = AutoAttack(model, norm=REF_NORM[norm], eps=eps, version="standard", seed=seed, device="cpu")
    x_adv, _ = attack.run_standard_evaluation(x.clone(), y.clone(), batch_size=len(x))
    return robust(model, x_adv, y)


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def part_apgd(model_name: str, model: nn.Module, x, y, threats, seeds: int) -> list[Row]:
    rows = []
    for norm, eps in threats:
        for kind, name, params in (("apgd-ce", "apgd", {"loss": "ce"}), ("apgd-dlr", "apgd", {"loss": "dlr"}),
                                   ("apgd-t", "apgd-t", {"targets": 9})):
            row = Row(model_name, f"{norm} {eps:.4g}", kind, [], [])
            t_o = t_r = 0.0
            for seed in range(seeds):
                v, t = timed(lambda: ours(model, x, y, norm, eps, seed, name, steps=100, restarts=1, **params))
                row.ours.append(v)
                t_o += t
                v, t = timed(lambda: reference_apgd(model, x, y, norm, eps, seed, kind))
                row.ref.append(v)
                t_r += t
            row.t_ours, row.t_ref = t_o / seeds, t_r / seeds
            rows.append(row)
            print(f"{model_name} {row.threat} {kind}: ours {row.ours} ref {row.ref}", file=sys.stderr, flush=True)
    return rows


class Passes:
    """Examples through the model's forward, counted by a hook (the same module both sides call)."""

    def __init__(self, model: nn.Module) -> None:
        self.n = 0
        model.register_forward_hook(self._count)

    def _count(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self.n += int(inputs[0].shape[0])

    def since(self, start: int) -> int:
        return self.n - start


def part_standard(model_name: str, model: nn.Module, x, y, threats, seeds: int, passes: Passes) -> list[Row]:
    rows = []
    for norm, eps in threats:
        row = Row(model_name, f"{norm} {eps:.4g}", "autoattack standard", [], [], 0.0, 0.0)
        for seed in range(seeds):  # the two alternate, the first swapping from seed to seed
            sides = [("ours", lambda: ours(model, x, y, norm, eps, seed, "autoattack", version="standard")),
                     ("ref", lambda: reference_standard(model, x, y, norm, eps, seed))]
            for side, fn in sides if seed % 2 == 0 else sides[::-1]:
                start = passes.n
                v, t = timed(fn)
                if side == "ours":
                    row.ours.append(v)
                    row.t_ours += t / seeds
                    row.f_ours += passes.since(start) / seeds
                else:
                    row.ref.append(v)
                    row.t_ref += t / seeds
                    row.f_ref += passes.since(start) / seeds
        rows.append(row)
        print(f"{model_name} {row.threat} standard: ours {row.ours} ({row.t_ours:.1f}s) ref {row.ref} ({row.t_ref:.1f}s)",
              file=sys.stderr, flush=True)
    return rows


def pct(values: list[float]) -> str:
    return ", ".join(f"{100 * v:.2f}" for v in values)


def report(args: argparse.Namespace, apgd_rows: list[Row], std_rows: list[Row], n: dict[str, int]) -> str:
    lines = [
        "# AutoAttack: advbench against the original code (pyautoattack)",
        "",
        f"Command: `python benchmarks/{os.path.basename(__file__)} {shlex.join(sys.argv[1:])}`".rstrip() + "  ",
        f"advbench {advbench.__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"1 thread, CPU. Images per model (the first of the test split): "
        + ", ".join(f"{k} {v}" for k, v in n.items()) + ".",
        "",
        "Robust accuracy in % of all images (misclassified clean images count as not robust); "
        "diff = advbench - reference, in points (mean over seeds).",
        "",
    ]
    if apgd_rows:
        lines += ["## APGD variants (100 iterations, 1 restart; APGD-T over 9 targets), each on its own", "",
                  f"Seeds {', '.join(str(s) for s in range(args.seeds))}.", "",
                  "| model | threat | attack | advbench | reference | diff | within 0.5 | advbench s | reference s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in apgd_rows:
            lines.append(f"| {r.model} | {r.threat} | {r.attack} | {pct(r.ours)} | {pct(r.ref)} | {r.diff:+.2f} | "
                         f"{'yes' if abs(r.diff) <= 0.5 else 'NO'} | {r.t_ours:.1f} | {r.t_ref:.1f} |")
        lines.append("")
    if std_rows:
        lines += ["## `autoattack` standard against `run_standard_evaluation` (one batch)", "",
                  f"Seeds {', '.join(str(s) for s in range(args.seeds))}, advbench and the reference alternating "
                  "(which goes first swaps from seed to seed); times and forward passes are means per run. "
                  "Forward passes: examples through the model's forward (a hook on the module both call; "
                  "backward passes follow the gradient steps, the same on both sides).", "",
                  "| model | threat | advbench | reference | diff | within 0.5 | advbench s | reference s | time ratio | at most 0.7 | forward passes, advbench / reference |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in std_rows:
            ratio = r.t_ours / r.t_ref
            lines.append(f"| {r.model} | {r.threat} | {pct(r.ours)} | {pct(r.ref)} | {r.diff:+.2f} | "
                         f"{'yes' if abs(r.diff) <= 0.5 else 'NO'} | {r.t_ours:.1f} | {r.t_ref:.1f} | {ratio:.2f} | "
                         f"{'yes' if ratio <= 0.7 else 'NO'} | {r.f_ours / max(r.f_ref, 1):.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--n", type=int, default=200, help="images per model (digits: at most 360)")
    p.add_argument("--seeds", type=int, default=2, help="seeds of each part")
    p.add_argument("--part", choices=["apgd", "standard", "both"], default="both")
    p.add_argument("--data", default=None, help="the shared data folder (default ../shared/data)")
    p.add_argument("--quick", action="store_true", help="digits-mlp, 40 images, one seed")
    p.add_argument("--out", default=DEFAULT_OUT, help="results file ('-': print only)")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.n, args.seeds = ["digits-mlp"], 40, 1
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("auto-attack").setLevel(logging.ERROR)
    root = args.data or os.environ.get("ADVBENCH_DATA") or SHARED_DATA
    apgd_rows, std_rows, counts = [], [], {}
    for name in args.models:
        data, threats = SETTINGS[name]
        model = load_zoo_model(name)
        for q in model.parameters():
            q.requires_grad_(False)
        x, y = data_for(data, root, args.n)
        counts[name] = len(x)
        passes = Passes(model)
        if args.part in ("apgd", "both"):
            apgd_rows += part_apgd(name, model, x, y, threats, args.seeds)
        if args.part in ("standard", "both"):
            std_rows += part_standard(name, model, x, y, threats, args.seeds, passes)
    publish(report(args, apgd_rows, std_rows, counts), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
