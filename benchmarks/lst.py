"""Level Set Traversal quality bar on the reference models: how many outputs reach their targets.

For each reference model (digits-cnn on digits, mnist-cnn on MNIST test-eval, cifar10-cnn on
CIFAR-10 test) and each LST setting below, it runs the blind-spot analysis
(:func:`advbench.blindspots.analysis.run_blindspots`) on the same seeded pairs and reports the
quality bar

    reached = LST output within RMSE 0.02 of its target  AND  p_src - p_final <= delta

as a fraction of pairs, with the paper's two tables for every run. A second figure, the
**witness** fraction, says whether the bar can be met at all: a targeted PGD-L2 attack started
at the target, restricted to the RMSE-0.02 ball around it, looks for a point the model gives the
source class with confidence >= p_src - delta. Where PGD finds none, no traversal can end within
that ball with that confidence (up to PGD's own misses), so the bar is out of reach for the model,
not for the algorithm.

    python benchmarks/lst.py                       # all three models, 20 sources (40 pairs) each
    python benchmarks/lst.py --models digits-cnn   # one model
    python benchmarks/lst.py --quick --out -       # smoke run: digits-cnn, 4 sources, no files

Writes ``benchmarks/results/lst.md`` and ``benchmarks/results/lst.png`` (the picture of the
setting ``PICTURE_SETTING`` on the last model). cifar10-cnn trains on first use (about 2 minutes) and the
MNIST and CIFAR-10 files come from ``../shared/data``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DATA = os.path.join(ROOT, "..", "shared", "data")
DEFAULT_OUT = os.path.join(HERE, "results", "lst.md")

MODELS: dict[str, dict[str, Any]] = {
    "digits-cnn": {"data": {"name": "digits", "split": "test"}, "model": {"name": "digits-cnn"}},
    "mnist-cnn": {
        "data": {"name": "mnist", "split": "test-eval", "root": DATA},
        "model": {"name": "mnist-cnn", "params": {"root": DATA}},
    },
    "cifar10-cnn": {
        "data": {"name": "cifar10", "split": "test", "root": DATA},
        "model": {"name": "cifar10-cnn", "params": {"root": DATA}},
    },
}

#: the reference implementation's setting (the defaults before the restoring correction)
REFERENCE = {"step_size": 0.01, "adv_step": 0.002, "restore": 0.0}

#: (label, LST parameters, why it is here)
SETTINGS: list[tuple[str, dict[str, Any], str]] = [
    ("defaults", {}, "eta 2e-2, 400 iterations, delta 0.2, no x_par, Newton correction back to p_src - delta/2"),
    ("reference", REFERENCE, ("the reference implementation's eta 1e-2, eps 2e-3, no restoring correction "
                              "(the defaults before the restoring correction)")),
    ("reference, eps 2e-5", {**REFERENCE, "adv_step": 2e-5}, ("the reference with a 100x smaller x_par "
                                                              "(the best reference-style setting found before)")),
    ("no correction", {"restore": 0.0}, "the defaults without any correction: pure level-set steps"),
    ("restore to p_src", {"restore_drop": 0.0}, "the defaults, the correction aiming at p_src itself"),
    ("eta 1e-2", {"step_size": 0.01}, "the defaults with the reference step size"),
]

#: the setting whose picture (of the last model) becomes lst.png
PICTURE_SETTING = "defaults"


def witness_mask(model: torch.nn.Module, data: Any, pairs: Any, rmse_goal: float, delta: float) -> torch.Tensor:
    """Per pair: whether PGD finds a point within RMSE ``rmse_goal`` of the target with confidence >= p_src - delta."""
    from advbench.registry import ATTACKS
    from advbench.threat import ThreatModel

    src = torch.tensor(pairs.source_index.to_numpy())
    tgt = torch.tensor(pairs.target_index.to_numpy())
    y = data.y[src]
    eps = rmse_goal * data.x[0].numel() ** 0.5  # RMSE r <=> L2 r * sqrt(d)
    threat = ThreatModel.from_dict({"norm": "l2", "eps": eps, "targeting": "fixed", "target_class": 0})
    attack = ATTACKS.create("pgd", steps=100, random_start=False, step_size=eps / 25)
    result = attack(model, data.x[tgt], data.y[tgt], threat, target=y)
    with torch.no_grad():
        p = model(result.x_adv).softmax(1).gather(1, y[:, None]).squeeze(1)
    p_src = torch.tensor(pairs.p_src.to_numpy(), dtype=p.dtype)
    return p >= p_src - delta


def run(models: list[str], sources: int, grid: int, out_png: str | None) -> tuple[list[dict[str, Any]], dict[str, str]]:
    from advbench.blindspots.analysis import run_blindspots
    from advbench.blindspots.config import parse_blindspot_config
    from advbench.blindspots.report import markdown
    from advbench.loading import load_data, load_model

    rows: list[dict[str, Any]] = []
    tables: dict[str, str] = {}
    tmp = tempfile.mkdtemp(prefix="lst-bench-")
    try:
        for name in models:
            spec = MODELS[name]
            witness = None
            for label, params, _why in SETTINGS:
                config = parse_blindspot_config({**spec, "sources": sources, "lst": params, "grid": grid, "examples": 3})
                t0 = time.perf_counter()
                res = run_blindspots(config, os.path.join(tmp, name, label.replace(" ", "_").replace(",", "")))
                seconds = time.perf_counter() - t0
                if witness is None:
                    data = load_data(config.data.model_dump(mode="json"))
                    model = load_model(config.model.model_dump(mode="json", by_alias=True)).eval()
                    delta = config.traversal().delta
                    mask = witness_mask(model, data, res.pairs, config.rmse_goal, delta)
                    witness = float(mask.float().mean())
                p, s = res.pairs, res.summary
                reached = torch.tensor(p.reached.to_numpy(dtype=bool))
                of_witnessed = float((reached & mask).sum() / mask.sum()) if bool(mask.any()) else float("nan")
                missed_rmse = p.rmse[~p.reached.to_numpy(dtype=bool)]
                rows.append({
                    "model": name, "setting": label, "pairs": s["pairs"], "reached": s["fraction_reached"],
                    "witness": witness, "of_witnessed": of_witnessed, "missed": int((~reached).sum()),
                    "missed_unwitnessed": int((~reached & ~mask).sum()),
                    "missed_rmse": (missed_rmse.min(), missed_rmse.max()) if len(missed_rmse) else None,
                    "rmse_start": p.rmse_start.mean(), "rmse": p.rmse.mean(),
                    "rmse_median": p.rmse.median(), "p_src": p.p_src.mean(), "p_final": p.p_final.mean(),
                    "stopped": s["fraction_stopped"], "iterations": s["mean_iterations"], "seconds": seconds,
                    "passes": (s["n_forward"] + s["n_backward"]) / s["pairs"],
                })
                tables[f"{name} / {label}"] = markdown(res.distance_table, res.confidence_table, config.deltas,
                                                      res.summary, res.notes)
                print(f"{name:12s} {label:22s} reached {s['fraction_reached']:.0%}  witness {witness:.0%}  "
                      f"rmse {p.rmse.mean():.3f}  stopped {s['fraction_stopped']:.0%}  {seconds:.0f} s", flush=True)
                if out_png and label == PICTURE_SETTING:
                    shutil.copyfile(res.out / "blindspots.png", out_png)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows, tables


def report(rows: list[dict[str, Any]], tables: dict[str, str], command: str, sources: int, grid: int) -> str:
    lines = [
        "# Level Set Traversal: quality bar on the reference models",
        "",
        "**Quality bar**: the LST output lies within RMSE 0.02 of its target *and* keeps its source-class",
        "confidence within delta = 0.2 of p_src. *reached* is the fraction of pairs meeting it. *witness* is",
        "the fraction of the same pairs for which a targeted PGD-L2 attack (100 steps, started at the",
        "target, confined to the RMSE-0.02 ball around it) finds any point the model gives the source",
        "class with confidence >= p_src - delta: an upper bound, up to PGD's misses, on what any",
        "traversal could reach. Every run uses the same seeded pairs (seed 0): "
        f"{sources} correctly classified sources, each traversed toward two targets of two other classes.",
        "",
        f"Command: `{command}`",
        "",
        f"Environment: torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s), CPU "
        f"({platform.machine()}, {os.cpu_count()} cores, shared with other work: times are indicative only), "
        f"Python {platform.python_version()}; triangle grid resolution {grid}.",
        "",
        "Settings:",
        "",
        *(f"- **{label}**: `lst: {params}`: {why}" for label, params, why in SETTINGS),
        "",
        "*of witnessed*: the fraction of the pairs the witness finds reachable that the setting reaches.",
        "*passes per pair*: the traversal's forward plus backward passes per pair (one of each per accepted",
        "iteration); *seconds*: wall time of the whole analysis run, on a shared machine.",
        "",
        "| model | setting | pairs | reached | witness | of witnessed | RMSE start | RMSE mean | RMSE median | p_src "
        "| p_final | stopped early | mean iterations | passes per pair | seconds |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        of_w = "n/a" if r["of_witnessed"] != r["of_witnessed"] else f"{r['of_witnessed']:.0%}"
        lines.append(
            f"| {r['model']} | {r['setting']} | {r['pairs']} | **{r['reached']:.0%}** | {r['witness']:.0%} | {of_w} | "
            f"{r['rmse_start']:.3f} | {r['rmse']:.3f} | {r['rmse_median']:.3f} | {r['p_src']:.3f} | "
            f"{r['p_final']:.3f} | {r['stopped']:.0%} | {r['iterations']:.0f} | {r['passes']:.0f} | {r['seconds']:.0f} |"
        )
    lines += ["", "## Reading: what is reachable, per model", ""]
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        default = next((r for r in mine if r["setting"] == "defaults"), mine[0])
        reference = next((r for r in mine if r["setting"] == "reference"), None)
        closest = min(mine, key=lambda r: r["rmse"])
        n, w = default["pairs"], default["witness"]
        ref = (f"; the reference setting reaches {reference['reached']:.0%} (mean RMSE {reference['rmse']:.3f})"
               if reference is not None else "")
        if w > 0:
            lines.append(
                f"- **{name}**: reachable per the witness for {w:.0%} of the pairs ({round(w * n)} of {n}). "
                f"The defaults reach {default['reached']:.0%} ({default['of_witnessed']:.0%} of the witnessed "
                f"pairs; mean RMSE {default['rmse']:.3f}, mean p_final {default['p_final']:.3f} for p_src "
                f"{default['p_src']:.3f}){ref}."
                + (f" The {default['missed']} pairs the defaults miss end at RMSE {default['missed_rmse'][0]:.3f} to "
                   f"{default['missed_rmse'][1]:.3f}; {default['missed_unwitnessed']} of them are pairs the witness "
                   "finds out of reach." if default["missed_rmse"] is not None else "")
            )
        else:
            lines.append(
                f"- **{name}**: not reachable: the witness finds a qualifying point for none of the {n} pairs, so no "
                f"traversal can meet the bar on this model and every setting reaches {default['reached']:.0%}. The "
                f"defaults end at mean RMSE {default['rmse']:.3f} (from {default['rmse_start']:.3f}; "
                + ("the closest of all settings" if closest is default else f"closest: *{closest['setting']}*, "
                   f"{closest['rmse']:.3f}") + f"){ref}."
            )
    lines += [
        "",
        "Why the reference setting misses the bar: its correction x_par is added to the iterate at *every*",
        "iteration. On these models the input gradients are large per pixel, so x_par saturates at +-eps and",
        "drifts the iterate by eps per pixel per iteration, which the pull eta * (x_t - x) balances at about",
        "eps / eta per pixel (0.2 for eps 2e-3, eta 1e-2): the outputs end far from the target at confidence",
        "about 1. In the reference code the correction was in effect negligible (a batch-mean cross-entropy",
        "over 196 ImageNet images, with tiny per-pixel gradients). Without any correction, the curvature of",
        "the level set makes each first-order step lose a little confidence, and many traversals stop early.",
        "",
        "What the defaults do instead: after each step along the level set, a Newton step along -g restores",
        "the log-confidence lost below p_src - delta/2, and nothing when the confidence lies above it. The",
        "traversal follows the middle of the band the confidence check allows instead of pushing the",
        "confidence to 1, so it stops rarely and ends near the point of that level closest to the target.",
        "It never lowers the confidence on purpose (where the level set is flat, the outputs keep p_src).",
        "*restore to p_src* shows what aiming at p_src itself costs, *eta 1e-2* that the reference step size",
        "leaves (0.99)^400, about 2%, of the orthogonal distance untraversed after 400 iterations.",
        "",
        "Why nothing reaches the bar on digits-cnn and mnist-cnn: RMSE 0.02 is an L2 radius of 0.16 on 8x8",
        "digits and 0.56 on 28x28 MNIST, and within it PGD finds no point that these models give the source",
        "class with confidence >= p_src - 0.2: their level sets do not come that close to images of other",
        "classes. On CIFAR-10 (3,072 dimensions: RMSE 0.02 is an L2 radius of 1.1) qualifying points exist for",
        "most pairs.",
    ]
    lines += ["", f"![LST outputs and triangles of {rows[-1]['model']}, setting {PICTURE_SETTING}](lst.png)", "",
              f"The picture (`lst.png`): {rows[-1]['model']} with setting *{PICTURE_SETTING}*: per row a source, two "
              "targets and their LST outputs (titles: the source-class confidence), and the source-class confidence "
              "over the triangle source / output 1 / output 2.", "", "## The paper's tables, per run", ""]
    for key, text in tables.items():
        lines += [f"### {key}", "", text.replace("## Table", "#### Table"), ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ", ".join(MODELS))
    parser.add_argument("--sources", type=int, default=20, help="sources per model (two pairs each)")
    parser.add_argument("--grid", type=int, default=20, help="triangle grid resolution")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--quick", action="store_true", help="smoke run: digits-cnn, 4 sources, grid 5")
    parser.add_argument("--out", default=DEFAULT_OUT, help="Markdown file to write ('-': print only)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = ["digits-cnn"] if args.quick else [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    sources, grid = (4, 5) if args.quick else (args.sources, args.grid)
    png = None if args.out == "-" else os.path.splitext(args.out)[0] + ".png"
    rows, tables = run(models, sources, grid, png)
    command = "python benchmarks/lst.py" + (" " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "")
    text = report(rows, tables, command, sources, grid)
    if args.out == "-":
        print(text)
    else:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        print(f"wrote {args.out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
