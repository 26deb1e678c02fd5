"""A sweep's results: one CSV of every run, a summary per method, and a plot.

Selection rules (the sweep file's `selection`), applied per method (the runs that share a
corpus, a protocol and a name, by default the algorithm) to its configurations (the runs
that differ only by seed), on seed means:

- `muse`: the first configuration, in the order the sweep file lists them, whose mean
  knowmem_f is at or below the retrain model's; if none qualifies, the last. This is
  MUSE's rule for α sweeps (TV, WHP: the smallest α) with the file's order as the order;
  within each run the runner already applied it to the epochs.
- `best_knowmem_r`: among the configurations whose mean knowmem_f is at or below the
  retrain model's, the one with the highest mean knowmem_r (the first of equals); if none
  qualifies, the one with the lowest mean knowmem_f.

Spread is the sample standard deviation over seeds (n - 1 in the denominator; empty for
one seed).
"""

from __future__ import annotations

import csv
import io
import json
import math
import numbers
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from muse_bench.core.errors import DataError
from muse_bench.core.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from muse_bench.leaderboard.rows import METRICS, sanitize_cell
from muse_bench.sweeps.plan import PlannedRun
from muse_bench.sweeps.spec import param_text

#: Report sections whose numeric leaves the runs CSV copies, flattened as `section.key...`.
FLATTENED_SECTIONS = ("attacks", "robustness", "scale", "sustain")


@dataclass(frozen=True)
class RunRecord:
    """A finished run of a sweep: where it sits in the sweep, and its report."""

    planned: PlannedRun
    report: Mapping[str, Any]

    @property
    def method(self) -> tuple[str, str, str]:
        """(corpus, protocol, method name): the group a selection rule chooses within."""
        run = self.planned.run
        return run.corpus, run.protocol, run.method

    @property
    def configuration(self) -> tuple[str, tuple[tuple[str, str], ...]]:
        """What defines a configuration: the algorithm and the hyperparameters (not the seed)."""
        run = self.planned.run
        return run.algo, tuple((k, param_text(v)) for k, v in run.params)

    def metric(self, name: str) -> float | None:
        """A metric of the run's selected model (None when the report has no finite value)."""
        return _number(self.report.get("metrics", {}).get(name))

    def reference(self, which: str, name: str) -> float | None:
        """A metric of the target or retrain model, as the run's report recorded it."""
        ref = (self.report.get("reference") or {}).get(which) or {}
        return _number((ref.get("metrics") or {}).get(name))


@dataclass(frozen=True)
class ConfigStats:
    """One configuration of a method: its runs (one per seed) and their seed statistics."""

    algo: str
    params: tuple[tuple[str, str], ...]
    order: int
    records: tuple[RunRecord, ...]
    mean: Mapping[str, float | None] = field(default_factory=dict)
    std: Mapping[str, float | None] = field(default_factory=dict)

    def describe(self) -> str:
        """The configuration as `key=value` text (the algorithm if it has no parameters)."""
        return " ".join(f"{k}={v}" for k, v in self.params) or self.algo


@dataclass(frozen=True)
class MethodSummary:
    """A method's configurations, the rule's choice among them and why."""

    corpus: str
    protocol: str
    method: str
    rule: str
    threshold: float | None
    configs: tuple[ConfigStats, ...]
    selected: ConfigStats
    qualifies: bool


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def read_report(path: Path) -> dict[str, Any] | None:
    """A finished run's report.json, or None if the run has not finished."""
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"run report '{path}' cannot be read: {exc}.") from None
    return report if isinstance(report, dict) else None


def collect(planned: Sequence[PlannedRun]) -> list[RunRecord]:
    """The finished runs of a sweep, in sweep order."""
    records = []
    for p in planned:
        report = read_report(p.report_path)
        if report is not None:
            records.append(RunRecord(p, report))
    return records


def _flatten(prefix: str, value: Any, out: dict[str, float]) -> None:
    """Numeric leaves of nested mappings and lists as `prefix.key...` columns."""
    if isinstance(value, Mapping):
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}", inner, out)
    elif isinstance(value, list):
        for i, inner in enumerate(value, 1):
            key = inner.get("fold", i) if isinstance(inner, Mapping) else i
            _flatten(f"{prefix}.{key}", inner, out)
    else:
        number = _number(value)
        if number is not None:
            out[prefix] = number


