"""A run's identity: what it depends on, and what it does not."""

from __future__ import annotations

import shutil

from conftest import write_mini_benchmark

from muse_bench.runner import RunConfig
from muse_bench.runner.plan import plan_run


def _plan(data, target, retrain, out, **kw):
    cfg = RunConfig(
        algo="ga",
        corpus="news",
        source=str(data),
        target=str(target),
        retrain=str(retrain),
        out=out,
        progress=False,
        device="cpu",
        **kw,
    )
    return plan_run(cfg, echo=lambda _: None)


def test_the_same_models_at_another_path_make_the_same_run_id(tmp_path):
    """Run ids hash the models' contents, so the same run made in two clones (or after
    the models moved) has one id, and `leaderboard merge` can de-duplicate it."""
    data, target, retrain = write_mini_benchmark(tmp_path / "a")
    here = _plan(data, target, retrain, tmp_path / "runs")
    moved = tmp_path / "elsewhere"
    shutil.copytree(target, moved / "target")
    shutil.copytree(retrain, moved / "retrain")
    there = _plan(data, moved / "target", moved / "retrain", tmp_path / "runs")
    assert here.run_id == there.run_id
    # other weights are another run
    _, other_target, _ = write_mini_benchmark(tmp_path / "b", seed=1)
    assert _plan(data, other_target, retrain, tmp_path / "runs").run_id != here.run_id
    # and so is a setting that can change the numbers
    assert _plan(data, target, retrain, tmp_path / "runs", flush_denormal=False).run_id != (
        here.run_id
    )
