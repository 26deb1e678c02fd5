"""The robustness stage of `muse run` and `muse eval`: every requested check applied to
the evaluated model and, as references, to the target and the retrain model.

The references do not depend on the unlearner: each (benchmark, check, settings, model)
is computed once and cached under `OUT/.cache/robustness/` with its provenance, as the
retrain AUC is. The checks of one model are written one file each
(`<dir>/robustness/<check>.json`) as they finish, so a killed run redoes only the check it
was in, and the same command again gives the same section.

Checks always evaluate with the hf engine: the extra metrics (ES, EM, GradNorm) and the
attacks themselves need the torch model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from muse_bench import __version__
from muse_bench.core.distributed import on_main
from muse_bench.core.io import atomic_write_json
from muse_bench.core.types import RetrainAUC
from muse_bench.robustness.checks import Check, apply_check, make_check, scoring_corpus
from muse_bench.robustness.derived import quant_numbers, relearn_numbers
from muse_bench.runner.config import RunConfig, run_device
from muse_bench.runner.records import read_json, short_hash
from muse_bench.task import Task, local_model_dir, model_fingerprint

REFERENCES = ("target", "retrain")
#: What of an evaluation a check keeps.
KEPT = ("metrics", "ci", "extra")


def _engine(model, tokenizer, cfg: RunConfig, device: str):
    from muse_bench.engines import make_engine
    from muse_bench.engines.sharded import shard

    return shard(
        make_engine(
            "hf", model=model, tokenizer=tokenizer, device=device, batch_size=cfg.batch_size
        )
    )


def _forget_scores(engine, corpus) -> dict[str, float]:
    """VerbMem_f and KnowMem_f alone (the held-out items' numbers before an attack)."""
    from muse_bench.metrics.knowmem import eval_knowmem
    from muse_bench.metrics.verbmem import eval_verbmem

    return {
        "verbmem_f": eval_verbmem(engine, corpus.verbmem_forget).value,
        "knowmem_f": eval_knowmem(engine, corpus.forget_qa, corpus.forget_qa_icl).value,
    }


def attack_and_evaluate(
    cfg: RunConfig,
    task: Task,
    rauc: RetrainAUC,
    check: Check,
    model,
    tokenizer,
    before: dict[str, Any],
) -> dict[str, Any]:
    """Attack `model` with `check` and evaluate it; `before` is the model's evaluation
    (metrics) on the whole corpus, narrowed here to the check's scored items."""
    from muse_bench.metrics.evaluate import evaluate

    device = run_device(cfg.device)
    corpus, split = scoring_corpus(check, task.corpus)
    before = dict(before)
    if split is not None:  # the un-attacked model on the held-out items
        before |= _forget_scores(_engine(model, tokenizer, cfg, device), corpus)
    start = time.time()
    model, info = apply_check(check, model, tokenizer, task.corpus, device, cfg.progress)
    attack_s = time.time() - start
    result = evaluate(
        _engine(model, tokenizer, cfg, device),
        corpus,
        rauc,
        attack=cfg.attack,
        seed=cfg.seed,
        n_bootstrap=cfg.n_bootstrap,
        progress=cfg.progress,
    ).to_dict()
    return {
        **{k: result[k] for k in KEPT},
        "before": before,
        "attack": info,
        **({"scored": split} if split is not None else {}),
        "timings": {"attack_s": round(attack_s, 2), "total_s": round(time.time() - start, 2)},
    }


def _load(spec: str, cfg: RunConfig):
    from muse_bench.core.models import load_model_and_tokenizer

    return load_model_and_tokenizer(
        local_model_dir(spec),
        run_device(cfg.device),
        None,
        cfg.allow_pickle,
        cfg.trust_remote_code,
    )


def reference_check(
    cfg: RunConfig,
    task: Task,
    rauc: RetrainAUC,
    check: Check,
    which: str,
    before: dict[str, Any],
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The check applied to the target or retrain model (cached with provenance)."""
    spec = getattr(task.models, which)
    fingerprint = model_fingerprint(local_model_dir(spec))
    identity = {
        "benchmark": task.corpus.benchmark_id,
        "model": fingerprint,
        "check": check.name,
        "settings": check.settings(),
        "attack": cfg.attack,
        "seed": cfg.seed,
        "n_bootstrap": cfg.n_bootstrap,
        "retrain_auc": rauc.auc,
        "harness_version": __version__,
    }
    path = cfg.out / ".cache" / "robustness" / f"{which}-{check.name}-{short_hash(identity)}.json"
    cached = on_main(lambda: read_json(path))
    if cached is not None:
        return cached
    echo(f"robustness {check.name}: attacking the {which} model (reference, cached once)")
    model, tok = _load(spec, cfg)
    if check.is_quant and which == "retrain":
        from muse_bench.robustness.quantize import code_agreement

        target, _ = _load(task.models.target, cfg)
        agreement = code_agreement(model, target, check.scheme)  # type: ignore[arg-type]
        del target
    else:
        agreement = None
    entry = {
        **attack_and_evaluate(cfg, task, rauc, check, model, tok, before),
        "code_agreement": agreement,
        "provenance": {"model": spec, **identity},
    }
    on_main(lambda: atomic_write_json(path, entry))
    return entry


def _agreement(unl_model, cfg: RunConfig, task: Task, check: Check) -> float | None:
    """Code agreement of the unlearned model with the target (None where the two do not
    share an architecture, e.g. a WHP pair of models)."""
    from muse_bench.core.errors import ConfigError
    from muse_bench.robustness.quantize import code_agreement

    target, _ = _load(task.models.target, cfg)
    try:
        return code_agreement(unl_model, target, check.scheme)  # type: ignore[arg-type]
    except ConfigError:
        return None


def run_check(
    cfg: RunConfig,
    task: Task,
    rauc: RetrainAUC,
    check: Check,
    model_path: str,
    before: dict[str, Any],
    refs: dict[str, dict[str, Any]],
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """One check: the model at `model_path` attacked and evaluated, the references, and
    the derived numbers."""
    from muse_bench.unlearners import load_unlearned

    references = {
        which: reference_check(cfg, task, rauc, check, which, refs[which]["metrics"], echo)
        for which in REFERENCES
    }
    echo(f"robustness {check.name}: attacking the evaluated model")
    model, tok = load_unlearned(model_path, run_device(cfg.device))
    agreement = _agreement(model, cfg, task, check) if check.is_quant else None
    mine = attack_and_evaluate(cfg, task, rauc, check, model, tok, before)
    ref_after = {w: references[w]["metrics"] for w in REFERENCES}
    if check.is_quant:
        derived = quant_numbers(mine["before"], mine["metrics"], *ref_after.values())
        derived["code_agreement"] = agreement
        derived["retrain_code_agreement"] = references["retrain"]["code_agreement"]
    else:
        derived = relearn_numbers(
            mine["before"],
            mine["metrics"],
            references["retrain"]["before"],
            ref_after["retrain"],
            references["target"]["before"],
        )
    return {
        "check": check.name,
        "settings": check.settings(),
        **mine,
        "reference": {
            w: {k: references[w][k] for k in ("metrics", "before", "extra", "attack", "provenance")}
            for w in REFERENCES
        },
        "derived": derived,
    }


def robustness_section(
    cfg: RunConfig,
    task: Task,
    rauc: RetrainAUC,
    names: Sequence[str],
    model_path: str,
    before: dict[str, Any],
    refs: dict[str, dict[str, Any]],
    work_dir: Path,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Every check of `names` on the model at `model_path`: {check: result}. A check whose
    result file exists in `work_dir/robustness/` is read back, not redone; each new one
    is written there before the next starts."""
    section: dict[str, Any] = {}
    for name in names:
        path = work_dir / "robustness" / f"{name}.json"
        done = on_main(lambda p=path: read_json(p))
        if done is None:
            check = make_check(name, task.source, task.corpus, cfg.seed)
            done = run_check(cfg, task, rauc, check, model_path, before, refs, echo)
            on_main(lambda p=path, d=done: atomic_write_json(p, d))
        section[name] = done
    return section


def resolve_checks(cfg: RunConfig, task: Task) -> tuple[Check, ...]:
    """Every check the run asks for, resolved (and refused in one line when one cannot run
    on this corpus), before any file is written."""
    from muse_bench.robustness.checks import parse_checks

    names = parse_checks(cfg.robustness, task.source)
    return tuple(make_check(n, task.source, task.corpus, cfg.seed) for n in names)
