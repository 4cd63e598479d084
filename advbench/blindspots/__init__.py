"""Blind-spot analysis: Level Set Traversal (LST) and the metrics of its paper's two tables.

Balasubramanian, Sriramanan, Sadasivan & Feizi, "Exploring Geometry of Blind Spots in Vision
Models", NeurIPS 2023. Modules, one job each:

- :mod:`~advbench.blindspots.lst`: the traversal (registered as ``lst`` in ``TRAVERSALS``);
- :mod:`~advbench.blindspots.metrics`: RMSE, L-inf, SSIM, LPIPS between outputs and targets;
- :mod:`~advbench.blindspots.triangle`: confidence over triangles and straight paths;
- :mod:`~advbench.blindspots.pairs`: the seeded choice of sources and targets;
- :mod:`~advbench.blindspots.config`: the analysis config (``advbench blindspots``);
- :mod:`~advbench.blindspots.analysis`: the analysis end to end;
- :mod:`~advbench.blindspots.report`, :mod:`~advbench.blindspots.figure`: tables, files, picture.

Only the traversal is imported eagerly (it registers itself); the rest loads on use.
"""

from __future__ import annotations

from advbench.blindspots.lst import LevelSetTraversal, LSTResult, orthogonal_part

__all__ = ["LSTResult", "LevelSetTraversal", "orthogonal_part"]
