"""Across-seed spread of finished runs, against issue #19's goals.

Reads every report.json under RUNS (e.g. a sweep's `OUT/sweeps/<name>/runs`, made by
`muse sweep sweeps/baselines_v3_seeds.toml`), groups the runs by corpus and method, and
prints per group: the selected candidates, each metric's mean ± sample std across seeds
and the mean half-width of the seeds' bootstrap 95% intervals; then the goals (std of
knowmem_f and knowmem_r <= 5, half-widths <= 7 for knowmem and <= 20 for privleak) and
whether the ranking of the methods by knowmem_r is the same for every seed.

    python benchmarks/seed_spread.py runs/sweeps/baselines_v3_seeds/runs [--markdown]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

METRICS = ("verbmem_f", "knowmem_f", "privleak", "knowmem_r")
STD_GOAL = {"knowmem_f": 5.0, "knowmem_r": 5.0}
HALF_WIDTH_GOAL = {"knowmem_f": 7.0, "knowmem_r": 7.0, "privleak": 20.0}


def load(runs: Path) -> dict[tuple[str, str], dict[int, dict]]:
    """(corpus, method) -> seed -> report, for the single-protocol unlearning runs."""
    groups: dict[tuple[str, str], dict[int, dict]] = defaultdict(dict)
    for path in sorted(runs.glob("*/*/*/report.json")):
        report = json.loads(path.read_text())
        if report.get("algo") in ("target", "retrain") or report.get("seed") is None:
            continue
        groups[(report["corpus"], report.get("name") or report["algo"])][report["seed"]] = report
    return groups


def half_width(report: dict, metric: str) -> float:
    lo, hi = report["ci"][metric]
    return (hi - lo) / 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path)
    args = ap.parse_args()
    groups = load(args.runs)
    if not groups:
        raise SystemExit(f"no finished single-seed runs under {args.runs}")
    misses: list[str] = []
    by_corpus: dict[str, dict[str, dict[int, dict]]] = defaultdict(dict)
    for (corpus, method), seeds in sorted(groups.items()):
        by_corpus[corpus][method] = seeds
    for corpus, methods in by_corpus.items():
        print(f"\n{corpus}: mean ± std across seeds [mean 95% CI half-width]\n")
        print("| method | seeds | selected | " + " | ".join(METRICS) + " |")
        print("|---|---|---|" + "---|" * len(METRICS))
        for method, seeds in methods.items():
            reps = [seeds[s] for s in sorted(seeds)]
            cells = []
            for m in METRICS:
                values = [r["metrics"][m] for r in reps]
                hw = statistics.fmean(half_width(r, m) for r in reps)
                if len(values) < 2:  # no spread to measure: not counted as meeting the goal
                    cells.append(f"{values[0]:.1f} ± n/a [{hw:.1f}]")
                    if m in STD_GOAL:
                        misses.append(f"{corpus} {method}: one seed, no std of {m}")
                    std = None
                else:
                    std = statistics.stdev(values)
                    cells.append(f"{statistics.fmean(values):.1f} ± {std:.1f} [{hw:.1f}]")
                if std is not None and m in STD_GOAL and std > STD_GOAL[m]:
                    misses.append(f"{corpus} {method}: std of {m} {std:.1f} > {STD_GOAL[m]:g}")
                if m in HALF_WIDTH_GOAL and hw > HALF_WIDTH_GOAL[m]:
                    misses.append(
                        f"{corpus} {method}: half-width of {m} {hw:.1f} > {HALF_WIDTH_GOAL[m]:g}"
                    )
            selected = ", ".join(
                str(r["selected"]).replace("epoch_", "").replace("alpha_", "α") for r in reps
            )
            print(f"| {method} | {len(reps)} | {selected} | " + " | ".join(cells) + " |")
        seeds_all = sorted(set.intersection(*(set(s) for s in methods.values())))
        rankings = {}
        for s in seeds_all:
            order = sorted(methods, key=lambda m: -methods[m][s]["metrics"]["knowmem_r"])
            rankings[s] = order
            print(
                f"\nseed {s} ranking by knowmem_r: "
                + " > ".join(f"{m} {methods[m][s]['metrics']['knowmem_r']:.0f}" for m in order)
            )
        same = len({tuple(r) for r in rankings.values()}) == 1
        print(f"\nranking by knowmem_r identical for seeds {seeds_all}: {same}")
    print("\ngoals missed:" if misses else "\nall goals met")
    for line in misses:
        print("  " + line)


if __name__ == "__main__":
    main()
