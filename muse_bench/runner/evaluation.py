"""The evaluation stage: the six-way evaluation of one model, and what of it a report and
the examples file keep."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from muse_bench.core.io import atomic_write_json
from muse_bench.core.models import load_model_and_tokenizer
from muse_bench.core.types import RetrainAUC
from muse_bench.engines import make_engine
from muse_bench.engines.sharded import shard
from muse_bench.runner.config import RunConfig
from muse_bench.task import Task, local_model_dir

#: The keys of an evaluation that a report keeps (the examples go to their own file).
EVAL_KEYS = ("metrics", "ci", "attack", "attacks", "retrain_auc", "bootstrap", "extra")


def evaluate_model(engine, task: Task, rauc: RetrainAUC, cfg: RunConfig):
    """Evaluate the model behind `engine` on the task's corpus with the run's settings."""
    from muse_bench.metrics.evaluate import evaluate

    return evaluate(
        engine,
        task.corpus,
        rauc,
        attack=cfg.attack,
        seed=cfg.seed,
        n_bootstrap=cfg.n_bootstrap,
        progress=cfg.progress,
    )


def write_examples(run_dir: Path, label: str, result) -> Path:
    """Write an evaluation's generations (examples/<label>.json); returns the path."""
    path = run_dir / "examples" / f"{label}.json"
    atomic_write_json(path, result.to_dict()["examples"])
    return path


def eval_payload(result) -> dict[str, Any]:
    """The part of an evaluation that a report or a request's result keeps."""
    d = result.to_dict()
    return {k: d.get(k) for k in EVAL_KEYS}


def open_engine(
    model_spec: str,
    engine: str,
    device: str,
    batch_size: int,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
):
    """Load a checkpoint (path or hub id) and wrap it in an engine (split over the
    processes when there are several)."""
    path = local_model_dir(model_spec)
    if engine == "hf":
        model, tok = load_model_and_tokenizer(path, device, None, allow_pickle, trust_remote_code)
        eng = make_engine("hf", model=model, tokenizer=tok, device=device, batch_size=batch_size)
    else:
        eng = make_engine(engine, model_path=str(path), device=device, batch_size=batch_size)
    return shard(eng), path
