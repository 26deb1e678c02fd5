"""`muse run` and `muse eval`: the stages of a run, from the reference evaluations to the
published leaderboard row (see `pipeline.py` for the order)."""

from muse_bench.runner.config import RunConfig, check_config, check_model, safe_dir_name
from muse_bench.runner.pipeline import Run, run
from muse_bench.runner.references import eval_checkpoint, retrain_auc

__all__ = [
    "Run",
    "RunConfig",
    "check_config",
    "check_model",
    "eval_checkpoint",
    "retrain_auc",
    "run",
    "safe_dir_name",
]
