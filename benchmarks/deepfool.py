"""DeepFool and box-constrained L-BFGS: advbench against foolbox, torchattacks and ART.

On the same models and data (the zoo's ``digits-cnn`` on the 360 digits test images and
``mnist-cnn`` on MNIST ``test-eval``, the split it was not trained on), with the same
hyperparameters (50 steps, 10 candidate classes, overshoot 0.02), this measures wall time,
success rate and the median perturbation size of

- advbench ``deepfool`` (l2 and linf) against foolbox 3.3.4's ``L2DeepFoolAttack`` and
  ``LinfDeepFoolAttack`` on the whole batch, ART 1.20's ``DeepFool`` (l2 only) on the whole
  batch, and torchattacks 3.5.1's ``DeepFool`` (l2 only; a full per-example Jacobian per step,
  so it gets only the first ``--ta-images`` images, and advbench is timed on the same ones);
- advbench ``lbfgs`` (untargeted l2). No library has Szegedy et al.'s attack (foolbox 3 and
  torchattacks dropped it, ART never had it), so the reference is a plain per-example SciPy
  ``L-BFGS-B`` loop with the same objective, search over c and budget, on the first
  ``--scipy-images`` images; advbench is timed on the same ones.

Medians are over the examples the model classifies correctly (every library leaves the others
alone, except ART, which attacks its own prediction), failures counting as +inf. Times are
interleaved: each round runs every contender once, in an order rotating from round to round,
and the table gives the median over rounds and the median of the per-round ratios
advbench / other (below 1: advbench is faster).

    python benchmarks/deepfool.py                  # 1 thread, 3 rounds, 300 MNIST images
    python benchmarks/deepfool.py --quick --out -  # smoke run: 1 round, 60 MNIST images, no file
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
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from _common import distances_of, publish  # benchmarks/ is on sys.path when a script runs

from advbench.attacks.lbfgs import attack_loss
from advbench.data.digits import load_digits
from advbench.data.mnist import load_mnist
from advbench.zoo import load_zoo_model
from advbench.registry import ATTACKS
from advbench.threat import ThreatModel

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "deepfool.md")
SHARED_DATA = os.path.abspath(os.path.join(HERE, "..", "..", "shared", "data"))
STEPS, CANDIDATES, OVERSHOOT = 50, 10, 0.02


@dataclass
class Contender:
    label: str
    run: Callable[[], torch.Tensor]  # returns per-example distances (+inf where it failed)
    times: list[float] = field(default_factory=list)
    distances: torch.Tensor | None = None


@dataclass
class Comparison:
    """Contenders attacking the same examples; the first is advbench."""

    setting: str
    n: int
    contenders: list[Contender]




def ours(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str, **params) -> Callable[[], torch.Tensor]:
    attack = ATTACKS.create(name, **params)
    threat = ThreatModel(norm=norm, eps=1.0 if norm == "l2" else 0.1)
    return lambda: attack(model, x, y, threat).minimal_distances.double()


def foolbox_deepfool(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str) -> Callable[[], torch.Tensor]:
    import foolbox

    cls = foolbox.attacks.L2DeepFoolAttack if norm == "l2" else foolbox.attacks.LinfDeepFoolAttack
    attack, fmodel = cls(steps=STEPS, candidates=CANDIDATES, overshoot=OVERSHOOT), foolbox.PyTorchModel(model, bounds=(0, 1))
    return lambda: distances_of(model, x, y, attack(fmodel, x, y, epsilons=None)[0], norm)


def torchattacks_deepfool(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], torch.Tensor]:
    import torchattacks

    attack = torchattacks.DeepFool(model, steps=STEPS, overshoot=OVERSHOOT)
    return lambda: distances_of(model, x, y, attack(x, y), "l2")


def art_deepfool(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], torch.Tensor]:
    from art.attacks.evasion import DeepFool
    from art.estimators.classification import PyTorchClassifier

    clf = PyTorchClassifier(model, loss=nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]), nb_classes=10,
                            clip_values=(0.0, 1.0), device_type="cpu")
    attack = DeepFool(clf, max_iter=STEPS, epsilon=OVERSHOOT, nb_grads=CANDIDATES, batch_size=len(x), verbose=False)
    xn = x.numpy()
    return lambda: distances_of(model, x, y, torch.from_numpy(attack.generate(xn)), "l2")


def scipy_lbfgs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, initial_const: float = 1.0, search_steps: int = 8,
                max_iter: int = 20, history: int = 10) -> Callable[[], torch.Tensor]:
    """The same attack as advbench's ``lbfgs`` (objective, search over c, warm starts, best point
    kept), one example at a time with SciPy's L-BFGS-B (``maxiter`` counts iterations, advbench's
    ``max_iter`` evaluations: SciPy gets the larger budget)."""
    from scipy.optimize import minimize

    def one(x1: torch.Tensor, y1: torch.Tensor) -> float:
        x0 = x1.reshape(-1).double().numpy()
        best = math.inf
        c, c_ok, c_fail = initial_const, 0.0, math.inf

        def fun(v: np.ndarray) -> tuple[float, np.ndarray]:
            nonlocal best
            xv = torch.from_numpy(v).float().view(1, *x1.shape).requires_grad_(True)
            logits = model(xv)
            loss = attack_loss(logits, y1.view(1), None)
            (g,) = torch.autograd.grad(loss.sum(), xv)
            r = v - x0
            sq = float(r @ r)
            if int(logits.argmax()) != int(y1):
                best = min(best, math.sqrt(sq))
            return c * sq + float(loss.detach()), g.double().numpy().ravel() + 2 * c * r

        v = x0
        for _ in range(search_steps):
            v = minimize(fun, v, jac=True, method="L-BFGS-B", bounds=[(0.0, 1.0)] * len(x0),
                         options={"maxiter": max_iter, "maxcor": history}).x
            with torch.no_grad():
                success = int(model(torch.from_numpy(v).float().view(1, *x1.shape)).argmax()) != int(y1)
            c_ok, c_fail = (c, c_fail) if success else (c_ok, c)
            c = math.sqrt(c_ok * c_fail) if c_ok > 0 and c_fail < math.inf else (c * 10 if success else c / 10)
        return best

    return lambda: torch.tensor([one(x[i], y[i]) for i in range(len(x))], dtype=torch.float64)


def correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        keep = model(x).argmax(dim=1) == y
    return x[keep], y[keep]


def build(args: argparse.Namespace) -> list[Comparison]:
    data_root = args.data or os.environ.get("ADVBENCH_DATA") or SHARED_DATA
    digits = load_digits("test")
    mnist = load_mnist("test-eval", root=data_root)
    out = []
    for model_name, data, n in (("digits-cnn", digits, len(digits)), ("mnist-cnn", mnist, args.mnist)):
        model = load_zoo_model(model_name, root=data_root)
        for p in model.parameters():
            p.requires_grad_(False)
        x, y = correct(model, data.x[:n], data.y[:n])
        where = f"{model_name}, {data.name} {data.split}"
        for norm in ("l2", "linf"):
            contenders = [Contender("advbench deepfool", ours("deepfool", model, x, y, norm)),
                          Contender("foolbox", foolbox_deepfool(model, x, y, norm))]
            if norm == "l2":
                contenders.append(Contender("ART", art_deepfool(model, x, y)))
            out.append(Comparison(f"DeepFool {norm}, {where}", len(x), contenders))
        xs, ys = x[: args.ta_images], y[: args.ta_images]
        out.append(Comparison(f"DeepFool l2, {where}, first {len(xs)}", len(xs), [
            Contender("advbench deepfool", ours("deepfool", model, xs, ys, "l2")),
            Contender("torchattacks", torchattacks_deepfool(model, xs, ys))]))
        out.append(Comparison(f"L-BFGS l2, {where}", len(x), [
            Contender("advbench lbfgs", ours("lbfgs", model, x, y, "l2")),
            Contender("(advbench deepfool, for scale)", ours("deepfool", model, x, y, "l2"))]))
        xs, ys = x[: args.scipy_images], y[: args.scipy_images]
        out.append(Comparison(f"L-BFGS l2, {where}, first {len(xs)}", len(xs), [
            Contender("advbench lbfgs", ours("lbfgs", model, xs, ys, "l2")),
            Contender("SciPy L-BFGS-B per example", scipy_lbfgs(model, xs, ys))]))
    return out


def fmt_time(t: list[float]) -> str:
    return f"{statistics.median(t):.2f} s" + (f" ({min(t):.2f}-{max(t):.2f})" if len(t) > 1 else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (default 3)")
    p.add_argument("--mnist", type=int, default=300, help="MNIST test-eval images (default 300)")
    p.add_argument("--ta-images", type=int, default=40, help="images for torchattacks' DeepFool (default 40)")
    p.add_argument("--scipy-images", type=int, default=20, help="images for the SciPy L-BFGS-B loop (default 20)")
    p.add_argument("--data", default=None, help="data root holding mnist/ (default $ADVBENCH_DATA or ../shared/data)")
    p.add_argument("--out", default=DEFAULT_OUT, help="markdown file to write ('-' for none)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 round, 60 MNIST images, 10 + 5 small-subset images")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.mnist, args.ta_images, args.scipy_images = 1, 60, 10, 5
    torch.set_num_threads(args.threads)

    comparisons = build(args)
    for c in comparisons[0].contenders + comparisons[1].contenders:  # warm up (first calls pay lazy initialization)
        c.run()
    for r in range(args.rounds):
        for comp in comparisons:
            k = r % len(comp.contenders)
            for c in comp.contenders[k:] + comp.contenders[:k]:  # rotate the order every round
                t0 = time.perf_counter()
                d = c.run()
                c.times.append(time.perf_counter() - t0)
                c.distances = d
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    rows = ["| setting | n | contender | time | advbench / it | success | median distance | median where found |",
            "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for comp in comparisons:
        base = comp.contenders[0]
        for c in comp.contenders:
            ratio = "" if c is base else f"{statistics.median(a / b for a, b in zip(base.times, c.times)):.2f}"
            d = c.distances
            rows.append(f"| {comp.setting} | {comp.n} | {c.label} | {fmt_time(c.times)} | {ratio} | "
                        f"{torch.isfinite(d).double().mean():.1%} | {d.median():.4f} | {d[torch.isfinite(d)].median():.4f} |")
    table = "\n".join(rows)
    shown = argv if argv is not None else sys.argv[1:]
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/deepfool.py", *shown])
    text = f"""# DeepFool and L-BFGS against foolbox, ART, torchattacks and SciPy

