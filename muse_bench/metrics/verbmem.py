"""C1 VerbMem: how much of the forget set the model reproduces verbatim."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from muse_bench.core.types import VerbMemPair
from muse_bench.engines.base import DECODE_KWARGS, Engine
from muse_bench.metrics.rouge import RougeResult, mean_x100, rouge_l_f1_many

VERBMEM_MAX_NEW_TOKENS = 128


def truncate_gt(tokenizer: Any, gt: str, max_tokens: int = VERBMEM_MAX_NEW_TOKENS) -> str:
    """The first `max_tokens` tokens of `gt` (tokenized without special tokens), decoded.

    MUSE's released code tokenizes `gt` with BOS and keeps 128 ids, so its references are
    one token shorter; this follows SPEC §3 (128 tokens of text).
    """
    ids = tokenizer(gt, add_special_tokens=False)["input_ids"][:max_tokens]
    return tokenizer.decode(ids, **DECODE_KWARGS)


def eval_verbmem(
    engine: Engine,
    pairs: Sequence[VerbMemPair],
    *,
    max_new_tokens: int = VERBMEM_MAX_NEW_TOKENS,
    desc: str | None = None,
) -> RougeResult:
    """ROUGE-L F1 between each prompt's greedy continuation and its truncated true text.

    `value` is the mean ×100; each record holds id, prompt, generation, gt (truncated) and
    score (×100).
    """
    generations = engine.generate([p.prompt for p in pairs], max_new_tokens, desc=desc)
    gts = [truncate_gt(engine.tokenizer, p.gt, max_new_tokens) for p in pairs]
    scores = rouge_l_f1_many(generations, gts)
    records = [
        {"id": i, "prompt": p.prompt, "generation": g, "gt": t, "score": s * 100}
        for i, (p, g, t, s) in enumerate(zip(pairs, generations, gts, scores, strict=True))
    ]
    return RougeResult(mean_x100(scores), np.asarray(scores) * 100, records)
