"""Plain PGD vs EoT-PGD under a physical threat model: the photo chain (issue: eot-pgd).

Athalye, Engstrom, Ilyas & Kwok ("Synthesizing Robust Adversarial Examples", ICML 2018) make
adversarial examples survive a physical feed by ascending the expected loss over its
transformations (Expectation over Transformation); Kurakin, Goodfellow & Bengio (2016) measure
how much of a plain attack such a feed undoes (the destruction rate). Here both attacks run at
the same eps, steps and step size under a ``physical:`` threat model whose feed is the ``photo``
chain (rotation 1 deg, blur 0.6, contrast 0.9, brightness +0.03, noise 0.02, JPEG 75), drawn 8
times from a fixed seed; an example counts only if it is adversarial after all 8 draws.

Per model and eps: the audited success under the physical threat, the success on the image
itself (no feed), Kurakin's destruction rate of the photo chain (one seeded draw, average case,
top-1, with its counts), the share of the examples adversarial on their own that the 8-draw
rule rejects, and the wall time of each attack, measured side by side in one process.

    python benchmarks/physical.py                  # mnist-cnn (300 test-eval digits) and cifar10-cnn (200), about 4 min
    python benchmarks/physical.py --quick --out -  # smoke run, no file
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

from advbench.analysis.destruction import destruction_rate
from advbench.audit import audit
from advbench.registry import ATTACKS, DATASETS
from advbench.report.markdown import table as pipe_table
from advbench.threat import ThreatModel
from advbench.zoo import load_zoo_model

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "physical.md")
DATA_ROOT = os.environ.get("ADVBENCH_DATA") or os.path.abspath(os.path.join(HERE, "..", "..", "shared", "data"))
TRANSFORM = "photo"
DRAWS = 8
#: model -> (dataset, split, linf eps values)
SETUPS = {
    "mnist-cnn": ("mnist", "test-eval", (0.1, 0.15, 0.2)),  # test-eval: the split mnist-cnn was not trained on
    "cifar10-cnn": ("cifar10", "test", (4 / 255, 8 / 255)),
}


def load(model_name: str, n: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    dataset, split, _ = SETUPS[model_name]
    model = load_zoo_model(model_name, root=DATA_ROOT).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    root = os.path.join(DATA_ROOT, "mnist") if dataset == "mnist" else DATA_ROOT
    data = DATASETS.create(dataset, split=split, root=root)
    return model, data.x[:n].clone(), data.y[:n].clone()


def eps_label(model_name: str, eps: float) -> str:
    return f"{round(eps * 255)}/255" if model_name.startswith("cifar") else f"{eps:g}"


def rows_for(model_name: str, n: int, steps: int, samples: int, seed: int) -> tuple[list[dict], dict]:
    model, x, y = load(model_name, n)
    physical = {"transform": TRANSFORM, "draws": DRAWS}
    probe = ThreatModel.from_dict({"norm": "linf", "eps": 0.1, "physical": physical})
    with torch.no_grad():
        clean = float((model(x).argmax(dim=1) == y).float().mean())
    clean_physical = audit(model, x, x, y, probe)
    info = {"model": model_name, "n": len(y), "clean": clean,
            "clean_photo": 1 - float(clean_physical.physical_share.mean())}
    transform = probe.physical.build()
    out = [{  # the floor: the clean images themselves under the physical audit
        "model": model_name, "eps": "0", "attack": "(clean images)",
        "physical success %": 100 * float(clean_physical.success.float().mean()),
        "success without the feed %": 100 * (1 - clean),
        "mean share of draws %": 100 * float(clean_physical.physical_share.mean()),
    }]
    for eps in SETUPS[model_name][2]:
        threat = ThreatModel.from_dict({"norm": "linf", "eps": eps, "physical": physical})
        plain = ThreatModel(norm="linf", eps=eps)
        times = {}
        for name, params in (("pgd", {"steps": steps}), ("eot-pgd", {"steps": steps, "samples": samples})):
            attack = ATTACKS.create(name, **params)
            t0 = time.perf_counter()
            res = attack(model, x, y, threat, generator=torch.Generator().manual_seed(seed))
            times[name] = time.perf_counter() - t0
            alone = audit(model, x, res.x_adv, y, plain).success
            d = destruction_rate(model, x, y, res.x_adv, transform, torch.Generator().manual_seed(seed + 1))
            rejected = int((alone & ~res.success).sum())
            out.append({
                "model": model_name, "eps": eps_label(model_name, eps), "attack": name,
                "physical success %": 100 * res.success_rate,
                "success without the feed %": 100 * float(alone.float().mean()),
                "mean share of draws %": 100 * float(res.physical_share.mean()),
                "destruction rate %": 100 * d.rate,
                "destroyed / adversarial": f"{d.numerator}/{d.denominator}",
                "rejected by 8 draws %": 100 * rejected / max(int(alone.sum()), 1),
                "seconds": times[name],
                "passes (fwd+bwd) per image": (res.n_forward + res.n_backward) / len(y),
            })
        out[-1]["time ratio"] = times["eot-pgd"] / times["pgd"]
    return out, info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mnist", type=int, default=300, help="MNIST test-eval images (default 300; 0: skip)")
    p.add_argument("--cifar", type=int, default=200, help="CIFAR-10 test images (default 200; 0: skip)")
    p.add_argument("--steps", type=int, default=20, help="PGD steps for both attacks (default 20)")
    p.add_argument("--samples", type=int, default=8, help="EoT samples per step (default 8)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=DEFAULT_OUT, help="markdown file to write ('-' for none)")
    p.add_argument("--quick", action="store_true", help="smoke run: 40 MNIST and 20 CIFAR-10 images, 5 steps")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.mnist, args.cifar, args.steps = min(args.mnist, 40), min(args.cifar, 20), 5
    t0 = time.perf_counter()
    rows, infos = [], []
    for name, n in (("mnist-cnn", args.mnist), ("cifar10-cnn", args.cifar)):
        if n > 0:
            r, info = rows_for(name, n, args.steps, args.samples, args.seed)
            rows += r
            infos.append(info)
    seconds = time.perf_counter() - t0
    table = pd.DataFrame(rows).set_index(["model", "eps", "attack"])
    ratio = table.pop("time ratio").dropna()
    table["destroyed / adversarial"] = table["destroyed / adversarial"].fillna("")
    models = "\n".join(f"- {i['model']}: the first {i['n']} images, clean accuracy {100 * i['clean']:.1f}%; "
                        f"{100 * i['clean_photo']:.1f}% of the clean images' photo draws classified correctly"
                        for i in infos)
    ratios = ", ".join(f"{m} eps {e}: {v:.1f}x" for (m, e, _), v in ratio.items())
    per_image = table["passes (fwd+bwd) per image"]
    passes = float(per_image.xs("eot-pgd", level="attack").iloc[0] / per_image.xs("pgd", level="attack").iloc[0])
    command = "python benchmarks/physical.py" + (" " + shlex.join(argv if argv is not None else sys.argv[1:])).rstrip()
    text = f"""# EoT-PGD vs PGD under a physical threat (the photo chain)

