"""`muse run`: the stages of a run in order.

1. plan (`plan.py`): check every setting and derive the run's identity, before any write;
2. references (`references.py`): the retrain AUC and the target's and retrain model's
   evaluations, cached per benchmark so later runs reuse them;
3. train each request (`request.py`): unlearn, select a candidate (`selection.py`),
   evaluate it (`evaluation.py`);
4. robustness (`muse_bench.robustness.stage`): the checks of `--robustness` on the main
   request's model, each written to disk as it finishes, with their target and retrain
   references cached per benchmark;
5. publish: the report (`report.py`) and its leaderboard row (`records.py`).

Every stage leaves its result on disk before the next starts, so running the same
command again after an interruption continues where it stopped, and a finished run is
not redone (unless forced) and never adds a second leaderboard row.

Launched as several processes (`accelerate launch`, `torchrun`), the processes train
together (see `muse_bench.training.loop`), split every evaluation
(`muse_bench.engines.sharded`) and so all compute the same metrics; only the main process
writes files, and it reads the files that decide what to do next for all of them
(`muse_bench.core.distributed.on_main`).
"""

from __future__ import annotations

import functools
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from muse_bench.core.distributed import held_by_main, on_main
from muse_bench.core.io import atomic_write_json, check_writable_dir, try_lock
from muse_bench.core.types import ForgetRequest, RetrainAUC
from muse_bench.runner.config import RunConfig
from muse_bench.runner.manifest import batch_notice, plan_manifest
from muse_bench.runner.plan import RunPlan, plan_run
from muse_bench.runner.records import publish, reuse_report
from muse_bench.runner.ref_attack import retrain_losses
from muse_bench.runner.references import reference_reports, retrain_auc
from muse_bench.runner.report import run_report
from muse_bench.runner.request import unlearn_request


def remove_stale_temps(run_dir: Path) -> None:
    """Remove what a killed process was half-way through writing in the run directory:
    hidden temp files of atomic writes and hidden temp dirs of save_model. Safe: the
    caller holds the run's lock, so no other command writes here (and of a launch of
    several processes, only the main one writes)."""
    if not run_dir.is_dir():
        return
    for path in sorted(run_dir.rglob(".*"), key=lambda p: len(p.parts)):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.name.endswith(".tmp"):
            path.unlink(missing_ok=True)


