"""`muse run` and `muse eval`: the stages of a run, from the reference evaluations to the
published leaderboard row."""

from muse_bench.runner.run import (
    RunConfig,
    check_config,
    check_model,
    eval_checkpoint,
    run,
    safe_dir_name,
)

__all__ = ["RunConfig", "check_config", "check_model", "eval_checkpoint", "run", "safe_dir_name"]
