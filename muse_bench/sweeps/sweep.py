"""`muse sweep`: check a sweep file, run what is not finished, write the results, publish.

Layout of OUT/sweeps/<name>/: `runs/` (the runs' own `--out`: reports, checkpoints, a
sweep-local leaderboard), `logs/<run id>.log` (local executor) or `slurm/` (submitit's job
files), `sweep.<ext>` (a copy of the sweep file), `plan.json` (every run's id and command),
and the results: `runs.csv`, `summary.csv`, `summary.json`, `plot.png`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from muse_bench.core.errors import ConfigError, MuseError
from muse_bench.core.io import atomic_write_json, atomic_write_text, check_writable_dir, try_lock
from muse_bench.sweeps.executors import (
    Outcome,
    local_plan,
    run_local,
    run_slurm,
    submitit_parameters,
)
from muse_bench.sweeps.plan import PlannedRun, plan, shown_command, sweep_dir
from muse_bench.sweeps.results import MethodSummary, SweepResults, write_results
from muse_bench.sweeps.spec import EXECUTOR_KINDS, MAX_RUNS, Sweep, load_sweep

Echo = Callable[[str], None]


def _executor_options(sweep: Sweep, kind: str | None) -> dict:
    options = dict(sweep.executor)
    if kind is not None:
        if kind not in EXECUTOR_KINDS:
            raise ConfigError(f"--executor must be one of {', '.join(EXECUTOR_KINDS)}.")
        if kind != options.get("kind"):
            options = {"kind": kind}  # the file's options are for another executor
    return options


def _slurm_description(options: dict, name: str) -> str:
    params = submitit_parameters(options, name)
    parts = [f"cluster {options.get('cluster', 'slurm')}"]
    if "slurm_partition" in params:
        parts.append(f"partition {params['slurm_partition']}")
    if "slurm_account" in params:
        parts.append(f"account {params['slurm_account']}")
    parts.append(f"{params['gpus_per_node']} GPU and {params['cpus_per_task']} CPUs per run")
    parts.append(f"{params['timeout_min']} min")
    return "slurm via submitit (" + ", ".join(parts) + ")"


def _format(value: float | None, spread: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.1f}" + (f" ± {spread:.1f}" if spread is not None else "")


def summary_lines(summaries: Sequence[MethodSummary]) -> list[str]:
    """The per-method selection as readable lines."""
    lines = []
    for s in summaries:
        cfg = s.selected
        qualifies = "at or below" if s.qualifies else "above"
        threshold = "n/a" if s.threshold is None else f"{s.threshold:.1f}"
        lines.append(
            f"{s.method} ({s.corpus}, {s.protocol}): {cfg.describe()} by rule {s.rule}, "
            f"{len(cfg.records)} seed(s), knowmem_f {qualifies} the retrain's ({threshold})"
        )
        metrics = ("verbmem_f", "knowmem_f", "privleak", "knowmem_r")
        lines.append(
            "    " + "  ".join(f"{m} {_format(cfg.mean.get(m), cfg.std.get(m))}" for m in metrics)
        )
    return lines


def publish_selected(results: SweepResults, out: Path) -> list[Path]:
    """Append each method's selected runs (one row per seed), and the target and retrain
    rows they were compared with, to OUT/leaderboard/<corpus>.csv (idempotent by run id)."""
    from muse_bench.runner.records import publish, read_json

    written: dict[Path, None] = {}
    for s in results.summaries:
        for rec in s.selected.records:
            runs = rec.planned.config.out
            for which, ref in (rec.report.get("reference") or {}).items():
                ref_report = read_json(runs / s.corpus / which / ref["run_id"] / "report.json")
                if ref_report is not None:
                    written[publish(ref_report, out)] = None
            written[publish(dict(rec.report), out)] = None
    return list(written)


def _save_plan(sweep: Sweep, planned: Sequence[PlannedRun], directory: Path, log_with) -> None:
    if sweep.path is not None:
        text = Path(sweep.path).read_text(encoding="utf-8")
        atomic_write_text(directory / f"sweep{Path(sweep.path).suffix}", text)
    atomic_write_json(
        directory / "plan.json",
        {
            "name": sweep.name,
            "selection": sweep.selection,
            "runs": [
                {
                    "run_id": p.run_id,
                    "run": p.run.label(),
                    "command": shown_command(p.config, log_with),
                    "report": str(p.report_path),
                }
                for p in planned
            ],
        },
    )


def run_sweep(
    path: Path,
    out: Path = Path("runs"),
    *,
    dry_run: bool = False,
    yes: bool = False,
    executor: str | None = None,
    parallel: int | None = None,
    threads: int | None = None,
    log_with: str | None = None,
    publish: bool = False,
    echo: Echo = print,
    command: Callable[[PlannedRun], list[str]] | None = None,
    max_runs: int = MAX_RUNS,
) -> SweepResults | None:
    """Run a sweep file's unfinished runs and write its results; None for a dry run.

    Everything is checked before the first run starts. `command` replaces the local
    executor's `muse run` command line (tests).
    """
    sweep = load_sweep(path)
    options = _executor_options(sweep, executor)
    if log_with:
        from muse_bench.sweeps.tracking import check_tracker

        check_tracker(log_with)
    here = options["kind"] == "local"
    planned = plan(sweep, out, yes=yes, max_runs=max_runs, here=here)
    finished = [p for p in planned if p.finished]
    pending = [p for p in planned if not p.finished]
    if options["kind"] == "local":
        device = str(sweep.run_options.get("device", "auto"))
        local = local_plan(options, max(1, len(pending)), device, parallel, threads)
        where = local.describe()
    else:
        where = _slurm_description(options, sweep.name)
    merged = len(sweep.runs) - len(planned)
    echo(
        f"sweep {sweep.name}: {len(planned)} runs"
        + (f" ({merged} duplicate(s) merged)" if merged else "")
        + f", {len(finished)} finished, {len(pending)} to run; executor: {where}"
    )
    directory = sweep_dir(out, sweep.name)
    if dry_run:
        for p in planned:
            echo(
                f"  {'done' if p.finished else 'todo'} {p.run_id}  {shown_command(p.config, log_with)}"
            )
        return None
    check_writable_dir(directory)
    with try_lock(directory / ".sweep.lock", f"sweep {sweep.name}"):
        _save_plan(sweep, planned, directory, log_with)
        outcomes: list[Outcome] = []
        if pending and options["kind"] == "local":
            outcomes = run_local(pending, local, directory / "logs", echo, log_with, command)
        elif pending:
            outcomes = run_slurm(
                pending, finished, options, directory / "slurm", sweep.name, echo, log_with
            )
        results = write_results(planned, sweep.selection, directory)
        for line in summary_lines(results.summaries):
            echo(line)
        echo(f"results: {directory} (runs.csv, summary.csv, summary.json, plot.png)")
        failed = [o for o in outcomes if o.status == "failed"]
        missing = len(planned) - len(results.records)
        if failed or missing:
            raise MuseError(
                f"{missing} of {len(planned)} runs have not finished ({len(failed)} failed; "
                f"see {directory / ('logs' if options['kind'] == 'local' else 'slurm')}); "
                "the results cover the finished ones. Run the same command again to retry."
                + (" Nothing was published." if publish else "")
            )
        if publish:
            for written in publish_selected(results, out):
                echo(f"published the selected runs to {written}")
    return results


__all__ = ["publish_selected", "run_sweep", "summary_lines"]
