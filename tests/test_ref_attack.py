"""The `ref` attack in every report: the retrain model as reference, from cached losses."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from muse_bench.core.models import load_model_and_tokenizer
from muse_bench.engines.hf import HFEngine
from muse_bench.metrics.mia import mia_auc, score_documents
from muse_bench.runner import ref_attack as ra
from muse_bench.task import resolve_task


def test_reference_attack_by_hand() -> None:
    docs = [
        {"split": "forget", "id": 0, "loss": 1.0},
        {"split": "forget", "id": 1, "loss": 2.0},
        {"split": "holdout", "id": 0, "loss": 3.0},
        {"split": "holdout", "id": 1, "loss": 1.5},
    ]
    losses = {"forget": [2.0, 2.0], "holdout": [2.0, 3.0]}
    # ratios: forget 0.5, 1.0; holdout 1.5, 0.5 -> sklearn on labels 0/1 and -score
    expected = roc_auc_score([0, 0, 1, 1], [-0.5, -1.0, -1.5, -0.5])
    got = ra.reference_attack(docs, losses)
    assert got == {"auc": pytest.approx(expected), "reference": "retrain"}


def test_examples_file_round_trip(tmp_path) -> None:
    path = tmp_path / "eval.json"
    docs = [{"split": s, "id": 0, "loss": x} for s, x in (("forget", 1.0), ("holdout", 4.0))]
    path.write_text(json.dumps({"privleak": docs}))
    out = ra.with_reference_attack(
        {"loss": {"auc": 0.1}}, path, {"forget": [2.0], "holdout": [2.0]}
    )
    # forget ratio 0.5 < holdout 2.0: member-like, AUC 0 in MUSE's orientation
    assert out["loss"] == {"auc": 0.1} and out["ref"]["auc"] == 0.0
    assert ra.with_reference_attack({"x": 1}, tmp_path / "missing.json", {}) == {"x": 1}


@pytest.mark.slow  # three passes of the embedded models: seconds alone, minutes on a busy machine
def test_cached_losses_match_a_reference_engine(tmp_path) -> None:
    """The harness's route (the evaluation's losses / the cached retrain losses) gives the
    AUC of the `ref` attack scored with a reference engine (metrics.mia's own route)."""
    task = resolve_task("news")
    losses = ra.retrain_losses(task, tmp_path)
    assert len(losses["forget"]) == len(task.corpus.privleak_forget)
    model, tok = load_model_and_tokenizer(task.models.target, "cpu")
    ref_model, _ = load_model_and_tokenizer(task.models.retrain, "cpu")
    engine = HFEngine(model=model, tokenizer=tok, batch_size=8)
    ref_engine = HFEngine(model=ref_model, tokenizer=tok, batch_size=8)
    texts = {"forget": task.corpus.privleak_forget, "holdout": task.corpus.privleak_holdout}
    direct = {
        s: score_documents(engine, texts[s], ["loss", "ref"], ref_engine=ref_engine) for s in texts
    }
    docs = [
        {"split": s, "id": i, "loss": d["loss"]} for s in texts for i, d in enumerate(direct[s])
    ]
    ours = ra.reference_attack(docs, losses)["auc"]
    theirs = mia_auc([d["ref"] for d in direct["forget"]], [d["ref"] for d in direct["holdout"]])
    assert ours == pytest.approx(theirs, abs=1e-12)
    cached = json.loads(next((tmp_path / "retrain_loss").glob("*.json")).read_text())
    assert np.allclose(cached["forget"], losses["forget"])
    assert ra.retrain_losses(task, tmp_path) == losses  # read back from the cache
