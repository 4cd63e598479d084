"""The blind-spot analysis end to end: pairs, traversals, distances, triangles, tables, picture.

For ``sources`` correctly classified images, each traversed toward two targets of other classes,
it measures the paper's Table 1 (distances between each LST output and its target) and Table 2
(confidence over the triangle source / LST output 1 / LST output 2 and along the straight paths
from the source to each output), and writes them with the run's provenance (see
:func:`advbench.blindspots.report.write_outputs`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from advbench.tensors import frozen
from advbench.blindspots import metrics, report
from advbench.blindspots.config import BlindspotConfig
from advbench.blindspots.figure import FigureSpec
from advbench.blindspots.lst import LevelSetTraversal, LSTResult
from advbench.blindspots.pairs import Pairs, predictions, sample_pairs
from advbench.blindspots.triangle import TriangleStats, path_confidence, triangle_confidence, triangle_stats
from advbench.data.base import ImageData
from advbench.errors import ModelOutputError
from advbench.provenance import device_info, resolve_device, timestamp, versions
from advbench.loading import load_data, load_model


@dataclass(frozen=True)
class BlindspotResult:
    """The analysis' per-pair and per-triangle records, its two summary tables, and where they were written."""

    pairs: pd.DataFrame
    triangles: pd.DataFrame
    distance_table: pd.DataFrame
    confidence_table: pd.DataFrame
    summary: dict[str, Any]
    out: Path
    notes: list[str] = field(default_factory=list)


def run_blindspots(
    config: BlindspotConfig,
    out_dir: str | Path,
    *,
    config_source: str | None = None,
    log: Callable[[str], None] | None = None,
) -> BlindspotResult:
    """Run the analysis ``config`` describes and write its files into ``out_dir``."""
    say = log or (lambda _msg: None)
    started, t0 = timestamp(), time.perf_counter()
    out = Path(out_dir)
    device = resolve_device(config.device)
    lst = config.traversal()
    lpips_metric = metrics.LPIPSDistance(config.lpips_weights, device=device)

    data = load_data(config.data.model_dump(mode="json"))
    indices = data.sample_indices(config.data.n, config.seed)  # the pool pairs are drawn from
    pool = data.subset(indices)
    model = load_model(config.model.model_dump(mode="json", by_alias=True)).to(device)
    label = config.model.name
    with frozen(model):
        pred = _checked_predictions(model, pool.x, config.batch_size, device)
        pairs = sample_pairs(pool, pred, config.sources, config.seed)
        say(f"{config.sources} sources x 2 targets from {pool.name}/{pool.split} ({pairs.candidates} correctly "
            f"classified of {len(pool)}); LST {lst.params()}")
        source = pool.x[pairs.source].repeat_interleave(2, dim=0)
        target = pool.x[pairs.targets.reshape(-1)]
        y = pairs.label.repeat_interleave(2)
        t_lst = time.perf_counter()
        result = _traverse(lst, model, source, target, y, config, device)
        lst_seconds = time.perf_counter() - t_lst
        say(f"LST done in {lst_seconds:.1f} s ({result.n_forward} forward / {result.n_backward} backward passes)")
        x_lst = result.x_lst
        p_target = _confidence(model, x_lst, pool.y[pairs.targets.reshape(-1)], config.batch_size, device)
        n = config.sources
        src_dev, l1, l2 = pool.x[pairs.source].to(device), x_lst[0::2].to(device), x_lst[1::2].to(device)
        lab = pairs.label.to(device)
        tri = triangle_confidence(model, src_dev, l1, l2, lab, resolution=config.grid, batch_size=config.batch_size)
        paths = [
            path_confidence(model, src_dev, end, lab, points=config.grid + 1, batch_size=config.batch_size)
            for end in (l1, l2)
        ]
    stats = triangle_stats(result.p_src[0::2].to(device), tri, paths, config.deltas)

    pair_rows = _pair_records(pool, indices, pairs, result, target, p_target, lpips_metric, config)
    tri_rows = _triangle_records(indices, pairs, stats, n)
    dist_table, conf_table = report.summary_tables(pair_rows, tri_rows, label, config.deltas)
    reached = pair_rows["reached"].mean()
    notes = [lpips_metric.note, f"SSIM: scikit-image structural_similarity, {metrics.ssim_settings(*pool.x.shape[2:])}"]
    summary = {
        "model": label,
        "pairs": int(len(pair_rows)),
        "triangles": int(n),
        "rmse_goal": config.rmse_goal,
        "fraction_reached": float(reached),
        "fraction_within_delta": float(pair_rows["within_delta"].mean()),
        "fraction_stopped": float(pair_rows["stopped"].mean()),
        "mean_iterations": float(pair_rows["iterations"].mean()),
        "n_forward": result.n_forward,
        "n_backward": result.n_backward,
        "lst_seconds": round(lst_seconds, 3),
        "lpips_available": lpips_metric.available,
    }
    provenance = _provenance(config, config_source, lst, pool, pairs, device, started, t0, model, notes)
    figure = _figure_spec(pool, pairs, result, tri, min(config.examples, n), config.grid, label)
    report.write_outputs(out, pair_rows, tri_rows, dist_table, conf_table, summary, provenance, figure)
    return BlindspotResult(pair_rows, tri_rows, dist_table, conf_table, summary, out, notes)


