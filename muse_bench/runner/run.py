"""`muse run` and `muse eval`: unlearn, select, evaluate, write the report and the row.

Every stage leaves its result on disk before the next starts, so running the same
command again after an interruption continues where it stopped, and a finished run is
not redone (unless forced) and never adds a second leaderboard row.

Launched as several processes (`accelerate launch`, `torchrun`), the processes train
together (see `muse_bench.training.loop`), split every evaluation (`muse_bench.engines.sharded`)
and so all compute the same metrics; only the main process writes files, and it reads the
files that decide what to do next for all of them (`muse_bench.core.distributed.on_main`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import platform
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from muse_bench import __version__
from muse_bench.core.distributed import (
    held_by_main,
    local_device,
    main_only,
    on_main,
    start_processes,
)
from muse_bench.core.errors import ConfigError
from muse_bench.core.io import (
    atomic_write_json,
    check_writable_dir,
    try_lock,
)
from muse_bench.core.models import (
    check_checkpoint_dir,
    load_model_and_tokenizer,
    resolve_device,
    save_model,
)
from muse_bench.core.types import ForgetRequest, RetrainAUC
from muse_bench.engines import make_engine
from muse_bench.engines.sharded import shard
from muse_bench.protocols import requests as protocol_requests
from muse_bench.runner.references import open_engine, retrain_auc
from muse_bench.task import Task, local_model_dir, model_fingerprint, resolve_task

SELECT_MODES = ("first", "last")


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run (the identity fields) and how to execute it."""

    algo: str
    corpus: str
    source: str = "embedded"
    protocol: str = "single"
    params: tuple[str, ...] = ()
    seed: int = 0
    select: str = "first"
    attack: str = "min_k_40"
    out: Path = Path("runs")
    device: str = "auto"
    engine: str = "hf"
    name: str | None = None
    target: str | None = None
    retrain: str | None = None
    batch_size: int = 32
    n_bootstrap: int = 1000
    force: bool = False
    allow_pickle: bool = False
    trust_remote_code: bool = False
    progress: bool = True
    hub_source: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def versions() -> dict[str, str]:
    """Versions of the harness and its main libraries, for the report."""
    import importlib.metadata as md

    out = {"muse_bench": __version__, "python": platform.python_version()}
    for pkg in (
        "torch",
        "transformers",
        "tokenizers",
        "accelerate",
        "peft",
        "rouge-score",
        "scikit-learn",
        "numpy",
        "vllm",
    ):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def short_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def leaderboard_path(out: Path, corpus: str) -> Path:
    return out / "leaderboard" / f"{corpus}.csv"


def publish(report: dict[str, Any], out: Path, replace: bool = False) -> Path:
    """Append the report's row to OUT/leaderboard/<corpus>.csv (idempotent by run id).

    `replace` (a --force redo) swaps an existing row of the same run id for the new one,
    in place, so the file never holds two rows of one run nor a stale one.
    """
    from muse_bench.leaderboard.rows import append_row, row_from_report

    path = leaderboard_path(out, report["corpus"])
    append_row(path, row_from_report(report), replace=replace)
    return path


def reuse_report(path: Path, out: Path) -> dict[str, Any] | None:
    """The report of a finished run, its leaderboard row published again (idempotent), or
    None when the run has not finished."""
    report = read_json(path)
    if report is not None:
        publish(report, out)
    return report


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file's content, or None if it is absent or unreadable (then the stage
    that writes it is redone: a truncated file, a foreign one, an empty one)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError, ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


# --------------------------------------------------------------------------- checks
# Everything a user can get wrong is checked before the first file is written.


def check_engine(engine: str, device: str) -> Any:
    """The engine class for `engine`, refused early if it cannot run here."""
    from muse_bench.engines import ENGINES

    cls = ENGINES.get(engine)
    if engine == "vllm":
        from muse_bench.engines.vllm import VLLM_MISSING

        if importlib.util.find_spec("vllm") is None:
            raise ConfigError(VLLM_MISSING)
        if not device.startswith("cuda"):
            raise ConfigError("--engine vllm runs on a GPU only; use --engine hf on CPU.")
    return cls


def run_device(spec: str) -> str:
    """The device `--device spec` means for this process (its own GPU when launched as
    several processes)."""
    return str(local_device(resolve_device(spec)))


