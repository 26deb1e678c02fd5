"""The leaderboard as a static web page: compact, filterable tables, then the plots.

`render` writes `index.html` (inline CSS and vanilla JS, nothing fetched from the
network; it works opened from file://) and, beside it, the figures of
`muse_bench.leaderboard.plots` per benchmark id: `tradeoff_<id>.png`,
`robustness_<id>.png` (when rows carry `verbmem_f_<check>` / `knowmem_f_<check>`
columns), `scale_<id>.png` and `sustain_<id>.png` (when rows carry such folds).

Each benchmark gets one table: the method name (linked to its paper, with the
unlearner's description on hover, read from the unlearner registry), the four MUSE
metrics with one decimal (the interval on hover), optional column groups (robustness
checks, extra metrics), and a per-row details view with the bookkeeping (settings,
seed, harness version, date, run id). Metric cells are shaded from the target's value
(red) to the retrain's (green); see `closeness`.
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from muse_bench.core.io import atomic_write_text
from muse_bench.leaderboard.plots import (
    Row,
    robustness_column,
    robustness_figure,
    save_png,
    scale_figure,
    sustain_figure,
    tradeoff_figure,
)
from muse_bench.leaderboard.rows import COLUMNS, METRICS, REFERENCE_ALGOS, combine

# Direction of "better": "down" (lower), "up" (higher) or "zero" (closer to 0).
Direction = str

METRIC_HELP: dict[str, tuple[str, str, Direction, str]] = {
    # column: (header, long title, direction, explanation)
    "verbmem_f": (
        "VerbMem_f",
        "VerbMem on D_forget",
        "down",
        "ROUGE-L F1 (×100) between the model's greedy continuation of a forget-set "
        "passage and the true text. Lower is better: the model no longer reproduces the "
        "text verbatim (the retrained model shows the level to aim for).",
    ),
    "knowmem_f": (
        "KnowMem_f",
        "KnowMem on D_forget",
        "down",
        "ROUGE-L F1 (×100) of answers to questions about the forget set. Lower is better.",
    ),
    "privleak": (
        "PrivLeak",
        "PrivLeak",
        "zero",
        "Relative difference (%) between the Min-40% membership-inference AUC "
        "(forget vs. holdout) of this model and of the retrained model. Closer to 0 is "
        "better; strongly negative means under-unlearning (the target scores about -100), "
        "strongly positive means over-unlearning.",
    ),
    "knowmem_r": (
        "KnowMem_r",
        "KnowMem on D_retain (utility)",
        "up",
        "ROUGE-L F1 (×100) of answers to questions about the retain set. Higher is better: "
        "the model kept the knowledge it should keep.",
    ),
}
# Extra metrics another tool may add; shaded like the MUSE ones when present.
EXTRA_HELP: dict[str, tuple[str, Direction, str]] = {
    "es_f": ("ES_f", "down", "Extraction strength on the forget set (×100). Lower is better."),
    "em_f": ("EM_f", "down", "Exact memorization on the forget set (×100). Lower is better."),
    "es_r": ("ES_r", "up", "Extraction strength on the retain set (×100)."),
    "em_r": ("EM_r", "up", "Exact memorization on the retain set (×100)."),
}
ARROWS = {"down": "↓", "up": "↑", "zero": "→0"}
#: Column groups a reader can hide or show: (id, label).
GROUPS: tuple[tuple[str, str], ...] = (
    ("muse", "MUSE metrics"),
    ("robust", "Robustness checks"),
    ("extra", "Extra metrics"),
)
#: Bookkeeping shown in a row's details view, in this order: (column, label).
DETAILS: tuple[tuple[str, str], ...] = (
    ("algo", "algorithm"),
    ("selected", "selected"),
    ("protocol", "protocol"),
    ("seed", "seed"),
    ("corpus", "corpus"),
    ("harness_version", "harness"),
    ("date", "date"),
    ("run_id", "run id"),
)
#: Floor of the target-to-retrain distance used for shading (metric points): when the
#: two references nearly agree, a method 1 point away is not "as far as the target".
MIN_SPAN = 5.0
_CI = ("_ci_lo", "_ci_hi")
_URL = re.compile(r"https?://[^\s\"'<>]+")


def slug(benchmark: str) -> str:
    """A file-name-safe, collision-free form of a benchmark id."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", benchmark).strip("._") or "benchmark"
    if safe != benchmark:
        safe += "-" + hashlib.sha256(benchmark.encode("utf-8")).hexdigest()[:8]
    return safe


