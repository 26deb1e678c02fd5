"""Memory options of the gradient unlearners: LoRA, gradient checkpointing, bf16 autocast,
and cached top-k reference distributions for the KL regularizer."""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch
from conftest import make_tiny_model, snapshot

from muse_bench.core.errors import ConfigError
from muse_bench.core.models import load_model, save_model
from muse_bench.core.types import ForgetRequest
from muse_bench.training.loop import (
    LLAMA_LORA_TARGETS,
    STATE_TENSORS,
    ReferenceProvider,
    enable_gradient_checkpointing,
    resolve_mixed_precision,
)
from muse_bench.training.packing import pack_texts, pad_batch
from muse_bench.unlearners import (
    GA,
    GA_KLR,
    NPO,
    UnlearnContext,
    kl_divergence,
    reference_kl,
    token_nll,
)
from muse_bench.unlearners.losses import topk_kl_divergence

FORGET = (
    "The harbour of Velmora opened in 1871. Its first master was Ada Quell.",
    "Kestrel Bank reported a profit of 41 million crowns in the spring.",
    "Question: In which year did the bridge open?\nAnswer: 1902",
)
RETAIN = (
    "The council of Dunmere voted 7 to 2 to close the old mill on the river.",
    "Question: Who founded the Orrin Guild?\nAnswer: Tamsin Vey",
)
REQUEST = ForgetRequest("single", 1, FORGET, RETAIN)
CTX = UnlearnContext(max_len=16)


def is_adapted(key: str) -> bool:
    return any(f".{name}." in key for name in LLAMA_LORA_TARGETS)


# ------------------------------------------------------------------------------- LoRA


@dataclass(kw_only=True)
class WatchedGA(GA):
    """GA that records, at every loss call, what trains and whether base weights moved."""

    seen: ClassVar[list[dict]] = []
    start: ClassVar[dict[str, torch.Tensor]] = {}

    def loss(self, model, forget, retain, ref):
        named = dict(model.named_parameters())
        moved = [
            n
            for n, p in named.items()
            if "lora_" not in n and not torch.equal(p, self.start[n.replace(".base_layer", "")])
        ]
        WatchedGA.seen.append(
            {
                "trainable": sorted(n for n, p in named.items() if p.requires_grad),
                "frozen": sorted(n for n, p in named.items() if not p.requires_grad),
                "base_moved": moved,
            }
        )
        return super().loss(model, forget, retain, ref)


def test_lora_trains_only_adapters_and_yields_merged_plain_models(tiny_tokenizer, tmp_path):
    model = make_tiny_model(tiny_tokenizer, hidden=32, layers=2)
    start = snapshot(model)
    WatchedGA.seen.clear()
    WatchedGA.start = {n: p.detach().clone() for n, p in model.named_parameters()}
    algo = WatchedGA(lr=1e-2, epochs=2, batch_size=2, lora_rank=4, lora_alpha=8.0)
    ctx = UnlearnContext(max_len=16, work_dir=tmp_path)
    cands = []
    for cand in algo.candidates(model, tiny_tokenizer, REQUEST, ctx):
        # The candidate is a plain model: no adapter modules, the original state-dict keys.
        assert snapshot(cand.model).keys() == start.keys()
        assert not any("lora" in type(m).__name__.lower() for m in cand.model.modules())
        cands.append((cand, snapshot(cand.model)))

    # During training only adapter weights require grad, and the base weights never move.
    assert len(WatchedGA.seen) >= 4
    for seen in WatchedGA.seen:
        assert seen["trainable"] and all("lora_" in n for n in seen["trainable"])
        assert not any("lora_" in n for n in seen["frozen"])
        assert seen["base_moved"] == []
    # Afterwards the model's parameters train again, as before the run.
    assert all(p.requires_grad for p in model.parameters())

    (first, s1), (last, s2) = cands
    for key in start:
        if is_adapted(key):
            assert not torch.equal(s2[key], start[key]), f"{key} was not merged"
            assert not torch.equal(s1[key], s2[key]), f"{key}: epoch 2 did not train"
        else:  # embeddings, norms: untouched by LoRA
            assert torch.equal(s2[key], start[key]), f"{key} changed under LoRA"
    # merged = W + (alpha / rank) · B·A, with the adapters kept for resuming.
    from safetensors.torch import load_file

    lora = load_file(str(last.path / STATE_TENSORS))
    key = "model.layers.0.self_attn.q_proj.weight"
    a = lora["lora.model.layers.0.self_attn.q_proj.lora_A.default.weight"]
    b = lora["lora.model.layers.0.self_attn.q_proj.lora_B.default.weight"]
    assert torch.allclose(s2[key], start[key] + (8.0 / 4) * b @ a, atol=1e-6)
    # The checkpoint is an ordinary model directory.
    assert all(torch.equal(v, s2[k]) for k, v in snapshot(load_model(last.path)).items())


