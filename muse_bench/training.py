"""The one training loop behind every gradient-based unlearner and TV/WHP's fine-tune.

MUSE's recipe: forget and retain text packed into `max_len` chunks that start with BOS,
each forget chunk paired with a retain chunk, AdamW at a constant learning rate, a
checkpoint every epoch. On top of it this loop adds exact resume (model, optimizer and
RNG state in safetensors), a guard that stops on a non-finite loss, and `accelerate` so
the same code runs on CPU, one GPU or several processes (DDP, see `muse_bench.distributed`:
the optimisation does not depend on the number of processes).

Memory options, for 7B models on one GPU: LoRA adapters (`lora_rank`; merged into the
weights before a model leaves the loop), gradient checkpointing, bf16 autocast, and for
KL regularizers cached top-k reference distributions instead of a resident frozen copy
(`ref_topk`).

Layout of `work_dir`::

    epoch_1/  model.safetensors, config.json, tokenizer files, trainer_state.json
    epoch_2/  ... and, in the latest epoch only, trainer_state.safetensors
              (optimizer moments, RNG state of every process, LoRA adapters; older copies
              are deleted to save disk)

An epoch directory counts as complete once its `trainer_state.json` exists; it is
written last, by the main process only.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from muse_bench.distributed import Processes
from muse_bench.errors import ConfigError, TrainingError
from muse_bench.io import atomic_write_json
from muse_bench.models import save_model
from muse_bench.packing import pack_texts, pad_batch

Batch = dict[str, torch.Tensor]
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
SCHEDULERS = ("constant", "linear", "cosine")
MIXED_PRECISIONS = ("auto", "no", "bf16")
#: LoRA's default targets: every linear layer of a Llama block (not the embeddings/head).
LLAMA_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_FORMAT = 1


def token_logprobs(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of every label token given its prefix, and the mask of real tokens.

    Both are `[B, T-1]`: position t scores token t+1. Padding (label -100) has log-prob 0
    and mask False. Computed in fp32 whatever the model's dtype.
    """
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits
    labels = batch["labels"][:, 1:]
    nll = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        labels.flatten(),
        ignore_index=-100,
        reduction="none",
    )
    return -nll.view_as(labels), labels != -100


class RefTopK(NamedTuple):
    """The reference model's top-k next-token log-probabilities at each position of a batch.

    `logprobs` and `indices` are `[B, T-1, k]` (position t predicts token t+1, as in
    `token_logprobs`); `tail` is `[B, T-1]`, the log of the probability mass outside the
    top k, or None when k is the whole vocabulary.
    """

    logprobs: torch.Tensor
    indices: torch.Tensor
    tail: torch.Tensor | None


