"""The training loop: data pairing, schedules, the reference provider, checkpoints, resume,
and the non-finite guard."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from conftest import TRAIN_FORGET, TRAIN_RETAIN, assert_same_params, make_tiny_model, snapshot

from muse_bench.core.errors import ConfigError, TrainingError
from muse_bench.core.models import load_model
from muse_bench.core.types import ForgetRequest
from muse_bench.training.loop import (
    STATE_JSON,
    STATE_TENSORS,
    ReferenceProvider,
    completed_epochs,
    epoch_batches,
    lr_factor,
    token_logprobs,
)
from muse_bench.training.packing import pack_texts, pad_batch
from muse_bench.unlearners import (
    GA,
    NPO_GDR,
    GradientUnlearner,
    UnlearnContext,
    chunk_length,
    token_nll,
)

FORGET, RETAIN = TRAIN_FORGET, TRAIN_RETAIN
REQUEST = ForgetRequest("single", 1, FORGET, RETAIN)


def test_epoch_batches_cover_forget_once_and_cycle_through_retain():
    forget = [torch.tensor([0, i]) for i in range(5)]
    retain = [torch.tensor([0, 100 + i, 7]) for i in range(3)]
    partners = []
    for epoch in (1, 2, 3):
        batches = epoch_batches(forget, retain, epoch, seed=0, batch_size=2, pad_id=9)
        assert [len(f["index"]) for f, _ in batches] == [2, 2, 1]
        seen = torch.cat([f["index"] for f, _ in batches]).tolist()
        assert sorted(seen) == list(range(5))  # every forget chunk once per epoch
        for f, r in batches:
            assert torch.equal(f["input_ids"][:, 1], f["index"])  # index names the chunk
            assert r["input_ids"].shape == (len(f["index"]), 3)
            partners += (r["input_ids"][:, 1] - 100).tolist()
    # 15 pairings over 3 retain chunks: the retain set is cycled, each used 5 times.
    assert sorted(partners) == [0] * 5 + [1] * 5 + [2] * 5
    again = epoch_batches(forget, retain, 2, seed=0, batch_size=2, pad_id=9)
    first = epoch_batches(forget, retain, 1, seed=0, batch_size=2, pad_id=9)
    other = epoch_batches(forget, retain, 2, seed=1, batch_size=2, pad_id=9)

    def order(batches):
        return torch.cat([f["index"] for f, _ in batches]).tolist()

    assert order(again) == order(epoch_batches(forget, retain, 2, 0, 2, 9))  # deterministic
    assert len({tuple(order(first)), tuple(order(again)), tuple(order(other))}) > 1
    assert all(r is None for _, r in epoch_batches(forget, [], 1, 0, 2, 9))


def test_lr_factor_matches_the_transformers_schedules():
    assert lr_factor("constant", 0, 0, 10) == 1.0
    assert lr_factor("constant", 1, 4, 10) == 0.25  # warmup
    assert lr_factor("linear", 4, 4, 12) == 1.0
    assert lr_factor("linear", 8, 4, 12) == 0.5
    assert lr_factor("linear", 12, 4, 12) == 0.0
    assert lr_factor("cosine", 5, 0, 10) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown lr_scheduler"):
        lr_factor("step", 0, 0, 10)


def test_token_logprobs_ignore_padding(tiny_tokenizer, tiny_model):
    chunks = pack_texts(FORGET, tiny_tokenizer, 12)
    batch = pad_batch(chunks, tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        logp, mask = token_logprobs(tiny_model, batch)
        alone, _ = token_logprobs(tiny_model, pad_batch(chunks[-1:], tiny_tokenizer.pad_token_id))
    assert mask.sum().item() == sum(len(c) - 1 for c in chunks)
    assert (logp[~mask] == 0).all() and (logp[mask] < 0).all()
    # Right padding does not change the real tokens' log-probs.
    n = len(chunks[-1]) - 1
    assert torch.allclose(logp[-1, :n], alone[0], atol=1e-5)


def test_reference_provider_caches_the_original_model(tiny_tokenizer, tiny_model):
    chunks = pack_texts(FORGET, tiny_tokenizer, 12)
    pad = tiny_tokenizer.pad_token_id
    ref = ReferenceProvider.build(
        tiny_model, chunks, pad, logprobs=True, keep_model=True, batch_size=2
    )
    batch = pad_batch([chunks[2], chunks[0]], pad)
    batch["index"] = torch.tensor([2, 0])
    with torch.no_grad():
        expected = token_logprobs(tiny_model, batch)[0].sum(-1)
        logits = tiny_model(input_ids=batch["input_ids"]).logits
        for p in tiny_model.parameters():
            p.add_(0.5)  # training moves the model; the reference must not move with it
    assert torch.allclose(ref.forget_logprob(batch), expected, atol=1e-5)
    assert torch.allclose(ref.logits(batch), logits, atol=1e-5)
    frozen = ReferenceProvider()
    with pytest.raises(RuntimeError, match="needs_ref_logprobs"):
        frozen.forget_logprob(batch)
    with pytest.raises(RuntimeError, match="needs_ref_model"):
        frozen.logits(batch)


def run_npo_gdr(tokenizer, work_dir, stop_after=None):
    """NPO_GDR (retain set + cached reference) with grad accumulation and a schedule."""
    model = make_tiny_model(tokenizer, seed=3)
    algo = NPO_GDR(
        lr=3e-3, epochs=3, batch_size=2, grad_accum=2, lr_scheduler="linear", warmup_steps=1
    )
    ctx = UnlearnContext(seed=5, work_dir=work_dir, max_len=12)
    seen = []
    gen = algo.candidates(model, tokenizer, REQUEST, ctx)
    for cand in gen:
        seen.append((cand.label, cand.path, snapshot(cand.model)))
        if stop_after is not None and len(seen) == stop_after:
            gen.close()  # the runner stopped consuming: an interrupted run
            break
    return model, seen


def test_resume_after_interruption_gives_identical_params(tiny_tokenizer, tmp_path):
    _, straight = run_npo_gdr(tiny_tokenizer, tmp_path / "straight")
    _, first = run_npo_gdr(tiny_tokenizer, tmp_path / "resumed", stop_after=1)
    assert completed_epochs(tmp_path / "resumed") == [1]
    model, resumed = run_npo_gdr(tiny_tokenizer, tmp_path / "resumed")

    assert [label for label, _, _ in resumed] == ["epoch_1", "epoch_2", "epoch_3"]
    assert resumed[0][1] == tmp_path / "resumed" / "epoch_1"  # replayed from disk
    for (_, _, a), (_, _, b) in zip(straight, resumed, strict=True):
        assert_same_params(a, b)
    assert_same_params(first[0][2], straight[0][2])
    # The epochs really trained: each differs from the one before.
    assert not torch.equal(straight[1][2]["model.norm.weight"], straight[2][2]["model.norm.weight"])

    # A finished run is loaded, not retrained: unlearn() returns the last epoch.
    fresh = make_tiny_model(tiny_tokenizer, seed=3)
    algo = NPO_GDR(
        lr=3e-3, epochs=3, batch_size=2, grad_accum=2, lr_scheduler="linear", warmup_steps=1
    )
    ctx = UnlearnContext(seed=5, work_dir=tmp_path / "straight", max_len=12)
    assert_same_params(snapshot(algo.unlearn(fresh, tiny_tokenizer, REQUEST, ctx)), straight[2][2])


def test_checkpoints_are_complete_model_directories(tiny_tokenizer, tmp_path):
    model = make_tiny_model(tiny_tokenizer)
    ctx = UnlearnContext(work_dir=tmp_path, max_len=12)
    cands = []
    for cand in GA(lr=1e-3, epochs=2, batch_size=2).candidates(model, tiny_tokenizer, REQUEST, ctx):
        cands.append((cand, snapshot(cand.model)))
    assert [(c.label, c.step, c.path) for c, _ in cands] == [
        ("epoch_1", 1.0, tmp_path / "epoch_1"),
        ("epoch_2", 2.0, tmp_path / "epoch_2"),
    ]
    for cand, params in cands:
        assert (cand.path / "model.safetensors").is_file()
        assert (cand.path / STATE_JSON).is_file()
        assert_same_params(snapshot(load_model(cand.path)), params)
    # Optimizer moments are kept only where a resume would start: the latest epoch.
    assert not (tmp_path / "epoch_1" / STATE_TENSORS).exists()
    assert (tmp_path / "epoch_2" / STATE_TENSORS).is_file()
    assert not any(p.suffix == ".bin" or p.suffix == ".pt" for p in tmp_path.rglob("*"))


def test_changed_settings_refuse_to_resume(tiny_tokenizer, tmp_path):
    ctx = UnlearnContext(work_dir=tmp_path, max_len=12)
    GA(lr=1e-3, epochs=1).unlearn(make_tiny_model(tiny_tokenizer), tiny_tokenizer, REQUEST, ctx)
    with pytest.raises(ConfigError, match=r"different run \(lr 0.001 -> 0.002 differ"):
        GA(lr=2e-3, epochs=1).unlearn(make_tiny_model(tiny_tokenizer), tiny_tokenizer, REQUEST, ctx)
    other = ForgetRequest("single", 1, RETAIN, FORGET)
    with pytest.raises(ConfigError, match="forget data differ"):
        GA(lr=1e-3, epochs=1).unlearn(make_tiny_model(tiny_tokenizer), tiny_tokenizer, other, ctx)


@dataclass(kw_only=True)
class ExplodesLater(GradientUnlearner):
    """GA whose loss turns NaN after `good_steps` micro-batches."""

    good_steps: int = 2
    calls: ClassVar[list[int]] = []

    def loss(self, model, forget, retain, ref):
        self.calls.append(1)
        loss = -token_nll(model, forget)
        return loss * math.nan if len(self.calls) > self.good_steps else loss


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_tokenizer, tmp_path):
    ExplodesLater.calls.clear()
    model = make_tiny_model(tiny_tokenizer)
    ctx = UnlearnContext(work_dir=tmp_path, max_len=12)
    per_epoch = math.ceil(len(pack_texts(FORGET, tiny_tokenizer, 12)) / 2)
    # Finite for exactly one epoch of micro-batches, then NaN: epoch 2 step 1.
    algo = ExplodesLater(lr=1e-3, epochs=3, batch_size=2, good_steps=per_epoch)
    labels = []
    with pytest.raises(TrainingError) as info:
        for cand in algo.candidates(model, tiny_tokenizer, REQUEST, ctx):
            labels.append(cand.label)
    message = str(info.value)
    assert labels == ["epoch_1"]
    assert "loss became non-finite at epoch 2 step 1" in message
    assert f"last good checkpoint: {tmp_path / 'epoch_1'}" in message
    assert "lower the learning rate" in message
    assert completed_epochs(tmp_path) == [1]
    assert (tmp_path / "epoch_1" / STATE_TENSORS).is_file()  # still resumable
    reloaded = load_model(tmp_path / "epoch_1")
    assert all(torch.isfinite(p).all() for p in reloaded.parameters())


def test_non_finite_in_first_epoch_says_no_checkpoint(tiny_tokenizer):
    ExplodesLater.calls.clear()
    algo = ExplodesLater(lr=1e-3, epochs=1, good_steps=0)
    with pytest.raises(TrainingError, match=r"epoch 1 step 1; last good checkpoint: none"):
        algo.unlearn(
            make_tiny_model(tiny_tokenizer), tiny_tokenizer, REQUEST, UnlearnContext(max_len=12)
        )


def test_chunk_length_prefers_hyperparameter_then_context_then_model(tiny_model):
    assert chunk_length(tiny_model, 64, UnlearnContext(max_len=128)) == 64
    assert chunk_length(tiny_model, None, UnlearnContext(max_len=128)) == 128
    # MUSE's 2048, capped at what the model can attend to (512 for the tiny model).
    assert chunk_length(tiny_model, None, UnlearnContext()) == 512
    assert chunk_length(torch.nn.Linear(2, 2), None, UnlearnContext()) == 2048


def test_empty_forget_or_missing_retain_is_a_config_error(tiny_tokenizer, tiny_model):
    ctx = UnlearnContext(max_len=12)
    with pytest.raises(ConfigError, match="forget set is empty"):
        GA().unlearn(tiny_model, tiny_tokenizer, ForgetRequest("single", 1, (), RETAIN), ctx)
    with pytest.raises(ConfigError, match="retain set is empty"):
        NPO_GDR().unlearn(tiny_model, tiny_tokenizer, ForgetRequest("single", 1, FORGET, ()), ctx)
