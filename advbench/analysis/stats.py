"""What a curvature measure predicts, with intervals: rank correlations with bootstrap confidence
intervals, groups by quantile (the seed's low / mid / high divergence), per-group summaries, and
the ROC AUC of a score separating two sets (a detector of adversarial examples).

scipy's ``spearmanr`` and ``mannwhitneyu`` compute the statistics (well-tested, tie-aware), and
its ``rankdata`` ranks all bootstrap resamples at once; resampling draws from a seeded ``numpy``
generator so a seed fixes every interval.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps


@dataclass(frozen=True)
class Estimate:
    """A statistic, its percentile-bootstrap interval at ``level``, and the sample size."""

    value: float
    low: float
    high: float
    n: int
    level: float = 0.95

    def to_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high, "n": self.n, "level": self.level}


def _finite_pairs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    keep = np.isfinite(a) & np.isfinite(b)
    return a[keep], b[keep]


def _row_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson's correlation of each row of ``a`` with the same row of ``b`` (NaN for a constant row)."""
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    den = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 1e-12 * a.shape[1], (a * b).sum(axis=1) / den, np.nan)


def _interval(boots: np.ndarray, level: float) -> tuple[float, float]:
    boots = boots[np.isfinite(boots)]  # a resample with one distinct value has no rank correlation
    q = (1 - level) / 2
    if not len(boots):
        return float("nan"), float("nan")
    low, high = np.quantile(boots, [q, 1 - q])
    return float(low), float(high)


def spearman(a: np.ndarray, b: np.ndarray, resamples: int = 2000, seed: int = 0, level: float = 0.95) -> Estimate:
    """Spearman's rank correlation of the finite pairs of ``a`` and ``b`` with a percentile
    bootstrap interval over ``resamples`` resamples of the pairs (NaN with fewer than 3 pairs);
    the resamples are ranked all at once (tie-aware average ranks, as ``spearmanr``)."""
    a, b = _finite_pairs(a, b)
    n = len(a)
    if n < 3:
        return Estimate(float("nan"), float("nan"), float("nan"), n, level)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n))
    with warnings.catch_warnings():  # a constant sample has no rank correlation: NaN, handled below
        warnings.simplefilter("ignore", sps.ConstantInputWarning)
        value = float(sps.spearmanr(a, b).statistic)
    boots = _row_pearson(sps.rankdata(a[idx], axis=1), sps.rankdata(b[idx], axis=1))
    return Estimate(value, *_interval(boots, level), n, level)


