"""The leaderboard CSV: its schema, building and appending rows, validation and merging.

A leaderboard file starts with MUSE's own columns (`name,verbmem_f,privleak,knowmem_f,
knowmem_r`) so it can be submitted to the MUSE leaderboard as it is; the columns after
them (`EXTRA_COLUMNS`) say which benchmark, algorithm, settings and run each row comes
from. Every cell is text; JSON-valued cells (`params`, `scale`, `sustain`) are compact.

Spreadsheet safety: a cell that a spreadsheet would execute as a formula (it starts with
`=`, `@`, a tab, CR or LF, or with `+`/`-` without being a plain number) is neutralised
by `sanitize_cell` with a leading apostrophe (OWASP's advice) whenever this module writes
a file, so a user-chosen name such as `=cmd` is kept readable as `'=cmd` instead of the
whole run being refused. `validate` reports such cells in files written by other tools.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import numbers
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from muse_bench.core.errors import DataError, MuseError
from muse_bench.core.io import atomic_write_text, file_lock, remove_stale_temps

# The four MUSE metrics, in the order of MUSE's leaderboard CSV.
METRICS: tuple[str, ...] = ("verbmem_f", "privleak", "knowmem_f", "knowmem_r")
MUSE_COLUMNS: tuple[str, ...] = ("name", *METRICS)
CI_COLUMNS: tuple[str, ...] = tuple(f"{m}_ci_{end}" for m in METRICS for end in ("lo", "hi"))
EXTRA_COLUMNS: tuple[str, ...] = (
    "benchmark",
    "corpus",
    "algo",
    "params",
    "protocol",
    "seed",
    "selected",
    *CI_COLUMNS,
    "scale",
    "sustain",
    "harness_version",
    "date",
    "run_id",
)
# Columns that make a row re-verifiable (`muse leaderboard verify`): the run manifest's
# digest, and for a row over several seeds (`muse run --seeds`) the seeds and the standard
# deviation of each metric across them. Older files without them stay valid.
STD_COLUMNS: tuple[str, ...] = tuple(f"{m}_std" for m in METRICS)
TRUST_COLUMNS: tuple[str, ...] = ("manifest", "seeds", *STD_COLUMNS)
# Robustness checks (muse_bench.robustness): the attacked model's forget metrics, after
# every other column, for each check some row ran (empty in rows that did not run it);
# files without them (older ones, runs without checks) are valid.
ROBUSTNESS_CHECKS: tuple[str, ...] = (
    "quant8",
    "quant4",
    "quant4_nf4",
    "relearn",
    "relearn_all",
    "relearn_retain",
)
CHECK_COLUMNS: dict[str, tuple[str, str]] = {
    check: (f"verbmem_f_{check}", f"knowmem_f_{check}") for check in ROBUSTNESS_CHECKS
}
ROBUSTNESS_COLUMNS: tuple[str, ...] = tuple(c for cols in CHECK_COLUMNS.values() for c in cols)
COLUMNS: tuple[str, ...] = (*MUSE_COLUMNS, *EXTRA_COLUMNS, *TRUST_COLUMNS)
#: The columns a leaderboard file is written with: the run's, then the robustness checks'.
HEADER: tuple[str, ...] = (*COLUMNS, *ROBUSTNESS_COLUMNS)
REQUIRED_COLUMNS: tuple[str, ...] = (*MUSE_COLUMNS, "benchmark", "run_id")
REFERENCE_ALGOS: tuple[str, ...] = ("target", "retrain")

# Metrics that are ROUGE-L F-measures x100; privleak is a relative AUC difference x100,
# which cannot go below -100 (AUC >= 0) but has no upper bound (over-unlearning).
PERCENT_METRICS: tuple[str, ...] = ("verbmem_f", "knowmem_f", "knowmem_r")
PRIVLEAK_MIN = -100.0
_TOL = 1e-6

_PLAIN_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?\s*")
_FORMULA_START = ("=", "@", "\t", "\r", "\n")


def is_formula_like(value: str) -> bool:
    """True when a spreadsheet opening this cell could execute it as a formula.

    Plain numbers such as `-99.8` or `+1` are safe; `+1+1`, `-cmd`, `=SUM(A1)`, `@x` and
    cells starting with a tab, CR or LF are not.
    """
    if not value:
        return False
    if value.startswith(_FORMULA_START):
        return True
    if value[0] in "+-":
        return _PLAIN_NUMBER.fullmatch(value) is None
    return False


def sanitize_cell(value: str) -> str:
    """Return `value`, with a leading apostrophe when it would be executed as a formula."""
    return "'" + value if is_formula_like(value) else value


def _fmt_number(value: Any, what: str) -> str:
    """A finite number as short text (4 decimals at most); DataError otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise DataError(f"{what} must be a number, got {value!r}.")
    x = float(value)
    if not math.isfinite(x):
        raise DataError(f"{what} is {x}, not a finite number; the run cannot be ranked.")
    x = round(x, 4)
    return repr(x + 0.0)  # + 0.0 turns -0.0 into 0.0


