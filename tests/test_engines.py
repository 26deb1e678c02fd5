"""Engines: batched results equal one-at-a-time results, the forward-only contract, factory."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import make_tiny_model

from muse_bench.core.errors import ConfigError
from muse_bench.engines import (
    ENGINES,
    Engine,
    HFEngine,
    TokenScores,
    fit_prompt,
    make_engine,
)
from muse_bench.engines.base import stop_settled

PROMPTS = [
    "The harbour of Velmora",
    "",
    "Question: Who founded the Orrin Guild?\nAnswer: Tamsin Vey\n\nQuestion: In which year?\nAnswer:",
    "Kestrel",
    "The council of Dunmere voted 7 to 2 to close the old mill",
    "Question: In which year did the bridge open?\nAnswer: ",
    "The",
]


def spread_model(tokenizer, seed: int):
    """A tiny model whose larger embeddings spread the logits, so greedy paths are varied
    between prompts rather than all one token."""
    model = make_tiny_model(tokenizer, seed=seed)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(20)
    return model


def reference_generate(model, tok, prompt: str, n: int) -> str:
    """MUSE's way: one unbatched model.generate per prompt."""
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize("seed", [0, 1])
def test_batched_generate_equals_one_at_a_time(tiny_tokenizer, seed):
    model = spread_model(tiny_tokenizer, seed)
    engine = HFEngine(model=model, tokenizer=tiny_tokenizer, batch_size=3)
    batched = engine.generate(PROMPTS, 24)
    single = HFEngine(model=model, tokenizer=tiny_tokenizer, batch_size=1).generate(PROMPTS, 24)
    expected = [reference_generate(model, tiny_tokenizer, p, 24) for p in PROMPTS]
    assert batched == single == expected
    assert len(set(expected)) > 3  # the outputs really differ between prompts
    assert engine.generate([], 5) == []
    assert engine.generate(PROMPTS[:2], 0) == ["", ""]


@pytest.mark.parametrize(
    "text, stops, settled",
    [
        ("abc", ["\n\n"], False),  # no stop string yet
        ("ab\n\nc", ["\n\n"], True),
        ("x\nQuestion", ["\n\n", "\nQuestion", "Question:"], True),
        ("abc", ["abcd", "c"], False),  # "abcd" may still complete before "c" at 2
        ("abce", ["abcd", "c"], True),  # now it cannot: the cut is at 2
        ("abcd", ["abcd", "c"], True),
        ("", ["\n"], False),
        ("a\n", [], False),
    ],
)
def test_stop_settled_by_hand(text, stops, settled):
    assert stop_settled(text, stops) is settled


def _cut(text: str, stops: list[str]) -> str:
    ends = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(ends, default=len(text))]


