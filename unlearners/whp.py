"""Who's Harry Potter (Eldan & Russinovich, 2023) as MUSE implements it: logit steering."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from muse_bench.core.errors import ModelError
from muse_bench.core.io import atomic_write_json
from muse_bench.core.models import cache_keyword

from .base import EMBEDDED_V3, register_unlearner
from .task_vector import ReinforcedSweep

WHP_MARKER = "whp.json"


@dataclass
class WHPOutput:
    """What `WHPModel.forward` returns: the steered logits and both models' caches."""

    logits: torch.Tensor
    cache: tuple[Any, Any] | None = None


class WHPModel(nn.Module):
    """Decodes with logits v_base − α·ReLU(v_reinforced − v_base).

    Tokens the reinforced model likes more than the base model are pushed down. The cache
    is the pair (base cache, reinforced cache). Saved as `base/`, `reinforced/` and
    `whp.json` (α); load with `WHPModel.from_pretrained`.
    """

    def __init__(self, base: nn.Module, reinforced: nn.Module, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.reinforced = reinforced
        self.alpha = float(alpha)

    @property
    def config(self):
        return self.base.config

    @property
    def device(self) -> torch.device:
        return self.base.device

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: tuple[Any, Any] | None = None,
        use_cache: bool = False,
    ) -> WHPOutput:
        base_cache, reinforced_cache = cache or (None, None)
        common = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "use_cache": use_cache,
        }
        base_kw, reinforced_kw = cache_keyword(self.base), cache_keyword(self.reinforced)
        out_base = self.base(**common, **{base_kw: base_cache})
        out_reinforced = self.reinforced(**common, **{reinforced_kw: reinforced_cache})
        v_base, v_reinforced = out_base.logits, out_reinforced.logits
        logits = v_base - self.alpha * torch.relu(v_reinforced - v_base)
        caches = (getattr(out_base, base_kw), getattr(out_reinforced, reinforced_kw))
        return WHPOutput(logits=logits, cache=caches if use_cache else None)

    def save_pretrained(self, save_directory: str | Path, safe_serialization: bool = True) -> None:
        """Write base/, reinforced/ (safetensors) and whp.json with α."""
        path = Path(save_directory)
        self.base.save_pretrained(path / "base")
        self.reinforced.save_pretrained(path / "reinforced")
        atomic_write_json(
            path / WHP_MARKER,
            {"kind": "whp", "alpha": self.alpha, "base": "base", "reinforced": "reinforced"},
        )

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device | None = "cpu",
        dtype: torch.dtype | None = None,
    ) -> WHPModel:
        """Load a directory written by `save_pretrained`."""
        from muse_bench.core.models import load_model

        path = Path(path)
        try:
            meta = json.loads((path / WHP_MARKER).read_text(encoding="utf-8"))
            alpha = float(meta["alpha"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"'{path}' is not a WHP checkpoint ({WHP_MARKER}): {exc}") from exc
        base = load_model(path / meta.get("base", "base"), device, dtype)
        reinforced = load_model(path / meta.get("reinforced", "reinforced"), device, dtype)
        return cls(base, reinforced, alpha).eval()


def load_unlearned(path: str | Path, device: str | torch.device | None = "cpu"):
    """(model, tokenizer) from a directory written with `save_model(candidate.model, ...)`:
    a plain Hugging Face checkpoint or a WHP one (`whp.json`)."""
    from muse_bench.core.models import load_model_and_tokenizer, load_tokenizer

    if (Path(path) / WHP_MARKER).is_file():
        return WHPModel.from_pretrained(path, device), load_tokenizer(path)
    return load_model_and_tokenizer(path, device)


@register_unlearner("whp")
@dataclass(kw_only=True)
class WHP(ReinforcedSweep):
    """Who's Harry Potter: steer logits away from a model reinforced on the forget set."""

    paper_url: ClassVar[str] = "https://arxiv.org/abs/2310.02238"
    # Calibrated on embedded news v3 (sweeps/calibrate_v3_news.toml, docs/methods.md).
    benchmark_defaults: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        EMBEDDED_V3: {"alphas": (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)}
    }

    alphas: tuple[float, ...] = field(
        default=(1.0, 2.0, 4.0, 8.0, 16.0),
        metadata={
            "help": "Strengths α to sweep, e.g. alphas=1,2,4; one candidate each, increasing."
        },
    )

    def sweep(self, target, reinforced):
        for alpha in sorted(set(self.alphas)):
            yield alpha, WHPModel(target, reinforced, alpha).eval()
