"""The unlearner interface, its registry, and the gradient-method base class.

An `Unlearner` is a keyword-only dataclass whose fields are its hyperparameters. It
turns (model, ForgetRequest) into a stream of `Candidate` models (one per epoch or per
α of a sweep) so the runner can apply MUSE's model selection. A `GradientUnlearner`
only writes `loss()`; the shared loop in `muse_bench.training.loop` does the rest.
"""

from __future__ import annotations

import dataclasses
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from muse_bench.core.distributed import launched_processes
from muse_bench.core.errors import ConfigError, TrainingError
from muse_bench.core.hparams import hyperparameters, params_dict, require
from muse_bench.core.registry import Registry
from muse_bench.core.types import ForgetRequest
from muse_bench.training.hooks import TrainHooks
from muse_bench.training.loop import (
    FSDP_NEEDS_PROCESSES,
    FSDP_WITH_LORA,
    MIXED_PRECISIONS,
    SCHEDULERS,
    TrainConfig,
    train,
)
from muse_bench.training.lora import LLAMA_LORA_TARGETS
from muse_bench.training.ref_logprobs import Batch, ReferenceProvider
from muse_bench.training.update_rules import LossTerms, UpdateConfig, check_update

from .losses import reference_kl, token_nll

UNLEARNERS: Registry[type[Unlearner]] = Registry(
    "unlearner", entry_point_group="muse_bench.unlearners"
)
register_unlearner = UNLEARNERS.register

#: Benchmark family whose tiny CPU models need larger learning rates than MUSE's 7B recipe.
EMBEDDED = "embedded"
#: Overrides for version 3 of the embedded benchmarks (calibrated on embedded-news-v3).
EMBEDDED_V3 = "embedded-v3"
#: MUSE's chunk length for Llama-2-7B.
MUSE_MAX_LEN = 2048


@dataclass(frozen=True)
class UnlearnContext:
    """Where and how to run: not hyperparameters, so not part of a leaderboard row.

    `work_dir` receives checkpoints (None: keep nothing on disk); `max_len` is the
    benchmark's chunk length, used unless the algorithm's `max_len` overrides it (None:
    MUSE's 2048, capped at the model's `max_position_embeddings`).
    """

    device: str = "cpu"
    seed: int = 0
    work_dir: Path | None = None
    max_len: int | None = None
    progress: bool = False


def chunk_length(model: nn.Module, override: int | None, ctx: UnlearnContext) -> int:
    """Chunk length: the algorithm's `max_len`, else the context's, else MUSE's 2048
    capped at the model's `max_position_embeddings`."""
    if override:
        return override
    if ctx.max_len:
        return ctx.max_len
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return min(MUSE_MAX_LEN, limit) if isinstance(limit, int) and limit >= 2 else MUSE_MAX_LEN


@dataclass(frozen=True)
class Candidate:
    """One model the runner may select: after an epoch, or for one α of a sweep.

    `model` is valid until the generator that yielded it resumes (it may be trained or
    overwritten in place); `path` is its checkpoint directory when one was written.
    """

    label: str
    step: float
    model: Any
    path: Path | None = None


