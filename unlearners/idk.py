"""The "I don't know" family: IdkNLL and IdkDPO (TOFU's idk baselines).

Both replace what the model says after a forget prompt by a refusal. MUSE's forget sets
are raw text with no question/answer split, so the harness splits each forget chunk: its
BOS and first `prompt_tokens` tokens are the prompt, the rest of the chunk is the true
response (a chunk too short for that keeps at least one response token). The refusals ship
with the package (`unlearners/data/idk_responses.txt`); every (epoch, chunk) draws one with
the run's seed, so a resumed or repeated run draws the same. The knowmem QA files are never
trained on: they are the evaluation's probes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from muse_bench.core.errors import ConfigError
from muse_bench.core.hparams import require
from muse_bench.training.hooks import TrainHooks
from muse_bench.training.packing import pad_batch
from muse_bench.training.ref_logprobs import Batch, token_logprobs

from .base import EMBEDDED, EMBEDDED_V3, ForgetWeighted, GradientUnlearner, register_unlearner
from .losses import dpo_loss, token_nll

#: The refusal responses shipped with the package, one per line.
IDK_RESPONSES = Path(__file__).parent / "data" / "idk_responses.txt"
DPO_FORMS = ("ou", "standard")


def load_responses(path: str | Path = IDK_RESPONSES) -> list[str]:
    """The non-empty, non-comment ('#') lines of a refusal file."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read the refusal responses '{path}': {exc.strerror}.") from None
    responses = [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]
    if not responses:
        raise ConfigError(f"'{path}' holds no refusal response (one per line).")
    return responses


def prompt_length(chunk_len: int, prompt_tokens: int) -> int:
    """Tokens of a chunk that form its prompt: BOS plus up to `prompt_tokens` text tokens,
    leaving at least one response token."""
    return 1 + max(0, min(prompt_tokens, chunk_len - 2))


def response_batch(
    prompts: Sequence[torch.Tensor], responses: Sequence[torch.Tensor], pad_id: int
) -> Batch:
    """prompt + response sequences, right-padded, with labels on the response tokens only."""
    batch = pad_batch([torch.cat([p, r]) for p, r in zip(prompts, responses, strict=True)], pad_id)
    for row, prompt in enumerate(prompts):
        batch["labels"][row, : len(prompt)] = -100
    return batch


def split_forget_batch(forget: Batch, prompt_tokens: int) -> tuple[list[torch.Tensor], Batch]:
    """The prompts of a padded forget batch, and the batch with its prompt tokens unscored
    (the true responses, IdkDPO's rejected answers)."""
    lengths = forget["attention_mask"].sum(-1).tolist()
    cuts = [prompt_length(int(n), prompt_tokens) for n in lengths]
    prompts = [forget["input_ids"][row, :cut] for row, cut in enumerate(cuts)]
    labels = forget["labels"].clone()
    for row, cut in enumerate(cuts):
        labels[row, :cut] = -100
    return prompts, {**forget, "labels": labels}


def idk_nll_loss(
    idk_logp: torch.Tensor,
    idk_mask: torch.Tensor,
    retain_logp: torch.Tensor,
    retain_mask: torch.Tensor,
    retain_weight: float,
    concat_mean: bool = False,
) -> torch.Tensor:
    """NLL of the refusals plus `retain_weight` · NLL of the retain tokens.

    Two token means (default), or TOFU's one token mean over both sets (`concat_mean`:
    their token counts weigh them). Log-probabilities are `[B, T]`, 0 where unmasked.
    """
    idk_sum, idk_n = -idk_logp.sum(), idk_mask.sum().clamp(min=1)
    ret_sum, ret_n = -retain_logp.sum(), retain_mask.sum().clamp(min=1)
    if concat_mean:
        return (idk_sum + retain_weight * ret_sum) / (idk_n + ret_n)
    return idk_sum / idk_n + retain_weight * ret_sum / ret_n


class RefusalDraws(TrainHooks):
    """The tokenized refusals and the seeded draw of one per (epoch, forget chunk).

    The draw is a function of (seed, epoch, chunk index) alone: the same whatever the
    batch size, the number of processes or where a run was resumed.
    """

    def __init__(self, responses: Sequence[str]) -> None:
        self.responses = list(responses)
        self.tokens: list[torch.Tensor] = []
        self.pad_id = 0
        self.seed = 0
        self.epoch = 0

    def setup(self, model: nn.Module, tokenizer, seed: int) -> None:
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.tokens = [
            torch.tensor(tokenizer(r, add_special_tokens=False)["input_ids"] + eos)
            for r in self.responses
        ]
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else tokenizer.eos_token_id
        self.seed = seed

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def choice(self, chunk: int) -> int:
        """Which refusal chunk `chunk` gets in the current epoch."""
        gen = torch.Generator().manual_seed(
            (self.seed * 1_000_003 + self.epoch) * 1_000_033 + chunk
        )
        return int(torch.randint(len(self.responses), (1,), generator=gen))

    def draw(self, index: torch.Tensor) -> list[torch.Tensor]:
        """The refusal tokens for forget chunks `index` (a batch's `index`)."""
        return [self.tokens[self.choice(int(i))] for i in index.tolist()]


