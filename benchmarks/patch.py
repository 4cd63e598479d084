"""Adversarial patches (Brown et al. 2017) on cifar10-cnn: universal and per example, beside random patches.

Universal: one patch per setting, fitted by advbench ``patch`` (Adam, EoT over location: a random
corner per image and step) on ``--fit`` CIFAR-10 ``train`` images and evaluated on ``--test``
``test`` images (both sampled with fixed seeds; the split is ordered by class) at random
locations, ``region: {size: S, location: random}, scope: universal``, for S = 4 and 8 (1.6% and
6.25% of the 32x32 image). Untargeted: the fooling rate (prediction changed) and the error rate;
targeted: the success rate toward each of the 10 classes (mean, min-max). Beside them the same
rates for uniform-noise patches at the same corners (mean over 5 draws). One extra row trains
with the paper's robustness augmentations (scale [0.8, 1.2], rotation +-20 degrees), which the
evaluation does not apply (it pastes the patch as it is).

Per example: PGD inside each example's square (``scope: individual``), 100 steps, on the first
``--individual`` test images, at the evaluation's random corners and with ``location: any``
(4 candidate squares per example: the most salient one and 3 random ones, batched).

    python benchmarks/patch.py                  # 1 thread, 500 test / 1500 fit / 200 per-example images
    python benchmarks/patch.py --quick --out -  # smoke run, no file
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time

import torch

from _common import publish  # benchmarks/ is on sys.path when a script runs

from advbench.attacks.patch import paste
from advbench.audit import region_corners
from advbench.data.cifar10 import load_cifar10
from advbench.registry import ATTACKS
from advbench.threat import ThreatModel
from advbench.zoo import load_zoo_model

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "patch.md")
SHARED_DATA = os.path.abspath(os.path.join(HERE, "..", "..", "shared", "data"))
SEED = 0


def threat(size: int, location: str = "random", **kw) -> ThreatModel:
    return ThreatModel.from_dict({"norm": "unbounded", "region": {"size": size, "location": location}, **kw})


@torch.no_grad()
def random_patch_rates(model, x, y, size: int, corners: torch.Tensor, draws: int = 5) -> tuple[float, float, list[float]]:
    """Uniform-noise universal patches at ``corners``: fooling rate, error rate, per-class hit rates."""
    g = torch.Generator().manual_seed(1234)
    clean = model(x).argmax(dim=1)
    fool = err = 0.0
    hits = torch.zeros(10, dtype=torch.float64)
    for _ in range(draws):
        noise = torch.rand(1, x.shape[1], size, size, generator=g).expand(x.shape[0], -1, -1, -1)
        pred = model(paste(x, noise, corners)).argmax(dim=1)
        fool += float((pred != clean).double().mean()) / draws
        err += float((pred != y).double().mean()) / draws
        for k in range(10):
            hits[k] += float(((pred == k) & (y != k)).double().mean()) / draws
    return fool, err, hits.tolist()


def run(attack, model, x, y, t: ThreatModel, **kw):
    t0 = time.perf_counter()
    res = attack(model, x, y, t, generator=torch.Generator().manual_seed(SEED), **kw)
    seconds = time.perf_counter() - t0
    assert bool(res.valid.all()), "an audited patch failed its own audit"
    return res, seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--test", type=int, default=500, help="CIFAR-10 test images for the universal patches (default 500)")
    p.add_argument("--fit", type=int, default=1500, help="CIFAR-10 train images the universal patches are fitted on (default 1500)")
    p.add_argument("--individual", type=int, default=200, help="test images for the per-example patches (default 200)")
    p.add_argument("--epochs", type=int, default=10, help="epochs of universal training (default 10, the attack's default)")
    p.add_argument("--data", default=None, help="data root holding cifar10/ (default $ADVBENCH_DATA or ../shared/data)")
    p.add_argument("--out", default=DEFAULT_OUT, help="markdown file to write ('-' for none)")
    p.add_argument("--quick", action="store_true", help="smoke run: 100 test, 300 fit, 40 per-example images, 2 epochs, 3 targets")
    args = p.parse_args(argv)
    targets = list(range(10))
    if args.quick:
        args.test, args.fit, args.individual, args.epochs, targets = 100, 300, 40, 2, [0, 3, 8]
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    root = args.data or os.environ.get("ADVBENCH_DATA") or SHARED_DATA
    test, train = load_cifar10("test", root=root), load_cifar10("train", root=root)
    model = load_zoo_model("cifar10-cnn", root=root).eval()
    for q in model.parameters():
        q.requires_grad_(False)
    i, j = test.sample_indices(args.test, SEED), train.sample_indices(args.fit, SEED + 1)
    x, y, fit = test.x[i], test.y[i], (train.x[j], train.y[j])
    with torch.no_grad():
        clean_pred = model(x).argmax(dim=1)
    clean_err = float((clean_pred != y).double().mean())
    attack = ATTACKS.create("patch", epochs=args.epochs)
    augmented = ATTACKS.create("patch", epochs=args.epochs, scale=[0.8, 1.2], rotation=20.0)

    uni = ["| patch | share of image | training | goal | fooling rate | success | random patch: fooling / success | fit time |",
           "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: |"]
    for size in (4, 8):
        share = f"{size * size / 32 / 32:.2%}"
        corners = region_corners(threat(size), len(x), 32, 32, torch.Generator().manual_seed(SEED), x.device)
        r_fool, r_err, r_hits = random_patch_rates(model, x, y, size, corners)
        setups = [("EoT location", attack)] + ([("EoT location, scale 0.8-1.2, rotation +-20", augmented)] if size == 8 else [])
        for label, atk in setups:
            res, s_u = run(atk, model, x, y, threat(size, scope="universal"), fit=fit)
            assert torch.equal(res.corners, corners)  # the same placements as the random patches
            uni.append(f"| {size}x{size} | {share} | {label} | untargeted | {res.fooling_rate:.1%} | {res.success_rate:.1%} "
                       f"(clean {clean_err:.1%}) | {r_fool:.1%} / {r_err:.1%} | {s_u:.1f} s |")
            rates, times = [], []
            for k in targets if atk is attack else targets[:1]:
                res, s_t = run(atk, model, x, y, threat(size, scope="universal", targeting="fixed", target_class=k), fit=fit)
                rates.append(res.success_rate)
                times.append(s_t)
                print(f"{size}x{size} {label} target {k}: {res.success_rate:.3f} in {s_t:.1f} s", file=sys.stderr)
            rand = sum(r_hits[k] for k in targets[:len(rates)]) / len(rates)
            which = f"targeted, {len(rates)} classes" if len(rates) > 1 else f"targeted, class {targets[0]}"
            spread = f" ({min(rates):.1%}-{max(rates):.1%})" if len(rates) > 1 else ""
            uni.append(f"| {size}x{size} | {share} | {label} | {which} | | {sum(rates) / len(rates):.1%}{spread} | "
                       f"- / {rand:.1%} | {sum(times) / len(times):.1f} s each |")
        print(f"universal {size}x{size} done", file=sys.stderr)

    n = args.individual
    xi, yi = x[:n], y[:n]
    ind = ["| patch | location | goal | success | random patch success | gradients per example | time | "
           "time / random-location run |",
           "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for size in (4, 8):
        base = None
        corners = region_corners(threat(size), n, 32, 32, torch.Generator().manual_seed(SEED), x.device)
        _, r_err, r_hits = random_patch_rates(model, xi, yi, size, corners)
        for location, candidates, goal in (("random", 4, "untargeted"), ("any", 4, "untargeted"),
                                           ("any", 1, "untargeted"), ("random", 4, "targeted, class 0")):
            kw = {"targeting": "fixed", "target_class": 0} if goal != "untargeted" else {}
            res, secs = run(ATTACKS.create("patch", candidates=candidates), model, xi, yi, threat(size, location, **kw))
            base = secs if base is None else base
            rand = r_err if goal == "untargeted" else r_hits[0]
            rand_txt = f"{rand:.1%}" if location == "random" else f"({rand:.1%} at random corners)"
            where = location if location == "random" else f"any, {candidates} candidate{'s' if candidates > 1 else ''}"
            ind.append(f"| {size}x{size} | {where} | {goal} | {res.success_rate:.1%} | {rand_txt} | "
                       f"{res.n_backward / n:.0f} | {secs:.1f} s | {secs / base:.2f} |")
        print(f"per-example {size}x{size} done", file=sys.stderr)

    total = time.perf_counter() - start
    shown = argv if argv is not None else sys.argv[1:]
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/patch.py", *shown])
    text = f"""# Adversarial patches on cifar10-cnn: universal (Brown et al. 2017) and per example

