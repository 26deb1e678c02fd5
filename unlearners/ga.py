"""Gradient ascent on the forget set, alone or with a retain-set regularizer."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from .base import EMBEDDED_V3, GDR, KLR, GradientUnlearner, register_unlearner
from .losses import token_nll


@register_unlearner("ga")
@dataclass(kw_only=True)
class GA(GradientUnlearner):
    """Gradient ascent: L = −NLL(forget)."""

    paper_url: ClassVar[str] = "https://arxiv.org/abs/2407.06460"
    # Calibrated on embedded news v3 (sweeps/calibrate_v3_news.toml, docs/methods.md).
    benchmark_defaults: ClassVar[Mapping[str, Mapping[str, Any]]] = {EMBEDDED_V3: {"lr": 1e-4}}

    def loss(self, model, forget, retain, ref):
        return -token_nll(model, forget)


@register_unlearner("ga_gdr")
@dataclass(kw_only=True)
class GA_GDR(GDR, GA):
    """GA plus gradient descent on the retain set: L = −NLL(forget) + w·NLL(retain)."""

    paper_url: ClassVar[str] = "https://arxiv.org/abs/2407.06460"
    # Calibrated on embedded news v3 (sweeps/calibrate_v3_news.toml, docs/methods.md).
    benchmark_defaults: ClassVar[Mapping[str, Mapping[str, Any]]] = {EMBEDDED_V3: {"lr": 3e-4}}


@register_unlearner("ga_klr")
@dataclass(kw_only=True)
class GA_KLR(KLR, GA):
    """GA plus a KL regularizer to the target model on retain tokens."""

    paper_url: ClassVar[str] = "https://arxiv.org/abs/2407.06460"
    # Calibrated on embedded news v3 (sweeps/calibrate_v3_news.toml, docs/methods.md).
    # On books v3, 1e-3 collapses utility in the first epoch (sweeps/calibrate_v3_books.toml).
    benchmark_defaults: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        EMBEDDED_V3: {"lr": 1e-3},
        "embedded-books-v3": {"lr": 1e-4},
    }
