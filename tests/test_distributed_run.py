"""`muse run` / `muse eval` launched as two processes (torchrun, gloo) against one process.

The runs use the mini benchmark and the same global batch (the unlearners' default
batch_size=4: two chunks per process): GA with MUSE's selection, NPO with `--select last`
(both epochs trained and evaluated), then `muse eval` of the GA model. They must end alike:
exit code 0, one report.json per run, one leaderboard row per run id, the same files, the
same selected epoch and curve, the same metrics. Only the main process may write under
--out: an audit hook (a sitecustomize on the workers' PYTHONPATH) records every file write
of every torchrun worker.

Tolerances, and why not bit for bit:

- Training: two processes each compute half of a micro-batch and gloo sums the gradients,
  so float additions happen in another order than in one process (~1e-7 relative, see
  tests/test_distributed.py). That is the only difference, for token means too: the mini
  benchmark's forget set packs into full chunks plus a shorter last one, and the loop
  divides each process's token sums by its share of the micro-batch's token count
  (`token_norm`, see `unlearners.losses.token_count`).
- Evaluation: each process batches only its share of the inputs, so padding, and with it
  the float summation order, can differ from one process's batches (~1e-9 relative).
- So per-document MIA scores agree to `SCORE_RTOL`: trained models 1e-5 (Min-K%++
  divides by a standard deviation, which amplifies noise; training itself moves these
  scores by ~2e-3), models that were not trained in the run (target, retrain, the
  evaluated GA model) 1e-6 (measured <= 1e-8).
- Greedy generations, hence verbmem/knowmem (ROUGE) and the selection curve, must be
  identical: a ~1e-6 relative change of the logits flips an argmax only at a near-tie,
  and there is none in these runs (deterministic: same seeds, one thread per process).
- AUC-based numbers (privleak, the attack AUCs, their bootstrap CIs) depend only on the
  ranking of the documents' scores, whose gaps (~1e-3) are far above the differences, so
  they must agree to `REPORT_RTOL` = 1e-6 (float noise of the ratio).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from muse_bench.cli import main
from muse_bench.core.distributed import Processes, local_device, main_only, on_main
from muse_bench.core.io import try_lock
from muse_bench.engines.base import TokenScores
from muse_bench.engines.sharded import ShardedEngine, shard

WORLD = 2
#: The compared commands, by the directory name of their reports; `muse eval` evaluates the
#: model that the one-process GA run saved.
COMMANDS = {
    "ga": ["run", "--algo", "ga", "-P", "epochs=2"],
    "npo": ["run", "--algo", "npo", "-P", "epochs=2", "--select", "last"],
    "ga-model": ["eval", "--model", "{ga_model}", "--name", "ga-model"],
}
SCORE_RTOL = {"ga": 1e-5, "npo": 1e-5}
REPORT_RTOL = 1e-6
#: Report fields that differ by design between two runs (when, how long, where).
UNCOMPARED = {"created", "timings", "model", "manifest"}  # the manifest records the launch

#: Installed as sitecustomize in the torchrun workers: records every write under
#: MUSE_AUDIT_OUT (files opened for writing, created, renamed, removed; directories made
#: or removed) and saves the list per rank into MUSE_AUDIT_LOG at exit.
AUDIT_HOOK = """
import atexit, json, os, sys

_root = os.environ.get("MUSE_AUDIT_OUT")
_rank = os.environ.get("RANK")
if _root and _rank is not None:
    _root = os.path.abspath(_root)
    _writes = []
    _flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    _events = {"os.rename", "os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree",
               "os.truncate", "os.link", "os.symlink", "os.chmod"}

    def _under(path):
        try:
            path = os.path.abspath(os.fsdecode(path))
        except TypeError:  # a file descriptor
            return False
        return path == _root or path.startswith(_root + os.sep)

    def _hook(event, args):
        if event == "open":
            mode, flags = args[1], args[2]
            writing = any(c in mode for c in "wax+") if mode else bool(flags & _flags)
            paths = args[:1] if writing else ()
        elif event in _events:
            paths = args[:2] if event == "os.rename" else args[:1]
        else:
            return
        _writes.extend([event, os.fsdecode(p)] for p in paths if _under(p))

    def _save():
        with open(os.path.join(os.environ["MUSE_AUDIT_LOG"], f"rank{_rank}.json"), "w") as fh:
            json.dump(_writes, fh)

    sys.addaudithook(_hook)
    atexit.register(_save)
"""


def muse_args(name: str, bench, out: Path) -> list[str]:
    """The arguments of `COMMANDS[name]` on the mini benchmark, writing into `out` (the
    evaluated GA model is the one-process run's, in `out`'s sibling `one`)."""
    data, target, retrain = bench
    ga_model = next(out.parent.glob("one/news/ga/*/requests/single_1/model"), "")
    args = [a.format(ga_model=ga_model) for a in COMMANDS[name]]
    args += ["--corpus", "news", "--source", data, "--target", target, "--retrain", retrain]
    args += ["--bootstrap", "50", "--device", "cpu", "--quiet", "--out", out]
    return [str(a) for a in args]


def run_here(args: list[str]) -> int:
    """`muse ARGS` in this process (one process: no WORLD_SIZE in the environment)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("WORLD_SIZE", raising=False)
        try:
            main(args)
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else 1
    return 0