class ReferenceProvider:
    """What the frozen original model says, for losses that compare against it.

    The loop builds it from the model as it was before any training step (also when
    resuming), so a loss never manages a second model itself:

    - `forget_logprob(batch)`: log p_ref(x) of each forget chunk in the batch, computed once
      before training and cached (NPO needs nothing else, so no second model stays resident);
    - `logits(batch)`: next-token logits of a frozen copy of the model (KL regularizers);
    - `topk(batch)`: instead of the copy (`ref_topk` > 0), the reference's top-k next-token
      log-probabilities on the retain chunks, computed once and kept in CPU memory.
    """

    def __init__(
        self,
        forget_logprobs: torch.Tensor | None = None,
        model: Callable[..., Any] | None = None,
        topk: RefTopK | None = None,
    ) -> None:
        self._forget_logprobs = forget_logprobs
        self._model = model
        self._topk = topk

    @classmethod
    def build(
        cls,
        model: nn.Module,
        forget_chunks: Sequence[torch.Tensor],
        pad_id: int,
        *,
        logprobs: bool,
        keep_model: bool,
        batch_size: int,
        topk: int = 0,
        retain_chunks: Sequence[torch.Tensor] = (),
        processes: Processes | None = None,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        reference: Callable[..., Any] | None = None,
    ) -> ReferenceProvider:
        """Cache what the losses will ask of the reference, from `model` as it is now.

        `logprobs`: forget-chunk log-likelihoods. `keep_model`: reference logits, as a frozen
        copy of `model` when `topk` is 0 (or `reference`, a model that already computes
        them, such as LoRA's base with the adapters off), else as the top-`topk`
        log-probabilities of every retain chunk (`retain_chunks`). With several processes
        each computes a share and the results are summed, so every process ends with the
        whole cache.
        """
        procs = processes or Processes()
        cached = top = None
        if logprobs:

            def sequence(batch: Batch) -> list[torch.Tensor]:
                return [token_logprobs(model, batch)[0].sum(-1)]

            (cached,) = _sharded_forward(
                model, forget_chunks, pad_id, batch_size, procs, autocast, sequence, [()]
            )
        frozen = None
        if keep_model and topk:
            if not retain_chunks:
                raise ConfigError(
                    "ref_topk caches reference distributions of the retain set, which is empty."
                )
            top = _topk_cache(model, retain_chunks, pad_id, batch_size, procs, autocast, topk)
        elif keep_model and reference is not None:
            frozen = reference
        elif keep_model:
            frozen = copy.deepcopy(model).eval().requires_grad_(False)
        return cls(cached, frozen, top)

    def forget_logprob(self, forget_batch: Batch) -> torch.Tensor:
        """Cached reference sequence log-likelihood of each chunk of a forget batch, `[B]`."""
        if self._forget_logprobs is None:
            raise RuntimeError(
                "this loss reads reference log-likelihoods; set `needs_ref_logprobs = True` "
                "on the unlearner class."
            )
        index = forget_batch["index"]
        return self._forget_logprobs.to(index.device)[index]

    def logits(self, batch: Batch) -> torch.Tensor:
        """Next-token logits of the frozen reference model on `batch` (no gradient)."""
        if self._model is None:
            if self._topk is not None:
                raise RuntimeError(
                    "with ref_topk > 0 the reference model is not kept, only its top-k "
                    "distributions on the retain chunks: read them with `ref.topk(batch)`."
                )
            raise RuntimeError(
                "this loss reads the reference model; set `needs_ref_model = True` "
                "on the unlearner class."
            )
        with torch.no_grad():
            return self._model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                use_cache=False,
            ).logits

    def topk(self, retain_batch: Batch) -> RefTopK | None:
        """Cached top-k reference distributions of a retain batch; None without a cache."""
        if self._topk is None:
            return None
        index = retain_batch["index"].cpu()
        width = retain_batch["input_ids"].shape[1] - 1
        device = retain_batch["input_ids"].device
        logprobs, indices, tail = (
            None if t is None else t[index, :width].to(device) for t in self._topk
        )
        return RefTopK(logprobs, indices.long(), tail)


def _sharded_forward(
    model: nn.Module,
    chunks: Sequence[torch.Tensor],
    pad_id: int,
    batch_size: int,
    procs: Processes,
    autocast: Callable[[], contextlib.AbstractContextManager],
    compute: Callable[[Batch], list[torch.Tensor]],
    shapes: list[tuple[int, ...]],
    dtypes: list[torch.dtype] | None = None,
) -> list[torch.Tensor]:
    """`compute(batch)` over all `chunks`, each process doing its share, results summed.

    `compute` returns tensors whose first dim is the batch; `shapes` gives each result's
    trailing shape (`[N, *shape]` in all, shorter batches zero-padded along dim 1).
    """
    device = next(model.parameters()).device
    dtypes = dtypes or [torch.float32] * len(shapes)
    n = len(chunks)
    outs = [
        torch.zeros((n, *s), dtype=d, device=device) for s, d in zip(shapes, dtypes, strict=True)
    ]
    lo, hi = procs.share(n)
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast():
        for start in range(lo, hi, batch_size):
            stop = min(start + batch_size, hi)
            batch = _to(pad_batch(chunks[start:stop], pad_id), device)
            for out, part in zip(outs, compute(batch), strict=True):
                if part.ndim == 1:
                    out[start:stop] = part
                else:
                    out[start:stop, : part.shape[1]] = part
    model.train(was_training)
    return [procs.sum(out) for out in outs]


