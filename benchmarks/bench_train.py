"""Time an unlearning step: our training loop against a plain Hugging Face Trainer loop.

Both train the same model on the same packed forget chunks with the same loss (GA or NPO,
from `muse_bench.unlearners.losses`; NPO's reference log-likelihoods are computed once
beforehand in both), AdamW at a constant learning rate, gradient clipping at 1.0, batch
size B, no gradient accumulation. A step is timed as the interval between two successive
loss calls, so it covers forward, backward, clipping, the optimizer and each loop's own
overhead (batching, logging, callbacks). The first `--warmup` steps of a run are dropped.

    python benchmarks/bench_train.py                           # GA and NPO, embedded-size model
    python benchmarks/bench_train.py --algo npo --repeats 5 --hidden 512 --layers 8

The model is a random Llama of the embedded recipe's shape (or --model DIR) and the tokenizer
a 2048-token BPE trained on the embedded news corpus; timings do not depend on the weights.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shlex
import statistics
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from muse_bench.training.loop import TrainConfig, train  # noqa: E402
from muse_bench.training.packing import pack_texts, pad_batch  # noqa: E402
from muse_bench.training.ref_logprobs import ReferenceProvider  # noqa: E402
from muse_bench.unlearners.losses import npo_loss, sequence_logprob, token_nll  # noqa: E402

BETA = 0.1


# --------------------------------------------------------------------------- inputs


def corpus_texts(corpus: str = "news") -> tuple[list[str], list[str]]:
    """Forget and retain1 texts of an embedded corpus."""
    from muse_bench.data import load_corpus

    c = load_corpus(corpus)
    return list(c.forget), list(c.retain1)


def make_tokenizer(texts: list[str], vocab_size: int = 2048):
    from muse_bench.tasks.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(texts, vocab_size=vocab_size)


def make_model(tokenizer, hidden: int, layers: int, intermediate: int | None = None, seed: int = 0):
    """A random Llama with tied embeddings (the embedded recipe: 192 hidden, 4 layers)."""
    from muse_bench.tasks.refmodels import ModelRecipe
    from muse_bench.tasks.refmodels import make_model as build

    heads = 4 if hidden < 256 else hidden // 64  # embedded: 4 heads of 48; else heads of 64
    recipe = ModelRecipe(
        hidden_size=hidden,
        intermediate_size=intermediate or hidden * 8 // 3,
        num_layers=layers,
        num_heads=heads,
        max_positions=2048,
        seed=seed,
    )
    return build(recipe, tokenizer).eval()


def load_inputs(args: argparse.Namespace) -> tuple[Any, Any, list[str], str]:
    """(model factory, tokenizer, forget texts, description)."""
    forget, retain = corpus_texts(args.corpus)
    if args.model:
        from muse_bench.core.models import load_model, load_tokenizer

        tok = load_tokenizer(args.model)
        return (lambda: load_model(args.model, args.device)), tok, forget, f"model {args.model}"
    tok = make_tokenizer(forget + retain)
    probe = make_model(tok, args.hidden, args.layers)
    n = sum(p.numel() for p in probe.parameters())
    desc = f"random Llama hidden={args.hidden} layers={args.layers} vocab={len(tok)} ({n / 1e6:.1f}M params)"
    return (lambda: make_model(tok, args.hidden, args.layers)), tok, forget, desc


# --------------------------------------------------------------------------- losses


def make_loss(algo: str):
    """loss(model, batch, ref_logp) shared by both loops; `ref_logp` is log p_ref of each
    sequence of the batch (NPO only)."""
    if algo == "ga":
        return lambda model, batch, ref_logp: -token_nll(model, batch)
    return lambda model, batch, ref_logp: npo_loss(sequence_logprob(model, batch), ref_logp, BETA)


class StepClock:
    """Records the wall and CPU time of every loss call; steps are the intervals between.

    CPU time (of this process, all its threads) is the steadier measure on a shared
    machine: it does not count time spent waiting for a core."""

    def __init__(self) -> None:
        self.stamps: list[tuple[float, float]] = []

    def tick(self) -> None:
        self.stamps.append((time.perf_counter(), time.process_time()))

    def steps(self, warmup: int) -> list[tuple[float, float]]:
        gaps = [
            (b[0] - a[0], b[1] - a[1]) for a, b in zip(self.stamps, self.stamps[1:], strict=False)
        ]
        return gaps[warmup:]


# --------------------------------------------------------------------------- the two loops


def run_ours(model, tok, forget: list[str], args, algo: str) -> list[tuple[float, float]]:
    clock, loss = StepClock(), make_loss(algo)

    def loss_fn(m, forget_batch, retain_batch, ref: ReferenceProvider):
        clock.tick()
        ref_logp = ref.forget_logprob(forget_batch) if algo == "npo" else None
        return loss(m, forget_batch, ref_logp)

    config = TrainConfig(
        lr=args.lr,
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_len=args.max_len,
        ref_logprobs=algo == "npo",
        device=args.device,
        mixed_precision="no",
    )
    for _ in train(model, tok, loss_fn, forget, (), config):
        pass
    clock.tick()  # the end of the last step (nothing follows it in the epoch)
    return clock.steps(args.warmup)


def run_trainer(model, tok, forget: list[str], args, algo: str) -> list[tuple[float, float]]:
    from transformers import Trainer, TrainingArguments

    chunks = pack_texts(forget, tok, args.max_len)
    pad = tok.pad_token_id
    device = torch.device(args.device)
    model.to(device)
    ref_logp = None
    if algo == "npo":  # cached once, as our loop does
        with torch.no_grad():
            parts = []
            for i in range(0, len(chunks), args.batch_size):
                batch = pad_batch(chunks[i : i + args.batch_size], pad)
                parts.append(sequence_logprob(model, {k: v.to(device) for k, v in batch.items()}))
            ref_logp = torch.cat(parts)
    dataset = [{"index": i} for i in range(len(chunks))]

    def collate(items):
        idx = [item["index"] for item in items]
        batch = pad_batch([chunks[i] for i in idx], pad)
        batch["index"] = torch.tensor(idx)
        return batch

    clock, loss = StepClock(), make_loss(algo)

    class UnlearnTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            clock.tick()
            ref = None if ref_logp is None else ref_logp[inputs["index"].to(ref_logp.device)]
            return loss(model, inputs, ref)

    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr,
            lr_scheduler_type="constant",
            weight_decay=0.0,
            max_grad_norm=1.0,
            num_train_epochs=args.epochs,
            optim="adamw_torch",
            logging_strategy="no",
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            remove_unused_columns=False,
            dataloader_num_workers=0,
            use_cpu=device.type == "cpu",
            seed=0,
        )
        trainer = UnlearnTrainer(
            model=model, args=targs, train_dataset=dataset, data_collator=collate
        )
        with contextlib.redirect_stdout(io.StringIO()):  # its end-of-training summary
            trainer.train()
    clock.tick()
    return clock.steps(args.warmup)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--algo", choices=["ga", "npo", "both"], default="both")
    p.add_argument("--corpus", default="news", help="embedded corpus whose forget set is used")
    p.add_argument("--model", help="a saved model directory instead of a random model")
    p.add_argument("--hidden", type=int, default=192, help="random model width (embedded: 192)")
    p.add_argument("--layers", type=int, default=4, help="random model depth (embedded: 4)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-len", type=int, default=512, help="chunk length in tokens")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--epochs", type=int, default=4, help="epochs per run (more steps to time)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each loop (alternating)")
    p.add_argument("--warmup", type=int, default=2, help="steps dropped at the start of a run")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from muse_bench.core.models import quiet_transformers

    quiet_transformers()
    make, tok, forget, desc = load_inputs(args)
    n_chunks = len(pack_texts(forget, tok, args.max_len))
    print("command:", shlex.join([sys.executable, *sys.argv]))
    print(
        f"{desc}; {n_chunks} forget chunks of <= {args.max_len} tokens, batch {args.batch_size}, "
        f"{args.threads} thread(s), device {args.device}"
    )
    algos = ["ga", "npo"] if args.algo == "both" else [args.algo]
    header = (
        f"{'algo':<5} {'loop':<8} {'wall ms/step':>13} {'cpu ms/step':>12}  per-run wall medians"
    )
    print(f"\n{header}")
    ratios = []
    for algo in algos:
        runs: dict[str, list[list[tuple[float, float]]]] = {"muse": [], "trainer": []}
        loops = {"muse": run_ours, "trainer": run_trainer}
        for r in range(args.repeats):  # interleaved, each going first every other time
            for loop in sorted(loops, reverse=r % 2 == 1):
                runs[loop].append(loops[loop](make(), tok, forget, args, algo))
        med: dict[str, tuple[float, float]] = {}
        for loop, found in runs.items():
            steps = [s for run in found for s in run]
            med[loop] = (
                statistics.median(w for w, _ in steps),
                statistics.median(c for _, c in steps),
            )
            per_run = ", ".join(f"{1e3 * statistics.median(w for w, _ in r):.1f}" for r in found)
            print(
                f"{algo:<5} {loop:<8} {1e3 * med[loop][0]:>13.1f} {1e3 * med[loop][1]:>12.1f}  {per_run}"
            )
        wall = med["muse"][0] / med["trainer"][0]
        cpu = med["muse"][1] / med["trainer"][1]
        ratios.append(f"{algo}: muse / trainer = {wall:.3f}x wall, {cpu:.3f}x cpu")
    print("\n" + "\n".join(ratios))


if __name__ == "__main__":
    main()
