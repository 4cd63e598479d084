"""The curvature analysis over a data set: resumable batches, then the tables and figures.

For the clean-correct images among ``data.n`` sampled ones, batch by batch (each batch a part,
see :mod:`advbench.curvature.parts`, with its own generator derived from the seed and its
position, so a resumed run equals an uninterrupted one): :func:`~advbench.analysis.curvature.batch_rows`
(spectra, curvature measures, iterative FGSM per alpha, boundary points, DeepFool), the
detector's audited adversarial examples and their curvature measures, and for the first batch
the divergence trajectories. :func:`advbench.curvature.tables.finish` then pools every part into
the tables, summary and figures (also what ``advbench report`` does for a curvature run).
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from advbench.analysis.curvature import batch_rows, detector_measures, trajectory
from advbench.curvature import tables
from advbench.curvature.config import CurvatureConfig
from advbench.curvature.parts import part_key, part_path, read_part, write_part
from advbench.data.base import ImageData
from advbench.errors import ModelOutputError
from advbench.eval.worker import examples_digest
from advbench.loading import load_data, load_model, model_digest
from advbench.provenance import device_info, resolve_device, timestamp, versions
from advbench.tensors import frozen

CurvatureResult = tables.CurvatureResult


def run_curvature(config: CurvatureConfig, out_dir: str | Path, *, config_source: str | None = None,
                  log: Callable[[str], None] | None = None) -> CurvatureResult:
    """Run (or resume) the analysis ``config`` describes and write its files into ``out_dir``."""
    say = log or (lambda _msg: None)
    started, t0 = timestamp(), time.perf_counter()
    out = Path(out_dir)
    device = resolve_device(config.device)
    data = load_data(config.data.model_dump(mode="json"))
    indices = data.sample_indices(config.data.n, config.seed)
    pool = data.subset(indices)
    model = _loaded(config.model.model_dump(mode="json", by_alias=True), device, pool)
    second = None if config.second_model is None else _loaded(
        config.second_model.model_dump(mode="json", by_alias=True), device, pool)
    digests = {"model": model_digest(config.model.model_dump(mode="json", by_alias=True), model),
               "second_model": None if second is None else model_digest(
                   config.second_model.model_dump(mode="json", by_alias=True), second)}  # type: ignore[union-attr]
    version = versions().get("advbench")
    computed = resumed = 0
    n_batches = -(-len(pool) // config.batch_size)
    for b in range(n_batches):
        lo, hi = b * config.batch_size, min(len(pool), (b + 1) * config.batch_size)
        key = part_key(config.part_key(), digests, examples_digest(pool, tuple(range(lo, hi))), version)
        path = part_path(out, b)
        if read_part(path, key) is not None:
            resumed += 1
            continue
        t_b = time.perf_counter()
        part_tables, part_spectra, info = _batch(config, model, second, pool, lo, hi, b, device)
        info["seconds"] = round(time.perf_counter() - t_b, 3)
        write_part(path, key, part_tables, part_spectra, info)
        computed += 1
        say(f"batch {b + 1}/{n_batches}: {info['images']} clean-correct images, {info['method']} spectra, "
            f"{info['seconds']:.1f} s")
    for stale in sorted((out / "parts").glob("batch-*.npz")):  # parts beyond this run's batches
        if int(stale.stem.split("-")[1]) >= n_batches:
            stale.unlink()
    provenance = {
        "advbench_curvature": 1,
        "config": config.canonical(),
        "config_hash": config.hash(),
        "config_source": config_source or "embedded default",
        "seed": config.seed,
        "data": {"name": config.data.name or config.data.path, "split": pool.split, "sampled": len(pool),
                 "indices_digest": hashlib.sha256(indices.numpy().tobytes()).hexdigest()[:20]},
        "digests": digests,
        "versions": versions(),
        "device": device_info(device),
        "parts": {"batches": n_batches, "computed": computed, "resumed": resumed},
        "started": started,
        "finished": timestamp(),
        "seconds": round(time.perf_counter() - t0, 3),
        "command": " ".join(sys.argv),
        "model_card": getattr(model, "advbench_card", None),
    }
    say(f"{computed} batch(es) computed, {resumed} resumed from {out / 'parts'}")
    return tables.finish(out, out, config, provenance, data_indices=indices.numpy())


def batch_generator(seed: int, batch: int) -> torch.Generator:
    """The batch's own generator: the same draws whether the run was resumed or not."""
    derived = int.from_bytes(hashlib.sha256(f"curvature:{seed}:{batch}".encode()).digest()[:8], "little") >> 1
    return torch.Generator().manual_seed(derived)


def _loaded(spec: dict[str, Any], device: torch.device, pool: ImageData) -> nn.Module:
    model = load_model(spec).to(device).eval()
    try:
        with torch.no_grad():
            probe = model(pool.x[:1].to(device))
    except RuntimeError as exc:
        raise ModelOutputError(f"model {spec['name']!r} cannot take the data's {tuple(pool.x.shape[1:])} images: "
                               f"{' '.join(str(exc).split())[:200]}") from None
    if not isinstance(probe, torch.Tensor) or probe.dim() != 2 or probe.shape[1] != pool.num_classes:
        raise ModelOutputError(f"model {spec['name']!r} must return logits of shape (N, {pool.num_classes})")
    return model


def _batch(config: CurvatureConfig, model: nn.Module, second: nn.Module | None, pool: ImageData, lo: int, hi: int,
           b: int, device: torch.device) -> tuple[dict[str, pd.DataFrame], dict[str, Any], dict[str, Any]]:
    """One part: the images' rows and spectra, the detector's measures, the first batch's trajectories."""
    gen = batch_generator(config.seed, b)
    x, y = pool.x[lo:hi].to(device), pool.y[lo:hi].to(device)
    part_tables: dict[str, pd.DataFrame] = {}
    with frozen(model):
        rows, sets, info = batch_rows(
            model, x, y, second=second, alphas=config.alphas, steps=config.steps, random_directions=config.random_directions,
            boundary_alpha=config.boundary_alpha, generator=gen, max_exact_dim=config.max_exact_dim,
            slq_steps=config.slq_steps, slq_probes=config.slq_probes, approximate=config.approximate)
        rows.insert(0, "position", rows.pop("index") + lo)  # position in the sampled pool
        part_tables["rows"] = rows
        keep = torch.as_tensor(rows["position"].to_numpy() - lo, dtype=torch.long, device=device)
        if config.detector is not None and len(keep):
            attack = config.detector.build()
            res = attack(model, x[keep], y[keep], config.detector.threat(), generator=gen)
            ok = res.success
            info["detector_attacked"], info["detector_successes"] = int(len(keep)), int(ok.sum())
            if bool(ok.any()):
                adv = res.x_adv[ok]
                adv_table, adv_sets = detector_measures(model, adv, res.pred_adv[ok], gen, config.max_exact_dim)
                adv_table.insert(0, "position", rows["position"].to_numpy()[ok.cpu().numpy()])
                part_tables["adversarial"] = adv_table
                sets["adversarial"] = adv_sets
        if b == 0 and config.trajectories and len(keep):
            k = keep[: config.trajectories]
            traj, traj_sets = trajectory(model, x[k], y[k], config.boundary_alpha, config.trajectory_steps or config.steps,
                                         max_exact_dim=config.max_exact_dim, slq_steps=config.slq_steps,
                                         slq_probes=config.slq_probes, generator=gen)
            traj["position"] = (k.cpu().numpy() + lo)[traj["image"].to_numpy()]
            part_tables["trajectory"] = traj
            sets["trajectory"] = traj_sets
    return part_tables, sets, info