def _float(cell: str | None) -> float | None:
    try:
        x = float(cell) if cell else None
    except ValueError:
        return None
    return x if x is None or math.isfinite(x) else None


def fmt(x: float) -> str:
    """One decimal, a true minus sign, never "-0.0"."""
    x = round(x, 1)
    return f"{abs(x):.1f}" if x == 0 else f"{x:.1f}".replace("-", "−")


def closeness(value: float, target: float, retrain: float, direction: Direction) -> float:
    """0 (green) .. 1 (red): how far `value` is from what the retrain model achieves.

    "down" metrics (verbmem_f, knowmem_f: what the model still knows of the forget set):
    the distance above the retrain's value, as a fraction of the target's distance from
    it (at least `MIN_SPAN`), capped at 1; at or below the retrain's value is 0.
    "zero" (privleak): the same with the retrain's value 0 by definition, both signs
    counting (under- and over-unlearning). "up" (knowmem_r, utility): the shortfall
    below the lower of the two references' values, as a fraction of that value, so a
    model that kept a reference's utility is green and one that lost it all is red
    (both references keep utility, so "close to the target" is no failure there).
    """
    if direction == "up":
        level = min(target, retrain)
        return min(max(level - value, 0.0) / max(level, MIN_SPAN), 1.0)
    if direction == "zero":
        retrain = 0.0
    span = max(abs(target - retrain), MIN_SPAN)
    gap = value - retrain
    if direction == "down" and gap < 0:
        return 0.0
    return min(abs(gap) / span, 1.0)


def shade(s: float) -> str:
    """The cell background for a closeness `s`: pale green (0) through yellow to pale red (1)."""
    return f"hsl({round(120 * (1 - s))},62%,{round(86 - 4 * math.sin(math.pi * s))}%)"


# ------------------------------------------------------------------------------ columns


@dataclass(frozen=True)
class Column:
    """One numeric column of a table: CSV column, group, header, tooltip, direction."""

    key: str
    group: str
    label: str
    sub: str
    title: str
    direction: Direction | None


def _has_values(rows: Sequence[Row], column: str) -> bool:
    return any((r.get(column) or "").strip() for r in rows)


def columns_for(rows: Sequence[Row]) -> list[Column]:
    """The numeric columns to show for these rows: MUSE's four, then each robustness
    check's columns with values, then other numeric columns (extras) with values."""
    out = [
        Column(m, "muse", METRIC_HELP[m][0], ARROWS[METRIC_HELP[m][2]], METRIC_HELP[m][1],
               METRIC_HELP[m][2])
        for m in METRICS
    ]  # fmt: skip
    header = list(rows[0]) if rows else []
    for column in header:
        parsed = robustness_column(column)
        if parsed and _has_values(rows, column):
            base, check = parsed
            out.append(
                Column(
                    column,
                    "robust",
                    METRIC_HELP[base][0],
                    f"after {check} {ARROWS['down']}",
                    f"{METRIC_HELP[base][1]} after the robustness check '{check}' "
                    "(shaded against the target and retrain after the same check)",
                    METRIC_HELP[base][2],
                )
            )
    for column in header:
        if (
            column in COLUMNS
            or robustness_column(column)
            or column.endswith(_CI)
            or not _has_values(rows, column)
            or not all(_float(r.get(column)) is not None for r in rows if r.get(column))
        ):
            continue
        label, direction, text = EXTRA_HELP.get(column, (column, None, column))
        sub = ARROWS[direction] if direction else ""
        out.append(Column(column, "extra", label, sub, text, direction))
    return out


def text_extras(rows: Sequence[Row]) -> list[str]:
    """Non-numeric columns beyond the schema (kept, shown in the details view)."""
    header = list(rows[0]) if rows else []
    numeric = {c.key for c in columns_for(rows)}
    return [
        c
        for c in header
        if c not in COLUMNS and c not in numeric and not c.endswith(_CI) and _has_values(rows, c)
    ]