def _topk_cache(model, chunks, pad_id, batch_size, procs, autocast, k: int) -> RefTopK:
    vocab = model.config.vocab_size
    k = min(k, vocab)
    width = max(len(c) for c in chunks) - 1

    def top(batch: Batch) -> list[torch.Tensor]:
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits[:, :-1]
        logp = F.log_softmax(logits.float(), dim=-1)
        values, indices = logp.topk(k, dim=-1)
        parts = [values, indices.int()]
        if k < vocab:
            parts.append(logp.scatter(-1, indices, -math.inf).logsumexp(-1))
        return parts

    shapes = [(width, k), (width, k)] + ([(width,)] if k < vocab else [])
    dtypes = [torch.float32, torch.int32] + ([torch.float32] if k < vocab else [])
    parts = _sharded_forward(
        model, chunks, pad_id, batch_size, procs, autocast, top, shapes, dtypes
    )
    parts = [p.cpu() for p in parts]
    return RefTopK(parts[0], parts[1], parts[2] if k < vocab else None)


class LoraAdapters:
    """LoRA adapters (peft) injected into a model in place; only they train.

    `merge()` turns the model back into a plain one whose adapted weights are W + ΔW, for a
    candidate to be yielded, saved and evaluated like any other model; the exact W waits
    in CPU memory, and `unmerge()` puts the adapters back and restores W bit for bit (a
    subtraction would drift, badly in bf16). `release()` ends training: the model stays
    plain (merged if it was) and its parameters get back their `requires_grad` flags.
    """

    ADAPTER = "default"

    def __init__(
        self,
        model: nn.Module,
        rank: int,
        alpha: float,
        dropout: float,
        targets: Sequence[str],
    ) -> None:
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.lora import LoraLayer

        self._requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        config = LoraConfig(
            r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets)
        )
        try:
            inject_adapter_in_model(config, model, adapter_name=self.ADAPTER)
        except ValueError as exc:
            raise ConfigError(
                f"LoRA found no layer named {', '.join(targets)} in this model; set "
                "lora_target_modules to names of its linear layers."
            ) from exc
        modules = dict(model.named_modules())
        self._layers: list[tuple[nn.Module, str, LoraLayer]] = []
        for name, module in modules.items():
            if isinstance(module, LoraLayer):
                parent, _, attr = name.rpartition(".")
                self._layers.append((modules[parent], attr, module))
        # Adapters train in fp32 even on a bf16 model (peft's get_peft_model does the same).
        self.params = {n: p for n, p in model.named_parameters() if "lora_" in n}
        for name, param in model.named_parameters():
            param.requires_grad_(name in self.params)
        for param in self.params.values():
            param.data = param.data.float()
        self._model = model
        self._saved: list[torch.Tensor] | None = None

    @property
    def merged(self) -> bool:
        """Whether the model is currently plain, with W + ΔW in the adapted layers."""
        return self._saved is not None

    def merge(self, apply: bool = True) -> None:
        """Make the model plain with W + ΔW (W alone if not `apply`), keeping W aside."""
        if self.merged:
            return
        self._saved = []
        with torch.no_grad():
            for parent, attr, layer in self._layers:
                base = layer.get_base_layer()
                weight = base.weight
                self._saved.append(weight.detach().to("cpu", copy=True))
                if apply:
                    delta = layer.get_delta_weight(self.ADAPTER).float()
                    weight.copy_((weight.float() + delta).to(weight.dtype))
                setattr(parent, attr, base)

    def unmerge(self) -> None:
        """Put the adapters back and restore the exact W; no-op if not merged."""
        if self._saved is None:
            return
        with torch.no_grad():
            for (parent, attr, layer), saved in zip(self._layers, self._saved, strict=True):
                setattr(parent, attr, layer)
                layer.get_base_layer().weight.copy_(saved)
        self._saved = None

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """The model without its adapters (exactly the frozen base) inside the block."""
        if self.merged:
            raise RuntimeError("the adapters are merged; there is no base model to run.")
        for parent, attr, layer in self._layers:
            setattr(parent, attr, layer.get_base_layer())
        try:
            yield
        finally:
            for parent, attr, layer in self._layers:
                setattr(parent, attr, layer)

    def base_model(self, **inputs: Any) -> Any:
        """Run the original model: the base weights with the adapters off. A free, exact
        reference for KL regularizers (no frozen copy)."""
        with self.disabled():
            return self._model(**inputs)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter weights, by their parameter names in the adapted model."""
        return {n: p.detach() for n, p in self.params.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load adapter weights written by `state_dict()`."""
        if state.keys() != self.params.keys():
            raise TrainingError(
                "the checkpoint's LoRA adapters do not match this run's; use a fresh work directory."
            )
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(state[name])

    def release(self) -> None:
        """Leave the model plain for good (merged if it was) with its original flags."""
        if self._saved is None:
            for parent, attr, layer in self._layers:
                setattr(parent, attr, layer.get_base_layer())
        self._saved = None
        for name, param in self._model.named_parameters():
            param.requires_grad_(self._requires_grad.get(name, param.requires_grad))


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


