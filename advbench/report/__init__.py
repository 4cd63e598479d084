"""``advbench report RUN_DIR``: the tables, the Markdown report and the plots of a run folder,
rebuilt from its stored results (results.sqlite, run.json, masking.json) without running any attack.

:func:`build_report` is the entry point; each module does one job: :mod:`.load` reads the run,
:mod:`.tables` rebuilds the tables with the evaluator's own functions, :mod:`.markdown` renders
them, :mod:`.plots` draws the PNGs and :mod:`.build` writes the folder.
"""

from __future__ import annotations

from advbench.report.build import Report, build_report
from advbench.report.load import ReportError

__all__ = ["Report", "ReportError", "build_report"]
