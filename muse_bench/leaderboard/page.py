"""The leaderboard as a static web page: sortable tables and MUSE-style plots.

`render` writes `index.html` (inline CSS and vanilla JS, nothing fetched from the
network) and, beside it, per benchmark id: `tradeoff_<id>.png` (forget vs. utility),
`scale_<id>.png` and `sustain_<id>.png` (utility against forget-set size / number of
requests, only when some row carries such data).
"""

from __future__ import annotations

import hashlib
import html
import io
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before any other matplotlib import: no display is ever needed

from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from muse_bench.core.io import atomic_write_bytes, atomic_write_text  # noqa: E402
from muse_bench.leaderboard.rows import METRICS, REFERENCE_ALGOS, combine  # noqa: E402

Row = Mapping[str, str]

METRIC_HELP: dict[str, tuple[str, str, str]] = {
    # column: (short title, direction mark, explanation)
    "verbmem_f": (
        "VerbMem on D_forget",
        "↓",
        "ROUGE-L F1 (×100) between the model's greedy continuation of a forget-set "
        "passage and the true text. Lower is better: the model no longer reproduces the "
        "text verbatim (the retrained model shows the level to aim for).",
    ),
    "privleak": (
        "PrivLeak",
        "→0",
        "Relative difference (%) between the Min-40% membership-inference AUC "
        "(forget vs. holdout) of this model and of the retrained model. Closer to 0 is "
        "better; strongly negative means under-unlearning (the target scores about -100), "
        "strongly positive means over-unlearning.",
    ),
    "knowmem_f": (
        "KnowMem on D_forget",
        "↓",
        "ROUGE-L F1 (×100) of answers to questions about the forget set. Lower is better.",
    ),
    "knowmem_r": (
        "KnowMem on D_retain (utility)",
        "↑",
        "ROUGE-L F1 (×100) of answers to questions about the retain set. Higher is better: "
        "the model kept the knowledge it should keep.",
    ),
}

# (column, header label, numeric?) as shown on the page, MUSE's four in MUSE's order.
TABLE_COLUMNS: tuple[tuple[str, str, bool], ...] = (
    ("name", "name", False),
    ("algo", "algo", False),
    *((m, f"{m} {METRIC_HELP[m][1]}", True) for m in METRICS),
    ("protocol", "protocol", False),
    ("selected", "selected", False),
    ("params", "params", False),
    ("seed", "seed", True),
    ("harness_version", "harness", False),
    ("date", "date", False),
    ("run_id", "run id", False),
)

_COLORS = {"target": "#c0392b", "retrain": "#27ae60"}


def slug(benchmark: str) -> str:
    """A file-name-safe, collision-free form of a benchmark id."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", benchmark).strip("._") or "benchmark"
    if safe != benchmark:
        safe += "-" + hashlib.sha256(benchmark.encode("utf-8")).hexdigest()[:8]
    return safe


def _float(cell: str | None) -> float | None:
    try:
        return float(cell) if cell else None
    except ValueError:
        return None


def _folds(row: Row, column: str) -> list[dict[str, Any]]:
    cell = row.get(column) or ""
    if not cell:
        return []
    try:
        folds = json.loads(cell)
    except json.JSONDecodeError:
        return []
    return [f for f in folds if isinstance(f, dict) and isinstance(f.get("knowmem_r"), int | float)]


def _plot_text(text: str) -> str:
    """Text safe for a matplotlib label: no mathtext, not hidden from legends."""
    text = text.replace("$", r"\$")
    return "\u200b" + text if text.startswith("_") else text


def _reference(rows: Sequence[Row], algo: str) -> Row | None:
    return next((r for r in rows if r.get("algo") == algo), None)


def _labels(rows: Sequence[Row]) -> list[str]:
    """Row labels for legends: the name, plus the run id where names repeat."""
    names = [r.get("name") or r.get("algo") or "?" for r in rows]
    return [
        _plot_text(n if names.count(n) == 1 else f"{n} ({r.get('run_id', '')[:8]})")
        for n, r in zip(names, rows, strict=True)
    ]


def _reference_lines(ax: Any, rows: Sequence[Row], horizontal: bool, vertical: bool) -> None:
    for algo in REFERENCE_ALGOS:
        ref = _reference(rows, algo)
        if ref is None:
            continue
        if horizontal and (y := _float(ref.get("knowmem_r"))) is not None:
            ax.axhline(y, color=_COLORS[algo], linestyle="--", linewidth=1, label=f"{algo} utility")
        if vertical and (x := _float(ref.get("knowmem_f"))) is not None:
            ax.axvline(x, color=_COLORS[algo], linestyle=":", linewidth=1)


def tradeoff_figure(rows: Sequence[Row], benchmark: str) -> Figure:
    """Utility (knowmem_r) against forget knowledge (knowmem_f), one labelled point per row."""
    fig = Figure(figsize=(6.4, 4.8), dpi=100)
    ax = fig.add_subplot()
    for row, label in zip(rows, _labels(rows), strict=True):
        x, y = _float(row.get("knowmem_f")), _float(row.get("knowmem_r"))
        if x is None or y is None:
            continue
        algo = row.get("algo", "")
        if algo in REFERENCE_ALGOS:
            ax.scatter([x], [y], marker="*", s=220, color=_COLORS[algo], zorder=3, label=algo)
        else:
            ax.scatter([x], [y], marker="o", s=45, zorder=3)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    _reference_lines(ax, rows, horizontal=True, vertical=True)
    ax.set_xlabel("KnowMem on D_forget (knowmem_f, lower is better)")
    ax.set_ylabel("KnowMem on D_retain (knowmem_r, higher is better)")
    ax.set_title(_plot_text(f"Forgetting vs. utility: {benchmark}"))
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def _curve_figure(
    rows: Sequence[Row], column: str, benchmark: str, xlabel: str, title: str, x_key: str
) -> Figure | None:
    series = [
        (label, folds)
        for row, label in zip(rows, _labels(rows), strict=True)
        if (folds := _folds(row, column))
    ]
    if not series:
        return None
    if any(x_key not in f for _, folds in series for f in folds):
        x_key, xlabel = "fold", f"{column} fold"
    fig = Figure(figsize=(6.4, 4.8), dpi=100)
    ax = fig.add_subplot()
    for label, folds in series:
        folds = sorted(folds, key=lambda f: f[x_key])
        ax.plot([f[x_key] for f in folds], [f["knowmem_r"] for f in folds], marker="o", label=label)
    _reference_lines(ax, rows, horizontal=True, vertical=False)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # fold numbers and document counts
    ax.set_xlabel(xlabel)
    ax.set_ylabel("KnowMem on D_retain (knowmem_r, higher is better)")
    ax.set_title(_plot_text(f"{title}: {benchmark}"))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def scale_figure(rows: Sequence[Row], benchmark: str) -> Figure | None:
    """Utility against forget-set size (documents) per row's `scale` folds; None without data."""
    return _curve_figure(
        rows,
        "scale",
        benchmark,
        "Forget-set size (documents)",
        "Utility vs. forget-set size",
        "docs",
    )


