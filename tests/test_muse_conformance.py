"""Where the harness's evaluation differs from MUSE's released `eval.py`, and where it does not.

Each test computes a quantity the way MUSE's code (github.com/swj0419/muse_bench,
`metrics/{verbmem,knowmem,privleak}.py`, `constants.py`) does, next to the harness's own
function, and pins the relation the README's "SPEC conformance" section states: equal, or
different in the named way.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.metrics import auc as sk_auc
from sklearn.metrics import roc_curve

from muse_bench.metrics.knowmem import STOP_STRINGS, cut_answer
from muse_bench.metrics.mia import mia_auc, min_k_score
from muse_bench.metrics.rouge import rouge_l_f1
from muse_bench.metrics.verbmem import truncate_gt
from muse_bench.runner.references import PUBLISHED_RETRAIN_AUC

# MUSE's constants.py, AUC_RETRAIN[corpus]["forget_holdout_Min-40%"], as released.
MUSE_AUC_RETRAIN_MIN40 = {"news": 0.47719999999999996, "books": 0.5392999999999999}


def muse_truncate_gt(tok, gt: str, max_new_tokens: int = 128) -> str:
    """metrics/verbmem.py: tokenize WITH special tokens, keep 128 ids, decode."""
    gt_ids = tok(gt, return_tensors="pt", add_special_tokens=True).input_ids[:, :max_new_tokens]
    return tok.batch_decode(gt_ids, skip_special_tokens=True)[0]


def muse_min_k(all_prob: list[float], ratio: float) -> float:
    """privleak/get_ppl_utils.py: no lower bound on k_length."""
    k_length = int(len(all_prob) * ratio)
    topk_prob = np.sort(all_prob)[:k_length]
    return float(-np.mean(topk_prob).item())


def muse_cut(string: str, words=("\n\n", "\nQuestion", "Question:")) -> str:
    """metrics/knowmem.py's get_prefix_before_words_occur."""
    for word in words:
        string = string.split(word)[0]
    return string


def muse_auc(forget: list[float], holdout: list[float]) -> float:
    """metrics/privleak.py's sweep for key forget_holdout_*: forget = label 0, -score."""
    ppl = np.array(forget + holdout)
    y = np.array([0] * len(forget) + [1] * len(holdout))
    fpr, tpr, _ = roc_curve(y, -ppl)
    return float(sk_auc(fpr, tpr))


def test_verbmem_ground_truth_keeps_one_token_more_than_muse(tiny_tokenizer):
    # Difference 1: SPEC §3 cuts the gt to 128 tokens of text; MUSE counts BOS among its
    # 128 ids, so its reference is 127 text tokens.
    assert tiny_tokenizer("x", add_special_tokens=True).input_ids[0] == tiny_tokenizer.bos_token_id
    gt = " ".join(["harbour", "council", "river"] * 100)
    ours, muse = truncate_gt(tiny_tokenizer, gt), muse_truncate_gt(tiny_tokenizer, gt)
    n_ours = len(tiny_tokenizer(ours, add_special_tokens=False).input_ids)
    n_muse = len(tiny_tokenizer(muse, add_special_tokens=False).input_ids)
    assert (n_ours, n_muse) == (128, 127)
    assert ours.startswith(muse) and ours != muse
    # A gt shorter than the cut is the same either way.
    assert truncate_gt(tiny_tokenizer, "the river") == muse_truncate_gt(tiny_tokenizer, "the river")


def test_min_k_on_documents_too_short_for_k_is_defined_where_muse_gives_nan():
    # Difference 2: MUSE's k = int(n * 0.4) is 0 for n <= 2 tokens: the mean of nothing.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert np.isnan(muse_min_k([-1.0, -3.0], 0.4))
    assert min_k_score(np.array([-1.0, -3.0]), 40) == 3.0  # at least the lowest token
    # From 3 tokens on the two agree.
    lp = [-0.5, -2.0, -1.0, -4.0, -0.1, -3.0, -2.5]
    for k in (5, 10, 20, 30, 40, 50, 60):
        if int(len(lp) * k / 100) >= 1:
            assert min_k_score(np.array(lp), k) == pytest.approx(muse_min_k(lp, k / 100))


@pytest.mark.parametrize(
    "output",
    [
        " Dunmere\n\nQuestion: who?",
        "seven votes\nQuestion: next",
        "the mill Question: and",
        "a\n\nb\nQuestion c Question: d",
        "no stop at all ",
        "",
        "\n\n",
    ],
)
def test_knowmem_answer_cut_equals_muse_up_to_whitespace_which_rouge_ignores(output):
    assert tuple(STOP_STRINGS) == ("\n\n", "\nQuestion", "Question:")
    assert cut_answer(output) == muse_cut(output).strip()
    assert rouge_l_f1(cut_answer(output), "the mill") == rouge_l_f1(muse_cut(output), "the mill")


def test_mia_auc_orientation_equals_muses_sweep():
    forget = [0.2, 0.4, 0.4, 1.3, 0.9]  # memorized: low loss-like scores
    holdout = [1.1, 0.4, 2.0, 1.7]
    assert mia_auc(forget, holdout) == pytest.approx(muse_auc(forget, holdout), abs=1e-12)
    assert mia_auc([0.1, 0.2], [1.0, 2.0]) == 0.0 == muse_auc([0.1, 0.2], [1.0, 2.0])


def test_published_retrain_aucs_are_muses_constants():
    # MUSE's eval.py reads AUC_RETRAIN[privleak_auc_key] although the dict is keyed by corpus
    # first (a KeyError as released); the harness uses the corpus's value.
    assert PUBLISHED_RETRAIN_AUC == pytest.approx(MUSE_AUC_RETRAIN_MIN40, abs=1e-12)


def test_decoding_ignores_clean_up_tokenization_spaces_like_the_harness(tiny_tokenizer):
    # Difference 3: MUSE passes clean_up_tokenization_spaces=True (transformers 4.x applies
    # it); transformers 5 ignores it for BPE tokenizers, so " n't" is not glued back.
    ids = tiny_tokenizer("the council , the river .", add_special_tokens=False).input_ids
    plain = tiny_tokenizer.decode(ids, skip_special_tokens=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cleaned = tiny_tokenizer.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=True
        )
    assert cleaned == plain
