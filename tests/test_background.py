"""Background scoring: same numbers as scoring in line, errors and modes handled, threads restored."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from conftest import make_tiny_model

from muse_bench.core.types import RetrainAUC
from muse_bench.engines import HFEngine
from muse_bench.engines.background import LANE, Lane, ScoringJob, torch_threads
from muse_bench.engines.base import Ready, submit_token_logprobs
from muse_bench.metrics import evaluate
from muse_bench.metrics.mia import score_documents, submit_documents

TEXTS = [
    "The harbour of Velmora opened in 1841 after a long winter.",
    "Kestrel",
    "The council of Dunmere voted 7 to 2 to close the old mill.",
    "Question: Who founded the Orrin Guild?\nAnswer: Tamsin Vey",
    "A",
] * 3


def assert_same_scores(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g.logprobs, w.logprobs)
        if w.has_stats:
            np.testing.assert_array_equal(g.mean, w.mean)
            np.testing.assert_array_equal(g.std, w.std)


def test_torch_threads_sets_and_restores():
    before = torch.get_num_threads()
    with torch_threads(before + 1):
        assert torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before


def test_lane_is_used_only_on_cpu_with_two_threads():
    with torch_threads(1):
        assert not Lane.useful(torch.device("cpu"))
    with torch_threads(2):
        assert Lane.useful(torch.device("cpu"))
        assert not Lane.useful(torch.device("meta"))


@pytest.mark.parametrize("with_stats", [False, True])
def test_background_scores_equal_scoring_in_line(tiny_tokenizer, with_stats):
    model = make_tiny_model(tiny_tokenizer)
    # batch_size 2: many batches, so both threads score some of each job
    engine = HFEngine(model=model, tokenizer=tiny_tokenizer, batch_size=2)
    want = engine.token_logprobs(TEXTS, with_stats)
    want_reversed = engine.token_logprobs(TEXTS[::-1], with_stats)  # batched otherwise
    with torch_threads(2):
        job = engine.submit_token_logprobs(TEXTS, with_stats)
        assert isinstance(job, ScoringJob)
        other = engine.submit_token_logprobs(TEXTS[::-1], with_stats)  # a second job queued
        generated = engine.generate(["The harbour"], 8)  # runs beside the lane
        got, got_reversed = job.result(), other.result()
    assert_same_scores(got, want)
    assert_same_scores(got_reversed, want_reversed)
    assert generated == HFEngine(model=model, tokenizer=tiny_tokenizer).generate(["The harbour"], 8)


def test_scores_at_once_where_the_lane_does_not_pay(tiny_tokenizer):
    model = make_tiny_model(tiny_tokenizer)
    with torch_threads(2):
        off = HFEngine(model=model, tokenizer=tiny_tokenizer, background_scoring=False)
        assert isinstance(off.submit_token_logprobs(TEXTS), Ready)
    with torch_threads(1):
        one = HFEngine(model=model, tokenizer=tiny_tokenizer)
        assert isinstance(one.submit_token_logprobs(TEXTS), Ready)


class PlainEngine:
    """An engine without submit_token_logprobs: the helper scores at once."""

    supports_stats = True

    def __init__(self, inner):
        self.inner, self.tokenizer, self.calls = inner, inner.tokenizer, []

    def token_logprobs(self, texts, with_stats=False, *, desc=None):
        self.calls.append(desc)
        return self.inner.token_logprobs(texts, with_stats)


def test_engines_without_a_lane_score_at_once(tiny_tokenizer):
    plain = PlainEngine(HFEngine(model=make_tiny_model(tiny_tokenizer), tokenizer=tiny_tokenizer))
    pending = submit_token_logprobs(plain, TEXTS, True, desc="bar")
    assert plain.calls == ["bar"]  # scored before result() was asked for
    assert_same_scores(pending.result(), plain.inner.token_logprobs(TEXTS, True))


def test_an_error_in_the_background_reaches_result(tiny_tokenizer):
    calls = []

    def score(batch):
        calls.append(threading.current_thread().name)
        if batch == [1]:
            raise ValueError("batch 1 failed")
        return [f"row {i}" for i in batch]

    with torch_threads(2):
        job = LANE.submit(ScoringJob(3, [[0], [1], [2]], score))
        with pytest.raises(ValueError, match="batch 1 failed"):
            job.result()
        ok = LANE.submit(ScoringJob(2, [[1], [0]], lambda b: [f"row {i}" for i in b]))
        assert ok.result() == ["row 0", "row 1"]  # the lane still works after an error
    assert calls  # the failing job did run


def test_cancel_drops_the_batches_not_started():
    job = ScoringJob(3, [[0], [1], [2]], lambda b: b)
    job.cancel()
    assert job.take() is None


def test_model_stays_in_eval_mode_while_any_block_runs_and_is_restored(tiny_tokenizer):
    model = make_tiny_model(tiny_tokenizer)
    model.config.attention_dropout = 0.5  # a train-mode forward would differ
    engine = HFEngine(model=model, tokenizer=tiny_tokenizer, batch_size=1)
    model.eval()
    want = engine.token_logprobs(TEXTS)
    model.train()
    modes = []
    real_score = engine._score

    def spying_score(rows, with_stats):
        modes.append((model.training, threading.current_thread().name))
        return real_score(rows, with_stats)

    engine._score = spying_score
    with torch_threads(2):
        job = engine.submit_token_logprobs(TEXTS)
        engine.generate(["The harbour", "Kestrel"], 16)
        got = job.result()
    assert not any(training for training, _ in modes)  # every batch ran in eval mode
    assert "muse-bench-scoring" in {name for _, name in modes}  # the lane did score some
    assert_same_scores(got, want)
    assert model.training  # restored once the last block ended


def test_threads_of_the_calling_thread_are_restored(tiny_tokenizer):
    engine = HFEngine(model=make_tiny_model(tiny_tokenizer), tokenizer=tiny_tokenizer)
    with torch_threads(2):
        job = engine.submit_token_logprobs(TEXTS * 4, True)
        engine.generate(["The harbour"], 8)
        assert torch.get_num_threads() == 2
        job.result()
        assert torch.get_num_threads() == 2


def test_documents_scored_in_background_equal_in_line(tiny_tokenizer):
    engine = HFEngine(model=make_tiny_model(tiny_tokenizer), tokenizer=tiny_tokenizer, batch_size=2)
    attacks = ["loss", "zlib", "lowercase", "min_k_20", "min_k_plus_plus_20"]
    want = score_documents(engine, TEXTS, attacks)
    with torch_threads(2):
        got = submit_documents(engine, TEXTS, attacks).result()
    assert got == want


def test_evaluate_equals_with_and_without_background_scoring(tiny_tokenizer, mini_benchmark):
    from muse_bench.data import load_corpus_dir

    corpus = load_corpus_dir("news", mini_benchmark[0])
    model = make_tiny_model(tiny_tokenizer)
    retrain = RetrainAUC(0.5, "min_k_40", {})
    results = []
    # in line on one thread; in the background with two, one for each side
    for background, threads in ((False, 1), (True, 2)):
        engine = HFEngine(
            model=model, tokenizer=tiny_tokenizer, batch_size=2, background_scoring=background
        )
        with torch_threads(threads):
            results.append(evaluate(engine, corpus, retrain, n_bootstrap=50, progress=False))
    assert results[0].to_dict() == results[1].to_dict()


def test_open_jobs_keep_their_threads_until_collected(tiny_tokenizer):
    engine = HFEngine(model=make_tiny_model(tiny_tokenizer), tokenizer=tiny_tokenizer)
    with torch_threads(4):
        job = engine.submit_token_logprobs(TEXTS)
        with LANE.foreground():
            assert torch.get_num_threads() == 2  # the job has the other two
        job.result()
        with LANE.foreground():
            assert torch.get_num_threads() == 4
        cancelled = engine.submit_token_logprobs(TEXTS)
        cancelled.cancel()
        with LANE.foreground():
            assert torch.get_num_threads() == 4


def test_a_failed_evaluation_releases_the_lane(tiny_tokenizer, mini_benchmark):
    """Generation fails after the scoring was submitted: the jobs are cancelled, so later
    work gets all the torch threads back."""
    from muse_bench.data import load_corpus_dir

    corpus = load_corpus_dir("news", mini_benchmark[0])
    engine = HFEngine(model=make_tiny_model(tiny_tokenizer), tokenizer=tiny_tokenizer)

    def broken_generate(*args, **kwargs):
        raise RuntimeError("decoding failed")

    engine.generate = broken_generate
    with torch_threads(2):
        with pytest.raises(RuntimeError, match="decoding failed"):
            evaluate(engine, corpus, RetrainAUC(0.5, "min_k_40", {}), progress=False)
        with LANE.foreground():
            assert torch.get_num_threads() == 2


def test_a_failed_part_of_document_scoring_releases_the_others(tiny_tokenizer, monkeypatch):
    engine = HFEngine(model=make_tiny_model(tiny_tokenizer), tokenizer=tiny_tokenizer)
    real_score = engine._score

    def failing_score(rows, with_stats):
        if with_stats:  # the texts' pass fails; the lowercased texts' pass is left open
            raise ValueError("scoring failed")
        return real_score(rows, with_stats)

    monkeypatch.setattr(engine, "_score", failing_score)
    with torch_threads(2):
        pending = submit_documents(engine, TEXTS, ["lowercase", "min_k_plus_plus_20"])
        with pytest.raises(ValueError, match="scoring failed"):
            pending.result()
        with LANE.foreground():
            assert torch.get_num_threads() == 2
