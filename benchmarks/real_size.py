"""Real-size CIFAR-10 models through ``advbench evaluate``: time and peak memory.

For a torchvision ResNet-18 (10-class head, weights from a local file), a timm ``resnet10t``
(local weights) and RobustBench's ``Standard`` WideResNet-28-10 (checkpoint in ``model_dir``),
all with random weights saved in each loader's layout, it runs ``advbench evaluate`` as a fresh
process on CIFAR-10 test images labelled with the model's own predictions (so every image is
attacked) with PGD and AutoAttack (``steps``/``queries`` cut for CPU: a smoke of the real suite,
not its number), once over ``n`` images and once over ``2n``, both in jobs of ``batch`` images.
It reports the wall time, the images per second of each attack row (from results.csv: the
attack's own seconds), and the process's peak resident memory: with the data held once on the
CPU and each job moving only its own batch, doubling ``n`` at the same ``batch`` must leave the
peak about where it was (memory bounded by one batch's working set, not by n).

    python benchmarks/real_size.py                      # n 8 and 16, batch 8 (~6 min on 2 cores)
    python benchmarks/real_size.py --n 4 --batch 4 --models resnet18 --out -
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from _common import publish  # benchmarks/ is on sys.path when a script runs

HERE = Path(__file__).resolve().parent
# benchmarks/autoattack.py would shadow the `autoattack` module robustbench imports
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
DEFAULT_OUT = HERE / "results" / "real_size.md"
SHARED = HERE.parent.parent / "shared" / "data"
MEAN, STD = [0.4914, 0.4822, 0.4465], [0.2471, 0.2435, 0.2616]

PEAK = """
import resource, runpy, sys
sys.argv = ["advbench", *sys.argv[1:]]
try:
    runpy.run_module("advbench.cli", run_name="__main__")
finally:
    print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def build(name: str, folder: Path) -> tuple[dict, torch.nn.Module]:
    """The model entry for ``name`` (its random weights saved under ``folder``) and the same
    network as the entry deploys it (normalization included), to label the images with."""
    from advbench.models.layers import Normalize

    torch.manual_seed(0)
    if name == "resnet18":
        import torchvision

        net = torchvision.models.resnet18(num_classes=10).eval()
        torch.save(net.state_dict(), folder / "resnet18.pt")
        entry = {"name": name, "torchvision": "resnet18", "weights": str(folder / "resnet18.pt"), "num_classes": 10,
                 "mean": MEAN, "std": STD}
        return entry, torch.nn.Sequential(Normalize(MEAN, STD), net).eval()
    if name == "resnet10t":
        import timm

        net = timm.create_model("resnet10t", pretrained=False, num_classes=10).eval()
        torch.save(net.state_dict(), folder / "resnet10t.pth")
        entry = {"name": name, "timm": "resnet10t", "weights": str(folder / "resnet10t.pth"), "num_classes": 10,
                 "mean": MEAN, "std": STD}
        return entry, torch.nn.Sequential(Normalize(MEAN, STD), net).eval()
    from advbench.models import loaders
    from advbench.models.robustbench_compat import import_robustbench

    import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    net = model_dicts[BenchmarkDataset.cifar_10][ThreatModel.Linf]["Standard"]["model"]().eval()
    path = loaders.robustbench_checkpoint_paths("Standard", model_dir=folder / "models")[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return {"name": name, "robustbench": "Standard", "dataset": "cifar10", "threat_model": "Linf",
            "model_dir": str(folder / "models")}, net


def evaluate(config: dict, folder: Path, tag: str) -> tuple[float, float, pd.DataFrame]:
    """``advbench evaluate`` in a fresh process: wall seconds, peak RSS (MB), results.csv."""
    cfg = folder / f"{tag}.yaml"
    cfg.write_text(yaml.safe_dump(config))
    out = folder / tag
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PEAK, "evaluate", str(cfg), "--out", str(out), "--quiet"],
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"advbench evaluate failed on {tag}:\n{proc.stderr[-2000:]}")
    peak = next(int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS_KB"))
    return wall, peak / 1024, pd.read_csv(out / "results.csv")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8, help="images of the smaller run (the larger: 2n)")
    ap.add_argument("--batch", type=int, default=8, help="images per job")
    ap.add_argument("--models", default="resnet18,resnet10t,wrn-28-10")
    ap.add_argument("--pgd-steps", type=int, default=10)
    ap.add_argument("--aa-steps", type=int, default=5, help="AutoAttack's APGD/FAB iterations (reference: 100)")
    ap.add_argument("--aa-queries", type=int, default=50, help="AutoAttack's Square queries (reference: 5001)")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    args = ap.parse_args(argv)

    from advbench.data.cifar10 import load_cifar10

    images = load_cifar10("test", root=str(SHARED / "cifar10")).x[: 2 * args.n]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in args.models.split(","):
            entry, net = build(name, folder)
            with torch.no_grad():
                labels = net(images).argmax(dim=1)
            data = folder / f"{name}.npz"
            np.savez(data, x=images.numpy(), y=labels.numpy())
            for n in (args.n, 2 * args.n):
                config = {"seed": 0, "device": "cpu", "data": {"path": str(data), "n": n}, "models": [entry],
                          "threats": [{"norm": "linf", "eps": ["8/255"]}],
                          "attacks": [{"name": "pgd", "steps": args.pgd_steps},
                                      {"name": "autoattack", "steps": args.aa_steps, "queries": args.aa_queries}],
                          "batch_size": args.batch, "masking_checks": False}
                wall, peak, table = evaluate(config, folder, f"{name}-{n}")
                speed = {r.attack: n / r.seconds for r in table.itertuples() if r.attack in ("pgd", "autoattack")}
                rows.append((name, n, wall, peak, speed.get("pgd"), speed.get("autoattack"),
                             float(table.set_index("attack").robust_accuracy.get("autoattack", float("nan")))))
                print(f"{name} n={n}: {wall:.1f} s, peak {peak:.0f} MB", file=sys.stderr)

    lines = [
        "# Real-size models through `advbench evaluate` (CPU)",
        "",
        f"`python benchmarks/real_size.py --n {args.n} --batch {args.batch}` on {platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, Python {platform.python_version()}: CIFAR-10 test "
        f"images labelled with each model's own predictions, linf 8/255, PGD-{args.pgd_steps} and AutoAttack "
        f"standard cut to {args.aa_steps} iterations per APGD/FAB component and {args.aa_queries} Square "
        f"queries (a smoke of the suite, not its number), jobs of {args.batch} images, random weights saved "
        f"in each loader's layout, each run a fresh process.",
        "",
        "| model | n | wall (s) | peak memory (MB) | PGD images/s | AutoAttack images/s | AutoAttack robust acc. |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, n, wall, peak, pgd, aa, acc in rows:
        lines.append(f"| {name} | {n} | {wall:.1f} | {peak:.0f} | {pgd:.2f} | {aa:.2f} | {100 * acc:.1f}% |")
    lines += ["", "Peak memory at 2n over n, same batch (bounded by one batch's working set when ~1.0):", ""]
    for name in args.models.split(","):
        small, large = (r[3] for r in rows if r[0] == name)
        lines.append(f"- {name}: {large / small:.2f}x ({small:.0f} -> {large:.0f} MB)")
    lines.append("")
    publish("\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
