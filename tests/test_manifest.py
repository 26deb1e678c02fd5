"""The run manifest: environment, batching, precision, hashes, git; its leaderboard cell."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from muse_bench.leaderboard import rows as lb
from muse_bench.runner import manifest as mf
from muse_bench.task import resolve_task
from muse_bench.unlearners import get_unlearner_class

LAUNCH_VARS = ("WORLD_SIZE", "TORCHELASTIC_RUN_ID", "ACCELERATE_MIXED_PRECISION")


@pytest.fixture()
def plain_env(monkeypatch):
    for var in (*LAUNCH_VARS, "ACCELERATE_DYNAMO_BACKEND"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


@pytest.fixture(scope="module")
def task():
    return resolve_task("news")


def ga_params(**over):
    cls = get_unlearner_class("ga")
    unl = cls(**{**cls.defaults_for("embedded-news-v3"), **over})
    return dataclasses.asdict(unl)


def manifest_for(task, params, **kw):
    args = dict(
        task=task,
        device="cpu",
        params=params,
        seed=3,
        attack="min_k_40",
        n_bootstrap=100,
        select="first",
        engine="hf",
        eval_batch_size=8,
    )
    return mf.run_manifest(**{**args, **kw})


def test_launcher_from_env(plain_env) -> None:
    assert mf.launcher() == "none"
    plain_env.setenv("WORLD_SIZE", "2")
    assert mf.launcher() == "other"
    plain_env.setenv("TORCHELASTIC_RUN_ID", "x")
    assert mf.launcher() == "torchrun"
    plain_env.setenv("ACCELERATE_MIXED_PRECISION", "no")  # accelerate launch runs torchrun
    assert mf.launcher() == "accelerate"


def test_batch_sharding_and_precision(plain_env, task) -> None:
    m = manifest_for(task, ga_params(batch_size=3, grad_accum=5))
    assert m["batch"] == {
        "per_device": 3,
        "grad_accum": 5,
        "world_size": 1,
        "effective": 15,
        "recipe_effective": None,
    }
    assert (m["sharding"], m["dtype"], m["mixed_precision"]) == ("none", "float32", "no")
    assert m["device"]["type"] == "cpu" and m["device"]["count"] == 1
    assert m["seeds"] == {"run": 3, "torch": 3, "bootstrap": 3}
    assert m["evaluation"]["n_bootstrap"] == 100 and m["evaluation"]["attack"] == "min_k_40"
    # the embedded target has 512 positions: MUSE's 2048 is capped there; max_len wins
    config = json.loads((Path(task.models.target) / "config.json").read_text())
    assert m["chunk_length"] == min(2048, config["max_position_embeddings"])
    assert manifest_for(task, ga_params(max_len=64))["chunk_length"] == 64
    plain_env.setenv("WORLD_SIZE", "4")
    m4 = manifest_for(task, ga_params(batch_size=3, grad_accum=5))
    assert m4["batch"]["effective"] == 60 and m4["sharding"] == "DDP"
    assert m4["device"]["launcher"] == "other"
    assert mf.sharding({"fsdp": True}, 4) == "FSDP"
    assert manifest_for(task, {})["batch"] is None  # an evaluation alone trains nothing


def test_tv_batches_its_finetune() -> None:
    assert mf.batch_settings({"ft_batch_size": 2, "ft_grad_accum": 3}, 2)["effective"] == 12
    assert mf.batch_settings({"alphas": [1, 2]}, 1) is None


def test_recipe_and_notice(plain_env, task) -> None:
    ga = get_unlearner_class("ga")
    assert mf.recipe_batch(ga, "embedded-news-v3") == 4  # the embedded defaults: 4 x 1
    m = manifest_for(task, ga_params(batch_size=2), recipe_effective_batch=4)
    lines = mf.batch_notice(m)
    assert lines[0].startswith("effective batch: 2 chunks")
    assert len(lines) == 2 and "differs from the embedded-news-v3 recipe's 4" in lines[1]
    same = manifest_for(task, ga_params(batch_size=2, grad_accum=2), recipe_effective_batch=4)
    assert len(mf.batch_notice(same)) == 1  # 2 x 2 is the recipe's 4: no warning


def test_hashes_follow_the_bytes(task, tmp_path) -> None:
    m = manifest_for(task, {})
    h = hashlib.sha256()  # the data hash, by hand: every JSON file's name and bytes
    for path in sorted(task.corpus.data_dir.rglob("*.json")):
        h.update(str(path.relative_to(task.corpus.data_dir)).encode())
        h.update(path.read_bytes())
    assert m["hashes"]["data"] == h.hexdigest()[:12]
    copy = tmp_path / "target"
    shutil.copytree(task.models.target, copy)
    before = mf.model_hashes(str(copy))
    assert before["weights"] == m["hashes"]["target"]["weights"]
    assert before["tokenizer"] == m["hashes"]["target"]["tokenizer"]
    (copy / "special_tokens_map.json").write_text('{"eos_token": "</x>"}')
    after = mf.model_hashes(str(copy))
    assert after["tokenizer"] != before["tokenizer"]
    assert mf.model_hashes(str(tmp_path / "missing"))["weights"] is None  # never raises


def test_git_commit_inside_and_outside_a_checkout(tmp_path) -> None:
    assert mf.git_commit(tmp_path) is None  # an installed wheel: no failure, no commit
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "f").write_text("1")
    subprocess.run([*git, "add", "f"], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert mf.git_commit(repo) == {"commit": head.strip(), "dirty": False}
    (repo / "f").write_text("2")
    assert mf.git_commit(repo)["dirty"] is True


def test_manifest_cell_in_the_row(plain_env, task) -> None:
    m = manifest_for(task, ga_params(batch_size=2))
    cell = mf.manifest_cell(m)
    assert cell["sha"] == mf.manifest_hash(m) == mf.manifest_hash(json.loads(json.dumps(m)))
    assert cell["eff_batch"] == 2 and cell["device"] == "1xcpu" and cell["bootstrap"] == 100
    changed = {**m, "dtype": "bfloat16"}
    assert mf.manifest_hash(changed) != cell["sha"]
    report = {
        "benchmark": "b",
        "algo": "ga",
        "run_id": "ga-1",
        "metrics": {k: 1.0 for k in lb.METRICS},
        "manifest": m,
    }
    row = lb.row_from_report(report)
    assert json.loads(row["manifest"]) == cell
    assert lb.row_problems(row) == []
    assert list(row)[-len(lb.TRUST_COLUMNS) :] == list(lb.TRUST_COLUMNS)


def test_old_files_and_bad_cells(tmp_path) -> None:
    old = tmp_path / "old.csv"
    header = [*lb.MUSE_COLUMNS, *lb.EXTRA_COLUMNS]
    cells = ["ga", "1", "2", "3", "4", "b", "news", "ga", "", "single", "0", "e1"]
    cells += [""] * (len(header) - len(cells) - 1) + ["ga-1"]
    old.write_text(",".join(header) + "\n" + ",".join(cells) + "\n")
    assert lb.validate(old) == []  # a file from before the manifest column
    base = dict(zip(header, cells, strict=True))
    assert lb.row_problems({**base, "manifest": "[1]"}) == ["manifest is not a JSON object"]
    assert "seeds = '0,x'" in lb.row_problems({**base, "seeds": "0,x"})[0]
    assert "knowmem_f_std" in lb.row_problems({**base, "knowmem_f_std": "-1"})[0]
    assert lb.row_problems({**base, "seeds": "0,1,2", "knowmem_f_std": "0.5"}) == []


@pytest.mark.slow
def test_eval_report_and_row_carry_the_manifest(tmp_path, task) -> None:
    from conftest import invoke_cli

    code, out, err = invoke_cli(
        ["eval", "--model", "target", "--corpus", "news", "--bootstrap", "10", "--out", tmp_path]
    )
    assert code == 0, err
    (path,) = tmp_path.glob("news/target/*/report.json")
    m = json.loads(path.read_text())["manifest"]
    assert m["hashes"]["data"] == mf.data_fingerprint(task.corpus.data_dir)
    assert m["hashes"]["target"]["weights"] == mf.model_fingerprint(task.models.target)
    assert m["evaluation"]["n_bootstrap"] == 10 and m["batch"] is None
    _, rows = lb.read_csv(tmp_path / "leaderboard" / "news.csv")
    assert json.loads(rows[0]["manifest"])["sha"] == mf.manifest_hash(m)


def test_run_prints_the_effective_batch(plain_env, tmp_path) -> None:
    from muse_bench.runner import Run, RunConfig

    lines: list[str] = []
    cfg = RunConfig(algo="ga", corpus="news", out=tmp_path, device="cpu", progress=False)
    Run(cfg, echo=lines.append)  # planning only: nothing trained, nothing written
    assert lines == [
        "effective batch: 4 chunks of 512 tokens per optimizer step "
        "(4 per device x 1 accumulation x 1 process(es))"
    ]
    lines.clear()
    Run(dataclasses.replace(cfg, params=("batch_size=2",)), echo=lines.append)
    assert lines[1].startswith("warning: the effective batch 2 differs from the embedded-news-v3")
    assert not any(tmp_path.iterdir())