The zoo's `cifar10-cnn` (clean error {clean_err:.1%} on these images). Every patched image passed
the audit (nothing changed outside its square; each universal example is exactly the one patch
pasted at its corner).

**Universal** patches: fitted on {args.fit} CIFAR-10 `train` images (a seeded sample), {args.epochs} epochs
of Adam (lr 0.05 of the input range, batches of 64), one random corner per image and step (EoT over
location), then evaluated on {args.test} `test` images (another seeded sample) at random corners
(`region: {{size: S, location: random}}, scope: universal`; the same corners for every row of
one size, and for the random patches). Fooling rate: the prediction changed; success: untargeted,
the prediction is wrong; targeted, it is the target (examples of the target class never count),
the mean over the target classes with the min-max. Random patch: uniform noise at the same
corners, mean over 5 draws (its targeted column is the rate at which it happens to hit the
target). The augmented row trains with random scale and rotation of the patch inside its square,
which the evaluation does not apply: robustness bought with digital success, as in the paper's
transformation-robust setting. Fit times are the whole attack call (fit and evaluation).

{chr(10).join(uni)}

**Per example** (PGD inside each example's square, norm unbounded, 100 steps of 2.5/100 of the
range, random start in the square): the first {n} of those test images. `random`: the square at
the evaluation's random corner; `any`: the attack picks the square (4 candidates per example, the
most salient and 3 random ones: 4x the passes; or the most salient square alone, 1 candidate, at
the cost of one extra gradient). Success counts the clean errors too. The last column is the
wall-time ratio to the random-location untargeted run of the same size.

{chr(10).join(ind)}

Command: `{command}` ({total / 60:.1f} min in all, data loading included)

Environment: torch {torch.__version__}, {args.threads} intra-op thread(s), CPU
({platform.processor() or platform.machine()}, {os.cpu_count()} cores, shared with other work),
Python {platform.python_version()}.
"""
    publish(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
