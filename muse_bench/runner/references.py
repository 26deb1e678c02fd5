"""The reference stage of a run, and `muse eval`: the cached retrain AUC that privleak
needs, and the evaluations of a checkpoint (the target and the retrain model), each cached
by benchmark, weights and settings, so every later run reuses them.

The retrain AUC is computed from the benchmark's real retrain model, never assumed, and
cached with its provenance (model fingerprint, data fingerprint, attack, harness version).
With several processes, engines split their inputs over them, and the main process alone
reads and writes the cache (so all of them agree on whether to compute).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from muse_bench import __version__
from muse_bench.core.distributed import on_main
from muse_bench.core.io import atomic_write_json
from muse_bench.core.types import RetrainAUC
from muse_bench.data import data_fingerprint
from muse_bench.runner.config import (
    RunConfig,
    apply_numerics,
    check_model,
    run_device,
    safe_dir_name,
)
from muse_bench.runner.evaluation import eval_payload, evaluate_model, open_engine, write_examples
from muse_bench.runner.manifest import run_manifest
from muse_bench.runner.records import now_iso, publish, reuse_report, short_hash, versions
from muse_bench.runner.ref_attack import retrain_losses, with_reference_attack
from muse_bench.task import Task, local_model_dir, model_fingerprint

# MUSE's published forget-vs-holdout Min-40% AUCs of its retrain models. Used for hub
# data only when asked (--retrain-auc published), and always recorded as such.
PUBLISHED_RETRAIN_AUC = {"news": 0.4772, "books": 0.5393}


def _read_cache(path: Path) -> dict | None:
    """A cached retrain AUC, or None if absent or unreadable (then it is computed again)."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(saved, dict) or not {"auc", "attack", "provenance"} <= saved.keys():
        return None
    return saved


