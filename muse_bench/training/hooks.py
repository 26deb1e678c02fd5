"""Extensions of the training loop for methods that keep state of their own.

Most losses are pure functions of the batch and the weights. A few methods also keep
something between steps: RMU a random control vector drawn once per run, PDU a dual
variable updated after every optimizer step, IdkNLL/IdkDPO a seeded draw of refusal
responses. Such a method hands the loop a `TrainHooks` object; the loop calls it at fixed
points and saves its `state_dict()` in every checkpoint, so a resumed run continues
exactly where an uninterrupted one would be. `select_trainable` restricts training to the
parameters whose name matches a pattern (RMU trains a few MLP matrices only).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from muse_bench.core.distributed import Processes
from muse_bench.core.errors import ConfigError

__all__ = ["TrainHooks", "restore_trainable", "select_trainable"]


class TrainHooks:
    """Per-run callbacks of the training loop; every method is a no-op by default.

    Order of calls: `setup` once, before the reference is built and before any checkpoint
    is loaded (the model is still the original); `load_state_dict` when resuming; then per
    epoch `start_epoch`, `after_step` after each `optimizer.step()`, `end_epoch`, and
    `state_dict` when the epoch's checkpoint is written.
    """

    def setup(self, model: nn.Module, tokenizer, seed: int) -> None:
        """Prepare for a run on `model` (the original weights) with the run's `seed`."""

    def start_epoch(self, epoch: int) -> None:
        """Epoch `epoch` (1-based) starts."""

    def after_step(self, procs: Processes) -> None:
        """An optimizer step has just been applied."""

    def end_epoch(self, epoch: int, procs: Processes) -> None:
        """Epoch `epoch` has seen all its micro-batches; its checkpoint comes next."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What a resume needs, as CPU tensors (saved in the checkpoint)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `state_dict` returned (on resume, after `setup`)."""


def select_trainable(model: nn.Module, pattern: str) -> list[str]:
    """Freeze every trainable parameter whose name does not contain a match of `pattern`.

    `pattern` is a regular expression searched in each parameter name; "" keeps every
    parameter as it is. Returns the names it froze, for `restore_trainable`.
    """
    if not pattern:
        return []
    regex = re.compile(pattern)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not any(regex.search(n) for n, _ in trainable):
        example = trainable[0][0] if trainable else ""
        raise ConfigError(
            f"trainable_params '{pattern}' matches no trainable parameter of the model "
            f"(names look like '{example}')."
        )
    frozen = [n for n, p in trainable if not regex.search(n)]
    for name, param in trainable:
        if name in frozen:
            param.requires_grad_(False)
    return frozen


def restore_trainable(model: nn.Module, frozen: list[str]) -> None:
    """Undo `select_trainable`: make the parameters it froze trainable again."""
    names = set(frozen)
    for name, param in model.named_parameters():
        if name in names:
            param.requires_grad_(True)
