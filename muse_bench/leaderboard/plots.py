"""MUSE-style leaderboard plots (matplotlib, Agg): trade-off, robustness, scale, sustain.

Every function takes the rows of one benchmark (column -> cell text, as read from a
leaderboard CSV) and returns a `Figure`, or None when the rows hold no data for it.
Point labels on the trade-off plot are placed by `place_labels`, a deterministic search
for a free spot around each point in display pixels, so labels of methods that land
close together (several methods at knowmem_f 0) do not print over each other or over
the points; points on the very same spot share one label.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before any other matplotlib import: no display is ever needed

import numpy as np  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from muse_bench.core.io import atomic_write_bytes  # noqa: E402
from muse_bench.leaderboard.rows import REFERENCE_ALGOS  # noqa: E402

Row = Mapping[str, str]

COLORS = {"target": "#c0392b", "retrain": "#1e8449"}
METHOD_COLOR = "#2c5aa0"
# One colour per robustness check (cycled), none of them the references' red or green.
CHECK_COLORS = ("#8e44ad", "#d35400", "#2874a6", "#7f8c8d", "#b7950b", "#17a589")
#: Metrics whose value after a robustness check has its own CSV column `<metric>_<check>`.
ROBUST_BASES: tuple[str, ...] = ("verbmem_f", "knowmem_f")
_ROBUST = re.compile(r"(verbmem_f|knowmem_f)_([A-Za-z0-9][A-Za-z0-9_]*)")
_CI_SUFFIXES = ("_ci_lo", "_ci_hi")
_FIGSIZE = (6.4, 4.8)


def robustness_column(column: str) -> tuple[str, str] | None:
    """(base metric, check) for a `verbmem_f_<check>` / `knowmem_f_<check>` column, else None.

    Interval columns (`knowmem_f_ci_lo`, `knowmem_f_quant4_ci_hi`) are not checks.
    """
    match = _ROBUST.fullmatch(column)
    if match is None or column.endswith(_CI_SUFFIXES):
        return None
    return match.group(1), match.group(2)


def robustness_checks(rows: Sequence[Row]) -> list[str]:
    """The checks with at least one value in `rows`, in column order."""
    checks: dict[str, None] = {}
    for column in rows[0] if rows else ():
        parsed = robustness_column(column)
        if parsed and any(_float(r.get(column)) is not None for r in rows):
            checks.setdefault(parsed[1])
    return list(checks)


def _float(cell: str | None) -> float | None:
    try:
        x = float(cell) if cell else None
    except ValueError:
        return None
    return x if x is None or np.isfinite(x) else None


def _folds(row: Row, column: str) -> list[dict[str, Any]]:
    cell = row.get(column) or ""
    if not cell:
        return []
    try:
        folds = json.loads(cell)
    except json.JSONDecodeError:
        return []
    return [f for f in folds if isinstance(f, dict) and isinstance(f.get("knowmem_r"), int | float)]


def plot_text(text: str) -> str:
    """Text safe for a matplotlib label: no mathtext, not hidden from legends."""
    text = text.replace("$", r"\$")
    return "\u200b" + text if text.startswith("_") else text


def _reference(rows: Sequence[Row], algo: str) -> Row | None:
    return next((r for r in rows if r.get("algo") == algo), None)


def labels(rows: Sequence[Row]) -> list[str]:
    """Row labels for plots: the name, plus the run id where names repeat."""
    names = [r.get("name") or r.get("algo") or "?" for r in rows]
    return [
        plot_text(n if names.count(n) == 1 else f"{n} ({r.get('run_id', '')[:8]})")
        for n, r in zip(names, rows, strict=True)
    ]


def _reference_lines(ax: Any, rows: Sequence[Row], horizontal: bool, vertical: bool) -> None:
    for algo in REFERENCE_ALGOS:
        ref = _reference(rows, algo)
        if ref is None:
            continue
        if horizontal and (y := _float(ref.get("knowmem_r"))) is not None:
            ax.axhline(y, color=COLORS[algo], linestyle="--", linewidth=1, label=f"{algo} utility")
        if vertical and (x := _float(ref.get("knowmem_f"))) is not None:
            ax.axvline(x, color=COLORS[algo], linestyle=":", linewidth=1)


# ------------------------------------------------------------------------ label placement


#: Where a label may go around its point, in order of preference: (dx, dy) directions.
_DIRECTIONS = ((1, 1), (1, 0), (1, -1), (-1, 1), (-1, 0), (-1, -1), (0, 1), (0, -1))
#: Extra distances (pixels) tried, nearest first, when no spot next to the point is free.
_RADII = (0, 6, 12, 20, 30, 42, 56, 72, 90, 110, 135, 165, 200, 240)


def _overlaps(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Overlap area of `box` (x0, y0, x1, y1) with each row of `others` (0 where apart)."""
    if not len(others):
        return np.zeros(0)
    w = np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0])
    h = np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1])
    return np.clip(w, 0, None) * np.clip(h, 0, None)


