"""Where a sweep's runs execute: `local` (subprocesses on this machine) or `slurm` (submitit).

Both start only unfinished runs, and each run is an ordinary `muse run` with its own
report: the runner itself resumes a run killed half-way from its epoch checkpoints.

Runs that share reference evaluations (the retrain AUC, the target and retrain scores
of a seed) would compute them together if started together; so the first run of each
such group goes first (locally: while it runs, no other run of its group starts; on
SLURM: as a first array), and the others then reuse what it left on disk.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from muse_bench.core.errors import ConfigError
from muse_bench.runner import RunConfig
from muse_bench.sweeps.plan import PlannedRun, command_line

Echo = Callable[[str], None]


@dataclass(frozen=True)
class Outcome:
    """How one started run ended: `done` or `failed` (with a one-line reason)."""

    run_id: str
    status: str
    seconds: float
    message: str = ""


def available_cores() -> int:
    """CPU cores this process may use (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be a whole number >= 1, got {value!r}.")
    return value


@dataclass(frozen=True)
class LocalPlan:
    """How many runs at a time, the torch threads of each, and the GPU of each slot."""

    parallel: int
    threads: int
    gpus: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line for the sweep's header."""
        where = f", one GPU each ({','.join(self.gpus)})" if self.gpus else ""
        return f"local, {self.parallel} at a time, {self.threads} threads each{where}"


def local_plan(
    options: Mapping[str, Any],
    runs: int,
    device: str = "auto",
    parallel: int | None = None,
    threads: int | None = None,
    cores: int | None = None,
    gpus: int | None = None,
) -> LocalPlan:
    """Runs at a time and threads per run that do not oversubscribe the machine.

    With GPUs (and a device that is not cpu): one run per GPU by default, each seeing
    only its own. On CPU: a quarter of the cores' worth of runs (at least one), each
    with cores // runs threads, as tiny models scale poorly past a few threads. The
    sweep file's `parallel`/`threads` and the command line's override these.
    """
    cores = cores or available_cores()
    if gpus is None:
        gpus = 0
        if device != "cpu":
            import torch

            gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    parallel = parallel or options.get("parallel")
    if parallel is None:
        parallel = gpus or max(1, cores // 4)
    parallel = _positive_int(parallel, "parallel")
    if gpus:
        parallel = min(parallel, gpus)
    parallel = max(1, min(parallel, runs))
    threads = threads or options.get("threads") or max(1, cores // parallel)
    threads = _positive_int(threads, "threads")
    return LocalPlan(parallel, threads, tuple(str(i) for i in range(parallel)) if gpus else ())


def _die_with_parent() -> None:
    """In the child before exec: be killed when the sweep dies, even by SIGKILL, so an
    interrupted sweep leaves no orphan run holding its run's lock (Linux only)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    errors = [ln for ln in lines if ln.startswith("error:")]
    return (errors or lines or [""])[-1].strip()


def run_local(
    pending: Sequence[PlannedRun],
    plan: LocalPlan,
    log_dir: Path,
    echo: Echo = print,
    log_with: str | None = None,
    command: Callable[[PlannedRun], list[str]] | None = None,
    poll_s: float = 0.5,
) -> list[Outcome]:
    """Run `pending` as `muse run` subprocesses, `plan.parallel` at a time.

    Each writes its output to LOG_DIR/<run id>.log (appended: a resumed run's log holds
    every attempt). Processes are started from this thread only, so that each is killed
    with the sweep (the kernel ties that to the thread that started it). Ctrl-C stops
    them all; the same command then resumes.
    """
    make = command or (lambda p: command_line(p.config, log_with))
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(plan.threads),
        "MKL_NUM_THREADS": str(plan.threads),
        "TOKENIZERS_PARALLELISM": "false",
    }
    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    queue = list(pending)
    running: dict[subprocess.Popen, tuple[PlannedRun, float, int, Any]] = {}
    warm: set[tuple] = set()
    busy: Counter[tuple] = Counter()
    outcomes: list[Outcome] = []
    total, started = len(queue), 0
    try:
        while queue or running:
            free = [s for s in range(plan.parallel) if s not in {v[2] for v in running.values()}]
            for p in list(queue):
                if not free:
                    break
                if any(k not in warm and busy[k] for k in p.reference_keys):
                    continue  # its group's first run is computing the shared references
                queue.remove(p)
                slot = free.pop(0)
                child_env = dict(env)
                if plan.gpus:
                    child_env["CUDA_VISIBLE_DEVICES"] = plan.gpus[slot]
                argv = make(p)
                log = open(log_dir / f"{p.run_id}.log", "ab")  # closed when the run ends
                log.write(f"$ {' '.join(argv)}\n".encode())
                log.flush()
                proc = subprocess.Popen(
                    argv,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=child_env,
                    preexec_fn=preexec,
                )
                running[proc] = (p, time.monotonic(), slot, log)
                busy.update(p.reference_keys)
                started += 1
                echo(f"[{started}/{total}] started {p.run_id}: {p.run.label()}")
            time.sleep(poll_s if running else 0)
            for proc in [q for q in running if q.poll() is not None]:
                p, t0, _, log = running.pop(proc)
                log.close()
                busy.subtract(p.reference_keys)
                warm.update(p.reference_keys)
                seconds = time.monotonic() - t0
                if proc.returncode == 0:
                    outcomes.append(Outcome(p.run_id, "done", seconds))
                    echo(f"  finished {p.run_id} in {seconds:.0f} s")
                else:
                    reason = _last_line(log_dir / f"{p.run_id}.log")
                    outcomes.append(Outcome(p.run_id, "failed", seconds, reason))
                    echo(f"  FAILED {p.run_id} (exit {proc.returncode}): {reason}")
    finally:
        for proc, (_, _, _, log) in running.items():  # interrupted: stop the runs we started
            proc.kill()
            proc.wait()
            log.close()
    return outcomes


# --------------------------------------------------------------------------- SLURM


def minutes(value: Any) -> int:
    """A time limit as minutes: a number of minutes, or SLURM's "[D-]HH:MM[:SS]"."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return max(1, round(value))
    if isinstance(value, str):
        m = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d{1,2})(?::(\d{1,2}))?", value.strip())
        if m:
            days, hours, mins, secs = (int(g) if g else 0 for g in m.groups())
            return max(1, days * 1440 + hours * 60 + mins + (1 if secs else 0))
    raise ConfigError(f"executor time must be minutes or D-HH:MM:SS, got {value!r}.")


def submitit_parameters(options: Mapping[str, Any], sweep_name: str) -> dict[str, Any]:
    """`AutoExecutor.update_parameters` keywords for the sweep file's slurm options.

    Generic keys (timeout_min, gpus_per_node, cpus_per_task, mem_gb) apply on any
    submitit cluster; `slurm_*` keys only on SLURM (submitit ignores them elsewhere).
    """
    params: dict[str, Any] = {
        "name": f"muse-{sweep_name}",
        "timeout_min": minutes(options.get("time", 240)),
        "nodes": 1,
        "tasks_per_node": 1,
        "cpus_per_task": _positive_int(options.get("cpus_per_run", 4), "cpus_per_run"),
    }
    gpus = options.get("gpus_per_run", 1)
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 0:
        raise ConfigError(f"gpus_per_run must be a whole number >= 0, got {gpus!r}.")
    params["gpus_per_node"] = gpus
    if options.get("mem_gb") is not None:
        params["mem_gb"] = _positive_int(options["mem_gb"], "mem_gb")
    for key, name in (("partition", "slurm_partition"), ("account", "slurm_account")):
        if options.get(key):
            params[name] = str(options[key])
    if options.get("array_parallelism") is not None:
        params["slurm_array_parallelism"] = _positive_int(
            options["array_parallelism"], "array_parallelism"
        )
    if options.get("setup"):
        setup = options["setup"]
        params["slurm_setup"] = [setup] if isinstance(setup, str) else [str(s) for s in setup]
    if options.get("slurm_args"):
        if not isinstance(options["slurm_args"], Mapping):
            raise ConfigError("executor slurm_args must be a mapping of sbatch options.")
        params["slurm_additional_parameters"] = dict(options["slurm_args"])
    return params


def execute_run(cfg: RunConfig, log_with: str | None = None, threads: int | None = None) -> str:
    """The body of one cluster job: the run, in this process, on `threads` torch threads
    (restored after, for submitit's debug executor, which runs jobs in the caller)."""
    import torch

    from muse_bench.engines.background import torch_threads
    from muse_bench.sweeps.tracking import tracked_run

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with torch_threads(threads or torch.get_num_threads()):
        return tracked_run(cfg, log_with, echo=print)["run_id"]


def waves(pending: Sequence[PlannedRun], finished: Sequence[PlannedRun]) -> list[list[PlannedRun]]:
    """Two arrays: the first run of each reference group nothing has warmed yet, then the
    rest (which reuse the references the first array left)."""
    warm = {p.reference_keys[1] for p in finished}
    first, rest = [], []
    for p in pending:
        key = p.reference_keys[1]
        if key in warm:
            rest.append(p)
        else:
            warm.add(key)
            first.append(p)
    return [w for w in (first, rest) if w]


def _import_submitit():
    try:
        import submitit
    except ModuleNotFoundError:
        raise ConfigError(
            "the slurm executor needs submitit: pip install 'muse-bench[slurm]'."
        ) from None
    return submitit


def run_slurm(
    pending: Sequence[PlannedRun],
    finished: Sequence[PlannedRun],
    options: Mapping[str, Any],
    folder: Path,
    sweep_name: str,
    echo: Echo = print,
    log_with: str | None = None,
) -> list[Outcome]:
    """Submit `pending` as SLURM array jobs through submitit and wait for them.

    `options["cluster"]` picks submitit's backend: `slurm` (default), or `local` / `debug`
    to try a sweep on this machine (as CI does). Job logs go to FOLDER/<job id>_*.
    """
    submitit = _import_submitit()
    cluster = options.get("cluster", "slurm")
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    except Exception as exc:  # no sbatch here, or an unknown cluster name
        raise ConfigError(f"cannot use submitit cluster '{cluster}': {exc}") from None
    params = submitit_parameters(options, sweep_name)
    executor.update_parameters(**params)
    threads = params["cpus_per_task"]
    outcomes: list[Outcome] = []
    for wave in waves(pending, finished):
        t0 = time.monotonic()
        with executor.batch():
            jobs = [executor.submit(execute_run, p.config, log_with, threads) for p in wave]
        ids = ", ".join(str(j.job_id) for j in jobs)
        echo(f"submitted {len(jobs)} job(s) to {cluster}: {ids}")
        for p, job in zip(wave, jobs, strict=True):
            try:
                job.result()
            except Exception as exc:  # the job's own failure, reported per run
                text = str(exc).strip().splitlines()
                reason = next((ln for ln in reversed(text) if ln.strip()), type(exc).__name__)
                outcomes.append(Outcome(p.run_id, "failed", time.monotonic() - t0, reason))
                echo(f"  FAILED {p.run_id} (job {job.job_id}): {reason}")
            else:
                outcomes.append(Outcome(p.run_id, "done", time.monotonic() - t0))
                echo(f"  finished {p.run_id} (job {job.job_id})")
    return outcomes