@dataclass(kw_only=True)
class Unlearner(ABC):
    """Base of all unlearning algorithms; subclasses are keyword-only dataclasses."""

    #: Per-benchmark overrides of the dataclass defaults, merged along the MRO;
    #: see `defaults_for`.
    benchmark_defaults: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    #: The paper that introduced (or defines) the method; the leaderboard page links the
    #: method's name to it, with `description()` on hover. Empty: no link.
    paper_url: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:  # noqa: B027 - an optional hook, not an abstract method
        """Raise ConfigError if a hyperparameter is out of range; subclasses extend it."""

    def check_model(self, config: Mapping[str, Any]) -> None:  # noqa: B027 - optional hook
        """Raise ConfigError if a hyperparameter does not fit the model to unlearn.

        `config` is the model's `config.json` (see `read_model_config`); `muse run` calls
        this after `validate()` and before any work, for checks such as RMU's layer index.
        """

    @classmethod
    def name(cls) -> str:
        """The registered name, or the class name for an unregistered plugin."""
        # __dict__, not getattr: a subclass must not inherit its parent's registered name.
        return cls.__dict__.get("registered_name", cls.__name__)

    @classmethod
    def description(cls) -> str:
        """The first line of the class docstring."""
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    @classmethod
    def defaults_for(cls, benchmark: str) -> dict[str, Any]:
        """Overrides of the dataclass defaults for a benchmark.

        `benchmark` is a benchmark id such as "embedded-news-v2" or a family such as
        "embedded" (the id's part before the first '-'). `benchmark_defaults` entries for
        the family apply first, then those for the family's version ("embedded-v3", from
        an id ending in "-v3"), then those for the exact id; subclasses add to their
        parents'. The dataclass defaults are MUSE's 7B recipe; tiny embedded models need
        larger learning rates. Apply as `cls(**{**cls.defaults_for(b), **user_params})`.
        """
        family = benchmark.split("-", 1)[0]
        version = benchmark.rsplit("-", 1)[-1]
        keys = [family]
        if version[:1] == "v" and version[1:].isdigit() and benchmark != family:
            keys.append(f"{family}-{version}")
        keys.append(benchmark)
        merged: dict[str, Any] = {}
        for key in dict.fromkeys(keys):
            for klass in reversed(cls.__mro__):
                merged.update(klass.__dict__.get("benchmark_defaults", {}).get(key, {}))
        names = {f.name for f in hyperparameters(cls)}
        return {k: v for k, v in merged.items() if k in names}

    def params(self) -> dict[str, Any]:
        """The hyperparameter values, JSON-ready, for report.json."""
        return params_dict(self)

    @abstractmethod
    def candidates(
        self, model: nn.Module, tokenizer, request: ForgetRequest, ctx: UnlearnContext
    ) -> Iterator[Candidate]:
        """Yield candidate unlearned models in selection order (epochs, increasing α).

        `model` is consumed: it may be modified in place. The consumer may stop early.
        """

    def unlearn(
        self, model: nn.Module, tokenizer, request: ForgetRequest, ctx: UnlearnContext
    ) -> nn.Module:
        """Run to the end and return the last candidate's model."""
        last = None
        for last in self.candidates(model, tokenizer, request, ctx):  # noqa: B007
            pass
        if last is None:
            raise TrainingError(f"{self.name()} produced no model.")
        return last.model