def run_row(record: RunRecord) -> dict[str, Any]:
    """One runs-CSV row: identity, swept parameters, every metric and CI, references,
    flattened attack / robustness / scale / sustain numbers, and the full parameters."""
    report, run = record.report, record.planned.run
    row: dict[str, Any] = {
        "run_id": record.planned.run_id,
        "method": run.method,
        "corpus": run.corpus,
        "algo": run.algo,
        "protocol": run.protocol,
        "seed": run.seed,
        "selected": report.get("selected") or "",
    }
    row.update({f"p.{k}": param_text(v) for k, v in run.params})
    metrics = report.get("metrics") or {}
    for name in (*METRICS, *sorted(set(metrics) - set(METRICS))):
        row[name] = _number(metrics.get(name))
    for name, bounds in (report.get("ci") or {}).items():
        if isinstance(bounds, list) and len(bounds) == 2:
            row[f"{name}_ci_lo"], row[f"{name}_ci_hi"] = map(_number, bounds)
    for which in ("retrain", "target"):
        for name in METRICS:
            row[f"{which}.{name}"] = record.reference(which, name)
    flat: dict[str, float] = {}
    for section in FLATTENED_SECTIONS:
        if report.get(section) is not None:
            _flatten(section, report[section], flat)
    row.update(flat)
    row["total_s"] = _number((report.get("timings") or {}).get("total_s"))
    row["params"] = json.dumps(report.get("params") or {}, sort_keys=True)
    row["report"] = str(record.planned.report_path)
    return row


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(round(value, 6) + 0.0)
    return sanitize_cell(str(value))


def csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    """CSV of `rows` with the union of their columns, in first-seen order."""
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(list(columns))
    for row in rows:
        writer.writerow([_cell(row.get(c)) for c in columns])
    return buf.getvalue()


def _stats(values: Iterable[float | None]) -> tuple[float | None, float | None]:
    present = [v for v in values if v is not None]
    if not present:
        return None, None
    spread = statistics.stdev(present) if len(present) > 1 else None
    return statistics.fmean(present), spread


def config_stats(records: Sequence[RunRecord]) -> list[ConfigStats]:
    """Group one method's runs by configuration (sweep order) with seed means and spreads."""
    groups: dict[tuple, list[RunRecord]] = {}
    for rec in records:
        groups.setdefault(rec.configuration, []).append(rec)
    out = []
    for order, ((algo, params), recs) in enumerate(groups.items()):
        mean, std = {}, {}
        for name in METRICS:
            mean[name], std[name] = _stats(r.metric(name) for r in recs)
        out.append(ConfigStats(algo, params, order, tuple(recs), mean, std))
    return out


def _qualifies(cfg: ConfigStats, threshold: float | None) -> bool:
    value = cfg.mean.get("knowmem_f")
    return threshold is not None and value is not None and value <= threshold


def select(configs: Sequence[ConfigStats], rule: str, threshold: float | None) -> ConfigStats:
    """The configuration `rule` chooses (see the module docstring)."""
    if not configs:
        raise DataError("a method has no finished runs to select from.")
    ok = [c for c in configs if _qualifies(c, threshold)]
    if rule == "muse":
        return ok[0] if ok else configs[-1]
    if rule == "best_knowmem_r":
        if ok:
            return max(ok, key=lambda c: (_or(c.mean.get("knowmem_r"), -math.inf), -c.order))
        return min(configs, key=lambda c: (_or(c.mean.get("knowmem_f"), math.inf), c.order))
    raise DataError(f"unknown selection rule '{rule}'.")


def _or(value: float | None, fallback: float) -> float:
    return fallback if value is None else value


def summarize(records: Sequence[RunRecord], rule: str) -> list[MethodSummary]:
    """Per method: every configuration's seed statistics and the one `rule` selects.

    The threshold is the retrain model's knowmem_f as the method's reports recorded it
    (their mean; they agree unless the runs used different retrain models).
    """
    methods: dict[tuple[str, str, str], list[RunRecord]] = {}
    for rec in records:
        methods.setdefault(rec.method, []).append(rec)
    out = []
    for (corpus, protocol, method), recs in methods.items():
        threshold, _ = _stats(r.reference("retrain", "knowmem_f") for r in recs)
        configs = config_stats(recs)
        chosen = select(configs, rule, threshold)
        out.append(
            MethodSummary(
                corpus,
                protocol,
                method,
                rule,
                threshold,
                tuple(configs),
                chosen,
                _qualifies(chosen, threshold),
            )
        )
    return out


def summary_rows(summaries: Sequence[MethodSummary]) -> list[dict[str, Any]]:
    """One summary-CSV row per method: the selected configuration's seed statistics."""
    rows = []
    for s in summaries:
        cfg = s.selected
        row: dict[str, Any] = {
            "corpus": s.corpus,
            "protocol": s.protocol,
            "method": s.method,
            "rule": s.rule,
            "selected": cfg.describe(),
            "qualifies": str(s.qualifies).lower(),
            "retrain.knowmem_f": s.threshold,
            "n_seeds": len(cfg.records),
            "seeds": " ".join(str(r.planned.run.seed) for r in cfg.records),
        }
        for name in METRICS:
            row[f"{name}_mean"] = cfg.mean.get(name)
            row[f"{name}_std"] = cfg.std.get(name)
        row["configurations"] = len(s.configs)
        row["run_ids"] = " ".join(r.planned.run_id for r in cfg.records)
        rows.append(row)
    return rows


