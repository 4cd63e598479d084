"""Seeded choice of source images and two targets each, for traversals and their triangles.

A source is an image the model classifies correctly. Its two targets are different images, each
classified correctly as a class other than the source's, and (when the data has three classes
or more) of two different classes from each other: the triangle then spans two unrelated
directions. The choice depends only on the seed, the data and the model's predictions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from advbench.data.base import ImageData
from advbench.errors import DataError


@dataclass(frozen=True)
class Pairs:
    """Indices into the data set: ``source`` (n,), ``targets`` (n, 2); ``label`` the source classes."""

    source: torch.Tensor
    targets: torch.Tensor
    label: torch.Tensor
    candidates: int  # how many images the model classified correctly


@torch.no_grad()
def predictions(model: nn.Module, x: torch.Tensor, *, batch_size: int, device: torch.device) -> torch.Tensor:
    """The model's top-1 predictions for ``x`` (on CPU), computed in batches on ``device``."""
    out = [model(x[s : s + batch_size].to(device)).argmax(dim=1).cpu() for s in range(0, x.shape[0], batch_size)]
    return torch.cat(out)


def sample_pairs(data: ImageData, pred: torch.Tensor, n: int, seed: int) -> Pairs:
    """``n`` distinct sources and two targets each, drawn with ``seed`` among the correctly classified images."""
    correct = (pred == data.y).nonzero().squeeze(1)
    if correct.numel() == 0:
        raise DataError("the model classifies none of the images correctly: no source for a traversal")
    if data.y[correct].unique().numel() < 2:
        raise DataError("the correctly classified images are all of one class: no target of another class")
    if n > correct.numel():
        raise DataError(f"{n} sources asked for, but the model classifies only {correct.numel()} images correctly")
    g = torch.Generator().manual_seed(seed)
    order = correct[torch.randperm(correct.numel(), generator=g)]
    sources = order[:n]
    labels = data.y[order]
    targets = torch.empty(n, 2, dtype=torch.long)
    for i, s in enumerate(sources.tolist()):
        # a fresh seeded order per source: its targets do not depend on the other sources
        perm = torch.randperm(order.numel(), generator=torch.Generator().manual_seed(seed * 1_000_003 + s))
        cand, cand_y = order[perm], labels[perm]
        first = int((cand_y != data.y[s]).nonzero()[0])
        rest = (cand_y != data.y[s]) & (cand != cand[first])
        other = rest & (cand_y != cand_y[first])
        second = int((other if bool(other.any()) else rest).nonzero()[0]) if bool(rest.any()) else -1
        if second < 0:
            raise DataError(f"only one correctly classified image of another class than source {s}'s: need two targets")
        targets[i, 0], targets[i, 1] = cand[first], cand[second]
    return Pairs(source=sources, targets=targets, label=data.y[sources].clone(), candidates=int(correct.numel()))
