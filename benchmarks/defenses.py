"""Defenses under naive and adaptive attacks: issue 4's four findings on the digits set.

Trains the models ``configs/defenses.yaml`` evaluates where they are missing (each ``trained:``
model from ``configs/train-<name>.yaml`` through :func:`advbench.training.train`; a model already
trained with the same config is reused), runs that evaluation
(:func:`advbench.eval.evaluator.evaluate`) and reports, from its results table and its
gradient-masking checks, whether

1. naive PGD reports high robust accuracy for the thermometer-encoded model while PGD through
   BPDA drives it near the undefended model's number;
2. naive PGD against the randomized model (Xie et al.'s random resize and pad) scores higher
   robust accuracy than PGD with EoT;
3. Madry's adversarial training raises PGD robust accuracy far above the undefended model's at
   the same eps, with no gradient-masking flag on it;
4. distillation's apparent robustness against PGD on the cross-entropy disappears under PGD on
   C&W's margin loss on logits.

The models' roles come from their training cards (recipe ``plain``, ``madry``, ``distillation``,
``thermometer``) and the randomized model is the undefended one behind the config's
``randomization`` defense. Thresholds: "far above" / "high" is at least 20 points
(:data:`FAR`), "near" at most 5 points above (:data:`NEAR`), "higher" more than the masking
checks' tolerance (3 examples, at least 1 point). A finding that does not hold is reported in
the text; only a failed training or evaluation makes the script exit non-zero.

    python benchmarks/defenses.py                  # 360 test digits, about 3 minutes on 2 cores
    python benchmarks/defenses.py --quick --out -  # smoke run: 60 digits, 10 steps, no file
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from _common import publish  # benchmarks/ is on sys.path when a script runs

from advbench.config import BenchmarkConfig, parse_config, read_yaml_file
from advbench.eval.evaluator import EvaluationResult, defense_spec, evaluate
from advbench.eval.masking import FLAGS, tolerance
from advbench.eval.tables import WORST_CASE
from advbench.training import load_train_config, read_card, train

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "defenses.yaml")
DEFAULT_OUT = os.path.join(HERE, "results", "defenses.md")
FAR = 0.20  # "high" / "far above": at least this much robust accuracy above the reference
NEAR = 0.05  # "near" the undefended model: at most this much above it
ADAPTIVE = ("+bpda", "+eot", "+bpda+eot")
QUICK = {"n": 60, "steps": 10, "restarts": 1, "eot_samples": 3, "draws": 2}


# ---------------------------------------------------------------------------- setup
def load(path: str, n: int | None, quick: bool) -> BenchmarkConfig:
    """The evaluation config, with ``--n`` and ``--quick`` applied to its raw mapping."""
    raw = read_yaml_file(path)
    if quick:
        n = n or QUICK["n"]
        raw["eot_samples"], raw["draws"] = QUICK["eot_samples"], QUICK["draws"]
        for a in raw["attacks"]:
            for k in ("steps", "restarts"):
                if isinstance(a, dict) and k in a:
                    a[k] = QUICK[k]
    if n is not None:
        raw["data"] = {**raw["data"], "n": n}
    return parse_config(raw)


def train_missing(config: BenchmarkConfig, log: Callable[[str], None]) -> float:
    """Train every ``trained:`` model of the config from configs/train-<name>.yaml (skipped when
    already trained with that config, or trained without such a file); the seconds it took."""
    began = time.perf_counter()
    for m in config.models:
        path = os.path.join(ROOT, "configs", f"train-{m.trained}.yaml")
        if m.trained is not None and (os.path.exists(path) or read_card(m.trained) is None):
            result = train(load_train_config(path), progress=False, log=log)
            if not result.skipped:
                log(f"trained {m.trained}: clean {result.card['clean_accuracy']:.1%}, "
                    f"PGD robust {result.card['robust_accuracy']:.1%}")
    return time.perf_counter() - began


# ---------------------------------------------------------------------------- reading results
@dataclass
class Roles:
    """Which model and defense plays which part in the findings (None: not in the config)."""

    models: dict[str, str] = field(default_factory=dict)  # recipe -> model name
    randomized: str | None = None  # the defense entry holding the randomization stage
    pgd: str | None = None  # attack labels
    margin: str | None = None
    fgsm: str | None = None

    @classmethod
    def of(cls, config: BenchmarkConfig) -> Roles:
        out = cls()
        for m in config.models:
            card = read_card(m.trained) if m.trained is not None else None
            out.models.setdefault(card["recipe"]["name"] if card else "plain", m.name)
        for d in config.defenses:
            stages = defense_spec(d).get("stages") or [defense_spec(d)]
            if out.randomized is None and any(s["name"] == "randomization" for s in stages):
                out.randomized = d.name
        for a, label in zip(config.attacks, config.attack_labels()):
            if a.name == "pgd" and a.params.get("loss", "ce") == "ce":
                out.pgd = out.pgd or label
            elif a.name == "pgd" and a.params.get("loss") == "margin":
                out.margin = out.margin or label
            elif a.name == "fgsm":
                out.fgsm = out.fgsm or label
        return out

    def model(self, recipe: str) -> str | None:
        return self.models.get(recipe)


class Results:
    """Lookups into the evaluator's results table."""

    def __init__(self, table: pd.DataFrame) -> None:
        table = table[(table.norm == "linf") & (table.targeting == "untargeted")]  # the findings' threat model
        self.t = table.fillna({"flags": ""}) if "flags" in table else table.assign(flags="")
        self.eps = sorted(float(e) for e in table.eps.unique())

    def row(self, model: str | None, defense: str | None, attack: str | None, eps: float) -> Any:
        if model is None or defense is None or attack is None:
            return None
        t = self.t
        hit = t[(t.model == model) & (t.defense == defense) & (t.attack == attack) & np.isclose(t.eps, eps)]
        return None if hit.empty else hit.iloc[0]

    def ra(self, model: str | None, defense: str | None, attack: str | None, eps: float) -> float | None:
        r = self.row(model, defense, attack, eps)
        return None if r is None else float(r.robust_accuracy)

    def clean(self, model: str | None, defense: str | None) -> float | None:
        t = self.t[(self.t.model == model) & (self.t.defense == defense)]
        return None if t.empty else float(t.clean_accuracy.iloc[0])

    def n(self) -> int:
        return int(self.t.n.min())

    def adaptive_label(self, model: str, defense: str, attack: str) -> str | None:
        labels = set(self.t[(self.t.model == model) & (self.t.defense == defense)].attack)
        return next((attack + s for s in ADAPTIVE if attack + s in labels), None)

    def flags(self, model: str, defense: str) -> list[str]:
        rows = self.t[(self.t.model == model) & (self.t.defense == defense)]
        return sorted({c for f in rows["flags"] for c in f.split(";") if c})


