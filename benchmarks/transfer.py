"""Szegedy et al.'s cross-model and cross-training-set tables on MNIST (issue 5's reproduction).

"Intriguing properties of neural networks" (Szegedy et al. 2014), Sec. 4.3: adversarial examples
found by box-constrained L-BFGS for one model are evaluated on models with other
hyperparameters (cross-model table) and on models trained on a disjoint half of the training
data (cross-training-set table), beside Gaussian-noise rows and, for the second table, the
perturbations amplified to a standard deviation of 0.1.

Differences from the paper, stated in the output: only the MNIST *test* set is on this machine,
so models train on the fixed 8,000-image ``test-train`` split (the cross-training-set halves P1
and P2 are its two 4,000-image halves) and everything is evaluated on the first ``--n`` images
of the 2,000-image ``test-eval`` split; the hidden layers use ReLU; weight decay is an explicit
``lambda / 2 * ||W||^2`` penalty on the weight matrices; the autoencoder model (AE400-10) is
left out; the attack is advbench's batched ``lbfgs`` (minimal l2 perturbation, each example's
smallest adversarial point), and the table's "error rate" is the share of the source's
adversarial examples the target misclassifies (advbench.analysis.transfer_matrix).

    python benchmarks/transfer.py                 # 300 evaluation images (about 5 minutes)
    python benchmarks/transfer.py --quick --out - # smoke run: 60 images, 2 epochs, no file
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from _common import publish  # benchmarks/ is on sys.path when a script runs

from advbench.analysis.transfer_matrix import transfer_matrix
from advbench.report.markdown import table as pipe_table
from advbench.registry import ATTACKS, DATASETS
from advbench.threat import ThreatModel

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "transfer.md")
DATA_ROOT = os.environ.get("ADVBENCH_DATA") or os.path.abspath(os.path.join(HERE, "..", "..", "shared", "data"))

#: name -> (hidden layer widths, weight decay lambda): the paper's cross-model table
CROSS_MODEL = {
    "FC10(1e-4)": ((), 1e-4),
    "FC10(1e-2)": ((), 1e-2),
    "FC10(1)": ((), 1.0),
    "FC100-100-10": ((100, 100), 1e-4),
    "FC200-200-10": ((200, 200), 1e-4),
}
#: name -> (hidden widths, training half, seed): the cross-training-set table (P1, P1, P2)
CROSS_TRAINING = {
    "FC100-100-10": ((100, 100), 0, 1),
    "FC123-456-10": ((123, 456), 0, 2),
    "FC100-100-10'": ((100, 100), 1, 3),
}


def fc(hidden: Sequence[int], seed: int) -> nn.Module:
    """The fully connected net, its initial weights drawn from ``seed`` (the global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _fc(hidden)


def _fc(hidden: Sequence[int]) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width = 28 * 28
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, weight_decay: float, epochs: int, seed: int) -> nn.Module:
    """Adam, batch 128, cross-entropy + lambda / 2 * sum ||W||^2 over the weight matrices; seeded."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    weights = [p for name, p in model.named_parameters() if name.endswith("weight")]
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g)
        for idx in order.split(128):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss = loss + weight_decay / 2 * sum(w.pow(2).sum() for w in weights)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


def lbfgs_examples(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each example's smallest adversarial point found by advbench's box-constrained L-BFGS (x where none)."""
    res = ATTACKS.create("lbfgs")(model, x, y, ThreatModel(norm="l2", eps=1e3))
    return res.x_minimal


def shown(rates: pd.DataFrame, targets: Sequence[str]) -> pd.DataFrame:
    """Error rates in %, the distortion as a number, rows renamed as in the paper."""
    out = (100 * rates[list(targets)]).round(1).astype(str) + "%"
    out["av. distortion"] = rates["av_distortion"].round(3)
    return out


def table(models: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor, **kw) -> tuple[pd.DataFrame, float]:
    t0 = time.perf_counter()
    sources = {name: lbfgs_examples(m, x, y) for name, m in models.items()}
    seconds = time.perf_counter() - t0
    return transfer_matrix(sources, models, x, y, **kw).rates, seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=300, help="evaluation images from MNIST test-eval (default 300)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=DEFAULT_OUT, help="markdown file to write ('-' for none)")
    p.add_argument("--quick", action="store_true", help="smoke run: 60 images, 2 epochs")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    n, epochs = (60, 2) if args.quick else (args.n, args.epochs)
    train_set = DATASETS.create("mnist", split="test-train", root=DATA_ROOT)
    evaluation = DATASETS.create("mnist", split="test-eval", root=DATA_ROOT)
    x, y = evaluation.x[:n], evaluation.y[:n]
    t0 = time.perf_counter()

    cross = {name: train(fc(h, args.seed + i), train_set.x, train_set.y, wd, epochs, args.seed + i)
             for i, (name, (h, wd)) in enumerate(CROSS_MODEL.items())}
    rates1, attack1 = table(cross, x, y, noise=(), noise_stds=(0.1, 0.3), seed=args.seed)
    half = len(train_set.y) // 2
    parts = [slice(0, half), slice(half, None)]
    disjoint = {name: train(fc(h, args.seed + seed), train_set.x[parts[p_]], train_set.y[parts[p_]], 1e-4, epochs,
                            args.seed + seed)
                for name, (h, p_, seed) in CROSS_TRAINING.items()}
    rates2, attack2 = table(disjoint, x, y, noise=(), noise_stds=(0.06, 0.1), amplify_to=(0.1,), seed=args.seed)
    seconds = time.perf_counter() - t0

    acc = {name: accuracy(m, x, y) for name, m in {**cross, **{k + " (P)": v for k, v in disjoint.items()}}.items()}
    acc_line = ", ".join(f"{k} {100 * v:.1f}%" for k, v in acc.items())
    command = "python benchmarks/transfer.py" + (" " + shlex.join(argv if argv is not None else sys.argv[1:])).rstrip()
    text = f"""# Transfer of adversarial examples (Szegedy et al. 2014) on MNIST

{__doc__.split(chr(10) + chr(10))[1]}

{__doc__.split(chr(10) + chr(10))[2]}

Command: `{command}`

Environment: torch {torch.__version__}, {args.threads} intra-op thread(s), CPU ({platform.machine()},
{os.cpu_count()} cores, shared with other work), Python {platform.python_version()}. {n} evaluation
images, {epochs} epochs per model; {seconds:.0f} s in all (L-BFGS: {attack1:.0f} s and {attack2:.0f} s).
Clean accuracy on the evaluation images: {acc_line} ("(P)": the cross-training-set models).

## Cross-model generalization (error rate of each column's model on each row's examples)

The `clean` row is each model's error on the clean images; the diagonal is the white-box rate;
`av. distortion` is the mean RMS change per pixel (Szegedy's "av. distortion").

{pipe_table(shown(rates1, list(cross)), index=True)}

## Cross-training-set generalization (P1: FC100-100-10 and FC123-456-10; P2: FC100-100-10')

{pipe_table(shown(rates2, list(disjoint)), index=True)}
"""
    publish(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
