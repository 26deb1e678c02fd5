"""Update rules the training loop can apply instead of its plain AdamW step on the loss.

They are options of every gradient method (`../shared/SPEC-methods.md` §11, §13, §14), not
losses:

- `optimizer=zo`: zeroth-order SGD (MeZO n-SPSA, `muse_bench.training.zeroth_order`). Each
  step estimates the gradient from `2 * zo_samples` forward passes in eval mode under
  no-grad, so training needs inference-level memory: no gradients, no optimizer moments,
  no activations kept for a backward pass.
- `sam_rho > 0`: sharpness-aware minimisation of the forget term only (Fan et al. 2025,
  "Towards LLM Unlearning Resilient to Relearning Attacks"). The forget gradient is taken at
  theta + rho*g_f/||g_f|| (g_f: the forget gradient at theta, global L2 norm), the
  regularizer's gradient at theta; AdamW steps on their sum. One extra forward and backward
  on the forget batch per micro-batch.
- `sure_quantile = q`: SURE's saliency mask (Zhang et al. 2025, "Catastrophic Failure of LLM
  Unlearning via Quantization"). Each optimizer step, the rows (index on dim 0; single
  elements of 1-D tensors) whose forget-gradient L2 norm is at least the q-quantile of all
  rows' norms in the model are updated; the full loss's gradient is zeroed elsewhere
  before clipping and the AdamW step. One extra forward and backward on the forget batch.

SAM and SURE need the forget term apart from the regularizer: `LossTerms`, which a
`GradientUnlearner` provides (the whole loss is the forget term when none is given). SAM
and SURE may be combined (the mask then comes from the forget gradient at theta that SAM
computes anyway). With several processes the forget gradient is summed over them, so the
perturbation and the mask are the same on every process and do not depend on their
number; zeroth-order sums the loss differences likewise, and every process regenerates
the same perturbations from the same seeds.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from muse_bench.core.distributed import Processes
from muse_bench.core.errors import ConfigError, TrainingError
from muse_bench.training.ref_logprobs import Batch, ReferenceProvider
from muse_bench.training.zeroth_order import ZerothOrder, perturbation_seed

__all__ = [
    "OPTIMIZERS",
    "FirstOrderRule",
    "LossTerms",
    "UpdateConfig",
    "ZerothOrderRule",
    "check_update",
    "linear_quantile",
    "make_update_rule",
    "row_norms",
    "sam_perturbation",
    "saliency_masks",
]

OPTIMIZERS = ("adamw", "zo")
ZO_WITH_FSDP = (
    "optimizer=zo perturbs whole weight tensors in place, which fsdp's shards do not allow, "
    "and needs no gradients or optimizer state to shard; drop -P fsdp=true."
)
ZO_WITH_SAM = (
    "sam_rho perturbs along the forget gradient, which optimizer=zo never computes; "
    "use one of them."
)
ZO_WITH_SURE = (
    "sure_quantile masks rows of the gradient, which optimizer=zo never computes; use one of them."
)
FIRST_ORDER_WITH_FSDP = (
    "sam_rho and sure_quantile need the whole forget gradient on every process, which fsdp "
    "shards; drop -P fsdp=true or the option."
)

LossFn = Callable[[nn.Module, Batch, "Batch | None", ReferenceProvider], torch.Tensor]


class LossTerms(NamedTuple):
    """A method's loss split as `forget + regularizer`, both already weighted.

    Same signature as the loss; `regularizer` is None for a method without one.
    """

    forget: LossFn
    regularizer: LossFn | None


@dataclass(frozen=True)
class UpdateConfig:
    """The update-rule options of a run (all off by default: plain AdamW on the loss)."""

    optimizer: str = "adamw"
    zo_eps: float = 1e-3
    zo_samples: int = 1
    sam_rho: float = 0.0
    sure_quantile: float | None = None

    @property
    def zeroth_order(self) -> bool:
        """Whether the run uses the zeroth-order optimizer."""
        return self.optimizer == "zo"

    @property
    def active(self) -> bool:
        """Whether any option differs from plain AdamW on the loss."""
        return self.zeroth_order or self.sam_rho > 0 or self.sure_quantile is not None


def check_update(update: UpdateConfig, *, fsdp: bool = False) -> None:
    """Raise ConfigError (one line) for a bad value or a combination that cannot run."""
    if update.optimizer not in OPTIMIZERS:
        raise ConfigError(
            f"optimizer must be one of {', '.join(OPTIMIZERS)}, got '{update.optimizer}'."
        )
    if not (math.isfinite(update.zo_eps) and update.zo_eps > 0):
        raise ConfigError(f"zo_eps must be > 0, got {update.zo_eps}.")
    if update.zo_samples < 1:
        raise ConfigError(f"zo_samples must be >= 1, got {update.zo_samples}.")
    if not (math.isfinite(update.sam_rho) and update.sam_rho >= 0):
        raise ConfigError(f"sam_rho must be >= 0 (0 = off), got {update.sam_rho}.")
    q = update.sure_quantile
    if q is not None and not 0 < q < 1:
        raise ConfigError(f"sure_quantile must be in (0, 1) (None = off), got {q}.")
    if update.zeroth_order:
        if fsdp:
            raise ConfigError(ZO_WITH_FSDP)
        if update.sam_rho > 0:
            raise ConfigError(ZO_WITH_SAM)
        if q is not None:
            raise ConfigError(ZO_WITH_SURE)
    elif fsdp and (update.sam_rho > 0 or q is not None):
        raise ConfigError(FIRST_ORDER_WITH_FSDP)


# -- SURE and SAM, as functions of gradients


def row_norms(grad: torch.Tensor) -> torch.Tensor:
    """L2 norm of each row of `grad` (index on dim 0), in fp32; |g| per element when 1-D."""
    g = grad.detach().float()
    if g.ndim == 0:
        return g.abs().reshape(1)
    if g.ndim == 1:
        return g.abs()
    return g.flatten(1).norm(dim=1)


def linear_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile of a 1-D tensor with linear interpolation (numpy's default).

    Unlike `torch.quantile`, no limit on the size (a 7B model has millions of rows).
    """
    ordered = values.flatten().double().sort().values
    pos = q * (ordered.numel() - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, ordered.numel() - 1)
    return ordered[lo] + (pos - lo) * (ordered[hi] - ordered[lo])


