"""The numbers a robustness check derives from the attacked models' metrics
(SPEC-robustness §1.2 b-d, §2.2, §5). Metrics are on the report's scale (×100); a
missing or non-finite metric gives None, as does a ratio with a zero denominator."""

from __future__ import annotations

import math
from collections.abc import Mapping

METRICS = ("verbmem_f", "privleak", "knowmem_f", "knowmem_r")
FORGET_METRICS = ("verbmem_f", "knowmem_f")
#: A method is quantization-fragile when its 4-bit recovery exceeds the retrain model's
#: ratio by more than this on VerbMem_f or KnowMem_f (harness choice, SPEC §1.2).
FRAGILE_MARGIN = 0.10

Metrics = Mapping[str, float | None]


def _num(x: float | None) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def diff(a: float | None, b: float | None) -> float | None:
    """a - b (None if either is missing)."""
    a, b = _num(a), _num(b)
    return None if a is None or b is None else a - b


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b (None if either is missing or b is 0: SPEC's NaN)."""
    a, b = _num(a), _num(b)
    return None if a is None or b is None or b == 0 else a / b


def r_score(delta_unl: float | None, delta_ret: float | None) -> float | None:
    """Relearning robustness R = 1 - |du - dr| / (|du| + |dr|); 1 when both are 0."""
    du, dr = _num(delta_unl), _num(delta_ret)
    if du is None or dr is None:
        return None
    if du == 0 and dr == 0:
        return 1.0
    return 1.0 - abs(du - dr) / (abs(du) + abs(dr))


def q_score(before: float | None, after: float | None) -> float | None:
    """Quantization robustness Q = 1 - |after - before| / (|before| + |after|) (§5)."""
    return r_score(after, before) if after is not None else None


def quant_numbers(
    unl_before: Metrics, unl_after: Metrics, target_after: Metrics, retrain_after: Metrics
) -> dict[str, object]:
    """quant_gap per metric, recovery and the retrain's ratio on the forget metrics, and
    whether the method is quantization-fragile."""
    recovery = {m: ratio(unl_after.get(m), target_after.get(m)) for m in FORGET_METRICS}
    retrain_ratio = {m: ratio(retrain_after.get(m), target_after.get(m)) for m in FORGET_METRICS}
    excess = [diff(recovery[m], retrain_ratio[m]) for m in FORGET_METRICS]
    return {
        "quant_gap": {m: diff(unl_after.get(m), unl_before.get(m)) for m in METRICS},
        "recovery": recovery,
        "retrain_ratio": retrain_ratio,
        "fragile": any(e is not None and e > FRAGILE_MARGIN for e in excess),
        "Q": {m: q_score(unl_before.get(m), unl_after.get(m)) for m in METRICS},
    }


def relearn_numbers(
    unl_before: Metrics,
    unl_after: Metrics,
    retrain_before: Metrics,
    retrain_after: Metrics,
    target_before: Metrics,
) -> dict[str, object]:
    """delta_unl, delta_ret, relearn_gap and R per metric, and recovery on the forget
    metrics (the attacked unlearned model against the target before any attack)."""
    delta_unl = {m: diff(unl_after.get(m), unl_before.get(m)) for m in METRICS}
    delta_ret = {m: diff(retrain_after.get(m), retrain_before.get(m)) for m in METRICS}
    return {
        "delta_unl": delta_unl,
        "delta_ret": delta_ret,
        "relearn_gap": {m: diff(unl_after.get(m), retrain_after.get(m)) for m in METRICS},
        "R": {m: r_score(delta_unl[m], delta_ret[m]) for m in METRICS},
        "recovery": {m: ratio(unl_after.get(m), target_before.get(m)) for m in FORGET_METRICS},
    }
