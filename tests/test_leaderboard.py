"""The leaderboard CSV (schema, append, validate, merge) and its rendered page and plots."""

from __future__ import annotations

import csv
import html
import json
import multiprocessing
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.text import Text
from PIL import Image

from muse_bench.core.errors import DataError, MuseError
from muse_bench.leaderboard import page as lbr
from muse_bench.leaderboard import plots
from muse_bench.leaderboard import rows as lb
from muse_bench.unlearners import UNLEARNERS

BENCH = "muse-news@embedded-v1"


def report(run_id: str = "run-1", algo: str = "npo", **overrides: Any) -> dict[str, Any]:
    """A report.json-like dict with every key a run writes."""
    base: dict[str, Any] = {
        "benchmark": BENCH,
        "corpus": "news",
        "algo": algo,
        "params": {"lr": 1e-5, "beta": 0.1, "epochs": 10},
        "protocol": "single",
        "seed": 3,
        "selected": "epoch 3",
        "metrics": {
            "verbmem_f": 12.345678,
            "knowmem_f": 30.0,
            "privleak": -45.5,
            "knowmem_r": 41.25,
        },
        "versions": {"muse_bench": "0.1.0", "torch": "2.4"},
        "created": "2025-03-01T12:00:00+00:00",
        "run_id": run_id,
    }
    base.update(overrides)
    return base


