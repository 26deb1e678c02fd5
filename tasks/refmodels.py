"""The recipe that builds an embedded benchmark's tokenizer, target and retrain models.

The target is trained on forget ∪ retain1 ∪ retain2 ∪ the extra scal/sust documents;
the retrain model on the same minus forget. Both start from the same seeded
initialisation and see their documents in the same seeded order, one document per
sequence (BOS + text + EOS), so the only difference between them is D_forget.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from muse_bench.tasks.tokenizer import train_bpe_tokenizer


@dataclass(frozen=True)
class ModelRecipe:
    """Architecture and training settings of the tiny reference models."""

    vocab_size: int = 2048
    hidden_size: int = 192
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 4
    max_positions: int = 512
    epochs: int = 20
    batch_size: int = 8
    lr: float = 2e-3
    warmup_steps: int = 30
    weight_decay: float = 0.0
    seed: int = 0


# Per embedded benchmark version. Version 3 keeps version 2's recipe: a trial with 12
# epochs (to save time on the larger v3 corpora) left the books models undertrained
# (target verbmem_f 28.4, retrain knowmem_r 22.3; see notes/bench_v3.md).
MODEL_RECIPES_BY_VERSION: dict[str, dict[str, ModelRecipe]] = {
    "2": {"news": ModelRecipe(), "books": ModelRecipe()},
    "3": {"news": ModelRecipe(), "books": ModelRecipe()},
}
MODEL_RECIPES: dict[str, ModelRecipe] = MODEL_RECIPES_BY_VERSION["3"]


def read_json(path: Path) -> list:
    return json.loads(path.read_text(encoding="utf-8"))


QA_LINE = re.compile(r"Question: (.*)\nAnswer: (.*)")


def qa_views(docs: list[str], seed: int, copies: int = 2, per_view: int = 6) -> list[str]:
    """The documents' question boxes again, shuffled into short QA-only sequences.

    A tiny model memorizes a box answer in the context of its article; seeing the same
    question lines in other company (as the few-shot knowmem prompt shows them) lets it
    recall them without the article. Views only mix questions of the same group of
    documents, and the views of the shared documents are identical for both models.
    """
    rng = random.Random(seed)
    pairs = [f"Question: {q}\nAnswer: {a}" for doc in docs for q, a in QA_LINE.findall(doc)]
    views = []
    for _ in range(copies):
        order = list(pairs)
        rng.shuffle(order)
        views += ["\n\n".join(order[i : i + per_view]) for i in range(0, len(order), per_view)]
    return views


def training_texts(data_dir: Path) -> dict[str, list[str]]:
    """The target's and the retrain model's training sequences, from a MUSE layout.

    Documents first, then QA views of them (see `qa_views`).
    """
    forget = read_json(data_dir / "raw/forget.json")
    rest = read_json(data_dir / "raw/retain1.json") + read_json(data_dir / "raw/retain2.json")
    seen = set(forget) | set(rest)
    for folder in ("scal", "sust"):
        for path in sorted((data_dir / folder).glob("forget_*.json")):
            for doc in read_json(path):
                if doc not in seen:
                    seen.add(doc)
                    rest.append(doc)
    rest_views, forget_views = qa_views(rest, seed=1), qa_views(forget, seed=2)
    return {"target": forget + rest + forget_views + rest_views, "retrain": rest + rest_views}


def tokenizer_texts(data_dir: Path) -> list[str]:
    """Every document of the corpus (holdout too, so unseen text tokenizes alike)."""
    texts = training_texts(data_dir)["target"] + read_json(data_dir / "raw/holdout.json")
    return sorted(set(texts))


def make_model(recipe: ModelRecipe, tokenizer):
    """A freshly initialised Llama-architecture causal LM, seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(recipe.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_heads,
        max_position_embeddings=recipe.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def encode_documents(texts: list[str], tokenizer, max_positions: int) -> list[torch.Tensor]:
    """BOS + document + EOS per sequence, cut to the model's context."""
    out = []
    for text in texts:
        ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
        out.append(torch.tensor(ids[:max_positions], dtype=torch.long))
    return out


def train_reference(texts: list[str], tokenizer, recipe: ModelRecipe, log=print):
    """Train one reference model on `texts`; returns the model in eval mode."""
    from muse_bench.training.packing import pad_batch

    model = make_model(recipe, tokenizer)
    seqs = encode_documents(texts, tokenizer, recipe.max_positions)
    order_rng = random.Random(recipe.seed)
    steps_per_epoch = math.ceil(len(seqs) / recipe.batch_size)
    total = steps_per_epoch * recipe.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)

    def lr_at(step: int) -> float:
        if step < recipe.warmup_steps:
            return (step + 1) / recipe.warmup_steps
        progress = (step - recipe.warmup_steps) / max(1, total - recipe.warmup_steps)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    start = time.time()
    for epoch in range(recipe.epochs):
        idx = list(range(len(seqs)))
        order_rng.shuffle(idx)
        total_loss = 0.0
        for b in range(0, len(idx), recipe.batch_size):
            batch = pad_batch(
                [seqs[i] for i in idx[b : b + recipe.batch_size]], tokenizer.pad_token_id
            )
            loss = model(**batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            total_loss += loss.item()
        if log and (epoch % 5 == 4 or epoch == recipe.epochs - 1):
            log(
                f"epoch {epoch + 1}/{recipe.epochs} loss {total_loss / steps_per_epoch:.4f} "
                f"({time.time() - start:.0f}s)"
            )
    return model.eval()


def build_reference_models(
    data_dir: Path,
    out_dir: Path,
    recipe: ModelRecipe,
    which: tuple[str, ...] = ("target", "retrain"),
    log=print,
) -> dict[str, Path]:
    """Train the tokenizer and the target/retrain models into out_dir/{target,retrain}."""
    from muse_bench.core.models import save_model

    tokenizer = train_bpe_tokenizer(tokenizer_texts(data_dir), recipe.vocab_size)
    texts = training_texts(data_dir)
    paths = {}
    for name in which:
        log(f"training {name} on {len(texts[name])} documents")
        model = train_reference(texts[name], tokenizer, recipe, log=log)
        paths[name] = save_model(model, tokenizer, out_dir / name)
        (paths[name] / "muse_recipe.json").write_text(json.dumps(asdict(recipe), indent=2) + "\n")
    return paths
