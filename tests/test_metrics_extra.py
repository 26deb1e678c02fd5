"""Extraction strength, exact memorization and GradNorm (SPEC-robustness §3): the spec's
Pin numbers, edge cases, and the model-facing parts checked against independent routes."""

from __future__ import annotations

import math

import pytest
import torch

from muse_bench.core.types import VerbMemPair
from muse_bench.metrics.extraction import (
    encode_pair,
    eval_extraction,
    exact_memorization,
    extraction_strength,
    join_pair,
    teacher_forced_predictions,
)
from muse_bench.metrics.mia import (
    gradnorm_auc,
    gradnorm_scores,
    mean_gradient_norm,
    mia_auc,
)
from tests.conftest import snapshot


# ----------------------------------------------------------------------------- ES / EM
def test_es_em_pins():
    assert extraction_strength([5, 1, 2, 3], [4, 9, 2, 3]) == pytest.approx(0.5)
    assert exact_memorization([5, 1, 2, 3], [4, 9, 2, 3]) == pytest.approx(0.5)
    # the last prediction is wrong: nothing is extractable (open-unlearning would give 0.25)
    assert extraction_strength([1, 2, 3, 0], [1, 2, 3, 4]) == 0.0
    assert exact_memorization([1, 2, 3, 0], [1, 2, 3, 4]) == pytest.approx(0.75)


def test_es_em_edges():
    assert extraction_strength([1, 2, 3], [1, 2, 3]) == 1.0
    assert exact_memorization([1, 2, 3], [1, 2, 3]) == 1.0
    assert extraction_strength([0, 0, 0], [1, 2, 3]) == 0.0
    assert exact_memorization([0, 0, 0], [1, 2, 3]) == 0.0
    # one early miss: everything after it is reproduced, ES = 1 - 1/3
    assert extraction_strength([9, 2, 3], [1, 2, 3]) == pytest.approx(2 / 3)
    # a right first token does not count when a later one is wrong
    assert extraction_strength([1, 9, 3], [1, 2, 3]) == pytest.approx(1 / 3)
    assert extraction_strength([], []) == 0.0
    with pytest.raises(ValueError):
        extraction_strength([1], [1, 2])


def test_join_pair():
    assert join_pair("Once upon", "a time") == "Once upon a time"
    assert join_pair("Title\n\n", "Body") == "Title\n\nBody"
    assert join_pair("Title", " body") == "Title body"


def test_teacher_forced_predictions_match_one_at_a_time(tiny_model, tiny_tokenizer):
    """Batched, padded predictions equal the argmax of each row run alone."""
    pairs = [
        ("The harbour of Velmora", "opened in 1871. Its first master was Ada Quell."),
        ("Question: Who founded the Orrin Guild?\nAnswer:", "Tamsin Vey"),
    ]
    rows = [encode_pair(tiny_tokenizer, p, g, 512) for p, g in pairs]
    batched = teacher_forced_predictions(tiny_model, rows, 0, batch_size=8)
    for (ids, start), (preds, targets) in zip(rows, batched, strict=True):
        with torch.no_grad():
            logits = tiny_model(torch.tensor([ids])).logits[0]
        assert preds == logits.argmax(-1)[start - 1 : len(ids) - 1].tolist()
        assert targets == ids[start:]
        assert len(preds) == len(targets) > 0


def test_encode_pair_fits_max_length(tiny_tokenizer):
    ids, start = encode_pair(tiny_tokenizer, "The harbour of Velmora", "opened " * 80, 40)
    assert len(ids) == 40 and 1 <= start < 40
    ids, start = encode_pair(tiny_tokenizer, "Velmora " * 80, "opened in 1871", 30)
    assert len(ids) <= 30 and start < len(ids) and ids[0] == tiny_tokenizer.bos_token_id


class _Engine:
    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer


