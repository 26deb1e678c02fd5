"""Time a full MUSE evaluation: the batched engine against a one-example-at-a-time loop.

The loop is written the way MUSE's released evaluation is: one unbatched `model.generate`
per verbmem / knowmem prompt, and one forward pass per privleak text and one per its
lowercased text. Both paths compute the same numbers (every attack the hf engine reports,
Min-K%++ included, from the same forward passes), the script checks they are equal, and it
prints the median wall time of N repeats of each and the speed ratio.

    python benchmarks/bench_eval.py                       # embedded news corpus and target
    python benchmarks/bench_eval.py --model DIR --data DIR --corpus news --repeats 5

Without a target model (the embedded one is built by `muse prepare --corpus news`), or
with --synthetic, a randomly initialised model of the embedded recipe's size and a
tokenizer trained on the corpus stand in: timings stay representative, only the metric
values are meaningless.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import zlib
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from muse_bench.core.types import Corpus, RetrainAUC  # noqa: E402
from muse_bench.engines.hf import HFEngine  # noqa: E402
from muse_bench.metrics.evaluate import evaluate  # noqa: E402
from muse_bench.metrics.knowmem import cut_answer, icl_prefix, knowmem_prompt  # noqa: E402
from muse_bench.metrics.mia import MIN_K_PERCENTS, mia_auc  # noqa: E402
from muse_bench.metrics.privleak import privleak  # noqa: E402
from muse_bench.metrics.rouge import rouge_l_f1  # noqa: E402
from muse_bench.metrics.verbmem import truncate_gt  # noqa: E402

ATTACK = "min_k_40"
RETRAIN = RetrainAUC(0.5, ATTACK, {"source": "benchmark placeholder, not a real retrain AUC"})


# --------------------------------------------------------------------------- inputs


def load_inputs(args: argparse.Namespace) -> tuple[Any, Any, Corpus, str]:
    """The model, tokenizer and corpus to time, and a line saying what they are."""
    from muse_bench.data import embedded_models_dir, load_corpus, load_corpus_dir

    corpus = load_corpus_dir(args.corpus, args.data) if args.data else load_corpus(args.corpus)
    model_dir = args.model or embedded_models_dir(args.corpus) / "target"
    if not args.synthetic and os.path.isdir(model_dir):
        from muse_bench.core.models import load_model_and_tokenizer

        model, tok = load_model_and_tokenizer(model_dir, device=args.device)
        return model, tok, corpus, f"model {model_dir}"
    if not args.synthetic and args.model:
        sys.exit(f"error: model directory '{args.model}' does not exist.")
    model, tok = synthetic_model(corpus, args.device)
    return model, tok, corpus, "synthetic random model (embedded recipe size; no target found)"


def synthetic_model(corpus: Corpus, device: str) -> tuple[Any, Any]:
    """A random Llama of the embedded recipe's shape with a tokenizer trained on the corpus."""
    from muse_bench.tasks.refmodels import ModelRecipe, make_model
    from muse_bench.tasks.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(corpus.forget + corpus.retain1 + corpus.holdout, vocab_size=2048)
    return make_model(ModelRecipe(seed=0), tok).to(device).eval(), tok


# --------------------------------------------------------------------------- MUSE-style loop


@torch.no_grad()
def muse_generate(model, tok, prompt: str, max_new_tokens: int) -> str:
    ids = tok(prompt, return_tensors="pt", add_special_tokens=True).input_ids.to(model.device)
    max_pos = model.config.max_position_embeddings
    if ids.shape[1] > max_pos - max_new_tokens:  # same truncation rule as the engine
        ids = torch.cat([ids[:, :1], ids[:, ids.shape[1] - (max_pos - max_new_tokens) + 1 :]], 1)
    out = model.generate(
        ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
    )
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@torch.no_grad()
def muse_text_scores(model, tok, text: str) -> tuple[np.ndarray, np.ndarray]:
    """Token log-probs and Min-K%++ z-scores of one text, from one forward pass."""
    ids = torch.tensor([tok.encode(text)[: model.config.max_position_embeddings]])
    logp = torch.log_softmax(model(ids.to(model.device)).logits[0, :-1].float(), dim=-1)
    lp = logp.gather(-1, ids[0, 1:, None].to(model.device)).squeeze(-1)
    p = logp.exp()
    mu = (p * logp).sum(-1)
    sigma = (p * (logp - mu[:, None]).square()).sum(-1).sqrt()
    z = (lp - mu) / sigma.clamp(min=1e-12)
    return lp.double().cpu().numpy(), z.double().cpu().numpy()


def muse_doc_attacks(model, tok, text: str) -> dict[str, float]:
    lp, z = muse_text_scores(model, tok, text)
    lower, _ = muse_text_scores(model, tok, text.lower())
    nll = -lp.mean()
    out = {
        "loss": nll,
        "zlib": nll / len(zlib.compress(bytes(text, "utf-8"))),
        "lowercase": nll / -lower.mean(),
    }
    for k in MIN_K_PERCENTS:
        n = max(1, int(len(lp) * k / 100))
        out[f"min_k_{k}"] = -np.mean(np.sort(lp)[:n])
        out[f"min_k_plus_plus_{k}"] = -np.mean(np.sort(z)[:n])
    return out


