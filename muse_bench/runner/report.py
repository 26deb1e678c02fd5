"""The publishing stage's content: a run's report.json assembled from its requests'
results and the reference evaluations."""

from __future__ import annotations

from typing import Any

from muse_bench.runner.evaluation import EVAL_KEYS
from muse_bench.runner.manifest import plan_manifest
from muse_bench.runner.plan import RunPlan
from muse_bench.runner.records import now_iso, versions
from muse_bench.runner.ref_attack import retrain_losses, with_reference_attack


def fold_rows(
    plan: RunPlan, results: dict[str, dict[str, Any]], protocol: str
) -> list[dict[str, Any]] | None:
    """One row per fold of a scale or sustain protocol (None when the run has none)."""
    labels = [r.label for r in plan.requests if r.protocol == protocol]
    if not labels:
        return None
    return [
        {
            "fold": results[lb]["fold"] if protocol != "sustain" else i,
            "docs": results[lb]["docs"],
            "tokens": results[lb]["tokens"],
            "selected": results[lb]["selected"],
            **results[lb]["metrics"],
        }
        for i, lb in enumerate(labels, 1)
    ]


def run_report(
    plan: RunPlan,
    results: dict[str, dict[str, Any]],
    refs: dict[str, dict[str, Any]],
    timings: dict[str, float],
    robustness: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The report of a finished run: the main request's evaluation, its selection curve,
    the references' metrics, the scale and sustain folds, the robustness checks
    (`muse_bench.robustness.stage`), versions and timings (the run's stages in `timings`:
    total_s, references_s, robustness_s; each request's under its label)."""
    cfg = plan.cfg
    main = results["single_1"]
    losses = retrain_losses(  # cached by the reference stage
        plan.task,
        cfg.out / ".cache",
        plan.device,
        cfg.batch_size,
        cfg.allow_pickle,
        cfg.trust_remote_code,
    )
    attacks = with_reference_attack(
        main["attacks"], plan.dir / "examples" / "single_1.json", losses
    )
    return {
        "name": cfg.name or plan.algo_name,
        "run_id": plan.run_id,
        "benchmark": plan.task.corpus.benchmark_id,
        "corpus": plan.task.corpus.name,
        "algo": plan.algo_name,
        "params": plan.resolved_params,
        "protocol": cfg.protocol,
        "seed": cfg.seed,
        "select": cfg.select,
        "selected": main["selected"],
        "curve": main["curve"],
        "model": main["model"],
        "data_dir": str(plan.task.corpus.data_dir),
        "source": cfg.source,
        "engine": cfg.engine,
        "device": plan.device,
        "numerics": plan.numerics,
        **{k: main.get(k) for k in EVAL_KEYS},  # results written before `extra` lack it
        "attacks": attacks,
        "reference": {k: {"metrics": v["metrics"], "run_id": v["run_id"]} for k, v in refs.items()},
        "scale": fold_rows(plan, results, "scale"),
        "sustain": fold_rows(plan, results, "sustain"),
        "robustness": robustness or {},
        "versions": versions(),
        "manifest": plan_manifest(plan),
        "created": now_iso(),
        "timings": {
            **{k: round(v, 2) for k, v in timings.items()},
            **{k: v["timings"] for k, v in results.items()},
        },
    }
