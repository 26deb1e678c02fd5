"""Peak memory of unlearning runs: NPO with a cached reference against NPO with a resident
reference model and plain GA, plus the memory options (KL top-k cache, LoRA, gradient
checkpointing).

Each configuration trains the same random model for one epoch in a fresh subprocess. The
subprocess builds the model and tokenizer, resets the kernel's peak-RSS mark
(/proc/self/clear_refs), trains, and reports the peak resident set size (VmHWM) minus
the RSS just before training: the memory the run itself needed (gradients, optimizer
moments, activations, a reference copy or cache). glibc runs with a fixed mmap threshold
so that freed tensors leave the resident set at once, as on a GPU allocator. On GPUs the same ratios hold for
`torch.cuda.max_memory_allocated`, which `--device cuda` reports instead.

    python benchmarks/bench_memory.py                        # hidden 512, 8 layers (~26M params)
    python benchmarks/bench_memory.py --configs ga,npo,npo_resident --hidden 256
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

from muse_bench.unlearners import GA, GA_KLR, NPO, UnlearnContext  # noqa: E402
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
    tok = load_tokenizer(args.tokenizer)
    forget, retain = corpus_texts(args.corpus)
    model = make_model(tok, args.hidden, args.layers).to(args.device)
    cls, extra = CONFIGS[args.child]
    algo = cls(lr=1e-5, epochs=1, batch_size=args.batch_size, max_len=args.max_len, **extra)
    request = ForgetRequest("single", 1, tuple(forget), tuple(retain))
    # Import now what training imports lazily, so that its code is not counted as memory.
    import accelerate  # noqa: F401
    import peft  # noqa: F401
    import safetensors.torch  # noqa: F401
    import tqdm  # noqa: F401

    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark
        before = _vm("VmRSS")
    algo.unlearn(model, tok, request, UnlearnContext(device=args.device, seed=0))
    peak = torch.cuda.max_memory_allocated() if cuda else _vm("VmHWM")
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"config": args.child, "before": before, "peak": peak, "params": params}))


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
    print(
        f"random Llama hidden={args.hidden} layers={args.layers} ({params / 1e6:.1f}M params, "
        f"{params * 4 / 2**20:.0f} MiB fp32), batch {args.batch_size} x {args.max_len} tokens, "
        f"device {args.device}; memory = {unit} during training minus before"
    )
    ga = results.get("ga")
    print(f"\n{'config':<15} {'before MiB':>11} {'peak MiB':>9} {'increase MiB':>13} {'x ga':>6}")
    for name, r in results.items():
        inc = r["peak"] - r["before"]
        ratio = f"{inc / (ga['peak'] - ga['before']):.2f}" if ga else "-"
        print(
            f"{name:<15} {r['before'] / 2**20:>11.0f} {r['peak'] / 2**20:>9.0f} "
            f"{inc / 2**20:>13.0f} {ratio:>6}"
        )


if __name__ == "__main__":
    main()