def place_labels(
    anchors: np.ndarray,
    sizes: np.ndarray,
    bounds: tuple[float, float, float, float],
    obstacles: Iterable[Sequence[float]] = (),
    *,
    gap: float = 2.0,
    offset: float = 6.0,
) -> np.ndarray:
    """Centres for label boxes near their anchors, apart from each other and from obstacles.

    `anchors` (n, 2) and `sizes` (n, 2: width, height) are in display pixels; `bounds` is
    the (x0, y0, x1, y1) box the labels must stay in; `obstacles` are boxes they must not
    cover (the plotted points). Labels are placed one by one, from the highest anchor down
    (ties: left first): for each,
    the first free spot among the `_DIRECTIONS` around its anchor (`offset` px away, the
    box's near corner or edge towards the point), trying each of the `_RADII` farther out
    in turn, each spot clamped into the bounds; a spot is free when the box, grown by
    `gap`/2 on every side, overlaps no label placed before (grown alike, so labels stay
    `gap` apart) and no obstacle. When no spot is free, the one with
    the least overlap is taken. Deterministic; O(n² · spots), fast for hundreds of labels.
    """
    anchors = np.asarray(anchors, dtype=float)
    half = np.asarray(sizes, dtype=float) / 2
    blocks = np.array([list(o) for o in obstacles], dtype=float).reshape(-1, 4)
    lo_bound, hi_bound = np.array(bounds[:2], dtype=float), np.array(bounds[2:], dtype=float)
    placed = np.zeros((0, 4))
    centres = np.zeros_like(anchors)
    # top to bottom (then left to right): in a column of points the labels keep its order
    for i in np.lexsort((anchors[:, 0], -anchors[:, 1])):
        anchor, h = anchors[i], half[i]
        best, best_cost = None, np.inf
        for radius in _RADII:
            for dx, dy in _DIRECTIONS:
                step = np.array([dx, dy], dtype=float)
                centre = anchor + step * (h + offset + radius)
                centre = np.clip(centre, lo_bound + h, np.maximum(hi_bound - h, lo_bound + h))
                box = np.concatenate([centre - h - gap / 2, centre + h + gap / 2])
                cost = _overlaps(box, placed).sum() + _overlaps(box, blocks).sum()
                if cost < best_cost:
                    best, best_cost = centre, cost
                if cost == 0:
                    break
            if best_cost == 0:
                break
        centres[i] = best
        placed = np.vstack([placed, np.concatenate([best - h - gap / 2, best + h + gap / 2])])
    return centres


