"""Does input-space curvature predict how easily an image is perturbed? The seed's questions on
the digits, MNIST and CIFAR-10 reference models.

For each model, ``advbench curvature`` over clean-correct test images (the configs in
``configs/``; the digits one is the embedded default with more images), then:

- per low / mid / high KL group (KL of the image's Hessian-spectrum histogram from the pooled
  one, symlog bins): the median steps to misclassify and MSE there at each iterative-FGSM step
  size, and DeepFool's minimal L2 distance, with 95% bootstrap intervals;
- Spearman's rho of each curvature measure with the minimal distance and the steps, and the
  same with the clean logit margin partialled out (does curvature say more than confidence?);
- the curvature detector's ROC AUC against the confidence baseline;
- KL against Jensen-Shannon, the exact spectrum against its SLQ estimate, and linear bins (the
  seed's) against symlog bins on the same spectra.

    python benchmarks/curvature.py                    # all three (about 10 minutes on 2 cores)
    python benchmarks/curvature.py --only digits --n 100 --out -

Runs are kept (and resumed) under ``--work`` (default ``advbench-curvature/benchmark``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from _common import publish  # benchmarks/ is on sys.path when a script runs

from advbench.curvature import parse_curvature_config, run_curvature
from advbench.curvature.config import DEFAULT_CURVATURE_YAML
from advbench.curvature.tables import finish

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_OUT = HERE / "results" / "curvature.md"
SHARED = ROOT.parent / "shared" / "data"
RUNS = {
    "digits": (None, 300),
    "mnist": (ROOT / "configs" / "curvature-mnist.yaml", 500),
    "cifar10": (ROOT / "configs" / "curvature-cifar10.yaml", 500),
}
MEASURES = ("kl", "js", "trace", "top_eigenvalue", "k_gradient", "k_top", "k_random", "k_attack")
FIGURES = {"digits": "divergence_vs_mse.png", "cifar10": "divergence_trajectories.png", "mnist": "steps_mse_per_alpha.png"}


def config_for(name: str, n: int | None) -> dict:
    path, default_n = RUNS[name]
    raw = yaml.safe_load(DEFAULT_CURVATURE_YAML if path is None else path.read_text())
    raw["data"] = {**raw["data"], "n": n or default_n}
    if "root" in raw["data"]:
        raw["data"]["root"] = str(SHARED)
    if isinstance(raw.get("model"), dict) and "root" in raw["model"].get("params", {}):
        raw["model"]["params"]["root"] = str(SHARED)
    raw["device"] = "cpu"
    return raw


def _g(v: float) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.3g}"


def _ci(v: float, lo: float, hi: float) -> str:
    return f"{_g(v)} [{_g(lo)}, {_g(hi)}]"


def section(name: str, run: Path, linear: Path, seconds: float) -> tuple[list[str], dict]:
    res = json.loads((run / "results.json").read_text())["summary"]
    lin = json.loads((linear / "results.json").read_text())["summary"]
    prov = json.loads((run / "run.json").read_text())
    cfg = prov["config"]
    groups = pd.read_csv(run / "groups.csv")
    model = cfg["model"]["name"]
    alphas = [f"{a:g}" for a in cfg["alphas"]]
    lines = [f"## {model} on {prov['data']['name']}/{prov['data']['split']}", "",
             f"{res['images']} clean-correct images of {prov['data']['sampled']} sampled (seed {cfg['seed']}), spectra by "
             f"{', '.join(res['methods'])} ({res['hessian_products_per_image']} Hessian products per image), "
             f"{seconds:.0f} s. Command: `advbench curvature {'configs/curvature-' + name + '.yaml' if name != 'digits' else ''}`"
             f" with n {prov['data']['sampled']}.", "",
             "### Low / mid / high KL groups: median [95% interval] (n)", "",
             "| outcome | low KL | mid KL | high KL | low vs high |", "| --- | ---: | ---: | ---: | --- |"]
    shown = ["min_distance_l2"] + [f"steps_{a}" for a in alphas] + [f"mse_{a}" for a in alphas] + \
        [f"confidence_{a}" for a in alphas]
    verdicts = {}
    for col in shown:
        sub = groups[groups.outcome == col].set_index("group")
        cells = []
        for g in ("low", "mid", "high"):
            r = sub.loc[g] if g in sub.index else None
            cells.append("none (0)" if r is None or int(r.n) == 0 else f"{_ci(r['median'], r.low, r.high)} ({int(r.n)})")
        verdict = "n/a"
        if all(g in sub.index and int(sub.loc[g].n) > 0 for g in ("low", "high")):
            lo_, hi_ = sub.loc["low"], sub.loc["high"]
            verdict = ("differ (high below)" if hi_.high < lo_.low else "differ (high above)" if hi_.low > lo_.high
                       else "overlap")
        verdicts[col] = verdict
        lines.append(f"| {col} | " + " | ".join(cells) + f" | {verdict} |")
    b = f"{cfg['boundary_alpha']:g}"
    outs = ["min_distance_l2", f"steps_{b}"]
    ctl = res["control_spearman"]
    lines += ["", "### Rank correlations: Spearman's rho [95% interval], and partial rho given the clean logit margin "
              "and the first-order distance estimate", "",
              "The controls alone: " + "; ".join(f"`{c}` rho with min_distance_l2 {_ci(**_est(ctl[c]['min_distance_l2']))},"
                                                 f" with steps_{b} {_ci(**_est(ctl[c][f'steps_{b}']))}" for c in ctl)
              + ".", "",
              "| measure | rho, min_distance_l2 | partial | rho, steps_" + b + " | partial |", "| --- | ---: | ---: | ---: | ---: |"]
    for m in MEASURES:
        if m not in res["spearman"]:
            continue
        cells = []
        for o in outs:
            cells += [_ci(**_est(res["spearman"][m][o])), _ci(**_est(res["partial_spearman"][m][o]))]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    det = res["detector"]
    lines += ["", f"### Curvature detector: clean vs {det['attack']} ({det['norm']}, eps {det['eps']:.4g}), "
              f"{det['successes']} audited adversarial of {det['attacked']}", "",
              "| measure | ROC AUC [95% interval] |", "| --- | ---: |"]
    for m, e in det["auc"].items():
        lines.append(f"| {m}{' (baseline: 1 - top probability)' if m == 'uncertainty' else ''} | {_ci(**_est(e))} |")
    comp = res["comparison"]
    e = comp.get("exact_vs_slq")
    lines += ["", "### Comparisons", "",
              f"- KL vs JS over the images: Spearman {_ci(**_est(comp['kl_vs_js']))}.",
              f"- Exact spectrum vs its SLQ estimate ({e['slq_steps']} steps x {e['slq_probes']} probes): Spearman of "
              f"the KLs {_ci(**_est(e['kl']))}, of the JSs {_ci(**_est(e['js']))}; total-variation distance between the "
              f"histograms median {_g(e['tv_median'])}, max {_g(e['tv_max'])}." if e else "- (no SLQ comparison)",
              f"- Linear bins (the seed's) on the same spectra: {lin['tied_across_groups']} of {lin['images']} images "
              f"share their KL with an image of another group (symlog: {res['tied_across_groups']}); Spearman of linear "
              f"KL with min_distance_l2 {_ci(**_est(lin['spearman']['kl']['min_distance_l2']))}.",
              "- Boundary points transfer to the second model: "
              + (f"{res['boundary_transfer_rate']:.1%}." if "boundary_transfer_rate" in res else "no second model."),
              f"- Decision-boundary curvature at the boundary points: median |k| {_g(res['boundary_curvature_abs_median'])}."]
    return lines, {"model": model, "verdicts": verdicts, "summary": res}


def findings(found: dict) -> list[str]:
    """The answers, generated from the numbers (so a rerun that changes them changes the text)."""
    out = ["## Answers", "",
           "| model | low vs high KL: steps at alpha 1 | rho(KL, min distance) | partial rho given margin and "
           "first-order distance | largest partial rho (min distance) | detector: most separating measure, AUC | confidence baseline AUC |",
           "| --- | --- | ---: | ---: | --- | ---: | ---: |"]
    for name, f in found.items():
        s = f["summary"]
        rho, part = s["spearman"]["kl"]["min_distance_l2"], s["partial_spearman"]["kl"]["min_distance_l2"]
        best = max(s["partial_spearman"],
                   key=lambda m: abs(s["partial_spearman"][m]["min_distance_l2"]["value"])
                   if math.isfinite(s["partial_spearman"][m]["min_distance_l2"]["value"]) else -1)
        bp = s["partial_spearman"][best]["min_distance_l2"]
        auc = {m: e for m, e in s["detector"]["auc"].items() if m != "uncertainty" and math.isfinite(e["value"])}
        top = max(auc, key=lambda m: abs(auc[m]["value"] - 0.5))
        base = s["detector"]["auc"]["uncertainty"]
        out.append(f"| {f['model']} | {f['verdicts'].get('steps_1', 'n/a')} | {_ci(**_est(rho))} | {_ci(**_est(part))} | "
                   f"{best} {_ci(**_est(bp))} | {top} {_ci(**_est(auc[top]))} | {_ci(**_est(base))} |")
    out += ["", "Reading: a partial rho whose interval holds 0 says the measure tells nothing about the minimal distance "
            "beyond the clean logit margin and the first-order estimate margin / |grad margin|; a detector AUC below "
            "0.5 means the measure is larger on clean images than on the attack's (its direction is then a property "
            "of the attack: a high-confidence PGD example sits where the loss is flat). The reference models are "
            "ReLU networks: their decision boundary is piecewise flat (boundary curvature 0) and their loss Hessian "
            "is J^T (diag p - p p^T) J, so every curvature measure here is a function of the softmax probabilities "
            "and the logits' Jacobian.", ""]
    return out


def _est(e: dict) -> dict:
    return {"v": e["value"], "lo": e["low"], "hi": e["high"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(RUNS), action="append", help="run only these (repeatable)")
    parser.add_argument("--n", type=int, help="images sampled per data set (default: 300 digits, 500 MNIST / CIFAR-10)")
    parser.add_argument("--work", default="advbench-curvature/benchmark", help="where the runs are kept and resumed")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="Markdown report ('-': print only)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    names = args.only or list(RUNS)
    body, found = [], {}
    for name in names:
        raw = config_for(name, args.n)
        config = parse_curvature_config(raw)
        run = Path(args.work) / name
        t0 = time.perf_counter()
        run_curvature(config, run, config_source=f"benchmarks/curvature.py ({name})",
                      log=lambda m: print(f"[{name}] {m}", file=sys.stderr))
        seconds = time.perf_counter() - t0
        linear_config = parse_curvature_config({**raw, "bin_scale": "linear"})
        prov = json.loads((run / "run.json").read_text())
        images = pd.read_csv(run / "images.csv")
        idx = np.full(prov["data"]["sampled"], -1)
        idx[images.position] = images.data_index
        finish(run, run / "linear-bins", linear_config, prov, idx)
        lines, found[name] = section(name, run, run / "linear-bins", seconds)
        body += lines + [""]
        if args.out != "-" and name in FIGURES:
            target = Path(args.out).parent / f"curvature-{name}-{FIGURES[name]}"
            shutil.copyfile(run / FIGURES[name], target)
            body += [f"![{FIGURES[name]} of {found[name]['model']}]({target.name})", ""]
    head = ["# Input-space curvature: what it predicts on the reference models", "",
            "Command: `python benchmarks/curvature.py` (runs `advbench curvature` per data set; every number below is "
            "in that run's tables).", "",
            f"Environment: torch {torch.__version__}, 1 thread, CPU ({platform.machine()}), Python "
            f"{platform.python_version()}; the reference models are piecewise-linear ReLU networks, so every spectrum is "
            "exact (the Gauss-Newton path, checked per batch against the double backward).", ""]
    publish("\n".join(head + findings(found) + body), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
