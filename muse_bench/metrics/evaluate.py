"""The four MUSE numbers of one model (verbmem_f, knowmem_f, privleak, knowmem_r), with CIs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from muse_bench.core.errors import ConfigError
from muse_bench.core.types import Corpus, RetrainAUC
from muse_bench.engines.base import Engine
from muse_bench.metrics.bootstrap import (
    DEFAULT_LEVEL,
    DEFAULT_RESAMPLES,
    bootstrap_mean_ci,
    bootstrap_privleak_ci,
)
from muse_bench.metrics.extraction import engine_model, eval_extraction
from muse_bench.metrics.knowmem import eval_knowmem
from muse_bench.metrics.mia import (
    DEFAULT_ATTACK,
    GRADNORM_ATTACK,
    available_attacks,
    check_attack,
    gradnorm_auc,
    gradnorm_scores,
    mia_auc,
    submit_documents,
)
from muse_bench.metrics.privleak import privleak, split_aucs
from muse_bench.metrics.verbmem import eval_verbmem

#: The reported metrics, in MUSE's order of evaluation.
METRICS = ("verbmem_f", "privleak", "knowmem_f", "knowmem_r")


@dataclass(frozen=True)
class EvalResult:
    """One model's evaluation.

    - `metrics`: {verbmem_f, knowmem_f, privleak, knowmem_r} on the 0–100 scale.
    - `ci`: {metric: [lo, hi]}, the seeded percentile-bootstrap 95% interval.
    - `attacks`: {attack: {"auc": …}} for every attack the engine supports; the attack
      the retrain AUC was computed with (the one privleak uses) also has "privleak",
      the others do not, since privleak compares AUCs of the same attack only.
    - `attack`, `retrain_auc`, `n_bootstrap`, `seed`: the settings the numbers depend on.
    - `extra`: the metrics beyond MUSE's four (SPEC-robustness §3): `es_f` and `em_f`,
      extraction strength and exact memorization on the verbmem forget items (×100), and
      their `ci`, and `gradnorm`, the GradNorm MIA's AUC in MUSE's orientation (`auc`, like
      `attacks`) and in open-unlearning's (`auc_ou` = 1 - auc); empty when the engine has
      no torch model behind it (vllm). GradNorm needs gradients, so it is not one of the
      `--attack` choices for privleak.
    - `examples`: per-example records; "verbmem_f", "knowmem_f", "knowmem_r" as returned
      by the metric functions (scores ×100), "privleak" one record per document with
      its split ("forget" or "holdout"), its index in that split and every attack score.
    """

    metrics: dict[str, float]
    ci: dict[str, list[float]]
    attacks: dict[str, dict[str, float]]
    examples: dict[str, list[dict[str, Any]]]
    attack: str
    retrain_auc: RetrainAUC
    n_bootstrap: int
    seed: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy (non-finite numbers become None)."""
        return _jsonable(
            {
                "metrics": self.metrics,
                "ci": self.ci,
                "attack": self.attack,
                "retrain_auc": {
                    "auc": self.retrain_auc.auc,
                    "attack": self.retrain_auc.attack,
                    "provenance": self.retrain_auc.provenance,
                },
                "attacks": self.attacks,
                "bootstrap": {
                    "n_resamples": self.n_bootstrap,
                    "seed": self.seed,
                    "level": DEFAULT_LEVEL,
                },
                "extra": self.extra,
                "examples": self.examples,
            }
        )


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def evaluate(
    engine: Engine,
    corpus: Corpus,
    retrain_auc: RetrainAUC,
    *,
    attack: str = DEFAULT_ATTACK,
    ref_engine: Engine | None = None,
    seed: int = 0,
    n_bootstrap: int = DEFAULT_RESAMPLES,
    progress: bool = True,
) -> EvalResult:
    """Evaluate a model on a corpus as MUSE does (SPEC §3) and report all MIA attacks.

    `retrain_auc` must have been computed with the same `attack`; privleak is relative
    to it. Min-K%++ attacks are skipped on engines without token statistics, `ref` unless
    `ref_engine` is given.
    """
    check_attack(attack, with_stats=engine.supports_stats, with_ref=ref_engine is not None)
    if retrain_auc.attack != attack:
        raise ConfigError(
            f"the retrain AUC was computed with attack '{retrain_auc.attack}' but privleak "
            f"uses '{attack}'; recompute the retrain AUC with '{attack}'."
        )
    privleak(0.5, retrain_auc.auc)  # reject an unusable retrain AUC before the long run

    def desc(label: str) -> str | None:
        return label if progress else None

    attacks = available_attacks(with_stats=engine.supports_stats, with_ref=ref_engine is not None)
    # Scoring starts first: engines that can score in the background (hf on CPU) do so
    # while this thread generates.
    pending = [
        submit_documents(engine, texts, attacks, ref_engine=ref_engine, desc=desc(label))
        for texts, label in (
            (corpus.privleak_forget, "privleak forget"),
            (corpus.privleak_holdout, "privleak holdout"),
        )
    ]
    try:
        verbmem = eval_verbmem(engine, corpus.verbmem_forget, desc=desc("verbmem_f"))
        knowmem_f = eval_knowmem(
            engine, corpus.forget_qa, corpus.forget_qa_icl, desc=desc("knowmem_f")
        )
        knowmem_r = eval_knowmem(
            engine, corpus.retain_qa, corpus.retain_qa_icl, desc=desc("knowmem_r")
        )
        extraction = eval_extraction(engine, corpus.verbmem_forget)
        forget, holdout = (p.result() for p in pending)
    except BaseException:
        for p in pending:  # the scoring not started yet is no longer wanted
            p.cancel()
        raise
    aucs = split_aucs(forget, holdout, attacks)

    metrics = {
        "verbmem_f": verbmem.value,
        "privleak": privleak(aucs[attack], retrain_auc.auc),
        "knowmem_f": knowmem_f.value,
        "knowmem_r": knowmem_r.value,
    }
    ci = {
        name: list(bootstrap_mean_ci(result.scores, n_resamples=n_bootstrap, seed=[seed, i]))
        for i, (name, result) in enumerate(
            (("verbmem_f", verbmem), ("knowmem_f", knowmem_f), ("knowmem_r", knowmem_r))
        )
    }
    ci["privleak"] = list(
        bootstrap_privleak_ci(
            [d[attack] for d in forget],
            [d[attack] for d in holdout],
            retrain_auc.auc,
            n_resamples=n_bootstrap,
            seed=[seed, 3],
        )
    )
    attack_table: dict[str, dict[str, float]] = {}
    for name, auc in aucs.items():
        attack_table[name] = {"auc": auc}
        if name == retrain_auc.attack:
            attack_table[name]["privleak"] = privleak(auc, retrain_auc.auc)
    extra: dict[str, Any] = {}
    model = engine_model(engine)
    if model is not None:  # GradNorm needs gradients: after the scoring, on the model itself
        grads = [
            gradnorm_scores(model, engine.tokenizer, texts)
            for texts in (corpus.privleak_forget, corpus.privleak_holdout)
        ]
        extra[GRADNORM_ATTACK] = {"auc": mia_auc(*grads), "auc_ou": gradnorm_auc(*grads)}
        for split, scores in zip((forget, holdout), grads, strict=True):
            for doc, score in zip(split, scores, strict=True):
                doc[GRADNORM_ATTACK] = score
    if extraction is not None:
        extra |= {
            "es_f": extraction.es,
            "em_f": extraction.em,
            "ci": {
                name: list(bootstrap_mean_ci(scores, n_resamples=n_bootstrap, seed=[seed, i]))
                for name, scores, i in (
                    ("es_f", extraction.es_scores, 4),
                    ("em_f", extraction.em_scores, 5),
                )
            },
        }
    documents = [
        {"split": split, "id": i, **scores}
        for split, docs in (("forget", forget), ("holdout", holdout))
        for i, scores in enumerate(docs)
    ]
    return EvalResult(
        metrics=metrics,
        ci={m: ci[m] for m in METRICS},
        attacks=attack_table,
        examples={
            "verbmem_f": verbmem.records,
            "knowmem_f": knowmem_f.records,
            "knowmem_r": knowmem_r.records,
            "privleak": documents,
            **({"extraction": extraction.records} if extraction is not None else {}),
        },
        attack=attack,
        retrain_auc=retrain_auc,
        n_bootstrap=n_bootstrap,
        seed=seed,
        extra=extra,
    )


def evaluate_knowmem_f(engine: Engine, corpus: Corpus, *, progress: bool = False) -> float:
    """knowmem_f alone (0–100), the cheap number MUSE's model selection compares."""
    desc = "knowmem_f" if progress else None
    return eval_knowmem(engine, corpus.forget_qa, corpus.forget_qa_icl, desc=desc).value
