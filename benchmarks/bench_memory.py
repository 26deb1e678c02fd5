"""Peak memory of unlearning runs: NPO with a cached reference against NPO with a resident
reference model and plain GA, plus the memory options (KL top-k cache, LoRA, gradient
checkpointing) and the update rules (zeroth-order `npo_zo`, SAM, SURE), against an
evaluation-only pass (`eval`: forward passes under no-grad over the same batches, what
scoring the model costs).

Each configuration trains the same random model for one epoch in a fresh subprocess. The
subprocess builds the model and tokenizer, resets the kernel's peak-RSS mark
(/proc/self/clear_refs), trains, and reports the peak resident set size (VmHWM) minus
the RSS just before training: the memory the run itself needed (gradients, optimizer
moments, activations, a reference copy or cache). `model+run` adds the weights: the peak
minus the RSS before the model was built (libraries excluded), which is what a GPU's
`max_memory_allocated` counts; the zeroth-order goal is compared on it. glibc runs with a fixed mmap threshold
so that freed tensors leave the resident set at once, as on a GPU allocator. On GPUs the same ratios hold for
`torch.cuda.max_memory_allocated`, which `--device cuda` reports instead.

    python benchmarks/bench_memory.py                        # hidden 512, 8 layers (~26M params)
    python benchmarks/bench_memory.py --configs ga,npo,npo_resident --hidden 256
    python benchmarks/bench_memory.py --configs eval,npo,npo_zo --model tasks/news/v3/models/target
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import corpus_texts, make_model, make_tokenizer  # noqa: E402

from muse_bench.unlearners import GA, GA_KLR, NPO, NPO_GDR, UnlearnContext  # noqa: E402
from muse_bench.unlearners.losses import npo_loss, sequence_logprob  # noqa: E402


@dataclass(kw_only=True)
class NPOResident(NPO):
    """NPO reading log p_ref(x) from a frozen model copy at every step (what a loop without
    a reference cache does)."""

    needs_ref_logprobs: ClassVar[bool] = False
    needs_ref_model: ClassVar[bool] = True

    def loss(self, model, forget, retain, ref):
        logits = ref.logits(forget)[:, :-1].float()
        labels = forget["labels"][:, 1:]
        nll = F.cross_entropy(
            logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none"
        )
        ref_logp = -nll.view_as(labels).sum(-1)
        return npo_loss(sequence_logprob(model, forget), ref_logp, self.beta)


CONFIGS = {
    "ga": (GA, {}),
    "npo": (NPO, {}),
    "npo_resident": (NPOResident, {}),
    "ga_klr": (GA_KLR, {}),
    "ga_klr_topk32": (GA_KLR, {"ref_topk": 32}),
    "ga_klr_lora8": (GA_KLR, {"lora_rank": 8}),  # the base weights are the KL reference
    "ga_lora8": (GA, {"lora_rank": 8}),
    "ga_ckpt": (GA, {"gradient_checkpointing": True}),
    "ga_lora8_ckpt": (GA, {"lora_rank": 8, "gradient_checkpointing": True}),
    "npo_zo": (NPO, {"optimizer": "zo"}),  # forward passes only, reference log-probs cached
    "npo_zo_lora8": (NPO, {"optimizer": "zo", "lora_rank": 8}),
    "npo_gdr": (NPO_GDR, {}),
    "npo_gdr_sam": (NPO_GDR, {"sam_rho": 0.01}),
    "npo_sure": (NPO, {"sure_quantile": 0.9}),
    "eval": (None, {}),  # no training: forward passes under no-grad over the same batches
}


def _vm(field: str) -> int:
    """A /proc/self/status memory field, in bytes."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", text).group(1)) * 1024


def child(args: argparse.Namespace) -> None:
    """Run one configuration and print a JSON line with the memory it used."""
    from muse_bench.core.models import load_tokenizer
    from muse_bench.core.types import ForgetRequest

    torch.set_num_threads(args.threads)
    # Import now what training imports lazily, so that its code is not counted as memory.
    import accelerate  # noqa: F401
    import peft  # noqa: F401
    import safetensors.torch  # noqa: F401
    import tqdm  # noqa: F401

    from muse_bench.training import loop  # noqa: F401

    forget, retain = corpus_texts(args.corpus)
    cuda = args.device.startswith("cuda")
    base = torch.cuda.memory_allocated() if cuda else _vm("VmRSS")
    if args.model:
        from muse_bench.core.models import load_model

        tok = load_tokenizer(args.model)
        model = load_model(args.model, args.device).eval()
    else:
        tok = load_tokenizer(args.tokenizer)
        model = make_model(tok, args.hidden, args.layers).to(args.device)
    cls, extra = CONFIGS[args.child]
    algo = None
    if cls is not None:
        lr = 1e-8 if extra.get("optimizer") == "zo" else 1e-5
        algo = cls(lr=lr, epochs=1, batch_size=args.batch_size, max_len=args.max_len, **extra)
    request = ForgetRequest("single", 1, tuple(forget), tuple(retain))

    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark
        before = _vm("VmRSS")
    if algo is None:
        evaluate_only(model, tok, forget, args)
    else:
        algo.unlearn(model, tok, request, UnlearnContext(device=args.device, seed=0))
    peak = torch.cuda.max_memory_allocated() if cuda else _vm("VmHWM")
    params = sum(p.numel() for p in model.parameters())
    record = {"config": args.child, "base": base, "before": before, "peak": peak}
    print(json.dumps({**record, "params": params}))