def sustain_figure(rows: Sequence[Row], benchmark: str) -> Figure | None:
    """Utility after each sequential unlearning request per row's `sustain` folds; None without data."""
    return _curve_figure(
        rows,
        "sustain",
        benchmark,
        "Number of unlearning requests",
        "Utility under sequential requests",
        "fold",
    )


def save_png(fig: Figure, path: str | os.PathLike[str]) -> None:
    """Render a figure to PNG and write it atomically."""
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    atomic_write_bytes(path, buf.getvalue())


# --------------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2rem;color:#222;max-width:90rem}
h1{font-size:1.6rem}h2{font-size:1.25rem;margin-top:2.5rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.9rem;margin:1rem 0}
th,td{border:1px solid #ddd;padding:.3rem .55rem;text-align:left;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
th button{all:unset;cursor:pointer;font-weight:600}
th button:focus-visible{outline:2px solid #2962ff}
th[aria-sort=ascending] button::after{content:" \\25B2"}
th[aria-sort=descending] button::after{content:" \\25BC"}
th.sorted{background:#eef3ff}
tr.ref{background:#fbf7e9}
.ci{color:#777;font-size:.8em}
details code{display:block;max-width:28em;white-space:pre-wrap;word-break:break-all}
code{font-size:.8em;word-break:break-all}
dl.legend dt{font-weight:600;margin-top:.5rem}dl.legend dd{margin-left:1.5rem}
figure{display:inline-block;margin:.5rem 1rem .5rem 0}
figure img{max-width:100%;height:auto;border:1px solid #eee}
"""

_JS = """
(function () {
  function key(cell, numeric) {
    var raw = cell.getAttribute('data-sort');
    if (raw === null) raw = cell.textContent.trim();
    if (!numeric) return raw.toLowerCase();
    var x = parseFloat(raw);
    return isNaN(x) ? null : x;
  }
  document.querySelectorAll('table.leaderboard').forEach(function (table) {
    var heads = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(heads, function (th, col) {
      th.querySelector('button').addEventListener('click', function () {
        var asc = th.getAttribute('aria-sort') !== 'ascending';
        var numeric = th.getAttribute('data-type') === 'number';
        Array.prototype.forEach.call(heads, function (h) {
          h.removeAttribute('aria-sort');
          h.classList.remove('sorted');
        });
        th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
        th.classList.add('sorted');
        var body = table.tBodies[0];
        var rows = Array.prototype.map.call(body.rows, function (row, i) {
          return {row: row, key: key(row.cells[col], numeric), i: i};
        });
        rows.sort(function (a, b) {
          if (a.key === b.key) return a.i - b.i;
          if (a.key === null || a.key === '') return 1;   // blanks last either way
          if (b.key === null || b.key === '') return -1;
          var c = a.key < b.key ? -1 : 1;
          return asc ? c : -c;
        });
        rows.forEach(function (r) { body.appendChild(r.row); });
      });
    });
  });
})();
"""


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _cell(row: Row, column: str, numeric: bool) -> str:
    value = row.get(column) or ""
    if column in METRICS:
        lo, hi = row.get(f"{column}_ci_lo") or "", row.get(f"{column}_ci_hi") or ""
        ci = f' <span class="ci">[{_e(lo)}, {_e(hi)}]</span>' if lo and hi else ""
        return f'<td class="num" data-sort="{_e(value)}">{_e(value)}{ci}</td>'
    if column == "params" and value:
        # folded: a full hyperparameter set would make every row dozens of lines tall
        return (
            f'<td data-sort="{_e(value)}"><details><summary>settings</summary>'
            f"<code>{_e(value)}</code></details></td>"
        )
    return f'<td class="num">{_e(value)}</td>' if numeric else f"<td>{_e(value)}</td>"


def _table(rows: Sequence[Row], table_id: str) -> str:
    heads = []
    for column, label, numeric in TABLE_COLUMNS:
        tip = METRIC_HELP[column][0] if column in METRIC_HELP else column
        kind = "number" if numeric else "text"
        heads.append(
            f'<th scope="col" data-column="{_e(column)}" data-type="{kind}" title="{_e(tip)}">'
            f'<button type="button">{_e(label)}</button></th>'
        )
    body = []
    for row in rows:
        cls = ' class="ref"' if row.get("algo") in REFERENCE_ALGOS else ""
        cells = "".join(_cell(row, c, n) for c, _, n in TABLE_COLUMNS)
        body.append(f'<tr{cls} data-run-id="{_e(row.get("run_id", ""))}">{cells}</tr>')
    return (
        f'<table class="leaderboard" id="{_e(table_id)}"><thead><tr>{"".join(heads)}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def _legend() -> str:
    items = "".join(
        f"<dt>{_e(m)} ({_e(title)}, {_e(mark)})</dt><dd>{_e(text)}</dd>"
        for m, (title, mark, text) in METRIC_HELP.items()
    )
    return (
        '<section aria-labelledby="legend"><h2 id="legend">What the columns mean</h2>'
        f'<dl class="legend">{items}'
        "<dt>reference rows</dt><dd>Highlighted rows are the target model (before "
        "unlearning) and the retrained model (trained without the forget set, the gold "
        "standard). Bracketed numbers are confidence intervals where reported.</dd>"
        "<dt>sorting</dt><dd>Click a column header to sort; click again to reverse.</dd>"
        "</dl></section>"
    )


def build_html(groups: Mapping[str, Sequence[Row]], images: Mapping[str, Sequence[str]]) -> str:
    """The whole page: legend, then per benchmark a table and its plot images."""
    sections = []
    for i, (benchmark, rows) in enumerate(groups.items()):
        figures = "".join(
            f'<figure><img src="{_e(name)}" alt="{_e(name.split("_", 1)[0])} plot for '
            f'{_e(benchmark)}"></figure>'
            for name in images.get(benchmark, ())
        )
        sections.append(
            f'<section class="benchmark" data-benchmark="{_e(benchmark)}">'
            f"<h2>Benchmark <code>{_e(benchmark)}</code> ({len(rows)} rows)</h2>"
            f"{_table(rows, f'table-{i}')}{figures}</section>"
        )
    if not sections:
        sections.append("<p>No rows yet.</p>")
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "img-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'\">"
        f"<title>MUSE leaderboard</title><style>{_CSS}</style></head><body>"
        "<h1>MUSE unlearning leaderboard</h1>"
        f"{_legend()}{''.join(sections)}<script>{_JS}</script></body></html>\n"
    )


def render(csv_paths: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str]) -> Path:
    """Write `out_dir/index.html` and its PNG plots for the given leaderboard files.

    Raises DataError for an invalid input file and MuseError for conflicting run ids.
    """
    out = Path(out_dir)
    _, rows = combine(csv_paths, allow_mixed=True)
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(row["benchmark"], []).append(row)
    images: dict[str, list[str]] = {}
    for benchmark, group in groups.items():
        for kind, make in (
            ("tradeoff", tradeoff_figure),
            ("scale", scale_figure),
            ("sustain", sustain_figure),
        ):
            name = f"{kind}_{slug(benchmark)}.png"
            fig = make(group, benchmark)
            if fig is None:
                (out / name).unlink(missing_ok=True)  # drop a stale plot from an earlier render
                continue
            save_png(fig, out / name)
            images.setdefault(benchmark, []).append(name)
    page = out / "index.html"
    atomic_write_text(page, build_html(groups, images))
    return page