def check_config(cfg: RunConfig) -> str:
    """Validate the settings shared by `muse run` and `muse eval`; returns the device."""
    from muse_bench.metrics.mia import check_attack

    if cfg.select not in SELECT_MODES:
        raise ConfigError(f"--select must be one of {', '.join(SELECT_MODES)}, not '{cfg.select}'.")
    if cfg.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {cfg.batch_size}.")
    if cfg.n_bootstrap < 1:
        raise ConfigError(f"--bootstrap must be >= 1 resample, got {cfg.n_bootstrap}.")
    if cfg.seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {cfg.seed}.")
    device = run_device(cfg.device)
    engine = check_engine(cfg.engine, device)
    check_attack(cfg.attack, with_stats=getattr(engine, "supports_stats", True), with_ref=False)
    return device


def check_model(spec: str, cfg: RunConfig) -> Path:
    """A local checkpoint directory for `spec` that can be loaded safely (weights + tokenizer)."""
    return check_checkpoint_dir(local_model_dir(spec), cfg.allow_pickle, need_tokenizer=True)


def safe_dir_name(label: str) -> str:
    """`label` as one harmless path component (no separators, no leading dot)."""
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", label).strip("._") or "model"


# --------------------------------------------------------------------------- evaluation


def _evaluate(engine, task: Task, rauc: RetrainAUC, cfg: RunConfig):
    from muse_bench.metrics.evaluate import evaluate

    return evaluate(
        engine,
        task.corpus,
        rauc,
        attack=cfg.attack,
        seed=cfg.seed,
        n_bootstrap=cfg.n_bootstrap,
        progress=cfg.progress,
    )


def _write_examples(run_dir: Path, label: str, result) -> Path:
    path = run_dir / "examples" / f"{label}.json"
    atomic_write_json(path, result.to_dict()["examples"])
    return path


def _eval_payload(result) -> dict[str, Any]:
    d = result.to_dict()
    return {k: d[k] for k in ("metrics", "ci", "attack", "attacks", "retrain_auc", "bootstrap")}