{__doc__.split(chr(10) + chr(10))[1]}

{__doc__.split(chr(10) + chr(10))[2]}

Command: `{command}`

Environment: torch {torch.__version__}, {args.threads} intra-op thread(s), CPU ({platform.machine()},
{os.cpu_count()} cores, shared with other work), Python {platform.python_version()}; {seconds:.0f} s in all.
Threat: linf, `physical: {{transform: {TRANSFORM}, draws: {DRAWS}, rule: all, seed: 0}}`. Both attacks:
{args.steps} steps, step size 2.5 eps / steps, one random start, cross-entropy, seed {args.seed};
eot-pgd: {args.samples} transformations per step (its own draws, not the audit's seed), the
differentiable photo chain with JPEG straight through (BPDA, identity), the iterate with the
highest share of sampled draws adversarial kept. MNIST from ../shared/data (split test-eval, which
mnist-cnn was not trained on), CIFAR-10 from its JPEG copy there (split test):

{models}

The `(clean images)` rows are the floor: a clean image the chain already makes misclassified in
all {DRAWS} draws counts as a physical success for any attack.

{pipe_table(table, index=True, float_format=lambda v: f"{v:.1f}")}

Time of eot-pgd / time of pgd, same process, one after the other: {ratios}. Its passes per
image are {passes:.1f}x PGD's ({args.samples} samples per step and one pass to score the last
iterate); the rest of the ratio is the feed itself (rotation, blur and their backward, the JPEG
codec on every sample, through Pillow on the CPU) and the {args.samples}x larger batches, on a
CPU shared with other work.

Columns: *physical success*, the audit's verdict (adversarial after all {DRAWS} seeded draws of
the chain); *success without the feed*, on the image itself; *destruction rate*, Kurakin et al.'s
(one draw, average case, top-1): of the examples adversarial on their own whose clean image is
classified correctly, the share the chain turns back to the true class, its counts beside it;
*rejected by {DRAWS} draws*, the share of the examples adversarial on their own that fail the
physical audit. Note that eot-pgd optimizes the fed image, not the image itself, so fewer of its
examples are adversarial without the feed (the destruction rate's denominator).
"""
    publish(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
