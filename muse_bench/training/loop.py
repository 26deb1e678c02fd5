"""The one training loop behind every gradient-based unlearner and TV/WHP's fine-tune.

MUSE's recipe: forget and retain text packed into `max_len` chunks that start with BOS,
each forget chunk paired with a retain chunk, AdamW at a constant learning rate, a
checkpoint every epoch. On top of it this loop adds exact resume (model, optimizer and
RNG state in safetensors, see `muse_bench.training.checkpoints` for the layout of `work_dir`), a
guard that stops on a non-finite loss, and `accelerate` so the same code runs on CPU, one
GPU or several processes (DDP, see `muse_bench.core.distributed`: the optimisation does not
depend on the number of processes), or sharded over them (`fsdp`, see `muse_bench.training.fsdp`).

Memory options, for 7B models on one GPU: LoRA adapters (`lora_rank`, see
`muse_bench.training.lora`; merged into the weights before a model leaves the loop), gradient
checkpointing, bf16 autocast, and for KL regularizers cached top-k reference
distributions instead of a resident frozen copy (`ref_topk`, see
`muse_bench.training.ref_logprobs`, which holds what losses read of the reference model).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from muse_bench.core.distributed import Processes
from muse_bench.core.errors import ConfigError, TrainingError
from muse_bench.training.checkpoints import (
    STATE_JSON,
    STATE_TENSORS,
    _check_resumable,
    _load_weights,
    _read_state,
    _restore_state,
    _rng_tensors,
    _save_checkpoint,
    completed_epochs,
    epoch_dir,
)
from muse_bench.training.fsdp import FullyShardedModel
from muse_bench.training.hooks import TrainHooks, restore_trainable, select_trainable
from muse_bench.training.lora import LLAMA_LORA_TARGETS, LoraAdapters
from muse_bench.training.packing import pack_texts, pad_batch
from muse_bench.training.ref_logprobs import Batch, ReferenceProvider, RefTopK, _to, token_logprobs
from muse_bench.training.update_rules import LossTerms, UpdateConfig, check_update, make_update_rule

__all__ = [
    "MIXED_PRECISIONS",
    "SCHEDULERS",
    "EpochResult",
    "LossFn",
    "TrainConfig",
    "collate",
    "disable_gradient_checkpointing",
    "enable_gradient_checkpointing",
    "epoch_batches",
    "epoch_plan",
    "lr_factor",
    "make_adamw",
    "resolve_mixed_precision",
    "train",
    # Re-exported from the modules they moved to, for tests and code written against
    # `muse_bench.training.loop` (losses, resume checks); new code imports them from there.
    "Batch",
    "ReferenceProvider",
    "RefTopK",
    "token_logprobs",
    "LLAMA_LORA_TARGETS",
    "STATE_JSON",
    "STATE_TENSORS",
    "completed_epochs",
    "epoch_dir",
]

SCHEDULERS = ("constant", "linear", "cosine")
FSDP_NEEDS_PROCESSES = (
    "fsdp shards the model over several processes; launch 2 or more with torchrun or "
    "accelerate launch (configs/accelerate/fsdp.yaml), or drop -P fsdp=true."
)
FSDP_WITH_LORA = (
    "fsdp and lora_rank cannot be combined; LoRA already keeps the trained state small, "
    "so drop one of them."
)
MIXED_PRECISIONS = ("auto", "no", "bf16")


LossFn = Callable[[nn.Module, Batch, "Batch | None", ReferenceProvider], torch.Tensor]


@dataclass(frozen=True)
class TrainConfig:
    """Everything the loop needs besides the model, the data and the loss.

    `batch_size` and `grad_accum` define the optimisation whatever the number of processes:
    an optimizer step sees `batch_size * grad_accum` forget chunks, a micro-batch of
    `batch_size` being split across processes.
    """

    lr: float
    epochs: int
    batch_size: int = 4
    grad_accum: int = 1
    max_len: int = 2048
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    gradient_checkpointing: bool = False
    use_retain: bool = False
    ref_logprobs: bool = False
    ref_model: bool = False
    seed: int = 0
    device: str = "cpu"
    work_dir: Path | None = None
    progress: bool = False
    desc: str = "train"
    # What else defines the run (algorithm name, loss hyperparameters): checkpoints in
    # work_dir are only resumed when this, the settings above and the data all match.
    identity: Mapping[str, Any] = field(default_factory=dict)
    # Memory options (defaults: off).
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: tuple[str, ...] = LLAMA_LORA_TARGETS
    mixed_precision: str = "auto"
    ref_topk: int = 0
    # Shard weights, gradients and optimizer state over the processes (muse_bench.training.fsdp).
    fsdp: bool = False
    # Train only the parameters whose name matches this regular expression ("" = all).
    trainable: str = ""
    # Zeroth-order, SAM, SURE (muse_bench.training.update_rules); default: plain AdamW.
    update: UpdateConfig = field(default_factory=UpdateConfig)


#: Experiment tracking (`muse run --log-with`): `fn(config, values, step)` callables the main
#: process calls with the loss after every optimizer step and each epoch's mean loss.
TRAIN_LOGGERS: list[Callable[[TrainConfig, dict[str, float], int], None]] = []


def _log_train(config: TrainConfig, procs: Processes, values: dict[str, float], step: int) -> None:
    if procs.is_main:
        for fn in list(TRAIN_LOGGERS):
            fn(config, values, step)


@dataclass(frozen=True)
class EpochResult:
    """The model after `epoch` epochs; `path` is its checkpoint (None without a work_dir)."""

    epoch: int
    model: nn.Module
    path: Path | None
    loss: float | None


def lr_factor(kind: str, step: int, warmup: int, total: int) -> float:
    """Multiplier of the base lr before optimizer step `step` (0-based), as in transformers."""
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    if kind == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"unknown lr_scheduler '{kind}'; choose one of {', '.join(SCHEDULERS)}")


def resolve_mixed_precision(kind: str, device: torch.device) -> str:
    """'auto' is bf16 autocast on a CUDA GPU that supports it (MUSE's recipe), else 'no'."""
    if kind not in MIXED_PRECISIONS:
        raise ConfigError(
            f"mixed_precision must be one of {', '.join(MIXED_PRECISIONS)}, got '{kind}'."
        )
    if kind == "auto":
        cuda = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return "bf16" if cuda else "no"
    return kind


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass instead of keeping them.

    Non-reentrant checkpointing: unlike the reentrant kind it needs no input that requires
    grad (the frozen embeddings under LoRA) and works under DDP.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ConfigError(
            "gradient_checkpointing needs a Hugging Face model (gradient_checkpointing_enable)."
        )


def disable_gradient_checkpointing(model: nn.Module) -> None:
    """Undo `enable_gradient_checkpointing`."""
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    elif hasattr(model, "gradient_checkpointing_disable"):
        model.gradient_checkpointing_disable()


def epoch_plan(
    n_forget: int, n_retain: int, epoch: int, seed: int, batch_size: int
) -> list[tuple[list[int], list[int]]]:
    """Chunk indices of the (forget, retain) micro-batches of one epoch, in a seeded order.

    Forget chunks are shuffled per epoch; forget item j of epoch e is paired with retain
    chunk `order[((e-1)*F + j) % R]` of one seeded retain permutation, so the retain set is
    cycled through across epochs rather than always reusing its first F chunks. The plan
    depends on neither the number of processes nor the device.
    """
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n_forget, generator=gen).tolist()
    retain_order = (
        torch.randperm(n_retain, generator=torch.Generator().manual_seed(seed)).tolist()
        if n_retain
        else []
    )
    plan = []
    for start in range(0, n_forget, batch_size):
        idx = order[start : start + batch_size]
        picks = []
        if n_retain:
            offset = (epoch - 1) * n_forget + start
            picks = [retain_order[(offset + j) % n_retain] for j in range(len(idx))]
        plan.append((idx, picks))
    return plan


