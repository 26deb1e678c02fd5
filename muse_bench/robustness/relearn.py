"""Relearning attacks: a few steps of plain fine-tuning, then see what comes back.

SPEC-robustness §2.2: the causal-LM loss on every token of the relearn texts (packed into
BOS-prefixed chunks of the model's context, as Fan et al.), AdamW (betas 0.9/0.999, no
weight decay), cosine decay from `lr` to 0, no warmup, batch 4, a fixed seed that also
fixes the data order. It runs through the harness's one training loop
(`muse_bench.training.loop.train`), identically for the unlearned, target and retrain
models.

The loop trains in whole passes over the data, so a budget of `steps` optimizer steps
becomes the fewest passes that reach it: `passes = ceil(steps / steps_per_pass)`, and the
cosine schedule spans the `passes * steps_per_pass` steps actually taken (reported as
`steps_done`). With 0 steps the model is returned untouched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from muse_bench.core.errors import ConfigError

RELEARN_BATCH = 4
MAX_CHUNK = 2048


@dataclass(frozen=True)
class RelearnSettings:
    """One relearning budget: optimizer steps, learning rate, batch, seed."""

    steps: int
    lr: float
    batch_size: int = RELEARN_BATCH
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ConfigError(f"relearning steps must be >= 0, got {self.steps}.")
        if not self.lr > 0:
            raise ConfigError(f"relearning lr must be > 0, got {self.lr}.")
        if self.batch_size < 1:
            raise ConfigError(f"relearning batch size must be >= 1, got {self.batch_size}.")

    def to_dict(self) -> dict[str, Any]:
        """The settings as report fields."""
        return asdict(self)


def chunk_len(model: nn.Module) -> int:
    """The relearning chunk length: the model's context, at most 2048 (Fan et al.)."""
    config = getattr(model, "config", None)
    return min(MAX_CHUNK, getattr(config, "max_position_embeddings", None) or MAX_CHUNK)


def steps_per_pass(n_chunks: int, batch_size: int) -> int:
    """Optimizer steps of one pass over `n_chunks` chunks."""
    return math.ceil(n_chunks / batch_size)


def plan_passes(n_chunks: int, settings: RelearnSettings) -> tuple[int, int]:
    """(passes, steps actually taken) for a budget of `settings.steps`."""
    per_pass = steps_per_pass(n_chunks, settings.batch_size)
    if settings.steps == 0 or per_pass == 0:
        return 0, 0
    passes = math.ceil(settings.steps / per_pass)
    return passes, passes * per_pass


def _lm_loss(model, forget, retain, ref):
    from muse_bench.unlearners.losses import token_nll

    return token_nll(model, forget)


def relearn(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    settings: RelearnSettings,
    device: str = "cpu",
    progress: bool = False,
) -> tuple[nn.Module, dict[str, int]]:
    """Fine-tune `model` on `texts` in place; returns it (eval mode) and what was done
    (`chunks`, `passes`, `steps_done`)."""
    from muse_bench.training.loop import TrainConfig, train
    from muse_bench.training.packing import pack_texts

    if not texts:
        raise ConfigError("the relearning set is empty.")
    max_len = chunk_len(model)
    n_chunks = len(pack_texts(texts, tokenizer, max_len))
    passes, steps = plan_passes(n_chunks, settings)
    info = {"chunks": n_chunks, "passes": passes, "steps_done": steps}
    if passes == 0:
        return model.eval(), info
    config = TrainConfig(
        lr=settings.lr,
        epochs=passes,
        batch_size=settings.batch_size,
        max_len=max_len,
        weight_decay=0.0,
        lr_scheduler="cosine",
        warmup_steps=0,
        seed=settings.seed,
        device=device,
        progress=progress,
        desc="relearn",
        identity={"relearn": settings.to_dict()},
    )
    last = model
    for result in train(model, tokenizer, _lm_loss, list(texts), [], config):
        last = result.model
    return last.eval(), info


def retain_like(
    retain: Sequence[str], tokenizer: Any, max_len: int, n_chunks: int, batch: int
) -> list[str]:
    """The first retain documents that give as many optimizer steps per pass as
    `n_chunks` forget chunks (all of them when they cannot): the control relearns the same
    budget on retain text."""
    from muse_bench.training.packing import pack_texts

    want = steps_per_pass(n_chunks, batch)

    def steps(k: int) -> int:
        return steps_per_pass(len(pack_texts(retain[:k], tokenizer, max_len)), batch)

    # estimate from per-document lengths, then correct with the real packing
    total, k = 0, len(retain)
    for i, doc in enumerate(retain, 1):
        total += len(tokenizer(doc, add_special_tokens=False)["input_ids"]) + 1
        if steps_per_pass(math.ceil(total / (max_len - 1)), batch) >= want:
            k = i
            break
    while k < len(retain) and steps(k) < want:
        k += 1
    while k > 1 and steps(k - 1) >= want:
        k -= 1
    return list(retain[:k])
