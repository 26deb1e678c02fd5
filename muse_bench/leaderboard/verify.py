"""`muse leaderboard verify`: re-run published rows and say whether their numbers come back.

A row records what produced it: the benchmark (hence the data and reference models),
the algorithm and its resolved hyperparameters, the protocol and the seed (or the seeds
of a `--seeds` row); its `manifest` cell adds the MIA attack, the selection mode and
the bootstrap resamples (rows written before it had one get the defaults, which are
what produced them). From these the row is run again, into a temporary directory, and
each of its four metrics is compared with the published value.

Tolerance. The harness is deterministic: fixed seeds, greedy decoding, seeded
bootstrap, and no nondeterministic kernels on CPU. A rerun with the same code, data and
models on the same kind of machine gives the same numbers, so by default a metric
reproduces only when it is equal at the row's precision (4 decimals) — any tolerance
would hide an edited number. Across machines (another CPU, GPU kernels, bf16, another
thread count) float sums can differ in the last bits, and one flipped greedy token moves
a ROUGE score: `tolerance` (absolute, in metric points) or `within_ci` (accept a rerun
inside the row's bootstrap interval) loosen the check for that case. Every check also
says whether the rerun lies inside the row's interval.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from muse_bench.core.errors import ConfigError
from muse_bench.leaderboard.rows import METRICS, REFERENCE_ALGOS, read_csv, validate

#: Defaults of the settings a row without a manifest cell does not record.
ROW_DEFAULTS = {"attack": "min_k_40", "select": "first", "bootstrap": 1000}
#: The rows' precision: metrics are rounded to 4 decimals.
ROW_PRECISION = 1e-4


@dataclass(frozen=True)
class MetricCheck:
    """One metric of one row: published, rerun, and whether they agree."""

    metric: str
    published: float
    rerun: float | None
    ci: tuple[float, float] | None
    ok: bool

    @property
    def diff(self) -> float | None:
        return None if self.rerun is None else self.rerun - self.published

    @property
    def in_ci(self) -> bool | None:
        if self.ci is None or self.rerun is None:
            return None
        return self.ci[0] - ROW_PRECISION / 2 <= self.rerun <= self.ci[1] + ROW_PRECISION / 2


@dataclass
class RowCheck:
    """The verdict on one row: `reproduced`, `differs` or `unverifiable` (with why)."""

    name: str
    run_id: str
    status: str
    reason: str = ""
    checks: list[MetricCheck] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "reproduced"


class Unverifiable(Exception):
    """A row that cannot be re-run from what it records (the reason is the message)."""


def _cell_float(cell: str | None) -> float | None:
    try:
        x = float(cell or "")
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def _manifest(row: Mapping[str, str]) -> dict[str, Any]:
    try:
        cell = json.loads(row.get("manifest") or "{}")
    except json.JSONDecodeError:
        cell = {}
    return {**ROW_DEFAULTS, **(cell if isinstance(cell, dict) else {})}


def param_text(value: Any) -> str:
    """A resolved hyperparameter value as `-P key=TEXT` text (`core.hparams` parses it)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(param_text(v) for v in value)
    return str(value)


def source_for(benchmark: str, corpus: str, source: str | None) -> tuple[str, str]:
    """The `--corpus` and `--source` that give `benchmark` here (an embedded row's own
    version, e.g. news-v2 for embedded-news-v2); Unverifiable when this harness does not
    ship it (another embedded version) or cannot tell (a directory benchmark)."""
    from muse_bench.data import embedded_benchmark_id, embedded_versions

    if source is not None:
        return corpus, source
    if benchmark.startswith("embedded-"):
        specs = {f"{corpus}-v{v}" for v in embedded_versions()}
        shipped = {embedded_benchmark_id(spec): spec for spec in sorted(specs)}
        if benchmark not in shipped:
            raise Unverifiable(
                f"the row is on {benchmark}; this harness ships {', '.join(shipped)} "
                "(use a matching version)"
            )
        return shipped[benchmark], "embedded"
    if benchmark.startswith("dir-"):
        raise Unverifiable("the row is on a local directory benchmark; pass its --source DIR")
    return corpus, "hub"


