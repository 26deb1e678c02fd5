"""Sweeps: parsing and expansion, validation, dry runs, resume, summaries, plots, the
submitit path and experiment tracking (muse_bench/sweeps/)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from conftest import invoke_cli

from muse_bench.core.errors import ConfigError, MuseError
from muse_bench.runner import RunConfig
from muse_bench.sweeps import executors, results
from muse_bench.sweeps.plan import PlannedRun, plan, runs_dir, sweep_dir
from muse_bench.sweeps.spec import SweepRun, expand, load_sweep, param_text, parse_sweep
from muse_bench.sweeps.sweep import publish_selected, run_sweep


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


GRID_YAML = """
name: g
defaults: {algo: npo, corpus: news, epochs: 1}
grid:
  lr: [1.0e-3, 3.0e-4]
  beta: [0.1, 0.5]
  seed: [0, 1]
run: {bootstrap: 10}
"""


# --------------------------------------------------------------------------- parsing


def test_grid_expands_to_every_combination_last_axis_fastest(tmp_path):
    sweep = load_sweep(write(tmp_path / "s.yaml", GRID_YAML))
    assert len(sweep.runs) == 8
    got = [(dict(r.params)["lr"], dict(r.params)["beta"], r.seed) for r in sweep.runs]
    assert got[:3] == [(1e-3, 0.1, 0), (1e-3, 0.1, 1), (1e-3, 0.5, 0)]
    assert got[-1] == (3e-4, 0.5, 1)
    assert {r.algo for r in sweep.runs} == {"npo"} and {r.corpus for r in sweep.runs} == {"news"}
    # defaults are hyperparameters too, in file order before the grid's
    assert sweep.runs[0].param_args() == ("epochs=1", "lr=0.001", "beta=0.1")
    assert sweep.run_options == {"bootstrap": 10} and sweep.selection == "muse"


def test_list_times_grid_and_defaults():
    data = {
        "name": "x",
        "defaults": {"corpus": "news", "epochs": 2},
        "list": [{"algo": "ga", "lr": 1e-4}, {"algo": "npo", "beta": 0.5, "name": "npo_b"}],
        "grid": {"seed": [0, 1, 2]},
    }
    points = expand(data)
    assert len(points) == 2 * 3
    assert points[0] == {"corpus": "news", "epochs": 2, "algo": "ga", "lr": 1e-4, "seed": 0}
    assert points[5]["name"] == "npo_b" and points[5]["seed"] == 2
    sweep = parse_sweep(data)
    assert [r.method for r in sweep.runs] == ["ga"] * 3 + ["npo_b"] * 3
    assert sweep.runs[3].params == (("epochs", 2), ("beta", 0.5))  # name/algo/seed are not -P
    # a list alone gives its entries
    assert len(expand({"list": [{"algo": "ga"}, {"algo": "npo"}]})) == 2


def test_toml_sweep_matches_yaml(tmp_path):
    toml = """