def test_eval_extraction_on_a_memorizer(tiny_tokenizer):
    """A model whose logits always point at the true next token has ES = EM = 100; one
    that never does has 0."""
    pairs = [VerbMemPair("The harbour of Velmora", "opened in 1871. Its first master.")]
    ids, start = encode_pair(tiny_tokenizer, pairs[0].prompt, pairs[0].gt, None)
    vocab = len(tiny_tokenizer)

    class Oracle(torch.nn.Module):
        def __init__(self, shift: int) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.shift = shift

        def forward(self, input_ids, **_):
            nxt = torch.tensor(ids[1:] + [0])[: input_ids.shape[1]]
            logits = torch.zeros(*input_ids.shape, vocab)
            logits[0, torch.arange(len(nxt)), (nxt + self.shift) % vocab] = 1.0
            return type("Out", (), {"logits": logits})()

    right = eval_extraction(_Engine(Oracle(0), tiny_tokenizer), pairs)
    wrong = eval_extraction(_Engine(Oracle(1), tiny_tokenizer), pairs)
    assert (right.es, right.em) == (100.0, 100.0)
    assert (wrong.es, wrong.em) == (0.0, 0.0)
    assert right.records[0]["tokens"] == len(ids) - start
    assert eval_extraction(object(), pairs) is None  # no torch model behind the engine


# ----------------------------------------------------------------------------- GradNorm
def test_gradnorm_pins():
    grads = [torch.tensor([3.0, 4.0]), torch.tensor([0.0, 1.0])]
    assert mean_gradient_norm(grads) == pytest.approx(3.0)  # global norm would be 5.099
    assert mean_gradient_norm(grads, 1) == pytest.approx(4.0)
    assert mean_gradient_norm(grads, float("inf")) == pytest.approx(2.5)
    assert gradnorm_auc([0.1, 0.4], [0.35, 0.8]) == pytest.approx(0.75)
    assert mia_auc([0.1, 0.4], [0.35, 0.8]) == pytest.approx(0.25)  # MUSE's orientation
    assert gradnorm_auc([0.5, 0.5], [0.5, 0.5]) == pytest.approx(0.5)  # ties count 1/2


def test_gradnorm_scores_match_manual_backward(tiny_model, tiny_tokenizer):
    """Each score is the mean of the per-tensor gradient norms of the text's mean NLL,
    computed here by an independent route (HF's own loss); the model is left as it was."""
    texts = ["The harbour of Velmora opened in 1871.", "Kestrel Bank reported a profit."]
    before = snapshot(tiny_model)
    marker = torch.ones_like(next(tiny_model.parameters()))
    next(tiny_model.parameters()).grad = marker.clone()
    scores = gradnorm_scores(tiny_model, tiny_tokenizer, texts)
    for text, score in zip(texts, scores, strict=True):
        ids = torch.tensor([tiny_tokenizer(text)["input_ids"]])
        tiny_model.zero_grad(set_to_none=True)
        loss = tiny_model(input_ids=ids, labels=ids).loss
        loss.backward()
        norms = [p.grad.norm().item() for p in tiny_model.parameters() if p.grad is not None]
        assert score == pytest.approx(sum(norms) / len(norms), rel=1e-4)
    tiny_model.zero_grad(set_to_none=True)
    after = snapshot(tiny_model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not tiny_model.training


def test_gradnorm_restores_grads_and_flags(tiny_model, tiny_tokenizer):
    first = next(tiny_model.parameters())
    first.grad = torch.full_like(first, 7.0)
    first.requires_grad_(False)
    gradnorm_scores(tiny_model, tiny_tokenizer, ["The council of Dunmere voted."])
    assert torch.equal(first.grad, torch.full_like(first, 7.0))
    assert not first.requires_grad
    first.requires_grad_(True)
    first.grad = None


def test_gradnorm_rejects_bad_norm_and_short_text(tiny_model, tiny_tokenizer):
    from muse_bench.core.errors import ConfigError

    with pytest.raises(ConfigError):
        mean_gradient_norm([torch.ones(2)], 3)
    assert math.isnan(gradnorm_scores(tiny_model, tiny_tokenizer, [""])[0])
