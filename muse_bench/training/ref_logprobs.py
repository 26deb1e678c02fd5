"""What the reference model says, for losses that compare against it.

The reference is the model as it was before any training step. `token_logprobs` scores
every label token of a batch; `ReferenceProvider` is what the training loop hands each
loss: the reference's forget-chunk log-likelihoods, cached once (NPO), and, for KL
regularizers, its next-token logits from a frozen copy of the model or, as a memory
option for 7B models on one GPU (`ref_topk`), cached top-k reference distributions
instead of a resident frozen copy (`RefTopK`). With several processes each computes a
share of a cache and the shares are summed, so every process ends with all of it.

`Batch` is the batch type of the loop and its losses: the tensors of `pad_batch`, plus
`index`, the chunk positions that the cached look-ups read.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from muse_bench.core.distributed import Processes
from muse_bench.core.errors import ConfigError
from muse_bench.training.packing import pad_batch

Batch = dict[str, torch.Tensor]


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

    @property
    def model(self) -> Callable[..., Any] | None:
        """The frozen reference model itself (None unless kept), for losses that read
        more of it than its logits, such as RMU's hidden states; call it under no_grad."""
        return self._model

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


def _to(batch: Batch | None, device: torch.device) -> Batch | None:
    return None if batch is None else {k: v.to(device) for k, v in batch.items()}