name = "g"
[defaults]
algo = "npo"
corpus = "news"
epochs = 1
[grid]
lr = [1.0e-3, 3.0e-4]
beta = [0.1, 0.5]
seed = [0, 1]
[run]
bootstrap = 10
"""
    a = load_sweep(write(tmp_path / "s.toml", toml))
    b = load_sweep(write(tmp_path / "s.yaml", GRID_YAML))
    assert a.runs == b.runs and a.run_options == b.run_options


def test_param_text():
    assert param_text(True) == "true" and param_text(None) == "none"
    assert param_text([1, 2, 4]) == "1,2,4" and param_text(1e-5) == "1e-05"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "x", "grid": {"lr": []}, "defaults": {"algo": "ga", "corpus": "news"}}, "empty"),
        ({"name": "x", "grid": {}}, "'grid' is empty"),
        ({"name": "x"}, "defines no runs"),
        ({"name": "x", "list": []}, "'list' is empty"),
        ({"name": "x y", "list": [{"algo": "ga"}]}, "'name'"),
        ({"name": "x", "gird": {}}, "Did you mean: grid"),
        ({"name": "x", "list": [{"corpus": "news"}]}, "has no 'algo'"),
        ({"name": "x", "list": [{"algo": "ga", "corpus": "news"}], "selection": "best"}, "rule"),
        ({"name": "x", "list": [{"algo": "ga", "corpus": "news"}], "run": {"epochs": 1}}, "'run'"),
        (
            {"name": "x", "list": [{"algo": "ga", "lr": 1}], "grid": {"lr": [1, 2]}},
            "both in the grid and in a list entry",
        ),
        (
            {"name": "x", "list": [{"algo": "ga", "corpus": "news"}], "executor": {"gpus": 1}},
            "unknown key 'gpus'",
        ),
    ],
)
def test_bad_structure_is_one_config_error(data, message):
    with pytest.raises(ConfigError, match=message):
        parse_sweep(data)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ("algo: [npo, nopo]", "run 2 .*unknown unlearner 'nopo'"),
        ("algo: [npo]\n  betta: [0.1]", "unknown hyperparameter 'betta'"),
        ("algo: [npo]\n  lr: [-1]", "lr must be > 0"),
        ("algo: [npo]\n  protocol: [single, sideways]", "unknown protocol"),
    ],
)
def test_bad_run_stops_before_any_run(tmp_path, grid, message):
    path = write(tmp_path / "bad.yaml", f"name: bad\ndefaults: {{corpus: news}}\ngrid:\n  {grid}\n")
    code, out, err = invoke_cli(["sweep", path, "--out", tmp_path / "out"])
    assert code != 0 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    import re

    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()  # nothing written, nothing run


def test_large_grid_needs_yes(tmp_path):
    path = write(
        tmp_path / "big.yaml",
        "name: big\ndefaults: {algo: npo, corpus: news}\ngrid:\n  seed: "
        + json.dumps(list(range(11)))
        + "\n  lr: "
        + json.dumps([1e-3 * (i + 1) for i in range(10)])
        + "\n",
    )
    code, _, err = invoke_cli(["sweep", path, "--out", tmp_path / "out", "--dry-run"])
    assert code != 0 and "110 runs, more than 100" in err and "--yes" in err
    code, out, _ = invoke_cli(["sweep", path, "--out", tmp_path / "out", "--dry-run", "--yes"])
    assert code == 0 and out.count("  todo ") == 110


def test_dry_run_prints_every_run_and_writes_nothing(tmp_path):
    path = write(tmp_path / "s.yaml", GRID_YAML)
    code, out, err = invoke_cli(["sweep", path, "--out", tmp_path / "out", "--dry-run"])
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].startswith("sweep g: 8 runs, 0 finished, 8 to run; executor: local")
    todo = [ln for ln in lines[1:] if ln.startswith("  todo npo-")]
    assert len(todo) == 8 and len({ln.split()[1] for ln in todo}) == 8  # 8 distinct run ids
    assert "muse run --algo npo --corpus news" in todo[1] and "--seed 1" in todo[1]
    assert "-P epochs=1 -P lr=0.001 -P beta=0.1" in todo[0] and "--bootstrap 10" in todo[0]
    assert not (tmp_path / "out").exists()


def test_duplicate_runs_are_merged(tmp_path):
    # lr 5e-4 is npo's embedded v3 default: with and without it, the run id is the same
    data = {"name": "d", "defaults": {"corpus": "news", "algo": "npo"}, "list": [{}, {"lr": 5e-4}]}
    assert len(plan(parse_sweep(data), tmp_path)) == 1


# --------------------------------------------------------------------------- local plans


def test_local_plan_does_not_oversubscribe():
    assert executors.local_plan({}, 8, "cpu", cores=16, gpus=0) == executors.LocalPlan(4, 4)
    assert executors.local_plan({}, 8, "cpu", cores=2, gpus=0) == executors.LocalPlan(1, 2)
    assert executors.local_plan({"parallel": 3}, 2, "cpu", cores=12, gpus=0).parallel == 2
    assert executors.local_plan({"parallel": 2}, 8, "cpu", cores=12, gpus=0).threads == 6
    gpu = executors.local_plan({}, 8, "auto", cores=16, gpus=2)
    assert gpu == executors.LocalPlan(2, 8, ("0", "1"))
    with pytest.raises(ConfigError, match="parallel"):
        executors.local_plan({"parallel": 0}, 8, "cpu", cores=4, gpus=0)


# --------------------------------------------------------------------------- fake runs

FAKE_RUN = r"""
import json, os, sys, time
from pathlib import Path
report_path, payload, stamp = Path(sys.argv[1]), json.loads(sys.argv[2]), Path(sys.argv[3])
with open(stamp, "a") as fh:
    fh.write(f"start {payload['run_id']} {time.time()}\n")