def partial_spearman(a: np.ndarray, b: np.ndarray, control: np.ndarray, resamples: int = 2000, seed: int = 0,
                     level: float = 0.95) -> Estimate:
    """Spearman's correlation of ``a`` and ``b`` with ``control`` partialled out: the Pearson
    correlation of their ranks' residuals after a least-squares fit on the ranks of ``control``
    ((N,) or (N, k) for several controls) (does ``a`` tell anything about ``b`` beyond what the
    controls do?), over the rows where everything is finite, with a percentile bootstrap interval
    (NaN with fewer than k + 3 rows)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    c = np.asarray(control, dtype=float).reshape(len(a), -1)
    keep = np.isfinite(a) & np.isfinite(b) & np.isfinite(c).all(axis=1)
    a, b, c = a[keep], b[keep], c[keep]
    n, k = c.shape
    if n < k + 3:
        return Estimate(float("nan"), float("nan"), float("nan"), n, level)

    def rho(idx: np.ndarray) -> np.ndarray:  # (R, n) resamples -> (R,)
        ra, rb = (sps.rankdata(v[idx], axis=1) for v in (a, b))
        design = np.concatenate([np.ones((*idx.shape, 1)), sps.rankdata(c[idx], axis=1)], axis=2)  # (R, n, k + 1)
        gram = design.transpose(0, 2, 1) @ design + 1e-9 * np.eye(k + 1)  # ridge: a constant resample stays solvable

        def residual(r: np.ndarray) -> np.ndarray:
            coef = np.linalg.solve(gram, design.transpose(0, 2, 1) @ r[:, :, None])
            return r - (design @ coef)[:, :, 0]

        return _row_pearson(residual(ra), residual(rb))

    rng = np.random.default_rng(seed)
    value = float(rho(np.arange(n)[None, :])[0])
    boots = rho(rng.integers(0, n, size=(resamples, n)))
    return Estimate(value, *_interval(boots, level), n, level)


def quantile_groups(values: np.ndarray, groups: int = 3) -> np.ndarray:
    """Group index per value (0 = lowest) by equal-count quantiles, ties kept together by rank
    order (stable); NaN values get -1."""
    v = np.asarray(values, dtype=float)
    out = np.full(len(v), -1, dtype=int)
    finite = np.flatnonzero(np.isfinite(v))
    order = finite[np.argsort(v[finite], kind="stable")]
    for g, part in enumerate(np.array_split(order, groups)):
        out[part] = g
    return out


def group_median(values: np.ndarray, groups: np.ndarray, resamples: int = 2000, seed: int = 0,
                 level: float = 0.95) -> dict[int, Estimate]:
    """Per group: the median of its finite values with a percentile bootstrap interval."""
    rng = np.random.default_rng(seed)
    q = (1 - level) / 2
    out: dict[int, Estimate] = {}
    v = np.asarray(values, dtype=float)
    for g in sorted(set(int(i) for i in groups) - {-1}):
        x = v[(groups == g) & np.isfinite(v)]
        if len(x) == 0:
            out[g] = Estimate(float("nan"), float("nan"), float("nan"), 0, level)
            continue
        boots = np.median(x[rng.integers(0, len(x), size=(resamples, len(x)))], axis=1)
        low, high = np.quantile(boots, [q, 1 - q])
        out[g] = Estimate(float(np.median(x)), float(low), float(high), len(x), level)
    return out


def roc_auc(positive: np.ndarray, negative: np.ndarray, resamples: int = 2000, seed: int = 0,
            level: float = 0.95) -> Estimate:
    """The area under the ROC curve of a score that should be larger on ``positive`` (ties count
    one half: the Mann-Whitney U over n_pos n_neg), with a stratified bootstrap interval (the
    resamples ranked all at once)."""
    pos, neg = np.asarray(positive, dtype=float), np.asarray(negative, dtype=float)
    pos, neg = pos[np.isfinite(pos)], neg[np.isfinite(neg)]
    if len(pos) == 0 or len(neg) == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), len(pos) + len(neg), level)
    value = float(sps.mannwhitneyu(pos, neg, alternative="two-sided").statistic) / (len(pos) * len(neg))
    rng = np.random.default_rng(seed)
    p = pos[rng.integers(0, len(pos), size=(resamples, len(pos)))]
    q = neg[rng.integers(0, len(neg), size=(resamples, len(neg)))]
    ranks = sps.rankdata(np.concatenate([p, q], axis=1), axis=1)[:, : len(pos)]
    boots = (ranks.sum(axis=1) - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))
    return Estimate(value, *_interval(boots, level), len(pos) + len(neg), level)


def binomial_interval(successes: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper-Pearson) interval of a proportion ``successes / n`` (scipy's
    ``binomtest``); a fractional count (a randomized model's mean over draws) is rounded to the
    nearest whole number of examples. ``(nan, nan)`` for ``n = 0``."""
    if n <= 0:
        return float("nan"), float("nan")
    k = int(min(max(round(successes), 0), n))
    ci = sps.binomtest(k, n).proportion_ci(confidence_level=level, method="exact")
    return float(ci.low), float(ci.high)


def paired_difference(a: np.ndarray, b: np.ndarray, resamples: int = 2000, seed: int = 0,
                      level: float = 0.95) -> Estimate:
    """The difference of two accuracies measured on the **same** examples (``a``, ``b``: per-example
    scores in [0, 1], aligned), ``mean(a) - mean(b)``, with a paired percentile bootstrap interval
    (the examples are resampled together, so what both get right or wrong cancels)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired scores must be two aligned vectors, got shapes {a.shape} and {b.shape}")
    n = len(a)
    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0, level)
    d = a - b
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
    return Estimate(float(d.mean()), *_interval(boots, level), n, level)
