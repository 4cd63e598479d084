"""The destruction rate of image transformations (Kurakin, Goodfellow & Bengio 2016).

The fraction of adversarial images that a transformation T brings back to the true class,
among those whose clean image was classified correctly and whose adversarial image is not::

    d = sum_k C(X_k, y_k) (1 - C(X_adv_k, y_k)) C(T(X_adv_k), y_k)
        / sum_k C(X_k, y_k) (1 - C(X_adv_k, y_k))

with C(X, y) = 1 when y is among the model's top-k classes on X (the paper reports top-1 and
top-5). An empty denominator gives d = NaN, with the counts kept so a reader sees 0/0.

Two cases, as in the paper's table:

- average case: all images;
- prefiltered case (:class:`Prefilter`): only images whose clean image is classified
  correctly and whose adversarial image is misclassified, in both top-1 and top-5, and whose
  clean top prediction has probability p(y_pred | X) >= 0.8. This is the rule of Kurakin et
  al., Section 3.2 (the seed's slide notes only name the two cases in the table's header).

:func:`destruction_records` computes every (attack, eps) x transformation x case x top-k cell
as a long DataFrame with the counts; :func:`destruction_matrix` pivots it into the paper's
layout (rows: attack and eps; columns: case, top-k, transformation).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from advbench import params
from advbench.analysis.transformations import Transformation, make_transformation
from advbench.errors import ConfigError

TransformLike = Transformation | str | Mapping[str, Any] | Callable[..., torch.Tensor]

CASES = ("average", "prefiltered")


def _check_k(k: int) -> int:
    return params.check_whole(k, "top-k", 1)


@dataclass(frozen=True)
class Prefilter:
    """Kurakin et al.'s prefiltered case: keep image k only if, for every k' in ``topk``, the
    clean image is correct and the adversarial one wrong in top-k', and the clean top-1
    probability (softmax of the model's output) is at least ``confidence``."""

    confidence: float = 0.8
    topk: tuple[int, ...] = (1, 5)

    def __post_init__(self) -> None:
        params.check_number(self.confidence, "prefilter confidence", low=0.0, high=1.0)
        for k in self.topk:
            _check_k(k)


#: the paper's rule
PAPER_PREFILTER = Prefilter()


@dataclass(frozen=True)
class DestructionRate:
    """One destruction rate with its counts: ``rate = numerator / denominator`` (NaN for 0/0)."""

    numerator: int  # clean correct, adversarial wrong, transformed correct
    denominator: int  # clean correct, adversarial wrong
    n: int  # images counted (all, or those passing the prefilter)
    topk: int

    @property
    def rate(self) -> float:
        return self.numerator / self.denominator if self.denominator else math.nan


def in_topk(logits: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """C(X, y) for a batch: True where ``y`` is among the ``k`` highest outputs."""
    _check_k(k)
    if k > logits.shape[1]:
        raise ConfigError(f"top-{k} needs at least {k} classes; the model has {logits.shape[1]}")
    return (logits.topk(k, dim=1).indices == y.view(-1, 1)).any(dim=1)


def predict(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The model's outputs (logits) on ``x``, in batches, without gradients. The model is
    called as it is (put it in eval mode first)."""
    with torch.no_grad():
        return torch.cat([model(b).detach() for b in x.split(batch_size)]) if len(x) else model(x).detach()


def prefilter_mask(
    logits_clean: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, prefilter: Prefilter
) -> torch.Tensor:
    """Which images pass the prefilter (see :class:`Prefilter`)."""
    keep = logits_clean.float().softmax(dim=1).amax(dim=1) >= prefilter.confidence
    for k in prefilter.topk:
        keep &= in_topk(logits_clean, y, k) & ~in_topk(logits_adv, y, k)
    return keep


def _counts(
    logits: tuple[torch.Tensor, torch.Tensor, torch.Tensor], y: torch.Tensor, k: int, keep: torch.Tensor
) -> DestructionRate:
    clean, adv, transformed = (in_topk(z, y, k) for z in logits)
    base = keep & clean & ~adv
    return DestructionRate(int((base & transformed).sum()), int(base.sum()), int(keep.sum()), k)


def _as_transform(transform: TransformLike) -> Callable[..., torch.Tensor]:
    if isinstance(transform, (str, Mapping)):
        return make_transformation(transform)
    if not callable(transform):
        raise ConfigError(f"transform must be a transformation name, mapping or callable, got {transform!r}")
    return transform


def _label(transform: Any) -> str:
    return str(getattr(transform, "label", None) or getattr(transform, "__name__", None) or transform)


def _check_batch(x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor) -> None:
    if x.shape != x_adv.shape:
        raise ConfigError(f"x and x_adv must have the same shape, got {tuple(x.shape)} and {tuple(x_adv.shape)}")
    if y.dim() != 1 or len(y) != len(x):
        raise ConfigError(f"y must hold one label per image ({len(x)}), got shape {tuple(y.shape)}")


def destruction_rate(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    x_adv: torch.Tensor,
    transform: TransformLike,
    generator: torch.Generator | None = None,
    topk: int = 1,
    prefilter: Prefilter | None = None,
    *,
    batch_size: int = 256,
) -> DestructionRate:
    """Kurakin et al.'s destruction rate of ``transform`` on the adversarial set ``x_adv``.

    ``transform`` is a :class:`Transformation`, a registered name, a mapping
    ``{"name": ..., **params}``, or any callable ``T(x_adv, generator)``; it is applied to the
    whole batch at once (random ones draw from ``generator``). ``prefilter=None`` is the
    average case; :data:`PAPER_PREFILTER` the paper's prefiltered case.
    """
    _check_batch(x, y, x_adv)
    _check_k(topk)
    t = _as_transform(transform)
    logits = tuple(predict(model, z, batch_size) for z in (x, x_adv, t(x_adv, generator)))
    keep = torch.ones(len(y), dtype=torch.bool, device=logits[0].device)
    if prefilter is not None:
        keep = prefilter_mask(logits[0], logits[1], y.to(keep.device), prefilter)
    return _counts(logits, y.to(keep.device), topk, keep)  # type: ignore[arg-type]


def destruction_records(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    adversarial: Mapping[tuple[str, Hashable], torch.Tensor],
    transforms: Sequence[TransformLike] | Mapping[str, TransformLike],
    *,
    topk: Sequence[int] = (1, 5),
    prefilter: Prefilter | None = PAPER_PREFILTER,
    seed: int = 0,
    batch_size: int = 256,
) -> pd.DataFrame:
    """Every cell of the destruction matrix as one row: attack, eps, transformation, case,
    topk, numerator, denominator, n, rate.

    ``adversarial`` maps (attack label, eps) to the adversarial batch of ``x``. ``transforms``
    is a list (labelled by each transformation's label) or a mapping label -> transform. Both
    cases are computed: "average" and, unless ``prefilter`` is None, "prefiltered". Each
    (attack, transformation) cell draws its randomness from a fresh generator seeded with
    ``seed``, so a cell does not depend on which others were computed, and every attack sees
    the same noise.
    """
    items = list(transforms.items()) if isinstance(transforms, Mapping) else [(None, t) for t in transforms]
    built = [(label, _as_transform(t)) for label, t in items]
    built = [(label if label is not None else _label(t), t) for label, t in built]
    labels = [label for label, _ in built]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"transformation labels must be distinct, got {labels}; pass a mapping label -> transform")
    ks = [_check_k(k) for k in topk]
    clean = predict(model, x, batch_size)
    y = y.to(clean.device)
    rows = []
    for (attack, eps), x_adv in adversarial.items():
        _check_batch(x, y, x_adv)
        adv = predict(model, x_adv, batch_size)
        masks = {"average": torch.ones(len(y), dtype=torch.bool, device=clean.device)}
        if prefilter is not None:
            masks["prefiltered"] = prefilter_mask(clean, adv, y, prefilter)
        for label, t in built:
            transformed = predict(model, t(x_adv, torch.Generator().manual_seed(seed)), batch_size)
            for case, keep in masks.items():
                for k in ks:
                    r = _counts((clean, adv, transformed), y, k, keep)
                    rows.append({"attack": attack, "eps": eps, "transformation": label, "case": case, "topk": k,
                                 "numerator": r.numerator, "denominator": r.denominator, "n": r.n, "rate": r.rate})
    columns = ["attack", "eps", "transformation", "case", "topk", "numerator", "denominator", "n", "rate"]
    return pd.DataFrame(rows, columns=columns)


def pivot_destruction(records: pd.DataFrame, value: str = "rate") -> pd.DataFrame:
    """The paper's layout from :func:`destruction_records` (or its stored CSV): rows (attack,
    eps) in first-seen order, columns (case, topk, transformation); ``value`` may also be
    "numerator", "denominator" or "n"."""
    if value not in ("rate", "numerator", "denominator", "n"):
        raise ConfigError(f"value must be one of rate, numerator, denominator, n, got {value!r}")
    rows = list(dict.fromkeys(zip(records["attack"], records["eps"])))
    cols = list(dict.fromkeys(zip(records["case"], records["topk"], records["transformation"])))
    table = records.set_index(["attack", "eps", "case", "topk", "transformation"])[value]
    return table.unstack(["case", "topk", "transformation"]).reindex(index=pd.MultiIndex.from_tuples(rows, names=["attack", "eps"]),
                         columns=pd.MultiIndex.from_tuples(cols, names=["case", "topk", "transformation"]))


def destruction_matrix(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    adversarial: Mapping[tuple[str, Hashable], torch.Tensor],
    transforms: Sequence[TransformLike] | Mapping[str, TransformLike],
    **options: Any,
) -> pd.DataFrame:
    """The destruction-rate matrix: rows (attack, eps), columns (case, topk, transformation),
    values in [0, 1] (NaN where no image counts). ``options`` are those of
    :func:`destruction_records` (``topk=(1,)`` drops the top-5 block, ``prefilter=None`` the
    prefiltered case), which also gives the counts."""
    return pivot_destruction(destruction_records(model, x, y, adversarial, transforms, **options))