def torchrun(args: list[str], site: Path, log: Path) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --standalone --nproc_per_node 2 -m muse_bench.cli
    ARGS`, with the audit hook in `site` on the workers, logging into `log`."""
    log.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.update(TOKENIZERS_PARALLELISM="false", MUSE_AUDIT_LOG=str(log))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(name, None)
    env["MUSE_AUDIT_OUT"] = args[args.index("--out") + 1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc_per_node={WORLD}", "-m", "muse_bench.cli", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def runs(mini_benchmark, tmp_path_factory) -> dict[str, Any]:
    """Every command run in one process (into `one`), then under torchrun (into `two`)."""
    root = tmp_path_factory.mktemp("ddp-run")
    one, two, site = root / "one", root / "two", root / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(AUDIT_HOOK)
    codes, procs = {}, {}
    for name in COMMANDS:
        codes[name] = run_here(muse_args(name, mini_benchmark, one))
        procs[name] = torchrun(muse_args(name, mini_benchmark, two), site, root / "log" / name)
    return {"root": root, "one": one, "two": two, "site": site, "codes": codes,
            "procs": procs, "bench": mini_benchmark}  # fmt: skip


def audited_writes(log: Path) -> list[list[tuple[str, str]]]:
    """The writes under --out that each torchrun worker made, by rank."""
    return [json.loads((log / f"rank{r}.json").read_text()) for r in range(WORLD)]


def reports(out: Path, name: str) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((out / "news" / name).glob("*/report.json"))]


def csv_run_ids(out: Path) -> list[str]:
    with open(out / "leaderboard" / "news.csv", newline="") as fh:
        return [row["run_id"] for row in csv.DictReader(fh)]


def files(out: Path) -> set[str]:
    return {str(p.relative_to(out)) for p in out.rglob("*")}


def assert_close(got: Any, want: Any, rtol: float, where: str = "") -> None:
    """Equal structures; floats within `rtol` (relative), everything else exactly."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for key in want:
            assert_close(got[key], want[key], rtol, f"{where}/{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_close(g, w, rtol, f"{where}[{i}]")
    elif isinstance(want, float) and isinstance(got, float):
        assert got == pytest.approx(want, rel=rtol, abs=1e-12), where
    else:
        assert got == want, where


def assert_same_examples(got: dict, want: dict, score_rtol: float, where: str) -> None:
    """Generations (and their ROUGE scores) identical; per-document MIA scores close."""
    assert got.keys() == want.keys(), where
    for metric in want:
        rtol = score_rtol if metric == "privleak" else 0.0
        assert_close(got[metric], want[metric], rtol, f"{where}:{metric}")


# ----------------------------------------------------------------------------- end to end


def test_two_processes_run_like_one(runs):
    one, two = runs["one"], runs["two"]
    for name, proc in runs["procs"].items():
        assert runs["codes"][name] == 0, name
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        # the summary is printed once, by the main process
        assert proc.stdout.count("report: ") == 1, proc.stdout

    assert files(two) == files(one)
    for out in (one, two):
        ids = csv_run_ids(out)
        assert len(ids) == len(set(ids)) == 2 + len(COMMANDS), ids  # + target, retrain

    for name in COMMANDS:
        (want,), (got,) = reports(one, name), reports(two, name)
        assert got.keys() == want.keys()
        assert got["selected"] == want["selected"], name
        assert got.get("curve") == want.get("curve"), name
        assert (
            want["manifest"]["device"]["world_size"],
            got["manifest"]["device"]["world_size"],
        ) == (1, 2)
        compared = {k: v for k, v in want.items() if k not in UNCOMPARED}
        assert_close({k: got[k] for k in compared}, compared, REPORT_RTOL, name)
        # the ROUGE metrics exactly; privleak through the AUCs above
        for metric in ("verbmem_f", "knowmem_f", "knowmem_r"):
            assert got["metrics"][metric] == want["metrics"][metric], (name, metric)

    for path in sorted(one.rglob("examples/*.json")):
        name = path.relative_to(one).parts[1]
        got = json.loads((two / path.relative_to(one)).read_text())
        assert_same_examples(got, json.loads(path.read_text()), SCORE_RTOL.get(name, 1e-6), name)


def test_only_the_main_process_writes(runs):
    for name in COMMANDS:
        main_writes, other_writes = audited_writes(runs["root"] / "log" / name)
        assert any(path.endswith("report.json") for _, path in main_writes), "no audit log?"
        assert other_writes == [], (name, other_writes[:10])


def test_a_sharded_fsdp_run_ends_like_one_process(runs):
    """`muse run --algo npo -P fsdp=true` under torchrun: the model is sharded over the two
    processes for training and evaluated through the loop's plain copy; it selects the
    same epoch with the same metrics as the one-process npo run (at the tolerances above:
    NPO averages over sequences, so only float order differs)."""
    out = runs["root"] / "fsdp"
    args = muse_args("npo", runs["bench"], out) + ["-P", "fsdp=true"]
    proc = torchrun(args, runs["site"], runs["root"] / "log-fsdp")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (want,), (got,) = reports(runs["one"], "npo"), reports(out, "npo")
    assert got["params"]["fsdp"] is True and want["params"]["fsdp"] is False
    assert (got["selected"], got["curve"]) == (want["selected"], want["curve"])
    for metric in ("verbmem_f", "knowmem_f", "knowmem_r"):
        assert got["metrics"][metric] == want["metrics"][metric], metric
    assert_close(got["attacks"], want["attacks"], REPORT_RTOL, "attacks")
    main_writes, other_writes = audited_writes(runs["root"] / "log-fsdp")
    assert main_writes and other_writes == []


def test_a_locked_run_stops_every_process(runs):
    """The main process takes the run's lock for all; when it cannot, all stop at once."""
    out = runs["two"]
    (report,) = reports(out, "ga")
    lock = out / "news" / "ga" / f".{report['run_id']}.lock"
    with try_lock(lock, "the test"):
        proc = torchrun(muse_args("ga", runs["bench"], out), runs["site"], runs["root"] / "lock")
    assert proc.returncode != 0
    assert "is in progress in another process" in proc.stderr, proc.stderr[-3000:]


# ----------------------------------------------------------------------------- unit


@dataclass(frozen=True)
class ThreadProcesses(Processes):
    """A rank of a world of threads: `gather` exchanges objects through a shared board
    (what all_gather_object does between processes)."""

    board: Any = None  # (threading.Barrier, slots)

    def gather(self, obj: Any) -> list[Any]:
        barrier, slots = self.board
        slots[self.rank] = obj
        barrier.wait()
        out = list(slots)
        barrier.wait()  # nobody overwrites a slot before everyone has read them all
        return out


class RecordingEngine:
    """Answers from the input text alone, and records what it was asked."""

    supports_stats = True
    tokenizer = "the tokenizer"

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def generate(self, prompts, max_new_tokens, *, stop=(), desc=None):
        assert prompts, "called with no prompts"
        self.calls.append(("generate", list(prompts), max_new_tokens, tuple(stop), desc))
        return [f"{p}->{max_new_tokens}" for p in prompts]

    def token_logprobs(self, texts, with_stats=False, *, desc=None):
        assert texts, "called with no texts"
        self.calls.append(("token_logprobs", list(texts), with_stats, desc))
        return [TokenScores(np.full(len(t), -1.0)) for t in texts]


def in_threads(world: int, fn) -> list[Any]:
    """`fn(rank_processes, engine)` for every rank of a world of threads."""
    board = (threading.Barrier(world, timeout=10), [None] * world)
    engines = [RecordingEngine() for _ in range(world)]
    with ThreadPoolExecutor(world) as pool:
        futures = [
            pool.submit(fn, ThreadProcesses(r, world, board), engines[r]) for r in range(world)
        ]
        return [(f.result(), engines[r].calls) for r, f in enumerate(futures)]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("n", [0, 1, 2, 7])
def test_sharded_engine_returns_every_input_in_order_on_every_rank(world, n):
    items = [f"text {i} " + "x" * i for i in range(n)]

    def generate(procs, inner):
        return ShardedEngine(inner, procs).generate(items, 5, stop=("\n",), desc="bar")

    for rank, (result, calls) in enumerate(in_threads(world, generate)):
        assert result == [f"{t}->5" for t in items]
        start, stop = Processes(rank, world).share(n)
        # its own contiguous share only, never an empty call; a bar on the main rank only
        want = [("generate", items[start:stop], 5, ("\n",), "bar" if rank == 0 else None)]
        assert calls == (want if stop > start else [])

    def score(procs, inner):
        return ShardedEngine(inner, procs).token_logprobs(items, True, desc="bar")

    for result, _ in in_threads(world, score):
        assert [s.n_tokens for s in result] == [len(t) for t in items]


def test_one_process_needs_no_sharding_nor_process_group():
    inner = RecordingEngine()
    assert shard(inner, Processes()) is inner
    wrapped = shard(inner, Processes(1, 2))
    assert isinstance(wrapped, ShardedEngine)
    assert wrapped.tokenizer == "the tokenizer" and wrapped.supports_stats
    assert on_main(lambda: 42, Processes()) == 42
    assert main_only(print, Processes()) is print
    assert main_only(print, Processes(1, 2)) is not print


def test_each_process_uses_its_own_gpu(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert local_device(cuda) == cuda
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert local_device(cuda) == torch.device("cuda", 1)
    assert local_device(torch.device("cuda", 0)) == torch.device("cuda", 0)  # as asked
    assert local_device(torch.device("cpu")) == torch.device("cpu")
