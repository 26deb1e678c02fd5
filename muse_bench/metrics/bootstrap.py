"""Seeded percentile-bootstrap confidence intervals for the reported metrics (numpy only)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from muse_bench.metrics.mia import auc_pairs
from muse_bench.metrics.privleak import privleak

DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.95


def _percentiles(stats: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(stats, [tail, 100 - tail])
    return float(lo), float(hi)


def _check(n_resamples: int, level: float) -> None:
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, not {n_resamples}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), not {level}")


def bootstrap_mean_ci(
    scores: Sequence[float],
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int | Sequence[int] = 0,
    level: float = DEFAULT_LEVEL,
) -> tuple[float, float]:
    """Percentile-bootstrap CI of the mean of per-example scores (same scale as the scores).

    Resample i draws `rng.integers(0, n, n)` with `rng = np.random.default_rng(seed)`.
    """
    _check(n_resamples, level)
    x = np.asarray(scores, dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_resamples, x.size))
    return _percentiles(x[idx].mean(axis=1), level)


def _counts(idx: np.ndarray, n: int) -> np.ndarray:
    """Row-wise occurrence counts of `idx` (resamples x draws) over range(n)."""
    rows = idx.shape[0]
    flat = (idx + n * np.arange(rows)[:, None]).ravel()
    return np.bincount(flat, minlength=rows * n).reshape(rows, n).astype(np.float64)


def bootstrap_auc(
    forget_scores: Sequence[float],
    holdout_scores: Sequence[float],
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int | Sequence[int] = 0,
) -> np.ndarray:
    """The MIA AUC (MUSE orientation) of each bootstrap resample of both document sets.

    Forget and holdout documents are resampled independently: with
    `rng = np.random.default_rng(seed)`, first `rng.integers(0, n_forget, (R, n_forget))`,
    then `rng.integers(0, n_holdout, (R, n_holdout))`.
    """
    f = np.asarray(forget_scores, dtype=np.float64)
    h = np.asarray(holdout_scores, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx_f = rng.integers(0, f.size, size=(n_resamples, f.size))
    idx_h = rng.integers(0, h.size, size=(n_resamples, h.size))
    # AUC = P(holdout scores lower than forget) + ½ P(tie), as roc_auc_score(y, -score)
    # with holdout positive. A resample's AUC is the count-weighted mean of this pair matrix.
    pair = auc_pairs(f, h)
    weighted = _counts(idx_h, h.size) @ pair
    return (weighted * _counts(idx_f, f.size)).sum(axis=1) / (f.size * h.size)


def bootstrap_privleak_ci(
    forget_scores: Sequence[float],
    holdout_scores: Sequence[float],
    auc_retrain: float,
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int | Sequence[int] = 0,
    level: float = DEFAULT_LEVEL,
) -> tuple[float, float]:
    """Percentile-bootstrap CI of privleak: documents resampled, the retrain AUC held fixed."""
    _check(n_resamples, level)
    aucs = bootstrap_auc(forget_scores, holdout_scores, n_resamples=n_resamples, seed=seed)
    return _percentiles(privleak(aucs, auc_retrain), level)
