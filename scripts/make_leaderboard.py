"""Regenerate the published leaderboard of the embedded benchmarks.

Runs target, retrain and every built-in unlearner (with its documented defaults) on
embedded news and books, copies the leaderboard CSVs into `leaderboard/`, renders the
page there, and rewrites the reference table in README.md.

    .venv/bin/python scripts/make_leaderboard.py [--corpus news books] [--algo ...] [--work DIR]

Besides one row per method (its embedded defaults, seed 0), it publishes the update-rule
variants in VARIANTS as rows of their own (`npo+zo`, ...), each named after its option.
A finished run in --work is reused, so a rerun after an interruption, or after a sweep
that made the same runs in the same directory, only does what is missing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from muse_bench.leaderboard.page import render
from muse_bench.runner import RunConfig, run
from muse_bench.runner.records import leaderboard_path, publish, read_json
from muse_bench.unlearners import UNLEARNERS

ROOT = Path(__file__).resolve().parent.parent

# Leaderboard rows of the update-rule options (issue #16): row name -> (method, -P options).
# ZO's settings are the best found on embedded news (README "Update rules"); SAM's rho and
# SURE's quantile are their papers'.
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "npo+zo": ("npo", ("optimizer=zo", "lr=1e-5", "batch_size=1", "zo_samples=4", "epochs=3")),
    "npo_gdr+sam": ("npo_gdr", ("sam_rho=0.01",)),
    "ga_gdr+sure": ("ga_gdr", ("sure_quantile=0.9",)),
}
START, END = "<!-- REFERENCE-TABLE -->", "<!-- /REFERENCE-TABLE -->"
RSTART, REND = "<!-- ROBUSTNESS-TABLE -->", "<!-- /ROBUSTNESS-TABLE -->"


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
                f"| {corpus} | {r.get('name') or r['algo']} | {r['selected']} | {m['verbmem_f']:.1f} | "
                f"{m['knowmem_f']:.1f} | {m['privleak']:.1f} | {m['knowmem_r']:.1f} | "
                f"{r['timings']['total_s']:.0f} |"
            )
    lines += [
        "",
        "Produced by `.venv/bin/python scripts/make_leaderboard.py`. Times are each run's own "
        "total as its report records it, wherever it was made (a reused run keeps its time, "
        "including any reference evaluations and machine load of that moment): they are not "
        "benchmarks; `benchmarks/bench_run.py` measures time.",
        "",
        END,
    ]
    return "\n".join(lines)


def _cell(x, fmt: str = ".1f") -> str:
    return "" if x is None else format(x, fmt)


def robustness_table(reports: dict[str, list[dict]]) -> str:
    """The README's "Is the forgetting deep?" table: each model's forget metrics before
    and after the default robustness checks (quant4, relearn), from the reports."""
    lines = [
        RSTART,
        "",
        "| corpus | model | verbmem_f | → quant4 | knowmem_f | → quant4 | quant4 codes = target |"
        " verbmem_f held-out | → relearn | knowmem_f held-out | → relearn | relearn gap (knowmem_f) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for corpus, reps in reports.items():
        sections = [r.get("robustness") or {} for r in reps]
        first = next((s for s in sections if s), None)
        rows = []
        if first:
            retrain_agree = (first.get("quant4") or {}).get("derived", {})
            retrain_agree = retrain_agree.get("retrain_code_agreement")
            for which, agree in (("target", 1.0), ("retrain", retrain_agree)):
                refs = {k: v["reference"][which] for k, v in first.items()}
                rows.append((which, refs, None, agree))
        for r, sec in zip(reps, sections, strict=True):
            if sec:
                agree = (sec.get("quant4") or {}).get("derived", {}).get("code_agreement")
                rows.append((r.get("name") or r["algo"], sec, sec, agree))
        for name, by_check, own, agree in rows:
            q, rl = by_check.get("quant4") or {}, by_check.get("relearn") or {}
            qb, qa = q.get("before", {}), q.get("metrics", {})
            rb, ra = rl.get("before", {}), rl.get("metrics", {})
            derived_r = (own or {}).get("relearn", {}).get("derived", {})
            gap = (derived_r.get("relearn_gap") or {}).get("knowmem_f")
            lines.append(
                f"| {corpus} | {name} | {_cell(qb.get('verbmem_f'))} | {_cell(qa.get('verbmem_f'))}"
                f" | {_cell(qb.get('knowmem_f'))} | {_cell(qa.get('knowmem_f'))}"
                f" | {_cell(agree, '.3f')} | {_cell(rb.get('verbmem_f'))}"
                f" | {_cell(ra.get('verbmem_f'))} | {_cell(rb.get('knowmem_f'))}"
                f" | {_cell(ra.get('knowmem_f'))} | {_cell(gap, '+.1f')} |"
            )
    lines += [
        "",
        "Produced by `.venv/bin/python scripts/make_leaderboard.py` (`muse run --robustness "
        "quant4,relearn`; held-out = the items of the forget documents `relearn` never trains "
        "on).",
        "",
        REND,
    ]
    return "\n".join(lines)


def _replace_block(text: str, start: str, end: str, block: str) -> str:
    """`text` with the block between `start` and `end` replaced (unchanged if absent)."""
    if start not in text:
        return text
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1] if end in rest else rest
    return head + block + tail


def publish_rows(reps: list[dict], work: Path) -> Path:
    """A fresh CSV of exactly these runs and their target and retrain rows.

    The work directory's own leaderboard may hold other runs (a sweep's, earlier ones),
    so the rows are published anew into `work/_published/`."""
    staging = work / "_published"
    corpus = reps[0]["corpus"]
    csv = leaderboard_path(staging, corpus)
    csv.unlink(missing_ok=True)
    for which, ref in reps[0]["reference"].items():
        publish(read_json(work / corpus / which / ref["run_id"] / "report.json"), staging)
    for rep in reps:
        publish(rep, staging)
    return csv


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--corpus", nargs="+", default=["news", "books"])
    ap.add_argument("--algo", nargs="+", default=UNLEARNERS.names(), choices=UNLEARNERS.names())
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "published")
    ap.add_argument(
        "--robustness",
        default="quant4,relearn",
        help="robustness checks of every run (muse run --robustness; 'none' to skip)",
    )
    ap.add_argument(
        "--variants",
        nargs="*",
        default=list(VARIANTS),
        choices=list(VARIANTS),
        help="update-rule variant rows to publish (none: --variants with no names)",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument(
        "--no-page", action="store_true", help="only the runs and CSVs (render and README later)"
    )
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    rows = [(algo, algo, ()) for algo in args.algo]
    rows += [(name, *VARIANTS[name]) for name in args.variants]
    reports: dict[str, list[dict]] = {}
    for corpus in args.corpus:
        for name, algo, params in rows:
            t = time.time()
            rep = run(
                RunConfig(
                    algo=algo,
                    corpus=corpus,
                    params=params,
                    name=None if name == algo else name,
                    out=args.work,
                    progress=False,
                    device="cpu",
                    robustness=args.robustness,
                ),
                echo=lambda s: None,
            )
            print(
                f"{corpus:6s} {name:12s} {rep['selected']:>10s} "
                + " ".join(f"{k}={v:.1f}" for k, v in rep["metrics"].items())
                + f" ({time.time() - t:.0f}s)",
                flush=True,
            )
            reports.setdefault(corpus, []).append(rep)
        csv = publish_rows(reports[corpus], args.work)
        shutil.copyfile(csv, ROOT / "leaderboard" / f"{corpus}.csv")
    if args.no_page:
        return
    csvs = sorted((ROOT / "leaderboard").glob("*.csv"))
    page = render(csvs, ROOT / "leaderboard")
    print(f"rendered {page}")
    readme = (ROOT / "README.md").read_text()
    readme = _replace_block(readme, START, END, table(reports))
    readme = _replace_block(readme, RSTART, REND, robustness_table(reports))
    (ROOT / "README.md").write_text(readme)
    (ROOT / "leaderboard" / "reports.json").write_text(
        json.dumps(
            {
                c: [
                    {
                        k: r.get(k)
                        for k in (
                            "name",
                            "algo",
                            "run_id",
                            "selected",
                            "metrics",
                            "ci",
                            "params",
                            "extra",
                        )
                    }
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
