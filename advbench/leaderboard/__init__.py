"""The leaderboard: entries (:mod:`.entries`), rankings with intervals (:mod:`.rankings`), the
static site (:mod:`.site`), RobustBench compatibility (:mod:`.robustbench`), the regression gate
(:mod:`.gate`) and adding a user's run (:mod:`.add`).

Layout of a leaderboard folder (``leaderboard/`` in the repository)::

    suite.yaml, suite-*.yaml                    the fixed evaluation configs the entries come from
    entries/<model>__<defense>__<threat>.json   one entry each (schema: :mod:`.entries`)
    index.html, rankings/, models/, README.md   rendered by ``advbench leaderboard build``
    robustbench/export/                         every entry in RobustBench's model-info form
    robustbench/published/                      RobustBench model-info files to show beside (optional)
"""

from advbench.errors import ConfigError
from advbench.leaderboard.add import add_run
from advbench.leaderboard.entries import (
    SCHEMA_VERSION,
    dumps,
    entries_from_table,
    entry_name,
    load_entries,
    ranking_key,
    threat_id,
    validate_entry,
    write_entries,
)
from advbench.leaderboard.gate import (
    DEFAULT_TOLERANCE,
    Difference,
    check_tolerance,
    compare,
    format_differences,
    run_suite,
    suite_files,
)
from advbench.leaderboard.rankings import rankings
from advbench.leaderboard.robustbench import to_robustbench
from advbench.leaderboard.site import build, markdown

__all__ = [
    "DEFAULT_TOLERANCE", "SCHEMA_VERSION", "ConfigError", "Difference", "add_run", "build", "check_tolerance", "compare",
    "dumps", "entries_from_table", "entry_name", "format_differences", "load_entries", "markdown", "ranking_key",
    "rankings", "run_suite", "suite_files", "threat_id", "to_robustbench", "validate_entry", "write_entries",
]