def saliency_masks(grads: Sequence[torch.Tensor], q: float) -> list[torch.Tensor]:
    """SURE's masks: 1 on the rows whose norm is >= the q-quantile of all rows' norms.

    Each mask has the shape `[rows, 1, ...]` (or the tensor's, when 1-D), to multiply the
    tensor's gradient with.
    """
    norms = [row_norms(g) for g in grads]
    gamma = linear_quantile(torch.cat([n.cpu() for n in norms]), q)
    masks = []
    for g, n in zip(grads, norms, strict=True):
        keep = (n.double() >= gamma.to(n.device)).to(g.dtype)
        masks.append(
            keep.reshape(g.shape) if g.ndim <= 1 else keep.reshape(-1, *[1] * (g.ndim - 1))
        )
    return masks


def sam_perturbation(grads: Sequence[torch.Tensor], rho: float) -> list[torch.Tensor]:
    """SAM's eps_w = rho * g / ||g||, with ||g|| the L2 norm over all tensors (0 if g = 0)."""
    total = torch.sqrt(sum((g.detach().double() ** 2).sum().cpu() for g in grads))
    if total == 0:
        return [torch.zeros_like(g) for g in grads]
    return [(g.detach() * (rho / total.item())).to(g.dtype) for g in grads]


# -- the rules, as the training loop calls them