def test_lora_resume_equals_a_straight_run(tiny_tokenizer, tmp_path):
    def run(work, stop_after=None):
        model = make_tiny_model(tiny_tokenizer, hidden=32, layers=2)
        algo = GA(lr=1e-2, epochs=2, batch_size=2, lora_rank=4)
        gen = algo.candidates(
            model, tiny_tokenizer, REQUEST, UnlearnContext(max_len=16, work_dir=work)
        )
        states = []
        for cand in gen:
            states.append(snapshot(cand.model))
            if len(states) == stop_after:
                gen.close()
                break
        return states

    straight = run(tmp_path / "a")
    run(tmp_path / "b", stop_after=1)
    resumed = run(tmp_path / "b")  # replays epoch 1 from disk, trains epoch 2
    for want, got in zip(straight, resumed, strict=True):
        assert all(torch.equal(want[k], got[k]) for k in want)
    with pytest.raises(ConfigError, match=r"lora_rank 4 -> 8"):
        GA(lr=1e-2, epochs=3, batch_size=2, lora_rank=8).unlearn(
            make_tiny_model(tiny_tokenizer, hidden=32, layers=2),
            tiny_tokenizer,
            REQUEST,
            UnlearnContext(max_len=16, work_dir=tmp_path / "a"),
        )


def test_lora_options_are_validated(tiny_tokenizer):
    with pytest.raises(ConfigError, match="lora_rank must be >= 0"):
        GA(lora_rank=-1)
    with pytest.raises(ConfigError, match="lora_dropout"):
        GA(lora_rank=4, lora_dropout=1.0)
    algo = GA(lr=1e-3, epochs=1, lora_rank=4, lora_target_modules=("c_attn",))
    with pytest.raises(ConfigError, match="no layer named c_attn"):
        algo.unlearn(make_tiny_model(tiny_tokenizer), tiny_tokenizer, REQUEST, CTX)


