"""Kurakin et al.'s destruction-rate table on CIFAR-10 (issue 5's reproduction).

"Adversarial examples in the physical world" (Kurakin, Goodfellow & Bengio 2016) crafts
adversarial images with the fast method, the basic iterative method and the iterative
least-likely class method at eps 2, 4, 8 and 16 (out of 255), passes them through a
transformation T (printing and photographing them, in the paper) and reports the destruction
rate: the fraction of adversarial images that the transformation turns back into correctly
classified ones, among the images that were classified correctly clean and misclassified
adversarial, in the average case (all images) and the prefiltered case (clean top-1
confidence >= 0.8, adversarial wrong in top-1 and top-5), top-1 and top-5.

Differences from the paper, stated in the output: the zoo's small ``cifar10-cnn`` on the first
CIFAR-10 test images (JPEG re-encoded, ../shared/data/cifar10) instead of Inception v3 on
ImageNet; top-5 among 10 classes; the "photo" transformation is a simulated chain
(advbench.analysis.transformations ``photo``), not a printer and a phone camera; the attacks are
advbench's audited ``fgsm``, ``bim`` and ``illc`` with the paper's step rule.

    python benchmarks/destruction.py                 # 1,000 test images (about 5 min + training on first use)
    python benchmarks/destruction.py --quick --out - # smoke run: 100 images, no file
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time

import pandas as pd
import torch

from _common import publish  # benchmarks/ is on sys.path when a script runs

from advbench.report.markdown import table as pipe_table
from advbench.analysis.destruction import destruction_records, pivot_destruction
from advbench.zoo import load_zoo_model
from advbench.registry import ATTACKS, DATASETS
from advbench.threat import ThreatModel

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "destruction.md")
DATA_ROOT = os.environ.get("ADVBENCH_DATA") or os.path.abspath(os.path.join(HERE, "..", "..", "shared", "data"))
EPS = (2, 4, 8, 16)
ATTACK_NAMES = {"fgsm": "fast", "bim": "iter. basic", "illc": "l.l. class"}
TRANSFORMS = {
    "photo": "photo",
    "jpeg q75": {"name": "jpeg", "quality": 75},
    "blur s1": {"name": "blur", "sigma": 1.0},
    "noise s0.05": {"name": "noise", "std": 0.05},
    "brightness +0.1": {"name": "brightness", "delta": 0.1},
    "contrast x0.8": {"name": "contrast", "factor": 0.8},
    "rotation 5deg": {"name": "rotation", "degrees": 5.0},
    "translation 2px": {"name": "translation", "dx": 2, "dy": 0},
    "8-bit": "quantize8",
}
#: the paper's table (the photo transformation; average / prefiltered case, top-1 / top-5), for reference
PAPER = {
    ("fast", 16): (12.5, 40.0, 5.1, 39.4), ("fast", 8): (33.3, 40.0, 14.6, 70.8),
    ("fast", 4): (46.7, 65.9, 32.4, 91.2), ("fast", 2): (61.1, 63.2, 49.5, 91.9),
    ("iter. basic", 16): (40.4, 69.4, 60.0, 87.8), ("iter. basic", 8): (52.1, 90.5, 64.7, 91.2),
    ("iter. basic", 4): (52.4, 82.6, 77.5, 94.1), ("iter. basic", 2): (71.7, 81.5, 80.8, 96.9),
    ("l.l. class", 16): (72.2, 85.1, 87.5, 97.9), ("l.l. class", 8): (86.3, 94.6, 88.9, 97.0),
    ("l.l. class", 4): (90.3, 93.9, 91.9, 98.0), ("l.l. class", 2): (82.1, 93.9, 93.1, 98.0),
}


def load(n: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    model = load_zoo_model("cifar10-cnn", root=DATA_ROOT).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    data = DATASETS.create("cifar10", split="test", root=DATA_ROOT)
    return model, data.x[:n].clone(), data.y[:n].clone()


def craft(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int) -> dict[tuple[str, int], torch.Tensor]:
    """Every (method, eps) adversarial batch, crafted by advbench's audited attacks."""
    out = {}
    for name, label in ATTACK_NAMES.items():
        for eps in EPS:
            res = ATTACKS.create(name)(model, x, y, ThreatModel(norm="linf", eps=eps / 255),
                                       generator=torch.Generator().manual_seed(seed))
            out[(label, eps)] = res.x_adv
    return out