def collate(
    forget_chunks: Sequence[torch.Tensor],
    retain_chunks: Sequence[torch.Tensor],
    forget_idx: Sequence[int],
    retain_idx: Sequence[int],
    pad_id: int,
) -> tuple[Batch, Batch | None]:
    """Padded forget (and retain, if `retain_idx`) batches; each carries `index`, the chunk
    positions, for `ReferenceProvider` look-ups."""
    forget = pad_batch([forget_chunks[i] for i in forget_idx], pad_id)
    forget["index"] = torch.tensor(list(forget_idx), dtype=torch.long)
    retain = None
    if retain_idx:
        retain = pad_batch([retain_chunks[i] for i in retain_idx], pad_id)
        retain["index"] = torch.tensor(list(retain_idx), dtype=torch.long)
    return forget, retain


def epoch_batches(
    forget_chunks: Sequence[torch.Tensor],
    retain_chunks: Sequence[torch.Tensor],
    epoch: int,
    seed: int,
    batch_size: int,
    pad_id: int,
) -> list[tuple[Batch, Batch | None]]:
    """The (forget, retain) micro-batches of one epoch: `epoch_plan`, collated."""
    plan = epoch_plan(len(forget_chunks), len(retain_chunks), epoch, seed, batch_size)
    return [collate(forget_chunks, retain_chunks, f, r, pad_id) for f, r in plan]