def evaluate_only(model, tokenizer, texts: list[str], args: argparse.Namespace) -> None:
    """Score every forget chunk under no-grad in training-sized batches: the memory of an
    evaluation pass over the same data (weights plus one forward's activations)."""
    from muse_bench.training.packing import pack_texts, pad_batch
    from muse_bench.unlearners.losses import token_logprobs

    chunks = pack_texts(texts, tokenizer, args.max_len)
    with torch.no_grad():
        for start in range(0, len(chunks), args.batch_size):
            batch = pad_batch(chunks[start : start + args.batch_size], tokenizer.pad_token_id)
            token_logprobs(model, {k: v.to(args.device) for k, v in batch.items()})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset")
    p.add_argument("--corpus", default="news")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", help="a saved model to use (e.g. tasks/news/v3/models/target)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--tokenizer", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child(args)
        return
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        sys.exit(f"error: unknown config(s) {unknown}; choose from {', '.join(CONFIGS)}")
    print("command:", shlex.join([sys.executable, *sys.argv]))
    forget, retain = corpus_texts(args.corpus)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        make_tokenizer(forget + retain).save_pretrained(tmp)
        base = [sys.executable, __file__, "--tokenizer", tmp]
        for key in ("corpus", "hidden", "layers", "batch_size", "max_len", "threads", "device"):
            base += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        if args.model:
            base += ["--model", args.model]
        # A fixed mmap threshold makes glibc return every freed tensor's memory at once;
        # with its default dynamic threshold freed blocks stay in the heap, and peak RSS
        # would measure fragmentation (LoRA's many temporaries looked 50% bigger than GA).
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        for name in names:
            proc = subprocess.run(
                [*base, "--child", name], capture_output=True, text=True, check=False, env=env
            )
            if proc.returncode:
                sys.exit(f"error: config {name} failed:\n{proc.stderr[-3000:]}")
            results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    params = next(iter(results.values()))["params"]
    unit = "GPU allocated" if args.device.startswith("cuda") else "peak RSS"
    model = args.model or f"random Llama hidden={args.hidden} layers={args.layers}"
    print(
        f"{model} ({params / 1e6:.1f}M params, "
        f"{params * 4 / 2**20:.0f} MiB fp32), batch {args.batch_size} x {args.max_len} tokens, "
        f"device {args.device}, {args.threads} thread(s); memory = {unit}: increase = during "
        "training minus before it, model+run = peak minus before the model was built"
    )
    print(table(results))


def table(results: dict[str, dict[str, int]]) -> str:
    """The results as a text table, with ratios to GA's increase and to the model+run peaks
    of the evaluation-only pass and of NPO with AdamW (where those were measured)."""

    def mib(x: float) -> str:
        return f"{x / 2**20:.1f}"

    total = {name: r["peak"] - r["base"] for name, r in results.items()}
    ga = results.get("ga")
    head = f"{'config':<15} {'before':>8} {'peak':>8} {'increase':>9} {'x ga':>6} {'model+run':>10}"
    lines = [f"\n{head} {'x eval':>7} {'x npo':>6}   (MiB)"]
    for name, r in results.items():
        inc = r["peak"] - r["before"]
        ratios = [
            f"{inc / (ga['peak'] - ga['before']):.2f}" if ga else "-",
            f"{total[name] / total['eval']:.2f}" if "eval" in total else "-",
            f"{total[name] / total['npo']:.2f}" if "npo" in total else "-",
        ]
        lines.append(
            f"{name:<15} {mib(r['before']):>8} {mib(r['peak']):>8} {mib(inc):>9} "
            f"{ratios[0]:>6} {mib(total[name]):>10} {ratios[1]:>7} {ratios[2]:>6}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