def _compact_json(obj: Any, sort_keys: bool = True) -> str:
    return json.dumps(
        obj, sort_keys=sort_keys, separators=(",", ":"), ensure_ascii=False, default=str
    )


def _fold_entries(entries: Sequence[Mapping[str, Any]] | None, what: str) -> str:
    """Normalise a report's `scale`/`sustain` list to compact JSON (empty when absent)."""
    if not entries:
        return ""
    out = []
    for i, entry in enumerate(entries, start=1):
        if not isinstance(entry, Mapping):
            raise DataError(f"report '{what}' entry {i} is not an object.")
        metrics = entry.get("metrics", entry)
        if not isinstance(metrics, Mapping):
            raise DataError(f"report '{what}' entry {i}: 'metrics' is not an object.")
        item: dict[str, Any] = {"fold": entry.get("fold", entry.get("index", i))}
        for key in ("docs", "tokens"):
            if entry.get(key) is not None:
                item[key] = entry[key]
        for key, value in item.items():
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise DataError(f"report '{what}' entry {i}: '{key}' must be an integer.")
            item[key] = int(value)
        for m in METRICS:
            if metrics.get(m) is not None:
                item[m] = float(_fmt_number(metrics[m], f"{what}[{i}].{m}"))
        out.append(item)
    return _compact_json(out, sort_keys=False)  # keep fold, docs, tokens, metrics order


def row_from_report(report: Mapping[str, Any]) -> dict[str, str]:
    """The leaderboard row (column -> cell text) for one run's report.json contents.

    Raises DataError when a required key is missing or a metric is not a finite number.
    Reference rows (algo `target`/`retrain`) get empty `params`.
    """
    for key in ("benchmark", "algo", "metrics", "run_id"):
        if report.get(key) in (None, ""):
            raise DataError(f"report lacks '{key}'; it cannot become a leaderboard row.")
    algo = str(report["algo"])
    metrics = report["metrics"]
    if not isinstance(metrics, Mapping):
        raise DataError("report 'metrics' must be an object.")
    row = dict.fromkeys(COLUMNS, "")
    row["name"] = str(report.get("name") or algo)
    for m in METRICS:
        if metrics.get(m) is None:
            raise DataError(f"report lacks metric '{m}'; it cannot become a leaderboard row.")
        row[m] = _fmt_number(metrics[m], f"metric '{m}'")
    for m, bounds in (report.get("ci") or {}).items():
        if m in METRICS and bounds is not None:
            if not isinstance(bounds, Sequence) or isinstance(bounds, str) or len(bounds) != 2:
                raise DataError(f"report 'ci.{m}' must be a [low, high] pair.")
            lo, hi = bounds
            if all(isinstance(b, numbers.Real) and math.isfinite(b) for b in (lo, hi)):
                row[f"{m}_ci_lo"] = _fmt_number(lo, f"{m} CI low")
                row[f"{m}_ci_hi"] = _fmt_number(hi, f"{m} CI high")
            # else: no usable interval (e.g. no bootstrap); the cells stay empty
    params = report.get("params") or {}
    row["benchmark"] = str(report["benchmark"])
    row["corpus"] = str(report.get("corpus") or "")
    row["algo"] = algo
    row["params"] = "" if algo in REFERENCE_ALGOS else _compact_json(params)
    row["protocol"] = str(report.get("protocol") or "single")
    seed = report.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise DataError(f"report 'seed' must be an integer, got {seed!r}.")
    row["seed"] = "" if seed is None else str(int(seed))
    row["selected"] = str(report.get("selected") or "")
    row["scale"] = _fold_entries(report.get("scale"), "scale")
    row["sustain"] = _fold_entries(report.get("sustain"), "sustain")
    row["harness_version"] = str((report.get("versions") or {}).get("muse_bench") or "")
    row["date"] = str(
        report.get("created") or datetime.now(timezone.utc).isoformat(timespec="seconds")
    )
    row["run_id"] = str(report["run_id"])
    row.update(robustness_cells(report.get("robustness")))
    row.update(trust_cells(report))
    return row


