"""Batched input-Hessian-vector products against a per-example loop.

For each reference model, a batch of 64 test images: ``products`` Hessian-vector products per
example through one :class:`~advbench.analysis.hessian.InputHessian` over the whole batch
(one double backward per product for all 64), against the same products computed example by
example (an ``InputHessian`` per image, what a per-example tool does). Both include building
the gradient graph; both run in float64 (what an analysis uses) on one thread. Rounds alternate
them; the table gives the median time of each and their ratio, and checks the products agree.
A third column: the same products through :class:`~advbench.analysis.hessian.GaussNewton`
(exact for the piecewise-linear reference models, which the script checks).

    python benchmarks/hvp.py                 # 3 rounds, 20 products
    python benchmarks/hvp.py --rounds 1 --out -
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from _common import publish  # benchmarks/ is on sys.path when a script runs

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "hvp.md"
SHARED = HERE.parent.parent / "shared" / "data"


def data_for(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if name.startswith("digits"):
        from advbench.data.digits import load_digits

        d = load_digits("test")
    elif name.startswith("mnist"):
        from advbench.data.mnist import load_mnist

        d = load_mnist("test-eval", root=str(SHARED / "mnist"))
    else:
        from advbench.data.cifar10 import load_cifar10

        d = load_cifar10("test", root=str(SHARED / "cifar10"))
    return d.x[:64], d.y[:64]


def main(argv: list[str] | None = None) -> int:
    from advbench.analysis.hessian import GaussNewton, InputHessian, gauss_newton_is_exact
    from advbench.zoo import load_zoo_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="digits-cnn,mnist-cnn,cifar10-cnn")
    ap.add_argument("--products", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    rows = []
    for name in args.models.split(","):
        model = load_zoo_model(name)
        x, y = data_for(name)
        v = torch.randn(args.products, *x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

        def batched() -> torch.Tensor:
            h = InputHessian(model, x, y, dtype=torch.float64)
            return torch.stack([h.hvp(v[k]) for k in range(args.products)])

        def looped() -> torch.Tensor:
            out = []
            for i in range(len(x)):
                h = InputHessian(model, x[i : i + 1], y[i : i + 1], dtype=torch.float64)
                out.append(torch.stack([h.hvp(v[k, i : i + 1]) for k in range(args.products)]))
            return torch.cat(out, dim=1)

        def gauss_newton() -> torch.Tensor:
            h = GaussNewton(model, x, y, dtype=torch.float64)
            return torch.stack([h.hvp(v[k]) for k in range(args.products)])

        exact = bool(gauss_newton_is_exact(model, x, y, torch.Generator().manual_seed(0)).all())
        times: dict[str, list[float]] = {"batched": [], "loop": [], "gn": []}
        results = {}
        for _ in range(args.rounds):
            for label, fn in (("batched", batched), ("loop", looped), ("gn", gauss_newton)):
                start = time.perf_counter()
                results[label] = fn()
                times[label].append(time.perf_counter() - start)
        scale = float(results["loop"].abs().max())
        agree = float((results["batched"] - results["loop"]).abs().max()) / scale
        agree_gn = float((results["gn"] - results["loop"]).abs().max()) / scale
        b, lo, gn = (statistics.median(times[k]) for k in ("batched", "loop", "gn"))
        rows.append((name, tuple(x.shape[1:]), b, lo, gn, agree, agree_gn, exact))
        print(f"{name}: batched {b:.3f} s, loop {lo:.3f} s, Gauss-Newton {gn:.3f} s", file=sys.stderr)

    lines = [
        "# Batched input-Hessian-vector products vs a per-example loop",
        "",
        f"`python benchmarks/hvp.py --products {args.products} --rounds {args.rounds}` on {platform.machine()}, "
        f"{os.cpu_count()} CPUs (1 thread), torch {torch.__version__}: 64 test images per model, "
        f"{args.products} products per image, float64, gradient graph included, median of {args.rounds} "
        f"alternating rounds.",
        "",
        "| model | input | per-example loop (s) | batched double backward (s) | speed-up | batched Gauss-Newton (s) "
        "| speed-up | Gauss-Newton exact here | max relative difference (batched, GN) |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for name, shape, b, lo, gn, agree, agree_gn, exact in rows:
        lines.append(f"| {name} | {'x'.join(map(str, shape))} | {lo:.3f} | {b:.3f} | {lo / b:.1f}x | {gn:.3f} | "
                     f"**{lo / gn:.1f}x** | {'yes' if exact else 'no'} | {agree:.1e}, {agree_gn:.1e} |")
    lines += ["", "Target: at least 5x on a batch of 64. The Gauss-Newton path (K backward passes for the batch, "
              "then every product two small matrix products) is the input Hessian exactly where the network is "
              "piecewise linear (checked per example against the double backward: the 'exact here' column); a "
              "model with curvature of its own needs the double backward.", ""]
    publish("\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
