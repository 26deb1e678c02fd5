"""How much of knowmem survives rewording? Target knowmem on the benchmark's questions
(the wording of the documents' question boxes) vs the same facts asked in other words.

    .venv/bin/python benchmarks/knowmem_paraphrase.py [--corpus news] [--model target]
"""

from __future__ import annotations

import argparse

from muse_bench.core.models import load_model_and_tokenizer
from muse_bench.core.types import QAPair
from muse_bench.data import embedded_models_dir, load_corpus
from muse_bench.engines import make_engine
from muse_bench.metrics.knowmem import eval_knowmem
from muse_bench.tasks.worldgen import RECIPES, build_corpus


def qa(items: list[dict]) -> list[QAPair]:
    return [QAPair(x["question"], x["answer"]) for x in items]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--corpus", default="news", choices=sorted(RECIPES))
    ap.add_argument("--model", default="target", help="target, retrain or a model directory")
    args = ap.parse_args()
    path = (
        embedded_models_dir(args.corpus) / args.model
        if args.model in ("target", "retrain")
        else args.model
    )
    model, tok = load_model_and_tokenizer(path, "cpu")
    engine = make_engine("hf", model=model, tokenizer=tok, batch_size=32)
    corpus = load_corpus(args.corpus)
    para = build_corpus(RECIPES[args.corpus], paraphrase=True)
    print(f"{args.corpus} {args.model}")
    for split, icl in (("forget", corpus.forget_qa_icl), ("retain", corpus.retain_qa_icl)):
        plain = eval_knowmem(engine, getattr(corpus, f"{split}_qa"), icl).value
        reworded = eval_knowmem(engine, qa(para[f"knowmem/{split}_qa.json"]), icl).value
        print(f"  knowmem_{split[0]}: trained wording {plain:.1f}, other wording {reworded:.1f}")


if __name__ == "__main__":
    main()
