"""Checkpoints of the training loop, and what an exact resume reads back from them.

A checkpoint holds the model, the optimizer state and the RNG state of every process (in
safetensors), and with LoRA the adapters; a rerun with the same settings and data (its
fingerprint, saved in every `trainer_state.json`) continues after the latest complete
epoch.

Layout of `work_dir`::

    epoch_1/  model.safetensors, config.json, tokenizer files, trainer_state.json
    epoch_2/  ... and, in the latest epoch only, trainer_state.safetensors
              (optimizer moments, RNG state of every process, LoRA adapters; older copies
              are deleted to save disk)

An epoch directory counts as complete once its `trainer_state.json` exists; it is
written last, by the main process only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from muse_bench.core.distributed import Processes
from muse_bench.core.errors import ConfigError, TrainingError
from muse_bench.core.io import atomic_write_json
from muse_bench.core.models import save_model
from muse_bench.training.fsdp import FullyShardedModel
from muse_bench.training.lora import LoraAdapters

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
_FORMAT = 1


def epoch_dir(work_dir: Path, epoch: int) -> Path:
    """Where the checkpoint of `epoch` (1-based) lives."""
    return Path(work_dir) / f"epoch_{epoch}"


def completed_epochs(work_dir: Path | None) -> list[int]:
    """Epochs with a complete checkpoint in `work_dir`, ascending."""
    if work_dir is None or not Path(work_dir).is_dir():
        return []
    done = []
    for child in Path(work_dir).iterdir():
        name = child.name
        if name.startswith("epoch_") and name[6:].isdigit() and (child / STATE_JSON).is_file():
            done.append(int(name[6:]))
    return sorted(done)


def _load_weights(model: nn.Module, path: Path) -> None:
    """Load the safetensors weights of checkpoint `path` into `model`, in place.

    Weights in a subdirectory get its name as key prefix (`base/x.safetensors` holds
    `base.*`), which covers composite models such as WHP's that save each part apart.
    """
    from safetensors.torch import load_file

    files = sorted(f for f in path.rglob("*.safetensors") if f.name != STATE_TENSORS)
    if not files:
        raise TrainingError(f"checkpoint '{path}' has no model weights; delete it and rerun.")
    device = next(model.parameters()).device
    state: dict[str, torch.Tensor] = {}
    for f in files:
        prefix = "".join(f"{part}." for part in f.relative_to(path).parts[:-1])
        state.update({prefix + k: v for k, v in load_file(f, device=str(device)).items()})
    result = model.load_state_dict(state, strict=False)
    # Tied weights (lm_head = embed_tokens) are saved once; they are fine if the tensor they
    # share storage with was loaded.
    own = model.state_dict()
    loaded_ptrs = {own[k].data_ptr() for k in state if k in own}
    missing = [k for k in result.missing_keys if own[k].data_ptr() not in loaded_ptrs]
    if missing or result.unexpected_keys:
        raise TrainingError(
            f"checkpoint '{path}' does not fit this model (missing {missing[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}); use a fresh work directory."
        )


def _rng_tensors(procs: Processes) -> dict[str, torch.Tensor]:
    """Every process's RNG state (a collective: all processes call it)."""
    mine = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        if procs.world == 1:
            mine.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        else:
            mine["cuda"] = torch.cuda.get_rng_state()
    states = procs.gather(mine)
    if procs.world == 1:
        return {f"rng.{k}": v for k, v in mine.items()}
    out = {"rng.cpu": states[0]["cpu"].clone()}  # what a single-process resume reads
    for rank, state in enumerate(states):
        out.update({f"rng.{k}.rank{rank}": v for k, v in state.items()})
    return out


