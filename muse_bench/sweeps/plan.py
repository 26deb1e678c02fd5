"""Turn a sweep's runs into checked `muse run` configurations, each with its run id.

Every run is checked the way `muse run` checks it (unknown algorithm, unknown or bad
hyperparameter, protocol, corpus, models) before any run starts, and its run id, the
runner's own, says where its report will be: a run whose report exists is finished and
is never started again.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path

from muse_bench.core.errors import ConfigError, MuseError
from muse_bench.runner import RunConfig
from muse_bench.sweeps.spec import MAX_RUNS, RUN_OPTIONS, Sweep, SweepRun


@dataclass(frozen=True)
class PlannedRun:
    """A sweep run with its runner configuration, run id and report path."""

    run: SweepRun
    config: RunConfig
    run_id: str
    report_path: Path

    @property
    def finished(self) -> bool:
        """Whether the run's report exists (the runner writes it last, atomically)."""
        return self.report_path.is_file()

    @property
    def reference_keys(self) -> tuple[tuple, tuple]:
        """Runs sharing the first key share the retrain AUC; sharing the second, also the
        target and retrain evaluations (they depend on the seed)."""
        cfg = self.config
        auc = (cfg.corpus, cfg.source, cfg.target, cfg.retrain, cfg.attack)
        return auc, (*auc, cfg.seed, cfg.n_bootstrap, cfg.engine)


def sweep_dir(out: Path, name: str) -> Path:
    """OUT/sweeps/<name>: the sweep's results, logs and its runs."""
    return Path(out) / "sweeps" / name


def runs_dir(out: Path, name: str) -> Path:
    """The `--out` of the sweep's runs; their leaderboard rows stay here until published."""
    return sweep_dir(out, name) / "runs"


def run_config(sweep: Sweep, run: SweepRun, out: Path) -> RunConfig:
    """The `muse run` configuration of one sweep run."""
    options = {RUN_OPTIONS[k]: v for k, v in sweep.run_options.items()}
    return RunConfig(
        algo=run.algo,
        corpus=run.corpus,
        protocol=run.protocol,
        params=run.param_args(),
        seed=run.seed,
        name=run.name,
        out=runs_dir(out, sweep.name),
        progress=False,
        **options,
    )


def plan(
    sweep: Sweep,
    out: Path,
    *,
    yes: bool = False,
    max_runs: int = MAX_RUNS,
    here: bool = True,
) -> list[PlannedRun]:
    """Check every run as `muse run` would and return them, duplicates merged.

    Raises ConfigError, naming the run, for the first run `muse run` would refuse, and
    when the sweep has more than `max_runs` runs and `yes` is False. With `here` False
    (runs that execute on other machines, such as a cluster's GPU nodes), the device and
    engine are not checked on this one; they are not part of a run's id.
    """
    from muse_bench.runner import Run

    if len(sweep.runs) > max_runs and not yes:
        raise ConfigError(
            f"sweep '{sweep.name}' has {len(sweep.runs)} runs, more than {max_runs}; "
            "check the grid, then pass --yes to run them all."
        )
    planned: dict[str, PlannedRun] = {}
    for run in sweep.runs:
        cfg = run_config(sweep, run, out)
        probe = cfg if here else replace(cfg, device="cpu", engine="hf")
        try:
            checked = Run(probe, echo=lambda _line: None)
        except MuseError as exc:
            raise ConfigError(f"run {run.index + 1} ({run.label()}): {exc}") from None
        if checked.run_id not in planned:  # the same run written twice runs once
            planned[checked.run_id] = PlannedRun(
                run, cfg, checked.run_id, checked.dir / "report.json"
            )
    return list(planned.values())


def cli_args(cfg: RunConfig, log_with: str | None = None) -> list[str]:
    """The `muse run` arguments that make the run `cfg` describes."""
    defaults = RunConfig(algo=cfg.algo, corpus=cfg.corpus)
    args = ["run", "--algo", cfg.algo, "--corpus", cfg.corpus, "--out", str(cfg.out)]
    for name, flag in (
        ("source", "--source"),
        ("target", "--target"),
        ("retrain", "--retrain"),
        ("protocol", "--protocol"),
        ("seed", "--seed"),
        ("select", "--select"),
        ("attack", "--attack"),
        ("device", "--device"),
        ("engine", "--engine"),
        ("batch_size", "--batch-size"),
        ("n_bootstrap", "--bootstrap"),
        ("name", "--name"),
    ):
        value = getattr(cfg, name)
        if value is not None and value != getattr(defaults, name):
            args += [flag, str(value)]
    for flag in ("allow_pickle", "trust_remote_code"):
        if getattr(cfg, flag):
            args.append("--" + flag.replace("_", "-"))
    for item in cfg.params:
        args += ["-P", item]
    if log_with:
        args += ["--log-with", log_with]
    if not cfg.progress:
        args.append("--quiet")
    return args


def command_line(cfg: RunConfig, log_with: str | None = None) -> list[str]:
    """The full command (this Python, `-m muse_bench.cli`) that makes the run."""
    return [sys.executable, "-m", "muse_bench.cli", *cli_args(cfg, log_with)]


def shown_command(cfg: RunConfig, log_with: str | None = None) -> str:
    """The run as a `muse run ...` line a user can paste."""
    import shlex

    return "muse " + " ".join(shlex.quote(a) for a in cli_args(cfg, log_with))
