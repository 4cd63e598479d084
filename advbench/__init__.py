"""advbench: a unified adversarial attack-and-defense benchmark for PyTorch image classifiers."""

from __future__ import annotations

__version__ = "0.1.0"

from advbench import attacks, blindspots, data, defenses, models, zoo  # noqa: E402,F401  (register the built-ins)
from advbench.analysis import transformations  # noqa: E402,F401  (registers the built-in transformations)
from advbench.attacks.base import Attack, AttackResult  # noqa: E402
from advbench.registry import ATTACKS, DATASETS, DEFENSES, MODELS, TRAVERSALS  # noqa: E402
from advbench.threat import Knowledge, Norm, Targeting, ThreatModel  # noqa: E402

__all__ = [
    "ATTACKS",
    "DATASETS",
    "DEFENSES",
    "MODELS",
    "TRAVERSALS",
    "Attack",
    "AttackResult",
    "Knowledge",
    "Norm",
    "Targeting",
    "ThreatModel",
    "__version__",
]
