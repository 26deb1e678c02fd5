"""`muse compare REPORT.json`: a run next to the published rows of the same method and
corpus, the difference, and the known causes of difference that apply to it.

A cause is listed only when the report shows it applies (its benchmark, its NPO form,
its effective batch, learning rate, epochs, chunk length, precision, selection, attack);
what the report does not record is not guessed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from muse_bench.core.errors import DataError
from muse_bench.published import TABLE_FILES, load_table, published_row

#: MUSE's four metrics in the order of its tables.
METRICS = ("verbmem_f", "knowmem_f", "privleak", "knowmem_r")
#: MUSE's model selections on News (SPEC §4), by algo.
MUSE_NEWS_SELECTIONS = {
    "ga": "epoch_1",
    "ga_gdr": "epoch_7",
    "ga_klr": "epoch_10",
    "npo": "epoch_1",
    "npo_gdr": "epoch_10",
    "npo_klr": "epoch_10",
    "tv": "alpha_16",
    "whp": "alpha_4",
}


def read_report(path: str | Path) -> dict[str, Any]:
    """A report.json's content; DataError (one line) when it is not a run's report."""
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: no such file.") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a JSON report ({exc}).") from None
    if not isinstance(report, dict) or not isinstance(report.get("metrics"), dict):
        raise DataError(f"{path}: not a muse report (no 'metrics').")
    for key in ("algo", "corpus"):
        if not report.get(key):
            raise DataError(f"{path}: the report lacks '{key}'.")
    return report


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and math.isfinite(x) else None


def _train_setting(params: Mapping[str, Any], key: str) -> Any:
    """A training hyperparameter; TV and WHP name their fine-tune's with `ft_`."""
    return params.get(key, params.get(f"ft_{key}"))


def causes(report: Mapping[str, Any], table: Mapping[str, Any]) -> list[str]:
    """The known causes of difference between `report` and `table` that apply."""
    out = []
    algo = str(report["algo"])
    bench = str(report.get("benchmark") or "")
    recipe = table.get("recipe") or {}
    params = report.get("params") or {}
    manifest = report.get("manifest") or {}
    if bench.startswith("embedded-"):
        out.append(
            f"benchmark: {bench} is the embedded mini-benchmark (2.2M-parameter models trained "
            "on generated worlds, 20 forget documents), the table is MUSE on 7B models and real "
            "text; compare the pattern (who over- or under-unlearns, the utility cost), not "
            "the levels."
        )
    elif bench.startswith("dir-"):
        out.append(f"benchmark: {bench} is a local directory, not the hub MUSE data.")
    npo_form = str(recipe.get("npo") or "")
    if algo.startswith("npo") and "logit" in npo_form:
        out.append(
            "NPO form: this harness trains the NPO paper's sequence-level loss; the table's "
            "NPO is MUSE's released code, which averages a logit difference over the "
            "vocabulary (MUSE issue #2): different losses, different numbers."
        )
    if algo in ("target", "retrain"):
        return out  # an evaluation alone: no training recipe to differ
    batch = (manifest.get("batch") or {}).get("effective")
    if batch is not None and recipe.get("effective_batch") not in (None, batch):
        out.append(
            f"effective batch: {batch} chunks per optimizer step here, "
            f"{recipe['effective_batch']} in the table's recipe (fewer steps per epoch, "
            "another gradient noise)."
        )
    for key in ("lr", "epochs"):
        mine, theirs = _train_setting(params, key), recipe.get(key)
        if mine is not None and theirs is not None and mine != theirs:
            out.append(f"{key}: {mine} here, {theirs} in the table's recipe.")
    chunk = manifest.get("chunk_length")
    if chunk is not None and recipe.get("chunk_length") not in (None, chunk):
        out.append(f"chunk length: {chunk} tokens here, {recipe['chunk_length']} in the table.")
    dtype, mixed = manifest.get("dtype"), manifest.get("mixed_precision")
    effective = "bfloat16" if mixed == "bf16" else dtype
    if effective and recipe.get("dtype") and recipe["dtype"] != effective:
        out.append(
            f"precision: {dtype} weights, mixed precision {mixed or 'no'} here; "
            f"{recipe['dtype']} in the table."
        )
    if "MUSE" in str(recipe.get("selection") or "") and report.get("select") == "last":
        out.append("selection: --select last here; the table keeps MUSE's first qualifying epoch.")
    known = MUSE_NEWS_SELECTIONS.get(algo)
    selected = report.get("selected")
    if (
        table.get("id") == "muse"
        and report.get("corpus") == "news"
        and known
        and selected
        and selected != known
    ):
        out.append(f"selection: {selected} was kept here; MUSE kept {known} on News.")
    attack = report.get("attack") or (manifest.get("evaluation") or {}).get("attack")
    if attack and attack != "min_k_40":
        out.append(f"privleak: attack {attack} here; the tables use Min-40%.")
    return out