def _to(batch: Batch | None, device: torch.device) -> Batch | None:
    return None if batch is None else {k: v.to(device) for k, v in batch.items()}


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
    from accelerate import Accelerator

    dev = torch.device(device)
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1  # each process has its own GPU
    if dev.type == "cuda" and dev.index is not None and not launched:
        torch.cuda.set_device(dev)
    # Mixed precision is our own autocast (see train): accelerate's is process-global.
    accelerator = Accelerator(cpu=dev.type == "cpu", mixed_precision="no")
    kind = str(accelerator.distributed_type).rpartition(".")[2]
    if kind in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise ConfigError(
            f"the training loop does not support {kind} yet (sharded weights need their own "
            "checkpoints, resume and candidates); launch with configs/accelerate/ddp.yaml, "
            "and for 7B on 80 GB GPUs add -P gradient_checkpointing=true (or -P lora_rank=16)."
        )
    return accelerator


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
) -> None:
    from safetensors.torch import save_file

    save_model(model, tokenizer, path)
    tensors: dict[str, torch.Tensor] = dict(rng)
    if adapters is not None:
        tensors.update(
            {f"lora.{k}": v.cpu().contiguous() for k, v in adapters.state_dict().items()}
        )
    extra: dict[str, dict[str, Any]] = {}
    for pid, pstate in optimizer.state_dict()["state"].items():
        for name, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                extra.setdefault(str(pid), {})[name] = value
    tmp = path / f".{STATE_TENSORS}.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, path / STATE_TENSORS)
    atomic_write_json(path / STATE_JSON, {**state, "optimizer_extra": extra, "format": _FORMAT})


def _restore_state(path: Path, optimizer, procs: Processes, adapters: LoraAdapters | None) -> None:
    from safetensors.torch import load_file

    if not (path / STATE_TENSORS).is_file():
        raise TrainingError(
            f"checkpoint '{path}' has no optimizer state ({STATE_TENSORS}), so training cannot "
            "resume exactly; delete the epoch directories after the last complete one and rerun."
        )
    tensors = load_file(path / STATE_TENSORS)
    if adapters is not None:
        adapters.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("lora.")})
    extra = _read_state(path).get("optimizer_extra", {})
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        kind, _, rest = key.partition(".")
        if kind == "optim":
            pid, _, name = rest.partition(".")
            state.setdefault(int(pid), {})[name] = value
    for pid, values in extra.items():
        state.setdefault(int(pid), {}).update(values)
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


