"""Loss pieces shared by the baselines (SPEC §4). Batches come from `pad_batch`.

All token-level quantities use the shifted labels: position t predicts token t+1, and
padding (label -100) is excluded. Token means divide by `token_count`: the batch's own
real tokens, or in a micro-batch split over several processes the share the training loop
sets in `batch["token_norm"]`, which makes the processes' means add up to the mean over the
whole micro-batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from muse_bench.core.errors import ConfigError
from muse_bench.training.ref_logprobs import Batch, ReferenceProvider, RefTopK, token_logprobs

__all__ = [
    "ceu_target_logits",
    "activation_mse",
    "block_output",
    "decoder_layers",
    "dpo_loss",
    "logit_margin_flatness",
    "kl_divergence",
    "next_token_logits",
    "simnpo_loss",
    "soft_cross_entropy",
    "undial_target_logits",
    "weighted_logprob_mean",
    "topk_kl_divergence",
    "npo_loss",
    "reference_kl",
    "sequence_logprob",
    "token_count",
    "token_logprobs",
    "token_nll",
]


def token_count(batch: Batch, mask: torch.Tensor) -> torch.Tensor:
    """What a mean over the real tokens of `batch` (`mask`) divides by.

    Alone, the number of real tokens. When the loop splits a micro-batch over processes it
    sets `batch["token_norm"]` = (real tokens of the whole micro-batch) x (this process's
    share of its chunks); the loop weights each process's loss by that share, so the
    gradient is the whole micro-batch's token mean even when the shares hold different
    numbers of tokens.
    """
    norm = batch.get("token_norm")
    return norm if norm is not None else mask.sum().clamp(min=1)


def token_nll(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean negative log-likelihood per real token of the batch (HF's causal-LM loss)."""
    logp, mask = token_logprobs(model, batch)
    return -logp.sum() / token_count(batch, mask)


def sequence_logprob(model: nn.Module, batch: Batch) -> torch.Tensor:
    """log p(x) of each sequence: its token log-probabilities summed, shape `[B]`."""
    return token_logprobs(model, batch)[0].sum(-1)


