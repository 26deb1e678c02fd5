"""Experiment tracking for `muse run --log-with` and `muse sweep --log-with`.

Uses accelerate's trackers (tensorboard, wandb, mlflow). While a run trains, the training
loop's loss after every optimizer step and each epoch's mean loss go to the tracker
(through `muse_bench.training.loop.TRAIN_LOGGERS`); when the run ends, the knowmem_f of
every candidate the runner scored (one per epoch), the selected model's metrics and the
scale / sustain folds follow. A finished run that is reused logs nothing again.

Where: tensorboard writes OUT/tensorboard/<corpus>/<run id> (`tensorboard --logdir OUT`);
wandb and mlflow follow their own settings (WANDB_PROJECT, WANDB_MODE, MLFLOW_TRACKING_URI,
MLFLOW_EXPERIMENT_NAME; the project / experiment defaults to `muse-bench`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import numbers
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from muse_bench.core.distributed import Processes
from muse_bench.core.errors import ConfigError
from muse_bench.runner import RunConfig

TRACKERS = ("tensorboard", "wandb", "mlflow")
_NEEDS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
PROJECT = "muse-bench"


def check_tracker(name: str) -> str:
    """`name` if it is a tracker whose package is installed; ConfigError otherwise."""
    if name not in TRACKERS:
        from muse_bench.core.registry import suggest

        raise ConfigError(f"unknown --log-with '{name}'.{suggest(name, list(TRACKERS))}")
    if importlib.util.find_spec(_NEEDS[name]) is None:
        raise ConfigError(
            f"--log-with {name} needs the '{_NEEDS[name]}' package: "
            f"pip install 'muse-bench[{name}]'."
        )
    return name


def make_tracker(name: str, run_name: str, cfg: RunConfig, corpus: str) -> Any:
    """A started accelerate tracker for one run."""
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    if name == "tensorboard":
        tracker = TensorBoardTracker(f"{corpus}/{run_name}", cfg.out / "tensorboard")
    elif name == "wandb":
        tracker = WandBTracker(os.environ.get("WANDB_PROJECT", PROJECT), name=run_name)
    else:
        tracker = MLflowTracker(
            experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT), run_name=run_name
        )
    tracker.start()
    return tracker


def _scalars(values: Mapping[str, Any], prefix: str) -> dict[str, float]:
    out = {}
    for key, value in values.items():
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            if math.isfinite(float(value)):
                out[f"{prefix}/{key}"] = float(value)
    return out


def train_logger(tracker: Any) -> Callable[[Any, dict[str, float], int], None]:
    """A `TRAIN_LOGGERS` callback: the loop's values under `train/<desc>/<key>`."""

    def log(config: Any, values: dict[str, float], step: int) -> None:
        prefix = "train/" + "/".join(str(config.desc).split())
        tracker.log(_scalars(values, prefix), step=step)

    return log


def log_report(tracker: Any, report: Mapping[str, Any]) -> None:
    """The candidates' knowmem_f (by epoch or α), the selected model's metrics, and the
    scale / sustain folds' metrics (by fold)."""
    last = 0
    for point in report.get("curve") or []:
        step = int(point.get("step") or 0)
        last = max(last, step)
        tracker.log(_scalars({"knowmem_f": point.get("knowmem_f")}, "select"), step=step)
    tracker.log(_scalars(report.get("metrics") or {}, "eval"), step=last)
    for key in ("scale", "sustain"):
        for fold in report.get(key) or []:
            tracker.log(_scalars(fold, key), step=int(fold.get("fold") or 0))


@contextlib.contextmanager
def training_logged(tracker: Any) -> Iterator[None]:
    """Send the training loop's losses to `tracker` while the block runs."""
    from muse_bench.training.loop import TRAIN_LOGGERS

    fn = train_logger(tracker)
    TRAIN_LOGGERS.append(fn)
    try:
        yield
    finally:
        TRAIN_LOGGERS.remove(fn)


def tracked_run(
    cfg: RunConfig, log_with: str | None, echo: Callable[[str], None] = print
) -> dict[str, Any]:
    """`muse run`, logged to `log_with` (None: not logged); returns the report."""
    from muse_bench.runner import Run

    if log_with:
        check_tracker(log_with)
    run = Run(cfg, echo)  # every check before the tracker starts
    fresh = cfg.force or not (run.dir / "report.json").is_file()
    if not (log_with and fresh and Processes.current().is_main):
        return run.execute()
    tracker = make_tracker(log_with, run.run_id, cfg, run.plan.task.corpus.name)
    try:
        hparams = {"algo": run.plan.algo_name, "seed": cfg.seed, **run.plan.resolved_params}
        tracker.store_init_configuration(
            {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
        )
        with training_logged(tracker):
            report = run.execute()
        log_report(tracker, report)
    finally:
        tracker.finish()
    return report
