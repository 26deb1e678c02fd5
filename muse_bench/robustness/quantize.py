"""Round-to-nearest weight quantization, the attack of Zhang et al. (ICLR 2025), in plain torch.

SPEC-robustness §1.2: the `weight` of every `nn.Linear` inside the decoder blocks is
replaced by its fake-quantized value (quantize, then dequantize), in place. Token
embeddings, the output head (tied or not), norm weights and biases are never touched.
Activations stay in the model's own precision (weight-only quantization).

Schemes (`QuantScheme`):

- `sym` (RTN-sym): per group of `group` weights along the input dimension,
  s = max|w| / qmax with qmax = 2^(b-1) - 1, code = clamp(round(w / s), -qmax, qmax)
  (round half to even), w' = s * code; a group of zeros is left unchanged.
- `asym`: s = (max - min) / (2^b - 1), z = round(-min / s), code in [0, 2^b - 1],
  w' = s * (code - z).
- `nf4`: each group divided by its absmax and snapped to the nearest of QLoRA's 16 NF4
  levels, then multiplied back; the code is the level's index.

The group is the whole row when `group` is None, when the row is shorter than `group` or
when the row length is not a multiple of it (`effective_group` says which was used);
`per_tensor` uses one scale for the whole matrix.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from muse_bench.core.errors import ConfigError

#: QLoRA's NormalFloat-4 levels (Dettmers et al. 2023), as in SPEC-robustness §1.2.
NF4_LEVELS: tuple[float, ...] = (
    -1.0,
    -0.6961928,
    -0.5250731,
    -0.3949175,
    -0.2844414,
    -0.1847734,
    -0.0910500,
    0.0,
    0.0795803,
    0.1609302,
    0.2461123,
    0.3379152,
    0.4407098,
    0.5626170,
    0.7229568,
    1.0,
)
KINDS = ("sym", "asym", "nf4")


@dataclass(frozen=True)
class QuantScheme:
    """How a weight matrix is quantized: bits, kind, group size along `in` (None = row)."""

    bits: int
    kind: str = "sym"
    group: int | None = 64
    per_tensor: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"unknown quantization kind '{self.kind}'; use {', '.join(KINDS)}.")
        if self.kind == "nf4" and self.bits != 4:
            raise ConfigError("nf4 quantization has 4 bits.")
        if not 2 <= self.bits <= 8:
            raise ConfigError(f"quantization bits must be in 2..8, got {self.bits}.")
        if self.group is not None and self.group < 1:
            raise ConfigError(f"quantization group size must be >= 1, got {self.group}.")

    def settings(self) -> dict[str, object]:
        """The scheme as report settings."""
        return {
            "bits": self.bits,
            "kind": self.kind,
            "group": self.group,
            "per_tensor": self.per_tensor,
        }


#: The quantization checks of `--robustness`, by name.
QUANT_SCHEMES: dict[str, QuantScheme] = {
    "quant8": QuantScheme(8, "sym", None),  # one scale per output channel (LLM.int8 weights)
    "quant4": QuantScheme(4, "sym", 64),  # bitsandbytes' block size
    "quant4_nf4": QuantScheme(4, "nf4", 64),
}


@dataclass(frozen=True)
class Quantized:
    """One quantized matrix: integer codes, the dequantized weight, the group size used."""

    codes: torch.Tensor
    weight: torch.Tensor
    group: int


def effective_group(n_in: int, scheme: QuantScheme) -> int:
    """The group size used for rows of length `n_in` (the whole row when it does not divide)."""
    g = scheme.group
    if g is None or n_in < g or n_in % g:
        return n_in
    return g


def quantize_tensor(weight: torch.Tensor, scheme: QuantScheme) -> Quantized:
    """Quantize a 2-D weight [out, in] (or a 1-D row); returns codes and the dequantized
    weight in the input's dtype. Computed in float64 so the result is exact to fp32."""
    w = weight.detach().to(torch.float64)
    shape = w.shape
    if w.ndim == 1:
        w = w[None, :]
    if w.ndim != 2:
        raise ConfigError(f"only matrices are quantized, got shape {tuple(shape)}.")
    n_out, n_in = w.shape
    g = effective_group(n_in, scheme)
    groups = w.reshape(1, 1, -1) if scheme.per_tensor else w.reshape(n_out, n_in // g, g)
    if scheme.kind == "sym":
        codes, deq = _sym(groups, scheme.bits)
    elif scheme.kind == "asym":
        codes, deq = _asym(groups, scheme.bits)
    else:
        codes, deq = _nf4(groups)
    return Quantized(
        codes.reshape(shape).to(torch.int16),
        deq.reshape(shape).to(weight.dtype),
        n_out * n_in if scheme.per_tensor else g,
    )


def _sym(groups: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    qmax = 2 ** (bits - 1) - 1
    scale = groups.abs().amax(dim=-1, keepdim=True) / qmax
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.clamp(torch.round(groups / safe), -qmax, qmax)
    deq = torch.where(scale > 0, safe * codes, groups)  # an all-zero group stays as it is
    return codes, deq


def _asym(groups: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    top = 2**bits - 1
    lo, hi = groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)
    scale = (hi - lo) / top
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / safe)
    codes = torch.clamp(torch.round(groups / safe) + zero, 0, top)
    deq = torch.where(scale > 0, safe * (codes - zero), groups)  # a constant group stays
    return codes, deq


def _nf4(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float64)
    absmax = groups.abs().amax(dim=-1, keepdim=True)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    codes = (groups / safe).unsqueeze(-1).sub(levels).abs().argmin(dim=-1)
    deq = torch.where(absmax > 0, levels[codes] * safe, groups)
    return codes, deq


def decoder_linears(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    """The `nn.Linear` layers whose weights are quantized: every linear layer of the model
    except output heads (`lm_head`) and any that shares its weight with an embedding.

    In a Llama model these are the q, k, v, o, gate, up and down projections of the
    decoder blocks. A wrapper holding several models (WHP) has all of theirs.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name.rsplit(".", 1)[-1] == "lm_head":
            continue
        if id(module.weight) in embeddings:
            continue
        yield name, module


@dataclass(frozen=True)
class QuantSummary:
    """What quantizing a model did: layers and weights quantized, group sizes used."""

    layers: int
    weights: int
    groups: tuple[int, ...]

    def to_dict(self) -> dict[str, object]:
        """The summary as report fields."""
        return {"layers": self.layers, "weights": self.weights, "group_sizes": list(self.groups)}


@torch.no_grad()
def quantize_model(model: nn.Module, scheme: QuantScheme) -> QuantSummary:
    """Fake-quantize the decoder's linear weights of `model` in place."""
    layers = weights = 0
    groups: set[int] = set()
    for _, module in decoder_linears(model):
        q = quantize_tensor(module.weight, scheme)
        module.weight.copy_(q.weight)
        layers += 1
        weights += module.weight.numel()
        groups.add(q.group)
    if not layers:
        raise ConfigError("the model has no linear layers to quantize.")
    return QuantSummary(layers, weights, tuple(sorted(groups)))


@torch.no_grad()
def code_agreement(a: nn.Module, b: nn.Module, scheme: QuantScheme) -> float:
    """Share of quantized weights whose integer code is the same in `a` and `b` (both
    unquantized models of the same architecture), layer by layer, without keeping codes."""
    left, right = dict(decoder_linears(a)), dict(decoder_linears(b))
    if left.keys() != right.keys():
        raise ConfigError("code agreement needs two models of the same architecture.")
    same = total = 0
    for name, module in left.items():
        other = right[name].weight
        if other.shape != module.weight.shape:
            raise ConfigError(f"layer '{name}' differs in shape between the two models.")
        ca = quantize_tensor(module.weight, scheme).codes
        cb = quantize_tensor(other.to(module.weight.device), scheme).codes
        same += int((ca == cb).sum())
        total += ca.numel()
    return same / total
