"""MUSE's data preparation: text packed into max_len chunks that start with BOS."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pack_texts(texts: Sequence[str], tokenizer, max_len: int) -> list[torch.Tensor]:
    """Join `texts` with a blank line (MUSE's .txt twin), tokenize, and cut into chunks.

    Every chunk starts with BOS and has at most `max_len` tokens; the last one may be
    shorter. Returns a list of 1-D LongTensors.
    """
    if max_len < 2:
        raise ValueError("max_len must be at least 2")
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    body = max_len - 1
    bos = tokenizer.bos_token_id
    return [
        torch.tensor([bos] + ids[i : i + body], dtype=torch.long) for i in range(0, len(ids), body)
    ]


def pad_batch(chunks: Sequence[torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad chunks into `input_ids`, `attention_mask` and `labels` (-100 on padding)."""
    width = max(len(c) for c in chunks)
    input_ids = torch.full((len(chunks), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(chunks), width), dtype=torch.long)
    for row, chunk in enumerate(chunks):
        input_ids[row, : len(chunk)] = chunk
        mask[row, : len(chunk)] = 1
    labels = input_ids.masked_fill(mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