def _save_checkpoint(
    path: Path,
    model: nn.Module,
    tokenizer,
    optimizer,
    state: dict[str, Any],
    rng: dict[str, torch.Tensor],
    adapters: LoraAdapters | None,
    optimizer_state: dict[str, Any] | None = None,
    hook_state: dict[str, torch.Tensor] | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write checkpoint `path` (main process only).

    The optimizer state is `optimizer.state_dict()` (keyed by parameter index) unless
    `optimizer_state` is given: the whole state of a sharded run, keyed by parameter name
    (`muse_bench.training.fsdp`). Either way it is saved as `optim.<key>.<name>` tensors.
    `hook_state` (a method's own state, `muse_bench.training.hooks`) is saved as `hooks.*`.
    `extra_tensors` (an update rule's state: zeroth-order fp32 master weights) keep their keys.
    """
    from safetensors.torch import save_file

    save_model(model, tokenizer, path)
    tensors: dict[str, torch.Tensor] = {**rng, **(extra_tensors or {})}
    if adapters is not None:
        tensors.update(
            {f"lora.{k}": v.cpu().contiguous() for k, v in adapters.state_dict().items()}
        )
    tensors.update(
        {f"hooks.{k}": v.detach().cpu().contiguous() for k, v in (hook_state or {}).items()}
    )
    extra: dict[str, dict[str, Any]] = {}
    if optimizer_state is None:
        optimizer_state = optimizer.state_dict()
    for pid, pstate in optimizer_state["state"].items():
        for name, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                extra.setdefault(str(pid), {})[name] = value
    tmp = path / f".{STATE_TENSORS}.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, path / STATE_TENSORS)
    atomic_write_json(path / STATE_JSON, {**state, "optimizer_extra": extra, "format": _FORMAT})


def _restore_state(
    path: Path,
    optimizer,
    procs: Processes,
    adapters: LoraAdapters | None,
    sharded: FullyShardedModel | None = None,
    hooks: Any = None,
) -> None:
    """Load the optimizer, RNG (and LoRA) state of checkpoint `path` for an exact resume.

    `hooks` (a `muse_bench.training.hooks.TrainHooks`) gets back its saved `hooks.*` state.

    In a sharded run (`sharded`), only the main process reads the optimizer state, which
    `sharded` then broadcasts into every process's shards (a collective).
    """
    from safetensors import safe_open

    if not (path / STATE_TENSORS).is_file():
        raise TrainingError(
            f"checkpoint '{path}' has no optimizer state ({STATE_TENSORS}), so training cannot "
            "resume exactly; delete the epoch directories after the last complete one and rerun."
        )
    skip_optimizer = sharded is not None and not procs.is_main
    with safe_open(str(path / STATE_TENSORS), framework="pt") as fh:
        tensors = {
            key: fh.get_tensor(key)
            for key in fh.keys()  # noqa: SIM118 (a safetensors handle, not a dict)
            if not (skip_optimizer and key.startswith("optim."))
        }
    if adapters is not None:
        adapters.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("lora.")})
    if hooks is not None:
        hooks.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("hooks.")})
    extra = _read_state(path).get("optimizer_extra", {})
    # Keys are parameter indices, or parameter names (with dots) in a sharded run.
    key_type = str if sharded is not None else int
    state: dict[Any, dict[str, Any]] = {}
    for key, value in tensors.items():
        kind, _, rest = key.partition(".")
        if kind == "optim":
            pid, _, name = rest.rpartition(".")
            state.setdefault(key_type(pid), {})[name] = value
    for pid, values in extra.items():
        state.setdefault(key_type(pid), {}).update(values)
    if sharded is not None:
        sharded.load_optimizer_state(optimizer, state if procs.is_main else None)
    else:
        fresh = optimizer.state_dict()
        optimizer.load_state_dict({"state": state, "param_groups": fresh["param_groups"]})
    # This process's own stream when the checkpoint has one (same number of processes).
    torch.set_rng_state(tensors.get(f"rng.cpu.rank{procs.rank}", tensors["rng.cpu"]))
    if torch.cuda.is_available():
        own = tensors.get(f"rng.cuda.rank{procs.rank}")
        cuda = [
            tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.") and "rank" not in k
        ]
        if own is not None:
            torch.cuda.set_rng_state(own)
        elif procs.world == 1 and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def _read_state(path: Path) -> dict[str, Any]:
    with open(path / STATE_JSON, encoding="utf-8") as fh:
        return json.load(fh)


def _check_resumable(work_dir: Path, latest: int, fingerprint: dict[str, Any]) -> None:
    saved = _read_state(epoch_dir(work_dir, latest)).get("fingerprint")
    if saved == fingerprint:
        return
    diffs = []
    for part in ("settings", "identity"):
        old, new = (saved or {}).get(part, {}), fingerprint[part]
        keys = list(new) + [k for k in old if k not in new]
        diffs += [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
    for part in ("forget", "retain"):
        if (saved or {}).get(part) != fingerprint[part]:
            diffs.append(f"{part} data")
    raise ConfigError(
        f"'{work_dir}' holds checkpoints of a different run ({'; '.join(diffs) or 'format'} "
        "differ); use another output directory or delete it."
    )
