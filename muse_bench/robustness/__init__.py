"""Robustness checks: attacks on an unlearned model (weight quantization, relearning)
that test whether the forgotten knowledge comes back, and their report section.
See `../shared/SPEC-robustness.md`."""