def summary_json(summaries: Sequence[MethodSummary]) -> list[dict[str, Any]]:
    """Every method with all its configurations' statistics, for summary.json."""
    return [
        {
            "corpus": s.corpus,
            "protocol": s.protocol,
            "method": s.method,
            "rule": s.rule,
            "retrain_knowmem_f": s.threshold,
            "selected": s.selected.describe(),
            "qualifies": s.qualifies,
            "configurations": [
                {
                    "algo": c.algo,
                    "params": dict(c.params),
                    "seeds": [r.planned.run.seed for r in c.records],
                    "run_ids": [r.planned.run_id for r in c.records],
                    "mean": dict(c.mean),
                    "std": dict(c.std),
                }
                for c in s.configs
            ],
        }
        for s in summaries
    ]


def plot(records: Sequence[RunRecord], summaries: Sequence[MethodSummary]) -> bytes:
    """PNG: every run in the knowmem_f / knowmem_r plane, one panel per corpus and
    protocol; each method's selection as a star at its seed means (with the spread as
    error bars); the target and retrain models; the retrain knowmem_f as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((s.corpus, s.protocol) for s in summaries)) or [("", "")]
    fig, axes = plt.subplots(
        1, len(panels), figsize=(6 * len(panels), 5), squeeze=False, constrained_layout=True
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (corpus, protocol) in zip(axes[0], panels, strict=True):
        mine = [s for s in summaries if (s.corpus, s.protocol) == (corpus, protocol)]
        for i, s in enumerate(mine):
            color = colors[i % len(colors)]
            runs = [r for c in s.configs for r in c.records]
            ax.scatter(
                [_or(r.metric("knowmem_f"), math.nan) for r in runs],
                [_or(r.metric("knowmem_r"), math.nan) for r in runs],
                color=color,
                alpha=0.5,
                s=25,
                label=f"{s.method} runs",
            )
            sel = s.selected
            ax.errorbar(
                [_or(sel.mean.get("knowmem_f"), math.nan)],
                [_or(sel.mean.get("knowmem_r"), math.nan)],
                xerr=[_or(sel.std.get("knowmem_f"), 0.0)],
                yerr=[_or(sel.std.get("knowmem_r"), 0.0)],
                fmt="*",
                markersize=16,
                color=color,
                markeredgecolor="black",
                label=f"{s.method} selected: {sel.describe()}",
            )
        recs = [
            r
            for r in records
            if (r.planned.run.corpus, r.planned.run.protocol) == (corpus, protocol)
        ]
        for which, marker in (("target", "s"), ("retrain", "D")):
            x, y = (
                _stats(r.reference(which, "knowmem_f") for r in recs)[0],
                _stats(r.reference(which, "knowmem_r") for r in recs)[0],
            )
            if x is not None and y is not None:
                ax.scatter([x], [y], marker=marker, color="black", s=50, label=which)
                if which == "retrain":
                    ax.axvline(x, color="gray", linestyle="--", linewidth=1)
        ax.set_xlabel("knowmem_f (lower is better)")
        ax.set_ylabel("knowmem_r (higher is better)")
        ax.set_title(f"{corpus} ({protocol})" if corpus else "no finished runs")
        ax.grid(alpha=0.3)
        if mine:
            ax.legend(fontsize=7, loc="best")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


@dataclass(frozen=True)
class SweepResults:
    """Where a sweep's results were written, and what they hold."""

    runs_csv: Path
    summary_csv: Path
    summary_json: Path
    plot_png: Path
    records: tuple[RunRecord, ...]
    summaries: tuple[MethodSummary, ...]


def write_results(planned: Sequence[PlannedRun], rule: str, directory: Path) -> SweepResults:
    """Collect the finished runs and write runs.csv, summary.csv, summary.json, plot.png."""
    records = collect(planned)
    summaries = summarize(records, rule)
    paths = {
        "runs_csv": directory / "runs.csv",
        "summary_csv": directory / "summary.csv",
        "summary_json": directory / "summary.json",
        "plot_png": directory / "plot.png",
    }
    atomic_write_text(paths["runs_csv"], csv_text([run_row(r) for r in records]))
    atomic_write_text(paths["summary_csv"], csv_text(summary_rows(summaries)))
    atomic_write_json(paths["summary_json"], summary_json(summaries))
    atomic_write_bytes(paths["plot_png"], plot(records, summaries))
    return SweepResults(**paths, records=tuple(records), summaries=tuple(summaries))