def retrain_auc(
    task: Task,
    attack: str,
    cache_dir: Path,
    engine: str = "hf",
    device: str = "cpu",
    batch_size: int = 32,
    published: bool = False,
    progress: bool = True,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> RetrainAUC:
    """The retrain model's AUC for `attack`, from the cache or computed now."""
    from muse_bench.metrics.privleak import compute_retrain_auc

    if published:
        if task.source != "hub" or attack != "min_k_40":
            from muse_bench.core.errors import ConfigError

            raise ConfigError(
                "published retrain AUCs exist only for hub MUSE data with attack min_k_40."
            )
        return RetrainAUC(
            PUBLISHED_RETRAIN_AUC[task.corpus.name],
            attack,
            {"source": "MUSE paper (published constant)", "benchmark": task.corpus.benchmark_id},
        )
    retrain_path = local_model_dir(task.models.retrain)
    key = f"{task.corpus.benchmark_id}__{model_fingerprint(retrain_path)}__{attack}".replace(
        "/", "_"
    )
    cache = cache_dir / "retrain_auc" / f"{key}.json"
    saved = on_main(lambda: _read_cache(cache))
    if saved is not None:
        return RetrainAUC(saved["auc"], saved["attack"], saved["provenance"])
    eng, _ = open_engine(
        task.models.retrain, engine, device, batch_size, allow_pickle, trust_remote_code
    )
    provenance = {
        "model": task.models.retrain,
        "model_fingerprint": model_fingerprint(retrain_path),
        "data_fingerprint": data_fingerprint(task.corpus.data_dir),
        "attack": attack,
        "harness_version": __version__,
    }
    result = compute_retrain_auc(
        eng, task.corpus, attack, provenance, desc="retrain AUC" if progress else None
    )
    entry = {"auc": result.auc, "attack": result.attack, "provenance": result.provenance}
    on_main(lambda: atomic_write_json(cache, entry))
    return result


def eval_checkpoint(
    cfg: RunConfig,
    task: Task,
    model_spec: str,
    name: str,
    rauc: RetrainAUC,
    echo: Callable[[str], None] = print,
    checks: Sequence[str] = (),
) -> dict[str, Any]:
    """Evaluate one checkpoint (`muse eval`); cached by benchmark, weights and settings.

    `checks` (robustness checks) are run on it after the evaluation and kept in the
    report's `robustness` section; a cached report that lacks some gets them added."""
    path = check_model(model_spec, cfg)
    identity = {
        "benchmark": task.corpus.benchmark_id,
        "model": model_fingerprint(path),
        "attack": cfg.attack,
        "seed": cfg.seed,
        "n_bootstrap": cfg.n_bootstrap,
        "retrain_auc": rauc.auc,
        "flush_denormal": cfg.flush_denormal,
    }
    dir_name = safe_dir_name(name)
    run_id = f"{dir_name}-{short_hash(identity)}"
    run_dir = cfg.out / task.corpus.name / dir_name / run_id
    report_path = run_dir / "report.json"
    report = None if cfg.force else on_main(lambda: reuse_report(report_path, cfg.out, cfg.publish))
    if report is not None:
        return _with_checks(cfg, task, rauc, report, str(path), run_dir, checks, echo)
    start = time.time()
    device = run_device(cfg.device)
    numerics = apply_numerics(cfg)
    # the retrain model's per-document losses for the `ref` attack (cached), loaded and
    # freed before the evaluated model is
    losses = retrain_losses(
        task, cfg.out / ".cache", device, cfg.batch_size, cfg.allow_pickle, cfg.trust_remote_code
    )
    engine, _ = open_engine(
        str(path), cfg.engine, device, cfg.batch_size, cfg.allow_pickle, cfg.trust_remote_code
    )
    echo(f"evaluating {name} ({model_spec})")
    result = evaluate_model(engine, task, rauc, cfg)

    def save() -> dict[str, Any]:
        """Write the examples, report and leaderboard row (main process only)."""
        examples = write_examples(run_dir, "eval", result)
        payload = eval_payload(result)
        payload["attacks"] = with_reference_attack(payload["attacks"], examples, losses)
        report = {
            "name": name,
            "run_id": run_id,
            "benchmark": task.corpus.benchmark_id,
            "corpus": task.corpus.name,
            "algo": name if name in ("target", "retrain") else "eval",
            "params": {},
            "protocol": "eval",
            "seed": cfg.seed,
            "selected": None,
            "model": str(path),
            "data_dir": str(task.corpus.data_dir),
            "engine": cfg.engine,
            "device": device,
            "numerics": numerics,
            **payload,
            "scale": None,
            "sustain": None,
            "robustness": {},
            "versions": versions(),
            "manifest": run_manifest(
                task=task,
                device=device,
                params={},
                seed=cfg.seed,
                attack=cfg.attack,
                n_bootstrap=cfg.n_bootstrap,
                select=None,
                engine=cfg.engine,
                eval_batch_size=cfg.batch_size,
            ),
            "created": now_iso(),
            "timings": {"total_s": round(time.time() - start, 2)},
        }
        atomic_write_json(report_path, report)
        if cfg.publish:  # not for the single-seed runs of --seeds (runner/seeds.py)
            publish(report, cfg.out, replace=cfg.force)
        return report

    report = on_main(save)
    return _with_checks(cfg, task, rauc, report, str(path), run_dir, checks, echo)


def _with_checks(
    cfg: RunConfig,
    task: Task,
    rauc: RetrainAUC,
    report: dict[str, Any],
    model_path: str,
    run_dir: Path,
    checks: Sequence[str],
    echo: Callable[[str], None],
) -> dict[str, Any]:
    """`report` with the robustness checks it lacks run and added (report.json and the
    leaderboard row rewritten then)."""
    from muse_bench.robustness.stage import robustness_section

    done = report.get("robustness") or {}
    if all(name in done for name in checks):
        return report
    refs = reference_reports(cfg, task, rauc, echo)
    section = robustness_section(
        cfg, task, rauc, checks, model_path, report["metrics"], refs, run_dir, echo
    )

    def save() -> dict[str, Any]:
        report["robustness"] = {**done, **section}
        atomic_write_json(run_dir / "report.json", report)
        publish(report, cfg.out, replace=True)
        return report

    return on_main(save)


def reference_reports(
    cfg: RunConfig, task: Task, rauc: RetrainAUC, echo: Callable[[str], None] = print
) -> dict[str, dict[str, Any]]:
    """The target's and the retrain model's evaluations (cached; rows published once)."""
    return {
        which: eval_checkpoint(cfg, task, getattr(task.models, which), which, rauc, echo)
        for which in ("target", "retrain")
    }