def compare_report(
    report: Mapping[str, Any], tables: Sequence[str] = tuple(TABLE_FILES)
) -> list[dict[str, Any]]:
    """For each table with a row for the report's method and corpus: the row, the
    differences (run minus published, None where either is missing), whether the
    published value lies in the run's bootstrap interval, and the causes that apply."""
    out = []
    for table_id in tables:
        table = load_table(table_id)
        row = published_row(table_id, str(report["algo"]), str(report["corpus"]))
        if row is None:
            continue
        theirs = row.get("metrics") or {}
        diff, in_ci = {}, {}
        for m in METRICS:
            mine, pub = _num(report["metrics"].get(m)), _num(theirs.get(m))
            diff[m] = None if mine is None or pub is None else mine - pub
            ci = (report.get("ci") or {}).get(m)
            in_ci[m] = None if pub is None or not ci or None in ci else bool(ci[0] <= pub <= ci[1])
        out.append(
            {
                "table": table_id,
                "title": table["title"],
                "source": table["source"],
                "row": row,
                "diff": diff,
                "published_in_run_ci": in_ci,
                "causes": causes(report, table),
            }
        )
    return out


def _cell(x: float | None, signed: bool = False) -> str:
    if x is None:
        return f"{'n/a':>11s}"
    return f"{x:+11.1f}" if signed else f"{x:11.1f}"


def format_comparison(report: Mapping[str, Any], results: Sequence[Mapping[str, Any]]) -> str:
    """The text `muse compare` prints."""
    lines = [
        f"{report.get('name') or report['algo']} on {report['corpus']} "
        f"({report.get('benchmark', '?')}), selected {report.get('selected') or '-'}",
        f"{'':28s}" + "".join(f"{m:>11s}" for m in METRICS),
        f"{'this run':28s}" + "".join(_cell(_num(report["metrics"].get(m))) for m in METRICS),
    ]
    if not results:
        lines.append(f"no published table has {report['algo']} on {report['corpus']}.")
    for res in results:
        row = res["row"]
        label = f"{res['table']} ({row['label']})"
        metrics = row.get("metrics") or {}
        lines.append(f"{label[:28]:28s}" + "".join(_cell(_num(metrics.get(m))) for m in METRICS))
        lines.append(
            f"{'  difference':28s}" + "".join(_cell(res["diff"][m], True) for m in METRICS)
        )
        if row.get("status") != "published":
            lines.append(
                f"    status: {row['status']}" + (f" ({row['note']})" if row.get("note") else "")
            )
        src = res["source"]
        lines.append(
            f"    source: {src.get('paper') or src.get('repository')}, {src.get('table') or src.get('file')}"
        )
        if res["causes"]:
            lines.append(f"    known causes of difference from {res['table']}:")
            lines += [f"      - {c}" for c in res["causes"]]
    return "\n".join(lines)