class Run:
    """One `muse run`: owns its directory, its requests and its report.

    In a launch of several processes every process makes its own `Run` and executes it;
    they evaluate together, and the main process alone writes and prints.
    """

    def __init__(self, cfg: RunConfig, echo: Callable[[str], None] = print) -> None:
        from muse_bench.robustness.stage import resolve_checks

        self.plan: RunPlan = plan_run(cfg, echo)
        # before any write: a check that cannot run on this corpus stops the run here
        self.checks = tuple(c.name for c in resolve_checks(cfg, self.plan.task))
        for line in batch_notice(plan_manifest(self.plan)):
            self.plan.echo(line)

    @property
    def run_id(self) -> str:
        return self.plan.run_id

    @property
    def dir(self) -> Path:
        return self.plan.dir

    def execute(self) -> dict[str, Any]:
        """Run every stage not finished yet; returns the report."""
        plan = self.plan
        on_main(lambda: check_writable_dir(plan.cfg.out), plan.procs)
        # one command per run directory: a second identical command fails at once (in a
        # launch of several processes, the main one holds the lock for all of them)
        lock = functools.partial(try_lock, plan.lock_path, f"run {plan.run_id}")
        with held_by_main(lock, plan.procs):
            return self._execute()

    # -- stages
    def _start_dir(self) -> None:
        """Empty the run directory for --force, remove stale temps, write config.json."""
        plan = self.plan
        if plan.cfg.force and plan.dir.exists():
            shutil.rmtree(plan.dir)
        remove_stale_temps(plan.dir)
        atomic_write_json(
            plan.dir / "config.json",
            {
                "run_id": plan.run_id,
                "algo": plan.algo_name,
                "params": plan.resolved_params,
                **{k: str(v) for k, v in asdict(plan.cfg).items()},
            },
        )

    def references(self) -> tuple[RetrainAUC, dict[str, dict[str, Any]]]:
        """The retrain AUC and the target's and retrain model's reports (cached)."""
        plan, cfg = self.plan, self.plan.cfg
        rauc = retrain_auc(
            plan.task,
            cfg.attack,
            cfg.out / ".cache",
            "hf",
            plan.device,
            cfg.batch_size,
            progress=cfg.progress,
            allow_pickle=cfg.allow_pickle,
            trust_remote_code=cfg.trust_remote_code,
        )
        refs = reference_reports(cfg, plan.task, rauc, plan.echo)
        # the `ref` attack's retrain losses, cached now that no other model is loaded
        retrain_losses(
            plan.task,
            cfg.out / ".cache",
            plan.device,
            cfg.batch_size,
            cfg.allow_pickle,
            cfg.trust_remote_code,
        )
        return rauc, refs

    def train_requests(self, threshold: float, rauc: RetrainAUC) -> dict[str, dict[str, Any]]:
        """Every request's result, by label (`single_1` is the main request)."""
        results: dict[str, dict[str, Any]] = {}
        previous: Path | None = None
        for req in self.plan.requests:
            # fold 1 of scale and sustain is the main request: reuse its result
            key = "single_1" if req.index == 1 and req.start == "target" else req.label
            if key not in results:
                main = ForgetRequest("single", 1, req.forget, req.retain)
                results[key] = unlearn_request(
                    self.plan, main if key == "single_1" else req, previous, threshold, rauc
                )
            if req.protocol == "sustain":
                previous = Path(results[key]["model"])
            results[req.label] = results[key]
        return results

    def robustness(
        self,
        model: str | None,
        before: dict[str, Any],
        refs: dict[str, dict[str, Any]],
        rauc: RetrainAUC,
    ) -> dict[str, Any]:
        """The robustness checks on the main request's saved model (each check's result
        is on disk before the next starts)."""
        from muse_bench.core.errors import ConfigError
        from muse_bench.robustness.stage import robustness_section

        if not self.checks:
            return {}
        if not model or not Path(model).exists():
            raise ConfigError(
                f"the robustness checks need the run's saved model, and '{model}' is gone; "
                "rerun with --force."
            )
        plan = self.plan
        return robustness_section(
            plan.cfg, plan.task, rauc, self.checks, model, before, refs, plan.dir, plan.echo
        )

    def publish(self, report: dict[str, Any], replace: bool = False) -> dict[str, Any]:
        """Write report.json and the leaderboard row (main process); every process
        returns the main process's report (its timings, its row's path)."""
        cfg = self.plan.cfg

        def save() -> dict[str, Any]:
            atomic_write_json(self.plan.dir / "report.json", report)
            if cfg.publish:
                report["leaderboard"] = str(publish(report, cfg.out, replace=cfg.force or replace))
            return report

        return on_main(save, self.plan.procs)

    def _execute(self) -> dict[str, Any]:
        plan, cfg = self.plan, self.plan.cfg
        report_path = plan.dir / "report.json"
        if not cfg.force:
            report = on_main(lambda: reuse_report(report_path, cfg.out, cfg.publish), plan.procs)
            if report is not None:
                done = report.get("robustness") or {}
                if all(name in done for name in self.checks):
                    plan.echo(f"run {plan.run_id} already finished; use --force to redo it.")
                    return report
                return self._add_checks(report)
        started = time.time()
        on_main(self._start_dir, plan.procs)
        rauc, refs = self.references()
        references_s = time.time() - started
        results = self.train_requests(refs["retrain"]["metrics"]["knowmem_f"], rauc)
        main = results["single_1"]
        checks_started = time.time()
        section = self.robustness(main["model"], main["metrics"], refs, rauc)
        timings = {"total_s": time.time() - started, "references_s": references_s}
        if self.checks:
            timings["robustness_s"] = time.time() - checks_started
        return self.publish(run_report(plan, results, refs, timings, section))

    def _add_checks(self, report: dict[str, Any]) -> dict[str, Any]:
        """A finished run asked for checks its report lacks: run them, update the report
        and replace its leaderboard row."""
        self.plan.echo(f"run {self.plan.run_id} finished; adding robustness checks.")
        rauc, refs = self.references()
        section = self.robustness(report.get("model"), report["metrics"], refs, rauc)
        report["robustness"] = {**(report.get("robustness") or {}), **section}
        report.pop("leaderboard", None)
        return self.publish(report, replace=True)


def run(cfg: RunConfig, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run an unlearning experiment end to end; returns the report."""
    return Run(cfg, echo).execute()
