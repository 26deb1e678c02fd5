"""Task vector negation (Ilharco et al., 2023), and the fine-tune it shares with WHP."""

from __future__ import annotations

import copy
import dataclasses
import math
from abc import abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from muse_bench.core.hparams import require
from muse_bench.core.types import ForgetRequest

from .base import (
    EMBEDDED,
    EMBEDDED_V3,
    Candidate,
    GradientUnlearner,
    UnlearnContext,
    Unlearner,
    register_unlearner,
)
from .losses import token_nll


@dataclass(kw_only=True)
class FinetuneNLL(GradientUnlearner):
    """Plain fine-tuning on the forget set (minimise its NLL): the reinforced model."""

    def loss(self, model, forget, retain, ref):
        return token_nll(model, forget)


@dataclass(kw_only=True)
class ReinforcedSweep(Unlearner):
    """Base of TV and WHP: fine-tune a copy of the target on the forget set, sweep α.

    The fine-tune runs through the common training loop (checkpoints and resume in
    `work_dir/finetune/`); subclasses write only `sweep()`.
    """

    benchmark_defaults: ClassVar[Mapping[str, Mapping[str, Any]]] = {EMBEDDED: {"ft_lr": 1e-3}}

    alphas: tuple[float, ...] = field(
        default=(1.0, 2.0, 4.0, 8.0, 16.0, 32.0),
        metadata={
            "help": "Strengths α to sweep, e.g. alphas=1,2,4; one candidate each, increasing."
        },
    )
    ft_epochs: int = field(
        default=10, metadata={"help": "Epochs of fine-tuning on the forget set."}
    )
    ft_lr: float = field(
        default=1e-5, metadata={"help": "Learning rate of the fine-tune (MUSE: 1e-5)."}
    )
    ft_batch_size: int = field(
        default=4, metadata={"help": "Chunks per micro-batch in the fine-tune."}
    )
    ft_grad_accum: int = field(
        default=1, metadata={"help": "Micro-batches per optimizer step in the fine-tune."}
    )
    max_len: int | None = field(
        default=None,
        metadata={"help": "Chunk length in tokens; None = the benchmark's (MUSE: 2048)."},
    )

    def validate(self) -> None:
        super().validate()
        require(len(self.alphas) > 0, "alphas must list at least one value.")
        require(
            all(math.isfinite(a) and a >= 0 for a in self.alphas),
            f"alphas must be finite and >= 0, got {', '.join(map(str, self.alphas))}.",
        )
        require(self.ft_epochs >= 1, f"ft_epochs must be >= 1, got {self.ft_epochs}.")
        require(self.ft_lr > 0, f"ft_lr must be > 0, got {self.ft_lr}.")
        require(self.ft_batch_size >= 1, f"ft_batch_size must be >= 1, got {self.ft_batch_size}.")
        require(self.ft_grad_accum >= 1, f"ft_grad_accum must be >= 1, got {self.ft_grad_accum}.")
        require(
            self.max_len is None or self.max_len >= 2, f"max_len must be >= 2, got {self.max_len}."
        )

    def reinforce(
        self, model: nn.Module, tokenizer, request: ForgetRequest, ctx: UnlearnContext
    ) -> nn.Module:
        """θ_ft: a copy of `model` fine-tuned on the forget set; `model` is left unchanged."""
        finetune = FinetuneNLL(
            lr=self.ft_lr,
            epochs=self.ft_epochs,
            batch_size=self.ft_batch_size,
            grad_accum=self.ft_grad_accum,
            max_len=self.max_len,
        )
        work_dir = ctx.work_dir / "finetune" if ctx.work_dir is not None else None
        sub_ctx = dataclasses.replace(ctx, work_dir=work_dir)
        return finetune.unlearn(copy.deepcopy(model), tokenizer, request, sub_ctx)

    @abstractmethod
    def sweep(self, target: nn.Module, reinforced: nn.Module) -> Iterator[tuple[float, Any]]:
        """Yield (α, model) for every α in increasing order."""

    def candidates(
        self, model: nn.Module, tokenizer, request: ForgetRequest, ctx: UnlearnContext
    ) -> Iterator[Candidate]:
        """Fine-tune once, then one candidate per α (smallest first); `model` is not modified."""
        reinforced = self.reinforce(model, tokenizer, request, ctx)
        model.to(next(reinforced.parameters()).device).eval()
        for alpha, candidate in self.sweep(model, reinforced):
            yield Candidate(f"alpha_{alpha:g}", alpha, candidate)


@register_unlearner("tv")
@dataclass(kw_only=True)
class TaskVector(ReinforcedSweep):
    """Task vector negation: θ = θ_target − α·(θ_ft − θ_target)."""

    paper_url: ClassVar[str] = "https://arxiv.org/abs/2212.04089"
    # Calibrated on embedded news v3 (sweeps/calibrate_v3_news.toml, docs/methods.md).
    benchmark_defaults: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        EMBEDDED_V3: {"alphas": (0.5, 0.625, 0.75, 0.875, 1.0)}
    }

    def sweep(self, target, reinforced):
        candidate = copy.deepcopy(target)
        pairs = list(zip(target.parameters(), reinforced.parameters(), strict=True))
        for alpha in sorted(set(self.alphas)):
            with torch.no_grad():
                for out, (t, ft) in zip(candidate.parameters(), pairs, strict=True):
                    t32 = t.float()
                    out.copy_(t32 - alpha * (ft.float() - t32))
            yield alpha, candidate