if payload.get("fail"):
    print("error: this run was told to fail")
    sys.exit(2)
time.sleep(0.2)
report_path.parent.mkdir(parents=True, exist_ok=True)
report_path.write_text(json.dumps(payload))
with open(stamp, "a") as fh:
    fh.write(f"end {payload['run_id']} {time.time()} {os.environ['OMP_NUM_THREADS']}\n")
"""


def fake_report(p: PlannedRun, knowmem_f: float, knowmem_r: float, **extra) -> dict:
    """What the runner's report holds, with chosen metrics (retrain knowmem_f = 10)."""
    return {
        "name": p.run.method,
        "run_id": p.run_id,
        "benchmark": "embedded-news-v2",
        "corpus": p.run.corpus,
        "algo": p.run.algo,
        "params": dict(p.run.params),
        "protocol": p.run.protocol,
        "seed": p.run.seed,
        "selected": "epoch_1",
        "metrics": {
            "verbmem_f": 20.0 + p.run.seed,
            "knowmem_f": knowmem_f,
            "privleak": -50.0,
            "knowmem_r": knowmem_r,
        },
        "ci": {"knowmem_f": [knowmem_f - 1, knowmem_f + 1]},
        "reference": {
            "retrain": {
                "metrics": {"verbmem_f": 17, "knowmem_f": 10.0, "privleak": 0, "knowmem_r": 75},
                "run_id": "retrain-x",
            },
            "target": {
                "metrics": {"verbmem_f": 99, "knowmem_f": 80.0, "privleak": -99, "knowmem_r": 60},
                "run_id": "target-x",
            },
        },
        "versions": {"muse_bench": "0.1.0"},
        **extra,
    }


def metrics_by_lr(p: PlannedRun) -> tuple[float, float]:
    """Synthetic (knowmem_f, knowmem_r): lr 1e-3 forgets more; the seed moves both by ±1."""
    lr, sign = dict(p.run.params)["lr"], (1 if p.run.seed else -1)
    kf, kr = (8.0, 40.0) if lr == 1e-3 else (30.0, 55.0)
    return kf + sign, kr + 2 * sign


def fake_command(tmp_path: Path, fail: set[str] = frozenset()):
    script = write(tmp_path / "fake_run.py", FAKE_RUN)
    stamp = tmp_path / "stamps.txt"

    def command(p: PlannedRun) -> list[str]:
        kf, kr = metrics_by_lr(p)
        payload = fake_report(p, kf, kr, robustness={"quant4": {"knowmem_f": kf + 5}})
        payload["fail"] = p.run_id in fail
        return [sys.executable, str(script), str(p.report_path), json.dumps(payload), str(stamp)]

    return command, stamp


