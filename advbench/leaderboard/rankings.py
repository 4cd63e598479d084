"""Rankings: one per (data set, split, threat model), never across them, with intervals.

Within a ranking, entries are ordered by robust accuracy (the adaptive worst case), then clean
accuracy. Each entry is compared with the next one down: where both carry their per-example worst
case on the same examples (the same ``examples_digest``), by a paired bootstrap of the difference
(the examples both get right or wrong cancel); otherwise by whether their exact binomial
intervals overlap. ``separated`` says whether the ranking's order between the two is resolved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from advbench.analysis.stats import paired_difference
from advbench.leaderboard.entries import decode_examples, entry_name, ranking_key


@dataclass(frozen=True)
class Comparison:
    """An entry against the next one down: the difference of robust accuracies; paired, its
    bootstrap interval; unpaired, whether the two entries' exact intervals overlap."""

    difference: float
    low: float = float("nan")
    high: float = float("nan")
    overlap: bool | None = None  # unpaired only

    @property
    def paired(self) -> bool:
        return self.overlap is None

    @property
    def separated(self) -> bool:
        return self.low > 0 if self.paired else not self.overlap

    def text(self) -> str:
        if self.paired:
            verdict = "ahead" if self.low > 0 else "tied within the interval"
            return f"{100 * self.difference:+.1f} pts [{100 * self.low:+.1f}, {100 * self.high:+.1f}] (paired), {verdict}"
        return "intervals overlap" if self.overlap else "intervals do not overlap"


@dataclass(frozen=True)
class Ranking:
    key: str
    dataset: str
    split: str
    threat: str
    entries: list[dict[str, Any]]
    comparisons: list[Comparison | None] = field(default_factory=list)  # entry i against entry i + 1

    @property
    def slug(self) -> str:
        return self.key.replace("/", "__")

    def resolved(self) -> bool:
        """Whether every neighbour pair is separated."""
        return all(c is not None and c.separated for c in self.comparisons)


def compare(upper: dict[str, Any], lower: dict[str, Any], resamples: int = 2000, seed: int = 0) -> Comparison:
    """``upper`` against ``lower`` (upper ranked first)."""
    a, b = upper.get("robust_examples"), lower.get("robust_examples")
    if a is not None and b is not None and upper.get("examples_digest") == lower.get("examples_digest") \
            and upper.get("examples_digest") is not None:
        est = paired_difference(decode_examples(a), decode_examples(b), resamples, seed)
        return Comparison(est.value, est.low, est.high)
    upper_low = upper["intervals"]["robust_accuracy"][0]
    lower_high = lower["intervals"]["robust_accuracy"][1]
    return Comparison(upper["robust_accuracy"] - lower["robust_accuracy"], overlap=upper_low <= lower_high)


def order_key(entry: dict[str, Any]) -> tuple:
    return (-entry["robust_accuracy"], -entry["clean_accuracy"], entry_name(entry))


def rankings(entries: dict[str, dict[str, Any]]) -> list[Ranking]:
    """Every ranking of the entries, by data set, split and threat model."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for e in entries.values():
        groups.setdefault(e.get("ranking") or ranking_key(e), []).append(e)
    out = []
    for key in sorted(groups):
        members = sorted(groups[key], key=order_key)
        dataset, split, threat = key.split("/", 2)
        comps = [compare(members[i], members[i + 1]) for i in range(len(members) - 1)]
        out.append(Ranking(key, dataset, split, threat, members, comps))
    return out
