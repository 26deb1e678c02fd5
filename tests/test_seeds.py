"""`muse run --seeds`: parsing, the mean/std report, one published row, the CLI."""

from __future__ import annotations

import json
import math

import pytest
from conftest import invoke_cli

from muse_bench.core.errors import ConfigError
from muse_bench.leaderboard import rows as lb
from muse_bench.runner import RunConfig
from muse_bench.runner import seeds as sd

VALUES = {  # seed -> (verbmem_f, privleak, knowmem_f, knowmem_r)
    0: (10.0, -100.0, 0.0, 20.0),
    1: (14.0, -90.0, 6.0, 26.0),
    2: (12.0, -80.0, 3.0, 14.0),
}


def fake_report(seed: int) -> dict:
    v = VALUES[seed]
    metrics = dict(zip(lb.METRICS, v, strict=True))
    return {
        "name": "ga",
        "run_id": f"ga-s{seed}",
        "benchmark": "embedded-news-v2",
        "corpus": "news",
        "algo": "ga",
        "params": {"lr": 0.0003},
        "protocol": "single",
        "seed": seed,
        "select": "first",
        "selected": f"epoch_{seed + 1}",
        "metrics": metrics,
        "ci": {m: [x - 1.0 - seed, x + 2.0] for m, x in metrics.items()},
        "reference": {},
        "manifest": {"seeds": {"run": seed}, "dtype": "float32"},
        "versions": {"muse_bench": "0.1.0"},
        "timings": {"total_s": 10.0 + seed},
    }


def test_parse_seeds() -> None:
    assert sd.parse_seeds("0,1,2") == (0, 1, 2)
    assert sd.parse_seeds(" 3, 7 ") == (3, 7)
    for bad in ("0", "0,0", "a,b", "-1,2", ""):
        with pytest.raises(ConfigError):
            sd.parse_seeds(bad)


def test_seeds_report_mean_std_and_row() -> None:
    report = sd.seeds_report([fake_report(s) for s in (0, 1, 2)], (0, 1, 2))
    # by hand: verbmem 10,14,12 -> mean 12, sample std sqrt(((-2)^2+2^2+0)/2) = 2
    assert report["metrics"]["verbmem_f"] == pytest.approx(12.0)
    assert report["seeds"]["std"]["verbmem_f"] == pytest.approx(2.0)
    assert report["metrics"]["privleak"] == pytest.approx(-90.0)
    assert report["seeds"]["std"]["privleak"] == pytest.approx(10.0)
    assert report["seeds"]["std"]["knowmem_f"] == pytest.approx(3.0)
    assert report["seeds"]["std"]["knowmem_r"] == pytest.approx(6.0)
    # mean interval: low bounds x-1, x-2, x-3 -> mean(x) - 2; high bounds x+2
    assert report["ci"]["verbmem_f"] == pytest.approx([10.0, 14.0])
    assert report["selected"] == "epoch_1,epoch_2,epoch_3"
    assert report["manifest"]["seeds"]["run"] == [0, 1, 2]
    assert report["timings"]["total_s"] == pytest.approx(33.0)
    assert [r["run_id"] for r in report["seeds"]["runs"]] == ["ga-s0", "ga-s1", "ga-s2"]
    row = lb.row_from_report(report)
    assert row["seeds"] == "0,1,2" and row["seed"] == ""
    assert float(row["verbmem_f_std"]) == 2.0 and float(row["knowmem_r_std"]) == 6.0
    assert float(row["verbmem_f_ci_lo"]) == 10.0
    assert lb.row_problems(row) == []
    other = sd.seeds_report([fake_report(s) for s in (0, 1)], (0, 1))
    assert other["run_id"] != report["run_id"]  # the id follows the seeds' runs


def test_run_seeds_publishes_one_row(tmp_path, monkeypatch) -> None:
    seen = []

    def fake_run(cfg, echo):
        seen.append((cfg.seed, cfg.publish))
        return fake_report(cfg.seed)

    def fake_run_with_refs(cfg, echo):
        rep = fake_run(cfg, echo)
        rep["reference"] = {}
        for which in ("target", "retrain"):  # each seed evaluates the references itself
            ref = {**fake_report(cfg.seed), "algo": which, "name": which}
            ref["run_id"] = f"{which}-s{cfg.seed}"
            ref_dir = tmp_path / "news" / which / ref["run_id"]
            ref_dir.mkdir(parents=True)
            (ref_dir / "report.json").write_text(json.dumps(ref))
            rep["reference"][which] = {"run_id": ref["run_id"], "metrics": ref["metrics"]}
        return rep

    monkeypatch.setattr(sd, "run", fake_run_with_refs)
    cfg = RunConfig(algo="ga", corpus="news", out=tmp_path, progress=False)
    report = sd.run_seeds(cfg, (0, 1, 2), echo=lambda _: None)
    assert seen == [(0, False), (1, False), (2, False)]  # per-seed rows not published
    saved = json.loads(open(report["report"]).read())
    assert saved["metrics"]["knowmem_f"] == pytest.approx(3.0)
    header, rows = lb.read_csv(tmp_path / "leaderboard" / "news.csv")
    # the first seed's reference rows, then the mean: one row per model
    assert [r["run_id"] for r in rows] == ["target-s0", "retrain-s0", report["run_id"]]
    assert math.isclose(float(rows[2]["knowmem_f_std"]), 3.0)
    monkeypatch.setattr(sd, "run", fake_run)  # again (finished runs): still one mean row
    sd.run_seeds(cfg, (0, 1, 2), echo=lambda _: None)
    assert len(lb.read_csv(tmp_path / "leaderboard" / "news.csv")[1]) == 3
    with pytest.raises(ConfigError, match="single protocol"):
        sd.run_seeds(RunConfig(algo="ga", corpus="news", protocol="scale"), (0, 1))


def test_cli_refuses_bad_seeds(tmp_path) -> None:
    code, _, err = invoke_cli(["run", "--algo", "ga", "--corpus", "news", "--seeds", "0"])
    assert code != 0 and err.count("\n") == 1 and "two or more distinct seeds" in err
    code, _, err = invoke_cli(
        ["run", "--algo", "ga", "--corpus", "news", "--seed", "1", "--seeds", "0,1"]
    )
    assert code != 0 and "not both" in err


def test_single_seed_run_is_not_published_when_told(tmp_path) -> None:
    from muse_bench.runner.records import reuse_report

    path = tmp_path / "report.json"
    path.write_text(json.dumps(fake_report(0)))
    assert reuse_report(path, tmp_path, publish_row=False)["run_id"] == "ga-s0"
    assert not (tmp_path / "leaderboard").exists()
    reuse_report(path, tmp_path)
    assert (tmp_path / "leaderboard" / "news.csv").is_file()
