"""The training stage of a run: one forget request unlearned from its start model, its
candidates scored for selection, the selected model evaluated and saved.

Each request keeps its state under `<run>/requests/<label>/` (checkpoints, the selection
curve, then result.json), so a killed run resumes inside the request it was in, and a
finished request is never redone.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch

from muse_bench.core.distributed import on_main
from muse_bench.core.io import atomic_write_json
from muse_bench.core.models import load_model_and_tokenizer, save_model
from muse_bench.core.types import ForgetRequest, RetrainAUC
from muse_bench.engines import make_engine
from muse_bench.engines.sharded import shard
from muse_bench.runner.evaluation import eval_payload, evaluate_model, write_examples
from muse_bench.runner.plan import RunPlan
from muse_bench.runner.records import read_json
from muse_bench.runner.selection import select_candidate
from muse_bench.task import local_model_dir


def fold_tokens(tokenizer, docs: tuple[str, ...]) -> int:
    """The number of tokens of a forget fold, as reported for scale and sustain."""
    return len(tokenizer("\n\n".join(docs), add_special_tokens=False)["input_ids"])


def engine_for(plan: RunPlan, model, tokenizer, label: str):
    """An engine on `model`, split over the processes when there are several."""
    if plan.cfg.engine == "hf":
        engine = make_engine(
            "hf",
            model=model,
            tokenizer=tokenizer,
            device=plan.device,
            batch_size=plan.cfg.batch_size,
        )
    else:
        path = plan.dir / "requests" / label / "engine_model"
        on_main(lambda: save_model(model, tokenizer, path), plan.procs)
        engine = make_engine(
            plan.cfg.engine,
            model_path=str(path),
            device=plan.device,
            batch_size=plan.cfg.batch_size,
        )
    return shard(engine, plan.procs)


def _context(plan: RunPlan, req: ForgetRequest):
    from muse_bench.unlearners import UnlearnContext

    return UnlearnContext(
        device=plan.device,
        seed=plan.cfg.seed,
        work_dir=plan.dir / "requests" / req.label / "ckpt",
        progress=plan.cfg.progress,
    )


def _load_start(plan: RunPlan, req: ForgetRequest, previous: Path | None):
    """The model a request starts from: the target, or the previous sustain request's."""
    from muse_bench.unlearners import load_unlearned

    if req.start == "previous" and previous is not None:
        return load_unlearned(previous, plan.device)
    return load_model_and_tokenizer(
        local_model_dir(plan.task.models.target),
        plan.device,
        None,
        plan.cfg.allow_pickle,
        plan.cfg.trust_remote_code,
    )


def finished_request(req_dir: Path) -> dict[str, Any] | None:
    """A finished request's result (its checkpoints removed, in case a killed run left
    them), or None if it has not finished."""
    finished = read_json(req_dir / "result.json")
    if finished is not None:
        shutil.rmtree(req_dir / "ckpt", ignore_errors=True)  # killed while cleaning up
    return finished


def unlearn_request(
    plan: RunPlan, req: ForgetRequest, previous: Path | None, threshold: float, rauc: RetrainAUC
) -> dict[str, Any]:
    """Unlearn `req`, select a candidate against `threshold`, evaluate it; returns the
    request's result (read back when the request had finished before)."""
    from muse_bench.metrics.evaluate import evaluate_knowmem_f

    req_dir = plan.dir / "requests" / req.label
    finished = on_main(lambda: finished_request(req_dir), plan.procs)
    if finished is not None:
        return finished
    torch.manual_seed(plan.cfg.seed)
    start = time.time()
    model, tok = _load_start(plan, req, previous)
    plan.echo(f"[{req.label}] unlearning {len(req.forget)} documents with {plan.algo_name}")
    curve_path = req_dir / "curve.json"
    cached = on_main(lambda: read_json(curve_path), plan.procs) or {}

    def score(cand) -> float:
        value = evaluate_knowmem_f(engine_for(plan, cand.model, tok, req.label), plan.task.corpus)
        cached[cand.label] = value
        on_main(lambda: atomic_write_json(curve_path, cached), plan.procs)
        plan.echo(f"[{req.label}] {cand.label}: knowmem_f {value:.1f} (retrain {threshold:.1f})")
        return value

    candidates = plan.unlearner.candidates(model, tok, req, _context(plan, req))
    chosen, curve, epoch_timings = select_candidate(
        candidates, score, threshold, plan.cfg.select, cached
    )
    unlearn_s = time.time() - start
    engine = engine_for(plan, chosen.model, tok, req.label)
    result = evaluate_model(engine, plan.task, rauc, plan.cfg)
    final_eval_s = time.time() - start - unlearn_s

    def save() -> dict[str, Any]:
        """Write the examples, the chosen model and result.json (main process only)."""
        saving = time.time()
        write_examples(plan.dir, req.label, result)
        keep_model = req.protocol == "single" or req.protocol == "sustain"
        model_path = save_model(chosen.model, tok, req_dir / "model") if keep_model else None
        out = {
            "label": req.label,
            "protocol": req.protocol,
            "fold": req.index,
            "docs": len(req.forget),
            "tokens": fold_tokens(tok, req.forget),
            "selected": chosen.label,
            "curve": curve,
            "model": str(model_path) if model_path else None,
            **eval_payload(result),
            "timings": {
                "unlearn_s": round(unlearn_s, 2),
                "epochs": epoch_timings,
                "final_eval_s": round(final_eval_s, 2),
                "total_s": round(time.time() - start, 2),
            },
        }
        out["timings"]["write_s"] = round(time.time() - saving, 2)
        atomic_write_json(req_dir / "result.json", out)
        shutil.rmtree(req_dir / "ckpt", ignore_errors=True)
        shutil.rmtree(req_dir / "engine_model", ignore_errors=True)
        return out

    # the next sustain request loads the saved model: every process waits for it here
    return on_main(save, plan.procs)