def pct(v: float | None) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{100 * v:.1f}%"


def pts(v: float) -> str:
    return f"{100 * v:+.1f} pts"


def trained_by(model: str | None) -> str:
    """`` (configs/train-<name>.yaml)`` where the model comes from that file, else ''."""
    path = f"configs/train-{model}.yaml"
    return f" (`{path}`)" if model and os.path.exists(os.path.join(ROOT, path)) else ""


def params(p: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in p.items())


# ---------------------------------------------------------------------------- the table
def cell(row: Any) -> str:
    if row is None:
        return ""
    flags = row["flags"].replace(";", ", ")
    return pct(row.robust_accuracy) + (f" ({flags})" if flags else "")


def table(res: Results, config: BenchmarkConfig, pairs: list[tuple[str, str]]) -> str:
    """Robust accuracy per (model, defense, attack): naive and adaptive side by side at each eps,
    with the row's masking flags in brackets."""
    head = ["model", "defense", "clean", "attack", "adaptive"]
    for e in res.eps:
        head += [f"eps {e:g} naive", f"eps {e:g} adaptive"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] * 2 + ["---:", "---", "---"]
                                                               + ["---:"] * 2 * len(res.eps)) + " |"]
    for model, defense in pairs:
        for i, attack in enumerate([*config.attack_labels(), WORST_CASE]):
            adaptive = res.adaptive_label(model, defense, attack)
            cols = [model, defense, pct(res.clean(model, defense))] if i == 0 else ["", "", ""]
            cols += [attack, adaptive[len(attack) + 1:] if adaptive else ""]
            for e in res.eps:
                cols += [cell(res.row(model, defense, attack, e)), cell(res.row(model, defense, adaptive, e))]
            lines.append("| " + " | ".join(cols) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the findings
@dataclass
class Finding:
    title: str
    verdict: str  # holds | partly holds | does not hold | not measured
    lines: list[str]
    caveat: str = ""


def verdict(per_eps: list[str]) -> str:
    """'holds' at every eps -> holds; some 'holds' or 'partly' -> partly holds; else does not hold."""
    if not per_eps or "n/a" in per_eps:
        return "not measured"
    if all(v == "holds" for v in per_eps):
        return "holds"
    return "partly holds" if any(v in ("holds", "partly") for v in per_eps) else "does not hold"


def thermometer(res: Results, roles: Roles) -> Finding:
    therm, plain = roles.model("thermometer"), roles.model("plain")
    bpda = res.adaptive_label(therm, "none", roles.pgd) if therm and roles.pgd else None
    lines, states, gaps = [], [], []
    for e in res.eps:
        naive, adapt = res.ra(therm, "none", roles.pgd, e), res.ra(therm, "none", bpda, e)
        ref = res.ra(plain, "none", roles.pgd, e)
        if None in (naive, adapt, ref):
            states.append("n/a")
            continue
        gaps.append(adapt - ref)
        high, near = naive >= ref + FAR, adapt <= ref + NEAR
        states.append("holds" if high and near else "partly" if naive - adapt >= FAR else "no")
        lines.append(f"eps {e:g}: naive PGD {pct(naive)}, PGD through BPDA {pct(adapt)}, undefended {pct(ref)} "
                     f"(BPDA {pts(adapt - ref)} from the undefended number)")
    v = verdict(states)
    caveat = ""
    if gaps and max(gaps) > NEAR:
        caveat = (f"Thermometer: PGD through BPDA stays up to {pts(max(gaps))} above the undefended model: the "
                  "soft ramp's gradient is not the hard encoding's, and the model trained on codes is another "
                  "model than the undefended one; see whether the margin loss through BPDA (the adaptive "
                  "pgd-margin row), more steps or restarts narrow it.")
    return Finding("1. Thermometer encoding: naive PGD vs PGD through BPDA", v, lines, caveat)


def randomization(res: Results, roles: Roles) -> Finding:
    plain, rand = roles.model("plain"), roles.randomized
    lines, states, gaps = [], [], []
    tol = tolerance(res.n())
    for e in res.eps:
        pairs = {a: (res.ra(plain, rand, a, e), res.ra(plain, rand, res.adaptive_label(plain, rand, a), e))
                 for a in (roles.pgd, roles.fgsm, roles.margin) if a and plain and rand}
        naive, eot = pairs.get(roles.pgd, (None, None))
        if naive is None or eot is None:
            states.append("n/a")
            continue
        gaps.append(naive - eot)
        states.append("holds" if naive > eot + tol else "no")
        extra = "; ".join(f"{a} {pct(n_)} vs {pct(e_)}" for a, (n_, e_) in pairs.items() if a != roles.pgd)
        lines.append(f"eps {e:g}: naive PGD {pct(naive)}, PGD with EoT {pct(eot)} (naive - EoT: {pts(naive - eot)}; "
                     f"the checks' tolerance: {100 * tol:.1f} pts)" + (f"; naive vs EoT: {extra}" if extra else ""))
    v = verdict(states)
    caveat = ""
    if plain and rand and gaps:
        clean_u, clean_r = res.clean(plain, "none"), res.clean(plain, rand)
        caveat = (f"Randomization: the defense costs clean accuracy on 8x8 digits ({pct(clean_u)} -> "
                  f"{pct(clean_r)}, averaged over draws)")
        refs = [(res.ra(plain, rand, roles.pgd, e), res.ra(plain, "none", roles.pgd, e)) for e in res.eps]
        below = all(r is not None and u is not None and r < u for r, u in refs)
        caveat += ", so even naive PGD leaves it below the undefended model's robust accuracy." if below else "."
        if max(gaps) < FAR / 4:
            caveat += (f" EoT gains little over the naive attack (naive - EoT: {pts(min(gaps))} to "
                       f"{pts(max(gaps))}): the deployed model draws afresh at every forward pass, so naive PGD "
                       "already averages its gradient over a new draw at each of its steps, a one-sample EoT.")
    return Finding("2. Randomization (random resize and pad): naive PGD vs PGD with EoT", v, lines, caveat)


def madry(res: Results, roles: Roles, masking: dict[str, Any]) -> Finding:
    adv, plain = roles.model("madry"), roles.model("plain")
    lines, states, gaps = [], [], []
    for e in res.eps:
        robust, ref = res.ra(adv, "none", roles.pgd, e), res.ra(plain, "none", roles.pgd, e)
        if robust is None or ref is None:
            states.append("n/a")
            continue
        gaps.append(robust - ref)
        states.append("holds" if robust >= ref + FAR else "partly" if robust > ref else "no")
        lines.append(f"eps {e:g}: PGD {pct(robust)} on {adv} vs {pct(ref)} undefended ({pts(robust - ref)})")
    found = [f for f in masking.get("findings", []) if adv and f["where"].get("model") == adv
             and f["where"].get("defense") in ("none", None)]
    flags = res.flags(adv, "none") if adv else []
    codes = sorted(set(flags) | {f["code"] for f in found})
    if adv:
        lines.append(f"gradient-masking flags on {adv} (no defense): {', '.join(codes) if codes else 'none'}")
    v = verdict(states)
    if codes and v == "holds":
        v = "partly holds"
    caveat = ""
    if codes:
        caveat = f"Madry: the masking checks flag {adv}: " + "; ".join(f"{f['code']}: {f['seen']}" for f in found)
        caveat += "."
    elif gaps and min(gaps) < FAR:
        caveat = (f"Madry: the gain shrinks to {pts(min(gaps))} at the larger eps, beyond the eps the model was "
                  "trained for.")
    return Finding("3. Adversarial training (Madry): PGD vs the undefended model, masking flags", v, lines, caveat)


def distillation(res: Results, roles: Roles) -> Finding:
    dist, plain = roles.model("distillation"), roles.model("plain")
    lines, states = [], []
    for e in res.eps:
        ce, margin = res.ra(dist, "none", roles.pgd, e), res.ra(dist, "none", roles.margin, e)
        refs = [r for r in (res.ra(plain, "none", a, e) for a in (roles.pgd, roles.margin)) if r is not None]
        if ce is None or margin is None or not refs:
            states.append("n/a")
            continue
        ref = min(refs)
        apparent, gone = ce >= ref + FAR, margin <= ref + NEAR
        states.append("holds" if apparent and gone else "partly" if ce - margin >= FAR else "no")
        lines.append(f"eps {e:g}: PGD (cross-entropy) {pct(ce)}, PGD (margin) {pct(margin)}, undefended "
                     f"(best PGD) {pct(ref)}")
    v = verdict(states)
    flags = res.flags(dist, "none") if dist else []
    why = (" (trained on logits / T, the student deployed at T = 1 has logits about T times larger: the softmax "
           "saturates and the cross-entropy's input gradient underflows to zero)") if "grad_zero" in flags else ""
    if dist:
        lines.append(f"gradient-masking flags on {dist}: {', '.join(flags) or 'none'}{why}")
    clean_d, clean_u = res.clean(dist, "none"), res.clean(plain, "none")
    caveat = []
    if clean_d is not None and clean_u is not None and clean_d < clean_u - 0.01:
        caveat.append(f"Distillation: the student's clean accuracy is {pct(clean_d)} against {pct(clean_u)} for the "
                      "undefended model, which caps its robust accuracy too.")
    if why:
        caveat.append("The grad_zero flag, measured on the cross-entropy, marks every white-box row of the model, "
                      "the margin rows too, whose numbers are not masked.")
    return Finding("4. Defensive distillation: PGD on the cross-entropy vs on the margin loss", v, lines,
                   " ".join(caveat))


# ---------------------------------------------------------------------------- the report
def report(args: argparse.Namespace, argv: list[str], config: BenchmarkConfig, result: EvaluationResult,
           seconds: dict[str, float]) -> str:
    res, roles = Results(result.table), Roles.of(config)
    findings = [thermometer(res, roles), randomization(res, roles), madry(res, roles, result.masking),
                distillation(res, roles)]
    plain = roles.model("plain")
    key = [(m, "none") for m in map(roles.model, ("plain", "madry", "distillation", "thermometer")) if m]
    if plain and roles.randomized:
        key.insert(1, (plain, roles.randomized))
    rest = [(m.name, d.name) for m in config.models for d in config.defenses if (m.name, d.name) not in key]
    codes = sorted({c for f in res.t["flags"] for c in f.split(";") if c}, key=list(FLAGS).index)
    summary = "\n".join(f"| {f.title} | **{f.verdict}** |" for f in findings)
    details = "\n\n".join(f"**{f.title}: {f.verdict}.**\n\n" + "\n".join(f"- {line}" for line in f.lines)
                          for f in findings)
    caveats = "\n\n".join(f.caveat for f in findings if f.caveat)
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/defenses.py", *argv])
    attacks = ", ".join(f"`{label}`" + (f" ({params(spec.params)})" if spec.params else "")
                        for spec, label in zip(config.attacks, config.attack_labels()))
    rand = next((d for d in config.defenses if d.name == roles.randomized), None)
    quick = "\n**Smoke run (--quick): the numbers are not the benchmark's.**\n" if args.quick else ""
    where = f"`{args.eval_dir}` (results.csv, masking.json)" if args.eval_dir else "a temporary folder, removed"
    eps = ", ".join(f"{e:g}" for e in res.eps)
    rest_text = ("The rest of the cross product (randomization in front of the trained defenses):\n\n"
                 f"{table(res, config, rest)}\n") if rest else ""
    return f"""# Defenses under naive and adaptive attacks (issue 4's quality bar)
{quick}
`{os.path.relpath(args.config, ROOT)}` on the digits test split ({res.n()} images), linf eps {eps}. Attacks:
{attacks}.

Every white-box attack on a model with a non-differentiable or randomized stage runs naively (the
deployed model's own gradients) and adaptively (BPDA through the thermometer's soft ramp, EoT over
{config.eot_samples} draws, or both); a randomized model is scored over {config.draws} draws
(`randomized_scoring: {config.randomized_scoring}`). The undefended reference is `{plain}`{trained_by(plain)}; the
randomized model is `{plain}` behind `{roles.randomized}` ({params(rand.params) if rand else ''}).
"Far above" and "high" mean at least {100 * FAR:.0f} points above, "near" at most {100 * NEAR:.0f}
points above.

Command: `{command}`

Environment: torch {torch.__version__} on the CPU ({platform.machine()}, {os.cpu_count()} cores shared
with other work), {args.threads} intra-op thread(s), Python {platform.python_version()}. Training (or
finding the trained models): {seconds['train']:.0f} s; evaluation: {seconds['eval']:.0f} s
({result.jobs_run} jobs run, {result.jobs_skipped} resumed); output in {where}.

## Findings

| finding | verdict |
| --- | --- |
{summary}

{details}

{caveats}

## Robust accuracy

Robust accuracy (an example counts if the model is right on it and the attack fails; randomized
models: averaged over the draws) with the row's gradient-masking flags in brackets. `adaptive`
names the adaptive view; `worst-case` counts an example as broken if any attack, naive or
adaptive, broke it.

{table(res, config, key)}

Flags: {'; '.join(f'`{c}`: {FLAGS[c]}' for c in codes) if codes else 'none'}. Details and what
to try for each are in masking.json.

{rest_text}"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=DEFAULT_CONFIG, help="evaluation config (default configs/defenses.yaml)")
    p.add_argument("--n", type=int, default=None, help="evaluate N test digits (a seeded sample; default: all 360)")
    p.add_argument("--eval-dir", default=None, help="keep the evaluation here (resumable; default: a temp folder)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--out", default=DEFAULT_OUT, help="markdown file to write ('-' for none)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 60 digits, PGD 10 steps without restarts, 3 EoT samples, 2 draws")
    args = p.parse_args(argv)
    shown = argv if argv is not None else sys.argv[1:]
    torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr)

    try:
        config = load(args.config, args.n, args.quick)
        seconds = {"train": train_missing(config, log)}
        began = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="advbench-defenses-") as tmp:
            result = evaluate(config, args.eval_dir or tmp, progress=False, config_source=args.config)
        seconds["eval"] = time.perf_counter() - began
    except Exception as exc:  # noqa: BLE001 - any failure of training or evaluation fails the script
        log(f"defenses benchmark failed: {type(exc).__name__}: {exc}")
        return 1
    publish(report(args, shown, config, result, seconds), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