def read_model_config(model_dir: str | Path) -> dict[str, Any]:
    """The `config.json` of a model directory as a dict ({} when it has none)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def get_unlearner_class(name: str) -> type[Unlearner]:
    """A registered name, an entry point, `module:Class` or `path/file.py:Class`."""
    cls = UNLEARNERS.get(name)
    if not (isinstance(cls, type) and issubclass(cls, Unlearner)):
        raise ConfigError(f"'{name}' is not an Unlearner subclass.")
    if not dataclasses.is_dataclass(cls):
        raise ConfigError(f"unlearner '{name}' must be decorated with @dataclass(kw_only=True).")
    return cls


@dataclass(kw_only=True)
class GradientUnlearner(Unlearner):
    """Base of loss-based methods: subclasses write only `loss()`.

    Defaults are MUSE's 7B recipe (AdamW, constant lr 1e-5, effective batch 4, 10 epochs,
    HF Trainer's gradient clipping at 1.0); `defaults_for("embedded")` raises the learning
    rate for the tiny CPU models.
    """

    #: Set True when `loss()` reads `retain` (otherwise it receives None).
    needs_retain: ClassVar[bool] = False
    #: Set True when `loss()` calls `ref.forget_logprob` (cached once before training).
    needs_ref_logprobs: ClassVar[bool] = False
    #: Set True when `loss()` calls `ref.logits` (a frozen copy of the original model).
    needs_ref_model: ClassVar[bool] = False
    # Calibrated on the embedded benchmarks (2.2M-parameter models trained at lr 2e-3):
    # at 1e-4 ten epochs barely move them; at 1e-3 GA and NPO collapse in one epoch.
    benchmark_defaults: ClassVar[Mapping[str, Mapping[str, Any]]] = {EMBEDDED: {"lr": 3e-4}}

    lr: float = field(default=1e-5, metadata={"help": "AdamW learning rate (MUSE: 1e-5)."})
    epochs: int = field(
        default=10, metadata={"help": "Epochs over the forget set; one candidate per epoch."}
    )
    batch_size: int = field(
        default=4, metadata={"help": "Forget chunks per micro-batch (and as many retain chunks)."}
    )
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    max_len: int | None = field(
        default=None,
        metadata={"help": "Chunk length in tokens; None = the benchmark's (MUSE: 2048)."},
    )
    weight_decay: float = field(
        default=0.0, metadata={"help": "AdamW weight decay (not on biases and norms)."}
    )
    max_grad_norm: float | None = field(
        default=1.0, metadata={"help": "Clip the gradient norm to this; None = no clipping."}
    )
    lr_scheduler: Literal["constant", "linear", "cosine"] = field(
        default="constant", metadata={"help": "Learning-rate schedule after warmup."}
    )
    warmup_steps: int = field(default=0, metadata={"help": "Optimizer steps of linear warmup."})
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Recompute activations in the backward pass (less memory, +1 forward)."},
    )
    lora_rank: int = field(
        default=0,
        metadata={"help": "Train LoRA adapters of this rank instead of all weights (0 = off)."},
    )
    lora_alpha: float = field(
        default=16.0, metadata={"help": "LoRA scaling numerator: ΔW = (alpha/rank)·B·A."}
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA path."})
    lora_target_modules: tuple[str, ...] = field(
        default=LLAMA_LORA_TARGETS,
        metadata={"help": "Linear layers to adapt (default: all of a Llama block's)."},
    )
    fsdp: bool = field(
        default=False,
        metadata={
            "help": "Shard weights, gradients and AdamW state over the launched processes "
            "(FSDP2; needs 2+ processes)."
        },
    )
    mixed_precision: Literal["auto", "no", "bf16"] = field(
        default="auto",
        metadata={"help": "bf16 autocast; auto = bf16 on a CUDA GPU (MUSE), no on CPU."},
    )
    # Update rules (muse_bench.training.update_rules), off by default.
    optimizer: Literal["adamw", "zo"] = field(
        default="adamw",
        metadata={
            "help": "adamw, or zo: zeroth-order SGD (MeZO), 2·zo_samples forward passes a step, "
            "no backward, no optimizer state; lr is then an SGD rate (far below AdamW's) and "
            "max_grad_norm does not apply."
        },
    )
    zo_eps: float = field(
        default=1e-3, metadata={"help": "optimizer=zo: perturbation scale ε (MeZO: 1e-3)."}
    )
    zo_samples: int = field(
        default=1,
        metadata={"help": "optimizer=zo: random directions averaged per step (n-SPSA; MeZO: 1)."},
    )
    sam_rho: float = field(
        default=0.0,
        metadata={
            "help": "SAM on the forget term: its gradient taken at θ + ρ·g_f/‖g_f‖ "
            "(Fan et al. 2025: 0.01; 0 = off)."
        },
    )
    sure_quantile: float | None = field(
        default=None,
        metadata={
            "help": "SURE: update only the weight rows whose forget-gradient norm reaches this "
            "quantile of all rows' (Zhang et al. 2025: 0.9; None = off)."
        },
    )

    def update_config(self) -> UpdateConfig:
        """The update-rule options (zeroth-order, SAM, SURE) as the training loop takes them."""
        return UpdateConfig(
            optimizer=self.optimizer,
            zo_eps=self.zo_eps,
            zo_samples=self.zo_samples,
            sam_rho=self.sam_rho,
            sure_quantile=self.sure_quantile,
        )

    def loss_terms(self) -> LossTerms:
        """`loss()` split as forget term + regularizer, for SAM and SURE.

        Here the whole loss is the forget term; `RetainRegularized` splits off its
        regularizer. A method whose `loss` is not that sum must override this.
        """
        return LossTerms(self.loss, None)

    def validate(self) -> None:
        super().validate()
        require(self.lr > 0, f"lr must be > 0, got {self.lr}.")
        require(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}.")
        require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}.")
        require(self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}.")
        require(
            self.max_len is None or self.max_len >= 2, f"max_len must be >= 2, got {self.max_len}."
        )
        require(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}.")
        require(
            self.max_grad_norm is None or self.max_grad_norm > 0,
            f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}.",
        )
        require(
            self.lr_scheduler in SCHEDULERS, f"lr_scheduler must be one of {', '.join(SCHEDULERS)}."
        )
        require(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}.")
        require(self.lora_rank >= 0, f"lora_rank must be >= 0 (0 = off), got {self.lora_rank}.")
        require(self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha}.")
        require(
            0 <= self.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {self.lora_dropout}."
        )
        require(
            self.lora_rank == 0 or len(self.lora_target_modules) > 0,
            "lora_target_modules must name at least one layer when lora_rank > 0.",
        )
        require(
            self.mixed_precision in MIXED_PRECISIONS,
            f"mixed_precision must be one of {', '.join(MIXED_PRECISIONS)}.",
        )
        # Checked again by the loop; here so that a bad command stops before any work.
        require(not (self.fsdp and self.lora_rank), FSDP_WITH_LORA)
        require(not self.fsdp or launched_processes() >= 2, FSDP_NEEDS_PROCESSES)
        check_update(self.update_config(), fsdp=self.fsdp)

    @abstractmethod
    def loss(
        self,
        model: nn.Module,
        forget: Batch,
        retain: Batch | None,
        ref: ReferenceProvider,
    ) -> torch.Tensor:
        """The scalar loss of one micro-batch of forget (and retain) chunks."""

    def train_config(
        self, model: nn.Module, request: ForgetRequest, ctx: UnlearnContext
    ) -> TrainConfig:
        """The loop settings for this request: hyperparameters plus the run context."""
        own = {f.name for f in dataclasses.fields(GradientUnlearner)}
        identity = {"algo": self.name()}
        identity.update({k: v for k, v in self.params().items() if k not in own})
        return TrainConfig(
            lr=self.lr,
            epochs=self.epochs,
            batch_size=self.batch_size,
            grad_accum=self.grad_accum,
            max_len=chunk_length(model, self.max_len, ctx),
            weight_decay=self.weight_decay,
            max_grad_norm=self.max_grad_norm,
            lr_scheduler=self.lr_scheduler,
            warmup_steps=self.warmup_steps,
            gradient_checkpointing=self.gradient_checkpointing,
            lora_rank=self.lora_rank,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            lora_target_modules=tuple(self.lora_target_modules),
            mixed_precision=self.mixed_precision,
            fsdp=self.fsdp,
            update=self.update_config(),
            use_retain=self.needs_retain,
            ref_logprobs=self.needs_ref_logprobs,
            ref_model=self.needs_ref_model,
            seed=ctx.seed,
            device=ctx.device,
            work_dir=ctx.work_dir,
            progress=ctx.progress,
            desc=f"{self.name()} {request.label}",
            identity=identity,
        )

    def train_hooks(self) -> TrainHooks | None:
        """A fresh `TrainHooks` for one training run, for a method that keeps state
        between steps (saved with the checkpoints); None for a pure loss."""
        return None

    def _epochs(self, model, tokenizer, request, ctx, replay: bool) -> Iterator[Candidate]:
        config = self.train_config(model, request, ctx)
        retain = request.retain if self.needs_retain else ()
        hooks = self.train_hooks()
        for result in train(
            model,
            tokenizer,
            self.loss,
            request.forget,
            retain,
            config,
            replay=replay,
            hooks=hooks,
            terms=self.loss_terms(),
        ):
            yield Candidate(f"epoch_{result.epoch}", float(result.epoch), result.model, result.path)

    def candidates(
        self, model: nn.Module, tokenizer, request: ForgetRequest, ctx: UnlearnContext
    ) -> Iterator[Candidate]:
        """Train in place; yield the model after every epoch (checkpointed in ctx.work_dir)."""
        return self._epochs(model, tokenizer, request, ctx, replay=True)

    def unlearn(
        self, model: nn.Module, tokenizer, request: ForgetRequest, ctx: UnlearnContext
    ) -> nn.Module:
        """Train to the last epoch (resuming without reloading completed epochs)."""
        last = None
        for last in self._epochs(model, tokenizer, request, ctx, replay=False):  # noqa: B007
            pass
        # None: every epoch was on disk already and the loop loaded the latest into `model`.
        return model.eval() if last is None else last.model


@dataclass(kw_only=True)
class ForgetWeighted(GradientUnlearner):
    """Mixin: a weight on the method's forget term (open-unlearning's gamma)."""

    forget_weight: float = field(
        default=1.0, metadata={"help": "Weight of the forget term (OU's gamma; MUSE: 1)."}
    )

    def validate(self) -> None:
        super().validate()
        require(self.forget_weight >= 0, f"forget_weight must be >= 0, got {self.forget_weight}.")


@dataclass(kw_only=True)
class RetainRegularized(GradientUnlearner):
    """Mixin base: adds retain_weight · regularizer(retain) to the next class's loss.

    Put it first among the bases (`class NPO_GDR(GDR, NPO)`): its `loss` calls the forget
    loss of the class after it in the MRO and adds the regularizer.
    """

    needs_retain: ClassVar[bool] = True
    # the retain term holds utility, so a regularized method can take a larger step
    benchmark_defaults: ClassVar[Mapping[str, Mapping[str, Any]]] = {EMBEDDED: {"lr": 1e-3}}
    retain_weight: float = field(
        default=1.0, metadata={"help": "Weight of the retain-set regularizer (MUSE: 1)."}
    )

    def validate(self) -> None:
        super().validate()
        require(self.retain_weight >= 0, f"retain_weight must be >= 0, got {self.retain_weight}.")

    @abstractmethod
    def regularizer(self, model: nn.Module, retain: Batch, ref: ReferenceProvider) -> torch.Tensor:
        """The retain-set term, before weighting."""

    def loss(self, model, forget, retain, ref):
        forget_loss = super().loss(model, forget, retain, ref)
        return forget_loss + self.retain_weight * self.regularizer(model, retain, ref)

    def loss_terms(self) -> LossTerms:
        """The next class's loss, and retain_weight · regularizer."""

        def regularizer(model, forget, retain, ref):
            return self.retain_weight * self.regularizer(model, retain, ref)

        return LossTerms(super().loss, regularizer)


@dataclass(kw_only=True)
class GDR(RetainRegularized):
    """Mixin: gradient descent on the retain set, + retain_weight · NLL(retain)."""

    def regularizer(self, model, retain, ref):
        return token_nll(model, retain)


@dataclass(kw_only=True)
class KLR(RetainRegularized):
    """Mixin: + retain_weight · KL(p_ref ‖ p_θ) per retain token, against a frozen reference."""

    needs_ref_model: ClassVar[bool] = True
    ref_topk: int = field(
        default=0,
        metadata={
            "help": "Keep the reference's top-k next-token distributions on the retain set "
            "instead of a frozen model copy (0 = the copy; exact when k = vocabulary size)."
        },
    )

    def validate(self) -> None:
        super().validate()
        require(self.ref_topk >= 0, f"ref_topk must be >= 0 (0 = off), got {self.ref_topk}.")

    def train_config(self, model, request, ctx):
        return dataclasses.replace(
            super().train_config(model, request, ctx), ref_topk=self.ref_topk
        )

    def regularizer(self, model, retain, ref):
        return reference_kl(model, retain, ref)