def _digest(chunks: Sequence[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c.numpy().tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]


def _fingerprint(
    cfg: TrainConfig, precision: str, forget: Sequence, retain: Sequence
) -> dict[str, Any]:
    skip = {"device", "work_dir", "progress", "desc", "identity"}
    if cfg.lr_scheduler == "constant" and cfg.warmup_steps == 0:
        skip.add("epochs")  # a constant-lr run can be extended by more epochs
    # Memory options join the fingerprint only when they change the run, so checkpoints
    # written before they existed still resume.
    if not cfg.lora_rank:
        skip |= {"lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules"}
    if not (cfg.ref_model and cfg.ref_topk):
        skip.add("ref_topk")
    if not cfg.fsdp:
        skip.add("fsdp")
    if not cfg.trainable:
        skip.add("trainable")
    if not cfg.update.active:
        skip.add("update")
    settings = {k: v for k, v in asdict(cfg).items() if k not in skip}
    settings.pop("mixed_precision")
    if precision != "no":
        settings["mixed_precision"] = precision
    fingerprint = {
        "settings": settings,
        "identity": dict(cfg.identity),
        "forget": _digest(forget),
        "retain": _digest(retain),
    }
    return json.loads(json.dumps(fingerprint, default=str))  # as it reads back from disk


def _make_accelerator(device: str):
    """The accelerator (process group, device) and whether the launch asked for FSDP."""
    from accelerate import Accelerator

    dev = torch.device(device)
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1  # each process has its own GPU
    if dev.type == "cuda" and dev.index is not None and not launched:
        torch.cuda.set_device(dev)
    # Mixed precision is our own autocast (see train): accelerate's is process-global.
    accelerator = Accelerator(cpu=dev.type == "cpu", mixed_precision="no")
    kind = str(accelerator.distributed_type).rpartition(".")[2]
    if kind in ("DEEPSPEED", "MEGATRON_LM"):
        raise ConfigError(
            f"the training loop does not support {kind}; for sharded weights launch with "
            "configs/accelerate/fsdp.yaml (or -P fsdp=true under torchrun), or use "
            "configs/accelerate/ddp.yaml with -P gradient_checkpointing=true / -P lora_rank=16."
        )
    # Under FSDP the loop shards the model itself (muse_bench.training.fsdp), never via prepare().
    return accelerator, kind == "FSDP"


def _set_token_norms(
    procs: Processes, share: float, device: torch.device, *batches: Batch | None
) -> None:
    """Give each batch of this process's share of a micro-batch its `token_norm`: the
    real tokens of the whole micro-batch (a sum over processes) times `share`.

    Token means divide by it (`unlearners.losses.token_count`), so with the loop's weight
    of `world * share` the processes' gradients average to the micro-batch's token mean,
    whatever the number of tokens in each share. A process running a stand-in chunk at
    weight 0 (`share` 0) adds no tokens and divides by the whole count.
    """
    present = [b for b in batches if b is not None]
    counts = torch.stack([(b["labels"][:, 1:] != -100).sum() for b in present])
    totals = procs.sum(counts.to(device, torch.float64) * (share > 0))  # on the device: NCCL
    for batch, total in zip(present, totals, strict=True):
        batch["token_norm"] = (total.clamp(min=1) * (share or 1.0)).float()


def _clip_grad_norm(accelerator, sharded, params, max_norm: float) -> torch.Tensor:
    """Clip the gradients' global norm to `max_norm`; returns the norm before clipping."""
    if sharded is None:
        return accelerator.clip_grad_norm_(params, max_norm)
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)  # sharded: a global norm
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def make_adamw(groups: list[dict[str, Any]], lr: float) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per step where torch has one for these parameters.

    PyTorch's default on CPU is a Python loop over the tensors (8 ms a step for the
    embedded model against 2.6 ms fused); the update is the same AdamW.
    """
    params = [p for g in groups for p in g["params"]]
    fusable = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=lr, fused=True if fusable and params else None)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # Like transformers' Trainer: no decay on biases and norm weights (1-D tensors).
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters.")
    decay = [p for _, p in params if p.ndim >= 2]
    no_decay = [p for _, p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def _non_finite(epoch: int, step: int, work_dir: Path | None, what: str) -> TrainingError:
    done = completed_epochs(work_dir)
    last = str(epoch_dir(work_dir, done[-1])) if done else "none (no epoch completed)"
    return TrainingError(
        f"{what} became non-finite at epoch {epoch} step {step}; last good checkpoint: "
        f"{last}; lower the learning rate (-P lr=...)."
    )


def _check_config(config: TrainConfig, procs: Processes) -> None:
    if config.batch_size < procs.world:
        raise ConfigError(
            f"batch_size {config.batch_size} is smaller than the {procs.world} training "
            "processes, so some would idle on every micro-batch; raise batch_size or launch "
            "fewer processes."
        )
    if config.lora_rank < 0 or config.ref_topk < 0:
        raise ConfigError("lora_rank and ref_topk must be >= 0 (0 = off).")
    if config.lora_rank and not config.lora_target_modules:
        raise ConfigError("lora_target_modules is empty; name the linear layers to adapt.")
    if config.fsdp and procs.world < 2:
        raise ConfigError(FSDP_NEEDS_PROCESSES)
    if config.fsdp and config.lora_rank:
        raise ConfigError(FSDP_WITH_LORA)
    check_update(config.update, fsdp=config.fsdp)


def train(
    model: nn.Module,
    tokenizer,
    loss_fn: LossFn,
    forget: Sequence[str],
    retain: Sequence[str],
    config: TrainConfig,
    *,
    replay: bool = True,
    hooks: TrainHooks | None = None,
    terms: LossTerms | None = None,
) -> Iterator[EpochResult]:
    """Train `model` in place for `config.epochs` epochs, yielding it after each one.

    `loss_fn(model, forget_batch, retain_batch, ref)` returns the scalar loss of one
    micro-batch (`retain_batch` is None unless `config.use_retain`). Each yielded model is
    a plain model (LoRA adapters merged) in eval mode, valid until the generator resumes;
    the caller may stop early. Every process of a multi-process launch must consume the
    generator alike; only the main one writes checkpoints.

    With `config.work_dir`, every epoch is checkpointed; a rerun with the same settings and
    data continues after the latest complete epoch, first yielding the completed ones from
    disk (unless `replay` is False: then only the latest is loaded, to resume from).

    `hooks` (see `muse_bench.training.hooks`) is called at fixed points of the run and its
    state is saved with every checkpoint, for methods that keep state between steps.
    `terms` splits the loss into its forget term and regularizer, for the update rules that
    treat them apart (`config.update`: SAM, SURE; see `muse_bench.training.update_rules`).
    """
    if not forget:
        raise ConfigError("the forget set is empty; there is nothing to unlearn.")
    accelerator, launched_fsdp = _make_accelerator(config.device)
    if launched_fsdp and not config.fsdp:
        config = dataclasses.replace(config, fsdp=True)
    procs = Processes(accelerator.process_index, accelerator.num_processes)
    _check_config(config, procs)
    device = accelerator.device
    precision = resolve_mixed_precision(config.mixed_precision, device)
    autocast = (
        functools.partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)
        if precision == "bf16"
        else contextlib.nullcontext
    )
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    forget_chunks = pack_texts(forget, tokenizer, config.max_len)
    retain_chunks = pack_texts(retain, tokenizer, config.max_len) if config.use_retain else []
    if config.use_retain and not retain_chunks:
        raise ConfigError(
            "this algorithm regularizes on a retain set, but the retain set is empty."
        )
    fingerprint = _fingerprint(config, precision, forget_chunks, retain_chunks)

    work_dir = config.work_dir
    done = [k for k in completed_epochs(work_dir) if k <= config.epochs]
    if done:
        _check_resumable(work_dir, done[-1], fingerprint)
    start = done[-1] if done else 0

    model.to(device)
    torch.manual_seed(config.seed)
    hooks = hooks or TrainHooks()
    hooks.setup(model, tokenizer, config.seed)  # the original model, before any checkpoint
    adapters = None
    if config.lora_rank and start < config.epochs:
        adapters = LoraAdapters(
            model,
            config.lora_rank,
            config.lora_alpha,
            config.lora_dropout,
            config.lora_target_modules,
        )
    ref = ReferenceProvider()
    if start < config.epochs:  # from the original model, before any checkpoint is loaded
        ref = ReferenceProvider.build(
            model,
            forget_chunks,
            pad_id,
            logprobs=config.ref_logprobs,
            keep_model=config.ref_model,
            batch_size=config.batch_size,
            topk=config.ref_topk,
            retain_chunks=retain_chunks,
            processes=procs,
            autocast=autocast,
            # LoRA leaves the base weights untouched: they are the reference, no copy needed.
            reference=adapters.base_model if adapters is not None else None,
        )
    wrapped = None
    bar = None
    frozen: list[str] = []
    try:
        # With LoRA, the adapter state in the latest checkpoint is all a resume needs.
        for k in done if replay else ([] if adapters else done[-1:]):
            path = epoch_dir(work_dir, k)
            if adapters is not None:
                adapters.merge(apply=False)  # plain model; the base weights wait aside
            _load_weights(model, path)
            model.eval()
            if replay:
                yield EpochResult(k, model, path, _read_state(path).get("loss"))
        if start >= config.epochs:
            return
        if adapters is not None:
            adapters.unmerge()

        if config.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        frozen = select_trainable(model, config.trainable)
        sharded = FullyShardedModel(model) if config.fsdp else None
        optimizer = make_adamw(_param_groups(model, config.weight_decay), config.lr)
        if start:
            _restore_state(
                epoch_dir(work_dir, start), optimizer, procs, adapters, sharded, hooks=hooks
            )
        else:
            torch.manual_seed(config.seed + procs.rank)  # own stream per process (dropout)
        if sharded is None:
            wrapped, optimizer = accelerator.prepare(model, optimizer)
        else:
            wrapped = model
        n_micro = math.ceil(len(forget_chunks) / config.batch_size)
        steps_per_epoch = math.ceil(n_micro / config.grad_accum)
        total_steps = steps_per_epoch * config.epochs
        global_step = start * steps_per_epoch
        params = [p for group in optimizer.param_groups for p in group["params"]]
        rule = make_update_rule(  # None unless zeroth-order, SAM or SURE is on
            config.update,
            model,
            optimizer.param_groups,
            procs,
            loss_fn,
            terms,
            accelerator.backward,
            seed=config.seed,
            step=global_step,
            weight_decay=config.weight_decay,
        )
        if rule is not None and start:
            rule.load_state(epoch_dir(work_dir, start))

        from tqdm import tqdm

        for epoch in range(start + 1, config.epochs + 1):
            if adapters is not None:
                adapters.unmerge()  # after the previous epoch's candidate
            wrapped.train()
            hooks.start_epoch(epoch)
            plan = epoch_plan(
                len(forget_chunks), len(retain_chunks), epoch, config.seed, config.batch_size
            )
            bar = tqdm(
                total=len(plan),
                desc=f"{config.desc} epoch {epoch}/{config.epochs}",
                disable=not (config.progress and procs.is_main),
                leave=False,
            )
            total_loss = step_loss = 0.0
            for i, (forget_idx, retain_idx) in enumerate(plan):
                group_start = i - i % config.grad_accum
                group_end = min(group_start + config.grad_accum, len(plan))
                sync = i + 1 == group_end
                # This process's share of the micro-batch, weighted so that DDP's gradient
                # average is the whole micro-batch's gradient.
                lo, hi = procs.share(len(forget_idx))
                share = (hi - lo) / len(forget_idx)
                weight = procs.world * share
                if lo == hi:  # a short last micro-batch: run a chunk at weight 0 to keep in step
                    lo, hi = 0, 1
                forget_batch, retain_batch = collate(
                    forget_chunks, retain_chunks, forget_idx[lo:hi], retain_idx[lo:hi], pad_id
                )
                if procs.world > 1:
                    _set_token_norms(procs, share, device, forget_batch, retain_batch)
                if sharded is not None:
                    no_sync = sharded.no_sync(sync)
                else:
                    no_sync = contextlib.nullcontext() if sync else accelerator.no_sync(wrapped)
                with no_sync:
                    batches = (_to(forget_batch, device), _to(retain_batch, device), ref)
                    if rule is None:
                        with autocast():
                            loss = loss_fn(wrapped, *batches)
                        local = loss.detach().float()
                    else:  # its own passes (and backward, first-order)
                        local = rule.accumulate(
                            wrapped,
                            *batches,
                            weight=weight,
                            micro_batches=group_end - group_start,
                            autocast=autocast,
                        )
                    # The micro-batch's loss, the same on every process: all stop together.
                    value = procs.sum(local * (weight / procs.world)).item()
                    if not math.isfinite(value):
                        raise _non_finite(epoch, i + 1, work_dir, "the loss")
                    if rule is None:
                        accelerator.backward(loss * weight / (group_end - group_start))
                step_loss += value
                if sync:
                    if rule is not None:
                        rule.before_step()  # SURE masks the gradient
                    if config.max_grad_norm:
                        norm = _clip_grad_norm(accelerator, sharded, params, config.max_grad_norm)
                        if not torch.isfinite(torch.as_tensor(norm)).all():
                            raise _non_finite(epoch, i + 1, work_dir, "the gradient norm")
                    factor = lr_factor(
                        config.lr_scheduler, global_step, config.warmup_steps, total_steps
                    )
                    for group in optimizer.param_groups:
                        group["lr"] = config.lr * factor
                    if rule is not None and rule.zeroth_order:
                        rule.step(config.lr * factor)  # no gradient, no AdamW state
                    else:
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    global_step += 1
                    hooks.after_step(procs)
                    step_values = {"loss": step_loss / (group_end - group_start)}
                    _log_train(
                        config, procs, {**step_values, "lr": config.lr * factor}, global_step
                    )
                    step_loss = 0.0
                total_loss += value
                bar.set_postfix(loss=f"{value:.4f}")
                bar.update()
            bar.close()
            hooks.end_epoch(epoch, procs)
            mean_loss = total_loss / len(plan)
            _log_train(config, procs, {"epoch_loss": mean_loss, "epoch": epoch}, global_step)
            if sharded is not None:
                unwrapped = sharded.fill_plain()  # a collective
            else:
                unwrapped = accelerator.unwrap_model(wrapped)
            if adapters is not None:
                adapters.merge()
            path = None
            if work_dir is not None:
                path = epoch_dir(work_dir, epoch)
                rng = _rng_tensors(procs)
                # Sharded AdamW state, gathered whole (collective; None on other processes).
                optim_state = sharded.full_optimizer_state(optimizer) if sharded else None
                if procs.is_main:
                    state = {"epoch": epoch, "global_step": global_step, "loss": mean_loss}
                    _save_checkpoint(
                        path,
                        unwrapped,
                        tokenizer,
                        optimizer,
                        {**state, "fingerprint": fingerprint},
                        rng,
                        adapters,
                        optim_state,
                        hook_state=hooks.state_dict(),
                        extra_tensors=rule.state_tensors() if rule is not None else None,
                    )
                    previous = epoch_dir(work_dir, epoch - 1) / STATE_TENSORS
                    previous.unlink(missing_ok=True)
                procs.barrier()
            unwrapped.eval()
            yield EpochResult(epoch, unwrapped, path, mean_loss)
    finally:
        if bar is not None:
            bar.close()
        if adapters is not None:
            adapters.release()
        if config.gradient_checkpointing:
            disable_gradient_checkpointing(model)
        restore_trainable(model, frozen)
        if wrapped is not None:
            accelerator.free_memory()
