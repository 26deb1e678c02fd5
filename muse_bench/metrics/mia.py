"""Membership-inference attacks on documents and their AUC, in MUSE's orientation.

Every attack score is oriented like MUSE's: a HIGHER score means "LESS likely a member"
(it is a loss-like quantity). The AUC follows MUSE's released code: forget documents are
labelled 0, holdout documents 1 (the positive class), and the ROC curve is computed on the
negated score. A model that memorized the forget set therefore gets an AUC near 0, a model
that never saw it about 0.5.

Attacks (names as used on the command line and in reports):

- `loss`: mean negative log-likelihood of the tokens after BOS.
- `zlib`: loss / length in bytes of the zlib-compressed UTF-8 text.
- `lowercase`: loss(text) / loss(text.lower()).
- `min_k_{K}` for K in 5, 10, 20, 30, 40, 50, 60: minus the mean of the lowest K% token
  log-probs (at least one token; MUSE's `Min-K%`).
- `min_k_plus_plus_{K}`, same K: Min-K%++, the same on (log p - mu) / sigma, where mu and
  sigma are the mean and std of log p under the model's own next-token distribution.
- `ref`: loss under the model / loss under a reference model (needs a reference engine).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

from muse_bench.core.errors import ConfigError, DataError
from muse_bench.core.registry import suggest
from muse_bench.engines.base import Engine, Pending, TokenScores, submit_token_logprobs

MIN_K_PERCENTS = (5, 10, 20, 30, 40, 50, 60)
DEFAULT_ATTACK = "min_k_40"
SEQUENCE_ATTACKS = ("loss", "zlib", "lowercase")
MIN_K_ATTACKS = tuple(f"min_k_{k}" for k in MIN_K_PERCENTS)
MIN_K_PLUS_PLUS_ATTACKS = tuple(f"min_k_plus_plus_{k}" for k in MIN_K_PERCENTS)
REF_ATTACK = "ref"
ALL_ATTACKS = SEQUENCE_ATTACKS + MIN_K_ATTACKS + MIN_K_PLUS_PLUS_ATTACKS + (REF_ATTACK,)

# Guards Min-K%++ against a one-hot next-token distribution (sigma = 0).
_MIN_SIGMA = 1e-12


def check_attack(name: str, *, with_stats: bool = True, with_ref: bool = False) -> str:
    """Return `name` if it is an attack that can run; ConfigError (with did-you-mean) if not."""
    if name not in ALL_ATTACKS:
        raise ConfigError(f"unknown attack '{name}'.{suggest(name, list(ALL_ATTACKS))}")
    if name == REF_ATTACK and not with_ref:
        raise ConfigError("attack 'ref' needs a reference model; pass a reference engine.")
    if name in MIN_K_PLUS_PLUS_ATTACKS and not with_stats:
        raise ConfigError(
            f"attack '{name}' needs the full next-token distribution, which this engine "
            "cannot provide; use --engine hf."
        )
    return name


def available_attacks(*, with_stats: bool = True, with_ref: bool = False) -> list[str]:
    """The attacks that can run given engine statistics and a reference engine."""
    return [
        a
        for a in ALL_ATTACKS
        if (with_stats or a not in MIN_K_PLUS_PLUS_ATTACKS) and (with_ref or a != REF_ATTACK)
    ]


def _k_count(n: int, k: int) -> int:
    """How many tokens form the lowest K% of n (MUSE's int(n * K/100)), at least one."""
    return max(1, n * k // 100)


def loss_score(logprobs: np.ndarray) -> float:
    """Mean negative log-likelihood (NaN when there are no tokens)."""
    return float(-np.mean(logprobs)) if len(logprobs) else float("nan")


def min_k_score(logprobs: np.ndarray, k: int) -> float:
    """Minus the mean of the lowest K% of the token log-probs (NaN when there are none)."""
    if not len(logprobs):
        return float("nan")
    lowest = np.sort(np.asarray(logprobs, dtype=np.float64))[: _k_count(len(logprobs), k)]
    return float(-lowest.mean())


def min_k_plus_plus_score(scores: TokenScores, k: int) -> float:
    """Min-K%++: `min_k_score` of the log-probs standardized by the model's mu and sigma."""
    if not scores.has_stats:
        raise ConfigError("Min-K%++ needs token statistics (token_logprobs with_stats=True).")
    z = (scores.logprobs - scores.mean) / np.maximum(scores.std, _MIN_SIGMA)
    return min_k_score(z, k)


def zlib_score(nll: float, text: str) -> float:
    """Loss divided by the zlib-compressed length of the text in bytes."""
    return nll / len(zlib.compress(text.encode("utf-8")))


def document_scores(
    text: str,
    scores: TokenScores,
    attacks: Sequence[str],
    *,
    lower: TokenScores | None = None,
    ref: TokenScores | None = None,
) -> dict[str, float]:
    """The requested attack scores of one document from its token scores.

    `lower` (scores of `text.lower()`) is needed for `lowercase`, `ref` (scores under the
    reference model) for `ref`.
    """
    nll = loss_score(scores.logprobs)
    out: dict[str, float] = {}
    for attack in attacks:
        if attack == "loss":
            out[attack] = nll
        elif attack == "zlib":
            out[attack] = zlib_score(nll, text)
        elif attack == "lowercase":
            if lower is None:
                raise ConfigError("the lowercase attack needs the scores of the lowercased text.")
            out[attack] = nll / loss_score(lower.logprobs)
        elif attack == REF_ATTACK:
            if ref is None:
                raise ConfigError("attack 'ref' needs a reference model; pass a reference engine.")
            out[attack] = nll / loss_score(ref.logprobs)
        elif attack in MIN_K_ATTACKS:
            out[attack] = min_k_score(scores.logprobs, int(attack.rsplit("_", 1)[1]))
        elif attack in MIN_K_PLUS_PLUS_ATTACKS:
            out[attack] = min_k_plus_plus_score(scores, int(attack.rsplit("_", 1)[1]))
        else:
            check_attack(attack)
    return out


def score_documents(
    engine: Engine,
    texts: Sequence[str],
    attacks: Sequence[str],
    *,
    ref_engine: Engine | None = None,
    desc: str | None = None,
) -> list[dict[str, float]]:
    """Attack scores of every document; runs only the forward passes the attacks need."""
    return submit_documents(engine, texts, attacks, ref_engine=ref_engine, desc=desc).result()


class DocumentScoring:
    """Attack scores of documents whose token scores may still be computing."""

    def __init__(
        self,
        texts: Sequence[str],
        attacks: Sequence[str],
        scores: Pending[list[TokenScores]],
        lower: Pending[list[TokenScores]] | None,
        ref: Pending[list[TokenScores]] | None,
    ) -> None:
        self.texts, self.attacks = list(texts), list(attacks)
        self._parts = (scores, lower, ref)

    def result(self) -> list[dict[str, float]]:
        """Wait for the token scores; one {attack: score} per document, in input order."""
        try:
            scores, lower, ref = (None if p is None else p.result() for p in self._parts)
        except BaseException:
            self.cancel()  # the parts not collected yet
            raise
        return [
            document_scores(
                text,
                s,
                self.attacks,
                lower=lower[i] if lower is not None else None,
                ref=ref[i] if ref is not None else None,
            )
            for i, (text, s) in enumerate(zip(self.texts, scores, strict=True))
        ]

    def cancel(self) -> None:
        """Drop the scoring not yet started (after an error elsewhere)."""
        for part in self._parts:
            getattr(part, "cancel", lambda: None)()


def submit_documents(
    engine: Engine,
    texts: Sequence[str],
    attacks: Sequence[str],
    *,
    ref_engine: Engine | None = None,
    desc: str | None = None,
) -> DocumentScoring:
    """Start the forward passes `attacks` need (in the background where the engine can,
    see `engines.base.submit_token_logprobs`); `.result()` gives `score_documents`'s list."""
    for attack in attacks:
        check_attack(attack, with_stats=engine.supports_stats, with_ref=ref_engine is not None)
    with_stats = any(a in MIN_K_PLUS_PLUS_ATTACKS for a in attacks)

    def label(part: str) -> str | None:
        return None if desc is None else f"{desc} ({part})"

    scores = submit_token_logprobs(engine, texts, with_stats, desc=label("text"))
    lower = ref = None
    if "lowercase" in attacks:
        lower = submit_token_logprobs(engine, [t.lower() for t in texts], desc=label("lowercased"))
    if REF_ATTACK in attacks and ref_engine is not None:
        ref = submit_token_logprobs(ref_engine, texts, desc=label("reference"))
    return DocumentScoring(texts, attacks, scores, lower, ref)


def _checked(values: Sequence[float], split: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        raise DataError(f"the privleak {split} set is empty; an AUC needs both sets.")
    if not np.all(np.isfinite(arr)):
        bad = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise DataError(
            f"privleak {split} document {bad} has no finite attack score (is it empty?)."
        )
    return arr


def mia_auc(forget_scores: Sequence[float], holdout_scores: Sequence[float]) -> float:
    """ROC AUC separating forget (label 0) from holdout (label 1) on the negated score.

    That is `sklearn.metrics.roc_auc_score(labels, -scores)` (the tests check it), computed
    as the Mann-Whitney pair count: the share of (holdout, forget) pairs where the holdout
    document scores lower, ties counting one half. sklearn's input validation alone costs
    8 ms a call, and a report computes 21 attacks' AUCs.
    """
    f = _checked(forget_scores, "forget")
    h = _checked(holdout_scores, "holdout")
    return float(auc_pairs(f, h).mean())


def auc_pairs(forget: np.ndarray, holdout: np.ndarray) -> np.ndarray:
    """The (holdout x forget) matrix whose mean is the MIA AUC: 1 where the holdout
    document scores lower, 1/2 on a tie, 0 otherwise (MUSE's orientation)."""
    return (holdout[:, None] < forget[None, :]) + 0.5 * (holdout[:, None] == forget[None, :])


# ----------------------------------------------------------------------------- GradNorm
# Duan et al. 2024 / open-unlearning's `mia_gradnorm` (SPEC-robustness §3.3). It needs
# gradients, so it runs on the torch model behind the engine, not through `Engine`.

GRADNORM_ATTACK = "gradnorm"
GRADNORM_NORMS = (1, 2, float("inf"))


def mean_gradient_norm(grads: Sequence[object], p: float = 2) -> float:
    """The mean over tensors of each tensor's gradient p-norm (not the global norm)."""
    import torch

    if p not in GRADNORM_NORMS:
        raise ConfigError(f"GradNorm's p must be one of 1, 2, inf, not {p}.")
    norms = [torch.linalg.vector_norm(g.detach().double().flatten(), ord=p) for g in grads]
    if not norms:
        return float("nan")
    return float(torch.stack(norms).mean())


def gradnorm_scores(
    model, tokenizer, texts: Sequence[str], *, p: float = 2, max_length: int = 2048
) -> list[float]:
    """GradNorm score of each text: the mean per-tensor gradient p-norm of the text's mean
    token NLL (the first token has no loss), batch 1.

    Higher = larger gradients = less likely a member, MUSE's orientation of the other
    attacks, so `mia_auc` applies as it is. The model's weights, its existing `.grad`s,
    its `requires_grad` flags and its train/eval mode are left as they were.
    """
    import torch

    params = list(model.parameters())
    device = params[0].device
    saved_grads = [q.grad for q in params]
    saved_flags = [q.requires_grad for q in params]
    was_training = model.training
    limit = min(
        max_length,
        getattr(getattr(model, "config", None), "max_position_embeddings", 0) or max_length,
    )
    scores = []
    try:
        model.eval()
        for q in params:
            q.requires_grad_(True)
        for text in texts:
            ids = list(tokenizer(text)["input_ids"])[:limit]
            if len(ids) < 2:
                scores.append(float("nan"))
                continue
            for q in params:
                q.grad = None
            input_ids = torch.tensor([ids], dtype=torch.long, device=device)
            with torch.enable_grad():
                logits = model(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    position_ids=torch.arange(len(ids), device=device)[None],
                    use_cache=False,
                ).logits
                logp = torch.log_softmax(logits[0, :-1].float(), dim=-1)
                nll = -logp.gather(-1, input_ids[0, 1:, None]).mean()
                nll.backward()
            scores.append(mean_gradient_norm([q.grad for q in params if q.grad is not None], p))
    finally:
        for q, g, flag in zip(params, saved_grads, saved_flags, strict=True):
            q.grad = g
            q.requires_grad_(flag)
        model.train(was_training)
    return scores


def gradnorm_auc(forget_scores: Sequence[float], holdout_scores: Sequence[float]) -> float:
    """open-unlearning's GradNorm AUC: P(score(holdout) > score(forget)), ties 1/2 (forget
    labelled 0, holdout 1, on the raw score). Near 1 when forget texts look like members;
    it is `1 - mia_auc` of the same scores."""
    return 1.0 - mia_auc(forget_scores, holdout_scores)
