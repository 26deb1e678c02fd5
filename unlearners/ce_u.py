"""CE-U, cross-entropy unlearning (Yang, 2025)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from .base import EMBEDDED, EMBEDDED_V3, GradientUnlearner, register_unlearner
from .losses import ceu_target_logits, next_token_logits, soft_cross_entropy, token_count


@register_unlearner("ce_u")
@dataclass(kw_only=True)
class CEU(GradientUnlearner):
    """CE-U: L = mean_t CE(q, p_θ), q = sg[p_θ] renormalised without the true token."""

    paper_url: ClassVar[str] = "https://arxiv.org/abs/2503.01224"
    # Calibrated on embedded news (docs/methods.md): with no retain term it collapses
    # (knowmem_r 0 by epoch 4 at 3e-4, epoch 8 at 1e-4); at 3e-5 ten epochs take knowmem_f
    # 83 -> 53 and keep knowmem_r 54.
    benchmark_defaults: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        EMBEDDED: {"lr": 3e-5},
        EMBEDDED_V3: {"lr": 1e-4},
    }

    def loss(self, model, forget, retain, ref):
        logits, labels = next_token_logits(model, forget)
        mask = labels != -100
        return soft_cross_entropy(
            ceu_target_logits(logits, labels), logits, mask, token_count(forget, mask)
        )
