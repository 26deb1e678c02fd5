"""C2 KnowMem / C4 utility: few-shot question answering scored by ROUGE-L."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from muse_bench.core.types import QAPair
from muse_bench.engines.base import Engine
from muse_bench.metrics.rouge import RougeResult, mean_x100, rouge_l_f1_many

KNOWMEM_MAX_NEW_TOKENS = 32
STOP_STRINGS = ("\n\n", "\nQuestion", "Question:")


def icl_prefix(icl: Sequence[QAPair]) -> str:
    """The few-shot prefix: 'Question: {q}\\nAnswer: {a}\\n\\n' for every ICL pair."""
    return "".join(f"Question: {p.question}\nAnswer: {p.answer}\n\n" for p in icl)


def knowmem_prompt(prefix: str, question: str) -> str:
    """The full prompt for one question after the few-shot prefix."""
    return f"{prefix}Question: {question}\nAnswer: "


def cut_answer(output: str, stops: Sequence[str] = STOP_STRINGS) -> str:
    """`output` up to the earliest stop string (whichever occurs first), stripped."""
    end = min((i for i in (output.find(s) for s in stops) if i >= 0), default=len(output))
    return output[:end].strip()


def eval_knowmem(
    engine: Engine,
    qa: Sequence[QAPair],
    icl: Sequence[QAPair],
    *,
    max_new_tokens: int = KNOWMEM_MAX_NEW_TOKENS,
    desc: str | None = None,
) -> RougeResult:
    """ROUGE-L F1 between each greedy answer (cut at a stop string) and the true answer.

    `value` is the mean ×100; each record holds id, question, answer, generation (cut) and
    score (×100).
    """
    prefix = icl_prefix(icl)
    outputs = engine.generate(
        [knowmem_prompt(prefix, p.question) for p in qa],
        max_new_tokens,
        stop=STOP_STRINGS,
        desc=desc,
    )
    answers = [cut_answer(o) for o in outputs]
    scores = rouge_l_f1_many(answers, [p.answer for p in qa])
    records = [
        {"id": i, "question": p.question, "answer": p.answer, "generation": a, "score": s * 100}
        for i, (p, a, s) in enumerate(zip(qa, answers, scores, strict=True))
    ]
    return RougeResult(mean_x100(scores), np.asarray(scores) * 100, records)