def percent(table: pd.DataFrame) -> pd.DataFrame:
    return (100 * table).round(1)


def ordering(photo_top1: pd.Series) -> list[str]:
    """Per eps, whether the paper's ordering (fast < iter. basic < l.l. class) holds for the photo top-1 rates."""
    lines = []
    for eps in EPS:
        rates = [photo_top1.get((m, eps)) for m in ATTACK_NAMES.values()]
        holds = all(a < b for a, b in zip(rates, rates[1:]))
        shown = ", ".join(f"{m} {100 * r:.1f}%" for m, r in zip(ATTACK_NAMES.values(), rates))
        lines.append(f"- eps {eps}: {shown}: {'holds' if holds else 'does not hold'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1000, help="CIFAR-10 test images (default 1000)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=DEFAULT_OUT, help="markdown file to write ('-' for none)")
    p.add_argument("--quick", action="store_true", help="smoke run: 100 images")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    n = 100 if args.quick else args.n
    t0 = time.perf_counter()
    model, x, y = load(n)
    with torch.no_grad():
        clean_acc = float((model(x).argmax(dim=1) == y).float().mean())
    adversarial = craft(model, x, y, args.seed)
    records = destruction_records(model, x, y, adversarial, TRANSFORMS, seed=args.seed)
    seconds = time.perf_counter() - t0
    rates = pivot_destruction(records)
    photo = rates.xs("photo", axis=1, level="transformation")
    paper = pd.DataFrame.from_dict(PAPER, orient="index",
                                   columns=["paper avg top-1", "paper avg top-5", "paper pre top-1", "paper pre top-5"])
    side = percent(photo)
    side.columns = [f"{'avg' if c == 'average' else 'pre'} top-{k}" for c, k in side.columns]
    side = side.join(paper.set_axis(pd.MultiIndex.from_tuples(paper.index, names=["attack", "eps"])))
    counts = pivot_destruction(records, "denominator").xs("photo", axis=1, level="transformation")
    counts.columns = [f"{'avg' if c == 'average' else 'pre'} top-{k} n" for c, k in counts.columns]
    per_transform = percent(rates.xs(("average", 1), axis=1, level=("case", "topk")))
    per_transform_pre = percent(rates.xs(("prefiltered", 1), axis=1, level=("case", "topk")))
    command = "python benchmarks/destruction.py" + (" " + shlex.join(argv if argv is not None else sys.argv[1:])).rstrip()
    text = f"""# Destruction rate (Kurakin et al. 2016) on CIFAR-10

{__doc__.split(chr(10) + chr(10))[1]}

Command: `{command}`

Environment: torch {torch.__version__}, {args.threads} intra-op thread(s), CPU ({platform.machine()},
{os.cpu_count()} cores, shared with other work), Python {platform.python_version()}. Model:
cifar10-cnn (zoo), clean accuracy {100 * clean_acc:.1f}% on the first {n} test images; {seconds:.0f} s in all.

## The paper's table: the photo transformation (destruction rate %, with the paper's numbers beside)

{pipe_table(side, index=True, float_format=lambda v: f"{v:g}")}

Images counted (the denominator: clean right, adversarial wrong; prefiltered: also confident):

{pipe_table(counts, index=True, float_format=lambda v: f"{v:g}")}

Ordering (the paper: fast-method images survive the transformation best, least-likely-class
images worst), top-1, average case:

{chr(10).join(ordering(photo[("average", 1)]))}

## Every transformation, top-1, average case (destruction rate %)

{pipe_table(per_transform, index=True, float_format=lambda v: f"{v:g}")}

## Every transformation, top-1, prefiltered case (destruction rate %)

{pipe_table(per_transform_pre, index=True, float_format=lambda v: f"{v:g}")}
"""
    publish(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