# --------------------------------------------------------------------------------- HTML


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _interval(row: Row, column: str) -> str:
    lo, hi = _float(row.get(f"{column}_ci_lo")), _float(row.get(f"{column}_ci_hi"))
    return f"{fmt(lo)} to {fmt(hi)}" if lo is not None and hi is not None else ""


def _metric_cell(row: Row, col: Column, refs: Mapping[str, Row]) -> str:
    cls = f"num g-{col.group}"
    x = _float(row.get(col.key))
    if x is None:
        return f'<td class="{cls} empty" data-sort="">–</td>'
    style = ""
    target, retrain = (_float(refs[a].get(col.key)) if a in refs else None for a in REFERENCE_ALGOS)
    if col.direction and target is not None and retrain is not None:
        style = f' style="background:{shade(closeness(x, target, retrain, col.direction))}"'
    interval = _interval(row, col.key)
    title = f' title="95% interval {_e(interval)}"' if interval else ""
    ci = f'<span class="ci">{_e(interval)}</span>' if interval else ""
    return (
        f'<td class="{cls}" data-sort="{x!r}"{style}{title}>'
        f'<span class="v">{_e(fmt(x))}</span>{ci}</td>'
    )


def _name_cell(row: Row, papers: Mapping[str, tuple[str, str]]) -> str:
    name, algo = row.get("name") or row.get("algo") or "?", row.get("algo") or ""
    url, about = papers.get(algo, ("", ""))
    tip = f' title="{_e(about)}"' if about else ""
    if url:
        shown = f'<a href="{_e(url)}"{tip} rel="noopener noreferrer">{_e(name)}</a>'
    else:
        shown = f"<span{tip}>{_e(name)}</span>"
    role = {"target": "before unlearning", "retrain": "the goal"}.get(algo)
    if role:
        shown += f' <span class="role">{role}</span>'
    elif algo and algo != name:
        shown += f' <span class="algo">{_e(algo)}</span>'
    return f'<th scope="row" class="name" data-sort="{_e(name)}">{shown}</th>'


def _params(cell: str) -> str:
    try:
        params = json.loads(cell) if cell else {}
    except json.JSONDecodeError:
        return f"<code>{_e(cell)}</code>"
    if not isinstance(params, dict):
        return f"<code>{_e(cell)}</code>"
    return "".join(
        f"<span class=kv><b>{_e(k)}</b>={_e(json.dumps(v, ensure_ascii=False))}</span> "
        for k, v in params.items()
    )


def _details(row: Row, cols: Sequence[Column], extras: Sequence[str], width: int) -> str:
    items = [(label, _e(row.get(c) or "")) for c, label in DETAILS if row.get(c)]
    intervals = [
        f"{_e(c.label)} {_e(c.sub)}: {_e(i)}" for c in cols if (i := _interval(row, c.key))
    ]
    if intervals:
        items.append(("95% intervals", "; ".join(intervals)))
    items += [(c, _e(row.get(c) or "")) for c in extras if row.get(c)]
    for column in ("scale", "sustain"):
        if row.get(column):
            try:
                n = len(json.loads(row[column]))
            except (json.JSONDecodeError, TypeError):
                n = 0
            items.append((column, f"{n} folds (see the {column} plot)"))
    if row.get("params"):
        items.append(("settings", _params(row["params"])))
    body = "".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>" for k, v in items)
    return f'<tr class="details" hidden><td colspan="{width}"><dl>{body}</dl></td></tr>'


