"""The run manifest: everything besides the command line that decides a run's numbers.

A report's `manifest` says on what hardware and how the run was executed (device type
and count, world size and launcher, sharding, dtype and mixed precision), how it was
batched (per-device batch, gradient accumulation and the effective batch, chunk length),
its seeds, the library versions, the harness version and git commit, and content hashes
of the data files and of the target and retrain weights and tokenizers. A leaderboard
row carries a compact digest of it (`manifest_cell`: the settings a re-run needs and the
hash of the full manifest), so a row can be traced to the report it came from.

Nothing here fails a run: a value that cannot be read (no git checkout, no tokenizer
file) is recorded as null.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from muse_bench import __version__
from muse_bench.core.distributed import launched_processes
from muse_bench.core.models import default_dtype
from muse_bench.data import data_fingerprint
from muse_bench.leaderboard.rows import manifest_cell, manifest_hash  # noqa: F401 (re-exported)
from muse_bench.task import Task, local_model_dir, model_fingerprint

#: Tokenizer files whose bytes decide how text becomes tokens.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)

#: MUSE's chunk length (SPEC §4), used when neither the algorithm nor the model caps it.
MUSE_CHUNK = 2048


def launcher() -> str:
    """How this process was started: `accelerate` (accelerate launch), `torchrun`,
    `other` (WORLD_SIZE set by something else) or `none` (a plain process)."""
    env = os.environ
    if any(k in env for k in ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_DYNAMO_BACKEND")):
        return "accelerate"
    if "TORCHELASTIC_RUN_ID" in env:
        return "torchrun"
    return "other" if launched_processes() > 1 else "none"


def device_info(device: str) -> dict[str, Any]:
    """The device type, its name, how many take part (one per process) and the CPU
    threads torch uses (they change float sums on CPU, so reproducibility)."""
    dev = torch.device(device)
    world = launched_processes()
    if dev.type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(dev.index or 0)
        count = world
    else:
        name = platform.processor() or platform.machine()
        count = 1  # several CPU processes share one machine
    return {
        "type": dev.type,
        "name": name,
        "count": count,
        "world_size": world,
        "launcher": launcher(),
        "torch_threads": torch.get_num_threads(),
    }


def git_commit(where: Path | None = None) -> dict[str, Any] | None:
    """The commit of the harness checkout and whether it had local changes; None outside
    a git checkout (an installed wheel) or when git is missing."""
    root = where or Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def tokenizer_fingerprint(path: str | Path) -> str | None:
    """A short hash of a checkpoint's tokenizer files (None when it has none)."""
    h = hashlib.sha256()
    found = False
    for name in TOKENIZER_FILES:
        f = Path(path) / name
        if f.is_file():
            found = True
            h.update(name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:12] if found else None


def model_hashes(spec: str) -> dict[str, Any]:
    """The weights and tokenizer hashes of a model given as a path or hub id."""
    try:
        path = local_model_dir(spec)
        return {
            "path": str(spec),
            "weights": model_fingerprint(path),
            "tokenizer": tokenizer_fingerprint(path),
        }
    except Exception:  # noqa: BLE001 - a manifest never fails a run
        return {"path": str(spec), "weights": None, "tokenizer": None}


def content_hashes(task: Task) -> dict[str, Any]:
    """Hashes of the data files and of the target and retrain models."""
    return {
        "data": data_fingerprint(task.corpus.data_dir),
        "target": model_hashes(task.models.target),
        "retrain": model_hashes(task.models.retrain),
    }


def batch_settings(params: Mapping[str, Any], world: int) -> dict[str, Any] | None:
    """Per-device batch, gradient accumulation, world size and the effective batch (in
    chunks per optimizer step) of an algorithm's hyperparameters; None for an algorithm
    without batches. TV and WHP batch their fine-tune (`ft_batch_size`, `ft_grad_accum`)."""
    for prefix in ("", "ft_"):
        per_device = params.get(f"{prefix}batch_size")
        if isinstance(per_device, int) and not isinstance(per_device, bool):
            accum = int(params.get(f"{prefix}grad_accum") or 1)
            return {
                "per_device": per_device,
                "grad_accum": accum,
                "world_size": world,
                "effective": per_device * accum * world,
            }
    return None


