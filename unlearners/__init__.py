"""Unlearning algorithms: the interface, the registry, and the MUSE baselines.

Import as `muse_bench.unlearners`. Register a new one with `@register_unlearner("name")`
on a `@dataclass(kw_only=True)` subclass of `GradientUnlearner` (write `loss()`) or of
`Unlearner` (write `candidates()`); third-party packages use the entry-point group
`muse_bench.unlearners`.
"""

from muse_bench.core.hparams import describe, parse_params

from .base import (
    EMBEDDED,
    GDR,
    KLR,
    UNLEARNERS,
    Candidate,
    GradientUnlearner,
    RetainRegularized,
    UnlearnContext,
    Unlearner,
    chunk_length,
    get_unlearner_class,
    read_model_config,
    register_unlearner,
)
from .ce_u import CEU
from .ga import GA, GA_GDR, GA_KLR
from .idk import IdkDPO, IdkNLL
from .losses import kl_divergence, npo_loss, reference_kl, sequence_logprob, token_nll
from .npo import NPO, NPO_GDR, NPO_KLR
from .pdu import PDU
from .rmu import RMU
from .simnpo import SimNPO
from .task_vector import FinetuneNLL, ReinforcedSweep, TaskVector
from .undial import UNDIAL
from .weighted_ga import WGA, SatImp
from .whp import WHP, WHPModel, WHPOutput, load_unlearned

__all__ = [
    "CEU",
    "EMBEDDED",
    "GA",
    "GA_GDR",
    "GA_KLR",
    "GDR",
    "KLR",
    "NPO",
    "NPO_GDR",
    "NPO_KLR",
    "UNDIAL",
    "PDU",
    "RMU",
    "IdkDPO",
    "IdkNLL",
    "UNLEARNERS",
    "WGA",
    "WHP",
    "Candidate",
    "FinetuneNLL",
    "GradientUnlearner",
    "ReinforcedSweep",
    "RetainRegularized",
    "SatImp",
    "SimNPO",
    "TaskVector",
    "UnlearnContext",
    "Unlearner",
    "WHPModel",
    "WHPOutput",
    "chunk_length",
    "describe",
    "get_unlearner_class",
    "kl_divergence",
    "load_unlearned",
    "npo_loss",
    "parse_params",
    "read_model_config",
    "reference_kl",
    "register_unlearner",
    "sequence_logprob",
    "token_nll",
]
