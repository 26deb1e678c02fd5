"""The `muse` command line (SPEC §6), in this process (CliRunner) and as a subprocess.

Runs use a 2-document mini benchmark with random 2-layer models (seconds each); the
numbers are meaningless but every stage runs, and everything is checked for shape.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import invoke_cli as invoke
from conftest import write_mini_benchmark

from muse_bench.cli import cli

MUSE = str(Path(sys.executable).with_name("muse"))
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
MUSE_COLUMNS = ["name", "verbmem_f", "privleak", "knowmem_f", "knowmem_r"]
REPORT_KEYS = {
    "benchmark",
    "corpus",
    "algo",
    "params",
    "seed",
    "model",
    "data_dir",
    "metrics",
    "versions",
    "run_id",
    "scale",
    "sustain",
}


def muse(args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [MUSE, *map(str, args)], env=ENV, capture_output=True, text=True, timeout=timeout
    )


def data_args(bench) -> list[str]:
    data, target, retrain = bench
    return [
        "--corpus",
        "news",
        "--source",
        str(data),
        "--target",
        str(target),
        "--retrain",
        str(retrain),
        "--bootstrap",
        "20",
        "--device",
        "cpu",
        "--quiet",
    ]


def run_args(bench, out, *extra) -> list[str]:
    return [
        "run",
        "--algo",
        "npo",
        *data_args(bench),
        "-P",
        "epochs=2",
        "--out",
        str(out),
        *map(str, extra),
    ]


def reports(out: Path, corpus: str = "news") -> dict[str, dict]:
    """Every report.json under OUT/<corpus>, by run id."""
    found = {}
    for path in (out / corpus).glob("*/*/report.json"):
        report = json.loads(path.read_text())
        found[report["run_id"]] = report
    return found


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def check_metrics(metrics: dict) -> None:
    assert set(metrics) == {"verbmem_f", "knowmem_f", "privleak", "knowmem_r"}
    for name, value in metrics.items():
        assert isinstance(value, float) and math.isfinite(value), (name, value)
        if name != "privleak":
            assert 0.0 <= value <= 100.0, (name, value)
        else:
            assert value >= -100.0


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return write_mini_benchmark(tmp_path_factory.mktemp("cli-bench"), docs=2)


@pytest.fixture(scope="module")
def subprocess_run(bench, tmp_path_factory):
    """`muse run` as a user types it: a real subprocess of the console script."""
    out = tmp_path_factory.mktemp("cli-sub") / "runs"
    proc = muse(run_args(bench, out, "--protocol", "sustain"))
    return out, proc


@pytest.fixture(scope="module")
def inprocess_run(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-in") / "runs"
    result = invoke(run_args(bench, out, "--name", "my-npo", "--seed", "1"))
    return out, result


# ----------------------------------------------------------------------------- help and list


COMMANDS = [
    [],
    ["list"],
    ["prepare"],
    ["run"],
    ["eval"],
    ["leaderboard"],
    ["leaderboard", "validate"],
    ["leaderboard", "merge"],
    ["leaderboard", "render"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "muse")
def test_help_of_every_command_exits_0(command):
    result = CliRunner().invoke(cli, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage: " in result.output
    code, stdout, stderr = invoke([*command, "--help"])
    assert code == 0 and "Usage: " in stdout and not stderr


def test_help_and_version_in_a_subprocess():
    proc = muse(["--help"])
    assert proc.returncode == 0 and not proc.stderr
    for command in ("list", "prepare", "run", "eval", "leaderboard"):
        assert command in proc.stdout
    proc = muse(["run", "--help"])
    assert proc.returncode == 0
    for option in (
        "--algo",
        "--source",
        "--protocol",
        "-P",
        "--seed",
        "--out",
        "--device",
        "--engine",
        "--allow-pickle",
        "--trust-remote-code",
        "--force",
    ):
        assert option in proc.stdout, option
    proc = muse(["--version"])
    assert proc.returncode == 0 and proc.stdout.startswith("muse, version ")


def test_no_command_shows_usage():
    code, stdout, _ = invoke([])
    assert "Usage: " in stdout and code in (0, 2)


def _check_list(stdout: str) -> None:
    for name in (
        "npo",
        "ga",
        "ga_gdr",
        "npo_klr",
        "tv",
        "whp",
        "news",
        "books",
        "verbmem_f",
        "knowmem_f",
        "privleak",
        "knowmem_r",
        "scale",
        "sustain",
        "min_k_40",
        "hf",
    ):
        assert name in stdout, name
    assert "lr=" in stdout and "epochs=" in stdout and "beta=" in stdout


def test_list_in_process_and_subprocess():
    code, stdout, stderr = invoke(["list"])
    assert code == 0, stderr
    _check_list(stdout)
    proc = muse(["list"])
    assert proc.returncode == 0, proc.stderr
    _check_list(proc.stdout)
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- muse run


def _check_run_output(out: Path, stdout: str, name: str, protocol: str) -> dict:
    (report,) = [r for r in reports(out).values() if r["algo"] == "npo"]
    assert REPORT_KEYS <= set(report)
    assert report["corpus"] == "news" and report["algo"] == "npo" and report["name"] == name
    assert report["benchmark"].startswith("dir-news-")
    assert report["params"]["epochs"] == 2 and report["params"]["beta"] == 0.1
    assert report["protocol"] == protocol
    assert Path(report["model"], "config.json").is_file()
    assert Path(report["data_dir"], "raw", "forget.json").is_file()
    check_metrics(report["metrics"])
    for version in ("muse_bench", "torch", "transformers"):
        assert report["versions"][version]
    report_path = next(out.glob(f"news/npo/{report['run_id']}/report.json"))
    assert f"report: {report_path}" in stdout
    assert f"leaderboard: {out / 'leaderboard' / 'news.csv'}" in stdout
    for model in ("target", "retrain", name):
        assert any(line.startswith(model) for line in stdout.splitlines()), model

    header, rows = read_csv(out / "leaderboard" / "news.csv")
    assert header[:5] == MUSE_COLUMNS
    assert sorted(r["name"] for r in rows) == sorted(["target", "retrain", name])
    (row,) = [r for r in rows if r["run_id"] == report["run_id"]]
    for metric in ("verbmem_f", "knowmem_f", "privleak", "knowmem_r"):
        assert float(row[metric]) == pytest.approx(report["metrics"][metric], abs=0.06)
    return report


def test_run_subprocess(subprocess_run):
    out, proc = subprocess_run
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    report = _check_run_output(out, proc.stdout, "npo", "sustain")
    assert report["scale"] is None
    assert [f["fold"] for f in report["sustain"]] == [1, 2, 3, 4]
    for fold in report["sustain"]:
        check_metrics({k: fold[k] for k in ("verbmem_f", "knowmem_f", "privleak", "knowmem_r")})


def test_run_in_process(inprocess_run):
    out, (code, stdout, stderr) = inprocess_run
    assert code == 0, stderr
    report = _check_run_output(out, stdout, "my-npo", "single")
    assert report["seed"] == 1 and report["scale"] is None and report["sustain"] is None


def test_run_again_reuses_the_finished_run(bench, inprocess_run):
    out, _ = inprocess_run
    before = (out / "leaderboard" / "news.csv").read_bytes()
    code, stdout, stderr = invoke(run_args(bench, out, "--name", "my-npo", "--seed", "1"))
    assert code == 0, stderr
    assert "already finished" in stdout
    assert (out / "leaderboard" / "news.csv").read_bytes() == before


# ----------------------------------------------------------------------------- muse eval


@pytest.mark.parametrize("which", ["target", "retrain"])
def test_eval_reference_models(which, bench, inprocess_run, tmp_path):
    out = tmp_path / "runs"
    code, stdout, stderr = invoke(
        ["eval", "--model", which, *data_args(bench), "--seed", "1", "--out", out]
    )
    assert code == 0, stderr
    (report,) = reports(out).values()
    assert report["algo"] == which and report["name"] == which
    assert report["model"] == str(bench[0 if which == "target" else 1].parent / which)
    check_metrics(report["metrics"])
    assert f"report: {out / 'news' / which / report['run_id'] / 'report.json'}" in stdout
    header, rows = read_csv(out / "leaderboard" / "news.csv")
    assert header[:5] == MUSE_COLUMNS and [r["run_id"] for r in rows] == [report["run_id"]]
    # the same evaluation the run made of its reference model (same seed and bootstrap)
    run_out, _ = inprocess_run
    assert reports(run_out)[report["run_id"]]["metrics"] == report["metrics"]


def test_eval_model_path_subprocess(bench, subprocess_run, tmp_path):
    """Evaluating the unlearned checkpoint a run saved reproduces the run's numbers."""
    run_out, _ = subprocess_run
    (run,) = [r for r in reports(run_out).values() if r["algo"] == "npo"]
    out = tmp_path / "runs"
    proc = muse(
        ["eval", "--model", run["model"], *data_args(bench), "--out", out, "--name", "unlearned"]
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    evaluated = [r for r in reports(out).values() if r["name"] == "unlearned"]
    assert len(evaluated) == 1
    assert evaluated[0]["model"] == run["model"]
    assert evaluated[0]["metrics"] == run["metrics"]
    assert evaluated[0]["attacks"] == run["attacks"]
    _, rows = read_csv(out / "leaderboard" / "news.csv")
    assert [r["name"] for r in rows] == ["unlearned"]


# ----------------------------------------------------------------------------- muse leaderboard


def test_leaderboard_validate_merge_render(subprocess_run, inprocess_run, tmp_path):
    sub_csv = subprocess_run[0] / "leaderboard" / "news.csv"
    in_csv = inprocess_run[0] / "leaderboard" / "news.csv"

    code, stdout, stderr = invoke(["leaderboard", "validate", sub_csv, in_csv])
    assert code == 0, stderr
    assert stdout.count(": valid") == 2

    merged = tmp_path / "merged.csv"
    code, stdout, stderr = invoke(["leaderboard", "merge", sub_csv, in_csv, "-o", merged])
    assert code == 0, stderr
    header, rows = read_csv(merged)
    assert header[:5] == MUSE_COLUMNS
    ids = [r["run_id"] for r in rows]
    want = {r["run_id"] for path in (sub_csv, in_csv) for r in read_csv(path)[1]}
    assert len(ids) == len(set(ids)) and set(ids) == want
    # merging again with the merged file in the inputs changes nothing (de-duplicated)
    code, _, stderr = invoke(["leaderboard", "merge", merged, sub_csv, "-o", merged])
    assert code == 0, stderr
    assert [r["run_id"] for r in read_csv(merged)[1]] == ids

    proc = muse(["leaderboard", "validate", merged])
    assert proc.returncode == 0, proc.stderr
    assert "valid" in proc.stdout

    site = tmp_path / "site"
    code, stdout, stderr = invoke(["leaderboard", "render", merged, "-o", site])
    assert code == 0, stderr
    page = (site / "index.html").read_text()
    assert "my-npo" in page and "npo" in page
    assert any(site.glob("*.png"))


def test_merge_two_output_dirs_with_the_same_reference_rows(subprocess_run, tmp_path):
    sub_csv = subprocess_run[0] / "leaderboard" / "news.csv"
    header, rows = read_csv(sub_csv)
    later = tmp_path / "later.csv"
    with open(later, "w", newline="") as fh:
        writer = csv.DictWriter(fh, header)
        writer.writeheader()
        writer.writerows({**r, "date": "2030-01-01T00:00:00+00:00"} for r in rows)
    code, _, stderr = invoke(["leaderboard", "merge", sub_csv, later, "-o", tmp_path / "m.csv"])
    assert code == 0, stderr
