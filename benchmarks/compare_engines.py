"""Evaluate one model with several engines and compare what they produce (hf against vllm).

For each engine: the wall time of a full `evaluate` (after one untimed warm-up call of each
engine), the four metrics, and against the first engine: how many verbmem / knowmem
generations are identical, and the largest difference of a document's attack score.
Meant for a GPU machine with vLLM installed (`pip install -e '.[vllm]'`):

    python benchmarks/compare_engines.py --engines hf,vllm --device cuda
    python benchmarks/compare_engines.py --engines hf,hf --device cpu   # the script itself

The default model is the embedded news target; `--model DIR --data DIR` compare on any
model and MUSE-layout corpus. Engines run in their own precision (vLLM serves bf16 where
the checkpoint says so), so small score differences are expected; generations are the
comparison that matters for verbmem and knowmem.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from muse_bench.core.errors import MuseError  # noqa: E402
from muse_bench.core.types import RetrainAUC  # noqa: E402

ATTACK = "min_k_40"  # available on every engine (Min-K%++ needs the full distribution)
RETRAIN = RetrainAUC(0.5, ATTACK, {"source": "placeholder: engines are compared, not models"})


def generations(result: Any, metric: str) -> list[str]:
    return [record["generation"] for record in result.examples[metric]]


def attack_scores(result: Any) -> dict[tuple[str, int], dict[str, float]]:
    return {(d["split"], d["id"]): d for d in result.examples["privleak"]}


def compare(first: Any, other: Any) -> str:
    """How `other`'s outputs agree with `first`'s, in one line."""
    parts = []
    for metric in ("verbmem_f", "knowmem_f", "knowmem_r"):
        a, b = generations(first, metric), generations(other, metric)
        same = sum(x == y for x, y in zip(a, b, strict=True))
        parts.append(f"{metric} generations identical {same}/{len(a)}")
    ours, theirs = attack_scores(first), attack_scores(other)
    shared = sorted(set(ours[next(iter(ours))]) & set(theirs[next(iter(theirs))]) - {"split", "id"})
    worst = max(abs(ours[k][a] - theirs[k][a]) for k in ours for a in shared)
    parts.append(f"largest attack-score difference {worst:.2e} over {len(shared)} attacks")
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default="hf,vllm", help="comma-separated (default hf,vllm)")
    parser.add_argument("--corpus", default="news")
    parser.add_argument("--model", help="model directory (default: the embedded target)")
    parser.add_argument("--data", help="a MUSE-layout directory (default: the embedded corpus)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)

    from muse_bench.data import embedded_models_dir, load_corpus, load_corpus_dir
    from muse_bench.engines import make_engine
    from muse_bench.metrics import evaluate

    try:
        corpus = load_corpus_dir(args.corpus, args.data) if args.data else load_corpus(args.corpus)
        model = args.model or str(embedded_models_dir(args.corpus) / "target")
        if not os.path.isdir(model):
            raise MuseError(f"model directory '{model}' does not exist.")
        names = [n.strip() for n in args.engines.split(",") if n.strip()]
        results = []
        for name in names:
            engine = make_engine(
                name, model_path=model, device=args.device, batch_size=args.batch_size
            )
            evaluate(engine, corpus, RETRAIN, attack=ATTACK, n_bootstrap=10, progress=False)
            start = time.perf_counter()
            result = evaluate(engine, corpus, RETRAIN, attack=ATTACK, progress=False)
            seconds = time.perf_counter() - start
            metrics = {k: round(v, 2) for k, v in result.metrics.items()}
            print(f"{name}: {seconds:.2f} s, {metrics}")
            results.append(result)
    except MuseError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, result in zip(names[1:], results[1:], strict=True):
        print(f"{name} against {names[0]}: {compare(results[0], result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