def muse_evaluate(model, tok, corpus: Corpus) -> dict[str, Any]:
    """The four metrics and every attack's AUC, one example at a time."""
    verb = [
        rouge_l_f1(muse_generate(model, tok, p.prompt, 128), truncate_gt(tok, p.gt, 128))
        for p in corpus.verbmem_forget
    ]

    def knowmem(qa, icl) -> float:
        prefix = icl_prefix(icl)
        scores = [
            rouge_l_f1(
                cut_answer(muse_generate(model, tok, knowmem_prompt(prefix, q.question), 32)),
                q.answer,
            )
            for q in qa
        ]
        return float(np.mean(scores) * 100)

    forget = [muse_doc_attacks(model, tok, t) for t in corpus.privleak_forget]
    holdout = [muse_doc_attacks(model, tok, t) for t in corpus.privleak_holdout]
    aucs = {a: mia_auc([d[a] for d in forget], [d[a] for d in holdout]) for a in forget[0]}
    return {
        "forget": forget,
        "holdout": holdout,
        "metrics": {
            "verbmem_f": float(np.mean(verb) * 100),
            "knowmem_f": knowmem(corpus.forget_qa, corpus.forget_qa_icl),
            "privleak": privleak(aucs[ATTACK], RETRAIN.auc),
            "knowmem_r": knowmem(corpus.retain_qa, corpus.retain_qa_icl),
        },
        "aucs": aucs,
    }


# --------------------------------------------------------------------------- main


def compare(batched, loop: dict[str, Any], tol: float = 1e-5) -> list[str]:
    """Differences between the two paths' results (empty when they agree).

    Per-document attack scores must agree within `tol` (relative). Batched and unbatched
    forward passes differ by float rounding (~1e-6), so an AUC may differ only where a
    forget and a holdout document score within `tol` of each other: by at most the share
    of such near-tied pairs.
    """
    problems = []
    for name, value in loop["metrics"].items():
        if name != "privleak" and abs(batched.metrics[name] - value) > 1e-9:
            problems.append(f"{name}: batched {batched.metrics[name]:.6f} vs loop {value:.6f}")
    docs = {(d["split"], d["id"]): d for d in batched.examples["privleak"]}
    for name, value in loop["aucs"].items():
        split_scores = {}
        for split in ("forget", "holdout"):
            ours = np.array([docs[(split, i)][name] for i in range(len(loop[split]))])
            theirs = np.array([d[name] for d in loop[split]])
            if not np.allclose(ours, theirs, rtol=tol, atol=tol):
                problems.append(f"{name} scores on {split}: max diff {np.abs(ours - theirs).max()}")
            split_scores[split] = theirs
        f, h = split_scores["forget"], split_scores["holdout"]
        near = np.abs(f[None, :] - h[:, None]) <= tol * np.maximum(1, np.abs(f[None, :]))
        allowed = near.sum() / near.size
        if abs(batched.attacks[name]["auc"] - value) > allowed + 1e-9:
            problems.append(f"AUC {name}: batched {batched.attacks[name]['auc']} vs loop {value}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="news", help="corpus name (default news)")
    parser.add_argument("--data", help="a MUSE-layout directory (default: the embedded corpus)")
    parser.add_argument("--model", help="model directory (default: the embedded target)")
    parser.add_argument("--synthetic", action="store_true", help="time a random model")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of each path")
    parser.add_argument("--batch-size", type=int, default=32, help="as muse eval (default 32)")
    parser.add_argument("--n-bootstrap", type=int, default=1000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tok, corpus, what = load_inputs(args)
    print(f"{corpus.benchmark_id}: {what}; torch threads {torch.get_num_threads()}")
    print(
        f"  {len(corpus.verbmem_forget)} verbmem prompts, {len(corpus.forget_qa)}+"
        f"{len(corpus.retain_qa)} QA, {len(corpus.privleak_forget)}+"
        f"{len(corpus.privleak_holdout)} privleak documents"
    )
    engine = HFEngine(model=model, tokenizer=tok, batch_size=args.batch_size)
    batched_times, loop_times = [], []
    batched = loop = None
    for i in range(args.repeats):
        start = time.perf_counter()
        batched = evaluate(
            engine, corpus, RETRAIN, attack=ATTACK, n_bootstrap=args.n_bootstrap, progress=False
        )
        batched_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        loop = muse_evaluate(model, tok, corpus)
        loop_times.append(time.perf_counter() - start)
        print(f"  repeat {i + 1}: batched {batched_times[-1]:.2f} s, loop {loop_times[-1]:.2f} s")
    problems = compare(batched, loop)
    fast, slow = statistics.median(batched_times), statistics.median(loop_times)
    print(f"metrics (batched): { {k: round(v, 3) for k, v in batched.metrics.items()} }")
    print(
        f"median of {args.repeats}: batched {fast:.2f} s, one-at-a-time {slow:.2f} s, "
        f"speed-up x{slow / fast:.2f}"
    )
    if problems:
        print("MISMATCH between the two paths:\n  " + "\n  ".join(problems))
        return 1
    print(
        "metrics equal; every attack's document scores equal within 1e-5 and AUCs equal "
        "up to float near-ties"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