def _merge_coincident(
    ax: Any, points: list[tuple[float, float, str]], within: float = 2.0
) -> list[tuple[float, float, str]]:
    """One label "a, b" for points drawn on the same spot (within `within` pixels)."""
    merged: list[tuple[float, float, list[str]]] = []
    for x, y, label in points:
        px = ax.transData.transform((x, y))
        for mx, my, names in merged:
            if np.hypot(*(ax.transData.transform((mx, my)) - px)) <= within:
                names.append(label)
                break
        else:
            merged.append((x, y, [label]))
    return [(x, y, ", ".join(names)) for x, y, names in merged]


def _place_labels(fig: Figure, ax: Any, points: list[tuple[float, float, str]]) -> None:
    """Annotate each (x, y, label) on `ax`, placed by `place_labels`; call once the layout is final."""
    if not points:
        return
    style = {"fontsize": 8, "ha": "center", "va": "center", "zorder": 4}
    points = _merge_coincident(ax, points)
    canvas = FigureCanvasAgg(fig)
    renderer = canvas.get_renderer()
    probes = [ax.text(x, y, label, **style) for x, y, label in points]
    sizes = np.array([[e.width, e.height] for e in (t.get_window_extent(renderer) for t in probes)])
    for probe in probes:
        probe.remove()
    anchors = ax.transData.transform([(x, y) for x, y, _ in points])
    frame = ax.get_window_extent(renderer)
    radius = 5.0  # about a marker's half-width: labels must not hide the points
    obstacles = [(px - radius, py - radius, px + radius, py + radius) for px, py in anchors]
    bounds = (frame.x0 + 2, frame.y0 + 2, frame.x1 - 2, frame.y1 - 2)
    centres = place_labels(anchors, sizes, bounds, obstacles)
    to_points = 72.0 / fig.dpi
    for (x, y, label), anchor, centre, size in zip(points, anchors, centres, sizes, strict=True):
        nearest = np.clip(anchor, centre - size / 2, centre + size / 2)
        far = float(np.hypot(*(nearest - anchor))) > 12  # then a leader line shows whose it is
        ax.annotate(
            label,
            (x, y),
            xytext=tuple((centre - anchor) * to_points),
            textcoords="offset points",
            arrowprops={"arrowstyle": "-", "color": "#999", "lw": 0.6, "shrinkB": 4}
            if far
            else None,
            **style,
        )


# ------------------------------------------------------------------------------- figures


def tradeoff_figure(rows: Sequence[Row], benchmark: str) -> Figure:
    """Utility (knowmem_r) against forget knowledge (knowmem_f), one labelled point per row."""
    fig = Figure(figsize=_FIGSIZE, dpi=100)
    ax = fig.add_subplot()
    points = []
    for row, label in zip(rows, labels(rows), strict=True):
        x, y = _float(row.get("knowmem_f")), _float(row.get("knowmem_r"))
        if x is None or y is None:
            continue
        algo = row.get("algo", "")
        if algo in REFERENCE_ALGOS:
            ax.scatter([x], [y], marker="*", s=200, color=COLORS[algo], zorder=3, label=algo)
        else:
            ax.scatter([x], [y], marker="o", s=36, color=METHOD_COLOR, zorder=3)
        points.append((x, y, label))
    _reference_lines(ax, rows, horizontal=True, vertical=True)
    ax.set_xlabel("KnowMem on D_forget (knowmem_f, lower is better)")
    ax.set_ylabel("KnowMem on D_retain (knowmem_r, higher is better)")
    ax.set_title(plot_text(f"Forgetting vs. utility: {benchmark}"), fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.margins(0.08)
    handles, names = ax.get_legend_handles_labels()
    if handles:  # below the axes, where no label can run into it
        fig.legend(handles, names, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 if handles else 0, 1, 1))
    _place_labels(fig, ax, points)
    return fig