def robustness_cells(section: Any) -> dict[str, str]:
    """The `verbmem_f_<check>` / `knowmem_f_<check>` cells of a report's `robustness`
    section (checks that did not run, or whose metric is missing, stay absent)."""
    if not section:
        return {}
    if not isinstance(section, Mapping):
        raise DataError("report 'robustness' must be an object.")
    cells = {}
    for check, result in section.items():
        if check not in ROBUSTNESS_CHECKS or not isinstance(result, Mapping):
            continue
        metrics = result.get("metrics") or {}
        for m in ("verbmem_f", "knowmem_f"):
            if metrics.get(m) is not None:
                cells[f"{m}_{check}"] = _fmt_number(metrics[m], f"robustness {check} {m}")
    return cells


def manifest_hash(manifest: Mapping[str, Any]) -> str:
    """A short hash of the full manifest (canonical JSON)."""
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def manifest_cell(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The compact digest a leaderboard row carries: the settings a re-run needs that
    the row has no column for, the hardware at a glance, and the full manifest's hash."""
    dev = manifest.get("device") or {}
    ev = manifest.get("evaluation") or {}
    batch = manifest.get("batch") or {}
    git = (manifest.get("harness") or {}).get("git") or {}
    hashes = manifest.get("hashes") or {}
    cell = {
        "sha": manifest_hash(manifest),
        "device": f"{dev.get('count', 1)}x{dev.get('type', '?')}",
        "launcher": dev.get("launcher"),
        "sharding": manifest.get("sharding"),
        "dtype": manifest.get("dtype"),
        "mp": manifest.get("mixed_precision"),
        "eff_batch": batch.get("effective"),
        "chunk": manifest.get("chunk_length"),
        "attack": ev.get("attack"),
        "select": ev.get("select"),
        "bootstrap": ev.get("n_bootstrap"),
        "data": hashes.get("data"),
        "commit": (git.get("commit") or "")[:12] or None,
    }
    return {k: v for k, v in cell.items() if v is not None}


def trust_cells(report: Mapping[str, Any]) -> dict[str, str]:
    """The `manifest`, `seeds` and `<metric>_std` cells of a report's row (empty when the
    report has no manifest or is a single-seed run)."""
    cells = dict.fromkeys(TRUST_COLUMNS, "")
    manifest = report.get("manifest")
    if isinstance(manifest, Mapping):
        cells["manifest"] = _compact_json(manifest_cell(manifest))
    seeds = report.get("seeds")
    if isinstance(seeds, Mapping):
        values = seeds.get("seeds") or []
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise DataError(f"report 'seeds.seeds' must be a list of integers, got {values!r}.")
        cells["seeds"] = ",".join(str(v) for v in values)
        for m in METRICS:
            std = (seeds.get("std") or {}).get(m)
            if std is not None:
                cells[f"{m}_std"] = _fmt_number(std, f"{m} std across seeds")
    return cells


# ----------------------------------------------------------------------------- reading


def _parse(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of an existing file; DataError messages do not name the file."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"not UTF-8 text (byte {exc.start}).") from exc
    except OSError as exc:
        raise DataError(f"cannot be read: {exc.strerror or exc}.") from exc
    if "\x00" in text:
        raise DataError("malformed CSV: it contains NUL bytes (binary or corrupted).")
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        records = list(reader)
    except csv.Error as exc:
        raise DataError(f"malformed CSV near line {reader.line_num}: {exc}.") from exc
    if not records:
        return [], []
    header, rows = records[0], []
    for lineno, record in enumerate(records[1:], start=2):
        if not record:
            continue  # a blank line
        if len(record) != len(header):
            raise DataError(
                f"record {lineno} has {len(record)} cells but the header has {len(header)}."
            )
        rows.append(dict(zip(header, record, strict=True)))
    return header, rows


def read_csv(csv_path: str | os.PathLike[str]) -> tuple[list[str], list[dict[str, str]]]:
    """The header and rows of a leaderboard CSV; a missing file reads as empty.

    Raises DataError (one line, naming the file) when it cannot be decoded or parsed.
    """
    path = Path(csv_path)
    if not path.exists():
        return [], []
    try:
        return _parse(path)
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from exc


def _to_csv(header: Sequence[str], rows: Iterable[Mapping[str, str]]) -> str:
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([sanitize_cell(h) for h in header])
    for row in rows:
        writer.writerow([sanitize_cell(str(row.get(c, "") or "")) for c in header])
    return buf.getvalue()


def _header_for(existing: Sequence[str]) -> list[str]:
    """Our columns, the two robustness columns of every check some row ran (in
    `ROBUSTNESS_CHECKS` order), then any other columns an existing file carries (kept,
    not dropped)."""
    present = set(existing)
    robust = [c for cols in CHECK_COLUMNS.values() if present & set(cols) for c in cols]
    return [*COLUMNS, *robust, *dict.fromkeys(c for c in existing if c not in HEADER)]


# -------------------------------------------------------------------------- validation


def _parse_float(cell: str) -> float | None:
    try:
        x = float(cell)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def _fold_problems(cell: str, column: str) -> list[str]:
    try:
        folds = json.loads(cell)
    except json.JSONDecodeError:
        return [f"{column} is not valid JSON"]
    if not isinstance(folds, list) or not all(isinstance(f, dict) for f in folds):
        return [f"{column} must be a JSON list of objects"]
    problems = []
    for f in folds:
        for key, value in f.items():
            if key in (*METRICS, "fold", "docs", "tokens") and (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
            ):
                problems.append(
                    f"{column} fold {f.get('fold')}: {key} = {value!r} is not a finite number"
                )
    return problems


def row_problems(row: Mapping[str, str]) -> list[str]:
    """What is wrong with one row's values (empty when it is fine)."""
    problems = []
    for column, cell in row.items():
        if cell and is_formula_like(cell):
            problems.append(f"{column} = {cell!r} would run as a spreadsheet formula")
    for m in METRICS:
        if m not in row:
            continue  # a missing column is reported once, for the header
        cell = row[m].strip()
        x = _parse_float(cell)
        if x is None:
            problems.append(f"{m} = {cell!r} is not a finite number")
        elif m in PERCENT_METRICS and not -_TOL <= x <= 100 + _TOL:
            problems.append(f"{m} = {cell} is outside [0, 100]")
        elif m == "privleak" and x < PRIVLEAK_MIN - _TOL:
            problems.append(f"privleak = {cell} is below -100, which no AUC can give")
    for column in ROBUSTNESS_COLUMNS:
        cell = (row.get(column) or "").strip()
        x = _parse_float(cell) if cell else 0.0
        if x is None or not -_TOL <= x <= 100 + _TOL:
            problems.append(f"{column} = {cell!r} is not a number in [0, 100]")
    for m in METRICS:
        lo_cell, hi_cell = row.get(f"{m}_ci_lo") or "", row.get(f"{m}_ci_hi") or ""
        if not lo_cell and not hi_cell:
            continue
        lo, hi = _parse_float(lo_cell), _parse_float(hi_cell)
        if lo is None or hi is None:
            problems.append(f"{m} CI [{lo_cell!r}, {hi_cell!r}] is not two finite numbers")
        elif lo > hi:
            problems.append(f"{m} CI low {lo_cell} exceeds high {hi_cell}")
    for column in ("name", "benchmark", "run_id"):
        if column in row and not (row.get(column) or "").strip():
            problems.append(f"{column} is empty")
    seed = row.get("seed") or ""
    if seed and not re.fullmatch(r"-?\d+", seed.strip()):
        problems.append(f"seed = {seed!r} is not an integer")
    if row.get("params"):
        try:
            json.loads(row["params"])
        except json.JSONDecodeError:
            problems.append("params is not valid JSON")
    for column in ("scale", "sustain"):
        if row.get(column):
            problems += _fold_problems(row[column], column)
    return problems + _trust_problems(row)


def _trust_problems(row: Mapping[str, str]) -> list[str]:
    """What is wrong with a row's manifest, seeds and std cells."""
    problems = []
    if row.get("manifest"):
        try:
            cell = json.loads(row["manifest"])
        except json.JSONDecodeError:
            cell = None
        if not isinstance(cell, dict):
            problems.append("manifest is not a JSON object")
    seeds = row.get("seeds") or ""
    if seeds and not re.fullmatch(r"\d+(,\d+)*", seeds.strip()):
        problems.append(f"seeds = {seeds!r} is not a comma-separated list of integers")
    for column in STD_COLUMNS:
        cell = (row.get(column) or "").strip()
        if cell and ((x := _parse_float(cell)) is None or x < 0):
            problems.append(f"{column} = {cell!r} is not a finite number >= 0")
    return problems


def validate(csv_path: str | os.PathLike[str]) -> list[str]:
    """Every problem found in a leaderboard CSV, one line each (empty list: valid).

    Lines do not repeat the file name (callers checking several files prefix it). Never
    raises for a bad file: a missing, unreadable or malformed CSV is reported as a problem.
    """
    path = Path(csv_path)
    if not path.is_file():
        return ["no such file."]
    try:
        header, rows = _parse(path)
    except DataError as exc:
        return [str(exc)]
    if not header:
        return [f"empty file; expected a header starting with {','.join(MUSE_COLUMNS)}."]
    problems = [
        f"header cell {h!r} would run as a spreadsheet formula."
        for h in header
        if is_formula_like(h)
    ]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        problems.append(f"missing required column(s): {', '.join(missing)}.")
    elif tuple(header[: len(MUSE_COLUMNS)]) != MUSE_COLUMNS:
        problems.append(f"the first columns must be exactly {','.join(MUSE_COLUMNS)}.")
    if len(set(header)) != len(header):
        problems.append("duplicate column names in the header.")
    seen: dict[str, int] = {}
    for lineno, row in enumerate(rows, start=2):
        where = f"row {lineno}"
        for problem in row_problems(row):
            problems.append(f"{where}: {problem}.")
        run_id = row.get("run_id") or ""
        if run_id and run_id in seen:
            problems.append(f"{where}: duplicate run_id {run_id!r} (first at row {seen[run_id]}).")
        seen.setdefault(run_id, lineno)
    return problems


# ------------------------------------------------------------------------------ writing


def append_row(
    csv_path: str | os.PathLike[str], row: Mapping[str, str], *, replace: bool = False
) -> bool:
    """Append one row to a leaderboard CSV, safely against concurrent appends.

    Returns False (and writes nothing) when a row with the same run_id is already there,
    unless `replace`, which swaps that row for the new one in place (a --force redo).
    Temp files left by a writer that was killed are removed under the lock.
    Raises DataError when the row is invalid or the existing file cannot be parsed.
    """
    row = {k: str(v) for k, v in row.items()}
    missing = [c for c in REQUIRED_COLUMNS if c not in row]
    if missing:
        raise DataError(f"leaderboard row lacks column(s): {', '.join(missing)}.")
    problems = row_problems({k: sanitize_cell(v) for k, v in row.items()})
    if problems:
        raise DataError(f"leaderboard row {row.get('run_id', '?')!r}: {problems[0]}.")
    path = Path(csv_path)
    with file_lock(path):
        remove_stale_temps(path)
        header, rows = read_csv(path)
        if any(r.get("run_id") == row.get("run_id") for r in rows):
            if not replace:
                return False
            rows = [r for r in rows if r.get("run_id") != row.get("run_id")]
        atomic_write_text(path, _to_csv(_header_for([*header, *row]), [*rows, row]))
    return True


def _load_valid(
    csv_paths: Sequence[str | os.PathLike[str]],
) -> tuple[list[str], list[tuple[str, dict[str, str]]]]:
    """The joint header and (source, row) pairs of several files; invalid files refused."""
    header: list[str] = []
    rows: list[tuple[str, dict[str, str]]] = []
    for p in csv_paths:
        problems = validate(p)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise DataError(f"{p}: {problems[0]}{more} Run `muse leaderboard validate {p}`.")
        file_header, file_rows = read_csv(p)
        header = _header_for([*header, *file_header])
        rows += [(str(p), r) for r in file_rows]
    return header or list(COLUMNS), rows


def _without(row: Mapping[str, str], key: str) -> dict[str, str]:
    return {k: v for k, v in row.items() if k != key}


def combine(
    csv_paths: Sequence[str | os.PathLike[str]], *, allow_mixed: bool = False
) -> tuple[list[str], list[dict[str, str]]]:
    """Header and de-duplicated rows of several leaderboard files, grouped by benchmark.

    Rows are grouped by benchmark id (first-seen order), reference rows (target,
    retrain) first within a group. Identical duplicates (same run_id) are dropped; the
    same run_id with different values raises MuseError, as do several benchmark ids
    unless `allow_mixed`. An invalid input file raises DataError.
    """
    header, sourced = _load_valid(csv_paths)
    seen: dict[str, tuple[str, dict[str, str]]] = {}
    groups: dict[str, list[dict[str, str]]] = {}
    for source, row in sourced:
        full = {c: row.get(c, "") for c in header}
        if row["run_id"] in seen:
            first_source, first = seen[row["run_id"]]
            # the same run (e.g. a reference model) evaluated on two dates is one row
            if _without(first, "date") != _without(full, "date"):
                raise MuseError(
                    f"run_id {row['run_id']!r} appears in {first_source} and {source} with "
                    "different values; remove one of them and merge again."
                )
            continue
        seen[row["run_id"]] = (source, full)
        groups.setdefault(row["benchmark"], []).append(full)
    if len(groups) > 1 and not allow_mixed:
        raise MuseError(
            f"refusing to rank rows of different benchmarks together ({', '.join(groups)}); "
            "their numbers are not comparable. Pass allow_mixed (--allow-mixed) to keep them grouped."
        )
    rows = [
        r
        for group in groups.values()
        for r in sorted(group, key=lambda r: r.get("algo") not in REFERENCE_ALGOS)
    ]
    return header, rows


def merge(
    csv_paths: Sequence[str | os.PathLike[str]],
    out_path: str | os.PathLike[str],
    *,
    allow_mixed: bool = False,
) -> int:
    """Combine leaderboard files into `out_path` (written atomically); returns the row count.

    See `combine` for de-duplication, grouping and when it refuses (MuseError).
    """
    combine(csv_paths, allow_mixed=allow_mixed)  # refuse bad inputs before creating a lock file
    with file_lock(out_path):  # held while reading too: out_path may be one of the inputs
        header, rows = combine(csv_paths, allow_mixed=allow_mixed)
        atomic_write_text(out_path, _to_csv(header, rows))
    return len(rows)
