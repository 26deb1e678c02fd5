"""LoRA adapters for the training loop (`lora_rank`), a memory option for 7B models on one GPU.

Only the adapters train. They are merged into the weights before a model leaves the loop,
so every candidate is a plain model; their weights go into the latest checkpoint's
`trainer_state.safetensors` for an exact resume (see `muse_bench.training.checkpoints`). With the
adapters off, the untouched base weights are the reference model of KL regularizers, so
no frozen copy is needed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from muse_bench.core.errors import ConfigError, TrainingError

#: LoRA's default targets: every linear layer of a Llama block (not the embeddings/head).
LLAMA_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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
