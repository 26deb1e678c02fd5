"""RMU, Representation Misdirection for Unlearning (Li et al., 2024, the WMDP paper).

Forget tokens' hidden states at one decoder block are pushed towards a fixed random
control vector u; retain tokens' hidden states are held at the frozen reference's. Only
the parameters matching `trainable_params` train (the original trains the MLP output
matrices of the blocks ell−2..ell). u is drawn once per run from the run's seed and saved
with every checkpoint, so a resumed run is the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from muse_bench.core.errors import ConfigError
from muse_bench.core.hparams import require
from muse_bench.training.hooks import TrainHooks

from .base import EMBEDDED, EMBEDDED_V3, ForgetWeighted, register_unlearner
from .losses import activation_mse, block_output, decoder_layers


def steering_vector(r: torch.Tensor, coeff: float) -> torch.Tensor:
    """c · r/‖r‖: the direction of `r` at norm `coeff`."""
    return coeff * r / r.norm()


def control_vector(dim: int, coeff: float, seed: int) -> torch.Tensor:
    """RMU's u = c · r/‖r‖ with r ~ Uniform[0, 1)^dim drawn from `seed` (entries ≥ 0)."""
    r = torch.rand(dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    return steering_vector(r, coeff)


def _layer_count(config: Mapping[str, Any]) -> int | None:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = config.get(key)
        if isinstance(value, int):
            return value
    text = config.get("text_config")
    return _layer_count(text) if isinstance(text, Mapping) else None


def check_layer(layer: int, n_layers: int) -> None:
    """ConfigError unless `layer` is a block index of a model with `n_layers` blocks."""
    require(
        0 <= layer < n_layers,
        f"layer must be in [0, {n_layers - 1}] for this {n_layers}-layer model, got {layer}.",
    )


class ControlVector(TrainHooks):
    """RMU's per-run state: the control vector u, drawn at setup, saved with checkpoints."""

    def __init__(self, layer: int, coeff: float) -> None:
        self.layer, self.coeff = layer, coeff
        self.u: torch.Tensor | None = None

    def setup(self, model: nn.Module, tokenizer, seed: int) -> None:
        check_layer(self.layer, len(decoder_layers(model)))
        dim = getattr(getattr(model, "config", None), "hidden_size", None)
        if not isinstance(dim, int):
            raise ConfigError("rmu needs the model's hidden size (config.hidden_size).")
        self.u = control_vector(dim, self.coeff, seed)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"u": self.u} if self.u is not None else {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "u" not in state:
            raise ConfigError("the checkpoint has no RMU control vector; resume in a fresh run.")
        self.u = state["u"].float()


@register_unlearner("rmu")
@dataclass(kw_only=True)
class RMU(ForgetWeighted):
    """RMU: steer block-ℓ activations of forget tokens to c·u, keep retain ones at the target's."""

    paper_url: ClassVar[str] = "https://arxiv.org/abs/2403.03218"
    needs_retain: ClassVar[bool] = True
    needs_ref_model: ClassVar[bool] = True
    benchmark_defaults: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        # calibrated on embedded news (docs/methods.md): the 4-block models
        # (hidden states there have norm ~13; c = 60 is ~4.5x, like adaptive RMU's 5x)
        EMBEDDED: {
            "lr": 1e-3,
            "layer": 2,
            "steering_coeff": 60.0,
            "retain_weight": 100.0,
            "trainable_params": r"layers\.[0-2]\.",
        },
        # calibrated on embedded news v3 (sweeps/calibrate_v3_news.toml)
        EMBEDDED_V3: {"lr": 3e-3},
    }

    layer: int = field(
        default=7,
        metadata={"help": "Decoder block ℓ (0-based) whose output is steered (OU MUSE: 7)."},
    )
    steering_coeff: float = field(
        default=2.0, metadata={"help": "Norm c of the control vector u (OU MUSE: 2)."}
    )
    retain_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of the retain activation-matching term (OU alpha: 1)."},
    )
    trainable_params: str = field(
        default="",
        metadata={
            "help": "Regex of the parameter names to train; '' = all (OU MUSE). WMDP's "
            r"original: 'layers\.(5|6|7)\.mlp\.down_proj\.weight'."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self._state: ControlVector | None = None

    def validate(self) -> None:
        super().validate()
        require(self.layer >= 0, f"layer must be >= 0, got {self.layer}.")
        require(self.steering_coeff > 0, f"steering_coeff must be > 0, got {self.steering_coeff}.")
        require(self.retain_weight >= 0, f"retain_weight must be >= 0, got {self.retain_weight}.")
        try:
            re.compile(self.trainable_params)
        except re.error as exc:
            raise ConfigError(
                f"trainable_params is not a regular expression ({exc}): {self.trainable_params!r}."
            ) from None
        require(
            self.lora_rank == 0,
            "rmu picks the weights it trains with trainable_params; lora_rank must be 0.",
        )

    def check_model(self, config: Mapping[str, Any]) -> None:
        n_layers = _layer_count(config)
        if n_layers is not None:
            check_layer(self.layer, n_layers)

    def train_config(self, model, request, ctx):
        return dataclasses.replace(
            super().train_config(model, request, ctx), trainable=self.trainable_params
        )

    def train_hooks(self) -> ControlVector:
        self._state = ControlVector(self.layer, self.steering_coeff)
        return self._state

    def loss(self, model, forget, retain, ref):
        if self._state is None or self._state.u is None:
            raise RuntimeError("rmu's loss runs inside its training loop (train_hooks).")
        h_forget = block_output(model, forget, self.layer)
        u = self._state.u.to(h_forget.device)
        forget_loss = activation_mse(h_forget, u, forget["attention_mask"])
        h_retain = block_output(model, retain, self.layer)
        with torch.no_grad():
            h_ref = block_output(ref.model, retain, self.layer)
        retain_loss = activation_mse(h_retain, h_ref, retain["attention_mask"])
        return self.forget_weight * forget_loss + self.retain_weight * retain_loss
