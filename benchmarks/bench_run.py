"""End-to-end wall time of `muse run` per method, and where the time goes.

Each method runs as a user runs it, `muse run --algo NAME --corpus CORPUS` in a fresh
process (so start-up and imports count), one at a time, into a fresh output directory
whose reference evaluations (target, retrain, retrain AUC) were computed once beforehand:
they are cached per benchmark and reused by every later run, so they are reported once,
on their own line. The breakdown comes from the report's timings:

    start-up   process wall time minus the run's own total (imports, checks, model load)
    train      every epoch's training (summed; the per-epoch list is in the report)
    select     every epoch's knowmem_f evaluation for model selection (summed)
    final      the full six-way evaluation of the selected model
    write      examples, the chosen model, result.json and the leaderboard row

    python benchmarks/bench_run.py                       # every registered method, news
    python benchmarks/bench_run.py --algo npo ga --corpus books
    python benchmarks/bench_run.py --algo npo --keep-denormal    # the pre-fix behaviour
    python benchmarks/bench_run.py --algo npo --extra=--protocol --extra=all

Run it with nothing else on the machine: two torch processes on 2 cores distort each
other's timings. Prints a Markdown table (paste it into the README).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def muse(args: list[str]) -> float:
    """Run `muse ARGS` in a fresh process; returns its wall time in seconds."""
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "muse_bench.cli", *args], capture_output=True, text=True
    )
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"muse {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return elapsed


def breakdown(report: dict, wall: float) -> dict[str, float]:
    """Seconds per stage of one run, from its report's timings."""
    t = report["timings"]
    # fold 1 of scale and sustain is the main request, listed under each label: count once
    unique = {json.dumps(v, sort_keys=True): v for v in t.values() if isinstance(v, dict)}
    requests = list(unique.values())
    epochs = [e for r in requests for e in r.get("epochs", [])]
    return {
        "wall": wall,
        "startup": wall - t["total_s"],
        "references": t.get("references_s", 0.0),
        "train": sum(e["train_s"] for e in epochs),
        "select": sum(e["select_eval_s"] for e in epochs),
        "final": sum(r.get("final_eval_s", 0.0) for r in requests),
        "write": sum(r.get("write_s", 0.0) for r in requests),
        "epochs": len(epochs),
    }


def find_report(out: Path, corpus: str, algo: str) -> dict:
    reports = sorted((out / corpus / algo).glob("*/report.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(reports[-1].read_text())


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--algo", nargs="+", default=None, help="Methods (default: all registered).")
    ap.add_argument("--corpus", default="news")
    ap.add_argument("--keep-denormal", action="store_true", help="Run without flush-to-zero.")
    ap.add_argument("--extra", action="append", default=[], help="More `muse run` arguments.")
    ap.add_argument("--out", type=Path, default=None, help="Output dir (default: a temp dir).")
    args = ap.parse_args()
    from muse_bench.data import parse_corpus

    if args.algo is None:
        from muse_bench.catalogue import load

        args.algo = [m["name"] for m in load()["unlearners"]]
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_run_"))
    common = ["--corpus", args.corpus, "--out", str(out), "--quiet", "--device", "cpu"]
    if args.keep_denormal:
        common.append("--keep-denormal")

    list_s = muse(["list"])  # builds the listing cache if needed
    list_s = min(muse(["list"]) for _ in range(3))
    refs = [muse(["eval", "--model", which, *common]) for which in ("target", "retrain")]
    print(f"muse list: {list_s:.2f} s (best of 3, cached listing)")
    print(
        f"reference evaluations (once per benchmark, then cached): target {refs[0]:.1f} s, "
        f"retrain {refs[1]:.1f} s (wall, including start-up)\n"
    )
    print(
        "| method | wall (s) | start-up | references | train | select | final eval | write "
        "| epochs |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for algo in args.algo:
        wall = muse(["run", "--algo", algo, *common, *args.extra])
        b = breakdown(find_report(out, parse_corpus(args.corpus)[0], algo), wall)
        print(
            f"| {algo} | {b['wall']:.1f} | {b['startup']:.1f} | {b['references']:.1f} | "
            f"{b['train']:.1f} | {b['select']:.1f} | {b['final']:.1f} | {b['write']:.1f} | "
            f"{b['epochs']} |",
            flush=True,
        )
    print(f"\nmuse run --algo NAME {' '.join(common + args.extra)} (outputs in {out})")


if __name__ == "__main__":
    main()