def test_fsdp_is_refused_at_construction_where_it_cannot_run(monkeypatch):
    """Before any work: one process, or FSDP with LoRA (the loop checks both again)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match="fsdp shards the model over several processes"):
        GA(fsdp=True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert GA(fsdp=True).fsdp
    with pytest.raises(ConfigError, match="fsdp and lora_rank cannot be combined"):
        GA(fsdp=True, lora_rank=4)


# ------------------------------------------------------------ gradient checkpointing


def loss_and_grads(model, batch) -> tuple[float, dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad()
    loss = -token_nll(model, batch)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_tokenizer):
    batch = pad_batch(pack_texts(FORGET, tiny_tokenizer, 16), tiny_tokenizer.pad_token_id)
    model = make_tiny_model(tiny_tokenizer, hidden=32, layers=2)
    calls = []
    mlp = model.model.layers[0].mlp
    forward = mlp.forward
    mlp.forward = lambda *a, **k: (calls.append(1), forward(*a, **k))[1]
    plain_loss, plain_grads = loss_and_grads(model, batch)
    assert len(calls) == 1
    enable_gradient_checkpointing(model)
    calls.clear()
    ckpt_loss, ckpt_grads = loss_and_grads(model, batch)
    assert len(calls) == 2  # the block really ran again in the backward pass
    assert ckpt_loss == pytest.approx(plain_loss, abs=1e-5)
    for name, grad in plain_grads.items():
        assert torch.allclose(ckpt_grads[name], grad, atol=1e-5), name


def test_gradient_checkpointing_in_the_loop_with_lora(tiny_tokenizer):
    def run(**options):
        model = make_tiny_model(tiny_tokenizer, hidden=32, layers=2)
        return snapshot(
            GA(lr=1e-2, epochs=1, batch_size=2, **options).unlearn(
                model, tiny_tokenizer, REQUEST, CTX
            )
        )

    for options in ({}, {"lora_rank": 4}):
        plain, ckpt = run(**options), run(gradient_checkpointing=True, **options)
        assert all(torch.allclose(plain[k], ckpt[k], atol=1e-5) for k in plain), options


# --------------------------------------------------------------------- mixed precision


def test_mixed_precision_auto_is_bf16_on_cuda_only(monkeypatch):
    assert resolve_mixed_precision("auto", torch.device("cpu")) == "no"
    assert resolve_mixed_precision("bf16", torch.device("cpu")) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_mixed_precision("auto", torch.device("cuda")) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_mixed_precision("auto", torch.device("cuda")) == "no"
    with pytest.raises(ConfigError, match="mixed_precision must be one of"):
        resolve_mixed_precision("fp8", torch.device("cpu"))
    with pytest.raises(ConfigError, match="mixed_precision"):
        GA(mixed_precision="fp16")


@dataclass(kw_only=True)
class RecordedNPO(NPO):
    losses: ClassVar[list[float]] = []

    def loss(self, model, forget, retain, ref):
        logits_dtype = model(input_ids=forget["input_ids"][:, :2]).logits.dtype
        value = super().loss(model, forget, retain, ref)
        RecordedNPO.losses.append((value.item(), logits_dtype))
        return value


def test_bf16_autocast_covers_the_reference_too(tiny_tokenizer):
    """Under bf16 autocast the cached NPO reference is computed the same way as the
    training forward, so at the first step log p_θ = log p_ref and the loss is (2/β)·log 2."""
    RecordedNPO.losses.clear()
    model = make_tiny_model(tiny_tokenizer, hidden=32, layers=2)
    RecordedNPO(lr=1e-3, epochs=1, batch_size=2, mixed_precision="bf16").unlearn(
        model, tiny_tokenizer, REQUEST, CTX
    )
    first, dtype = RecordedNPO.losses[0]
    assert dtype == torch.bfloat16  # the forward really ran in bf16
    assert first == pytest.approx(20 * math.log(2), rel=1e-6)
    assert next(model.parameters()).dtype == torch.float32  # master weights stay fp32


# ------------------------------------------------------------------ top-k reference


def test_topk_kl_equals_the_full_kl_at_k_equal_vocab_and_bounds_it_below():
    torch.manual_seed(0)
    ref_logits = 3 * torch.randn(2, 5, 11)
    cur = ref_logits + torch.randn(2, 5, 11)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    full = kl_divergence(ref_logits, cur, mask).item()
    logp = torch.log_softmax(ref_logits, -1)

    def top(k):
        values, indices = logp.topk(k, dim=-1)
        tail = logp.scatter(-1, indices, -math.inf).logsumexp(-1) if k < 11 else None
        from muse_bench.training.loop import RefTopK

        return RefTopK(values, indices, tail)

    assert topk_kl_divergence(top(11), cur, mask).item() == pytest.approx(full, abs=1e-5)
    coarse = [topk_kl_divergence(top(k), cur, mask).item() for k in (1, 3, 6, 10)]
    assert all(0 <= c <= full + 1e-6 for c in coarse)  # KL of a coarsening: a lower bound
    assert coarse[-1] > coarse[0]


def test_reference_topk_cache_matches_the_frozen_copy(tiny_tokenizer, tiny_model):
    chunks = pack_texts(RETAIN, tiny_tokenizer, 16)
    pad = tiny_tokenizer.pad_token_id
    vocab = len(tiny_tokenizer)
    common = {"logprobs": False, "keep_model": True, "batch_size": 2}
    copy_ref = ReferenceProvider.build(tiny_model, [], pad, **common)
    top_ref = ReferenceProvider.build(
        tiny_model, [], pad, topk=vocab, retain_chunks=chunks, **common
    )
    lean_ref = ReferenceProvider.build(tiny_model, [], pad, topk=8, retain_chunks=chunks, **common)
    with pytest.raises(RuntimeError, match="ref.topk"):
        top_ref.logits({})
    batch = pad_batch([chunks[1], chunks[0]], pad)
    batch["index"] = torch.tensor([1, 0])
    with torch.no_grad():
        tiny_model.lm_head.weight.mul_(1.5)  # the model moves away from its reference
        full = reference_kl(tiny_model, batch, copy_ref).item()
        cached = reference_kl(tiny_model, batch, top_ref).item()
        lean = reference_kl(tiny_model, batch, lean_ref).item()
    assert full > 1e-3
    assert cached == pytest.approx(full, abs=1e-5)
    assert 0 < lean <= full + 1e-6


def test_ga_klr_with_full_topk_trains_like_the_frozen_copy(tiny_tokenizer):
    def run(**options):
        model = make_tiny_model(tiny_tokenizer, hidden=32, layers=2)
        algo = GA_KLR(lr=1e-2, epochs=1, batch_size=2, **options)
        return snapshot(algo.unlearn(model, tiny_tokenizer, REQUEST, CTX))

    full, cached = run(), run(ref_topk=len(tiny_tokenizer))
    assert all(torch.allclose(full[k], cached[k], atol=1e-5) for k in full)
    with pytest.raises(ConfigError, match="ref_topk must be >= 0"):
        GA_KLR(ref_topk=-1)


@dataclass(kw_only=True)
class RecordedKLR(GA_KLR):
    kls: ClassVar[list[float]] = []

    def regularizer(self, model, retain, ref):
        value = super().regularizer(model, retain, ref)
        RecordedKLR.kls.append(value.item())
        return value


def test_lora_klr_uses_the_base_weights_as_reference_without_a_copy(tiny_tokenizer, monkeypatch):
    import muse_bench.training.ref_logprobs as ref_logprobs

    def no_copy(obj, memo=None):
        raise AssertionError("LoRA runs must not copy the model for the KL reference")

    monkeypatch.setattr(ref_logprobs, "copy", SimpleNamespace(deepcopy=no_copy))
    RecordedKLR.kls.clear()
    model = make_tiny_model(tiny_tokenizer, hidden=32, layers=2)
    RecordedKLR(lr=1e-2, epochs=2, batch_size=2, lora_rank=4).unlearn(
        model, tiny_tokenizer, REQUEST, CTX
    )
    # B = 0 at the start: the adapted model is the base, so the first KL is zero; then the
    # adapters move it away from the (untouched) base weights.
    assert RecordedKLR.kls[0] == pytest.approx(0.0, abs=1e-7)
    assert RecordedKLR.kls[-1] > 1e-4


def test_candidate_of_a_lora_run_saves_and_loads_as_a_plain_model(tiny_tokenizer, tmp_path):
    model = make_tiny_model(tiny_tokenizer, hidden=32, layers=2)
    out = GA(lr=1e-2, epochs=1, batch_size=2, lora_rank=2).unlearn(
        model, tiny_tokenizer, REQUEST, CTX
    )
    path = save_model(out, tiny_tokenizer, tmp_path / "m")
    loaded = load_model(path)
    assert snapshot(loaded).keys() == snapshot(out).keys()
    ids = torch.tensor([tiny_tokenizer("The harbour")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, out(ids).logits, atol=1e-6)