def rerun_config(row: Mapping[str, str], out: Path, device: str, source: str | None):
    """The RunConfig that re-runs `row`, the seeds of a `--seeds` row (or None), and
    notes on what the row does not record. Raises Unverifiable."""
    from muse_bench.runner import RunConfig

    algo = row.get("algo") or ""
    corpus = row.get("corpus") or ""
    if not algo or not corpus:
        raise Unverifiable("the row records no algo or corpus")
    if algo == "eval":
        raise Unverifiable("the row evaluates an external checkpoint the row cannot name")
    cell = _manifest(row)
    seeds = tuple(int(s) for s in row["seeds"].split(",")) if row.get("seeds") else None
    try:
        params = json.loads(row.get("params") or "{}")
    except json.JSONDecodeError:
        raise Unverifiable("the row's params are not JSON") from None
    corpus_spec, source = source_for(row.get("benchmark") or "", corpus, source)
    cfg = RunConfig(
        algo=algo,
        corpus=corpus_spec,
        source=source,
        protocol="single" if algo in REFERENCE_ALGOS else row.get("protocol") or "single",
        params=tuple(f"{k}={param_text(v)}" for k, v in sorted(params.items())),
        seed=int(row.get("seed") or 0),
        select=str(cell["select"]),
        attack=str(cell["attack"]),
        n_bootstrap=int(cell["bootstrap"]),
        out=out,
        device=device,
        name=None if row.get("name") == algo else row.get("name"),
        progress=False,
    )
    notes = [] if row.get("manifest") else ["no manifest cell: attack, select, bootstrap defaults"]
    return cfg, seeds, notes


def _known_params(cfg, notes: list[str]):
    """`cfg` without hyperparameters the algorithm no longer has (Unverifiable), noting
    those the row lacks (they take today's defaults)."""
    import dataclasses

    from muse_bench.unlearners import get_unlearner_class

    cls = get_unlearner_class(cfg.algo)
    names = {f.name for f in dataclasses.fields(cls)}
    given = {p.split("=", 1)[0] for p in cfg.params}
    unknown = sorted(given - names)
    if unknown:
        raise Unverifiable(f"{cfg.algo} no longer has hyperparameter(s) {', '.join(unknown)}")
    missing = sorted(names - given - {"benchmark_defaults"})
    if missing:
        notes.append(f"not in the row, so today's defaults: {', '.join(missing)}")
    return cfg


def rerun(row: Mapping[str, str], out: Path, device: str = "cpu", source: str | None = None):
    """Run `row` again into `out`; returns (report, notes). Raises Unverifiable."""
    cfg, seeds, notes = rerun_config(row, out, device, source)
    if cfg.algo in REFERENCE_ALGOS:
        from muse_bench.runner.config import check_config
        from muse_bench.runner.references import eval_checkpoint, retrain_auc
        from muse_bench.task import resolve_task

        dev = check_config(cfg)
        task = resolve_task(cfg.corpus, cfg.source)
        rauc = retrain_auc(task, cfg.attack, out / ".cache", "hf", dev, progress=False)
        spec = getattr(task.models, cfg.algo)
        return eval_checkpoint(cfg, task, spec, cfg.algo, rauc, echo=lambda _: None), notes
    cfg = _known_params(cfg, notes)
    if seeds is not None:
        from muse_bench.runner.seeds import run_seeds

        return run_seeds(replace(cfg, seed=0), seeds, echo=lambda _: None), notes
    from muse_bench.runner import run

    return run(cfg, echo=lambda _: None), notes


def compare(
    row: Mapping[str, str],
    report: Mapping[str, Any],
    tolerance: float = 0.0,
    within_ci: bool = False,
) -> list[MetricCheck]:
    """Each metric of `row`, its interval bounds (and its std across seeds, for a
    `--seeds` row) against the rerun's `report`. A metric agrees when equal at the row's
    precision, or within `tolerance` points, or (with `within_ci`) inside the row's
    bootstrap interval."""
    checks = []
    std = ((report.get("seeds") or {}).get("std")) or {}
    pairs = [(m, report["metrics"].get(m), m) for m in METRICS]
    pairs += [(f"{m}_std", std.get(m), f"{m}_std") for m in METRICS if row.get(f"{m}_std")]
    for m in METRICS:  # an edited interval must fail too
        bounds = (report.get("ci") or {}).get(m) or (None, None)
        pairs += [
            (f"{m}_ci_{e}", b, f"{m}_ci_{e}") for e, b in zip(("lo", "hi"), bounds, strict=True)
        ]
    for label, value, column in pairs:
        published = _cell_float(row.get(column))
        if published is None:
            continue
        base = column.removesuffix("_std").removesuffix("_ci_lo").removesuffix("_ci_hi")
        lo, hi = (_cell_float(row.get(f"{base}_ci_{e}")) for e in ("lo", "hi"))
        ci = (lo, hi) if lo is not None and hi is not None and column == base else None
        rerun_value = float(value) if isinstance(value, int | float) else None
        check = MetricCheck(label, published, rerun_value, ci, ok=False)
        ok = rerun_value is not None and (
            abs(round(rerun_value, 4) - published) <= tolerance + ROW_PRECISION / 10
            or (within_ci and bool(check.in_ci))
        )
        checks.append(replace(check, ok=ok))
    return checks


