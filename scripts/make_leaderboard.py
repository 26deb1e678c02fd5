"""Regenerate the published leaderboard of the embedded benchmarks.

Runs target, retrain and every built-in unlearner (with its documented defaults) on
embedded news and books, copies the leaderboard CSVs into `leaderboard/`, renders the
page there, and rewrites the reference table in README.md.

    .venv/bin/python scripts/make_leaderboard.py [--corpus news books] [--algo ...] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from muse_bench.leaderboard.page import render
from muse_bench.runner import RunConfig, run
from muse_bench.unlearners import UNLEARNERS

ROOT = Path(__file__).resolve().parent.parent
BUILTIN = ["ga", "ga_gdr", "ga_klr", "npo", "npo_gdr", "npo_klr", "tv", "whp"]
START, END = "<!-- REFERENCE-TABLE -->", "<!-- /REFERENCE-TABLE -->"


def table(reports: dict[str, list[dict]]) -> str:
    lines = [
        START,
        "",
        "| corpus | model | selected | verbmem_f ↓ | knowmem_f ↓ | privleak →0 | knowmem_r ↑ | time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for corpus, reps in reports.items():
        first = reps[0]
        for which in ("target", "retrain"):
            m = first["reference"][which]["metrics"]
            lines.append(
                f"| {corpus} | {which} | | {m['verbmem_f']:.1f} | {m['knowmem_f']:.1f} | "
                f"{m['privleak']:.1f} | {m['knowmem_r']:.1f} | |"
            )
        for r in reps:
            m = r["metrics"]
            lines.append(
                f"| {corpus} | {r['algo']} | {r['selected']} | {m['verbmem_f']:.1f} | "
                f"{m['knowmem_f']:.1f} | {m['privleak']:.1f} | {m['knowmem_r']:.1f} | "
                f"{r['timings']['total_s']:.0f} |"
            )
    lines += [
        "",
        "Produced by `.venv/bin/python scripts/make_leaderboard.py` (2 CPU cores; times include "
        "the reference evaluations for the first run of each corpus).",
        "",
        END,
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--corpus", nargs="+", default=["news", "books"])
    ap.add_argument("--algo", nargs="+", default=BUILTIN, choices=UNLEARNERS.names())
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "published")
    args = ap.parse_args()
    reports: dict[str, list[dict]] = {}
    for corpus in args.corpus:
        for algo in args.algo:
            t = time.time()
            rep = run(
                RunConfig(algo=algo, corpus=corpus, out=args.work, progress=False, device="cpu"),
                echo=lambda s: None,
            )
            print(
                f"{corpus:6s} {algo:8s} {rep['selected']:>10s} "
                + " ".join(f"{k}={v:.1f}" for k, v in rep["metrics"].items())
                + f" ({time.time() - t:.0f}s)",
                flush=True,
            )
            reports.setdefault(corpus, []).append(rep)
        shutil.copyfile(
            args.work / "leaderboard" / f"{corpus}.csv", ROOT / "leaderboard" / f"{corpus}.csv"
        )
    csvs = sorted((ROOT / "leaderboard").glob("*.csv"))
    page = render(csvs, ROOT / "leaderboard")
    print(f"rendered {page}")
    readme = (ROOT / "README.md").read_text()
    if START in readme:
        head, rest = readme.split(START, 1)
        tail = rest.split(END, 1)[1] if END in rest else rest
        (ROOT / "README.md").write_text(head + table(reports) + tail)
    (ROOT / "leaderboard" / "reports.json").write_text(
        json.dumps(
            {
                c: [
                    {k: r[k] for k in ("algo", "run_id", "selected", "metrics", "ci", "params")}
                    for r in reps
                ]
                for c, reps in reports.items()
            },
            indent=1,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