def write_raw(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    """Write a CSV as another tool would (no sanitising), to test validate on it."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


def valid_cells(run_id: str = "r1", /, **cells: str) -> list[str]:
    """A valid row's cells in column order, with some cells replaced."""
    row = dict(lb.row_from_report(report(run_id)))
    row.update(cells)
    return [row[c] for c in lb.COLUMNS]


# ------------------------------------------------------------------------------- schema


def test_columns_start_with_muse_and_have_cis() -> None:
    assert lb.COLUMNS[:5] == ("name", "verbmem_f", "privleak", "knowmem_f", "knowmem_r")
    assert lb.COLUMNS[5:12] == (
        "benchmark", "corpus", "algo", "params", "protocol", "seed", "selected"
    )  # fmt: skip
    assert lb.CI_COLUMNS[:3] == ("verbmem_f_ci_lo", "verbmem_f_ci_hi", "privleak_ci_lo")
    assert lb.CI_COLUMNS[-1] == "knowmem_r_ci_hi"
    assert lb.EXTRA_COLUMNS[-5:] == ("scale", "sustain", "harness_version", "date", "run_id")
    assert len(set(lb.COLUMNS)) == len(lb.COLUMNS)


def test_row_from_report_values() -> None:
    scale = [
        {
            "fold": k,
            "docs": 889 * k,
            "tokens": 1000 * k,
            "metrics": {"knowmem_r": 40.0 - k, "privleak": -1.5},
        }
        for k in (1, 2)
    ]
    row = lb.row_from_report(
        report(ci={"knowmem_r": [39.0, 43.5]}, scale=scale, sustain=None, name="My NPO")
    )
    assert list(row) == list(lb.COLUMNS)
    assert row["name"] == "My NPO"
    assert (row["verbmem_f"], row["privleak"], row["knowmem_f"], row["knowmem_r"]) == (
        "12.3457", "-45.5", "30.0", "41.25"
    )  # fmt: skip
    assert row["benchmark"] == BENCH and row["corpus"] == "news" and row["algo"] == "npo"
    assert row["params"] == '{"beta":0.1,"epochs":10,"lr":1e-05}'
    assert (row["protocol"], row["seed"], row["selected"]) == ("single", "3", "epoch 3")
    assert (row["knowmem_r_ci_lo"], row["knowmem_r_ci_hi"]) == ("39.0", "43.5")
    assert row["verbmem_f_ci_lo"] == row["verbmem_f_ci_hi"] == ""
    assert json.loads(row["scale"]) == [
        {"fold": 1, "docs": 889, "tokens": 1000, "privleak": -1.5, "knowmem_r": 39.0},
        {"fold": 2, "docs": 1778, "tokens": 2000, "privleak": -1.5, "knowmem_r": 38.0},
    ]
    assert row["scale"].startswith('[{"fold":1,"docs":889,')  # compact, fold first
    assert row["sustain"] == ""
    assert row["harness_version"] == "0.1.0"
    assert row["date"] == "2025-03-01T12:00:00+00:00"
    assert row["run_id"] == "run-1"
    assert lb.row_problems(row) == []


def test_reference_row_and_defaults() -> None:
    rep = report(algo="target", params={"ignored": 1}, selected=None)
    del rep["protocol"]
    row = lb.row_from_report(rep)
    assert row["name"] == "target"  # defaults to the algorithm
    assert row["params"] == ""
    assert row["selected"] == ""
    assert row["protocol"] == "single"


def test_row_from_report_accepts_numpy_scalars() -> None:
    metrics = {m: np.float32(12.5) for m in lb.METRICS}
    scale = [{"fold": np.int64(1), "docs": np.int64(889), "knowmem_r": np.float64(40.0)}]
    row = lb.row_from_report(report(metrics=metrics, seed=np.int64(7), scale=scale))
    assert row["knowmem_r"] == "12.5" and row["seed"] == "7"
    assert json.loads(row["scale"]) == [{"fold": 1, "docs": 889, "knowmem_r": 40.0}]


def test_row_from_report_runner_shapes() -> None:
    """Flat fold entries (metrics beside fold/docs) and a missing interval are accepted."""
    sustain = [
        {
            "fold": k,
            "docs": 5,
            "tokens": 900,
            "selected": "epoch 1",
            "knowmem_r": 30.0,
            "privleak": 1.0,
        }
        for k in (1, 2)
    ]
    row = lb.row_from_report(report(sustain=sustain, ci={"privleak": [float("nan"), 2.0]}))
    assert json.loads(row["sustain"])[1] == {
        "fold": 2, "docs": 5, "tokens": 900, "privleak": 1.0, "knowmem_r": 30.0
    }  # fmt: skip
    assert row["privleak_ci_lo"] == row["privleak_ci_hi"] == ""


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"metrics": {"verbmem_f": 1.0, "knowmem_f": 1.0, "privleak": 1.0}}, "knowmem_r"),
        (
            {
                "metrics": {
                    "verbmem_f": float("nan"),
                    "knowmem_f": 1.0,
                    "privleak": 1.0,
                    "knowmem_r": 1.0,
                }
            },
            "finite",
        ),
        ({"benchmark": ""}, "benchmark"),
        ({"run_id": None}, "run_id"),
        ({"seed": "three"}, "seed"),
        ({"ci": {"privleak": [1.0]}}, "pair"),
    ],
)
def test_row_from_report_refuses_bad_reports(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(DataError, match=message):
        lb.row_from_report(report(**overrides))


# ------------------------------------------------------------------------------ append


def test_append_dedups_run_ids(tmp_path: Path) -> None:
    path = tmp_path / "lb" / "news.csv"
    assert lb.append_row(path, lb.row_from_report(report("a"))) is True
    assert lb.append_row(path, lb.row_from_report(report("b"))) is True
    assert lb.append_row(path, lb.row_from_report(report("a", name="changed"))) is False
    text = path.read_text()
    assert text.startswith("name,verbmem_f,privleak,knowmem_f,knowmem_r,benchmark,")
    assert text.count("name,verbmem_f") == 1
    header, rows = lb.read_csv(path)
    assert header == list(lb.COLUMNS)
    assert [r["run_id"] for r in rows] == ["a", "b"]
    assert rows[0]["name"] == "npo"
    assert lb.validate(path) == []
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_append_neutralises_formula_names(tmp_path: Path) -> None:
    path = tmp_path / "news.csv"
    lb.append_row(path, lb.row_from_report(report("a", name="=HYPERLINK(1)")))
    assert lb.read_csv(path)[1][0]["name"] == "'=HYPERLINK(1)"
    assert lb.validate(path) == []


def test_append_refuses_invalid_rows_and_keeps_file(tmp_path: Path) -> None:
    path = tmp_path / "news.csv"
    lb.append_row(path, lb.row_from_report(report("a")))
    before = path.read_bytes()
    bad = lb.row_from_report(report("b")) | {"knowmem_r": "nan"}
    with pytest.raises(DataError, match="knowmem_r"):
        lb.append_row(path, bad)
    with pytest.raises(DataError, match="run_id"):
        lb.append_row(
            path, {k: v for k, v in lb.row_from_report(report("c")).items() if k != "run_id"}
        )
    assert path.read_bytes() == before


def test_append_keeps_unknown_columns(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "x.csv", [*lb.COLUMNS, "note"], [[*valid_cells("old"), "keep me"]])
    assert lb.append_row(path, lb.row_from_report(report("new")))
    header, rows = lb.read_csv(path)
    assert header[-1] == "note"
    assert [r["note"] for r in rows] == ["keep me", ""]


def test_append_a_row_with_an_extra_column_the_file_already_has(tmp_path: Path) -> None:
    """A second row carrying the same extra column writes it once, not twice."""
    path = tmp_path / "x.csv"
    for run_id in ("a", "b"):
        row = {**lb.row_from_report(report(run_id)), "knowmem_f_quant4": "12.5"}
        assert lb.append_row(path, row)
    header, rows = lb.read_csv(path)
    assert header.count("knowmem_f_quant4") == 1
    assert [r["knowmem_f_quant4"] for r in rows] == ["12.5", "12.5"]
    assert lb.validate(path) == []


def _append_many(path: str, worker: int, start: Any) -> None:
    start.wait()
    for i in range(20):
        lb.append_row(path, lb.row_from_report(report(f"w{worker}-{i}")))


def test_concurrent_appends_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "news.csv"
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_append_many, args=(str(path), w, start)) for w in (0, 1)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    rows = lb.read_csv(path)[1]
    assert sorted(r["run_id"] for r in rows) == sorted(
        f"w{w}-{i}" for w in (0, 1) for i in range(20)
    )
    assert lb.validate(path) == []
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------- validate


