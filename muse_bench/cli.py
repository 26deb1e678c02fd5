"""The `muse` command line: parsing and printing only; the work happens in the library."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from muse_bench import __version__
from muse_bench.core.errors import MuseError

METRIC_HELP = {
    "verbmem_f": "C1 verbatim memorization of D_forget: ROUGE-L of 128-token continuations (lower is better)",
    "knowmem_f": "C2 knowledge memorization of D_forget: ROUGE-L of QA answers (lower is better)",
    "privleak": "C3 privacy leakage: relative Min-40% MIA AUC gap to the retrain model (closer to 0 is better)",
    "knowmem_r": "C4 utility: ROUGE-L of QA answers on retained knowledge (higher is better)",
    "scale": "C5 the metrics per nested forget fold (--protocol scale)",
    "sustain": "C6 the metrics after each sequential request (--protocol sustain)",
}

COMMON = [
    click.option("--corpus", required=True, help="Benchmark corpus: news or books."),
    click.option(
        "--source",
        default="embedded",
        show_default=True,
        help="embedded (built-in mini-MUSE), hub (MUSE on the Hugging Face hub), or a MUSE-layout directory.",
    ),
    click.option(
        "--target",
        default=None,
        help="Target model directory or hub id (overrides the benchmark's).",
    ),
    click.option(
        "--retrain",
        default=None,
        help="Retrain model directory or hub id (overrides the benchmark's).",
    ),
    click.option(
        "--out",
        default="runs",
        show_default=True,
        type=click.Path(path_type=Path),
        help="Output directory for runs, caches and leaderboard CSVs.",
    ),
    click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto."),
    click.option(
        "--engine", default="hf", show_default=True, help="Evaluation engine: hf or vllm."
    ),
    click.option(
        "--seed",
        default=0,
        show_default=True,
        type=int,
        help="Random seed (training and bootstrap).",
    ),
    click.option(
        "--attack", default="min_k_40", show_default=True, help="MIA attack used for privleak."
    ),
    click.option(
        "--batch-size",
        default=32,
        show_default=True,
        type=int,
        help=(
            "Evaluation batch size (prompts decoded together; on CPU, scoring batches are "
            "also capped in padded tokens: engines.hf.CPU_SCORE_TOKENS)."
        ),
    ),
    click.option(
        "--bootstrap",
        "n_bootstrap",
        default=1000,
        show_default=True,
        type=int,
        help="Bootstrap resamples for the 95% confidence intervals.",
    ),
    click.option("--force", is_flag=True, help="Redo a finished run instead of reusing it."),
    click.option(
        "--allow-pickle",
        is_flag=True,
        help="Allow loading pickle (.bin) weights, which can run code.",
    ),
    click.option(
        "--trust-remote-code", is_flag=True, help="Allow model repositories to run their own code."
    ),
    click.option("--quiet", is_flag=True, help="No progress bars."),
    click.option(
        "--flush-denormal/--keep-denormal",
        default=True,
        show_default=True,
        help=(
            "Flush subnormal floats to zero on CPU (a saturated loss otherwise computes "
            "tens of times slower); recorded in the report."
        ),
    ),
    click.option(
        "--robustness",
        default=None,
        metavar="LIST|none",
        help=(
            "Robustness checks after the evaluation, comma-separated: quant8, quant4, "
            "quant4_nf4, relearn, relearn_all, relearn_retain, or none (the default; "
            "quant4,relearn is the recommended set, about doubling a run's time)."
        ),
    ),
]


def common_options(fn):
    for opt in reversed(COMMON):
        fn = opt(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="muse")
def cli() -> None:
    """muse-bench: run and measure machine unlearning on MUSE-style benchmarks.

    \b
    Quick start (offline, CPU, minutes):
      muse run --algo npo --corpus news
    """


@cli.command("list")
def list_cmd() -> None:
    """List unlearners (with hyperparameters), corpora and metrics."""
    from muse_bench.catalogue import load
    from muse_bench.data import CORPORA, embedded_dir, embedded_models_dir, load_corpus

    listing = load()
    click.echo("Unlearners (muse run --algo NAME -P key=value; default = MUSE 7B recipe):")
    for method in listing["unlearners"]:
        click.echo(f"  {method['name']:10s} {method['description']}")
        for p in method["params"]:
            embedded = f"; embedded {p['embedded']}" if p["embedded"] is not None else ""
            click.echo(f"      {p['name']}={p['default']} ({p['type']}{embedded}) {p['help']}")
    click.echo("\nCorpora (--corpus NAME; --source embedded|hub|DIR):")
    for name in CORPORA:
        c = load_corpus(name) if embedded_dir(name).is_dir() else None
        models = all(
            (embedded_models_dir(name) / m / "config.json").is_file() for m in ("target", "retrain")
        )
        if c is None:
            click.echo(f"  {name:10s} embedded data missing")
            continue
        folds = "scale+sustain" if c.has_scale else "single only (no scal/sust, like MUSE-Books)"
        click.echo(
            f"  {name:10s} {c.benchmark_id}: forget {len(c.forget)}, retain1 {len(c.retain1)}, "
            f"retain2 {len(c.retain2)}, holdout {len(c.holdout)} docs; "
            f"{len(c.forget_qa)}/{len(c.retain_qa)} QA; {folds}; "
            f"models {'ready' if models else 'missing (muse prepare --rebuild)'}; hub: available online"
        )
    click.echo("\nMetrics:")
    for name, text in METRIC_HELP.items():
        click.echo(f"  {name:10s} {text}")
    click.echo(f"\nMIA attacks (--attack): {', '.join(listing['attacks'])}")
    click.echo(f"Engines (--engine): {', '.join(listing['engines'])}")
    click.echo(
        f"Robustness checks (--robustness LIST|none): {', '.join(listing['robustness_checks'])}; "
        f"default none, recommended: {','.join(listing['recommended_checks'])}"
    )


@cli.command()
@click.option("--corpus", required=True, help="news or books.")
@click.option(
    "--source",
    default="embedded",
    show_default=True,
    help="embedded, hub, or a MUSE-layout directory.",
)
@click.option(
    "--rebuild", is_flag=True, help="Regenerate the embedded data and retrain its reference models."
)
@click.option(
    "--epochs",
    type=int,
    default=None,
    help="Training epochs for --rebuild (default: the recipe's).",
)
def prepare(corpus: str, source: str, rebuild: bool, epochs: int | None) -> None:
    """Make a corpus and its target/retrain models ready (and check them)."""
    from muse_bench.prepare import prepare as do_prepare

    for line in do_prepare(corpus, source, rebuild=rebuild, epochs=epochs):
        click.echo(line)


def _config(**kw):
    from muse_bench.runner import RunConfig

    kw["progress"] = not kw.pop("quiet")
    kw["params"] = tuple(kw.get("params", ()))
    return RunConfig(**kw)


def _num(value, width: int = 12) -> str:
    """A metric for the summary table; None (a non-finite number in the report) as n/a."""
    return f"{value:{width}.1f}" if isinstance(value, (int, float)) else f"{'n/a':>{width}s}"


def _summary(report: dict, refs: dict[str, dict]) -> None:
    cols = ("verbmem_f", "knowmem_f", "privleak", "knowmem_r")
    click.echo("\n" + f"{'model':16s}" + "".join(f"{c:>12s}" for c in cols))
    for name, metrics in refs.items():
        click.echo(f"{name:16s}" + "".join(_num(metrics.get(c)) for c in cols))


def _robustness_summary(section: dict) -> None:
    """One line per robustness check: the attacked forget metrics, with the attacked
    target's and retrain model's beside them."""
    for check, res in section.items():
        refs = res.get("reference") or {}
        parts = []
        for m in ("verbmem_f", "knowmem_f"):
            t = (refs.get("target") or {}).get("metrics", {}).get(m)
            r = (refs.get("retrain") or {}).get("metrics", {}).get(m)
            parts.append(
                f"{m} {_num(res['metrics'].get(m), 0)} (target {_num(t, 0)}, retrain {_num(r, 0)})"
            )
        click.echo(f"  {check}: " + ", ".join(parts))


@cli.command()
@click.option(
    "--algo", required=True, help="Unlearner name (see muse list), module:Class or file.py:Class."
)
@common_options
@click.option(
    "--protocol", default="single", show_default=True, help="single, scale, sustain or all."
)
@click.option(
    "-P", "params", multiple=True, metavar="KEY=VALUE", help="Hyperparameter (repeatable)."
)
@click.option(
    "--select",
    default="first",
    show_default=True,
    help="Model selection: first (MUSE: first epoch/alpha with knowmem_f <= retrain's) or last.",
)
@click.option("--name", default=None, help="Leaderboard name of this run (default: the algo).")
@click.option(
    "--log-with",
    default=None,
    help="Track training loss and per-epoch metrics: tensorboard (OUT/tensorboard), wandb or mlflow.",
)
@click.option(
    "--seeds",
    default=None,
    metavar="S1,S2,...",
    help="Run once per seed and publish one row: the mean, with the std across seeds.",
)
def run(log_with: str | None, seeds: str | None, **kw) -> None:
    """Unlearn, evaluate six ways, write report.json and a leaderboard row."""
    from muse_bench.core.distributed import Processes
    from muse_bench.runner import run as do_run

    if seeds is not None:
        _run_seeds(seeds, _config(**kw))
        return
    if log_with:
        from muse_bench.sweeps.tracking import tracked_run

        report = tracked_run(_config(**kw), log_with, echo=click.echo)
    else:
        report = do_run(_config(**kw), echo=click.echo)
    if not Processes.current().is_main:  # launched as several processes: print once
        return
    refs = {k: v["metrics"] for k, v in report["reference"].items()}
    refs[f"{report['name']} ({report['selected']})"] = report["metrics"]
    _summary(report, refs)
    for key in ("scale", "sustain"):
        for fold in report.get(key) or []:
            click.echo(
                f"  {key} {fold['fold']}: {fold['docs']} docs, knowmem_f {_num(fold.get('knowmem_f'), 0)}, "
                f"knowmem_r {_num(fold.get('knowmem_r'), 0)}, verbmem_f {_num(fold.get('verbmem_f'), 0)}"
            )
    _robustness_summary(report.get("robustness") or {})
    run_dir = Path(report["model"]).parent.parent.parent if report.get("model") else None
    click.echo(f"\nreport: {run_dir / 'report.json' if run_dir else ''}")
    click.echo(f"leaderboard: {report.get('leaderboard', '')}")


def _run_seeds(text: str, cfg) -> None:
    """`muse run --seeds`: the runs, then the mean and spread next to the interval."""
    from muse_bench.core.distributed import Processes
    from muse_bench.core.errors import ConfigError
    from muse_bench.runner.seeds import parse_seeds, run_seeds

    seeds = parse_seeds(text)
    if cfg.seed != 0:
        raise ConfigError("give --seed or --seeds, not both.")
    report = run_seeds(cfg, seeds, echo=click.echo)
    if not Processes.current().is_main:
        return
    click.echo(
        f"\n{report['name']} over seeds {text}: mean ± std across seeds "
        "[mean of the seeds' bootstrap 95% CIs]"
    )
    for m, value in report["metrics"].items():
        std, ci = report["seeds"]["std"].get(m), report["ci"].get(m)
        interval = f"[{ci[0]:.1f}, {ci[1]:.1f}]" if ci else ""
        click.echo(f"  {m:10s} {_num(value, 7)} ± {_num(std, 0)}  {interval}")
    click.echo(f"\nreport: {report['report']}")
    click.echo(f"leaderboard: {report['leaderboard']}")


@cli.command("eval")
@click.option(
    "--model", "model_spec", required=True, help="target, retrain, or a model directory / hub id."
)
@common_options
@click.option(
    "--name", default=None, help="Name for the report and leaderboard row (default: from --model)."
)
def eval_cmd(model_spec: str, name: str | None, **kw) -> None:
    """Evaluate one checkpoint six ways (what MUSE's eval.py does)."""
    from muse_bench.core.distributed import main_only, on_main, start_processes
    from muse_bench.core.io import check_writable_dir
    from muse_bench.runner import check_config, check_model, eval_checkpoint, safe_dir_name
    from muse_bench.runner.config import apply_numerics
    from muse_bench.runner.references import retrain_auc
    from muse_bench.task import resolve_task

    cfg = _config(algo="eval", **kw)
    # every check before the first file is written
    device = check_config(cfg)
    apply_numerics(cfg)
    task = resolve_task(cfg.corpus, cfg.source, cfg.target, cfg.retrain, cfg.hub_source)
    reference = model_spec in ("target", "retrain")
    spec = getattr(task.models, model_spec) if reference else model_spec
    check_model(spec, cfg)
    check_model(task.models.retrain, cfg)  # privleak needs the retrain model's AUC
    from muse_bench.robustness.stage import resolve_checks

    # muse eval runs robustness checks only when asked
    checks = tuple(c.name for c in resolve_checks(cfg, task)) if cfg.robustness else ()
    if name:
        label = name
    elif reference:
        label = model_spec
    else:
        label = (
            Path(model_spec).resolve().name if Path(model_spec).exists() else Path(model_spec).name
        )
    procs = start_processes(device)
    on_main(lambda: check_writable_dir(cfg.out), procs)
    rauc = retrain_auc(
        task,
        cfg.attack,
        cfg.out / ".cache",
        "hf",
        device,
        cfg.batch_size,
        progress=cfg.progress,
        allow_pickle=cfg.allow_pickle,
        trust_remote_code=cfg.trust_remote_code,
    )
    report = eval_checkpoint(
        cfg, task, spec, label, rauc, echo=main_only(click.echo, procs), checks=checks
    )
    if not procs.is_main:  # launched as several processes: print once
        return
    _summary(report, {label: report["metrics"]})
    _robustness_summary(report.get("robustness") or {})
    run_dir = cfg.out / task.corpus.name / safe_dir_name(label) / report["run_id"]
    click.echo(f"\nreport: {run_dir / 'report.json'}")


@cli.command()
@click.argument("sweep_file", type=click.Path(path_type=Path))
@click.option(
    "--out",
    default="runs",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Output directory; the sweep writes OUT/sweeps/<name>/.",
)
@click.option("--dry-run", is_flag=True, help="Print the runs it would make, and stop.")
@click.option("--yes", is_flag=True, help="Allow a sweep of more than 100 runs.")
@click.option(
    "--executor", default=None, help="local or slurm (default: the sweep file's, or local)."
)
@click.option("--parallel", type=int, default=None, help="Local executor: runs at a time.")
@click.option("--threads", type=int, default=None, help="Local executor: torch threads per run.")
@click.option("--log-with", default=None, help="Track every run: tensorboard, wandb or mlflow.")
@click.option(
    "--publish",
    is_flag=True,
    help="Append each method's selected runs to OUT/leaderboard/<corpus>.csv.",
)
def sweep(sweep_file: Path, out: Path, **kw) -> None:
    """Run every run of a sweep file (YAML/TOML) that has not finished, then write
    OUT/sweeps/<name>/ runs.csv, summary.csv and plot.png (see docs/sweeps.md)."""
    from muse_bench.sweeps import run_sweep

    run_sweep(sweep_file, out, echo=click.echo, **kw)


@cli.command()
@click.argument("report_path", type=click.Path(path_type=Path))
@click.option(
    "--table",
    "tables",
    multiple=True,
    help="Published table to compare with: muse, open-unlearning, quantization (default: all).",
)
def compare(report_path: Path, tables) -> None:
    """Print a run next to the published numbers for its method and corpus."""
    from muse_bench.published import TABLE_FILES
    from muse_bench.published.compare import compare_report, format_comparison, read_report

    report = read_report(report_path)
    click.echo(format_comparison(report, compare_report(report, tables or tuple(TABLE_FILES))))


@cli.group()
def leaderboard() -> None:
    """Validate, merge and render leaderboard CSVs."""


@leaderboard.command()
@click.argument("csv_paths", nargs=-1, required=True, type=click.Path(path_type=Path))
def validate(csv_paths) -> None:
    """Check CSVs against the leaderboard schema."""
    from muse_bench.leaderboard.rows import validate as do_validate

    bad = False
    for path in csv_paths:
        problems = do_validate(path)
        for p in problems:
            click.echo(f"{path}: {p}", err=True)
        bad |= bool(problems)
        if not problems:
            click.echo(f"{path}: valid")
    if bad:
        sys.exit(1)


@leaderboard.command()
@click.argument("csv_paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "-o", "--output", required=True, type=click.Path(path_type=Path), help="Merged CSV to write."
)
@click.option(
    "--allow-mixed",
    is_flag=True,
    help="Keep rows of different benchmarks (grouped, not ranked together).",
)
def merge(csv_paths, output: Path, allow_mixed: bool) -> None:
    """Combine CSVs, de-duplicated by run id."""
    from muse_bench.leaderboard.rows import merge as do_merge

    do_merge(list(csv_paths), output, allow_mixed=allow_mixed)
    click.echo(f"wrote {output}")


@leaderboard.command()
@click.argument("csv_paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    default="leaderboard",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Directory for index.html and the plots.",
)
def render(csv_paths, output: Path) -> None:
    """Write a static HTML leaderboard page and MUSE-style plots."""
    from muse_bench.leaderboard.page import render as do_render

    page = do_render(list(csv_paths), output)
    click.echo(f"wrote {page}")


@leaderboard.command()
@click.argument("csv_path", type=click.Path(path_type=Path))
@click.option(
    "--name", "names", multiple=True, help="Verify only this row (name or run id; repeatable)."
)
@click.option(
    "--tolerance",
    default=0.0,
    show_default=True,
    type=float,
    help="Accept reruns within this many metric points (0: equal at the row's 4 decimals).",
)
@click.option(
    "--within-ci", is_flag=True, help="Also accept a rerun inside the row's bootstrap interval."
)
@click.option("--device", default="cpu", show_default=True, help="Device of the reruns.")
@click.option("--source", default=None, help="Data source of the rows (default: from benchmark).")
@click.option(
    "--out",
    default=None,
    type=click.Path(path_type=Path),
    help="Keep the reruns here (default: a temporary directory, removed).",
)
def verify(csv_path: Path, names, tolerance, within_ci, device, source, out) -> None:
    """Re-run published rows and check their numbers come back (exit 1 if not)."""
    from muse_bench.leaderboard.verify import describe, verify_csv

    def show(result) -> None:
        for line in describe(result):
            click.echo(line)

    results = verify_csv(
        csv_path,
        names,
        out=out,
        tolerance=tolerance,
        within_ci=within_ci,
        device=device,
        source=source,
        on_row=show,
    )
    bad = [r for r in results if not r.ok]
    click.echo(f"\n{len(results) - len(bad)} of {len(results)} row(s) reproduced.")
    if bad:
        sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and a non-zero exit."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        cli.main(args=argv, prog_name="muse", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.ctx.get_help() if exc.ctx else str(exc))
        sys.exit(2)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort as exc:
        # click turns Ctrl-C into Abort (after ending the ^C line with a newline)
        if isinstance(exc.__cause__ or exc.__context__, KeyboardInterrupt):
            click.echo("error: interrupted; run the same command again to resume.", err=True)
        else:
            click.echo("error: aborted.", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if getattr(exc, "ctx", None) else ""
        click.echo(f"error: {exc.format_message()}{hint}", err=True)
        sys.exit(exc.exit_code)
    except MuseError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("error: interrupted; run the same command again to resume.", err=True)
        sys.exit(130)
    except OSError as exc:
        if os.environ.get("MUSE_DEBUG"):
            raise
        where = f" '{exc.filename}'" if exc.filename else ""
        click.echo(f"error: {exc.strerror or exc}{where}.", err=True)
        sys.exit(1)
    except Exception as exc:  # a bug, not a user error: still one line, traceback on demand
        if os.environ.get("MUSE_DEBUG"):
            raise
        click.echo(
            f"error: internal error {type(exc).__name__}: {exc} (set MUSE_DEBUG=1 for a traceback).",
            err=True,
        )
        sys.exit(1)
    sys.exit(0)


if __name__ == "__main__":  # `python -m muse_bench.cli`, as accelerate launch / torchrun run it
    main()
