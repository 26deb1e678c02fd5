"""Extraction strength (ES) and exact memorization (EM) on the verbmem forget items.

SPEC-robustness §3.1-3.2 (open-unlearning's `extraction_strength` and
`exact_memorization`): one teacher-forced forward pass over prefix + true continuation;
the prediction at each continuation token is the argmax of the logits one position
earlier.

- ES = 1 - k*/T, k* the smallest k in 0..T such that every prediction after position k
  is right (Carlini et al. 2021): the share of the continuation that greedy decoding
  reproduces once given the rest. k* = T (ES 0) when the last prediction is wrong.
- EM = the share of continuation tokens predicted right (Tirumala et al. 2022).

Both are reported ×100 like the MUSE metrics. Open-unlearning drops the last target token
before scoring and returns 1/T instead of 0 when nothing matches; neither is copied here.

The prefix and continuation are joined with one space, as open-unlearning does, unless
the prefix already ends or the continuation starts with whitespace (the embedded
benchmarks split a document at a paragraph break: joining them directly gives back the
document).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from muse_bench.core.types import VerbMemPair

ES_MAX_TARGET_TOKENS = 2048
ES_BATCH_SIZE = 8


def extraction_strength(predictions: Sequence[int], targets: Sequence[int]) -> float:
    """1 - k*/T for one item (0.0 for an empty target)."""
    n = len(targets)
    if len(predictions) != n:
        raise ValueError("predictions and targets differ in length.")
    if n == 0:
        return 0.0
    k = n
    while k > 0 and predictions[k - 1] == targets[k - 1]:
        k -= 1
    return 1.0 - k / n


def exact_memorization(predictions: Sequence[int], targets: Sequence[int]) -> float:
    """The share of target tokens predicted right for one item (0.0 for an empty target)."""
    if len(predictions) != len(targets):
        raise ValueError("predictions and targets differ in length.")
    if not targets:
        return 0.0
    return sum(p == t for p, t in zip(predictions, targets, strict=True)) / len(targets)


def engine_model(engine: Any) -> Any | None:
    """The torch module behind an engine (the hf engine, possibly split over processes),
    or None when the engine has none in this process (vllm)."""
    inner = getattr(engine, "inner", engine)
    model = getattr(inner, "model", None)
    return model if isinstance(model, torch.nn.Module) else None


def join_pair(prompt: str, gt: str) -> str:
    """Prefix and continuation joined as scored (see the module docstring)."""
    if not prompt or not gt or prompt[-1].isspace() or gt[0].isspace():
        return prompt + gt
    return f"{prompt} {gt}"


def encode_pair(
    tokenizer: Any, prompt: str, gt: str, max_length: int | None
) -> tuple[list[int], int]:
    """Token ids of prefix + continuation (with BOS) and where the continuation starts.

    The continuation keeps at most `ES_MAX_TARGET_TOKENS` tokens, and is cut further so the
    whole fits in `max_length` positions; a prefix too long for even one target token keeps
    BOS and its last tokens.
    """
    prefix = list(tokenizer(prompt)["input_ids"])
    full = list(tokenizer(join_pair(prompt, gt))["input_ids"])
    start = len(prefix)
    # BPE may merge across the join; the continuation starts where the two encodings part
    while start > 1 and full[:start] != prefix[:start]:
        start -= 1
    target = full[start : start + ES_MAX_TARGET_TOKENS]
    prefix_ids = full[:start]
    if max_length is not None and len(prefix_ids) + len(target) > max_length:
        room = max_length - len(prefix_ids)
        if room >= 1:
            target = target[:room]
        else:
            keep = max(1, max_length // 2)
            target = target[: max_length - keep]
            bos = prefix_ids[:1]
            prefix_ids = bos + prefix_ids[len(prefix_ids) - keep + 1 :]
    return prefix_ids + target, len(prefix_ids)


@torch.inference_mode()
def teacher_forced_predictions(
    model: torch.nn.Module, rows: Sequence[tuple[list[int], int]], pad_id: int, batch_size: int
) -> list[tuple[list[int], list[int]]]:
    """(predictions, targets) of each (ids, target start) row, in input order."""
    device = next(model.parameters()).device
    out: list[tuple[list[int], list[int]]] = []
    was_training = model.training
    model.eval()
    try:
        for lo in range(0, len(rows), batch_size):
            batch = rows[lo : lo + batch_size]
            width = max(len(ids) for ids, _ in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for b, (ids, _) in enumerate(batch):
                input_ids[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                mask[b, : len(ids)] = 1
            logits = model(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                position_ids=torch.arange(width, device=device).expand(len(batch), width),
                use_cache=False,
            ).logits
            argmax = logits.argmax(dim=-1).cpu()
            for b, (ids, start) in enumerate(batch):
                preds = argmax[b, start - 1 : len(ids) - 1].tolist()
                out.append((preds, ids[start:]))
    finally:
        model.train(was_training)
    return out


@dataclass(frozen=True)
class ExtractionResult:
    """ES and EM means (×100), their per-item scores (×100) and per-item records."""

    es: float
    em: float
    es_scores: np.ndarray
    em_scores: np.ndarray
    records: list[dict[str, Any]]


def eval_extraction(
    engine: Any, pairs: Sequence[VerbMemPair], batch_size: int = ES_BATCH_SIZE
) -> ExtractionResult | None:
    """ES and EM of the model behind `engine` on the verbmem items (None without a torch
    model behind the engine, or without items)."""
    model = engine_model(engine)
    if model is None or not pairs:
        return None
    tok = engine.tokenizer
    max_length = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    rows = [encode_pair(tok, p.prompt, p.gt, max_length) for p in pairs]
    pad = next((i for i in (tok.pad_token_id, tok.eos_token_id) if i is not None), 0)
    scored = teacher_forced_predictions(model, rows, pad, batch_size)
    es = np.array([extraction_strength(p, t) for p, t in scored]) * 100
    em = np.array([exact_memorization(p, t) for p, t in scored]) * 100
    records = [
        {"id": i, "tokens": len(t), "es": float(a), "em": float(b)}
        for i, ((_, t), a, b) in enumerate(zip(scored, es, em, strict=True))
    ]
    return ExtractionResult(float(es.mean()), float(em.mean()), es, em, records)
