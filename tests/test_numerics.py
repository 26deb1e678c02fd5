"""Subnormal floats are flushed to zero wherever the harness trains or evaluates on CPU:
a saturated loss no longer slows a step, and the numbers do not change."""

from __future__ import annotations

import statistics
import time

import pytest
import torch
from conftest import invoke_cli

from muse_bench.core.numerics import set_flush_denormal
from muse_bench.unlearners.losses import npo_loss, sequence_logprob

SMALLEST_NORMAL = torch.finfo(torch.float32).tiny  # 1.18e-38


@pytest.fixture()
def flush_state():
    """Leave the process with flushing on (the harness default) after each test."""
    yield
    set_flush_denormal(True)


def test_flushing_turns_subnormals_into_zero(flush_state):
    x = torch.tensor([SMALLEST_NORMAL])
    if not set_flush_denormal(True):
        pytest.skip("this CPU has no flush-to-zero mode")
    assert (x / 4).item() == 0.0
    assert set_flush_denormal(False) is False
    assert 0.0 < (x / 4).item() < SMALLEST_NORMAL


def _embedded_size_model():
    """A random model of the embedded benchmark's shape (2.2M parameters)."""
    from muse_bench.tasks.refmodels import ModelRecipe, make_model

    recipe = ModelRecipe()

    class _Vocab:  # make_model reads only the size and the special ids of a tokenizer
        bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

        def __len__(self) -> int:
            return recipe.vocab_size

    return make_model(recipe, _Vocab())


def _npo_step_seconds(model, batch, log_ratio: float) -> float:
    """One NPO forward+backward where log p_θ − log p_ref = −`log_ratio`. With a large
    ratio the loss is saturated (log σ(β·ratio) ≈ −e^(−β·ratio)) and its gradients are
    subnormal, as in NPO's later epochs."""
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    logprob = sequence_logprob(model, batch)
    loss = npo_loss(logprob, logprob.detach() + log_ratio, beta=0.1)
    loss.backward()
    return time.perf_counter() - start


def test_saturated_npo_gradients_are_subnormal_without_flushing(flush_state):
    """The mechanism: at log-ratio 1000 (β·ratio = 100) every gradient is below the
    smallest normal float (and not all zero) when subnormals are kept; flushed, they are 0."""
    model = _embedded_size_model()
    ids = torch.randint(3, 2048, (2, 32))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    set_flush_denormal(False)
    _npo_step_seconds(model, batch, 1000.0)
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert grads.abs().max() < SMALLEST_NORMAL and grads.abs().max() > 0
    if not set_flush_denormal(True):
        pytest.skip("this CPU has no flush-to-zero mode")
    _npo_step_seconds(model, batch, 1000.0)
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert grads.abs().max() == 0


def test_a_saturated_loss_no_longer_slows_a_step(flush_state):
    """With flushing on (the default), a saturated NPO step costs about what an
    unsaturated one does. Measured here without flushing it is ~10-30x (see
    benchmarks/bench_run.py); the bound leaves room for a loaded machine."""
    if not set_flush_denormal(True):
        pytest.skip("this CPU has no flush-to-zero mode")
    model = _embedded_size_model()
    ids = torch.randint(3, 2048, (4, 256))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    _npo_step_seconds(model, batch, 0.0)  # warm-up
    normal, saturated = [], []
    for _ in range(3):  # interleaved, so a load spike hits both
        normal.append(_npo_step_seconds(model, batch, 0.0))
        saturated.append(_npo_step_seconds(model, batch, 1000.0))
    ratio = statistics.median(saturated) / statistics.median(normal)
    assert ratio < 2.5, f"saturated step {ratio:.1f}x an unsaturated one"


def test_training_with_and_without_flushing_ends_at_the_same_weights(tiny_tokenizer, flush_state):
    """NPO run into saturation on a tiny model: the weights with subnormals flushed equal
    those computed exactly within 1e-6 (a flushed gradient is below anything AdamW's
    update can express)."""
    from conftest import make_tiny_model

    from muse_bench.core.types import ForgetRequest
    from muse_bench.unlearners import NPO, UnlearnContext

    forget = ("The harbour of Velmora opened in 1871. Its first master was Ada Quell.",) * 4
    retain = ("Kestrel Bank reported a profit of 41 million crowns in the spring.",) * 4
    request = ForgetRequest("single", 1, forget, retain)
    weights = {}
    for flush in (False, True):
        set_flush_denormal(flush)
        torch.manual_seed(0)
        model = make_tiny_model(tiny_tokenizer, seed=3)
        npo = NPO(lr=0.5, epochs=6, batch_size=2, max_len=32, beta=0.1)
        ctx = UnlearnContext(device="cpu", seed=0, work_dir=None, progress=False)
        *_, last = npo.candidates(model, tiny_tokenizer, request, ctx)
        weights[flush] = {k: v.detach().clone() for k, v in last.model.state_dict().items()}
    # the run went through saturation: β·(log p_θ − log p_ref) fell below −87, where
    # σ(β·Δ), the scale of every gradient, is below the smallest normal float (1.2e-38)
    reference = make_tiny_model(tiny_tokenizer, seed=3)
    ids = torch.tensor([tiny_tokenizer(forget[0])["input_ids"]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    with torch.no_grad():
        gap = sequence_logprob(last.model, batch) - sequence_logprob(reference, batch)
    assert 0.1 * gap.item() < -87
    for name, exact in weights[False].items():
        assert torch.allclose(weights[True][name], exact, atol=1e-6, rtol=0), name


def test_the_report_records_the_setting(tmp_path, flush_state):
    """`--keep-denormal` is a setting that can change numbers: recorded in the report and
    part of the run's identity (its own run id)."""
    from conftest import write_mini_benchmark

    data, target, retrain = write_mini_benchmark(tmp_path / "bench")
    common = ["--corpus", "news", "--source", str(data), "--target", str(target)]
    common += ["--retrain", str(retrain), "--out", str(tmp_path / "runs"), "--quiet"]
    reports = {}
    for flag in ("--flush-denormal", "--keep-denormal"):
        code, out, err = invoke_cli(["eval", "--model", "target", *common, flag])
        assert code == 0, err
        reports[flag] = out.strip().splitlines()[-1].split("report: ")[-1]
    import json
    from pathlib import Path

    on, off = (json.loads(Path(reports[f]).read_text()) for f in reports)
    assert off["numerics"] == {"flush_denormal": False}
    assert on["numerics"]["flush_denormal"] in (True, False)  # False only without CPU support
    assert on["run_id"] != off["run_id"]