def eval_checkpoint(
    cfg: RunConfig,
    task: Task,
    model_spec: str,
    name: str,
    rauc: RetrainAUC,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Evaluate one checkpoint (`muse eval`); cached by benchmark, weights and settings."""
    path = check_model(model_spec, cfg)
    identity = {
        "benchmark": task.corpus.benchmark_id,
        "model": model_fingerprint(path),
        "attack": cfg.attack,
        "seed": cfg.seed,
        "n_bootstrap": cfg.n_bootstrap,
        "retrain_auc": rauc.auc,
    }
    dir_name = safe_dir_name(name)
    run_id = f"{dir_name}-{short_hash(identity)}"
    run_dir = cfg.out / task.corpus.name / dir_name / run_id
    report_path = run_dir / "report.json"
    report = None if cfg.force else on_main(lambda: reuse_report(report_path, cfg.out))
    if report is not None:
        return report
    start = time.time()
    device = run_device(cfg.device)
    engine, _ = open_engine(
        str(path), cfg.engine, device, cfg.batch_size, cfg.allow_pickle, cfg.trust_remote_code
    )
    echo(f"evaluating {name} ({model_spec})")
    result = _evaluate(engine, task, rauc, cfg)

    def save() -> dict[str, Any]:
        """Write the examples, report and leaderboard row (main process only)."""
        _write_examples(run_dir, "eval", result)
        report = {
            "name": name,
            "run_id": run_id,
            "benchmark": task.corpus.benchmark_id,
            "corpus": task.corpus.name,
            "algo": name if name in ("target", "retrain") else "eval",
            "params": {},
            "protocol": "eval",
            "seed": cfg.seed,
            "selected": None,
            "model": str(path),
            "data_dir": str(task.corpus.data_dir),
            "engine": cfg.engine,
            "device": device,
            **_eval_payload(result),
            "scale": None,
            "sustain": None,
            "versions": versions(),
            "created": now_iso(),
            "timings": {"total_s": round(time.time() - start, 2)},
        }
        atomic_write_json(report_path, report)
        publish(report, cfg.out, replace=cfg.force)
        return report

    return on_main(save)


def reference_reports(
    cfg: RunConfig, task: Task, rauc: RetrainAUC, echo: Callable[[str], None] = print
) -> dict[str, dict[str, Any]]:
    """The target's and the retrain model's evaluations (cached; rows published once)."""
    return {
        which: eval_checkpoint(cfg, task, getattr(task.models, which), which, rauc, echo)
        for which in ("target", "retrain")
    }


# --------------------------------------------------------------------------- unlearning


def select_candidate(
    candidates: Iterator,
    score: Callable[[Any], float],
    threshold: float,
    mode: str,
    cached: dict[str, float],
) -> tuple[Any, list[dict[str, Any]]]:
    """MUSE's model selection: the first candidate whose knowmem_f <= threshold, else the last.

    `mode="last"` turns selection off (the last candidate). `cached` maps labels to scores
    already measured (resume); new scores are added to it.
    """
    chosen, curve = None, []
    for cand in candidates:
        value = cached[cand.label] if cand.label in cached else score(cand)
        cached[cand.label] = value
        curve.append({"label": cand.label, "step": cand.step, "knowmem_f": value})
        chosen = cand
        if mode == "first" and value <= threshold:
            break
    if chosen is None:
        raise ConfigError("the unlearner produced no model (zero epochs or an empty sweep?).")
    return chosen, curve


def fold_tokens(tokenizer, docs: tuple[str, ...]) -> int:
    return len(tokenizer("\n\n".join(docs), add_special_tokens=False)["input_ids"])


class Run:
    """One `muse run`: owns its directory, its requests and its report.

    In a launch of several processes every process makes its own `Run` and executes it;
    they evaluate together, and the main process alone writes and prints.
    """

    def __init__(self, cfg: RunConfig, echo: Callable[[str], None] = print) -> None:
        from muse_bench.unlearners import get_unlearner_class, parse_params, read_model_config

        # Every check comes before the first file is written: a bad command changes nothing.
        self.device = check_config(cfg)
        self.procs = start_processes(self.device)
        self.cfg, self.echo = cfg, main_only(echo, self.procs)
        self.task = resolve_task(cfg.corpus, cfg.source, cfg.target, cfg.retrain, cfg.hub_source)
        self.requests = protocol_requests(cfg.protocol, self.task.corpus)
        self.cls = get_unlearner_class(cfg.algo)
        defaults = self.cls.defaults_for(self.task.corpus.benchmark_id)
        self.params = {**defaults, **parse_params(self.cls, list(cfg.params))}
        self.unlearner = self.cls(**self.params)
        self.unlearner.validate()
        # the class's own registered name (a plugin subclass of npo is not "npo")
        self.algo_name = self.cls.name()
        for which in ("target", "retrain"):
            check_model(getattr(self.task.models, which), cfg)
        # checks of hyperparameters against the model's shape (RMU's layer), before any work
        self.unlearner.check_model(read_model_config(local_model_dir(self.task.models.target)))
        resolved = asdict(self.unlearner)
        identity = {
            "benchmark": self.task.corpus.benchmark_id,
            "algo": self.algo_name,
            "params": resolved,
            "protocol": cfg.protocol,
            "seed": cfg.seed,
            "select": cfg.select,
            "attack": cfg.attack,
            "models": asdict(self.task.models),
        }
        self.resolved_params = resolved
        self.run_id = f"{self.algo_name}-{short_hash(identity)}"
        self.dir = cfg.out / self.task.corpus.name / safe_dir_name(self.algo_name) / self.run_id
        self.lock_path = self.dir.parent / f".{self.run_id}.lock"

    # -- helpers
    def _engine(self, model, tokenizer, label: str):
        """An engine on `model`, split over the processes when there are several."""
        if self.cfg.engine == "hf":
            engine = make_engine(
                "hf",
                model=model,
                tokenizer=tokenizer,
                device=self.device,
                batch_size=self.cfg.batch_size,
            )
        else:
            path = self.dir / "requests" / label / "engine_model"
            on_main(lambda: save_model(model, tokenizer, path), self.procs)
            engine = make_engine(
                self.cfg.engine,
                model_path=str(path),
                device=self.device,
                batch_size=self.cfg.batch_size,
            )
        return shard(engine, self.procs)

    def _context(self, req: ForgetRequest):
        from muse_bench.unlearners import UnlearnContext

        return UnlearnContext(
            device=self.device,
            seed=self.cfg.seed,
            work_dir=self.dir / "requests" / req.label / "ckpt",
            progress=self.cfg.progress,
        )

    def _load_start(self, req: ForgetRequest, previous: Path | None):
        from muse_bench.unlearners import load_unlearned

        if req.start == "previous" and previous is not None:
            return load_unlearned(previous, self.device)
        return load_model_and_tokenizer(
            local_model_dir(self.task.models.target),
            self.device,
            None,
            self.cfg.allow_pickle,
            self.cfg.trust_remote_code,
        )

    # -- one request
    def _request(
        self, req: ForgetRequest, previous: Path | None, threshold: float, rauc: RetrainAUC
    ) -> dict[str, Any]:
        from muse_bench.metrics.evaluate import evaluate_knowmem_f

        req_dir = self.dir / "requests" / req.label
        done = req_dir / "result.json"
        finished = on_main(lambda: self._finished_request(req_dir), self.procs)
        if finished is not None:
            return finished
        torch.manual_seed(self.cfg.seed)
        start = time.time()
        model, tok = self._load_start(req, previous)
        self.echo(f"[{req.label}] unlearning {len(req.forget)} documents with {self.algo_name}")
        curve_path = req_dir / "curve.json"
        cached = on_main(lambda: read_json(curve_path), self.procs) or {}

        def score(cand) -> float:
            value = evaluate_knowmem_f(self._engine(cand.model, tok, req.label), self.task.corpus)
            cached[cand.label] = value
            on_main(lambda: atomic_write_json(curve_path, cached), self.procs)
            self.echo(
                f"[{req.label}] {cand.label}: knowmem_f {value:.1f} (retrain {threshold:.1f})"
            )
            return value

        candidates = self.unlearner.candidates(model, tok, req, self._context(req))
        chosen, curve = select_candidate(candidates, score, threshold, self.cfg.select, cached)
        unlearn_s = time.time() - start
        result = _evaluate(self._engine(chosen.model, tok, req.label), self.task, rauc, self.cfg)

        def save() -> dict[str, Any]:
            """Write the examples, the chosen model and result.json (main process only)."""
            _write_examples(self.dir, req.label, result)
            keep_model = req.protocol == "single" or req.protocol == "sustain"
            model_path = save_model(chosen.model, tok, req_dir / "model") if keep_model else None
            out = {
                "label": req.label,
                "protocol": req.protocol,
                "fold": req.index,
                "docs": len(req.forget),
                "tokens": fold_tokens(tok, req.forget),
                "selected": chosen.label,
                "curve": curve,
                "model": str(model_path) if model_path else None,
                **_eval_payload(result),
                "timings": {
                    "unlearn_s": round(unlearn_s, 2),
                    "total_s": round(time.time() - start, 2),
                },
            }
            atomic_write_json(done, out)
            shutil.rmtree(req_dir / "ckpt", ignore_errors=True)
            shutil.rmtree(req_dir / "engine_model", ignore_errors=True)
            return out

        # the next sustain request loads the saved model: every process waits for it here
        return on_main(save, self.procs)

    @staticmethod
    def _finished_request(req_dir: Path) -> dict[str, Any] | None:
        """A finished request's result (its checkpoints removed, in case a killed run left
        them), or None if it has not finished."""
        finished = read_json(req_dir / "result.json")
        if finished is not None:
            shutil.rmtree(req_dir / "ckpt", ignore_errors=True)  # killed while cleaning up
        return finished

    def _remove_stale_temps(self) -> None:
        """Remove what a killed process was half-way through writing in the run directory:
        hidden temp files of atomic writes and hidden temp dirs of save_model. Safe: the
        caller holds the run's lock, so no other command writes here (and of a launch of
        several processes, only the main one writes)."""
        if not self.dir.is_dir():
            return
        for path in sorted(self.dir.rglob(".*"), key=lambda p: len(p.parts)):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)

    def _start_dir(self) -> None:
        """Empty the run directory for --force, remove stale temps, write config.json."""
        if self.cfg.force and self.dir.exists():
            shutil.rmtree(self.dir)
        self._remove_stale_temps()
        atomic_write_json(
            self.dir / "config.json",
            {
                "run_id": self.run_id,
                "algo": self.algo_name,
                "params": self.resolved_params,
                **{k: str(v) for k, v in asdict(self.cfg).items()},
            },
        )

    # -- the whole run
    def execute(self) -> dict[str, Any]:
        on_main(lambda: check_writable_dir(self.cfg.out), self.procs)
        # one command per run directory: a second identical command fails at once (in a
        # launch of several processes, the main one holds the lock for all of them)
        lock = functools.partial(try_lock, self.lock_path, f"run {self.run_id}")
        with held_by_main(lock, self.procs):
            return self._execute()

    def _execute(self) -> dict[str, Any]:
        cfg = self.cfg
        report_path = self.dir / "report.json"
        report = (
            None if cfg.force else on_main(lambda: reuse_report(report_path, cfg.out), self.procs)
        )
        if report is not None:
            self.echo(f"run {self.run_id} already finished; use --force to redo it.")
            return report
        started = time.time()
        on_main(self._start_dir, self.procs)
        rauc = retrain_auc(
            self.task,
            cfg.attack,
            cfg.out / ".cache",
            "hf",
            self.device,
            cfg.batch_size,
            progress=cfg.progress,
            allow_pickle=cfg.allow_pickle,
            trust_remote_code=cfg.trust_remote_code,
        )
        refs = reference_reports(cfg, self.task, rauc, self.echo)
        threshold = refs["retrain"]["metrics"]["knowmem_f"]
        results: dict[str, dict[str, Any]] = {}
        previous: Path | None = None
        for req in self.requests:
            # fold 1 of scale and sustain is the main request: reuse its result
            key = "single_1" if req.index == 1 and req.start == "target" else req.label
            if key not in results:
                results[key] = self._request(
                    ForgetRequest("single", 1, req.forget, req.retain)
                    if key == "single_1"
                    else req,
                    previous,
                    threshold,
                    rauc,
                )
            if req.protocol == "sustain":
                previous = Path(results[key]["model"])
            results[req.label] = results[key]
        main = results["single_1"]
        report = {
            "name": cfg.name or self.algo_name,
            "run_id": self.run_id,
            "benchmark": self.task.corpus.benchmark_id,
            "corpus": self.task.corpus.name,
            "algo": self.algo_name,
            "params": self.resolved_params,
            "protocol": cfg.protocol,
            "seed": cfg.seed,
            "select": cfg.select,
            "selected": main["selected"],
            "curve": main["curve"],
            "model": main["model"],
            "data_dir": str(self.task.corpus.data_dir),
            "source": cfg.source,
            "engine": cfg.engine,
            "device": self.device,
            **{
                k: main[k]
                for k in ("metrics", "ci", "attack", "attacks", "retrain_auc", "bootstrap")
            },
            "reference": {
                k: {"metrics": v["metrics"], "run_id": v["run_id"]} for k, v in refs.items()
            },
            "scale": self._folds(results, "scale"),
            "sustain": self._folds(results, "sustain"),
            "versions": versions(),
            "created": now_iso(),
            "timings": {
                "total_s": round(time.time() - started, 2),
                **{k: v["timings"] for k, v in results.items()},
            },
        }

        def save() -> dict[str, Any]:
            atomic_write_json(report_path, report)
            report["leaderboard"] = str(publish(report, cfg.out, replace=cfg.force))
            return report

        # every process returns the main process's report (its timings, its row's path)
        return on_main(save, self.procs)

    def _folds(
        self, results: dict[str, dict[str, Any]], protocol: str
    ) -> list[dict[str, Any]] | None:
        labels = [r.label for r in self.requests if r.protocol == protocol]
        if not labels:
            return None
        return [
            {
                "fold": results[lb]["fold"] if protocol != "sustain" else i,
                "docs": results[lb]["docs"],
                "tokens": results[lb]["tokens"],
                "selected": results[lb]["selected"],
                **results[lb]["metrics"],
            }
            for i, lb in enumerate(labels, 1)
        ]


def run(cfg: RunConfig, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run an unlearning experiment end to end; returns the report."""
    return Run(cfg, echo).execute()