def robustness_figure(rows: Sequence[Row], benchmark: str) -> Figure | None:
    """Each row's verbmem_f / knowmem_f before and after each robustness check.

    One panel per metric that has `<metric>_<check>` values; one line per row (target and
    retrain first, as the references), an open circle at the value before and a filled
    marker per check after, joined by a segment. None when no row has such values.
    """
    checks = robustness_checks(rows)
    bases = [
        b
        for b in ROBUST_BASES
        if any(_float(r.get(f"{b}_{c}")) is not None for r in rows for c in checks)
    ]
    if not bases:
        return None
    names = labels(rows)
    height = max(3.2, 1.4 + 0.32 * len(rows))
    fig = Figure(figsize=(6.4 if len(bases) == 1 else 9.6, height), dpi=100)
    axes = fig.subplots(1, len(bases), sharey=True, squeeze=False)[0]
    ys = np.arange(len(rows))[::-1]
    spread = 0.5 / max(len(checks), 1)
    for ax, base in zip(axes, bases, strict=True):
        for y, row in zip(ys, rows, strict=True):
            before = _float(row.get(base))
            color = COLORS.get(row.get("algo", ""), "#333")
            if before is not None:
                ax.scatter([before], [y], s=40, facecolors="white", edgecolors=color, zorder=3)
            for k, check in enumerate(checks):
                after = _float(row.get(f"{base}_{check}"))
                if after is None:
                    continue
                dy = (k - (len(checks) - 1) / 2) * spread
                tint = CHECK_COLORS[k % len(CHECK_COLORS)]
                if before is not None:
                    ax.plot([before, after], [y + dy, y + dy], color=tint, lw=1.2, zorder=2)
                ax.scatter(
                    [after],
                    [y + dy],
                    s=30,
                    color=tint,
                    marker="D",
                    zorder=3,
                    label=f"after {check}",
                )
        n_refs = sum(r.get("algo") in REFERENCE_ALGOS for r in rows)
        if 0 < n_refs < len(rows):  # a rule between the references and the methods
            ax.axhline(ys[n_refs - 1] - 0.5, color="#bbb", lw=0.8)
        ax.set_xlabel(f"{base} (lower is better)")
        ax.set_title(plot_text(base), fontsize=10)
        ax.grid(True, axis="x", alpha=0.3)
        ax.set_xlim(-3, 103)
    axes[0].set_yticks(ys, names, fontsize=8)
    for tick, row in zip(axes[0].get_yticklabels(), rows, strict=True):
        tick.set_color(COLORS.get(row.get("algo", ""), "#222"))
    after: dict[str, Any] = {}  # one legend entry per check
    for ax in axes:
        for handle, name in zip(*ax.get_legend_handles_labels(), strict=True):
            after.setdefault(name, handle)
    legend = [Line2D([], [], marker="o", ls="", mfc="white", mec="#333", label="before")]
    legend += list(after.values())
    fig.legend(handles=legend, loc="lower center", ncol=len(legend), fontsize=8, frameon=False)
    fig.suptitle(plot_text(f"Before / after robustness checks: {benchmark}"), fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def _curve_figure(
    rows: Sequence[Row], column: str, benchmark: str, xlabel: str, title: str, x_key: str
) -> Figure | None:
    series = [
        (label, folds)
        for row, label in zip(rows, labels(rows), strict=True)
        if (folds := _folds(row, column))
    ]
    if not series:
        return None
    if any(x_key not in f for _, folds in series for f in folds):
        x_key, xlabel = "fold", f"{column} fold"
    fig = Figure(figsize=_FIGSIZE, dpi=100)
    ax = fig.add_subplot()
    for label, folds in series:
        folds = sorted(folds, key=lambda f: f[x_key])
        ax.plot([f[x_key] for f in folds], [f["knowmem_r"] for f in folds], marker="o", label=label)
    _reference_lines(ax, rows, horizontal=True, vertical=False)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # fold numbers and document counts
    ax.set_xlabel(xlabel)
    ax.set_ylabel("KnowMem on D_retain (knowmem_r, higher is better)")
    ax.set_title(plot_text(f"{title}: {benchmark}"), fontsize=11)
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