def kl_divergence(
    ref_logits: torch.Tensor,
    logits: torch.Tensor,
    mask: torch.Tensor,
    count: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(p_ref ‖ p_θ) of the next-token distributions, averaged over positions in `mask`.

    `ref_logits` and `logits` are `[B, T, V]` at the positions to compare; `mask` is `[B, T]`.
    `count` replaces the number of positions as the divisor (see `token_count`).
    """
    ref_logp = F.log_softmax(ref_logits.float(), dim=-1)
    logp = F.log_softmax(logits.float(), dim=-1)
    per_token = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    return _masked_mean(per_token, mask, count)


def _masked_mean(
    values: torch.Tensor, mask: torch.Tensor, count: torch.Tensor | None
) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / (count if count is not None else mask.sum().clamp(min=1))


def topk_kl_divergence(
    ref: RefTopK, logits: torch.Tensor, mask: torch.Tensor, count: torch.Tensor | None = None
) -> torch.Tensor:
    """KL(p_ref ‖ p_θ) from the reference's top-k log-probabilities, averaged over `mask`.

    The reference's tokens outside its top k are lumped into one outcome on both sides
    (`ref.tail` against p_θ's mass outside the same k tokens): the KL of the coarsened
    distributions, a lower bound of the full KL that equals it when k is the vocabulary
    size. `logits` is `[B, T, V]`, `ref` and `mask` are for the same positions.
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    ref_logp = ref.logprobs.float()
    per_token = (ref_logp.exp() * (ref_logp - logp.gather(-1, ref.indices))).sum(-1)
    if ref.tail is not None:
        tail = logp.scatter(-1, ref.indices, -math.inf).logsumexp(-1)
        ref_tail = ref.tail.float()
        term = ref_tail.exp() * (ref_tail - tail)
        per_token = per_token + torch.where(ref_tail > -math.inf, term, 0.0)
    return _masked_mean(per_token, mask, count)


def reference_kl(model: nn.Module, batch: Batch, ref: ReferenceProvider) -> torch.Tensor:
    """KL(p_ref ‖ p_θ) per real token of `batch`: against the frozen reference model's
    logits, or its cached top-k distributions when the run keeps those (`ref_topk` > 0)."""
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits[:, :-1]
    mask = batch["labels"][:, 1:] != -100
    count = token_count(batch, mask)
    top = ref.topk(batch)
    if top is not None:
        return topk_kl_divergence(top, logits, mask, count)
    return kl_divergence(ref.logits(batch)[:, :-1], logits, mask, count)


def npo_loss(logp: torch.Tensor, ref_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """NPO (Zhang et al., 2024): −(2/β) · mean log σ(−β·r), r = log p_θ(x) − log p_ref(x).

    `logp` and `ref_logp` are per-sequence log-likelihoods (summed over tokens), `[B]`.
    """
    ratio = logp - ref_logp.to(logp.dtype)
    return -(2.0 / beta) * F.logsigmoid(-beta * ratio).mean()


# ---------------------------------------------------------------- methods after MUSE (SPEC-methods)


def simnpo_loss(
    logp: torch.Tensor, lengths: torch.Tensor, beta: float, delta: float
) -> torch.Tensor:
    """SimNPO's forget term (Fan et al., 2024): −(2/β) · mean log σ(β·(NLL̄ − δ)).

    `logp` is each sequence's summed token log-likelihood S(x), `lengths` its number of
    scored tokens |y| (both `[B]`), so NLL̄ = −S(x)/|y|. This is the paper's
    −(2/β)·log σ(−(β/|y|)·S(x) − γ) with margin γ = β·δ; the mean is over sequences.
    """
    mean_nll = -logp / lengths.to(logp.dtype).clamp(min=1)
    return -(2.0 / beta) * F.logsigmoid(beta * (mean_nll - delta)).mean()


def weighted_logprob_mean(
    logp: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor,
    count: torch.Tensor | None = None,
) -> torch.Tensor:
    """Token mean of sg[weight] · log p_t over the positions in `mask` (WGA, SatImp).

    `logp`, `mask` and `weight` are `[B, T]`; the weight is detached here, so only
    log p_t carries a gradient: gradient ascent with each token scaled by its weight.
    `count` replaces the number of positions as the divisor (see `token_count`).
    """
    return _masked_mean(weight.detach() * logp, mask, count)


def next_token_logits(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits at every position that predicts a token, `[B, T-1, V]`, and
    the labels they predict, `[B, T-1]` (-100 on padding)."""
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits[:, :-1]
    return logits, batch["labels"][:, 1:]


def soft_cross_entropy(
    target_logits: torch.Tensor,
    logits: torch.Tensor,
    mask: torch.Tensor,
    count: torch.Tensor | None = None,
) -> torch.Tensor:
    """Token mean over `mask` of CE(q, p_θ) = −Σ_v q(v)·log p_θ(v), q = softmax(target_logits).

    `target_logits` and `logits` are `[B, T, V]`; the target is detached (sg[q]), and a
    target logit of −inf gives that token zero target mass. Computed in fp32.
    """
    q = F.softmax(target_logits.detach().float(), dim=-1)
    logp = F.log_softmax(logits.float(), dim=-1)
    # 0·log p = 0 where q has no mass, even if log p underflowed to −inf.
    per_token = -torch.where(q > 0, q * logp, 0.0).sum(-1)
    return _masked_mean(per_token, mask, count)


def _label_index(labels: torch.Tensor) -> torch.Tensor:
    # -100 (padding) would index from the end of the vocabulary: point it at token 0 instead;
    # the loss masks those positions out.
    return labels.clamp(min=0).unsqueeze(-1)


def undial_target_logits(
    ref_logits: torch.Tensor, labels: torch.Tensor, beta: float
) -> torch.Tensor:
    """UNDIAL's target (Dong et al., 2025): the reference logits with β subtracted from the
    true next token's logit, z − β·e_y, in fp32. `ref_logits` `[B, T, V]`, `labels` `[B, T]`."""
    target = ref_logits.detach().float()
    index = _label_index(labels)
    return target.scatter_add(-1, index, torch.full_like(index, -beta, dtype=target.dtype))


def ceu_target_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CE-U's target (Yang, 2025): the model's own detached logits with the true next
    token's set to −inf, so the target puts no mass on it. Shapes as `undial_target_logits`."""
    return logits.detach().float().scatter(-1, _label_index(labels), -math.inf)


# ------------------------------------------------------------ pieces of the later methods


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a causal LM (Llama's `model.layers`, GPT-2's `transformer.h`).

    The outermost `nn.ModuleList` named `layers`, `h` or `blocks`, so a model wrapped by
    DDP or carrying LoRA adapters is found too.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rpartition(".")[2] in _BLOCK_LISTS:
            return module
    raise ConfigError(
        f"cannot find the decoder blocks of {type(model).__name__} "
        f"(an nn.ModuleList named {' or '.join(_BLOCK_LISTS)})."
    )


_BLOCK_LISTS = ("layers", "h", "blocks")


class _StopForward(Exception):
    """Raised by `block_output`'s hook: the rest of the forward pass is not needed."""


def block_output(model: nn.Module, batch: Batch, layer: int) -> torch.Tensor:
    """The hidden states `[B, T, d]` that decoder block `layer` (0-based) outputs on `batch`.

    HF's `hidden_states[layer + 1]`, but read with a forward hook that stops the forward
    pass after that block, so the later blocks and the logits are never computed.
    """
    blocks = decoder_layers(model)
    if not 0 <= layer < len(blocks):
        raise ConfigError(f"layer must be in [0, {len(blocks) - 1}], got {layer}.")
    seen: list[torch.Tensor] = []

    def hook(module, args, output):
        seen.append(output[0] if isinstance(output, tuple) else output)
        raise _StopForward

    handle = blocks[layer].register_forward_hook(hook)
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not seen:
        raise ConfigError(f"decoder block {layer} did not run in the forward pass.")
    return seen[0]


def activation_mse(hidden: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (hidden − target)² over the real tokens in `mask` and every coordinate.

    `hidden` is `[B, T, d]`; `target` is `[B, T, d]` or a vector `[d]` (RMU's control
    vector); `mask` is `[B, T]`. Without padding this is `F.mse_loss(hidden, target)`.
    """
    per_token = (hidden.float() - target.float()).pow(2).mean(-1)
    return _masked_mean(per_token, mask, None)


def logit_margin_flatness(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """PDU's forget loss: mean over the positions in `mask` of (max_v z − mean_v z)².

    Zero exactly when all logits at a position are equal; `logits` is `[B, T, V]`.
    """
    logits = logits.float()
    margin = logits.max(-1).values - logits.mean(-1)
    return _masked_mean(margin.pow(2), mask, None)


def dpo_loss(
    logp_w: torch.Tensor,
    ref_w: torch.Tensor,
    logp_l: torch.Tensor,
    ref_l: torch.Tensor,
    beta: float,
    scaled: bool = True,
) -> torch.Tensor:
    """DPO (Rafailov et al., 2023) on sequence log-likelihoods `[B]` of a preferred (w)
    and a rejected (l) answer under the model and the reference.

    −(2/β)·mean log σ(β·(r_w − r_l)), r = log p_θ − log p_ref, as open-unlearning and NPO
    write it (`scaled`), or the standard −mean log σ(β·(r_w − r_l)).
    """
    margin = (logp_w - ref_w.to(logp_w.dtype)) - (logp_l - ref_l.to(logp_l.dtype))
    loss = -F.logsigmoid(beta * margin).mean()
    return (2.0 / beta) * loss if scaled else loss
