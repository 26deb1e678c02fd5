"""Sweeps: many `muse run`s from one file, on this machine or a SLURM cluster, with the
whole sweep's results kept (`muse sweep SWEEP.yaml`)."""

from muse_bench.sweeps.spec import (
    MAX_RUNS,
    SELECTION_RULES,
    Sweep,
    SweepRun,
    load_sweep,
    parse_sweep,
)
from muse_bench.sweeps.sweep import publish_selected, run_sweep

__all__ = [
    "MAX_RUNS",
    "SELECTION_RULES",
    "Sweep",
    "SweepRun",
    "load_sweep",
    "parse_sweep",
    "publish_selected",
    "run_sweep",
]
