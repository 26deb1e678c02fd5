"""`muse leaderboard verify`: rows re-run from what they record; edited rows fail."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path

import pytest
from conftest import invoke_cli

from muse_bench.core.errors import ConfigError
from muse_bench.core.hparams import parse_params
from muse_bench.leaderboard import rows as lb
from muse_bench.leaderboard import verify as vf
from muse_bench.unlearners import get_unlearner_class

ROOT = Path(__file__).resolve().parent.parent
NEWS = ROOT / "leaderboard" / "news.csv"
BOOKS = ROOT / "leaderboard" / "books.csv"
# The v2 leaderboard, kept as published when v3 became the default.
V2_NEWS = ROOT / "leaderboard" / "v2" / "news.csv"


def published(path: Path = NEWS) -> dict[str, dict[str, str]]:
    return {r["name"]: r for r in lb.read_csv(path)[1]}


def report_of(row: dict[str, str], **metrics: float) -> dict:
    """The report a faithful rerun of `row` gives (values parsed from the row)."""
    values = {m: float(row[m]) for m in lb.METRICS}
    ci = {m: [float(row[f"{m}_ci_lo"]), float(row[f"{m}_ci_hi"])] for m in lb.METRICS}
    return {"run_id": row["run_id"], "metrics": {**values, **metrics}, "ci": ci}


def test_exact_rerun_agrees_and_edited_numbers_do_not() -> None:
    row = published(V2_NEWS)["ga"]  # the numbers below are this row's
    checks = vf.compare(row, report_of(row))
    assert len(checks) == 12 and all(c.ok for c in checks)  # 4 metrics, 8 bounds
    edited = {**row, "knowmem_r": "12.5"}  # a published number changed by hand
    bad = [c for c in vf.compare(edited, report_of(row)) if not c.ok]
    assert [c.metric for c in bad] == ["knowmem_r"]
    assert bad[0].diff == pytest.approx(9.210526 - 12.5, abs=1e-4)
    assert bad[0].in_ci is True  # 9.21 is in [3.95, 15.79]: inside the CI, yet not equal
    assert all(c.ok for c in vf.compare(edited, report_of(row), within_ci=True))
    assert all(c.ok for c in vf.compare(edited, report_of(row), tolerance=3.3))
    assert not all(c.ok for c in vf.compare(edited, report_of(row), tolerance=3.2))
    ci_edit = {**row, "verbmem_f_ci_hi": "9.9"}
    assert [c.metric for c in vf.compare(ci_edit, report_of(row)) if not c.ok] == [
        "verbmem_f_ci_hi"
    ]
    # the rerun is rounded as the row was: 9.2105263 matches the cell 9.2105
    assert vf.compare(row, report_of(row, knowmem_r=9.210526315789473))[3].ok


def test_seed_rows_compare_the_spread() -> None:
    row = {**published()["ga"], "seeds": "0,1,2", "knowmem_f_std": "1.5", "seed": ""}
    report = {**report_of(row), "seeds": {"std": {"knowmem_f": 1.5}}}
    assert all(c.ok for c in vf.compare(row, report))
    report["seeds"]["std"]["knowmem_f"] = 2.0
    assert [c.metric for c in vf.compare(row, report) if not c.ok] == ["knowmem_f_std"]


def test_row_params_round_trip_through_the_command_line(tmp_path) -> None:
    for name, row in published().items():
        if row["algo"] in lb.REFERENCE_ALGOS:
            continue
        cfg, seeds, _ = vf.rerun_config(row, tmp_path, "cpu", None)
        cls = get_unlearner_class(row["algo"])
        parsed = dataclasses.asdict(cls(**parse_params(cls, cfg.params)))
        stored = json.loads(row["params"])
        assert {k: parsed[k] for k in stored} == {
            k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()
        }, name
        assert (cfg.seed, cfg.attack, cfg.select, cfg.n_bootstrap) == (0, "min_k_40", "first", 1000)
        assert cfg.source == "embedded" and seeds is None


def test_manifest_cell_and_seeds_drive_the_rerun(tmp_path) -> None:
    row = {
        **published()["ga"],
        "manifest": json.dumps({"attack": "loss", "select": "last", "bootstrap": 50}),
        "seeds": "1,2",
    }
    cfg, seeds, notes = vf.rerun_config(row, tmp_path, "cpu", None)
    assert (cfg.attack, cfg.select, cfg.n_bootstrap, seeds) == ("loss", "last", 50, (1, 2))
    assert notes == []


def test_an_embedded_row_reruns_on_its_own_version() -> None:
    assert vf.source_for("embedded-news-v2", "news", None) == ("news-v2", "embedded")
    assert vf.source_for("embedded-books-v3", "books", None) == ("books-v3", "embedded")
    assert vf.source_for("hub-x", "news", None) == ("news", "hub")
    assert vf.source_for("embedded-news-v2", "news", "/data") == ("news", "/data")
    with pytest.raises(vf.Unverifiable, match="ships embedded-books-v2"):
        vf.source_for("embedded-news-v2", "books", None)  # the id names another corpus


@pytest.mark.parametrize(
    "edit, reason",
    [
        ({"algo": "eval"}, "external checkpoint"),
        ({"benchmark": "embedded-news-v1"}, "ships embedded-news-v2, embedded-news-v3"),
        ({"benchmark": "dir-news-abc"}, "--source DIR"),
        ({"params": '{"no_such_knob": 1}'}, "no longer has hyperparameter(s) no_such_knob"),
    ],
)
def test_unverifiable_rows_say_why(tmp_path, edit, reason) -> None:
    row = {**published()["ga"], **edit}
    result = vf.verify_row(row, tmp_path)
    assert result.status == "unverifiable" and reason in result.reason and not result.ok


def test_verify_row_with_a_runner(tmp_path) -> None:
    rows = published()
    calls = []

    def runner(row, out, device, source):
        calls.append((row["name"], out, device))
        return report_of(rows[row["name"]]), ["a note"]

    good = vf.verify_row(rows["npo"], tmp_path, runner=runner)
    assert good.status == "reproduced" and good.notes == ["a note"]
    bad = vf.verify_row({**rows["npo"], "privleak": "-99.0"}, tmp_path, runner=runner)
    assert bad.status == "differs"
    lines = vf.describe(bad)
    assert lines[0] == f"npo ({rows['npo']['run_id']}): differs"
    assert any(line.lstrip().startswith("BAD privleak") for line in lines)
    assert calls[0] == ("npo", tmp_path, "cpu")


def test_select_rows_and_bad_input(tmp_path) -> None:
    _, rows = lb.read_csv(NEWS)
    assert [r["name"] for r in vf.select_rows(rows, ["ga", "tv"])] == ["ga", "tv"]
    assert len(vf.select_rows(rows, [])) == len(rows)
    with pytest.raises(ConfigError, match="no row named nope"):
        vf.select_rows(rows, ["nope"])
    code, _, err = invoke_cli(["leaderboard", "verify", str(NEWS), "--name", "nope"])
    assert code != 0 and err.count("\n") == 1
    code, _, err = invoke_cli(["leaderboard", "verify", str(tmp_path / "x.csv")])
    assert code != 0 and "no such file" in err
    code, _, err = invoke_cli(["leaderboard", "verify", str(NEWS), "--tolerance", "-1"])
    assert code != 0 and "--tolerance" in err
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("")
    code, _, err = invoke_cli(["leaderboard", "verify", str(NEWS), "--out", tmp_path / "used"])
    assert code != 0 and "not empty" in err and err.count("\n") == 1


def edited_csv(tmp_path: Path, source: Path, names: list[str], **cells: str) -> Path:
    """A copy of `source` with only `names` rows, `cells` changed in the last one."""
    header, rows = lb.read_csv(source)
    keep = [dict(r) for r in rows if r["name"] in names]
    keep[-1].update(cells)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, header, lineterminator="\n")
    writer.writeheader()
    writer.writerows(keep)
    path = tmp_path / source.name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(buf.getvalue())
    return path


@pytest.mark.slow
def test_published_references_verify_and_an_edited_one_fails(tmp_path) -> None:
    """target and retrain of the shipped v2 news.csv come back exactly (on news-v2); a
    target row whose knowmem_f was edited does not (CLI exit 1)."""
    ok = edited_csv(tmp_path / "ok", V2_NEWS, ["target", "retrain"])
    code, out, _ = invoke_cli(["leaderboard", "verify", str(ok), "--out", tmp_path / "runs_ok"])
    assert code == 0 and "2 of 2 row(s) reproduced" in out
    bad = edited_csv(tmp_path / "bad", V2_NEWS, ["target"], knowmem_f="80.0")
    code, out, _ = invoke_cli(["leaderboard", "verify", str(bad), "--out", tmp_path / "runs_bad"])
    assert code == 1 and "0 of 1 row(s) reproduced" in out
    assert "BAD knowmem_f" in out and "published   80.0000 rerun   83.3333" in out


@pytest.mark.slow
def test_published_ga_row_verifies(tmp_path) -> None:
    results = vf.verify_csv(NEWS, ["ga"], out=tmp_path)
    assert [r.status for r in results] == ["reproduced"], vf.describe(results[0])


@pytest.mark.slow
@pytest.mark.parametrize("path", [NEWS, BOOKS])
def test_every_published_row_verifies(tmp_path, path) -> None:
    results = vf.verify_csv(path, out=tmp_path)
    bad = [line for r in results if not r.ok for line in vf.describe(r)]
    assert not bad, "\n".join(bad)


def test_provenance_notes_name_what_changed() -> None:
    row = {"manifest": json.dumps({"data": "aaa", "commit": "c1"})}
    report = {"manifest": {"hashes": {"data": "bbb"}, "harness": {"git": {"commit": "c1xyz"}}}}
    notes = vf.provenance_notes(row, report)
    assert notes == [
        "data differs: the row's aaa, the rerun's bbb",
        "commit differs: the row's c1, the rerun's c1xyz",
    ]
    same = {"manifest": {"hashes": {"data": "aaa"}, "harness": {"git": {"commit": "c1"}}}}
    assert vf.provenance_notes(row, same) == []
    assert vf.provenance_notes({}, report) == []  # an older row records neither