class FirstOrderRule:
    """SAM and/or SURE around the loop's backward passes and AdamW step.

    `model` is the plain module (for the passes DDP must not see), `params` the trainable
    tensors in optimizer order; `backward` is the loop's (accelerate's) backward.
    """

    zeroth_order = False

    def __init__(
        self,
        update: UpdateConfig,
        model: nn.Module,
        params: Sequence[torch.Tensor],
        procs: Processes,
        loss_fn: LossFn,
        terms: LossTerms,
        backward: Callable[[torch.Tensor], Any],
    ) -> None:
        self.update, self.model, self.params = update, model, list(params)
        self.procs, self.loss_fn, self.terms, self.backward = procs, loss_fn, terms, backward
        self._forget_grad: list[torch.Tensor] | None = None  # SURE: summed over the step

    def _forget_gradient(self, forget, retain, ref, weight: float, autocast) -> tuple:
        """The forget term at theta (this process's value) and the micro-batch's forget
        gradient, summed over processes (the same on all)."""
        with autocast():
            value = self.terms.forget(self.model, forget, retain, ref)
        grads = torch.autograd.grad(value, self.params, allow_unused=True)
        grads = [
            torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads, strict=True)
        ]
        if self.procs.world > 1:
            grads = [self.procs.sum(g * (weight / self.procs.world)) for g in grads]
        return value.detach().float(), grads

    def accumulate(
        self,
        wrapped: nn.Module,
        forget: Batch,
        retain: Batch | None,
        ref: ReferenceProvider,
        *,
        weight: float,
        micro_batches: int,
        autocast: Callable[[], contextlib.AbstractContextManager],
    ) -> torch.Tensor:
        """Backpropagate one micro-batch into `.grad` (scaled by weight / micro_batches, as
        the loop does); returns this process's loss value at theta."""
        scale = weight / micro_batches
        sam, sure = self.update.sam_rho > 0, self.update.sure_quantile is not None
        value, grads = self._forget_gradient(forget, retain, ref, weight, autocast)
        if sure:
            part = [g / micro_batches for g in grads]
            if self._forget_grad is None:
                self._forget_grad = part
            else:
                for acc, g in zip(self._forget_grad, part, strict=True):
                    acc.add_(g)
        if not sam:
            with autocast():
                loss = self.loss_fn(wrapped, forget, retain, ref)
            self.backward(loss * scale)
            return loss.detach().float()
        eps = sam_perturbation(grads, self.update.sam_rho)
        del grads
        if self.terms.regularizer is not None:  # at theta, outside DDP: the last pass syncs
            with autocast():
                reg = self.terms.regularizer(self.model, forget, retain, ref)
            self.backward(reg * scale)
            value = value + reg.detach().float()
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, e in zip(self.params, eps, strict=True):
                p.add_(e)
        del eps
        try:
            with autocast():
                perturbed = self.terms.forget(wrapped, forget, retain, ref)
            self.backward(perturbed * scale)
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved, strict=True):
                    p.copy_(s)  # exact restore (a subtraction would drift, badly in bf16)
        return value

    def before_step(self) -> None:
        """SURE: zero the gradient outside the salient rows (before clipping)."""
        if self._forget_grad is None:
            return
        masks = saliency_masks(self._forget_grad, float(self.update.sure_quantile))
        self._forget_grad = None
        for p, m in zip(self.params, masks, strict=True):
            if p.grad is not None:
                p.grad.mul_(m)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Nothing outlives a step."""
        return {}

    def load_state(self, path: Path) -> None:
        """Nothing to restore."""


class ZerothOrderRule:
    """MeZO n-SPSA steps in place of backward passes and AdamW.

    Micro-batches of one step (grad_accum > 1) share the step's perturbations, so their
    directional derivatives add up to the whole batch's, like first-order accumulation.
    `decay[i]` says whether weight decay applies to `params[i]`; `step` is the number of
    optimizer steps already taken (for the perturbation seeds).
    """

    zeroth_order = True

    def __init__(
        self,
        update: UpdateConfig,
        model: nn.Module,
        params: Sequence[torch.Tensor],
        decay: Sequence[bool],
        procs: Processes,
        loss_fn: LossFn,
        *,
        seed: int,
        step: int,
        weight_decay: float,
    ) -> None:
        self.update, self.model, self.procs, self.loss_fn = update, model, procs, loss_fn
        self.seed, self.step_index, self.weight_decay = seed, step, weight_decay
        self.zo = ZerothOrder(params, decay, update.zo_eps)
        self._grads = [0.0] * update.zo_samples

    def seeds(self) -> list[int]:
        """The perturbation seeds of the current step."""
        return [
            perturbation_seed(self.seed, self.step_index, k) for k in range(self.update.zo_samples)
        ]

    def accumulate(
        self,
        wrapped: nn.Module,
        forget: Batch,
        retain: Batch | None,
        ref: ReferenceProvider,
        *,
        weight: float,
        micro_batches: int,
        autocast: Callable[[], contextlib.AbstractContextManager],
    ) -> torch.Tensor:
        """Evaluate the micro-batch at theta +- eps*z_k for every k; returns this process's
        loss value (the mean of all evaluations, ~ L(theta))."""

        def loss() -> torch.Tensor:
            with autocast():
                return self.loss_fn(self.model, forget, retain, ref).float()

        training = self.model.training
        self.model.eval()  # MeZO: dropout off
        try:
            pairs = [self.zo.directional_derivative(s, loss)[1:] for s in self.seeds()]
        finally:
            self.model.train(training)
        diffs = torch.stack([plus - minus for plus, minus in pairs])
        diffs = self.procs.sum(diffs * (weight / self.procs.world))  # the micro-batch's
        for k, d in enumerate(diffs.tolist()):
            self._grads[k] += d / (2 * self.update.zo_eps) / micro_batches
        return (sum(plus + minus for plus, minus in pairs) / (2 * len(pairs))).float()

    def before_step(self) -> None:
        """Nothing: there is no gradient to clip or mask."""

    def step(self, lr: float) -> None:
        """theta -= lr * (mean_k g_k*z_k + weight_decay*theta); then on to the next seeds."""
        grads = self._grads
        if not all(math.isfinite(g) for g in grads):
            raise TrainingError(
                f"the zeroth-order gradient estimate became non-finite at step "
                f"{self.step_index + 1}; lower zo_eps or the learning rate (-P lr=...)."
            )
        self.zo.update(self.seeds(), grads, lr, self.weight_decay)
        self._grads = [0.0] * self.update.zo_samples
        self.step_index += 1

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The fp32 master weights (only where the weights are not fp32), for a resume."""
        return {
            f"zo.master.{i}": m.detach().cpu().contiguous()
            for i, m in enumerate(self.zo.masters)
            if m is not None
        }

    def load_state(self, path: Path) -> None:
        """Restore the fp32 masters saved in checkpoint `path` (the weights' own values when
        the checkpoint has none)."""
        from safetensors import safe_open

        from muse_bench.training.checkpoints import STATE_TENSORS

        self.zo.resync()
        if not any(m is not None for m in self.zo.masters):
            return
        with safe_open(str(Path(path) / STATE_TENSORS), framework="pt") as fh:
            keys = set(fh.keys())  # noqa: SIM118 (a safetensors handle, not a dict)
            for i, m in enumerate(self.zo.masters):
                key = f"zo.master.{i}"
                if m is not None and key in keys:
                    m.copy_(fh.get_tensor(key))
                    self.zo.params[i].data.copy_(m)


def make_update_rule(
    update: UpdateConfig,
    model: nn.Module,
    groups: Sequence[dict[str, Any]],
    procs: Processes,
    loss_fn: LossFn,
    terms: LossTerms | None,
    backward: Callable[[torch.Tensor], Any],
    *,
    seed: int,
    step: int,
    weight_decay: float,
) -> FirstOrderRule | ZerothOrderRule | None:
    """The rule `update` asks for (None: plain AdamW), over the optimizer's param `groups`.

    Without `terms`, the whole loss counts as the forget term.
    """
    if not update.active:
        return None
    params = [p for g in groups for p in g["params"]]
    if update.zeroth_order:
        decay = [g.get("weight_decay", 0.0) > 0 for g in groups for _ in g["params"]]
        return ZerothOrderRule(
            update,
            model,
            params,
            decay,
            procs,
            loss_fn,
            seed=seed,
            step=step,
            weight_decay=weight_decay,
        )
    return FirstOrderRule(
        update, model, params, procs, loss_fn, terms or LossTerms(loss_fn, None), backward
    )