@pytest.mark.parametrize(
    "cell, risky",
    [
        ("=SUM(A1)", True),
        ("+1+1", True),
        ("@x", True),
        ("-cmd", True),
        ("-2+3", True),
        ("\tx", True),
        ("\rx", True),
        ("-99.8", False),
        ("+1", False),  # a plain number: a spreadsheet shows 1 and runs nothing
        ("1e-05", False),
        ("-1.5e3", False),
        ("'=cmd", False),
        ("GA_GDR", False),
        ('{"lr":1e-05}', False),
        ("", False),
    ],
)
def test_formula_detection(cell: str, risky: bool) -> None:
    assert lb.is_formula_like(cell) is risky
    assert lb.is_formula_like(lb.sanitize_cell(cell)) is False
    assert (lb.sanitize_cell(cell) != cell) is risky


def test_validate_accepts_legitimate_values(tmp_path: Path) -> None:
    rows = [
        valid_cells("target", privleak="-99.8", verbmem_f="100.0", knowmem_r="0.0"),
        valid_cells("over", privleak="250.5"),  # over-unlearning can exceed +100
        valid_cells("floor", privleak="-100.0", seed=""),
    ]
    assert lb.validate(write_raw(tmp_path / "ok.csv", list(lb.COLUMNS), rows)) == []


@pytest.mark.parametrize(
    "cells, message",
    [
        ({"verbmem_f": "nan"}, "verbmem_f = 'nan' is not a finite number"),
        ({"privleak": "inf"}, "privleak = 'inf' is not a finite number"),
        ({"knowmem_f": "abc"}, "knowmem_f = 'abc' is not a finite number"),
        ({"knowmem_r": ""}, "knowmem_r = '' is not a finite number"),
        ({"knowmem_r": "100.5"}, "knowmem_r = 100.5 is outside [0, 100]"),
        ({"verbmem_f": "-0.1"}, "verbmem_f = -0.1 is outside [0, 100]"),
        ({"privleak": "-150"}, "privleak = -150 is below -100"),
        ({"name": "=SUM(A1)"}, "name = '=SUM(A1)' would run as a spreadsheet formula"),
        ({"name": "+1+1"}, "would run as a spreadsheet formula"),
        ({"name": "@x"}, "would run as a spreadsheet formula"),
        ({"algo": "-cmd"}, "algo = '-cmd' would run as a spreadsheet formula"),
        ({"selected": "\tepoch"}, "would run as a spreadsheet formula"),
        ({"knowmem_r_ci_lo": "50", "knowmem_r_ci_hi": "40"}, "CI low 50 exceeds high 40"),
        ({"privleak_ci_lo": "1"}, "privleak CI"),
        ({"seed": "1.5"}, "seed"),
        ({"params": "{lr"}, "params is not valid JSON"),
        ({"scale": '[{"fold":1,"knowmem_r":"x"}]'}, "scale fold 1: knowmem_r"),
        ({"sustain": '{"fold":1}'}, "sustain must be a JSON list"),
        ({"run_id": ""}, "run_id is empty"),
        ({"benchmark": " "}, "benchmark is empty"),
    ],
)
def test_validate_catches_bad_cells(tmp_path: Path, cells: dict[str, str], message: str) -> None:
    path = write_raw(
        tmp_path / "bad.csv", list(lb.COLUMNS), [valid_cells("ok"), valid_cells("bad", **cells)]
    )
    problems = lb.validate(path)
    assert len(problems) == 1, problems
    assert problems[0].startswith("row 3: ") and message in problems[0]


def test_validate_catches_missing_column(tmp_path: Path) -> None:
    header = [c for c in lb.COLUMNS if c != "privleak"]
    row = dict(zip(lb.COLUMNS, valid_cells(), strict=True))
    path = write_raw(tmp_path / "m.csv", header, [[row[c] for c in header]])
    problems = lb.validate(path)
    assert any("missing required column(s): privleak" in p for p in problems), problems


