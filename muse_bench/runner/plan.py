"""The plan of a `muse run`: its settings checked, its task, requests and unlearner
resolved, and its identity (run id and directory) derived, before any file is written."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from muse_bench.core.distributed import Processes, main_only, start_processes
from muse_bench.core.types import ForgetRequest
from muse_bench.protocols import requests as protocol_requests
from muse_bench.runner.config import (
    RunConfig,
    apply_numerics,
    check_config,
    check_model,
    safe_dir_name,
)
from muse_bench.runner.records import short_hash
from muse_bench.task import Task, local_model_dir, model_fingerprint, resolve_task


@dataclass(frozen=True)
class RunPlan:
    """Everything a run's stages share: settings, task, requests, unlearner, identity."""

    cfg: RunConfig
    device: str
    procs: Processes
    echo: Callable[[str], None]
    task: Task
    requests: tuple[ForgetRequest, ...]
    algo_name: str
    unlearner: Any
    resolved_params: dict[str, Any]
    run_id: str
    dir: Path
    numerics: dict[str, bool]

    @property
    def lock_path(self) -> Path:
        return self.dir.parent / f".{self.run_id}.lock"


def plan_run(cfg: RunConfig, echo: Callable[[str], None] = print) -> RunPlan:
    """Check every setting and resolve the run; raises ConfigError before any write."""
    from muse_bench.unlearners import get_unlearner_class, parse_params, read_model_config

    # Every check comes before the first file is written: a bad command changes nothing.
    device = check_config(cfg)
    numerics = apply_numerics(cfg)
    procs = start_processes(device)
    task = resolve_task(cfg.corpus, cfg.source, cfg.target, cfg.retrain, cfg.hub_source)
    requests = tuple(protocol_requests(cfg.protocol, task.corpus))
    cls = get_unlearner_class(cfg.algo)
    defaults = cls.defaults_for(task.corpus.benchmark_id)
    unlearner = cls(**{**defaults, **parse_params(cls, list(cfg.params))})
    unlearner.validate()
    # the class's own registered name (a plugin subclass of npo is not "npo")
    algo_name = cls.name()
    for which in ("target", "retrain"):
        check_model(getattr(task.models, which), cfg)
    # checks of hyperparameters against the model's shape (RMU's layer), before any work
    unlearner.check_model(read_model_config(local_model_dir(task.models.target)))
    resolved = asdict(unlearner)
    identity = {
        "benchmark": task.corpus.benchmark_id,
        "algo": algo_name,
        "params": resolved,
        "protocol": cfg.protocol,
        "seed": cfg.seed,
        "select": cfg.select,
        "attack": cfg.attack,
        # the models by content, not by path: the same run made in two clones has one id
        "models": {
            which: model_fingerprint(local_model_dir(getattr(task.models, which)))
            for which in ("target", "retrain")
        },
        "flush_denormal": cfg.flush_denormal,
    }
    run_id = f"{algo_name}-{short_hash(identity)}"
    return RunPlan(
        cfg=cfg,
        device=device,
        procs=procs,
        echo=main_only(echo, procs),
        task=task,
        requests=requests,
        algo_name=algo_name,
        unlearner=unlearner,
        resolved_params=resolved,
        run_id=run_id,
        dir=cfg.out / task.corpus.name / safe_dir_name(algo_name) / run_id,
        numerics=numerics,
    )