class ShapeRecorder(torch.nn.Module):
    """Passes calls through to a causal LM and records the input_ids shape of each."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, **kw):
        self.shapes.append(tuple(kw["input_ids"].shape))
        return self.inner(**kw)


@pytest.mark.parametrize("stops", [["e"], [" ", "\n"], ["an", "a"], ["zzzz"]])
def test_generate_with_stop_strings_keeps_the_text_before_the_stop(tiny_tokenizer, stops):
    model = spread_model(tiny_tokenizer, seed=0)
    recorder = ShapeRecorder(model)
    engine = HFEngine(model=recorder, tokenizer=tiny_tokenizer, batch_size=7)
    full = engine.generate(PROMPTS, 24)
    recorder.shapes.clear()
    early = engine.generate(PROMPTS, 24, stop=stops)
    single = HFEngine(model=model, tokenizer=tiny_tokenizer, batch_size=1)
    assert early == single.generate(PROMPTS, 24, stop=stops)  # rows leaving changes nothing
    if stops == ["e"]:  # 2 of 7 rows stop at once: they leave the batch
        assert min(shape[0] for shape in recorder.shapes) == len(PROMPTS) - 2
    for f, e in zip(full, early, strict=True):
        assert f.startswith(e)  # the same greedy path, possibly cut short
        assert _cut(e, stops) == _cut(f, stops)
    if stops != ["zzzz"]:
        assert sum(map(len, early)) < sum(map(len, full))  # it really stopped early
    else:
        assert early == full


def test_shared_prompt_prefix_is_prefilled_once_with_equal_outputs(tiny_tokenizer):
    model = spread_model(tiny_tokenizer, seed=1)
    few_shot = "".join(f"Question: Who built bridge {i}?\nAnswer: Mason {i}\n\n" for i in range(4))
    # Prompts end differently (a random model's output depends mostly on the last tokens).
    prompts = [few_shot + p for p in PROMPTS if p]
    recorder = ShapeRecorder(model)
    engine = HFEngine(model=recorder, tokenizer=tiny_tokenizer, batch_size=8)
    batched = engine.generate(prompts, 12)
    expected = [reference_generate(model, tiny_tokenizer, p, 12) for p in prompts]
    assert batched == expected
    assert len(set(expected)) > 1
    ids = tiny_tokenizer(prompts)["input_ids"]
    common = next(i for i in range(min(map(len, ids))) if len({tuple(x[: i + 1]) for x in ids}) > 1)
    assert recorder.shapes[0] == (1, common)  # the shared prefix, once
    assert recorder.shapes[1][0] == len(prompts)
    assert recorder.shapes[1][1] == max(map(len, ids)) - common  # then only the rests


class ScriptedLM(torch.nn.Module):
    """A forward-only model (like an inference-time unlearner wrapper) with scripted output.

    After a token at position p it predicts EOS once p + 1 >= `stop_at`, otherwise token
    10 + p % 5. Its forward takes exactly the keywords of the engine contract, and it
    records the input width of every call.
    """

    def __init__(self, vocab: int, eos: int, stop_at: int) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.vocab, self.eos, self.stop_at = vocab, eos, stop_at
        self.calls: list[int] = []

    def forward(self, *, input_ids, attention_mask, position_ids, past_key_values, use_cache):
        self.calls.append(input_ids.shape[1])
        assert use_cache is True
        assert attention_mask.shape[1] == (past_key_values or 0) + input_ids.shape[1]
        nxt = torch.where(position_ids + 1 >= self.stop_at, self.eos, 10 + position_ids % 5)
        logits = torch.nn.functional.one_hot(nxt, self.vocab).float()
        return SimpleNamespace(logits=logits, past_key_values=attention_mask.shape[1])


def test_forward_only_wrapper_positions_and_early_stop(tiny_tokenizer):
    tok = tiny_tokenizer
    model = ScriptedLM(len(tok), tok.eos_token_id, stop_at=12)
    engine = HFEngine(model=model, tokenizer=tok, batch_size=8)
    prompts = ["The", "The harbour of Velmora opened", "Kestrel Bank reported a profit"]
    outs = engine.generate(prompts, 50)
    for prompt, out in zip(prompts, outs, strict=True):
        n = len(tok(prompt)["input_ids"])
        expected = [10 + p % 5 for p in range(n - 1, 11)]  # positions of the inputs
        assert out == tok.decode(expected, skip_special_tokens=True)
    # One call per generated token of the longest continuation, then the loop stopped.
    longest = max(12 - len(tok(p)["input_ids"]) for p in prompts)
    assert len(model.calls) == longest + 1 < 50
    assert model.calls[1:] == [1] * longest  # the prompt once, then one token per step


def test_generate_drops_tokens_after_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    engine = HFEngine(model=ScriptedLM(len(tok), tok.eos_token_id, stop_at=6), tokenizer=tok)
    short, long_ = engine.generate(["The", "The council of Dunmere voted"], 20)
    n = len(tok("The")["input_ids"])
    assert short == tok.decode([10 + p % 5 for p in range(n - 1, 5)])
    assert len(tok("The council of Dunmere voted")["input_ids"]) >= 6
    assert long_ == ""  # its first new token is already EOS


def test_token_logprobs_equal_unbatched_forward(tiny_model, tiny_tokenizer):
    texts = [t for t in PROMPTS if t] + ["x"]
    engine = HFEngine(model=tiny_model, tokenizer=tiny_tokenizer, batch_size=3)
    scores = engine.token_logprobs(texts, with_stats=True)
    plain = engine.token_logprobs(texts)
    for text, s, p in zip(texts, scores, plain, strict=True):
        ids = torch.tensor([tiny_tokenizer.encode(text)])
        with torch.no_grad():
            logp = torch.log_softmax(tiny_model(ids).logits[0, :-1].double(), dim=-1)
        expected = logp.gather(-1, ids[0, 1:, None]).squeeze(-1).numpy()
        mu = (logp.exp() * logp).sum(-1)
        sigma = ((logp.exp() * logp.square()).sum(-1) - mu.square()).sqrt()
        assert s.n_tokens == ids.shape[1] - 1
        np.testing.assert_allclose(s.logprobs, expected, atol=1e-5)
        np.testing.assert_allclose(s.mean, mu.numpy(), atol=1e-5)
        np.testing.assert_allclose(s.std, sigma.numpy(), atol=1e-5)
        np.testing.assert_allclose(p.logprobs, s.logprobs, atol=1e-6)
        assert p.mean is None and not p.has_stats
        assert s.nll == pytest.approx(-expected.mean(), abs=1e-5)
    empty = engine.token_logprobs([""])[0]
    assert empty.n_tokens == 0 and np.isnan(empty.nll)


def test_truncation_to_max_length(tiny_model, tiny_tokenizer):
    tok = tiny_tokenizer
    long_text = "The harbour of Velmora opened in 1871. " * 10
    ids = tok(long_text)["input_ids"]
    engine = HFEngine(model=tiny_model, tokenizer=tok, max_length=16)
    (scores,) = engine.token_logprobs([long_text])
    full = HFEngine(model=tiny_model, tokenizer=tok).token_logprobs([long_text])[0]
    assert scores.n_tokens == 15 and full.n_tokens == len(ids) - 1
    np.testing.assert_allclose(scores.logprobs, full.logprobs[:15], atol=1e-5)
    # Prompts keep BOS and their last tokens, leaving room for the new ones.
    kept = fit_prompt(ids, tok.bos_token_id, 16, 6)
    assert kept == ids[:1] + ids[-9:]
    assert fit_prompt(ids[:5], tok.bos_token_id, 16, 6) == ids[:5]
    assert fit_prompt(ids, None, None, 6) == ids
    out = engine.generate([long_text], 6)
    with torch.no_grad():
        ref = tiny_model.generate(torch.tensor([kept]), max_new_tokens=6, do_sample=False)
    assert out == [tok.decode(ref[0, len(kept) :], skip_special_tokens=True)]
    with pytest.raises(ConfigError, match="no room"):
        engine.generate(["x"], 15)


def test_make_engine_and_registry(tiny_model, tiny_tokenizer, tmp_path):
    assert {"hf", "vllm"} <= set(ENGINES.names())
    engine = make_engine("hf", model=tiny_model, tokenizer=tiny_tokenizer, batch_size=2)
    assert isinstance(engine, HFEngine) and isinstance(engine, Engine)
    assert engine.max_length == tiny_model.config.max_position_embeddings
    with pytest.raises(ConfigError, match="Did you mean: hf"):
        make_engine("hff", model=tiny_model, tokenizer=tiny_tokenizer)
    with pytest.raises(ConfigError, match="model"):
        make_engine("hf")
    with pytest.raises(ConfigError, match="batch size"):
        make_engine("hf", model=tiny_model, tokenizer=tiny_tokenizer, batch_size=0)

    from muse_bench.core.models import save_model

    path = save_model(tiny_model, tiny_tokenizer, tmp_path / "tiny")
    loaded = make_engine("hf", model_path=str(path))
    text = ["The harbour of Velmora opened in 1871."]
    np.testing.assert_allclose(
        loaded.token_logprobs(text)[0].logprobs, engine.token_logprobs(text)[0].logprobs, atol=1e-6
    )
    assert loaded.generate(text, 8) == engine.generate(text, 8)


HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed; the missing-vLLM message is not shown")
def test_vllm_missing_is_a_clear_config_error():
    with pytest.raises(ConfigError) as err:
        make_engine("vllm", model_path="/nonexistent")
    assert str(err.value) == "--engine vllm needs vLLM: pip install 'muse-bench[vllm]' (GPU only)."


@pytest.mark.skipif(
    not (HAS_VLLM and torch.cuda.is_available()), reason="needs vLLM and a CUDA GPU"
)
def test_vllm_matches_hf(tiny_model, tiny_tokenizer, tmp_path):
    from muse_bench.core.models import save_model

    path = save_model(tiny_model, tiny_tokenizer, tmp_path / "tiny")
    vllm_engine = make_engine("vllm", model_path=str(path), device="cuda")
    hf_engine = make_engine("hf", model_path=str(path), device="cuda")
    texts = [t for t in PROMPTS if t]
    for a, b in zip(
        vllm_engine.token_logprobs(texts), hf_engine.token_logprobs(texts), strict=True
    ):
        assert isinstance(a, TokenScores)
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=5e-2)  # bf16 vs fp32 kernels
    with pytest.raises(ConfigError):
        vllm_engine.token_logprobs(texts, with_stats=True)


def test_engine_runs_in_eval_mode_and_restores_it(tiny_tokenizer):
    model = make_tiny_model(tiny_tokenizer)
    model.config.attention_dropout = 0.5  # would change results if left in train mode
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    engine = HFEngine(model=model, tokenizer=tiny_tokenizer)
    expected = engine.token_logprobs(PROMPTS[:3])
    model.train()
    again = engine.token_logprobs(PROMPTS[:3])
    assert model.training
    for a, b in zip(expected, again, strict=True):
        np.testing.assert_array_equal(a.logprobs, b.logprobs)
    assert engine.generate(PROMPTS[:2], 5) == HFEngine(
        model=model.eval(), tokenizer=tiny_tokenizer
    ).generate(PROMPTS[:2], 5)


def test_reserved_kv_cache_gives_the_same_logits_and_regrows(tiny_tokenizer):
    from muse_bench.core.models import cache_keyword
    from muse_bench.engines.kv_reserve import ReservedLayer, reserve

    model = make_tiny_model(tiny_tokenizer, seed=2).eval()
    ids = torch.tensor([tiny_tokenizer("The council of Dunmere voted")["input_ids"]] * 2)
    steps = torch.randint(5, 300, (2, 6))

    kw = cache_keyword(model)

    def decode(room: int | None) -> tuple[list[torch.Tensor], object]:
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True)
            past = getattr(out, kw) if room is None else reserve(getattr(out, kw), room)
            logits = [out.logits]
            for j in range(steps.shape[1]):
                out = model(input_ids=steps[:, j : j + 1], use_cache=True, **{kw: past})
                past = getattr(out, kw)
                logits.append(out.logits)
        return logits, past

    plain, plain_cache = decode(None)
    for room in (2, 6, 50):  # too little room (regrows), exactly enough, plenty
        reserved, cache = decode(room)
        assert all(type(layer) is ReservedLayer for layer in cache.layers)
        for a, b in zip(plain, reserved, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert cache.get_seq_length() == plain_cache.get_seq_length()
    cache.batch_repeat_interleave(3)
    assert cache.layers[0].keys.shape[0] == 6
    assert torch.equal(cache.layers[0].keys[1], plain_cache.layers[0].keys[0])


@pytest.mark.parametrize(
    "lengths, batch_size, max_tokens, expected",
    [
        ([3, 9, 5, 9, 1], 2, None, [[1, 3], [2, 0], [4]]),  # longest first, ties by index
        ([3, 9, 5, 9, 1], 8, 20, [[1, 3], [2, 0, 4]]),  # 3 rows of 9 would be 27 > 20
        ([30, 2, 2], 8, 10, [[0], [1, 2]]),  # a row longer than the budget goes alone
        ([4] * 5, 8, 8, [[0, 1], [2, 3], [4]]),
        ([], 4, 10, []),
    ],
)
def test_length_sorted_batches_respect_rows_and_tokens(lengths, batch_size, max_tokens, expected):
    from muse_bench.engines.hf import _length_sorted_batches

    assert list(_length_sorted_batches(lengths, batch_size, max_tokens)) == expected


def test_token_budget_does_not_change_scores(tiny_tokenizer):
    model = make_tiny_model(tiny_tokenizer, seed=3)
    texts = [p for p in PROMPTS if p] * 2
    wide = HFEngine(model=model, tokenizer=tiny_tokenizer, batch_size=16, score_tokens=10**6)
    narrow = HFEngine(model=model, tokenizer=tiny_tokenizer, batch_size=16, score_tokens=20)
    for a, b in zip(
        wide.token_logprobs(texts, True), narrow.token_logprobs(texts, True), strict=True
    ):
        np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a.std, b.std, rtol=1e-5, atol=1e-6)


def test_rows_that_stopped_early_return_no_pad_tokens(tiny_tokenizer):
    # With a pad id that is an ordinary token (a tokenizer without a special pad or EOS
    # token), the slots after a row stopped must not reach its text.
    model = spread_model(tiny_tokenizer, seed=0)
    engine = HFEngine(model=model, tokenizer=tiny_tokenizer, batch_size=7)
    engine.pad_id = tiny_tokenizer.convert_tokens_to_ids("e")
    single = HFEngine(model=model, tokenizer=tiny_tokenizer, batch_size=1)
    assert engine.generate(PROMPTS, 24, stop=["e"]) == single.generate(PROMPTS, 24, stop=["e"])


def test_cache_keyword_follows_the_forward_signature(tiny_tokenizer):
    """The KV cache goes under the name the model's forward takes: `cache` for the
    installed transformers' models (and pass-through wrappers), `past_key_values` for a
    model written for the old name."""
    from muse_bench.core.models import cache_keyword

    model = make_tiny_model(tiny_tokenizer, seed=0)

    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, use_cache=False):
            return None

    class PassThrough(torch.nn.Module):
        def forward(self, **kw):
            return model(**kw)

    assert cache_keyword(model) == "cache"
    assert cache_keyword(Old()) == "past_key_values"
    assert cache_keyword(PassThrough()) == "cache"


def test_evaluation_calls_raise_no_deprecation_warning(tiny_tokenizer):
    """Generation and scoring use the current transformers API: no FutureWarning or
    DeprecationWarning (transformers announces removal of `past_key_values`)."""
    import warnings

    model = make_tiny_model(tiny_tokenizer, seed=0)
    engine = make_engine("hf", model=model, tokenizer=tiny_tokenizer, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        engine.generate(["The council of", "A"] * 3, max_new_tokens=4)
        engine.token_logprobs(["The council of Dunmere voted", "A short one"])
