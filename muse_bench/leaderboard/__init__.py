"""Leaderboard files: the CSV schema, validation and merge (`rows`), and the HTML page
with its plots (`page`, which alone loads matplotlib)."""

from muse_bench.leaderboard.rows import (
    METRICS,
    REFERENCE_ALGOS,
    append_row,
    combine,
    merge,
    read_csv,
    row_from_report,
    validate,
)

__all__ = [
    "METRICS",
    "REFERENCE_ALGOS",
    "append_row",
    "combine",
    "merge",
    "read_csv",
    "row_from_report",
    "validate",
]
