"""The ``advbench`` command line.

    advbench evaluate [CONFIG.yaml] [--out DIR] [--save-adversarial] [--device D]
    advbench list attacks|defenses|models|datasets|traversals|transformations|recipes [PATTERN]
    advbench config            # print the embedded default config
    advbench blindspots [CONFIG.yaml] [--out DIR]   # Level Set Traversal blind-spot analysis
    advbench curvature [CONFIG.yaml] [--out DIR]    # input-space curvature and what it predicts
    advbench train CONFIG.yaml [--out NAME] [--device D] [--quiet]   # train a (defended) model
    advbench leaderboard build|check|update [--dir leaderboard] [--tolerance T]   # site, regression gate
    advbench leaderboard add RUN_DIR [--dir leaderboard]   # rank a finished run of a suite (your own models)
    advbench report RUN_DIR [--out DIR]   # tables, report.md and plots rebuilt from a run's store

Bad input of any kind prints one ``error: ...`` line and exits with code 2; no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any
from pathlib import Path

from advbench import __version__
from advbench import leaderboard as lb
from advbench.blindspots.analysis import run_blindspots
from advbench.blindspots.config import DEFAULT_BLINDSPOTS_YAML, load_blindspot_config, parse_blindspot_config
from advbench.blindspots.report import markdown
from advbench.config import DEFAULT_CONFIG_YAML, load_config
from advbench.curvature import load_curvature_config, run_curvature
from advbench.curvature.config import DEFAULT_CURVATURE_YAML
from advbench.curvature.tables import is_curvature_run, rebuild
from advbench.errors import AdvbenchError, ConfigError
from advbench.eval.evaluator import evaluate
from advbench.eval.tables import format_matrix
from advbench.registry import REGISTRIES
from advbench.report import build_report
from advbench.report.matrices import render_matrices
from advbench.training import load_train_config, train
from advbench.training.card import summary

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one ``error:`` line with exit code 2."""
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="advbench", description="Adversarial attack-and-defense benchmark for PyTorch classifiers.")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    ev = sub.add_parser("evaluate", help="run (or resume) a benchmark config; no CONFIG runs the embedded default")
    ev.add_argument("config", nargs="?", help="YAML config file (default: the embedded digits benchmark)")
    ev.add_argument("--out", help="output folder (default: advbench-runs/<config hash>)")
    ev.add_argument("--save-adversarial", action="store_true", help="also write x, x_adv, y and predictions per cell (.npz)")
    ev.add_argument("--device", help="override the config's device: cpu, cuda, cuda:N, auto")
    ev.add_argument("--seed", type=int, help="override the config's seed")
    ev.add_argument("--quiet", action="store_true", help="no progress bar and no table on stdout")
    ev.add_argument("--executor", choices=["inprocess", "ray"], help="where the jobs run (default: the config's "
                    "executor, else in this process); ray needs pip install 'advbench[ray]'")
    ev.add_argument("--address", help="ray: the cluster's head address (host:port, ray://host:port or auto; "
                    "default: a local cluster on this machine)")
    ev.add_argument("--workers", type=int, help="ray: worker processes (default: as many as the cluster's CPUs)")
    ev.add_argument("--threads", type=int, help="CPU threads per job (default: one for small models, all for "
                    "large ones; OMP_NUM_THREADS also fixes it); results do not depend on it")

    ls = sub.add_parser("list", help="list registered attacks, defenses, models or data sets")
    ls.add_argument("kind", choices=["attacks", "defenses", "models", "datasets", "traversals", "transformations", "recipes"])
    ls.add_argument("pattern", nargs="?", default="*", help="glob pattern, e.g. 'pgd*'")

    sub.add_parser("config", help="print the embedded default config (a starting point for your own)")

    bs = sub.add_parser("blindspots", help="Level Set Traversal blind-spot analysis; no CONFIG runs the embedded default")
    bs.add_argument("config", nargs="?", help="YAML config file (default: digits + digits-cnn, under a minute)")
    bs.add_argument("--out", help="output folder (default: advbench-blindspots/<config hash>)")
    bs.add_argument("--device", help="override the config's device: cpu, cuda, cuda:N, auto")
    bs.add_argument("--seed", type=int, help="override the config's seed")
    bs.add_argument("--print-config", action="store_true", help="print the embedded default config and exit")
    bs.add_argument("--quiet", action="store_true", help="no progress lines and no tables on stdout")

    cv = sub.add_parser("curvature", help="input-space curvature (Hessian spectra) per image and what it predicts; "
                        "no CONFIG runs the embedded default")
    cv.add_argument("config", nargs="?", help="YAML config file (default: digits + digits-cnn, about a minute)")
    cv.add_argument("--out", help="output folder (default: advbench-curvature/<config hash>); rerunning into it "
                    "resumes: finished batches are kept")
    cv.add_argument("--device", help="override the config's device: cpu, cuda, cuda:N, auto")
    cv.add_argument("--seed", type=int, help="override the config's seed")
    cv.add_argument("--print-config", action="store_true", help="print the embedded default config and exit")
    cv.add_argument("--quiet", action="store_true", help="no progress lines and no tables on stdout")

    tr = sub.add_parser("train", help="train a model from a train config (recipes: plain, madry, fast, trades, "
                        "distillation, thermometer); `evaluate` then loads it with {name: X, trained: NAME}")
    tr.add_argument("config", help="YAML train config (see configs/train-*.yaml)")
    tr.add_argument("--out", metavar="NAME", help="override the config's name: the model goes to <ADVBENCH_CACHE>/trained/NAME/")
    tr.add_argument("--device", help="override the config's device: cpu, cuda, cuda:N, auto")
    tr.add_argument("--quiet", action="store_true", help="no progress bar and no card summary on stdout")

    lb = sub.add_parser("leaderboard", help="render the leaderboard, or rerun its suite as a regression gate")
    lb.add_argument("action", choices=["build", "check", "update", "add"],
                    help="build: render the site (index.html, rankings/, models/), README.md and the RobustBench "
                    "export from the entries; check: rerun the suites and exit 1 when a number moves beyond the "
                    "tolerance; update: rerun the suites and rewrite their entries; add RUN_DIR: turn a finished "
                    "run of a suite (with your own models) into entries")
    lb.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="add only: a folder written by 'advbench evaluate'")
    lb.add_argument("--dir", default="leaderboard", help="leaderboard folder with suite.yaml and entries/ (default: leaderboard)")
    lb.add_argument("--tolerance", type=float, default=None,
                    help="check only: largest allowed absolute change of an accuracy (default: 0.01)")

    rp = sub.add_parser("report", help="rebuild a run's tables (CSV, JSON, Markdown), report.md and plots from its "
                        "stored results, without rerunning any attack")
    rp.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by 'advbench evaluate' or 'advbench curvature'")
    rp.add_argument("--out", help="output folder (default: RUN_DIR/report)")
    return p


