"""The input-space curvature analysis (``advbench curvature``): config, run, files, figures.

The computations live in :mod:`advbench.analysis.curvature` (per image) and its helpers; this
package runs them over a data set in resumable batches and writes the tables and figures.
"""

from advbench.curvature.config import CurvatureConfig, load_curvature_config, parse_curvature_config
from advbench.curvature.run import CurvatureResult, run_curvature

__all__ = ["CurvatureConfig", "CurvatureResult", "load_curvature_config", "parse_curvature_config", "run_curvature"]
