"""Negative Preference Optimization (Zhang et al., 2024), the correct sequence-level form."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from muse_bench.core.hparams import require

from .base import EMBEDDED_V3, GDR, KLR, GradientUnlearner, register_unlearner
from .losses import npo_loss, sequence_logprob


@register_unlearner("npo")
@dataclass(kw_only=True)
class NPO(GradientUnlearner):
    """NPO: L = −(2/β)·mean log σ(−β·(log p_θ(x) − log p_ref(x)))."""

    paper_url: ClassVar[str] = "https://arxiv.org/abs/2404.05868"
    # Calibrated on embedded news v3 (sweeps/calibrate_v3_news.toml, docs/methods.md).
    benchmark_defaults: ClassVar[Mapping[str, Mapping[str, Any]]] = {EMBEDDED_V3: {"lr": 5e-4}}

    needs_ref_logprobs: ClassVar[bool] = True
    beta: float = field(default=0.1, metadata={"help": "Inverse temperature β of NPO (MUSE: 0.1)."})

    def validate(self) -> None:
        super().validate()
        require(self.beta > 0, f"beta must be > 0, got {self.beta}.")

    def loss(self, model, forget, retain, ref):
        return npo_loss(sequence_logprob(model, forget), ref.forget_logprob(forget), self.beta)


@register_unlearner("npo_gdr")
@dataclass(kw_only=True)
class NPO_GDR(GDR, NPO):
    """NPO plus gradient descent on the retain set."""

    paper_url: ClassVar[str] = "https://arxiv.org/abs/2404.05868"
    # Calibrated on embedded news v3 (sweeps/calibrate_v3_news.toml, docs/methods.md).
    # On books v3, 3e-3 collapses utility in the first epoch (sweeps/calibrate_v3_books.toml).
    benchmark_defaults: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        EMBEDDED_V3: {"lr": 3e-3},
        "embedded-books-v3": {"lr": 1e-3},
    }


@register_unlearner("npo_klr")
@dataclass(kw_only=True)
class NPO_KLR(KLR, NPO):
    """NPO plus a KL regularizer to the target model on retain tokens."""

    paper_url: ClassVar[str] = "https://arxiv.org/abs/2404.05868"
    # Calibrated on embedded news v3 (sweeps/calibrate_v3_news.toml, docs/methods.md).
    benchmark_defaults: ClassVar[Mapping[str, Mapping[str, Any]]] = {EMBEDDED_V3: {"lr": 3e-3}}