def cmd_evaluate(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {k: v for k, v in (("device", args.device), ("seed", args.seed)) if v is not None}
    executor = {k: v for k, v in (("name", args.executor), ("address", args.address), ("workers", args.workers))
                if v is not None}
    if executor == {"name": "inprocess"}:  # in process: the config's Ray settings no longer apply
        overrides["executor"] = "inprocess"
    elif executor:  # merged into the config's executor field by field
        overrides["executor"] = executor
    config = load_config(args.config, overrides)
    out = Path(args.out) if args.out else Path("advbench-runs") / config.hash()
    result = evaluate(
        config,
        out,
        save_adversarial=args.save_adversarial,
        progress=False if args.quiet else None,
        config_source=str(args.config) if args.config else None,
        warn=True,
        threads=args.threads,
    )
    if config.analysis is not None:  # the matrices' records rendered beside them
        render_matrices(out)
    if not args.quiet:
        print(format_matrix(result.matrix))
        print(
            f"\n{len(result.table)} rows -> {out / 'results.csv'} "
            f"({result.jobs_run} jobs run, {result.jobs_skipped} resumed from {out / 'results.sqlite'})"
        )
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    reg = REGISTRIES[args.kind]
    entries = reg.entries(args.pattern)
    width = max((len(e.name) for e in entries), default=0)
    for e in entries:
        source = "" if e.source == "builtin" else f"  [{e.source}]"
        print(f"{e.name:<{width}}  {e.description}{source}")
    for name, err in reg.plugin_errors.items():
        print(f"warning: plugin {name!r} failed to load: {err}", file=sys.stderr)
    if not entries:
        print(f"(no {args.kind} match {args.pattern!r})", file=sys.stderr)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    print(DEFAULT_CONFIG_YAML, end="")
    return 0


def cmd_blindspots(args: argparse.Namespace) -> int:
    if args.print_config:
        print(DEFAULT_BLINDSPOTS_YAML, end="")
        return 0

    config = load_blindspot_config(args.config)
    overrides = {k: v for k, v in (("device", args.device), ("seed", args.seed)) if v is not None}
    if overrides:
        config = parse_blindspot_config({**config.canonical(), **overrides})
    out = Path(args.out) if args.out else Path("advbench-blindspots") / config.hash()
    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    result = run_blindspots(config, out, config_source=str(args.config) if args.config else None, log=log)
    if not args.quiet:
        print(markdown(result.distance_table, result.confidence_table, config.deltas, result.summary, result.notes))
        print(f"files -> {out}")
    return 0


def cmd_curvature(args: argparse.Namespace) -> int:
    if args.print_config:
        print(DEFAULT_CURVATURE_YAML, end="")
        return 0
    overrides = {k: v for k, v in (("device", args.device), ("seed", args.seed)) if v is not None}
    config = load_curvature_config(args.config, overrides)
    out = Path(args.out) if args.out else Path("advbench-curvature") / config.hash()
    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    run_curvature(config, out, config_source=str(args.config) if args.config else None, log=log)
    if not args.quiet:
        print((out / "tables.md").read_text(), end="")
        print(f"\nfiles -> {out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in (("name", args.out), ("device", args.device)) if v is not None}
    config = load_train_config(args.config, overrides)
    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    result = train(config, progress=False if args.quiet else None, log=log)
    if not args.quiet and result.card is not None:
        print(summary(result.card))
        print(f"model -> {result.folder} (evaluate it with: models: [{{name: {config.name}, trained: {config.name}}}])")
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    if args.tolerance is not None and args.action != "check":
        raise ConfigError("--tolerance applies to 'leaderboard check' only")
    tolerance = lb.DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance
    if (args.run_dir is not None) != (args.action == "add"):
        raise ConfigError("'leaderboard add' takes a RUN_DIR, and only 'add' does")
    if args.action == "add":
        paths = lb.add_run(args.dir, args.run_dir)
        print(f"{len(paths)} entries -> {Path(args.dir) / 'entries'}; run 'advbench leaderboard build' to rank them")
        return 0
    if args.action == "build":
        paths = lb.build(args.dir)
        rankings = lb.rankings(lb.load_entries(args.dir))
        print(f"{sum(len(r.entries) for r in rankings)} entries in {len(rankings)} rankings -> {len(paths)} files under "
              f"{args.dir} (open {Path(args.dir) / 'index.html'})")
        return 0
    stored = lb.load_entries(args.dir) if args.action == "check" else {}
    lb.check_tolerance(tolerance)
    measured, seconds = lb.run_suite(args.dir)
    if args.action == "update":
        paths = lb.write_entries(args.dir, measured)
        print(f"{len(paths)} entries -> {Path(args.dir) / 'entries'} ({seconds:.1f} s); "
              "run 'advbench leaderboard build' to render them")
        return 0
    diffs = lb.compare(stored, measured, tolerance)
    if diffs:
        models = [d for d in diffs if d.model_changed]
        numbers = [d for d in diffs if not d.model_changed]
        print(f"leaderboard check FAILED ({seconds:.1f} s)")
        if models:
            print(f"\nthe model changed: {len(models)} entr{'y' if len(models) == 1 else 'ies'} measured on other "
                  f"weights than now (another checkpoint, or a model trained here instead of the shipped one)\n"
                  f"{lb.format_differences(models)}")
        if numbers:
            print(f"\nthe numbers changed: {len(numbers)} difference(s) beyond tolerance {tolerance:g}"
                  f"{' (beside the model changes above)' if models else ' on the same models'}\n"
                  f"{lb.format_differences(numbers)}")
        print("\n(if the change is intended: advbench leaderboard update && advbench leaderboard build)")
        return 1
    print(f"leaderboard check passed: {len(measured)} entries within tolerance {tolerance:g} ({seconds:.1f} s)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    if is_curvature_run(args.run_dir):
        result = rebuild(args.run_dir, args.out)
        print((result.out / "tables.md").read_text(), end="")
        print(f"\nreport -> {result.out / 'tables.md'} ({len(result.files)} files)")
        return 0
    report = build_report(args.run_dir, args.out)
    print(format_matrix(report.matrix))
    if len(report.missing):
        print(f"\n{len(report.missing)} cell(s) missing or partial (see report.md); rerun 'advbench evaluate' to finish the run")
    print(f"\nreport -> {report.folder / 'report.md'} ({len(report.files)} files)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    handlers = {
        "evaluate": cmd_evaluate, "list": cmd_list, "config": cmd_config, "blindspots": cmd_blindspots, "curvature": cmd_curvature,
        "train": cmd_train,
        "leaderboard": cmd_leaderboard, "report": cmd_report,
    }

    try:
        return handlers[args.command](args)
    except AdvbenchError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("error: interrupted; finished jobs are stored, rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001
        if os.environ.get("ADVBENCH_DEBUG"):
            raise
        print(
            f"error: internal error {type(exc).__name__}: {_one_line(exc)} "
            "(a bug in advbench or a plugin; rerun with ADVBENCH_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