def test_interrupted_sweep_resumes_without_redoing_finished_runs(tmp_path):
    path = write(tmp_path / "s.yaml", GRID_YAML.replace("beta: [0.1, 0.5]", "beta: [0.1]"))
    out = tmp_path / "out"
    planned = plan(load_sweep(path), out)
    assert len(planned) == 4
    command, stamp = fake_command(tmp_path, fail={planned[2].run_id})
    lines: list[str] = []
    with pytest.raises(MuseError, match="1 of 4 runs have not finished"):
        run_sweep(path, out, echo=lines.append, command=command, parallel=2, threads=1)
    assert sum("FAILED" in ln and "told to fail" in ln for ln in lines) == 1
    first = stamp.read_text().splitlines()
    assert sum(ln.startswith("start") for ln in first) == 4
    # the runs of one seed share reference evaluations: the first ran alone before the next
    events = [ln.split() for ln in first]
    end_0 = next(float(e[2]) for e in events if e[:2] == ["end", planned[0].run_id])
    start_2 = next(float(e[2]) for e in events if e[:2] == ["start", planned[2].run_id])
    assert end_0 <= start_2
    assert all(e[3] == "1" for e in events if e[0] == "end")  # OMP_NUM_THREADS per run
    # results already cover the 3 finished runs
    assert len((sweep_dir(out, "g") / "runs.csv").read_text().splitlines()) == 1 + 3
    # the same command again: only the failed run starts
    command, _ = fake_command(tmp_path)
    stamp.write_text("")
    res = run_sweep(path, out, echo=lines.append, command=command)
    again = [ln.split()[1] for ln in stamp.read_text().splitlines() if ln.startswith("start")]
    assert again == [planned[2].run_id]
    assert len(res.records) == 4
    # and once all are finished, nothing starts at all
    stamp.write_text("")
    run_sweep(path, out, echo=lines.append, command=command)
    assert stamp.read_text() == ""
    assert (sweep_dir(out, "g") / "plan.json").is_file()
    assert (sweep_dir(out, "g") / "sweep.yaml").read_text() == path.read_text()


