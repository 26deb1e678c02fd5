"""C3 PrivLeak: the unlearned model's MIA AUC relative to the retrained model's."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TypeVar

import numpy as np

from muse_bench.core.errors import ConfigError
from muse_bench.core.types import Corpus, RetrainAUC
from muse_bench.engines.base import Engine
from muse_bench.metrics.mia import DEFAULT_ATTACK, check_attack, mia_auc, score_documents

AUC = TypeVar("AUC", float, np.ndarray)


def privleak(auc_unlearn: AUC, auc_retrain: float) -> AUC:
    """(AUC(f_unlearn) − AUC(f_retrain)) / AUC(f_retrain) × 100.

    About −100 for a model that memorized the forget set (AUC≈0) against a retrain AUC of
    0.5; 0 when the AUCs are equal; positive for over-unlearning.
    """
    if not math.isfinite(auc_retrain) or auc_retrain <= 0:
        raise ConfigError(
            f"the retrain AUC must be a positive number to compute privleak, not {auc_retrain}."
        )
    return (auc_unlearn - auc_retrain) / auc_retrain * 100


def split_aucs(
    forget: Sequence[Mapping[str, float]],
    holdout: Sequence[Mapping[str, float]],
    attacks: Sequence[str],
) -> dict[str, float]:
    """The forget-vs-holdout AUC of each attack from per-document attack scores."""
    return {a: mia_auc([d[a] for d in forget], [d[a] for d in holdout]) for a in attacks}


def compute_retrain_auc(
    engine: Engine,
    corpus: Corpus,
    attack: str = DEFAULT_ATTACK,
    provenance: Mapping[str, object] | None = None,
    *,
    ref_engine: Engine | None = None,
    desc: str | None = None,
) -> RetrainAUC:
    """The forget-vs-holdout AUC of a retrained model (run through `engine`).

    `provenance` says where the model came from (path, revision, hash…); its values are
    stored as strings, together with the corpus's benchmark id.
    """
    check_attack(attack, with_stats=engine.supports_stats, with_ref=ref_engine is not None)
    forget = score_documents(
        engine,
        corpus.privleak_forget,
        [attack],
        ref_engine=ref_engine,
        desc=desc and f"{desc} forget",
    )
    holdout = score_documents(
        engine,
        corpus.privleak_holdout,
        [attack],
        ref_engine=ref_engine,
        desc=desc and f"{desc} holdout",
    )
    prov = {str(k): str(v) for k, v in (provenance or {}).items()}
    prov.setdefault("benchmark", corpus.benchmark_id)
    prov.setdefault("corpus", corpus.name)
    return RetrainAUC(
        auc=split_aucs(forget, holdout, [attack])[attack], attack=attack, provenance=prov
    )
