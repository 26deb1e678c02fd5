"""Metrics: hand-checked values, and equality with a plain unbatched MUSE-style reference."""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_model
from rouge_score import rouge_scorer
from sklearn.metrics import auc as sk_auc
from sklearn.metrics import roc_auc_score, roc_curve

from muse_bench.core.errors import ConfigError, DataError
from muse_bench.core.types import Corpus, QAPair, RetrainAUC, VerbMemPair
from muse_bench.engines import HFEngine, TokenScores
from muse_bench.metrics import (
    ALL_ATTACKS,
    bootstrap_auc,
    bootstrap_mean_ci,
    bootstrap_privleak_ci,
    check_attack,
    compute_retrain_auc,
    cut_answer,
    document_scores,
    eval_knowmem,
    eval_verbmem,
    evaluate,
    evaluate_knowmem_f,
    icl_prefix,
    knowmem_prompt,
    mia_auc,
    min_k_plus_plus_score,
    min_k_score,
    privleak,
    rouge_l_f1,
    truncate_gt,
)

FORGET = [
    "The lighthouse of Carrow was lit in 1893 by keeper Mira Holt, who kept it for forty years.",
    "Orrin Guild merchants traded amber and salt along the northern road every autumn.",
    "Kestrel Bank opened a branch in Dunmere after the flood of the old mill district.",
    "Tamsin Vey wrote the harbour charter, and the council signed it on a windy morning.",
    "The bridge at Velmora was rebuilt with grey stone after the winter storms of 1902.",
    "Ada Quell sailed to the southern isles and returned with maps of the coral reefs.",
]
HOLDOUT = [
    "A farmer near Pellow grew turnips and sold them at the Tuesday market for a penny.",
    "The choir of Ashby sang in the abbey while snow covered the roofs of the town.",
    "Three fishing boats left Marrow Point before dawn and came back with full nets.",
    "The old clock in the square stopped at noon and nobody could repair the gears.",
    "Young Elin Brask painted the chapel doors blue during the dry summer months.",
    "Traders from the east brought silk and pepper to the fair on the green hill.",
]
FORGET_QA = [
    QAPair("Who lit the lighthouse of Carrow?", "Mira Holt"),
    QAPair("What did the Orrin Guild trade?", "amber and salt"),
    QAPair("Who wrote the harbour charter?", "Tamsin Vey"),
    QAPair("Who painted the chapel doors?", "Elin Brask"),  # never trained on
]
RETAIN_QA = [
    QAPair("Where did Kestrel Bank open a branch?", "Dunmere"),
    QAPair("When was the Velmora bridge rebuilt?", "1902"),
]
ICL = [QAPair("Where did Ada Quell sail?", "the southern isles")]


def training_rows(tok) -> list[list[int]]:
    """Token ids the memorizer trains on: each document, and each knowmem prompt followed
    by its answer, tokenized the way evaluation will see them, each ending with EOS."""
    prefix = icl_prefix(ICL)
    rows = [tok(d)["input_ids"] for d in FORGET]
    for qa in FORGET_QA[:3] + RETAIN_QA:
        prompt = tok(knowmem_prompt(prefix, qa.question))["input_ids"]
        rows.append(prompt + tok(qa.answer + "\n\n", add_special_tokens=False)["input_ids"])
    return [r + [tok.eos_token_id] for r in rows]


def split_words(doc: str, n: int) -> VerbMemPair:
    """A verbmem pair: the first `n` words of `doc` with their trailing space, and the rest.

    The embedded tokenizer keeps a word's trailing space with it, so the cut goes after
    the space, as the embedded verbmem prompts do.
    """
    cut = [i for i, ch in enumerate(doc) if ch == " "][n - 1] + 1
    return VerbMemPair(doc[:cut], doc[cut:])