def provenance_notes(row: Mapping[str, str], report: Mapping[str, Any]) -> list[str]:
    """Where the rerun's manifest differs from the row's digest in what decides numbers:
    the data files and the harness commit (the likely cause when a row does not
    reproduce)."""
    cell = _manifest(row)
    manifest = report.get("manifest") or {}
    here = {
        "data": (manifest.get("hashes") or {}).get("data"),
        "commit": (((manifest.get("harness") or {}).get("git") or {}).get("commit") or "")[:12],
    }
    return [
        f"{what} differs: the row's {cell[what]}, the rerun's {here[what]}"
        for what in ("data", "commit")
        if cell.get(what) and here[what] and cell[what] != here[what]
    ]


def select_rows(rows: Sequence[Mapping[str, str]], names: Sequence[str]) -> list:
    """The rows named `names` (by name or run id; all rows when none); ConfigError for a
    name no row has."""
    if not names:
        return list(rows)
    missing = [n for n in names if not any(n in (r.get("name"), r.get("run_id")) for r in rows)]
    if missing:
        have = ", ".join(r.get("name") or "?" for r in rows)
        raise ConfigError(f"no row named {', '.join(missing)} (the file has {have}).")
    return [r for r in rows if r.get("name") in names or r.get("run_id") in names]


def verify_row(
    row: Mapping[str, str],
    out: Path,
    *,
    tolerance: float = 0.0,
    within_ci: bool = False,
    device: str = "cpu",
    source: str | None = None,
    runner: Callable[..., tuple[Mapping[str, Any], list[str]]] = rerun,
) -> RowCheck:
    """Re-run one row into `out` and compare (`runner` is `rerun`; tests pass their own)."""
    name, run_id = row.get("name") or "?", row.get("run_id") or "?"
    try:
        report, notes = runner(row, out, device=device, source=source)
    except Unverifiable as exc:
        return RowCheck(name, run_id, "unverifiable", str(exc))
    except ConfigError as exc:
        return RowCheck(name, run_id, "unverifiable", str(exc))
    checks = compare(row, report, tolerance, within_ci)
    notes = [*notes, *provenance_notes(row, report)]
    if report.get("run_id") != run_id:
        notes = [*notes, f"rerun id {report.get('run_id')} (ids include local model paths)"]
    if not checks:
        return RowCheck(name, run_id, "unverifiable", "the row has no metric", notes=notes)
    status = "reproduced" if all(c.ok for c in checks) else "differs"
    return RowCheck(name, run_id, status, checks=checks, notes=notes)


def verify_csv(
    csv_path: str | Path,
    names: Sequence[str] = (),
    *,
    out: Path | None = None,
    tolerance: float = 0.0,
    within_ci: bool = False,
    device: str = "cpu",
    source: str | None = None,
    on_row: Callable[[RowCheck], None] | None = None,
) -> list[RowCheck]:
    """Verify the rows of a leaderboard CSV (those named, or all); reruns go to `out`,
    by default a temporary directory removed afterwards (the reference evaluations are
    shared by the rows of one call). `on_row` sees each verdict as it comes."""
    if tolerance < 0:
        raise ConfigError(f"--tolerance must be >= 0, got {tolerance}.")
    if out is not None and out.is_dir() and any(out.iterdir()):
        raise ConfigError(
            f"--out {out} is not empty: finished runs there would be reused, not re-run; "
            "give a new or empty directory."
        )
    problems = validate(csv_path)
    if problems:
        raise ConfigError(f"{csv_path}: {problems[0]} Run `muse leaderboard validate`.")
    _, rows = read_csv(csv_path)
    chosen = select_rows(rows, names)
    with tempfile.TemporaryDirectory(prefix="muse-verify-") as tmp:
        work = out or Path(tmp)
        results = []
        for row in chosen:
            result = verify_row(
                row, work, tolerance=tolerance, within_ci=within_ci, device=device, source=source
            )
            if on_row is not None:
                on_row(result)
            results.append(result)
    return results


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def describe(result: RowCheck) -> list[str]:
    """The lines `muse leaderboard verify` prints for one row."""
    head = f"{result.name} ({result.run_id}): {result.status}"
    lines = [head + (f": {result.reason}" if result.reason else "")]
    for c in result.checks:
        ci = f"[{c.ci[0]:.4f}, {c.ci[1]:.4f}]" if c.ci else ""
        inside = {True: "in CI", False: "OUTSIDE CI", None: ""}[c.in_ci]
        diff = "" if c.diff is None else f"{c.diff:+.4f}"
        lines.append(
            f"  {'ok ' if c.ok else 'BAD'} {c.metric:14s} published {_fmt(c.published):>9s} "
            f"rerun {_fmt(c.rerun):>9s} diff {diff:>8s} {ci} {inside}".rstrip()
        )
    lines += [f"  note: {n}" for n in result.notes]
    return lines
