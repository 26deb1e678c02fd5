"""Zeroth-order (MeZO) optimisation: n-SPSA gradient estimates from forward passes only.

One step (Malladi et al. 2023, Algorithm 1; `../shared/SPEC-methods.md` §11) on one batch,
for each of `samples` perturbations k with its own integer seed s_k:

1. theta += eps*z_k, L+ = L(theta); theta -= 2*eps*z_k, L- = L(theta); theta += eps*z_k;
2. g_k = (L+ - L-) / (2*eps), a scalar (the directional derivative along z_k);

then theta -= lr * (mean_k g_k*z_k + weight_decay*theta). z_k ~ N(0, I) is never stored: it is
regenerated tensor by tensor, in a fixed parameter order, from a generator re-seeded with
s_k, so memory stays at inference level (one parameter-sized temporary at a time). The seed
of perturbation k before optimizer step t is a hash of (run seed, t, k): a resumed run
regenerates the same perturbations from the restored step count, with no RNG state to save.

Weights below fp32 precision (a bf16 model on a GPU) get fp32 master copies: a perturbation
writes round(master + eps*z) into the weight and restoring copies the master back, so the
weights return bit for bit, and updates smaller than a bf16 step accumulate in the master.
fp32 weights are perturbed in place (+eps*z, -2*eps*z, +eps*z), as MeZO does; that returns
them to within a few ulps, a drift bound that tests/test_update_rules.py checks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence

import torch

__all__ = ["ZerothOrder", "perturbation_seed"]


def perturbation_seed(run_seed: int, step: int, sample: int) -> int:
    """The seed of perturbation `sample` before optimizer step `step` (0-based) of a run."""
    digest = hashlib.sha256(f"mezo:{run_seed}:{step}:{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class ZerothOrder:
    """Perturbs, estimates and updates a fixed, ordered list of trainable tensors in place.

    `params` are the tensors to train (e.g. an optimizer's parameter groups flattened, in
    order); `decay[i]` says whether weight decay applies to `params[i]` (MeZO: not to
    biases and norms). The update itself needs no optimizer state.
    """

    def __init__(self, params: Sequence[torch.Tensor], decay: Sequence[bool], eps: float) -> None:
        if len(params) != len(decay):
            raise ValueError("params and decay must have the same length")
        self.params = list(params)
        self.decay = list(decay)
        self.eps = float(eps)
        # fp32 master copies of the tensors below fp32 precision (None for the others).
        self.masters: list[torch.Tensor | None] = [
            p.detach().float().clone() if torch.finfo(p.dtype).bits < 32 else None
            for p in self.params
        ]
        self._generators: dict[torch.device, torch.Generator] = {}

    def noise(self, seed: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(index, z) for every tensor in order: z ~ N(0, I) regenerated from `seed`, in the
        dtype of what it is added to (the tensor itself, or its fp32 master)."""
        for gen in self._generators.values():
            gen.manual_seed(seed)
        for i, p in enumerate(self.params):
            gen = self._generators.get(p.device)
            if gen is None:
                gen = self._generators[p.device] = torch.Generator(device=p.device)
                gen.manual_seed(seed)
            dtype = torch.float32 if self.masters[i] is not None else p.dtype
            yield i, torch.randn(p.shape, generator=gen, dtype=dtype, device=p.device)

    @torch.no_grad()
    def shift(self, seed: int, current: float, target: float) -> None:
        """Move the tensors from theta + current*z to theta + target*z (z from `seed`)."""
        for i, z in self.noise(seed):
            p, master = self.params[i], self.masters[i]
            if master is None:
                p.add_(z, alpha=target - current)
            elif target == 0.0:
                p.copy_(master)  # exact restore
            else:
                p.copy_(master + target * z)

    @torch.no_grad()
    def directional_derivative(self, seed: int, loss: Callable[[], torch.Tensor]) -> tuple:
        """(g, L+, L-): the central difference of `loss` along z(seed), theta restored after.

        `loss()` is evaluated at theta + eps*z and theta - eps*z; it returns a tensor whose
        value is the loss (summed over processes by the caller if it must be)."""
        self.shift(seed, 0.0, self.eps)
        plus = loss().detach().double()
        self.shift(seed, self.eps, -self.eps)
        minus = loss().detach().double()
        self.shift(seed, -self.eps, 0.0)
        return (plus - minus) / (2 * self.eps), plus, minus

    @torch.no_grad()
    def update(
        self, seeds: Sequence[int], grads: Sequence[float], lr: float, weight_decay: float = 0.0
    ) -> None:
        """theta -= lr * (mean_k grads[k]*z(seeds[k]) + weight_decay*theta) (decayed tensors)."""
        q = len(seeds)
        if weight_decay and lr:
            for i, p in enumerate(self.params):
                if self.decay[i]:
                    target = self.masters[i] if self.masters[i] is not None else p
                    target.mul_(1.0 - lr * weight_decay)
        for seed, g in zip(seeds, grads, strict=True):
            step = -lr * float(g) / q
            if step == 0.0:
                continue
            for i, z in self.noise(seed):
                target = self.masters[i] if self.masters[i] is not None else self.params[i]
                target.add_(z, alpha=step)
        for p, master in zip(self.params, self.masters, strict=True):
            if master is not None:
                p.copy_(master)

    def resync(self) -> None:
        """Take the masters from the weights again (after weights were loaded from disk)."""
        for i, p in enumerate(self.params):
            if self.masters[i] is not None:
                self.masters[i].copy_(p.detach())