@dataclass(kw_only=True)
class IdkUnlearner(GradientUnlearner):
    """Base of the idk methods: the prompt/response split and the refusal draws."""

    needs_retain: ClassVar[bool] = True
    # calibrated on embedded news (docs/methods.md): IdkNLL at 1e-3 dropped knowmem_r to 37,
    # at 3e-4 knowmem_f only to 72
    benchmark_defaults: ClassVar[Mapping[str, Mapping[str, Any]]] = {EMBEDDED: {"lr": 5e-4}}

    prompt_tokens: int = field(
        default=32,
        metadata={"help": "Tokens after BOS of each forget chunk that form the prompt."},
    )
    retain_weight: float = field(
        default=1.0, metadata={"help": "Weight of the retain NLL (OU alpha: 1)."}
    )
    responses_file: str = field(
        default="",
        metadata={"help": "Refusals, one per line; '' = the packaged idk_responses.txt."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self._draws: RefusalDraws | None = None

    def validate(self) -> None:
        super().validate()
        require(self.prompt_tokens >= 1, f"prompt_tokens must be >= 1, got {self.prompt_tokens}.")
        require(self.retain_weight >= 0, f"retain_weight must be >= 0, got {self.retain_weight}.")
        load_responses(self.responses_file or IDK_RESPONSES)

    def train_hooks(self) -> RefusalDraws:
        self._draws = RefusalDraws(load_responses(self.responses_file or IDK_RESPONSES))
        return self._draws

    def refusal_batch(self, forget: Batch) -> tuple[Batch, Batch]:
        """(prompt + drawn refusal, the forget batch with its prompts unscored)."""
        if self._draws is None:
            raise RuntimeError(f"{self.name()}'s loss runs inside its training loop.")
        prompts, rest = split_forget_batch(forget, self.prompt_tokens)
        device = forget["input_ids"].device
        refusals = [t.to(device) for t in self._draws.draw(forget["index"])]
        winner = response_batch(prompts, refusals, self._draws.pad_id)
        return {k: v.to(device) for k, v in winner.items()}, rest


@register_unlearner("idknll")
@dataclass(kw_only=True)
class IdkNLL(IdkUnlearner):
    """IdkNLL: NLL of a refusal after each forget prompt, plus NLL on the retain set."""

    paper_url: ClassVar[str] = "https://arxiv.org/abs/2401.06121"
    # Calibrated on embedded news v3 (sweeps/calibrate_v3_news.toml, docs/methods.md).
    benchmark_defaults: ClassVar[Mapping[str, Mapping[str, Any]]] = {EMBEDDED_V3: {"lr": 1e-3}}

    concat_mean: bool = field(
        default=False,
        metadata={"help": "One token mean over refusal and retain tokens (TOFU's code)."},
    )

    def loss(self, model, forget, retain, ref):
        idk, _ = self.refusal_batch(forget)
        idk_logp, idk_mask = token_logprobs(model, idk)
        ret_logp, ret_mask = token_logprobs(model, retain)
        return idk_nll_loss(
            idk_logp, idk_mask, ret_logp, ret_mask, self.retain_weight, self.concat_mean
        )


@register_unlearner("idkdpo")
@dataclass(kw_only=True)
class IdkDPO(IdkUnlearner, ForgetWeighted):
    """IdkDPO: DPO preferring a refusal over the true continuation, plus retain NLL."""

    paper_url: ClassVar[str] = "https://arxiv.org/abs/2305.18290"
    needs_ref_model: ClassVar[bool] = True
    # calibrated on embedded news (docs/methods.md): at 1e-3 knowmem_r fell to 25
    benchmark_defaults: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        EMBEDDED: {"lr": 3e-4},
        EMBEDDED_V3: {"lr": 3e-3},
    }

    beta: float = field(default=0.1, metadata={"help": "Inverse temperature β of DPO (OU: 0.1)."})
    loss_form: Literal["ou", "standard"] = field(
        default="ou",
        metadata={"help": "ou: −(2/β)·log σ(·) (OU, NPO); standard: −log σ(·) (DPO, TOFU)."},
    )

    def validate(self) -> None:
        super().validate()
        require(self.beta > 0, f"beta must be > 0, got {self.beta}.")
        require(
            self.loss_form in DPO_FORMS,
            f"loss_form must be one of {', '.join(DPO_FORMS)}, got {self.loss_form!r}.",
        )

    def loss(self, model, forget, retain, ref):
        winner, loser = self.refusal_batch(forget)
        logp_w = token_logprobs(model, winner)[0].sum(-1)
        logp_l = token_logprobs(model, loser)[0].sum(-1)
        with torch.no_grad():
            ref_w = token_logprobs(ref.model, winner)[0].sum(-1)
            ref_l = token_logprobs(ref.model, loser)[0].sum(-1)
        forget_loss = dpo_loss(logp_w, ref_w, logp_l, ref_l, self.beta, self.loss_form == "ou")
        return self.forget_weight * forget_loss + self.retain_weight * token_nll(model, retain)
