"""Fully sharded training (PyTorch FSDP2) for the loop: weights, gradients and AdamW state
split over the launched processes.

A 7B model trained in fp32 with AdamW needs ~16 bytes a parameter (~112 GB): more than one
80 GB GPU holds, whatever DDP does. `-P fsdp=true` (or an accelerate config with
`distributed_type: FSDP`, such as configs/accelerate/fsdp.yaml) makes the loop shard the
model itself with `torch.distributed.fsdp.fully_shard`: every decoder layer (the classes a
Hugging Face model lists in `_no_split_modules`) is one unit, the rest (embeddings, final
norm, head) the root unit. The optimisation is the one DDP runs: FSDP averages gradients
over the processes as DDP does, so the loop's per-process loss weights carry over.

What leaves the loop must be a plain model (the evaluator runs each process's share of
the inputs, a different number of forward passes per process, which a sharded model
cannot do; the runner saves the model it selects). So the loop keeps one plain copy of
the model, made before sharding, and after every epoch fills it parameter by parameter
from the sharded one (`FullyShardedModel.fill_plain`): one full parameter is gathered at
a time. The copy costs one model's memory in its dtype; it is also what checkpoints save.

Checkpoints stay process-count independent: the model is saved whole (the plain copy), and
the AdamW moments are gathered whole onto the main process (`full_optimizer_state`), keyed
by parameter name, and broadcast back from it on resume (`load_optimizer_state`).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


def _state_dict_api():
    from torch.distributed.checkpoint import state_dict as api

    return api


class FullyShardedModel:
    """`model` sharded in place over the default process group, with a plain copy.

    Needs an initialised process group (the loop checks for 2+ processes first)."""

    def __init__(self, model: nn.Module) -> None:
        from torch.distributed.fsdp import fully_shard

        self.plain = copy.deepcopy(model).eval()
        for p in self.plain.parameters():
            p.requires_grad_(False)
        unit_names = set(getattr(model, "_no_split_modules", None) or ())
        units = [m for m in model.modules() if type(m).__name__ in unit_names]
        for unit in units:
            fully_shard(unit)
        fully_shard(model)
        self.model = model
        self.units = len(units)

    @contextlib.contextmanager
    def no_sync(self, sync: bool) -> Iterator[None]:
        """Accumulate gradients locally unless `sync` (the last micro-batch of a step)."""
        self.model.set_requires_gradient_sync(sync)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    @torch.no_grad()
    def fill_plain(self) -> nn.Module:
        """Copy the trained weights into the plain model (a collective) and return it."""
        from torch.distributed.tensor import DTensor

        plain = dict(self.plain.named_parameters())
        for name, param in self.model.named_parameters():
            full = param.full_tensor() if isinstance(param, DTensor) else param
            plain[name].copy_(full)
            del full
        return self.plain

    def full_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        """The whole AdamW state by parameter name, on the main process (None on the others).

        A collective: every process calls it."""
        api = _state_dict_api()
        options = api.StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = api.get_optimizer_state_dict(self.model, optimizer, options=options)
        return state if torch.distributed.get_rank() == 0 else None

    def load_optimizer_state(
        self, optimizer: torch.optim.Optimizer, state: dict[str, dict[str, Any]] | None
    ) -> None:
        """Load a whole state saved by `full_optimizer_state`, read on the main process only
        (`state` is ignored elsewhere), into every process's shards. A collective."""
        api = _state_dict_api()
        groups = api.get_optimizer_state_dict(
            self.model, optimizer, options=api.StateDictOptions(full_state_dict=True)
        )["param_groups"]
        full = {"state": state or {}, "param_groups": groups}
        rank0 = torch.distributed.get_rank() == 0
        api.set_optimizer_state_dict(
            self.model,
            optimizer,
            full if rank0 else {},
            options=api.StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
        )
