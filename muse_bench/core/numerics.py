"""Process-wide floating-point settings that change speed (and may change numbers).

Subnormal ("denormal") floats are the tiny values below float32's normal range
(|x| < 1.2e-38). CPUs compute with them tens of times slower than with normal numbers.
A saturated unlearning loss (NPO once log σ is ~0, for example) sends its gradients into
that range, and a `muse run` then spent most of its time there: 30 NPO backward passes of
2.2 s instead of 0.2 s. Flushing subnormals to zero (the CPU's FTZ/DAZ flags) removes the
slowdown; values that small are below anything the optimizer or a metric can resolve, and
the embedded baselines' metrics are unchanged (tests/test_numerics.py).
"""

from __future__ import annotations


def set_flush_denormal(enabled: bool) -> bool:
    """Flush subnormal floats to zero on the CPU for the rest of the process (`enabled`),
    or compute with them exactly (not `enabled`). Returns whether flushing is in effect:
    False when disabled or where the CPU has no such mode."""
    import torch

    supported = torch.set_flush_denormal(enabled)
    return bool(enabled and supported)