def test_results_csv_summary_plot_and_publish(tmp_path):
    path = write(tmp_path / "s.yaml", GRID_YAML.replace("beta: [0.1, 0.5]", "beta: [0.1]"))
    out = tmp_path / "out"
    command, _ = fake_command(tmp_path)
    res = run_sweep(path, out, echo=lambda _: None, command=command, publish=True)
    d = sweep_dir(out, "g")
    import csv

    rows = list(csv.DictReader((d / "runs.csv").open()))
    assert len(rows) == 4
    assert {"p.lr", "p.beta", "knowmem_f_ci_lo", "robustness.quant4.knowmem_f"} <= set(rows[0])
    assert float(rows[0]["robustness.quant4.knowmem_f"]) == float(rows[0]["knowmem_f"]) + 5
    assert rows[0]["retrain.knowmem_f"] == "10.0"
    summary = list(csv.DictReader((d / "summary.csv").open()))
    assert len(summary) == 1
    # muse rule: lr 1e-3 comes first and its mean knowmem_f (7+9)/2 = 8 <= 10
    s = summary[0]
    assert s["selected"] == "epochs=1 lr=0.001 beta=0.1" and s["qualifies"] == "true"
    assert float(s["knowmem_f_mean"]) == 8.0 and float(s["knowmem_r_mean"]) == 40.0
    assert math.isclose(float(s["knowmem_f_std"]), math.sqrt(2), abs_tol=1e-6)  # seeds 7, 9
    assert math.isclose(float(s["knowmem_r_std"]), math.sqrt(8), abs_tol=1e-6)  # 38, 42
    assert s["n_seeds"] == "2" and s["seeds"] == "0 1"
    assert (d / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(res.summaries) == 1
    # published: the selected configuration's two runs, and nothing else of the sweep
    board = list(csv.DictReader((out / "leaderboard" / "news.csv").open()))
    assert sorted(r["run_id"] for r in board) == sorted(s["run_ids"].split())
    assert publish_selected(res, out) == [out / "leaderboard" / "news.csv"]  # idempotent
    assert len(list(csv.DictReader((out / "leaderboard" / "news.csv").open()))) == 2


# --------------------------------------------------------------------------- selection


def record(index: int, lr: float, seed: int, kf: float, kr: float, method="npo"):
    run = SweepRun(index, "npo", "news", seed=seed, params=(("lr", lr),), name=method)
    p = PlannedRun(run, RunConfig(algo="npo", corpus="news"), f"npo-{index}", Path("/x"))
    return results.RunRecord(p, fake_report(p, kf, kr))


def synthetic(configs: list[tuple[float, list[tuple[float, float]]]]):
    recs, i = [], 0
    for lr, seeds in configs:
        for seed, (kf, kr) in enumerate(seeds):
            recs.append(record(i, lr, seed, kf, kr))
            i += 1
    return recs


def test_selection_rules_on_seed_means():
    recs = synthetic(
        [
            (1.0, [(12.0, 70.0), (14.0, 72.0)]),  # mean kf 13 > 10: does not qualify
            (2.0, [(9.0, 40.0), (11.0, 44.0)]),  # mean kf 10 <= 10, kr 42
            (3.0, [(5.0, 50.0), (7.0, 60.0), (3.0, 40.0)]),  # mean kf 5, kr 50
        ]
    )
    (muse,) = results.summarize(recs, "muse")
    assert muse.selected.params == (("lr", "2.0"),) and muse.qualifies and muse.threshold == 10.0
    assert muse.selected.mean["knowmem_r"] == 42.0
    assert math.isclose(muse.selected.std["knowmem_r"], math.sqrt(8))
    (best,) = results.summarize(recs, "best_knowmem_r")
    assert best.selected.params == (("lr", "3.0"),)
    assert best.selected.mean["knowmem_f"] == 5.0 and best.selected.std["knowmem_f"] == 2.0
    assert best.selected.std["knowmem_r"] == 10.0  # 50, 60, 40: sample std 10
    # nobody qualifies: muse takes the last, best_knowmem_r the lowest knowmem_f
    worse = synthetic([(1.0, [(30.0, 10.0)]), (2.0, [(20.0, 5.0)]), (3.0, [(25.0, 90.0)])])
    assert results.summarize(worse, "muse")[0].selected.params == (("lr", "3.0"),)
    lowest = results.summarize(worse, "best_knowmem_r")[0]
    assert lowest.selected.params == (("lr", "2.0"),) and not lowest.qualifies
    # one seed: no spread
    (one,) = results.summarize(synthetic([(1.0, [(5.0, 5.0)])]), "muse")
    assert one.selected.std["knowmem_f"] is None


def test_methods_are_selected_separately_and_plotted(tmp_path):
    recs = [record(0, 1.0, 0, 5.0, 50.0, "a"), record(1, 2.0, 0, 50.0, 90.0, "b")]
    summaries = results.summarize(recs, "best_knowmem_r")
    assert [s.method for s in summaries] == ["a", "b"]
    png = results.plot(recs, summaries)
    assert png[:4] == b"\x89PNG" and len(png) > 10_000


# --------------------------------------------------------------------------- SLURM


def test_submitit_parameters_and_time():
    params = executors.submitit_parameters(
        {
            "partition": "gpu",
            "account": "lab",
            "gpus_per_run": 2,
            "cpus_per_run": 8,
            "time": "1-02:30:00",
            "mem_gb": 64,
            "array_parallelism": 16,
            "setup": "source .venv/bin/activate",
        },
        "npo_news",
    )
    assert params == {
        "name": "muse-npo_news",
        "timeout_min": 1 * 1440 + 2 * 60 + 30,
        "nodes": 1,
        "tasks_per_node": 1,
        "cpus_per_task": 8,
        "gpus_per_node": 2,
        "mem_gb": 64,
        "slurm_partition": "gpu",
        "slurm_account": "lab",
        "slurm_array_parallelism": 16,
        "slurm_setup": ["source .venv/bin/activate"],
    }
    assert executors.minutes(90) == 90 and executors.minutes("02:00") == 120
    with pytest.raises(ConfigError, match="time"):
        executors.minutes("two hours")


def mini_sweep(tmp_path: Path, mini_benchmark, extra: str = "", seeds=(0,)) -> Path:
    data, target, retrain = mini_benchmark
    return write(
        tmp_path / "mini.yaml",
        f"""
name: mini
defaults: {{algo: ga, corpus: news, epochs: 1, batch_size: 2, max_len: 64}}
grid: {{seed: {list(seeds)}}}
run: {{source: {data}, target: {target}, retrain: {retrain}, bootstrap: 5, device: cpu}}
{extra}
""",
    )


def test_slurm_path_with_submitit_debug_executor(tmp_path, mini_benchmark):
    pytest.importorskip("submitit")
    path = mini_sweep(
        tmp_path,
        mini_benchmark,
        "executor: {kind: slurm, cluster: debug, gpus_per_run: 0, cpus_per_run: 1}",
    )
    out = tmp_path / "out"
    lines: list[str] = []
    res = run_sweep(path, out, echo=lines.append)
    assert any(ln.startswith("submitted 1 job(s) to debug") for ln in lines)
    (rec,) = res.records
    report = json.loads(rec.planned.report_path.read_text())
    assert report["algo"] == "ga" and report["params"]["epochs"] == 1
    assert rec.planned.report_path.is_relative_to(runs_dir(out, "mini"))
    assert (sweep_dir(out, "mini") / "plot.png").is_file()
    # nothing is submitted again once finished
    lines.clear()
    run_sweep(path, out, echo=lines.append)
    assert not any("submitted" in ln for ln in lines)
    assert lines[0].startswith("sweep mini: 1 runs, 1 finished, 0 to run")


def test_waves_put_each_reference_group_first():
    def planned(i, seed):
        run = SweepRun(i, "ga", "news", seed=seed)
        return PlannedRun(run, RunConfig(algo="ga", corpus="news", seed=seed), f"r{i}", Path("x"))

    runs = [planned(0, 0), planned(1, 0), planned(2, 1), planned(3, 1), planned(4, 2)]
    first, rest = executors.waves(runs[:4], finished=[runs[4]])
    assert [p.run_id for p in first] == ["r0", "r2"] and [p.run_id for p in rest] == ["r1", "r3"]
    assert executors.waves([planned(5, 2)], finished=[runs[4]]) == [[planned(5, 2)]]


# --------------------------------------------------------------------------- tracking


def test_train_loop_reports_step_and_epoch_losses(tiny_model, tiny_tokenizer):
    from conftest import TINY_TEXTS

    from muse_bench.training import loop
    from muse_bench.unlearners.losses import token_nll

    seen: list[tuple[dict, int]] = []
    loop.TRAIN_LOGGERS.append(lambda cfg, values, step: seen.append((dict(values), step)))
    try:
        cfg = loop.TrainConfig(lr=1e-3, epochs=2, batch_size=2, max_len=32, desc="ga single_1")
        epochs = list(
            loop.train(
                tiny_model,
                tiny_tokenizer,
                lambda m, f, r, ref: -token_nll(m, f),
                TINY_TEXTS[:8],
                (),
                cfg,
            )
        )
    finally:
        loop.TRAIN_LOGGERS.clear()
    steps = [(v, s) for v, s in seen if "loss" in v]
    ends = [(v, s) for v, s in seen if "epoch_loss" in v]
    per_epoch = len(steps) // 2
    assert per_epoch >= 1 and [s for _, s in steps] == list(range(1, 2 * per_epoch + 1))
    assert all(v["lr"] == 1e-3 for v, _ in steps)
    for k, (v, s) in enumerate(ends):
        mine = [x["loss"] for x, _ in steps[k * per_epoch : (k + 1) * per_epoch]]
        assert v["epoch"] == k + 1 and s == (k + 1) * per_epoch
        assert math.isclose(v["epoch_loss"], sum(mine) / len(mine), rel_tol=1e-9)
        assert math.isclose(v["epoch_loss"], epochs[k].loss, rel_tol=1e-9)


def test_tensorboard_event_file_holds_losses_and_metrics(tmp_path, mini_benchmark):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from muse_bench.sweeps.tracking import tracked_run

    data, target, retrain = mini_benchmark
    cfg = RunConfig(
        algo="ga",
        corpus="news",
        source=str(data),
        target=str(target),
        retrain=str(retrain),
        params=("epochs=2", "batch_size=2", "max_len=64"),
        n_bootstrap=5,
        device="cpu",
        out=tmp_path / "out",
        progress=False,
        select="last",  # score both epochs (tiny random models would stop at the first)
    )
    report = tracked_run(cfg, "tensorboard", echo=lambda _: None)
    logdir = tmp_path / "out" / "tensorboard" / "news" / report["run_id"]
    assert list(logdir.glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "train/ga/single_1/loss" in tags and "train/ga/single_1/epoch_loss" in tags
    knowmem = acc.Scalars("select/knowmem_f")
    assert [e.step for e in knowmem] == [1, 2]
    assert [e.value for e in knowmem] == pytest.approx([p["knowmem_f"] for p in report["curve"]])
    (final,) = acc.Scalars("eval/knowmem_r")
    assert final.value == pytest.approx(report["metrics"]["knowmem_r"])
    # a finished run is reused and logs nothing more
    before = sorted(p.stat().st_size for p in logdir.rglob("events.out.tfevents.*"))
    tracked_run(cfg, "tensorboard", echo=lambda _: None)
    assert sorted(p.stat().st_size for p in logdir.rglob("events.out.tfevents.*")) == before


def test_unknown_tracker_is_one_line(tmp_path):
    code, _, err = invoke_cli(
        ["run", "--algo", "ga", "--corpus", "news", "--log-with", "tensorbored", "--out", tmp_path]
    )
    assert code != 0 and "unknown --log-with 'tensorbored'" in err and "tensorboard" in err
    assert len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_local_executor_runs_real_muse_run_subprocesses(tmp_path, mini_benchmark):
    path = mini_sweep(tmp_path, mini_benchmark, "executor: {parallel: 2, threads: 1}", (0, 1))
    out = tmp_path / "out"
    res = run_sweep(path, out, echo=lambda _: None)
    assert len(res.records) == 2
    logs = sorted((sweep_dir(out, "mini") / "logs").glob("*.log"))
    assert [p.stem for p in logs] == sorted(r.planned.run_id for r in res.records)
    assert "--source" in logs[0].read_text().splitlines()[0]  # the command each run got
    created = {r.planned.run_id: r.report["created"] for r in res.records}
    again = run_sweep(path, out, echo=lambda _: None)
    assert {r.planned.run_id: r.report["created"] for r in again.records} == created


@pytest.mark.slow
def test_slurm_path_with_submitit_local_executor(tmp_path, mini_benchmark):
    pytest.importorskip("submitit")
    path = mini_sweep(
        tmp_path,
        mini_benchmark,
        "executor: {kind: slurm, cluster: local, gpus_per_run: 0, cpus_per_run: 1}",
        (0, 1),
    )
    lines: list[str] = []
    res = run_sweep(path, tmp_path / "out", echo=lines.append)
    # one array per wave: the first seed's run alone would share nothing, so both go first
    assert [ln.split()[1] for ln in lines if ln.startswith("submitted")] == ["2"]
    assert len(res.records) == 2 and {r.planned.run.seed for r in res.records} == {0, 1}


def test_cluster_runs_are_not_checked_against_this_machines_devices(tmp_path):
    data = {
        "name": "gpu",
        "defaults": {"algo": "npo", "corpus": "news"},
        "list": [{}],
        "run": {"engine": "vllm", "device": "cuda"},
    }
    sweep = parse_sweep(data)
    with pytest.raises(ConfigError, match="run 1"):
        plan(sweep, tmp_path)  # no vLLM / GPU here
    (p,) = plan(sweep, tmp_path, here=False)
    assert p.config.engine == "vllm" and p.config.device == "cuda"
    (same,) = plan(parse_sweep({**data, "run": {}}), tmp_path)
    assert same.run_id == p.run_id  # device and engine are not part of the run id


@pytest.mark.parametrize(("name", "runs"), [("npo_news.yaml", 8), ("baselines_news.toml", 21)])
def test_shipped_examples_plan(tmp_path, name, runs):
    example = Path(__file__).resolve().parent.parent / "sweeps" / name
    assert len(plan(load_sweep(example), tmp_path)) == runs


def test_sweep_and_run_help_name_the_new_options():
    code, out, _ = invoke_cli(["sweep", "--help"])
    assert code == 0 and all(o in out for o in ("--dry-run", "--yes", "--publish", "--log-with"))
    code, out, _ = invoke_cli(["run", "--help"])
    assert code == 0 and "--log-with" in out