def test_validate_catches_wrong_column_order(tmp_path: Path) -> None:
    header = ["name", "privleak", "verbmem_f", *lb.COLUMNS[3:]]
    row = dict(zip(lb.COLUMNS, valid_cells(), strict=True))
    path = write_raw(tmp_path / "o.csv", header, [[row[c] for c in header]])
    assert any("first columns must be exactly" in p for p in lb.validate(path))


def test_validate_catches_duplicate_run_id(tmp_path: Path) -> None:
    path = write_raw(
        tmp_path / "d.csv", list(lb.COLUMNS), [valid_cells("x"), valid_cells("y"), valid_cells("x")]
    )
    assert lb.validate(path) == ["row 4: duplicate run_id 'x' (first at row 2)."]


def test_validate_accepts_minimal_muse_file(tmp_path: Path) -> None:
    path = write_raw(
        tmp_path / "min.csv",
        [*lb.MUSE_COLUMNS, "benchmark", "run_id"],
        [["GA", "0.0", "5.2", "0.0", "0.0", BENCH, "r"]],
    )
    assert lb.validate(path) == []


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty file"),
        (b'name,verbmem_f\n"unterminated,1\n', "malformed CSV"),
        (b'name,verbmem_f\n"a"b,1\n', "malformed CSV"),
        (b"name,verbmem_f\na,1,extra\n", "has 3 cells but the header has 2"),
        (b"name,verbmem_f\n\xff\xfe,1\n", "not UTF-8"),
        (b"name,verbmem_f\na\x00b,1\n", "malformed CSV"),
    ],
)
def test_validate_reports_malformed_files(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "broken.csv"
    path.write_bytes(content)
    problems = lb.validate(path)
    assert problems and message in problems[0], problems


def test_validate_missing_file(tmp_path: Path) -> None:
    assert lb.validate(tmp_path / "nope.csv") == ["no such file."]
    with pytest.raises(DataError, match=r"missing\.csv: no such file"):
        lb.merge([tmp_path / "missing.csv"], tmp_path / "m.csv")


# ------------------------------------------------------------------------------- merge


def make_csv(path: Path, *reports: dict[str, Any]) -> Path:
    for rep in reports:
        lb.append_row(path, lb.row_from_report(rep))
    return path


def test_merge_dedups_and_puts_references_first(tmp_path: Path) -> None:
    a = make_csv(tmp_path / "a.csv", report("ga-1", algo="ga"), report("ref-t", algo="target"))
    b = make_csv(
        tmp_path / "b.csv",
        report("ga-1", algo="ga"),
        report("npo-1"),
        report("ref-r", algo="retrain"),
    )
    out = tmp_path / "out" / "merged.csv"
    assert lb.merge([a, b], out) == 4
    assert [r["run_id"] for r in lb.read_csv(out)[1]] == ["ref-t", "ref-r", "ga-1", "npo-1"]
    assert lb.validate(out) == []
    # merging into one of the inputs is safe (everything is read before the write)
    assert lb.merge([a, b], a) == 4
    assert lb.validate(a) == []


def test_merge_refuses_conflicting_run_id(tmp_path: Path) -> None:
    a = make_csv(tmp_path / "a.csv", report("x"))
    b = make_csv(tmp_path / "b.csv", report("x", name="other"))
    with pytest.raises(MuseError, match="run_id 'x' appears in .*a.csv and .*b.csv"):
        lb.merge([a, b], tmp_path / "m.csv")
    assert not (tmp_path / "m.csv").exists()


def test_merge_refuses_mixed_benchmarks_unless_allowed(tmp_path: Path) -> None:
    a = make_csv(tmp_path / "a.csv", report("a1"), report("a2"))
    b = make_csv(tmp_path / "b.csv", report("b1", benchmark="muse-books@embedded-v1"))
    c = make_csv(tmp_path / "c.csv", report("a3"))
    out = tmp_path / "m.csv"
    with pytest.raises(MuseError) as info:
        lb.merge([a, b, c], out)
    message = str(info.value)
    assert "\n" not in message
    assert "different benchmarks" in message and BENCH in message and "muse-books" in message
    assert not out.exists()
    assert lb.merge([a, b, c], out, allow_mixed=True) == 4
    rows = lb.read_csv(out)[1]
    assert [r["benchmark"] for r in rows] == [BENCH, BENCH, BENCH, "muse-books@embedded-v1"]


def test_merge_refuses_invalid_input(tmp_path: Path) -> None:
    bad = write_raw(tmp_path / "bad.csv", list(lb.COLUMNS), [valid_cells("x", verbmem_f="nan")])
    with pytest.raises(DataError, match="verbmem_f = 'nan'.*muse leaderboard validate"):
        lb.merge([bad], tmp_path / "m.csv")
    with pytest.raises(DataError, match="no such file"):
        lb.merge([tmp_path / "missing.csv"], tmp_path / "m.csv")


# ------------------------------------------------------------------------------ render


def folds(n: int, per_fold_docs: int, nested: bool) -> list[dict[str, Any]]:
    return [
        {
            "fold": k,
            "docs": per_fold_docs * (k if nested else 1),
            "metrics": {
                "verbmem_f": 1.0,
                "knowmem_f": 2.0,
                "privleak": 3.0,
                "knowmem_r": 50.0 - 5 * k,
            },
        }
        for k in range(1, n + 1)
    ]


@pytest.fixture()
def board(tmp_path: Path) -> Path:
    return make_csv(
        tmp_path / "news.csv",
        report(
            "t",
            algo="target",
            metrics={"verbmem_f": 58.4, "knowmem_f": 63.9, "privleak": -99.8, "knowmem_r": 55.2},
        ),
        report(
            "r",
            algo="retrain",
            metrics={"verbmem_f": 20.8, "knowmem_f": 33.1, "privleak": 0.0, "knowmem_r": 55.0},
        ),
        report(
            "g",
            algo="ga",
            name="<b>GA</b> & co",
            scale=folds(4, 889, True),
            sustain=folds(4, 889, False),
        ),
        report("n", algo="npo", scale=folds(3, 889, True)),
        report("k", algo="npo_klr", name="$\\frac{x$_oops"),  # mathtext and legend-hiding text
    )


def label_boxes(fig: Any) -> list[tuple[str, Any]]:
    """Each text label of the figure's first axes with its text's box in display pixels
    (Text's own extent: an annotation's would include its leader line)."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    return [(t.get_text(), Text.get_window_extent(t, renderer)) for t in fig.axes[0].texts]


def overlapping(boxes: list[tuple[str, Any]]) -> list[tuple[str, str]]:
    return [
        (a, b)
        for i, (a, box_a) in enumerate(boxes)
        for b, box_b in boxes[i + 1 :]
        if min(box_a.x1, box_b.x1) > max(box_a.x0, box_b.x0)
        and min(box_a.y1, box_b.y1) > max(box_a.y0, box_b.y0)
    ]


def test_figures_have_labels_and_points(board: Path) -> None:
    rows = lb.read_csv(board)[1]
    fig = plots.tradeoff_figure(rows, BENCH)
    ax = fig.axes[0]
    assert "knowmem_f" in ax.get_xlabel() and "knowmem_r" in ax.get_ylabel()
    assert BENCH in ax.get_title()
    labels = [t.get_text() for t in ax.texts]
    # ga, npo and npo_klr share one point (30.0, 41.25): one label names all three
    assert sorted(labels) == sorted(
        ["target", "retrain", "<b>GA</b> & co, npo, \\$\\frac{x\\$_oops"]
    )
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "target" in legend and "retrain" in legend

    scale = plots.scale_figure(rows, BENCH)
    assert scale is not None
    sax = scale.axes[0]
    assert sax.get_xlabel() == "Forget-set size (documents)" and "knowmem_r" in sax.get_ylabel()
    lines = {line.get_label(): line for line in sax.get_lines()}
    assert list(lines["npo"].get_xdata()) == [889, 1778, 2667]
    assert list(lines["npo"].get_ydata()) == [45.0, 40.0, 35.0]

    sustain = plots.sustain_figure(rows, BENCH)
    assert sustain is not None
    assert sustain.axes[0].get_xlabel() == "Number of unlearning requests"
    gax = {line.get_label(): line for line in sustain.axes[0].get_lines()}
    assert list(gax["<b>GA</b> & co"].get_xdata()) == [1, 2, 3, 4]

    assert plots.scale_figure([r for r in rows if not r["scale"]], BENCH) is None


def crowded_rows() -> list[dict[str, str]]:
    """Target, retrain and twelve methods crowded near the origin, as on the embedded runs."""
    cells = [("target", "target", 83.3, 59.2), ("retrain", "retrain", 0.0, 75.0)]
    cells += [(f"method_{i}", f"m{i}", (i % 3) * 0.6, (i // 3) * 1.5) for i in range(12)]
    return [
        lb.row_from_report(
            report(f"r{i}", algo=algo, name=name, metrics={
                "verbmem_f": 10.0, "privleak": -50.0, "knowmem_f": kf, "knowmem_r": kr})
        )
        for i, (name, algo, kf, kr) in enumerate(cells)
    ]  # fmt: skip


def test_tradeoff_labels_do_not_overlap() -> None:
    rows = crowded_rows()
    fig = plots.tradeoff_figure(rows, BENCH)
    boxes = label_boxes(fig)
    assert {n for text, _ in boxes for n in text.split(", ")} == {r["name"] for r in rows}
    assert overlapping(boxes) == []
    renderer = FigureCanvasAgg(fig).get_renderer()
    frame = fig.axes[0].get_window_extent(renderer)
    points = fig.axes[0].transData.transform(
        [(float(r["knowmem_f"]), float(r["knowmem_r"])) for r in rows]
    )
    for text, box in boxes:
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1, text  # inside the axes
        assert frame.y0 <= box.y0 and box.y1 <= frame.y1, text
        for px, py in points:  # and not over any point
            assert not (box.x0 < px < box.x1 and box.y0 < py < box.y1), (text, px, py)
    # the data is hard: the same labels at one fixed offset from their points do collide
    ax = fig.axes[0]
    for t in ax.texts:
        t.set_position((5, 5))
    assert overlapping(label_boxes(fig))


def test_place_labels_hand_computed() -> None:
    size, bounds = np.array([[40.0, 10.0]]), (0, 0, 400, 400)
    # two labels on one anchor: the first up-right of it (anchor + half size + offset 6);
    # the second not right of it (1 px short of the 2 px gap) but down-right
    centres = plots.place_labels(np.array([[100.0, 100.0]] * 2), np.repeat(size, 2, 0), bounds)
    assert centres.tolist() == [[126.0, 111.0], [126.0, 100.0 - 5 - 6]]
    # an obstacle up-right and 1 px into the "right" spot: down-right again
    centres = plots.place_labels(np.array([[100.0, 100.0]]), size, bounds, [(120, 105, 130, 115)])
    assert centres.tolist() == [[126.0, 89.0]]
    # near the right edge the label is clamped inside the bounds (above its point)
    centres = plots.place_labels(np.array([[390.0, 100.0]]), size, bounds, [(385, 95, 395, 105)])
    assert centres.tolist() == [[380.0, 111.0]]
    # placed top-down: the higher anchor gets the preferred spot whatever the input order
    centres = plots.place_labels(np.array([[100.0, 90.0], [100.0, 100.0]]), np.repeat(size, 2, 0),
                                 bounds)  # fmt: skip
    assert centres[1].tolist() == [126.0, 111.0]


@pytest.mark.parametrize(
    "value, target, retrain, direction, expected",
    [
        (50.0, 80.0, 20.0, "down", 0.5),  # halfway from the retrain's 20 to the target's 80
        (10.0, 80.0, 20.0, "down", 0.0),  # below the retrain's value: as good
        (95.0, 80.0, 20.0, "down", 1.0),  # beyond the target: capped
        (22.5, 20.0, 20.0, "down", 0.5),  # references agree: MIN_SPAN (5) is the scale
        (-50.0, -100.0, 3.0, "zero", 0.5),  # privleak: distance from 0, not from 3
        (150.0, -100.0, 0.0, "zero", 1.0),  # over-unlearning counts too
        (-2.5, -100.0, 0.0, "zero", 0.025),
        (29.6, 59.2, 75.0, "up", 0.5),  # half of the lower reference's utility lost
        (80.0, 59.2, 75.0, "up", 0.0),
        (0.0, 59.2, 75.0, "up", 1.0),
    ],
)
def test_closeness(
    value: float, target: float, retrain: float, direction: str, expected: float
) -> None:
    assert lbr.closeness(value, target, retrain, direction) == pytest.approx(expected)


def test_fmt_and_shade() -> None:
    assert [lbr.fmt(x) for x in (77.7778, -99.84, -0.04, 0.0, 100.0)] == [
        "77.8", "−99.8", "0.0", "0.0", "100.0"
    ]  # fmt: skip
    assert lbr.shade(0.0).startswith("hsl(120,") and lbr.shade(1.0).startswith("hsl(0,")
    assert lbr.shade(0.5).startswith("hsl(60,")


def test_robustness_columns_are_recognised() -> None:
    assert plots.robustness_column("knowmem_f_quant4") == ("knowmem_f", "quant4")
    assert plots.robustness_column("verbmem_f_relearn_all") == ("verbmem_f", "relearn_all")
    for column in ("knowmem_f", "knowmem_f_ci_lo", "knowmem_f_quant4_ci_hi", "knowmem_r_quant4"):
        assert plots.robustness_column(column) is None
    rows = [{"knowmem_f_quant4": "", "knowmem_f_relearn": "3.0", "verbmem_f_quant8": "1"}]
    assert plots.robustness_checks(rows) == ["relearn", "quant8"]  # quant4 never ran


ROBUST = ["verbmem_f_quant4", "knowmem_f_quant4", "es_f", "note"]


def robust_board(path: Path) -> Path:
    """A board with a robustness check (values per row), an extra metric and a text column."""
    specs = [("t", "target", 63.9, "70.0"), ("r", "retrain", 33.1, "35.0"), ("g", "ga", 30.0, "2.5"),
             ("n", "npo", 48.5, "")]  # fmt: skip
    rows = []
    for run_id, algo, knowmem_f, after in specs:
        row = lb.row_from_report(
            report(
                run_id,
                algo=algo,
                metrics={
                    "verbmem_f": 58.4,
                    "knowmem_f": knowmem_f,
                    "privleak": -99.8,
                    "knowmem_r": 55.2,
                },
            )
        )
        extra = {"verbmem_f_quant4": after, "knowmem_f_quant4": after, "es_f": "12.5",
                 "note": f"note {run_id}"}  # fmt: skip
        rows.append([*(row[c] for c in lb.COLUMNS), *(extra[c] for c in ROBUST)])
    return write_raw(path, [*lb.COLUMNS, *ROBUST], rows)


def test_robustness_figure_values(tmp_path: Path) -> None:
    rows = lb.read_csv(robust_board(tmp_path / "r.csv"))[1]
    fig = plots.robustness_figure(rows, BENCH)
    assert fig is not None
    ax_v, ax_k = fig.axes
    assert (ax_v.get_title(), ax_k.get_title()) == ("verbmem_f", "knowmem_f")
    assert [t.get_text() for t in ax_v.get_yticklabels()] == ["target", "retrain", "ga", "npo"]
    ys = dict(zip([t.get_text() for t in ax_v.get_yticklabels()], ax_k.get_yticks(), strict=True))
    points = {tuple(p) for c in ax_k.collections for p in c.get_offsets().tolist()}
    assert (30.0, ys["ga"]) in points and (2.5, ys["ga"]) in points  # before and after quant4
    assert (48.5, ys["npo"]) in points  # npo: before only (the check did not run)
    assert not any(y == ys["npo"] and x != 48.5 for x, y in points)
    assert plots.robustness_figure(lb.read_csv(make_csv(tmp_path / "p.csv", report("p")))[1],
                                   BENCH) is None  # fmt: skip


def _assert_png(path: Path) -> None:
    assert path.stat().st_size > 0
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.width >= 300 and img.height >= 200
        lo, hi = img.convert("L").getextrema()
        assert lo < hi  # not a blank image


def test_render_writes_page_and_plots(board: Path, tmp_path: Path) -> None:
    books = make_csv(
        tmp_path / "books.csv",
        report("b", benchmark="hub:muse-bench/MUSE-Books@abc", ci={"knowmem_r": [39.04, 43.46]}),
    )
    out = tmp_path / "site"
    page = lbr.render([board, books], out)
    assert page == out / "index.html"
    text = page.read_text()
    news_slug, books_slug = lbr.slug(BENCH), lbr.slug("hub:muse-bench/MUSE-Books@abc")
    for name in (
        f"tradeoff_{news_slug}",
        f"scale_{news_slug}",
        f"sustain_{news_slug}",
        f"tradeoff_{books_slug}",
    ):
        _assert_png(out / f"{name}.png")
        assert f'src="{name}.png"' in text
    assert not (out / f"scale_{books_slug}.png").exists()  # no scale data for that benchmark
    assert not (out / f"robustness_{news_slug}.png").exists()  # no robustness columns
    assert text.count('<table class="leaderboard"') == 2
    assert "&lt;b&gt;GA&lt;/b&gt; &amp; co" in text and "<b>GA</b>" not in text
    for metric in lb.METRICS:
        assert f'data-column="{metric}" data-type="number"' in text
        assert f"<code>{metric}</code>" in text  # explained in the glossary
    # one decimal; the interval on hover and in a hidden second line, never "[lo, hi]"
    assert '<span class="v">12.3</span>' in text and ">12.3457" not in text  # raw: data-sort
    assert 'title="95% interval 39.0 to 43.5"' in text and "[39.0" not in text
    # results first: the glossary is a collapsed <details> after the last table
    assert text.index('<details class="glossary"') > text.rindex("</table>")
    assert "lower is better" in text.lower() and "higher is better" in text.lower()
    # bookkeeping lives in the details rows, not in columns
    for column in ("harness_version", "date", "run_id", "seed", "params"):
        assert f'data-column="{column}"' not in text
    assert text.count('<tr class="details" hidden>') == 6
    assert "2025-03-01T12:00:00+00:00" in text and "<b>beta</b>=0.1" in text
    # only the robustness / extra groups that exist get a toggle
    assert 'data-group="muse"' in text and 'data-group="robust"' not in text
    # nothing loaded from elsewhere: the only URLs are the papers' links
    assert "<script>" in text and "<style>" in text
    for needle in ("<script src", "<link", "@import", "url(", "<iframe"):
        assert needle not in text
    assert re.findall(r"https?://[^\s\"<>]+", text) == re.findall(r'href="(https?://[^"]+)"', text)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_render_links_method_names_to_papers(board: Path, tmp_path: Path) -> None:
    text = lbr.render([board], tmp_path / "site").read_text()
    npo = UNLEARNERS.get("npo")
    assert (
        f'<a href="https://arxiv.org/abs/2404.05868" title="{html.escape(npo.description())}"'
        in text
    )
    assert '<a href="https://arxiv.org/abs/2407.06460"' in text  # ga (named "<b>GA</b> & co")
    assert text.count('<a href="https://') == 3  # ga, npo, npo_klr
    assert '<th scope="row" class="name" data-sort="target"><span>target</span>' in text


def test_paper_links_come_from_the_registry() -> None:
    expected = {
        "ga": "https://arxiv.org/abs/2407.06460",
        "ga_gdr": "https://arxiv.org/abs/2407.06460",
        "ga_klr": "https://arxiv.org/abs/2407.06460",
        "npo": "https://arxiv.org/abs/2404.05868",
        "npo_gdr": "https://arxiv.org/abs/2404.05868",
        "npo_klr": "https://arxiv.org/abs/2404.05868",
        "tv": "https://arxiv.org/abs/2212.04089",
        "whp": "https://arxiv.org/abs/2310.02238",
    }
    links = lbr.paper_links([*expected, "target", "retrain", "nope", "os:system", ""])
    assert {k: url for k, (url, _) in links.items()} == expected
    assert all(
        about == UNLEARNERS.get(k).description() and about for k, (_, about) in links.items()
    )


def test_page_module_does_not_import_torch() -> None:
    code = (
        "import sys, muse_bench.leaderboard.page, muse_bench.leaderboard.plots; "
        "print('torch' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "False"


def test_render_shades_from_target_to_retrain(board: Path, tmp_path: Path) -> None:
    text = lbr.render([board], tmp_path / "site").read_text()

    def cell(run_id: str, index: int) -> str:
        row = text.split(f'data-run-id="{run_id}"', 1)[1].split("</tr>", 1)[0]
        return row.split("<td", index + 2)[index + 1]

    # knowmem_f is the third metric column; the methods sit at 30.0 (< retrain's 33.1)
    assert "background:hsl(0," in cell("t", 3) and "background:hsl(120," in cell("r", 3)
    assert "background:hsl(120," in cell("n", 3)
    # verbmem_f 12.3457 between retrain 20.8 and target 58.4: below the retrain, green
    assert "background:hsl(120," in cell("n", 1)
    # privleak -45.5 against the target's -99.8: 45.5 / 99.8 of the way to red
    assert f"background:{lbr.shade(45.5 / 99.8)}" in cell("n", 2)


def test_render_robustness_and_extra_columns(tmp_path: Path) -> None:
    out = tmp_path / "site"
    text = lbr.render([robust_board(tmp_path / "r.csv")], out).read_text()
    _assert_png(out / f"robustness_{lbr.slug(BENCH)}.png")
    assert 'data-group="robust"' in text and 'data-group="extra"' in text
    assert 'data-column="knowmem_f_quant4"' in text and "after quant4" in text
    assert 'class="num g-extra" data-column="es_f"' in text
    assert 'data-column="note"' not in text and "note g" in text  # a text column: details only
    # shaded against the attacked references: ga's 2.5 is below the retrain's 35.0
    ga = text.split('data-run-id="g"', 1)[1].split("</tr>", 1)[0]
    assert ga.count("background:hsl(120,") >= 2
    # the robustness plot goes away when the columns do
    lbr.render([make_csv(tmp_path / "plain.csv", report("p"))], out)
    assert not (out / f"robustness_{lbr.slug(BENCH)}.png").exists()


def test_render_drops_stale_plots(board: Path, tmp_path: Path) -> None:
    out = tmp_path / "site"
    lbr.render([board], out)
    stale = out / f"scale_{lbr.slug(BENCH)}.png"
    assert stale.exists()
    plain = make_csv(tmp_path / "plain.csv", report("p"))
    lbr.render([plain], out)
    assert not stale.exists()


def test_slug_is_safe_and_collision_free() -> None:
    assert lbr.slug("muse-news") == "muse-news"
    assert lbr.slug("a/b") != lbr.slug("a_b")
    assert all(c.isalnum() or c in "._-" for c in lbr.slug("hub:x/y@rev 1"))
    assert lbr.slug("..") != ""