def _table(
    rows: Sequence[Row], table_id: str, papers: Mapping[str, tuple[str, str]]
) -> tuple[str, set[str]]:
    """The table for one benchmark's rows, and the column groups it uses."""
    cols = columns_for(rows)
    extras = text_extras(rows)
    refs = {r["algo"]: r for r in rows if r.get("algo") in REFERENCE_ALGOS}
    heads = [
        '<th scope="col" class="toggle"><span class="sr">details</span></th>',
        '<th scope="col" data-column="name" data-type="text" class="name">'
        '<button type="button">method</button></th>',
    ]
    for col in cols:
        heads.append(
            f'<th scope="col" class="num g-{col.group}" data-column="{_e(col.key)}" '
            f'data-type="number" title="{_e(col.title)}"><button type="button">'
            f"{_e(col.label)}<small>{_e(col.sub)}</small></button></th>"
        )
    body = []
    width = len(cols) + 2
    for row in rows:
        algo = row.get("algo") or ""
        cls = "ref" if algo in REFERENCE_ALGOS else "row"
        search = " ".join(filter(None, (row.get("name"), algo))).lower()
        cells = "".join(_metric_cell(row, c, refs) for c in cols)
        body.append(
            f'<tr class="{cls}" data-run-id="{_e(row.get("run_id", ""))}" '
            f'data-search="{_e(search)}"><td class="toggle"><button type="button" '
            f'aria-expanded="false" aria-label="details of {_e(row.get("name") or algo)}">'
            f"▸</button></td>{_name_cell(row, papers)}{cells}</tr>"
            + _details(row, cols, extras, width)
        )
    table = (
        f'<table class="leaderboard" id="{_e(table_id)}"><thead><tr>{"".join(heads)}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )
    return table, {c.group for c in cols}


def _glossary(groups: set[str]) -> str:
    items = [
        f"<dt>{_e(label)} {_e(ARROWS[d])} <code>{_e(m)}</code>"
        f"{f' ({_e(title)})' if title != label else ''}</dt><dd>{_e(text)}</dd>"
        for m, (label, title, d, text) in METRIC_HELP.items()
    ]
    if "robust" in groups:
        items.append(
            "<dt>Robustness checks <code>verbmem_f_&lt;check&gt;</code>, "
            "<code>knowmem_f_&lt;check&gt;</code></dt><dd>The same metric after an attack "
            "on the unlearned model (e.g. <code>quant4</code>: 4-bit weight quantization; "
            "<code>relearn</code>: a few fine-tuning steps on part of the forget set). "
            "Unlearning that only hid the knowledge lets it come back; the target and "
            "retrain rows show the attacked references.</dd>"
        )
    if "extra" in groups:
        items.append(
            "<dt>Extra metrics</dt><dd>Columns beyond MUSE's, such as extraction "
            "strength (<code>es_f</code>) and exact memorization (<code>em_f</code>).</dd>"
        )
    items += [
        "<dt>Reference rows</dt><dd>The target model (before unlearning) and the retrained "
        "model (trained without the forget set: the goal) stay at the top of each table.</dd>",
        "<dt>Colours</dt><dd>Green: as good as the retrained model; red: as bad as the "
        "target or worse. For VerbMem_f and KnowMem_f (and their robustness columns), the "
        "distance above the retrain's value as a fraction of the target's distance from "
        f"it (at least {MIN_SPAN:g} points); at or below the retrain's value is green. "
        "For PrivLeak, the distance from 0 as a fraction of the target's, both signs "
        "counting (under- and over-unlearning). For KnowMem_r (utility), the shortfall "
        "below the lower of the target's and retrain's values as a fraction of it: a "
        "method that kept the utility is green, one that lost it all is red.</dd>",
        "<dt>Intervals</dt><dd>95% bootstrap intervals, where reported: hover a number, "
        "tick <em>intervals</em>, or open a row's details (▸).</dd>",
        "<dt>Details</dt><dd>▸ opens a row's bookkeeping: settings, selected epoch or α, "
        "seed, harness version, date and run id.</dd>",
        "<dt>Sorting and filtering</dt><dd>Click a column header to sort (again to "
        "reverse); the filter box keeps the methods whose name or algorithm contains its "
        "text (the target and retrain rows stay). Click a plot to open it full size.</dd>",
    ]
    return (
        '<details class="glossary" id="glossary"><summary>What the columns and colours '
        f"mean</summary><dl>{''.join(items)}</dl></details>"
    )


def _controls(benchmarks: Sequence[str], groups: set[str]) -> str:
    options = "".join(f'<option value="{_e(b)}">{_e(b)}</option>' for b in benchmarks)
    toggles = "".join(
        f'<label><input type="checkbox" data-group="{g}" checked> {_e(label)}</label>'
        for g, label in GROUPS
        if g in groups
    )
    return (
        '<form class="controls" role="search" onsubmit="return false">'
        '<label>Filter <input type="search" id="filter" placeholder="method name, e.g. npo" '
        'autocomplete="off"></label>'
        f'<label>Benchmark <select id="benchmark"><option value="">all</option>{options}'
        "</select></label>"
        f'<fieldset><legend>Columns</legend>{toggles}<label><input type="checkbox" '
        'id="show-ci"> intervals</label></fieldset>'
        '<output id="count" aria-live="polite"></output></form>'
    )


_SCALE = (
    '<span class="scale" aria-hidden="true">'
    + "".join(f'<i style="background:{shade(s / 4)}"></i>' for s in range(4, -1, -1))
    + "</span>"
)

_CSS = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;
 padding:1.25rem 1.5rem 3rem;color:#1f2328;max-width:80rem;line-height:1.4}
h1{font-size:1.5rem;margin:.2rem 0 .3rem}
h2{font-size:1.15rem;margin:2rem 0 .4rem}
h2 code{font-size:1em}
p.lead{margin:.2rem 0 1rem;color:#444;max-width:60rem}
.scale{display:inline-flex;vertical-align:middle;margin:0 .25rem}
.scale i{display:inline-block;width:1.1rem;height:.8rem}
.controls{display:flex;flex-wrap:wrap;gap:.5rem 1.25rem;align-items:center;padding:.55rem .8rem;
 background:#f6f8fa;border:1px solid #d0d7de;border-radius:6px;position:sticky;top:0;z-index:2}
.controls input[type=search]{width:14rem;padding:.2rem .4rem}
.controls fieldset{border:0;margin:0;padding:0;display:flex;gap:.8rem;align-items:center}
.controls legend{float:left;margin-right:.3rem;padding:0}
#count{color:#57606a;font-size:.9rem}
table{border-collapse:collapse;font-size:.92rem;margin:.5rem 0 1rem}
th,td{padding:.28rem .6rem;text-align:left;vertical-align:middle;border-bottom:1px solid #e4e7eb}
thead th{border-bottom:2px solid #c9ced6;vertical-align:bottom;white-space:nowrap}
th.num,td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
thead small{display:block;font-weight:400;color:#57606a;font-size:.78em}
th button{all:unset;cursor:pointer;font-weight:600}
th button:focus-visible,td button:focus-visible{outline:2px solid #2962ff}
th[aria-sort=ascending] button::after{content:" \\25B2";font-size:.75em}
th[aria-sort=descending] button::after{content:" \\25BC";font-size:.75em}
th.name{font-weight:500;white-space:nowrap}
tbody th.name a{color:#0b5cad;text-decoration:none}
tbody th.name a:hover{text-decoration:underline}
.algo,.role{color:#6e7781;font-size:.8em;font-weight:400;margin-left:.3rem}
tr.ref th.name{font-weight:700}
tr.ref + tr.details + tr.row td,tr.ref + tr.details + tr.row th{border-top:2px solid #c9ced6}
td.toggle,th.toggle{width:1.6rem;padding-right:0}
td.toggle button{all:unset;cursor:pointer;color:#57606a;display:inline-block;width:1rem;
 transition:transform .1s}
td.toggle button[aria-expanded=true]{transform:rotate(90deg)}
td[title]{cursor:help}
td.empty{color:#aaa}
.ci{display:none;color:#57606a;font-size:.75em}
.show-ci .ci{display:block}
tr.details td{background:#fafbfc;font-size:.85rem}
tr.details dl{display:grid;grid-template-columns:max-content 1fr;gap:.15rem 1rem;margin:.2rem 0;
 width:0;min-width:100%}
tr.details dt{color:#57606a}tr.details dd{margin:0;overflow-wrap:anywhere}
.kv{display:inline-block;margin-right:.6rem}.kv b{font-weight:500}
.hide-muse .g-muse,.hide-robust .g-robust,.hide-extra .g-extra{display:none}
.board{display:flex;flex-wrap:wrap;gap:.5rem 1.5rem;align-items:flex-start}
.table-wrap{max-width:100%;overflow-x:auto}
.figures{display:flex;flex-wrap:wrap;gap:1rem;flex:1 1 26rem;margin-top:.5rem}
figure{margin:0;flex:1 1 26rem;max-width:40rem}
figure.robustness{flex-basis:100%;max-width:60rem}
figure img{width:100%;height:auto;border:1px solid #eaecef}
.glossary{margin-top:2.5rem;border-top:1px solid #d0d7de;padding-top:.8rem}
.glossary summary{cursor:pointer;font-weight:600}
.glossary dl{max-width:60rem}.glossary dt{font-weight:600;margin-top:.6rem}
.glossary dd{margin-left:1.2rem}
.sr{position:absolute;width:1px;height:1px;overflow:hidden;clip:rect(0 0 0 0)}
code{font-size:.88em}
"""

_JS = """
(function () {
  'use strict';
  var each = function (list, f) { Array.prototype.forEach.call(list, f); };
  function key(cell, numeric) {
    var raw = cell.getAttribute('data-sort');
    if (raw === null) raw = cell.textContent.trim();
    if (!numeric) return raw.toLowerCase();
    var x = parseFloat(raw);
    return isNaN(x) ? null : x;
  }
  // A method row travels with the details row right after it.
  function pairs(body, cls) {
    return Array.prototype.filter.call(body.rows, function (r) {
      return r.classList.contains(cls);
    }).map(function (r) { return [r, r.nextElementSibling]; });
  }
  each(document.querySelectorAll('table.leaderboard'), function (table) {
    var heads = table.tHead.rows[0].cells;
    var body = table.tBodies[0];
    each(heads, function (th, col) {
      var button = th.querySelector('button');
      if (!button) return;
      button.addEventListener('click', function () {
        var asc = th.getAttribute('aria-sort') !== 'ascending';
        var numeric = th.getAttribute('data-type') === 'number';
        each(heads, function (h) { h.removeAttribute('aria-sort'); });
        th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
        var rows = pairs(body, 'row').map(function (p, i) {
          return {p: p, key: key(p[0].cells[col], numeric), i: i};
        });
        rows.sort(function (a, b) {
          if (a.key === b.key) return a.i - b.i;
          if (a.key === null || a.key === '') return 1;   // blanks last either way
          if (b.key === null || b.key === '') return -1;
          var c = a.key < b.key ? -1 : 1;
          return asc ? c : -c;
        });
        // the target and retrain rows stay on top, the scale for the rest
        pairs(body, 'ref').concat(rows.map(function (r) { return r.p; }))
          .forEach(function (p) { body.appendChild(p[0]); body.appendChild(p[1]); });
      });
    });
    each(body.querySelectorAll('td.toggle button'), function (button) {
      button.addEventListener('click', function () {
        var open = button.getAttribute('aria-expanded') !== 'true';
        button.setAttribute('aria-expanded', String(open));
        button.closest('tr').nextElementSibling.hidden = !open;
      });
    });
  });

  var filter = document.getElementById('filter');
  var bench = document.getElementById('benchmark');
  var count = document.getElementById('count');
  function apply() {
    var q = filter.value.trim().toLowerCase();
    var shown = 0, total = 0;
    each(document.querySelectorAll('section.benchmark'), function (s) {
      var on = !bench.value || s.getAttribute('data-benchmark') === bench.value;
      s.hidden = !on;
      each(s.querySelectorAll('tr.row'), function (r) {
        var match = !q || r.getAttribute('data-search').indexOf(q) !== -1;
        r.hidden = !match;
        var open = r.querySelector('td.toggle button').getAttribute('aria-expanded') === 'true';
        r.nextElementSibling.hidden = !(match && open);
        if (on) { total += 1; if (match) shown += 1; }
      });
    });
    count.textContent = q ? shown + ' of ' + total + ' methods match' : '';
  }
  filter.addEventListener('input', apply);
  bench.addEventListener('change', apply);
  each(document.querySelectorAll('input[data-group]'), function (box) {
    box.addEventListener('change', function () {
      document.body.classList.toggle('hide-' + box.getAttribute('data-group'), !box.checked);
    });
  });
  var glossary = document.getElementById('glossary');
  each(document.querySelectorAll('a[href="#glossary"]'), function (a) {
    a.addEventListener('click', function () { glossary.open = true; });
  });
  document.getElementById('show-ci').addEventListener('change', function (e) {
    document.body.classList.toggle('show-ci', e.target.checked);
  });
  apply();
})();
"""

_FIGURE_ALT = {
    "tradeoff": "Forgetting (knowmem_f) against utility (knowmem_r)",
    "robustness": "Metrics before and after the robustness checks",
    "scale": "Utility against forget-set size",
    "sustain": "Utility after each sequential unlearning request",
}


def build_html(
    groups: Mapping[str, Sequence[Row]],
    images: Mapping[str, Sequence[str]],
    papers: Mapping[str, tuple[str, str]] | None = None,
) -> str:
    """The whole page: controls, per benchmark a table and its plots, then the glossary.

    `papers` maps an algo to (paper URL, one-line description) for its name's link.
    """
    papers = papers or {}
    sections, used = [], set()
    for i, (benchmark, rows) in enumerate(groups.items()):
        table, table_groups = _table(rows, f"table-{i}", papers)
        used |= table_groups
        figures = "".join(
            f'<figure class="{_e(name.split("_", 1)[0])}"><a href="{_e(name)}">'
            f'<img src="{_e(name)}" alt="'
            f'{_e(_FIGURE_ALT.get(name.split("_", 1)[0], "plot"))} for {_e(benchmark)}">'
            "</a></figure>"
            for name in images.get(benchmark, ())
        )
        methods = sum(r.get("algo") not in REFERENCE_ALGOS for r in rows)
        sections.append(
            f'<section class="benchmark" data-benchmark="{_e(benchmark)}">'
            f"<h2>Benchmark <code>{_e(benchmark)}</code> <small>({methods} methods)</small></h2>"
            f'<div class="board"><div class="table-wrap">{table}</div>'
            f'<div class="figures">{figures}</div></div></section>'
        )
    if not sections:
        sections.append("<p>No rows yet.</p>")
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "img-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'\">"
        f"<title>MUSE unlearning leaderboard</title><style>{_CSS}</style></head><body>"
        "<h1>MUSE unlearning leaderboard</h1>"
        '<p class="lead">Each table compares unlearning methods with the <b>target</b> '
        "model (before unlearning) and the <b>retrain</b> model (never saw the forget "
        f"set: the goal). Cells run from red (like the target){_SCALE}to green (like the "
        'retrain). <a href="#glossary">What the columns mean</a>.</p>'
        f"{_controls(list(groups), used)}<main>{''.join(sections)}</main>"
        f"{_glossary(used)}<script>{_JS}</script></body></html>\n"
    )


# ------------------------------------------------------------------------------- render


def paper_links(algos: Sequence[str]) -> dict[str, tuple[str, str]]:
    """algo -> (paper URL, description) for registered unlearners that declare a paper.

    Reads `paper_url` and `description()` from the unlearner registry (registered names
    and installed entry points only: an algo such as `pkg.mod:Cls` is never imported).
    The registry imports torch, so it is loaded here, not when this module is imported;
    without it (or when a plugin fails to load) names simply get no link.
    """
    try:
        from muse_bench.unlearners import UNLEARNERS
    except ImportError:
        return {}
    out: dict[str, tuple[str, str]] = {}
    for algo in dict.fromkeys(algos):
        if not algo or ":" in algo or algo in REFERENCE_ALGOS:
            continue
        try:
            cls = UNLEARNERS.get(algo) if algo in UNLEARNERS else None
        except Exception:  # a broken third-party plugin must not stop the page
            cls = None
        url = getattr(cls, "paper_url", "") or ""
        if cls is not None and _URL.fullmatch(url):
            describe: Callable[[], str] | None = getattr(cls, "description", None)
            out[algo] = (url, describe() if callable(describe) else "")
    return out


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
            ("robustness", robustness_figure),
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
    papers = paper_links([r.get("algo", "") for r in rows])
    page = out / "index.html"
    atomic_write_text(page, build_html(groups, images, papers))
    return page