def recipe_batch(algo_cls: Any, benchmark_id: str) -> int | None:
    """The effective batch of the benchmark's recipe for an algorithm: its defaults for
    the benchmark (MUSE's 7B recipe on hub data, the embedded defaults on embedded data),
    on one process."""
    import dataclasses

    defaults = {f.name: f.default for f in dataclasses.fields(algo_cls)}
    defaults.update(algo_cls.defaults_for(benchmark_id))
    settings = batch_settings(defaults, 1)
    return settings["effective"] if settings else None


def chunk_length(params: Mapping[str, Any], model_spec: str) -> int:
    """The chunk length training uses: the algorithm's `max_len`, else MUSE's 2048 capped
    at the target's `max_position_embeddings` (as `unlearners.base.chunk_length`)."""
    if params.get("max_len"):
        return int(params["max_len"])
    try:
        config = json.loads((local_model_dir(model_spec) / "config.json").read_text())
        limit = config.get("max_position_embeddings")
    except Exception:  # noqa: BLE001 - a manifest never fails a run
        limit = None
    return min(MUSE_CHUNK, limit) if isinstance(limit, int) and limit >= 2 else MUSE_CHUNK


def precision(params: Mapping[str, Any], device: str) -> dict[str, Any]:
    """The dtype the weights are loaded in and the mixed precision of training."""
    from muse_bench.training.loop import resolve_mixed_precision

    dev = torch.device(device)
    mixed = params.get("mixed_precision")
    return {
        "dtype": str(default_dtype(dev)).removeprefix("torch."),
        "mixed_precision": resolve_mixed_precision(mixed, dev) if mixed else None,
    }


def sharding(params: Mapping[str, Any], world: int) -> str:
    """How training is split: FSDP (sharded weights), DDP (replicas), or none."""
    if params.get("fsdp"):
        return "FSDP"
    return "DDP" if world > 1 else "none"


def run_manifest(
    *,
    task: Task,
    device: str,
    params: Mapping[str, Any],
    seed: int,
    attack: str,
    n_bootstrap: int,
    select: str | None,
    engine: str,
    eval_batch_size: int,
    recipe_effective_batch: int | None = None,
) -> dict[str, Any]:
    """The manifest of a run (`params` are the unlearner's resolved hyperparameters;
    empty for an evaluation alone)."""
    from muse_bench.runner.records import versions

    world = launched_processes()
    batch = batch_settings(params, world)
    if batch is not None:
        batch["recipe_effective"] = recipe_effective_batch
    return {
        "device": device_info(device),
        "sharding": sharding(params, world) if params else "none",
        **precision(params, device),
        "batch": batch,
        "chunk_length": chunk_length(params, task.models.target) if params else None,
        "seeds": {"run": seed, "torch": seed, "bootstrap": seed},
        "evaluation": {
            "engine": engine,
            "batch_size": eval_batch_size,
            "attack": attack,
            "n_bootstrap": n_bootstrap,
            "select": select,
        },
        "benchmark": task.corpus.benchmark_id,
        "source": task.source,
        "hashes": content_hashes(task),
        "versions": versions(),
        "harness": {"version": __version__, "git": git_commit()},
    }


def batch_notice(manifest: Mapping[str, Any]) -> list[str]:
    """What `muse run` prints about batching: the effective batch, and a warning when it
    differs from the benchmark recipe's (then the numbers are not the recipe's)."""
    batch = manifest.get("batch")
    if not batch:
        return []
    lines = [
        f"effective batch: {batch['effective']} chunks of {manifest.get('chunk_length')} tokens "
        f"per optimizer step ({batch['per_device']} per device x {batch['grad_accum']} "
        f"accumulation x {batch['world_size']} process(es))"
    ]
    recipe = batch.get("recipe_effective")
    if recipe is not None and recipe != batch["effective"]:
        lines.append(
            f"warning: the effective batch {batch['effective']} differs from the "
            f"{manifest.get('benchmark')} recipe's {recipe}; the numbers are not the recipe's "
            "(set batch_size/grad_accum so that per-device x accumulation x processes = "
            f"{recipe})."
        )
    return lines


def plan_manifest(plan: Any) -> dict[str, Any]:
    """The manifest of a planned `muse run` (a `runner.plan.RunPlan`)."""
    cfg = plan.cfg
    return run_manifest(
        task=plan.task,
        device=plan.device,
        params=plan.resolved_params,
        seed=cfg.seed,
        attack=cfg.attack,
        n_bootstrap=cfg.n_bootstrap,
        select=cfg.select,
        engine=cfg.engine,
        eval_batch_size=cfg.batch_size,
        recipe_effective_batch=recipe_batch(type(plan.unlearner), plan.task.corpus.benchmark_id),
    )