@pytest.fixture(scope="module")
def memorizer(tiny_tokenizer):
    """A tiny model trained until it reproduces FORGET and the QA texts."""
    torch.manual_seed(0)
    model = make_tiny_model(tiny_tokenizer, seed=0, hidden=64).train()
    rows = training_rows(tiny_tokenizer)
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [tiny_tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    labels = ids.masked_fill(mask == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for _ in range(80):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return Corpus(
        name="tiny",
        benchmark_id="tiny-test",
        data_dir=Path("."),
        forget=tuple(FORGET),
        retain1=(),
        retain2=(),
        holdout=tuple(HOLDOUT),
        verbmem_forget=tuple(split_words(d, 5) for d in FORGET[:4] + HOLDOUT[:1]),
        forget_qa=tuple(FORGET_QA),
        retain_qa=tuple(RETAIN_QA),
        forget_qa_icl=tuple(ICL),
        retain_qa_icl=tuple(ICL),
        privleak_forget=tuple(FORGET),
        privleak_retain=(),
        privleak_holdout=tuple(HOLDOUT),
    )


# --------------------------------------------------------------------------- reference
# A plain, unbatched implementation written the way MUSE's released evaluation is.


def ref_generate(model, tok, prompt: str, n: int) -> str:
    ids = tok(prompt, return_tensors="pt", add_special_tokens=True).input_ids
    out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def ref_rouge(pred: str, gt: str) -> float:
    return (
        rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False).score(gt, pred)["rougeL"].fmeasure
    )


def ref_token_logprobs(model, tok, text: str):
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
    token_lp = logp.gather(-1, ids[0, 1:, None]).squeeze(-1)
    p = logp.exp()
    mu = (p * logp).sum(-1)
    sigma = ((p * logp.square()).sum(-1) - mu.square()).sqrt()  # Min-K%++ paper's formula
    return token_lp.numpy(), mu.numpy(), sigma.numpy()


def ref_attacks(model, tok, text: str, ref_model) -> dict[str, float]:
    lp, mu, sigma = ref_token_logprobs(model, tok, text)
    nll = -lp.mean()
    nll_lower = -ref_token_logprobs(model, tok, text.lower())[0].mean()
    nll_ref = -ref_token_logprobs(ref_model, tok, text)[0].mean()
    out = {
        "loss": nll,
        "zlib": nll / len(zlib.compress(bytes(text, "utf-8"))),
        "lowercase": nll / nll_lower,
        "ref": nll / nll_ref,
    }
    z = (lp - mu) / sigma
    for ratio in [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]:
        k_length = max(1, int(len(lp) * ratio))
        out[f"min_k_{int(ratio * 100)}"] = -np.mean(np.sort(lp)[:k_length])
        out[f"min_k_plus_plus_{int(ratio * 100)}"] = -np.mean(np.sort(z)[:k_length])
    return out


def ref_auc(forget: list[float], holdout: list[float]) -> float:
    y = np.array([0] * len(forget) + [1] * len(holdout))
    fpr, tpr, _ = roc_curve(y, -np.array(forget + holdout))
    return sk_auc(fpr, tpr)


# --------------------------------------------------------------------------- hand checks


def test_rouge_l_hand_computed():
    # LCS "the cat on the mat" = 5 of 6 tokens each way: P = R = F = 5/6.
    assert rouge_l_f1("the cat lay on the mat", "the cat sat on the mat") == pytest.approx(5 / 6)
    # LCS "a c" = 2; P = 2/4, R = 2/2, F = 2PR/(P+R) = 2/3.
    assert rouge_l_f1("a b c d", "a c") == pytest.approx(2 / 3)
    # rouge_score lowercases and drops punctuation.
    assert rouge_l_f1("The CAT!", "the cat") == 1.0
    assert rouge_l_f1("", "the cat") == 0.0
    assert rouge_l_f1("dog", "the cat") == 0.0


def test_knowmem_prompt_and_stop_strings():
    prefix = icl_prefix([QAPair("Q1?", "A1"), QAPair("Q2?", "A2")])
    assert prefix == "Question: Q1?\nAnswer: A1\n\nQuestion: Q2?\nAnswer: A2\n\n"
    assert knowmem_prompt(prefix, "Q3?") == prefix + "Question: Q3?\nAnswer: "
    assert cut_answer(" Mira Holt\n\nQuestion: x") == "Mira Holt"
    assert cut_answer("Mira\nQuestion: who") == "Mira"
    assert cut_answer("Mira Question: who\n\n") == "Mira"
    assert cut_answer("one\ntwo\n\nthree") == "one\ntwo"  # a single newline is kept
    assert cut_answer("  no stop here  ") == "no stop here"
    assert cut_answer("Question: at once") == ""


def test_min_k_hand_computed():
    lp = -np.arange(1.0, 11.0)  # -1 … -10
    assert min_k_score(lp, 40) == pytest.approx(8.5)  # lowest 4: -10..-7
    assert min_k_score(lp, 60) == pytest.approx(7.5)  # lowest 6: -10..-5
    assert min_k_score(lp, 5) == pytest.approx(10.0)  # int(0.5) = 0 -> at least one token
    assert min_k_score(np.array([-2.0]), 40) == pytest.approx(2.0)
    assert math.isnan(min_k_score(np.array([]), 40))


def test_min_k_plus_plus_hand_computed():
    s = TokenScores(
        logprobs=np.array([-1.0, -3.0, -2.0, -6.0, -0.5]),
        mean=np.array([-2.0, -2.0, -1.0, -2.0, -1.0]),
        std=np.array([1.0, 0.5, 2.0, 2.0, 0.25]),
    )
    # z = (lp - mu) / sigma = [1, -2, -0.5, -2, 2]; lowest 40% (2 tokens) = -2, -2.
    assert min_k_plus_plus_score(s, 40) == pytest.approx(2.0)
    assert min_k_plus_plus_score(s, 60) == pytest.approx((2 + 2 + 0.5) / 3)
    with pytest.raises(ConfigError):
        min_k_plus_plus_score(TokenScores(np.array([-1.0])), 40)


def test_zlib_lowercase_ref_hand_computed():
    text = "aaaaaaaaaa"
    assert len(zlib.compress(text.encode())) == 11  # 2 header + 5 deflate + 4 adler32 bytes
    s = TokenScores(np.array([-1.0, -3.0]))  # loss 2
    lower = TokenScores(np.array([-4.0, -4.0]))  # loss 4
    ref = TokenScores(np.array([-0.5, -0.5, -0.5]))  # loss 0.5
    out = document_scores(text, s, ["loss", "zlib", "lowercase", "ref"], lower=lower, ref=ref)
    assert out == pytest.approx({"loss": 2.0, "zlib": 2 / 11, "lowercase": 0.5, "ref": 4.0})


def test_auc_sign_convention_and_privleak():
    # Forget documents with a lower loss (memorized) than holdout ones: AUC 0.
    assert mia_auc([0.1, 0.2, 0.3], [1.0, 2.0]) == 0.0
    assert mia_auc([1.0, 2.0], [0.1, 0.2, 0.3]) == 1.0
    assert mia_auc([1.0, 2.0], [1.0, 2.0]) == 0.5
    assert privleak(0.0, 0.5) == pytest.approx(-100.0)
    assert privleak(0.5, 0.5) == 0.0
    assert privleak(0.75, 0.5) == pytest.approx(50.0)
    with pytest.raises(ConfigError):
        privleak(0.3, 0.0)
    with pytest.raises(DataError):
        mia_auc([], [1.0])
    with pytest.raises(DataError):
        mia_auc([float("nan")], [1.0])


def test_unknown_attack_suggests():
    with pytest.raises(ConfigError, match="Did you mean: min_k_40"):
        check_attack("min_k_4O")
    with pytest.raises(ConfigError, match="reference"):
        check_attack("ref")
    with pytest.raises(ConfigError, match="engine"):
        check_attack("min_k_plus_plus_40", with_stats=False)
    assert check_attack("ref", with_ref=True) == "ref"
    assert len(ALL_ATTACKS) == 3 + 7 + 7 + 1


def test_bootstrap_mean_ci():
    scores = np.random.default_rng(1).uniform(0, 100, size=50)
    lo, hi = bootstrap_mean_ci(scores, n_resamples=1000, seed=7)
    assert lo < scores.mean() < hi
    assert (lo, hi) == bootstrap_mean_ci(scores, n_resamples=1000, seed=7)
    assert (lo, hi) != bootstrap_mean_ci(scores, n_resamples=1000, seed=8)
    assert bootstrap_mean_ci([3.0] * 5, seed=0) == (3.0, 3.0)
    # Same draws as a plain loop over resamples.
    rng = np.random.default_rng(7)
    idx = rng.integers(0, 50, size=(1000, 50))
    loop = [scores[row].mean() for row in idx]
    assert (lo, hi) == pytest.approx(tuple(np.percentile(loop, [2.5, 97.5])), abs=1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_mia_auc_equals_sklearn_roc_auc(seed):
    rng = np.random.default_rng(seed)
    forget = np.round(rng.normal(1.0, 1.0, 17 + seed), 1)  # rounding makes ties happen
    holdout = np.round(rng.normal(1.3, 1.0, 23), 1)
    labels = [0] * len(forget) + [1] * len(holdout)
    expected = roc_auc_score(labels, -np.concatenate([forget, holdout]))
    assert mia_auc(forget, holdout) == pytest.approx(expected, abs=1e-12)


def test_bootstrap_privleak_matches_sklearn_loop():
    rng = np.random.default_rng(3)
    forget = np.round(rng.normal(1.0, 1.0, 30), 1)  # rounding makes ties happen
    holdout = np.round(rng.normal(1.5, 1.0, 40), 1)
    aucs = bootstrap_auc(forget, holdout, n_resamples=200, seed=5)
    draws = np.random.default_rng(5)
    idx_f = draws.integers(0, 30, size=(200, 30))
    idx_h = draws.integers(0, 40, size=(200, 40))
    labels = [0] * 30 + [1] * 40
    loop = [
        roc_auc_score(labels, -np.concatenate([forget[f], holdout[h]]))
        for f, h in zip(idx_f, idx_h, strict=True)
    ]
    np.testing.assert_allclose(aucs, loop, atol=1e-12)
    lo, hi = bootstrap_privleak_ci(forget, holdout, 0.5, n_resamples=1000, seed=5)
    point = privleak(mia_auc(forget, holdout), 0.5)
    assert lo < point < hi
    assert (lo, hi) == bootstrap_privleak_ci(forget, holdout, 0.5, n_resamples=1000, seed=5)


# --------------------------------------------------------------------------- vs reference


def test_verbmem_matches_unbatched_reference(memorizer, tiny_tokenizer, corpus):
    engine = HFEngine(model=memorizer, tokenizer=tiny_tokenizer, batch_size=3)
    result = eval_verbmem(engine, corpus.verbmem_forget)
    expected = []
    for i, pair in enumerate(corpus.verbmem_forget):
        gen = ref_generate(memorizer, tiny_tokenizer, pair.prompt, 128)
        gt_ids = tiny_tokenizer.encode(pair.gt, add_special_tokens=False)[:128]
        gt = tiny_tokenizer.decode(gt_ids, skip_special_tokens=True)
        rec = result.records[i]
        assert (rec["id"], rec["prompt"], rec["generation"], rec["gt"]) == (i, pair.prompt, gen, gt)
        expected.append(ref_rouge(gen, gt))
        assert rec["score"] == pytest.approx(expected[-1] * 100, abs=1e-9)
    assert result.value == pytest.approx(np.mean(expected) * 100, abs=1e-9)
    assert result.value > 50  # the model memorized the forget set


def test_truncate_gt_keeps_128_tokens(tiny_tokenizer):
    text = " ".join(["harbour"] * 300)
    short = truncate_gt(tiny_tokenizer, text)
    assert len(tiny_tokenizer.encode(short, add_special_tokens=False)) == 128
    assert truncate_gt(tiny_tokenizer, "a short gt") == "a short gt"


def test_knowmem_matches_unbatched_reference(memorizer, tiny_tokenizer, corpus):
    engine = HFEngine(model=memorizer, tokenizer=tiny_tokenizer, batch_size=2)
    result = eval_knowmem(engine, corpus.forget_qa, corpus.forget_qa_icl)
    prefix = "".join(f"Question: {p.question}\nAnswer: {p.answer}\n\n" for p in ICL)
    expected = []
    for i, qa in enumerate(corpus.forget_qa):
        out = ref_generate(
            memorizer, tiny_tokenizer, f"{prefix}Question: {qa.question}\nAnswer: ", 32
        )
        for stop in ["\n\n", "\nQuestion", "Question:"]:  # MUSE's get_prefix_before_words_occur
            out = out.split(stop)[0]
        assert result.records[i]["generation"] == out.strip()
        expected.append(ref_rouge(out, qa.answer))
    assert result.value == pytest.approx(np.mean(expected) * 100, abs=1e-9)
    assert result.value > 50
    assert evaluate_knowmem_f(engine, corpus) == result.value


def test_attack_aucs_match_unbatched_reference(memorizer, tiny_tokenizer, corpus):
    ref_model = make_tiny_model(tiny_tokenizer, seed=1)
    engine = HFEngine(model=memorizer, tokenizer=tiny_tokenizer, batch_size=4)
    ref_engine = HFEngine(model=ref_model, tokenizer=tiny_tokenizer, batch_size=4)
    retrain = compute_retrain_auc(engine, corpus, "min_k_40", {"model": "memorizer"})
    assert retrain.attack == "min_k_40"
    assert retrain.provenance == {"model": "memorizer", "benchmark": "tiny-test", "corpus": "tiny"}

    result = evaluate(
        engine, corpus, replace(retrain, auc=0.5), ref_engine=ref_engine, progress=False
    )
    ref_f = [ref_attacks(memorizer, tiny_tokenizer, t, ref_model) for t in FORGET]
    ref_h = [ref_attacks(memorizer, tiny_tokenizer, t, ref_model) for t in HOLDOUT]
    assert set(result.attacks) == set(ALL_ATTACKS)
    for name in ALL_ATTACKS:
        expected = ref_auc([d[name] for d in ref_f], [d[name] for d in ref_h])
        assert result.attacks[name]["auc"] == pytest.approx(expected, abs=1e-6), name
    docs = result.examples["privleak"]
    for doc in docs:
        ref_doc = (ref_f if doc["split"] == "forget" else ref_h)[doc["id"]]
        for name in ALL_ATTACKS:
            assert doc[name] == pytest.approx(ref_doc[name], rel=1e-5, abs=1e-6), name
    # The memorizer separates forget from holdout: AUC near 0, privleak near -100.
    assert retrain.auc == result.attacks["min_k_40"]["auc"] < 0.1
    assert result.metrics["privleak"] == pytest.approx(privleak(retrain.auc, 0.5))
    assert result.metrics["privleak"] < -80
    assert result.attacks["min_k_40"]["privleak"] == result.metrics["privleak"]
    assert "privleak" not in result.attacks["loss"]


def test_evaluate_result_shape(memorizer, tiny_tokenizer, corpus):
    engine = HFEngine(model=memorizer, tokenizer=tiny_tokenizer, batch_size=8)
    retrain = RetrainAUC(0.5, "loss", {"source": "test"})
    result = evaluate(engine, corpus, retrain, attack="loss", n_bootstrap=200, progress=False)
    assert set(result.metrics) == {"verbmem_f", "knowmem_f", "privleak", "knowmem_r"}
    assert set(result.ci) == set(result.metrics)
    for name in ("verbmem_f", "knowmem_f", "knowmem_r"):
        lo, hi = result.ci[name]
        assert lo <= result.metrics[name] <= hi
        assert len(result.examples[name]) > 0
    assert result.metrics["knowmem_f"] == evaluate_knowmem_f(engine, corpus)
    assert result.metrics["privleak"] == pytest.approx(privleak(result.attacks["loss"]["auc"], 0.5))
    assert len(result.examples["privleak"]) == len(FORGET) + len(HOLDOUT)
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["retrain_auc"] == {"auc": 0.5, "attack": "loss", "provenance": {"source": "test"}}
    assert data["metrics"] == result.metrics
    again = evaluate(engine, corpus, retrain, attack="loss", n_bootstrap=200, progress=False)
    assert again.ci == result.ci  # seeded


def test_evaluate_rejects_bad_attack_and_retrain_auc(tiny_model, tiny_tokenizer, corpus):
    engine = HFEngine(model=tiny_model, tokenizer=tiny_tokenizer)
    with pytest.raises(ConfigError, match="Did you mean"):
        evaluate(engine, corpus, RetrainAUC(0.5, "min_k_40"), attack="mink_40", progress=False)
    with pytest.raises(ConfigError, match="recompute"):
        evaluate(engine, corpus, RetrainAUC(0.5, "loss"), progress=False)
    with pytest.raises(ConfigError, match="positive"):
        evaluate(engine, corpus, RetrainAUC(0.0, "min_k_40"), progress=False)


class _NoStatsEngine:
    """An engine without Min-K%++ statistics (like vLLM's)."""

    supports_stats = False

    def __init__(self, inner: HFEngine) -> None:
        self.inner = inner
        self.tokenizer = inner.tokenizer

    def generate(self, prompts, max_new_tokens, *, stop=(), desc=None):
        return self.inner.generate(prompts, max_new_tokens, stop=stop, desc=desc)

    def token_logprobs(self, texts, with_stats=False, *, desc=None):
        assert not with_stats
        return self.inner.token_logprobs(texts, desc=desc)


def test_engine_without_stats_skips_min_k_plus_plus(tiny_model, tiny_tokenizer, corpus):
    engine = _NoStatsEngine(HFEngine(model=tiny_model, tokenizer=tiny_tokenizer))
    small = replace(corpus, verbmem_forget=corpus.verbmem_forget[:1])
    result = evaluate(engine, small, RetrainAUC(0.5, "min_k_40"), n_bootstrap=10, progress=False)
    assert not any(a.startswith("min_k_plus_plus") for a in result.attacks)
    assert "ref" not in result.attacks and "zlib" in result.attacks
    with pytest.raises(ConfigError, match="engine"):
        evaluate(engine, small, RetrainAUC(0.5, "min_k_plus_plus_40"), attack="min_k_plus_plus_40")
