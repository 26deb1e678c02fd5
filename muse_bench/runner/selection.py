"""MUSE's model selection: the first candidate whose knowmem_f is at or below the retrain
model's, else the last."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from muse_bench.core.errors import ConfigError


def select_candidate(
    candidates: Iterator,
    score: Callable[[Any], float],
    threshold: float,
    mode: str,
    cached: dict[str, float],
) -> tuple[Any, list[dict[str, Any]]]:
    """MUSE's model selection: the first candidate whose knowmem_f <= threshold, else the last.

    `mode="last"` turns selection off (the last candidate). `cached` maps labels to scores
    already measured (resume); new scores are added to it.
    """
    chosen, curve = None, []
    for cand in candidates:
        value = cached[cand.label] if cand.label in cached else score(cand)
        cached[cand.label] = value
        curve.append({"label": cand.label, "step": cand.step, "knowmem_f": value})
        chosen = cand
        if mode == "first" and value <= threshold:
            break
    if chosen is None:
        raise ConfigError("the unlearner produced no model (zero epochs or an empty sweep?).")
    return chosen, curve
