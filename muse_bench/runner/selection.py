"""MUSE's model selection: the first candidate whose knowmem_f is at or below the retrain
model's, else the last."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from muse_bench.core.errors import ConfigError


def select_candidate(
    candidates: Iterable,
    score: Callable[[Any], float],
    threshold: float,
    mode: str,
    cached: dict[str, float],
) -> tuple[Any, list[dict[str, Any]], list[dict[str, Any]]]:
    """MUSE's model selection: the first candidate whose knowmem_f <= threshold, else the last.

    `mode="last"` turns selection off (the last candidate). `cached` maps labels to scores
    already measured (resume); new scores are added to it. Returns the chosen candidate, the
    selection curve, and per candidate the seconds spent producing it (`train_s`: training,
    or reloading on resume) and scoring it (`select_eval_s`).
    """
    chosen, curve, timings = None, [], []
    remaining = iter(candidates)
    while True:
        started = time.perf_counter()
        cand = next(remaining, None)  # trains the next epoch (or reloads it on resume)
        if cand is None:
            break
        trained = time.perf_counter()
        value = cached[cand.label] if cand.label in cached else score(cand)
        cached[cand.label] = value
        curve.append({"label": cand.label, "step": cand.step, "knowmem_f": value})
        timings.append(
            {
                "label": cand.label,
                "train_s": round(trained - started, 3),
                "select_eval_s": round(time.perf_counter() - trained, 3),
            }
        )
        chosen = cand
        if mode == "first" and value <= threshold:
            break
    if chosen is None:
        raise ConfigError("the unlearner produced no model (zero epochs or an empty sweep?).")
    return chosen, curve, timings
