"""The reference-model MIA attack (`ref`) of every evaluation, with the benchmark's retrain
model as the reference, as open-unlearning does.

`ref` scores a document by its loss under the evaluated model divided by its loss under
the reference model (`metrics.mia`). The evaluation already keeps each privleak
document's loss (examples file, `privleak` entries); the retrain model's losses on the
same documents are computed once per benchmark and retrain model and cached with their
provenance, like the retrain AUC, so the attack costs one pass of the retrain model over
the privleak documents, once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from muse_bench.core.distributed import on_main
from muse_bench.core.io import atomic_write_json
from muse_bench.runner.records import read_json
from muse_bench.task import Task, local_model_dir, model_fingerprint

SPLITS = ("forget", "holdout")


def retrain_losses(
    task: Task,
    cache_dir: Path,
    device: str = "cpu",
    batch_size: int = 32,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> dict[str, list[float]]:
    """The retrain model's loss (mean token NLL) of every privleak forget and holdout
    document, from the cache or computed now (every process takes part)."""
    from muse_bench.metrics.mia import score_documents
    from muse_bench.runner.evaluation import open_engine

    fingerprint = model_fingerprint(local_model_dir(task.models.retrain))
    key = f"{task.corpus.benchmark_id}__{fingerprint}".replace("/", "_")
    cache = cache_dir / "retrain_loss" / f"{key}.json"
    saved = on_main(lambda: read_json(cache))
    if saved is not None and all(isinstance(saved.get(s), list) for s in SPLITS):
        return {s: saved[s] for s in SPLITS}
    engine, _ = open_engine(
        task.models.retrain, "hf", device, batch_size, allow_pickle, trust_remote_code
    )
    texts = {"forget": task.corpus.privleak_forget, "holdout": task.corpus.privleak_holdout}
    losses = {s: [d["loss"] for d in score_documents(engine, texts[s], ["loss"])] for s in SPLITS}
    entry = {**losses, "model": task.models.retrain, "model_fingerprint": fingerprint}
    on_main(lambda: atomic_write_json(cache, entry))
    return losses


def reference_attack(
    documents: Sequence[Mapping[str, Any]], losses: Mapping[str, Sequence[float]]
) -> dict[str, Any]:
    """The `ref` attack's AUC from an evaluation's privleak documents (each with `split`,
    `id` and `loss`) and the retrain model's losses of the same documents."""
    from muse_bench.metrics.mia import mia_auc

    ratios: dict[str, list[float]] = {s: [] for s in SPLITS}
    for doc in documents:
        ratios[doc["split"]].append(doc["loss"] / losses[doc["split"]][doc["id"]])
    return {"auc": mia_auc(ratios["forget"], ratios["holdout"]), "reference": "retrain"}


def with_reference_attack(
    attacks: Mapping[str, Any], examples_path: Path, losses: Mapping[str, Sequence[float]]
) -> dict[str, Any]:
    """`attacks` plus `ref`, computed from the examples file of the same evaluation
    (unchanged when the file or its per-document losses are missing)."""
    examples = read_json(examples_path) or {}
    documents = examples.get("privleak") or []
    if not documents or any("loss" not in d for d in documents):
        return dict(attacks)
    return {**attacks, "ref": reference_attack(documents, losses)}
