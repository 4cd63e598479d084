"""Defenses: inference-time input transformations (registered in ``DEFENSES``), the defended
model and its adaptive (BPDA / EoT) view; see :mod:`advbench.defenses.base`.

Registered stages: ``thermometer`` (:mod:`.thermometer`), ``randomization``
(:mod:`.randomization`), ``jpeg``, ``bit_depth`` and ``median`` (:mod:`.transforms`).
"""

from advbench.defenses.base import (
    AdaptiveModel,
    DefendedModel,
    InputTransform,
    adaptive,
    find_defended,
    needs_adaptive,
)
from advbench.defenses.randomization import Randomization
from advbench.defenses.thermometer import Thermometer
from advbench.defenses.transforms import JPEG, BitDepth, Median

__all__ = [
    "JPEG",
    "AdaptiveModel",
    "BitDepth",
    "DefendedModel",
    "InputTransform",
    "Median",
    "Randomization",
    "Thermometer",
    "adaptive",
    "find_defended",
    "needs_adaptive",
]