def train(
    model: nn.Module,
    tokenizer,
    loss_fn: LossFn,
    forget: Sequence[str],
    retain: Sequence[str],
    config: TrainConfig,
    *,
    replay: bool = True,
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
    """
    if not forget:
        raise ConfigError("the forget set is empty; there is nothing to unlearn.")
    accelerator = _make_accelerator(config.device)
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
        optimizer = make_adamw(_param_groups(model, config.weight_decay), config.lr)
        if start:
            _restore_state(epoch_dir(work_dir, start), optimizer, procs, adapters)
        else:
            torch.manual_seed(config.seed + procs.rank)  # own stream per process (dropout)
        wrapped, optimizer = accelerator.prepare(model, optimizer)
        n_micro = math.ceil(len(forget_chunks) / config.batch_size)
        steps_per_epoch = math.ceil(n_micro / config.grad_accum)
        total_steps = steps_per_epoch * config.epochs
        global_step = start * steps_per_epoch
        params = [p for group in optimizer.param_groups for p in group["params"]]

        from tqdm import tqdm

        for epoch in range(start + 1, config.epochs + 1):
            if adapters is not None:
                adapters.unmerge()  # after the previous epoch's candidate
            wrapped.train()
            plan = epoch_plan(
                len(forget_chunks), len(retain_chunks), epoch, config.seed, config.batch_size
            )
            bar = tqdm(
                total=len(plan),
                desc=f"{config.desc} epoch {epoch}/{config.epochs}",
                disable=not (config.progress and procs.is_main),
                leave=False,
            )
            total_loss = 0.0
            for i, (forget_idx, retain_idx) in enumerate(plan):
                group_start = i - i % config.grad_accum
                group_end = min(group_start + config.grad_accum, len(plan))
                sync = i + 1 == group_end
                # This process's share of the micro-batch, weighted so that DDP's gradient
                # average is the whole micro-batch's gradient.
                lo, hi = procs.share(len(forget_idx))
                weight = procs.world * (hi - lo) / len(forget_idx)
                if lo == hi:  # a short last micro-batch: run a chunk at weight 0 to keep in step
                    lo, hi = 0, 1
                forget_batch, retain_batch = collate(
                    forget_chunks, retain_chunks, forget_idx[lo:hi], retain_idx[lo:hi], pad_id
                )
                no_sync = contextlib.nullcontext() if sync else accelerator.no_sync(wrapped)
                with no_sync:
                    with autocast():
                        loss = loss_fn(
                            wrapped, _to(forget_batch, device), _to(retain_batch, device), ref
                        )
                    # The micro-batch's loss, the same on every process: all stop together.
                    value = procs.sum(loss.detach().float() * (weight / procs.world)).item()
                    if not math.isfinite(value):
                        raise _non_finite(epoch, i + 1, work_dir, "the loss")
                    accelerator.backward(loss * weight / (group_end - group_start))
                if sync:
                    if config.max_grad_norm:
                        norm = accelerator.clip_grad_norm_(params, config.max_grad_norm)
                        if not torch.isfinite(torch.as_tensor(norm)).all():
                            raise _non_finite(epoch, i + 1, work_dir, "the gradient norm")
                    factor = lr_factor(
                        config.lr_scheduler, global_step, config.warmup_steps, total_steps
                    )
                    for group in optimizer.param_groups:
                        group["lr"] = config.lr * factor
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    global_step += 1
                total_loss += value
                bar.set_postfix(loss=f"{value:.4f}")
                bar.update()
            bar.close()
            mean_loss = total_loss / len(plan)
            unwrapped = accelerator.unwrap_model(wrapped)
            if adapters is not None:
                adapters.merge()
            path = None
            if work_dir is not None:
                path = epoch_dir(work_dir, epoch)
                rng = _rng_tensors(procs)
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
        if wrapped is not None:
            accelerator.free_memory()