Wall time (median over {args.rounds} interleaved round(s), with the min-max), the median of the
per-round ratios advbench / contender (below 1: advbench is faster), the success rate and
the median perturbation (l2, or linf for the linf rows; failures count as +inf) over the
examples the model classifies correctly. DeepFool everywhere with 50 steps, 10 candidate
classes (torchattacks: all classes) and overshoot 0.02. advbench's times are end to end
(`attack(model, x, y, threat)`: its clean forward pass and audits included).

Differences between the DeepFool implementations: foolbox adds the 1e-4 crossing margin to
the distance |f|/||w|| where advbench adds it to |f|, and runs every example until all are
adversarial, where advbench drops each as soon as it is; ART computes the gradients of all
10 classes for every example at every step and applies the overshoot once at the end;
torchattacks applies the overshoot to every step (so it vanishes as the steps shrink) and
adds no crossing margin: it stops on the boundary itself, where its own one-image forward pass
and the model's batched one can disagree (its outputs are often exact ties, which argmax gives
back to the true class), hence its low success rate; it also builds a full Jacobian per example.
The SciPy reference for L-BFGS runs the same objective, search over c and warm starts as
advbench, one example at a time (its `maxiter` counts iterations, advbench's `max_iter`
evaluations).

Command: `{command}`

Environment: torch {torch.__version__}, {args.threads} intra-op thread(s), CPU
({platform.processor() or platform.machine()}, {os.cpu_count()} cores, shared with other work),
Python {platform.python_version()}.

{table}
"""
    publish(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
