"""The settings of a run (`RunConfig`) and the checks made on them before any file is written."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from muse_bench.core.distributed import local_device
from muse_bench.core.errors import ConfigError
from muse_bench.core.models import check_checkpoint_dir, resolve_device
from muse_bench.task import local_model_dir

SELECT_MODES = ("first", "last")


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run (the identity fields) and how to execute it."""

    algo: str
    corpus: str
    source: str = "embedded"
    protocol: str = "single"
    params: tuple[str, ...] = ()
    seed: int = 0
    select: str = "first"
    attack: str = "min_k_40"
    out: Path = Path("runs")
    device: str = "auto"
    engine: str = "hf"
    name: str | None = None
    target: str | None = None
    retrain: str | None = None
    batch_size: int = 32
    n_bootstrap: int = 1000
    force: bool = False
    allow_pickle: bool = False
    trust_remote_code: bool = False
    progress: bool = True
    hub_source: str | None = None
    flush_denormal: bool = True
    # robustness checks (`--robustness`): a comma-separated list, "none", or None for the
    # default (muse_bench.robustness.checks.DEFAULT_CHECKS: none)
    robustness: str | None = None
    #: False for the single-seed runs of `muse run --seeds`: their rows are not
    #: published, only the row of their mean (runner/seeds.py)
    publish: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- checks
# Everything a user can get wrong is checked before the first file is written.


def check_engine(engine: str, device: str) -> Any:
    """The engine class for `engine`, refused early if it cannot run here."""
    from muse_bench.engines import ENGINES

    cls = ENGINES.get(engine)
    if engine == "vllm":
        from muse_bench.engines.vllm import VLLM_MISSING

        if importlib.util.find_spec("vllm") is None:
            raise ConfigError(VLLM_MISSING)
        if not device.startswith("cuda"):
            raise ConfigError("--engine vllm runs on a GPU only; use --engine hf on CPU.")
    return cls


def run_device(spec: str) -> str:
    """The device `--device spec` means for this process (its own GPU when launched as
    several processes)."""
    return str(local_device(resolve_device(spec)))


def check_config(cfg: RunConfig) -> str:
    """Validate the settings shared by `muse run` and `muse eval`; returns the device."""
    from muse_bench.metrics.mia import check_attack

    if cfg.select not in SELECT_MODES:
        raise ConfigError(f"--select must be one of {', '.join(SELECT_MODES)}, not '{cfg.select}'.")
    if cfg.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {cfg.batch_size}.")
    if cfg.n_bootstrap < 1:
        raise ConfigError(f"--bootstrap must be >= 1 resample, got {cfg.n_bootstrap}.")
    if cfg.seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {cfg.seed}.")
    if cfg.robustness is not None:
        from muse_bench.robustness.checks import parse_checks

        parse_checks(cfg.robustness)  # names only; the corpus is checked with the task
    device = run_device(cfg.device)
    engine = check_engine(cfg.engine, device)
    check_attack(cfg.attack, with_stats=getattr(engine, "supports_stats", True), with_ref=False)
    return device


def check_model(spec: str, cfg: RunConfig) -> Path:
    """A local checkpoint directory for `spec` that can be loaded safely (weights + tokenizer)."""
    return check_checkpoint_dir(local_model_dir(spec), cfg.allow_pickle, need_tokenizer=True)


def safe_dir_name(label: str) -> str:
    """`label` as one harmless path component (no separators, no leading dot)."""
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", label).strip("._") or "model"


def apply_numerics(cfg: RunConfig) -> dict[str, bool]:
    """Set the process-wide float settings of `cfg`; returns what the report records."""
    from muse_bench.core.numerics import set_flush_denormal

    return {"flush_denormal": set_flush_denormal(cfg.flush_denormal)}
