"""`muse run --seeds 0,1,2`: one ordinary run per seed, then one leaderboard row of their
mean with the spread across seeds next to the bootstrap interval.

The two measure different noise. The bootstrap interval resamples the evaluation items
of one model: it is the evaluation's noise (how much the score depends on which questions
were asked). The standard deviation across seeds compares models trained with different
seeds and evaluated on the same items (greedy decoding, so a model's score is
deterministic): it is the training's noise. A difference between two methods smaller
than either is not a difference.

Each seed's run is an ordinary run with its own directory and report (resumable, reused
when finished) whose row is not published, nor are the rows of its target and retrain
evaluations (each seed bootstraps with its own seed); the mean's report lives in
`OUT/<corpus>/<algo>/<algo>-seeds-<hash>/report.json` and is published as one row, after
the reference rows of the first seed.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from muse_bench.core.distributed import Processes, on_main
from muse_bench.core.errors import ConfigError
from muse_bench.core.io import atomic_write_json
from muse_bench.leaderboard.rows import METRICS
from muse_bench.runner.config import RunConfig, safe_dir_name
from muse_bench.runner.pipeline import run
from muse_bench.runner.records import now_iso, publish, reuse_report, short_hash


def parse_seeds(text: str) -> tuple[int, ...]:
    """`"0,1,2"` as (0, 1, 2); ConfigError unless two or more distinct integers >= 0."""
    try:
        seeds = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(
            f"--seeds must be comma-separated integers such as 0,1,2, not '{text}'."
        ) from None
    if len(seeds) < 2 or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ConfigError(
            f"--seeds needs two or more distinct seeds >= 0 (a spread of one is none), got '{text}'."
        )
    return seeds


def _mean_ci(reports: Sequence[dict[str, Any]], metric: str) -> list[float] | None:
    """The mean of the seeds' bootstrap bounds: the evaluation-noise interval of one
    seed's model, typical over the seeds (None when a seed has no interval)."""
    bounds = [(r.get("ci") or {}).get(metric) for r in reports]
    if any(b is None or None in b for b in bounds):
        return None
    return [statistics.fmean(b[0] for b in bounds), statistics.fmean(b[1] for b in bounds)]


def seeds_report(reports: Sequence[dict[str, Any]], seeds: Sequence[int]) -> dict[str, Any]:
    """The report of the mean over single-seed runs: metrics are the means, `ci` the
    mean bootstrap interval, `seeds` the per-seed numbers and the sample standard
    deviation (n-1) of each metric across seeds."""
    first = reports[0]
    metrics, std = {}, {}
    for m in METRICS:
        values = [r["metrics"][m] for r in reports]
        if any(v is None for v in values):
            metrics[m], std[m] = None, None
            continue
        metrics[m] = statistics.fmean(values)
        std[m] = statistics.stdev(values)
    runs = [
        {
            "seed": s,
            "run_id": r["run_id"],
            "selected": r.get("selected"),
            "metrics": r["metrics"],
        }
        for s, r in zip(seeds, reports, strict=True)
    ]
    manifest = dict(first.get("manifest") or {})
    if manifest:
        manifest["seeds"] = {"run": list(seeds), "torch": list(seeds), "bootstrap": list(seeds)}
    identity = {"runs": [r["run_id"] for r in reports]}
    return {
        "name": first.get("name"),
        "run_id": f"{first['algo']}-seeds-{short_hash(identity)}",
        "benchmark": first["benchmark"],
        "corpus": first["corpus"],
        "algo": first["algo"],
        "params": first.get("params"),
        "protocol": first.get("protocol"),
        "seed": None,
        "select": first.get("select"),
        "selected": ",".join(str(r.get("selected")) for r in reports),
        "source": first.get("source"),
        "engine": first.get("engine"),
        "device": first.get("device"),
        "metrics": metrics,
        "ci": {m: _mean_ci(reports, m) for m in METRICS},
        "ci_note": "mean over the seeds of each seed's bootstrap interval (evaluation noise)",
        "seeds": {"seeds": list(seeds), "std": std, "runs": runs},
        "attack": first.get("attack"),
        "reference": first.get("reference"),
        "scale": None,
        "sustain": None,
        "versions": first.get("versions"),
        "manifest": manifest or None,
        "created": now_iso(),
        "timings": {"total_s": round(sum(r["timings"]["total_s"] for r in reports), 2)},
    }


def run_seeds(
    cfg: RunConfig, seeds: Sequence[int], echo: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run `cfg` once per seed (ordinary runs, rows not published), then write and publish
    the report of their mean; returns it."""
    if cfg.protocol != "single":
        raise ConfigError("--seeds runs the single protocol only (the mean of folds is not kept).")
    reports = []
    for seed in seeds:
        echo(f"seed {seed}:")
        reports.append(run(replace(cfg, seed=seed, publish=False), echo))
    report = seeds_report(reports, seeds)
    path = cfg.out / report["corpus"] / safe_dir_name(report["algo"]) / report["run_id"]

    def save() -> dict[str, Any]:
        # the reference rows once: those of the first seed's evaluations
        for which, ref in (reports[0].get("reference") or {}).items():
            ref_dir = cfg.out / report["corpus"] / safe_dir_name(which) / ref["run_id"]
            reuse_report(ref_dir / "report.json", cfg.out)
        atomic_write_json(Path(path) / "report.json", report)
        report["report"] = str(Path(path) / "report.json")
        report["leaderboard"] = str(publish(report, cfg.out, replace=True))
        return report

    return on_main(save, Processes.current())