# ---------------------------------------------------------------------- steps
def _checked_predictions(model: torch.nn.Module, x: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    try:
        with torch.no_grad():
            probe = model(x[:1].to(device))
    except RuntimeError as exc:
        raise ModelOutputError(
            f"the model cannot take the data's {tuple(x.shape[1:])} images: {' '.join(str(exc).split())[:200]}"
        ) from None
    if not isinstance(probe, torch.Tensor) or probe.dim() != 2:
        raise ModelOutputError("the model must return logits of shape (N, classes)")
    return predictions(model, x, batch_size=batch_size, device=device)


def _traverse(
    lst: LevelSetTraversal,
    model: torch.nn.Module,
    source: torch.Tensor,
    target: torch.Tensor,
    y: torch.Tensor,
    config: BlindspotConfig,
    device: torch.device,
) -> LSTResult:
    """LST over all pairs in chunks of ``batch_size`` (pairs are independent), merged on the CPU."""
    gen = torch.Generator().manual_seed(config.seed)
    parts = []
    for s in range(0, source.shape[0], config.batch_size):
        sl = slice(s, s + config.batch_size)
        parts.append(lst(model, source[sl].to(device), target[sl].to(device), y[sl].to(device), generator=gen))
    cat = lambda name: torch.cat([getattr(p, name).cpu() for p in parts])  # noqa: E731
    return LSTResult(
        x_lst=cat("x_lst"), label=cat("label"), p_src=cat("p_src"), p_final=cat("p_final"),
        iterations=cat("iterations"), stopped=cat("stopped"), confidence=cat("confidence"), path=None, path_steps=(),
        n_forward=sum(p.n_forward for p in parts), n_backward=sum(p.n_backward for p in parts),
        traversal=parts[0].traversal, params=parts[0].params, seed=parts[0].seed,
    )


def _provenance(
    config: BlindspotConfig,
    config_source: str | None,
    lst: LevelSetTraversal,
    pool: ImageData,
    pairs: Pairs,
    device: torch.device,
    started: str,
    t0: float,
    model: torch.nn.Module,
    notes: list[str],
) -> dict[str, Any]:
    """What made the result (``run.json``): config, seed, traversal, data, versions, device, timing."""
    return {
        "advbench_blindspots": 1,
        "config": config.canonical(),
        "config_hash": config.hash(),
        "config_source": config_source or "embedded default",
        "seed": config.seed,
        "traversal": {"name": lst.name, "params": lst.params()},
        "data": {"name": config.data.name or config.data.path, "split": pool.split, "pool": len(pool),
                 "correctly_classified": pairs.candidates},
        "versions": {**versions(), **report.extra_versions()},
        "device": device_info(device),
        "started": started,
        "finished": timestamp(),
        "seconds": round(time.perf_counter() - t0, 3),
        "command": " ".join(sys.argv),
        "model_card": getattr(model, "advbench_card", None),
        "notes": notes,
    }


def _figure_spec(
    pool: ImageData, pairs: Pairs, result: LSTResult, tri: torch.Tensor, k: int, grid: int, label: str
) -> FigureSpec:
    """The first ``k`` sources, their targets and outputs, and their triangles, for the picture."""
    shape = pool.x.shape[1:]
    return FigureSpec(
        source=pool.x[pairs.source[:k]],
        targets=pool.x[pairs.targets[:k].reshape(-1)].reshape(k, 2, *shape),
        outputs=result.x_lst[: 2 * k].cpu().reshape(k, 2, *shape),
        p_src=result.p_src[0 : 2 * k : 2].cpu(),
        p_out=result.p_final[: 2 * k].cpu().reshape(k, 2),
        triangle=tri[:k].cpu(),
        resolution=grid,
        classes=pool.classes,
        labels=pairs.label[:k],
        target_labels=pool.y[pairs.targets[:k]],
        title=f"LST blind spots of {label} on {pool.name}/{pool.split}",
    )


@torch.no_grad()
def _confidence(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    out = []
    for s in range(0, x.shape[0], batch_size):
        probs = model(x[s : s + batch_size].to(device)).softmax(dim=1)
        out.append(probs.gather(1, y[s : s + batch_size].to(device)[:, None]).squeeze(1).cpu())
    return torch.cat(out)


def _pair_records(
    pool: ImageData,
    indices: torch.Tensor,
    pairs: Pairs,
    result: LSTResult,
    target: torch.Tensor,
    p_target: torch.Tensor,
    lpips_metric: metrics.LPIPSDistance,
    config: BlindspotConfig,
) -> pd.DataFrame:
    """One row per (source, target) pair: what the traversal did and how close it got (Table 1).

    ``source_index`` and ``target_index`` index the data set (not the sampled pool).
    """
    x_lst = result.x_lst
    source = pool.x[pairs.source].repeat_interleave(2, dim=0)
    target_idx = pairs.targets.reshape(-1)
    rmse = metrics.rmse(x_lst, target)
    within = result.within_delta
    return pd.DataFrame({
        "pair": range(x_lst.shape[0]),
        "triangle": torch.arange(x_lst.shape[0]).div(2, rounding_mode="floor").numpy(),
        "source_index": indices[pairs.source].repeat_interleave(2).numpy(),
        "target_index": indices[target_idx].numpy(),
        "source_class": result.label.numpy(),
        "target_class": pool.y[target_idx].numpy(),
        "p_src": result.p_src.double().numpy(),
        "p_final": result.p_final.double().numpy(),
        "p_target_class": p_target.double().numpy(),
        "iterations": result.iterations.numpy(),
        "stopped": result.stopped.numpy(),
        "within_delta": within.numpy(),
        "rmse_start": metrics.rmse(source, target).double().numpy(),
        "rmse": rmse.double().numpy(),
        "linf": metrics.linf(x_lst, target).double().numpy(),
        "ssim": metrics.ssim(x_lst, target).double().numpy(),
        "lpips": lpips_metric(x_lst, target, batch_size=config.batch_size).double().numpy(),
        "reached": ((rmse <= config.rmse_goal) & within).numpy(),
    })


def _triangle_records(indices: torch.Tensor, pairs: Pairs, stats: TriangleStats, n: int) -> pd.DataFrame:
    """One row per source: confidence over its triangle and along its two paths (Table 2)."""
    rows: dict[str, Any] = {
        "triangle": range(n),
        "source_index": indices[pairs.source].numpy(),
        "target_index_1": indices[pairs.targets[:, 0]].numpy(),
        "target_index_2": indices[pairs.targets[:, 1]].numpy(),
        "source_class": pairs.label.numpy(),
        "p_src": stats.p_src.cpu().numpy(),
        "path_confidence": stats.path_confidence.cpu().numpy(),
        "triangle_confidence": stats.triangle_confidence.cpu().numpy(),
    }
    for d, frac in stats.fractions.items():
        rows[report.fraction_column(d)] = frac.cpu().numpy()
    return pd.DataFrame(rows)
